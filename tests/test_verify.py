"""UpstreamVerifier against matrix section B (CV-*), trust configuration, revocation and fetching.

Every certificate is generated here (tests/pki.py, the openssl command where cryptography refuses
to sign). Host-name vectors (matrix section (c)) are in test_verify_names.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import certifi
import pytest
from conftest import require_tool
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pki import (
    DAY,
    NOW,
    Hierarchy,
    Issued,
    cached_key,
    good_hierarchy,
    issue,
    make_intermediate,
    make_key,
    make_leaf,
    make_root,
    openssl_sign,
)

from tlsmitm._errors import CertError, ConfigurationError
from tlsmitm._verify import (
    KNOWN_INTERCEPTION_SPKI_SHA256,
    TrustConfig,
    UpstreamVerifier,
    Verdict,
    certifi_bundle_age,
    spki_sha256,
    trust_store_warning,
)

HOST = "www.example.test"
HOUR = dt.timedelta(hours=1)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def h() -> Hierarchy:
    return good_hierarchy(HOST)


@pytest.fixture(scope="module")
def verifier(h: Hierarchy) -> UpstreamVerifier:
    return UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)))


def verify(
    v: UpstreamVerifier,
    chain: Sequence[x509.Certificate],
    host: str = HOST,
    now: dt.datetime = NOW,
    **kw: object,
) -> Verdict:
    return v.verify(chain, host, now=now, **kw)  # type: ignore[arg-type]


def assert_rejected(verdict: Verdict, error: CertError) -> None:
    assert not verdict.ok, verdict
    assert verdict.error is error, (verdict.error, verdict.detail)
    assert verdict.detail
    assert verdict.overridable is error.overridable


def leaf_with_public_key(
    issuer: Issued, public_key: CertificatePublicKeyTypes, host: str = HOST
) -> x509.Certificate:
    """A leaf for ``host`` carrying ``public_key`` (whose private half may not even exist)."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
        .sign(issuer.key, hashes.SHA256())
    )


def rsa_public_key(bits: int, seed: int = 1) -> rsa.RSAPublicKey:
    """An RSA public key of exactly ``bits`` bits without generating a key pair.

    A certificate only carries the modulus; for key-size policy its factors do not matter, and
    generating an RSA-8192 key would take far too long for a unit test.
    """
    rng = random.Random(seed)
    modulus = rng.getrandbits(bits) | (1 << (bits - 1)) | 1
    return rsa.RSAPublicNumbers(65537, modulus).public_key()


