"""``serve --workers``: processes sharing one port, restarted when they die, drained on SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import h11
import pytest
import trio
from origin import send_events, server_ssl_context
from pki import good_hierarchy
from serve_node import curl, serve_node

pytestmark = pytest.mark.e2e

HOST = "www.example.test"


def worker_pids(node_stdout: Path) -> list[int]:
    line = next(x for x in node_stdout.read_text().splitlines() if " workers (pids " in x)
    return [int(p) for p in line.split("(pids ")[1].rstrip(")").split(", ")]


async def test_two_workers_serve_restart_and_drain(nursery: trio.Nursery, tmp_path: Path) -> None:
    hierarchy = good_hierarchy(HOST)
    context = server_ssl_context(hierarchy.leaf, tmp_path)
    gates = {b"/held": trio.Event(), b"/gated": trio.Event()}
    asked = {b"/held": trio.Event(), b"/gated": trio.Event()}
    gate = gates[b"/gated"]

    async def handler(stream: trio.SocketStream) -> None:
        # /gated waits for the test's gate: a request in flight while the proxy drains.
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
            conn = h11.Connection(h11.SERVER)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await tls.receive_some(65536))
                    continue
                if isinstance(event, h11.Request):
                    target = bytes(event.target)
                if isinstance(event, h11.EndOfMessage):
                    break
            body = b"hello from origin"
            if target in gates:
                asked[target].set()
                await gates[target].wait()
                body = b"drained" if target == b"/gated" else b"held"
            await send_events(
                conn,
                tls,
                h11.Response(status_code=200, headers=[(b"content-length", b"%d" % len(body))]),
                h11.Data(data=body),
                h11.EndOfMessage(),
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    roots = tmp_path / "origin-root.pem"
    roots.write_bytes(hierarchy.root.pem)
    args = ["--state-dir", str(tmp_path / "state"), "--extra-roots", str(roots),
            "--resolve", f"{HOST}=127.0.0.1", "--workers", "2"]  # fmt: skip
    async with serve_node(tmp_path, "workers", args, stop_signal=signal.SIGTERM) as node:
        pids = worker_pids(node.stdout)
        assert len(pids) == 2
        assert node.process.pid not in pids
        for _ in range(4):
            result = await curl(node, f"https://{HOST}:{port}/", node.cacert)
            assert result.returncode == 0, result.stderr
            assert result.stdout == b"hello from origin"

        # A killed worker is restarted (logged), and the port keeps serving meanwhile.
        os.kill(pids[0], signal.SIGKILL)
        with trio.fail_after(60):
            while "worker 0 is listening again" not in node.log():
                await trio.sleep(0.1)
        assert "restarting it in 1 s" in node.log()
        for _ in range(4):
            result = await curl(node, f"https://{HOST}:{port}/", node.cacert)
            assert result.returncode == 0, result.stderr

        # SIGHUP reaches every worker: rules, trust store and preload list reloaded, while a
        # request is in flight (it is answered: no connection is dropped), and the port keeps
        # serving.
        async with trio.open_nursery() as inner:
            held: list[object] = []

            async def across_reload() -> None:
                held.append(await curl(node, f"https://{HOST}:{port}/held", node.cacert))

            inner.start_soon(across_reload)
            with trio.fail_after(30):
                await asked[b"/held"].wait()
            node.process.send_signal(signal.SIGHUP)
            with trio.fail_after(60):
                while node.stdout.read_text().count("HSTS preload list reloaded") < 2:
                    await trio.sleep(0.1)
            gates[b"/held"].set()
        assert node.stdout.read_text().count("trust store reloaded") == 2
        (kept,) = held
        assert kept.returncode == 0, kept.stderr  # type: ignore[attr-defined]
        assert kept.stdout == b"held"  # type: ignore[attr-defined]
        result = await curl(node, f"https://{HOST}:{port}/", node.cacert)
        assert result.returncode == 0, result.stderr

        # SIGTERM drains: a request in flight is answered, then everything exits.
        async with trio.open_nursery() as inner:
            results: list[object] = []

            async def in_flight() -> None:
                results.append(await curl(node, f"https://{HOST}:{port}/gated", node.cacert))

            inner.start_soon(in_flight)
            with trio.fail_after(30):
                await asked[b"/gated"].wait()
            node.process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                while "shutting down" not in node.stderr.read_text():  # logged, on stderr
                    await trio.sleep(0.05)
            gate.set()
        (done,) = results
        assert done.returncode == 0, done.stderr  # type: ignore[attr-defined]
        assert done.stdout == b"drained"  # type: ignore[attr-defined]
        with trio.fail_after(30):
            code = await node.process.wait()
        assert code == 0
        for pid in pids[1:]:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


async def test_workers_starting_together_on_a_fresh_directory_share_one_ca(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    args = ["--state-dir", str(state), "--workers", "1"]
    async with (
        serve_node(tmp_path, "a", args) as a,
        serve_node(tmp_path, "b", args) as b,
    ):
        assert a.cacert == b.cacert
    exported = []
    for _ in range(2):
        result = await trio.run_process(
            [sys.executable, "-m", "tlsmitm", "ca", "export", "--state-dir", str(state)],
            capture_stdout=True,
            check=True,
        )
        exported.append(result.stdout)
    assert exported[0] == exported[1] == a.cacert.read_bytes()
    assert sorted(p.name for p in (state / "ca").glob("*.pem")).count("root.pem") == 1


async def test_no_worker_outlives_a_killed_supervisor(tmp_path: Path) -> None:
    args = ["--state-dir", str(tmp_path / "state"), "--workers", "2"]
    async with serve_node(tmp_path, "supervisor", args) as node:
        pids = worker_pids(node.stdout)
        node.process.kill()  # SIGKILL: the supervisor cannot forward anything
        await node.process.wait()
        with trio.fail_after(30):
            for pid in pids:
                while True:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    await trio.sleep(0.05)
