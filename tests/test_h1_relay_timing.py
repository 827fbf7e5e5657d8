"""The HTTP/1.1 relay's idle deadline and its hook-free path, over memory streams.

The relay moves its trio deadline lazily (once per ``_deadline_slack`` of activity instead of once
per I/O); these tests pin what that may and may not change, on trio's mock clock.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import h11
import pytest
import trio
import trio.testing

from tlsmitm._errors import ClientError
from tlsmitm._relay.h1 import HttpRelay, run_relay
from tlsmitm._relay.hooks import Block, FlowInfo, Hooks, Request, Response

IDLE = 10.0
REQUEST = b"GET /x HTTP/1.1\r\nHost: example.org\r\n\r\n"
FLOW = FlowInfo(client="127.0.0.1:1", host="example.org", port=443, verified=True)


async def _no_block(_block: Block, _target: bytes) -> tuple[int, bytes, tuple[()], bytes]:
    raise AssertionError("nothing is blocked here")


def _relay(
    client: trio.abc.Stream, upstream: trio.abc.Stream, hooks: Hooks | None = None
) -> HttpRelay:
    sts: list[list[bytes]] = []
    return HttpRelay(
        client=client,
        upstream=upstream,
        flow=FLOW,
        hooks=hooks or Hooks(),
        on_sts=lambda values: sts.append(list(values)),
        answer_block=_no_block,
        idle_timeout=IDLE,
    )


async def _read_head(stream: trio.abc.Stream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some()
    return data


async def test_a_stalled_origin_is_dropped_after_idle_timeout_never_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, origin = trio.testing.memory_stream_pair()
    relay = _relay(relay_client, relay_upstream)
    last_byte = 0.0
    failed_at: list[float] = []

    async def run() -> None:
        with pytest.raises(trio.TooSlowError):
            await run_relay(relay)
        failed_at.append(trio.current_time())

    async def serve() -> None:
        nonlocal last_byte
        await _read_head(origin)
        await origin.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        # Activity keeps the exchange alive well past idle_timeout: the deadline moves.
        for _ in range(5):
            await trio.sleep(IDLE * 0.9)
            await origin.send_all(b"z")
        last_byte = trio.current_time()
        await trio.sleep_forever()  # then the origin stalls mid-body

    with trio.fail_after(200):  # mock time: a deadline that never moved fails here, not hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            nursery.start_soon(serve)
            await client.send_all(REQUEST)
            received = b""
            while received.count(b"z") < 5:
                received += await client.receive_some()
            while not failed_at:
                await trio.sleep(1)
            nursery.cancel_scope.cancel()
    stalled_for = failed_at[0] - last_byte
    assert IDLE <= stalled_for <= IDLE + relay._deadline_slack + 0.01


async def test_a_head_deadline_is_exact_while_the_idle_deadline_is_lazy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, _origin = trio.testing.memory_stream_pair()
    relay = _relay(relay_client, relay_upstream)
    relay.head_timeout = 3.0
    await _times_out_after(relay, 3.0, functools.partial(client.send_all, b"GET /x HTTP/1.1\r\n"))


async def _times_out_after(
    relay: HttpRelay, seconds: float, client_side: Callable[[], Awaitable[object]]
) -> None:
    """Run ``relay`` while ``client_side`` sends an unfinished head: a head timeout, on time."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            started = trio.current_time()
            with pytest.raises(ClientError) as info:
                await run_relay(relay)
            assert trio.current_time() - started == pytest.approx(seconds)
            nursery.cancel_scope.cancel()
    assert info.value.reason == "head_timeout"


class _Counting(Hooks):
    def __init__(self) -> None:
        self.requests = 0
        self.responses = 0

    async def on_request(self, flow: FlowInfo, request: Request) -> None:
        self.requests += 1

    async def on_response(self, flow: FlowInfo, request: Request, response: Response) -> None:
        self.responses += 1


@pytest.mark.parametrize("hooks", [None, "counting"])
async def test_keep_alive_exchanges_with_and_without_hooks(hooks: str | None) -> None:
    """Hooks that are set see every exchange; without them the same bytes pass unchanged."""
    counting = _Counting() if hooks else None
    client, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, origin = trio.testing.memory_stream_pair()
    relay = _relay(relay_client, relay_upstream, counting)
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
        b"Strict-Transport-Security: max-age=60\r\n\r\nhello"
    )
    seen_sts: list[list[bytes]] = []
    relay.on_sts = lambda values: seen_sts.append(list(values))

    async def serve() -> None:
        for _ in range(3):
            head = await _read_head(origin)
            assert head.startswith(b"GET /x HTTP/1.1\r\n")
            await origin.send_all(response)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, relay)
            nursery.start_soon(serve)
            for _ in range(3):
                await client.send_all(REQUEST)
                received = b""
                while not received.endswith(b"hello"):
                    received += await client.receive_some()
                assert received == response  # forwarded as the origin sent it
            nursery.cancel_scope.cancel()
    assert seen_sts == [[b"max-age=60"]] * 3  # STS is recorded with or without hooks
    assert relay.counters.requests == 3
    if counting is not None:
        assert (counting.requests, counting.responses) == (3, 3)


