"""The HTTP/1.1 relay's bodies over memory streams, byte for byte on both of its paths.

A Content-Length body that nothing inspects is moved as it is received (``_relay_raw_body``);
a body hook, scanning, chunked framing or an h11 without the expected internals sends it through
h11 event by event. Both must deliver the same bytes, stop at the body's end (what the client
pipelined after it is the next request) and fail the same way when the sender leaves.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
import trio.testing

from tlsmitm._errors import ClientError, UpstreamError
from tlsmitm._relay import h1
from tlsmitm._relay.h1 import HttpRelay, run_relay
from tlsmitm._relay.hooks import Block, FlowInfo, Hooks, Request, Response

FLOW = FlowInfo(client="127.0.0.1:1", host="example.org", port=443, verified=True)
BODY = os.urandom(3 * 1024 * 1024 + 4321)
NEXT = b"GET /next HTTP/1.1\r\nHost: example.org\r\n\r\n"


async def _no_block(_block: Block, _target: bytes) -> tuple[int, bytes, tuple[()], bytes]:
    raise AssertionError("nothing is blocked here")


class _BodyHasher(Hooks):
    """A request body hook: sees every chunk, in order."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.ended = False

    async def on_request_body(
        self, flow: FlowInfo, request: Request, chunk: bytes, *, end: bool
    ) -> Block | None:
        self.digest.update(chunk)
        self.ended = self.ended or end
        return None


def _chunked(body: bytes) -> bytes:
    out = bytearray()
    for start in range(0, len(body), 100_000):
        piece = body[start : start + 100_000]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


async def _read_until(stream: trio.abc.Stream, buffer: bytearray, marker: bytes) -> bytes:
    while marker not in buffer:
        data = await stream.receive_some()
        assert data, "the relay closed the origin's connection"
        buffer += data
    end = buffer.index(marker) + len(marker)
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


def _count_raw_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"upload": 0, "download": 0}
    raw = h1._relay_raw_body

    async def counting(relay: HttpRelay, left: int, *, upload: bool) -> None:
        calls["upload" if upload else "download"] += 1
        await raw(relay, left, upload=upload)

    monkeypatch.setattr(h1, "_relay_raw_body", counting)
    return calls


