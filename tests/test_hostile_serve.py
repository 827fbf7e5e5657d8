"""Issue 15's faults against ``python -m tlsmitm serve`` itself: a subprocess, real sockets, curl.

The in-process regressions are in ``tests/test_hostile.py``; these show the same mechanisms hold
in the program users run: one bad request does not end it, it does not connect to itself, it
serves within seconds when its descriptors are scarce, it refuses to be an open proxy.
"""

from __future__ import annotations

import os
import resource
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from conftest import require_tool
from origin import OriginStats, serve_tls, server_ssl_context
from pki import good_hierarchy

from tlsmitm._access import Credentials

pytestmark = pytest.mark.e2e

HOST = "www.example.test"


@dataclass
class Serve:
    process: trio.Process
    port: int
    root_pem: Path
    banner: str
    stderr: bytearray

    @property
    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def alive(self) -> bool:
        return self.process.returncode is None and self.process.poll() is None


@asynccontextmanager
async def serve(
    tmp: Path, *args: str, nofile: int | None = None, state: Path | None = None
) -> AsyncIterator[Serve]:
    def limit() -> None:  # in the child, before exec: a low descriptor limit, soft and hard
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    state = state or tmp / "state"
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "tlsmitm",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
            "--workers",
            "1",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    errors = bytearray()
    output = b""
    async with trio.open_nursery() as nursery:

        async def drain_stderr() -> None:
            assert process.stderr is not None
            while chunk := await process.stderr.receive_some(65536):
                errors.extend(chunk)

        nursery.start_soon(drain_stderr)
        try:
            with trio.fail_after(60):
                while b"Stop with Ctrl-C" not in output:
                    chunk = await process.stdout.receive_some(4096)
                    assert chunk, (output, bytes(errors))
                    output += chunk
            text = output.decode()
            port = int(text.split("listening on http://127.0.0.1:")[1].split()[0])
            root = Path(text.split("CA certificate (trust this in clients): ")[1].split()[0])
            yield Serve(process, port, root, text, errors)
        finally:
            process.terminate()
            with trio.fail_after(30):
                await process.wait()
            nursery.cancel_scope.cancel()


async def tls_origin(nursery: trio.Nursery, tmp: Path) -> tuple[int, Path]:
    hierarchy = good_hierarchy(HOST)
    context = server_ssl_context(hierarchy.leaf, tmp)
    stats = OriginStats()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_tls(stream, context, stats)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    roots = tmp / "origin-root.pem"
    roots.write_bytes(hierarchy.root.pem)
    return listeners[0].socket.getsockname()[1], roots


