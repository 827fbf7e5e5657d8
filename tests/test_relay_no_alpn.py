"""HTTP/1.1 without ALPN (issue 14 part 3), end to end over real sockets on 127.0.0.1.

An origin that selects no ALPN speaks HTTP/1.1 (RFC 7301 §3.2, RFC 9113 §3.2): it goes through
the HTTP/1.1 relay whatever its port -- hooks run, STS is recorded. Decrypted data that is not
HTTP (a banner protocol such as SMTP, or binary) is spliced, and the decision log says why.
"""

from __future__ import annotations

import functools
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from origin import server_ssl_context
from pki import Hierarchy, good_hierarchy
from test_relay import (
    HOST,
    Setup,
    _expired_leaf,
    connect_line,
    https_via_proxy,
    settle,
    start_origin,
    start_proxy,
)

from tlsmitm._hsts import HstsStore, PreloadList
from tlsmitm._policy import ConnectionRecord
from tlsmitm._relay.hooks import Block, FlowInfo, Hooks, Request
from tlsmitm._responder import ErrorResponder
from tlsmitm._store import MemoryStore

pytestmark = pytest.mark.e2e


@pytest.fixture
def hierarchy() -> Hierarchy:
    return good_hierarchy(HOST)


class Recorder(Hooks):
    def __init__(self) -> None:
        self.seen: list[tuple[FlowInfo, bytes]] = []

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        self.seen.append((flow, request.target))
        return None


def records_for(setup: Setup, port: int) -> list[ConnectionRecord]:
    return [r for r in setup.records if r.port == port and r.host == HOST]


async def test_sts_learned_without_alpn_stops_a_later_override(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    # Both origins select no ALPN and listen on ports that are not usual HTTP ports: before the
    # rebuild such connections were spliced raw, STS went unrecorded, and the page profile then
    # offered an override on an HSTS host.
    good = await start_origin(nursery, tmp_path, hierarchy, alpn=())
    bad = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy), alpn=())
    hooks = Recorder()
    setup = await start_proxy(
        nursery, tmp_path, hierarchy, responder=ErrorResponder(profile="page"), hooks=hooks
    )
    results = await trio.to_thread.run_sync(
        functools.partial(https_via_proxy, setup, good.port, [("GET", "/hsts", None)])
    )
    assert results[0][0] == 200
    assert "strict-transport-security" in results[0][1]  # forwarded unchanged (MIR-04)
    await settle(setup)
    now = setup.interceptor.clock()
    with trio.fail_after(10):  # (written by the state writer's thread, after the response)
        while not setup.interceptor.hsts.is_known_host(HOST, now=now):
            await trio.sleep(0.01)
    assert [target for _, target in hooks.seen] == [b"/hsts"]
    flow = hooks.seen[0][0]
    assert flow.verified
    (record,) = records_for(setup, good.port)
    assert (record.decision, record.reason, record.relay, record.splice) == (
        "intercept",
        "verified",
        "http/1.1",
        None,
    )

    results = await trio.to_thread.run_sync(
        functools.partial(https_via_proxy, setup, bad.port, [("GET", "/", None)])
    )
    status, headers, _ = results[0]
    assert status == 303
    path = headers["location"][len("https://error.invalid") :]
    page = await trio.to_thread.run_sync(
        functools.partial(https_via_proxy, setup, 443, [("GET", path, None)], host="error.invalid")
    )
    assert b"/override" not in page[0][2]
    assert bad.stats.requests == []
    await settle(setup)
    (blocked,) = records_for(setup, bad.port)
    assert (blocked.decision, blocked.reason) == ("block", "block_page")


class SlowStore(MemoryStore):
    """A store whose writes take a while (a busy SQLite disk, a far Redis)."""

    def put(self, namespace: str, key: str, value: bytes, *, expires: float) -> None:
        time.sleep(1.5)  # (runs in the state writer's thread)
        super().put(namespace, key, value, expires=expires)


