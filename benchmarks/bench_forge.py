"""CertForge benchmark: cold mints, cache hits, and the raw signature rate they compare to.

Run ``python -m benchmarks.bench_forge [seconds]``. :func:`run` returns the figures as a dict.

Figures (per second unless the name says otherwise), all measured in the same process:

* ``raw_p256_sign_per_s`` -- ECDSA P-256 signatures over a 400-byte message with ``cryptography``:
  the floor under any minting scheme (each leaf needs one).
* ``p256_keygen_per_s`` -- P-256 key generation (each leaf gets a fresh key).
* ``builder_reused_key_per_s`` -- ``cryptography``'s ``CertificateBuilder`` signing a leaf of the
  same shape with one reused key (the usual "fast" approach, and it reuses the key).
* ``cold_mint_per_s`` -- :meth:`~tlsmitm.CertForge.leaf_for` for distinct hosts: fresh key,
  template-built TBS, signature, and the parsed ``cryptography`` and pyOpenSSL objects.
* ``cache_hit_per_s`` -- :meth:`~tlsmitm.CertForge.leaf_for` for a host already cached.
* ``cold_vs_raw_sign_ratio`` -- ``cold_mint_per_s / raw_p256_sign_per_s`` (goal: >= 0.5).
* ``us_*`` -- microseconds per cold mint spent in each step, to show what limits it:
  ``us_keygen``, ``us_sign``, ``us_key_serialize`` (public key DER, private key PEM),
  ``us_pyopenssl_cert`` and ``us_pyopenssl_key`` (pyOpenSSL parsing the new leaf and key:
  OpenSSL 3+ runs its provider decoders for both), ``us_cryptography_cert``, and
  ``us_unattributed``: the rest, i.e. our Python (DER assembly, names, validity, cache, the
  ForgedLeaf) *and* the cost of running all these steps back to back with cold CPU caches,
  where each step above was timed in a tight loop.
* ``cold_mint_builder_per_s`` -- the same cold path with ``CertificateBuilder`` in place of
  the DER template (same fresh key, shape, and pyOpenSSL objects), for comparison.
* ``cold_without_pyopenssl_vs_raw_sign_ratio`` -- the ratio the cold path would reach if the
  pyOpenSSL objects were not built at minting time.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import sys
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

from tlsmitm._ca import CertificateAuthority, IssuerKind, _Signer
from tlsmitm._forge import CertForge

from ._measure import component_main, rate

__all__ = ["run"]

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


_rate = functools.partial(rate, batch=50, rounds=5)


def _leaf(
    host: str,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    ski: x509.SubjectKeyIdentifier,
    aki: x509.AuthorityKeyIdentifier,
) -> x509.Certificate:
    """A server leaf of the shape tlsmitm mints, made with ``CertificateBuilder``."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def _builder_leaf(
    issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Name
) -> Callable[[], object]:
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    ski = x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key())
    counter = itertools.count()

    def build() -> object:
        host = f"b{next(counter)}.example.com"
        return _leaf(host, issuer, issuer_key, leaf_key.public_key(), ski, aki)

    return build


def _builder_mint(signer: _Signer) -> Callable[[], object]:
    """The cold path as it would be with ``CertificateBuilder``: same key, shape and objects."""
    issuer_key = signer.key
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        signer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    )
    counter = itertools.count()

    def mint() -> object:
        host = f"m{next(counter)}.example.com"
        key = ec.generate_private_key(ec.SECP256R1())
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = _leaf(host, signer.certificate.subject, issuer_key, key.public_key(), ski, aki)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return (
            cert,
            crypto.load_certificate(
                crypto.FILETYPE_ASN1, cert.public_bytes(serialization.Encoding.DER)
            ),
            crypto.load_privatekey(crypto.FILETYPE_PEM, pem),
        )

    return mint


def run(seconds: float = 2.0) -> dict[str, float]:
    """Measure every figure for about ``seconds`` each; returns them (see the module doc)."""
    ca = CertificateAuthority.ephemeral(now=NOW)
    signer = ca._signer(IssuerKind.TRUSTED)
    assert isinstance(signer.key, ec.EllipticCurvePrivateKey)
    message = b"\x5a" * 400
    scheme = ec.ECDSA(hashes.SHA256())
    figures: dict[str, float] = {}

    figures["raw_p256_sign_per_s"] = _rate(lambda: signer.key.sign(message, scheme), seconds)
    figures["p256_keygen_per_s"] = _rate(
        lambda: ec.generate_private_key(ec.SECP256R1()), seconds / 2
    )
    figures["builder_reused_key_per_s"] = _rate(
        _builder_leaf(signer.key, signer.certificate.subject), seconds / 2
    )

    forge = CertForge(ca, max_cache_entries=1000)
    counter = itertools.count()
    figures["cold_mint_per_s"] = _rate(
        lambda: forge.leaf_for(f"h{next(counter)}.example.com", now=NOW), seconds
    )
    forge.leaf_for("hot.example.com", now=NOW)
    figures["cache_hit_per_s"] = _rate(
        lambda: forge.leaf_for("hot.example.com", now=NOW), seconds / 2, batch=500
    )
    figures["cold_vs_raw_sign_ratio"] = figures["cold_mint_per_s"] / figures["raw_p256_sign_per_s"]
    figures["cold_mint_builder_per_s"] = _rate(_builder_mint(signer), seconds / 2)

    # Where a cold mint's time goes: each step measured alone, the rest is our Python (DER
    # assembly, names, validity, the cache and the ForgedLeaf).
    leaf = forge.leaf_for("probe.example.com", now=NOW)
    der = leaf.certificate.public_bytes(serialization.Encoding.DER)
    key = leaf.private_key
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    tbs = leaf.certificate.tbs_certificate_bytes
    part = seconds / 4

    def serialize() -> object:
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    us = {
        "us_keygen": 1e6 / figures["p256_keygen_per_s"],
        "us_sign": 1e6 / _rate(lambda: signer.key.sign(tbs, scheme), part),
        "us_key_serialize": 1e6 / _rate(serialize, part),
        "us_pyopenssl_cert": 1e6
        / _rate(lambda: crypto.load_certificate(crypto.FILETYPE_ASN1, der), part),
        "us_pyopenssl_key": 1e6
        / _rate(lambda: crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem), part),
        "us_cryptography_cert": 1e6
        / _rate(lambda: x509.load_der_x509_certificate(der), part, batch=500),
    }
    total = 1e6 / figures["cold_mint_per_s"]
    us["us_unattributed"] = total - sum(us.values())
    us["us_cold_mint_total"] = total
    figures.update(us)
    figures["cold_without_pyopenssl_vs_raw_sign_ratio"] = (
        1e6 / (total - us["us_pyopenssl_cert"] - us["us_pyopenssl_key"])
    ) / figures["raw_p256_sign_per_s"]
    return figures


def main(argv: list[str]) -> int:
    """Print the figures as a table."""
    return component_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
