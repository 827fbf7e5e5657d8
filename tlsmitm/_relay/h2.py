"""HTTP/2 inside the tunnel: the h2 relay, on either side, translated to and from HTTP/1.1.

Theory of operation
-------------------
A relay is a *front* facing the client and an *upstream* facing the origin, joined by one call,
:meth:`Upstream.exchange`, per request:

* :class:`H2Front` drives an ``h2`` connection in the server role over the client's stream:
  one task reads frames and feeds ``h2``, one task per request stream runs the exchange.
  :class:`~.exchange.H1Front` does the same for an HTTP/1.1 client (one request at a time, h11)
  when the origin speaks HTTP/2.
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

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import trio
from hyperframe.frame import FRAMES, ExtensionFrame, Frame, GoAwayFrame

from .._errors import ClientError, TlsMitmError, UpstreamError
from .._scan import ScanSettings
from .exchange import (
    MAX_INFORMATIONAL,
    Blocked,
    BodySource,
    Counters,
    H1Front,
    H1Upstream,
    Inbox,
    Refused,
    ResponseSink,
    StreamGone,
    Upstream,
    UpstreamReset,
    hook_request,
    leaf_exception,
    relay_request,
)
from .h1 import BlockAnswer, StsCallback
from .h2_rules import (
    FloodGuard,
    H2Limits,
    HeadWatch,
    forwardable,
    h2_request_headers,
    h2_response_headers,
    request_from_h2,
    response_from_h2,
    same_authority_only,
)
from .h2_settings import CompactSettings, compact_frame_dispatch, compact_header_tables
from .hooks import FlowInfo, Headers, Hooks, Request
from .plan import RelayKind
from .relays import RELAYS, RelayJob, RelayOutcome
from .scanning import ScanCallback, log_decision

__all__ = ["H2Front", "H2Upstream", "Misdirected", "run_h2"]

log = logging.getLogger("tlsmitm.h2")

_RECEIVE_SIZE = 256 * 1024  # bytes per socket read: a window's worth of frames per h2 pass
_MAX_FRAME_SIZE = 64 * 1024  # SETTINGS_MAX_FRAME_SIZE we advertise (h2's default: 16 KiB)
# Frame bytes a sender may leave queued for the writer task before it waits for the socket
# itself: small frames of many streams go out in one TLS write, and a peer that does not read
# holds at most this much (plus the windows) in the proxy.
_UNFLUSHED_LIMIT = 64 * 1024
_ERR = h2.errors.ErrorCodes
_TRANSPORT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Wire:
    """One ``h2`` connection over one stream: flushing, and waiting for send windows.

    Frames reach the socket in one of two ways: :meth:`flush` writes what ``h2`` has queued
    and returns once it is on the socket; :meth:`queued` leaves small frames to the
    :meth:`writer` task, which writes everything the streams queued meanwhile in one TLS write
    (a hundred streams answering at once cost one write, not a hundred), and falls back to
    :meth:`flush` once ``_UNFLUSHED_LIMIT`` bytes or more wait (backpressure).
    """

    def __init__(self, conn: h2.connection.H2Connection, stream: trio.abc.Stream, stall: float):
        self.conn = conn
        self.stream = stream
        self.stall = stall
        self._lock = trio.Lock()
        self._dirty = trio.Event()
        self._windows = trio.lowlevel.ParkingLot()
        # Frames to write before what h2 queues next: taken from h2 (:meth:`collect`), or
        # written outside h2's state (graceful GOAWAY).
        self.raw = bytearray()
        self.sent = 0
        self._unflushed = 0  # bytes queued through :meth:`queued` since the last write
        self.on_io: Callable[[], None] = lambda: None

    async def flush(self) -> None:
        """Write what ``h2`` has queued; returns once it is on the socket."""
        if self._lock.locked():  # a write in progress: ours follows it
            async with self._lock:
                await self._write(self._take())
            return
        data = self._take()
        if not data:
            return  # nothing to write, and no write in progress to wait for
        # Taken and locked with no checkpoint between: h2's bytes go out as they are (through
        # ``raw`` a bulk body would be copied twice more).
        self._lock.acquire_nowait()
        try:
            await self._write(data)
        finally:
            self._lock.release()

    def _take(self) -> bytes:
        """Everything waiting, in order: what was taken before (``raw``), then h2's queue."""
        data = self.conn.data_to_send()
        self._unflushed = 0
        if self.raw:
            data, self.raw = bytes(self.raw) + data, bytearray()
        return data

    async def _write(self, data: bytes) -> None:
        if data:
            with trio.fail_after(self.stall):
                await self.stream.send_all(data)
            self.sent += len(data)
            self.on_io()

    def kick(self) -> None:
        """Have the writer task flush soon (for code that cannot wait)."""
        self._dirty.set()

    def collect(self) -> bool:
        """Take what ``h2`` queued (after what was taken before); ``True`` if anything waits."""
        data = self.conn.data_to_send()
        if data:
            self.raw += data
        return bool(self.raw)

    def kick_if_queued(self) -> None:
        """:meth:`kick` if ``h2`` queued anything (an acknowledgement, a SETTINGS ACK...)."""
        if self.collect():
            self._dirty.set()

    async def queued(self, size: int) -> None:
        """``size`` bytes of frames were queued in ``h2``: the writer task sends them with what
        else is queued by then; from ``_UNFLUSHED_LIMIT`` bytes on, flush now and wait for it."""
        self._unflushed += size
        if self._unflushed >= _UNFLUSHED_LIMIT:
            await self.flush()
        else:
            self.kick()

    async def writer(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await self.flush()

    def windows_changed(self) -> None:
        self._windows.unpark_all()

    async def send_window(self, stream_id: int) -> int:
        """Bytes the windows let be sent now on ``stream_id`` (> 0); waits up to ``stall`` s.

        Raises:
            StreamGone: the stream was closed or reset meanwhile.
            trio.TooSlowError: the peer kept the window closed (a zero-window stall).
        """
        window = self._window(stream_id)
        if window > 0:  # (the usual case: no deadline to set up)
            return window
        with trio.fail_after(self.stall):
            while (window := self._window(stream_id)) <= 0:
                await self._windows.park()
        return window

    def _window(self, stream_id: int) -> int:
        try:
            return self.conn.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, KeyError) as exc:
            raise StreamGone from exc

    async def send_data(self, stream_id: int, chunk: bytes) -> None:
        """Send ``chunk`` on ``stream_id`` as the peer's windows allow, and flush.

        As much as the windows allow is queued as DATA frames of the peer's maximum frame
        size (RFC 9113 §4.2) and written with one flush: one TLS write per window's worth,
        not one per frame.
        """
        view = memoryview(chunk)
        while view:
            size = min(len(view), await self.send_window(stream_id))
            frame = self.conn.max_outbound_frame_size
            try:
                if size == len(chunk) <= frame:  # the whole chunk in one frame: no copy
                    self.conn.send_data(stream_id, chunk)
                else:
                    for start in range(0, size, frame):
                        piece = view[start : min(start + frame, size)]
                        self.conn.send_data(stream_id, bytes(piece))
            except h2.exceptions.ProtocolError as exc:  # closed or reset meanwhile
                raise StreamGone from exc
            view = view[size:]
            await self.queued(size)

    def ack(self, stream_id: int, size: int) -> None:
        """Give ``size`` flow-controlled bytes back to the peer (it may send more)."""
        if size:
            self.conn.acknowledge_received_data(size, stream_id)
            self.kick_if_queued()  # (h2 sends WINDOW_UPDATE once a good part was taken)

    def reset(self, stream_id: int, code: int) -> None:
        """RST_STREAM ``stream_id`` if it is still open (no error when it is not)."""
        stream = self.conn.streams.get(stream_id)
        if stream is not None and not stream.closed:
            try:
                self.conn.reset_stream(stream_id, code)
            except h2.exceptions.ProtocolError:  # pragma: no cover - closed meanwhile
                return
            self.kick()


