"""``tlsmitm serve`` as a subprocess, as a user starts it: its banner, its output, its exit.

Used by the operations tests (logs, shutdown, metrics, systemd), which need the real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from origin import OriginStats, serve_tls, server_ssl_context
from pki import Hierarchy

BANNER_END = b"Stop with Ctrl-C"


@dataclass
class Served:
    process: trio.Process
    proxy: str  # http://127.0.0.1:PORT
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def port(self) -> int:
        return int(self.proxy.rsplit(":", 1)[1])

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signum)
        with trio.fail_after(30):
            return await self.process.wait()


async def _pump(stream: trio.abc.ReceiveStream, sink: bytearray) -> None:
    while chunk := await stream.receive_some(65536):
        sink += chunk


@asynccontextmanager
async def serve(
    state: Path,
    *args: str,
    env: dict[str, str] | None = None,
    listen: str = "127.0.0.1:0",
    wait_for_banner: bool = True,
) -> AsyncIterator[Served]:
    """Start ``tlsmitm serve``; yields once it printed its banner; killed at the end if alive."""
    process = await trio.lowlevel.open_process(
        [
            *(sys.executable, "-m", "tlsmitm", "serve", "--workers", "1"),
            *("--listen", listen, "--state-dir", str(state)),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    assert process.stderr is not None
    served = Served(process=process, proxy="")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, process.stdout, served.stdout)
            nursery.start_soon(_pump, process.stderr, served.stderr)
            if wait_for_banner:
                with trio.fail_after(60):
                    while BANNER_END not in served.stdout:
                        if process.returncode is not None:
                            raise AssertionError(bytes(served.stderr).decode())
                        await trio.sleep(0.02)
                text = served.stdout.decode()
                served.proxy = text.split("listening on ")[1].split()[0]
            yield served
            if process.returncode is None:
                process.kill()
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def start_origin(
    nursery: trio.Nursery, tmp: Path, hierarchy: Hierarchy, leaf: object = None
) -> tuple[int, OriginStats]:
    """A real HTTPS origin on 127.0.0.1 (routes: see ``origin.py``); its port and stats."""
    context = server_ssl_context(leaf or hierarchy.leaf, tmp)  # type: ignore[arg-type]
    stats = OriginStats()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_tls(stream, context, stats)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return int(listeners[0].socket.getsockname()[1]), stats


async def curl(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    from conftest import require_tool

    result = await trio.run_process(
        [require_tool("curl"), "-sS", "--max-time", "20", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def upstream_args(tmp: Path, hierarchy: Hierarchy, host: str) -> Sequence[str]:
    """``--extra-roots`` (the origin's root) and ``--resolve host=127.0.0.1``."""
    roots = tmp / "origin-root.pem"
    roots.write_bytes(hierarchy.root.pem)
    return ("--extra-roots", str(roots), "--resolve", f"{host}=127.0.0.1")
