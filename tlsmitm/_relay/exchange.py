"""One exchange, whatever the protocols: the bodies and sinks a front and an upstream share,
the response path every protocol takes through the hooks, and the HTTP/1.1 halves used with
HTTP/2 on the other side (:class:`H1Upstream` behind an HTTP/2 client, :class:`H1Front` in front
of an HTTP/2 origin). The HTTP/2 halves are in :mod:`.h2`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any, Protocol

import h11
import trio

from .._errors import ClientError, UpstreamError
from .._scan import BodyInspection, ScanSettings, open_inspection
from .h1 import BlockAnswer, StsCallback
from .h2_rules import HOP_BY_HOP, forwardable, h1_request_headers
from .hooks import Block, BodyTap, FlowInfo, Headers, Hooks, Request, Response
from .scanning import (
    ScanCallback,
    ScanReport,
    block_for,
    content_encoding,
    log_decision,
    request_context,
    response_context,
    response_has_body,
)

__all__ = [
    "MAX_INFORMATIONAL",
    "Blocked",
    "BodySource",
    "Counters",
    "H1Front",
    "H1Upstream",
    "HookedSink",
    "Inbox",
    "RawSink",
    "Refused",
    "ResponseSink",
    "StreamGone",
    "TappedBody",
    "Upstream",
    "UpstreamReset",
    "exchange_scanned_request",
    "leaf_exception",
    "send_block",
]

_RECEIVE_SIZE = 64 * 1024
_MAX_INCOMPLETE_EVENT = 64 * 1024
MAX_INFORMATIONAL = 16  # 1xx heads per response before the stream counts as hostile
_COALESCE = 128 * 1024  # received DATA passed on in one piece at most: half the default
# stream window, so the first half is acknowledged (WINDOW_UPDATE) while the rest arrives


# -- small plumbing ----------------------------------------------------------------------------


class StreamGone(Exception):
    """The peer reset or closed the stream: stop working on it."""


class Refused(Exception):
    """The upstream will take no new stream (GOAWAY): the client may retry elsewhere."""


class UpstreamReset(UpstreamError):
    """The origin reset its stream with ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(f"origin reset the stream ({code})", reason="upstream_reset")
        self.code = code


class Blocked(Exception):
    """A hook blocked: the block answer was sent, the exchange ends."""


