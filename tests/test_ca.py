"""CertificateAuthority: generation, shape, key protection, rotation, CRL, corrupted states.

Matrix section A: CA-01 (unique per installation), CA-02 (key protection), CA-05 (root shape).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import pickle
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

from tlsmitm import ConfigurationError, _der
from tlsmitm import _ca as ca_module
from tlsmitm._ca import CertificateAuthority, IssuerKind, passphrase_from_env
from tlsmitm._forge import CertForge

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full-strength PBKDF2 is tested once (test_encrypted_root_key_format); elsewhere, fast."""
    monkeypatch.setattr(ca_module, "PBKDF2_ITERATIONS", 1000)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def created(state: Path) -> CertificateAuthority:
    return CertificateAuthority.create(state, now=NOW)


def spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``directory``: content, mode and mtime (to prove nothing changed)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        st = path.stat()
        content = path.read_bytes() if path.is_file() else b""
        out[str(path.relative_to(directory))] = (content, st.st_mode, st.st_mtime_ns)
    return out


# -- CA-01: unique per installation ------------------------------------------------------------


def test_two_installations_never_share_a_key_matrix_ca01(tmp_path: Path) -> None:
    one = CertificateAuthority.create(tmp_path / "one", now=NOW)
    two = CertificateAuthority.create(tmp_path / "two", now=NOW)
    for a, b in zip(one.own_certificates(), two.own_certificates(), strict=True):
        assert spki(a) != spki(b)
    assert one.installation_id != two.installation_id
    assert one.root_certificate.subject != two.root_certificate.subject
    # and within one installation, root, intermediate and error CA keys differ
    assert len({spki(c) for c in one.own_certificates()}) == 3


# -- CA-05: the shape of the CA certificates ---------------------------------------------------


def _check_ca_shape(cert: x509.Certificate, path_length: int) -> None:
    ext = cert.extensions
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca is True
    assert basic.value.path_length == path_length
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    assert not usage.value.key_encipherment
    assert not usage.value.content_commitment
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]  # no code signing, mail, client
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert cert.version is x509.Version.v3


def test_root_shape_matrix_ca05(created: CertificateAuthority) -> None:
    root = created.root_certificate
    _check_ca_shape(root, path_length=1)
    root.verify_directly_issued_by(root)
    assert root.not_valid_before_utc <= NOW - DAY
    assert root.not_valid_after_utc - root.not_valid_before_utc <= dt.timedelta(days=3652)
    org = root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    common = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert org == "tlsmitm"
    assert "tlsmitm" in common
    assert created.installation_id in common
    # the subject holds no secret: only the product, the installation id and fixed words
    words = {w for a in root.subject for w in str(a.value).split()}
    assert words <= {"tlsmitm", "root", "CA", "installation", created.installation_id}
    with pytest.raises(x509.ExtensionNotFound):  # only when the deployer asks for them
        root.extensions.get_extension_for_class(x509.NameConstraints)


def test_intermediate_and_error_ca_shape(created: CertificateAuthority) -> None:
    intermediate = created.intermediate_certificate
    _check_ca_shape(intermediate, path_length=0)
    intermediate.verify_directly_issued_by(created.root_certificate)
    assert intermediate.not_valid_after_utc <= created.root_certificate.not_valid_after_utc
    error = created.error_ca_certificate
    _check_ca_shape(error, path_length=0)
    error.verify_directly_issued_by(error)
    assert "never trusted" in error.subject.rfc4514_string()
    assert error.subject != created.root_certificate.subject