async def test_sts_is_known_before_its_write_reaches_a_slow_store(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    # The STS write goes to the store after the response; a connection that starts before it
    # lands must already see a Known HSTS Host, or an attacker who lets the first connection
    # through and fails the next one would get the user an override page (RFC 6797 §12.1).
    good = await start_origin(nursery, tmp_path, hierarchy, alpn=())
    bad = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy), alpn=())
    store = SlowStore()
    setup = await start_proxy(
        nursery,
        tmp_path,
        hierarchy,
        responder=ErrorResponder(profile="page"),
        hsts=HstsStore(store, preload=PreloadList.empty()),
    )
    await trio.to_thread.run_sync(
        functools.partial(https_via_proxy, setup, good.port, [("GET", "/hsts", None)])
    )
    assert store.get("hsts", HOST) is None  # (the write is still on its way)
    results = await trio.to_thread.run_sync(
        functools.partial(https_via_proxy, setup, bad.port, [("GET", "/", None)])
    )
    assert results[0][0] == 303
    path = results[0][1]["location"][len("https://error.invalid") :]
    page = await trio.to_thread.run_sync(
        functools.partial(https_via_proxy, setup, 443, [("GET", path, None)], host="error.invalid")
    )
    assert b"/override" not in page[0][2]
    await settle(setup)
    (blocked,) = records_for(setup, bad.port)
    assert blocked.reason == "block_page"


class SlowDeleteStore(MemoryStore):
    """A store whose deletes take a while (the write of a max-age=0)."""

    def delete(self, namespace: str, key: str) -> None:
        time.sleep(1.5)  # (runs in the state writer's thread)
        super().delete(namespace, key)


async def test_a_max_age_zero_still_queued_is_waited_for(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    # Learn, then forget (max-age=0, RFC 6797 §6.1.1), then a failing certificate: the forget
    # is still on its way to the store, and the store still holds the host. The next
    # connection waits for it and gets the native warning (passthrough), not a block page.
    good = await start_origin(nursery, tmp_path, hierarchy, alpn=())
    bad = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy), alpn=())
    store = SlowDeleteStore()
    setup = await start_proxy(
        nursery,
        tmp_path,
        hierarchy,
        responder=ErrorResponder(profile="native"),
        hsts=HstsStore(store, preload=PreloadList.empty()),
    )
    await trio.to_thread.run_sync(
        functools.partial(
            https_via_proxy, setup, good.port, [("GET", "/hsts", None), ("GET", "/hsts0", None)]
        )
    )
    assert store.get("hsts", HOST) is not None  # (learnt; the forget is still queued)
    untrusting = ssl.create_default_context(cafile=str(setup.root_pem))
    untrusting.check_hostname = False
    untrusting.verify_mode = ssl.CERT_NONE  # look at what the proxy does, not at the browser
    untrusting.set_alpn_protocols(["http/1.1"])  # (a client that can be shown a page)
    results = await trio.to_thread.run_sync(
        functools.partial(
            https_via_proxy, setup, bad.port, [("GET", "/", None)], context=untrusting
        )
    )
    assert results[0][0] == 200  # passed through to the origin: the browser warns itself
    await settle(setup)
    (record,) = records_for(setup, bad.port)
    assert record.reason == "passthrough_untrusted"
    assert not setup.interceptor.hsts.is_known_host(HOST, now=setup.interceptor.clock())


async def test_a_client_without_alpn_to_an_origin_without_alpn_is_inspected(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy, alpn=())
    hooks = Recorder()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)
    context = ssl.create_default_context(cafile=str(setup.root_pem))  # no ALPN at all
    results = await trio.to_thread.run_sync(
        functools.partial(
            https_via_proxy,
            setup,
            origin.port,
            [("GET", "/a", None), ("GET", "/b", None)],
            context=context,
        )
    )
    assert [status for status, _, _ in results] == [200, 200]
    assert [target for _, target in hooks.seen] == [b"/a", b"/b"]
    await settle(setup)
    (record,) = records_for(setup, origin.port)
    assert record.relay == "http/1.1"


async def _start_tls_server(
    nursery: trio.Nursery,
    tmp_path: Path,
    hierarchy: Hierarchy,
    handler: Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]],
) -> int:
    context = server_ssl_context(hierarchy.leaf, tmp_path, alpn=())

    async def serve(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        try:
            await tls.do_handshake()
            await handler(tls)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    listeners = await nursery.start(trio.serve_tcp, serve, 0)
    return int(listeners[0].socket.getsockname()[1])


def _tls_via_proxy(setup: Setup, port: int, talk: Callable[[ssl.SSLSocket], bytes]) -> bytes:
    """CONNECT to ``port`` through the proxy, TLS (no ALPN, trusting tlsmitm), then ``talk``."""
    context = ssl.create_default_context(cafile=str(setup.root_pem))
    with socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=20) as raw:
        raw.sendall(connect_line(HOST, port))
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        with context.wrap_socket(raw, server_hostname=HOST) as tls:
            return talk(tls)