def openssl_ca_extensions(path_length: int = 0) -> str:
    return (
        f"basicConstraints=critical,CA:TRUE,pathlen:{path_length}\n"
        "keyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )


# --------------------------------------------------------------------------------------------
# B. Chain and attribute validation


def test_cv01_good_chain_is_accepted_with_the_verified_path(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    verdict = verify(verifier, [h.leaf.cert, h.intermediate.cert])
    assert verdict.ok
    assert verdict.error is None
    assert verdict.detail == ""
    assert not verdict.overridable
    assert verdict.chain == (h.leaf.cert, h.intermediate.cert, h.root.cert)
    assert verdict.leaf == h.leaf.cert
    assert verdict.leaf_sha256 == hashlib.sha256(h.leaf.der).digest()
    assert verdict.host == HOST
    assert not verdict.public_root  # an extra (enterprise) root is not public
    assert verdict.revocation == "unchecked"


def test_cv01_rest_of_chain_in_any_order_with_duplicates_and_the_root(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    chain = [h.leaf.cert, h.root.cert, h.intermediate.cert, h.intermediate.cert]
    verdict = verify(verifier, chain)
    assert verdict.ok
    assert verdict.chain == (h.leaf.cert, h.intermediate.cert, h.root.cert)


def test_host_is_normalised_before_matching(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    verdict = verify(verifier, [h.leaf.cert, h.intermediate.cert], host="WWW.Example.TEST.")
    assert verdict.ok
    assert verdict.host == HOST


def test_cv02_expired_leaf(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    leaf = make_leaf(h.intermediate, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    verdict = verify(verifier, [leaf.cert, h.intermediate.cert])
    assert_rejected(verdict, CertError.EXPIRED)
    assert verdict.chain == (leaf.cert, h.intermediate.cert)  # as presented
    assert verdict.leaf == leaf.cert


def test_cv03_not_yet_valid_leaf(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    leaf = make_leaf(h.intermediate, not_before=NOW + DAY, not_after=NOW + 10 * DAY)
    assert_rejected(verify(verifier, [leaf.cert, h.intermediate.cert]), CertError.NOT_YET_VALID)


def test_validity_bounds_are_inclusive(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    # RFC 5280 §4.1.2.5: valid from notBefore through notAfter, both included.
    leaf = h.leaf.cert
    chain = [leaf, h.intermediate.cert]
    assert verify(verifier, chain, now=leaf.not_valid_after_utc).ok
    assert verify(verifier, chain, now=leaf.not_valid_before_utc).ok
    late = leaf.not_valid_after_utc + dt.timedelta(seconds=1)
    assert_rejected(verify(verifier, chain, now=late), CertError.EXPIRED)


def test_cv04_expired_intermediate(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    intermediate = make_intermediate(h.root, not_before=NOW - 10 * DAY, not_after=NOW - HOUR)
    leaf = make_leaf(intermediate, not_before=NOW - 2 * DAY)
    verdict = verify(verifier, [leaf.cert, intermediate.cert])
    assert_rejected(verdict, CertError.EXPIRED)
    assert "Test Intermediate" in verdict.detail


def test_cv05_expired_root() -> None:
    root = make_root("Expired Root", not_before=NOW - 100 * DAY, not_after=NOW - HOUR)
    intermediate = make_intermediate(root, not_before=NOW - 50 * DAY)
    leaf = make_leaf(intermediate, not_before=NOW - 2 * DAY)
    v = UpstreamVerifier(TrustConfig(extra_roots=(root.cert,)))
    verdict = verify(v, [leaf.cert, intermediate.cert])
    assert_rejected(verdict, CertError.EXPIRED)
    assert "Expired Root" in verdict.detail


def test_cv06_wildcard_does_not_cover_two_labels(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    leaf = make_leaf(h.intermediate, sans=["*.example.test", "example.test"])
    chain = [leaf.cert, h.intermediate.cert]
    assert verify(verifier, chain, host="host.example.test").ok
    assert verify(verifier, chain, host="example.test").ok
    assert_rejected(
        verify(verifier, chain, host="wrong.host.example.test"), CertError.NAME_MISMATCH
    )


def test_cv07_self_signed_leaf(verifier: UpstreamVerifier) -> None:
    leaf = issue(subject_cn=HOST, issuer=None, sans=[HOST])
    assert_rejected(verify(verifier, [leaf.cert]), CertError.SELF_SIGNED)


def test_self_signed_leaf_trusted_as_an_anchor_is_accepted() -> None:
    leaf = issue(subject_cn=HOST, issuer=None, sans=[HOST])
    v = UpstreamVerifier(TrustConfig(extra_roots=(leaf.cert,)))
    verdict = verify(v, [leaf.cert])
    assert verdict.ok
    assert verdict.chain == (leaf.cert,)


def test_cv08_untrusted_root_presented_is_unknown_issuer(verifier: UpstreamVerifier) -> None:
    other = good_hierarchy()  # a new root, not in the store
    chain = [other.leaf.cert, other.intermediate.cert, other.root.cert]
    verdict = verify(verifier, chain)
    assert_rejected(verdict, CertError.UNKNOWN_ISSUER)
    assert "not trusted" in verdict.detail


def test_cv08_untrusted_root_not_presented_is_incomplete_chain(verifier: UpstreamVerifier) -> None:
    # The top presented certificate is not self-signed and its issuer is nowhere: tlsmitm
    # cannot tell an unknown root from a missing intermediate, and says the chain is incomplete
    # (both are overridable trust errors; AIA fetching can tell them apart).
    other = good_hierarchy()
    verdict = verify(verifier, [other.leaf.cert, other.intermediate.cert])
    assert_rejected(verdict, CertError.INCOMPLETE_CHAIN)


def test_cv09_incomplete_chain_and_preloaded_intermediate(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    verdict = verify(verifier, [h.leaf.cert])
    assert_rejected(verdict, CertError.INCOMPLETE_CHAIN)
    assert "Test Intermediate" in verdict.detail
    fixed = verify(verifier, [h.leaf.cert], extra_intermediates=[h.intermediate.cert])
    assert fixed.ok
    assert fixed.chain == (h.leaf.cert, h.intermediate.cert, h.root.cert)


def test_cv12_rsa512_leaf_made_with_openssl(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    openssl = require_tool("openssl")
    key_dir = Path(__import__("tempfile").mkdtemp())
    key_path = key_dir / "rsa512.key"
    __import__("subprocess").run(
        [openssl, "genrsa", "-out", str(key_path), "512"], check=True, capture_output=True
    )
    leaf = openssl_sign(key_path, h.intermediate)
    verdict = verify(verifier, [leaf, h.intermediate.cert])
    assert_rejected(verdict, CertError.WEAK_KEY)
    assert "512 bits" in verdict.detail


@pytest.mark.parametrize("bits", [1024, 2047, 2052])  # CV-13; CV-15 (not a multiple of 8)
def test_cv13_cv15_weak_rsa_leaf_keys(verifier: UpstreamVerifier, h: Hierarchy, bits: int) -> None:
    leaf = leaf_with_public_key(h.intermediate, rsa_public_key(bits))
    verdict = verify(verifier, [leaf, h.intermediate.cert])
    assert_rejected(verdict, CertError.WEAK_KEY)
    assert f"{bits} bits" in verdict.detail


@pytest.mark.parametrize("bits", [2048, 3072, 4096, 8192])  # CV-14
def test_cv14_acceptable_rsa_sizes(verifier: UpstreamVerifier, h: Hierarchy, bits: int) -> None:
    leaf = leaf_with_public_key(h.intermediate, rsa_public_key(bits))
    assert verify(verifier, [leaf, h.intermediate.cert]).ok


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
def test_cv14_acceptable_curves(
    verifier: UpstreamVerifier, h: Hierarchy, curve: ec.EllipticCurve
) -> None:
    leaf = leaf_with_public_key(h.intermediate, ec.generate_private_key(curve).public_key())
    assert verify(verifier, [leaf, h.intermediate.cert]).ok


@pytest.mark.parametrize(
    "make_public_key",
    [
        pytest.param(lambda: ec.generate_private_key(ec.SECP192R1()).public_key(), id="P-192"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP224R1()).public_key(), id="P-224"),
        pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()).public_key(), id="secp256k1"),
        pytest.param(lambda: dsa.generate_private_key(1024).public_key(), id="DSA"),
        pytest.param(lambda: ed25519.Ed25519PrivateKey.generate().public_key(), id="Ed25519"),
    ],
)
def test_cv15_forbidden_key_types(
    verifier: UpstreamVerifier, h: Hierarchy, make_public_key: object
) -> None:
    leaf = leaf_with_public_key(h.intermediate, make_public_key())  # type: ignore[operator]
    assert_rejected(verify(verifier, [leaf, h.intermediate.cert]), CertError.WEAK_KEY)


def test_weak_intermediate_key_is_weak_key(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    intermediate = make_intermediate(h.root, name="RSA-1024 Intermediate", key=make_key("rsa1024"))
    leaf = make_leaf(intermediate)
    verdict = verify(verifier, [leaf.cert, intermediate.cert])
    assert_rejected(verdict, CertError.WEAK_KEY)
    assert "RSA-1024 Intermediate" in verdict.detail


def test_weak_key_outranks_an_expired_leaf(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    # Several problems: the non-overridable one is reported, never the overridable one.
    leaf = leaf_with_public_key(h.intermediate, rsa_public_key(1024))
    expired = make_leaf(h.intermediate, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    assert_rejected(verify(verifier, [leaf, h.intermediate.cert], now=NOW), CertError.WEAK_KEY)
    assert_rejected(verify(verifier, [expired.cert, h.intermediate.cert]), CertError.EXPIRED)


@pytest.fixture(scope="module")
def rsa_intermediate(h: Hierarchy) -> Issued:
    # MD5 exists only with RSA; cryptography refuses to sign MD5/SHA-1, openssl does it.
    return make_intermediate(h.root, name="RSA Intermediate", key=cached_key("rsa2048"))


@pytest.mark.parametrize(("digest", "word"), [("md5", "MD5"), ("sha1", "SHA-1")])  # CV-16, CV-17
def test_cv16_cv17_weak_leaf_signature(
    verifier: UpstreamVerifier, rsa_intermediate: Issued, digest: str, word: str
) -> None:
    require_tool("openssl")
    leaf = openssl_sign(make_key(), rsa_intermediate, digest=digest)
    verdict = verify(verifier, [leaf, rsa_intermediate.cert])
    assert_rejected(verdict, CertError.WEAK_SIGNATURE)
    assert word in verdict.detail


def test_cv18_sha1_intermediate(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    require_tool("openssl")
    key = make_key()
    cert = openssl_sign(
        key,
        h.root,
        subject="/CN=SHA-1 Intermediate",
        digest="sha1",
        extensions=openssl_ca_extensions(),
        days=365,
    )
    intermediate = Issued(cert=cert, key=key, parents=[h.root])
    leaf = make_leaf(intermediate)
    verdict = verify(verifier, [leaf.cert, cert])
    assert_rejected(verdict, CertError.WEAK_SIGNATURE)
    assert "SHA-1 Intermediate" in verdict.detail


def test_cv19_intermediate_ca_false(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    not_ca = issue(subject_cn="Not A CA", issuer=h.root, ca=False, eku=None, key_usage=None)
    leaf = make_leaf(not_ca)
    verdict = verify(verifier, [leaf.cert, not_ca.cert])
    assert_rejected(verdict, CertError.INVALID_CHAIN)
    assert "cA=FALSE" in verdict.detail


def test_cv20_intermediate_without_basic_constraints(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    key_usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    no_bc = issue(
        subject_cn="No BC", issuer=h.root, ca=None, eku=None, key_usage=None,
        extra=[(key_usage, True)],
    )  # fmt: skip
    verdict = verify(verifier, [make_leaf(no_bc).cert, no_bc.cert])
    assert_rejected(verdict, CertError.INVALID_CHAIN)
    assert "no basicConstraints" in verdict.detail


def test_cv21_x509_v1_intermediate(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    require_tool("openssl")
    key = make_key()
    cert = openssl_sign(key, h.root, subject="/CN=V1 Intermediate", extensions=None, days=365)
    assert cert.version is x509.Version.v1
    leaf = make_leaf(Issued(cert=cert, key=key, parents=[h.root]))
    verdict = verify(verifier, [leaf.cert, cert])
    assert_rejected(verdict, CertError.INVALID_CHAIN)
    assert "v1" in verdict.detail


def test_cv22_path_length_violation(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    first = make_intermediate(h.root, name="Int pathlen 0", path_length=0)
    second = make_intermediate(first, name="Int 2", path_length=None)
    leaf = make_leaf(second)
    verdict = verify(verifier, [leaf.cert, second.cert, first.cert])
    assert_rejected(verdict, CertError.INVALID_CHAIN)
    assert "pathLenConstraint" in verdict.detail


def name_constrained(
    root: Issued, *, permitted: list[str] | None, excluded: list[str] | None
) -> Issued:
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(n) for n in permitted] if permitted else None,
        excluded_subtrees=[x509.DNSName(n) for n in excluded] if excluded else None,
    )
    return make_intermediate(root, name="Constrained", extra=[(constraints, True)])


def test_cv23_name_constraints(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    allowed = name_constrained(h.root, permitted=["allowed.test"], excluded=None)
    verdict = verify(verifier, [make_leaf(allowed).cert, allowed.cert])
    assert_rejected(verdict, CertError.INVALID_CHAIN)
    assert "nameConstraints" in verdict.detail
    ok_leaf = make_leaf(allowed, "www.allowed.test")
    assert verify(verifier, [ok_leaf.cert, allowed.cert], host="www.allowed.test").ok
    excluded = name_constrained(h.root, permitted=None, excluded=["example.test"])
    assert_rejected(
        verify(verifier, [make_leaf(excluded).cert, excluded.cert]), CertError.INVALID_CHAIN
    )
    wildcard = make_leaf(excluded, sans=["*.test"])
    assert_rejected(
        verify(verifier, [wildcard.cert, excluded.cert], host="a.example.test"),
        CertError.INVALID_CHAIN,
    )


PRIVATE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")


def test_cv24_unknown_critical_extension(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    ext = x509.UnrecognizedExtension(PRIVATE_OID, b"\x05\x00")
    critical = make_leaf(h.intermediate, extra=[(ext, True)])
    verdict = verify(verifier, [critical.cert, h.intermediate.cert])
    assert_rejected(verdict, CertError.UNKNOWN_CRITICAL_EXTENSION)
    assert PRIVATE_OID.dotted_string in verdict.detail
    harmless = make_leaf(h.intermediate, extra=[(ext, False)])
    assert verify(verifier, [harmless.cert, h.intermediate.cert]).ok


def test_cv25_wrong_eku(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    leaf = make_leaf(h.intermediate, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    verdict = verify(verifier, [leaf.cert, h.intermediate.cert])
    assert_rejected(verdict, CertError.WRONG_USAGE)
    assert "serverAuth" in verdict.detail


def test_intermediate_restricted_to_client_auth_is_wrong_usage(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    intermediate = make_intermediate(h.root, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    verdict = verify(verifier, [make_leaf(intermediate).cert, intermediate.cert])
    assert_rejected(verdict, CertError.WRONG_USAGE)


def test_cv26_ca_certificate_as_leaf_is_wrong_usage(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    # Documented choice: WRONG_USAGE (not overridable). Firefox files this under its
    # overridable "trust" errors; tlsmitm is stricter.
    leaf = make_leaf(h.intermediate, ca=True)
    verdict = verify(verifier, [leaf.cert, h.intermediate.cert])
    assert_rejected(verdict, CertError.WRONG_USAGE)
    assert "CA certificate" in verdict.detail


def tampered(cert: x509.Certificate) -> x509.Certificate:
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature value (matrix A.4)
    return x509.load_der_x509_certificate(bytes(der))


def test_cv27_tampered_signature(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    verdict = verify(verifier, [tampered(h.leaf.cert), h.intermediate.cert])
    assert_rejected(verdict, CertError.BAD_SIGNATURE)


def test_cv29_no_san_never_falls_back_to_the_common_name(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    leaf = make_leaf(h.intermediate, sans=None)
    assert leaf.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == HOST
    verdict = verify(verifier, [leaf.cert, h.intermediate.cert])
    assert_rejected(verdict, CertError.NAME_MISMATCH)
    assert "no subjectAltName" in verdict.detail


def test_cv30_san_without_common_name(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    leaf = issue(subject_cn=None, issuer=h.intermediate, sans=[HOST])
    assert verify(verifier, [leaf.cert, h.intermediate.cert]).ok


def test_cv31_empty_subject_with_critical_san(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    leaf = issue(subject_cn=None, org=None, issuer=h.intermediate, sans=[HOST], san_critical=True)
    assert not leaf.cert.subject.rdns
    assert verify(verifier, [leaf.cert, h.intermediate.cert]).ok


def test_cv33_idn_homograph_label_is_accepted_in_a_label_form(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    host = "xn--n1aae7f7o.badssl.test"  # "ѕрооғ" in Cyrillic
    leaf = make_leaf(h.intermediate, host)
    chain = [leaf.cert, h.intermediate.cert]
    assert verify(verifier, chain, host=host).ok
    verdict = verify(verifier, chain, host="ѕрооғ.badssl.test")  # the U-label form
    assert verdict.ok
    assert verdict.host == host  # what any UI shows: the punycode


def test_cv34_distrusted_root_even_when_trusted(h: Hierarchy) -> None:
    root = make_root("Known Interception Root")
    intermediate = make_intermediate(root)
    leaf = make_leaf(intermediate)
    trust = TrustConfig(
        extra_roots=(root.cert,),
        distrusted_spki_sha256=KNOWN_INTERCEPTION_SPKI_SHA256 | {spki_sha256(root.cert)},
    )
    verdict = verify(UpstreamVerifier(trust), [leaf.cert, intermediate.cert])
    assert_rejected(verdict, CertError.DISTRUSTED)
    assert not verdict.overridable
    # ... and the same root without the distrust entry is fine.
    assert verify(
        UpstreamVerifier(TrustConfig(extra_roots=(root.cert,))), [leaf.cert, intermediate.cert]
    ).ok


def test_cv34_distrusted_untrusted_root_is_distrusted_not_unknown(h: Hierarchy) -> None:
    root = make_root("Interception Root Sent By Server")
    leaf = make_leaf(root)
    trust = TrustConfig(distrusted_spki_sha256={spki_sha256(root.cert)})
    assert_rejected(verify(UpstreamVerifier(trust), [leaf.cert, root.cert]), CertError.DISTRUSTED)


def test_cv34_distrusted_leaf_key(h: Hierarchy) -> None:
    trust = TrustConfig(
        extra_roots=(h.root.cert,), distrusted_spki_sha256={spki_sha256(h.leaf.cert)}
    )
    verdict = verify(UpstreamVerifier(trust), [h.leaf.cert, h.intermediate.cert])
    assert_rejected(verdict, CertError.DISTRUSTED)


def test_cv34_shipped_distrust_list() -> None:
    assert len(KNOWN_INTERCEPTION_SPKI_SHA256) == 6
    assert all(isinstance(d, bytes) and len(d) == 32 for d in KNOWN_INTERCEPTION_SPKI_SHA256)
    assert TrustConfig().distrusted_spki_sha256 == KNOWN_INTERCEPTION_SPKI_SHA256


def test_spki_sha256_is_the_hash_of_the_der_subject_public_key_info(h: Hierarchy) -> None:
    spki = h.leaf.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki_sha256(h.leaf.cert) == hashlib.sha256(spki).digest()


def test_cv39_extended_validation_policy_is_accepted(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    policies = x509.CertificatePolicies(
        [x509.PolicyInformation(x509.ObjectIdentifier("2.23.140.1.1"), None)]
    )
    leaf = make_leaf(h.intermediate, extra=[(policies, False)])
    assert verify(verifier, [leaf.cert, h.intermediate.cert]).ok


def test_chain_longer_than_max_depth_is_invalid(h: Hierarchy) -> None:
    issuer = h.root
    intermediates = []
    for depth in range(4):
        issuer = make_intermediate(issuer, name=f"Depth {depth}", path_length=None)
        intermediates.append(issuer.cert)
    leaf = make_leaf(issuer)
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), max_chain_depth=2)
    assert_rejected(verify(v, [leaf.cert, *intermediates]), CertError.INVALID_CHAIN)
    wide = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), max_chain_depth=4)
    assert verify(wide, [leaf.cert, *intermediates]).ok


def test_cross_signed_path_avoids_a_distrusted_root() -> None:
    # The same intermediate key, cross-signed by a distrusted and by a good root: the path
    # through the good root is found and accepted, as a browser's path builder would.
    bad_root, good_root = make_root("Distrusted Root"), make_root("Good Root")
    key = make_key()
    via_bad = issue(
        subject_cn="Cross Int", issuer=bad_root, key=key, ca=True, path_length=0, eku=None
    )
    via_good = issue(
        subject_cn="Cross Int", issuer=good_root, key=key, ca=True, path_length=0, eku=None
    )
    leaf = make_leaf(via_bad)
    trust = TrustConfig(
        extra_roots=(bad_root.cert, good_root.cert),
        distrusted_spki_sha256={spki_sha256(bad_root.cert)},
    )
    v = UpstreamVerifier(trust)
    assert_rejected(verify(v, [leaf.cert, via_bad.cert]), CertError.DISTRUSTED)
    verdict = verify(v, [leaf.cert, via_bad.cert, via_good.cert])
    assert verdict.ok
    assert verdict.chain[-1] == good_root.cert


# --------------------------------------------------------------------------------------------
# Failing safe: an overridable reason is reported only when it is the whole story


def uri_constrained_hierarchy(root: Issued) -> tuple[Issued, x509.Certificate]:
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier("example.test")],
        excluded_subtrees=None,
    )
    intermediate = make_intermediate(root, name="URI Constrained", extra=[(constraints, True)])
    return intermediate, intermediate.cert


def test_unclassified_rejection_is_invalid_chain_not_an_overridable_error(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    # cryptography refuses URI name constraints; tlsmitm's diagnosis does not model them. An
    # expired leaf under such a CA must not come out as the overridable EXPIRED.
    intermediate, cert = uri_constrained_hierarchy(h.root)
    san = x509.SubjectAlternativeName(
        [x509.DNSName(HOST), x509.UniformResourceIdentifier("https://www.example.test/")]
    )
    expired = issue(
        subject_cn=HOST, issuer=intermediate, not_before=NOW - 10 * DAY, not_after=NOW - DAY,
        extra=[(san, False)],
    )  # fmt: skip
    verdict = verify(verifier, [expired.cert, cert])
    assert_rejected(verdict, CertError.INVALID_CHAIN)
    assert "did not classify" in verdict.detail


def test_intermediate_aki_without_key_identifier_is_invalid_chain(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    key = make_key()
    aki = x509.AuthorityKeyIdentifier(
        key_identifier=None,
        authority_cert_issuer=[x509.DirectoryName(h.root.cert.subject)],
        authority_cert_serial_number=h.root.cert.serial_number,
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    odd = issue(
        subject_cn="Odd AKI", issuer=h.root, key=key, ca=True, path_length=0, eku=None,
        ski_aki=False, extra=[(aki, False), (ski, False)],
    )  # fmt: skip
    assert_rejected(verify(verifier, [make_leaf(odd).cert, odd.cert]), CertError.INVALID_CHAIN)


# --------------------------------------------------------------------------------------------
# Host names: both matchers must agree (the vectors are in test_verify_names.py)


def test_name_rejected_by_cryptography_only_is_a_name_mismatch(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    # Browsers allow "_" in host names; cryptography's verifier refuses such a subject. tlsmitm
    # accepts only when both agree, and the chain itself is fine, so this is a name error.
    host = "foo_bar.example.test"
    leaf = make_leaf(h.intermediate, host)
    verdict = verify(verifier, [leaf.cert, h.intermediate.cert], host=host)
    assert_rejected(verdict, CertError.NAME_MISMATCH)


def test_name_accepted_by_cryptography_but_over_a_public_suffix_is_rejected(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    # HN-P2 / N-39: cryptography (like OpenSSL) matches *.co.uk against example.co.uk.
    leaf = make_leaf(h.intermediate, sans=["*.co.uk"])
    chain = [leaf.cert, h.intermediate.cert]
    verdict = verify(verifier, chain, host="example.co.uk")
    assert_rejected(verdict, CertError.NAME_MISMATCH)


def test_invalid_requested_host_never_matches(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    verdict = verify(verifier, [h.leaf.cert, h.intermediate.cert], host="www..example.test")
    assert_rejected(verdict, CertError.NAME_MISMATCH)
    assert verdict.host == "www..example.test"
    assert "not a valid" in verdict.detail


# --------------------------------------------------------------------------------------------
# Own CA, public roots (CV-35, CV-36, matrix §6)


@pytest.fixture(scope="module")
def own(h: Hierarchy) -> Issued:
    return make_root("tlsmitm Root CA")


def test_leaf_issued_by_own_ca_is_refused(h: Hierarchy, own: Issued) -> None:
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,), own_certificates=(own.cert,)))
    forged = make_leaf(own)
    verdict = verify(v, [forged.cert])  # own root not even presented
    assert_rejected(verdict, CertError.OWN_CA)
    assert_rejected(verify(v, [forged.cert, own.cert]), CertError.OWN_CA)
    assert_rejected(verify(v, [own.cert]), CertError.OWN_CA)  # presenting the CA itself
    assert verify(v, [h.leaf.cert, h.intermediate.cert]).ok


@pytest.mark.parametrize("where", ["extra_roots", "public_roots", "replace_bundle"])
def test_own_ca_as_upstream_anchor_is_a_configuration_error(own: Issued, where: str) -> None:
    trust = TrustConfig(own_certificates=(own.cert,), **{where: (own.cert,)})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="own certificate"):
        UpstreamVerifier(trust)


T0 = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def public() -> Hierarchy:
    root = make_root(
        "Public Test Root",
        not_before=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2036, 1, 1, tzinfo=dt.UTC),
    )
    intermediate = make_intermediate(
        root,
        name="Public Test Intermediate",
        not_before=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2034, 1, 1, tzinfo=dt.UTC),
    )
    return Hierarchy(root, intermediate, make_leaf(intermediate, "www.example.com"))


@pytest.fixture(scope="module")
def public_verifier(public: Hierarchy) -> UpstreamVerifier:
    return UpstreamVerifier(TrustConfig(public_roots=(public.root.cert,)))


@pytest.fixture(scope="module")
def enterprise_verifier(public: Hierarchy) -> UpstreamVerifier:
    return UpstreamVerifier(TrustConfig(extra_roots=(public.root.cert,)))


@pytest.mark.parametrize(
    ("issued", "days", "now", "ok"),
    [
        (dt.datetime(2026, 1, 10, tzinfo=dt.UTC), 398, T0, True),
        (dt.datetime(2026, 1, 10, tzinfo=dt.UTC), 399, T0, False),
        (dt.datetime(2026, 3, 15, tzinfo=dt.UTC), 200, T0, True),
        (dt.datetime(2026, 3, 15, tzinfo=dt.UTC), 201, T0, False),
        (
            dt.datetime(2027, 3, 15, tzinfo=dt.UTC),
            100,
            dt.datetime(2027, 4, 1, tzinfo=dt.UTC),
            True,
        ),
        (
            dt.datetime(2027, 3, 15, tzinfo=dt.UTC),
            101,
            dt.datetime(2027, 4, 1, tzinfo=dt.UTC),
            False,
        ),
        (dt.datetime(2029, 3, 15, tzinfo=dt.UTC), 47, dt.datetime(2029, 4, 1, tzinfo=dt.UTC), True),
        (
            dt.datetime(2029, 3, 15, tzinfo=dt.UTC),
            48,
            dt.datetime(2029, 4, 1, tzinfo=dt.UTC),
            False,
        ),
    ],
)
def test_cv35_maximum_validity_for_public_roots(
    public: Hierarchy,
    public_verifier: UpstreamVerifier,
    enterprise_verifier: UpstreamVerifier,
    issued: dt.datetime,
    days: int,
    now: dt.datetime,
    ok: bool,
) -> None:
    leaf = make_leaf(
        public.intermediate, "www.example.com", not_before=issued, not_after=issued + days * DAY
    )
    chain = [leaf.cert, public.intermediate.cert]
    verdict = verify(public_verifier, chain, host="www.example.com", now=now)
    if ok:
        assert verdict.ok
        assert verdict.public_root
    else:
        assert_rejected(verdict, CertError.VALIDITY_TOO_LONG)
    # CA/B limits are not applied to enterprise roots (Chromium: known roots only).
    assert verify(enterprise_verifier, chain, host="www.example.com", now=now).ok


def test_cv35_825_days(public: Hierarchy, public_verifier: UpstreamVerifier) -> None:
    issued = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    leaf = make_leaf(
        public.intermediate, "www.example.com", not_before=issued, not_after=issued + 825 * DAY
    )
    verdict = verify(
        public_verifier, [leaf.cert, public.intermediate.cert], host="www.example.com", now=T0
    )
    assert_rejected(verdict, CertError.VALIDITY_TOO_LONG)
    assert "825 days" in verdict.detail


@pytest.mark.parametrize("host", ["server.local", "intranet", "10.0.0.1", "192.168.1.1", "fd00::1"])
def test_cv36_non_unique_names_from_public_roots(
    public: Hierarchy,
    public_verifier: UpstreamVerifier,
    enterprise_verifier: UpstreamVerifier,
    host: str,
) -> None:
    leaf = make_leaf(public.intermediate, host, not_before=T0 - DAY, not_after=T0 + 90 * DAY)
    chain = [leaf.cert, public.intermediate.cert]
    verdict = verify(public_verifier, chain, host=host, now=T0)
    assert_rejected(verdict, CertError.NAME_MISMATCH)
    assert "unique" in verdict.detail
    assert verify(enterprise_verifier, chain, host=host, now=T0).ok


def test_unique_public_names_are_fine(public: Hierarchy, public_verifier: UpstreamVerifier) -> None:
    for host in ["www.example.com", "8.8.8.8", "example.co.uk"]:
        leaf = make_leaf(public.intermediate, host, not_before=T0 - DAY, not_after=T0 + 90 * DAY)
        verdict = verify(public_verifier, [leaf.cert, public.intermediate.cert], host=host, now=T0)
        assert verdict.ok, (host, verdict.detail)
        assert verdict.public_root


def test_n85_critical_san_with_a_subject_breaks_the_public_profile(
    public: Hierarchy, public_verifier: UpstreamVerifier, enterprise_verifier: UpstreamVerifier
) -> None:
    leaf = make_leaf(
        public.intermediate, "www.example.com", san_critical=True,
        not_before=T0 - DAY, not_after=T0 + 90 * DAY,
    )  # fmt: skip
    chain = [leaf.cert, public.intermediate.cert]
    assert_rejected(
        verify(public_verifier, chain, host="www.example.com", now=T0), CertError.MALFORMED
    )
    assert verify(enterprise_verifier, chain, host="www.example.com", now=T0).ok


def test_public_root_policy_can_be_turned_off(public: Hierarchy) -> None:
    issued = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    leaf = make_leaf(
        public.intermediate, "server.local", not_before=issued, not_after=issued + 825 * DAY
    )
    v = UpstreamVerifier(TrustConfig(public_roots=(public.root.cert,)), public_root_policy=False)
    verdict = verify(v, [leaf.cert, public.intermediate.cert], host="server.local", now=T0)
    assert verdict.ok
    assert verdict.public_root


@pytest.mark.xfail(
    strict=True,
    reason="CV-37: Certificate Transparency (SCT) checking is not implemented; "
    "docs/verification.rst says so",
)
def test_cv37_public_leaf_without_scts_is_rejected(
    public: Hierarchy, public_verifier: UpstreamVerifier
) -> None:
    leaf = make_leaf(
        public.intermediate, "www.example.com", not_before=T0 - DAY, not_after=T0 + 90 * DAY
    )
    verdict = verify(
        public_verifier, [leaf.cert, public.intermediate.cert], host="www.example.com", now=T0
    )
    assert not verdict.ok


@pytest.mark.xfail(
    strict=True,
    reason="CV-38: Chromium's static key pins are not enforced; docs/verification.rst says so",
)
def test_cv38_static_pin_mismatch_is_rejected(
    public: Hierarchy, public_verifier: UpstreamVerifier
) -> None:
    host = "pinning-test.badssl.com"  # pinset "test" in Chromium's preload list
    leaf = make_leaf(public.intermediate, host, not_before=T0 - DAY, not_after=T0 + 90 * DAY)
    verdict = verify(public_verifier, [leaf.cert, public.intermediate.cert], host=host, now=T0)
    assert not verdict.ok


# --------------------------------------------------------------------------------------------
# Stapled OCSP (CV-11)


def ocsp_response(
    leaf: x509.Certificate,
    issuer: Issued,
    status: ocsp.OCSPCertStatus,
    *,
    signer: Issued | None = None,
    this_update: dt.datetime = NOW - DAY,
    next_update: dt.datetime | None = NOW + 6 * DAY,
    reason: x509.ReasonFlags | None = None,
) -> bytes:
    signer = signer or issuer
    revoked = status is ocsp.OCSPCertStatus.REVOKED
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf,
            issuer=issuer.cert,
            algorithm=hashes.SHA1(),
            cert_status=status,
            this_update=this_update,
            next_update=next_update,
            revocation_time=NOW - 2 * DAY if revoked else None,
            revocation_reason=reason if revoked else None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
    )
    if signer is not issuer:
        builder = builder.certificates([signer.cert])
    return builder.sign(signer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


REVOKED = ocsp.OCSPCertStatus.REVOKED
GOOD = ocsp.OCSPCertStatus.GOOD


def test_cv11_stapled_revoked_response_rejects(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    staple = ocsp_response(
        h.leaf.cert, h.intermediate, REVOKED, reason=x509.ReasonFlags.key_compromise
    )
    verdict = verify(verifier, [h.leaf.cert, h.intermediate.cert], stapled_ocsp=staple)
    assert_rejected(verdict, CertError.REVOKED)
    assert not verdict.overridable
    assert verdict.revocation == "revoked"
    assert "keyCompromise" in verdict.detail


def test_stapled_good_response_is_recorded(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    staple = ocsp_response(h.leaf.cert, h.intermediate, GOOD)
    verdict = verify(verifier, [h.leaf.cert, h.intermediate.cert], stapled_ocsp=staple)
    assert verdict.ok
    assert verdict.revocation == "good"


def test_revoked_outranks_expired(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    leaf = make_leaf(h.intermediate, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    staple = ocsp_response(leaf.cert, h.intermediate, REVOKED)
    verdict = verify(verifier, [leaf.cert, h.intermediate.cert], stapled_ocsp=staple)
    assert_rejected(verdict, CertError.REVOKED)


def test_stapled_response_from_a_delegated_responder(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    responder = make_leaf(
        h.intermediate, "ocsp.example.test", eku=[ExtendedKeyUsageOID.OCSP_SIGNING]
    )
    staple = ocsp_response(h.leaf.cert, h.intermediate, REVOKED, signer=responder)
    assert_rejected(
        verify(verifier, [h.leaf.cert, h.intermediate.cert], stapled_ocsp=staple),
        CertError.REVOKED,
    )


def test_unusable_stapled_responses_are_ignored(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    chain = [h.leaf.cert, h.intermediate.cert]
    stranger = make_root("Stranger")
    not_a_responder = make_leaf(h.intermediate, "not-ocsp.example.test")  # no OCSPSigning EKU
    other_leaf = make_leaf(h.intermediate)
    stale_good = ocsp_response(
        h.leaf.cert, h.intermediate, GOOD, this_update=NOW - 10 * DAY, next_update=NOW - DAY
    )
    cases = {
        "garbage": b"\x30\x03\x0a\x01\x00garbage",
        "random signer": ocsp_response(h.leaf.cert, h.intermediate, REVOKED, signer=stranger),
        "responder without EKU": ocsp_response(
            h.leaf.cert, h.intermediate, REVOKED, signer=not_a_responder
        ),
        "other certificate": ocsp_response(other_leaf.cert, h.intermediate, REVOKED),
        "stale good": stale_good,
        "future": ocsp_response(
            h.leaf.cert, h.intermediate, GOOD, this_update=NOW + DAY, next_update=NOW + 5 * DAY
        ),
        "stale hold": ocsp_response(
            h.leaf.cert, h.intermediate, REVOKED, reason=x509.ReasonFlags.certificate_hold,
            this_update=NOW - 10 * DAY, next_update=NOW - DAY,
        ),
    }  # fmt: skip
    for name, staple in cases.items():
        verdict = verify(verifier, chain, stapled_ocsp=staple)
        assert verdict.ok, name
        assert verdict.revocation == "unchecked", name


def test_stale_revoked_response_still_rejects(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    # Revocation is permanent: a signed "revoked" stays true after its nextUpdate.
    staple = ocsp_response(
        h.leaf.cert, h.intermediate, REVOKED, this_update=NOW - 10 * DAY, next_update=NOW - DAY
    )
    assert_rejected(
        verify(verifier, [h.leaf.cert, h.intermediate.cert], stapled_ocsp=staple), CertError.REVOKED
    )


# --------------------------------------------------------------------------------------------
# Fetching: AIA intermediates, OCSP and CRL (through an injected fetcher)


class FakeFetcher:
    """Answers from a table; records every call; raises for unknown URLs."""

    def __init__(self, answers: dict[str, bytes | BaseException]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, bytes | None]] = []

    async def __call__(self, url: str, body: bytes | None) -> bytes:
        self.calls.append((url, body))
        answer = self.answers.get(url)
        if answer is None:
            raise OSError(f"404 {url}")
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def urls(self) -> list[str]:
        return [url for url, _ in self.calls]


AIA_URL = "http://ca.example.test/int.der"
OCSP_URL = "http://ocsp.example.test/"
CRL_URL = "http://crl.example.test/int.crl"


def leaf_with_urls(
    issuer: Issued,
    *,
    aia: str | None = AIA_URL,
    ocsp_url: str | None = None,
    crl: str | None = None,
) -> Issued:
    extra: list[tuple[x509.ExtensionType, bool]] = []
    access = []
    if aia:
        access.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(aia)
            )
        )
    if ocsp_url:
        access.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
            )
        )
    if access:
        extra.append((x509.AuthorityInformationAccess(access), False))
    if crl:
        point = x509.DistributionPoint([x509.UniformResourceIdentifier(crl)], None, None, None)
        extra.append((x509.CRLDistributionPoints([point]), False))
    return make_leaf(issuer, extra=extra)


async def test_aia_fetching_completes_an_incomplete_chain(h: Hierarchy) -> None:
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="off")
    leaf = leaf_with_urls(h.intermediate)
    fetcher = FakeFetcher({AIA_URL: h.intermediate.der})
    verdict = await v.verify_with_fetching([leaf.cert], HOST, now=NOW, fetcher=fetcher)
    assert verdict.ok
    assert verdict.chain == (leaf.cert, h.intermediate.cert, h.root.cert)
    assert fetcher.calls == [(AIA_URL, None)]
    again = await v.verify_with_fetching([leaf.cert], HOST, now=NOW + HOUR, fetcher=fetcher)
    assert again.ok
    assert len(fetcher.calls) == 1  # cached by URL


@pytest.mark.parametrize("encoding", ["pem", "pkcs7-der", "pkcs7-pem"])
async def test_aia_response_formats(h: Hierarchy, encoding: str) -> None:
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="off")
    body = {
        "pem": h.intermediate.pem,
        "pkcs7-der": pkcs7.serialize_certificates(
            [h.intermediate.cert], serialization.Encoding.DER
        ),
        "pkcs7-pem": pkcs7.serialize_certificates(
            [h.intermediate.cert], serialization.Encoding.PEM
        ),
    }[encoding]
    leaf = leaf_with_urls(h.intermediate)
    verdict = await v.verify_with_fetching(
        [leaf.cert], HOST, now=NOW, fetcher=FakeFetcher({AIA_URL: body})
    )
    assert verdict.ok


@pytest.mark.parametrize(
    "answer",
    [
        OSError("connection refused"),
        TimeoutError(),
        ValueError("bad"),
        b"not a certificate",
        b"",
        "not bytes",
    ],
    ids=["oserror", "timeout", "valueerror", "garbage", "empty", "not-bytes"],
)
async def test_failed_aia_fetch_leaves_the_chain_incomplete(
    h: Hierarchy, answer: bytes | BaseException
) -> None:
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="off")
    leaf = leaf_with_urls(h.intermediate)
    verdict = await v.verify_with_fetching(
        [leaf.cert], HOST, now=NOW, fetcher=FakeFetcher({AIA_URL: answer})
    )
    assert_rejected(verdict, CertError.INCOMPLETE_CHAIN)


async def test_aia_limits(h: Hierarchy) -> None:
    leaf = leaf_with_urls(h.intermediate)
    small = UpstreamVerifier(
        TrustConfig(extra_roots=(h.root.cert,)), revocation="off", fetch_max_bytes=100
    )
    fetcher = FakeFetcher({AIA_URL: h.intermediate.der})
    assert_rejected(
        await small.verify_with_fetching([leaf.cert], HOST, now=NOW, fetcher=fetcher),
        CertError.INCOMPLETE_CHAIN,
    )
    none = UpstreamVerifier(
        TrustConfig(extra_roots=(h.root.cert,)), revocation="off", aia_max_fetches=0
    )
    fetcher = FakeFetcher({AIA_URL: h.intermediate.der})
    assert_rejected(
        await none.verify_with_fetching([leaf.cert], HOST, now=NOW, fetcher=fetcher),
        CertError.INCOMPLETE_CHAIN,
    )
    assert fetcher.calls == []
    https_leaf = leaf_with_urls(h.intermediate, aia="https://ca.example.test/int.der")
    fetcher = FakeFetcher({"https://ca.example.test/int.der": h.intermediate.der})
    verdict = await none.verify_with_fetching([https_leaf.cert], HOST, now=NOW, fetcher=fetcher)
    assert not verdict.ok
    assert fetcher.calls == []  # only http:// is fetched, as browsers do


async def test_aia_fetching_follows_several_levels_within_budget(h: Hierarchy) -> None:
    upper = make_intermediate(h.root, name="Upper", path_length=1)
    upper_url = "http://ca.example.test/upper.der"
    lower_access = x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(upper_url)
            )
        ]
    )
    lower = make_intermediate(upper, name="Lower", extra=[(lower_access, False)])
    leaf = leaf_with_urls(lower)
    answers: dict[str, bytes | BaseException] = {AIA_URL: lower.der, upper_url: upper.der}
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="off")
    assert (
        await v.verify_with_fetching([leaf.cert], HOST, now=NOW, fetcher=FakeFetcher(answers))
    ).ok
    one = UpstreamVerifier(
        TrustConfig(extra_roots=(h.root.cert,)), revocation="off", aia_max_fetches=1
    )
    fetcher = FakeFetcher(answers)
    assert_rejected(
        await one.verify_with_fetching([leaf.cert], HOST, now=NOW, fetcher=fetcher),
        CertError.INCOMPLETE_CHAIN,
    )
    assert fetcher.urls() == [AIA_URL]


async def test_fetched_certificates_are_never_trusted(h: Hierarchy) -> None:
    # An attacker's leaf can point its AIA anywhere; whatever comes back is only a candidate
    # intermediate. A fetched self-signed "root" does not become an anchor.
    attacker = make_root("Attacker Root")
    leaf = leaf_with_urls(attacker)
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="off")
    fetcher = FakeFetcher({AIA_URL: attacker.der})
    assert_rejected(
        await v.verify_with_fetching([leaf.cert], HOST, now=NOW, fetcher=fetcher),
        CertError.UNKNOWN_ISSUER,
    )
    assert_rejected(
        await v.verify_with_fetching([leaf.cert], HOST, now=NOW, fetcher=fetcher),
        CertError.UNKNOWN_ISSUER,
    )


def crl_bytes(
    issuer: Issued, revoked_serials: Sequence[int], *, next_update: dt.datetime = NOW + 6 * DAY
) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(NOW - DAY)
        .next_update(next_update)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - 2 * DAY)
            .build()
        )
    return builder.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


async def test_fetched_ocsp_revoked_and_good(h: Hierarchy) -> None:
    leaf = leaf_with_urls(h.intermediate, aia=None, ocsp_url=OCSP_URL)
    chain = [leaf.cert, h.intermediate.cert]
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)))
    fetcher = FakeFetcher({OCSP_URL: ocsp_response(leaf.cert, h.intermediate, REVOKED)})
    verdict = await v.verify_with_fetching(chain, HOST, now=NOW, fetcher=fetcher)
    assert_rejected(verdict, CertError.REVOKED)
    assert verdict.chain == tuple(chain)
    url, body = fetcher.calls[0]
    assert url == OCSP_URL
    assert body is not None
    request = ocsp.load_der_ocsp_request(body)
    assert request.serial_number == leaf.cert.serial_number
    assert verify(v, chain).ok  # verify() alone never fetches

    good_leaf = leaf_with_urls(h.intermediate, aia=None, ocsp_url=OCSP_URL)
    fetcher = FakeFetcher({OCSP_URL: ocsp_response(good_leaf.cert, h.intermediate, GOOD)})
    good_chain = [good_leaf.cert, h.intermediate.cert]
    verdict = await v.verify_with_fetching(good_chain, HOST, now=NOW, fetcher=fetcher)
    assert verdict.ok
    assert verdict.revocation == "good"
    await v.verify_with_fetching(good_chain, HOST, now=NOW + HOUR, fetcher=fetcher)
    assert len(fetcher.calls) == 1  # cached until nextUpdate


async def test_stapled_answer_means_no_fetch(h: Hierarchy) -> None:
    leaf = leaf_with_urls(h.intermediate, aia=None, ocsp_url=OCSP_URL)
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="hard-fail")
    fetcher = FakeFetcher({})
    staple = ocsp_response(leaf.cert, h.intermediate, GOOD)
    verdict = await v.verify_with_fetching(
        [leaf.cert, h.intermediate.cert], HOST, now=NOW, fetcher=fetcher, stapled_ocsp=staple
    )
    assert verdict.ok
    assert verdict.revocation == "good"
    assert fetcher.calls == []


async def test_fetched_crl(h: Hierarchy) -> None:
    leaf = leaf_with_urls(h.intermediate, aia=None, crl=CRL_URL)
    chain = [leaf.cert, h.intermediate.cert]
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)))
    revoked = FakeFetcher({CRL_URL: crl_bytes(h.intermediate, [leaf.cert.serial_number])})
    assert_rejected(
        await v.verify_with_fetching(chain, HOST, now=NOW, fetcher=revoked), CertError.REVOKED
    )

    other = leaf_with_urls(h.intermediate, aia=None, crl="http://crl.example.test/other.crl")
    fetcher = FakeFetcher({"http://crl.example.test/other.crl": crl_bytes(h.intermediate, [12345])})
    chain = [other.cert, h.intermediate.cert]
    verdict = await v.verify_with_fetching(chain, HOST, now=NOW, fetcher=fetcher)
    assert verdict.ok
    assert verdict.revocation == "good"
    await v.verify_with_fetching(chain, HOST, now=NOW + HOUR, fetcher=fetcher)
    assert len(fetcher.calls) == 1  # cached by URL until nextUpdate


async def test_bad_crls_say_nothing(h: Hierarchy) -> None:
    leaf = leaf_with_urls(h.intermediate, aia=None, crl=CRL_URL)
    chain = [leaf.cert, h.intermediate.cert]
    stranger = make_root("CRL Stranger")
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(h.intermediate.cert.subject)
        .last_update(NOW - DAY)
        .next_update(NOW + DAY)
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(leaf.cert.serial_number)
            .revocation_date(NOW - DAY)
            .build()
        )
        .sign(stranger.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    for body in (forged, crl_bytes(h.intermediate, [], next_update=NOW - HOUR), b"junk"):
        v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)))
        verdict = await v.verify_with_fetching(
            chain, HOST, now=NOW, fetcher=FakeFetcher({CRL_URL: body})
        )
        assert verdict.ok
        assert verdict.revocation == "unavailable"


async def test_revocation_modes(h: Hierarchy) -> None:
    leaf = leaf_with_urls(h.intermediate, aia=None, ocsp_url=OCSP_URL)
    chain = [leaf.cert, h.intermediate.cert]
    down = {OCSP_URL: OSError("unreachable")}

    soft = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="soft-fail")
    verdict = await soft.verify_with_fetching(chain, HOST, now=NOW, fetcher=FakeFetcher(down))
    assert verdict.ok
    assert verdict.revocation == "unavailable"

    hard = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="hard-fail")
    verdict = await hard.verify_with_fetching(chain, HOST, now=NOW, fetcher=FakeFetcher(down))
    assert_rejected(verdict, CertError.REVOKED)
    assert "hard-fail" in verdict.detail
    assert verdict.revocation == "unavailable"

    off = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="off")
    fetcher = FakeFetcher({OCSP_URL: ocsp_response(leaf.cert, h.intermediate, REVOKED)})
    verdict = await off.verify_with_fetching(chain, HOST, now=NOW, fetcher=fetcher)
    assert verdict.ok
    assert verdict.revocation == "unchecked"
    assert fetcher.calls == []


async def test_cancellation_from_the_fetcher_propagates(h: Hierarchy) -> None:
    class Cancelled(BaseException):
        pass

    leaf = leaf_with_urls(h.intermediate)
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), revocation="off")
    with pytest.raises(Cancelled):
        await v.verify_with_fetching(
            [leaf.cert], HOST, now=NOW, fetcher=FakeFetcher({AIA_URL: Cancelled()})
        )