async def curl_get(proxy_port: int, root: Path, url: str) -> subprocess.CompletedProcess[bytes]:
    curl = require_tool("curl")
    return await trio.run_process(
        [
            curl,
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            f"http://127.0.0.1:{proxy_port}",
            "--cacert",
            str(root),
            url,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(payload)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return data
            if not chunk:
                return data
            data += chunk


async def test_hostile_requests_never_end_serve_nor_loop_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Faults 1, 2 and 8 against the real program, then a normal request through it."""
    origin_port, roots = await tls_origin(nursery, tmp_path)
    async with serve(
        tmp_path, "--extra-roots", str(roots), "--resolve", f"{HOST}=127.0.0.1"
    ) as proxy:
        before = proxy.descriptors
        own = f"127.0.0.1:{proxy.port}"
        cases = [
            (b"GET http://h:99999/ HTTP/1.1\r\nHost: h\r\n\r\n", b"400"),  # fault 1
            (f"CONNECT {own} HTTP/1.1\r\nHost: {own}\r\n\r\n".encode() * 3000, b"508"),  # 2
            (b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),  # 8
            (b"CONNECT bad..host:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),  # 8
            (b"GET http://h.test/ HTTP/1.1\nHost: h.test\n\n", b"400"),  # 8: bare LF
        ]
        for payload, status in cases:
            answer = await trio.to_thread.run_sync(exchange, proxy.port, payload)
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), (payload[:60], answer)
            assert proxy.alive()
        result = await curl_get(proxy.port, proxy.root_pem, f"https://{HOST}:{origin_port}/")
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"hello from origin"
        # No descriptor left behind by 3,000 self-CONNECTs (a few for curl's pooled upstream).
        with trio.fail_after(20):
            while proxy.descriptors > before + 4:
                await trio.sleep(0.1)
    assert b"Traceback" not in proxy.stderr
    assert len(proxy.stderr) < 10_000  # no client bytes dumped into the log


async def test_fault5_scarce_descriptors_still_serve_within_seconds(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """At a descriptor limit of 256, 150 held tunnels: a new request is still served."""
    origin_port, roots = await tls_origin(nursery, tmp_path)

    async def sink(stream: trio.SocketStream) -> None:  # a plain TCP server that never answers
        await trio.sleep_forever()

    sinks = await nursery.start(trio.serve_tcp, sink, 0)
    sink_port = sinks[0].socket.getsockname()[1]
    held: list[trio.SocketStream] = []
    async with serve(
        tmp_path,
        "--extra-roots",
        str(roots),
        "--resolve",
        f"{HOST}=127.0.0.1",
        "--upstream-pool-seconds",
        "0",
        nofile=256,
    ) as proxy:
        assert "At most 96 connections at once" in proxy.banner  # (256 - 64) / 2
        try:
            refused = 0
            for _ in range(150):
                stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
                held.append(stream)
                await stream.send_all(
                    f"CONNECT 127.0.0.1:{sink_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                )
                with trio.fail_after(20):
                    answer = await stream.receive_some(4096)
                if answer.startswith(b"HTTP/1.1 200 "):
                    await stream.send_all(b"not TLS: a raw tunnel, then quiet")
                else:
                    assert answer.startswith(b"HTTP/1.1 503 ") or answer == b"", answer
                    refused += 1
            with trio.move_on_after(1.5):  # the tunnels become idle (sheddable after 1 s)
                await trio.sleep_forever()
            with trio.fail_after(30):  # "within seconds", with a wide margin for a loaded CI
                result = await curl_get(
                    proxy.port, proxy.root_pem, f"https://{HOST}:{origin_port}/"
                )
            assert result.returncode == 0, result.stderr
            assert result.stdout == b"hello from origin"
            assert proxy.alive()
            assert proxy.descriptors <= 256
        finally:
            for stream in held:
                await stream.aclose()
    assert b"Traceback" not in proxy.stderr


async def test_an_open_proxy_is_refused_and_allow_or_auth_opens_it(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "tlsmitm"]
    refused = await trio.run_process(
        [*base, "serve", "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "s")],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert refused.returncode == 2
    lines = refused.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "--allow" in lines[0]
    assert "--auth-file" in lines[0]
    # A plain-text credentials file is refused, with the line.
    plain = tmp_path / "plain.txt"
    plain.write_text("alice:hunter2\n")
    bad = await trio.run_process(
        [
            *base,
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--auth-file",
            str(plain),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert bad.returncode == 1
    assert "plain text" in bad.stderr.decode()
    assert "line 1" in bad.stderr.decode()
    # `tlsmitm passwd` makes a line the file accepts; the password is not in it.
    made = await trio.run_process(
        [*base, "passwd", "alice"], stdin=b"open sesame\n", capture_stdout=True, check=True
    )
    line = made.stdout.decode().strip()
    assert line.startswith("alice:$scrypt$")
    assert "sesame" not in line
    assert Credentials.parse(line).verify("alice", "open sesame")


async def test_a_state_directory_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    async with serve(tmp_path, state=state):
        assert stat.S_IMODE(state.stat().st_mode) == 0o700


async def test_starting_from_a_directory_with_a_tlsmitm_folder(tmp_path: Path) -> None:
    """Item 8: ``MultiplexedPath`` TypeError when the working directory holds ``tlsmitm/``."""
    (tmp_path / "tlsmitm").mkdir()
    result = await trio.run_process(
        [
            sys.executable,
            "-c",
            "from tlsmitm._responder import ErrorResponder; ErrorResponder(profile='page')",
        ],
        cwd=tmp_path,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-500:]
