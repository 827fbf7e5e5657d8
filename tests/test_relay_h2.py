"""The HTTP/2 relay over socket pairs: h2 <-> h2, h2 <-> HTTP/1.1, HTTP/1.1 <-> h2, the hooks,
backpressure, coalescing (421) and the protections against hostile clients.

Clients and origins are written with ``h2`` directly (``tests/h2peers.py``) or h11
(``tests/origin.py``); the relay runs between them over real kernel socket pairs.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
import hpack
import hyperframe.frame
import pytest
import trio
import trio.testing
from h2peers import Exchange, H2Peer, origin_handler, pattern
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from origin import EICAR, OriginStats, serve_http
from strategies import h2_streams

from tlsmitm._errors import ClientError, TlsMitmError
from tlsmitm._relay import h2 as relay_h2
from tlsmitm._relay.exchange import H1Front, H1Upstream, leaf_exception
from tlsmitm._relay.h2 import (
    _QUIET,
    H2Front,
    H2Upstream,
    _open_connection,
    _quiet,
    _QuietFrames,
    _Wire,
)
from tlsmitm._relay.h2_rules import (
    FloodGuard,
    H2Limits,
    HeadWatch,
    forwardable,
    h1_request_headers,
    h2_request_headers,
    request_from_h2,
    same_authority_only,
)
from tlsmitm._relay.hooks import Block, FlowInfo, Headers, Hooks, Request, Response
from tlsmitm._relay.scanning import ScanReport
from tlsmitm._scan import Clean, Infected, ScanContext, Scanner, ScanSettings, ScanVerdict

HOST = "www.example.test"
FLOW = FlowInfo(client="127.0.0.1:50000", host=HOST, port=443, verified=True)
ERR = h2.errors.ErrorCodes
# What a hostile client meets once the relay cut it off.
GONE = (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError)


def _pair(opened: list[trio.SocketStream]) -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    pair = trio.SocketStream(a), trio.SocketStream(b)
    opened.extend(pair)
    return pair


async def _close_all(opened: list[trio.SocketStream]) -> None:
    with trio.CancelScope(shield=True):
        for stream in opened:
            await trio.aclose_forcefully(stream)


class RecordingHooks(Hooks):
    def __init__(self, *, body_limit: int = 0) -> None:
        self.body_limit = body_limit
        self.requests: list[Request] = []
        self.responses: list[Response] = []
        self.flows: list[FlowInfo] = []

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        self.flows.append(flow)
        self.requests.append(request)
        if request.target == b"/blocked":
            return Block(title="Blocked", explanation="by policy")
        return None

    async def on_response(
        self, flow: FlowInfo, request: Request, response: Response
    ) -> Response | Block | None:
        self.responses.append(response)
        if response.body is not None and b"virus" in response.body:
            return Block(title="Malware", explanation="found")
        if request.target == b"/replace":
            return replace_body(response, b"replaced by a hook")
        return None


def replace_body(response: Response, body: bytes) -> Response:
    return Response(
        status=response.status, reason=response.reason, headers=response.headers, body=body
    )


async def answer_block(block: Block, target: bytes) -> tuple[int, bytes, Headers, bytes]:
    body = block.title.encode()
    headers = (
        (b"location", b"https://error.invalid/block"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # hop-by-hop: must not reach an h2 client
    )
    return 303, b"See Other", headers, body


@dataclass
class Setup:
    client: H2Peer
    front: H2Front
    upstream: H2Upstream | H1Upstream
    hooks: RecordingHooks
    sts: list[Sequence[bytes]]
    origin: H2Peer | None = None
    origin_stats: OriginStats = field(default_factory=OriginStats)
    front_error: list[BaseException] = field(default_factory=list)
    front_done: trio.Event = field(default_factory=trio.Event)
    authorities: list[bytes] = field(default_factory=list)
    reports: list[ScanReport] = field(default_factory=list)


@contextlib.asynccontextmanager
async def relay(
    *,
    upstream: str = "h2",
    hooks: RecordingHooks | None = None,
    limits: H2Limits | None = None,
    client_auto_ack: bool = True,
    client_settings: dict[int, int] | None = None,
    start_client: bool = True,
    scan: ScanSettings | None = None,
    head_timeout: float = 10.0,
    idle_timeout: float = 300.0,
    origin_settings: dict[int, int] | None = None,
) -> AsyncIterator[Setup]:
    hooks = hooks or RecordingHooks()
    limits = limits or H2Limits()
    opened: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        client_sock, front_sock = _pair(opened)
        stats = OriginStats()
        origin: H2Peer | None = None
        up: H2Upstream | H1Upstream
        if upstream == "h2":
            up_sock, origin_sock = _pair(opened)
            origin = H2Peer(
                origin_sock, client=False, handler=origin_handler, settings=origin_settings
            )
            nursery.start_soon(origin.run)
            up = H2Upstream(up_sock, limits=limits)
        else:

            async def serve(stream: trio.SocketStream) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await serve_http(stream, stats)  # (the relay may hang up mid-response)

            async def connect() -> trio.abc.Stream:
                ours, theirs = _pair(opened)
                nursery.start_soon(serve, theirs)
                return ours

            up = H1Upstream(await connect(), connect=connect)
        sts: list[Sequence[bytes]] = []
        authorities: list[bytes] = []
        reports: list[ScanReport] = []
        strict = same_authority_only(HOST, 443)

        async def misdirected(authority: bytes) -> str | None:
            authorities.append(authority)
            return await strict(authority)

        front = H2Front(
            client=front_sock,
            upstream=up,
            flow=FLOW,
            hooks=hooks,
            on_sts=sts.append,
            answer_block=answer_block,
            misdirected=misdirected,
            limits=limits,
            scan=scan,
            on_scan=reports.append,
            head_timeout=head_timeout,
            idle_timeout=idle_timeout,
        )
        client = H2Peer(client_sock, auto_ack=client_auto_ack, settings=client_settings)
        setup = Setup(client, front, up, hooks, sts, origin, stats, authorities=authorities)
        setup.reports = reports

        async def run_front() -> None:
            try:
                await front.run()
            except TlsMitmError as exc:  # (ClientError, or a body hook's block)
                setup.front_error.append(exc)
            finally:
                setup.front_done.set()
                await trio.aclose_forcefully(front_sock)

        nursery.start_soon(run_front)
        if start_client:
            nursery.start_soon(client.run)
        try:
            yield setup
        finally:
            nursery.cancel_scope.cancel()
            await _close_all(opened)


# -- pure parts -------------------------------------------------------------------------------


def _forwardable_reference(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The rule spelled out: the names every Connection field lists, then one filter."""
    listed = {
        option.strip().lower()
        for key, value in headers
        if key.lower() == b"connection"
        for option in value.split(b",")
        if option.strip()
    }
    hop = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
    hop |= {b"te", b"proxy-authenticate", b"proxy-authorization", b"http2-settings", b"host"}
    return [
        (key.lower(), value)
        for key, value in headers
        if not key.startswith(b":") and key.lower() not in hop and key.lower() not in listed
    ]


