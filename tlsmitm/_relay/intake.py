"""How a connection arrives: CONNECT, absolute-form ``http://``, or a transparent destination.

Step 1 of DESIGN.md. For CONNECT the request head is read (bounded, timed), the target host is
normalised, and the upstream TCP connection is opened *before* answering, so that a host that
cannot be reached gets ``502`` rather than a tunnel to nowhere -- unless an idle pooled
connection to that host is kept for this client (:mod:`tlsmitm._relay.pool`): then the
ClientHello decides whether it fits, and the host is dialled only if not.
``CONNECT error.invalid:443`` is answered by tlsmitm itself: that is the error origin.
Absolute-form ``http://`` requests are relayed as plain HTTP. In transparent mode the embedder
supplies the destination instead.

Everything the client wrote is parsed by :mod:`tlsmitm._edge` first: a bad head or target gets
its status (``400``, ``414``, ``431``) at once. A target that is the proxy itself, or a request
that already passed through it (its ``Via`` pseudonym), gets ``508 Loop Detected``. After
``CONNECT`` the rest of the stream is the tunnel's: it is never read as more proxy requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11
import trio

from .._access import PROXY_AUTHENTICATE
from .._edge import BadRequest, find_head_end, parse_absolute_url, parse_connect_target, via_names
from .._errors import ClientError, UpstreamError
from .._names import normalize_host
from .downstream import NotTLS
from .error_origin import serve_error_origin
from .flow import Flow
from .plain import plain_http
from .state import FlowRecord, FlowState
from .streams import HEAD_LIMIT, RECEIVE, send_simple

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["explicit", "transparent"]


async def explicit(
    ix: Interceptor, stream: trio.abc.Stream, client: tuple[str, int], conn: FlowRecord
) -> None:
    """An explicit proxy connection: CONNECT or an absolute-form ``http://`` request."""
    try:
        await _explicit(ix, stream, client, conn)
    except BadRequest as exc:
        headers = ((b"proxy-authenticate", PROXY_AUTHENTICATE),) if exc.status == 407 else ()
        await send_simple(stream, exc.status, _REASONS.get(exc.status, b"Bad Request"), headers)
        await _linger(stream)
        raise


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then read what the client is still sending for a moment before closing.

    Closing a socket with unread input sends a reset, and a reset can destroy the error response
    before the client read it (RFC 9112 §9.6: a server closes in stages). Bounded: 1 s, 64 KiB.
    """
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    with trio.move_on_after(1.0):
        try:
            await stream.send_eof()
            drained = 0
            while drained < HEAD_LIMIT:
                data = await stream.receive_some(RECEIVE)
                if not data:
                    return
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    407: b"Proxy Authentication Required",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    508: b"Loop Detected",
}


async def _explicit(
    ix: Interceptor, stream: trio.abc.Stream, client: tuple[str, int], conn: FlowRecord
) -> None:
    head, rest = await _read_head(ix, stream)
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    parser.receive_data(head + rest)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        raise BadRequest(f"malformed request head: {exc}", reason="bad_request") from exc
    if not isinstance(event, h11.Request):
        raise BadRequest("malformed request head", reason="bad_request")
    if ix._auth.credentials is not None:
        # RFC 9110 §11.7.1: a proxy asks for credentials with 407 and Proxy-Authenticate.
        values = [v for k, v in event.headers if k == b"proxy-authorization"]
        conn.user = await ix._auth.user_for(values[0] if len(values) == 1 else None)
        if conn.user is None:
            raise BadRequest("proxy authentication required", reason="proxy_auth", status=407)
    if ix._loop.seen_in(via_names([v for k, v in event.headers if k == b"via"])):
        # RFC 9110 §7.6.3: our own pseudonym in Via -- this request went round a proxy chain.
        raise BadRequest("request already passed through this proxy", reason="loop", status=508)
    if event.method == b"CONNECT":
        authority = parse_connect_target(event.target)
        name, port = authority.host, authority.port
        conn.host, conn.port = name, port
        if ix._loop.is_self(name, port):
            raise BadRequest(
                f"CONNECT to the proxy itself ({name}:{port})", reason="loop", status=508
            )
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
            except UpstreamError as exc:
                if exc.reason == "loop":
                    raise BadRequest(str(exc), reason="loop", status=508) from exc
                await send_simple(stream, 502, b"Bad Gateway")
                raise
        await _answer_connect(parser, stream)
        # From here on every byte is the tunnel's (RFC 9110 §9.3.6): pipelined CONNECTs after
        # this one go to the target as data, never back into this intake.
        tunnel_data = bytes(parser.trailing_data[0])
        # The tunnel may last hours: this frame keeps neither the CONNECT head nor its parser.
        del head, rest, parser, event
        await Flow(ix, conn, client).run(stream, tunnel_data, upstream_tcp, name, port)
        return
    target = bytes(event.target)
    if target[:1] != b"/" and b"://" in target[:16]:
        url = parse_absolute_url(target)
        conn.host, conn.port = url.authority.host, url.authority.port
        if ix._loop.is_self(url.authority.host, url.authority.port):
            raise BadRequest(
                f"request to the proxy itself ({url.authority.text()})", reason="loop", status=508
            )
        await plain_http(ix, stream, head + rest, url, conn)
        return
    raise BadRequest("not a proxy request (expected CONNECT or http:// URL)", reason="bad_request")


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
    if ix._loop.is_self(name, port):
        raise ClientError(f"transparent destination {name}:{port} is this proxy", reason="loop")
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
    await Flow(ix, conn, client, transparent=True).run(stream, initial, upstream_tcp, name, port)


async def _read_head(ix: Interceptor, stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """The request head and what followed it; ``head_timeout`` bounds the whole head."""
    buffer = bytearray()
    with trio.move_on_after(ix.config.head_timeout):
        while True:
            end = find_head_end(buffer, limit=HEAD_LIMIT)  # BadRequest at once: bare LF, 431
            if end is not None:
                return bytes(buffer[:end]), bytes(buffer[end:])
            data = await stream.receive_some(RECEIVE)
            if not data:
                raise ClientError("client closed before sending a request", reason="client_gone")
            buffer += data
    if buffer:
        # RFC 9110 §15.5.9: 408 for a head that did not arrive in time (issue 15 fault 6).
        await send_simple(stream, 408, b"Request Timeout")
        await _linger(stream)
    raise ClientError(
        f"no complete request head within {ix.config.head_timeout} s", reason="head_timeout"
    )


async def _answer_connect(parser: h11.Connection, stream: trio.abc.Stream) -> None:
    data = parser.send(h11.Response(status_code=200, reason=b"Connection established", headers=[]))
    if data:
        await stream.send_all(data)
