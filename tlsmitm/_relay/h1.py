"""HTTP/1.1 inside the tunnel: the h11 relay between the client and the origin.

Theory of operation
-------------------
One :class:`HttpRelay` drives two h11 state machines over two byte streams: a *server* machine
facing the client and a *client* machine facing the origin. For every request/response cycle:

1. read the request head from the client; the embedder's ``on_request`` hook may pass, replace
   or block it (a block is answered through :class:`~tlsmitm.ErrorResponder`, on the error
   origin, never inside the site's origin);
2. two tasks run side by side: one forwards the request body client -> origin, the other reads
   the response and forwards it origin -> client (so ``Expect: 100-continue`` and servers that
   answer before the body is complete both work);
3. the response head is shown to ``on_response`` (with up to ``Hooks.body_limit`` bytes of body
   buffered when the hook asks for it, e.g. to scan for malware);
4. ``Strict-Transport-Security`` of responses on verified connections is handed to the HSTS
   callback (RFC 6797 §8.1: only from connections without certificate errors; only the first
   header; the header is always forwarded unchanged -- matrix MIR-04);
5. on ``101 Switching Protocols`` (WebSocket) the relay hands both raw streams back to the caller,
   with whatever bytes h11 had already read, for a byte-for-byte relay.

Headers are forwarded as received (h11 re-frames bodies with the same Content-Length or
chunking). When a hook replaces a body, Content-Length is recomputed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import h11
import trio

try:  # the one piece of h11's internals the relay uses (see _unread_body_length)
    from h11 import _readers as _h11_readers

    _CONTENT_LENGTH_READER: Any = _h11_readers.ContentLengthReader
except (ImportError, AttributeError):  # pragma: no cover - bodies then go through h11 only
    _CONTENT_LENGTH_READER = None

from .._errors import ClientError, UpstreamError
from .._scan import ScanSettings
from .h1_scan import exchange_scanned_request, scanned_response
from .hooks import Block, BodyTap, FlowInfo, Headers, Hooks, Request, Response, overrides
from .scanning import ScanCallback, log_decision, response_has_body
from .state import FlowRecord

#: Requests in a row a client may send before reading the previous answers (pipelining).
MAX_PIPELINED = 64

__all__ = ["MAX_PIPELINED", "BlockAnswer", "HttpRelay", "StsCallback", "Switched", "run_relay"]

_RECEIVE_SIZE = 128 * 1024
_MAX_INCOMPLETE_EVENT = 64 * 1024  # bound on a request/response head
_BEFORE_HEAD = (h11.IDLE, h11.SEND_RESPONSE)  # the peer's states before it sends a head


@dataclass(slots=True)
class Switched:
    """The relay ended with ``101 Switching Protocols``: relay raw bytes from here on."""

    to_client: bytes
    to_upstream: bytes
    request: Request | None = None  # the request that asked for the upgrade
    response: Response | None = None  # the 101 response


@dataclass(slots=True)
class _Counters:
    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0


def _h11_headers(headers: Any) -> Headers:
    """h11's headers as (lower-case name, value) pairs, as iterating them gives.

    Read from h11's item list when it has one: iterating h11's ``Headers`` goes through
    ``Sequence.__getitem__``, one Python call per header. (h11 keeps names and values as
    ``bytes``.)
    """
    items = getattr(headers, "_full_items", None)
    if isinstance(items, list):
        return tuple([(name, value) for _, name, value in items])
    return tuple((bytes(k), bytes(v)) for k, v in headers)


def _connection_bound_scheme(value: bytes) -> bool:
    """Is this ``Authorization``/``WWW-Authenticate`` value NTLM, Negotiate or Kerberos?"""
    parts = bytes(value).split(None, 1)
    return bool(parts) and parts[0].lower() in (b"ntlm", b"negotiate", b"kerberos")


def _binds_connection(headers: Any, name: bytes) -> bool:
    """Does a ``name`` header (``authorization``...) use a connection-bound scheme?"""
    return any(bytes(k).lower() == name and _connection_bound_scheme(v) for k, v in headers)


def _without_connection_close(headers: Headers) -> list[tuple[bytes, bytes]] | None:
    """``headers`` without the ``close`` option of ``Connection`` (other options stay);
    ``None`` when there is no such option (nothing to change: the usual case)."""
    out: list[tuple[bytes, bytes]] = []
    changed = False
    for key, value in headers:
        if key.lower() == b"connection":
            options = [o.strip() for o in value.split(b",") if o.strip()]
            kept = [o for o in options if o.lower() != b"close"]
            if len(kept) != len(options):
                changed = True
                if not kept:
                    continue
                value = b", ".join(kept)
        out.append((key, value))
    return out if changed else None


def _keep_alive_timeout(value: bytes) -> float | None:
    """``timeout=N`` of a ``Keep-Alive`` header (RFC 2068 §19.7.1.1), or ``None``."""
    for part in value.split(b","):
        key, _, number = part.strip().partition(b"=")
        if key.strip().lower() == b"timeout":
            try:
                seconds = float(number.strip().strip(b'"'))
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


BlockAnswer = Callable[[Block, bytes], Awaitable[tuple[int, bytes, Headers, bytes]]]
StsCallback = Callable[[Sequence[bytes]], None]


@dataclass
class HttpRelay:
    """Relays HTTP/1.1 between ``client`` and ``upstream`` until either side is done.

    Args:
        client: the decrypted stream to the client.
        upstream: the decrypted stream to the origin.
        flow: what hooks are told about this connection.
        hooks: the embedder's hooks.
        on_sts: called with the Strict-Transport-Security values of each response (only set it
            on verified connections).
        answer_block: turns a hook's :class:`Block` into a response (status, reason, headers,
            body) -- the ErrorResponder's redirect to the error origin.
        idle_timeout: seconds to wait for the next request on a kept-alive connection.
        head_timeout: seconds from a request head's first byte to its end (issue 15 fault 6).
        record: the connection's record; ``idle_since`` is set while awaiting a request.
        should_stop: checked between requests; ``True`` ends the relay (graceful shutdown).
        initial_client_data: bytes the client already sent (read while sniffing the request).
        keep_upstream_alive: the upstream connection may be reused by another client connection
            (:mod:`tlsmitm._pool`): a client's ``Connection: close`` is then applied to its own
            hop only, as RFC 9110 §7.6.1 has a proxy do, and not forwarded upstream.
        scan: the content scanners: bodies are held until they answer (:mod:`.h1_scan`).
        on_scan: called with the report of every scanned body (the default logs it).
    """

    client: trio.abc.Stream
    upstream: trio.abc.Stream
    flow: FlowInfo
    hooks: Hooks
    on_sts: StsCallback | None
    answer_block: BlockAnswer
    idle_timeout: float = 300.0
    head_timeout: float = 10.0
    record: FlowRecord | None = None
    should_stop: Callable[[], bool] = lambda: False
    on_exchange: Callable[[Request, int, float], None] | None = None  # the access log
    initial_client_data: bytes = b""
    keep_upstream_alive: bool = False
    counters: _Counters = field(default_factory=_Counters)
    scan: ScanSettings | None = None
    on_scan: ScanCallback = log_decision

    def __post_init__(self) -> None:
        self._down = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_INCOMPLETE_EVENT)
        self._up = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_INCOMPLETE_EVENT)
        self._idle_scope = trio.CancelScope()
        self._head_deadline: float | None = None
        self._head_armed = False  # the idle scope's deadline is the head deadline (_arm_head)
        self._pipelined = 0  # requests in a row whose head was here before the previous ended
        self._awaiting_request = True
        self._last_status = 0
        self._ended_between_requests = False
        self._connection_bound_auth = False
        self.keep_alive_hint: float | None = None
        self._bodies = BodyTap(self.hooks, self.flow)
        # Without a hook for a step, the step costs nothing: no await, no copy of the body.
        self._hooked_requests = overrides(self.hooks, "on_request")
        self._hooked_responses = overrides(self.hooks, "on_response")
        self._request_bodies = self._bodies.sees_request_bodies
        self._response_bodies = self._bodies.sees_response_bodies
        # How late the idle deadline may fire (see _touch): 1 s, less for short timeouts.
        self._deadline_slack = min(1.0, self.idle_timeout / 20)
        if self.initial_client_data:  # (receive_data(b"") would mean EOF to h11)
            self._down.receive_data(self.initial_client_data)
            self.counters.bytes_up += len(self.initial_client_data)

    # -- reading and writing -------------------------------------------------------------------

    async def _next_event(self, conn: h11.Connection, stream: trio.abc.Stream, side: str) -> Any:
        if conn.their_state in _BEFORE_HEAD:
            pending, closed = conn.trailing_data
            if not pending and not closed:
                # Nothing is buffered before a head: h11 could only answer NEED_DATA.
                await self._receive_into(conn, stream, side)
        while True:
            event = _parsed_event(conn, side)
            if event is not h11.NEED_DATA:
                return event
            if self._head_deadline is not None and not self._head_armed:
                _arm_head(self)  # a request head began and is not complete: bound its wait
            await self._receive_into(conn, stream, side)

    async def _receive_into(self, conn: h11.Connection, stream: trio.abc.Stream, side: str) -> None:
        data = bytes(await stream.receive_some(_RECEIVE_SIZE))
        now = trio.current_time()  # (one clock read for both deadlines)
        if side == "client":
            if self._awaiting_request and data and self._head_deadline is None:
                _head_began(self, now)
            self.counters.bytes_up += len(data)
        else:
            self.counters.bytes_down += len(data)
        _move_deadline(self, now)
        conn.receive_data(data)

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, event: Any) -> None:
        data = conn.send(event)
        if data:
            await stream.send_all(data)
            self._touch()

    def _touch(self) -> None:
        _move_deadline(self, trio.current_time())

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> Switched | None:
        """Relay requests until a side closes; returns :class:`Switched` after a 101.

        Raises:
            trio.TooSlowError: a peer stalled in the middle of an exchange for ``idle_timeout``.
        """
        with trio.CancelScope() as self._idle_scope:
            self._touch()
            return await self._run()
        _raise_if_a_head_timed_out(self)
        if self._awaiting_request:
            return None  # an idle keep-alive connection: a clean end
        raise trio.TooSlowError(f"no progress for {self.idle_timeout} s")

    async def _run(self) -> Switched | None:
        while True:
            _await_request(self, True)
            event = await self._next_event(self._down, self.client, "client")
            _await_request(self, False)
            if isinstance(event, h11.ConnectionClosed):
                self._ended_between_requests = True
                return None
            if not isinstance(event, h11.Request):
                raise ClientError(f"unexpected {type(event).__name__}", reason="bad_http")
            request = Request(
                method=bytes(event.method),
                target=bytes(event.target),
                headers=_h11_headers(event.headers),
                http_version=bytes(event.http_version),
            )
            if _binds_connection(request.headers, b"authorization"):
                self._connection_bound_auth = True
            self.counters.requests += 1
            outcome = (
                await self.hooks.on_request(self.flow, request) if self._hooked_requests else None
            )
            if isinstance(outcome, Block):
                await answer_locally(self, outcome, request)
                return None
            parsed: h11.Request | None = event
            if outcome is not None:
                request, parsed = outcome, None
            exchange_started = trio.current_time() if self.on_exchange is not None else 0.0
            self._last_status = 0
            try:
                switched = await self._exchange(request, parsed)
            finally:  # logged once a response head went out, even if the client left early
                if self.on_exchange is not None and self._last_status:
                    elapsed = trio.current_time() - exchange_started
                    self.on_exchange(request, self._last_status, elapsed)
            if switched is not None:
                return switched
            # The upstream is between requests only when both its messages are complete and
            # neither side asked to close it (h11 then leaves both states at DONE).
            upstream_idle = self._up.our_state is h11.DONE and self._up.their_state is h11.DONE
            if upstream_idle:
                self._up.start_next_cycle()
            if (
                not upstream_idle
                or self._down.our_state is not h11.DONE
                or self._down.their_state is not h11.DONE
                or self.should_stop()
            ):
                # The client's side closes here; a clean upstream can still serve another.
                self._ended_between_requests = upstream_idle
                return None
            self._down.start_next_cycle()

    @property
    def upstream_reusable(self) -> bool:
        """After :meth:`run`: may the upstream connection serve another client?

        Only when the relay ended between requests, the upstream is at a request boundary
        with nothing unread, and no connection-bound authentication (NTLM, Negotiate: the
        server authenticated the *connection*) was seen on it.
        """
        return (
            self._ended_between_requests
            and not self._connection_bound_auth
            and self._up.our_state is h11.IDLE
            and self._up.their_state is h11.IDLE
            and not self._up.trailing_data[0]
            and not self._up.trailing_data[1]
        )

    async def _exchange(self, request: Request, parsed: h11.Request | None) -> Switched | None:
        """Send ``request`` upstream and relay the answer.

        ``parsed`` is the client's request as h11 parsed it, when no hook changed it: sent as it
        is, h11 does not validate its headers a second time.
        """
        stripped = _without_connection_close(request.headers) if self.keep_upstream_alive else None
        event: h11.Request
        if parsed is not None and stripped is None and parsed.http_version == b"1.1":
            event = parsed
        else:
            # Sent as HTTP/1.1 whatever the client spoke (RFC 9110 §2.5: an intermediary sends
            # its own version); h11 keeps the client's HTTP/1.0 semantics on the client's side.
            headers = stripped if stripped is not None else list(request.headers)
            event = h11.Request(method=request.method, target=request.target, headers=headers)
        try:
            first = self._down.next_event()  # no I/O: is the request already complete?
        except h11.RemoteProtocolError as exc:
            raise ClientError(f"malformed HTTP from client: {exc}", reason="bad_http") from exc
        if self.scan and self.scan.scan_requests and not isinstance(first, h11.EndOfMessage):
            return await exchange_scanned_request(self, request, event, first)
        head = self._up.send(event) or b""
        if isinstance(first, h11.EndOfMessage):
            # Most requests have no body (GET, HEAD...): head and end go out in one write, and
            # no second task is needed to pump a body.
            await self.upstream.send_all(head + (self._up.send(first) or b""))
            self._touch()
            return await self._forward_response(request, None)  # (no body task to stop)
        await self.upstream.send_all(head)
        self._touch()
        if isinstance(first, h11.Data):
            if self._request_bodies:
                await self._bodies.request(request, bytes(first.data), end=False)
            await self._send(self._up, self.upstream, first)
        elif first is not h11.NEED_DATA:
            raise ClientError("client closed during the request", reason="client_gone")
        result: list[Switched | None] = [None]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward_request_body, self, request)
            result[0] = await self._forward_response(request, nursery.cancel_scope)
            if self._down.their_state is not h11.DONE:
                # The origin answered before the request body was complete: stop reading it;
                # the run loop sees the unfinished cycle and closes the connection.
                nursery.cancel_scope.cancel()
        return result[0]

    async def _forward_response(
        self, request: Request, request_scope: trio.CancelScope | None
    ) -> Switched | None:
        while True:
            event = await self._next_event(self._up, self.upstream, "upstream")
            if isinstance(event, h11.InformationalResponse):
                await self._send(self._down, self.client, event)
                if event.status_code == 101:
                    self._last_status = 101
                    if request_scope is not None:
                        request_scope.cancel()
                    to_client, _ = self._up.trailing_data
                    to_upstream, _ = self._down.trailing_data
                    return Switched(
                        to_client=bytes(to_client),
                        to_upstream=bytes(to_upstream),
                        request=request,
                        response=Response(
                            status=101,
                            reason=bytes(event.reason),
                            headers=_h11_headers(event.headers),
                            http_version=bytes(event.http_version),
                        ),
                    )
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamError("origin closed before responding", reason="upstream_gone")
            if not isinstance(event, h11.Response):  # pragma: no cover - h11 guarantees order
                raise UpstreamError(f"unexpected {type(event).__name__}", reason="bad_http")
            response = Response(
                status=event.status_code,
                reason=bytes(event.reason),
                headers=_h11_headers(event.headers),
                http_version=bytes(event.http_version),
            )
            self._last_status = event.status_code
            await self._handle_response(request, response, event)
            return None

    async def _handle_response(
        self, request: Request, response: Response, parsed: h11.Response
    ) -> None:
        keep_alive: bytes | None = None
        sts: list[bytes] = []
        for key, value in response.headers:  # one pass over what the relay itself looks at
            name = key.lower()
            if name == b"www-authenticate" and _connection_bound_scheme(value):
                self._connection_bound_auth = True
            elif name == b"keep-alive" and keep_alive is None:
                keep_alive = value
            elif name == b"strict-transport-security":
                sts.append(value)
        if keep_alive is not None:
            self.keep_alive_hint = _keep_alive_timeout(keep_alive)
        if self.on_sts is not None and sts:
            self.on_sts(sts)
        if self.scan is not None and response_has_body(request.method, response.status):
            await scanned_response(self, request, response, parsed)
            return
        limit = self.hooks.body_limit
        if limit <= 0:
            outcome = (
                await self.hooks.on_response(self.flow, request, response)
                if self._hooked_responses
                else None
            )
            head = await self._response_outcome(
                outcome, response, request, buffered=b"", parsed=parsed
            )
            await self._stream_response_body(head, request, response)
            return
        buffered = bytearray()
        complete = False
        while len(buffered) <= limit:
            event = await self._next_event(self._up, self.upstream, "upstream")
            if isinstance(event, h11.Data):
                buffered += event.data
            elif isinstance(event, h11.EndOfMessage):
                complete = True
                break
            else:
                raise UpstreamError("origin closed during the response", reason="upstream_gone")
        shown = replace(
            response, body=bytes(buffered) if complete else None, truncated=not complete
        )
        outcome = await self.hooks.on_response(self.flow, request, shown)
        if complete and isinstance(outcome, Response) and outcome.body is not None:
            await send_replaced(self, outcome)
            return
        head = await self._response_outcome(
            outcome, response, request, buffered=bytes(buffered), parsed=parsed
        )
        await self._bodies.response(request, response, bytes(buffered), end=complete)
        if complete:
            await self.client.send_all(head + (self._down.send(h11.EndOfMessage()) or b""))
            self._touch()
        else:
            await self._stream_response_body(head, request, response)

    async def _response_outcome(
        self,
        outcome: Response | Block | None,
        response: Response,
        request: Request,
        *,
        buffered: bytes,
        parsed: h11.Response,
    ) -> bytes:
        """The bytes that start the response to the client (its head and ``buffered``), unsent.

        A :class:`Block` is answered here and ends the relay. An unchanged head is sent as h11
        parsed it (``parsed``), without a second validation of its headers.
        """
        if isinstance(outcome, Block):
            await answer_locally(self, outcome, request)
            raise _Blocked
        if outcome is None and parsed.http_version == b"1.1":
            data = self._down.send(parsed)
        else:
            head = outcome or response  # (an HTTP/1.0 origin's answer goes out as HTTP/1.1)
            data = self._down.send(
                h11.Response(
                    status_code=head.status, reason=head.reason, headers=list(head.headers)
                )
            )
        if buffered:
            data = (data or b"") + (self._down.send(h11.Data(data=buffered)) or b"")
        return data or b""

    async def _stream_response_body(
        self, head: bytes, request: Request, response: Response
    ) -> None:
        """Relay the rest of the response after ``head`` (the serialised start, not yet sent).

        What is already received goes out in one write (a small response is one TLS record:
        head, body and end together); after that, each receive is one write.
        """
        out = bytearray(head)
        while True:
            event = _parsed_event(self._up, "upstream")
            if event is h11.NEED_DATA:
                await self._flush(out)
                await _receive_response_body(self)
                continue
            if not isinstance(event, h11.Data | h11.EndOfMessage):
                raise UpstreamError("origin closed during the response", reason="upstream_gone")
            if self._response_bodies:
                data = bytes(event.data) if isinstance(event, h11.Data) else None
                await self._bodies.response(request, response, data or b"", end=data is None)
            out += self._down.send(event) or b""
            if isinstance(event, h11.EndOfMessage):
                await self._flush(out)
                return
            if len(out) >= _RECEIVE_SIZE:
                await self._flush(out)

    async def _flush(self, out: bytearray) -> None:
        """Send what ``out`` holds to the client, and empty it."""
        if out:
            await self.client.send_all(out)
            self._touch()
            out.clear()


async def answer_locally(relay: HttpRelay, block: Block, request: Request) -> None:
    """Answer ``request`` with the error origin's response for ``block`` (nothing upstream)."""
    status, reason, headers, body = await relay.answer_block(block, request.target)
    await relay._send(
        relay._down,
        relay.client,
        h11.Response(status_code=status, reason=reason, headers=[*headers]),
    )
    await relay._send(relay._down, relay.client, h11.Data(data=body))
    await relay._send(relay._down, relay.client, h11.EndOfMessage())


