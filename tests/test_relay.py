"""The intercepting proxy end to end: real TLS, real sockets on 127.0.0.1, real clients.

Origins are real HTTPS servers (stdlib ssl + h11) with certificates from a test PKI that the
interceptor's verifier trusts; clients are Python's ``http.client``/``ssl`` and curl, trusting
only tlsmitm's root.
"""

from __future__ import annotations

import datetime as dt
import functools
import http.client
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from conftest import require_tool
from origin import EICAR, OriginStats, serve_http, serve_tls, server_ssl_context
from pki import DAY, NOW, Hierarchy, good_hierarchy, make_leaf

from tlsmitm._ca import CertificateAuthority
from tlsmitm._errors import CertError
from tlsmitm._hsts import HstsStore, PreloadList
from tlsmitm._policy import ConnectionRecord, DecisionLog, InterceptPolicy, RuleSet
from tlsmitm._relay import Interceptor, InterceptorConfig
from tlsmitm._relay.hooks import Block, FlowInfo, Hooks, Request, Response
from tlsmitm._responder import ErrorResponder
from tlsmitm._verify import TrustConfig, UpstreamVerifier

pytestmark = pytest.mark.e2e

HOST = "www.example.test"


@dataclass
class Origin:
    port: int
    stats: OriginStats
    hierarchy: Hierarchy


@dataclass
class Setup:
    tmp: Path
    ca: CertificateAuthority
    interceptor: Interceptor
    proxy_port: int
    root_pem: Path
    origin_root: Hierarchy
    records: list[ConnectionRecord] = field(default_factory=list)
    origins: dict[str, Origin] = field(default_factory=dict)

    def client_context(self) -> ssl.SSLContext:
        # Like every current HTTP client (browsers, curl, urllib3): ALPN http/1.1 offered.
        context = ssl.create_default_context(cafile=str(self.root_pem))
        context.set_alpn_protocols(["http/1.1"])
        return context


async def start_origin(
    nursery: trio.Nursery,
    tmp: Path,
    leaf_hierarchy: Hierarchy,
    leaf: Any = None,
    *,
    alpn: tuple[str, ...] = ("http/1.1",),
    configure: Callable[[ssl.SSLContext], None] | None = None,
) -> Origin:
    context = server_ssl_context(leaf or leaf_hierarchy.leaf, tmp, alpn=alpn)
    if configure is not None:
        configure(context)
    stats = OriginStats()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_tls(stream, context, stats)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    return Origin(port=port, stats=stats, hierarchy=leaf_hierarchy)


async def start_proxy(
    nursery: trio.Nursery,
    tmp: Path,
    origin_hierarchy: Hierarchy,
    *,
    responder: ErrorResponder | None = None,
    policy: InterceptPolicy | None = None,
    hooks: Hooks | None = None,
    hsts: HstsStore | None = None,
    config: InterceptorConfig | None = None,
) -> Setup:
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.ephemeral(now=now)
    verifier = UpstreamVerifier(
        TrustConfig(
            replace_bundle=(origin_hierarchy.root.cert,), own_certificates=ca.own_certificates()
        )
    )
    records: list[ConnectionRecord] = []
    log = DecisionLog()
    log.subscribe(records.append)
    interceptor = Interceptor(
        ca=ca,
        verifier=verifier,
        hsts=hsts or HstsStore(preload=PreloadList.empty()),
        responder=responder,
        policy=policy,
        hooks=hooks,
        decision_log=log,
        config=config or InterceptorConfig(resolve={HOST: "127.0.0.1"}),
    )
    addresses = await nursery.start(interceptor.serve, "127.0.0.1", 0)
    root_pem = tmp / "tlsmitm-root.pem"
    root_pem.write_bytes(ca.export_root())
    return Setup(
        tmp=tmp,
        ca=ca,
        interceptor=interceptor,
        proxy_port=addresses[0][1],
        root_pem=root_pem,
        origin_root=origin_hierarchy,
        records=records,
    )


def https_via_proxy(
    setup: Setup,
    port: int,
    requests: list[tuple[str, str, bytes | None]],
    *,
    host: str = HOST,
    context: ssl.SSLContext | None = None,
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``requests`` over ONE tunnelled keep-alive connection with http.client."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", setup.proxy_port, context=context or setup.client_context(), timeout=20
    )
    conn.set_tunnel(host, port)
    out = []
    try:
        for method, path, body in requests:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            out.append((response.status, dict(response.getheaders()), response.read()))
    finally:
        conn.close()
    return out


