"""``python -m tlsmitm ca init|export|show|rotate``, run as a subprocess in a temporary home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment whose home and data directories are inside ``tmp_path``."""
    home = tmp_path / "home"
    home.mkdir()
    out = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TLSMITM_STATE_DIR", "TLSMITM_CA_PASSPHRASE", "XDG_DATA_HOME")
    }
    out["HOME"] = str(home)
    out["PYTHONPATH"] = str(REPO)
    return out


def tlsmitm(env: dict[str, str], *args: str, expect: int = 0) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [sys.executable, "-m", "tlsmitm", "ca", *args],
        env=env,
        capture_output=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == expect, result.stdout.decode() + result.stderr.decode()
    assert b"Traceback" not in result.stderr
    return result


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def files_of(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_init_creates_the_ca_and_explains_how_to_trust_it(env: dict[str, str], state: Path) -> None:
    out = tlsmitm(env, "init", "--state-dir", str(state)).stdout.decode()
    assert f"Created a new tlsmitm CA in {state / 'ca'}" in out
    root = x509.load_pem_x509_certificate((state / "ca" / "root.pem").read_bytes())
    fingerprint = ":".join(f"{b:02X}" for b in root.fingerprint(hashes.SHA256()))
    assert fingerprint in out
    for platform in (
        "update-ca-certificates",
        "update-ca-trust",
        "certutil -d sql:$HOME/.pki/nssdb",
        "policies.json",
        "security add-trusted-cert",
        "certutil -addstore Root",
        "keytool -importcert",
        "Android/iOS",
    ):
        assert platform in out, platform
    assert "docs/trust.rst" in out
    assert f"--state-dir {state}" in out  # the printed commands work as they are
    assert oct((state / "ca").stat().st_mode & 0o777) == "0o700"


def test_init_twice_leaves_the_ca_untouched(env: dict[str, str], state: Path) -> None:
    tlsmitm(env, "init", "--state-dir", str(state))
    before = files_of(state / "ca")
    out = tlsmitm(env, "init", "--state-dir", str(state), "--key-type", "rsa3072").stdout
    assert b"already exists" in out
    assert files_of(state / "ca") == before


def test_default_state_dir_follows_xdg(env: dict[str, str], tmp_path: Path) -> None:
    tlsmitm(env, "init")
    assert (Path(env["HOME"]) / ".local" / "share" / "tlsmitm" / "ca" / "ca.json").exists()
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    tlsmitm(env, "init")
    assert (tmp_path / "xdg" / "tlsmitm" / "ca" / "ca.json").exists()
    a = tlsmitm(env, "export").stdout
    del env["XDG_DATA_HOME"]
    b = tlsmitm(env, "export").stdout
    assert a != b  # two installations, two roots


def test_export_pem_der_and_crl(env: dict[str, str], state: Path) -> None:
    tlsmitm(env, "init", "--state-dir", str(state))
    pem = tlsmitm(env, "export", "--state-dir", str(state)).stdout
    assert pem == (state / "ca" / "root.pem").read_bytes()
    der = tlsmitm(env, "export", "--der", "--state-dir", str(state)).stdout
    assert x509.load_der_x509_certificate(der) == x509.load_pem_x509_certificate(pem)
    crl = x509.load_der_x509_crl(tlsmitm(env, "export", "--crl", "--state-dir", str(state)).stdout)
    assert crl.issuer == x509.load_pem_x509_certificate(pem).subject
    # the error CA is never exported
    error_ca = (state / "ca" / "error-ca.pem").read_bytes()
    assert error_ca not in pem


def test_show_describes_the_ca_and_its_key_protection(
    env: dict[str, str], state: Path, tmp_path: Path
) -> None:
    tlsmitm(env, "init", "--state-dir", str(state), "--exclude", "bank.example")
    out = tlsmitm(env, "show", "--state-dir", str(state)).stdout.decode()
    root = x509.load_pem_x509_certificate((state / "ca" / "root.pem").read_bytes())
    assert root.subject.rfc4514_string() in out
    assert ":".join(f"{b:02X}" for b in root.fingerprint(hashes.SHA256())) in out
    assert f"{root.not_valid_after_utc:%Y-%m-%d}" in out
    assert "root.key: not encrypted, mode 0600" in out
    assert "intermediate-1.key: not encrypted, mode 0600" in out
    assert "Name constraints (never vouches for): bank.example" in out
    assert "consider moving it offline" in out
    # the root key moved offline: show still works and says so
    (state / "ca" / "root.key").rename(tmp_path / "root.key")
    out = tlsmitm(env, "show", "--state-dir", str(state)).stdout.decode()
    assert "not here (offline)" in out
    assert "consider moving it offline" not in out


def test_rotate_keeps_the_root_and_revokes_the_old_intermediate(
    env: dict[str, str], state: Path
) -> None:
    tlsmitm(env, "init", "--state-dir", str(state))
    root = (state / "ca" / "root.pem").read_bytes()
    old = x509.load_pem_x509_certificate((state / "ca" / "intermediate-1.pem").read_bytes())
    out = tlsmitm(env, "rotate", "--state-dir", str(state)).stdout.decode()
    assert "generation 2" in out
    assert (state / "ca" / "root.pem").read_bytes() == root
    crl = x509.load_der_x509_crl(tlsmitm(env, "export", "--crl", "--state-dir", str(state)).stdout)
    assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
    assert "generation 2" in tlsmitm(env, "show", "--state-dir", str(state)).stdout.decode()


def test_passphrase_from_env_and_file(env: dict[str, str], state: Path, tmp_path: Path) -> None:
    env["CA_SECRET"] = "hunter2 hunter2"
    tlsmitm(env, "init", "--state-dir", str(state), "--passphrase-env", "CA_SECRET")
    key = (state / "ca" / "root.key").read_bytes()
    assert key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    serialization.load_pem_private_key(key, b"hunter2 hunter2")
    show = tlsmitm(env, "show", "--state-dir", str(state)).stdout.decode()
    assert "root.key: passphrase-encrypted" in show
    # rotating needs it
    failed = tlsmitm(env, "rotate", "--state-dir", str(state), expect=1)
    assert b"passphrase" in failed.stderr
    assert b"hunter2" not in failed.stderr + failed.stdout
    secret_file = tmp_path / "secret"
    secret_file.write_text("hunter2 hunter2\n")
    tlsmitm(env, "rotate", "--state-dir", str(state), "--passphrase-file", str(secret_file))
    env["TLSMITM_CA_PASSPHRASE"] = "hunter2 hunter2"  # the default variable, when set
    tlsmitm(env, "rotate", "--state-dir", str(state))
    assert "generation 3" in tlsmitm(env, "show", "--state-dir", str(state)).stdout.decode()


def test_errors_are_one_clear_line(env: dict[str, str], state: Path) -> None:
    missing = tlsmitm(env, "show", "--state-dir", str(state), expect=1)
    assert b"ca init" in missing.stderr
    tlsmitm(env, "init", "--state-dir", str(state))
    key = state / "ca" / "intermediate-1.key"
    key.chmod(0o644)
    loose = tlsmitm(env, "show", "--state-dir", str(state), expect=1)
    assert f"chmod 600 {key}".encode() in loose.stderr
    key.chmod(0o600)
    key.write_bytes(b"damaged")
    before = files_of(state / "ca")
    damaged = tlsmitm(env, "init", "--state-dir", str(state), expect=1)
    assert b"damaged" in damaged.stderr
    assert files_of(state / "ca") == before
    bad = tlsmitm(env, "init", "--state-dir", str(state / "x"), "--exclude", ".x.com", expect=1)
    assert b"leading dot" in bad.stderr