_NAMES = st.sampled_from(
    [b"Connection", b"connection", b"X-A", b"x-a", b"x-b", b"Keep-Alive", b"TE", b":path", b"Host"]
)
_VALUES = st.sampled_from([b"x-a", b"X-B, close", b" , x-a ,", b"", b"keep-alive", b"v"])


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=8))
def test_forwardable_drops_hop_by_hop_and_connection_listed_fields(
    headers: list[tuple[bytes, bytes]],
) -> None:
    assert forwardable(headers) == _forwardable_reference(headers)


def test_forwardable_drops_a_field_listed_by_a_later_connection_field() -> None:
    headers = [(b"X-Gone", b"1"), (b"x-kept", b"2"), (b"Connection", b"x-gone, Keep-Alive")]
    assert forwardable(headers) == [(b"x-kept", b"2")]


def test_request_from_h2_puts_authority_first_as_host() -> None:
    request = request_from_h2(
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"a.test"),
            (b":path", b"/x?y"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
        ]
    )
    assert request.method == b"GET"
    assert request.target == b"/x?y"
    assert request.headers[0] == (b"host", b"a.test")
    assert request.http_version == b"2"
    # Towards HTTP/1.1 the split cookie is joined (RFC 9113 §8.2.3), Host stays first.
    assert h1_request_headers(request, has_body=False) == [
        (b"host", b"a.test"),
        (b"cookie", b"a=1; b=2"),
    ]


