"""An intermediate from the organisation's own PKI (``ca init --import-intermediate``), and
per-node intermediates signed by the installation's root (``ca issue-node-intermediate``).

Every chain is made here with ``tests/pki.py``; every "clients accept it" is a real TLS handshake
by a client that trusts only the root, and one runs through ``serve`` and curl.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from ca_tls import handshake
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from pki import DAY, NOW, Issued, good_hierarchy, issue, make_key, make_root
from serve_process import curl, serve, start_origin, upstream_args

from tlsmitm import ConfigurationError
from tlsmitm._ca import CertificateAuthority, check_imported_intermediate, inspect_intermediate
from tlsmitm._cli import build_parser, main
from tlsmitm._cli_ca import ca_for_serve
from tlsmitm._forge import CertForge

REPO = Path(__file__).resolve().parent.parent
HOST = "www.example.test"
SERVER_AUTH = (ExtendedKeyUsageOID.SERVER_AUTH,)
PEM = serialization.Encoding.PEM


def org_intermediate(root: Issued, **kw: object) -> Issued:
    """An issuing CA as an organisation's PKI would give it to the proxy's operator."""
    kw.setdefault("ca", True)
    kw.setdefault("eku", SERVER_AUTH)
    kw.setdefault("path_length", 0)
    kw.setdefault("not_after", NOW + 365 * DAY)
    kw.setdefault(
        "extra",
        [(x509.NameConstraints(None, [x509.DNSName("bank.example")]), True)],
    )
    return issue(subject_cn="ACME Proxy Issuing CA", issuer=root, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def org() -> tuple[Issued, Issued, Issued]:
    """ACME's root -> policy CA (pathLen 1) -> the proxy's issuing CA."""
    root = make_root("ACME Root CA")
    policy = issue(subject_cn="ACME Policy CA", issuer=root, ca=True, path_length=1, eku=None)
    return root, policy, org_intermediate(policy)


def test_an_imported_intermediate_signs_leaves_that_clients_of_the_org_root_accept(
    org: tuple[Issued, Issued, Issued], tmp_path: Path
) -> None:
    root, policy, intermediate = org
    ca = CertificateAuthority.import_intermediate(
        tmp_path / "state",
        certificates=[intermediate.cert, root.cert, policy.cert],  # any order after the first
        key=intermediate.key,
        now=NOW,
    )
    assert ca.imported
    assert ca.root_certificate == root.cert
    assert ca.intermediate_chain == (intermediate.cert, policy.cert)  # the root is not sent
    # The organisation's root and policy CA issue its own servers' certificates: they must not
    # be refused upstream as "tlsmitm's own".
    assert set(ca.own_certificates()) == {intermediate.cert, ca.error_ca_certificate}
    assert ca.name_constraints_excluded == ("bank.example",)

    leaf = CertForge(ca).leaf_for(HOST, now=NOW)
    assert leaf.chain == (intermediate.cert, policy.cert)
    handshake(leaf, root.cert, HOST, tmp_path)
    # Without the policy CA the client cannot build the path: the full chain is what works.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(leaf, root.cert, HOST, tmp_path, chain=(intermediate.cert,))

    reloaded = CertificateAuthority.load(tmp_path / "state")
    assert reloaded.intermediate_chain == ca.intermediate_chain
    handshake(CertForge(reloaded).leaf_for(HOST, now=NOW), root.cert, HOST, tmp_path)
    # The organisation's PKI revokes and renews it; tlsmitm has no CRL and no root key.
    for call, reason in (
        (lambda: reloaded.crl(now=NOW), "crl_unavailable"),
        (lambda: reloaded.rotate_intermediate(now=NOW), "imported"),
        (lambda: reloaded.issue_node_intermediate("a", now=NOW), "imported"),
    ):
        with pytest.raises(ConfigurationError) as excinfo:
            call()
        assert excinfo.value.reason == reason


def test_the_chains_permitted_subtrees_bound_what_the_forge_mints(tmp_path: Path) -> None:
    """RFC 5280 §4.2.1.10: clients refuse a leaf outside a CA's permitted subtrees, so the
    forge refuses to mint one (the policy must bypass those names) instead."""
    root = make_root("ACME Root CA")
    policy = issue(
        subject_cn="ACME Policy CA",
        issuer=root,
        ca=True,
        path_length=1,
        eku=None,
        extra=[
            (
                x509.NameConstraints(
                    [x509.DNSName("corp.example"), x509.DNSName("lab.example")], None
                ),
                True,
            )
        ],
    )
    intermediate = org_intermediate(
        policy,
        extra=[
            (
                x509.NameConstraints(
                    [
                        x509.DNSName("corp.example"),
                        x509.IPAddress(ipaddress.ip_network("10.0.0.0/8")),
                    ],
                    [x509.DNSName("hr.corp.example")],
                ),
                True,
            )
        ],
    )
    ca = CertificateAuthority.import_intermediate(
        tmp_path / "state",
        certificates=[intermediate.cert, policy.cert, root.cert],
        key=intermediate.key,
        now=NOW,
    )
    assert ca.name_constraints_permitted == (  # the intermediate's, then the policy CA's
        ("corp.example", "10.0.0.0/8"),
        ("corp.example", "lab.example"),
    )
    forge = CertForge(ca)
    for host in ("intranet.corp.example", "corp.example"):
        leaf = forge.leaf_for(host, now=NOW)
        handshake(leaf, root.cert, host, tmp_path)
    # Not permitted; the last one because OpenSSL checks an IP leaf's CN (its address) against
    # the DNS subtrees, so clients would refuse it even inside 10.0.0.0/8.
    for host in ("www.example.test", "x.lab.example", "payroll.hr.corp.example", "10.1.2.3"):
        with pytest.raises(ConfigurationError) as excinfo:
            forge.leaf_for(host, now=NOW)
        assert excinfo.value.reason == "name_excluded"
    # Mirrored upstream names outside the permitted subtrees are left out of the leaf.
    upstream = good_hierarchy("intranet.corp.example")
    mirrored = issue(
        subject_cn="intranet.corp.example",
        issuer=upstream.intermediate,
        sans=[
            "intranet.corp.example",
            "*.dev.corp.example",
            "*.corp.example",  # would cover hr.corp.example, which is excluded
            "www.example.test",
            "*.example",
        ],
    )
    leaf = forge.leaf_for("intranet.corp.example", mirrored.cert, upstream_verified=True, now=NOW)
    assert leaf.names == ("intranet.corp.example", "*.dev.corp.example")
    handshake(leaf, root.cert, "intranet.corp.example", tmp_path)
    reloaded = CertificateAuthority.load(tmp_path / "state")
    assert reloaded.name_constraints_permitted == ca.name_constraints_permitted


def _refusal(certificates: list[x509.Certificate], key: object) -> str:
    with pytest.raises(ConfigurationError) as excinfo:
        check_imported_intermediate(certificates, key, now=NOW)  # type: ignore[arg-type]
    assert excinfo.value.reason == "import_refused"
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_each_unusable_intermediate_is_refused_with_one_line(
    org: tuple[Issued, Issued, Issued],
) -> None:
    root, policy, good = org
    cases = {
        "is not a CA certificate": org_intermediate(root, ca=False, key_usage=None),
        "is not a CA certificate (RFC": org_intermediate(root, ca=None),
        "may not sign certificates": org_intermediate(root, key_usage=None),
        "does not allow serverAuth": org_intermediate(root, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,)),
        "expired on": org_intermediate(root, not_before=NOW - 60 * DAY, not_after=NOW - DAY),
        "is not valid before": org_intermediate(root, not_before=NOW + DAY),
    }
    for expected, intermediate in cases.items():
        assert expected in _refusal([intermediate.cert, root.cert], intermediate.key)
    assert "the key does not belong" in _refusal(
        [good.cert, policy.cert, root.cert], make_key("ec256")
    )
    assert "stops at" in _refusal([good.cert, root.cert], good.key)  # policy CA missing
    assert "stops at" in _refusal([good.cert, policy.cert], good.key)  # no root
    stray = make_root("Someone Else")
    assert "is not on the chain" in _refusal(
        [good.cert, policy.cert, root.cert, stray.cert], good.key
    )
    assert "is self-signed" in _refusal([root.cert], root.key)
    # The chain above must be CAs whose pathLenConstraint allows what is below them.
    short = issue(subject_cn="ACME Policy CA", issuer=root, ca=True, path_length=0, eku=None)
    below_short = org_intermediate(short)
    assert "pathLenConstraint" in _refusal(
        [below_short.cert, short.cert, root.cert], below_short.key
    )
    not_ca = issue(subject_cn="Not a CA", issuer=root, ca=False, key_usage=None, eku=None)
    below_leaf = org_intermediate(not_ca)
    assert "in the chain is not a CA" in _refusal(
        [below_leaf.cert, not_ca.cert, root.cert], below_leaf.key
    )
    weak = org_intermediate(root, key=make_key("ec384"))
    assert check_imported_intermediate([weak.cert, root.cert], weak.key, now=NOW)[0] == weak.cert


def test_an_intermediate_that_can_sign_more_than_tls_servers_is_accepted_with_warnings(
    org: tuple[Issued, Issued, Issued],
) -> None:
    root, _, good = org
    assert inspect_intermediate(good.cert, now=NOW) == ()
    broad = org_intermediate(root, eku=None, extra=[])
    warnings = check_imported_intermediate([broad.cert, root.cert], broad.key, now=NOW)[3]
    assert any("no extendedKeyUsage" in w for w in warnings), warnings
    assert any("no name constraints" in w for w in warnings), warnings
    also = org_intermediate(
        root, eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING)
    )
    (warning,) = inspect_intermediate(also.cert, now=NOW)
    assert "codeSigning" in warning


# -- the command line ---------------------------------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TLSMITM_STATE_DIR", "TLSMITM_CA_PASSPHRASE", "XDG_DATA_HOME")
    }
    env["HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = str(REPO)
    return env


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str
    raw: bytes


@pytest.fixture
def ca_cli(
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Ran]:
    """``tlsmitm ca ARGS`` through the command line's own entry point, in this process (the
    interpreter start-up of a subprocess per call would cost seconds on a loaded machine)."""
    for name in ("TLSMITM_STATE_DIR", "TLSMITM_CA_PASSPHRASE", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, expect: int = 0) -> Ran:
        code = main(["ca", *args])
        out, err = capsysbinary.readouterr()
        ran = Ran(code=code, stdout=out.decode("utf-8", "replace"), stderr=err.decode(), raw=out)
        assert code == expect, ran
        assert "Traceback" not in ran.stderr
        return ran

    return run


def _write(directory: Path, name: str, *certs: x509.Certificate) -> Path:
    path = directory / name
    path.write_bytes(b"".join(c.public_bytes(PEM) for c in certs))
    return path


def test_cli_imports_warns_refuses_and_shows(tmp_path: Path, ca_cli: Callable[..., Ran]) -> None:
    root = make_root("ACME Root CA")
    broad = org_intermediate(root, eku=None, extra=[])
    cert = _write(tmp_path, "issuing.pem", broad.cert)
    key = tmp_path / "issuing.key"
    key.write_bytes(broad.key_pem)
    key.chmod(0o644)
    root_file = _write(tmp_path, "root.pem", root.cert)
    state = tmp_path / "state"

    refused = ca_cli(
        "init", "--state-dir", str(state), "--import-intermediate", str(cert), str(key),
        expect=1,
    )  # fmt: skip
    assert refused.stderr.count("\n") == 1
    assert "stops at" in refused.stderr
    assert not (state / "ca" / "ca.json").exists()

    done = ca_cli(
        "init", "--state-dir", str(state), "--import-intermediate", str(cert), str(key),
        "--chain", str(root_file),
    )  # fmt: skip
    assert "no extendedKeyUsage" in done.stderr
    assert f"{key} is readable by others" in done.stderr
    assert "no name constraints" in done.stderr
    assert "Imported the intermediate" in done.stdout
    key_file = state / "ca" / "intermediate-1.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    shown = ca_cli("show", "--state-dir", str(state)).stdout
    assert "Intermediate, imported" in shown
    assert "no extendedKeyUsage" in shown
    assert "the PKI that issued the intermediate publishes it" in shown
    exported = ca_cli("export", "--state-dir", str(state)).stdout
    assert exported.encode() == root.cert.public_bytes(PEM)
    assert "imported" in ca_cli("rotate", "--state-dir", str(state), expect=1).stderr
    again = ca_cli(
        "init", "--state-dir", str(state), "--import-intermediate", str(cert), str(key),
        "--chain", str(root_file), expect=1,
    )  # fmt: skip
    assert "already exists" in again.stderr


async def test_serve_with_an_imported_intermediate_is_trusted_by_curl_trusting_the_org_root(
    nursery: trio.Nursery, tmp_path: Path, org: tuple[Issued, Issued, Issued]
) -> None:
    root, policy, intermediate = org
    upstream = good_hierarchy(HOST)  # the origin's own, unrelated PKI
    port, _ = await start_origin(nursery, tmp_path, upstream)
    chain = _write(tmp_path, "issuing.pem", intermediate.cert, policy.cert, root.cert)
    key = tmp_path / "issuing.key"
    key.write_bytes(intermediate.key_pem)
    org_root = _write(tmp_path, "org-root.pem", root.cert)
    state = tmp_path / "state"
    args = [*upstream_args(tmp_path, upstream, HOST)]
    args += ["--import-intermediate", str(chain), str(key)]
    async with serve(state, *args, env=_env(tmp_path)) as served:
        result = await curl(
            "--proxy", served.proxy, "--cacert", str(org_root), f"https://{HOST}:{port}/"
        )
        await served.stop()
    assert result.stdout == b"hello from origin"
    assert CertificateAuthority.load(state).intermediate_certificate == intermediate.cert


def test_serve_reuses_the_imported_intermediate_and_refuses_another(
    tmp_path: Path, org: tuple[Issued, Issued, Issued], caplog: pytest.LogCaptureFixture
) -> None:
    root, policy, intermediate = org
    chain = _write(tmp_path, "issuing.pem", intermediate.cert, policy.cert, root.cert)
    key = tmp_path / "issuing.key"
    key.write_bytes(intermediate.key_pem)
    state = tmp_path / "state"
    parser = build_parser()

    def ca_of(*args: str) -> CertificateAuthority | None:
        return ca_for_serve(parser.parse_args(["serve", *args]), state)

    assert ca_of() is None  # no CA option: the interceptor loads or creates the usual CA
    broad = org_intermediate(root, eku=None)
    broad_cert = _write(tmp_path, "broad.pem", broad.cert, root.cert)
    broad_key = tmp_path / "broad.key"
    broad_key.write_bytes(broad.key_pem)
    with caplog.at_level(logging.WARNING, logger="tlsmitm.ca"):
        ca_for_serve(
            parser.parse_args(["serve", "--import-intermediate", str(broad_cert), str(broad_key)]),
            tmp_path / "broad-state",
        )
    assert any("no extendedKeyUsage" in r.getMessage() for r in caplog.records)
    first = ca_of("--import-intermediate", str(chain), str(key))
    assert first is not None
    assert first.intermediate_certificate == intermediate.cert
    again = ca_of("--import-intermediate", str(chain), str(key))
    assert again is not None
    assert again.intermediate_certificate == intermediate.cert
    other = org_intermediate(root)
    other_cert = _write(tmp_path, "other.pem", other.cert, root.cert)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(other.key_pem)
    with pytest.raises(ConfigurationError) as excinfo:
        ca_of("--import-intermediate", str(other_cert), str(other_key))
    assert excinfo.value.reason == "state_exists"
    assert "another intermediate" in str(excinfo.value)


# -- node intermediates ---------------------------------------------------------------------------


def test_each_node_signs_with_its_own_intermediate_and_one_is_revoked_alone(
    tmp_path: Path,
) -> None:
    installation = CertificateAuthority.create(tmp_path / "installation", now=NOW)
    root = installation.root_certificate
    nodes = {}
    for name in ("node-a", "node-b"):
        node, key = installation.issue_node_intermediate(name, now=NOW)
        assert key is not None
        assert node.name == name
        assert node.revoked is None
        node.certificate.verify_directly_issued_by(root)
        constraints = node.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.value.ca
        assert constraints.value.path_length == 0
        # The node imports it (its own state directory, its own error CA).
        nodes[name] = CertificateAuthority.import_intermediate(
            tmp_path / name, certificates=[node.certificate, root], key=key, now=NOW
        )
    leaves = {name: CertForge(ca).leaf_for(HOST, now=NOW) for name, ca in nodes.items()}
    assert leaves["node-a"].certificate.issuer != leaves["node-b"].certificate.issuer
    for leaf in leaves.values():
        handshake(leaf, root, HOST, tmp_path)  # a client trusting only the root accepts both

    with pytest.raises(ConfigurationError) as excinfo:
        installation.issue_node_intermediate("node-a", now=NOW)
    assert excinfo.value.reason == "node_exists"
    with pytest.raises(ConfigurationError) as excinfo:
        installation.issue_node_intermediate("Node_A", now=NOW)
    assert excinfo.value.reason == "node_name"

    number = installation.crl_number
    revoked = installation.revoke_node_intermediate("node-a", now=NOW + DAY)
    assert revoked.revoked == NOW + DAY
    crl = installation.stored_crl
    assert crl is not None
    assert installation.crl_number == number + 1
    assert crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    a_serial = nodes["node-a"].intermediate_certificate.serial_number
    b_serial = nodes["node-b"].intermediate_certificate.serial_number
    entry = crl.get_revoked_certificate_by_serial_number(a_serial)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.ca_compromise
    assert crl.get_revoked_certificate_by_serial_number(b_serial) is None
    # The root is unchanged (nothing to re-trust); the revocation survives a reload and later
    # CRLs (a rotation re-signs the CRL and must keep the node listed).
    reloaded = CertificateAuthority.load(tmp_path / "installation")
    assert reloaded.root_certificate == root
    assert [n.revoked is not None for n in reloaded.node_intermediates] == [True, False]
    reloaded.rotate_intermediate(now=NOW + 2 * DAY)
    later = reloaded.stored_crl
    assert later is not None
    assert later.get_revoked_certificate_by_serial_number(a_serial) is not None
    assert later.get_revoked_certificate_by_serial_number(b_serial) is None
    # Node intermediates are this installation's own: refused if an upstream presents one.
    own = reloaded.own_certificates()
    assert nodes["node-a"].intermediate_certificate in own
    # A revoked node's name can be issued again (a new key after the incident).
    fresh, _ = reloaded.issue_node_intermediate("node-a", now=NOW + 3 * DAY)
    assert fresh.certificate.serial_number != a_serial
    with pytest.raises(ConfigurationError) as excinfo:
        reloaded.revoke_node_intermediate("node-c", now=NOW)
    assert excinfo.value.reason == "node_unknown"


def test_cli_issues_a_node_intermediate_that_the_node_imports_and_revokes_it(
    tmp_path: Path, ca_cli: Callable[..., Ran]
) -> None:
    installation = tmp_path / "installation"
    ca_cli("init", "--state-dir", str(installation))
    out = tmp_path / "out"
    issued = ca_cli(
        "issue-node-intermediate", "node-a", "--out", str(out), "--state-dir",
        str(installation),
    ).stdout  # fmt: skip
    assert "--import-intermediate node-a.pem node-a.key" in issued
    assert stat.S_IMODE((out / "node-a.key").stat().st_mode) == 0o600
    bundle = x509.load_pem_x509_certificates((out / "node-a.pem").read_bytes())
    root = CertificateAuthority.load(installation).root_certificate
    assert bundle[1] == root
    node_state = tmp_path / "node-a"
    ca_cli(
        "init", "--state-dir", str(node_state), "--import-intermediate",
        str(out / "node-a.pem"), str(out / "node-a.key"),
    )  # fmt: skip
    node_ca = CertificateAuthority.load(node_state)
    assert node_ca.intermediate_certificate == bundle[0]
    handshake(CertForge(node_ca).leaf_for(HOST, now=NOW), root, HOST, tmp_path)

    shown = ca_cli("show", "--state-dir", str(installation)).stdout
    assert "Node intermediate node-a" in shown
    assert "in force" in shown
    ca_cli("revoke-node-intermediate", "node-a", "--state-dir", str(installation))
    crl = x509.load_der_x509_crl(ca_cli("export", "--crl", "--state-dir", str(installation)).raw)
    assert crl.get_revoked_certificate_by_serial_number(bundle[0].serial_number) is not None
    assert "REVOKED" in ca_cli("show", "--state-dir", str(installation)).stdout
    unknown = ca_cli(
        "revoke-node-intermediate", "node-z", "--state-dir", str(installation), expect=1
    )
    assert unknown.stderr.count("\n") == 1


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check_imported_intermediate([], make_key("ec256"), now=dt.datetime(2026, 1, 1))  # type: ignore[arg-type]


def test_serve_refuses_ca_options_that_do_not_go_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    for args, message in (
        (["--chain", str(tmp_path / "root.pem")], "--chain goes with --import-intermediate"),
        (
            ["--import-intermediate", "a.pem", "a.key", "--ca-key", "pkcs11:object=k"],
            "not with --ca-key",
        ),
    ):
        serve = ["serve", "--listen", "127.0.0.1:0", "--workers", "1", "--state-dir", str(state)]
        assert main([*serve, *args]) == 2  # usage: refused before anything listens
        assert message in capsys.readouterr().err
        assert not (state / "ca").exists()