# --------------------------------------------------------------------------------------------
# Values, configuration, trust store freshness


def test_verdict_validates_itself(h: Hierarchy) -> None:
    digest = hashlib.sha256(h.leaf.der).digest()
    base = dict(host=HOST, chain=(h.leaf.cert,), leaf=h.leaf.cert, leaf_sha256=digest)
    ok = Verdict(ok=True, error=None, detail="", **base)  # type: ignore[arg-type]
    assert not ok.overridable
    with pytest.raises(ValueError, match="error must be None"):
        Verdict(ok=True, error=CertError.EXPIRED, detail="", **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="error must be None"):
        Verdict(ok=False, error=None, detail="x", **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="detail"):
        Verdict(ok=True, error=None, detail="x", **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="leaf_sha256"):
        Verdict(
            host=HOST,
            ok=False,
            error=CertError.EXPIRED,
            detail="x",
            chain=(),
            leaf=h.leaf.cert,
            leaf_sha256=None,
        )
    bad = Verdict(ok=False, error=CertError.REVOKED, detail="revoked", **base)  # type: ignore[arg-type]
    assert not bad.overridable
    with pytest.raises(dataclasses.FrozenInstanceError):
        bad.ok = True  # type: ignore[misc]
    assert Verdict(ok=False, error=CertError.EXPIRED, detail="x", **base).overridable  # type: ignore[arg-type]


