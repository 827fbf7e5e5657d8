"""HTTP/2 inside the tunnel: the h2 relay, on either side, translated to and from HTTP/1.1.

Theory of operation
-------------------
A relay is a *front* facing the client and an *upstream* facing the origin, joined by one call,
:meth:`Upstream.exchange`, per request:

* :class:`H2Front` drives an ``h2`` connection in the server role over the client's stream:
  one task reads frames and feeds ``h2``, one task per request stream runs the exchange.
  :class:`H1Front` does the same for an HTTP/1.1 client (one request at a time, h11) when the
  origin speaks HTTP/2.
* :class:`H2Upstream` drives an ``h2`` connection in the client role (one reader task, one h2
  stream per exchange); :class:`H1Upstream` speaks HTTP/1.1 (h11) over one or more upstream
  connections, one request at a time on each.

Every request and response passes the embedder's :class:`~tlsmitm._http.Hooks` exactly as on the
HTTP/1.1 relay: ``on_request`` may pass, replace or block; ``on_response`` sees the head and, up to
``Hooks.body_limit``, the body; a :class:`~tlsmitm._http.Block` is answered by ``answer_block``
(the redirect to the error origin, never content inside the site's origin); the
``Strict-Transport-Security`` values of responses go to ``on_sts`` (set only on verified
connections, RFC 6797 §8.1).

Backpressure (RFC 9113 §5.2): received DATA is acknowledged (WINDOW_UPDATE) only after the other
side has taken it -- written to the socket towards the peer. What the proxy holds per stream is
therefore bounded by the window it advertises (``H2Limits.stream_window``) and per connection by
``H2Limits.connection_window``: a client that stops reading stalls the origin instead of filling
the proxy's memory. A stream whose peer keeps a zero window for ``H2Limits.stall_timeout`` is
reset; a connection whose socket does not drain for as long is closed.

Every request is judged by its own ``:authority`` (connection coalescing, RFC 9113 §9.1.1): the
flow's ``misdirected`` callback says whether the authority may use this connection, and if not
the answer is ``421 Misdirected Request`` so the browser opens a connection of its own, where
the policy, the verification and HSTS apply to that name.

Protections against hostile clients, as production servers have them: a bound on concurrent
streams, rapid-reset counting (CVE-2023-44487), SETTINGS/PING/empty-frame flood counting (all
answered by GOAWAY with ENHANCE_YOUR_CALM), a header-list size limit enforced while decoding
(HPACK bombs), and h2's bound on CONTINUATION frames. Extended CONNECT (RFC 8441) is never
advertised, so browsers open WebSockets over HTTP/1.1, where they are inspected.
"""

from __future__ import annotations

import http
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
import trio
from hyperframe.frame import GoAwayFrame

from ._errors import ClientError, UpstreamError
from ._http import Block, BlockAnswer, FlowInfo, Headers, Hooks, Request, Response, StsCallback

__all__ = [
    "FloodGuard",
    "H1Front",
    "H1Upstream",
    "H2Front",
    "H2Limits",
    "H2Upstream",
    "Upstream",
    "request_from_h2",
    "same_authority_only",
]

log = logging.getLogger("tlsmitm.h2")

_RECEIVE_SIZE = 64 * 1024
_MAX_INCOMPLETE_EVENT = 64 * 1024
_MAX_INFORMATIONAL = 16  # 1xx heads per response before the stream counts as hostile
_ERR = h2.errors.ErrorCodes

# RFC 9113 §8.2.2: connection-specific header fields are not allowed in HTTP/2; RFC 9110 §7.6.1
# hop-by-hop fields are not forwarded by a proxy either.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"http2-settings",
        b"host",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class H2Limits:
    """The bounds one HTTP/2 connection lives within.

    Attributes:
        max_concurrent_streams: SETTINGS_MAX_CONCURRENT_STREAMS we advertise (RFC 9113 §6.5.2).
        stream_window: our initial stream window: what the proxy buffers per stream at most.
        connection_window: our connection window: what it buffers per connection at most.
        max_header_list_size: decoded header-list bytes accepted (HPACK bombs, RFC 9113 §6.5.2).
        stall_timeout: seconds a peer may keep a window at zero, or not drain its socket,
            before the stream is reset or the connection closed.
        flood_window: seconds over which the flood counters below are kept.
        max_resets: streams the client may reset per window (rapid reset, CVE-2023-44487).
        max_settings: SETTINGS frames per window.
        max_pings: PING frames per window.
        max_empty_frames: DATA frames without payload nor END_STREAM, and PRIORITY frames,
            per window.
    """

    max_concurrent_streams: int = 100
    stream_window: int = 256 * 1024
    connection_window: int = 1024 * 1024
    max_header_list_size: int = 64 * 1024
    stall_timeout: float = 60.0
    flood_window: float = 10.0
    max_resets: int = 200
    max_settings: int = 100
    max_pings: int = 100
    max_empty_frames: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.max_concurrent_streams <= 10_000:
            raise ValueError("max_concurrent_streams must be within 1..10000")
        # RFC 9113 §6.9.1: windows are at most 2**31 - 1.
        if not 65_535 <= self.stream_window <= 2**31 - 1:
            raise ValueError("stream_window must be within 65535..2**31-1")
        if not self.stream_window <= self.connection_window <= 2**31 - 1:
            raise ValueError("connection_window must be within stream_window..2**31-1")
        if self.max_header_list_size < 4096:
            raise ValueError("max_header_list_size must be at least 4096")


@dataclass(slots=True)
class FloodGuard:
    """Counts frames by kind over a fixed window; says when a peer went over a limit.

    Pure: the caller passes ``now``. A new window starts ``window`` seconds after the last one
    began, with all counts at zero.
    """

    window: float
    limits: dict[str, int]
    _start: float = 0.0
    _counts: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str, now: float) -> bool:
        """Count one ``kind`` frame at ``now``; ``True`` when the limit for it is exceeded."""
        if now - self._start >= self.window:
            self._start = now
            self._counts.clear()
        seen = self._counts.get(kind, 0) + 1
        self._counts[kind] = seen
        return seen > self.limits[kind]


# -- header translation (pure) ---------------------------------------------------------------