def test_name_constraints_are_critical_excluded_subtrees_on_both_cas(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(
        tmp_path / "s",
        now=NOW,
        name_constraints_excluded=["Bank.Example.", "10.0.0.0/8", "2001:db8::/32", "192.0.2.1"],
    )
    assert ca.name_constraints_excluded == (
        "bank.example",
        "10.0.0.0/8",
        "2001:db8::/32",
        "192.0.2.1/32",
    )
    for cert in (ca.root_certificate, ca.intermediate_certificate):
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
        assert constraints.critical
        assert constraints.value.permitted_subtrees is None
        assert len(constraints.value.excluded_subtrees or []) == 4
    ca.rotate_intermediate(now=NOW)
    rotated = ca.intermediate_certificate.extensions.get_extension_for_class(x509.NameConstraints)
    assert len(rotated.value.excluded_subtrees or []) == 4
    assert ca.is_excluded("www.bank.example")
    assert ca.is_excluded("10.20.30.40")
    assert not ca.is_excluded("bankexample.com")
    with pytest.raises(x509.ExtensionNotFound):
        ca.error_ca_certificate.extensions.get_extension_for_class(x509.NameConstraints)


@pytest.mark.parametrize("bad", [".example.com", "*.example.com", "10.1.2.3/8", "a..b", "x/99"])
def test_bad_name_constraints_are_refused(state: Path, bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CertificateAuthority.create(state, now=NOW, name_constraints_excluded=[bad])
    assert info.value.reason == "name_constraint"
    assert not state.exists()


@pytest.mark.parametrize(
    ("key_type", "curve_or_size", "digest"),
    [("ec384", "secp384r1", hashes.SHA384), ("rsa2048", 2048, hashes.SHA256)],
)
def test_key_type_options(
    state: Path, key_type: str, curve_or_size: object, digest: type[hashes.HashAlgorithm]
) -> None:
    ca = CertificateAuthority.create(state, now=NOW, key_type=key_type)
    for cert in ca.own_certificates():
        key = cert.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            assert key.curve.name == curve_or_size
        else:
            assert isinstance(key, rsa.RSAPublicKey)
            assert key.key_size == curve_or_size
        assert isinstance(cert.signature_hash_algorithm, digest)
    assert CertificateAuthority.load(state).key_type == key_type


def test_unknown_key_type_is_refused(state: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        CertificateAuthority.create(state, now=NOW, key_type="dsa1024")
    assert info.value.reason == "key_type"


def test_naive_now_is_refused(state: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        CertificateAuthority.create(state, now=dt.datetime(2026, 1, 1))


# -- the chain validates in openssl -x509_strict ---------------------------------------------


def test_exported_root_verifies_leaves_with_openssl_cli(
    tmp_path: Path, created: CertificateAuthority
) -> None:
    openssl = require_tool("openssl")
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(created.export_root())
    assert created.export_root(der=True) == created.root_certificate.public_bytes(
        serialization.Encoding.DER
    )
    forge = CertForge(created)
    paths = []
    for index, host in enumerate(["a.example", "b.example", "192.0.2.9"]):
        leaf = forge.leaf_for(host, now=NOW)
        path = tmp_path / f"leaf{index}.pem"
        path.write_bytes(
            leaf.certificate.public_bytes(serialization.Encoding.PEM)
            + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in leaf.chain)
        )
        paths.append(path)
    for path in paths:
        result = subprocess.run(
            [
                openssl,
                "verify",
                "-x509_strict",
                "-purpose",
                "sslserver",
                "-attime",
                str(int(NOW.timestamp())),
                "-CAfile",
                str(root_pem),
                "-untrusted",
                str(path),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr


# -- CA-02: key protection ---------------------------------------------------------------------


def test_directory_and_files_are_private_whatever_the_umask(state: Path) -> None:
    old = os.umask(0)
    try:
        ca = CertificateAuthority.create(state, now=NOW)
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert ca.ca_dir is not None
    assert stat.S_IMODE(ca.ca_dir.stat().st_mode) == 0o700
    files = list(ca.ca_dir.iterdir())
    assert {p.name for p in files} >= {"root.key", "intermediate-1.key", "error-ca.key", "ca.json"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_files_are_private_before_the_first_byte_is_written(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[int] = []
    real_write = os.write

    def spying_write(fd: int, data: bytes | memoryview) -> int:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    old = os.umask(0)
    monkeypatch.setattr(ca_module.os, "write", spying_write)
    try:
        CertificateAuthority.create(state, now=NOW)
    finally:
        os.umask(old)
    assert modes
    assert set(modes) == {0o600}


def test_a_failed_write_leaves_no_temporary_file(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ca_module.os, "fsync", failing_fsync)
    with pytest.raises(ConfigurationError, match="No space left") as info:
        CertificateAuthority.create(state, now=NOW)
    assert info.value.reason == "io"
    assert [p.name for p in (state / "ca").iterdir() if p.name != ".lock"] == []


def test_a_state_dir_that_is_a_file_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigurationError) as info:
        CertificateAuthority.load_or_create(tmp_path / "file", now=NOW)
    assert info.value.reason == "io"


@pytest.mark.parametrize("name", ["root.key", "intermediate-1.key", "error-ca.key"])
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_loose_key_files_are_refused_with_the_fix(
    created: CertificateAuthority, state: Path, name: str, mode: int
) -> None:
    path = state / "ca" / name
    path.chmod(mode)
    with pytest.raises(ConfigurationError) as info:
        CertificateAuthority.load(state)
    assert info.value.reason == "key_permissions"
    assert f"chmod 600 {path}" in str(info.value)
    assert f"{mode:04o}" in str(info.value)
    path.chmod(0o600)
    CertificateAuthority.load(state)


def test_loose_ca_directory_is_refused(created: CertificateAuthority, state: Path) -> None:
    (state / "ca").chmod(0o755)
    with pytest.raises(ConfigurationError, match="chmod 700") as info:
        CertificateAuthority.load(state)
    assert info.value.reason == "key_permissions"


def test_state_directory_writable_by_others_is_refused(
    created: CertificateAuthority, state: Path
) -> None:
    state.chmod(0o777)
    with pytest.raises(ConfigurationError, match="chmod go-w") as info:
        CertificateAuthority.load(state)
    assert info.value.reason == "key_permissions"
    state.chmod(0o755)  # readable by others is fine: ca/ itself is 0700
    CertificateAuthority.load(state)


def test_key_owned_by_another_user_is_refused(
    created: CertificateAuthority, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = state / "ca" / "intermediate-1.key"
    if os.geteuid() == 0:
        os.chown(path, 4242, -1)
    else:  # pragma: no cover - only root can give files away; pretend to be someone else
        monkeypatch.setattr(ca_module, "_euid", lambda: os.geteuid() + 1)
    with pytest.raises(ConfigurationError, match="owned by uid") as info:
        CertificateAuthority.load(state)
    assert info.value.reason == "key_owner"
    assert "chown" in str(info.value)


def _secret_strings(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> list[str]:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    body = "".join(pem.splitlines()[1:-1])
    out = [body[i : i + 24] for i in range(0, len(body) - 24, 24)]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        value = key.private_numbers().private_value
        out += [str(value), f"{value:x}", f"{value:X}"]
    return out


def _all_text(exc: BaseException) -> str:
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(current.args)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def test_keys_never_appear_in_repr_str_or_exceptions(
    created: CertificateAuthority, state: Path
) -> None:
    secrets = []
    for role in (IssuerKind.TRUSTED, IssuerKind.ERROR):
        secrets += _secret_strings(created._signer(role).key)
    root_pem = (state / "ca" / "root.key").read_bytes()
    root_key = serialization.load_pem_private_key(root_pem, None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    secrets += _secret_strings(root_key)
    texts = [repr(created), str(created), repr(created._signer(IssuerKind.TRUSTED))]
    # exceptions raised while handling the keys: corrupt, mismatched, wrong passphrase
    key_path = state / "ca" / "intermediate-1.key"
    original = key_path.read_bytes()
    key_path.write_bytes(original[: len(original) // 2])
    with pytest.raises(ConfigurationError) as corrupt:
        CertificateAuthority.load(state)
    texts.append(_all_text(corrupt.value))
    key_path.write_bytes((state / "ca" / "error-ca.key").read_bytes())
    with pytest.raises(ConfigurationError) as mismatch:
        CertificateAuthority.load(state)
    texts.append(_all_text(mismatch.value))
    key_path.write_bytes(original)
    for text in texts:
        for secret in secrets:
            assert secret not in text
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(created)


# -- passphrases -------------------------------------------------------------------------------


def test_passphrase_round_trip(state: Path) -> None:
    CertificateAuthority.create(state, now=NOW, passphrase=b"correct horse")
    key_file = (state / "ca" / "root.key").read_bytes()
    assert key_file.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    # loading needs no passphrase (the proxy never uses the root key) ...
    loaded = CertificateAuthority.load(state)
    assert {s.role: s.encrypted for s in loaded.key_files()} == {
        "root": True,
        "intermediate": False,
        "error-ca": False,
    }
    # ... but rotating does
    with pytest.raises(ConfigurationError, match="passphrase") as missing:
        loaded.rotate_intermediate(now=NOW)
    assert missing.value.reason == "passphrase"
    with pytest.raises(ConfigurationError, match="wrong passphrase") as wrong:
        loaded.rotate_intermediate(now=NOW, passphrase=b"battery staple")
    assert wrong.value.reason == "passphrase"
    assert "correct horse" not in _all_text(wrong.value)
    loaded.rotate_intermediate(now=NOW, passphrase=lambda: b"correct horse")
    assert loaded.generation == 2


def test_wrong_passphrase_at_load_is_refused(state: Path) -> None:
    CertificateAuthority.create(state, now=NOW, passphrase=b"right")
    with pytest.raises(ConfigurationError) as info:
        CertificateAuthority.load(state, passphrase=b"wrong")
    assert info.value.reason == "passphrase"
    ca = CertificateAuthority.load(state, passphrase=b"right")
    ca.rotate_intermediate(now=NOW)  # remembered from load
    assert ca.generation == 2


def test_passphrase_from_the_environment(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_CA_SECRET", "from env")
    CertificateAuthority.create(state, now=NOW, passphrase=passphrase_from_env("MY_CA_SECRET"))
    key = serialization.load_pem_private_key((state / "ca" / "root.key").read_bytes(), b"from env")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    monkeypatch.delenv("MY_CA_SECRET")
    with pytest.raises(ConfigurationError, match="MY_CA_SECRET") as info:
        CertificateAuthority.load(state, passphrase=passphrase_from_env("MY_CA_SECRET"))
    assert info.value.reason == "passphrase"


def test_empty_passphrase_is_refused(state: Path) -> None:
    with pytest.raises(ConfigurationError, match="empty"):
        CertificateAuthority.create(state, now=NOW, passphrase=b"")
    assert not state.exists()


def test_encrypted_root_key_format(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Full strength, and readable by the openssl CLI with the same passphrase.
    monkeypatch.setattr(ca_module, "PBKDF2_ITERATIONS", 600_000)
    ca = CertificateAuthority.create(state, now=NOW, passphrase=b"s3cret")
    pem = (state / "ca" / "root.key").read_bytes()
    body = b"".join(pem.splitlines()[1:-1])
    info = base64.b64decode(body)
    assert _der.oid("1.2.840.113549.1.5.13") in info  # PBES2
    assert _der.oid("1.2.840.113549.1.5.12") in info  # PBKDF2
    assert _der.oid("1.2.840.113549.2.9") in info  # HMAC-SHA256
    assert _der.oid("2.16.840.1.101.3.4.1.42") in info  # AES-256-CBC
    assert _der.integer(600_000) in info
    openssl = require_tool("openssl")
    result = subprocess.run(
        [
            openssl,
            "pkey",
            "-in",
            str(state / "ca" / "root.key"),
            "-passin",
            "pass:s3cret",
            "-pubout",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert (
        x509.load_pem_x509_certificate(ca.export_root())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        == result.stdout
    )


# -- rotation and the CRL ---------------------------------------------------------------------


def test_rotation_keeps_the_root_and_revokes_the_old_intermediate(
    created: CertificateAuthority, state: Path
) -> None:
    root_before = created.export_root()
    old = created.intermediate_certificate
    created.rotate_intermediate(now=NOW + DAY)
    assert created.export_root() == root_before
    assert created.generation == 2
    new = created.intermediate_certificate
    assert spki(new) != spki(old)
    new.verify_directly_issued_by(created.root_certificate)
    assert created.retired_intermediates == (old,)
    assert old in created.own_certificates()
    crl = created.crl(now=NOW + DAY)
    assert crl.is_signature_valid(created.root_certificate.public_key())  # type: ignore[arg-type]
    assert crl.issuer == created.root_certificate.subject
    entry = crl.get_revoked_certificate_by_serial_number(old.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.superseded
    assert crl.get_revoked_certificate_by_serial_number(new.serial_number) is None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    # the old intermediate's key is gone, its certificate stays for the record
    names = {p.name for p in (state / "ca").iterdir()}
    assert "intermediate-1.key" not in names
    assert {"intermediate-1.pem", "intermediate-2.pem", "intermediate-2.key"} <= names
    # and a fresh load sees exactly the same thing
    reloaded = CertificateAuthority.load(state)
    assert reloaded.generation == 2
    assert reloaded.intermediate_certificate == new
    assert reloaded.retired_intermediates == (old,)
    assert reloaded.export_crl(now=NOW + DAY) == crl.public_bytes(serialization.Encoding.DER)


def test_openssl_sees_the_old_intermediate_revoked_by_the_crl() -> None:
    ca = CertificateAuthority.ephemeral(now=NOW)
    old = ca.intermediate_certificate
    ca.rotate_intermediate(now=NOW, compromised=True)
    crl = ca.crl(now=NOW)
    entry = crl.get_revoked_certificate_by_serial_number(old.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.ca_compromise

    def verify(intermediate: x509.Certificate) -> None:
        # CRL_CHECK checks the target against its issuer's CRL: the root's, for an intermediate.
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(ca.root_certificate))
        store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.X509_STRICT | crypto.X509StoreFlags.CRL_CHECK)
        store.set_time(NOW + dt.timedelta(minutes=1))
        target = crypto.X509.from_cryptography(intermediate)
        crypto.X509StoreContext(store, target).verify_certificate()

    with pytest.raises(crypto.X509StoreContextError, match="revoked"):
        verify(old)
    verify(ca.intermediate_certificate)


def test_root_key_moved_offline(created: CertificateAuthority, state: Path, tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    usb.mkdir(mode=0o700)
    shutil.move(state / "ca" / "root.key", usb / "root.key")
    ca = CertificateAuthority.load(state)
    assert not {s.role: s for s in ca.key_files()}["root"].present
    CertForge(ca).leaf_for("still.works", now=NOW)  # the proxy never needs the root key
    with pytest.raises(ConfigurationError, match="--root-key") as info:
        ca.rotate_intermediate(now=NOW)
    assert info.value.reason == "root_key_unavailable"
    ca.rotate_intermediate(now=NOW, root_key_file=usb / "root.key")
    assert ca.generation == 2
    assert not (state / "ca" / "root.key").exists()
    # a key that does not belong to this root is refused
    other = CertificateAuthority.create(tmp_path / "other", now=NOW)
    with pytest.raises(ConfigurationError) as mismatch:
        ca.rotate_intermediate(now=NOW, root_key_file=tmp_path / "other" / "ca" / "root.key")
    assert mismatch.value.reason == "key_mismatch"
    assert other.generation == 1


def test_crl_is_re_signed_when_due_and_refused_when_stale_without_the_root_key(
    created: CertificateAuthority, state: Path, tmp_path: Path
) -> None:
    first = created.crl(now=NOW)
    assert created.crl(now=NOW + 300 * DAY) is first  # plenty of time left: the stored one
    refreshed = created.crl(now=NOW + 340 * DAY)  # within a month of nextUpdate: re-signed
    assert refreshed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert refreshed.last_update_utc == NOW + 340 * DAY
    assert CertificateAuthority.load(state).crl_number == 2
    # without the root key: the stored CRL while it lasts, then a clear error
    shutil.move(state / "ca" / "root.key", tmp_path / "root.key")
    offline = CertificateAuthority.load(state)
    assert offline.crl(now=NOW + 690 * DAY) == refreshed
    with pytest.raises(ConfigurationError, match="expired") as info:
        offline.crl(now=NOW + 800 * DAY)
    assert info.value.reason == "crl_stale"


def test_a_ca_changed_by_another_process_is_not_overwritten(
    created: CertificateAuthority, state: Path
) -> None:
    other = CertificateAuthority.load(state)
    other.rotate_intermediate(now=NOW)
    before = snapshot(state)
    with pytest.raises(ConfigurationError, match="another process") as info:
        created.rotate_intermediate(now=NOW)
    assert info.value.reason == "state_changed"
    assert snapshot(state) == before


def test_rotation_refuses_once_the_root_is_about_to_expire() -> None:
    ca = CertificateAuthority.ephemeral(now=NOW)
    late = ca.root_certificate.not_valid_after_utc - dt.timedelta(hours=1)
    with pytest.raises(ConfigurationError, match="new CA") as info:
        ca.rotate_intermediate(now=late)
    assert info.value.reason == "ca_expired"


# -- creation, loading, and damaged states ----------------------------------------------------


def test_load_or_create_creates_then_loads(state: Path) -> None:
    first = CertificateAuthority.load_or_create(state, now=NOW)
    second = CertificateAuthority.load_or_create(state, now=NOW + DAY, key_type="rsa3072")
    assert second.root_certificate == first.root_certificate
    assert second.key_type == "ec256"
    assert second.state_dir == state


def test_create_refuses_an_existing_ca(created: CertificateAuthority, state: Path) -> None:
    before = snapshot(state)
    with pytest.raises(ConfigurationError) as info:
        CertificateAuthority.create(state, now=NOW)
    assert info.value.reason == "state_exists"
    assert snapshot(state) == before


def test_load_of_nothing_says_how_to_create(state: Path) -> None:
    with pytest.raises(ConfigurationError, match="ca init") as info:
        CertificateAuthority.load(state)
    assert info.value.reason == "state_missing"


@pytest.mark.parametrize("attempt", range(5))
def test_concurrent_load_or_create_makes_one_ca(tmp_path: Path, attempt: int) -> None:
    # Several starters at once: the losers must wait for the winner's CA, never report the
    # winner's half-written files as an "incomplete CA".
    state = tmp_path / f"state-{attempt}"
    results: list[CertificateAuthority] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        try:
            barrier.wait(10)
            results.append(CertificateAuthority.load_or_create(state, now=NOW))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert len(results) == 8
    assert len({r.export_root() for r in results}) == 1


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all!!\n-----END CERTIFICATE-----\n"
    )


def _swap_key(path: Path) -> None:
    path.write_bytes((path.parent / "error-ca.key").read_bytes())


def _edit_metadata(edit: Callable[[dict[str, object]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return apply


DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    ("intermediate-1.key", _truncate, "key_corrupt"),
    ("error-ca.key", lambda p: p.write_bytes(b"garbage"), "key_corrupt"),
    ("root.key", _truncate, "key_corrupt"),
    ("root.pem", _garbage, "state_corrupt"),
    ("intermediate-1.pem", lambda p: p.unlink(), "state_incomplete"),
    ("error-ca.pem", _truncate, "state_corrupt"),
    ("intermediate-1.key", _swap_key, "key_mismatch"),
    ("root.key", _swap_key, "key_mismatch"),
    ("crl-1.der", _truncate, "state_corrupt"),
    ("ca.json", lambda p: p.write_text("{not json"), "state_corrupt"),
    ("ca.json", _edit_metadata(lambda d: d.pop("intermediate")), "state_corrupt"),
    ("ca.json", _edit_metadata(lambda d: d.update(root_sha256="00" * 32)), "state_corrupt"),
    ("ca.json", _edit_metadata(lambda d: d.update(format=99)), "state_version"),
    (
        "ca.json",
        _edit_metadata(lambda d: d["intermediate"].update(generation=-1)),  # type: ignore[attr-defined]
        "state_corrupt",
    ),
    ("ca.json", lambda p: p.unlink(), "state_incomplete"),
]


@pytest.fixture
def corrupt_target(
    request: pytest.FixtureRequest, created: CertificateAuthority, state: Path
) -> Iterator[tuple[str, dict[str, tuple[bytes, int, int]]]]:
    name, damage, reason = request.param
    damage(state / "ca" / name)
    return reason, snapshot(state)


@pytest.mark.parametrize(
    "corrupt_target", DAMAGE, indirect=True, ids=[f"{n}-{r}" for n, _, r in DAMAGE]
)
def test_damaged_state_is_reported_and_never_replaced(
    corrupt_target: tuple[str, dict[str, tuple[bytes, int, int]]], state: Path
) -> None:
    reason, before = corrupt_target
    with pytest.raises(ConfigurationError) as loaded:
        CertificateAuthority.load(state)
    assert loaded.value.reason == reason
    assert "restore" in str(loaded.value) or "tlsmitm" in str(loaded.value)
    with pytest.raises(ConfigurationError) as again:
        CertificateAuthority.load_or_create(state, now=NOW)
    assert again.value.reason == reason
    with pytest.raises(ConfigurationError):
        CertificateAuthority.create(state, now=NOW)
    assert snapshot(state) == before


def test_interrupted_creation_is_detected(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ca_module._write_atomic

    def crash_before_metadata(directory: Path, name: str, data: bytes) -> None:
        if name == "ca.json":
            raise KeyboardInterrupt
        real(directory, name, data)

    monkeypatch.setattr(ca_module, "_write_atomic", crash_before_metadata)
    with pytest.raises(KeyboardInterrupt):
        CertificateAuthority.create(state, now=NOW)
    monkeypatch.undo()
    before = snapshot(state)
    with pytest.raises(ConfigurationError, match="interrupted") as info:
        CertificateAuthority.load_or_create(state, now=NOW)
    assert info.value.reason == "state_incomplete"
    assert snapshot(state) == before


def test_other_files_in_the_state_directory_are_ignored(state: Path) -> None:
    state.mkdir(mode=0o700)
    (state / "state.sqlite3").write_bytes(b"someone else's")
    ca = CertificateAuthority.load_or_create(state, now=NOW)
    assert CertificateAuthority.load(state).export_root() == ca.export_root()


def test_ephemeral_ca_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ca = CertificateAuthority.ephemeral(now=NOW)
    assert ca.state_dir is None
    assert ca.key_files() == ()
    ca.rotate_intermediate(now=NOW)
    ca.crl(now=NOW + 360 * DAY)
    assert list(tmp_path.iterdir()) == []
