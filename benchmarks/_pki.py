"""The benchmark's own test PKI: one root and a leaf for ``bench.test`` and ``*.bench.test``.

Every origin (nginx, the bare terminator) presents the same ECDSA P-256 leaf, which is also the
key type tlsmitm mints, so that direct and intercepted connections do the same handshake work.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["BENCH_DOMAIN", "BenchPki", "make_pki"]

BENCH_DOMAIN = "bench.test"


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchPki:
    """Paths of the files one benchmark run uses.

    Attributes:
        root_pem: the root certificate (what proxies trust upstream, what direct clients trust).
        leaf_pem: the origin's certificate chain (leaf only: the root signs it directly).
        leaf_key: the origin's private key (PKCS#8 PEM, unencrypted).
        combined_pem: leaf certificate followed by its key (Squid's and s_server's format).
    """

    root_pem: Path
    leaf_pem: Path
    leaf_key: Path
    combined_pem: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_pki(directory: Path, *, now: dt.datetime) -> BenchPki:
    """Write a root and a ``bench.test``/``*.bench.test`` leaf into ``directory``.

    Args:
        directory: an existing directory; files are overwritten.
        now: the current time (aware UTC): validity starts a day before it.
    """
    day = dt.timedelta(days=1)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlsmitm benchmark root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + 30 * day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    # CA/B BR §7.1.2.7: a subscriber certificate (SAN, serverAuth EKU, AKI, CA:FALSE).
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BENCH_DOMAIN)]))
        .issuer_name(root_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day)
        .not_valid_after(now + 30 * day)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(BENCH_DOMAIN), x509.DNSName(f"*.{BENCH_DOMAIN}")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    pki = BenchPki(
        root_pem=directory / "bench-root.pem",
        leaf_pem=directory / "bench-leaf.pem",
        leaf_key=directory / "bench-leaf.key",
        combined_pem=directory / "bench-leaf-and-key.pem",
    )
    leaf_pem = leaf.public_bytes(serialization.Encoding.PEM)
    pki.root_pem.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    pki.leaf_pem.write_bytes(leaf_pem)
    pki.leaf_key.write_bytes(_pem_key(leaf_key))
    pki.combined_pem.write_bytes(leaf_pem + _pem_key(leaf_key))
    return pki
