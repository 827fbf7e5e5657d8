"""Run ``python -m tlsmitm serve`` as a subprocess (a "node"), as a user or a test harness would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from conftest import require_tool


@dataclass
class Node:
    process: trio.Process
    proxy: str  # http://127.0.0.1:PORT
    port: int
    cacert: Path
    stdout: Path
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


async def curl(
    node_or_proxy: Node | str,
    url: str,
    cacert: Path,
    *extra: str,
) -> subprocess.CompletedProcess[bytes]:
    proxy = node_or_proxy.proxy if isinstance(node_or_proxy, Node) else node_or_proxy
    return await trio.run_process(
        [require_tool("curl"), "-sS", "--max-time", "30", "--proxy", proxy, "--cacert",
         str(cacert), *extra, url],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )  # fmt: skip


@asynccontextmanager
async def serve_node(
    tmp: Path,
    name: str,
    args: Sequence[str],
    *,
    listen: str = "127.0.0.1:0",
    stop_signal: int = signal.SIGINT,
) -> AsyncIterator[Node]:
    """Start ``serve`` with ``args``; wait for its banner; stop it (and check it stopped) after."""
    stdout = tmp / f"{name}.out"
    stderr = tmp / f"{name}.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:  # noqa: ASYNC230 (tiny, local)
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tlsmitm", "serve", "--listen", listen, *args],
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        with trio.fail_after(60):
            while b"Stop with Ctrl-C" not in stdout.read_bytes():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited: {stderr.read_text(errors='replace')}")
                await trio.sleep(0.05)
        text = stdout.read_text()
        proxy = text.split("listening on ")[1].split()[0]
        cacert = Path(text.split("--cacert ")[1].split()[0])
        yield Node(
            process=process,
            proxy=proxy,
            port=int(proxy.rsplit(":", 1)[1]),
            cacert=cacert,
            stdout=stdout,
            stderr=stderr,
        )
    finally:
        if process.returncode is None:
            process.send_signal(stop_signal)
            with trio.move_on_after(30):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
