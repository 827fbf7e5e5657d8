"""PROXY protocol on the listening port: who the client really is, behind a TCP balancer.

With ``InterceptorConfig.proxy_protocol`` on, every accepted connection must come from one of
``trusted_balancers`` and start with a PROXY protocol header (v1 or v2, parsed by
:mod:`tlsmitm._proxy_protocol`). A connection from anyone else is closed at once: otherwise
any client could claim any address and walk past allow-lists and per-client grants. The
header's client address replaces the balancer's for everything after it -- logs, decision
records, rules, override grants. Bytes the client sent after the header are handed on unchanged
(:class:`PrefixedStream`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from .._clienthello import NEED_MORE
from .._errors import ClientError
from .._proxy_protocol import (
    ProxyHeader,
    ProxyProtocolError,
    is_trusted,
    parse_proxy_header,
)
from .streams import RECEIVE

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["PrefixedStream", "read_proxy_header"]

log = logging.getLogger("tlsmitm.relay")


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream whose first bytes were already read: ``prefix`` is received before the rest."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.transport = stream
        self._prefix = prefix
        # Kept for code that asks a socket stream for its socket (socket options, addresses).
        self.socket = getattr(stream, "socket", None)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return bytes(await self.transport.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()


class _Refusals:
    """Logs refused connections at most once a minute (a scan must not flood the log)."""

    def __init__(self) -> None:
        self.count = 0
        self._last = -float("inf")

    def note(self, peer: str, why: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= 60.0:
            self._last = now
            log.warning(
                "refused a connection from %s: %s (%d refused so far); only --trusted-balancers "
                "may connect when --proxy-protocol is on",
                peer,
                why,
                self.count,
            )


REFUSALS = _Refusals()


async def read_proxy_header(
    ix: Interceptor, stream: trio.SocketStream, peer: tuple[str, int]
) -> tuple[trio.abc.HalfCloseableStream, tuple[str, int]]:
    """Check the peer, read its PROXY header; return the stream to go on with and the client.

    Raises:
        ClientError: the peer is not a trusted balancer (``reason="untrusted_balancer"``), or its
            header is missing, malformed or late (``"proxy_protocol"``). The caller closes.
    """
    if not is_trusted(peer[0], ix.config.trusted_balancers):
        REFUSALS.note(peer[0], "not a trusted balancer")
        raise ClientError(f"{peer[0]} is not a trusted balancer", reason="untrusted_balancer")
    buffer = b""
    header: ProxyHeader | None = None
    try:
        with trio.fail_after(ix.config.head_timeout):
            while header is None:
                parsed = parse_proxy_header(buffer)
                if parsed is not NEED_MORE:
                    assert isinstance(parsed, ProxyHeader)
                    header = parsed
                    break
                data = await stream.receive_some(RECEIVE)
                if not data:
                    raise ClientError("closed before its PROXY header", reason="proxy_protocol")
                buffer += data
    except ProxyProtocolError as exc:
        REFUSALS.note(peer[0], f"bad PROXY header ({exc.reason})")
        raise ClientError(f"bad PROXY protocol header: {exc}", reason="proxy_protocol") from exc
    except trio.TooSlowError as exc:
        raise ClientError("no PROXY header in time", reason="proxy_protocol") from exc
    client = peer
    if header.source is not None:
        client = (str(header.source[0]), header.source[1])
    rest = buffer[header.length :]
    return (PrefixedStream(stream, rest) if rest else stream), client
