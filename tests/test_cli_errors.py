"""Errors a user can cause: one line on stderr naming the problem and the fix, exit 2 or 1.

Every case runs the real command line as a subprocess, as a user would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import require_tool

pytestmark = pytest.mark.e2e


def tlsmitm(
    *args: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tlsmitm", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--listen", "no-such-host.invalid:8080"], ["--listen", "IP address", "127.0.0.1"]),
        (["--listen", "8080"], ["--listen", "HOST:PORT"]),
        (["--listen", "127.0.0.1:70000"], ["--listen", "HOST:PORT"]),
        (["--resolve", "example.test=not-an-ip"], ["--resolve", "not an IP address"]),
        (["--resolve", "example.test"], ["--resolve", "NAME=ADDR"]),
        (["--bypass", "category:"], ["--bypass", "nothing after 'category:'"]),
        (["--bypass", "category:finance"], ["--bypass", "never match", "by host"]),
        (["--bypass", "port:x"], ["--bypass", "port 'x'"]),
        (["--upstream-pool-seconds", "-1"], ["--upstream-pool-seconds"]),
        (["--log-format", "xml"], ["--log-format"]),
    ],
)
def test_usage_errors_are_one_line_with_status_2(
    tmp_path: Path, args: list[str], expected: list[str]
) -> None:
    state = tmp_path / "state"
    result = tlsmitm("serve", "--state-dir", str(state), *args)
    assert result.returncode == 2, result.stderr
    line = one_line(result)
    assert line.startswith("tlsmitm serve: error:"), line
    assert "--help" in line
    for fragment in expected:
        assert fragment in line, line
    assert not state.exists()  # validated before anything started


def test_check_validates_resolve_too(tmp_path: Path) -> None:
    result = tlsmitm("check", "example.test", "--resolve", "example.test=1.2.3")
    assert result.returncode == 2
    assert "not an IP address" in one_line(result)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = tlsmitm("serve", "--state-dir", str(tmp_path), "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    line = one_line(result)
    assert f"127.0.0.1:{port}" in line
    assert "already in use" in line
    assert "--listen" in line


def test_low_port_without_privilege(tmp_path: Path) -> None:
    prefix: list[str] = []
    if os.geteuid() == 0:  # root may bind low ports: take the capability away, as for a user
        prefix = [require_tool("setpriv"), "--bounding-set", "-net_bind_service"]
    result = tlsmitm(
        "serve", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:81", prefix=prefix
    )
    assert result.returncode == 1
    line = one_line(result)
    assert "permission denied" in line
    assert "1024" in line


def test_address_not_on_this_machine(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never assigned to a real interface.
    result = tlsmitm(
        "serve", "--state-dir", str(tmp_path), "--listen", "192.0.2.1:8080", "--allow", "10.0.0.0/8"
    )
    assert result.returncode == 1
    assert "not an address of this machine" in one_line(result)


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    result = tlsmitm("serve", "--state-dir", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert "not a directory" in one_line(result)


def test_corrupt_ca_in_state_dir(tmp_path: Path) -> None:
    assert tlsmitm("ca", "init", "--state-dir", str(tmp_path)).returncode == 0
    (tmp_path / "ca" / "root.pem").write_text("garbage\n")
    result = tlsmitm("serve", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    line = one_line(result)
    assert "root.pem" in line
    assert "damaged" in line


def test_corrupt_state_store(tmp_path: Path) -> None:
    assert tlsmitm("ca", "init", "--state-dir", str(tmp_path)).returncode == 0
    (tmp_path / "state.sqlite3").write_bytes(b"this is not SQLite" * 100)
    result = tlsmitm("serve", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert "corrupted" in one_line(result)


def test_wrong_ca_passphrase(tmp_path: Path) -> None:
    created = tlsmitm(
        "ca", "init", "--state-dir", str(tmp_path), env={"TLSMITM_CA_PASSPHRASE": "right"}
    )
    assert created.returncode == 0, created.stderr
    result = tlsmitm(
        "ca", "rotate", "--state-dir", str(tmp_path), env={"TLSMITM_CA_PASSPHRASE": "wrong"}
    )
    assert result.returncode == 1
    assert "wrong passphrase" in one_line(result)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    result = tlsmitm("serve", "--debug", "--state-dir", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "ConfigurationError" in result.stderr


def test_help_names_the_program_tlsmitm() -> None:
    result = tlsmitm("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: tlsmitm ")
    script = Path(sys.executable).with_name("tlsmitm")
    installed = subprocess.run(
        [str(script), "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert installed.stdout.startswith("usage: tlsmitm serve ")


def test_run_script_passes_any_command_through(tmp_path: Path) -> None:
    run = Path(__file__).resolve().parents[1] / "run"
    state = str(tmp_path / "state")
    usage = subprocess.run([str(run)], capture_output=True, text=True, timeout=600, check=False)
    assert usage.returncode == 2
    assert "./run COMMAND" in usage.stderr
    init = subprocess.run(
        [str(run), "ca", "init", "--state-dir", state],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert init.returncode == 0, init.stderr
    export = subprocess.run(
        [str(run), "ca", "export", "--state-dir", state],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert export.returncode == 0, export.stderr
    assert export.stdout == (tmp_path / "state" / "ca" / "root.pem").read_text()
    bad = subprocess.run(
        [str(run), "check", "example.test", "--resolve", "example.test=x"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert bad.returncode == 2
    assert "not an IP address" in bad.stderr