def _parsed_event(conn: h11.Connection, side: str) -> Any:
    """The next event already in ``conn``'s buffer, or ``h11.NEED_DATA`` (no I/O)."""
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        error = ClientError if side == "client" else UpstreamError
        raise error(f"malformed HTTP from {side}: {exc}", reason="bad_http") from exc


def _replaced_events(response: Response) -> list[Any]:
    """The h11 events of a response whose body a hook replaced (Content-Length recomputed)."""
    body = response.body or b""
    headers = [
        (k, v)
        for k, v in response.headers
        if k.lower() not in (b"content-length", b"transfer-encoding")
    ]
    headers.append((b"content-length", str(len(body)).encode()))
    head = h11.Response(status_code=response.status, reason=response.reason, headers=headers)
    return [head, h11.Data(data=body), h11.EndOfMessage()] if body else [head, h11.EndOfMessage()]


async def send_replaced(relay: HttpRelay, response: Response) -> None:
    """Answer with a hook's or a scanner's replacement instead of the origin's response."""
    for event in _replaced_events(response):
        await relay._send(relay._down, relay.client, event)
    # The origin's remaining body is not wanted; the connection cannot be reused.
    raise _Blocked


class _Blocked(Exception):
    """A hook blocked or replaced a response: the connection ends after the answer."""


