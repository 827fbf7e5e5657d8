"""Shutdown of a real ``tlsmitm serve``: stop accepting at once, idle connections closed at once,
exchanges in flight get the grace period, a second signal stops at once, never a traceback.

Bounds are generous (the machine is shared); they still fail when the proxy waits for an idle
connection's 300 s idle timeout or for the whole grace period.
"""

from __future__ import annotations

import signal
import ssl
from pathlib import Path

import pytest
import trio
from pki import good_hierarchy
from serve_process import Served, serve, start_origin, upstream_args

pytestmark = pytest.mark.e2e

HOST = "www.example.test"
BYPASSED = "bank.example.test"


async def _tunnel(
    served: Served, port: int, cacert: Path, host: str = HOST
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection through the proxy (CONNECT), after one complete keep-alive exchange."""
    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
    await stream.send_all(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await stream.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    context = ssl.create_default_context(cafile=str(cacert))
    tls = trio.SSLStream(stream, context, server_hostname=host)
    await tls.do_handshake()
    await tls.send_all(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    body = b""
    while not body.endswith(b"hello from origin"):
        chunk = await tls.receive_some(4096)
        assert chunk
        body += chunk
    return tls


async def _closed_by_peer(stream: trio.abc.Stream) -> bool:
    try:
        return await stream.receive_some(4096) == b""
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return True


@pytest.mark.parametrize(
    ("workers", "signum"),
    [("1", signal.SIGINT), ("2", signal.SIGTERM)],
    ids=["one-process-sigint", "two-workers-sigterm"],
)
async def test_idle_keep_alive_connections_do_not_hold_up_shutdown(
    nursery: trio.Nursery, tmp_path: Path, workers: str, signum: int
) -> None:
    hierarchy = good_hierarchy(HOST)
    port, _ = await start_origin(nursery, tmp_path, hierarchy)
    bypassed = good_hierarchy(BYPASSED)
    bypassed_port, _ = await start_origin(nursery, tmp_path, bypassed)
    bypassed_root = tmp_path / "bypassed-root.pem"
    bypassed_root.write_bytes(bypassed.root.pem)
    state = tmp_path / "state"
    async with serve(
        state,
        *("--workers", workers),
        "--shutdown-grace",
        "60",
        *upstream_args(tmp_path, hierarchy, HOST),
        *("--bypass", BYPASSED, "--resolve", f"{BYPASSED}=127.0.0.1"),
    ) as served:
        idle_tls = await _tunnel(served, port, state / "ca" / "root.pem")
        # A spliced tunnel (the client talks to the origin itself), idle after one exchange.
        idle_tunnel = await _tunnel(served, bypassed_port, bypassed_root, BYPASSED)
        just_connected = await trio.open_tcp_stream("127.0.0.1", served.port)  # no CONNECT yet
        started = trio.current_time()
        served.process.send_signal(signum)
        with trio.fail_after(30):
            code = await served.process.wait()
        elapsed = trio.current_time() - started
        # Well under the 60 s grace and the 300 s idle timeout: idle connections went at once.
        print(f"shutdown with idle connections took {elapsed:.3f} s")
        assert elapsed < 10, elapsed
        assert code == 0
        assert await _closed_by_peer(idle_tls)
        assert await _closed_by_peer(just_connected)
        assert await _closed_by_peer(idle_tunnel)
        await trio.aclose_forcefully(idle_tls)
        await trio.aclose_forcefully(idle_tunnel)
        await just_connected.aclose()
    assert b"Traceback" not in served.stderr
    assert b"shutting down" in served.stderr


async def test_an_exchange_in_flight_finishes_within_the_grace(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    hierarchy = good_hierarchy(HOST)
    port, _ = await start_origin(nursery, tmp_path, hierarchy)
    state = tmp_path / "state"
    async with serve(
        state, "--workers", "1", "--shutdown-grace", "30", *upstream_args(tmp_path, hierarchy, HOST)
    ) as served:
        tls = await _tunnel(served, port, state / "ca" / "root.pem")
        # /slow answers after 0.3 s: the request is in flight when the signal arrives.
        await tls.send_all(f"GET /slow HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        served.process.send_signal(signal.SIGTERM)
        answer = b""
        with trio.fail_after(20):
            while b"\r\n\r\n" not in answer:
                chunk = await tls.receive_some(4096)
                assert chunk, answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        await trio.aclose_forcefully(tls)
        with trio.fail_after(30):
            assert await served.process.wait() == 0
        # Nothing new is accepted once the signal arrived.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", served.port)
    assert b"Traceback" not in served.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_second_signal_stops_at_once(
    nursery: trio.Nursery, tmp_path: Path, workers: str
) -> None:
    hierarchy = good_hierarchy(HOST)
    port, _ = await start_origin(nursery, tmp_path, hierarchy)
    state = tmp_path / "state"
    async with serve(
        state,
        *("--workers", workers, "--shutdown-grace", "120"),
        *upstream_args(tmp_path, hierarchy, HOST),
    ) as served:
        tls = await _tunnel(served, port, state / "ca" / "root.pem")
        # A request whose body never comes: an exchange in flight, which would get 120 s.
        await tls.send_all(
            f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\n".encode()
        )
        await trio.sleep(0.2)  # let the proxy start relaying the request
        served.process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            while b"shutting down" not in served.stderr:
                await trio.sleep(0.02)
        started = trio.current_time()
        served.process.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            code = await served.process.wait()
        assert trio.current_time() - started < 10
        assert code == 0
        await trio.aclose_forcefully(tls)
    assert b"Traceback" not in served.stderr
    assert b"stopping now" in served.stderr
