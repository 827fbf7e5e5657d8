"""The WebSocket message relay over memory streams, with wsproto peers on both ends.

client (wsproto) <-> WebSocketRelay <-> origin (wsproto), each hop a ``memory_stream_pair``. The
opening handshake is done by the two peers' own ``WSConnection``s, so the extension headers the
relay reads are the ones a real client and server produce.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from tlsmitm._relay.hooks import FlowInfo
from tlsmitm._relay.ws import WebSocketCounters, WebSocketRelay
from tlsmitm._websocket import (
    DropMessage,
    WebSocketClose,
    WebSocketMessage,
    negotiated_upgrade,
)

FLOW = FlowInfo(client="127.0.0.1:5000", host="ws.example.test", port=443, verified=True)
Verdict = WebSocketMessage | DropMessage | WebSocketClose | None


@dataclass
class RecordingHooks:
    """Records every message; ``decide`` picks the verdict."""

    decide: Callable[[WebSocketMessage], Verdict] = lambda message: None
    seen: list[WebSocketMessage] = field(default_factory=list)

    async def on_websocket_message(self, flow: FlowInfo, message: WebSocketMessage) -> Verdict:
        assert flow == FLOW
        self.seen.append(message)
        return self.decide(message)


class Peer:
    """One end: a wsproto connection over a memory stream."""

    def __init__(self, stream: trio.abc.Stream, conn: WSConnection) -> None:
        self.stream = stream
        self.conn = conn

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next(self) -> Event:
        """The next event; a transport end is ``CloseConnection(1006)`` (wsproto's convention)."""
        while True:
            for event in self.conn.events():
                return event
            data = await self.stream.receive_some(65536)
            self.conn.receive_data(data or None)

    async def message(self) -> str | bytes:
        """The next whole message (skipping nothing else: a control frame fails the test)."""
        parts: list[str | bytes] = []
        while True:
            event = await self.next()
            assert isinstance(event, Message), event
            parts.append(event.data)
            if event.message_finished:
                return parts[0][:0].join(parts)  # type: ignore[no-any-return]

    async def expect_close(self, code: int, reply: bool = True) -> CloseConnection:
        event = await self.next()
        assert isinstance(event, CloseConnection), event
        assert event.code == code, event
        if reply:
            await self.send(event.response())
        return event

    async def eof(self) -> None:
        """The relay ends this transport (after the close handshake)."""
        with trio.fail_after(10):
            while await self.stream.receive_some(65536):
                pass


def _handshake(
    client_extensions: list[PerMessageDeflate], server_extensions: list[PerMessageDeflate]
) -> tuple[WSConnection, WSConnection, tuple[tuple[bytes, bytes], ...], ...]:
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    request = client.send(
        Request(host="ws.example.test", target="/chat", extensions=client_extensions)
    )
    server.receive_data(request)
    assert isinstance(next(server.events()), Request)
    response = server.send(AcceptConnection(extensions=server_extensions))
    client.receive_data(response)
    assert isinstance(next(client.events()), AcceptConnection)

    def headers(raw: bytes) -> tuple[tuple[bytes, bytes], ...]:
        lines = raw.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
        return tuple(
            (name.strip(), value.strip()) for name, value in (line.split(b":", 1) for line in lines)
        )

    return client, server, headers(request), headers(response)


@dataclass
class Session:
    client: Peer
    origin: Peer
    hooks: RecordingHooks
    relay: WebSocketRelay
    done: trio.Event
    counters: list[WebSocketCounters]


@asynccontextmanager
async def session(
    *,
    deflate: tuple[list[PerMessageDeflate], list[PerMessageDeflate]] = ([], []),
    hooks: RecordingHooks | None = None,
    from_client: bytes = b"",
    from_upstream: bytes = b"",
    stopping: trio.Event | None = None,
    **options: float,
) -> AsyncIterator[Session]:
    client_ws, origin_ws, request, response = _handshake(*deflate)
    upgrade = negotiated_upgrade(request, response)
    assert upgrade.unsupported is None
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, origin_end = trio.testing.memory_stream_pair()
    hooks = hooks or RecordingHooks()
    relay = WebSocketRelay(
        client=proxy_client,
        upstream=proxy_upstream,
        upgrade=upgrade,
        flow=FLOW,
        hooks=hooks,
        from_client=from_client,
        from_upstream=from_upstream,
        max_message=int(options.pop("max_message", 1 << 20)),
        stopping=stopping,
        **options,
    )
    done = trio.Event()
    counters: list[WebSocketCounters] = []

    async def run() -> None:
        counters.append(await relay.run())
        await proxy_client.aclose()
        await proxy_upstream.aclose()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield Session(
            Peer(client_end, client_ws), Peer(origin_end, origin_ws), hooks, relay, done, counters
        )
        with trio.fail_after(30):
            await done.wait()


DEFLATES = {
    "none": ([], []),
    "deflate": ([PerMessageDeflate()], [PerMessageDeflate()]),
    "no-context-takeover": (
        [PerMessageDeflate(client_no_context_takeover=True, client_max_window_bits=9)],
        [PerMessageDeflate(server_no_context_takeover=True, server_max_window_bits=10)],
    ),
    "client-offers-server-declines": ([PerMessageDeflate()], []),
}


@pytest.mark.parametrize("deflate", DEFLATES.values(), ids=DEFLATES.keys())
async def test_messages_both_ways_and_a_clean_close(
    deflate: tuple[list[PerMessageDeflate], list[PerMessageDeflate]],
) -> None:
    async with session(deflate=deflate) as s:
        await s.client.send(TextMessage(data="hello " * 1000))
        assert await s.origin.message() == "hello " * 1000
        await s.origin.send(BytesMessage(data=b"\x00\xff" * 3000))
        assert await s.client.message() == b"\x00\xff" * 3000
        await s.client.send(TextMessage(data="again, with context"))
        assert await s.origin.message() == "again, with context"
        # RFC 6455 §7.1.2: the client's Close reaches the origin, whose answer comes back.
        await s.client.send(CloseConnection(code=1000, reason="bye"))
        await s.origin.expect_close(1000)
        closing = await s.client.expect_close(1000, reply=False)
        assert closing.reason == "bye"
        await s.client.eof()
    assert s.hooks.seen == [
        WebSocketMessage(from_client=True, data="hello " * 1000),
        WebSocketMessage(from_client=False, data=b"\x00\xff" * 3000),
        WebSocketMessage(from_client=True, data="again, with context"),
    ]
    assert s.counters[0].messages_up == 2
    assert s.counters[0].messages_down == 1
    assert s.counters[0].close_code == 1000


async def test_the_hook_sees_compressed_messages_decoded() -> None:
    deflate = DEFLATES["deflate"]
    async with session(deflate=deflate) as s:
        await s.client.send(TextMessage(data="x" * 100_000))
        assert await s.origin.message() == "x" * 100_000
        await s.origin.send(CloseConnection(code=1001))
        await s.client.expect_close(1001)
        await s.origin.expect_close(1001, reply=False)
    assert s.counters[0].bytes_up < 1000  # it went compressed on the wire...
    assert s.hooks.seen == [WebSocketMessage(from_client=True, data="x" * 100_000)]  # ...decoded


async def test_fragmented_messages_are_reassembled_for_the_hook() -> None:
    async with session() as s:
        for i, fin in enumerate((False, False, True)):
            await s.client.send(TextMessage(data=f"part{i};", message_finished=fin))
        await s.client.send(BytesMessage(data=b"a", message_finished=False))
        await s.client.send(Ping(payload=b"inside"))
        await s.client.send(BytesMessage(data=b"b", message_finished=True))
        assert await s.origin.message() == "part0;part1;part2;"
        assert await s.origin.next() == Ping(payload=b"inside")
        assert await s.origin.message() == b"ab"
        await s.client.send(CloseConnection(code=1000))
        await s.origin.expect_close(1000)
        await s.client.expect_close(1000, reply=False)
    assert [m.data for m in s.hooks.seen] == ["part0;part1;part2;", b"ab"]


async def test_pings_are_forwarded_and_pongs_come_back() -> None:
    async with session(deflate=DEFLATES["deflate"]) as s:
        await s.client.send(Ping(payload=b"client-ping"))
        assert await s.origin.next() == Ping(payload=b"client-ping")
        await s.origin.send(Pong(payload=b"client-ping"))
        assert await s.client.next() == Pong(payload=b"client-ping")
        await s.origin.send(Ping(payload=b"origin-ping"))
        assert await s.client.next() == Ping(payload=b"origin-ping")
        await s.client.send(Pong(payload=b"origin-ping"))
        assert await s.origin.next() == Pong(payload=b"origin-ping")
        await s.origin.send(CloseConnection(code=1000))
        await s.client.expect_close(1000)
        await s.origin.expect_close(1000, reply=False)


async def test_a_ping_during_the_close_handshake_is_answered_by_the_relay() -> None:
    async with session() as s:
        await s.client.send(CloseConnection(code=1000, reason="bye"))
        await s.origin.expect_close(1000, reply=False)
        # Before answering the Close, the origin pings (wsproto will not, so a raw frame). RFC
        # 6455 §5.5.2 owes it a Pong; the client has closed, so the relay answers.
        await s.origin.send_raw(b"\x89\x04ping")
        with trio.fail_after(10):
            frame = b""
            while len(frame) < 10:
                frame += await s.origin.stream.receive_some(65536)
        assert frame[:2] == b"\x8a\x84"  # a masked Pong of 4 bytes (RFC 6455 §5.1)
        assert bytes(b ^ frame[2 + i % 4] for i, b in enumerate(frame[6:10])) == b"ping"
        await s.origin.send(CloseConnection(code=1000))
        await s.client.expect_close(1000, reply=False)
        await s.origin.eof()


async def test_hook_replaces_drops_and_closes() -> None:
    def decide(message: WebSocketMessage) -> Verdict:
        if message.data == "replace me":
            return WebSocketMessage(from_client=message.from_client, data=b"replaced")
        if message.data == b"drop me":
            return DropMessage()
        if message.data == "EICAR":
            return WebSocketClose(code=4001, reason="blocked by policy")
        return None

    async with session(deflate=DEFLATES["deflate"], hooks=RecordingHooks(decide=decide)) as s:
        await s.client.send(TextMessage(data="replace me"))
        assert await s.origin.message() == b"replaced"
        await s.origin.send(BytesMessage(data=b"drop me"))
        await s.origin.send(TextMessage(data="kept"))
        assert await s.client.message() == "kept"  # the dropped message never arrived
        await s.origin.send(TextMessage(data="EICAR"))
        closing = await s.client.expect_close(4001)
        assert closing.reason == "blocked by policy"
        closing = await s.origin.expect_close(4001)
        assert closing.reason == "blocked by policy"
        await s.client.eof()
        await s.origin.eof()
    assert s.counters[0].replaced == 1
    assert s.counters[0].dropped == 1


async def test_a_failing_hook_closes_both_sides_with_1011(caplog: pytest.LogCaptureFixture) -> None:
    def decide(message: WebSocketMessage) -> Verdict:
        raise RuntimeError("scanner down")

    caplog.set_level(logging.ERROR, "tlsmitm.websocket")
    async with session(hooks=RecordingHooks(decide=decide)) as s:
        await s.client.send(TextMessage(data="anything"))
        await s.client.expect_close(1011)
        await s.origin.expect_close(1011)
    assert "websocket hook failed" in caplog.text


async def test_a_replacement_must_keep_its_direction(caplog: pytest.LogCaptureFixture) -> None:
    hooks = RecordingHooks(decide=lambda m: WebSocketMessage(from_client=False, data="turned"))
    async with session(hooks=hooks) as s:
        await s.client.send(TextMessage(data="anything"))
        await s.client.expect_close(1011)
        await s.origin.expect_close(1011)
    assert "must keep from_client" in caplog.text


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\x81\x02hi", 1002),  # unmasked client frame (RFC 6455 §5.1)
        (b"\x81\x82\x00\x00\x00\x00\xff\xfe", 1007),  # bad UTF-8 (RFC 6455 §8.1)
        (b"\x82\xff" + (2**62).to_bytes(8, "big") + b"\0\0\0\0", 1009),  # 4 EiB announced
        (b"\x00" * 64, 1002),  # garbage
    ],
)
async def test_a_hostile_client_gets_a_clean_close(raw: bytes, code: int) -> None:
    async with session(max_message=1 << 16) as s:
        if code == 1009:
            raw += b"\0" * 70_000  # the limit is enforced on arrival
        await s.client.send_raw(raw)
        await s.client.expect_close(code, reply=False)
        await s.origin.expect_close(1001)  # its counterpart goes away (RFC 6455 §7.4.1)
        await s.client.eof()
        await s.origin.eof()
    assert s.hooks.seen == []


