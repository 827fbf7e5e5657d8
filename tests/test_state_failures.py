"""State failures never cost a response (issue 15 fault 7), end to end against ``serve``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import trio
from origin import OriginStats, serve_tls, server_ssl_context
from pki import good_hierarchy
from serve_node import curl, serve_node

from tlsmitm._sqlite_store import SqliteStore

pytestmark = pytest.mark.e2e

HOST = "www.example.test"


def make_read_only(path: Path) -> None:
    """Read-only for the proxy: chmod for a user; the immutable flag for root (chmod is no bar)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o444)


def undo_read_only(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o600)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_read_only_state_store_still_delivers_the_response_carrying_sts(
    nursery: trio.Nursery, tmp_path: Path, workers: str
) -> None:
    hierarchy = good_hierarchy(HOST)
    context = server_ssl_context(hierarchy.leaf, tmp_path)
    stats = OriginStats()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_tls(stream, context, stats)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    origin_port = listeners[0].socket.getsockname()[1]
    roots = tmp_path / "origin-root.pem"
    roots.write_bytes(hierarchy.root.pem)
    state = tmp_path / "state"
    database = state / "state.sqlite3"
    SqliteStore(database).close()
    make_read_only(database)
    try:
        async with serve_node(
            tmp_path,
            "proxy",
            ["--state-dir", str(state), "--extra-roots", str(roots), "--workers", workers,
             "--resolve", f"{HOST}=127.0.0.1"],
        ) as node:  # fmt: skip
            # Reported at start: one line, at WARNING, saying read-only and what to do (by the
            # supervisor when there are workers, not by each).
            start_lines = [line for line in node.log().splitlines() if "read-only" in line]
            assert len(start_lines) == 1, node.log()
            assert " WARNING " in start_lines[0]
            assert "--state-dir" in start_lines[0]
            for _ in range(3):
                result = await curl(node, f"https://{HOST}:{origin_port}/hsts", node.cacert)
                assert result.returncode == 0, result.stderr
                assert result.stdout == b"hsts"  # the response carrying STS reached the client
            # While running: the refused write is logged at WARNING, rate-limited (once here).
            with trio.fail_after(20):
                while "state store failed during put" not in node.log():
                    await trio.sleep(0.05)
            failures = [
                line for line in node.log().splitlines() if "state: state store failed" in line
            ]
            processes = 1 if workers == "1" else 1 + int(workers)  # the supervisor, workers
            assert 1 <= len(failures) <= processes, node.log()  # at most one each, per minute
            assert " WARNING " in failures[0]
    finally:
        undo_read_only(database)