async def _forward_request_body(relay: HttpRelay, request: Request) -> None:
    """The client's request body to the origin (and to body hooks), to its end.

    A Content-Length body that nothing inspects (no body hook, no request scanning) is moved
    as it is received (:func:`_relay_raw_body`); anything else goes through h11 event by event.
    """
    raw = not relay._request_bodies and (relay.scan is None or not relay.scan.scan_requests)
    while relay._down.their_state is h11.SEND_BODY:
        if raw and (left := _unread_body_length(relay._down)):
            await _relay_raw_body(relay, left, upload=True)
        event = await relay._next_event(relay._down, relay.client, "client")
        if isinstance(event, h11.Data):
            if relay._request_bodies:
                await relay._bodies.request(request, bytes(event.data), end=False)
            await relay._send(relay._up, relay.upstream, event)
        elif isinstance(event, h11.EndOfMessage):
            if relay._request_bodies:
                await relay._bodies.request(request, b"", end=True)
            await relay._send(relay._up, relay.upstream, event)
            return
        elif isinstance(event, h11.ConnectionClosed):
            raise ClientError("client closed during the request body", reason="client_gone")
        else:  # pragma: no cover - h11 emits nothing else in SEND_BODY
            raise ClientError(f"unexpected {type(event).__name__}", reason="bad_http")