def request_from_h2(headers: Iterable[tuple[bytes, bytes]]) -> Request:
    """The protocol-neutral request for an h2 header list (pseudo-headers checked).

    ``:authority`` becomes the first ``host`` header, as an HTTP/1.1 request carries it
    (RFC 9113 §8.3.1); split ``cookie`` fields stay split (joined only towards HTTP/1.1).

    Raises:
        ClientError: a pseudo-header is missing or repeated (RFC 9113 §8.3.1).
    """
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name.startswith(b":"):
            if name in pseudo:
                raise ClientError(f"repeated {name.decode()}", reason="bad_http2")
            pseudo[name] = value
        else:
            regular.append((name, value))
    method = pseudo.get(b":method")
    if method is None:
        raise ClientError("request without :method", reason="bad_http2")
    authority = pseudo.get(b":authority")
    if method == b"CONNECT":
        target = authority or b""
    else:
        path = pseudo.get(b":path")
        if not path or pseudo.get(b":scheme") is None:
            raise ClientError("request without :path or :scheme", reason="bad_http2")
        target = path
    if authority is None:
        authority = _first(regular, b"host") or b""
    head = [(b"host", authority)] if authority else []
    head += [(k, v) for k, v in regular if k != b"host"]
    return Request(method=method, target=target, headers=tuple(head), http_version=b"2")