async def settle(setup: Setup, *, active: int = 0) -> None:
    """Wait (bounded) until the proxy has exactly ``active`` connections open.

    A connection's decision-log record is emitted in the same step that closes it, so once
    the count dropped, the record is there: no fixed sleeps, no races on a loaded machine.
    """
    with trio.fail_after(10):
        while setup.interceptor.stats.active != active:
            await trio.sleep(0.01)


def connect_line(host: str, port: int) -> bytes:
    """A well-formed CONNECT request head (RFC 9110 §9.3.6, with Host as RFC 9112 requires)."""
    return f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


@pytest.fixture
def hierarchy() -> Hierarchy:
    return good_hierarchy(HOST)


async def test_intercepts_a_verified_site_with_a_forged_leaf(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)

    def client() -> tuple[list[tuple[int, dict[str, str], bytes]], dict[str, Any]]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", setup.proxy_port, context=setup.client_context(), timeout=20
        )
        conn.set_tunnel(HOST, origin.port)
        results = []
        for path in ("/", "/size/100000", "/chunked/300000"):
            conn.request("GET", path)
            r = conn.getresponse()
            results.append((r.status, dict(r.getheaders()), r.read()))
        assert conn.sock is not None
        peer = conn.sock.getpeercert()
        conn.close()
        return results, peer

    results, peer = await trio.to_thread.run_sync(client)
    assert [(status, len(body)) for status, _, body in results] == [
        (200, len(b"hello from origin")),
        (200, 100000),
        (200, 300000),
    ]
    assert results[0][2] == b"hello from origin"
    # The client saw tlsmitm's leaf (it trusts only tlsmitm's root), for the requested name.
    assert ("DNS", HOST) in peer["subjectAltName"]
    assert origin.stats.connections == 1  # keep-alive: three requests, one upstream connection
    assert setup.interceptor.stats.intercepted == 1
    await settle(setup)
    assert setup.records[-1].decision == "intercept"
    assert setup.records[-1].verdict == "ok"
    assert setup.records[-1].host == HOST
    assert setup.records[-1].bytes_down > 400000


async def test_large_bodies_both_ways(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    blob = os.urandom(6 * 1024 * 1024)
    results = await trio.to_thread.run_sync(
        lambda: https_via_proxy(
            setup, origin.port, [("POST", "/echo", blob), ("GET", "/size/8000000", None)]
        )
    )
    assert results[0][0] == 200
    assert results[0][2] == blob
    assert len(results[1][2]) == 8_000_000


async def test_records_hsts_from_verified_responses_only(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    now = dt.datetime.now(dt.UTC)
    assert not setup.interceptor.hsts.is_known_host(HOST, now=now)
    results = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, origin.port, [("GET", "/hsts", None)])
    )
    # MIR-04: the header reaches the client unchanged...
    assert results[0][1]["strict-transport-security"] == "max-age=1000; includeSubDomains"
    # ...and tlsmitm's own store noted it (POL-01), including subdomains: written by the state
    # writer's thread, after the response went to the client.
    with trio.fail_after(10):
        while not setup.interceptor.hsts.is_known_host(HOST, now=now):
            await trio.sleep(0.01)
    assert setup.interceptor.hsts.is_known_host("a." + HOST, now=now)


def _expired_leaf(hierarchy: Hierarchy) -> Any:
    return make_leaf(hierarchy.intermediate, HOST, not_before=NOW - 30 * DAY, not_after=NOW - DAY)


async def test_native_profile_makes_the_browser_show_its_own_warning(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy))
    setup = await start_proxy(nursery, tmp_path, hierarchy)

    def client() -> None:
        https_via_proxy(setup, origin.port, [("GET", "/", None)])

    with pytest.raises(ssl.SSLCertVerificationError):
        await trio.to_thread.run_sync(client)
    assert origin.stats.requests == []  # nothing was ever asked of the bad upstream
    await settle(setup)
    assert setup.records[-1].verdict == CertError.EXPIRED.value

    # A client that accepts anything (the user "proceeded" in the browser) sees a leaf from
    # the error CA -- never one that chains to the trusted root.
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    insecure.set_alpn_protocols(["http/1.1"])

    def proceed() -> tuple[bytes, bytes]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", setup.proxy_port, context=insecure, timeout=20
        )
        conn.set_tunnel(HOST, origin.port)
        conn.request("GET", "/")
        body = conn.getresponse().read()
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)
        conn.close()
        assert der is not None
        return body, der

    body, der = await trio.to_thread.run_sync(proceed)
    from cryptography import x509

    leaf = x509.load_der_x509_certificate(der)
    assert leaf.issuer == setup.ca.error_ca_certificate.subject
    assert leaf.issuer != setup.ca.intermediate_certificate.subject
    assert body == b"hello from origin"  # the user's decision, as without tlsmitm
    # Nothing from an unverified connection is recorded as HSTS.
    assert not setup.interceptor.hsts.is_known_host(HOST, now=dt.datetime.now(dt.UTC))


