"""CertForge: leaf shape, names, validity, cache and concurrency (matrix CA-06, CA-07, CA-08)."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import pickle
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL, crypto
from pki import issue, make_intermediate, make_leaf, make_root

from tlsmitm import ConfigurationError, InvalidHostName
from tlsmitm._ca import CertificateAuthority
from tlsmitm._der import time as der_time
from tlsmitm._forge import CertForge, ForgedLeaf, IssuerKind, br_max_validity
from tlsmitm._names import ip_address_of, normalize_host, try_normalize_host

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral(now=NOW)


@pytest.fixture
def forge(ca: CertificateAuthority) -> CertForge:
    return CertForge(ca)


# -- helpers ------------------------------------------------------------------------------------


def subject_name_for(host: str) -> x509.DNSName | x509.IPAddress:
    address = ip_address_of(host)
    return x509.IPAddress(address) if address is not None else x509.DNSName(host)


def verify_with_cryptography(
    root: x509.Certificate, leaf: ForgedLeaf, now: dt.datetime = NOW
) -> None:
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(now)
        .build_server_verifier(subject_name_for(leaf.host))
    )
    verifier.verify(leaf.certificate, list(leaf.chain))


def verify_with_openssl_strict(
    root: x509.Certificate,
    leaf: ForgedLeaf,
    now: dt.datetime = NOW,
    crls: tuple[x509.CertificateRevocationList, ...] = (),
) -> None:
    """pyOpenSSL's X509Store in X509_STRICT mode, on the forged leaf's own pyOpenSSL objects."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(root))
    flags = crypto.X509StoreFlags.X509_STRICT
    for crl in crls:
        store.add_crl(crl)
        flags |= crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL
    store.set_flags(flags)
    store.set_time(now)
    crypto.X509StoreContext(store, leaf.ssl_certificate, list(leaf.ssl_chain)).verify_certificate()


