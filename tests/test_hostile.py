"""Hostile clients against the proxy on real sockets (issue 15): no crash, no amplification, no way
around a rule.

Each numbered fault of issue 15 has its regression test here, end to end against an
:class:`~tlsmitm.Interceptor` serving on 127.0.0.1 (``tests/test_hostile_serve.py`` repeats the
worst ones against ``python -m tlsmitm serve`` itself).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.client
import itertools
import logging
import re
import socket
import urllib.parse
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import require_tool
from pki import NOW, Hierarchy, good_hierarchy
from strategies import hello_message, records, sni_ext, u8, u16, vec16
from test_relay import (
    HOST,
    Setup,
    _expired_leaf,
    connect_line,
    settle,
    start_origin,
    start_proxy,
)

from tlsmitm._access import AccessPolicy, Credentials, hash_password
from tlsmitm._policy import InterceptPolicy, RuleSet
from tlsmitm._relay import InterceptorConfig
from tlsmitm._relay.guard import ClientSlots, ErrorBoundary, LoopGuard, is_local_address
from tlsmitm._responder import ErrorResponder

pytestmark = pytest.mark.e2e


@pytest.fixture
def hierarchy() -> Hierarchy:
    return good_hierarchy(HOST)


def exchange(port: int, payload: bytes, *, timeout: float = 10) -> bytes:
    """Send ``payload`` to the proxy and read until it closes (a blocking helper for a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def ask(setup: Setup, payload: bytes) -> bytes:
    return await trio.to_thread.run_sync(exchange, setup.proxy_port, payload)


# -- fault 1 and the error boundary --------------------------------------------------------------


async def test_fault1_an_out_of_range_port_is_a_400_and_the_listener_lives(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    for payload in (
        b"GET http://h:99999/ HTTP/1.1\r\nHost: h:99999\r\n\r\n",  # fault 1 itself
        b"GET http://h:0/ HTTP/1.1\r\nHost: h\r\n\r\n",
        b"CONNECT h:99999 HTTP/1.1\r\nHost: h:99999\r\n\r\n",
        b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n",  # fault 8: was mis-parsed
        b"GET http://bad..host/ HTTP/1.1\r\nHost: x\r\n\r\n",  # fault 8: was a silent close
        b"CONNECT [1.2.3.4]:443 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://user:pw@h.test/ HTTP/1.1\r\nHost: h.test\r\n\r\n",
    ):
        answer = await ask(setup, payload)
        assert answer.startswith(b"HTTP/1.1 400 "), (payload, answer)
    await settle(setup)
    assert "internal_error" not in setup.interceptor.stats.errors
    assert all(1 <= r.port <= 65535 or r.port == 0 for r in setup.records)
    # The listener still serves.
    results = await trio.to_thread.run_sync(lambda: https_get(setup, origin.port, "/"))
    assert results == (200, b"hello from origin")


async def test_fault8_bare_lf_and_oversized_heads_are_answered_at_once(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    # A long head timeout: the answers below must not come from it.
    config = InterceptorConfig(resolve={HOST: "127.0.0.1"}, head_timeout=60)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)
    with trio.fail_after(30):
        lf = await ask(setup, b"GET http://h.test/ HTTP/1.1\nHost: h.test\n\n")
        partial_lf = await ask(setup, b"CONNECT h.test:443 HTTP/1.1\n")  # no end in sight
        huge = await ask(setup, b"GET http://h.test/ HTTP/1.1\r\nX: " + b"a" * 70_000)
    assert lf.startswith(b"HTTP/1.1 400 ")
    assert partial_lf.startswith(b"HTTP/1.1 400 ")
    assert huge.startswith(b"HTTP/1.1 431 ")


async def test_error_boundary_a_failing_handler_ends_only_its_connection(
    nursery: trio.Nursery,
    tmp_path: Path,
    hierarchy: Hierarchy,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    import tlsmitm._relay.interceptor as interceptor_module

    # Fault 1's shape: the connection's record cannot be built, in the handler's finally.
    real_emit = setup.interceptor._emit
    emits = [0]

    def broken_emit(conn: object) -> None:
        emits[0] += 1
        if emits[0] == 1:
            raise ValueError("port must be in 0..65535")
        real_emit(conn)  # type: ignore[arg-type]

    monkeypatch.setattr(setup.interceptor, "_emit", broken_emit)

    real_explicit = interceptor_module.explicit
    failures = [2]

    async def failing_explicit(*args: object) -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("injected handler failure " + "\x16\x03\x01" * 30_000)
        await real_explicit(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(interceptor_module, "explicit", failing_explicit)
    caplog.set_level(logging.INFO, logger="tlsmitm")
    for _ in range(2):
        assert await ask(setup, connect_line(HOST, origin.port)) == b""  # closed, nothing said
    result = await trio.to_thread.run_sync(lambda: https_get(setup, origin.port, "/"))
    assert result == (200, b"hello from origin")  # the listener is still serving
    await settle(setup)
    assert emits[0] == 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # One line per cause, rate-limited: two injected failures -> one line; the subscriber's
    # failure is a second cause -> one more line. No traceback and no 100 KB of client bytes.
    causes = sorted(r.getMessage().split(": ", 1)[1].split(":")[0] for r in errors)
    assert causes == ["RuntimeError", "ValueError"], [r.getMessage()[:200] for r in errors]
    for record in errors:
        assert record.exc_info is None
        assert len(record.getMessage()) < 600
        assert "\x16" not in record.getMessage()  # client bytes are escaped, never raw
    assert setup.interceptor._boundary.reported == 3


async def test_error_boundary_protects_an_embedders_nursery(
    tmp_path: Path, hierarchy: Hierarchy
) -> None:
    """``Interceptor.handle`` called by an embedder never raises into its nursery."""
    async with trio.open_nursery() as nursery:
        setup = await start_proxy(nursery, tmp_path, hierarchy)

        def broken_emit(conn: object) -> None:
            raise ValueError("port must be in 0..65535")

        setup.interceptor._emit = broken_emit  # type: ignore[method-assign]
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(b"GET http://h:99999/ HTTP/1.1\r\nHost: h\r\n\r\n")
        async with trio.open_nursery() as embedder:
            embedder.start_soon(
                functools.partial(setup.interceptor.handle, b, client=("192.0.2.1", 5))
            )
        answer = await a.receive_some(1024)
        assert answer.startswith(b"HTTP/1.1 400 ")
        nursery.cancel_scope.cancel()


def test_error_boundary_rate_limits_per_cause() -> None:
    logger = logging.getLogger("tlsmitm.test.boundary")
    now = [0.0]
    lines: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                lines.append(record.getMessage())

    handler = Catch()
    logger.addHandler(handler)
    try:
        boundary = ErrorBoundary(logger, interval=60, clock=lambda: now[0])

        def fail(kind: type[Exception]) -> Exception:
            try:
                raise kind("boom\n" * 1000)
            except Exception as exc:
                return exc

        for _ in range(5):
            boundary.report(fail(ValueError), client="c")
        boundary.report(fail(KeyError), client="c")
        assert len(lines) == 2
        now[0] = 61
        boundary.report(fail(ValueError), client="c")
        assert len(lines) == 3
        assert "4 more like it" in lines[-1]
        assert all("\n" not in line and len(line) < 400 for line in lines)
    finally:
        logger.removeHandler(handler)


# -- fault 2: loops --------------------------------------------------------------------------------


async def test_fault2_connect_to_the_proxy_itself_is_refused_without_amplification(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    config = InterceptorConfig(resolve={HOST: "127.0.0.1", "loop.test": "127.0.0.1"})
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)
    port = setup.proxy_port
    one = connect_line("127.0.0.1", port)
    answer = await ask(setup, one * 3000)  # fault 2: 3,000 deep in one send
    assert answer.startswith(b"HTTP/1.1 508 ")
    assert answer.count(b"HTTP/1.1") == 1  # the rest was never read as more requests
    for payload in (
        connect_line("loop.test", port),  # a name that resolves to the proxy
        connect_line("localhost", port),
        f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    ):
        assert (await ask(setup, payload)).startswith(b"HTTP/1.1 508 "), payload
    await settle(setup)
    # Four client connections, plus the one the resolved name's dial made before it was
    # recognised (closed at once): no chain of self-connections.
    assert setup.interceptor.stats.connections <= 5
    assert setup.interceptor.stats.active == 0


async def test_via_marks_forwarded_requests_and_stops_loops(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    from origin import OriginStats, serve_http

    stats = OriginStats()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_http(stream, stats)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    origin_port = listeners[0].socket.getsockname()[1]
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    pseudonym = setup.interceptor._loop.pseudonym
    url = f"http://127.0.0.1:{origin_port}/"
    ok = await ask(setup, f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert ok.startswith(b"HTTP/1.1 200 ")
    assert (b"via", f"1.1 {pseudonym}".encode()) in stats.headers[-1]
    looped = f"GET {url} HTTP/1.1\r\nHost: x\r\nVia: 1.1 other, 1.1 {pseudonym}\r\n\r\n"
    assert (await ask(setup, looped.encode())).startswith(b"HTTP/1.1 508 ")
    assert len(stats.requests) == 1


def test_loop_guard_expands_wildcard_listeners() -> None:
    guard = LoopGuard()
    guard.add_listeners([("0.0.0.0", 8080), ("::1", 9090)])
    assert guard.is_self("127.0.0.1", 8080)
    assert guard.is_self("::ffff:127.0.0.1", 8080)
    assert guard.is_self("127.0.0.53", 8080)
    assert not guard.is_self("127.0.0.1", 8081)
    assert not guard.is_self("192.0.2.1", 8080)  # TEST-NET-1 is never local
    assert guard.is_self("::1", 9090)
    assert not guard.is_self("127.0.0.1", 9090)
    assert not guard.is_self("not-an-ip", 8080)
    assert is_local_address("0.0.0.0")
    # A non-loopback address of this machine counts too, when it has one.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            own = s.getsockname()[0]
        except OSError:
            own = "127.0.0.1"
    assert guard.is_self(own, 8080)
    assert guard.seen_in(["a", guard.pseudonym])
    assert not guard.seen_in(["tlsmitm-000000000000"])


# -- per-client limit ---------------------------------------------------------------------------


async def test_connections_per_client_are_limited(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    config = InterceptorConfig(resolve={HOST: "127.0.0.1"}, max_connections_per_client=2)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)
    held = [await trio.open_tcp_stream("127.0.0.1", setup.proxy_port) for _ in range(2)]
    await settle(setup, active=2)
    answer = await ask(setup, connect_line(HOST, 443))
    assert answer.startswith(b"HTTP/1.1 429 ")
    for stream in held:
        await stream.aclose()
    await settle(setup)
    slots = ClientSlots(1)
    one, two, three = object(), object(), object()
    assert slots.try_acquire(one, "a")
    assert not slots.try_acquire(two, "a")
    assert slots.try_acquire(three, "b")
    slots.release(two)  # held nothing: no effect
    assert not slots.try_acquire(two, "a")
    slots.release(one)
    assert slots.try_acquire(two, "a")


# -- fault 3: rules decided on what the connection reaches ----------------------------------------


def raw_hello(server_name: str, *, ech: bool = False) -> bytes:
    extensions = [(0, sni_ext(server_name.encode())), (43, b"\x02\x03\x04")]
    if ech:
        body = u8(0) + u16(1) + u16(1) + u8(7) + vec16(b"E" * 32) + vec16(b"P" * 180)
        extensions.append((0xFE0D, body))
    return records(hello_message(extensions=extensions))


async def test_fault3_a_bypass_is_not_dodged_by_sni(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, caplog: pytest.LogCaptureFixture
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    config = InterceptorConfig(resolve={HOST: "127.0.0.1", "bank.test": "127.0.0.1"})
    policy = InterceptPolicy(RuleSet.from_strings(["bank.test"]))
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config, policy=policy)
    caplog.set_level(logging.INFO, logger="tlsmitm")

    async def decision(target: str, sni: str) -> str:
        stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
        await stream.send_all(connect_line(target, origin.port))
        with trio.fail_after(20):
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
            await stream.send_all(raw_hello(sni))
            await stream.receive_some(4096)  # the answer to the hello, whoever gives it
        await stream.aclose()
        await settle(setup)
        return setup.records[-1].decision

    # Fault 3: CONNECT to a host that is not bypassed, SNI of one that is: never spliced.
    assert await decision(HOST, "bank.test") != "bypass"  # intercepted (here: a name mismatch)
    assert setup.interceptor.stats.bypassed == 0
    assert any("differs from the CONNECT target" in r.getMessage() for r in caplog.records)
    # The other way round: the target is bypassed but the SNI is not -> the stricter, intercept.
    assert await decision("bank.test", HOST) != "bypass"
    assert setup.interceptor.stats.bypassed == 0
    # Target and SNI agree on the bypassed host: spliced.
    assert await decision("bank.test", "bank.test") == "bypass"
    assert setup.interceptor.stats.bypassed == 1


async def test_ech_is_reported_and_answered_for_the_public_name(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, caplog: pytest.LogCaptureFixture
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    caplog.set_level(logging.INFO, logger="tlsmitm")
    stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    await stream.send_all(connect_line(HOST, origin.port))
    with trio.fail_after(20):
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
        await stream.send_all(raw_hello("public.example.test", ech=True))
        await stream.receive_some(4096)
    await stream.aclose()
    await settle(setup)
    assert setup.interceptor.stats.ech_offered == 1
    # Answered for the outer SNI, the public name: the record names it, not the real target.
    assert setup.records[-1].host == "public.example.test"
    lines = [r.getMessage() for r in caplog.records if "Encrypted Client Hello" in r.getMessage()]
    assert len(lines) == 1
    assert "public.example.test" in lines[0]
    # An inner marker on the wire is refused.
    stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    await stream.send_all(connect_line(HOST, origin.port))
    with trio.fail_after(20):
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
        inner = records(hello_message(extensions=[(0, sni_ext(b"a.test")), (0xFE0D, b"\x01")]))
        await stream.send_all(inner)
        while await stream.receive_some(4096):
            pass
    await stream.aclose()
    await settle(setup)
    assert setup.records[-1].reason == "ech_inner"


def test_the_ech_log_line_is_limited_per_interceptor_not_across_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each trio run has its own clock: one interceptor's minute must not silence another's."""
    from datetime import UTC, datetime

    from tlsmitm._clienthello import parse_client_hello
    from tlsmitm._relay import InterceptorStats
    from tlsmitm._relay.flow import _note_ech
    from tlsmitm._relay.state import FlowRecord

    hello = parse_client_hello(raw_hello("public.example.test", ech=True))

    class _Interceptor:  # what _note_ech reads of an Interceptor
        def __init__(self) -> None:
            self.stats = InterceptorStats()

    caplog.set_level(logging.DEBUG, logger="tlsmitm")

    def one_run(ix: _Interceptor, times: int) -> list[int]:
        async def main() -> None:
            for _ in range(times):
                conn = FlowRecord(client="127.0.0.1:1", started=datetime.now(UTC))
                _note_ech(ix, conn, hello, "real.example.test")  # type: ignore[arg-type]

        caplog.clear()
        trio.run(main, clock=trio.testing.MockClock())  # each run's clock starts at 0
        return [r.levelno for r in caplog.records if "Encrypted Client Hello" in r.getMessage()]

    first, second = _Interceptor(), _Interceptor()
    assert one_run(first, 2) == [logging.INFO, logging.DEBUG]  # one INFO line a minute
    assert one_run(second, 1) == [logging.INFO]  # another interceptor, another run: its own line
    assert second.stats.ech_offered == 1


# -- fault 4: override grants bound to the client -----------------------------------------------


def https_get(
    setup: Setup,
    port: int,
    path: str,
    *,
    host: str = HOST,
    source: str = "127.0.0.1",
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request through the proxy from ``source``; (status, body or Location)."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1",
        setup.proxy_port,
        context=setup.client_context(),
        timeout=20,
        source_address=(source, 0),
    )
    conn.set_tunnel(host, port)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        if response.status in (302, 303):
            data = (response.getheader("location") or "").encode()
        return response.status, data
    finally:
        conn.close()


async def test_fault4_an_override_is_granted_only_to_the_client_that_clicked(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy, _expired_leaf(hierarchy))
    setup = await start_proxy(
        nursery, tmp_path, hierarchy, responder=ErrorResponder(profile="page")
    )
    alice, bob = "127.0.0.1", "127.0.0.2"

    async def get(source: str, *args: object, **kw: object) -> tuple[int, bytes]:
        call = functools.partial(https_get, setup, *args, source=source, **kw)  # type: ignore[arg-type]
        return await trio.to_thread.run_sync(call)

    status, location = await get(alice, origin.port, "/")
    assert status == 303
    page_path = location.decode()[len("https://error.invalid") :]
    status, page = await get(alice, 443, page_path, host="error.invalid")
    assert status == 502
    fields = dict(re.findall(rb'name="(ref|token)" value="([^"]+)"', page))
    form = urllib.parse.urlencode(
        {"ref": fields[b"ref"].decode(), "token": fields[b"token"].decode()}
    ).encode()
    forged = {
        "Origin": "https://error.invalid",
        "Content-Type": "application/x-www-form-urlencoded",
        "Sec-Fetch-Site": "same-origin",
        "Sec-Fetch-Mode": "navigate",
        "Sec-Fetch-Dest": "document",
        "Sec-Fetch-User": "?1",
    }
    await trio.sleep(1.2)  # the click delay (matrix UI-02) is enforced on the token
    # Bob's script knows Alice's ref and token and forges every header: refused.
    status, _ = await get(
        bob, 443, "/override", host="error.invalid", method="POST", body=form, headers=forged
    )
    assert status == 403
    assert (await get(bob, origin.port, "/"))[0] == 303
    # Alice's own click grants -- for Alice only.
    status, back = await get(
        alice, 443, "/override", host="error.invalid", method="POST", body=form, headers=forged
    )
    assert status == 303
    assert back.startswith(f"https://{HOST}:{origin.port}/".encode())
    assert await get(alice, origin.port, "/") == (200, b"hello from origin")
    assert (await get(bob, origin.port, "/"))[0] == 303


# -- fault 6: slow heads --------------------------------------------------------------------------


async def test_fault6_a_trickled_head_is_cut_off_on_the_proxy_port_and_in_a_tunnel(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    config = InterceptorConfig(resolve={HOST: "127.0.0.1"}, head_timeout=1.5, idle_timeout=120)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)

    async def trickle(stream: trio.abc.Stream, head: bytes) -> bytes:
        """One byte every 0.2 s (each well inside any per-byte timeout) until the proxy ends it."""
        answer = b""
        with trio.fail_after(30):
            for byte in head:
                try:
                    await stream.send_all(bytes([byte]))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                with trio.move_on_after(0.2):
                    try:
                        chunk = await stream.receive_some(4096)
                    except trio.BrokenResourceError:
                        chunk = b""
                    answer += chunk
                    if not chunk:
                        break
        return answer

    slow = b"GET http://h.test/ HTTP/1.1\r\nHost: h.test\r\n" + b"X-Slow: y\r\n" * 200 + b"\r\n"
    port_stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    assert (await trickle(port_stream, slow)).startswith(b"HTTP/1.1 408 ")
    await port_stream.aclose()

    # Inside an intercepted tunnel: one good request, then a trickled one.
    tcp = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    await tcp.send_all(connect_line(HOST, origin.port))
    assert (await tcp.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
    tls = trio.SSLStream(tcp, setup.client_context(), server_hostname=HOST)
    await tls.send_all(b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n")
    first = b""
    with trio.fail_after(20):
        while b"hello from origin" not in first:
            first += await tls.receive_some(4096)
    start = trio.current_time()
    await trickle(tls, b"GET / HTTP/1.1\r\nHost: www.example.test\r\n" + b"X-Slow: y\r\n" * 200)
    # Cut off by the head deadline, long before the idle timeout (120 s) or the 200-line head.
    assert trio.current_time() - start < 60
    await trio.aclose_forcefully(tls)
    await settle(setup)
    assert setup.records[-1].reason == "head_timeout"


# -- access control ----------------------------------------------------------------------------


async def test_clients_outside_the_allow_list_get_403_in_both_modes(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    config = InterceptorConfig(
        resolve={HOST: "127.0.0.1"}, access=AccessPolicy.build(allow=["127.0.0.2/32"])
    )
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)
    answer = await ask(setup, connect_line(HOST, origin.port))  # from 127.0.0.1
    assert answer.startswith(b"HTTP/1.1 403 ")
    allowed = await trio.to_thread.run_sync(
        functools.partial(https_get, setup, origin.port, "/", source="127.0.0.2")
    )
    assert allowed == (200, b"hello from origin")
    # Transparent mode applies it too: nothing is dialled, the connection is closed.
    a, b = trio.testing.memory_stream_pair()
    await setup.interceptor.handle(b, client=("203.0.113.5", 4000), destination=("127.0.0.1", 1))
    assert await a.receive_some(100) == b""
    await settle(setup)
    assert setup.records[-1].reason == "not_allowed"


async def test_proxy_authentication_with_curl(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    curl = require_tool("curl")
    origin = await start_origin(nursery, tmp_path, hierarchy)
    users = Credentials.parse(f"alice:{hash_password('open sesame', log_n=10)}")
    config = InterceptorConfig(
        resolve={HOST: "127.0.0.1"}, access=AccessPolicy.build(credentials=users)
    )
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)
    proxy = f"http://127.0.0.1:{setup.proxy_port}"
    url = f"https://{HOST}:{origin.port}/"

    async def run_curl(*extra: str) -> tuple[int, bytes, bytes]:
        result = await trio.run_process(
            [
                curl,
                "-sS",
                "--max-time",
                "20",
                "--proxy",
                proxy,
                "--cacert",
                str(setup.root_pem),
                *extra,
                url,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return result.returncode, result.stdout, result.stderr

    code, _, err = await run_curl()
    assert code != 0
    assert b"407" in err  # curl: "CONNECT tunnel failed, response 407"
    code, _, err = await run_curl("--proxy-user", "alice:wrong")
    assert code != 0
    assert b"407" in err
    code, out, err = await run_curl("--proxy-user", "alice:open sesame")
    assert code == 0, err
    assert out == b"hello from origin"
    challenge = await ask(setup, connect_line(HOST, origin.port))
    assert challenge.startswith(b"HTTP/1.1 407 ")
    assert b'proxy-authenticate: Basic realm="tlsmitm", charset="UTF-8"' in challenge
    await settle(setup)
    assert any(r.decision == "intercept" for r in setup.records)


class _ExhaustedListener:
    """A listener whose accept() fails with EMFILE a few times, then waits forever."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []

    async def accept(self) -> trio.SocketStream:
        self.calls.append(trio.current_time())
        if len(self.calls) <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_emfile_backs_off_without_spinning(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    from tlsmitm._ca import CertificateAuthority
    from tlsmitm._relay import Interceptor

    interceptor = Interceptor(ca=CertificateAuthority.ephemeral(now=NOW))
    listener = _ExhaustedListener(failures=8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            interceptor._accept_loop,
            listener,
            nursery,
            trio.Semaphore(10),  # type: ignore[arg-type]
        )
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(listener.calls)]
    # 50 ms doubling to at most 1 s: eight failures, nine calls, no busy loop.
    assert gaps == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert interceptor._boundary.reported == 8


async def test_at_the_cap_an_idle_keep_alive_connection_is_shed_for_a_new_client(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    origin = await start_origin(nursery, tmp_path, hierarchy)
    config = InterceptorConfig(resolve={HOST: "127.0.0.1"}, max_connections=1)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)
    tcp = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
    await tcp.send_all(connect_line(HOST, origin.port))
    assert (await tcp.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
    idle = trio.SSLStream(tcp, setup.client_context(), server_hostname=HOST)
    await idle.send_all(b"GET / HTTP/1.1\r\nHost: www.example.test\r\n\r\n")
    first = b""
    with trio.fail_after(20):
        while b"hello from origin" not in first:
            first += await idle.receive_some(4096)
    # The one slot is held by a keep-alive connection waiting for its next request.
    with trio.fail_after(20):
        while not any(
            r.idle_since is not None and trio.current_time() - r.idle_since > 1.2
            for r in setup.interceptor._open
        ):
            await trio.sleep(0.05)
    served = await trio.to_thread.run_sync(lambda: https_get(setup, origin.port, "/"))
    assert served == (200, b"hello from origin")
    assert setup.interceptor.stats.shed_idle == 1
    assert setup.interceptor.stats.refused_busy == 0
    with trio.fail_after(10):  # the shed connection was closed
        with contextlib.suppress(trio.BrokenResourceError):
            while await idle.receive_some(4096):
                pass
    await trio.aclose_forcefully(idle)


def test_an_accept_outage_is_one_warning_not_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    boundary = ErrorBoundary(logging.getLogger("tlsmitm.test.outage"), interval=60, clock=lambda: 0)
    caplog.set_level(logging.DEBUG, logger="tlsmitm.test.outage")
    for _ in range(5):
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as exc:
            boundary.report(exc, client="-", outage=True)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert "Too many open files" in lines[0].getMessage()
    assert "internal error" not in lines[0].getMessage()


async def test_pipelined_requests_are_limited(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy
) -> None:
    from origin import OriginStats, serve_http

    from tlsmitm._relay.h1 import MAX_PIPELINED

    stats = OriginStats()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_http(stream, stats)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    origin_port = listeners[0].socket.getsockname()[1]
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    one = f"GET http://127.0.0.1:{origin_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer = await ask(setup, one * 3 * MAX_PIPELINED)  # all in one send
    # Served in order up to the limit, then the connection ends: never 192 upstream exchanges.
    assert answer.count(b"HTTP/1.1 200 ") == MAX_PIPELINED
    assert len(stats.requests) == MAX_PIPELINED
    await settle(setup)
    assert setup.records[-1].reason == "pipelined_limit"

    # Requests that wait for their answers (keep-alive, not pipelined) are not limited.
    def keep_alive() -> int:
        answered = 0
        with socket.create_connection(("127.0.0.1", setup.proxy_port), timeout=10) as s:
            for _ in range(MAX_PIPELINED + 5):
                s.sendall(one)
                data = b""
                while b"hello" not in data:
                    data += s.recv(4096)
                answered += 1
        return answered

    assert await trio.to_thread.run_sync(keep_alive) == MAX_PIPELINED + 5
