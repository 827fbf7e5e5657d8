"""HTTP/1.1 without ALPN (issue 14 part 3), end to end over real sockets on 127.0.0.1.

An origin that selects no ALPN speaks HTTP/1.1 (RFC 7301 §3.2, RFC 9113 §3.2): it goes through
the HTTP/1.1 relay whatever its port -- hooks run, STS is recorded. Decrypted data that is not
HTTP (a banner protocol such as SMTP, or binary) is spliced, and the decision log says why.
"""

from __future__ import annotations

import functools
import socket
import ssl
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

from tlsmitm._policy import ConnectionRecord
from tlsmitm._relay.hooks import Block, FlowInfo, Hooks, Request
from tlsmitm._responder import ErrorResponder

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