_FRAME_HEADER_SIZE = 9  # RFC 9113 §4.1


def _size(headers: list[tuple[bytes, bytes]]) -> int:
    """At least what a header block costs queued (HPACK only makes it smaller)."""
    return _FRAME_HEADER_SIZE + sum(len(name) + len(value) for name, value in headers)


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


class _Quiet:
    """Mixed into a received frame's class: a constant ``repr``.

    ``h2`` formats ``repr(frame)`` for its trace log before it handles every received frame,
    whether a logger listens or not (none does here); for a DATA frame that is a hex dump of the
    payload, about 7 % of the proxy's CPU on a bulk download. The frame is otherwise unchanged.
    """

    _label = "<frame>"

    def __repr__(self) -> str:
        return self._label


_QUIET: dict[type[Frame], type[Frame]] = {
    cls: type(cls.__name__, (_Quiet, cls), {"_label": f"<{cls.__name__}>"})
    for cls in (*FRAMES.values(), ExtensionFrame)
}


class _QuietFrames(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, yielding each frame as its :class:`_Quiet` subclass."""

    def __next__(self) -> Frame:
        frame = super().__next__()
        quiet = _QUIET.get(frame.__class__)
        if quiet is not None:
            frame.__class__ = quiet
        return frame


def _quiet(conn: h2.connection.H2Connection, *, client_side: bool) -> None:
    """Have ``conn`` receive :class:`_Quiet` frames (before any byte was received).

    This reaches into h2's dispatch table (private); an h2 without it, or without an entry for
    every frame class, keeps its own frames and their costly ``repr``, and works as before.
    """
    table = getattr(conn, "_frame_dispatch_table", None)
    if not isinstance(table, dict) or any(cls not in table for cls in _QUIET):
        return
    conn.incoming_buffer = _QuietFrames(server=not client_side)
    for cls, quiet in _QUIET.items():
        table[quiet] = table[cls]


def _open_connection(limits: H2Limits, *, client_side: bool) -> h2.connection.H2Connection:
    """An h2 connection with our settings queued (RFC 9113 §3.4 preface and §6.5 SETTINGS).

    SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 §3) is deliberately not sent.
    """
    conn = h2.connection.H2Connection(config=_h2_config(client_side=client_side))
    _quiet(conn, client_side=client_side)
    if client_side:
        conn.state_machine = _GracefulGoaway()
    codes = h2.settings.SettingCodes
    initial: dict[h2.settings.SettingCodes, int] = {
        codes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
        codes.INITIAL_WINDOW_SIZE: limits.stream_window,
        codes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
        # Bulk bodies in fewer, larger DATA frames (RFC 9113 §6.5.2): fewer events per byte.
        codes.MAX_FRAME_SIZE: _MAX_FRAME_SIZE,
    }
    if client_side:
        initial[codes.ENABLE_PUSH] = 0
    conn.local_settings = CompactSettings(client=client_side, initial_values=initial)
    conn.remote_settings = CompactSettings(client=not client_side)  # (h2's defaults, smaller)
    compact_header_tables(conn)
    compact_frame_dispatch(conn)
    # Enforced while decoding from the first frame on, not only after the SETTINGS ACK.
    conn.decoder.max_header_list_size = limits.max_header_list_size
    # h2 reads these from the settings only when they change on the ACK; ours were set, not
    # changed, so the frame size is applied here (accepting it before the ACK is harmless).
    conn.max_inbound_frame_size = _MAX_FRAME_SIZE
    conn.initiate_connection()
    conn.increment_flow_control_window(limits.connection_window - 65_535)
    return conn


# -- the client side: HTTP/2 ---------------------------------------------------------------------


class _FrontStream:
    __slots__ = ("body_ended", "headers", "id", "inbox", "request", "scope", "sink")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.request: Request | None = None  # once parsed (for the access log)
        self.id = stream_id
        self.headers = headers
        self.body_ended = ended
        self.inbox = Inbox()
        self.scope = trio.CancelScope()
        self.sink: _H2ResponseSink | None = None


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
                raise StreamGone

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
        self.status = 0

    def _send_headers(self, headers: list[tuple[bytes, bytes]], *, end: bool) -> int:
        try:
            self.wire.conn.send_headers(self.stream_id, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:  # closed, reset, or the connection ended
            raise StreamGone from exc
        return _size(headers)

    async def informational(self, status: int, headers: Headers) -> None:
        if status != 101:  # RFC 9113 §8.6: no 101 in HTTP/2
            size = self._send_headers(h2_response_headers(status, headers), end=False)
            await self.wire.queued(size)

    async def head(self, status: int, reason: bytes, headers: Headers) -> None:
        size = self._send_headers(h2_response_headers(status, headers), end=False)
        self.head_sent = True
        self.status = status
        await self.wire.queued(size)

    async def data(self, chunk: bytes) -> None:
        await self.wire.send_data(self.stream_id, chunk)
        self.counters.bytes_down += len(chunk)

    async def end(self, trailers: Headers) -> None:
        size = _FRAME_HEADER_SIZE
        if trailers:
            size = self._send_headers(forwardable(trailers), end=True)
        else:
            try:
                self.wire.conn.end_stream(self.stream_id)
            except h2.exceptions.ProtocolError as exc:
                raise StreamGone from exc
        self.ended = True
        await self.wire.queued(size)


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
        idle_timeout: seconds without a byte either way while streams are open, or without a
            stream at all (GOAWAY NO_ERROR), before the connection is closed.
        head_timeout: seconds for the preface and first SETTINGS, and for each header block
            from its first byte to END_HEADERS (total, however it trickles in), before the
            connection is closed with GOAWAY ENHANCE_YOUR_CALM.
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
        head_timeout: float = 10.0,
        should_stop: Callable[[], bool] = lambda: False,
        initial_client_data: bytes = b"",
        clock: Callable[[], float] = trio.current_time,
        scan: ScanSettings | None = None,
        on_scan: ScanCallback = log_decision,
    ) -> None:
        self.scan = scan
        self.on_scan = on_scan
        self.client = client
        self.upstream = upstream
        self.flow = flow
        self.hooks = hooks
        self.on_sts = on_sts
        self.answer_block = answer_block
        self.misdirected = misdirected
        self.limits = limits or H2Limits()
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.should_stop = should_stop
        self.clock = clock
        self.counters = Counters()
        #: Told (request, status, seconds) when each exchange ends (the access log).
        self.on_exchange: Callable[[Request, int, float], None] | None = None
        self._initial = initial_client_data
        self._streams: dict[int, _FrontStream] = {}
        self._streams_done = trio.lowlevel.ParkingLot()
        self._going_away = False
        self._cut = False  # a response was cut off by the client's connection breaking
        self._idle = trio.CancelScope()
        self._reading = trio.CancelScope()
        self._heads = HeadWatch(since=None)
        self._head_scope = trio.CancelScope()
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
        # When the origin takes no new request, neither does this connection (GOAWAY): the
        # client's next request opens a connection of its own, through the whole flow.
        upstream.on_gone = self.begin_shutdown

    @property
    def active_streams(self) -> int:
        """Streams being relayed now."""
        return len(self._streams)

    @property
    def buffered(self) -> int:
        """Received request-body bytes not yet passed on (bounded by the windows)."""
        return sum(s.inbox.fc_pending for s in self._streams.values())

    def _touch(self) -> None:
        """Progress: with streams open, any byte either way; without, only a new stream (PINGs,
        SETTINGS or a trickle of frames do not keep an idle connection open)."""
        if self._streams:
            self._rearm()

    def _rearm(self) -> None:
        self._idle.deadline = trio.current_time() + self.idle_timeout

    def _heads_fed(self, data: bytes) -> None:
        self._heads.feed(data, trio.current_time())
        since = self._heads.since
        self._head_scope.deadline = math.inf if since is None else since + self.head_timeout

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
            leaf = leaf_exception(group)
            if isinstance(leaf, TlsMitmError):  # (ClientError, UpstreamError, blocked_in_body)
                raise leaf from group
            raise

    async def _run(self) -> None:
        self._heads.since = trio.current_time()  # the preface and SETTINGS are due from now
        self._heads_fed(b"")
        with self._idle:
            self._rearm()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._unless_lost, self._wire.writer)
                nursery.start_soon(self.upstream.run)
                await self._wire.flush()  # our preface: SETTINGS and WINDOW_UPDATE
                with self._reading:
                    with self._head_scope:
                        await self._read(nursery)
                    if self._head_scope.cancelled_caught:
                        await self._head_too_slow()
                if not self._going_away:  # the client left: nobody to answer any more
                    for stream in self._streams.values():
                        stream.scope.cancel()
                while self._streams:
                    await self._streams_done.park()
                await self._unless_lost(self._wire.flush)
                nursery.cancel_scope.cancel()
        if self._idle.cancelled_caught and not self._streams:
            # Idle without a stream: a graceful GOAWAY (RFC 9113 §6.8), then the close.
            with contextlib.suppress(h2.exceptions.ProtocolError):  # (already closed)
                self.conn.close_connection(_ERR.NO_ERROR)
            with trio.move_on_after(1.0), contextlib.suppress(*_TRANSPORT_GONE):
                await self._wire.flush()

    async def _head_too_slow(self) -> None:
        """A head stayed incomplete for ``head_timeout``: GOAWAY ENHANCE_YOUR_CALM, close.

        A half-received header block leaves the HPACK state unusable (RFC 9113 §4.3), so the
        whole connection goes, not a stream; a preface that never completes has no stream.
        """
        log.info(
            "client %s: HTTP/2 head not complete within %s s", self.flow.client, self.head_timeout
        )
        self.conn.close_connection(_ERR.ENHANCE_YOUR_CALM, b"request head too slow")
        await self._close_after(
            f"HTTP/2 head not complete within {self.head_timeout} s", reason="head_timeout"
        )

    async def _read(self, nursery: trio.Nursery) -> None:
        data = self._initial
        while True:
            if data:
                self.counters.bytes_up += len(data)
                self._touch()
                self._heads_fed(data)
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
                self._wire.kick_if_queued()
            if self._going_away and not self._streams:
                return
            data = await self._unless_lost(lambda: self.client.receive_some(_RECEIVE_SIZE))
            if not data:
                return

    async def _unless_lost(self, io: Callable[[], Awaitable[bytes | bytearray | None]]) -> bytes:
        """Client I/O; a connection closed or reset once every response was sent ended
        normally (``b""``): only a loss in the middle of an exchange is ``connection_lost``."""
        try:
            return bytes(await io() or b"")
        except ClientError as exc:
            answered = (s.sink is not None and s.sink.ended for s in self._streams.values())
            if exc.reason != "connection_lost" or self._cut or not all(answered):
                raise
            return b""

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
        self._rearm()
        nursery.start_soon(self._serve, stream)

    async def _serve(self, stream: _FrontStream) -> None:
        stream.sink = sink = _H2ResponseSink(self._wire, stream.id, self.counters)
        started = trio.current_time()
        try:
            with stream.scope:
                try:
                    await self._handle(stream, sink)
                except Exception as exc:
                    await self._failed(stream, sink, leaf_exception(exc), exc)
        finally:
            if self.on_exchange is not None and stream.request is not None:
                self.on_exchange(stream.request, sink.status, trio.current_time() - started)
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
            if not self._streams:
                self._rearm()  # idle from now, unless a new stream opens
            if self._going_away and not self._streams:
                self._reading.cancel()

    async def _failed(
        self, stream: _FrontStream, sink: _H2ResponseSink, leaf: BaseException, exc: Exception
    ) -> None:
        if isinstance(leaf, StreamGone | Blocked):
            return
        if isinstance(leaf, ClientError) and leaf.reason == "connection_lost":
            self._cut = True  # (the client's connection broke; the reader learns it next)
        if isinstance(leaf, Refused):
            self._wire.reset(stream.id, _ERR.REFUSED_STREAM)
        elif isinstance(leaf, UpstreamReset) and not sink.head_sent:
            code = leaf.code if leaf.code in (_ERR.REFUSED_STREAM, _ERR.CANCEL) else _ERR.NO_ERROR
            if code == _ERR.NO_ERROR:
                await self._answer_status(sink, 502, b"origin reset the request\n")
            else:
                self._wire.reset(stream.id, code)
        elif isinstance(leaf, UpstreamError | trio.TooSlowError) and not sink.head_sent:
            log.info("stream %d to %s failed: %s", stream.id, self.flow.host, leaf)
            status = 504 if isinstance(leaf, trio.TooSlowError) else 502
            await self._answer_status(sink, status, b"the origin failed to answer\n")
        elif isinstance(leaf, UpstreamReset):
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
        except StreamGone:
            return

    async def _handle(self, stream: _FrontStream, sink: _H2ResponseSink) -> None:
        try:
            request = request_from_h2(stream.headers)
        except ClientError:
            self._wire.reset(stream.id, _ERR.PROTOCOL_ERROR)  # RFC 9113 §8.1.1
            return
        self.counters.requests += 1
        stream.request = request
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
        hooked_request = await hook_request(self, sink, request)
        if hooked_request is None:
            return
        body = None if stream.body_ended else _H2RequestBody(self._wire, stream)
        await relay_request(self, sink, hooked_request, body)


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
        self._inboxes: dict[int, Inbox] = {}
        self.on_gone: Callable[[], None] = lambda: None
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
        self.on_gone()
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
            self._wire.kick_if_queued()

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
            self.on_gone()
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for sid, box in self._inboxes.items():
                if sid > last:  # RFC 9113 §6.8: not processed, safe to retry
                    box.put("reset", _ERR.REFUSED_STREAM)
                elif event.error_code:
                    box.put("gone", self._gone)
            self._slots.unpark_all()

    async def _open_stream(self, headers: list[tuple[bytes, bytes]], end: bool) -> int:
        if self._ready.is_set():  # (the preface is out: a checkpoint only if cancelled, as
            await trio.lowlevel.checkpoint_if_cancelled()  # a stream reset on arrival is)
        else:
            await self._ready.wait()
        while True:
            if self._gone is not None:
                raise Refused(self._gone)
            stream_id = self.conn.get_next_available_stream_id()
            try:  # (h2 counts the open streams against the origin's MAX_CONCURRENT_STREAMS)
                self.conn.send_headers(stream_id, headers, end_stream=end)
            except h2.exceptions.TooManyStreamsError:
                await self._slots.park()
                continue
            break
        self._inboxes[stream_id] = Inbox()  # (before the reader task runs again)
        await self._wire.queued(_size(headers))
        return stream_id

    async def exchange(self, request: Request, body: BodySource | None, sink: ResponseSink) -> None:
        stream_id = await self._open_stream(h2_request_headers(request), body is None)
        finished = False
        try:
            if body is None:  # (no upload to run beside the response: no nursery either)
                try:
                    await self._receive(stream_id, sink)
                finally:
                    await sink.aclose()
                finished = True
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_body, stream_id, body)
                    try:
                        await self._receive(stream_id, sink)
                    finally:
                        await sink.aclose()  # (inside the nursery the sink's scan was opened in)
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
        while True:
            try:
                chunk = await body.read()
            except StreamGone:
                # The client reset its stream: that stream's scope is cancelled as well, and
                # ends the exchange (whose cleanup resets this one). Raising here too would
                # put StreamGone beside that Cancelled in one group, which nobody handles.
                return
            if chunk is None:
                break
            await self._wire.send_data(stream_id, chunk)
            self.counters.bytes_up += len(chunk)
        size = _FRAME_HEADER_SIZE
        try:
            if body.trailers:
                trailers = forwardable(body.trailers)
                self.conn.send_headers(stream_id, trailers, end_stream=True)
                size = _size(trailers)
            else:
                self.conn.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            return  # the origin already answered and closed
        await self._wire.queued(size)

    async def _receive(self, stream_id: int, sink: ResponseSink) -> None:
        inbox = self._inboxes[stream_id]
        informational = 0
        while True:
            kind, *rest = await inbox.get()
            if kind == "info":
                informational += 1
                if informational > MAX_INFORMATIONAL:
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
                self._wire.ack(stream_id, size)  # taken: the origin may send more
            elif kind == "trailers":
                await sink.end(tuple(rest[0]))
                await self._wait_end(inbox)
                return
            elif kind == "end":
                await sink.end(())
                return
            elif kind == "reset":
                raise UpstreamReset(rest[0])
            else:
                raise UpstreamError(rest[0], reason="upstream_gone")

    @staticmethod
    async def _wait_end(inbox: Inbox) -> None:
        kind, *_ = await inbox.get()  # trailers are followed by StreamEnded
        if kind != "end":  # pragma: no cover - h2 ends the stream with the trailers
            raise UpstreamError("origin stream did not end after trailers", reason="bad_http2")


# -- the relay the flow runs ----------------------------------------------------------------------

_PREFACE_START = b"PRI * HTTP/2.0"  # RFC 9113 §3.4


def _alpn(stream: trio.abc.Stream) -> bytes | None:
    """The ALPN protocol a TLS stream negotiated (``None``: none, or not TLS)."""
    selected = getattr(stream, "selected_alpn", None)
    return selected() if callable(selected) else None


async def _goaway_on_shutdown(stopping: trio.Event, front: H2Front) -> None:
    """Start a graceful close (GOAWAY) once the interceptor begins to shut down."""
    await stopping.wait()
    front.begin_shutdown()


async def run_h2(job: RelayJob) -> RelayOutcome:
    """The HTTP/2 relay (:class:`~tlsmitm._relay.plan.RelayKind` ``H2``).

    The plan runs it whenever either side speaks HTTP/2; each side is what it negotiated on its
    own (ALPN ``h2``, or the client's connection preface after a sniff without ALPN), and the
    relay translates between them. Requests to another authority than the connection's get
    421 (:func:`~.h2_rules.same_authority_only`): connection coalescing never carries a request
    past the decision made for its own name.
    """
    client_h2 = _alpn(job.client) == b"h2" or job.to_upstream.startswith(_PREFACE_START)
    upstream_h2 = _alpn(job.upstream) == b"h2"
    flow = job.flow  # (the flow fills in which protocol each side speaks, from the plan)
    upstream: Upstream = (
        H2Upstream(job.upstream)
        if upstream_h2
        else H1Upstream(job.upstream, connect=job.open_upstream)
    )
    front: H2Front | H1Front
    if client_h2:
        front = H2Front(
            client=job.client,
            upstream=upstream,
            flow=flow,
            hooks=job.hooks,
            on_sts=job.on_sts,
            answer_block=job.answer_block,
            misdirected=same_authority_only(flow.host, flow.port),
            idle_timeout=job.idle_timeout,
            head_timeout=job.head_timeout,
            should_stop=job.should_stop,
            initial_client_data=job.to_upstream,
            scan=job.scan,
            on_scan=job.on_scan,
        )
    else:
        front = H1Front(
            client=job.client,
            upstream=upstream,
            flow=flow,
            hooks=job.hooks,
            on_sts=job.on_sts,
            answer_block=job.answer_block,
            idle_timeout=job.idle_timeout,
            head_timeout=job.head_timeout,
            should_stop=job.should_stop,
            initial_client_data=job.to_upstream,
            scan=job.scan,
            on_scan=job.on_scan,
        )
    if isinstance(front, H2Front):
        front.on_exchange = job.on_exchange
    try:
        async with trio.open_nursery() as nursery:
            if isinstance(front, H2Front) and job.stopping is not None:
                nursery.start_soon(_goaway_on_shutdown, job.stopping, front)
            await front.run()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = leaf_exception(group)
        if isinstance(leaf, TlsMitmError):  # (ClientError, UpstreamError, blocked_in_body)
            raise leaf from group
        raise
    finally:
        job.record.bytes_up += front.counters.bytes_up
        job.record.bytes_down += front.counters.bytes_down
        job.record.requests += front.counters.requests
    return RelayOutcome()


RELAYS.register(RelayKind.H2, run_h2)
