"""systemd: the notify protocol over a real datagram socket, and the unit under systemd-analyze."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import require_tool
from serve_process import serve

from tlsmitm._systemd import notify, systemd_unit, watchdog_interval

pytestmark = pytest.mark.e2e


async def _receive(sock: trio.socket.SocketType, wanted: bytes, seen: list[bytes]) -> None:
    while not any(wanted in message for message in seen):
        seen.append(await sock.recv(4096))


@pytest.mark.parametrize(
    ("abstract", "workers"), [(False, "1"), (True, "2")], ids=["path-one", "abstract-workers"]
)
async def test_serve_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, abstract: bool, workers: str
) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    if abstract:
        name = f"@tlsmitm-test-{os.getpid()}-{id(sock)}"
        await sock.bind(b"\0" + name[1:].encode())
    else:
        name = str(tmp_path / "notify")
        await sock.bind(name)
    seen: list[bytes] = []
    with sock:
        env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "400000"}  # a ping every 0.2 s
        async with serve(
            tmp_path / "state", "--workers", workers, env=env, wait_for_banner=False
        ) as served:
            with trio.fail_after(60):
                await _receive(sock, b"READY=1", seen)
            ready = next(message for message in seen if b"READY=1" in message)
            # READY comes once the port listens (the banner may still be in the pipe).
            with trio.fail_after(30):
                while b"listening on" not in served.stdout:
                    await trio.sleep(0.02)
            assert f"MAINPID={served.process.pid}".encode() in ready
            port = int(
                served.stdout.decode().split("listening on ")[1].split()[0].rsplit(":", 1)[1]
            )
            connection = await trio.open_tcp_stream("127.0.0.1", port)
            await connection.aclose()
            with trio.fail_after(30):
                while sum(message == b"WATCHDOG=1" for message in seen) < 2:
                    seen.append(await sock.recv(4096))
            served.process.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await _receive(sock, b"STOPPING=1", seen)
                assert await served.process.wait() == 0
        assert b"Traceback" not in served.stderr


def test_without_notify_socket_nothing_is_sent() -> None:
    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": "relative/path"}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": "/nonexistent/socket"}) is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval(environ={"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval(environ={}) is None
    assert watchdog_interval(environ={"WATCHDOG_USEC": "x"}) is None
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(environ=mine) == 1.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(environ=other) is None


@pytest.mark.parametrize(
    "args",
    [[], ["--listen", "0.0.0.0:443", "--transparent"], ["--user", "tlsmitm"]],
    ids=["default", "transparent-low-port", "dedicated-user"],
)
def test_the_printed_unit_passes_systemd_analyze_verify(tmp_path: Path, args: list[str]) -> None:
    analyze = require_tool("systemd-analyze")
    printed = subprocess.run(
        [sys.executable, "-m", "tlsmitm", "systemd-unit", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    unit = tmp_path / "tlsmitm.service"
    unit.write_text(printed.stdout)
    text = printed.stdout
    for line in (
        "Type=notify",
        "StateDirectory=tlsmitm",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "LimitNOFILE=65536",
    ):
        assert line in text.splitlines()
    if "--transparent" in args:
        assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE" in text
    else:
        assert "CapabilityBoundingSet=\n" in text  # no capability at all
    assert ("User=tlsmitm" in text) == ("--user" in args)
    assert ("DynamicUser=yes" in text) != ("--user" in args)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_unit_rejects_what_systemd_analyze_rejects(tmp_path: Path) -> None:
    """The verification step itself catches a broken unit (so the test above means something)."""
    analyze = require_tool("systemd-analyze")
    unit = tmp_path / "tlsmitm.service"
    unit.write_text(
        systemd_unit(executable="/nonexistent/tlsmitm").replace("Type=notify", "Type=bogus")
    )
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0 or result.stderr.strip()
