"""How a connection arrives: CONNECT, absolute-form ``http://``, or a transparent destination.

Step 1 of DESIGN.md. For CONNECT the request head is read (bounded, timed), the target host is
normalised, and the upstream TCP connection is opened *before* answering, so that a host that
cannot be reached gets ``502`` rather than a tunnel to nowhere -- unless an idle pooled
connection to that host is kept for this client (:mod:`tlsmitm._relay.pool`): then the
ClientHello decides whether it fits, and the host is dialled only if not.
``CONNECT error.invalid:443`` is answered by tlsmitm itself: that is the error origin.
Absolute-form ``http://`` requests are relayed as plain HTTP. In transparent mode the embedder
supplies the destination instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11
import trio

from .._errors import ClientError, UpstreamError
from .._names import InvalidHostName, normalize_host
from .downstream import NotTLS
from .error_origin import serve_error_origin
from .flow import Flow
from .plain import plain_http
from .state import FlowRecord, FlowState
from .streams import HEAD_LIMIT, RECEIVE, send_simple
from .targets import split_authority

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["explicit", "transparent"]


async def explicit(
    ix: Interceptor, stream: trio.abc.Stream, client: tuple[str, int], conn: FlowRecord
) -> None:
    """An explicit proxy connection: CONNECT or an absolute-form ``http://`` request."""
    head, rest = await _read_head(ix, stream)
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    parser.receive_data(head + rest)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        await send_simple(stream, 400, b"Bad Request")
        raise ClientError(f"malformed request head: {exc}", reason="bad_request") from exc
    if not isinstance(event, h11.Request):
        await send_simple(stream, 400, b"Bad Request")
        raise ClientError("malformed request head", reason="bad_request")
    if event.method == b"CONNECT":
        try:
            host, port = split_authority(bytes(event.target))
            name = normalize_host(host)
        except (ValueError, InvalidHostName) as exc:
            await send_simple(stream, 400, b"Bad Request")
            raise ClientError(f"bad CONNECT target {event.target!r}", reason="bad_connect") from exc
        conn.host, conn.port = name, port
        if ix.responder.is_error_origin(name, port):
            await _answer_connect(parser, stream)
            await serve_error_origin(ix, stream, parser.trailing_data[0], conn)
            return
        # With an idle upstream connection to this server on hand, do not dial: the
        # ClientHello (its SNI and ALPN) decides whether that connection fits.
        upstream_tcp = None
        if not ix._pool.has_route(client[0], name, port):
            try:
                upstream_tcp = await ix._upstreams.connect(name, port)
            except UpstreamError:
                await send_simple(stream, 502, b"Bad Gateway")
                raise
        await _answer_connect(parser, stream)
        await Flow(ix, conn, client).run(
            stream, bytes(parser.trailing_data[0]), upstream_tcp, name, port
        )
        return
    target = bytes(event.target)
    if target.startswith(b"http://"):
        await plain_http(ix, stream, head + rest, target, conn)
        return
    await send_simple(stream, 400, b"Bad Request")
    raise ClientError("not a proxy request (expected CONNECT or http:// URL)", reason="bad_request")


async def transparent(
    ix: Interceptor,
    stream: trio.abc.Stream,
    client: tuple[str, int],
    destination: tuple[str, int],
    conn: FlowRecord,
) -> None:
    """A transparently redirected connection to ``destination`` (an address and port)."""
    address, port = destination
    name = normalize_host(address)
    conn.host, conn.port = name, port
    # The client speaks first: peek before dialling, so that a connection for the error
    # origin (the embedder routes error.invalid to this listener) is answered here.
    initial = b""
    conn.enter(FlowState.PEEKING)
    try:
        initial, hello = await ix._downstream.peek_hello(stream, b"")
    except NotTLS as not_tls:
        initial = not_tls.args[0]
    else:
        if hello.server_name and ix.responder.is_error_origin(hello.server_name, port):
            await serve_error_origin(ix, stream, initial, conn)
            return
    upstream_tcp = None
    if not ix._pool.has_route(client[0], name, port):
        upstream_tcp = await ix._upstreams.connect(name, port)
    await Flow(ix, conn, client).run(stream, initial, upstream_tcp, name, port)


async def _read_head(ix: Interceptor, stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    buffer = bytearray()
    with trio.fail_after(ix.config.head_timeout):
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])
            if len(buffer) > HEAD_LIMIT:
                await send_simple(stream, 431, b"Request Header Fields Too Large")
                raise ClientError("request head too large", reason="head_too_large")
            data = await stream.receive_some(RECEIVE)
            if not data:
                raise ClientError("client closed before sending a request", reason="client_gone")
            buffer += data


async def _answer_connect(parser: h11.Connection, stream: trio.abc.Stream) -> None:
    data = parser.send(h11.Response(status_code=200, reason=b"Connection established", headers=[]))
    if data:
        await stream.send_all(data)