def _unread_body_length(conn: h11.Connection) -> int:
    """The bytes of a Content-Length body that ``conn`` still expects and has not received.

    0 when h11 holds some of them already (it hands those out first), or the body is chunked
    (its framing must be parsed), or this h11 reads bodies some other way than today's
    ``ContentLengthReader`` (then every body goes through h11).
    """
    reader = getattr(conn, "_reader", None)
    if _CONTENT_LENGTH_READER is None or type(reader) is not _CONTENT_LENGTH_READER:
        return 0
    remaining = getattr(reader, "_remaining", None)
    if not isinstance(remaining, int) or conn.trailing_data[0]:
        return 0
    return remaining


async def _receive_response_body(relay: HttpRelay) -> None:
    """More of the origin's response: the rest of a Content-Length body that nothing inspects
    (no response body hook, no scanning) goes straight to the client; anything else into h11."""
    raw = relay.scan is None and not relay._response_bodies
    if raw and (left := _unread_body_length(relay._up)):
        await _relay_raw_body(relay, left, upload=False)
        return
    await relay._receive_into(relay._up, relay.upstream, "upstream")


async def _relay_raw_body(relay: HttpRelay, left: int, *, upload: bool) -> None:
    """Move the last ``left`` bytes of a Content-Length body (the client's request body when
    ``upload``, else the origin's response body) as they are received, without h11 copying
    each of them three times on the way in and once more on the way out.

    Never more than the body is read (what follows it stays in the stream for h11), h11's
    count of the body is kept exact after every piece, and each piece still goes out through
    h11's ``send`` (which checks the framing and returns the piece itself). At the end of the
    stream h11 is told, and reports the cut body as it does on the full path.
    """
    if upload:
        source, parser, sink, writer = relay.client, relay._down, relay.upstream, relay._up
    else:
        source, parser, sink, writer = relay.upstream, relay._up, relay.client, relay._down
    reader: Any = parser._reader
    while left:
        data = await source.receive_some(min(left, _RECEIVE_SIZE))
        if not data:
            parser.receive_data(b"")
            return
        if upload:
            relay.counters.bytes_up += len(data)
        else:
            relay.counters.bytes_down += len(data)
        relay._touch()
        left -= len(data)
        reader._remaining = left
        await relay._send(writer, sink, h11.Data(data=bytes(data)))


