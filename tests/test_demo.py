"""``tlsmitm demo``, the EICAR example and the package build, run as users run them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import trio
from pki import good_hierarchy
from serve_process import curl, start_origin, upstream_args

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
HOST = "shop.example.test"


def test_the_demo_runs_offline_and_shows_each_step(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tlsmitm", "demo"],
        capture_output=True,
        text=True,
        timeout=60,  # the bound: under a minute, offline
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "answer:   200 'Hello from the demo shop!'" in out
    assert "forged by tlsmitm:    subject CN=shop.demo.test, issuer CN=tlsmitm" in out
    assert "origin's certificate: subject CN=shop.demo.test, issuer CN=Demo Origin Root" in out
    assert "decision: intercept, reason verified, verdict ok" in out
    assert "verdict expired" in out
    assert out.count("redirected to https://error.invalid/error/") == 2  # expired, EICAR
    assert "Try next:" in out
    assert "Traceback" not in result.stderr


async def test_the_eicar_example_runs_as_documented(nursery: trio.Nursery, tmp_path: Path) -> None:
    hierarchy = good_hierarchy(HOST)
    port, _ = await start_origin(nursery, tmp_path, hierarchy)
    state = tmp_path / "state"
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            str(ROOT / "examples" / "eicar_filter.py"),
            *("--listen", "127.0.0.1:0", "--state-dir", str(state)),
            *upstream_args(tmp_path, hierarchy, HOST),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        output = b""
        with trio.fail_after(60):
            while b"listening" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
        proxy = "http://" + output.decode().split("http://")[1].split()[0]
        cacert = str(state / "ca" / "root.pem")
        clean = await curl("--proxy", proxy, "--cacert", cacert, f"https://{HOST}:{port}/")
        assert clean.stdout == b"hello from origin"
        blocked = await curl(
            "--proxy", proxy, "--cacert", cacert, "-o", "/dev/null",
            "-w", "%{http_code} %{redirect_url}", f"https://{HOST}:{port}/eicar",
        )  # fmt: skip
        status, location = blocked.stdout.decode().split()
        assert status == "303"
        assert location.startswith("https://error.invalid/error/")
    finally:
        process.terminate()
        with trio.fail_after(30):
            await process.wait()


@pytest.mark.slow
def test_the_package_builds_without_warnings_and_ships_the_templates(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "absent from the `packages` configuration" not in output
    assert "BuildBackendWarning" not in output
    (wheel,) = tmp_path.glob("tlsmitm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "tlsmitm/templates/page.html" in names
    assert "tlsmitm/py.typed" in names
    assert "tlsmitm/_relay/interceptor.py" in names