def _first(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _connection_options(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The header names a ``Connection`` field lists (RFC 9110 §7.6.1): hop-by-hop too."""
    return frozenset(
        option.strip().lower()
        for key, value in headers
        if key.lower() == b"connection"
        for option in value.split(b",")
        if option.strip()
    )


def _forwardable(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` lower-cased, without hop-by-hop and connection-specific fields."""
    listed = _connection_options(headers)
    out: list[tuple[bytes, bytes]] = []
    for key, value in headers:
        name = key.lower()
        if name.startswith(b":") or name in _HOP_BY_HOP or name in listed:
            continue
        out.append((name, value))
    return out


def h2_request_headers(request: Request) -> list[tuple[bytes, bytes]]:
    """The h2 header list for ``request`` (RFC 9113 §8.3.1); ``Host`` becomes ``:authority``."""
    authority = request.header(b"host") or b""
    if request.method == b"CONNECT":
        out = [(b":method", request.method), (b":authority", request.target)]
    else:
        out = [
            (b":method", request.method),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", request.target),
        ]
    rest = _forwardable(request.headers)
    te = request.header(b"te")
    if te is not None and te.strip().lower() == b"trailers":
        rest.append((b"te", b"trailers"))  # RFC 9113 §8.2.2: the one TE value allowed
    return out + rest


def h1_request_headers(request: Request, *, has_body: bool) -> list[tuple[bytes, bytes]]:
    """The HTTP/1.1 header list for ``request`` coming from an h2 client.

    ``Host`` first; split ``cookie`` fields joined with ``"; "`` (RFC 9113 §8.2.3); a request
    with a body and no length is sent chunked (h2 frames bodies itself, RFC 9112 §6.1 does not).
    """
    host = request.header(b"host")
    out = [(b"host", host)] if host is not None else []
    cookies: list[bytes] = []
    for name, value in _forwardable(request.headers):
        if name == b"cookie":
            cookies.append(value)
        else:
            out.append((name, value))
    if cookies:
        out.append((b"cookie", b"; ".join(cookies)))
    if has_body and _first(out, b"content-length") is None:
        out.append((b"transfer-encoding", b"chunked"))
    return out


def h2_response_headers(status: int, headers: Headers) -> list[tuple[bytes, bytes]]:
    """The h2 header list of a response (RFC 9113 §8.3.2): ``:status`` and no hop-by-hop."""
    return [(b":status", str(status).encode()), *_forwardable(headers)]


def response_from_h2(headers: Iterable[tuple[bytes, bytes]]) -> Response:
    """The protocol-neutral response for an h2 response header list.

    Raises:
        UpstreamError: ``:status`` is missing or not a number.
    """
    status = None
    regular: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b":status":
            status = value
        elif not name.startswith(b":"):
            regular.append((name, value))
    if status is None or not status.isdigit():
        raise UpstreamError("h2 response without a valid :status", reason="bad_http2")
    code = int(status)
    return Response(
        status=code, reason=_reason_phrase(code), headers=tuple(regular), http_version=b"2"
    )


def _reason_phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def same_authority_only(host: str, port: int) -> Callable[[bytes], Awaitable[str | None]]:
    """The strictest coalescing rule: only the connection's own host and port.

    Returns a ``misdirected`` callback for :class:`H2Front`: any other authority gets 421
    and its own connection, where it is decided on its own.
    """
    from ._names import try_normalize_host

    async def misdirected(authority: bytes) -> str | None:
        name, port_of = _split_authority(authority)
        normal = try_normalize_host(name) if name else None
        if normal != host or (port_of if port_of is not None else 443) != port:
            return f"{authority.decode('ascii', 'replace')} is not this connection's origin"
        return None

    return misdirected


def _split_authority(authority: bytes) -> tuple[bytes, int | None]:
    """``host`` and ``port`` of an ``:authority`` value (``[v6]:port`` included)."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            return b"", None
        host, rest = authority[1:end], authority[end + 1 :]
        port = rest[1:] if rest.startswith(b":") else b""
    else:
        host, _, port = authority.rpartition(b":") if b":" in authority else (authority, b"", b"")
    if port and not port.isdigit():
        return b"", None
    return host, int(port) if port else None


# -- small plumbing ----------------------------------------------------------------------------


class _StreamGone(Exception):
    """The peer reset or closed the stream: stop working on it."""


class _Refused(Exception):
    """The upstream will take no new stream (GOAWAY): the client may retry elsewhere."""


class _UpstreamReset(UpstreamError):
    """The origin reset its stream with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(f"origin reset the stream ({code})", reason="upstream_reset")
        self.code = code


class _Blocked(Exception):
    """A hook blocked: the block answer was sent, the exchange ends."""


def _leaf(exc: BaseException) -> BaseException:
    """The single exception inside nested one-member groups (trio's strict groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _Inbox:
    """Items for one consumer task, in order; ``fc_pending`` counts flow-controlled bytes
    received and not yet acknowledged."""

    __slots__ = ("_items", "_lot", "fc_pending")

    def __init__(self) -> None:
        self._items: deque[tuple[Any, ...]] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self.fc_pending = 0

    def put(self, *item: Any) -> None:
        self._items.append(item)
        self._lot.unpark_all()

    async def get(self) -> tuple[Any, ...]:
        while not self._items:
            await self._lot.park()
        return self._items.popleft()


class BodySource(Protocol):
    """A request body being received: chunks until ``None``, then ``trailers``."""

    @property
    def trailers(self) -> Headers:
        """The trailer fields, once :meth:`read` returned ``None``."""
        ...

    async def read(self) -> bytes | None:
        """The next chunk, or ``None`` at the end; the previous chunk counts as consumed."""
        ...


class ResponseSink(Protocol):
    """Where an upstream puts the response, in order; each call returns once it was taken."""

    async def informational(self, status: int, headers: Headers) -> None: ...
    async def head(self, response: Response) -> None: ...
    async def data(self, chunk: bytes) -> None: ...
    async def end(self, trailers: Headers) -> None: ...


class Upstream(Protocol):
    """The origin side of a relay: :class:`H2Upstream` or :class:`H1Upstream`."""

    protocol: str

    async def run(self) -> None:
        """Background work for the connection's lifetime (a frame reader), or nothing."""
        ...

    async def exchange(self, request: Request, body: BodySource | None, sink: ResponseSink) -> None:
        """Send ``request`` (and ``body``), and put the response into ``sink``."""
        ...


@dataclass(slots=True)
class Counters:
    """Bytes and requests a relay carried (for the connection's record)."""

    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0


class _Wire:
    """One ``h2`` connection over one stream: flushing, and waiting for send windows."""

    def __init__(self, conn: h2.connection.H2Connection, stream: trio.abc.Stream, stall: float):
        self.conn = conn
        self.stream = stream
        self.stall = stall
        self._lock = trio.Lock()
        self._dirty = trio.Event()
        self._windows = trio.lowlevel.ParkingLot()
        self.raw = bytearray()  # frames written outside h2's state (graceful GOAWAY)
        self.sent = 0
        self.on_io: Callable[[], None] = lambda: None

    async def flush(self) -> None:
        """Write what ``h2`` has queued; returns once it is on the socket."""
        async with self._lock:
            data = self.conn.data_to_send()
            if self.raw:
                data, self.raw = bytes(self.raw) + data, bytearray()
            if data:
                with trio.fail_after(self.stall):
                    await self.stream.send_all(data)
                self.sent += len(data)
                self.on_io()

    def kick(self) -> None:
        """Have the writer task flush soon (for code that cannot wait)."""
        self._dirty.set()

    async def writer(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await self.flush()

    def windows_changed(self) -> None:
        self._windows.unpark_all()

    async def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent now on ``stream_id`` (> 0); waits up to ``stall`` seconds.

        Raises:
            _StreamGone: the stream was closed or reset meanwhile.
            trio.TooSlowError: the peer kept the window closed (a zero-window stall).
        """
        with trio.fail_after(self.stall):
            while True:
                try:
                    window = self.conn.local_flow_control_window(stream_id)
                except (h2.exceptions.StreamClosedError, KeyError) as exc:
                    raise _StreamGone from exc
                if window > 0:
                    return min(window, self.conn.max_outbound_frame_size)
                await self._windows.park()

    async def send_data(self, stream_id: int, chunk: bytes) -> None:
        """Send ``chunk`` on ``stream_id`` as the peer's windows allow, and flush."""
        view = memoryview(chunk)
        while view:
            size = await self.send_window(stream_id)
            try:
                self.conn.send_data(stream_id, bytes(view[:size]))
            except h2.exceptions.ProtocolError as exc:  # closed or reset meanwhile
                raise _StreamGone from exc
            view = view[size:]
            await self.flush()

    def ack(self, stream_id: int, size: int) -> None:
        """Give ``size`` flow-controlled bytes back to the peer (it may send more)."""
        if size:
            self.conn.acknowledge_received_data(size, stream_id)
            self.kick()

    def reset(self, stream_id: int, code: int) -> None:
        """RST_STREAM ``stream_id`` if it is still open (no error when it is not)."""
        stream = self.conn.streams.get(stream_id)
        if stream is not None and not stream.closed:
            try:
                self.conn.reset_stream(stream_id, code)
            except h2.exceptions.ProtocolError:  # pragma: no cover - closed meanwhile
                return
            self.kick()


def _h2_config(*, client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_inbound_headers=True,
        normalize_inbound_headers=True,
        validate_outbound_headers=True,
        normalize_outbound_headers=True,
    )


class _GracefulGoaway(h2.connection.H2ConnectionStateMachine):
    """h2's connection state machine, except that a received GOAWAY leaves the connection
    open: RFC 9113 §6.8 has the streams up to its last stream id complete, and h2 would
    refuse their frames as soon as its state is CLOSED. New streams are refused by the relay
    itself after a GOAWAY."""

    _transitions = {  # noqa: RUF012 - h2's own table, extended; never mutated
        **h2.connection.H2ConnectionStateMachine._transitions,
        (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY): (
            None,
            h2.connection.ConnectionState.CLIENT_OPEN,
        ),
    }


def _open_connection(limits: H2Limits, *, client_side: bool) -> h2.connection.H2Connection:
    """An h2 connection with our settings queued (RFC 9113 §3.4 preface and §6.5 SETTINGS).

    SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 §3) is deliberately not sent.
    """
    conn = h2.connection.H2Connection(config=_h2_config(client_side=client_side))
    if client_side:
        conn.state_machine = _GracefulGoaway()
    codes = h2.settings.SettingCodes
    initial: dict[h2.settings.SettingCodes, int] = {
        codes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
        codes.INITIAL_WINDOW_SIZE: limits.stream_window,
        codes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
    }
    if client_side:
        initial[codes.ENABLE_PUSH] = 0
    conn.local_settings = h2.settings.Settings(client=client_side, initial_values=initial)
    # Enforced while decoding from the first frame on, not only after the SETTINGS ACK.
    conn.decoder.max_header_list_size = limits.max_header_list_size
    conn.initiate_connection()
    conn.increment_flow_control_window(limits.connection_window - 65_535)
    return conn


# -- the hooks, the same for every protocol ---------------------------------------------------


class _RawSink(Protocol):
    head_sent: bool

    async def informational(self, status: int, headers: Headers) -> None: ...
    async def head(self, status: int, reason: bytes, headers: Headers) -> None: ...
    async def data(self, chunk: bytes) -> None: ...
    async def end(self, trailers: Headers) -> None: ...


async def _send_block(
    raw: _RawSink, block: Block, request: Request, answer_block: BlockAnswer
) -> None:
    status, reason, headers, body = await answer_block(block, request.target)
    await raw.head(status, reason, headers)
    if body:
        await raw.data(body)
    await raw.end(())


class _HookedSink:
    """The response path every protocol shares: STS recording, ``on_response`` with
    ``body_limit`` buffering, blocks and replaced bodies; writes through a protocol's sink."""

    def __init__(
        self,
        raw: _RawSink,
        *,
        flow: FlowInfo,
        hooks: Hooks,
        request: Request,
        on_sts: StsCallback | None,
        answer_block: BlockAnswer,
    ) -> None:
        self.raw = raw
        self.flow = flow
        self.hooks = hooks
        self.request = request
        self.on_sts = on_sts
        self.answer_block = answer_block
        self._held: Response | None = None  # a head waiting for its body (body_limit)
        self._buffer = bytearray()

    async def informational(self, status: int, headers: Headers) -> None:
        await self.raw.informational(status, headers)

    async def head(self, response: Response) -> None:
        sts = [v for k, v in response.headers if k.lower() == b"strict-transport-security"]
        if self.on_sts is not None and sts:
            self.on_sts(sts)  # RFC 6797 §8.1: the flow sets on_sts only when verified
        if self.hooks.body_limit > 0:
            self._held = response
            return
        outcome = await self.hooks.on_response(self.flow, self.request, response)
        await self._send_head(outcome, response)

    async def _send_head(self, outcome: Response | Block | None, response: Response) -> None:
        if isinstance(outcome, Block):
            await _send_block(self.raw, outcome, self.request, self.answer_block)
            raise _Blocked
        head = outcome or response
        await self.raw.head(head.status, head.reason, head.headers)

    async def data(self, chunk: bytes) -> None:
        held = self._held
        if held is None:
            await self.raw.data(chunk)
            return
        self._buffer += chunk
        if len(self._buffer) > self.hooks.body_limit:
            self._held = None
            shown = replace(held, body=None, truncated=True)
            await self._send_head(
                await self.hooks.on_response(self.flow, self.request, shown), held
            )
            buffered, self._buffer = bytes(self._buffer), bytearray()
            await self.raw.data(buffered)

    async def end(self, trailers: Headers) -> None:
        held = self._held
        if held is not None:
            self._held = None
            body = bytes(self._buffer)
            shown = replace(held, body=body, truncated=False)
            outcome = await self.hooks.on_response(self.flow, self.request, shown)
            if isinstance(outcome, Response) and outcome.body is not None:
                headers = [
                    (k, v)
                    for k, v in outcome.headers
                    if k.lower() not in (b"content-length", b"transfer-encoding")
                ]
                headers.append((b"content-length", str(len(outcome.body)).encode()))
                await self.raw.head(outcome.status, outcome.reason, tuple(headers))
                body = outcome.body
            else:
                await self._send_head(outcome, held)
            if body:
                await self.raw.data(body)
        await self.raw.end(trailers)


# -- the client side: HTTP/2 ---------------------------------------------------------------------


class _FrontStream:
    __slots__ = ("body_ended", "headers", "id", "inbox", "scope")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.id = stream_id
        self.headers = headers
        self.body_ended = ended
        self.inbox = _Inbox()
        self.scope = trio.CancelScope()


class _H2RequestBody:
    """A client stream's request body; each chunk is acknowledged once the next is asked for
    (the previous one has then been sent on)."""

    def __init__(self, wire: _Wire, stream: _FrontStream) -> None:
        self.wire = wire
        self.stream = stream
        self.trailers: Headers = ()
        self._taken = 0

    async def read(self) -> bytes | None:
        self._acknowledge()
        while True:
            kind, *rest = await self.stream.inbox.get()
            if kind == "data":
                data, size = rest
                self._taken = size
                if data:
                    return bytes(data)
                self._acknowledge()  # padding only
            elif kind == "trailers":
                self.trailers = tuple(rest[0])
            elif kind == "end":
                return None
            else:
                raise _StreamGone

    def _acknowledge(self) -> None:
        if self._taken:
            self.stream.inbox.fc_pending -= self._taken
            self.wire.ack(self.stream.id, self._taken)
            self._taken = 0


class _H2ResponseSink:
    """Writes a response onto one client stream."""

    def __init__(self, wire: _Wire, stream_id: int, counters: Counters) -> None:
        self.wire = wire
        self.stream_id = stream_id
        self.counters = counters
        self.head_sent = False
        self.ended = False

    def _send_headers(self, headers: list[tuple[bytes, bytes]], *, end: bool) -> None:
        try:
            self.wire.conn.send_headers(self.stream_id, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:  # closed, reset, or the connection ended
            raise _StreamGone from exc

    async def informational(self, status: int, headers: Headers) -> None:
        if status != 101:  # RFC 9113 §8.6: no 101 in HTTP/2
            self._send_headers(h2_response_headers(status, headers), end=False)
            await self.wire.flush()

    async def head(self, status: int, reason: bytes, headers: Headers) -> None:
        self._send_headers(h2_response_headers(status, headers), end=False)
        self.head_sent = True
        await self.wire.flush()

    async def data(self, chunk: bytes) -> None:
        await self.wire.send_data(self.stream_id, chunk)
        self.counters.bytes_down += len(chunk)

    async def end(self, trailers: Headers) -> None:
        if trailers:
            self._send_headers(_forwardable(trailers), end=True)
        else:
            try:
                self.wire.conn.end_stream(self.stream_id)
            except h2.exceptions.ProtocolError as exc:
                raise _StreamGone from exc
        self.ended = True
        await self.wire.flush()


Misdirected = Callable[[bytes], Awaitable[str | None]]


class H2Front:
    """Serves an HTTP/2 client, relaying each of its streams through ``upstream``.

    Args:
        client: the decrypted stream to the client (ALPN ``h2``).
        upstream: the origin side, HTTP/2 or HTTP/1.1.
        flow: what hooks are told about this connection.
        hooks: the embedder's hooks.
        on_sts: called with the STS values of each response (set only on verified connections).
        answer_block: turns a hook's :class:`Block` into the error origin's redirect.
        misdirected: judges each request's ``:authority``: ``None`` when it may use this
            connection, else why not (answered with 421, RFC 9113 §9.1.2).
        limits: the connection's bounds and flood limits.
        idle_timeout: seconds without a byte either way before the connection is closed.
        should_stop: checked for each new stream; ``True`` starts a graceful close (GOAWAY).
        initial_client_data: bytes of the client already read (its connection preface).
        clock: the time source for the flood counters.
    """

    def __init__(
        self,
        *,
        client: trio.abc.Stream,
        upstream: Upstream,
        flow: FlowInfo,
        hooks: Hooks,
        on_sts: StsCallback | None,
        answer_block: BlockAnswer,
        misdirected: Misdirected,
        limits: H2Limits | None = None,
        idle_timeout: float = 300.0,
        should_stop: Callable[[], bool] = lambda: False,
        initial_client_data: bytes = b"",
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.flow = flow
        self.hooks = hooks
        self.on_sts = on_sts
        self.answer_block = answer_block
        self.misdirected = misdirected
        self.limits = limits or H2Limits()
        self.idle_timeout = idle_timeout
        self.should_stop = should_stop
        self.clock = clock
        self.counters = Counters()
        self._initial = initial_client_data
        self._streams: dict[int, _FrontStream] = {}
        self._streams_done = trio.lowlevel.ParkingLot()
        self._going_away = False
        self._idle = trio.CancelScope()
        self._reading = trio.CancelScope()
        limits_ = self.limits
        self._guard = FloodGuard(
            window=limits_.flood_window,
            limits={
                "reset": limits_.max_resets,
                "settings": limits_.max_settings,
                "ping": limits_.max_pings,
                "empty": limits_.max_empty_frames,
            },
        )
        self.conn = _open_connection(limits_, client_side=False)
        self._wire = _Wire(self.conn, client, limits_.stall_timeout)
        self._wire.on_io = self._touch

    @property
    def active_streams(self) -> int:
        """Streams being relayed now."""
        return len(self._streams)

    @property
    def buffered(self) -> int:
        """Received request-body bytes not yet passed on (bounded by the windows)."""
        return sum(s.inbox.fc_pending for s in self._streams.values())

    def _touch(self) -> None:
        self._idle.deadline = trio.current_time() + self.idle_timeout

    def begin_shutdown(self) -> None:
        """Graceful close (RFC 9113 §6.8): GOAWAY with the last stream accepted; the streams
        in flight finish, new ones are refused, then the connection closes."""
        if not self._going_away:
            self._going_away = True
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.conn.highest_inbound_stream_id
            frame.error_code = 0
            self._wire.raw += frame.serialize()
            self._wire.kick()
            if not self._streams:
                self._reading.cancel()

    async def run(self) -> None:
        """Relay until the client closes, goes away, idles out or misbehaves.

        Raises:
            ClientError: the client broke the protocol or flooded (``reason`` says which);
                GOAWAY was sent first.
        """
        try:
            await self._run()
        except BaseExceptionGroup as group:
            leaf = _leaf(group)
            if isinstance(leaf, ClientError | UpstreamError):
                raise leaf from group
            raise

    async def _run(self) -> None:
        with self._idle:
            self._touch()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wire.writer)
                nursery.start_soon(self.upstream.run)
                await self._wire.flush()  # our preface: SETTINGS and WINDOW_UPDATE
                with self._reading:
                    await self._read(nursery)
                if not self._going_away:  # the client left: nobody to answer any more
                    for stream in self._streams.values():
                        stream.scope.cancel()
                while self._streams:
                    await self._streams_done.park()
                await self._wire.flush()
                nursery.cancel_scope.cancel()

    async def _read(self, nursery: trio.Nursery) -> None:
        data = self._initial
        while True:
            if data:
                self.counters.bytes_up += len(data)
                self._touch()
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    await self._close_after(f"HTTP/2 protocol error from client: {exc}")
                    raise AssertionError("unreachable") from exc  # pragma: no cover
                for event in events:
                    flood = self._handle_event(event, nursery)
                    if flood is not None:
                        log.warning(
                            "client %s flooded %s: GOAWAY ENHANCE_YOUR_CALM",
                            self.flow.client,
                            flood,
                        )
                        await self._close_after(f"client flooded {flood}", reason="h2_flood")
                    if isinstance(event, h2.events.ConnectionTerminated):
                        return  # RFC 9113 §6.8: the client is done with this connection
                self._wire.kick()
            if self._going_away and not self._streams:
                return
            data = bytes(await self.client.receive_some(_RECEIVE_SIZE))
            if not data:
                return

    async def _close_after(self, message: str, *, reason: str = "bad_http2") -> None:
        """Flush the GOAWAY h2 queued, then raise :class:`ClientError`."""
        with trio.move_on_after(1.0):
            await self._wire.flush()
        raise ClientError(message, reason=reason)

    def _flood(self, kind: str) -> bool:
        if self._guard.count(kind, self.clock()):
            self.conn.close_connection(_ERR.ENHANCE_YOUR_CALM)
            return True
        return False

    def _handle_event(self, event: h2.events.Event, nursery: trio.Nursery) -> str | None:
        """Apply one event; returns what the client flooded, if it did (RFC 9113 §10.5)."""
        if isinstance(event, h2.events.RequestReceived):
            self._open_stream(event, nursery)
        elif isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            size = event.flow_controlled_length
            if not event.data and not event.stream_ended and self._flood("empty"):
                return "empty DATA frames"
            if stream is None:
                self._wire.ack(event.stream_id, size)  # nobody will read it: free the window
            else:
                stream.inbox.fc_pending += size
                stream.inbox.put("data", event.data, size)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.inbox.put("trailers", event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.inbox.put("end")
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.inbox.put("reset")
                stream.scope.cancel()
            if event.remote_reset and self._flood("reset"):
                return "stream resets (rapid reset, CVE-2023-44487)"
        elif isinstance(event, h2.events.WindowUpdated):
            self._wire.windows_changed()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._wire.windows_changed()
            if self._flood("settings"):
                return "SETTINGS frames"
        elif isinstance(event, h2.events.PingReceived):
            if self._flood("ping"):
                return "PING frames"
        elif isinstance(event, h2.events.PriorityUpdated) and self._flood("empty"):
            return "PRIORITY frames"
        return None

    def _open_stream(self, event: h2.events.RequestReceived, nursery: trio.Nursery) -> None:
        if not self._going_away and self.should_stop():
            self.begin_shutdown()
        if self._going_away:
            self._wire.reset(event.stream_id, _ERR.REFUSED_STREAM)  # RFC 9113 §8.7: retryable
            return
        stream = _FrontStream(event.stream_id, list(event.headers), event.stream_ended is not None)
        self._streams[event.stream_id] = stream
        nursery.start_soon(self._serve, stream)

    async def _serve(self, stream: _FrontStream) -> None:
        sink = _H2ResponseSink(self._wire, stream.id, self.counters)
        try:
            with stream.scope:
                try:
                    await self._handle(stream, sink)
                except Exception as exc:
                    await self._failed(stream, sink, _leaf(exc), exc)
        finally:
            del self._streams[stream.id]
            inbox = stream.inbox
            if inbox.fc_pending:  # unread request body: give the connection window back
                self._wire.ack(stream.id, inbox.fc_pending)
                inbox.fc_pending = 0
            if sink.ended:
                # RFC 9113 §8.1: a complete response may precede the end of the request;
                # the rest of the request is then refused with NO_ERROR.
                self._wire.reset(stream.id, _ERR.NO_ERROR)
            else:
                self._wire.reset(stream.id, _ERR.CANCEL)
            self._streams_done.unpark_all()
            if self._going_away and not self._streams:
                self._reading.cancel()

    async def _failed(
        self, stream: _FrontStream, sink: _H2ResponseSink, leaf: BaseException, exc: Exception
    ) -> None:
        if isinstance(leaf, _StreamGone | _Blocked):
            return
        if isinstance(leaf, _Refused):
            self._wire.reset(stream.id, _ERR.REFUSED_STREAM)
        elif isinstance(leaf, _UpstreamReset) and not sink.head_sent:
            code = leaf.code if leaf.code in (_ERR.REFUSED_STREAM, _ERR.CANCEL) else _ERR.NO_ERROR
            if code == _ERR.NO_ERROR:
                await self._answer_status(sink, 502, b"origin reset the request\n")
            else:
                self._wire.reset(stream.id, code)
        elif isinstance(leaf, UpstreamError | trio.TooSlowError) and not sink.head_sent:
            log.info("stream %d to %s failed: %s", stream.id, self.flow.host, leaf)
            status = 504 if isinstance(leaf, trio.TooSlowError) else 502
            await self._answer_status(sink, status, b"the origin failed to answer\n")
        elif isinstance(leaf, _UpstreamReset):
            self._wire.reset(stream.id, leaf.code)
        elif isinstance(leaf, UpstreamError | ClientError | trio.TooSlowError):
            log.info("stream %d to %s reset: %s", stream.id, self.flow.host, leaf)
            self._wire.reset(stream.id, _ERR.INTERNAL_ERROR)
        else:
            raise exc  # a hook raised: fail closed, the connection ends

    async def _answer_status(self, sink: _H2ResponseSink, status: int, body: bytes) -> None:
        headers = ((b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body)))
        try:
            await sink.head(status, b"", headers)
            await sink.data(body)
            await sink.end(())
        except _StreamGone:
            return

    async def _handle(self, stream: _FrontStream, sink: _H2ResponseSink) -> None:
        try:
            request = request_from_h2(stream.headers)
        except ClientError:
            self._wire.reset(stream.id, _ERR.PROTOCOL_ERROR)  # RFC 9113 §8.1.1
            return
        self.counters.requests += 1
        if request.method == b"CONNECT":
            # Plain CONNECT inside the tunnel is not relayed, and extended CONNECT
            # (RFC 8441) was not advertised.
            await self._answer_status(sink, 405, b"CONNECT is not relayed\n")
            return
        why = await self.misdirected(request.header(b"host") or b"")
        if why is not None:
            # RFC 9113 §9.1.2: the client retries on a connection of that authority's own.
            log.info("421 on %s: %s", self.flow.host, why)
            await self._answer_status(sink, 421, b"misdirected request\n")
            return
        outcome = await self.hooks.on_request(self.flow, request)
        if isinstance(outcome, Block):
            await _send_block(sink, outcome, request, self.answer_block)
            return
        if outcome is not None:
            request = outcome
        body = None if stream.body_ended else _H2RequestBody(self._wire, stream)
        hooked = _HookedSink(
            sink,
            flow=self.flow,
            hooks=self.hooks,
            request=request,
            on_sts=self.on_sts,
            answer_block=self.answer_block,
        )
        await self.upstream.exchange(request, body, hooked)


# -- the origin side: HTTP/2 -------------------------------------------------------------------


class H2Upstream:
    """Relays exchanges onto one HTTP/2 connection to the origin (h2 in the client role).

    Honours the origin's SETTINGS (MAX_CONCURRENT_STREAMS: an exchange waits for a free
    stream), resets a stream whose client went away (CANCEL), and after the origin's GOAWAY
    refuses new exchanges (the client may retry, RFC 9113 §6.8).
    """

    protocol = "h2"

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        limits: H2Limits | None = None,
        counters: Counters | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.limits = limits or H2Limits()
        self.counters = counters or Counters()
        self.conn = _open_connection(self.limits, client_side=True)
        self._wire = _Wire(self.conn, stream, self.limits.stall_timeout)
        self.stream = stream
        self.clock = clock
        self._inboxes: dict[int, _Inbox] = {}
        self._slots = trio.lowlevel.ParkingLot()
        self._ready = trio.Event()
        self._gone: str | None = None  # why no new stream may start
        self._guard = FloodGuard(
            window=self.limits.flood_window,
            limits={"settings": self.limits.max_settings, "ping": self.limits.max_pings},
        )

    @property
    def buffered(self) -> int:
        """Received response bytes not yet passed to the client (bounded by the windows)."""
        return sum(inbox.fc_pending for inbox in self._inboxes.values())

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wire.writer)
                await self._wire.flush()
                self._ready.set()
                await self._read()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            self._fail_all(f"origin connection failed: {exc}")
        finally:
            self._ready.set()

    def _fail_all(self, why: str) -> None:
        self._gone = self._gone or why
        for inbox in self._inboxes.values():
            inbox.put("gone", why)
        self._slots.unpark_all()

    async def _read(self) -> None:
        while True:
            data = bytes(await self.stream.receive_some(_RECEIVE_SIZE))
            if not data:
                self._fail_all("origin closed the connection")
                return
            self.counters.bytes_down += len(data)
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self._fail_all(f"HTTP/2 protocol error from origin: {exc}")
                with trio.move_on_after(1.0):
                    await self._wire.flush()
                return
            for event in events:
                self._dispatch(event)
            self._wire.kick()

    def _dispatch(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", None)
        inbox = self._inboxes.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            kind = "head" if isinstance(event, h2.events.ResponseReceived) else "info"
            if inbox is not None:
                inbox.put(kind, event.headers)
        elif isinstance(event, h2.events.DataReceived):
            if inbox is None:
                self._wire.ack(event.stream_id, event.flow_controlled_length)
            else:
                inbox.fc_pending += event.flow_controlled_length
                inbox.put("data", event.data, event.flow_controlled_length)
        elif isinstance(event, h2.events.TrailersReceived):
            if inbox is not None:
                inbox.put("trailers", event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            if inbox is not None:
                inbox.put("end")
            self._slots.unpark_all()
        elif isinstance(event, h2.events.StreamReset):
            if inbox is not None:
                inbox.put("reset", event.error_code)
            self._slots.unpark_all()
        elif isinstance(event, h2.events.WindowUpdated):
            self._wire.windows_changed()
        elif isinstance(event, h2.events.RemoteSettingsChanged | h2.events.PingReceived):
            self._wire.windows_changed()
            self._slots.unpark_all()
            kind = "ping" if isinstance(event, h2.events.PingReceived) else "settings"
            if self._guard.count(kind, self.clock()):
                self.conn.close_connection(_ERR.ENHANCE_YOUR_CALM)
                self._fail_all("origin flooded control frames")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._gone = f"origin sent GOAWAY ({event.error_code})"
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for sid, box in self._inboxes.items():
                if sid > last:  # RFC 9113 §6.8: not processed, safe to retry
                    box.put("reset", _ERR.REFUSED_STREAM)
                elif event.error_code:
                    box.put("gone", self._gone)
            self._slots.unpark_all()

    async def _open_stream(self, headers: list[tuple[bytes, bytes]], end: bool) -> int:
        await self._ready.wait()
        while True:
            if self._gone is not None:
                raise _Refused(self._gone)
            if self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams:
                break
            await self._slots.park()
        stream_id = self.conn.get_next_available_stream_id()
        self._inboxes[stream_id] = _Inbox()
        self.conn.send_headers(stream_id, headers, end_stream=end)
        await self._wire.flush()
        return stream_id

    async def exchange(self, request: Request, body: BodySource | None, sink: ResponseSink) -> None:
        stream_id = await self._open_stream(h2_request_headers(request), body is None)
        finished = False
        try:
            async with trio.open_nursery() as nursery:
                if body is not None:
                    nursery.start_soon(self._send_body, stream_id, body)
                await self._receive(stream_id, sink)
                finished = True
                nursery.cancel_scope.cancel()  # a complete response ends the upload too
        finally:
            inbox = self._inboxes.pop(stream_id)
            if inbox.fc_pending:
                self._wire.ack(stream_id, inbox.fc_pending)
            if not finished:
                self._wire.reset(stream_id, _ERR.CANCEL)
            self._slots.unpark_all()

    async def _send_body(self, stream_id: int, body: BodySource) -> None:
        while (chunk := await body.read()) is not None:
            await self._wire.send_data(stream_id, chunk)
            self.counters.bytes_up += len(chunk)
        try:
            if body.trailers:
                self.conn.send_headers(stream_id, _forwardable(body.trailers), end_stream=True)
            else:
                self.conn.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            return  # the origin already answered and closed
        await self._wire.flush()

    async def _receive(self, stream_id: int, sink: ResponseSink) -> None:
        inbox = self._inboxes[stream_id]
        informational = 0
        while True:
            kind, *rest = await inbox.get()
            if kind == "info":
                informational += 1
                if informational > _MAX_INFORMATIONAL:
                    raise UpstreamError("origin sent endless 1xx heads", reason="bad_http2")
                response = response_from_h2(rest[0])
                await sink.informational(response.status, response.headers)
            elif kind == "head":
                await sink.head(response_from_h2(rest[0]))
            elif kind == "data":
                data, size = rest
                if data:
                    await sink.data(bytes(data))
                inbox.fc_pending -= size
                self._wire.ack(
                    stream_id, size
                )  # taken by the client side: the origin may send more
            elif kind == "trailers":
                await sink.end(tuple(rest[0]))
                await self._wait_end(inbox)
                return
            elif kind == "end":
                await sink.end(())
                return
            elif kind == "reset":
                raise _UpstreamReset(rest[0])
            else:
                raise UpstreamError(rest[0], reason="upstream_gone")

    @staticmethod
    async def _wait_end(inbox: _Inbox) -> None:
        kind, *_ = await inbox.get()  # trailers are followed by StreamEnded
        if kind != "end":  # pragma: no cover - h2 ends the stream with the trailers
            raise UpstreamError("origin stream did not end after trailers", reason="bad_http2")


# -- the origin side: HTTP/1.1 -------------------------------------------------------------------


Connect = Callable[[], Awaitable[trio.abc.Stream]]


class _H1Conn:
    __slots__ = ("parser", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_INCOMPLETE_EVENT)


class H1Upstream:
    """Relays exchanges to an HTTP/1.1 origin, one at a time per connection.

    Args:
        first: the connection the flow opened (and verified).
        connect: opens another verified connection to the same origin, for concurrent
            streams and after the origin closed one; ``None``: only ``first`` is used and
            streams wait for it in turn.
        max_connections: connections open at once at most (RFC 9112 §9.4 asks for few).
    """

    protocol = "http/1.1"

    def __init__(
        self,
        first: trio.abc.Stream,
        *,
        connect: Connect | None = None,
        max_connections: int = 6,
        counters: Counters | None = None,
    ) -> None:
        self.connect = connect
        self.max_connections = max_connections if connect is not None else 1
        self.counters = counters or Counters()
        self.first = first
        self._idle: list[_H1Conn] = [_H1Conn(first)]
        self._open = 1
        self._released = trio.lowlevel.ParkingLot()

    async def run(self) -> None:
        """Closes the connections it opened itself when the relay ends (``first`` is the
        flow's to close)."""
        try:
            await trio.sleep_forever()
        finally:
            for conn in self._idle:
                if conn.stream is not self.first:
                    await trio.aclose_forcefully(conn.stream)

    async def _acquire(self) -> _H1Conn:
        while True:
            if self._idle:
                return self._idle.pop()
            if self._open < self.max_connections and self.connect is not None:
                self._open += 1
                try:
                    return _H1Conn(await self.connect())
                except BaseException:
                    self._open -= 1
                    raise
            if self._open == 0:
                raise UpstreamError("the origin closed the connection", reason="upstream_gone")
            await self._released.park()

    async def exchange(self, request: Request, body: BodySource | None, sink: ResponseSink) -> None:
        conn = await self._acquire()
        reusable = False
        try:
            await self._exchange(conn, request, body, sink)
            reusable = conn.parser.our_state is h11.DONE and conn.parser.their_state is h11.DONE
        finally:
            if reusable:
                conn.parser.start_next_cycle()
                self._idle.append(conn)
            else:
                self._open -= 1
            self._released.unpark_all()
            if not reusable:  # mid-message or told to close: this connection is done
                await trio.aclose_forcefully(conn.stream)

    async def _exchange(
        self, conn: _H1Conn, request: Request, body: BodySource | None, sink: ResponseSink
    ) -> None:
        headers = h1_request_headers(request, has_body=body is not None)
        if request.method == b"CONNECT":
            raise UpstreamError("CONNECT cannot be relayed", reason="bad_request")
        data = conn.parser.send(
            h11.Request(method=request.method, target=request.target, headers=headers)
        )
        if body is None:
            data = (data or b"") + (conn.parser.send(h11.EndOfMessage()) or b"")
        await self._write(conn, data or b"")
        async with trio.open_nursery() as nursery:
            if body is not None:
                nursery.start_soon(self._send_body, conn, body)
            await self._receive(conn, sink)
            if conn.parser.our_state is not h11.DONE:
                nursery.cancel_scope.cancel()  # answered before the upload ended: not reusable

    async def _write(self, conn: _H1Conn, data: bytes) -> None:
        if data:
            await conn.stream.send_all(data)
            self.counters.bytes_up += len(data)

    async def _send_body(self, conn: _H1Conn, body: BodySource) -> None:
        while (chunk := await body.read()) is not None:
            await self._write(conn, conn.parser.send(h11.Data(data=chunk)) or b"")
        trailers = _forwardable(body.trailers)
        await self._write(conn, conn.parser.send(h11.EndOfMessage(headers=trailers)) or b"")

    async def _next(self, conn: _H1Conn) -> Any:
        while True:
            try:
                event = conn.parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError(
                    f"malformed HTTP from origin: {exc}", reason="bad_http"
                ) from exc
            if event is not h11.NEED_DATA:
                return event
            data = bytes(await conn.stream.receive_some(_RECEIVE_SIZE))
            self.counters.bytes_down += len(data)
            conn.parser.receive_data(data)

    async def _receive(self, conn: _H1Conn, sink: ResponseSink) -> None:
        informational = 0
        while True:
            event = await self._next(conn)
            if isinstance(event, h11.InformationalResponse):
                informational += 1
                if informational > _MAX_INFORMATIONAL:
                    raise UpstreamError("origin sent endless 1xx heads", reason="bad_http")
                await sink.informational(event.status_code, tuple(event.headers))
                continue
            if not isinstance(event, h11.Response):
                raise UpstreamError("origin closed before responding", reason="upstream_gone")
            await sink.head(
                Response(
                    status=event.status_code,
                    reason=bytes(event.reason),
                    headers=tuple((bytes(k), bytes(v)) for k, v in event.headers),
                    http_version=bytes(event.http_version),
                )
            )
            break
        while True:
            event = await self._next(conn)
            if isinstance(event, h11.Data):
                await sink.data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                await sink.end(tuple((bytes(k), bytes(v)) for k, v in event.headers))
                return
            else:
                raise UpstreamError("origin closed during the response", reason="upstream_gone")


# -- the client side: HTTP/1.1 towards an HTTP/2 origin ------------------------------------------


class _H11RequestBody:
    def __init__(self, front: H1Front) -> None:
        self.front = front
        self.trailers: Headers = ()

    async def read(self) -> bytes | None:
        event = await self.front._next()
        if isinstance(event, h11.Data):
            self.front.counters.bytes_up += len(event.data)
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            self.trailers = tuple((bytes(k), bytes(v)) for k, v in event.headers)
            return None
        raise ClientError("client closed during the request body", reason="client_gone")


class _H11ResponseSink:
    def __init__(self, front: H1Front) -> None:
        self.front = front
        self.head_sent = False

    async def informational(self, status: int, headers: Headers) -> None:
        if 100 <= status < 200 and status != 101:
            await self.front._send(h11.InformationalResponse(status_code=status, headers=[]))

    async def head(self, status: int, reason: bytes, headers: Headers) -> None:
        forwarded = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        await self.front._send(h11.Response(status_code=status, reason=reason, headers=forwarded))
        self.head_sent = True

    async def data(self, chunk: bytes) -> None:
        await self.front._send(h11.Data(data=chunk))
        self.front.counters.bytes_down += len(chunk)

    async def end(self, trailers: Headers) -> None:
        await self.front._send(h11.EndOfMessage(headers=list(_forwardable(trailers))))


class H1Front:
    """Serves an HTTP/1.1 client (h11) through an HTTP/2 ``upstream``, one request at a time.

    Arguments as for :class:`H2Front`; ``Upgrade`` requests are relayed as plain requests (an
    HTTP/2 origin cannot switch protocols, RFC 9113 §8.6), so the flow offers only
    ``http/1.1`` upstream when it wants WebSocket upgrades relayed.
    """

    def __init__(
        self,
        *,
        client: trio.abc.Stream,
        upstream: Upstream,
        flow: FlowInfo,
        hooks: Hooks,
        on_sts: StsCallback | None,
        answer_block: BlockAnswer,
        idle_timeout: float = 300.0,
        should_stop: Callable[[], bool] = lambda: False,
        initial_client_data: bytes = b"",
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.flow = flow
        self.hooks = hooks
        self.on_sts = on_sts
        self.answer_block = answer_block
        self.idle_timeout = idle_timeout
        self.should_stop = should_stop
        self.counters = Counters()
        self._parser = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_INCOMPLETE_EVENT)
        if initial_client_data:
            self._parser.receive_data(initial_client_data)
            self.counters.bytes_up += len(initial_client_data)
        self._idle = trio.CancelScope()

    def _touch(self) -> None:
        self._idle.deadline = trio.current_time() + self.idle_timeout

    async def _next(self) -> Any:
        while True:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientError(f"malformed HTTP from client: {exc}", reason="bad_http") from exc
            if event is not h11.NEED_DATA:
                return event
            data = bytes(await self.client.receive_some(_RECEIVE_SIZE))
            self._touch()
            self._parser.receive_data(data)

    async def _send(self, event: Any) -> None:
        data = self._parser.send(event)
        if data:
            await self.client.send_all(data)
            self._touch()

    async def run(self) -> None:
        """Relay requests until the client closes, a side fails, or a hook blocks."""
        with self._idle:
            self._touch()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.upstream.run)
                await self._loop()
                nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        while True:
            event = await self._next()
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise ClientError(f"unexpected {type(event).__name__}", reason="bad_http")
            request = Request(
                method=bytes(event.method),
                target=bytes(event.target),
                headers=tuple((bytes(k), bytes(v)) for k, v in event.headers),
                http_version=bytes(event.http_version),
            )
            self.counters.requests += 1
            if not await self._one(request):
                return
            if (
                self._parser.our_state is not h11.DONE
                or self._parser.their_state is not h11.DONE
                or self.should_stop()
            ):
                return
            self._parser.start_next_cycle()

    async def _one(self, request: Request) -> bool:
        """One exchange; ``False`` when the connection must end after it."""
        sink = _H11ResponseSink(self)
        outcome = await self.hooks.on_request(self.flow, request)
        if isinstance(outcome, Block):
            await _send_block(sink, outcome, request, self.answer_block)
            return False
        if outcome is not None:
            request = outcome
        first = self._parser.next_event()  # no I/O: does the request have a body?
        body: BodySource | None
        if isinstance(first, h11.EndOfMessage):
            body = None
        else:
            body = _H11RequestBody(self)
            if isinstance(first, h11.Data):
                body = _PrefixedBody(bytes(first.data), body)
            elif first is not h11.NEED_DATA:
                raise ClientError("client closed during the request", reason="client_gone")
        hooked = _HookedSink(
            sink,
            flow=self.flow,
            hooks=self.hooks,
            request=request,
            on_sts=self.on_sts,
            answer_block=self.answer_block,
        )
        try:
            await self.upstream.exchange(request, body, hooked)
        except Exception as exc:
            leaf = _leaf(exc)
            if isinstance(leaf, _Blocked):
                return False
            if isinstance(leaf, UpstreamError | _Refused) and not sink.head_sent:
                text = b"the origin failed to answer\n"
                await sink.head(
                    502,
                    b"Bad Gateway",
                    ((b"content-type", b"text/plain"), (b"content-length", b"%d" % len(text))),
                )
                await sink.data(text)
                await sink.end(())
                return False
            raise
        return True


class _PrefixedBody:
    """A body source whose first chunk was already parsed."""

    def __init__(self, first: bytes, rest: _H11RequestBody) -> None:
        self._first: bytes | None = first
        self._rest = rest

    @property
    def trailers(self) -> Headers:
        return self._rest.trailers

    async def read(self) -> bytes | None:
        if self._first is not None:
            first, self._first = self._first, None
            self._rest.front.counters.bytes_up += len(first)
            return first
        return await self._rest.read()