async def test_a_head_that_trickles_in_times_out_from_its_first_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The head deadline counts from the head's first byte, not from when the relay first had
    to wait for the rest of it."""
    client, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, _origin = trio.testing.memory_stream_pair()
    relay = _relay(relay_client, relay_upstream)
    relay.head_timeout = 3.0

    async def trickle() -> None:
        for piece in (b"GET /x HTTP/1.1\r\n", b"Host: example.org\r\n", b"A: b\r\n"):
            await client.send_all(piece)
            await trio.sleep(1.0)

    await _times_out_after(relay, 3.0, trickle)


async def test_a_complete_head_leaves_the_idle_deadline_in_charge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After whole heads (which never arm the head deadline), an idle keep-alive connection
    lasts ``idle_timeout``, longer than ``head_timeout``, and ends cleanly."""
    client, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, origin = trio.testing.memory_stream_pair()
    relay = _relay(relay_client, relay_upstream)
    relay.head_timeout = 3.0
    ended: list[float] = []

    async def run() -> None:
        assert await run_relay(relay) is None  # a clean end between requests
        ended.append(trio.current_time())

    async def serve() -> None:
        for _ in range(2):
            await _read_head(origin)
            await origin.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            nursery.start_soon(serve)
            for _ in range(2):
                await client.send_all(REQUEST)
                received = b""
                while not received.endswith(b"ok"):
                    received += await client.receive_some()
                await trio.sleep(2 * relay.head_timeout)  # idle between requests: not a head
            last = trio.current_time() - 2 * relay.head_timeout
            while not ended:
                await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert IDLE <= ended[0] - last <= IDLE + relay._deadline_slack + 0.01


def test_h11_headers_are_read_as_iterating_them_gives() -> None:
    """The relay reads h11's header list directly (fast path); it must equal h11's own view,
    duplicates and order kept, names lower-cased, values as sent."""
    from tlsmitm._relay.h1 import _h11_headers

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(
        b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Dup: 1\r\nx-DUP: Two \r\nCookie: c=d\r\n\r\n"
    )
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    expected = tuple((bytes(k), bytes(v)) for k, v in event.headers)
    assert _h11_headers(event.headers) == expected
    assert expected[1:3] == ((b"x-dup", b"1"), (b"x-dup", b"Two"))
    assert _h11_headers([(b"a", b"b")]) == ((b"a", b"b"),)  # without h11's item list


async def test_a_pipelined_request_already_buffered_is_parsed_without_a_read() -> None:
    """The relay reads before parsing only when nothing is buffered; a second request that
    came with the first is served from the buffer (a read first would wait forever)."""
    client, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, origin = trio.testing.memory_stream_pair()
    relay = _relay(relay_client, relay_upstream)

    async def serve() -> None:
        for body in (b"one", b"two"):
            await _read_head(origin)
            await origin.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + body)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, relay)
            nursery.start_soon(serve)
            await client.send_all(REQUEST + REQUEST)  # both heads in one read
            received = b""
            while not received.endswith(b"two"):
                received += await client.receive_some()
            nursery.cancel_scope.cancel()
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert relay.counters.requests == 2


async def test_the_access_log_hears_each_exchange_with_its_duration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``on_exchange`` (the access log) gets the request, the status and how long the exchange
    took from its head to the response (the clock is only read for it when it is set)."""
    client, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, origin = trio.testing.memory_stream_pair()
    relay = _relay(relay_client, relay_upstream)
    heard: list[tuple[bytes, int, float]] = []
    relay.on_exchange = lambda request, status, elapsed: heard.append(
        (request.target, status, elapsed)
    )

    async def serve() -> None:
        await _read_head(origin)
        await trio.sleep(2.0)
        await origin.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, relay)
            nursery.start_soon(serve)
            await client.send_all(REQUEST)
            received = b""
            while not received.endswith(b"no"):
                received += await client.receive_some()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert heard == [(b"/x", 404, pytest.approx(2.0))]