async def test_an_oversized_compressed_message_from_the_origin_is_1009() -> None:
    async with session(deflate=DEFLATES["deflate"], max_message=100_000) as s:
        await s.origin.send(BytesMessage(data=b"\0" * 10_000_000))  # ~10 KiB on the wire
        await s.origin.expect_close(1009, reply=False)
        await s.client.expect_close(1001)
    assert s.hooks.seen == []


async def test_leftover_bytes_from_the_handshake_are_relayed_first() -> None:
    # Bytes each side sent right behind the handshake, read by the HTTP relay already.
    client_ws, origin_ws, _, _ = _handshake([], [])
    early_up = client_ws.send(TextMessage(data="early from client"))
    early_down = origin_ws.send(TextMessage(data="early from origin"))
    async with session(from_client=early_up, from_upstream=early_down) as s:
        # The session's own peers did their own handshake: same roles, no extensions, so
        # the early frames parse the same.
        assert await s.origin.message() == "early from client"
        assert await s.client.message() == "early from origin"
        await s.client.send(CloseConnection(code=1000))
        await s.origin.expect_close(1000)
        await s.client.expect_close(1000, reply=False)


async def test_a_client_that_disappears_closes_the_origin_with_1001() -> None:
    async with session() as s:
        await s.client.send(TextMessage(data="last words"))
        assert await s.origin.message() == "last words"
        await s.client.stream.aclose()  # no Close frame: RFC 6455 §7.1.5, code 1006
        await s.origin.expect_close(1001)
        await s.origin.eof()


