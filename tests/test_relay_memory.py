"""The relay core over memory streams: no sockets, virtual time (trio's MockClock).

client (trio.SSLStream, stdlib ssl) <-> Interceptor.handle <-> origin (trio.SSLStream server),
wired with ``trio.testing.memory_stream_pair`` through an injected connector.
"""

from __future__ import annotations

import datetime as dt
import gc
import ssl
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from origin import OriginStats, serve_tls, server_ssl_context
from pki import good_hierarchy

from tlsmitm._ca import CertificateAuthority
from tlsmitm._clienthello import ClientHello
from tlsmitm._hsts import HstsStore, PreloadList
from tlsmitm._policy import ConnectionRecord, DecisionLog
from tlsmitm._relay import Interceptor, InterceptorConfig
from tlsmitm._verify import TrustConfig, UpstreamVerifier

HOST = "www.example.test"


def _build(
    tmp: Path, nursery: trio.Nursery, *, idle: float = 300.0, pool_seconds: float = 4.0
) -> tuple[Interceptor, ssl.SSLContext, OriginStats, list[tuple[str, int]], list[ConnectionRecord]]:
    hierarchy = good_hierarchy(HOST)
    origin_context = server_ssl_context(hierarchy.leaf, tmp)
    stats = OriginStats()
    dialed: list[tuple[str, int]] = []

    async def connector(host: str, port: int) -> trio.abc.Stream:
        dialed.append((host, port))
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_tls, theirs, origin_context, stats)
        return ours

    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.ephemeral(now=now)
    records: list[ConnectionRecord] = []
    log = DecisionLog()
    log.subscribe(records.append)
    interceptor = Interceptor(
        ca=ca,
        verifier=UpstreamVerifier(
            TrustConfig(
                replace_bundle=(hierarchy.root.cert,), own_certificates=ca.own_certificates()
            )
        ),
        hsts=HstsStore(preload=PreloadList.empty()),
        decision_log=log,
        config=InterceptorConfig(idle_timeout=idle, upstream_pool_seconds=pool_seconds),
        connector=connector,
    )
    client_context = ssl.create_default_context(cadata=ca.export_root().decode())
    client_context.set_alpn_protocols(["http/1.1"])
    return interceptor, client_context, stats, dialed, records


