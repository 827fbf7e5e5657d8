"""``tlsmitm ca install --nss-db`` / ``ca uninstall`` with Chromium: trusted, then not.

A fresh NSS database (what Chromium on Linux trusts) gets tlsmitm's root through ``ca install``
alone; Chromium then loads an intercepted page without a warning. After ``ca uninstall``, a new
Chromium gets its certificate warning back. Both commands are run twice: the second run changes
nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_tool
from harness import (
    CERT_ERROR,
    DELIVERED,
    Fleet,
    ServerTls,
    Site,
    TlsmitmServe,
    chromium_args,
    chromium_env,
    chromium_executable,
    chromium_goto,
)
from pki import make_intermediate, make_leaf, make_root

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

HOST = "www.example.test"


def _ca(*args: str, state: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tlsmitm", "ca", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _visit(playwright: object, home: Path, proxy_port: int, url: str, marker: bytes) -> str:
    browser = playwright.chromium.launch(  # type: ignore[attr-defined]
        executable_path=chromium_executable(),
        args=chromium_args(proxy_port),
        env=chromium_env(home),
    )
    try:
        page = browser.new_context().new_page()
        outcome = chromium_goto(page, url, marker)
        return outcome.label + (f" {outcome.detail}" if outcome.detail else "")
    finally:
        browser.close()


def test_ca_install_makes_chromium_trust_the_proxy_and_uninstall_undoes_it(tmp_path: Path) -> None:
    require_tool("chromium")
    certutil = require_tool("certutil")
    from playwright.sync_api import sync_playwright

    root = make_root("Trust Lab Root")
    leaf = make_leaf(make_intermediate(root, "Trust Lab Intermediate"), HOST)
    roots = tmp_path / "upstream-roots.pem"
    roots.write_bytes(root.pem)
    fleet = Fleet(tmp_path / "origins")
    origin = fleet.add(
        "trust", ServerTls(chain=leaf.chain_pem(), key=leaf.key_pem), Site("trusted page 7d1e")
    )
    proxy = TlsmitmServe(
        tmp_path / "serve", profile="native", extra_roots=roots, resolve=[f"{HOST}=127.0.0.1"]
    )
    state = tmp_path / "serve" / "state"
    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(
        [certutil, "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, timeout=60
    )
    url = f"https://{HOST}:{origin.port}/" if origin.port else ""
    playwright = None
    try:
        fleet.start()
        url = f"https://{HOST}:{origin.port}/"
        proxy.start()
        playwright = sync_playwright().start()
        marker = origin.marker

        # Nothing installed yet: Chromium warns (the forged leaf chains to an unknown root).
        assert _visit(playwright, home, proxy.port, url, marker).startswith(CERT_ERROR)

        first = _ca("install", "--nss-db", str(nssdb), state=state)
        assert "trusted in" in first
        again = _ca("install", "--nss-db", str(nssdb), state=state)
        assert "nothing changed" in again
        assert _visit(playwright, home, proxy.port, url, marker) == DELIVERED

        removed = _ca("uninstall", "--nss-db", str(nssdb), state=state)
        assert "removed from" in removed
        assert "nothing changed" in _ca("uninstall", "--nss-db", str(nssdb), state=state)
        assert _visit(playwright, home, proxy.port, url, marker).startswith(CERT_ERROR)
    finally:
        if playwright is not None:
            playwright.stop()
        code = proxy.stop()
        fleet.stop()
    assert code == 0


def test_ca_install_system_into_a_private_root(tmp_path: Path) -> None:
    """``--system`` through Debian's update-ca-certificates, under a private root (the machine's
    own trust store is never touched); the bundle gains the root and loses it again."""
    require_tool("update-ca-certificates")
    state = tmp_path / "state"
    _ca("init", state=state)
    root_pem = _ca("export", state=state)
    system = tmp_path / "sysroot"
    for directory in ("etc/ssl/certs", "usr/share/ca-certificates", "etc/ca-certificates/update.d"):
        (system / directory).mkdir(parents=True)
    # One distribution certificate, as on a real system (the bundle is rebuilt from the rest).
    distro = make_root("Distro").pem
    (system / "usr/share/ca-certificates/distro-root.crt").write_bytes(distro)
    (system / "etc" / "ca-certificates.conf").write_text("distro-root.crt\n")
    bundle = system / "etc" / "ssl" / "certs" / "ca-certificates.crt"
    body = root_pem.split("-----BEGIN CERTIFICATE-----")[1].split("-----END")[0].strip()

    assert "added to the system store" in _ca(
        "install", "--system", "--root-dir", str(system), state=state
    )
    assert body in bundle.read_text()
    assert "nothing changed" in _ca("install", "--system", "--root-dir", str(system), state=state)
    assert "removed from the system store" in _ca(
        "uninstall", "--system", "--root-dir", str(system), state=state
    )
    assert body not in bundle.read_text()
    assert "nothing changed" in _ca("uninstall", "--system", "--root-dir", str(system), state=state)
    distro_body = distro.decode().split("-----BEGIN CERTIFICATE-----")[1].split("-----END")[0]
    assert distro_body.strip() in bundle.read_text()  # the distribution certificate stays


def test_ca_install_without_a_target_prints_what_to_do_elsewhere(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _ca("init", state=state)
    out = _ca("install", state=state)
    for platform in ("macOS", "Windows", "Firefox"):
        assert platform in out