def _relay_between(
    hooks: Hooks,
) -> tuple[HttpRelay, trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    """A relay between memory streams; returns it, the client's end and the origin's end."""
    client, relay_client = trio.testing.memory_stream_pair()
    relay_upstream, origin = trio.testing.memory_stream_pair()
    relay = HttpRelay(
        client=relay_client,
        upstream=relay_upstream,
        flow=FLOW,
        hooks=hooks,
        on_sts=None,
        answer_block=_no_block,
    )
    return relay, client, origin


async def _exchange_body(
    *, hooks: Hooks, chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[bytes, int]:
    """Upload BODY through a relay, then a pipelined GET; returns what the origin received as
    the body (decoded when chunked) and how many times the raw path ran."""
    raw_calls = _count_raw_calls(monkeypatch)
    relay, client, origin = _relay_between(hooks)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(BODY)
    head = b"PUT /up HTTP/1.1\r\nHost: example.org\r\n" + framing + b"\r\n\r\n"
    wire = head + (_chunked(BODY) if chunked else BODY) + NEXT
    received = bytearray()

    async def origin_side() -> None:
        buffer = bytearray()
        await _read_until(origin, buffer, b"\r\n\r\n")
        if chunked:
            while True:
                size = int(await _read_until(origin, buffer, b"\r\n"), 16)
                if not size:
                    await _read_until(origin, buffer, b"\r\n")
                    break
                while len(buffer) < size + 2:
                    buffer += await origin.receive_some()
                received.extend(buffer[:size])
                del buffer[: size + 2]
        else:
            while len(received) + len(buffer) < len(BODY):
                buffer += await origin.receive_some()
            received.extend(buffer[: len(BODY)])
            del buffer[: len(BODY)]
        await origin.send_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        assert await _read_until(origin, buffer, b"\r\n\r\n") == NEXT
        assert not buffer  # nothing of the body came after its end
        await origin.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, relay)
            nursery.start_soon(origin_side)
            view = memoryview(wire)
            for start in range(0, len(view), 77_777):  # writes that straddle every boundary
                await client.send_all(view[start : start + 77_777])
            answers = bytearray()
            await _read_until(client, answers, b"\r\n\r\n")
            await _read_until(client, answers, b"\r\n\r\n")
            while len(answers) < 2:
                answers += await client.receive_some()
            assert bytes(answers) == b"ok"
            await client.aclose()
    assert relay.counters.bytes_up == len(wire)
    return bytes(received), raw_calls["upload"]


@pytest.mark.parametrize(
    ("path", "chunked"), [("raw", False), ("hooked", False), ("raw", True), ("fallback", False)]
)
async def test_request_bodies_arrive_intact_on_both_paths(
    path: str, chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = _BodyHasher() if path == "hooked" else Hooks()
    if path == "fallback":  # an h11 whose reader is not the expected one
        monkeypatch.setattr(h1, "_CONTENT_LENGTH_READER", None)
    body, raw_calls = await _exchange_body(hooks=hooks, chunked=chunked, monkeypatch=monkeypatch)
    assert hashlib.sha256(body).digest() == hashlib.sha256(BODY).digest()
    # Only an uninspected Content-Length body takes the raw path (once: after what h11 had).
    assert raw_calls == (1 if path == "raw" and not chunked else 0)
    if isinstance(hooks, _BodyHasher):
        assert hooks.digest.digest() == hashlib.sha256(BODY).digest()
        assert hooks.ended


@pytest.mark.parametrize("hooked", [False, True])
async def test_a_client_leaving_mid_body_fails_the_same_way_on_both_paths(hooked: bool) -> None:
    relay, client, origin = _relay_between(_BodyHasher() if hooked else Hooks())
    head = b"PUT /up HTTP/1.1\r\nHost: example.org\r\nContent-Length: 1000000\r\n\r\n"
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def origin_side() -> None:
                while await origin.receive_some():
                    pass

            nursery.start_soon(origin_side)
            await client.send_all(head + b"x" * 300_000)
            await client.send_eof()
            with pytest.raises(BaseExceptionGroup) as info:  # (from the exchange's nursery)
                await run_relay(relay)
            nursery.cancel_scope.cancel()
    matched, _ = info.value.split(ClientError)
    assert matched is not None
    error = matched.exceptions[0]
    assert isinstance(error, ClientError)
    assert error.reason == "bad_http"  # h11's verdict, with h11's exact count on both paths
    assert "(received 300000 bytes, expected 1000000)" in str(error)


class _ResponseHasher(Hooks):
    """A response body hook: sees every chunk, in order."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    async def on_response_body(
        self, flow: FlowInfo, request: Request, response: Response, chunk: bytes, *, end: bool
    ) -> Block | None:
        if request.target == b"/big":  # (not the "ok" of the request after it)
            self.digest.update(chunk)
        return None


@pytest.mark.parametrize(
    ("path", "chunked"), [("raw", False), ("hooked", False), ("raw", True), ("fallback", False)]
)
async def test_response_bodies_arrive_intact_on_both_paths(
    path: str, chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_raw_calls(monkeypatch)
    if path == "fallback":
        monkeypatch.setattr(h1, "_CONTENT_LENGTH_READER", None)
    hooks = _ResponseHasher() if path == "hooked" else Hooks()
    relay, client, origin = _relay_between(hooks)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(BODY)
    answer = b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n"
    answer += _chunked(BODY) if chunked else BODY

    async def origin_side() -> None:
        buffer = bytearray()
        await _read_until(origin, buffer, b"\r\n\r\n")
        view = memoryview(answer)
        for start in range(0, len(view), 77_777):  # writes that straddle every boundary
            await origin.send_all(view[start : start + 77_777])
        await _read_until(origin, buffer, b"\r\n\r\n")  # the second request
        await origin.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    received = bytearray()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, relay)
            nursery.start_soon(origin_side)
            await client.send_all(NEXT.replace(b"/next", b"/big") + NEXT)
            buffer = bytearray()
            head = await _read_until(client, buffer, b"\r\n\r\n")
            if chunked:
                assert b"chunked" in head.lower()
                while True:
                    size = int(await _read_until(client, buffer, b"\r\n"), 16)
                    if not size:
                        await _read_until(client, buffer, b"\r\n")
                        break
                    while len(buffer) < size + 2:
                        buffer += await client.receive_some()
                    received += buffer[:size]
                    del buffer[: size + 2]
            else:
                while len(received) + len(buffer) < len(BODY):
                    buffer += await client.receive_some()
                received += buffer[: len(BODY)]
                del buffer[: len(BODY)]
            await _read_until(client, buffer, b"\r\n\r\n")
            while len(buffer) < 2:
                buffer += await client.receive_some()
            assert bytes(buffer) == b"ok"  # the next response, nothing of the body after its end
            await client.aclose()
    assert hashlib.sha256(received).digest() == hashlib.sha256(BODY).digest()
    assert calls["download"] == (1 if path == "raw" and not chunked else 0)
    if isinstance(hooks, _ResponseHasher):
        assert hooks.digest.digest() == hashlib.sha256(BODY).digest()


@pytest.mark.parametrize("hooked", [False, True])
async def test_an_origin_leaving_mid_body_fails_the_same_way_on_both_paths(hooked: bool) -> None:
    relay, client, origin = _relay_between(_ResponseHasher() if hooked else Hooks())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def client_side() -> None:
                while await client.receive_some():
                    pass

            nursery.start_soon(client_side)
            await client.send_all(NEXT)

            async def origin_side() -> None:
                await _read_until(origin, bytearray(), b"\r\n\r\n")
                await origin.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
                await origin.send_all(b"x" * 300_000)
                await origin.send_eof()

            nursery.start_soon(origin_side)
            with pytest.raises(UpstreamError) as info:
                await run_relay(relay)
            nursery.cancel_scope.cancel()
    assert info.value.reason == "bad_http"  # h11's verdict, with h11's exact count on both paths
    assert "(received 300000 bytes, expected 1000000)" in str(info.value)