def test_empty_chain_is_malformed(verifier: UpstreamVerifier) -> None:
    verdict = verify(verifier, [])
    assert_rejected(verdict, CertError.MALFORMED)
    assert verdict.leaf is None
    assert verdict.leaf_sha256 is None
    assert verdict.chain == ()


def test_programming_errors_are_clean(verifier: UpstreamVerifier, h: Hierarchy) -> None:
    with pytest.raises(ValueError, match=r"timezone-aware"):
        verifier.verify([h.leaf.cert], HOST, now=dt.datetime(2026, 1, 1))
    with pytest.raises(TypeError, match=r"x509\.Certificate"):
        verifier.verify([h.leaf.der], HOST, now=NOW)  # type: ignore[list-item]


def test_now_in_another_timezone_is_the_same_instant(
    verifier: UpstreamVerifier, h: Hierarchy
) -> None:
    tz = dt.timezone(dt.timedelta(hours=-7))
    late = (h.leaf.cert.not_valid_after_utc + dt.timedelta(seconds=1)).astimezone(tz)
    assert_rejected(
        verify(verifier, [h.leaf.cert, h.intermediate.cert], now=late), CertError.EXPIRED
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"revocation": "sometimes"},
        {"max_chain_depth": 0},
        {"max_chain_depth": 17},
        {"fetch_max_bytes": 0},
        {"crl_max_bytes": -1},
        {"cache_entries": 0},
        {"aia_max_fetches": -1},
    ],
)
def test_verifier_arguments_are_checked(h: Hierarchy, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)), **kwargs)  # type: ignore[arg-type]