async def _read_response(stream: trio.abc.Stream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


async def test_connect_flow_over_memory_streams(nursery: trio.Nursery, tmp_path: Path) -> None:
    interceptor, client_context, stats, dialed, records = _build(tmp_path, nursery)
    client_end, proxy_end = trio.testing.memory_stream_pair()
    nursery.start_soon(lambda: interceptor.handle(proxy_end, client=("192.0.2.7", 5555)))
    await client_end.send_all(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    answer = await client_end.receive_some(1024)
    assert answer.startswith(b"HTTP/1.1 200")
    tls = trio.SSLStream(client_end, client_context, server_hostname=HOST)
    await tls.do_handshake()
    assert tls.selected_alpn_protocol() == "http/1.1"
    for _ in range(3):
        await tls.send_all(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        response = await _read_response(tls)
        assert response.endswith(b"hello from origin")
    await tls.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert dialed == [(HOST, 443)]
    assert stats.requests == [(b"GET", b"/")] * 3
    assert records[-1].client == "192.0.2.7:5555"
    assert records[-1].decision == "intercept"
    assert interceptor.stats.active == 0


async def test_an_idle_intercepted_connection_keeps_no_client_hello(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Memory: while a kept-alive connection waits for its next request, nothing holds the
    parsed ClientHello or the CONNECT request (only needed to plan the connection)."""
    interceptor, client_context, _stats, _dialed, _records = _build(tmp_path, nursery)
    client_end, proxy_end = trio.testing.memory_stream_pair()
    nursery.start_soon(lambda: interceptor.handle(proxy_end, client=("192.0.2.7", 5556)))
    await client_end.send_all(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    assert (await client_end.receive_some(1024)).startswith(b"HTTP/1.1 200")
    tls = trio.SSLStream(client_end, client_context, server_hostname=HOST)
    await tls.do_handshake()
    await tls.send_all(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    assert (await _read_response(tls)).endswith(b"hello from origin")
    await trio.testing.wait_all_tasks_blocked()
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, ClientHello)]
    assert not [
        o for o in gc.get_objects() if isinstance(o, h11.Request) and o.method == b"CONNECT"
    ]
    await tls.aclose()


async def test_transparent_mode_uses_sni_and_the_original_destination(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    interceptor, client_context, _stats, dialed, records = _build(tmp_path, nursery)
    client_end, proxy_end = trio.testing.memory_stream_pair()
    nursery.start_soon(
        lambda: interceptor.handle(
            proxy_end, client=("192.0.2.8", 4444), destination=("198.51.100.1", 443)
        )
    )
    tls = trio.SSLStream(client_end, client_context, server_hostname=HOST)
    await tls.do_handshake()
    await tls.send_all(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    assert (await _read_response(tls)).endswith(b"hello from origin")
    await tls.aclose()
    await trio.testing.wait_all_tasks_blocked()
    # The original destination is dialled (never a fresh DNS lookup of the SNI name), and the
    # certificate is checked against the name the client will check ours against.
    assert dialed == [("198.51.100.1", 443)]
    assert records[-1].host == HOST
    assert records[-1].verdict == "ok"


@pytest.mark.parametrize("idle", [60.0])
async def test_idle_connections_are_closed_in_virtual_time(
    nursery: trio.Nursery, tmp_path: Path, idle: float, autojump_clock: trio.testing.MockClock
) -> None:
    interceptor, client_context, _, _, records = _build(tmp_path, nursery, idle=idle)
    client_end, proxy_end = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def run() -> None:
        await interceptor.handle(proxy_end, client=("192.0.2.9", 1))
        done.set()

    nursery.start_soon(run)
    await client_end.send_all(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    await client_end.receive_some(1024)
    tls = trio.SSLStream(client_end, client_context, server_hostname=HOST)
    await tls.do_handshake()
    await tls.send_all(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    await _read_response(tls)
    started = trio.current_time()
    with trio.fail_after(idle * 3):
        await done.wait()  # the client says nothing more: closed after idle_timeout
    assert idle - 1 <= trio.current_time() - started <= idle + 1
    assert interceptor.stats.active == 0
    assert records[-1].decision == "intercept"


async def test_transparent_mode_serves_the_error_origin_itself(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    interceptor, client_context, _, dialed, _ = _build(tmp_path, nursery)
    client_end, proxy_end = trio.testing.memory_stream_pair()
    nursery.start_soon(
        lambda: interceptor.handle(
            proxy_end, client=("192.0.2.8", 4444), destination=("203.0.113.9", 443)
        )
    )
    tls = trio.SSLStream(client_end, client_context, server_hostname="error.invalid")
    await tls.do_handshake()
    await tls.send_all(b"GET /nonexistent HTTP/1.1\r\nHost: error.invalid\r\n\r\n")
    response = await _read_response(tls)
    assert response.startswith(b"HTTP/1.1 404")
    assert dialed == []  # never dialled out for the error origin


class _CountingVerifier:
    def __init__(self, inner: UpstreamVerifier) -> None:
        self.inner = inner
        self.calls = 0

    def verify(self, *args: object, **kwargs: object) -> object:
        return self.inner.verify(*args, **kwargs)  # type: ignore[arg-type]

    async def verify_with_fetching(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        return await self.inner.verify_with_fetching(*args, **kwargs)  # type: ignore[arg-type]


async def _one_request(
    interceptor: Interceptor,
    client_context: ssl.SSLContext,
    *,
    client: tuple[str, int] = ("192.0.2.1", 1),
    extra_headers: str = "",
    path: str = "/",
) -> bytes:
    client_end, proxy_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: interceptor.handle(proxy_end, client=client))
        await client_end.send_all(
            f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode()
        )
        await client_end.receive_some(1024)
        tls = trio.SSLStream(client_end, client_context, server_hostname=HOST)
        await tls.do_handshake()
        await tls.send_all(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{extra_headers}\r\n".encode())
        response = await _read_response(tls)
        await tls.aclose()
    return response


@pytest.mark.parametrize(("cache_seconds", "expected_calls"), [(300.0, 1), (0.0, 3)])
async def test_successful_verdicts_are_reused_briefly(
    nursery: trio.Nursery, tmp_path: Path, cache_seconds: float, expected_calls: int
) -> None:
    # (Pooling off: a pooled upstream connection would skip verification altogether.)
    interceptor, client_context, _, _, records = _build(tmp_path, nursery, pool_seconds=0)
    interceptor.config = InterceptorConfig(
        verdict_cache_seconds=cache_seconds, upstream_pool_seconds=0
    )
    counting = _CountingVerifier(interceptor.verifier)
    interceptor.verifier = counting  # type: ignore[assignment]
    for _ in range(3):
        assert (await _one_request(interceptor, client_context)).endswith(b"hello from origin")
    assert counting.calls == expected_calls
    assert [r.verdict for r in records[-3:]] == ["ok", "ok", "ok"]


async def test_cached_verdicts_expire(nursery: trio.Nursery, tmp_path: Path) -> None:
    interceptor, client_context, _, _, _ = _build(tmp_path, nursery, pool_seconds=0)
    interceptor.config = InterceptorConfig(verdict_cache_seconds=60.0, upstream_pool_seconds=0)
    counting = _CountingVerifier(interceptor.verifier)
    interceptor.verifier = counting  # type: ignore[assignment]
    start = dt.datetime.now(dt.UTC)
    interceptor.clock = lambda: start
    await _one_request(interceptor, client_context)
    interceptor.clock = lambda: start + dt.timedelta(seconds=61)
    await _one_request(interceptor, client_context)
    assert counting.calls == 2


# -- the upstream connection pool -------------------------------------------------------------


async def test_a_clean_upstream_connection_serves_the_same_clients_next_connection(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    interceptor, client_context, stats, dialed, records = _build(tmp_path, nursery)
    interceptor.config = InterceptorConfig(verdict_cache_seconds=0)  # (every dial verifies)
    counting = _CountingVerifier(interceptor.verifier)
    interceptor.verifier = counting  # type: ignore[assignment]
    for _ in range(4):
        assert (await _one_request(interceptor, client_context)).endswith(b"hello from origin")
        await trio.testing.wait_all_tasks_blocked()
    # The first visit's connection is not kept (a host seen once is not worth it); the second
    # one is, and serves the third and fourth client connections.
    assert dialed == [(HOST, 443)] * 2
    assert stats.requests == [(b"GET", b"/")] * 4
    assert counting.calls == 2  # verified when opened, not when reused
    assert interceptor.stats.upstream_reused == 2
    assert [(r.decision, r.reason, r.verdict) for r in records[-4:]] == [
        ("intercept", "verified", "ok")
    ] * 4
    await interceptor.close_idle_upstreams()


async def test_pooled_connections_are_never_shared_between_clients(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    interceptor, client_context, _, dialed, _ = _build(tmp_path, nursery)
    await _one_request(interceptor, client_context, client=("192.0.2.1", 1))
    await _one_request(interceptor, client_context, client=("192.0.2.1", 2))  # kept
    await _one_request(interceptor, client_context, client=("192.0.2.2", 1))  # not for B
    await _one_request(interceptor, client_context, client=("192.0.2.1", 3))  # for A
    assert dialed == [(HOST, 443)] * 3
    assert interceptor.stats.upstream_reused == 1
    await interceptor.close_idle_upstreams()


@pytest.mark.parametrize(
    "header",
    [
        "Authorization: NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==\r\n",
        "Authorization: Negotiate YIIJ\r\n",
    ],
)
async def test_connections_bound_to_their_client_are_not_pooled(
    nursery: trio.Nursery, tmp_path: Path, header: str
) -> None:
    # NTLM and Negotiate authenticate the TCP connection, not the request: a pooled connection
    # would hand the first client's login to the next.
    interceptor, client_context, _, dialed, _ = _build(tmp_path, nursery)
    await _one_request(interceptor, client_context)  # (a first visit is never kept)
    await _one_request(interceptor, client_context, extra_headers=header)
    await _one_request(interceptor, client_context)
    assert dialed == [(HOST, 443)] * 3
    assert interceptor.stats.upstream_reused == 0
    await interceptor.close_idle_upstreams()


async def test_pooled_connections_expire(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    interceptor, client_context, _, dialed, _ = _build(tmp_path, nursery, pool_seconds=4.0)
    await _one_request(interceptor, client_context)  # a first visit: not kept
    await _one_request(interceptor, client_context)  # kept
    await trio.sleep(3.0)
    await _one_request(interceptor, client_context)  # within 4 s of being put back: reused
    await trio.sleep(4.5)
    await _one_request(interceptor, client_context)  # expired: a new connection
    assert dialed == [(HOST, 443)] * 3
    assert interceptor.stats.upstream_reused == 1
    await interceptor.close_idle_upstreams()


async def test_pooling_off_dials_every_time(nursery: trio.Nursery, tmp_path: Path) -> None:
    interceptor, client_context, _, dialed, _ = _build(tmp_path, nursery, pool_seconds=0)
    for _ in range(2):
        await _one_request(interceptor, client_context)
    assert dialed == [(HOST, 443)] * 2
    assert interceptor.stats.upstream_reused == 0


async def test_a_clients_connection_close_ends_its_own_hop_only(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # RFC 9110 §7.6.1: Connection is hop-by-hop. The client's hop closes after the response;
    # the upstream hop is kept for the client's next connection -- from the second visit on.
    # A first visit's upstream is not kept, so it is relayed as without a pool (close sent).
    interceptor, client_context, stats, dialed, _ = _build(tmp_path, nursery)
    await _one_request(interceptor, client_context, extra_headers="Connection: close\r\n")
    second = await _one_request(
        interceptor, client_context, extra_headers="Connection: keep-alive, close\r\n"
    )
    assert b"\r\nconnection: close\r\n" in second.lower()
    await _one_request(interceptor, client_context, extra_headers="Connection: close\r\n")
    assert dialed == [(HOST, 443)] * 2
    assert interceptor.stats.upstream_reused == 1
    forwarded = [dict(headers).get(b"connection") for headers in stats.headers]
    assert forwarded == [b"close", b"keep-alive", None]
    await interceptor.close_idle_upstreams()


async def test_without_pooling_connection_close_is_forwarded(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    interceptor, client_context, stats, _, _ = _build(tmp_path, nursery, pool_seconds=0)
    await _one_request(interceptor, client_context, extra_headers="Connection: close\r\n")
    assert [dict(headers).get(b"connection") for headers in stats.headers] == [b"close"]


async def test_an_http10_client_is_answered(nursery: trio.Nursery, tmp_path: Path) -> None:
    # h11 only writes HTTP/1.1: the request goes upstream as HTTP/1.1 and the HTTP/1.0 client
    # gets its answer, then the close its version implies.
    interceptor, client_context, stats, _, records = _build(tmp_path, nursery)
    client_end, proxy_end = trio.testing.memory_stream_pair()
    nursery.start_soon(lambda: interceptor.handle(proxy_end, client=("192.0.2.1", 1)))
    await client_end.send_all(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    await client_end.receive_some(1024)
    # (Over memory streams the proxy's close sends no close_notify: only sockets close at once.)
    tls = trio.SSLStream(client_end, client_context, server_hostname=HOST, https_compatible=True)
    await tls.do_handshake()
    await tls.send_all(f"GET / HTTP/1.0\r\nHost: {HOST}\r\n\r\n".encode())
    response = b""
    with trio.fail_after(10):
        while chunk := await tls.receive_some(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200")
    assert response.endswith(b"hello from origin")
    assert stats.requests == [(b"GET", b"/")]
    await trio.testing.wait_all_tasks_blocked()
    assert records[-1].decision == "intercept"
    assert interceptor.stats.errors == {}
    await interceptor.close_idle_upstreams()


async def test_a_servers_keep_alive_timeout_shortens_the_wait(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The origin closes idle connections after 2 s: kept 1 s (one less), not the pool's 4 s.
    interceptor, client_context, _, dialed, _ = _build(tmp_path, nursery, pool_seconds=4.0)
    await _one_request(interceptor, client_context, path="/keep-alive/2")  # a first visit
    await _one_request(interceptor, client_context, path="/keep-alive/2")  # kept for 1 s
    await trio.sleep(0.5)
    await _one_request(interceptor, client_context, path="/keep-alive/2")  # reused, kept 1 s
    await trio.sleep(1.5)
    await _one_request(interceptor, client_context, path="/keep-alive/2")  # expired: dialled
    assert dialed == [(HOST, 443)] * 3
    assert interceptor.stats.upstream_reused == 1
    await interceptor.close_idle_upstreams()


class _CountingWrites(trio.abc.Stream):
    """The proxy's end of the client connection, counting the writes the proxy makes."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_small_response_reaches_the_client_in_one_write(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    interceptor, client_context, _, _, _ = _build(tmp_path, nursery)
    client_end, proxy_end = trio.testing.memory_stream_pair()
    counting = _CountingWrites(proxy_end)
    nursery.start_soon(lambda: interceptor.handle(counting, client=("192.0.2.1", 1)))
    await client_end.send_all(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
    await client_end.receive_some(1024)
    tls = trio.SSLStream(client_end, client_context, server_hostname=HOST, https_compatible=True)
    await tls.do_handshake()
    request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    await tls.send_all(request)  # (the first answer also carries TLS 1.3's session tickets)
    assert (await _read_response(tls)).endswith(b"hello from origin")
    await trio.testing.wait_all_tasks_blocked()
    before = counting.writes
    await tls.send_all(request)
    assert (await _read_response(tls)).endswith(b"hello from origin")
    await trio.testing.wait_all_tasks_blocked()
    assert counting.writes - before == 1  # head, body and end in one TLS write
    await tls.aclose()