def _move_deadline(relay: HttpRelay, now: float) -> None:
    """Progress was made: push the relay's idle deadline (a head deadline stays put).

    One cancel scope per relay whose deadline moves with every byte: a peer that stops sending,
    or stops reading (backpressure that never ends), is dropped after idle_timeout. Moving a trio
    deadline costs about half a checkpoint, so the scope's deadline is set a little beyond the
    idle deadline and moved only when the idle deadline passes it (about once per
    _deadline_slack of activity, not once per I/O): an idle peer is dropped between idle_timeout
    and idle_timeout + slack after its last byte, never earlier. A head deadline is exact.
    """
    deadline = now + relay.idle_timeout
    scope, head = relay._idle_scope, relay._head_deadline
    if relay._head_armed and head is not None and head < deadline + relay._deadline_slack:
        target = min(deadline, head)
        if scope.deadline != target:  # (trio's deadline setter is not free)
            scope.deadline = target
        return
    if not deadline <= scope.deadline <= deadline + relay._deadline_slack:
        scope.deadline = deadline + relay._deadline_slack


def _await_request(relay: HttpRelay, awaiting: bool) -> None:
    """The relay starts (or stops) waiting for the client's next request head."""
    relay._awaiting_request = awaiting
    relay._head_deadline = None
    relay._head_armed = False
    if relay.record is not None:
        relay.record.idle_since = trio.current_time() if awaiting else None
    if not awaiting:
        return
    if not relay._down.trailing_data[0]:
        relay._pipelined = 0
        return
    # Pipelined bytes are here already: the next head has begun. A client may pipeline, but not
    # without end (issue 15: 3,000 requests in one send); each costs an upstream exchange.
    relay._pipelined += 1
    if relay._pipelined > MAX_PIPELINED:
        raise ClientError(
            f"more than {MAX_PIPELINED} pipelined requests in a row", reason="pipelined_limit"
        )
    _head_began(relay, trio.current_time())


def _raise_if_a_head_timed_out(relay: HttpRelay) -> None:
    if relay._awaiting_request and relay._head_deadline is not None:
        raise ClientError(
            f"request head not complete within {relay.head_timeout} s", reason="head_timeout"
        )


def _head_began(relay: HttpRelay, now: float) -> None:
    """A head must end within ``head_timeout`` of its first byte, however it trickles in.

    The deadline is only noted here: a head that is complete by the time it is parsed (the
    usual case) never needs it. The relay waits for more of a head only after
    :func:`_arm_head`, which puts the noted deadline on the idle scope.
    """
    relay._head_deadline = now + relay.head_timeout
    if relay.record is not None:
        relay.record.idle_since = None


def _arm_head(relay: HttpRelay) -> None:
    """The head that began is incomplete: from now on the scope fires at its deadline."""
    relay._head_armed = True
    relay._touch()


async def run_relay(relay: HttpRelay) -> Switched | None:
    """Run ``relay``; a blocked or replaced response ends it cleanly."""
    result: Switched | None = None
    try:
        result = await relay.run()
    except* _Blocked:
        result = None
    return result