def test_trust_config_validation(h: Hierarchy) -> None:
    with pytest.raises(ConfigurationError, match=r"x509\.Certificate"):
        TrustConfig(extra_roots=(h.root.der,))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="32-byte"):
        TrustConfig(distrusted_spki_sha256=frozenset({b"short"}))
    with pytest.raises(ConfigurationError, match="empty"):
        UpstreamVerifier(TrustConfig(replace_bundle=()))
    listed = TrustConfig(extra_roots=[h.root.cert])  # type: ignore[arg-type]
    assert listed.extra_roots == (h.root.cert,)


def test_replace_bundle_and_default_bundle(h: Hierarchy) -> None:
    only = UpstreamVerifier(TrustConfig(replace_bundle=(h.root.cert,)))
    assert only.anchor_count == 1
    verdict = verify(only, [h.leaf.cert, h.intermediate.cert])
    assert verdict.ok
    assert not verdict.public_root  # replacing the bundle makes nothing public
    default = UpstreamVerifier()
    assert default.anchor_count > 100
    assert_rejected(verify(default, [h.leaf.cert, h.intermediate.cert]), CertError.INCOMPLETE_CHAIN)
    assert_rejected(
        verify(default, [h.leaf.cert, h.intermediate.cert, h.root.cert]), CertError.UNKNOWN_ISSUER
    )