@pytest.mark.parametrize(
    "headers",
    [
        [(b":scheme", b"https"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"https")],
        [(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],
    ],
)
def test_request_from_h2_rejects_missing_or_repeated_pseudo_headers(
    headers: list[tuple[bytes, bytes]],
) -> None:
    with pytest.raises(ClientError):
        request_from_h2(headers)


def test_h2_request_headers_drop_hop_by_hop_and_keep_te_trailers() -> None:
    request = Request(
        method=b"POST",
        target=b"/svc/Method",
        headers=(
            (b"Host", b"a.test"),
            (b"Connection", b"keep-alive, X-Private"),
            (b"X-Private", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"TE", b"trailers"),
            (b"Content-Type", b"application/grpc"),
        ),
    )
    assert h2_request_headers(request) == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"a.test"),
        (b":path", b"/svc/Method"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    # A body without a length is sent chunked towards HTTP/1.1.
    assert (b"transfer-encoding", b"chunked") in h1_request_headers(request, has_body=True)


def test_flood_guard_counts_per_window() -> None:
    guard = FloodGuard(window=10.0, limits={"ping": 3})
    assert [guard.count("ping", now) for now in (0.0, 1.0, 2.0, 3.0)] == [
        False,
        False,
        False,
        True,
    ]
    assert guard.count("ping", 10.5) is False  # a new window


async def test_same_authority_only() -> None:
    check = same_authority_only(HOST, 443)
    assert await check(b"www.example.test") is None
    assert await check(b"WWW.Example.TEST.:443") is None
    assert await check(b"www.example.test:8443") is not None
    assert await check(b"other.example.test") is not None
    assert await check(b"") is not None
    assert await check(b"[::1]:443") is not None


async def test_same_authority_only_remembers_approvals_by_their_exact_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tlsmitm._relay import h2_rules

    judged: list[bytes | str] = []
    real = h2_rules.try_normalize_host

    def counting(name: bytes | str) -> object:
        judged.append(name)
        return real(name)

    monkeypatch.setattr(h2_rules, "try_normalize_host", counting)
    check = same_authority_only(HOST, 443)
    assert await check(b"www.example.test") is None
    assert await check(b"www.example.test") is None  # remembered: not parsed again
    assert judged == [b"www.example.test"]
    # Another authority is judged on its own, however alike, and never remembered as approved.
    for other in (b"www.example.test:8443", b"www.example.tes", b"xwww.example.test"):
        assert await check(other) is not None
        assert await check(other) is not None
    assert len(judged) == 7
    # Bounded: past a few spellings, approvals are still right, just judged each time.
    spellings = [
        b"WWW.example.test",
        b"www.EXAMPLE.test",
        b"www.example.TEST",
        b"Www.example.test.",
    ]
    for spelling in spellings * 2:
        assert await check(spelling) is None
    assert await check(b"other.example.test") is not None


def test_received_frames_are_h2s_frames_without_the_payload_dump(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """h2 formats ``repr(frame)`` for every received frame; the relay's connections receive
    frames whose repr is constant (no hex dump of the payload), and handle them as before."""

    def no_dump(data: object) -> str:
        raise AssertionError("a received frame's payload was formatted")

    monkeypatch.setattr(hyperframe.frame, "_raw_data_repr", no_dump)
    client = _open_connection(H2Limits(), client_side=True)
    server = _open_connection(H2Limits(), client_side=False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.send_headers(
        1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", HOST)]
    )
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    server.send_data(1, b"x" * 60_000)
    server.send_data(1, b"y", end_stream=True)
    events = client.receive_data(server.data_to_send())
    received = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert b"".join(e.data for e in received) == b"x" * 60_000 + b"y"
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    assert all(isinstance(e, h2.events.DataReceived) for e in received)
    assert repr(_QUIET[hyperframe.frame.DataFrame](1)) == "<DataFrame>"


def test_an_h2_without_the_dispatch_table_keeps_its_own_frames() -> None:
    """The quiet frames reach into h2's private dispatch table: without it, h2 is left alone."""
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    buffer = conn.incoming_buffer
    del conn._frame_dispatch_table
    _quiet(conn, client_side=True)
    assert conn.incoming_buffer is buffer
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    del conn._frame_dispatch_table[hyperframe.frame.DataFrame]  # an entry missing: the same
    buffer = conn.incoming_buffer
    _quiet(conn, client_side=True)
    assert conn.incoming_buffer is buffer
    assert isinstance(
        _open_connection(H2Limits(), client_side=True).incoming_buffer, _QuietFrames
    )  # with it


def test_an_acknowledgement_wakes_the_writer_only_when_h2_queued_a_window_update() -> None:
    client = _open_connection(H2Limits(), client_side=True)
    server = _open_connection(H2Limits(), client_side=False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(
        1, [(":method", "PUT"), (":scheme", "https"), (":path", "/"), (":authority", HOST)]
    )
    for _ in range(6):
        client.send_data(1, b"x" * 65_536)
    server.receive_data(client.data_to_send())
    server.data_to_send()  # (its SETTINGS ACK)
    wire = _Wire(server, trio.testing.memory_stream_pair()[0], stall=1.0)
    wire.ack(1, 1_000)  # far below half the window: h2 sends nothing yet
    assert not wire.raw
    assert not wire._dirty.is_set()
    wire.ack(1, 300_000)  # past half the 512 KiB stream window: WINDOW_UPDATE
    assert wire._dirty.is_set()
    assert wire.raw[3] == 0x8  # a WINDOW_UPDATE frame, taken from h2 for the writer
    assert not server.data_to_send()


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="stream_window"):
        H2Limits(stream_window=10)
    with pytest.raises(ValueError, match="connection_window"):
        H2Limits(stream_window=1 << 20, connection_window=1 << 16)


# -- relaying ---------------------------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["h2", "h1"])
async def test_get_passes_the_hooks_and_returns_the_origin_answer(upstream: str) -> None:
    async with relay(upstream=upstream) as s:
        _, ex = await s.client.request(b"/")
        assert ex.status == 200
        body = b"hello" if upstream == "h2" else b"hello from origin"
        assert bytes(ex.body) == body
        assert [r.target for r in s.hooks.requests] == [b"/"]
        assert s.hooks.requests[0].header(b"host") == HOST.encode()
        assert s.hooks.responses[0].status == 200
        assert s.hooks.flows == [FLOW]
        assert s.authorities == [HOST.encode()]
        # Extended CONNECT (RFC 8441) is not offered: browsers use HTTP/1.1 WebSockets.
        await s.client.remote_settings_seen.wait()
        assert s.client.conn.remote_settings.enable_connect_protocol == 0
        assert s.client.conn.remote_settings.max_concurrent_streams == 100


@pytest.mark.parametrize("upstream", ["h2", "h1"])
async def test_one_mib_post_round_trips(upstream: str) -> None:
    payload = pattern(1 << 20)
    async with relay(upstream=upstream) as s:
        _, ex = await s.client.request(b"/echo", method=b"POST", body=payload)
        assert ex.status == 200
        assert bytes(ex.body) == payload
        if upstream == "h2":  # trailers travel end to end (gRPC's grpc-status)
            assert ex.trailers == [(b"grpc-status", b"0")]


@pytest.mark.parametrize("upstream", ["h2", "h1"])
async def test_a_hundred_concurrent_streams(upstream: str) -> None:
    async with relay(upstream=upstream) as s:
        results: list[Exchange] = []

        async def one(i: int) -> None:
            _, ex = await s.client.request(b"/big/%d" % (1000 + i) if upstream == "h2" else b"/")
            results.append(ex)

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        assert len(results) == 100
        assert all(ex.status == 200 and ex.reset is None for ex in results)
        if upstream == "h2":
            assert sorted(len(ex.body) for ex in results) == list(range(1000, 1100))
        else:  # several HTTP/1.1 connections to the origin, bounded
            assert isinstance(s.upstream, H1Upstream)
            assert 1 < s.upstream._open <= 6


async def test_exchanges_wait_for_a_stream_within_the_origins_concurrency_limit() -> None:
    limit = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2}
    async with relay(upstream="h2", origin_settings=limit) as s:
        _, first = await s.client.request(b"/")  # (the origin's SETTINGS have arrived)
        assert first.status == 200
        results: list[Exchange] = []

        async def one(i: int) -> None:
            _, ex = await s.client.request(b"/big/%d" % (300_000 + i))
            results.append(ex)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(one, i)
        assert sorted(len(ex.body) for ex in results) == [300_000 + i for i in range(12)]
        assert all(ex.status == 200 and ex.reset is None for ex in results)
        assert s.origin is not None
        assert s.origin.error is None  # the origin's h2 refuses a third open stream


@pytest.mark.parametrize("upstream", ["h2", "h1"])
async def test_sts_from_the_response_reaches_on_sts(upstream: str) -> None:
    async with relay(upstream=upstream) as s:
        _, ex = await s.client.request(b"/sts" if upstream == "h2" else b"/hsts")
        assert ex.status == 200
        assert ex.header(b"strict-transport-security") is not None  # forwarded unchanged
        assert len(s.sts) == 1
        assert s.sts[0][0].startswith(b"max-age=")


@pytest.mark.parametrize("upstream", ["h2", "h1"])
async def test_a_blocked_request_is_answered_with_the_error_origin_redirect(upstream: str) -> None:
    async with relay(upstream=upstream) as s:
        _, blocked = await s.client.request(b"/blocked")
        assert blocked.status == 303
        assert blocked.header(b"location") == b"https://error.invalid/block"
        assert blocked.header(b"connection") is None
        assert bytes(blocked.body) == b"Blocked"
        # The connection stays usable for other streams.
        _, ok = await s.client.request(b"/")
        assert ok.status == 200
        if upstream == "h1":
            assert (b"GET", b"/blocked") not in s.origin_stats.requests


async def test_a_response_hook_with_body_limit_blocks_malware_and_replaces_bodies() -> None:
    async with relay(upstream="h1", hooks=RecordingHooks(body_limit=1 << 16)) as s:
        _, infected = await s.client.request(b"/eicar")
        assert infected.status == 303
        assert b"virus" not in bytes(infected.body)
        assert s.hooks.responses[-1].body is not None
        _, big = await s.client.request(b"/size/100000")  # over body_limit: streamed
        assert len(big.body) == 100000
        assert s.hooks.responses[-1].truncated
        _, ok = await s.client.request(b"/")
        assert bytes(ok.body) == b"hello from origin"
        assert s.hooks.responses[-1].body == b"hello from origin"


async def test_a_replaced_body_gets_its_own_length() -> None:
    async with relay(upstream="h2", hooks=RecordingHooks(body_limit=1024)) as s:
        _, ex = await s.client.request(b"/replace")
        assert bytes(ex.body) == b"replaced by a hook"
        assert ex.header(b"content-length") == b"18"


async def test_another_authority_gets_421_and_never_reaches_the_origin() -> None:
    async with relay(upstream="h1") as s:
        _, ex = await s.client.request(b"/", authority=b"other.example.test")
        assert ex.status == 421
        assert s.hooks.requests == []
        assert s.origin_stats.requests == []
        _, ok = await s.client.request(b"/")
        assert ok.status == 200


async def test_cookies_split_by_the_client_are_joined_for_an_http1_origin() -> None:
    async with relay(upstream="h1") as s:
        headers = [(b"cookie", b"a=1"), (b"cookie", b"b=2")]
        _, ex = await s.client.request(b"/headers", headers=headers)
        assert b"cookie: a=1; b=2" in bytes(ex.body)
        assert b"host: www.example.test" in bytes(ex.body)


async def test_an_origin_reset_reaches_the_client() -> None:
    async with relay(upstream="h2") as s:
        _, ex = await s.client.request(b"/reset")
        assert ex.reset == ERR.CANCEL


async def test_an_origin_goaway_lets_streams_in_flight_finish_and_refuses_new_ones() -> None:
    async with relay(upstream="h2") as s:
        _, ex = await s.client.request(b"/goaway")
        assert (ex.status, ex.reset, bytes(ex.body)) == (200, None, pattern(200_000))
        # The relay sent GOAWAY at once (the client goes to a new connection); a request
        # still sent on this one is refused: never processed, safe to retry (RFC 9113 §8.7).
        assert s.client.terminated is not None
        assert s.client.terminated.error_code == ERR.NO_ERROR
        # (Or the relay, its last stream done, has closed already: nothing is processed either.)
        try:
            sid, refused = await s.client.request(b"/")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await s.client.closed.wait()
            return
        assert refused.status == 0
        assert refused.reset == ERR.REFUSED_STREAM or sid > s.client.terminated.last_stream_id


async def test_an_http1_origin_that_closes_sends_the_client_to_a_new_connection() -> None:
    # The origin closes after each response; the relay never re-dials inside the client's
    # connection (a new upstream connection is the flow's, with its own verification): it
    # sends GOAWAY, and a request that still arrives is refused, to be retried elsewhere.
    async with trio.open_nursery() as nursery:
        opened: list[trio.SocketStream] = []
        client_sock, front_sock = _pair(opened)
        up_sock, origin_sock = _pair(opened)

        async def closing_origin() -> None:
            conn = h11.Connection(h11.SERVER)
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await origin_sock.receive_some(65536))
            headers = [(b"content-length", b"2"), (b"connection", b"close")]
            await origin_sock.send_all(
                conn.send(h11.Response(status_code=200, headers=headers))
                + conn.send(h11.Data(data=b"ok"))
                + conn.send(h11.EndOfMessage())
            )
            await origin_sock.aclose()

        nursery.start_soon(closing_origin)
        front = H2Front(
            client=front_sock,
            upstream=H1Upstream(up_sock),
            flow=FLOW,
            hooks=RecordingHooks(),
            on_sts=None,
            answer_block=answer_block,
            misdirected=same_authority_only(HOST, 443),
        )

        async def run_front() -> None:
            await front.run()  # ends by itself once the stream in flight is done
            await front_sock.aclose()

        nursery.start_soon(run_front)
        client = H2Peer(client_sock)
        nursery.start_soon(client.run)
        _, first = await client.request(b"/")
        assert (first.status, bytes(first.body)) == (200, b"ok")
        with trio.fail_after(10):
            while client.terminated is None:
                await trio.sleep(0.01)
        assert client.terminated.error_code == ERR.NO_ERROR
        with trio.fail_after(10):
            await client.closed.wait()  # and the connection ends
        nursery.cancel_scope.cancel()
    await _close_all(opened)


async def test_a_client_reset_cancels_the_origin_stream() -> None:
    async with relay(upstream="h2", client_auto_ack=False) as s:
        sid, ex = await s.client.request(b"/big/%d" % (8 << 20), wait=False)
        while len(ex.body) < 16384:
            await trio.sleep(0.01)
        s.client.conn.reset_stream(sid, ERR.CANCEL)
        await s.client.flush()
        assert s.origin is not None
        origin_side = next(iter(s.origin.exchanges.values()))
        with trio.fail_after(10):
            await origin_side.done.wait()
        assert origin_side.reset == ERR.CANCEL
        s.client.auto_ack = True
        s.client.ack_all()  # the connection window the reset stream used
        _, ok = await s.client.request(b"/")
        assert ok.status == 200


async def test_a_client_reset_during_its_upload_ends_only_that_stream() -> None:
    async with relay(upstream="h2") as s:
        sid = s.client.conn.get_next_available_stream_id()
        s.client.exchanges[sid] = Exchange()
        head = [(b":method", b"POST"), *_head(b"/echo")[1:]]
        s.client.conn.send_headers(sid, head, end_stream=False)
        s.client.conn.send_data(sid, b"part of the body")  # the upload is under way ...
        await s.client.flush()
        assert s.origin is not None
        with trio.fail_after(10):
            while not any(bytes(ex.body) for ex in s.origin.exchanges.values()):
                await trio.sleep(0.01)
        s.client.conn.reset_stream(sid, ERR.CANCEL)  # ... when the client gives up on it
        await s.client.flush()
        origin_side = next(iter(s.origin.exchanges.values()))
        with trio.fail_after(10):
            while origin_side.reset is None:
                await trio.sleep(0.01)
        assert origin_side.reset == ERR.CANCEL  # the origin's stream is reset too
        _, ok = await s.client.request(b"/")
        assert ok.status == 200
        assert s.front_error == []
        assert not s.front_done.is_set()


@pytest.mark.parametrize("upstream", ["h2", "h1"])
async def test_a_client_that_stops_reading_stalls_the_origin_not_the_proxy_memory(
    upstream: str,
) -> None:
    size = 16 << 20
    limits = H2Limits()
    async with relay(upstream=upstream, limits=limits, client_auto_ack=False) as s:
        _, ex = await s.client.request(
            b"/big/%d" % size if upstream == "h2" else b"/chunked/%d" % size, wait=False
        )
        # The client's window (65,535 bytes) fills, then nothing more is acknowledged.
        while len(ex.body) < 65535:
            await trio.sleep(0.01)
        peak = 0
        for _ in range(50):
            await trio.sleep(0.01)
            buffered = s.front.buffered + (
                s.upstream.buffered if isinstance(s.upstream, H2Upstream) else 0
            )
            peak = max(peak, buffered)
            if s.origin is not None:
                # What the origin could send is bounded by what the client took plus the
                # proxy's windows, not by the body size.
                assert s.origin.sent <= len(ex.body) + limits.connection_window + 65535
        assert peak <= limits.connection_window
        assert len(ex.body) < size // 4
        # Reading again: the rest arrives, intact.
        s.client.auto_ack = True
        s.client.ack_all()
        await s.client.flush()
        with trio.fail_after(60):
            await ex.done.wait()
        expected = pattern(size) if upstream == "h2" else b"y" * size
        assert bytes(ex.body) == expected


async def test_a_zero_window_stall_resets_the_stream_after_the_deadline() -> None:
    limits = H2Limits(stall_timeout=0.5)
    async with relay(upstream="h2", limits=limits, client_auto_ack=False) as s:
        _, ex = await s.client.request(b"/big/%d" % (4 << 20))  # waits for the reset
        assert ex.reset == ERR.INTERNAL_ERROR
        assert len(ex.body) == 65535
        assert s.front.active_streams == 0


async def test_graceful_shutdown_finishes_streams_in_flight_and_refuses_new_ones() -> None:
    async with relay(upstream="h2", client_auto_ack=False) as s:
        sid, slow = await s.client.request(b"/big/%d" % (1 << 20), wait=False)
        while len(slow.body) < 1000:
            await trio.sleep(0.01)
        s.front.begin_shutdown()
        while s.client.terminated is None:
            await trio.sleep(0.01)
        assert s.client.terminated.error_code == ERR.NO_ERROR
        assert s.client.terminated.last_stream_id == sid
        s.client.auto_ack = True
        s.client.ack_all()
        await s.client.flush()
        with trio.fail_after(20):
            await slow.done.wait()
        assert len(slow.body) == 1 << 20
        with trio.fail_after(20):
            await s.front_done.wait()
        assert s.front_error == []


# -- scanners and body hooks: the same on every protocol ------------------------------------------


class EicarScanner(Scanner):
    name = "eicar-test"

    async def scan(self, context: ScanContext, body: AsyncIterator[bytes]) -> ScanVerdict:
        seen = bytearray()
        async for chunk in body:
            seen += chunk
        if EICAR in seen:
            return Infected(scanner=self.name, threat="Eicar-Test-Signature")
        return Clean(scanner=self.name)


@pytest.mark.parametrize("upstream", ["h2", "h1"])
async def test_the_scanners_answer_before_the_first_byte_over_h2(upstream: str) -> None:
    settings = ScanSettings(scanners=(EicarScanner(),))
    async with relay(upstream=upstream, scan=settings) as s:
        _, infected = await s.client.request(b"/eicar")
        assert infected.status == 303
        assert EICAR not in bytes(infected.body)
        assert infected.header(b"location") == b"https://error.invalid/block"
        path = b"/big/300000" if upstream == "h2" else b"/size/300000"
        _, clean = await s.client.request(path)
        assert clean.status == 200
        assert bytes(clean.body) == (pattern(300_000) if upstream == "h2" else b"x" * 300_000)
        assert [r.decision.action for r in s.reports] == ["block", "deliver"]


@pytest.mark.parametrize("upstream", ["h2", "h1"])
async def test_uploads_are_held_for_the_scanners_with_scan_requests(upstream: str) -> None:
    settings = ScanSettings(scanners=(EicarScanner(),), scan_requests=True)
    async with relay(upstream=upstream, scan=settings) as s:
        virus = b"upload: " + EICAR
        _, blocked = await s.client.request(b"/echo", method=b"POST", body=virus)
        assert blocked.status == 303
        assert blocked.header(b"location") == b"https://error.invalid/block"
        if upstream == "h1":
            assert (b"POST", b"/echo") not in s.origin_stats.requests  # never reached it
        else:
            assert s.origin is not None
            assert all(bytes(ex.body) != virus for ex in s.origin.exchanges.values())
        payload = pattern(300_000)
        _, clean = await s.client.request(b"/echo", method=b"POST", body=payload)
        assert (clean.status, bytes(clean.body)) == (200, payload)
        actions = [(r.direction, r.decision.action) for r in s.reports]
        assert actions[:2] == [("request", "block"), ("request", "deliver")]


class BodyRecorder(RecordingHooks):
    def __init__(self) -> None:
        super().__init__()
        self.request_body = bytearray()
        self.response_body = bytearray()
        self.ends: list[str] = []

    async def on_request_body(
        self, flow: FlowInfo, request: Request, chunk: bytes, *, end: bool
    ) -> Block | None:
        self.request_body += chunk
        if end:
            self.ends.append("request")
        return None

    async def on_response_body(
        self, flow: FlowInfo, request: Request, response: Response, chunk: bytes, *, end: bool
    ) -> Block | None:
        self.response_body += chunk
        if end:
            self.ends.append("response")
        return None


async def test_body_hooks_see_every_byte_over_h2() -> None:
    hooks = BodyRecorder()
    payload = pattern(200_000)
    async with relay(upstream="h2", hooks=hooks) as s:
        _, ex = await s.client.request(b"/echo", method=b"POST", body=payload)
        assert bytes(ex.body) == payload
    assert bytes(hooks.request_body) == payload
    assert bytes(hooks.response_body) == payload
    assert sorted(hooks.ends) == ["request", "response"]


class BodyBlocker(RecordingHooks):
    async def on_response_body(
        self, flow: FlowInfo, request: Request, response: Response, chunk: bytes, *, end: bool
    ) -> Block | None:
        return Block(title="no", explanation="body") if b"virus" in chunk else None


async def test_a_body_hook_block_closes_the_connection() -> None:
    async with relay(upstream="h2", hooks=BodyBlocker()) as s:
        _, ex = await s.client.request(b"/eicar")
        with trio.fail_after(10):
            await s.front_done.wait()
        assert [getattr(e, "reason", None) for e in s.front_error] == ["blocked_in_body"]
        assert EICAR not in bytes(ex.body)


# -- HTTP/1.1 client, HTTP/2 origin -------------------------------------------------------------


async def test_an_http1_client_through_an_h2_origin() -> None:
    hooks = RecordingHooks()
    sts: list[Sequence[bytes]] = []
    opened: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        client, front_sock = _pair(opened)
        up_sock, origin_sock = _pair(opened)
        origin = H2Peer(origin_sock, client=False, handler=origin_handler)
        nursery.start_soon(origin.run)
        front = H1Front(
            client=front_sock,
            upstream=H2Upstream(up_sock),
            flow=FLOW,
            hooks=hooks,
            on_sts=sts.append,
            answer_block=answer_block,
        )
        nursery.start_soon(front.run)
        conn = h11.Connection(h11.CLIENT)

        async def exchange(method: bytes, target: bytes, body: bytes = b"") -> tuple[int, bytes]:
            headers = [(b"host", HOST.encode()), (b"content-length", b"%d" % len(body))]
            await client.send_all(
                conn.send(h11.Request(method=method, target=target, headers=headers))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
            status, out = 0, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await client.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    out += event.data
                elif isinstance(event, h11.EndOfMessage):
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                    return status, bytes(out)
                else:
                    raise AssertionError(event)

        assert await exchange(b"GET", b"/") == (200, b"hello")
        payload = pattern(300_000)
        assert await exchange(b"POST", b"/echo", payload) == (200, payload)
        status, _ = await exchange(b"GET", b"/sts")
        assert status == 200
        assert len(sts) == 1
        assert [r.target for r in hooks.requests] == [b"/", b"/echo", b"/sts"]
        assert all(r.http_version == b"1.1" for r in hooks.requests)
        assert hooks.responses[0].http_version == b"2"
        status, body = await exchange(b"GET", b"/blocked")
        assert (status, body) == (303, b"Blocked")
        nursery.cancel_scope.cancel()
    await _close_all(opened)


# -- hostile clients ----------------------------------------------------------------------------


def _head(path: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", HOST.encode()),
        (b":path", path),
    ]


async def _normal_client_still_served(upstream: str = "h2") -> None:
    async with relay(upstream=upstream) as other:
        _, ex = await other.client.request(b"/echo", method=b"POST", body=b"still here")
        assert bytes(ex.body) == b"still here"


async def _expect_goaway(s: Setup, code: int, reason: str) -> None:
    with trio.fail_after(20):
        await s.front_done.wait()
        await s.client.closed.wait()
    assert s.client.terminated is not None
    assert s.client.terminated.error_code == code
    assert [getattr(e, "reason", None) for e in s.front_error] == [reason]
    assert s.front.active_streams == 0


async def test_rapid_reset_gets_goaway_enhance_your_calm() -> None:
    limits = H2Limits(max_resets=50)
    async with relay(upstream="h2", limits=limits) as s:
        await s.client.remote_settings_seen.wait()
        with contextlib.suppress(*GONE):
            for _ in range(200):
                sid = s.client.conn.get_next_available_stream_id()
                s.client.conn.send_headers(
                    sid,
                    _head(b"/big/1000000"),
                )
                s.client.conn.reset_stream(sid, ERR.CANCEL)
                await s.client.flush()
        await _expect_goaway(s, ERR.ENHANCE_YOUR_CALM, "h2_flood")
        assert s.front.buffered == 0
        await _normal_client_still_served()


@pytest.mark.parametrize("kind", ["ping", "settings"])
async def test_ping_and_settings_floods_get_goaway(kind: str) -> None:
    limits = H2Limits(max_pings=20, max_settings=20)
    async with relay(upstream="h2", limits=limits) as s:
        await s.client.remote_settings_seen.wait()
        with contextlib.suppress(*GONE):
            for i in range(100):
                if kind == "ping":
                    s.client.conn.ping(b"%08d" % i)
                else:
                    s.client.conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384})
                await s.client.flush()
        await _expect_goaway(s, ERR.ENHANCE_YOUR_CALM, "h2_flood")
        await _normal_client_still_served()


