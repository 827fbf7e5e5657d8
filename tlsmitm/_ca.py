"""The interception certificate authority: created per installation, kept on disk safely.

Theory of operation
-------------------

A :class:`CertificateAuthority` is three keys and their certificates::

    root (trusted by clients, pathLen 1) ── signs ──▶ intermediate (online, pathLen 0) ──▶ leaves
    error CA (self-signed, pathLen 0, never exported, never trusted) ──────────────────────▶ leaves

* Every key is generated on first use from the operating system's CSPRNG (through
  ``cryptography``), so two installations never share a root (matrix CA-01). Nothing is shipped
  and nothing is derived from a name, a machine id or a password.
* The **root** is the only certificate users install. Its key is needed once at creation and
  again only to rotate the intermediate or to re-sign the CRL, so it may be passphrase-encrypted
  (PKCS #8 PBES2, PBKDF2-HMAC-SHA256, AES-256-CBC) or moved off the machine. A running proxy never
  holds it in memory.
* The **intermediate** signs every forged leaf and is the only key a running proxy needs.
  ``rotate_intermediate`` replaces it without touching the root (clients keep trusting the same
  certificate) and lists the retired one in a CRL signed by the root.
* Every CA certificate can vouch for TLS server certificates and nothing else: basicConstraints
  critical with pathLen 1/0 (root → intermediate → leaf, nothing longer), keyUsage keyCertSign +
  cRLSign, extendedKeyUsage serverAuth (no code signing, e-mail or client authentication), and
  optional name constraints excluding subtrees the deployer must never intercept.
* The **error CA** signs leaves that must make a client show *its own* certificate warning (the
  upstream certificate failed verification). It is trusted nowhere, by construction.

Three variations (``docs/ca.rst``):

* **Imported** (:meth:`CertificateAuthority.import_intermediate`): the intermediate comes from
  the organisation's PKI, whose root its machines already trust. It is checked first
  (:func:`check_imported_intermediate`), sent with the chain up to that root, and its chain's
  name constraints bound what is minted. There is no root key here: no CRL, no rotation.
* **Node intermediates** (:meth:`CertificateAuthority.issue_node_intermediate`): the root
  issues one intermediate per node of a multi-node installation; each node imports its own, and
  a compromised one is revoked alone in the root's CRL.
* **Keys in a PKCS#11 token** (:mod:`tlsmitm._pkcs11`): the intermediate's key (and, for root
  operations, the root key) may be a :class:`~tlsmitm._pkcs11.TokenKey` (ECDSA) or
  :class:`~tlsmitm._pkcs11.TokenRsaKey` named by an RFC 7512
  URI; ``ca.json`` records the URI, never a PIN, and no key file is written.

On disk (see ``docs/ca.rst``), everything lives in ``<state_dir>/ca/``, a 0700 directory whose
files are created 0600 before their first byte is written and moved into place atomically. The
metadata file ``ca.json`` is written last: it is the commit point, so a half-written directory
is recognisable, reported, and never replaced by a fresh CA (which would silently break every
client that trusts the old root).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import enum
import hashlib
import ipaddress
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import _der
from ._errors import ConfigurationError
from ._names import InvalidHostName, ip_address_of, is_same_or_subdomain, normalize_host
from ._pkcs11 import TOKEN_KEY_TYPES, TokenAccess, is_pkcs11_uri, open_token_key

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "KEY_TYPES",
    "CertificateAuthority",
    "IssuerKind",
    "KeyFileStatus",
    "NodeIntermediate",
    "Passphrase",
    "PrivateKey",
    "generate_key",
    "passphrase_from_env",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
Passphrase = bytes | Callable[[], bytes]

#: Key types a CA or a leaf may use. BR §6.1.5: RSA >= 2048 bits, ECDSA on P-256 or P-384.
KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072")

FORMAT_VERSION = 1
CA_SUBDIR = "ca"
METADATA_FILE = "ca.json"
ROOT_CERT_FILE = "root.pem"
ROOT_KEY_FILE = "root.key"
ERROR_CERT_FILE = "error-ca.pem"
ERROR_KEY_FILE = "error-ca.key"
CHAIN_FILE = "chain.pem"
LOCK_FILE = ".lock"
DEFAULT_ORGANIZATION = "tlsmitm"
PASSPHRASE_ENV = "TLSMITM_CA_PASSPHRASE"  # noqa: S105 - a variable name, not a secret

ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=730)
ERROR_CA_LIFETIME = dt.timedelta(days=3650)
CA_BACKDATE = dt.timedelta(days=1)  # tolerate clients whose clocks run a little slow
CRL_LIFETIME = dt.timedelta(days=365)
CRL_REFRESH_MARGIN = dt.timedelta(days=30)
#: PBKDF2-HMAC-SHA256 iterations for an encrypted root key (OWASP 2023 guidance).
PBKDF2_ITERATIONS = 600_000
_MAX_STATE_FILE = 1 << 20

_OID_PBES2 = "1.2.840.113549.1.5.13"
_OID_PBKDF2 = "1.2.840.113549.1.5.12"
_OID_HMAC_SHA256 = "1.2.840.113549.2.9"
_OID_AES256_CBC = "2.16.840.1.101.3.4.1.42"


class IssuerKind(enum.Enum):
    """Which CA signs a forged leaf."""

    #: The intermediate under the root that clients trust: the client accepts the leaf.
    TRUSTED = "trusted"
    #: The never-trusted error CA: the client shows its own certificate warning.
    ERROR = "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyFileStatus:
    """How one CA private key is stored (for ``ca show`` and for monitoring).

    Attributes:
        role: ``"root"``, ``"intermediate"`` or ``"error-ca"``.
        path: where the key file is (or would be).
        present: ``False`` when the key is not in the state directory (a root moved offline).
        encrypted: whether the file is passphrase-encrypted (``None`` when absent).
        mode: the file's permission bits (``None`` when absent).
        owner_uid: the file's owner (``None`` when absent or on Windows).
        token_uri: the PKCS#11 URI when the key is in a token (``present`` is then false).
    """

    role: str
    path: Path
    present: bool
    encrypted: bool | None = None
    mode: int | None = None
    owner_uid: int | None = None
    token_uri: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeIntermediate:
    """An intermediate the installation's root issued for one node (see ``ca.rst``).

    Attributes:
        name: the node's name (lower-case letters, digits and hyphens).
        certificate: the intermediate.
        issued: when it was issued.
        revoked: when it was revoked (listed in the CRL), or ``None``.
    """

    name: str
    certificate: x509.Certificate
    issued: dt.datetime
    revoked: dt.datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Signer:
    """An issuing CA as the forge sees it: certificate, key, and what to send after a leaf."""

    kind: IssuerKind
    certificate: x509.Certificate
    key: PrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    fingerprint: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class _Retired:
    certificate: x509.Certificate
    generation: int
    retired_at: dt.datetime
    reason: x509.ReasonFlags


@dataclass(frozen=True, slots=True, kw_only=True)
class _Snapshot:
    """Everything except the root key; replaced as a whole when the CA changes."""

    root: x509.Certificate
    intermediate: _Signer
    generation: int
    error: _Signer
    retired: tuple[_Retired, ...]
    crl: x509.CertificateRevocationList | None  # None: imported (the issuer's PKI revokes)
    crl_number: int
    nodes: tuple[NodeIntermediate, ...] = ()


def _intermediate_signer(
    certificate: x509.Certificate, key: PrivateKey, chain: Sequence[x509.Certificate] = ()
) -> _Signer:
    """The TRUSTED signer of an intermediate: sent after a leaf, followed by ``chain`` (the
    certificates up to, not including, the root)."""
    return _Signer(
        kind=IssuerKind.TRUSTED,
        certificate=certificate,
        key=key,
        chain=(certificate, *chain),
        fingerprint=_fingerprint(certificate),
    )


def _error_signer(certificate: x509.Certificate, key: PrivateKey) -> _Signer:
    """The ERROR signer (the error CA): nothing is sent after its leaves."""
    return _Signer(
        kind=IssuerKind.ERROR,
        certificate=certificate,
        key=key,
        chain=(),
        fingerprint=_fingerprint(certificate),
    )


def _first_snapshot(
    *,
    root: x509.Certificate,
    intermediate: _Signer,
    error: _Signer,
    crl: x509.CertificateRevocationList | None,
) -> _Snapshot:
    """Generation 1 of a new CA: nothing retired yet; CRL number 1 with a CRL, else 0."""
    return _Snapshot(
        root=root,
        intermediate=intermediate,
        generation=1,
        error=error,
        retired=(),
        crl=crl,
        crl_number=0 if crl is None else 1,
    )


# --------------------------------------------------------------------------------------------
# keys, names and certificates


def generate_key(key_type: str) -> PrivateKey:
    """A fresh private key of ``key_type`` (one of :data:`KEY_TYPES`) from the OS CSPRNG."""
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa2048", "rsa3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    raise ConfigurationError(
        f"unsupported key type {key_type!r}; use one of {', '.join(KEY_TYPES)}",
        reason="key_type",
    )


def _check_key_type(key_type: str) -> str:
    if key_type not in KEY_TYPES:
        generate_key(key_type)  # raises the ConfigurationError
    return key_type


def _key_type_of(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec256", "secp384r1": "ec384"}.get(key.curve.name, key.curve.name)
    return f"rsa{key.key_size}"


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The digest to sign with: SHA-384 for P-384 (Mozilla Root Store Policy §5.1), else SHA-256."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


def _spki(key: PrivateKey | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA256())


def _utc_now_param(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime (UTC)")
    return now.astimezone(dt.UTC).replace(microsecond=0)


def _canonical_exclusion(text: str) -> str:
    """One excluded subtree, canonical: a DNS name or an IP network in CIDR form."""
    raw = text.strip()
    if "/" in raw:
        try:
            return str(ipaddress.ip_network(raw, strict=True))
        except ValueError as exc:
            raise ConfigurationError(
                f"name constraint {text!r} is not an IP network in CIDR form with the host bits "
                "zero (for example 10.0.0.0/8 or 2001:db8::/32)",
                reason="name_constraint",
            ) from exc
    address = ip_address_of(raw)
    if address is not None:
        return str(ipaddress.ip_network(address))
    if raw.startswith(".") or "*" in raw:
        raise ConfigurationError(
            f"name constraint {text!r}: write the domain without a leading dot or wildcard; "
            "a DNS name constraint covers the name and every name below it (RFC 5280 §4.2.1.10)",
            reason="name_constraint",
        )
    try:
        return normalize_host(raw)
    except InvalidHostName as exc:
        raise ConfigurationError(
            f"name constraint {text!r} is not a valid DNS name or IP network: {exc}",
            reason="name_constraint",
        ) from exc


def _general_name(canonical: str) -> x509.GeneralName:
    if "/" in canonical:
        return x509.IPAddress(ipaddress.ip_network(canonical))
    return x509.DNSName(canonical)


def _check_organization(organization: str) -> str:
    if not 1 <= len(organization) <= 64 or not organization.isprintable():
        raise ConfigurationError(
            "organization must be 1 to 64 printable characters (X.520 ub-organization-name)",
            reason="organization",
        )
    return organization


def _subject(organization: str, installation_id: str, common_name: str) -> x509.Name:
    # The subject names tlsmitm and the installation and nothing else: no user, host or
    # secret (matrix CA-05: "Subject names the product").
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(
                NameOID.ORGANIZATIONAL_UNIT_NAME, f"tlsmitm installation {installation_id}"
            ),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PrivateKey | PublicKey,
    signing_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int,
    excluded: Sequence[str],
) -> x509.Certificate:
    if isinstance(public_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        public_key = public_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())  # BR §7.1: >= 64 bits from a CSPRNG
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # RFC 5280 §4.2.1.9: critical; pathLen 1 on the root and 0 below it allows exactly
        # root -> intermediate -> leaf.
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        # RFC 5280 §4.2.1.3 / BR §7.1.2.10.7: keyCertSign + cRLSign only, critical.
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # RFC 5280 §4.2.1.12 as applied to CAs by Windows, NSS and OpenSSL: a CA carrying only
        # serverAuth cannot vouch for code signing, S/MIME or client certificates.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    )
    if excluded:
        # RFC 5280 §4.2.1.10: "Conforming CAs MUST mark this extension as critical".
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=None,
                excluded_subtrees=[_general_name(name) for name in excluded],
            ),
            critical=True,
        )
    return builder.sign(signing_key, signature_hash(signing_key))


def _new_intermediate(
    *,
    root: x509.Certificate,
    root_key: PrivateKey,
    key_type: str,
    organization: str,
    installation_id: str,
    generation: int,
    excluded: Sequence[str],
    now: dt.datetime,
    key: PrivateKey | None = None,
    common_name: str | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    not_after = min(now + INTERMEDIATE_LIFETIME, root.not_valid_after_utc)
    if not_after <= now + dt.timedelta(days=1):
        raise ConfigurationError(
            f"the root certificate expires on {root.not_valid_after_utc:%Y-%m-%d}; a new CA "
            "must be created (python -m tlsmitm ca init with a new --state-dir) and trusted",
            reason="ca_expired",
        )
    if key is None:
        key = generate_key(key_type)
    certificate = _ca_certificate(
        subject=_subject(
            organization,
            installation_id,
            common_name or f"tlsmitm intermediate CA {installation_id} G{generation}",
        ),
        issuer=root.subject,
        public_key=key,
        signing_key=root_key,
        not_before=max(now - CA_BACKDATE, root.not_valid_before_utc),
        not_after=not_after,
        path_length=0,
        excluded=excluded,
    )
    return certificate, key


def _new_error_ca(
    key_type: str, organization: str, installation_id: str, now: dt.datetime
) -> tuple[x509.Certificate, PrivateKey]:
    error_key = generate_key(key_type)
    error_subject = _subject(
        organization, installation_id, f"tlsmitm error CA {installation_id} (never trusted)"
    )
    error = _ca_certificate(
        subject=error_subject,
        issuer=error_subject,
        public_key=error_key,
        signing_key=error_key,
        not_before=now - CA_BACKDATE,
        not_after=now + ERROR_CA_LIFETIME,
        path_length=0,
        excluded=(),
    )
    return error, error_key


def _sign_crl(
    *,
    root: x509.Certificate,
    root_key: PrivateKey,
    retired: Sequence[_Retired],
    number: int,
    now: dt.datetime,
    nodes: Sequence[NodeIntermediate] = (),
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(root.subject)
        .last_update(now)
        .next_update(now + CRL_LIFETIME)  # RFC 5280 §5.1.2.5: conforming issuers include it
        # RFC 5280 §5.2.1 (AKI, MUST) and §5.2.3 (CRL number, MUST, monotonically increasing).
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in retired:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.certificate.serial_number)
            .revocation_date(entry.retired_at)
            .add_extension(x509.CRLReason(entry.reason), critical=False)  # RFC 5280 §5.3.1
            .build()
        )
    for node in nodes:
        if node.revoked is None:
            continue
        # A node's intermediate is revoked because that node may be compromised.
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(node.certificate.serial_number)
            .revocation_date(node.revoked)
            .add_extension(x509.CRLReason(x509.ReasonFlags.ca_compromise), critical=False)
            .build()
        )
    return builder.sign(root_key, signature_hash(root_key))


# --------------------------------------------------------------------------------------------
# an intermediate issued elsewhere: the organisation's root, or this installation's for a node

#: A node's name: lower-case letters, digits and inner hyphens, at most 32 characters.
_NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")


def _describe(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or f"serial {certificate.serial_number:x}"


def _refuse_import(message: str) -> NoReturn:
    raise ConfigurationError(message, reason="import_refused")


def _check_issuing_key(key: PrivateKey | PublicKey | x509.Certificate, what: str) -> None:
    """BR §6.1.5 key types only: ECDSA P-256 or P-384, RSA of 2048 bits or more."""
    public = (
        key if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) else key.public_key()
    )
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name in ("secp256r1", "secp384r1"):
            return
    elif isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048:
        return
    _refuse_import(
        f"{what} has a key tlsmitm does not sign with (use ECDSA P-256/P-384 or RSA >= 2048)"
    )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ordered_chain(
    intermediate: x509.Certificate, others: Sequence[x509.Certificate]
) -> tuple[tuple[x509.Certificate, ...], x509.Certificate]:
    """``(certificates between intermediate and root, root)``; refuses gaps and strays."""
    path: list[x509.Certificate] = []
    pool = [cert for cert in others if cert != intermediate]
    current = intermediate
    while True:
        parent = next((cert for cert in pool if _issued_by(current, cert)), None)
        if parent is None:
            _refuse_import(
                f"the chain of {_describe(intermediate)} stops at {_describe(current)}: give the "
                "certificates up to the organisation's (self-signed) root with --chain"
            )
        pool.remove(parent)
        if _issued_by(parent, parent):
            if pool:
                _refuse_import(
                    f"{_describe(pool[0])} is not on the chain from {_describe(intermediate)} to "
                    "its root; leave it out"
                )
            return tuple(path), parent
        path.append(parent)
        current = parent


def inspect_intermediate(certificate: x509.Certificate, *, now: dt.datetime) -> tuple[str, ...]:
    """What an intermediate could do beyond signing TLS server leaves, as warnings.

    An intermediate without an extendedKeyUsage extension, or with more than serverAuth, can
    sign code-signing, e-mail or client certificates that every machine trusting its root
    accepts; one without name constraints can vouch for every name. Neither is refused (it is
    the organisation's CA), both are said.
    """
    out = []
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        out.append(
            "the intermediate has no extendedKeyUsage: besides TLS server certificates it can "
            "sign code-signing, e-mail and client certificates that your machines trust; ask "
            "your PKI for one restricted to serverAuth"
        )
    else:
        others = sorted(
            getattr(oid, "_name", oid.dotted_string)
            for oid in usages
            if oid != ExtendedKeyUsageOID.SERVER_AUTH
        )
        if others:
            out.append(
                "the intermediate's extendedKeyUsage also allows "
                f"{', '.join(others)}: it can sign more than TLS server certificates; ask your "
                "PKI for one restricted to serverAuth"
            )
    try:
        certificate.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        out.append(
            "the intermediate has no name constraints: it can vouch for any name; consider one "
            "that excludes what the proxy must never intercept"
        )
    if certificate.not_valid_after_utc - now < dt.timedelta(days=60):
        out.append(
            f"the intermediate expires on {certificate.not_valid_after_utc:%Y-%m-%d}; import its "
            "successor before then"
        )
    return tuple(out)


def check_imported_intermediate(
    certificates: Sequence[x509.Certificate],
    public_key: PrivateKey | x509.Certificate,
    *,
    now: dt.datetime,
) -> tuple[x509.Certificate, tuple[x509.Certificate, ...], x509.Certificate, tuple[str, ...]]:
    """Check an intermediate (``certificates[0]``) and its chain before tlsmitm signs with it.

    Args:
        certificates: the intermediate, then the rest of its chain up to and including the
            self-signed root, in any order.
        public_key: the intermediate's private key (or anything with ``public_key()``).
        now: the current time.

    Returns:
        ``(intermediate, chain between it and the root, root, warnings)``.

    Raises:
        ConfigurationError: ``import_refused`` with a one-line reason.
    """
    now = _utc_now_param(now)
    if not certificates:
        _refuse_import("no certificate to import")
    intermediate = certificates[0]
    name = _describe(intermediate)
    if _issued_by(intermediate, intermediate):
        _refuse_import(
            f"{name} is self-signed (a root): import an intermediate issued by it, and give the "
            "root with --chain"
        )
    try:
        constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.value.ca:
        _refuse_import(
            f"{name} is not a CA certificate (RFC 5280 §4.2.1.9: basicConstraints CA:TRUE)"
        )
    try:
        usage = intermediate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.key_cert_sign:
        _refuse_import(
            f"{name} may not sign certificates (RFC 5280 §4.2.1.3: keyUsage keyCertSign)"
        )
    try:
        usages = intermediate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(usages):
        _refuse_import(
            f"{name} does not allow serverAuth (RFC 5280 §4.2.1.12): clients would refuse every "
            "leaf it signs"
        )
    chain, root = _ordered_chain(intermediate, certificates[1:])
    for certificate in (intermediate, *chain, root):
        if certificate.not_valid_after_utc <= now:
            _refuse_import(
                f"{_describe(certificate)} expired on {certificate.not_valid_after_utc:%Y-%m-%d}"
            )
        if certificate.not_valid_before_utc > now:
            _refuse_import(
                f"{_describe(certificate)} is not valid before "
                f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
    for depth, certificate in enumerate((*chain, root), start=1):
        try:
            above = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            above = None
        if above is None or not above.ca:
            _refuse_import(
                f"{_describe(certificate)} in the chain is not a CA certificate (RFC 5280 "
                "§4.2.1.9: basicConstraints CA:TRUE)"
            )
        if above.path_length is not None and above.path_length < depth:
            # RFC 5280 §4.2.1.9: pathLenConstraint counts the CA certificates below it.
            _refuse_import(
                f"{_describe(certificate)} allows {above.path_length} CA certificate(s) below "
                f"it (pathLenConstraint) and the chain has {depth}: clients would refuse it"
            )
    _check_issuing_key(intermediate, name)
    if _spki(public_key) != _spki(intermediate):
        _refuse_import(f"the key does not belong to {name} (their public keys differ)")
    return intermediate, chain, root, inspect_intermediate(intermediate, now=now)


def _subtrees(subtrees: Sequence[x509.GeneralName] | None) -> list[str]:
    """DNS and IP subtrees, canonical (see :func:`_canonical_exclusion`); others are skipped."""
    out: list[str] = []
    for general in subtrees or ():
        if not isinstance(general, x509.DNSName | x509.IPAddress):
            continue  # e-mail, URI, directory names: never in a TLS server leaf's SAN
        value = general.value
        text = value.lstrip(".") if isinstance(value, str) else str(value)
        try:
            canonical = _canonical_exclusion(text)
        except ConfigurationError:
            continue
        if canonical not in out:
            out.append(canonical)
    return out


def _name_constraints_of(
    certificates: Sequence[x509.Certificate],
) -> tuple[list[str], list[list[str]]]:
    """``(excluded subtrees, permitted subtrees per certificate)`` of a chain's name
    constraints, as far as tlsmitm can express them (DNS names and IP networks).

    RFC 5280 §4.2.1.10: each CA's constraints apply to every name below it, so a name must
    lie outside every excluded subtree and, for each certificate with permitted subtrees of
    the name's type, inside one of them.
    """
    excluded: list[str] = []
    permitted: list[list[str]] = []
    for certificate in certificates:
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.NameConstraints)
        except x509.ExtensionNotFound:
            continue
        excluded += [
            name for name in _subtrees(constraints.value.excluded_subtrees) if name not in excluded
        ]
        group = _subtrees(constraints.value.permitted_subtrees)
        if group:
            permitted.append(group)
    return excluded, permitted


# --------------------------------------------------------------------------------------------
# passphrases and encrypted keys


def passphrase_from_env(name: str = PASSPHRASE_ENV) -> Callable[[], bytes]:
    """A passphrase callback that reads the environment variable ``name`` when called."""

    def read() -> bytes:
        value = os.environ.get(name)
        if not value:
            raise ConfigurationError(
                f"the CA passphrase was to come from the environment variable {name}, which is "
                "not set or empty",
                reason="passphrase",
            )
        return os.fsencode(value)

    return read


def _resolve_passphrase(passphrase: Passphrase | None) -> bytes | None:
    if passphrase is None:
        return None
    value = passphrase() if callable(passphrase) else passphrase
    if not isinstance(value, bytes):
        raise TypeError("a CA passphrase must be bytes (or a callable returning bytes)")
    if not value:
        raise ConfigurationError("the CA passphrase is empty", reason="passphrase")
    return value


def _pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    begin = f"-----BEGIN {label}-----\n".encode()
    end = f"-----END {label}-----\n".encode()
    return b"".join([begin, *(line + b"\n" for line in lines), end])


def _encrypt_private_key(key: PrivateKey, passphrase: bytes, *, iterations: int) -> bytes:
    """PKCS #8 EncryptedPrivateKeyInfo (RFC 5958 §3) with PBES2 (RFC 8018 §6.2), as PEM.

    PBKDF2-HMAC-SHA256 with ``iterations`` rounds and a 128-bit salt derives an AES-256-CBC key.
    ``openssl pkey -in root.key`` reads the result with the same passphrase.
    """
    plain = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    salt = secrets.token_bytes(16)
    iv = secrets.token_bytes(16)
    kek = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=iterations).derive(
        passphrase
    )
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(kek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    pbkdf2_params = _der.sequence(
        _der.octet_string(salt),
        _der.integer(iterations),
        _der.sequence(_der.oid(_OID_HMAC_SHA256), _der.NULL),
    )
    pbes2_params = _der.sequence(
        _der.sequence(_der.oid(_OID_PBKDF2), pbkdf2_params),
        _der.sequence(_der.oid(_OID_AES256_CBC), _der.octet_string(iv)),
    )
    info = _der.sequence(
        _der.sequence(_der.oid(_OID_PBES2), pbes2_params), _der.octet_string(ciphertext)
    )
    return _pem("ENCRYPTED PRIVATE KEY", info)


def _plain_private_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _is_encrypted_pem(data: bytes) -> bool:
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data


def _parse_private_key(
    data: bytes, path: Path, passphrase: bytes | None, *, role: str
) -> PrivateKey:
    encrypted = _is_encrypted_pem(data)
    if encrypted and passphrase is None:
        raise ConfigurationError(
            f"the {role} key {path} is passphrase-encrypted; give the passphrase (for the "
            f"command line: --passphrase-file, --passphrase-env or set {PASSPHRASE_ENV})",
            reason="passphrase",
        )
    try:
        key = serialization.load_pem_private_key(data, passphrase if encrypted else None)
    except ValueError:
        if encrypted:
            raise ConfigurationError(
                f"could not decrypt the {role} key {path}: wrong passphrase (or a damaged file)",
                reason="passphrase",
            ) from None  # no chained detail: nothing about the key or passphrase leaks
        raise ConfigurationError(
            f"the {role} key file {path} is damaged or not a PEM private key; restore it from "
            "a backup (never delete the CA: clients trust its root)",
            reason="key_corrupt",
        ) from None
    except TypeError:
        raise ConfigurationError(
            f"the {role} key file {path} is damaged or not a PEM private key",
            reason="key_corrupt",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigurationError(
            f"the {role} key {path} is neither an ECDSA nor an RSA key", reason="key_corrupt"
        )
    return key


# --------------------------------------------------------------------------------------------
# files: permission checks and atomic writes


def _uid_text(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _euid() -> int | None:
    geteuid = getattr(os, "geteuid", None)
    return geteuid() if geteuid is not None else None


def _check_owner(path: Path, st: os.stat_result, what: str) -> None:
    euid = _euid()
    if euid is not None and st.st_uid != euid:
        raise ConfigurationError(
            f"{what} {path} is owned by {_uid_text(st.st_uid)}, not by the user running tlsmitm "
            f"({_uid_text(euid)}); run tlsmitm as its owner, or: chown {euid} {path}",
            reason="key_owner",
        )


def _who(mode: int, *, read: bool) -> str:
    group = mode & (0o060 if read else 0o020)
    other = mode & (0o006 if read else 0o002)
    return " and ".join(w for w, bit in (("group", group), ("others", other)) if bit)


def _check_state_dir(state_dir: Path, ca_dir: Path) -> None:
    """The state directory must not be writable by others; ``ca/`` must be private (0700)."""
    if _euid() is None:  # pragma: no cover - Windows: the profile's ACL protects the directory
        return
    for path, private in ((state_dir, False), (ca_dir, True)):
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigurationError(f"{path} is not a directory", reason="state_corrupt")
        _check_owner(path, st, "the CA state directory")
        mode = stat.S_IMODE(st.st_mode)
        if private and mode & 0o077:
            raise ConfigurationError(
                f"the CA directory {path} is accessible by {_who(mode, read=True) or 'others'} "
                f"(mode {mode:04o}); run: chmod 700 {path}",
                reason="key_permissions",
            )
        if not private and mode & 0o022 and not mode & stat.S_ISVTX:
            raise ConfigurationError(
                f"the state directory {path} is writable by {_who(mode, read=False)} (mode "
                f"{mode:04o}), who could replace the CA; run: chmod go-w {path}",
                reason="key_permissions",
            )


def _read_state_file(path: Path, *, secret: bool, what: str) -> bytes:
    """Read a state file after checking, on the open descriptor, who owns it and who may read it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigurationError(
            f"{what} {path} is missing: the CA state is incomplete; restore the file from a "
            "backup (do not delete the CA directory: clients trust its root)",
            reason="state_incomplete",
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot open {what} {path}: {exc.strerror}", reason="io") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"{what} {path} is not a regular file", reason="state_corrupt")
        if _euid() is not None:
            _check_owner(path, st, what)
            mode = stat.S_IMODE(st.st_mode)
            if secret and mode & 0o077:
                raise ConfigurationError(
                    f"{what} {path} is accessible by {_who(mode, read=True) or 'others'} (mode "
                    f"{mode:04o}); run: chmod 600 {path}",
                    reason="key_permissions",
                )
            if not secret and mode & 0o022:
                raise ConfigurationError(
                    f"{what} {path} is writable by {_who(mode, read=False)} (mode {mode:04o}); "
                    f"run: chmod 600 {path}",
                    reason="key_permissions",
                )
        if st.st_size > _MAX_STATE_FILE:
            raise ConfigurationError(f"{what} {path} is implausibly large", reason="state_corrupt")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_atomic(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` atomically; the file is 0600 before its first byte is written."""
    temporary = directory / f".{name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # whatever the umask was: no window where it is readable
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(temporary, directory / name)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def _make_private_dir(path: Path) -> None:
    """Create ``path`` as 0700 (parents too), or tighten an existing empty one that we own."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise ConfigurationError(
                f"{path} exists and is not a directory", reason="state_corrupt"
            ) from None
        st = os.stat(path)
        if _euid() is not None:
            _check_owner(path, st, "the CA state directory")
    os.chmod(path, 0o700)  # the umask may have loosened mkdir's mode


@contextlib.contextmanager
def _io_errors(what: str) -> Iterator[None]:
    """Report a failing disk or file system as a ConfigurationError that says what failed."""
    try:
        yield
    except OSError as exc:
        raise ConfigurationError(
            f"{what}: {exc.strerror or exc} ({exc.filename or 'no file name'})", reason="io"
        ) from exc


@contextlib.contextmanager
def _exclusive(ca_dir: Path) -> Iterator[None]:
    """Serialise writers of one CA directory across processes (``ca rotate`` vs a server)."""
    fd = os.open(ca_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def _new_ca_dir(state_dir: Path, ca_dir: Path) -> Iterator[None]:
    """Create ``ca_dir`` (and ``state_dir`` if missing) private, and hold it exclusively while
    the new CA is written; refuses a CA that another process was quicker to create."""
    if not state_dir.exists():
        _make_private_dir(state_dir)
    _make_private_dir(ca_dir)
    _check_state_dir(state_dir, ca_dir)
    with _exclusive(ca_dir):
        _refuse_existing(ca_dir)  # another process may have been quicker
        yield


@contextlib.contextmanager
def _shared(ca_dir: Path) -> Iterator[None]:
    """Wait for any writer of ``ca_dir`` to finish, and keep writers out while reading.

    Readers create nothing: without a lock file (a directory restored without hidden files)
    they read unlocked.
    """
    try:
        fd = os.open(ca_dir / LOCK_FILE, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        yield
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _ca_files(ca_dir: Path) -> list[str]:
    """The CA's own files in ``ca_dir`` (hidden lock and temporary files excluded)."""
    try:
        return sorted(name for name in os.listdir(ca_dir) if not name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _refuse_existing(ca_dir: Path) -> None:
    present = _ca_files(ca_dir)
    if not present:
        return
    if METADATA_FILE in present:
        raise ConfigurationError(
            f"a CA already exists in {ca_dir}; it was left untouched", reason="state_exists"
        )
    raise ConfigurationError(
        f"{ca_dir} holds an incomplete CA ({', '.join(present)}) from an interrupted creation; "
        f"it was left untouched. If no client trusts it, remove {ca_dir} and try again",
        reason="state_incomplete",
    )


def _intermediate_files(generation: int) -> tuple[str, str]:
    return f"intermediate-{generation}.pem", f"intermediate-{generation}.key"


def _crl_file(number: int) -> str:
    return f"crl-{number}.der"


def _node_file(index: int) -> str:
    return f"node-{index}.pem"


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: object) -> dt.datetime:
    if not isinstance(text, str):
        raise ValueError("not a timestamp")
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


_REASONS = {
    "superseded": x509.ReasonFlags.superseded,
    "ca_compromise": x509.ReasonFlags.ca_compromise,
}


# --------------------------------------------------------------------------------------------
# the CA


class CertificateAuthority:
    """The per-installation interception CA: a root, an online intermediate and an error CA.

    Build one with :meth:`load_or_create`, :meth:`create`, :meth:`load` or :meth:`ephemeral`;
    the constructor is private. Instances are thread-safe. They never hold the root key of a CA
    stored on disk except during :meth:`rotate_intermediate` or a CRL refresh, and they refuse
    to be pickled; their ``repr`` shows fingerprints, never keys.
    """

    def __init__(
        self,
        *,
        _snapshot: _Snapshot,
        _state_dir: Path | None,
        _metadata: dict[str, Any],
        _root_key: PrivateKey | None = None,
        _passphrase: Passphrase | None = None,
        _token: TokenAccess | None = None,
    ) -> None:
        self._snapshot = _snapshot
        self._state_dir = _state_dir
        self._metadata = _metadata
        self._memory_root_key = _root_key  # only for ephemeral CAs
        self._passphrase = _passphrase
        self._token = _token  # how to reach a token holding a CA key
        self._lock = threading.RLock()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def ephemeral(
        cls,
        *,
        now: dt.datetime,
        key_type: str = "ec256",
        name_constraints_excluded: Sequence[str] = (),
        organization: str = DEFAULT_ORGANIZATION,
    ) -> CertificateAuthority:
        """A CA that lives in memory only (tests, short-lived embedders); nothing is written."""
        now = _utc_now_param(now)
        metadata, snapshot, root_key = cls._generate(
            key_type=key_type,
            excluded=[_canonical_exclusion(n) for n in name_constraints_excluded],
            organization=_check_organization(organization),
            now=now,
        )
        return cls(_snapshot=snapshot, _state_dir=None, _metadata=metadata, _root_key=root_key)

    @classmethod
    def create(
        cls,
        state_dir: Path,
        *,
        passphrase: Passphrase | None = None,
        key_type: str = "ec256",
        name_constraints_excluded: Sequence[str] = (),
        organization: str = DEFAULT_ORGANIZATION,
        now: dt.datetime,
        intermediate_key: str | None = None,
        token: TokenAccess | None = None,
    ) -> CertificateAuthority:
        """Generate a new CA in ``state_dir/ca/``.

        Args:
            state_dir: the installation's state directory (created 0700 if missing).
            passphrase: when given, the root key is stored encrypted with it.
            key_type: one of :data:`KEY_TYPES`, for all three CA keys.
            name_constraints_excluded: DNS names (with everything below them) and IP networks
                in CIDR form that the CA must never be able to vouch for.
            organization: the subject's O attribute (the product's name).
            now: the current time.
            intermediate_key: a PKCS#11 URI (RFC 7512): the intermediate's key is that key in
                a token, which never leaves it; no intermediate key file is written.
            token: how to reach the token (module, PIN) for ``intermediate_key``.

        Raises:
            ConfigurationError: ``state_exists`` if a CA (complete or not) is already there;
                ``key_type``, ``name_constraint``, ``passphrase`` for bad arguments; a
                ``pkcs11_*`` reason when the token key cannot be used.
        """
        now = _utc_now_param(now)
        state_dir = Path(state_dir)
        excluded = [_canonical_exclusion(n) for n in name_constraints_excluded]
        organization = _check_organization(organization)
        _check_key_type(key_type)
        secret = _resolve_passphrase(passphrase)
        ca_dir = state_dir / CA_SUBDIR
        _refuse_existing(ca_dir)  # before touching anything, even a directory's mode
        token_key = open_token_key(intermediate_key, token) if intermediate_key else None
        with _io_errors(f"cannot create the CA in {ca_dir}"), _new_ca_dir(state_dir, ca_dir):
            metadata, snapshot, root_key = cls._generate(
                key_type=key_type,
                excluded=excluded,
                organization=organization,
                now=now,
                intermediate_key=token_key,
            )
            root_key_pem = (
                _encrypt_private_key(root_key, secret, iterations=PBKDF2_ITERATIONS)
                if secret is not None
                else _plain_private_key(root_key)
            )
            cert_file, key_file = _intermediate_files(snapshot.generation)
            pem = serialization.Encoding.PEM
            _write_atomic(ca_dir, ROOT_KEY_FILE, root_key_pem)
            _write_atomic(ca_dir, ROOT_CERT_FILE, snapshot.root.public_bytes(pem))
            if token_key is None:
                _write_atomic(ca_dir, key_file, _plain_private_key(snapshot.intermediate.key))
            _write_atomic(ca_dir, cert_file, snapshot.intermediate.certificate.public_bytes(pem))
            _write_atomic(ca_dir, ERROR_KEY_FILE, _plain_private_key(snapshot.error.key))
            _write_atomic(ca_dir, ERROR_CERT_FILE, snapshot.error.certificate.public_bytes(pem))
            assert snapshot.crl is not None  # a generated CA always has one
            _write_atomic(
                ca_dir,
                _crl_file(snapshot.crl_number),
                snapshot.crl.public_bytes(serialization.Encoding.DER),
            )
            encoded = cls._encode_metadata(metadata)
            _write_atomic(ca_dir, METADATA_FILE, encoded)  # the commit point: written last
            del root_key
        ca = cls(
            _snapshot=snapshot,
            _state_dir=state_dir,
            _metadata=metadata,
            _passphrase=passphrase,
            _token=token,
        )
        ca._metadata_digest = hashlib.sha256(encoded).digest()
        return ca

    @classmethod
    def import_intermediate(
        cls,
        state_dir: Path,
        *,
        certificates: Sequence[x509.Certificate],
        key: PrivateKey | str,
        now: dt.datetime,
        token: TokenAccess | None = None,
        key_type: str = "ec256",
        organization: str = DEFAULT_ORGANIZATION,
    ) -> CertificateAuthority:
        """Set up ``state_dir/ca/`` around an intermediate issued by another root.

        That root is the organisation's (its machines already trust it), or this
        installation's on another machine (:meth:`issue_node_intermediate`). The intermediate
        is checked first (:func:`check_imported_intermediate`: CA:TRUE, keyCertSign, valid
        now, serverAuth allowed, key matches, chain complete up to the root); the served chain
        is the intermediate and the certificates between it and the root. The error CA is
        generated here (``key_type``). There is no CRL and no rotation: the issuer does both.

        Args:
            state_dir: the installation's state directory.
            certificates: the intermediate first, then its chain up to and including the root.
            key: the intermediate's private key, or a PKCS#11 URI of it in a token.
            now: the current time.
            token: how to reach the token for a URI ``key``.
            key_type: the error CA's key type.
            organization: the error CA's O attribute.

        Raises:
            ConfigurationError: ``import_refused`` (one line saying why), ``state_exists``,
                ``pkcs11_*``, ``key_type``.
        """
        now = _utc_now_param(now)
        state_dir = Path(state_dir)
        _check_key_type(key_type)
        organization = _check_organization(organization)
        ca_dir = state_dir / CA_SUBDIR
        _refuse_existing(ca_dir)
        signing_key = open_token_key(key, token) if isinstance(key, str) else key
        intermediate, chain, root, _ = check_imported_intermediate(
            certificates, signing_key, now=now
        )
        installation_id = hashlib.sha256(_spki(intermediate)).hexdigest()[:16]
        error, error_key = _new_error_ca(key_type, organization, installation_id, now)
        snapshot = _first_snapshot(
            root=root,
            intermediate=_intermediate_signer(intermediate, signing_key, chain),
            error=_error_signer(error, error_key),
            crl=None,
        )
        excluded, permitted = _name_constraints_of((intermediate, *chain, root))
        metadata: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "software": "tlsmitm",
            "origin": "imported",
            "installation_id": installation_id,
            "created": _iso(now),
            "key_type": key_type,
            "organization": organization,
            "name_constraints_excluded": excluded,
            "name_constraints_permitted": permitted,
        }
        cls._fill_metadata(metadata, snapshot)
        pem = serialization.Encoding.PEM
        with _io_errors(f"cannot create the CA in {ca_dir}"), _new_ca_dir(state_dir, ca_dir):
            cert_file, key_file = _intermediate_files(1)
            _write_atomic(ca_dir, ROOT_CERT_FILE, root.public_bytes(pem))
            _write_atomic(ca_dir, cert_file, intermediate.public_bytes(pem))
            if chain:
                _write_atomic(ca_dir, CHAIN_FILE, b"".join(c.public_bytes(pem) for c in chain))
            if not isinstance(signing_key, TOKEN_KEY_TYPES):
                _write_atomic(ca_dir, key_file, _plain_private_key(signing_key))
            _write_atomic(ca_dir, ERROR_KEY_FILE, _plain_private_key(error_key))
            _write_atomic(ca_dir, ERROR_CERT_FILE, error.public_bytes(pem))
            encoded = cls._encode_metadata(metadata)
            _write_atomic(ca_dir, METADATA_FILE, encoded)  # the commit point: written last
        ca = cls(_snapshot=snapshot, _state_dir=state_dir, _metadata=metadata, _token=token)
        ca._metadata_digest = hashlib.sha256(encoded).digest()
        return ca

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        *,
        passphrase: Passphrase | None = None,
        key_type: str = "ec256",
        name_constraints_excluded: Sequence[str] = (),
        organization: str = DEFAULT_ORGANIZATION,
        now: dt.datetime,
        intermediate_key: str | None = None,
        token: TokenAccess | None = None,
    ) -> CertificateAuthority:
        """Load the CA in ``state_dir``, or create it there if there is none at all.

        A damaged or half-written CA is reported (:class:`ConfigurationError`), never replaced.
        ``key_type``, ``name_constraints_excluded`` and ``organization`` apply only to creation.
        With ``intermediate_key`` (a PKCS#11 URI) an existing CA must already sign with that
        token key (``key_mismatch`` otherwise: run ``ca rotate --ca-key URI``).
        """
        state_dir = Path(state_dir)
        if not _ca_files(state_dir / CA_SUBDIR):
            try:
                return cls.create(
                    state_dir,
                    passphrase=passphrase,
                    key_type=key_type,
                    name_constraints_excluded=name_constraints_excluded,
                    organization=organization,
                    now=now,
                    intermediate_key=intermediate_key,
                    token=token,
                )
            except ConfigurationError as exc:
                # Another process created it meanwhile ("state_exists"), or is creating it right
                # now (its files appear before its metadata: "state_incomplete"). ``load`` waits
                # on the shared lock for that writer, then reads the finished CA -- or reports
                # a genuinely half-written one.
                if exc.reason not in ("state_exists", "state_incomplete"):
                    raise
        ca = cls.load(state_dir, passphrase=passphrase, token=token)
        if intermediate_key is not None:
            ca.require_token_key(intermediate_key, token)
        return ca

    @classmethod
    def load(
        cls,
        state_dir: Path,
        *,
        passphrase: Passphrase | None = None,
        token: TokenAccess | None = None,
    ) -> CertificateAuthority:
        """Load the CA in ``state_dir``, checking every file; nothing on disk is changed.

        When the root key is encrypted and ``passphrase`` is given, the passphrase is checked
        now (and remembered, as given, for a later rotation or CRL refresh); without it the CA
        still works, it just cannot rotate or re-sign its CRL. ``token`` says how to reach the
        PKCS#11 token of an intermediate key kept in one.

        Raises:
            ConfigurationError: with ``reason`` one of ``state_missing``, ``state_incomplete``,
                ``state_corrupt``, ``key_corrupt``, ``key_mismatch``, ``key_permissions``,
                ``key_owner``, ``passphrase``; the message says what to do.
        """
        state_dir = Path(state_dir)
        ca_dir = state_dir / CA_SUBDIR
        present = _ca_files(ca_dir)
        if not present:
            raise ConfigurationError(
                f"there is no CA in {ca_dir}; create one with: python -m tlsmitm ca init "
                f"--state-dir {state_dir}",
                reason="state_missing",
            )
        _check_state_dir(state_dir, ca_dir)
        with _io_errors(f"cannot read the CA in {ca_dir}"), _shared(ca_dir):
            return cls._load_locked(state_dir, ca_dir, passphrase, token)

    @classmethod
    def _load_locked(
        cls,
        state_dir: Path,
        ca_dir: Path,
        passphrase: Passphrase | None,
        token: TokenAccess | None,
    ) -> CertificateAuthority:
        present = _ca_files(ca_dir)  # again: a creation may have finished meanwhile
        if METADATA_FILE not in present:
            raise ConfigurationError(
                f"{ca_dir} holds an incomplete CA ({', '.join(present)}): its creation was "
                f"interrupted before {METADATA_FILE} was written. If no client trusts it, remove "
                f"{ca_dir} and run: python -m tlsmitm ca init --state-dir {state_dir}",
                reason="state_incomplete",
            )
        encoded = _read_state_file(ca_dir / METADATA_FILE, secret=False, what="the CA metadata")
        metadata = cls._decode_metadata(encoded, ca_dir / METADATA_FILE)
        snapshot = cls._load_snapshot(ca_dir, metadata, token)
        root_key_path = ca_dir / ROOT_KEY_FILE
        if root_key_path.exists():
            data = _read_state_file(root_key_path, secret=True, what="the root CA key file")
            encrypted = _is_encrypted_pem(data)
            if not encrypted or passphrase is not None:
                secret = _resolve_passphrase(passphrase) if encrypted else None
                key = _parse_private_key(data, root_key_path, secret, role="root")
                cls._check_pair(key, snapshot.root, root_key_path, "root")
                del key
        ca = cls(
            _snapshot=snapshot,
            _state_dir=state_dir,
            _metadata=metadata,
            _passphrase=passphrase,
            _token=token,
        )
        ca._metadata_digest = hashlib.sha256(encoded).digest()
        return ca

    # -- public view ---------------------------------------------------------------------------

    @property
    def root_certificate(self) -> x509.Certificate:
        """The certificate clients trust."""
        return self._snapshot.root

    @property
    def intermediate_certificate(self) -> x509.Certificate:
        """The current (online) intermediate that signs trusted leaves."""
        return self._snapshot.intermediate.certificate

    @property
    def error_ca_certificate(self) -> x509.Certificate:
        """The never-trusted CA for leaves that must make a client show its own warning."""
        return self._snapshot.error.certificate

    @property
    def imported(self) -> bool:
        """Whether the intermediate was imported (issued by a root whose key tlsmitm lacks)."""
        return self._metadata.get("origin") == "imported"

    @property
    def intermediate_chain(self) -> tuple[x509.Certificate, ...]:
        """What follows every trusted leaf in the TLS handshake: the intermediate, then (when
        imported) the chain up to, not including, the root (RFC 8446 §4.4.2 lets the trust
        anchor be omitted)."""
        return self._snapshot.intermediate.chain

    @property
    def intermediate_key_uri(self) -> str | None:
        """The PKCS#11 URI of the intermediate's key when it is in a token, else ``None``."""
        key = self._snapshot.intermediate.key
        return str(key.uri) if isinstance(key, TOKEN_KEY_TYPES) else None

    @property
    def signs_in_token(self) -> bool:
        """Whether leaves are signed through a PKCS#11 token (then mint off the event loop)."""
        return isinstance(self._snapshot.intermediate.key, TOKEN_KEY_TYPES)

    @property
    def node_intermediates(self) -> tuple[NodeIntermediate, ...]:
        """Every intermediate issued for a node, revoked or not, oldest first."""
        return self._snapshot.nodes

    @property
    def retired_intermediates(self) -> tuple[x509.Certificate, ...]:
        """Intermediates replaced by :meth:`rotate_intermediate` (all listed in the CRL)."""
        return tuple(entry.certificate for entry in self._snapshot.retired)

    @property
    def state_dir(self) -> Path | None:
        """The state directory, or ``None`` for an :meth:`ephemeral` CA."""
        return self._state_dir

    @property
    def ca_dir(self) -> Path | None:
        """Where the CA's files are (``state_dir/ca``), or ``None`` for an ephemeral CA."""
        return None if self._state_dir is None else self._state_dir / CA_SUBDIR

    @property
    def generation(self) -> int:
        """The current intermediate's generation (1 after creation, +1 per rotation)."""
        return self._snapshot.generation

    @property
    def key_type(self) -> str:
        """The CA keys' type, one of :data:`KEY_TYPES`."""
        return str(self._metadata["key_type"])

    @property
    def installation_id(self) -> str:
        """A public, random-looking id of this installation (from the root public key)."""
        return str(self._metadata["installation_id"])

    @property
    def name_constraints_excluded(self) -> tuple[str, ...]:
        """The excluded subtrees, canonical (DNS names and CIDR networks)."""
        return tuple(self._metadata["name_constraints_excluded"])

    @property
    def stored_crl(self) -> x509.CertificateRevocationList | None:
        """The CRL as last signed (no refresh; :meth:`crl` re-signs one that is due); ``None``
        for an imported intermediate (its issuer publishes the CRL)."""
        return self._snapshot.crl

    @property
    def crl_number(self) -> int:
        """The stored CRL's number (RFC 5280 §5.2.3), +1 at every rotation, refresh or node
        revocation; 0 for an imported intermediate."""
        return self._snapshot.crl_number

    def own_certificates(self) -> tuple[x509.Certificate, ...]:
        """Every CA certificate of this installation: root, intermediates (current, retired
        and nodes'), error CA. An upstream presenting one of them is refused (``OWN_CA``).

        With an imported intermediate only it and the error CA: the organisation's root and
        chain legitimately issue its own servers' certificates."""
        snapshot = self._snapshot
        if self.imported:
            return (snapshot.intermediate.certificate, snapshot.error.certificate)
        return (
            snapshot.root,
            snapshot.intermediate.certificate,
            *(entry.certificate for entry in snapshot.retired),
            *(node.certificate for node in snapshot.nodes),
            snapshot.error.certificate,
        )

    def export_root(self, *, der: bool = False) -> bytes:
        """The root certificate, PEM (default) or DER: the only thing clients need to trust."""
        encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
        return self._snapshot.root.public_bytes(encoding)

    def is_excluded(self, host: str) -> bool:
        """Whether ``host`` lies in an excluded subtree (no trusted leaf can be minted for it).

        Raises:
            InvalidHostName: ``host`` is not a valid host name.
        """
        return self._excludes(normalize_host(host))

    @property
    def name_constraints_permitted(self) -> tuple[tuple[str, ...], ...]:
        """Permitted subtrees, one group per certificate of an imported chain that has them
        (a name must lie in one subtree of each group of its type); empty otherwise."""
        return tuple(tuple(group) for group in self._metadata.get("name_constraints_permitted", []))

    def _excludes(self, name: str) -> bool:
        """``name`` is normalised; wildcards ``*.rest`` count if they could match an exclusion,
        or if not all of the names they match are permitted."""
        excluded = self._metadata["name_constraints_excluded"]
        permitted = self._metadata.get("name_constraints_permitted", [])
        if not excluded and not permitted:
            return False
        address = ip_address_of(name)
        wildcard = name.startswith("*.")
        base = name[2:] if wildcard else name
        for group in permitted:
            if address is not None:
                networks = [ipaddress.ip_network(entry) for entry in group if "/" in entry]
                if networks and not any(address in network for network in networks):
                    return True
                if len(networks) < len(group):
                    # An IP leaf's commonName is its address; with no DNS name in the SAN,
                    # OpenSSL checks that CN against the DNS subtrees, and it never matches.
                    return True
            else:
                domains = [entry for entry in group if "/" not in entry]
                if domains and not any(is_same_or_subdomain(base, d) for d in domains):
                    return True
        for entry in excluded:
            if "/" in entry:
                if address is not None and address in ipaddress.ip_network(entry):
                    return True
            elif address is None and (
                is_same_or_subdomain(base, entry)
                or (wildcard and is_same_or_subdomain(entry, base))
            ):
                return True
        return False

    def key_files(self) -> tuple[KeyFileStatus, ...]:
        """How the root, intermediate and error CA keys are stored (empty when ephemeral)."""
        ca_dir = self.ca_dir
        if ca_dir is None:
            return ()
        out = []
        for role, name in (
            ("root", ROOT_KEY_FILE),
            ("intermediate", _intermediate_files(self._snapshot.generation)[1]),
            ("error-ca", ERROR_KEY_FILE),
        ):
            path = ca_dir / name
            key = self._snapshot.intermediate.key
            if role == "intermediate" and isinstance(key, TOKEN_KEY_TYPES):
                out.append(
                    KeyFileStatus(role=role, path=path, present=False, token_uri=str(key.uri))
                )
                continue
            try:
                st = os.stat(path)
                with open(path, "rb") as handle:
                    head = handle.read(256)
            except OSError:
                out.append(KeyFileStatus(role=role, path=path, present=False))
                continue
            out.append(
                KeyFileStatus(
                    role=role,
                    path=path,
                    present=True,
                    encrypted=_is_encrypted_pem(head),
                    mode=stat.S_IMODE(st.st_mode),
                    owner_uid=st.st_uid if _euid() is not None else None,
                )
            )
        return tuple(out)

    # -- CRL -----------------------------------------------------------------------------------

    def crl(
        self,
        *,
        now: dt.datetime,
        passphrase: Passphrase | None = None,
        root_key_file: Path | str | None = None,
    ) -> x509.CertificateRevocationList:
        """The CRL (signed by the root) listing every retired intermediate.

        The stored CRL is returned while it has more than a month to live; after that it is
        re-signed (and stored) when the root key is at hand: an ephemeral CA, an unencrypted
        ``root.key``, or an encrypted one with a passphrase (this argument, or the one the CA
        was loaded with), or ``root_key_file``: the root key moved to a file or a PKCS#11
        token (a ``pkcs11:`` URI; the CRL is then signed through the token).

        Raises:
            ConfigurationError: ``crl_stale`` when the stored CRL has expired and the root key
                is not available.
        """
        now = _utc_now_param(now)
        snapshot = self._snapshot
        if snapshot.crl is None:
            raise ConfigurationError(
                "this CA's intermediate was imported: the CA that issued it (your organisation's "
                "PKI) publishes the CRL for it; tlsmitm has none",
                reason="crl_unavailable",
            )
        stored = snapshot.crl
        next_update = stored.next_update_utc
        assert next_update is not None  # every CRL tlsmitm signs has one
        if now < next_update - CRL_REFRESH_MARGIN:
            return stored
        with self._lock, self._writing():
            snapshot = self._snapshot
            try:
                root_key = self._root_key(passphrase, root_key_file)
            except ConfigurationError as exc:
                if now < next_update:
                    return stored
                raise ConfigurationError(
                    f"the CRL expired on {next_update:%Y-%m-%d} and cannot be re-signed: {exc}",
                    reason="crl_stale",
                ) from None
            crl = _sign_crl(
                root=snapshot.root,
                root_key=root_key,
                retired=snapshot.retired,
                number=snapshot.crl_number + 1,
                now=now,
                nodes=snapshot.nodes,
            )
            del root_key
            self._commit(
                replace={"crl": crl, "crl_number": snapshot.crl_number + 1},
                new_files={
                    _crl_file(snapshot.crl_number + 1): crl.public_bytes(serialization.Encoding.DER)
                },
                old_files=[_crl_file(snapshot.crl_number)],
            )
            return crl

    def export_crl(
        self,
        *,
        now: dt.datetime,
        passphrase: Passphrase | None = None,
        root_key_file: Path | str | None = None,
    ) -> bytes:
        """:meth:`crl` as DER."""
        crl = self.crl(now=now, passphrase=passphrase, root_key_file=root_key_file)
        return crl.public_bytes(serialization.Encoding.DER)

    # -- rotation ------------------------------------------------------------------------------

    def rotate_intermediate(
        self,
        *,
        now: dt.datetime,
        passphrase: Passphrase | None = None,
        root_key_file: Path | str | None = None,
        compromised: bool = False,
        intermediate_key: str | None = None,
        token: TokenAccess | None = None,
    ) -> None:
        """Replace the intermediate; the root (what clients trust) stays the same.

        The old intermediate is revoked in a new CRL (reason ``superseded``, or ``cACompromise``
        when ``compromised``) and its key file is deleted. Leaves minted afterwards chain to the
        new intermediate; a running proxy that loaded the CA earlier keeps the old one until it
        reloads.

        Args:
            now: the current time.
            passphrase: for an encrypted root key (else the one the CA was loaded with).
            root_key_file: where the root key is when it was moved off the state directory: a
                file, or a PKCS#11 URI of it in a token.
            compromised: the old intermediate's key may have leaked.
            intermediate_key: a PKCS#11 URI: the new intermediate is for that token key (the
                way to move the issuing key into a token). Required when the current one is
                in a token: tlsmitm does not move a key out of a token.
            token: how to reach the token (module, PIN).

        Raises:
            ConfigurationError: ``root_key_unavailable``, ``passphrase``, ``key_mismatch``,
                ``state_changed`` (another process changed the CA since it was loaded),
                ``imported`` (an imported intermediate is replaced by its issuer),
                ``token_key`` (the current key is in a token and no URI was given).
        """
        now = _utc_now_param(now)
        self._refuse_imported("rotate")
        if intermediate_key is None and isinstance(
            self._snapshot.intermediate.key, TOKEN_KEY_TYPES
        ):
            raise ConfigurationError(
                "the intermediate key is in a PKCS#11 token; say which token key the new "
                "intermediate is for: ca rotate --ca-key 'pkcs11:...'",
                reason="token_key",
            )
        token_key = open_token_key(intermediate_key, token) if intermediate_key else None
        with self._lock, self._writing():
            snapshot = self._snapshot
            root_key = self._root_key(passphrase, root_key_file)
            generation = snapshot.generation + 1
            certificate, key = _new_intermediate(
                root=snapshot.root,
                root_key=root_key,
                key_type=self.key_type,
                organization=str(self._metadata["organization"]),
                installation_id=self.installation_id,
                generation=generation,
                excluded=self.name_constraints_excluded,
                now=now,
                key=token_key,
            )
            reason = x509.ReasonFlags.ca_compromise if compromised else x509.ReasonFlags.superseded
            retired = (
                *snapshot.retired,
                _Retired(
                    certificate=snapshot.intermediate.certificate,
                    generation=snapshot.generation,
                    retired_at=now,
                    reason=reason,
                ),
            )
            crl = _sign_crl(
                root=snapshot.root,
                root_key=root_key,
                retired=retired,
                number=snapshot.crl_number + 1,
                now=now,
                nodes=snapshot.nodes,
            )
            del root_key
            signer = _intermediate_signer(certificate, key)
            cert_file, key_file = _intermediate_files(generation)
            new_files = {
                cert_file: certificate.public_bytes(serialization.Encoding.PEM),
                _crl_file(snapshot.crl_number + 1): crl.public_bytes(serialization.Encoding.DER),
            }
            if token_key is None:
                new_files[key_file] = _plain_private_key(key)
            self._commit(
                replace={
                    "intermediate": signer,
                    "generation": generation,
                    "retired": retired,
                    "crl": crl,
                    "crl_number": snapshot.crl_number + 1,
                },
                new_files=new_files,
                old_files=[
                    _intermediate_files(snapshot.generation)[1],
                    _crl_file(snapshot.crl_number),
                ],
            )

    # -- node intermediates ----------------------------------------------------------------------

    def issue_node_intermediate(
        self,
        node: str,
        *,
        now: dt.datetime,
        passphrase: Passphrase | None = None,
        root_key_file: Path | str | None = None,
        public_key: PublicKey | None = None,
    ) -> tuple[NodeIntermediate, PrivateKey | None]:
        """Issue an intermediate for one node of a multi-node installation, signed by the root.

        Each node signs its leaves with its own intermediate, so a compromised node is revoked
        alone (:meth:`revoke_node_intermediate`) while every client keeps trusting the same
        root. The node imports the result with ``ca init --import-intermediate``.

        Args:
            node: the node's name (``[a-z0-9-]``, at most 32 characters), unique among the
                intermediates not revoked.
            now: the current time.
            passphrase: for an encrypted root key.
            root_key_file: the root key, when it was moved offline (a file or a PKCS#11 URI).
            public_key: the node's public key (its private key stays where it is, e.g. in the
                node's token); without it a key of the CA's key type is generated and returned.

        Returns:
            The node intermediate and its new private key (``None`` with ``public_key``).

        Raises:
            ConfigurationError: ``node_name``, ``node_exists``, ``imported``,
                ``root_key_unavailable``, ``passphrase``, ``state_changed``.
        """
        now = _utc_now_param(now)
        self._refuse_imported("issue node intermediates")
        if not isinstance(node, str) or _NODE_NAME.fullmatch(node) is None:
            raise ConfigurationError(
                f"node name {node!r}: use 1 to 32 lower-case letters, digits and inner hyphens",
                reason="node_name",
            )
        if public_key is not None:
            _check_issuing_key(public_key, "the node's public key")
        with self._lock, self._writing():
            snapshot = self._snapshot
            for existing in snapshot.nodes:
                if existing.name == node and existing.revoked is None:
                    raise ConfigurationError(
                        f"node {node} already has an intermediate (serial "
                        f"{existing.certificate.serial_number:x}); revoke it first: python -m "
                        f"tlsmitm ca revoke-node-intermediate {node}",
                        reason="node_exists",
                    )
            root_key = self._root_key(passphrase, root_key_file)
            root = snapshot.root
            not_after = min(now + INTERMEDIATE_LIFETIME, root.not_valid_after_utc)
            if not_after <= now + dt.timedelta(days=1):
                raise ConfigurationError(
                    f"the root certificate expires on {root.not_valid_after_utc:%Y-%m-%d}; a "
                    "new CA must be created and trusted",
                    reason="ca_expired",
                )
            key = generate_key(self.key_type) if public_key is None else None
            subject_key = key if key is not None else public_key
            assert subject_key is not None
            certificate = _ca_certificate(
                subject=_subject(
                    str(self._metadata["organization"]),
                    self.installation_id,
                    f"tlsmitm node {node} {self.installation_id}",
                ),
                issuer=root.subject,
                public_key=subject_key,
                signing_key=root_key,
                not_before=max(now - CA_BACKDATE, root.not_valid_before_utc),
                not_after=not_after,
                path_length=0,
                excluded=self.name_constraints_excluded,
            )
            del root_key
            issued = NodeIntermediate(name=node, certificate=certificate, issued=now)
            self._commit(
                replace={"nodes": (*snapshot.nodes, issued)},
                new_files={
                    _node_file(len(snapshot.nodes) + 1): certificate.public_bytes(
                        serialization.Encoding.PEM
                    )
                },
                old_files=[],
            )
        return issued, key

    def revoke_node_intermediate(
        self,
        node: str,
        *,
        now: dt.datetime,
        passphrase: Passphrase | None = None,
        root_key_file: Path | str | None = None,
    ) -> NodeIntermediate:
        """Revoke ``node``'s intermediate: list it in a new CRL (reason cACompromise).

        The root and every other node's intermediate stay as they are.

        Raises:
            ConfigurationError: ``node_unknown`` (no such node with an intermediate in force),
                ``imported``, ``root_key_unavailable``, ``passphrase``, ``state_changed``.
        """
        now = _utc_now_param(now)
        self._refuse_imported("revoke node intermediates")
        with self._lock, self._writing():
            snapshot = self._snapshot
            target = next((n for n in snapshot.nodes if n.name == node and n.revoked is None), None)
            if target is None:
                raise ConfigurationError(
                    f"no node named {node!r} has an intermediate in force (see: python -m "
                    "tlsmitm ca show)",
                    reason="node_unknown",
                )
            root_key = self._root_key(passphrase, root_key_file)
            revoked = NodeIntermediate(
                name=target.name, certificate=target.certificate, issued=target.issued, revoked=now
            )
            nodes = tuple(revoked if n is target else n for n in snapshot.nodes)
            number = snapshot.crl_number + 1
            crl = _sign_crl(
                root=snapshot.root,
                root_key=root_key,
                retired=snapshot.retired,
                number=number,
                now=now,
                nodes=nodes,
            )
            del root_key
            self._commit(
                replace={"nodes": nodes, "crl": crl, "crl_number": number},
                new_files={_crl_file(number): crl.public_bytes(serialization.Encoding.DER)},
                old_files=[_crl_file(snapshot.crl_number)],
            )
        return revoked

    def require_token_key(self, uri: str, token: TokenAccess | None = None) -> None:
        """Make sure the intermediate's key is the token key ``uri`` names.

        Raises:
            ConfigurationError: ``key_mismatch`` with the command that moves the key into the
                token; a ``pkcs11_*`` reason when the token key cannot be opened.
        """
        current = self._snapshot.intermediate.key
        if isinstance(current, TOKEN_KEY_TYPES) and str(current.uri) == uri:
            return
        other = open_token_key(uri, token)
        try:
            same = _spki(other) == _spki(current)
        finally:
            other.close()
        if not same:
            where = (
                f"the token key {current.uri}"
                if isinstance(current, TOKEN_KEY_TYPES)
                else "a key file in the state directory"
            )
            raise ConfigurationError(
                f"the CA in {self.ca_dir} signs with {where}, not with {uri}; to move the "
                f"issuing key into the token run: python -m tlsmitm ca rotate --ca-key '{uri}'",
                reason="key_mismatch",
            )

    def _refuse_imported(self, what: str) -> None:
        if self.imported:
            raise ConfigurationError(
                f"this CA's intermediate was imported (issued by {_describe(self.root_certificate)}"
                f"): tlsmitm cannot {what} without that root's key; ask its holder, then import "
                "the new intermediate into a new state directory",
                reason="imported",
            )

    # -- for CertForge ---------------------------------------------------------------------------

    def _signer(self, kind: IssuerKind) -> _Signer:
        snapshot = self._snapshot  # one read: a consistent view even during a rotation
        return snapshot.intermediate if kind is IssuerKind.TRUSTED else snapshot.error

    # -- dunder --------------------------------------------------------------------------------

    def __repr__(self) -> str:
        where = "ephemeral" if self._state_dir is None else str(self._state_dir)
        return (
            f"<CertificateAuthority {where} root sha256={_fingerprint(self._snapshot.root).hex()}"
            f" generation={self._snapshot.generation}>"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("a CertificateAuthority holds private keys and cannot be pickled or copied")

    # -- internals -----------------------------------------------------------------------------

    _metadata_digest: bytes = b""

    @classmethod
    def _generate(
        cls,
        *,
        key_type: str,
        excluded: list[str],
        organization: str,
        now: dt.datetime,
        intermediate_key: PrivateKey | None = None,
    ) -> tuple[dict[str, Any], _Snapshot, PrivateKey]:
        root_key = generate_key(key_type)
        installation_id = hashlib.sha256(_spki(root_key)).hexdigest()[:16]
        root_subject = _subject(organization, installation_id, f"tlsmitm root CA {installation_id}")
        root = _ca_certificate(
            subject=root_subject,
            issuer=root_subject,
            public_key=root_key,
            signing_key=root_key,
            not_before=now - CA_BACKDATE,
            not_after=now + ROOT_LIFETIME,
            path_length=1,
            excluded=excluded,
        )
        intermediate, intermediate_key = _new_intermediate(
            root=root,
            root_key=root_key,
            key_type=key_type,
            organization=organization,
            installation_id=installation_id,
            generation=1,
            excluded=excluded,
            now=now,
            key=intermediate_key,
        )
        error, error_key = _new_error_ca(key_type, organization, installation_id, now)
        crl = _sign_crl(root=root, root_key=root_key, retired=(), number=1, now=now)
        snapshot = _first_snapshot(
            root=root,
            intermediate=_intermediate_signer(intermediate, intermediate_key),
            error=_error_signer(error, error_key),
            crl=crl,
        )
        metadata: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "software": "tlsmitm",
            "installation_id": installation_id,
            "created": _iso(now),
            "key_type": key_type,
            "organization": organization,
            "name_constraints_excluded": excluded,
        }
        cls._fill_metadata(metadata, snapshot)
        return metadata, snapshot, root_key

    @staticmethod
    def _fill_metadata(metadata: dict[str, Any], snapshot: _Snapshot) -> None:
        metadata["root_sha256"] = _fingerprint(snapshot.root).hex()
        intermediate: dict[str, Any] = {
            "generation": snapshot.generation,
            "sha256": snapshot.intermediate.fingerprint.hex(),
        }
        key = snapshot.intermediate.key
        if isinstance(key, TOKEN_KEY_TYPES):
            intermediate["key"] = str(key.uri)  # never a PIN: parse_uri refuses pin-value
        if metadata.get("origin") == "imported":
            intermediate["chain_sha256"] = [
                _fingerprint(cert).hex() for cert in snapshot.intermediate.chain[1:]
            ]
        metadata["intermediate"] = intermediate
        metadata["nodes"] = [
            {
                "name": node.name,
                "sha256": _fingerprint(node.certificate).hex(),
                "issued": _iso(node.issued),
                "revoked": _iso(node.revoked) if node.revoked is not None else None,
            }
            for node in snapshot.nodes
        ]
        metadata["retired"] = [
            {
                "generation": entry.generation,
                "sha256": _fingerprint(entry.certificate).hex(),
                "retired": _iso(entry.retired_at),
                "reason": entry.reason.name,
            }
            for entry in snapshot.retired
        ]
        metadata["error_ca_sha256"] = snapshot.error.fingerprint.hex()
        metadata["crl"] = (
            None
            if snapshot.crl is None
            else {
                "number": snapshot.crl_number,
                "sha256": hashlib.sha256(
                    snapshot.crl.public_bytes(serialization.Encoding.DER)
                ).hexdigest(),
            }
        )

    @staticmethod
    def _encode_metadata(metadata: dict[str, Any]) -> bytes:
        return (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode("utf-8")

    @staticmethod
    def _decode_metadata(encoded: bytes, path: Path) -> dict[str, Any]:
        def corrupt(why: str) -> NoReturn:
            raise ConfigurationError(
                f"the CA metadata {path} is damaged ({why}); restore it from a backup",
                reason="state_corrupt",
            )

        try:
            metadata = json.loads(encoded.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            corrupt("not JSON")
        if not isinstance(metadata, dict):
            corrupt("not a JSON object")
        if metadata.get("format") != FORMAT_VERSION:
            raise ConfigurationError(
                f"the CA in {path.parent} has format {metadata.get('format')!r}; this tlsmitm "
                f"reads format {FORMAT_VERSION}: use the tlsmitm version that created it",
                reason="state_version",
            )
        try:
            generation = metadata["intermediate"]["generation"]
            imported = metadata.get("origin", "generated") == "imported"
            crl = metadata["crl"]
            number = 1 if imported else crl["number"]
            key_uri = metadata["intermediate"].get("key")
            chain = metadata["intermediate"].get("chain_sha256", [])
            nodes = metadata.get("nodes", [])
            checks = [
                metadata.get("origin", "generated") in ("generated", "imported"),
                crl is None if imported else isinstance(crl["sha256"], str),
                key_uri is None or (isinstance(key_uri, str) and is_pkcs11_uri(key_uri)),
                isinstance(chain, list) and all(isinstance(c, str) for c in chain),
                isinstance(nodes, list) and not (imported and nodes),
                all(
                    isinstance(n["name"], str)
                    and _NODE_NAME.fullmatch(n["name"]) is not None
                    and isinstance(n["sha256"], str)
                    and (n["revoked"] is None or isinstance(n["revoked"], str))
                    for n in nodes
                ),
                isinstance(metadata["installation_id"], str),
                isinstance(metadata["root_sha256"], str),
                isinstance(metadata["error_ca_sha256"], str),
                isinstance(metadata["intermediate"]["sha256"], str),
                all(isinstance(e["sha256"], str) for e in metadata["retired"]),
                metadata["key_type"] in KEY_TYPES,
                isinstance(metadata["organization"], str),
                isinstance(generation, int) and generation >= 1,
                isinstance(number, int) and number >= 1,
                all(isinstance(n, str) for n in metadata["name_constraints_excluded"]),
                all(
                    isinstance(e["generation"], int) and e["reason"] in _REASONS
                    for e in metadata["retired"]
                ),
            ]
            for entry in metadata["retired"]:
                _parse_iso(entry["retired"])
            for node in nodes:
                _parse_iso(node["issued"])
                if node["revoked"] is not None:
                    _parse_iso(node["revoked"])
            permitted = metadata.get("name_constraints_permitted", [])
            checks.append(isinstance(permitted, list) and not (permitted and not imported))
            if not all(
                isinstance(group, list) and all(isinstance(n, str) for n in group)
                for group in permitted
            ):
                corrupt("malformed permitted name constraints")
            permitted_names = [name for group in permitted for name in group]
            for name in [*metadata["name_constraints_excluded"], *permitted_names]:
                if _canonical_exclusion(name) != name:
                    checks.append(False)
        except (KeyError, TypeError, ValueError, ConfigurationError):
            corrupt("missing or malformed fields")
        if not all(checks):
            corrupt("malformed fields")
        return metadata

    @staticmethod
    def _check_pair(key: PrivateKey, certificate: x509.Certificate, path: Path, role: str) -> None:
        if _spki(key) != _spki(certificate):
            raise ConfigurationError(
                f"the {role} key {path} does not belong to the {role} certificate; restore the "
                "matching pair from a backup",
                reason="key_mismatch",
            )

    @classmethod
    def _load_certificate(cls, path: Path, expected_sha256: object, what: str) -> x509.Certificate:
        data = _read_state_file(path, secret=False, what=what)
        try:
            certificate = x509.load_pem_x509_certificate(data)
        except ValueError:
            raise ConfigurationError(
                f"{what} {path} is damaged or not a PEM certificate; restore it from a backup",
                reason="state_corrupt",
            ) from None
        if _fingerprint(certificate).hex() != expected_sha256:
            raise ConfigurationError(
                f"{what} {path} is not the certificate recorded in {METADATA_FILE} (it was "
                "replaced or damaged); restore it from a backup",
                reason="state_corrupt",
            )
        return certificate

    @classmethod
    def _load_private_key(cls, path: Path, certificate: x509.Certificate, role: str) -> PrivateKey:
        data = _read_state_file(path, secret=True, what=f"the {role} CA key file")
        key = _parse_private_key(data, path, None, role=role)
        cls._check_pair(key, certificate, path, role)
        return key

    @classmethod
    def _load_chain(cls, ca_dir: Path, expected: list[str]) -> tuple[x509.Certificate, ...]:
        if not expected:
            return ()
        data = _read_state_file(ca_dir / CHAIN_FILE, secret=False, what="the imported chain")
        try:
            chain = tuple(x509.load_pem_x509_certificates(data))
        except ValueError:
            chain = ()
        if [_fingerprint(cert).hex() for cert in chain] != expected:
            raise ConfigurationError(
                f"the imported chain {ca_dir / CHAIN_FILE} is damaged or was replaced; import "
                "the intermediate again into a new state directory",
                reason="state_corrupt",
            )
        return chain

    @classmethod
    def _load_snapshot(
        cls, ca_dir: Path, metadata: dict[str, Any], token: TokenAccess | None
    ) -> _Snapshot:
        imported = metadata.get("origin") == "imported"
        root = cls._load_certificate(
            ca_dir / ROOT_CERT_FILE, metadata["root_sha256"], "the root certificate"
        )
        generation = metadata["intermediate"]["generation"]
        cert_file, key_file = _intermediate_files(generation)
        intermediate = cls._load_certificate(
            ca_dir / cert_file, metadata["intermediate"]["sha256"], "the intermediate certificate"
        )
        chain = cls._load_chain(ca_dir, metadata["intermediate"].get("chain_sha256", []))
        key_uri = metadata["intermediate"].get("key")
        intermediate_key: PrivateKey
        if key_uri is not None:
            intermediate_key = open_token_key(key_uri, token)
            cls._check_pair(intermediate_key, intermediate, Path(key_uri), "intermediate")
        else:
            intermediate_key = cls._load_private_key(
                ca_dir / key_file, intermediate, "intermediate"
            )
        error = cls._load_certificate(
            ca_dir / ERROR_CERT_FILE, metadata["error_ca_sha256"], "the error CA certificate"
        )
        error_key = cls._load_private_key(ca_dir / ERROR_KEY_FILE, error, "error CA")
        links = list(zip((intermediate, *chain), (*chain, root), strict=True))
        if not all(_issued_by(child, parent) for child, parent in links) or not _issued_by(
            error, error
        ):
            raise ConfigurationError(
                f"the certificates in {ca_dir} do not chain (intermediate not signed by the root, "
                "or a damaged error CA); restore them from a backup",
                reason="state_corrupt",
            )
        nodes = []
        for index, entry in enumerate(metadata.get("nodes", []), start=1):
            certificate = cls._load_certificate(
                ca_dir / _node_file(index), entry["sha256"], "a node intermediate certificate"
            )
            if not _issued_by(certificate, root):
                raise ConfigurationError(
                    f"the node intermediate {ca_dir / _node_file(index)} is not signed by the "
                    "root; restore it from a backup",
                    reason="state_corrupt",
                )
            revoked = entry["revoked"]
            nodes.append(
                NodeIntermediate(
                    name=entry["name"],
                    certificate=certificate,
                    issued=_parse_iso(entry["issued"]),
                    revoked=_parse_iso(revoked) if revoked is not None else None,
                )
            )
        signer = _intermediate_signer(intermediate, intermediate_key, chain)
        error_signer = _error_signer(error, error_key)
        if imported:
            return _Snapshot(
                root=root,
                intermediate=signer,
                generation=generation,
                error=error_signer,
                retired=(),
                crl=None,
                crl_number=0,
            )
        retired = tuple(
            _Retired(
                certificate=cls._load_certificate(
                    ca_dir / _intermediate_files(entry["generation"])[0],
                    entry["sha256"],
                    "a retired intermediate certificate",
                ),
                generation=entry["generation"],
                retired_at=_parse_iso(entry["retired"]),
                reason=_REASONS[entry["reason"]],
            )
            for entry in metadata["retired"]
        )
        number = metadata["crl"]["number"]
        crl_path = ca_dir / _crl_file(number)
        data = _read_state_file(crl_path, secret=False, what="the CRL")
        try:
            crl = x509.load_der_x509_crl(data)
            valid = crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
        except (ValueError, TypeError):
            valid = False
        if not valid or hashlib.sha256(data).hexdigest() != metadata["crl"]["sha256"]:
            raise ConfigurationError(
                f"the CRL {crl_path} is damaged or not signed by the root; restore it from a "
                "backup",
                reason="state_corrupt",
            )
        return _Snapshot(
            root=root,
            intermediate=signer,
            generation=generation,
            error=error_signer,
            retired=retired,
            crl=crl,
            crl_number=number,
            nodes=tuple(nodes),
        )

    def _root_key(
        self, passphrase: Passphrase | None, root_key_file: Path | str | None
    ) -> PrivateKey:
        """The root key for one operation: from memory (ephemeral), a file, a PKCS#11 token
        (``root_key_file`` a ``pkcs11:`` URI; CRLs and intermediates are then signed through
        it), or the state dir."""
        root = self._snapshot.root
        if isinstance(root_key_file, str) and is_pkcs11_uri(root_key_file):
            token_key = open_token_key(root_key_file, self._token)
            self._check_pair(token_key, root, Path(root_key_file), "root")
            return token_key
        if root_key_file is not None:
            path = Path(root_key_file)
            data = _read_state_file(path, secret=True, what="the root CA key file")
        elif self._memory_root_key is not None:
            return self._memory_root_key
        else:
            ca_dir = self.ca_dir
            if ca_dir is None or not (ca_dir / ROOT_KEY_FILE).exists():
                raise ConfigurationError(
                    f"the root key is not in {ca_dir} (moved offline?); pass its file (ca rotate "
                    "--root-key PATH)",
                    reason="root_key_unavailable",
                )
            path = ca_dir / ROOT_KEY_FILE
            data = _read_state_file(path, secret=True, what="the root CA key file")
        secret = _resolve_passphrase(passphrase if passphrase is not None else self._passphrase)
        key = _parse_private_key(data, path, secret, role="root")
        self._check_pair(key, root, path, "root")
        return key

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the cross-process lock and make sure nobody changed the CA since we loaded it."""
        ca_dir = self.ca_dir
        if ca_dir is None:
            yield
            return
        with _io_errors(f"cannot update the CA in {ca_dir}"), _exclusive(ca_dir):
            current = _read_state_file(ca_dir / METADATA_FILE, secret=False, what="the CA metadata")
            if hashlib.sha256(current).digest() != self._metadata_digest:
                raise ConfigurationError(
                    f"the CA in {ca_dir} was changed by another process (ca rotate?) since it was "
                    "loaded; reload it (restart the proxy) and try again",
                    reason="state_changed",
                )
            yield

    def _commit(
        self, *, replace: dict[str, Any], new_files: dict[str, bytes], old_files: list[str]
    ) -> None:
        """Write ``new_files``, then the metadata (the commit point), then drop ``old_files``."""
        snapshot = _Snapshot(
            **{name: getattr(self._snapshot, name) for name in _Snapshot.__dataclass_fields__}
            | replace
        )
        metadata = dict(self._metadata)
        self._fill_metadata(metadata, snapshot)
        ca_dir = self.ca_dir
        if ca_dir is not None:
            for name, data in new_files.items():
                _write_atomic(ca_dir, name, data)
            encoded = self._encode_metadata(metadata)
            _write_atomic(ca_dir, METADATA_FILE, encoded)
            self._metadata_digest = hashlib.sha256(encoded).digest()
            for name in old_files:
                with contextlib.suppress(FileNotFoundError):
                    (ca_dir / name).unlink()
            _fsync_directory(ca_dir)
        self._metadata = metadata
        self._snapshot = snapshot
