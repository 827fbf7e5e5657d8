"""The WebSocket message relay: two hops, two pumps, one hook per message.

Theory of operation
-------------------
After a ``101 Switching Protocols`` that :func:`~tlsmitm._websocket.negotiated_upgrade` accepted,
:class:`WebSocketRelay` runs one :class:`~tlsmitm._websocket.Endpoint` per hop and one pump per
direction. A pump reads its hop's bytes (first whatever the HTTP relay had already read past the
handshake), and for each whole message asks ``Hooks.on_websocket_message`` -- pass, replace, drop,
or close -- before writing it to the other hop. A pump awaits the hook and the other hop's writes,
so a slow reader slows down its writer: nothing queues but one message (bounded by the message
limit). Each hop has one send lock, and a frame is made *inside* it: with compression context
takeover, frames must reach the peer in the order they were compressed.

Control frames (RFC 6455 §5.5):

* a Ping is forwarded to the other peer, whose Pong comes back the same way (§5.5.2, §5.5.3);
  once the other hop is closing, tlsmitm answers the Ping itself (also after it sent its own
  Close: only data frames must not follow a Close, §5.5.1);
* a Close is forwarded to the other peer, and that peer's Close is the answer sent back (§7.1.2,
  codes and reasons kept). A hop that fails (a bad frame, bad UTF-8, a message over the limit) is
  closed with the code that says why (§7.4.1) and its peer's counterpart gets 1001 ("going
  away"); a transport that ends without a Close does the same (§7.1.5).
* a hook's :class:`~tlsmitm.WebSocketClose` closes both hops with its code; a hook that raises
  closes both with 1011 (inspection fails closed).

Once the first Close is sent or received, both handshakes get ``close_timeout`` seconds to
finish; whatever has not by then is answered (a received Close still gets its Close back) and
the relay ends. No bytes either way for ``idle_timeout``, or the interceptor shutting down,
closes both hops with 1001. A fragmented message (RFC 6455 §5.4) is held until its last fragment,
so it gets ``idle_timeout`` in *total* from its first byte, however slowly its fragments
trickle in: then its sender's hop is closed with 1008 and the other with 1001. The caller closes
the streams afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio
from wsproto.utilities import LocalProtocolError

from .._websocket import (
    DEFAULT_MAX_MESSAGE,
    CloseIn,
    DropMessage,
    EndOfStream,
    Endpoint,
    Failure,
    MessageIn,
    PingIn,
    PongIn,
    Received,
    WebSocketClose,
    WebSocketMessage,
    WebSocketUpgrade,
    negotiated_upgrade,
)
from .hooks import FlowInfo
from .plan import RelayKind
from .relays import RELAYS, RelayJob, RelayOutcome

__all__ = ["MessageHook", "WebSocketCounters", "WebSocketRelay", "run_websocket"]

log = logging.getLogger("tlsmitm.websocket")

_RECEIVE_SIZE = 64 * 1024
_GOING_AWAY = 1001  # RFC 6455 §7.4.1
_POLICY_VIOLATION = 1008  # RFC 6455 §7.4.1
_INTERNAL_ERROR = 1011  # RFC 6455 §7.4.1 (and the IANA registry: either endpoint)

HookVerdict = WebSocketMessage | DropMessage | WebSocketClose | None


class MessageHook(Protocol):
    """What the relay calls for every message: :class:`~tlsmitm.Hooks` has this method."""

    async def on_websocket_message(
        self, flow: FlowInfo, message: WebSocketMessage
    ) -> HookVerdict:  # pragma: no cover - a protocol
        """``None`` (pass), a new message, :class:`DropMessage` or :class:`WebSocketClose`."""
        ...


@dataclass(slots=True)
class WebSocketCounters:
    """What went through one relayed WebSocket."""

    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0
    replaced: int = 0
    dropped: int = 0
    close_code: int | None = None  # the first close code sent or received, for the log


@dataclass(slots=True, eq=False)
class _Hop:
    name: str
    stream: trio.abc.Stream
    endpoint: Endpoint
    leftover: bytes
    from_client: bool  # messages read on this hop travel client -> server
    lock: trio.Lock = field(default_factory=trio.Lock)
    message_since: float | None = None  # when the message being reassembled began


class WebSocketRelay:
    """Relay one upgraded WebSocket message by message.

    Args:
        client: the stream to the client (tlsmitm is the WebSocket server on it).
        upstream: the stream to the origin (tlsmitm is the WebSocket client on it).
        upgrade: what the 101 exchange agreed (must be supported).
        flow: passed to the hook with every message.
        hooks: the embedder's hooks.
        from_client: bytes the client sent after its upgrade request, already read.
        from_upstream: bytes the origin sent after its 101 response, already read.
        max_message: the largest message, after reassembly and decompression; larger fails the
            sending hop with 1009.
        idle_timeout: seconds without a byte either way before both hops are closed with 1001.
        close_timeout: seconds the close handshakes get once one has started.
        stopping: when set (the interceptor shuts down), both hops are closed with 1001.
    """

    def __init__(
        self,
        *,
        client: trio.abc.Stream,
        upstream: trio.abc.Stream,
        upgrade: WebSocketUpgrade,
        flow: FlowInfo,
        hooks: MessageHook,
        from_client: bytes = b"",
        from_upstream: bytes = b"",
        max_message: int = DEFAULT_MAX_MESSAGE,
        idle_timeout: float = 300.0,
        close_timeout: float = 10.0,
        stopping: trio.Event | None = None,
    ) -> None:
        if upgrade.unsupported is not None:
            raise ValueError(f"this upgrade cannot be relayed by message: {upgrade.unsupported}")
        self._client = _Hop(
            "client",
            client,
            Endpoint(we_are_client=False, deflate=upgrade.deflate, max_message=max_message),
            from_client,
            from_client=True,
        )
        self._upstream = _Hop(
            "upstream",
            upstream,
            Endpoint(we_are_client=True, deflate=upgrade.deflate, max_message=max_message),
            from_upstream,
            from_client=False,
        )
        self._flow = flow
        self._hooks = hooks
        self._idle_timeout = idle_timeout
        self._close_timeout = close_timeout
        self._stopping = stopping
        self._last_activity = 0.0
        self._closing = False
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self.counters = WebSocketCounters()

    async def run(self) -> WebSocketCounters:
        """Relay until both close handshakes are done, or time out; returns the counters.

        Cancelling it leaves the streams open and the hops wherever they were: the caller closes
        the streams.
        """
        self._last_activity = trio.current_time()
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pump, self._client, self._upstream)
                nursery.start_soon(self._pump, self._upstream, self._client)
                nursery.start_soon(self._watch_idle)
                if self._stopping is not None:
                    nursery.start_soon(self._watch_stopping, self._stopping)
        return self.counters

    # -- reading -------------------------------------------------------------------------------

    async def _pump(self, source: _Hop, sink: _Hop) -> None:
        data = source.leftover
        source.leftover = b""
        while source.endpoint.receiving:
            if not data:
                try:
                    data = bytes(await source.stream.receive_some(_RECEIVE_SIZE))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self._last_activity = trio.current_time()
                if source.from_client:
                    self.counters.bytes_up += len(data)
                else:
                    self.counters.bytes_down += len(data)
            for item in source.endpoint.receive(data or None):
                await self._handle(source, sink, item)
            data = b""
            if not source.endpoint.message_open:
                source.message_since = None
            elif source.message_since is None:
                source.message_since = self._last_activity
            self._check_finished()

    async def _handle(self, source: _Hop, sink: _Hop, item: Received) -> None:
        if isinstance(item, MessageIn):
            await self._message(source, sink, item.data)
        elif isinstance(item, PingIn):
            if sink.endpoint.may_send_data:
                # The other peer answers (RFC 6455 §5.5.2), so the Pong says it is alive.
                await self._send(sink, lambda e: e.send_ping(item.payload))
            else:
                # The other hop is closing: tlsmitm owes the Pong itself (§5.5.2).
                await self._send(source, lambda e: e.answer_ping(item.payload))
        elif isinstance(item, PongIn):
            await self._send(sink, lambda e: e.send_pong(item.payload))
        elif isinstance(item, CloseIn):
            self._start_closing(item.code)
            # RFC 6455 §7.1.2: the Close goes on to the other peer; its answer comes back the
            # same way (see below), so each side's handshake ends with the other's Close.
            await self._send(sink, lambda e: e.send_close(item.code, item.reason))
            if not sink.endpoint.receiving:
                # The other peer will never answer: echo the Close now (RFC 6455 §5.5.1).
                await self._send(source, lambda e: e.send_close(item.code, item.reason))
        elif isinstance(item, Failure):
            # RFC 6455 §7.1.7: fail the connection, with the code that says why (§7.4.1).
            log.info(
                "websocket %s:%d: %s failed (%d %s)",
                self._flow.host,
                self._flow.port,
                source.name,
                item.code,
                item.reason,
            )
            self._start_closing(item.code)
            await self._send(source, lambda e: e.send_close(item.code, item.reason))
            await self._send(sink, lambda e: e.send_close(_GOING_AWAY, f"{source.name} failed"))
        elif isinstance(item, EndOfStream):
            self._start_closing(_GOING_AWAY)
            await self._send(sink, lambda e: e.send_close(_GOING_AWAY, f"{source.name} gone"))

    async def _message(self, source: _Hop, sink: _Hop, data: str | bytes) -> None:
        if source.from_client:
            self.counters.messages_up += 1
        else:
            self.counters.messages_down += 1
        if not sink.endpoint.may_send_data:
            return  # RFC 6455 §5.5.1: the other hop is closing; no data may follow its Close
        message = WebSocketMessage(from_client=source.from_client, data=data)
        try:
            verdict = await self._hooks.on_websocket_message(self._flow, message)
            if isinstance(verdict, WebSocketMessage) and verdict.from_client != message.from_client:
                raise ValueError("a replacement WebSocketMessage must keep from_client")
            if not isinstance(verdict, WebSocketMessage | DropMessage | WebSocketClose | None):
                raise TypeError(f"on_websocket_message returned {type(verdict).__name__}")
        except Exception:
            # Content inspection fails closed: the message is not delivered, both hops close.
            log.exception("websocket hook failed on %s:%d", self._flow.host, self._flow.port)
            await self._close_both(_INTERNAL_ERROR, "inspection failed")
            return
        if verdict is None:
            await self._send(sink, lambda e: e.send_message(data))
        elif isinstance(verdict, WebSocketMessage):
            self.counters.replaced += 1
            await self._send(sink, lambda e: e.send_message(verdict.data))
        elif isinstance(verdict, DropMessage):
            self.counters.dropped += 1
        else:
            await self._close_both(verdict.code, verdict.reason)

    # -- writing -------------------------------------------------------------------------------

    async def _send(self, hop: _Hop, frame: Callable[[Endpoint], bytes]) -> None:
        """Write ``frame(endpoint)`` to ``hop``, made under its lock; nothing when not allowed."""
        async with hop.lock:
            try:
                data = frame(hop.endpoint)
            except LocalProtocolError:
                return  # the hop's state forbids it (closing, closed, gone): nothing to send
            try:
                await hop.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                hop.endpoint.transport_lost()
        self._check_finished()

    async def _close_both(self, code: int, reason: str) -> None:
        self._start_closing(code)
        for hop in (self._client, self._upstream):
            await self._send(hop, lambda e: e.send_close(code, reason))

    def _start_closing(self, code: int) -> None:
        if self.counters.close_code is None:
            self.counters.close_code = code
        if self._closing or self._nursery is None:
            return
        self._closing = True
        self._nursery.start_soon(self._close_deadline)

    def _check_finished(self) -> None:
        if self._client.endpoint.finished and self._upstream.endpoint.finished:
            self._scope.cancel()

    # -- timers --------------------------------------------------------------------------------

    async def _close_deadline(self) -> None:
        await trio.sleep(self._close_timeout)
        # A Close received still gets its answer (RFC 6455 §5.5.1), then the relay ends.
        for hop in (self._client, self._upstream):
            code = hop.endpoint.received_code
            if code is not None:
                with trio.move_on_after(1.0):
                    await self._send(hop, _close_frame(code, ""))
        self._scope.cancel()

    async def _watch_stopping(self, stopping: trio.Event) -> None:
        await stopping.wait()
        # RFC 6455 §7.4.1: 1001, "a server going down".
        await self._close_both(_GOING_AWAY, "proxy shutting down")

    async def _watch_idle(self) -> None:
        """``idle_timeout`` without a byte either way, or for one message from its first
        fragment to its last, however its bytes trickle in (the message is held in memory)."""
        while not self._closing:
            now = trio.current_time()
            deadline = self._last_activity + self._idle_timeout
            for hop, other in ((self._client, self._upstream), (self._upstream, self._client)):
                if hop.message_since is None:
                    continue
                message_deadline = hop.message_since + self._idle_timeout
                if now >= message_deadline:
                    # RFC 6455 §7.4.1: 1008, a message that violates the proxy's policy.
                    self._start_closing(_POLICY_VIOLATION)
                    await self._send(hop, _close_frame(_POLICY_VIOLATION, "message too slow"))
                    await self._send(other, _close_frame(_GOING_AWAY, f"{hop.name} too slow"))
                    return
                deadline = min(deadline, message_deadline)
            if now >= deadline:
                await self._close_both(_GOING_AWAY, "idle timeout")
                return
            await trio.sleep_until(deadline)


def _close_frame(code: int, reason: str) -> Callable[[Endpoint], bytes]:
    return lambda endpoint: endpoint.send_close(code, reason)


async def run_websocket(job: RelayJob) -> RelayOutcome:
    """The WebSocket relay as :data:`~tlsmitm._relay.relays.RELAYS` runs it after a ``101``.

    The plan sends only upgrades that :func:`~tlsmitm._websocket.negotiated_upgrade` accepts
    here (:func:`~tlsmitm._relay.plan.relay_after_upgrade`). The upstream is never pooled after
    a WebSocket.
    """
    switched = job.upgrade
    if switched is None or switched.request is None or switched.response is None:
        raise ValueError("the WebSocket relay runs only after a 101 exchange")
    relay = WebSocketRelay(
        client=job.client,
        upstream=job.upstream,
        upgrade=negotiated_upgrade(switched.request.headers, switched.response.headers),
        flow=replace(job.flow, client_protocol="websocket", upstream_protocol="websocket"),
        hooks=job.hooks,
        from_client=job.to_upstream,
        from_upstream=job.to_client,
        max_message=job.websocket_max_message,
        idle_timeout=job.idle_timeout,
        stopping=job.stopping,
    )
    try:
        counters = await relay.run()
    finally:
        job.record.bytes_up += relay.counters.bytes_up
        job.record.bytes_down += relay.counters.bytes_down
    log.debug(
        "websocket %s:%d ended: %d messages up, %d down, close %s",
        job.flow.host,
        job.flow.port,
        counters.messages_up,
        counters.messages_down,
        counters.close_code,
    )
    return RelayOutcome()


RELAYS.register(RelayKind.WEBSOCKET, run_websocket)
