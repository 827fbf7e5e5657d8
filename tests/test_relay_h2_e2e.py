"""HTTP/2 through the whole interceptor: real TLS, real sockets on 127.0.0.1, real clients
(httpx with ``http2=True``, ``curl --http2``, an ``h2`` client) and real HTTP/2 origins
(``tests/h2peers.py`` over TLS with ALPN ``h2``), and HTTP/1.1 origins with ALPN or without.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h2.errors
import hpack
import httpx
import pytest
import trio
from h2peers import H2Peer, pattern, serve_h2_tls
from hyperframe.frame import HeadersFrame
from origin import server_ssl_context
from pki import Hierarchy, good_hierarchy
from serve_process import curl
from test_relay import (
    HOST,
    EicarBlocker,
    Origin,
    Setup,
    _expired_leaf,
    connect_line,
    https_via_proxy,
    settle,
    start_origin,
    start_proxy,
)

from tlsmitm._relay import InterceptorConfig
from tlsmitm._responder import ErrorResponder

pytestmark = pytest.mark.e2e


@pytest.fixture
def hierarchy() -> Hierarchy:
    return good_hierarchy(HOST)


async def start_h2_origin(
    nursery: trio.Nursery, tmp: Path, hierarchy: Hierarchy, alpn: tuple[str, ...] = ("h2",)
) -> int:
    context = server_ssl_context(hierarchy.leaf, tmp, alpn=alpn)

    async def handler(stream: trio.SocketStream) -> None:
        await serve_h2_tls(stream, context)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return int(listeners[0].socket.getsockname()[1])


def _httpx(setup: Setup) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(setup.root_pem))
    return httpx.Client(
        http2=True, proxy=f"http://127.0.0.1:{setup.proxy_port}", verify=context, timeout=30
    )


async def test_httpx_over_h2_to_an_h2_origin_passes_every_hook(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    port = await start_h2_origin(nursery, tmp_path, hierarchy)
    hooks = EicarBlocker()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)
    payload = pattern(1 << 20)

    def client() -> list[httpx.Response]:
        with _httpx(setup) as http:
            base = f"https://{HOST}:{port}"
            return [
                http.get(f"{base}/"),
                http.post(f"{base}/echo", content=payload),
                http.get(f"{base}/eicar"),
                http.get(f"{base}/sts"),
            ]

    hello, echo, eicar, sts = await trio.to_thread.run_sync(client)
    assert (hello.http_version, hello.status_code, hello.content) == ("HTTP/2", 200, b"hello")
    assert echo.content == payload  # a 1 MiB POST round-trips over h2
    assert eicar.status_code == 303  # blocked: the redirect to the error origin
    assert b"EICAR" not in eicar.content
    assert eicar.headers["location"].startswith("https://error.invalid/")
    assert sts.headers["strict-transport-security"] == "max-age=600"
    assert [target for _, target in hooks.seen] == [b"/", b"/echo", b"/eicar", b"/sts"]
    flow = hooks.seen[0][0]
    assert (flow.host, flow.port, flow.verified) == (HOST, port, True)
    with trio.fail_after(10):  # (written by the state writer, after the response)
        while not setup.interceptor.hsts.is_known_host(HOST, now=setup.interceptor.clock()):
            await trio.sleep(0.01)
    await settle(setup)
    assert [r.relay for r in setup.records] == ["h2"]


@pytest.mark.parametrize("origin_alpn", [("http/1.1",), ()], ids=["alpn-http11", "alpn-none"])
async def test_curl_http2_to_an_http1_origin_is_translated(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, origin_alpn: tuple[str, ...]
) -> None:
    origin: Origin = await start_origin(nursery, tmp_path, hierarchy, alpn=origin_alpn)
    hooks = EicarBlocker()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)
    url = f"https://{HOST}:{origin.port}"
    common = ["--http2", "--proxy", f"http://127.0.0.1:{setup.proxy_port}"]
    common += ["--cacert", str(setup.root_pem)]
    result = await curl(*common, "-w", "\n%{http_version}", f"{url}/", f"{url}/eicar")
    out = result.stdout
    assert out.startswith(b"hello from origin\n2")
    assert b"EICAR" not in out  # the second answer is the block redirect's body
    assert [target for _, target in hooks.seen] == [b"/", b"/eicar"]
    assert origin.stats.requests[0] == (b"GET", b"/")
    # The origin got HTTP/1.1 with a Host header made from :authority.
    assert (b"host", f"{HOST}:{origin.port}".encode()) in origin.stats.headers[0]
    await settle(setup)
    assert [r.relay for r in setup.records] == ["h2"]


async def test_an_http1_client_gets_http1_from_an_h2_origin(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    port = await start_h2_origin(nursery, tmp_path, hierarchy, alpn=("h2", "http/1.1"))
    hooks = EicarBlocker()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)
    url = f"https://{HOST}:{port}"
    common = ["--http1.1", "--proxy", f"http://127.0.0.1:{setup.proxy_port}"]
    common += ["--cacert", str(setup.root_pem)]
    result = await curl(*common, "-w", "\n%{http_version}", f"{url}/", f"{url}/big/300000")
    body, _, version = result.stdout.rpartition(b"\n")
    assert version == b"1.1"
    assert body.startswith(b"hello\n1.1")
    assert body.endswith(pattern(300_000))
    assert [target for _, target in hooks.seen] == [b"/", b"/big/300000"]
    await settle(setup)
    assert [r.relay for r in setup.records] == ["h2"]


async def _h2_client(setup: Setup, port: int, *, auto_ack: bool = True) -> tuple[H2Peer, Any]:
    raw = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    await raw.send_all(connect_line(HOST, port))
    assert (await raw.receive_some(4096)).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(setup.root_pem))
    context.set_alpn_protocols(["h2"])
    tls = trio.SSLStream(raw, context, server_hostname=HOST)
    await tls.do_handshake()
    assert tls.selected_alpn_protocol() == "h2"
    return H2Peer(tls, auto_ack=auto_ack), tls


async def test_concurrent_h2_streams_to_an_http1_origin_use_several_verified_connections(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    client, tls = await _h2_client(setup, origin.port)
    nursery.start_soon(client.run)
    authority = f"{HOST}:{origin.port}".encode()
    results: list[Any] = []

    async def one() -> None:
        results.append((await client.request(b"/slow", authority=authority))[1])

    with trio.fail_after(60):
        async with trio.open_nursery() as inner:
            for _ in range(6):
                inner.start_soon(one)
    assert [(r.status, bytes(r.body)) for r in results] == [(200, b"slow")] * 6
    # The streams did not wait for each other on one HTTP/1.1 connection: the relay opened
    # more, each through the verifier (the flow's record has one verified upstream).
    assert 1 < origin.stats.connections <= 6
    await trio.aclose_forcefully(tls)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_50_mib_download_to_a_client_that_pauses_arrives_intact_without_buffering(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    size = 50 << 20
    port = await start_h2_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    raw = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    await raw.send_all(connect_line(HOST, port))
    assert (await raw.receive_some(4096)).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(setup.root_pem))
    context.set_alpn_protocols(["h2"])
    tls = trio.SSLStream(raw, context, server_hostname=HOST)
    await tls.do_handshake()
    assert tls.selected_alpn_protocol() == "h2"
    client = H2Peer(tls, auto_ack=False)
    nursery.start_soon(client.run)
    before = _rss()
    authority = f"{HOST}:{port}".encode()
    _, ex = await client.request(b"/big/%d" % size, authority=authority, wait=False)
    with trio.fail_after(30):
        while len(ex.body) < 65535:  # the client's whole window, then it stops reading
            await trio.sleep(0.01)
    # While the client pauses, the origin is held back by the proxy's windows: neither the
    # proxy nor the test's origin piles the body up.
    with trio.fail_after(30):
        while setup.interceptor.stats.active < 1:
            await trio.sleep(0.01)
    for _ in range(20):
        await trio.sleep(0.02)
        assert len(ex.body) == 65535
    paused = _rss()
    client.auto_ack = True
    client.ack_all()
    await client.flush()
    digest = hashlib.sha256()
    with trio.fail_after(120):
        await ex.done.wait()
    digest.update(bytes(ex.body))
    assert len(ex.body) == size
    assert digest.digest() == hashlib.sha256(pattern(size)).digest()
    assert paused - before < 16 << 20  # far less than the 50 MiB body
    await trio.aclose_forcefully(tls)


# -- gRPC -----------------------------------------------------------------------------------------


def _grpc_server(tmp: Path, hierarchy: Hierarchy) -> tuple[Any, int]:
    """A real gRPC server (grpcio, TLS with ALPN h2): ``/test.Echo/Unary`` answers the request
    reversed, ``/test.Echo/Stream`` answers each message of a stream upper-cased."""
    import grpc

    def unary(request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata((("x-served", "unary"),))
        return request[::-1]

    def stream(requests: Any, context: Any) -> Any:
        for message in requests:
            yield message.upper()

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=(handler,))
    cert, key = hierarchy.leaf.write(tmp, "grpc-leaf")
    credentials = grpc.ssl_server_credentials(((key.read_bytes(), cert.read_bytes()),))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


async def test_grpc_unary_and_streaming_calls_through_the_proxy(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    import grpc

    server, port = _grpc_server(tmp_path, hierarchy)
    hooks = EicarBlocker()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)

    def client() -> tuple[bytes, Any, list[bytes]]:
        credentials = grpc.ssl_channel_credentials(root_certificates=setup.root_pem.read_bytes())
        options = (("grpc.http_proxy", f"http://127.0.0.1:{setup.proxy_port}"),)
        with grpc.secure_channel(f"{HOST}:{port}", credentials, options=options) as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            answer, call = unary.with_call(b"hello grpc", timeout=30)
            stream = channel.stream_stream("/test.Echo/Stream")
            messages = [b"one", b"two", b"three" * 10000]
            echoed = list(stream(iter(messages), timeout=30))
            return answer, call.trailing_metadata(), echoed

    try:
        answer, trailers, echoed = await trio.to_thread.run_sync(client)
    finally:
        server.stop(grace=None)
    assert answer == b"cprg olleh"
    assert ("x-served", "unary") in tuple(trailers)  # HTTP/2 trailers, end to end
    assert echoed == [b"ONE", b"TWO", b"THREE" * 10000]
    assert [target for _, target in hooks.seen] == [b"/test.Echo/Unary", b"/test.Echo/Stream"]
    await settle(setup)
    assert [r.relay for r in setup.records] == ["h2"]


@pytest.mark.parametrize("learned_over", ["h2-origin", "no-alpn-origin"])
async def test_sts_learned_over_h2_or_without_alpn_stops_a_later_override(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, learned_over: str
) -> None:
    bad = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy))
    setup = await start_proxy(
        nursery, tmp_path, hierarchy, responder=ErrorResponder(profile="page")
    )
    if learned_over == "h2-origin":
        port = await start_h2_origin(nursery, tmp_path, hierarchy)

        def learn() -> None:
            with _httpx(setup) as http:
                response = http.get(f"https://{HOST}:{port}/sts")
                assert (response.http_version, response.status_code) == ("HTTP/2", 200)

    else:
        no_alpn = await start_origin(nursery, tmp_path, hierarchy, alpn=())

        def learn() -> None:
            assert https_via_proxy(setup, no_alpn.port, [("GET", "/hsts", None)])[0][0] == 200

    await trio.to_thread.run_sync(learn)
    now = dt.datetime.now(dt.UTC)
    with trio.fail_after(10):  # (written by the state writer, after the response)
        while not setup.interceptor.hsts.is_known_host(HOST, now=now):
            await trio.sleep(0.01)
    results = await trio.to_thread.run_sync(
        functools.partial(https_via_proxy, setup, bad.port, [("GET", "/", None)])
    )
    status, headers, _ = results[0]
    assert status == 303
    path = headers["location"][len("https://error.invalid") :]
    page = await trio.to_thread.run_sync(
        functools.partial(https_via_proxy, setup, 443, [("GET", path, None)], host="error.invalid")
    )
    assert b"/override" not in page[0][2]  # a known HSTS host: a block page, no override
    assert bad.stats.requests == []


async def test_a_stalled_h2_header_block_through_serve_gets_goaway_after_head_timeout(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    port = await start_h2_origin(nursery, tmp_path, hierarchy)
    config = InterceptorConfig(resolve={HOST: "127.0.0.1"}, head_timeout=1.0)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)
    client, tls = await _h2_client(setup, port)
    nursery.start_soon(client.run)
    authority = f"{HOST}:{port}".encode()
    _, first = await client.request(b"/", authority=authority)
    assert first.status == 200  # a normal request first, on the same connection
    frame = HeadersFrame(client.conn.get_next_available_stream_id())
    frame.data = hpack.Encoder().encode([(b":method", b"GET"), (b":path", b"/")])[:3]
    await client.send_raw(frame.serialize())  # no END_HEADERS, and nothing more
    with trio.fail_after(8):  # the configured 1 s, not the 10 s default, with a wide margin
        await client.closed.wait()
    assert client.terminated is not None
    assert client.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    await trio.aclose_forcefully(tls)
    await settle(setup)
    assert [r.reason for r in setup.records] == ["head_timeout"]