async def test_a_continuation_flood_is_cut_off() -> None:
    async with relay(upstream="h2") as s:
        await s.client.remote_settings_seen.wait()
        encoder = hpack.Encoder()
        block = encoder.encode(_head(b"/"))
        headers = HeadersFrame(1)
        headers.data = block
        await s.client.send_raw(headers.serialize())
        try:
            for _ in range(500):  # never END_HEADERS
                frame = ContinuationFrame(1)
                frame.data = b"\x40\x01a\x01b" * 100  # literal headers a: b
                await s.client.send_raw(frame.serialize())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.fail_after(20):
            await s.front_done.wait()
        assert [getattr(e, "reason", None) for e in s.front_error] == ["bad_http2"]
        await _normal_client_still_served()


async def test_an_hpack_bomb_is_refused_by_the_header_list_limit() -> None:
    async with relay(upstream="h2") as s:
        await s.client.remote_settings_seen.wait()
        # One 4 KiB header in the dynamic table, then referenced again and again: a few
        # hundred bytes on the wire, megabytes once decoded.
        encoder = hpack.Encoder()
        first = encoder.encode([(b"x-bomb", b"b" * 4000)])
        index = b"\xbe"  # indexed field 62: the entry just added
        block = encoder.encode(_head(b"/")) + first + index * 1000
        frame = HeadersFrame(1)
        frame.data = block
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await s.client.send_raw(frame.serialize())
        with trio.fail_after(20):
            await s.front_done.wait()
            await s.client.closed.wait()
        assert s.client.terminated is not None
        assert s.client.terminated.error_code != ERR.NO_ERROR
        assert s.hooks.requests == []
        await _normal_client_still_served()