def leaf_exception(exc: BaseException) -> BaseException:
    """The single exception inside nested one-member groups (trio's strict groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Inbox:
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
        """The next item; consecutive ``("data", bytes, size)`` items already received come
        as one (up to about 128 KiB), so a burst of small DATA frames costs one write onwards."""
        while not self._items:
            await self._lot.park()
        item = self._items.popleft()
        if item[0] != "data" or not self._items or self._items[0][0] != "data":
            return item
        parts, size = [item[1]], item[2]
        total = len(item[1])
        while self._items and self._items[0][0] == "data" and total < _COALESCE:
            _, data, more = self._items.popleft()
            parts.append(data)
            total += len(data)
            size += more
        return ("data", b"".join(parts), size)


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
    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """The origin side of a relay: :class:`H2Upstream` or :class:`H1Upstream`."""

    protocol: str
    on_gone: Callable[[], None]
    """Set by the front: called once the upstream takes no new request (closed, GOAWAY)."""

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


# -- the hooks, the same for every protocol ---------------------------------------------------


class RawSink(Protocol):
    head_sent: bool

    async def informational(self, status: int, headers: Headers) -> None: ...
    async def head(self, status: int, reason: bytes, headers: Headers) -> None: ...
    async def data(self, chunk: bytes) -> None: ...
    async def end(self, trailers: Headers) -> None: ...


async def send_block(
    raw: RawSink, block: Block, request: Request, answer_block: BlockAnswer
) -> None:
    status, reason, headers, body = await answer_block(block, request.target)
    await raw.head(status, reason, headers)
    if body:
        await raw.data(body)
    await raw.end(())


class HookedSink:
    """The response path every protocol shares: STS recording, the content scanners (the body
    held until they answer), ``on_response`` with ``body_limit`` buffering, the body hooks,
    blocks and replaced bodies; writes through a protocol's sink.

    An upstream calls :meth:`aclose` when the exchange ends, however it ends (a held body's
    scanners stop and its spool is dropped).
    """

    def __init__(
        self,
        raw: RawSink,
        *,
        flow: FlowInfo,
        hooks: Hooks,
        request: Request,
        on_sts: StsCallback | None,
        answer_block: BlockAnswer,
        scan: ScanSettings | None = None,
        on_scan: ScanCallback = log_decision,
    ) -> None:
        self.raw = raw
        self.flow = flow
        self.hooks = hooks
        self.request = request
        self.on_sts = on_sts
        self.answer_block = answer_block
        self.scan = scan
        self.on_scan = on_scan
        self._tap = BodyTap(hooks, flow)
        self._response: Response | None = None
        self._held: Response | None = None  # a head waiting for its body (body_limit)
        self._buffer = bytearray()
        self._inspection: BodyInspection | None = None  # a body held for the scanners
        self._scope: AsyncExitStack | None = None

    async def informational(self, status: int, headers: Headers) -> None:
        await self.raw.informational(status, headers)

    async def head(self, response: Response) -> None:
        sts = [v for k, v in response.headers if k.lower() == b"strict-transport-security"]
        if self.on_sts is not None and sts:
            self.on_sts(sts)  # RFC 6797 §8.1: the flow sets on_sts only when verified
        self._response = response
        if self.scan is not None and response_has_body(self.request.method, response.status):
            # The verdict before the first byte: nothing of the response goes out until the
            # scanners answered (as on HTTP/1.1, :mod:`.h1_scan`).
            context = response_context(self.flow, self.request, response)
            self._scope = AsyncExitStack()
            self._inspection = await self._scope.enter_async_context(
                open_inspection(self.scan, context, content_encoding(response.headers))
            )
            return
        await self._head(response)

    async def data(self, chunk: bytes) -> None:
        inspection = self._inspection
        if inspection is None:
            await self._data(chunk)
            return
        await inspection.feed(chunk)
        if inspection.settled:
            await self._release(inspection, complete=False, trailers=())

    async def end(self, trailers: Headers) -> None:
        inspection = self._inspection
        if inspection is None:
            await self._end(trailers)
        else:
            await self._release(inspection, complete=True, trailers=trailers)

    async def aclose(self) -> None:
        """End a scan still in progress (the exchange failed or was cancelled)."""
        scope, self._scope, self._inspection = self._scope, None, None
        if scope is not None:
            await scope.aclose()

    async def _release(
        self, inspection: BodyInspection, *, complete: bool, trailers: Headers
    ) -> None:
        """The scanners' decision: a block or a replacement answers here and ends the
        exchange; a delivery sends the held body on (the rest streams when incomplete)."""
        try:
            decision = await inspection.finish(complete=complete)
            self.on_scan(
                ScanReport(
                    host=self.flow.host,
                    direction=inspection.context.direction,
                    decision=decision,
                    latencies=inspection.latencies,
                    size=inspection.spool.size,
                )
            )
            if decision.action == "block":
                await send_block(self.raw, block_for(decision), self.request, self.answer_block)
                raise Blocked
            if decision.action == "replace":
                replaced = decision.replacement
                assert replaced is not None
                await self._send_replaced(
                    replaced.status, replaced.reason, replaced.headers, replaced.body
                )
                if replaced.body:
                    await self.raw.data(replaced.body)
                await self.raw.end(())
                raise Blocked  # the origin's body is not wanted
            self._inspection = None
            assert self._response is not None
            await self._head(self._response)
            async for chunk in inspection.spool.chunks():
                await self._data(chunk)
            if complete:
                await self._end(trailers)
        finally:
            await self.aclose()

    async def _head(self, response: Response) -> None:
        if self.hooks.body_limit > 0:
            self._held = response
            return
        outcome = await self.hooks.on_response(self.flow, self.request, response)
        await self._send_head(outcome, response)

    async def _send_head(self, outcome: Response | Block | None, response: Response) -> None:
        if isinstance(outcome, Block):
            await send_block(self.raw, outcome, self.request, self.answer_block)
            raise Blocked
        head = outcome or response
        await self.raw.head(head.status, head.reason, head.headers)

    async def _send_replaced(
        self, status: int, reason: bytes, headers: Headers, body: bytes
    ) -> None:
        """A head for a replaced body: its own length, no transfer coding."""
        framing = (b"content-length", b"transfer-encoding")
        kept = [(k, v) for k, v in headers if k.lower() not in framing]
        kept.append((b"content-length", b"%d" % len(body)))
        await self.raw.head(status, reason, tuple(kept))

    async def _forward(self, chunk: bytes) -> None:
        assert self._response is not None
        await self._tap.response(self.request, self._response, chunk, end=False)
        await self.raw.data(chunk)

    async def _data(self, chunk: bytes) -> None:
        held = self._held
        if held is None:
            await self._forward(chunk)
            return
        self._buffer += chunk
        if len(self._buffer) > self.hooks.body_limit:
            self._held = None
            shown = replace(held, body=None, truncated=True)
            outcome = await self.hooks.on_response(self.flow, self.request, shown)
            await self._send_head(outcome, held)
            buffered, self._buffer = bytes(self._buffer), bytearray()
            await self._forward(buffered)

    async def _end(self, trailers: Headers) -> None:
        held = self._held
        if held is not None:
            self._held = None
            body = bytes(self._buffer)
            shown = replace(held, body=body, truncated=False)
            outcome = await self.hooks.on_response(self.flow, self.request, shown)
            if isinstance(outcome, Response) and outcome.body is not None:
                await self._send_replaced(
                    outcome.status, outcome.reason, outcome.headers, outcome.body
                )
                if outcome.body:
                    await self.raw.data(outcome.body)
                await self.raw.end(trailers)
                return
            await self._send_head(outcome, held)
            if body:
                await self._forward(body)
        if self._response is not None:
            await self._tap.response(self.request, self._response, b"", end=True)
        await self.raw.end(trailers)


class _HeldBody:
    """A request body the scanners let through: the held part from the spool, then (when the
    scanners decided before the end) the rest as it comes."""

    def __init__(self, spool: Any, rest: BodySource | None) -> None:
        self._chunks = spool.chunks()
        self._rest = rest
        self._held = True

    @property
    def trailers(self) -> Headers:
        return self._rest.trailers if self._rest is not None else ()

    async def read(self) -> bytes | None:
        if self._held:
            try:
                return bytes(await anext(self._chunks))
            except StopAsyncIteration:
                self._held = False
        return await self._rest.read() if self._rest is not None else None

    async def aclose(self) -> None:
        await self._chunks.aclose()


async def exchange_scanned_request(
    upstream: Upstream,
    request: Request,
    body: BodySource,
    sink: HookedSink,
) -> None:
    """``--scan-requests``: hold the request body until the scanners answer, then send the
    request upstream, or answer the client with the block (the origin never sees it)."""
    assert sink.scan is not None
    context = request_context(sink.flow, request)
    async with open_inspection(sink.scan, context, content_encoding(request.headers)) as inspection:
        complete = False
        while True:
            chunk = await body.read()
            if chunk is None:
                complete = True
                break
            await inspection.feed(chunk)
            if inspection.settled:
                break
        decision = await inspection.finish(complete=complete)
        sink.on_scan(
            ScanReport(
                host=sink.flow.host,
                direction=inspection.context.direction,
                decision=decision,
                latencies=inspection.latencies,
                size=inspection.spool.size,
            )
        )
        if decision.action != "deliver":  # a block (an upload is never replaced)
            await send_block(sink.raw, block_for(decision), request, sink.answer_block)
            return
        held = _HeldBody(inspection.spool, None if complete else body)
        try:
            await upstream.exchange(request, held, sink)
        finally:
            await held.aclose()


class TappedBody:
    """A request body shown to the body hooks chunk by chunk, before it is forwarded."""

    def __init__(self, body: BodySource, tap: BodyTap, request: Request) -> None:
        self._body = body
        self._tap = tap
        self._request = request

    @property
    def trailers(self) -> Headers:
        return self._body.trailers

    async def read(self) -> bytes | None:
        chunk = await self._body.read()
        await self._tap.request(self._request, chunk or b"", end=chunk is None)
        return chunk


class ClientSide(Protocol):
    """What :func:`hook_request` and :func:`relay_request` read of a client side
    (:class:`H1Front`, :class:`~tlsmitm._relay.h2.H2Front`)."""

    flow: FlowInfo
    hooks: Hooks
    on_sts: StsCallback | None
    answer_block: BlockAnswer
    scan: ScanSettings | None
    on_scan: ScanCallback
    upstream: Upstream


async def hook_request(front: ClientSide, sink: RawSink, request: Request) -> Request | None:
    """Shows a client's ``request`` to ``on_request``: the request to relay (the hook's
    replacement, if any), or ``None`` when the hook blocked it (the block answered on ``sink``).
    """
    outcome = await front.hooks.on_request(front.flow, request)
    if isinstance(outcome, Block):
        await send_block(sink, outcome, request, front.answer_block)
        return None
    return request if outcome is None else outcome


async def relay_request(
    front: ClientSide, sink: RawSink, request: Request, body: BodySource | None
) -> bool:
    """Relays ``request`` (its ``body`` shown to the body hooks) through ``front.upstream``, and
    the response through a :class:`HookedSink` writing to ``sink``.

    Returns:
        ``True`` when the body was held for the request scanners first
        (:func:`exchange_scanned_request`), else ``False``.
    """
    hooked = HookedSink(
        sink,
        flow=front.flow,
        hooks=front.hooks,
        request=request,
        on_sts=front.on_sts,
        answer_block=front.answer_block,
        scan=front.scan,
        on_scan=front.on_scan,
    )
    if body is not None:
        body = TappedBody(body, BodyTap(front.hooks, front.flow), request)
        if front.scan is not None and front.scan.scan_requests:
            await exchange_scanned_request(front.upstream, request, body, hooked)
            return True
    await front.upstream.exchange(request, body, hooked)
    return False


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
        self.on_gone: Callable[[], None] = lambda: None
        self._idle: list[_H1Conn] = [_H1Conn(first)]
        self._open = 1
        self._released = trio.lowlevel.ParkingLot()

    async def run(self) -> None:
        """Closes the connections it opened itself when the relay ends (``first`` is the
        flow's to close)."""
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):  # (each close is forceful: it cannot block)
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
                except UpstreamError as exc:
                    # Another connection failed (did not verify, refused): never answered
                    # here, inside the site's origin. The client's connection goes away and the
                    # request is refused, so the client retries on a connection of its own,
                    # where the whole flow (and its error page) applies.
                    self._open -= 1
                    self.connect = None
                    self.max_connections = 1
                    self.on_gone()
                    raise Refused(str(exc)) from exc
                except BaseException:
                    self._open -= 1
                    raise
            if self._open == 0:
                # The client's connection goes away too (on_gone): its next connection gets
                # a new upstream through the whole flow (verified), and this request retried.
                raise Refused("the origin closed the connection")
            await self._released.park()

    async def exchange(self, request: Request, body: BodySource | None, sink: ResponseSink) -> None:
        conn = await self._acquire()
        try:
            await self._exchange(conn, request, body, sink)
        finally:
            # Clean whenever both messages are complete: also when the client reset its stream
            # after the last byte (curl does, once Content-Length is met).
            parser = conn.parser
            reusable = parser.our_state is h11.DONE and parser.their_state is h11.DONE
            if reusable:
                conn.parser.start_next_cycle()
                self._idle.append(conn)
            else:
                self._open -= 1
                if self._open == 0 and self.connect is None:
                    self.on_gone()
            self._released.unpark_all()
            if not reusable:  # mid-message or told to close: this connection is done
                with trio.CancelScope(shield=True):
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
            try:
                await self._receive(conn, sink)
            finally:
                await sink.aclose()  # (inside the nursery the sink's scan was opened in)
            if conn.parser.our_state is not h11.DONE:
                nursery.cancel_scope.cancel()  # answered before the upload ended: not reusable

    async def _write(self, conn: _H1Conn, data: bytes) -> None:
        if data:
            await conn.stream.send_all(data)
            self.counters.bytes_up += len(data)

    async def _send_body(self, conn: _H1Conn, body: BodySource) -> None:
        while (chunk := await body.read()) is not None:
            await self._write(conn, conn.parser.send(h11.Data(data=chunk)) or b"")
        trailers = forwardable(body.trailers)
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
                if informational > MAX_INFORMATIONAL:
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
        forwarded = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        await self.front._send(h11.Response(status_code=status, reason=reason, headers=forwarded))
        self.head_sent = True

    async def data(self, chunk: bytes) -> None:
        await self.front._send(h11.Data(data=chunk))
        self.front.counters.bytes_down += len(chunk)

    async def end(self, trailers: Headers) -> None:
        await self.front._send(h11.EndOfMessage(headers=list(forwardable(trailers))))