async def test_page_profile_redirects_to_the_error_origin(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy))
    setup = await start_proxy(
        nursery, tmp_path, hierarchy, responder=ErrorResponder(profile="page")
    )
    results = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, origin.port, [("GET", "/secret?token=1", None)])
    )
    status, headers, body = results[0]
    assert status == 303
    location = headers["location"]
    assert location.startswith("https://error.invalid/")
    assert "token" not in location
    assert HOST not in location
    assert headers.get("cache-control") == "no-store"
    assert b"hello" not in body
    assert origin.stats.requests == []

    # The error origin is served by the proxy itself, with a leaf from the trusted CA.
    path = location[len("https://error.invalid") :]
    page = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, 443, [("GET", path, None)], host="error.invalid")
    )
    page_status, page_headers, page_body = page[0]
    assert page_status == 502  # the error page itself says "bad gateway", as browsers' do
    assert page_headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page_headers["content-security-policy"]
    assert HOST.encode() in page_body


async def test_known_hsts_host_never_gets_an_override(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    good = await start_origin(nursery, tmp_path, hierarchy)
    bad = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy))
    for profile in ("native", "page"):
        setup = await start_proxy(
            nursery, tmp_path, hierarchy, responder=ErrorResponder(profile=profile)
        )
        await trio.to_thread.run_sync(
            functools.partial(https_via_proxy, setup, good.port, [("GET", "/hsts", None)])
        )
        # (The state writer records STS in a thread, after the response went out.)
        now = dt.datetime.now(dt.UTC)
        with trio.fail_after(10):
            while not setup.interceptor.hsts.is_known_host(HOST, now=now):
                await trio.sleep(0.01)
        results = await trio.to_thread.run_sync(
            functools.partial(https_via_proxy, setup, bad.port, [("GET", "/", None)])
        )
        status, headers, _ = results[0]
        # Not the browser's own (overridable) warning: a trusted connection that only
        # redirects to a block page without an override control.
        assert status == 303
        path = headers["location"][len("https://error.invalid") :]
        page = await trio.to_thread.run_sync(
            functools.partial(
                https_via_proxy, setup, 443, [("GET", path, None)], host="error.invalid"
            )
        )
        assert b"/override" not in page[0][2], profile
        assert bad.stats.requests == []


async def test_bypass_rule_splices_the_real_certificate(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(
        nursery, tmp_path, hierarchy, policy=InterceptPolicy(RuleSet.from_strings([HOST]))
    )
    origin_trust = ssl.create_default_context(cadata=hierarchy.root.pem.decode())
    results = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, origin.port, [("GET", "/", None)], context=origin_trust)
    )
    assert results[0][2] == b"hello from origin"
    await settle(setup)
    assert setup.records[-1].decision == "bypass"
    assert setup.interceptor.stats.bypassed == 1


class EicarBlocker(Hooks):
    body_limit = 1 << 20

    def __init__(self) -> None:
        self.seen: list[tuple[FlowInfo, bytes]] = []

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        self.seen.append((flow, request.target))
        return None

    async def on_response(
        self, flow: FlowInfo, request: Request, response: Response
    ) -> Response | Block | None:
        if response.body is not None and EICAR in response.body:
            return Block(title="Virus blocked", explanation="EICAR test file")
        return None


async def test_hooks_see_requests_and_block_through_the_error_origin(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    hooks = EicarBlocker()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)
    ok = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, origin.port, [("GET", "/", None)])
    )
    assert ok[0][2] == b"hello from origin"
    blocked = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, origin.port, [("GET", "/eicar", None)])
    )
    status, headers, body = blocked[0]
    assert status == 303
    assert headers["location"].startswith("https://error.invalid/")
    assert EICAR not in body
    assert [t for _, t in hooks.seen] == [b"/", b"/eicar"]
    assert all(flow.verified and flow.host == HOST for flow, _ in hooks.seen)