async def test_streams_over_the_concurrency_limit_are_not_served() -> None:
    limits = H2Limits(max_concurrent_streams=4)
    async with relay(upstream="h2", limits=limits, client_auto_ack=False) as s:
        await s.client.remote_settings_seen.wait()
        # Ignore the advertised limit, as a hostile client would.
        encoder = hpack.Encoder()
        with contextlib.suppress(*GONE):
            for sid in range(1, 17, 2):
                frame = HeadersFrame(sid)
                frame.data = encoder.encode(_head(b"/hold"))
                frame.flags.add("END_HEADERS")
                frame.flags.add("END_STREAM")
                await s.client.send_raw(frame.serialize())
        with trio.fail_after(20):
            await s.front_done.wait()
        # RFC 9113 §5.1.2: a connection error (GOAWAY), not more work.
        assert [getattr(e, "reason", None) for e in s.front_error] == ["bad_http2"]
        assert "Max inbound streams is 4" in str(s.front_error[0])
        await _normal_client_still_served()


async def test_a_client_that_vanishes_mid_stream_ends_the_relay() -> None:
    async with relay(upstream="h1", client_auto_ack=False) as s:
        await s.client.request(b"/chunked/%d" % (8 << 20), wait=False)
        while s.front.active_streams == 0:
            await trio.sleep(0.01)
        await s.client.stream.aclose()
        with trio.fail_after(20):
            await s.front_done.wait()
        assert s.front.active_streams == 0