def _read_line(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = tls.recv(1)
        if not chunk:
            break
        data += chunk
    return data


async def test_a_banner_protocol_is_spliced_and_the_log_says_why(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    async def smtp_like(tls: trio.SSLStream[trio.SocketStream]) -> None:
        await tls.send_all(b"220 mail.example.test ESMTP ready\r\n")
        command = b""
        while not command.endswith(b"\r\n"):
            chunk = await tls.receive_some(1024)
            if not chunk:
                return
            command += chunk
        await tls.send_all(b"250 hello " + command.split(b" ", 1)[-1])
        await tls.send_all(b"221 bye\r\n")
        await tls.aclose()

    port = await _start_tls_server(nursery, tmp_path, hierarchy, smtp_like)
    hooks = Recorder()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)

    def talk(tls: ssl.SSLSocket) -> bytes:
        banner = _read_line(tls)
        tls.sendall(b"EHLO client.example.test\r\n")
        return banner + _read_line(tls) + _read_line(tls)

    transcript = await trio.to_thread.run_sync(functools.partial(_tls_via_proxy, setup, port, talk))
    assert transcript == (
        b"220 mail.example.test ESMTP ready\r\n250 hello client.example.test\r\n221 bye\r\n"
    )
    await settle(setup)
    (record,) = records_for(setup, port)
    assert (record.decision, record.verdict, record.relay, record.splice) == (
        "intercept",
        "ok",
        "splice",
        "server_spoke_first",
    )
    assert hooks.seen == []
    assert setup.interceptor.stats.spliced == {"server_spoke_first": 1}


async def test_binary_data_without_alpn_is_spliced_as_not_http(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    async def echo(tls: trio.SSLStream[trio.SocketStream]) -> None:
        data = await tls.receive_some(1024)
        await tls.send_all(b"echo:" + data)
        await tls.aclose()

    port = await _start_tls_server(nursery, tmp_path, hierarchy, echo)
    setup = await start_proxy(nursery, tmp_path, hierarchy)

    def talk(tls: ssl.SSLSocket) -> bytes:
        tls.sendall(b"\x00\x01\x02 binary")
        data = b""
        while len(data) < len(b"echo:\x00\x01\x02 binary"):
            chunk = tls.recv(1024)
            if not chunk:
                break
            data += chunk
        return data

    echoed = await trio.to_thread.run_sync(functools.partial(_tls_via_proxy, setup, port, talk))
    assert echoed == b"echo:\x00\x01\x02 binary"
    await settle(setup)
    (record,) = records_for(setup, port)
    assert (record.relay, record.splice) == ("splice", "not_http")


def test_recent_sts_follows_the_header_rules() -> None:
    from datetime import UTC, datetime, timedelta

    from tlsmitm._relay.state_io import StateWriter

    writer = StateWriter()
    hsts = HstsStore(preload=PreloadList.empty())
    now = datetime(2026, 12, 1, tzinfo=UTC)
    writer.observe_sts(hsts, "Shop.Example.TEST", [b"max-age=600; includeSubDomains"], now=now)
    writer.observe_sts(hsts, "plain.test", [b"max-age=600", b"max-age=0"], now=now)  # 1st counts
    writer.observe_sts(hsts, "10.0.0.1", [b"max-age=600"], now=now)  # RFC 6797 §8.1.1
    writer.observe_sts(hsts, "bad.test", [b"max-age=oops"], now=now)
    assert writer.recently_known("shop.example.test", now)
    assert writer.recently_known("a.b.shop.example.test", now)  # includeSubDomains
    assert writer.recently_known("plain.test", now)
    assert not writer.recently_known("a.plain.test", now)
    assert not writer.recently_known("example.test", now)
    assert not writer.recently_known("10.0.0.1", now)
    assert not writer.recently_known("bad.test", now)
    assert not writer.recently_known("shop.example.test", now + timedelta(seconds=601))
    writer.observe_sts(hsts, "plain.test", [b"max-age=0"], now=now)
    assert not writer.recently_known("plain.test", now)
    # Without a running writer task the writes ran inline: the store agrees.
    assert hsts.is_known_host("shop.example.test", now=now)
    assert not hsts.is_known_host("10.0.0.1", now=now)
