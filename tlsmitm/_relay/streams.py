"""Small I/O helpers shared by the relay's modules: closing, simple answers, peers, dialling."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import h11
import trio

from .._names import ip_address_of
from .._tls import close_at_once

__all__ = [
    "HEAD_LIMIT",
    "RECEIVE",
    "Connector",
    "close",
    "close_all",
    "first_error",
    "peer_ip",
    "send_response",
    "send_simple",
    "tcp_connector",
]

Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]

HEAD_LIMIT = 64 * 1024
RECEIVE = 128 * 1024


async def close(resource: trio.abc.AsyncResource) -> None:
    """Close ``resource`` now, without a graceful wait (the end of a connection, or a failure).

    Sockets and TLS over them close synchronously (:func:`~tlsmitm._tls.close_at_once`);
    anything else (an embedder's stream) through ``trio.aclose_forcefully``.
    """
    if not close_at_once(resource):
        await trio.aclose_forcefully(resource)


async def close_all(resources: Sequence[trio.abc.AsyncResource]) -> None:
    """:func:`close` each of ``resources``."""
    for resource in resources:
        await close(resource)


async def tcp_connector(host: str, port: int) -> trio.abc.Stream:
    """The default connector: ``trio.open_tcp_stream``, or one plain connect for an address."""
    address = ip_address_of(host)
    if address is None:
        return await trio.open_tcp_stream(host, port)
    # An address (a transparent destination, a --resolve target): one connect, without the
    # name resolution and happy-eyeballs tasks open_tcp_stream spends on a name.
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((str(address), port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first leaf exception of a (nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def peer_ip(stream: trio.abc.Stream) -> str | None:
    """The peer address of a socket stream, ``None`` for anything else."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return None


async def send_simple(
    stream: trio.abc.Stream,
    status: int,
    reason: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer a proxy client with a short plain-text error and ``Connection: close``."""
    body = reason + b"\n"
    extra = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
        b"connection: close\r\n%s\r\n" % (status, reason, len(body), extra)
    )
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_all(head + body)


async def send_response(
    parser: h11.Connection,
    stream: trio.abc.Stream,
    status: int,
    reason: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    """Send a complete response through the server-side h11 ``parser``."""
    out = parser.send(h11.Response(status_code=status, reason=reason, headers=list(headers)))
    out = out or b""
    if body:
        out += parser.send(h11.Data(data=body)) or b""
    out += parser.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)