async def test_an_upgrade_to_another_protocol_is_spliced_and_logged(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    # WebSocket upgrades go to the message relay (tests/test_websocket_e2e.py); a protocol
    # tlsmitm cannot parse is relayed byte for byte after its 101, and the log says why.
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)

    def client() -> bytes:
        raw = socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10)
        raw.sendall(connect_line(HOST, origin.port))
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        tls = setup.client_context().wrap_socket(raw, server_hostname=HOST)
        tls.sendall(
            b"GET /ws HTTP/1.1\r\nHost: www.example.test\r\nUpgrade: x-raw-echo\r\n"
            b"Connection: Upgrade\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += tls.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        tls.sendall(b"any bytes at all")
        echoed = b""
        while len(echoed) < len(b"any bytes at all"):
            echoed += tls.recv(4096)
        tls.close()
        return echoed

    assert await trio.to_thread.run_sync(client) == b"any bytes at all"
    await settle(setup)
    # Nothing decrypted is spliced silently: the record names the relay and the reason.
    assert [(r.relay, r.splice) for r in setup.records] == [("splice", "upgrade_without_relay")]


async def test_curl_through_the_proxy(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    curl = require_tool("curl")
    origin = await start_origin(nursery, tmp_path, hierarchy)
    bad = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy))
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    proxy = f"http://127.0.0.1:{setup.proxy_port}"
    ok = await trio.run_process(
        [
            curl,
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            proxy,
            "--cacert",
            str(setup.root_pem),
            f"https://{HOST}:{origin.port}/",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == b"hello from origin"
    refused = await trio.run_process(
        [
            curl,
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            proxy,
            "--cacert",
            str(setup.root_pem),
            f"https://{HOST}:{bad.port}/",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert refused.returncode == 60  # CURLE_PEER_FAILED_VERIFICATION: curl's own error
    assert refused.stdout == b""


async def test_bad_proxy_requests_get_400_and_unreachable_hosts_502(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()

    def exchange(payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10) as s:
            s.sendall(payload)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data
                data += chunk

    for payload in (
        b"\x16\x03\x01garbage-instead-of-connect\r\n\r\n",
        b"CONNECT nocolon HTTP/1.1\r\nHost: nocolon\r\n\r\n",
        b"CONNECT bad..name:443 HTTP/1.1\r\nHost: bad..name:443\r\n\r\n",
        b"CONNECT host:99999 HTTP/1.1\r\nHost: host:99999\r\n\r\n",
        b"CONNECT www.example.test:443 HTTP/1.1\r\n\r\n",  # no Host: RFC 9112 §3.2
        b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        answer = await trio.to_thread.run_sync(exchange, payload)
        assert answer.startswith(b"HTTP/1.1 400"), (payload, answer)
    answer = await trio.to_thread.run_sync(
        exchange,
        f"CONNECT 127.0.0.1:{dead_port} HTTP/1.1\r\nHost: 127.0.0.1:{dead_port}\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 502")
    await settle(setup)
    assert setup.interceptor.stats.active == 0


async def test_non_tls_bytes_after_connect_are_spliced_raw(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    received: list[bytes] = []

    async def echo(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(1024)
        received.append(data)
        await stream.send_all(b"echo:" + data)
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, echo, 0)
    port = listeners[0].socket.getsockname()[1]
    setup = await start_proxy(nursery, tmp_path, hierarchy)

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10) as s:
            s.sendall(
                f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
            )
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.sendall(b"SSH-2.0-not-tls\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data
                data += chunk

    assert await trio.to_thread.run_sync(client) == b"echo:SSH-2.0-not-tls\r\n"
    assert received == [b"SSH-2.0-not-tls\r\n"]


async def test_truncated_hello_vanishing_client_and_stalled_server_are_bounded(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    async def stall(stream: trio.SocketStream) -> None:
        await trio.sleep(30)

    listeners = await nursery.start(trio.serve_tcp, stall, 0)
    stall_port = listeners[0].socket.getsockname()[1]
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(
        nursery,
        tmp_path,
        hierarchy,
        config=InterceptorConfig(
            resolve={HOST: "127.0.0.1"}, handshake_timeout=0.5, head_timeout=0.5
        ),
    )

    def truncated_hello() -> bytes:
        with socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10) as s:
            s.sendall(connect_line(HOST, origin.port))
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a hello cut short
            s.shutdown(socket.SHUT_WR)
            return s.recv(4096)

    def stalled_server() -> bytes:
        with socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10) as s:
            s.sendall(connect_line(HOST, stall_port))
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            context = setup.client_context()
            try:
                context.wrap_socket(s, server_hostname=HOST)
            except (ssl.SSLError, OSError):
                return b"closed"
            return b"handshake completed?!"

    def silent_client() -> bytes:
        with socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10) as s:
            return s.recv(4096)  # never sends a request: closed after head_timeout

    with trio.fail_after(10):
        assert await trio.to_thread.run_sync(truncated_hello) == b""
        assert await trio.to_thread.run_sync(stalled_server) == b"closed"
        assert await trio.to_thread.run_sync(silent_client) == b""
    await settle(setup)
    assert setup.interceptor.stats.active == 0
    reasons = {r.reason for r in setup.records}
    assert "truncated_hello" in reasons
    assert "handshake_timeout" in reasons


async def test_a_thousand_connections_leave_no_descriptor_or_task_behind(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    # Warm up (first connection builds contexts), then count descriptors.
    await trio.to_thread.run_sync(lambda: https_via_proxy(setup, origin.port, [("GET", "/", None)]))
    await settle(setup)
    fds_before = len(os.listdir("/proc/self/fd"))
    tasks_before = trio.lowlevel.current_statistics().tasks_living

    async def one(i: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
        async with stream:
            if i % 2:
                await stream.send_all(connect_line(HOST, origin.port))
                await stream.receive_some(1024)

    async with trio.open_nursery() as inner:
        limiter = trio.CapacityLimiter(50)

        async def bounded(i: int) -> None:
            async with limiter:
                await one(i)

        for i in range(1000):
            inner.start_soon(bounded, i)
    with trio.fail_after(10):
        while setup.interceptor.stats.active:
            await trio.sleep(0.05)
    # The origin's tasks (in this same trio run) see their connections end a moment after the
    # proxy's: wait (bounded) for them; a leaked task or descriptor never goes away. (<=: the
    # origin's task for the warm-up connection may end after the counts were taken.)
    with trio.fail_after(10):
        while trio.lowlevel.current_statistics().tasks_living > tasks_before:
            await trio.sleep(0.01)
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    assert setup.interceptor.stats.connections >= 1001


async def test_plain_http_is_proxied(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    stats = OriginStats()

    async def plain(stream: trio.SocketStream) -> None:
        try:
            await serve_http(stream, stats)
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(trio.serve_tcp, plain, 0)
    port = listeners[0].socket.getsockname()[1]
    setup = await start_proxy(nursery, tmp_path, hierarchy)

    def client() -> tuple[bytes, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", setup.proxy_port, timeout=10)
        conn.request("GET", f"http://{HOST}:{port}/hsts")
        first = conn.getresponse().read()
        conn.request("GET", f"http://{HOST}:{port}/")
        second = conn.getresponse().read()
        conn.close()
        return first, second

    assert await trio.to_thread.run_sync(client) == (b"hsts", b"hello from origin")
    assert stats.requests == [(b"GET", b"/hsts"), (b"GET", b"/")]  # origin-form upstream
    # POL-07: an STS header over plain HTTP is ignored.
    assert not setup.interceptor.hsts.is_known_host(HOST, now=dt.datetime.now(dt.UTC))


async def test_graceful_shutdown_finishes_in_flight_responses(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    result: list[Any] = []

    async def slow_request() -> None:
        result.extend(
            await trio.to_thread.run_sync(
                lambda: https_via_proxy(setup, origin.port, [("GET", "/slow", None)])
            )
        )

    async with trio.open_nursery() as inner:
        inner.start_soon(slow_request)
        with trio.fail_after(10):
            while origin.stats.requests == []:
                await trio.sleep(0.01)
        setup.interceptor.shutdown()
    assert result[0][2] == b"slow"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=2).close()


async def test_alpn_is_negotiated_with_each_side_on_its_own(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    only_http1 = await start_origin(nursery, tmp_path, hierarchy, alpn=("http/1.1",))
    setup = await start_proxy(nursery, tmp_path, hierarchy)

    def negotiated(port: int, offer: list[str]) -> str | None:
        raw = socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10)
        raw.sendall(connect_line(HOST, port))
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        context = setup.client_context()
        context.set_alpn_protocols(offer)
        tls = context.wrap_socket(raw, server_hostname=HOST)
        selected = tls.selected_alpn_protocol()
        tls.close()
        return selected

    # Each side is negotiated on its own (the HTTP/2 relay translates): a client offering h2
    # gets h2 from an HTTP/1.1-only upstream, one offering only http/1.1 gets http/1.1.
    assert await trio.to_thread.run_sync(negotiated, only_http1.port, ["h2", "http/1.1"]) == "h2"
    assert await trio.to_thread.run_sync(negotiated, only_http1.port, ["http/1.1"]) == ("http/1.1")


@pytest.mark.parametrize("tls_max", ["TLSv1_2", "TLSv1_3"])
async def test_client_certificate_sites_are_spliced_from_the_first_connection_on(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, tls_max: str
) -> None:
    from pki import make_root

    client_root = make_root("Bank Client CA")
    client_leaf = make_leaf(client_root, "user@bank", eku=None)
    client_cert, client_key = client_leaf.write(tmp_path, "client")
    (tmp_path / "client-ca.pem").write_bytes(client_root.pem)

    def require_client_cert(context: ssl.SSLContext) -> None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(tmp_path / "client-ca.pem"))
        context.maximum_version = getattr(ssl.TLSVersion, tls_max)

    origin = await start_origin(nursery, tmp_path, hierarchy, configure=require_client_cert)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    # The user's browser trusts the bank's real root (a public CA) and tlsmitm's root.
    context = setup.client_context()
    context.load_verify_locations(cadata=hierarchy.root.pem.decode())
    context.load_cert_chain(client_cert, client_key)
    for _ in range(2):
        results = await trio.to_thread.run_sync(
            functools.partial(
                https_via_proxy, setup, origin.port, [("GET", "/", None)], context=context
            )
        )
        assert results[0][2] == b"hello from origin"
    await settle(setup)
    first, second = setup.records[-2:]
    assert (first.decision, first.reason) == ("bypass", "client_certificate_requested")
    assert (second.decision, second.reason) == ("bypass", "learned_client_cert")


async def test_upstream_sessions_are_resumed_for_repeat_hosts(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    # Pooling off: each client connection gets a new upstream connection, which resumes.
    config = InterceptorConfig(resolve={HOST: "127.0.0.1"}, upstream_pool_seconds=0)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)
    for _ in range(3):
        results = await trio.to_thread.run_sync(
            functools.partial(https_via_proxy, setup, origin.port, [("GET", "/", None)])
        )
        assert results[0][2] == b"hello from origin"
        await settle(setup)
    assert origin.stats.connections == 3
    assert origin.stats.resumed >= 1  # the repeat connections skipped the full handshake
    # ...and each was still verified (the chain comes from the session) and intercepted.
    assert [r.verdict for r in setup.records[-3:]] == ["ok", "ok", "ok"]


async def test_an_origin_that_stalls_mid_body_is_dropped_after_the_idle_timeout(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(
        nursery,
        tmp_path,
        hierarchy,
        config=InterceptorConfig(resolve={HOST: "127.0.0.1"}, idle_timeout=0.5),
    )

    def client() -> bytes:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", setup.proxy_port, context=setup.client_context(), timeout=20
        )
        conn.set_tunnel(HOST, origin.port)
        conn.request("GET", "/stall")
        response = conn.getresponse()
        try:
            return response.read()
        except http.client.IncompleteRead as exc:
            return bytes(exc.partial)
        finally:
            conn.close()

    with trio.fail_after(10):
        partial = await trio.to_thread.run_sync(client)
    assert partial == b"z" * 10  # what arrived was relayed; then the connection was closed
    await settle(setup)
    assert setup.records[-1].reason == "timeout"
    assert setup.interceptor.stats.active == 0


async def test_a_session_from_a_trusted_leaf_never_resumes_into_an_upstream_error(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    """The seed exploit at the TLS layer: first a valid connection, then a bad certificate.

    The client offers the session it got with a trusted leaf; tlsmitm must not let it resume
    into a connection whose upstream failed (that would skip the browser's own warning).
    Trusted and error leaves are served from different contexts with different ticket keys.
    """
    good = await start_origin(nursery, tmp_path, hierarchy)
    bad = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy))
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    context = setup.client_context()

    def connect(port: int, session: ssl.SSLSession | None) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10)
        raw.sendall(connect_line(HOST, port))
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        return context.wrap_socket(raw, server_hostname=HOST, session=session)

    def first() -> ssl.SSLSession:
        tls = connect(good.port, None)
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        tls.recv(65536)  # (TLS 1.3 tickets arrive after the handshake)
        session = tls.session
        tls.close()
        assert session is not None
        return session

    session = await trio.to_thread.run_sync(first)
    with pytest.raises(ssl.SSLCertVerificationError):
        await trio.to_thread.run_sync(connect, bad.port, session)
    assert bad.stats.requests == []


class Rewriter(Hooks):
    body_limit = 1 << 16

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        return Request(
            method=request.method,
            target=request.target,
            headers=(*request.headers, (b"x-filtered-by", b"tlsmitm-test")),
            http_version=request.http_version,
        )

    async def on_response(
        self, flow: FlowInfo, request: Request, response: Response
    ) -> Response | Block | None:
        if request.target == b"/":
            return Response(
                status=200, reason=b"OK", headers=response.headers, body=b"rewritten by the product"
            )
        return None


async def test_hooks_can_modify_requests_and_responses(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=Rewriter())
    results = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, origin.port, [("GET", "/headers", None)])
    )
    assert b"x-filtered-by: tlsmitm-test" in results[0][2]
    results = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, origin.port, [("GET", "/", None)])
    )
    status, headers, body = results[0]
    assert status == 200
    assert body == b"rewritten by the product"
    assert headers["content-length"] == str(len(body))


async def test_the_eicar_example_blocks_through_the_error_origin(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "eicar_filter", Path(__file__).parent.parent / "examples" / "eicar_filter.py"
    )
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    scanner = example.EicarScanner()
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=scanner)
    clean = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, origin.port, [("GET", "/", None)])
    )
    assert clean[0][2] == b"hello from origin"
    blocked = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, origin.port, [("GET", "/eicar", None)])
    )
    status, headers, body = blocked[0]
    assert status == 303
    assert EICAR not in body
    page_path = headers["location"][len("https://error.invalid") :]
    page = await trio.to_thread.run_sync(
        lambda: https_via_proxy(setup, 443, [("GET", page_path, None)], host="error.invalid")
    )
    assert page[0][0] == 403
    assert b"A virus was blocked" in page[0][2]
    assert EICAR not in page[0][2]
    assert scanner.blocked == 1