# -- deadlines: heads in total time, idle connections ------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def test_head_watch_times_the_preface_and_each_header_block_not_other_frames() -> None:
    watch = HeadWatch(since=0.0)
    settings = _frame(0x4, 0, 0, b"")
    for i, byte in enumerate(PREFACE + settings):  # byte by byte: still the one head
        assert watch.since == 0.0
        watch.feed(bytes([byte]), now=float(i))
    assert watch.since is None
    watch.feed(_frame(0x6, 0, 0, b"12345678"), now=50.0)  # PING: not a head
    assert watch.since is None
    headers = _frame(0x1, 0, 1, b"x" * 20)  # no END_HEADERS
    watch.feed(headers[:2], now=60.0)
    watch.feed(headers[2:], now=61.0)
    assert watch.since == 60.0  # from the frame's first byte
    watch.feed(_frame(0x9, 0, 1, b"y" * 5), now=70.0)
    assert watch.since == 60.0  # CONTINUATION without END_HEADERS: still open
    watch.feed(_frame(0x9, 0x4, 1, b"z"), now=80.0)
    assert watch.since is None
    watch.feed(_frame(0x0, 0x1, 1, b"body" * 100)[:50], now=90.0)  # a partial DATA frame
    assert watch.since is None
    watch.feed(_frame(0x0, 0x1, 1, b"body" * 100)[50:] + _frame(0x1, 0x5, 3, b"h"), now=95.0)
    assert watch.since is None  # a complete HEADERS frame in the same read