async def test_an_unanswered_close_times_out_and_is_echoed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(close_timeout=10.0) as s:
        await s.client.send(CloseConnection(code=1000, reason="bye"))
        await s.origin.expect_close(1000, reply=False)  # the origin never answers
        start = trio.current_time()
        await s.client.expect_close(1000, reply=False)
        assert trio.current_time() - start >= 9.9
        await s.client.eof()


async def test_idle_connections_are_closed_with_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(idle_timeout=60.0) as s:
        await s.client.send(TextMessage(data="hi"))
        assert await s.origin.message() == "hi"
        start = trio.current_time()
        closing = await s.client.expect_close(1001)
        assert closing.reason == "idle timeout"
        assert trio.current_time() - start >= 59.9
        await s.origin.expect_close(1001)


async def test_shutting_down_closes_both_sides_with_1001() -> None:
    stopping = trio.Event()
    async with session(stopping=stopping) as s:
        await s.client.send(TextMessage(data="hi"))
        assert await s.origin.message() == "hi"
        stopping.set()
        closing = await s.client.expect_close(1001)
        assert closing.reason == "proxy shutting down"
        await s.origin.expect_close(1001)


async def test_a_slow_reader_holds_its_writer_back() -> None:
    """Backpressure: while the client reads nothing, the relay stops reading the origin."""
    client_ws, origin_ws, request, response = _handshake([], [])
    client_end, proxy_client = trio.testing.lockstep_stream_pair()  # no buffer at all
    proxy_upstream, origin_end = trio.testing.memory_stream_pair()
    relay = WebSocketRelay(
        client=proxy_client,
        upstream=proxy_upstream,
        upgrade=negotiated_upgrade(request, response),
        flow=FLOW,
        hooks=RecordingHooks(),
    )
    origin = Peer(origin_end, origin_ws)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        for _ in range(50):
            await origin.send(BytesMessage(data=b"x" * 10_000))
        await trio.testing.wait_all_tasks_blocked()
        # One message is being written to the client, none queued behind it in the relay.
        assert relay.counters.messages_down == 1
        client = Peer(client_end, client_ws)
        for _ in range(50):
            assert await client.message() == b"x" * 10_000
        assert relay.counters.messages_down == 50
        nursery.cancel_scope.cancel()


