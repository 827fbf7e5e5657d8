"""``python -m tlsmitm serve`` and ``check`` as a user runs them: subprocesses, sockets, curl."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import require_tool
from origin import OriginStats, serve_tls, server_ssl_context
from pki import DAY, NOW, Hierarchy, good_hierarchy, make_leaf

pytestmark = pytest.mark.e2e

HOST = "www.example.test"


async def _origin(
    nursery: trio.Nursery, tmp: Path, hierarchy: Hierarchy, leaf: object = None
) -> int:
    context = server_ssl_context(leaf or hierarchy.leaf, tmp)  # type: ignore[arg-type]
    stats = OriginStats()

    async def handler(stream: trio.SocketStream) -> None:
        await serve_tls(stream, context, stats)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return int(listeners[0].socket.getsockname()[1])


async def test_serve_prints_a_working_curl_line_and_stops_on_sigint(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    curl = require_tool("curl")
    hierarchy = good_hierarchy(HOST)
    port = await _origin(nursery, tmp_path, hierarchy)
    roots = tmp_path / "origin-root.pem"
    roots.write_bytes(hierarchy.root.pem)
    state = tmp_path / "state"
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
            "--extra-roots",
            str(roots),
            "--resolve",
            f"{HOST}=127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while b"Stop with Ctrl-C" not in output:  # the banner's last line
                chunk = await process.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
        text = output.decode()
        proxy = text.split("listening on ")[1].split()[0]
        curl_line = next(line for line in text.splitlines() if "curl --proxy" in line)
        assert "--cacert" in curl_line
        cacert = curl_line.split("--cacert ")[1].split()[0]
        assert Path(cacert).is_file()
        result = await trio.run_process(
            [
                curl,
                "-sS",
                "--max-time",
                "20",
                "--proxy",
                proxy,
                "--cacert",
                cacert,
                f"https://{HOST}:{port}/",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"hello from origin"
        # `ca export` prints the same root the proxy uses.
        exported = await trio.run_process(
            [sys.executable, "-m", "tlsmitm", "ca", "export", "--state-dir", str(state)],
            capture_stdout=True,
            check=True,
        )
        assert exported.stdout == Path(cacert).read_bytes()
    finally:
        process.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            code = await process.wait()
    assert code == 0


async def test_check_exit_codes(nursery: trio.Nursery, tmp_path: Path) -> None:
    hierarchy = good_hierarchy(HOST)
    good = await _origin(nursery, tmp_path, hierarchy)
    expired = await _origin(
        nursery,
        tmp_path,
        hierarchy,
        make_leaf(hierarchy.intermediate, HOST, not_before=NOW - 30 * DAY, not_after=NOW - DAY),
    )
    roots = tmp_path / "origin-root.pem"
    roots.write_bytes(hierarchy.root.pem)
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()[1]
    closed.close()

    async def check(port: int) -> tuple[int, str]:
        result = await trio.run_process(
            [
                sys.executable,
                "-m",
                "tlsmitm",
                "check",
                f"{HOST}:{port}",
                "--state-dir",
                str(tmp_path / "state"),
                "--extra-roots",
                str(roots),
                "--resolve",
                f"{HOST}=127.0.0.1",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return result.returncode, result.stdout.decode() + result.stderr.decode()

    code, out = await check(good)
    assert code == 0, out
    assert "OK" in out
    code, out = await check(expired)
    assert code == 3, out
    assert "expired" in out
    code, out = await check(dead)
    assert code == 5, out


def test_websocket_max_message_reaches_the_interceptor(tmp_path: Path) -> None:
    from tlsmitm._cli import build_parser
    from tlsmitm._cli_serve import build_interceptor
    from tlsmitm._relay import Interceptor

    parser = build_parser()
    state = ["--state-dir", str(tmp_path / "state")]
    default = build_interceptor(parser.parse_args(["serve", *state]))
    small = build_interceptor(
        parser.parse_args(["serve", *state, "--websocket-max-message", "65536"])
    )
    assert isinstance(default, Interceptor)
    assert isinstance(small, Interceptor)
    assert default.config.websocket_max_message == 16 * 1024 * 1024
    assert small.config.websocket_max_message == 65536
    for bad in ("0", "-5", "16MiB"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *state, "--websocket-max-message", bad])


def test_upstream_pool_seconds_reaches_the_interceptor(tmp_path: Path) -> None:
    from tlsmitm._cli import build_parser
    from tlsmitm._cli_serve import build_interceptor
    from tlsmitm._relay import Interceptor

    parser = build_parser()
    state = ["--state-dir", str(tmp_path / "state")]
    default = build_interceptor(parser.parse_args(["serve", *state]))
    off = build_interceptor(parser.parse_args(["serve", *state, "--upstream-pool-seconds", "0"]))
    assert isinstance(default, Interceptor)
    assert isinstance(off, Interceptor)
    assert default.config.upstream_pool_seconds == 4.0
    assert off.config.upstream_pool_seconds == 0.0
    for bad in ("-1", "inf", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *state, "--upstream-pool-seconds", bad])


async def test_serve_freezes_what_start_up_loaded(tmp_path: Path) -> None:
    """After its warm-up, serve takes the long-lived tables out of the collector's full walks."""
    from tlsmitm import Interceptor
    from tlsmitm._cli_serve import warm_up_then_freeze

    interceptor = Interceptor.from_state_dir(tmp_path / "state")
    gc.unfreeze()
    alive = len(gc.get_objects())
    try:
        await warm_up_then_freeze(interceptor)
        assert gc.get_freeze_count() > alive // 2  # start-up's objects, the tables loaded since
        walked = gc.get_objects()  # what a collection walks: no longer the long-lived objects
        assert len(walked) < alive // 2
        assert not any(obj is interceptor.hsts for obj in walked)
    finally:
        gc.unfreeze()
