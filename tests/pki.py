"""A test PKI: roots, intermediates and leaves of every shape the interception matrix needs.

Built with ``cryptography`` (matrix §A.1). Shapes cryptography refuses to sign (MD5, SHA-1, tiny
RSA keys) are made with the ``openssl`` command by :func:`openssl_sign`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)

PrivateKey = CertificateIssuerPrivateKeyTypes

_KEY_CACHE: dict[str, list[PrivateKey]] = {}


def make_key(kind: str = "ec256") -> PrivateKey:
    """A fresh private key: ``ec256``, ``ec384``, ``rsa2048``, ``rsa3072``, ``rsa4096``..."""
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    raise ValueError(kind)


def cached_key(kind: str = "rsa2048", index: int = 0) -> PrivateKey:
    """A key reused across tests (RSA generation is slow); ``index`` selects distinct keys."""
    keys = _KEY_CACHE.setdefault(kind, [])
    while len(keys) <= index:
        keys.append(make_key(kind))
    return keys[index]


@dataclass
class Issued:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: PrivateKey
    parents: list[Issued] = field(default_factory=list)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain(self) -> list[x509.Certificate]:
        """This certificate followed by its issuers up to (not including) the root."""
        out = [self.cert]
        node = self
        while node.parents and node.parents[0].parents:
            node = node.parents[0]
            out.append(node.cert)
        return out

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain())

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``name.pem`` (the chain) and ``name.key``; returns both paths."""
        cert_path = directory / f"{name}.pem"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(self.chain_pem())
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path


def _name(common_name: str | None, org: str | None = "tlsmitm tests") -> x509.Name:
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if common_name is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def san_of(names: Iterable[str]) -> list[x509.GeneralName]:
    """General names for ``names``: IP literals become iPAddress, everything else dNSName."""
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def issue(
    *,
    subject_cn: str | None,
    issuer: Issued | None,
    key: PrivateKey | None = None,
    ca: bool | None = False,
    path_length: int | None = None,
    sans: Sequence[str] | None = None,
    san_critical: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.SERVER_AUTH,),
    key_usage: str | None = "auto",
    extra: Sequence[tuple[x509.ExtensionType, bool]] = (),
    hash_algorithm: hashes.HashAlgorithm | None = None,
    org: str | None = "tlsmitm tests",
    ski_aki: bool = True,
) -> Issued:
    """Issue one certificate.

    ``issuer=None`` makes it self-signed; ``ca=None`` omits basicConstraints.
    """
    key = key or make_key("ec256")
    subject = _name(subject_cn, org)
    signing_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    if key_usage == "auto":
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
        else:
            builder = builder.add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
            )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(san_of(sans)), san_critical)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), False)
    if ski_aki:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), False
        )
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical)
    algorithm = hash_algorithm if hash_algorithm is not None else hashes.SHA256()
    cert = builder.sign(signing_key, algorithm)
    return Issued(cert=cert, key=key, parents=[issuer] if issuer else [])


def make_root(name: str = "Test Root", **kw: object) -> Issued:
    kw.setdefault("eku", None)
    kw.setdefault("not_after", NOW + 3650 * DAY)
    return issue(subject_cn=name, issuer=None, ca=True, **kw)  # type: ignore[arg-type]


def make_intermediate(root: Issued, name: str = "Test Intermediate", **kw: object) -> Issued:
    kw.setdefault("eku", None)
    kw.setdefault("path_length", 0)
    kw.setdefault("not_after", NOW + 1825 * DAY)
    return issue(subject_cn=name, issuer=root, ca=True, **kw)  # type: ignore[arg-type]


def make_leaf(issuer: Issued, host: str = "www.example.test", **kw: object) -> Issued:
    kw.setdefault("sans", [host])
    return issue(subject_cn=host, issuer=issuer, **kw)  # type: ignore[arg-type]


@dataclass
class Hierarchy:
    root: Issued
    intermediate: Issued
    leaf: Issued


def good_hierarchy(host: str = "www.example.test") -> Hierarchy:
    """root -> intermediate (pathlen 0) -> leaf with SAN=host (matrix CV-01)."""
    root = make_root()
    intermediate = make_intermediate(root)
    return Hierarchy(root, intermediate, make_leaf(intermediate, host))


def openssl_sign(
    csr_key: PrivateKey | Path,
    issuer: Issued,
    *,
    subject: str = "/CN=www.example.test",
    digest: str = "sha256",
    extensions: str | None = "basicConstraints=critical,CA:FALSE\n"
    "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    "subjectAltName=DNS:www.example.test\n",
    days: int = 30,
) -> x509.Certificate:
    """Sign through the ``openssl`` CLI: what cryptography refuses (MD5/SHA-1, v1, weak keys).

    ``extensions=None`` produces an X.509 v1 certificate (matrix CV-21).
    """
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if isinstance(csr_key, Path):
            key_path = csr_key
        else:
            key_path = d / "leaf.key"
            key_path.write_bytes(
                csr_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        (d / "ca.pem").write_bytes(issuer.pem)
        (d / "ca.key").write_bytes(issuer.key_pem)
        subprocess.run(
            [
                "openssl",
                "req",
                "-new",
                "-key",
                str(key_path),
                "-subj",
                subject,
                "-out",
                str(d / "leaf.csr"),
            ],
            check=True,
            capture_output=True,
        )
        cmd = [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(d / "leaf.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            f"-{digest}",
            "-days",
            str(days),
            "-set_serial",
            str(x509.random_serial_number()),
            "-out",
            str(d / "leaf.pem"),
        ]
        if extensions is not None:
            (d / "ext.cnf").write_text("[v3]\n" + extensions)
            cmd += ["-extfile", str(d / "ext.cnf"), "-extensions", "v3"]
        subprocess.run(cmd, check=True, capture_output=True)
        return x509.load_pem_x509_certificate((d / "leaf.pem").read_bytes())