def openssl_cli_verify(
    tmp_path: Path,
    root: x509.Certificate,
    leaf: ForgedLeaf,
    now: dt.datetime = NOW,
    host: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``openssl verify -x509_strict -purpose sslserver`` with the host name (or IP) checked."""
    openssl = require_tool("openssl")
    pem = serialization.Encoding.PEM
    (tmp_path / "root.pem").write_bytes(root.public_bytes(pem))
    (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(pem) for c in leaf.chain))
    (tmp_path / "leaf.pem").write_bytes(leaf.certificate.public_bytes(pem))
    host = host or leaf.host
    name_check = ["-verify_ip", host] if ip_address_of(host) else ["-verify_hostname", host]
    command = [
        openssl,
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-attime",
        str(int(now.timestamp())),
        *name_check,
        "-CAfile",
        str(tmp_path / "root.pem"),
    ]
    if leaf.chain:
        command += ["-untrusted", str(tmp_path / "chain.pem")]
    return subprocess.run(
        [*command, str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30
    )


def upstream_with(
    sans: list[str] | None,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    cn: str | None = "upstream.example",
) -> x509.Certificate:
    root = make_root(not_before=NOW - 400 * DAY)
    return issue(
        subject_cn=cn,
        issuer=root,
        sans=sans,
        not_before=not_before or NOW - 10 * DAY,
        not_after=not_after or NOW + 80 * DAY,
    ).cert


# -- hypothesis strategies ------------------------------------------------------------------------

_ldh_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"  # R-LDH labels ("ab--") are reserved (RFC 5890 §2.3.1)
)
_tld = st.from_regex(r"[a-z]{2,10}", fullmatch=True)
_dns_names = st.builds(
    lambda labels, tld: ".".join([*labels, tld]), st.lists(_ldh_label, min_size=0, max_size=4), _tld
)
_long_names = st.builds(
    lambda labels: ".".join([*labels, "example"]),
    st.lists(st.from_regex(r"[a-z]{40,63}", fullmatch=True), min_size=1, max_size=3),
)
_idn_names = st.builds(
    lambda label, tld: f"{label}.{tld}",
    st.text(alphabet="abcäöüéñçøåæßπσкиру中文日本한국", min_size=1, max_size=12),
    st.sampled_from(["example", "de", "рф", "中国", "test"]),
)
hosts = st.one_of(
    _dns_names,
    _long_names,
    _idn_names,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


# -- DER encoding against cryptography's -------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        dt.datetime(1950, 1, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 15, 1, 2, 3, tzinfo=dt.UTC),
        dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        dt.datetime(2050, 1, 1, tzinfo=dt.UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
    ],
)
def test_certificate_times_use_utctime_until_2049_and_generalizedtime_after(
    when: dt.datetime,
) -> None:
    # RFC 5280 §4.1.2.5, checked against cryptography's encoder through a real certificate.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(when)
        .not_valid_after(when)
        .sign(key, hashes.SHA256())
    )
    assert der_time(when) in cert.tbs_certificate_bytes
    assert cert.not_valid_before_utc == when


def test_times_before_1950_are_generalizedtime() -> None:
    # cryptography refuses to encode these; an upstream may still carry them (error leaves).
    when = dt.datetime(1949, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    assert der_time(when) == b"\x18\x0f19491231235959Z"
    assert der_time(when.astimezone(dt.timezone(dt.timedelta(hours=2)))) == der_time(when)
    with pytest.raises(ValueError, match="aware"):
        der_time(dt.datetime(2026, 1, 1))


def _builder_twin(leaf: ForgedLeaf, ca: CertificateAuthority, issuer: IssuerKind) -> bytes:
    """The TBS ``CertificateBuilder`` makes from the same inputs as the forged leaf."""
    cert = leaf.certificate
    signer = ca._signer(issuer)
    subject = (
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, leaf.host)])
        if len(leaf.host) <= 64
        else x509.Name([])
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.certificate.subject)
        .public_key(leaf.private_key.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address(n)) if ip_address_of(n) else x509.DNSName(n)
                    for n in leaf.names
                ]
            ),
            critical=len(leaf.host) > 64,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(leaf.private_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                signer.certificate.extensions.get_extension_for_class(
                    x509.SubjectKeyIdentifier
                ).value
            ),
            critical=False,
        )
    )
    return builder.sign(signer.key, hashes.SHA256()).tbs_certificate_bytes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host=hosts)
def test_template_tbs_is_byte_identical_to_certificate_builder(
    ca: CertificateAuthority, host: str
) -> None:
    assume(try_normalize_host(host) is not None)
    leaf = CertForge(ca, max_cache_entries=0).leaf_for(host, now=NOW)
    assert leaf.certificate.tbs_certificate_bytes == _builder_twin(leaf, ca, IssuerKind.TRUSTED)


# -- the property: every leaf verifies in both verifiers --------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host=hosts)
def test_any_host_gets_a_leaf_both_verifiers_accept(ca: CertificateAuthority, host: str) -> None:
    assume(try_normalize_host(host) is not None)
    leaf = CertForge(ca, max_cache_entries=0).leaf_for(host, now=NOW)
    assert leaf.host == normalize_host(host)
    assert leaf.names == (leaf.host,)
    verify_with_cryptography(ca.root_certificate, leaf)
    verify_with_openssl_strict(ca.root_certificate, leaf)


@pytest.mark.parametrize(
    "host",
    [
        "www.example.test",
        "EXAMPLE.com.",
        "bücher.example",
        "xn--nxasmq6b.example",
        "a" * 63 + "." + "b" * 63 + ".example",  # longer than a CN may be: empty subject
        "192.0.2.7",
        "2001:db8::1",
        "[2001:db8::2]",
        "localhost",
    ],
)
def test_openssl_cli_strict_accepts_the_chain(
    tmp_path: Path, ca: CertificateAuthority, forge: CertForge, host: str
) -> None:
    leaf = forge.leaf_for(host, now=NOW)
    result = openssl_cli_verify(tmp_path, ca.root_certificate, leaf)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")


def test_openssl_cli_refuses_the_leaf_for_another_name(
    tmp_path: Path, ca: CertificateAuthority, forge: CertForge
) -> None:
    leaf = forge.leaf_for("a.example", now=NOW)
    result = openssl_cli_verify(tmp_path, ca.root_certificate, leaf, host="b.example")
    assert result.returncode != 0


@pytest.mark.parametrize("key_type", ["ec384", "rsa2048"])
def test_other_ca_key_types_produce_verifiable_leaves(tmp_path: Path, key_type: str) -> None:
    ca = CertificateAuthority.ephemeral(now=NOW, key_type=key_type)
    leaf = CertForge(ca).leaf_for("www.example.test", now=NOW)
    expected = hashes.SHA384 if key_type == "ec384" else hashes.SHA256
    assert isinstance(leaf.certificate.signature_hash_algorithm, expected)
    verify_with_cryptography(ca.root_certificate, leaf)
    verify_with_openssl_strict(ca.root_certificate, leaf)
    assert openssl_cli_verify(tmp_path, ca.root_certificate, leaf).returncode == 0


def test_rsa_leaf_keys_are_available(ca: CertificateAuthority) -> None:
    leaf = CertForge(ca, key_type="rsa2048").leaf_for("rsa.example", now=NOW)
    key = leaf.certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 2048
    verify_with_cryptography(ca.root_certificate, leaf)
    verify_with_openssl_strict(ca.root_certificate, leaf)


# -- CA-06: leaf shape -------------------------------------------------------------------------


def test_leaf_shape_matrix_ca06(ca: CertificateAuthority, forge: CertForge) -> None:
    leaf = forge.leaf_for("www.example.test", now=NOW)
    cert = leaf.certificate
    assert cert.version is x509.Version.v3
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.test")])
    assert cert.issuer == ca.intermediate_certificate.subject
    ext = cert.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["www.example.test"]
    assert len(list(san.value)) == 1  # exactly the requested name, never a wildcard
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca is False
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.value.digital_signature
    assert not (usage.value.key_cert_sign)
    assert not (usage.value.crl_sign)
    assert not (usage.value.key_encipherment)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not eku.critical
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        aki.key_identifier
        == ca.intermediate_certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    )
    assert len(ext) == 6
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert 0 < cert.serial_number < 1 << 128
    assert leaf.chain == (ca.intermediate_certificate,)
    assert leaf.fingerprint_sha256 == cert.fingerprint(hashes.SHA256())
    assert leaf.not_after == cert.not_valid_after_utc


def test_every_leaf_has_its_own_key_never_a_ca_key(ca: CertificateAuthority) -> None:
    forge = CertForge(ca)
    leaves = [forge.leaf_for(f"h{i}.example", now=NOW) for i in range(30)]
    spkis = {
        leaf.certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for leaf in leaves
    }
    ca_spkis = {
        c.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for c in ca.own_certificates()
    }
    assert len(spkis) == 30
    assert not spkis & ca_spkis
    assert len({leaf.certificate.serial_number for leaf in leaves}) == 30


def test_ip_literal_gets_an_ip_san(forge: CertForge) -> None:
    leaf = forge.leaf_for("[2001:DB8:0::1]", now=NOW)
    san = leaf.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("2001:db8::1")]
    assert san.get_values_for_type(x509.DNSName) == []


def test_idn_is_minted_as_a_labels(forge: CertForge) -> None:
    leaf = forge.leaf_for("Bücher.Example", now=NOW)
    san = leaf.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xn--bcher-kva.example"]


@pytest.mark.parametrize("host", ["", "a..b", "*.example.com", "exa mple.com", "1.2.3", "a%2eb"])
def test_invalid_hosts_are_refused(forge: CertForge, host: str) -> None:
    with pytest.raises(InvalidHostName):
        forge.leaf_for(host, now=NOW)


def test_naive_now_is_refused(forge: CertForge) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        forge.leaf_for("example.com", now=dt.datetime(2026, 6, 1))


# -- validity ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issued", "maximum_days"),
    [
        (dt.datetime(2026, 3, 14, 23, 59, 59, tzinfo=dt.UTC), 398),
        (dt.datetime(2026, 3, 15, tzinfo=dt.UTC), 200),
        (dt.datetime(2027, 3, 14, 12, 0, tzinfo=dt.UTC), 200),
        (dt.datetime(2027, 3, 15, tzinfo=dt.UTC), 100),
        (dt.datetime(2029, 3, 14, 12, 0, tzinfo=dt.UTC), 100),
        (dt.datetime(2029, 3, 15, tzinfo=dt.UTC), 47),
        (dt.datetime(2035, 1, 1, tzinfo=dt.UTC), 47),
    ],
)
def test_validity_never_exceeds_the_br_maximum_for_the_issue_date(
    issued: dt.datetime, maximum_days: int
) -> None:
    # BR §6.3.2; the validity period counts notBefore through notAfter inclusive.
    assert br_max_validity(issued) == dt.timedelta(days=maximum_days)
    ca = CertificateAuthority.ephemeral(now=issued)
    leaf = CertForge(ca, lifetime=dt.timedelta(days=398)).leaf_for("long.example", now=issued)
    cert = leaf.certificate
    period = cert.not_valid_after_utc - cert.not_valid_before_utc + dt.timedelta(seconds=1)
    assert period <= dt.timedelta(days=maximum_days)
    assert period > dt.timedelta(days=maximum_days - 1)


def test_default_lifetime_and_backdating(forge: CertForge) -> None:
    cert = forge.leaf_for("dates.example", now=NOW).certificate
    assert cert.not_valid_before_utc == NOW - dt.timedelta(hours=1)
    assert cert.not_valid_after_utc == NOW - dt.timedelta(hours=1) + 30 * DAY


@pytest.mark.parametrize("lifetime", [dt.timedelta(minutes=5), dt.timedelta(days=399)])
def test_unreasonable_lifetimes_are_refused(
    ca: CertificateAuthority, lifetime: dt.timedelta
) -> None:
    with pytest.raises(ConfigurationError) as info:
        CertForge(ca, lifetime=lifetime)
    assert info.value.reason == "leaf_lifetime"


def test_trusted_leaf_never_outlives_the_upstream_leaf(forge: CertForge) -> None:
    upstream = upstream_with(["www.example.test"], not_after=NOW + 5 * DAY)
    leaf = forge.leaf_for("www.example.test", upstream, upstream_verified=True, now=NOW)
    assert leaf.certificate.not_valid_after_utc == NOW + 5 * DAY


def test_expired_upstream_yields_an_expired_leaf_never_a_repaired_one(
    ca: CertificateAuthority, forge: CertForge
) -> None:
    upstream = upstream_with(
        ["www.example.test"], not_before=NOW - 100 * DAY, not_after=NOW - 2 * DAY
    )
    leaf = forge.leaf_for("www.example.test", upstream, now=NOW)
    assert leaf.certificate.not_valid_after_utc == NOW - 2 * DAY
    assert leaf.certificate.not_valid_before_utc < leaf.certificate.not_valid_after_utc
    with pytest.raises(VerificationError, match="not valid at validation time"):
        verify_with_cryptography(ca.root_certificate, leaf)


def test_not_yet_valid_upstream_yields_a_not_yet_valid_leaf(forge: CertForge) -> None:
    upstream = upstream_with(
        ["www.example.test"], not_before=NOW + 3 * DAY, not_after=NOW + 90 * DAY
    )
    leaf = forge.leaf_for("www.example.test", upstream, now=NOW)
    assert leaf.certificate.not_valid_before_utc == NOW + 3 * DAY


def test_expired_intermediate_is_a_configuration_error(ca: CertificateAuthority) -> None:
    later = ca.intermediate_certificate.not_valid_after_utc + DAY
    with pytest.raises(ConfigurationError, match="ca rotate") as info:
        CertForge(ca).leaf_for("late.example", now=later)
    assert info.value.reason == "ca_expired"


# -- names: mirroring (CA-08) --------------------------------------------------------------------


def test_cn_only_upstream_gets_no_mirrored_names_matrix_ca08(forge: CertForge) -> None:
    upstream = upstream_with(None, cn="www.example.test")
    for verified in (False, True):
        leaf = forge.leaf_for("www.example.test", upstream, upstream_verified=verified, now=NOW)
        assert leaf.names == ("www.example.test",)


def test_upstream_cn_is_never_mirrored(forge: CertForge) -> None:
    upstream = upstream_with(["www.example.test"], cn="evil.example")
    leaf = forge.leaf_for("www.example.test", upstream, upstream_verified=True, now=NOW)
    assert "evil.example" not in leaf.names


def test_names_are_mirrored_only_when_the_upstream_verified(forge: CertForge) -> None:
    upstream = upstream_with(["www.example.test", "api.example.test", "192.0.2.1"])
    unverified = forge.leaf_for("www.example.test", upstream, now=NOW)
    assert unverified.names == ("www.example.test",)
    verified = forge.leaf_for("www.example.test", upstream, upstream_verified=True, now=NOW)
    assert verified.names == ("www.example.test", "api.example.test", "192.0.2.1")
    san = verified.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.1")]


def test_requested_name_comes_first_and_mirrors_are_capped(ca: CertificateAuthority) -> None:
    sans = [f"n{i}.example.test" for i in range(30)]
    upstream = upstream_with(sans)
    leaf = CertForge(ca, max_mirrored_names=5).leaf_for(
        "n7.example.test", upstream, upstream_verified=True, now=NOW
    )
    assert leaf.names[0] == "n7.example.test"
    assert len(leaf.names) == 6
    assert leaf.names.count("n7.example.test") == 1


def test_broad_and_partial_wildcards_are_not_mirrored(forge: CertForge) -> None:
    upstream = upstream_with(
        ["www.example.test", "*.example.test", "*.test", "*", "f*o.example.test", "*.*.example"]
    )
    leaf = forge.leaf_for("www.example.test", upstream, upstream_verified=True, now=NOW)
    assert leaf.names == ("www.example.test", "*.example.test")


@st.composite
def _san_lists(draw: st.DrawFn) -> list[str]:
    pool = st.one_of(
        _dns_names,
        _dns_names.map(lambda n: "*." + n),
        _dns_names.map(str.upper),
        st.ip_addresses().map(str),
        st.sampled_from(["*", "*.com", "a*.example", "bad..name", "-x.example", "1.2.3"]),
    )
    return draw(st.lists(pool, min_size=0, max_size=12))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host=_dns_names, sans=_san_lists(), verified=st.booleans(), error=st.booleans())
def test_mirrored_names_are_always_names_the_upstream_carried(
    ca: CertificateAuthority, host: str, sans: list[str], verified: bool, error: bool
) -> None:
    try:
        upstream = upstream_with(sans or None)
    except ValueError:  # cryptography refuses to build some of these; nothing to test
        assume(False)
        raise
    forge = CertForge(ca, max_cache_entries=0, max_mirrored_names=8)
    issuer = IssuerKind.ERROR if error else IssuerKind.TRUSTED
    leaf = forge.leaf_for(host, upstream, issuer=issuer, upstream_verified=verified, now=NOW)
    assert leaf.names[0] == normalize_host(host)
    carried = {n.lower().rstrip(".") for n in sans}
    carried |= {str(ipaddress.ip_address(n)) for n in sans if ip_address_of(n)}
    for name in leaf.names[1:]:
        assert name in carried
    if not error and not verified:
        assert leaf.names == (normalize_host(host),)
    assert len(leaf.names) <= 9
    assert len(set(leaf.names)) == len(leaf.names)


# -- name constraints --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def constrained_ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral(
        now=NOW, name_constraints_excluded=["bank.example", "10.0.0.0/8"]
    )


@pytest.mark.parametrize("host", ["bank.example", "www.bank.example", "10.1.2.3"])
def test_excluded_hosts_get_no_trusted_leaf(
    constrained_ca: CertificateAuthority, host: str
) -> None:
    with pytest.raises(ConfigurationError, match="bypass") as info:
        CertForge(constrained_ca).leaf_for(host, now=NOW)
    assert info.value.reason == "name_excluded"


def test_excluded_names_are_not_mirrored(constrained_ca: CertificateAuthority) -> None:
    upstream = upstream_with(
        ["shop.example", "bank.example", "a.bank.example", "*.example", "10.9.9.9", "192.0.2.5"]
    )
    leaf = CertForge(constrained_ca).leaf_for(
        "shop.example", upstream, upstream_verified=True, now=NOW
    )
    # "*.example" could match bank.example, so it goes too (Chromium treats it as excluded).
    assert leaf.names == ("shop.example", "192.0.2.5")
    verify_with_cryptography(constrained_ca.root_certificate, leaf)
    verify_with_openssl_strict(constrained_ca.root_certificate, leaf)


def test_name_constraints_are_enforced_by_verifiers_too(
    constrained_ca: CertificateAuthority,
) -> None:
    # Bypass the forge's own check: the CA certificates themselves must stop such a leaf.
    forge = CertForge(constrained_ca)
    forge._names = lambda host, upstream, mirror, trusted: [host]  # type: ignore[method-assign]
    leaf = forge.leaf_for("www.bank.example", now=NOW)
    with pytest.raises(VerificationError):
        verify_with_cryptography(constrained_ca.root_certificate, leaf)
    with pytest.raises(crypto.X509StoreContextError, match="excluded subtree"):
        verify_with_openssl_strict(constrained_ca.root_certificate, leaf)


def test_error_leaves_ignore_name_constraints(constrained_ca: CertificateAuthority) -> None:
    leaf = CertForge(constrained_ca).leaf_for("bank.example", issuer=IssuerKind.ERROR, now=NOW)
    assert leaf.issuer is IssuerKind.ERROR


# -- error-CA leaves ---------------------------------------------------------------------------


def test_error_leaf_is_signed_by_the_error_ca_and_trusted_nowhere(
    tmp_path: Path, ca: CertificateAuthority, forge: CertForge
) -> None:
    upstream = upstream_with(
        ["www.example.test", "alt.example.test"],
        not_before=NOW - 50 * DAY,
        not_after=NOW - 1 * DAY,
    )
    leaf = forge.leaf_for("www.example.test", upstream, issuer=IssuerKind.ERROR, now=NOW)
    assert leaf.issuer is IssuerKind.ERROR
    assert leaf.chain == ()
    assert leaf.ssl_chain == ()
    assert leaf.certificate.issuer == ca.error_ca_certificate.subject
    leaf.certificate.verify_directly_issued_by(ca.error_ca_certificate)
    # mirrored names and dates, still a fresh key
    assert leaf.names == ("www.example.test", "alt.example.test")
    assert leaf.certificate.not_valid_before_utc == upstream.not_valid_before_utc
    assert leaf.certificate.not_valid_after_utc == upstream.not_valid_after_utc
    assert leaf.certificate.public_key() != upstream.public_key()
    # the trusted root never vouches for it, even with the dates fixed
    with pytest.raises(VerificationError):
        verify_with_cryptography(ca.root_certificate, leaf, now=NOW - 10 * DAY)
    with pytest.raises(crypto.X509StoreContextError):
        verify_with_openssl_strict(ca.root_certificate, leaf, now=NOW - 10 * DAY)
    assert openssl_cli_verify(tmp_path, ca.root_certificate, leaf, NOW - 10 * DAY).returncode


def test_error_leaf_without_upstream_is_currently_valid(
    ca: CertificateAuthority, forge: CertForge
) -> None:
    leaf = forge.leaf_for("blocked.example", issuer=IssuerKind.ERROR, now=NOW)
    cert = leaf.certificate
    assert cert.not_valid_before_utc < NOW < cert.not_valid_after_utc
    verify_with_cryptography(ca.error_ca_certificate, leaf)  # only against the error CA itself


# -- cache (CA-07) -------------------------------------------------------------------------------


def test_cache_hit_returns_the_same_leaf(forge: CertForge) -> None:
    first = forge.leaf_for("cached.example", now=NOW)
    assert forge.leaf_for("CACHED.example.", now=NOW + DAY) is first
    stats = forge.stats()
    assert stats["hits"] == 1
    assert stats["mints"] == 1
    assert stats["entries"] == 1


def test_same_host_different_upstream_leaf_gets_a_different_leaf_matrix_ca07(
    ca: CertificateAuthority, forge: CertForge
) -> None:
    # Two upstream leaves for one host, identical except for the serial (the field Kaspersky's
    # 32-bit cache key was built from).
    root = make_root()
    intermediate = make_intermediate(root)
    key = ec.generate_private_key(ec.SECP256R1())
    a = make_leaf(intermediate, "www.example.test", key=key).cert
    b = make_leaf(intermediate, "www.example.test", key=key).cert
    assert a.serial_number != b.serial_number
    leaf_a = forge.leaf_for("www.example.test", a, upstream_verified=True, now=NOW)
    leaf_b = forge.leaf_for("www.example.test", b, upstream_verified=True, now=NOW)
    assert leaf_a.fingerprint_sha256 != leaf_b.fingerprint_sha256
    assert leaf_a.certificate.public_key() != leaf_b.certificate.public_key()
    assert forge.leaf_for("www.example.test", a, upstream_verified=True, now=NOW) is leaf_a


def test_cache_key_includes_verification_issuer_and_ca(ca: CertificateAuthority) -> None:
    forge = CertForge(ca)
    upstream = upstream_with(["www.example.test", "other.example.test"])
    verified = forge.leaf_for("www.example.test", upstream, upstream_verified=True, now=NOW)
    unverified = forge.leaf_for("www.example.test", upstream, now=NOW)
    error = forge.leaf_for("www.example.test", upstream, issuer=IssuerKind.ERROR, now=NOW)
    assert len({verified.fingerprint_sha256, unverified.fingerprint_sha256}) == 2
    assert error.fingerprint_sha256 not in {
        verified.fingerprint_sha256,
        unverified.fingerprint_sha256,
    }
    assert unverified.names == ("www.example.test",)
    other_ca_forge = CertForge(CertificateAuthority.ephemeral(now=NOW))
    assert (
        other_ca_forge.leaf_for("www.example.test", now=NOW).certificate.issuer
        != forge.leaf_for("www.example.test", now=NOW).certificate.issuer
    )


def test_rotation_makes_new_leaves_chain_to_the_new_intermediate() -> None:
    ca = CertificateAuthority.ephemeral(now=NOW)
    forge = CertForge(ca)
    before = forge.leaf_for("rot.example", now=NOW)
    ca.rotate_intermediate(now=NOW)
    after = forge.leaf_for("rot.example", now=NOW)
    assert after is not before
    assert after.chain == (ca.intermediate_certificate,)
    verify_with_cryptography(ca.root_certificate, after)


def test_lru_eviction_by_entries(ca: CertificateAuthority) -> None:
    forge = CertForge(ca, max_cache_entries=3)
    a = forge.leaf_for("a.example", now=NOW)
    forge.leaf_for("b.example", now=NOW)
    forge.leaf_for("c.example", now=NOW)
    assert forge.leaf_for("a.example", now=NOW) is a  # a is now the most recent
    forge.leaf_for("d.example", now=NOW)  # evicts b
    stats = forge.stats()
    assert stats["entries"] == 3
    assert stats["evictions"] == 1
    assert forge.leaf_for("a.example", now=NOW) is a
    mints = forge.stats()["mints"]
    forge.leaf_for("b.example", now=NOW)
    assert forge.stats()["mints"] == mints + 1


def test_cache_is_bounded_in_bytes(ca: CertificateAuthority) -> None:
    forge = CertForge(ca, max_cache_bytes=50_000)  # about four leaves
    for i in range(20):
        forge.leaf_for(f"h{i}.example", now=NOW)
    stats = forge.stats()
    assert 0 < stats["bytes"] <= 50_000
    assert stats["entries"] < 20
    assert stats["evictions"] == 20 - stats["entries"]


def test_zero_entries_disables_the_cache(ca: CertificateAuthority) -> None:
    forge = CertForge(ca, max_cache_entries=0)
    assert forge.leaf_for("x.example", now=NOW) is not forge.leaf_for("x.example", now=NOW)
    assert forge.stats()["entries"] == 0


def test_entries_expire_well_before_the_leaf(forge: CertForge) -> None:
    leaf = forge.leaf_for("exp.example", now=NOW)
    remaining = leaf.not_after - NOW
    assert forge.leaf_for("exp.example", now=NOW + remaining / 2 - DAY) is leaf
    renewed = forge.leaf_for("exp.example", now=NOW + remaining / 2 + dt.timedelta(minutes=1))
    assert renewed is not leaf
    assert renewed.not_after > leaf.not_after


def test_clear_forgets_everything(forge: CertForge) -> None:
    forge.leaf_for("c1.example", now=NOW)
    forge.clear()
    assert forge.stats()["entries"] == 0
    assert forge.stats()["bytes"] == 0


# -- concurrency ---------------------------------------------------------------------------------


@pytest.fixture
def gate(forge: CertForge) -> Iterator[threading.Event]:
    """Makes the forge's mints wait until the test opens the gate."""
    event = threading.Event()
    original = forge._mint

    def slow_mint(*args: object) -> tuple[ForgedLeaf, int]:
        assert event.wait(10)
        return original(*args)  # type: ignore[arg-type]

    forge._mint = slow_mint  # type: ignore[method-assign]
    yield event
    event.set()


def _run_threads(count: int, target: object) -> list[threading.Thread]:
    threads = [threading.Thread(target=target) for _ in range(count)]  # type: ignore[arg-type]
    for thread in threads:
        thread.start()
    return threads


def test_concurrent_misses_for_one_key_mint_once(forge: CertForge, gate: threading.Event) -> None:
    results: list[ForgedLeaf] = []
    lock = threading.Lock()

    def worker() -> None:
        leaf = forge.leaf_for("single.example", now=NOW)
        with lock:
            results.append(leaf)

    threads = _run_threads(8, worker)
    deadline = 100
    while forge.stats()["coalesced"] < 7 and deadline:
        threading.Event().wait(0.01)
        deadline -= 1
    gate.set()
    for thread in threads:
        thread.join(10)
    assert len(results) == 8
    assert all(leaf is results[0] for leaf in results)
    assert forge.stats()["mints"] == 1
    assert forge.stats()["coalesced"] == 7


def test_a_failed_mint_fails_every_waiter_and_is_retried_later(
    ca: CertificateAuthority,
) -> None:
    forge = CertForge(ca)
    original = forge._mint
    gate = threading.Event()
    calls = []

    def failing(*args: object) -> tuple[ForgedLeaf, int]:
        calls.append(1)
        if len(calls) == 1:
            assert gate.wait(10)
            raise ConfigurationError("boom", reason="test")
        return original(*args)  # type: ignore[arg-type]

    forge._mint = failing  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            forge.leaf_for("fail.example", now=NOW)
        except ConfigurationError as exc:
            errors.append(exc)

    threads = _run_threads(4, worker)
    deadline = 100
    while forge.stats()["coalesced"] < 3 and deadline:
        threading.Event().wait(0.01)
        deadline -= 1
    gate.set()
    for thread in threads:
        thread.join(10)
    assert len(errors) == 4
    assert forge.leaf_for("fail.example", now=NOW).host == "fail.example"
    assert len(calls) == 2


def test_worker_threads_can_mint_concurrently(ca: CertificateAuthority) -> None:
    forge = CertForge(ca, max_cache_entries=50)
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for i in range(40):
                leaf = forge.leaf_for(f"t{(index * 7 + i) % 60}.example", now=NOW)
                assert leaf.host.endswith(".example")
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures
    stats = forge.stats()
    assert stats["hits"] + stats["misses"] == 160
    assert stats["entries"] <= 50
    assert stats["mints"] + stats["coalesced"] == stats["misses"]


# -- the TLS objects -----------------------------------------------------------------------------


def _handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    for _ in range(50):
        for conn in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                conn.do_handshake()
        for source, sink in ((client, server), (server, client)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                continue
            sink.bio_write(data)
        if client.get_peer_certificate() is not None and server.get_finished():
            return
    raise AssertionError("handshake did not complete")


@pytest.fixture
def live_ca() -> CertificateAuthority:
    """A CA valid at the real time: OpenSSL's handshake checks dates against the clock."""
    return CertificateAuthority.ephemeral(now=dt.datetime.now(dt.UTC))


def test_pyopenssl_objects_complete_a_verified_handshake(live_ca: CertificateAuthority) -> None:
    ca = live_ca
    leaf = CertForge(ca).leaf_for("tls.example", now=dt.datetime.now(dt.UTC))
    server_context = SSL.Context(SSL.TLS_SERVER_METHOD)
    with warnings.catch_warnings():
        # pyOpenSSL >= 25 deprecates passing its own X509/PKey objects (it prefers cryptography
        # objects, which it converts on every call); they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        for extra in leaf.ssl_chain:
            server_context.add_extra_chain_cert(extra)
        server = SSL.Connection(server_context)
        server.use_certificate(leaf.ssl_certificate)
        server.use_privatekey(leaf.ssl_key)
    server.set_accept_state()
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_context.set_verify(SSL.VERIFY_PEER)
    client_context.get_cert_store().add_cert(  # type: ignore[union-attr]
        crypto.X509.from_cryptography(ca.root_certificate)
    )
    client = SSL.Connection(client_context)
    client.set_tlsext_host_name(b"tls.example")
    client.set_connect_state()
    _handshake(server, client)
    chain = client.get_peer_cert_chain(as_cryptography=True)
    assert chain is not None
    assert chain[0] == leaf.certificate
    assert chain[1:] == list(leaf.chain)


def test_cryptography_objects_complete_a_handshake_without_deprecated_calls(
    live_ca: CertificateAuthority,
) -> None:
    ca = live_ca
    leaf = CertForge(ca).leaf_for("tls2.example", now=dt.datetime.now(dt.UTC))
    server_context = SSL.Context(SSL.TLS_SERVER_METHOD)
    for extra in leaf.chain:
        server_context.add_extra_chain_cert(extra)
    server = SSL.Connection(server_context)
    server.use_certificate(leaf.certificate)
    server.use_privatekey(leaf.private_key)
    server.set_accept_state()
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_context.set_verify(SSL.VERIFY_PEER)
    client_context.get_cert_store().add_cert(  # type: ignore[union-attr]
        crypto.X509.from_cryptography(ca.root_certificate)
    )
    client = SSL.Connection(client_context)
    client.set_connect_state()
    _handshake(server, client)
    assert client.get_peer_certificate(as_cryptography=True) == leaf.certificate


def test_ssl_objects_match_the_cryptography_objects(forge: CertForge) -> None:
    leaf = forge.leaf_for("same.example", now=NOW)
    assert leaf.ssl_certificate.to_cryptography() == leaf.certificate
    public = leaf.ssl_key.to_cryptography_key().public_key()
    assert public == leaf.certificate.public_key()


def test_the_key_is_not_in_the_repr_and_cannot_be_pickled(forge: CertForge) -> None:
    leaf = forge.leaf_for("secret.example", now=NOW)
    key = leaf.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    secret = key.private_numbers().private_value
    text = repr(leaf) + str(leaf) + repr(forge)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    assert pem.splitlines()[1] not in text
    assert str(secret) not in text
    assert f"{secret:x}" not in text
    assert "PKey" not in text
    assert "private" not in text.lower()
    with pytest.raises(TypeError):
        pickle.dumps(leaf)


def test_forged_leaf_validates_itself(forge: CertForge) -> None:
    leaf = forge.leaf_for("v.example", now=NOW)
    with pytest.raises(ValueError, match="first name"):
        ForgedLeaf(
            host="other.example",
            names=leaf.names,
            certificate=leaf.certificate,
            chain=leaf.chain,
            ssl_certificate=leaf.ssl_certificate,
            ssl_key=leaf.ssl_key,
            ssl_chain=leaf.ssl_chain,
            private_key=leaf.private_key,
            issuer=leaf.issuer,
            not_after=leaf.not_after,
            fingerprint_sha256=leaf.fingerprint_sha256,
        )


def test_bad_limits_are_configuration_errors(ca: CertificateAuthority) -> None:
    with pytest.raises(ConfigurationError):
        CertForge(ca, max_cache_entries=-1)
    with pytest.raises(ConfigurationError) as info:
        CertForge(ca, key_type="dsa1024")
    assert info.value.reason == "key_type"