async def test_a_trickled_fragmented_message_is_bounded_in_total_by_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(idle_timeout=60.0) as s:
        start = trio.current_time()
        closing = None
        for i in range(100):  # a fragment every 30 s: each one is progress, the message is not
            await s.client.send(TextMessage(data=f"part{i};", message_finished=False))
            with trio.move_on_after(30.0):
                closing = await s.client.expect_close(1008)
            if closing is not None:
                break
        assert closing is not None
        assert closing.reason == "message too slow"
        assert 59.9 <= trio.current_time() - start <= 61.0
        await s.origin.expect_close(1001)
    assert s.hooks.seen == []  # the message never reached the hook, nor the origin


async def test_whole_messages_every_30_seconds_keep_a_websocket_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with session(idle_timeout=60.0) as s:
        for i in range(6):  # 3 minutes of messages in several fragments each, none too slow
            await s.client.send(TextMessage(data=f"a{i}", message_finished=False))
            await trio.sleep(20.0)
            await s.client.send(TextMessage(data="b", message_finished=True))
            assert await s.origin.message() == f"a{i}b"
            await trio.sleep(10.0)
        await s.client.send(CloseConnection(code=1000))
        await s.origin.expect_close(1000)
        await s.client.expect_close(1000, reply=False)
    assert len(s.hooks.seen) == 6