async def test_expect_100_continue_through_curl(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    curl = require_tool("curl")
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(3 * 1024 * 1024))
    result = await trio.run_process(
        [
            curl,
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            f"http://127.0.0.1:{setup.proxy_port}",
            "--cacert",
            str(setup.root_pem),
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            f"@{payload}",
            f"https://{HOST}:{origin.port}/echo",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload.read_bytes()


async def test_the_connection_cap_answers_503_at_once_instead_of_growing(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    """Issue 15 fault 5: a full cap is a prompt 503, not minutes in the listen queue."""
    setup = await start_proxy(
        nursery,
        tmp_path,
        hierarchy,
        config=InterceptorConfig(resolve={HOST: "127.0.0.1"}, max_connections=1, head_timeout=30),
    )
    holder = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)  # says nothing
    await settle(setup, active=1)
    assert setup.interceptor.stats.active == 1
    refused = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    await refused.send_all(b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        answer = await refused.receive_some(1024)
    assert answer.startswith(b"HTTP/1.1 503")
    assert setup.interceptor.stats.active == 1  # the cap held
    assert setup.interceptor.stats.refused_busy == 1
    await refused.aclose()
    await holder.aclose()
    await settle(setup, active=0)
    served = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    await served.send_all(b"GET /relative HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        answer = await served.receive_some(1024)
    assert answer.startswith(b"HTTP/1.1 400")  # served (a relative target is a bad request)
    await served.aclose()


def test_original_destination_refuses_a_socket_that_was_not_redirected() -> None:
    from tlsmitm import original_destination

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        with pytest.raises(OSError):
            original_destination(accepted)
    finally:
        for s in (client, accepted, server):
            s.close()


def test_transparent_mode_behind_an_iptables_redirect() -> None:
    """A real transparent deployment in a network namespace the test makes itself."""
    import json
    import subprocess
    import sys

    unshare = require_tool("unshare")
    require_tool("iptables")
    script = Path(__file__).parent / "transparent_netns.py"
    result = subprocess.run(
        [unshare, "--net", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["body"] == "hello from origin"
    assert seen["destinations"] == [["127.0.0.3", 443]]  # read with SO_ORIGINAL_DST
    assert "tlsmitm" in json.dumps(seen["issuer"]).lower()  # intercepted: tlsmitm's leaf
    assert seen["origin_requests"] == 1


async def test_a_client_reconnecting_gets_the_kept_upstream_connection(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    paths = ["/", "/size/1000", "/chunked/5000", "/size/10"]
    for path in paths:
        results = await trio.to_thread.run_sync(
            functools.partial(https_via_proxy, setup, origin.port, [("GET", path, None)])
        )
        assert results[0][0] == 200
        await settle(setup)
    # The first visit's upstream connection is closed; the second is kept and serves the rest.
    assert origin.stats.connections == 2
    assert [r for _, r in origin.stats.requests] == [p.encode() for p in paths]
    assert setup.interceptor.stats.upstream_reused == 2
    assert [(r.decision, r.verdict) for r in setup.records[-4:]] == [("intercept", "ok")] * 4


async def test_a_first_visit_is_relayed_as_without_a_pool(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    """A client's Connection: close reaches the origin on a first visit (nothing will be kept);
    from the second visit on it applies to the client's hop only and the upstream is kept."""
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)

    def visit() -> None:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", setup.proxy_port, context=setup.client_context(), timeout=20
        )
        conn.set_tunnel(HOST, origin.port)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            assert conn.getresponse().read()
        finally:
            conn.close()

    for _ in range(3):
        await trio.to_thread.run_sync(visit)
        await settle(setup)
    closes = [
        any(k.lower() == b"connection" and v.lower() == b"close" for k, v in headers)
        for headers in origin.stats.headers
    ]
    assert closes == [True, False, False]
    assert origin.stats.connections == 2  # the second visit's upstream served the third
    assert setup.interceptor.stats.upstream_reused == 1


async def test_an_upstream_that_closed_while_idle_is_not_reused(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    # An origin that answers one request with keep-alive and then closes the connection while
    # it is idle in the pool (as a server whose keep-alive timeout is short does).
    context = server_ssl_context(hierarchy.leaf, tmp_path)
    connections = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        try:
            conn = h11.Connection(h11.SERVER)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await tls.receive_some(65536))
                elif isinstance(event, h11.EndOfMessage):
                    break
            for answer in (
                h11.Response(status_code=200, headers=[(b"content-length", b"2")]),
                h11.Data(data=b"ok"),
                h11.EndOfMessage(),
            ):
                await tls.send_all(conn.send(answer) or b"")
        finally:
            await trio.aclose_forcefully(tls)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    for _ in range(3):  # the second connection's upstream is kept, and closed by the origin
        results = await trio.to_thread.run_sync(
            functools.partial(https_via_proxy, setup, port, [("GET", "/", None)])
        )
        assert results[0][2] == b"ok"
        await settle(setup)
    assert connections == 3
    assert setup.interceptor.stats.upstream_reused == 0
    assert setup.interceptor.stats.upstream_stale == 1
    assert [r.verdict for r in setup.records[-3:]] == ["ok", "ok", "ok"]


@pytest.mark.parametrize(("bind", "target"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
async def test_the_default_connector_dials_addresses_directly(
    nursery: trio.Nursery, bind: str, target: str
) -> None:
    from tlsmitm._relay.streams import tcp_connector as _tcp_connector

    if bind == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    accepted: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        accepted.append(await stream.receive_some(10))

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host=bind), handler, 0)
    port = listeners[0].socket.getsockname()[1]
    for host in (target, "localhost" if bind == "127.0.0.1" else target):
        stream = await _tcp_connector(host, port)
        await stream.send_all(b"hi")
        await stream.aclose()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    with closed, pytest.raises(OSError):  # nothing listens: refused, and the socket is closed
        await _tcp_connector("127.0.0.1", closed.getsockname()[1])
    await settle_until(lambda: len(accepted) == 2)
    assert accepted == [b"hi", b"hi"]


async def settle_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.01)


async def test_an_http10_origin_is_relayed(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    context = server_ssl_context(hierarchy.leaf, tmp_path)

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await tls.receive_some(65536)
            await tls.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold server")
        finally:
            await trio.aclose_forcefully(tls)  # HTTP/1.0 without a length: the close ends it

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    results = await trio.to_thread.run_sync(
        functools.partial(https_via_proxy, setup, port, [("GET", "/", None)])
    )
    assert results[0][0] == 200
    assert results[0][2] == b"old server"
    await settle(setup)
    assert setup.records[-1].decision == "intercept"
    assert setup.interceptor.stats.errors == {}