def test_trust_config_from_pem_files(tmp_path: Path, h: Hierarchy, own: Issued) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_bytes(h.root.pem + make_root("Second").pem)
    own_file = tmp_path / "own.pem"
    own_file.write_bytes(own.pem)
    extra_hash = "ab" * 32
    trust = TrustConfig.from_pem_files(
        extra_roots=[roots], own_certificates=[own_file], distrusted_spki_sha256_hex=[extra_hash]
    )
    assert len(trust.extra_roots) == 2
    assert trust.own_certificates == (own.cert,)
    assert bytes.fromhex(extra_hash) in trust.distrusted_spki_sha256
    assert trust.distrusted_spki_sha256 >= KNOWN_INTERCEPTION_SPKI_SHA256
    assert verify(UpstreamVerifier(trust), [h.leaf.cert, h.intermediate.cert]).ok

    with pytest.raises(ConfigurationError, match="cannot read"):
        TrustConfig.from_pem_files(extra_roots=[tmp_path / "missing.pem"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello")
    with pytest.raises(ConfigurationError, match="no PEM certificate"):
        TrustConfig.from_pem_files(replace_bundle=garbage)
    with pytest.raises(ConfigurationError, match="hexadecimal"):
        TrustConfig.from_pem_files(distrusted_spki_sha256_hex=["xyz"])


def certifi_date() -> dt.datetime:
    year, month, day = (int(p) for p in certifi.__version__.split(".")[:3])
    return dt.datetime(year, month, day, tzinfo=dt.UTC)


def test_certifi_bundle_age_and_warning() -> None:
    released = certifi_date()
    assert certifi_bundle_age(released + 10 * DAY) == 10 * DAY
    assert certifi_bundle_age(released - DAY) == dt.timedelta(0)  # clock behind: not negative
    assert trust_store_warning(released + 100 * DAY) is None
    warning = trust_store_warning(released + 400 * DAY)
    assert warning is not None
    assert "400 days" in warning
    assert "pip install -U certifi" in warning
    assert trust_store_warning(released + 40 * DAY, max_age=dt.timedelta(days=30)) is not None


# --------------------------------------------------------------------------------------------
# Properties


KEYS = [make_key() for _ in range(3)]
offset = st.integers(min_value=-200, max_value=200)  # hours


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    root_nb=offset, root_len=st.integers(1, 400),
    int_nb=offset, int_len=st.integers(1, 400),
    leaf_nb=offset, leaf_len=st.integers(1, 400),
)  # fmt: skip
def test_property_accepted_chains_are_valid_at_now(
    root_nb: int, root_len: int, int_nb: int, int_len: int, leaf_nb: int, leaf_len: int
) -> None:
    def window(start: int, length: int) -> dict[str, dt.datetime]:
        return {"not_before": NOW + start * HOUR, "not_after": NOW + (start + length) * HOUR}

    root = make_root("Property Root", key=KEYS[0], **window(root_nb, root_len))
    intermediate = make_intermediate(root, key=KEYS[1], **window(int_nb, int_len))
    leaf = make_leaf(intermediate, key=KEYS[2], **window(leaf_nb, leaf_len))
    v = _property_verifier(root.cert)
    verdict = verify(v, [leaf.cert, intermediate.cert])
    all_valid = all(
        c.not_valid_before_utc <= NOW <= c.not_valid_after_utc
        for c in (root.cert, intermediate.cert, leaf.cert)
    )
    assert verdict.ok == all_valid
    if verdict.ok:
        assert all(c.not_valid_before_utc <= NOW <= c.not_valid_after_utc for c in verdict.chain)
    else:
        # Only time is wrong with these chains. When no instant makes all three valid at once,
        # tlsmitm cannot confirm that time is the only problem and refuses to let a user
        # override (INVALID_CHAIN).
        assert verdict.error in (
            CertError.EXPIRED,
            CertError.NOT_YET_VALID,
            CertError.INVALID_CHAIN,
        )
        start = max(c.not_valid_before_utc for c in (root.cert, intermediate.cert, leaf.cert))
        end = min(c.not_valid_after_utc for c in (root.cert, intermediate.cert, leaf.cert))
        assert (verdict.error is CertError.INVALID_CHAIN) == (start > end)


_VERIFIERS: dict[x509.Certificate, UpstreamVerifier] = {}


def _property_verifier(root: x509.Certificate) -> UpstreamVerifier:
    if root not in _VERIFIERS:
        _VERIFIERS.clear()
        _VERIFIERS[root] = UpstreamVerifier(TrustConfig(replace_bundle=(root,)))
    return _VERIFIERS[root]


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.sampled_from(["leaf", "intermediate"]),
    position=st.integers(min_value=0),
    flip=st.integers(min_value=1, max_value=255),
)
def test_property_a_modified_certificate_is_never_accepted(
    verifier: UpstreamVerifier, h: Hierarchy, which: str, position: int, flip: int
) -> None:
    original = h.leaf.cert if which == "leaf" else h.intermediate.cert
    der = bytearray(original.public_bytes(serialization.Encoding.DER))
    der[position % len(der)] ^= flip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            mutated = x509.load_der_x509_certificate(bytes(der))
    except (ValueError, x509.InvalidVersion):
        return  # not a certificate any more: nothing to verify
    chain = [mutated, h.intermediate.cert] if which == "leaf" else [h.leaf.cert, mutated]
    verdict = verify(verifier, chain)  # never raises, whatever the bytes
    if verdict.ok:
        # Only an encoding change outside the signed part can survive (cryptography tolerates
        # a non-zero "unused bits" octet in the signature BIT STRING), never new content.
        assert mutated.tbs_certificate_bytes == original.tbs_certificate_bytes
    else:
        assert verdict.error is not None
        assert verdict.detail


# --------------------------------------------------------------------------------------------
# Cost


def test_store_is_built_once_never_per_verification(
    h: Hierarchy, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tlsmitm._verify as verify_module

    built: list[int] = []
    real_store = verify_module.Store

    def counting_store(certs: list[x509.Certificate]) -> object:
        built.append(len(certs))
        return real_store(certs)

    monkeypatch.setattr(verify_module, "Store", counting_store)
    v = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)))
    assert len(built) == 1
    assert built[0] > 100  # certifi's bundle and the extra root
    for _ in range(3):
        assert verify(v, [h.leaf.cert, h.intermediate.cert]).ok
    assert len(built) == 1


def test_benchmark_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    from benchmarks import bench_verify

    results = bench_verify.run(0.2)
    for name in ("store_build_ms", "raw_verify_ms", "verify_ok_ms", "verify_expired_ms"):
        assert results[name] > 0
    assert results["verify_ok_overhead"] == pytest.approx(
        results["verify_ok_ms"] / results["raw_verify_ms"]
    )