class H1Front:
    """Serves an HTTP/1.1 client (h11) through an HTTP/2 ``upstream``, one request at a time.

    Arguments as for :class:`H2Front` (``head_timeout``: seconds from a request head's first
    byte to its end, in total); ``Upgrade`` requests are relayed as plain requests (an
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
        head_timeout: float = 10.0,
        should_stop: Callable[[], bool] = lambda: False,
        initial_client_data: bytes = b"",
        scan: ScanSettings | None = None,
        on_scan: ScanCallback = log_decision,
    ) -> None:
        self.scan = scan
        self.on_scan = on_scan
        self.client = client
        self.upstream = upstream
        self.head_timeout = head_timeout
        self._head_scope: trio.CancelScope | None = None
        self._upstream_gone = False
        upstream.on_gone = self._on_upstream_gone
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

    def _on_upstream_gone(self) -> None:
        self._upstream_gone = True  # this connection ends after the exchange in progress

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
            head = self._head_scope
            if data and head is not None and head.deadline == math.inf:
                head.deadline = trio.current_time() + self.head_timeout  # its first byte
            self._parser.receive_data(data)

    async def _next_head(self) -> Any:
        """The next request head: within ``head_timeout`` of its first byte, however it
        trickles in (bytes pipelined after the last request count from now).

        Raises:
            ClientError: ``reason`` ``head_timeout``, as on the HTTP/1.1 relay.
        """
        self._head_scope = scope = trio.CancelScope()
        if self._parser.trailing_data[0]:
            scope.deadline = trio.current_time() + self.head_timeout
        with scope:
            event = await self._next()
        self._head_scope = None
        if scope.cancelled_caught:
            raise ClientError(
                f"request head not complete within {self.head_timeout} s", reason="head_timeout"
            )
        return event

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
            event = await self._next_head()
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
                or self._upstream_gone
            ):
                return
            self._parser.start_next_cycle()

    async def _one(self, request: Request) -> bool:
        """One exchange; ``False`` when the connection must end after it."""
        sink = _H11ResponseSink(self)
        hooked_request = await hook_request(self, sink, request)
        if hooked_request is None:
            return False
        request = hooked_request
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
        try:
            if await relay_request(self, sink, request, body):  # the body was scanned first
                return self._parser.their_state is h11.DONE
        except Exception as exc:
            leaf = leaf_exception(exc)
            if isinstance(leaf, Blocked):
                return False
            if isinstance(leaf, UpstreamError | Refused) and not sink.head_sent:
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