async def test_a_trickled_headers_frame_is_cut_off_after_the_head_timeout() -> None:
    async with relay(upstream="h2", head_timeout=1.0) as s:
        await s.client.remote_settings_seen.wait()
        frame = HeadersFrame(1)
        frame.data = hpack.Encoder().encode([*_head(b"/"), (b"x-pad", b"p" * 400)])
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        started = trio.current_time()
        with contextlib.suppress(*GONE):
            for byte in frame.serialize():  # one byte every 20 ms: each byte is progress
                await s.client.send_raw(bytes([byte]))
                if s.front_done.is_set():
                    break
                await trio.sleep(0.02)
        await _expect_goaway(s, ERR.ENHANCE_YOUR_CALM, "head_timeout")
        assert trio.current_time() - started >= 1.0
        assert s.hooks.requests == []
        await _normal_client_still_served()


async def test_headers_without_end_headers_then_silence_get_goaway() -> None:
    async with relay(upstream="h2", head_timeout=1.0) as s:
        _, ex = await s.client.request(b"/echo", method=b"POST", body=b"first")
        assert bytes(ex.body) == b"first"  # a complete request first: then a stalled block
        frame = HeadersFrame(3)
        frame.data = hpack.Encoder().encode(_head(b"/"))[:5]
        await s.client.send_raw(frame.serialize())  # no END_HEADERS, no CONTINUATION
        await _expect_goaway(s, ERR.ENHANCE_YOUR_CALM, "head_timeout")
        assert [r.target for r in s.hooks.requests] == [b"/echo"]


@pytest.mark.parametrize("sent", [PREFACE[:10], PREFACE], ids=["half-preface", "no-settings"])
async def test_a_client_that_never_completes_its_preface_is_cut_off(sent: bytes) -> None:
    async with relay(upstream="h2", head_timeout=1.0, start_client=False) as s:
        await s.client.stream.send_all(sent)
        with trio.fail_after(20):
            await s.front_done.wait()
        assert [getattr(e, "reason", None) for e in s.front_error] == ["head_timeout"]
        received = b""
        with trio.fail_after(20), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await s.client.stream.receive_some(65536):
                received += chunk
        reader = h2.connection.H2Connection()
        reader.initiate_connection()
        events = reader.receive_data(received)
        goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [e.error_code for e in goaways] == [ERR.ENHANCE_YOUR_CALM]


async def test_a_connection_without_streams_closes_after_the_idle_timeout_despite_pings() -> None:
    async with relay(upstream="h2", idle_timeout=1.0) as s:
        _, ex = await s.client.request(b"/echo", method=b"POST", body=b"one")
        assert bytes(ex.body) == b"one"
        with contextlib.suppress(*GONE), trio.move_on_after(20):
            for i in range(1000):  # PINGs are no request: they keep nothing open
                s.client.conn.ping(b"%08d" % i)
                await s.client.flush()
                if s.front_done.is_set():
                    break
                await trio.sleep(0.2)
        assert s.front_done.is_set()  # while the PINGs went on
        with trio.fail_after(20):
            await s.client.closed.wait()
        assert s.front_error == []
        assert s.client.terminated is not None
        assert s.client.terminated.error_code == ERR.NO_ERROR  # a graceful GOAWAY


async def test_an_open_stream_keeps_a_connection_past_the_idle_timeout_while_bytes_move() -> None:
    async with relay(upstream="h2", idle_timeout=1.0) as s:
        sid = s.client.conn.get_next_available_stream_id()
        ex = s.client.exchanges[sid] = Exchange()
        s.client.conn.send_headers(sid, [(b":method", b"POST"), *_head(b"/echo")[1:]])
        await s.client.flush()
        for _ in range(15):  # 3 s of a slow upload, longer than the idle timeout
            await s.client.send_body(sid, b"x", end=False)
            await trio.sleep(0.2)
        await s.client.send_body(sid, b"y", end=True)
        with trio.fail_after(20):
            await ex.done.wait()
        assert bytes(ex.body) == b"x" * 15 + b"y"
        assert not s.front_done.is_set()


async def test_an_http1_client_trickling_its_head_to_an_h2_origin_is_cut_off() -> None:
    opened: list[trio.SocketStream] = []
    hooks = RecordingHooks()
    async with trio.open_nursery() as nursery:
        client_sock, front_sock = _pair(opened)
        up_sock, origin_sock = _pair(opened)
        nursery.start_soon(H2Peer(origin_sock, client=False, handler=origin_handler).run)
        front = H1Front(
            client=front_sock,
            upstream=H2Upstream(up_sock),
            flow=FLOW,
            hooks=hooks,
            on_sts=None,
            answer_block=answer_block,
            head_timeout=1.0,
        )
        errors: list[BaseException] = []
        done = trio.Event()

        async def run_front() -> None:
            try:
                await front.run()
            except Exception as exc:  # (a group from the front's nursery, as run_h2 sees it)
                errors.append(leaf_exception(exc))
            finally:
                done.set()
                await trio.aclose_forcefully(front_sock)

        nursery.start_soon(run_front)
        head = b"GET / HTTP/1.1\r\nhost: %s\r\nx-pad: %s\r\n\r\n" % (HOST.encode(), b"p" * 400)
        started = trio.current_time()
        with contextlib.suppress(*GONE):
            for byte in head:  # one byte every 20 ms: each byte is progress, the head is not
                await client_sock.send_all(bytes([byte]))
                if done.is_set():
                    break
                await trio.sleep(0.02)
        with trio.fail_after(20):
            await done.wait()
        assert trio.current_time() - started >= 1.0
        assert [getattr(e, "reason", None) for e in errors] == ["head_timeout"]
        assert hooks.requests == []
        nursery.cancel_scope.cancel()
    await _close_all(opened)


@given(stream=h2_streams, cuts=st.lists(st.integers(0, 600), max_size=12))
@settings(max_examples=200, deadline=None)
def test_head_watch_does_not_depend_on_how_the_bytes_are_split(
    stream: bytes, cuts: list[int]
) -> None:
    whole = HeadWatch(since=0.0)
    whole.feed(stream, now=0.0)
    split = HeadWatch(since=0.0)
    edges = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for now, (start, end) in enumerate(itertools.pairwise(edges)):
        split.feed(stream[start:end], now=float(now))
    assert (split.since is None) == (whole.since is None)
    assert split.since is None or 0.0 <= split.since <= len(edges)


def _frames(data: bytes) -> list[Frame]:
    """The frames in ``data``, in order (headers only: bodies not parsed)."""
    frames = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frames.append(frame)
        view = view[9 + length :]
    return frames


def _stream_ids(data: bytes) -> list[int]:
    """The stream ids of the frames in ``data``, in order."""
    return [frame.stream_id for frame in _frames(data)]


class _Recorder(trio.abc.Stream):
    """A stream that records each write (one ``send_all`` is one TLS write in the relay)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        return


async def _quiet_wire() -> tuple[h2.connection.H2Connection, relay_h2._Wire, _Recorder]:
    """A client-side wire over a recorder, its preface already written and forgotten."""
    conn = relay_h2._open_connection(H2Limits(), client_side=True)
    recorder = _Recorder()
    wire = relay_h2._Wire(conn, recorder, stall=5.0)
    await wire.flush()  # the preface
    recorder.writes.clear()
    return conn, wire, recorder


async def test_small_frames_of_many_streams_leave_in_one_write_and_a_backlog_waits() -> None:
    conn, wire, recorder = await _quiet_wire()
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test")]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wire.writer)
        await trio.testing.wait_all_tasks_blocked()
        sent = []
        for index in range(10):
            stream_id = conn.get_next_available_stream_id()
            block = [*headers, (b":path", b"/%d" % index)]
            conn.send_headers(stream_id, block, end_stream=True)
            sent.append(stream_id)
            await wire.queued(relay_h2._size(block))
        assert recorder.writes == []  # left to the writer task
        await trio.testing.wait_all_tasks_blocked()
        assert len(recorder.writes) == 1  # ten streams' HEADERS, one write
        assert _stream_ids(recorder.writes[0]) == sent
        # A backlog over the limit is written before ``queued`` returns (backpressure).
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [*headers, (b":path", b"/big")], end_stream=False)
        conn.send_data(stream_id, b"x" * 16_000)
        await wire.queued(relay_h2._UNFLUSHED_LIMIT + 1)
        assert len(recorder.writes) == 2
        nursery.cancel_scope.cancel()


async def test_a_full_frame_of_body_is_written_before_send_data_returns_and_in_order() -> None:
    conn = relay_h2._open_connection(H2Limits(), client_side=True)
    recorder = _Recorder()
    wire = relay_h2._Wire(conn, recorder, stall=5.0)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    codes = h2.settings.SettingCodes
    peer.update_settings({codes.INITIAL_WINDOW_SIZE: 2**20, codes.MAX_FRAME_SIZE: 2**20})
    peer.increment_flow_control_window(2**20)
    conn.receive_data(peer.data_to_send())
    await wire.flush()  # the preface (and SETTINGS ACKs)
    recorder.writes.clear()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(
        stream_id,
        [(b":method", b"PUT"), (b":scheme", b"https"), (b":authority", b"a"), (b":path", b"/")],
    )
    wire.collect()  # the head, taken from h2 first (as an acknowledgement would)
    body = bytes(range(256)) * 256  # 64 KiB: the limit, written at once
    await wire.send_data(stream_id, body)
    assert len(recorder.writes) == 1  # (no writer task runs: written by send_data itself)
    frames = _frames(recorder.writes[0])
    assert type(frames[0]).__name__ == "HeadersFrame"  # what was taken before comes first
    assert [type(f).__name__ for f in frames[1:]] == ["DataFrame"]  # the whole chunk
    assert recorder.writes[0].endswith(body)


async def test_the_writer_wakes_only_when_h2_queued_something_and_keeps_the_order() -> None:
    conn, wire, recorder = await _quiet_wire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wire.writer)
        await trio.testing.wait_all_tasks_blocked()
        wire.kick_if_queued()  # nothing queued: no write
        await wire.flush()
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.writes == []
        first = conn.get_next_available_stream_id()
        head = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"a"),
            (b":path", b"/"),
        ]
        conn.send_headers(first, head, end_stream=True)
        assert wire.collect()  # taken from h2 ...
        wire.raw += GoAwayFrame(0).serialize()  # ... then a frame of our own
        conn.ping(b"12345678")  # ... then h2 again
        wire.kick_if_queued()
        await trio.testing.wait_all_tasks_blocked()
        assert len(recorder.writes) == 1
        frames = _frames(recorder.writes[0])
        assert [type(f).__name__ for f in frames] == ["HeadersFrame", "GoAwayFrame", "PingFrame"]
        assert frames[0].stream_id == first  # in the order queued
        nursery.cancel_scope.cancel()
