"""Upstream certificate verification: the checks a browser would run, made by tlsmitm instead.

Theory of operation
-------------------

The browser behind tlsmitm never sees the origin's certificate, so :class:`UpstreamVerifier`
must reach the verdict the browser would have reached, and also run the checks browsers skip
for locally installed roots (matrix §6). It is pure: the chain, the host, the time and any
revocation data come in as arguments; nothing here reads a clock or opens a socket.

1. **Accept only through cryptography.** A chain is accepted only when
   ``cryptography.x509.verification`` (RFC 5280 path building with the CA/B Forum profile) builds
   a path from the presented leaf to an anchor of the trust store, for the requested host, at
   ``now``. The :class:`~cryptography.x509.verification.Store` is built once per
   :class:`UpstreamVerifier`, never per connection.
2. **Then the checks cryptography lacks** run on the path it built: RSA keys under 2048 bits or
   of odd length and unsupported curves anywhere (cryptography does not look at the leaf's key),
   tlsmitm's own RFC 9525 host-name matcher with public-suffix wildcard rules (both matchers must
   agree), the distrust list of known interception roots, refusal of tlsmitm's own CA, the
   "public root" rules browsers apply only to built-in roots (maximum validity, non-unique names,
   CA/B profile of the subject), and a stapled OCSP response.
3. **Classify failures from the certificates, never from error strings.** When a chain fails,
   a small diagnostic path builder enumerates the candidate paths (presented certificates,
   anchors, tlsmitm's own certificates, fetched intermediates), checks every certificate on each
   with explicit rules that mirror cryptography's, and picks the path whose worst problem is the
   least severe. A non-overridable reason is reported as is (failing safe). An overridable reason
   (time, trust, name) is only reported after cryptography itself accepts the same path with
   exactly those problems neutralised (the untrusted top made an anchor, the time moved into the
   common validity window, the name check dropped); if it still refuses, the verdict is
   :attr:`~tlsmitm.CertError.INVALID_CHAIN`, which no user can override. A user is therefore
   never offered a way past a defect that tlsmitm failed to name.

:meth:`UpstreamVerifier.verify_with_fetching` adds what needs the network, through a fetcher the
driver injects: missing intermediates from the AIA "CA Issuers" URL (as browsers do) and,
optionally, OCSP or CRL data for the leaf.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import functools
import hashlib
import ipaddress
import re
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeVar

import certifi
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import ocsp
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
    SignatureAlgorithmOID,
)
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
)
from publicsuffixlist import PublicSuffixList

from ._errors import CertError, ConfigurationError
from ._names import InvalidHostName, normalize_host

__all__ = [
    "KNOWN_INTERCEPTION_SPKI_SHA256",
    "Fetcher",
    "RevocationMode",
    "RevocationStatus",
    "TrustConfig",
    "UpstreamVerifier",
    "Verdict",
    "certifi_bundle_age",
    "certificate_matches_host",
    "names_match_host",
    "spki_sha256",
    "trust_store_warning",
]

Fetcher = Callable[[str, bytes | None], Awaitable[bytes]]
"""``(url, body) -> response body``: GET when ``body`` is ``None``, else POST ``body`` as
``application/ocsp-request``. Raises on any failure; enforces its own timeout and size cap."""

RevocationMode = Literal["soft-fail", "hard-fail", "off"]
RevocationStatus = Literal["unchecked", "good", "revoked", "unavailable"]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NETWORKS = (ipaddress.IPv4Network, ipaddress.IPv6Network)

# SHA-256 of the SubjectPublicKeyInfo of roots whose private keys are public, so that anyone can
# forge certificates under them (matrix CV-34; badssl.com "Interception Certificates", read from
# chromium/badssl.com certs/src/crt/ca-*.crt at 6e53ae0 and hashed here). Chromium blocks such
# keys through its CRLSet (CERT_STATUS_KNOWN_INTERCEPTION_BLOCKED).
KNOWN_INTERCEPTION_SPKI_SHA256: Final[frozenset[bytes]] = frozenset(
    bytes.fromhex(h)
    for h in (
        # CN=Superfish, Inc. (Lenovo adware, 2015), RSA-1024
        "4bb8f35ba1e126f8dde1b0c420625ed86dce61a7bddadbdea9aba578ff13145e",
        # CN=eDellRoot (Dell, 2015)
        "cdee9f3305572a677e1a6c82dc1e02a35b11cae6a684338c9f37fe1ac8daec23",
        # CN=DSDTestProvider (Dell, 2015)
        "130ad4e0633521290531b6651f5759b0bc7bc656709ff8f365c2143b0389b6f6",
        # O=Acme Co (preact-cli development root)
        "680971cb44b0fd56592102a256e85c58e87109ad8044c2b90d8f3c6e9eeab897",
        # CN=localhost (webpack-dev-server development root)
        "2bd1e667ec9ebbe02b9a7da264210c99b3eac1cc9141a0e30e3f623eaccec4e1",
        # CN=BadSSL MITM Software Test (Chrome's "MITM software" interstitial test root)
        "9d40513f43991af39fe413aff7608fc56463827137166547de0a1828d524ae98",
    )
)

_DEFAULT_MAX_CHAIN_DEPTH: Final = 8  # cryptography's default: intermediates, not leaf or root
_MAX_PRESENTED: Final = 32  # certificates of a presented chain that are looked at
# A DNS name both matchers read the same way: lower-case letters, digits and inner hyphens in
# labels of 1 to 63 octets, 253 at most, no trailing dot. cryptography's DNSName accepts every
# such name (it refuses "_", empty labels, hence "foo.com.", and edge hyphens).
_PLAIN_DNS_NAME: Final = re.compile(
    r"(?=.{1,253}\Z)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z"
)
_MAX_PATHS: Final = 16  # candidate paths the diagnostic builder enumerates
_MAX_EXPANSIONS: Final = 64  # nodes the diagnostic builder expands
_MAX_URL: Final = 2048
_CLOCK_SKEW: Final = dt.timedelta(minutes=5)
_OCSP_MAX_AGE_WITHOUT_NEXT_UPDATE: Final = dt.timedelta(days=1)
_NEGATIVE_CACHE: Final = dt.timedelta(minutes=5)
_AIA_CACHE: Final = dt.timedelta(days=1)

_UTC = dt.UTC

# CA/B BR §6.3.2: maximum validity of subscriber certificates, by issuance (notBefore) date.
_BR_MAX_VALIDITY: Final = (
    (dt.datetime(2029, 3, 15, tzinfo=_UTC), dt.timedelta(days=47)),
    (dt.datetime(2027, 3, 15, tzinfo=_UTC), dt.timedelta(days=100)),
    (dt.datetime(2026, 3, 15, tzinfo=_UTC), dt.timedelta(days=200)),
)
_BR_MAX_VALIDITY_BEFORE_2026: Final = dt.timedelta(days=398)

# CA/B BR §7.1.3.2: the only signature algorithms a certificate may carry (cryptography's list).
_PERMITTED_SIGNATURES: Final = frozenset(
    {
        SignatureAlgorithmOID.RSA_WITH_SHA256,
        SignatureAlgorithmOID.RSA_WITH_SHA384,
        SignatureAlgorithmOID.RSA_WITH_SHA512,
        SignatureAlgorithmOID.RSASSA_PSS,
        SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        SignatureAlgorithmOID.ECDSA_WITH_SHA384,
        SignatureAlgorithmOID.ECDSA_WITH_SHA512,
    }
)
_MD5_SIGNATURES: Final = frozenset({SignatureAlgorithmOID.RSA_WITH_MD5})
_SHA1_SIGNATURES: Final = frozenset(
    {
        SignatureAlgorithmOID.RSA_WITH_SHA1,
        SignatureAlgorithmOID._RSA_WITH_SHA1,
        SignatureAlgorithmOID.ECDSA_WITH_SHA1,
        SignatureAlgorithmOID.DSA_WITH_SHA1,
    }
)
# CA/B BR §6.1.5: ECDSA keys only on these curves.
_PERMITTED_CURVES: Final = frozenset({"secp256r1", "secp384r1", "secp521r1"})

# Extensions cryptography's web-PKI profile understands; any other critical one is refused
# (RFC 5280 §4.2: "A certificate-using system MUST reject the certificate if it encounters a
# critical extension it does not recognize").
_KNOWN_EXTENSIONS: Final = frozenset(
    {
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.NAME_CONSTRAINTS,
        ExtensionOID.EXTENDED_KEY_USAGE,
    }
)
# Known extensions that must not be critical, per certificate role (cryptography's profile).
_NON_CRITICAL_EE: Final = frozenset(
    {
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.EXTENDED_KEY_USAGE,
    }
)
_NON_CRITICAL_CA: Final = frozenset(
    {
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.EXTENDED_KEY_USAGE,
    }
)

# Most severe first. A failing chain reports the most severe problem of its best path; among
# candidate paths, the one whose worst problem is least severe is the best.
_SEVERITY: Final = (
    CertError.OWN_CA,
    CertError.DISTRUSTED,
    CertError.REVOKED,
    CertError.BAD_SIGNATURE,
    CertError.MALFORMED,
    CertError.WEAK_KEY,
    CertError.WEAK_SIGNATURE,
    CertError.UNKNOWN_CRITICAL_EXTENSION,
    CertError.INVALID_CHAIN,
    CertError.WRONG_USAGE,
    CertError.PROTOCOL,
    CertError.SELF_SIGNED,
    CertError.UNKNOWN_ISSUER,
    CertError.INCOMPLETE_CHAIN,
    CertError.EXPIRED,
    CertError.NOT_YET_VALID,
    CertError.VALIDITY_TOO_LONG,
    CertError.NAME_MISMATCH,
)
_RANK: Final = {error: index for index, error in enumerate(_SEVERITY)}
_TRUST_ERRORS: Final = frozenset(
    {CertError.SELF_SIGNED, CertError.UNKNOWN_ISSUER, CertError.INCOMPLETE_CHAIN}
)
_TIME_ERRORS: Final = frozenset({CertError.EXPIRED, CertError.NOT_YET_VALID})


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The outcome of verifying one upstream chain for one host at one time.

    Attributes:
        host: the host the client asked for, normalised (IDNA A-labels, lower case, no trailing
            dot, canonical IP text), or as given when it cannot be normalised.
        ok: whether the chain may be trusted for ``host``.
        error: the reason it may not; ``None`` exactly when ``ok``.
        detail: what went wrong, for people (logs, error pages); ``""`` when ``ok``. Never
            parsed by tlsmitm.
        chain: the verified path, leaf first and trust anchor last, when ``ok``; otherwise the
            chain as the server presented it.
        leaf: the presented leaf certificate (``None`` only when nothing was presented).
        leaf_sha256: SHA-256 of the leaf's DER encoding (``None`` with ``leaf``).
        public_root: whether the path ends at a publicly trusted root (certifi's Mozilla bundle
            or one configured as public); Chromium's ``is_issued_by_known_root``.
        revocation: what is known about the leaf's revocation status.
    """

    host: str
    ok: bool
    error: CertError | None
    detail: str
    chain: tuple[x509.Certificate, ...]
    leaf: x509.Certificate | None
    leaf_sha256: bytes | None
    public_root: bool = False
    revocation: RevocationStatus = "unchecked"

    def __post_init__(self) -> None:
        if self.ok != (self.error is None):
            raise ValueError("Verdict: error must be None exactly when ok is True")
        if self.ok and self.detail:
            raise ValueError("Verdict: detail must be empty when ok is True")
        if self.ok and (self.leaf is None or not self.chain):
            raise ValueError("Verdict: an ok verdict needs the leaf and the verified chain")
        if not isinstance(self.chain, tuple):
            raise TypeError("Verdict: chain must be a tuple")
        if (self.leaf is None) != (self.leaf_sha256 is None):
            raise ValueError("Verdict: leaf_sha256 must be given exactly when leaf is")
        if self.leaf_sha256 is not None and len(self.leaf_sha256) != 32:
            raise ValueError("Verdict: leaf_sha256 must be 32 bytes")
        if self.ok and self.revocation == "revoked":
            raise ValueError("Verdict: a revoked leaf cannot be ok")

    @property
    def overridable(self) -> bool:
        """Whether a user may be offered a way past this error (Firefox's categories)."""
        return self.error is not None and self.error.overridable


def _certificates(value: Iterable[x509.Certificate], what: str) -> tuple[x509.Certificate, ...]:
    out = tuple(value)
    for cert in out:
        if not isinstance(cert, x509.Certificate):
            raise ConfigurationError(
                f"TrustConfig.{what} must hold cryptography x509.Certificate objects, "
                f"not {type(cert).__name__}; load PEM files with TrustConfig.from_pem_files",
                reason="trust_config",
            )
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustConfig:
    """What tlsmitm trusts upstream.

    Attributes:
        extra_roots: roots trusted in addition to the bundle (enterprise CAs). They are *not*
            public: the rules browsers apply only to built-in roots are not applied to them.
        replace_bundle: when given, these roots replace certifi's Mozilla bundle entirely.
        distrusted_spki_sha256: SHA-256 hashes of SubjectPublicKeyInfo DER that are refused
            anywhere in a path, even when a trusted root carries them (CV-34). Defaults to
            :data:`KNOWN_INTERCEPTION_SPKI_SHA256`; add to it rather than replace it.
        own_certificates: tlsmitm's own root, intermediates and error CA. A chain presenting
            one of them or chaining to one is refused with
            :attr:`~tlsmitm.CertError.OWN_CA`; listing one as a trust anchor is a
            configuration error.
        public_roots: roots trusted *and* treated as publicly trusted (as if in certifi's
            bundle), e.g. a test root standing in for a public CA.
    """

    extra_roots: tuple[x509.Certificate, ...] = ()
    replace_bundle: tuple[x509.Certificate, ...] | None = None
    distrusted_spki_sha256: frozenset[bytes] = KNOWN_INTERCEPTION_SPKI_SHA256
    own_certificates: tuple[x509.Certificate, ...] = ()
    public_roots: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra_roots", _certificates(self.extra_roots, "extra_roots"))
        if self.replace_bundle is not None:
            object.__setattr__(
                self, "replace_bundle", _certificates(self.replace_bundle, "replace_bundle")
            )
        object.__setattr__(
            self, "own_certificates", _certificates(self.own_certificates, "own_certificates")
        )
        object.__setattr__(self, "public_roots", _certificates(self.public_roots, "public_roots"))
        hashes_ = frozenset(self.distrusted_spki_sha256)
        for digest in hashes_:
            if not isinstance(digest, bytes) or len(digest) != 32:
                raise ConfigurationError(
                    f"distrusted_spki_sha256 entries must be 32-byte SHA-256 digests of a "
                    f"SubjectPublicKeyInfo, got {digest!r}; compute one with "
                    "tlsmitm.spki_sha256(certificate)",
                    reason="trust_config",
                )
        object.__setattr__(self, "distrusted_spki_sha256", hashes_)

    @classmethod
    def from_pem_files(
        cls,
        *,
        extra_roots: Iterable[str | Path] = (),
        replace_bundle: str | Path | None = None,
        own_certificates: Iterable[str | Path] = (),
        public_roots: Iterable[str | Path] = (),
        distrusted_spki_sha256_hex: Iterable[str] = (),
    ) -> TrustConfig:
        """Build a configuration from PEM files (each may hold several certificates).

        ``distrusted_spki_sha256_hex`` is *added* to :data:`KNOWN_INTERCEPTION_SPKI_SHA256`.

        Raises:
            ConfigurationError: a file is unreadable, holds no certificate, or a hash is not
                64 hexadecimal digits.
        """
        extra_hashes: set[bytes] = set()
        for text in distrusted_spki_sha256_hex:
            try:
                digest = bytes.fromhex(text.strip().replace(":", ""))
            except ValueError as exc:
                raise ConfigurationError(
                    f"distrusted SPKI hash {text!r} is not hexadecimal; give the SHA-256 of the "
                    "SubjectPublicKeyInfo as 64 hex digits",
                    reason="trust_config",
                ) from exc
            extra_hashes.add(digest)
        return cls(
            extra_roots=_load_pem_files(extra_roots),
            replace_bundle=None if replace_bundle is None else _load_pem_files([replace_bundle]),
            own_certificates=_load_pem_files(own_certificates),
            public_roots=_load_pem_files(public_roots),
            distrusted_spki_sha256=KNOWN_INTERCEPTION_SPKI_SHA256 | extra_hashes,
        )


def _load_pem_files(paths: Iterable[str | Path]) -> tuple[x509.Certificate, ...]:
    out: list[x509.Certificate] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read trust file {path}: {exc.strerror or exc}; check the path and its "
                "permissions",
                reason="trust_config",
            ) from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ConfigurationError(
                f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); convert DER "
                "files with: openssl x509 -inform der -in FILE -out FILE.pem",
                reason="trust_config",
            ) from exc
        out.extend(certs)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Trust store freshness


@functools.lru_cache(maxsize=1)
def _certifi_roots() -> tuple[x509.Certificate, ...]:
    with warnings.catch_warnings():
        # A few Mozilla roots have serial number 0 (RFC 5280 §4.1.2.2 wants it positive);
        # cryptography warns about it when parsing. They are still Mozilla's roots.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return tuple(x509.load_pem_x509_certificates(Path(certifi.where()).read_bytes()))


def _certifi_date() -> dt.datetime:
    parts = certifi.__version__.split(".")
    try:
        year, month, day = (int(p) for p in parts[:3])
        return dt.datetime(year, month, day, tzinfo=_UTC)
    except ValueError as exc:
        raise ConfigurationError(
            f"cannot read a date from certifi version {certifi.__version__!r}; "
            "reinstall it: pip install -U certifi",
            reason="trust_store",
        ) from exc


def certifi_bundle_age(now: dt.datetime) -> dt.timedelta:
    """How old certifi's Mozilla root bundle is at ``now`` (from its ``YYYY.MM.DD`` version)."""
    return max(dt.timedelta(0), _utc(now) - _certifi_date())


def trust_store_warning(
    now: dt.datetime, max_age: dt.timedelta = dt.timedelta(days=365)
) -> str | None:
    """A warning for the operator when certifi's bundle is older than ``max_age``, else ``None``.

    Root programs remove and distrust CAs every few months; a stale bundle keeps trusting them.
    """
    age = certifi_bundle_age(now)
    if age <= max_age:
        return None
    return (
        f"the upstream trust store (certifi {certifi.__version__}, Mozilla's roots) is "
        f"{age.days} days old, older than the {max_age.days} days allowed: roots removed or "
        "distrusted since then are still trusted. Upgrade it: pip install -U certifi"
    )


# --------------------------------------------------------------------------------------------
# Host names (RFC 9525)


@functools.lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    # ICANN section only: wildcards under private registries (*.appspot.com) are allowed, as in
    # Chromium's VerifyHostname (matrix N-44). Unknown TLDs count as public suffixes.
    return PublicSuffixList(only_icann=True)


def warm_up() -> None:
    """Load the public suffix list now (~0.3 s), not during the first verification.

    ``serve`` calls it in a thread right after it listens, so that start-up is not held up; an
    embedder may call it before serving.
    """
    _psl()


def _is_public_suffix(name: str) -> bool:
    return bool(_psl().is_public(name))


def _has_public_registry(name: str) -> bool:
    return _psl().publicsuffix(name, accept_unknown=False) is not None


@dataclass(frozen=True, slots=True)
class _Host:
    given: str
    name: str | None  # normalised DNS name, None for IPs and invalid input
    ip: IpAddress | None
    why_invalid: str

    @property
    def text(self) -> str:
        if self.ip is not None:
            return str(self.ip)
        return self.name if self.name is not None else self.given

    @classmethod
    def parse(cls, host: str) -> _Host:
        try:
            normal = normalize_host(host)
        except InvalidHostName as exc:
            return cls(host, None, None, str(exc))
        address: IpAddress | None = None
        if ":" in normal or normal.replace(".", "").isdigit():
            try:
                address = ipaddress.ip_address(normal)
            except ValueError:
                address = None
        if address is not None:
            return cls(host, None, address, "")
        if normal.rsplit(".", 1)[-1].isdigit():
            # WHATWG URL "ends in a number": such a host is an (invalid) IPv4 address, never a
            # DNS name (matrix N-63, N-64).
            return cls(host, None, None, f"{host!r} ends in a number but is not an IP address")
        return cls(host, normal, None, "")

    def subject(self) -> x509.DNSName | x509.IPAddress | None:
        """The subject for cryptography's verifier, or ``None`` when it cannot take one."""
        if self.ip is not None:
            return x509.IPAddress(self.ip)
        if self.name is not None:
            return x509.DNSName(self.name)
        return None


def _names_match(dns_names: Iterable[str], ips: Iterable[IpAddress], host: _Host) -> bool:
    if host.ip is not None:
        # RFC 9525 §6.3: an IP reference identity matches only an iPAddress SAN, by octets.
        return any(ip == host.ip for ip in ips)
    if host.name is None:
        return False
    exact = host.name
    _, dot, rest = exact.partition(".")
    # RFC 9525 §6.3: "*" only as the complete left-most label, matching exactly one label; and
    # never over a public suffix or a single label (CA/B BR §3.2.2.6, Chromium VerifyHostname).
    wildcard = "*." + rest if dot and not _is_public_suffix(rest) else None
    for value in dns_names:
        candidate = value[:-1] if value.endswith(".") else value
        if not candidate.isascii():  # RFC 5280 §7.2: dNSName holds A-labels only (N-83)
            continue
        candidate = candidate.lower()
        if candidate == exact or (wildcard is not None and candidate == wildcard):
            return True
    return False


def names_match_host(
    dns_names: Iterable[str], ip_addresses: Iterable[IpAddress], host: str
) -> bool:
    """Whether a certificate with these SAN entries is valid for ``host`` (RFC 9525).

    ``host`` is normalised first (IDNA 2008, case, one trailing dot). DNS names match only
    dNSName entries, IP literals only iPAddress entries; the subject CN is never consulted.
    Presented names are compared case-insensitively after dropping one trailing dot; anything
    that is not ASCII, or has a ``*`` other than as the whole left-most label, never matches; a
    wildcard matches one label and never directly under a public suffix (ICANN section of the
    PSL, unknown TLDs included) — ``*.appspot.com`` is allowed, as in Chromium.
    """
    return _names_match(dns_names, ip_addresses, _Host.parse(host))


def _san_names(cert: x509.Certificate) -> tuple[list[str], list[IpAddress]] | None:
    """The dNSName and iPAddress SAN entries, or ``None`` when there is no SAN extension."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    ips = [
        ip
        for ip in san.get_values_for_type(x509.IPAddress)
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    ]
    return san.get_values_for_type(x509.DNSName), ips


def certificate_matches_host(cert: x509.Certificate, host: str) -> bool:
    """Whether ``cert``'s subjectAltName covers ``host`` (never its CN); see names_match_host."""
    try:
        names = _san_names(cert)
    except ValueError:
        return False
    if names is None:
        return False
    return _names_match(names[0], names[1], _Host.parse(host))


def _is_non_unique(host: _Host) -> bool:
    """Chromium's IsHostnameNonUnique: a name no public CA can vouch for (BR "Internal Name")."""
    if host.ip is not None:
        return not host.ip.is_global
    if host.name is None:
        return True
    return not _has_public_registry(host.name) or _is_public_suffix(host.name)


# --------------------------------------------------------------------------------------------
# Certificate helpers


def spki_sha256(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo (the key pinning hash)."""
    return hashlib.sha256(
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).digest()


def _safe_spki_sha256(cert: x509.Certificate) -> bytes | None:
    try:
        return spki_sha256(cert)
    except (ValueError, UnsupportedAlgorithm):
        return None


def _serial(cert: x509.Certificate) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return cert.serial_number


def _malformed_reason(cert: x509.Certificate) -> str | None:
    """Why a field of ``cert`` cannot be parsed, or ``None``.

    cryptography parses certificate fields lazily, so a damaged field only raises when read;
    reading them all once here keeps every later check total.
    """
    try:
        _name_der(cert.subject)
        _name_der(cert.issuer)
        cert.subject.rfc4514_string()
        list(cert.extensions)
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_algorithm_oid)
        _serial(cert)
    except (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        return str(exc) or type(exc).__name__
    return None


def _name_der(name: x509.Name) -> bytes:
    return name.public_bytes()


def _describe(cert: x509.Certificate) -> str:
    try:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if cn:
            return f"{cn[0].value!s}"
        text = cert.subject.rfc4514_string()
    except ValueError:
        text = ""
    return text or "(empty subject)"


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime (use datetime.now(timezone.utc))")
    return moment.astimezone(_UTC)


def _key_problem(cert: x509.Certificate) -> str | None:
    """Why the certificate's key breaks CA/B BR §6.1.5, or ``None``."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "its public key uses an algorithm that is not supported"
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if bits < 2048:  # CA/B BR §6.1.5: modulus of at least 2048 bits
            return f"its RSA key has {bits} bits; at least 2048 are required"
        if bits % 8:  # CA/B BR §6.1.5: modulus size divisible by 8
            return f"its RSA key has {bits} bits, not a multiple of 8"
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _PERMITTED_CURVES:  # CA/B BR §6.1.5: P-256, P-384, P-521
            return f"its ECDSA key is on curve {key.curve.name}, not P-256, P-384 or P-521"
        return None
    return f"its {type(key).__name__.removesuffix('PublicKey')} key is not permitted (RSA or ECDSA)"


def _signature_problem(cert: x509.Certificate) -> str | None:
    """Why the certificate's signature algorithm breaks CA/B BR §7.1.3.2, or ``None``."""
    oid = cert.signature_algorithm_oid
    if oid in _MD5_SIGNATURES:
        return "it is signed with MD5"
    if oid in _SHA1_SIGNATURES:
        return "it is signed with SHA-1"
    if oid not in _PERMITTED_SIGNATURES:
        return f"its signature algorithm {oid.dotted_string} is not permitted"
    if oid == SignatureAlgorithmOID.RSASSA_PSS:
        try:
            algorithm = cert.signature_hash_algorithm
        except UnsupportedAlgorithm:
            algorithm = None
        if not isinstance(algorithm, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
            return "its RSASSA-PSS signature does not use SHA-256, SHA-384 or SHA-512"
    return None


def _aki_ski_mismatch(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        aki = child.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return aki.key_identifier is not None and aki.key_identifier != ski.digest


def _validity_window(
    certs: Sequence[x509.Certificate],
) -> tuple[dt.datetime, dt.datetime]:
    start = max(c.not_valid_before_utc for c in certs)
    end = min(c.not_valid_after_utc for c in certs)
    return start, end


def _br_max_validity(not_before: dt.datetime) -> dt.timedelta:
    for since, limit in _BR_MAX_VALIDITY:
        if not_before >= since:
            return limit
    return _BR_MAX_VALIDITY_BEFORE_2026


def _dns_under(name: str, base: str) -> bool:
    base = base.lstrip(".").lower()
    return not base or name == base or name.endswith("." + base)


def _name_constraint_violation(
    constraints: x509.NameConstraints, certs_below: Sequence[x509.Certificate]
) -> str | None:
    """The first SAN below a CA that its nameConstraints forbid (RFC 5280 §4.2.1.10), or None."""
    permitted = list(constraints.permitted_subtrees or ())
    excluded = list(constraints.excluded_subtrees or ())
    if not permitted and not excluded:
        return "its nameConstraints extension is empty"
    permitted_dns = [g.value for g in permitted if isinstance(g, x509.DNSName)]
    permitted_ip = [g.value for g in permitted if isinstance(g, x509.IPAddress)]
    permitted_nets = [n for n in permitted_ip if isinstance(n, _NETWORKS)]
    excluded_dns = [g.value for g in excluded if isinstance(g, x509.DNSName)]
    excluded_nets = [
        g.value
        for g in excluded
        if isinstance(g, x509.IPAddress) and isinstance(g.value, _NETWORKS)
    ]
    for cert in certs_below:
        names = _san_names(cert)
        if names is None:
            continue
        for raw in names[0]:
            name = raw.lower().rstrip(".")
            base = name[2:] if name.startswith("*.") else name
            if permitted_dns and not any(_dns_under(base, c) for c in permitted_dns):
                return f"its nameConstraints do not permit {raw!r}"
            for c in excluded_dns:
                c_base = c.lstrip(".").lower()
                if _dns_under(base, c_base) or (name.startswith("*.") and _dns_under(c_base, base)):
                    return f"its nameConstraints exclude {raw!r}"
        for ip in names[1]:
            same_family = [n for n in permitted_nets if n.version == ip.version]
            if permitted_ip and not any(ip in n for n in same_family):
                return f"its nameConstraints do not permit {ip}"
            if any(n.version == ip.version and ip in n for n in excluded_nets):
                return f"its nameConstraints exclude {ip}"
    return None


# --------------------------------------------------------------------------------------------
# Revocation data


@dataclass(frozen=True, slots=True)
class _Revocation:
    status: Literal["good", "revoked"]
    detail: str
    expires: dt.datetime


def _verify_with_key(
    key: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None
) -> bool:
    if not isinstance(algorithm, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
        return False  # CA/B BR §7.1.3.2: no SHA-1 for new OCSP signatures either
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(algorithm))
        else:
            return False
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


def _ocsp_signed_by_issuer_or_delegate(
    response: ocsp.OCSPResponse, issuer: x509.Certificate, now: dt.datetime
) -> bool:
    # RFC 6960 §4.2.2.2: signed by the issuing CA itself, or by a responder certificate that
    # the CA issued directly with the id-kp-OCSPSigning extended key usage.
    try:
        signature = response.signature
        data = response.tbs_response_bytes
        algorithm = response.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return False
    if _verify_with_key(issuer.public_key(), signature, data, algorithm):
        return True
    for responder in response.certificates[:4]:
        try:
            responder.verify_directly_issued_by(issuer)
            eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        except x509.ExtensionNotFound:
            continue
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            continue
        if not responder.not_valid_before_utc <= now <= responder.not_valid_after_utc:
            continue
        if _verify_with_key(responder.public_key(), signature, data, algorithm):
            return True
    return False


def _evaluate_ocsp(
    der: bytes, leaf: x509.Certificate, issuer: x509.Certificate, now: dt.datetime
) -> _Revocation | None:
    """The leaf's status from an OCSP response, or ``None`` when the response is unusable."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        return None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return None
    try:
        singles = list(response.responses)
    except ValueError:
        return None
    serial = _serial(leaf)
    for single in singles[:64]:
        if single.serial_number != serial:
            continue
        try:
            request = (
                ocsp.OCSPRequestBuilder()
                .add_certificate(leaf, issuer, single.hash_algorithm)
                .build()
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if (
            single.issuer_key_hash != request.issuer_key_hash
            or single.issuer_name_hash != request.issuer_name_hash
        ):
            continue
        if not _ocsp_signed_by_issuer_or_delegate(response, issuer, now):
            return None  # RFC 6960 §3.2: an unauthenticated response is ignored
        this_update = single.this_update_utc
        next_update = single.next_update_utc
        if this_update > now + _CLOCK_SKEW:
            return None  # from the future
        fresh = (
            now <= next_update + _CLOCK_SKEW
            if next_update is not None
            else now - this_update <= _OCSP_MAX_AGE_WITHOUT_NEXT_UPDATE
        )
        expires = next_update or this_update + _OCSP_MAX_AGE_WITHOUT_NEXT_UPDATE
        status = single.certificate_status
        if status == ocsp.OCSPCertStatus.REVOKED:
            revoked_at = single.revocation_time_utc
            reason = single.revocation_reason
            if revoked_at is not None and revoked_at > now + _CLOCK_SKEW:
                return None
            # A revocation is permanent, so a signed "revoked" stays true after nextUpdate;
            # only certificateHold can be lifted, and needs a fresh response.
            if reason == x509.ReasonFlags.certificate_hold and not fresh:
                return None
            when = f" on {_when(revoked_at)}" if revoked_at is not None else ""
            why = f" ({reason.value})" if reason is not None else ""
            return _Revocation(
                "revoked",
                f"the CA's OCSP responder says the certificate was revoked{when}{why}",
                expires,
            )
        if status == ocsp.OCSPCertStatus.GOOD and fresh:
            return _Revocation("good", "", expires)
        return None
    return None


def _evaluate_crl(
    data: bytes, leaf: x509.Certificate, issuer: x509.Certificate, now: dt.datetime
) -> tuple[_Revocation | None, dt.datetime | None]:
    """The leaf's status from a CRL (and the CRL's nextUpdate), or ``(None, None)``."""
    try:
        crl = (
            x509.load_pem_x509_crl(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_crl(data)
        )
    except ValueError:
        return None, None
    try:
        if crl.issuer != issuer.subject:
            return None, None
        algorithm = crl.signature_hash_algorithm
        if not isinstance(algorithm, hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
            return None, None
        if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            return None, None
        for ext in crl.extensions:
            # RFC 5280 §5.2.4/§5.2.5: delta CRLs and partitioned or indirect CRLs do not say
            # anything about a certificate they do not list.
            if ext.oid == ExtensionOID.DELTA_CRL_INDICATOR:
                return None, None
            if isinstance(ext.value, x509.IssuingDistributionPoint):
                idp = ext.value
                if (
                    idp.only_contains_ca_certs
                    or idp.only_contains_attribute_certs
                    or idp.indirect_crl
                    or idp.only_some_reasons
                ):
                    return None, None
            elif ext.critical:
                return None, None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None, None
    last_update = crl.last_update_utc
    next_update = crl.next_update_utc
    if last_update > now + _CLOCK_SKEW:
        return None, None
    entry = crl.get_revoked_certificate_by_serial_number(_serial(leaf))
    if entry is not None and entry.revocation_date_utc <= now + _CLOCK_SKEW:
        return (
            _Revocation(
                "revoked",
                f"the CA's CRL lists the certificate as revoked on "
                f"{_when(entry.revocation_date_utc)}",
                next_update or now,
            ),
            next_update,
        )
    if next_update is None or now > next_update + _CLOCK_SKEW:
        return None, None  # stale: says nothing about revocations since
    return _Revocation("good", "", next_update), next_update


def _parse_fetched_certificates(data: bytes) -> tuple[x509.Certificate, ...]:
    """Certificates from an AIA "CA Issuers" response: DER, PEM or PKCS#7 "certs-only"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        loaders: tuple[Callable[[bytes], list[x509.Certificate]], ...] = (
            lambda d: [x509.load_der_x509_certificate(d)],
            x509.load_pem_x509_certificates,
            pkcs7.load_der_pkcs7_certificates,
            pkcs7.load_pem_pkcs7_certificates,
        )
        for loader in loaders:
            try:
                return tuple(loader(data)[:4])
            except (ValueError, UnsupportedAlgorithm):
                continue
    return ()


def _http_urls(urls: Iterable[str]) -> list[str]:
    # Browsers fetch AIA, OCSP and CRL over plain http only (https would need verification to
    # verify, and the data is signed anyway).
    return [u for u in urls if u[:7].lower() == "http://" and len(u) <= _MAX_URL][:2]


def _aia_urls(cert: x509.Certificate, method: x509.ObjectIdentifier) -> list[str]:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return _http_urls(
        d.access_location.value
        for d in aia
        if d.access_method == method
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
    )


def _crl_urls(cert: x509.Certificate) -> list[str]:
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    urls: list[str] = []
    for point in points:
        if point.crl_issuer or point.reasons or not point.full_name:
            continue  # indirect or partitioned CRLs are not fetched
        urls.extend(
            n.value for n in point.full_name if isinstance(n, x509.UniformResourceIdentifier)
        )
    return _http_urls(urls)


K = TypeVar("K")
V = TypeVar("V")


class _Lru(collections.OrderedDict[K, V]):
    """A dictionary that forgets its least recently used entries beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def lookup(self, key: K) -> V | None:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def store(self, key: K, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


# --------------------------------------------------------------------------------------------
# The verifier


@dataclass(frozen=True, slots=True)
class _Problem:
    error: CertError
    detail: str


@dataclass(frozen=True, slots=True)
class _Anchor:
    cert: x509.Certificate
    spki: bytes | None
    public: bool


_ANCHORED: Final = "anchored"
_UNTRUSTED_ROOT: Final = "untrusted_root"
_SELF_SIGNED_LEAF: Final = "self_signed_leaf"
_INCOMPLETE: Final = "incomplete"
_OWN: Final = "own"
_TOO_DEEP: Final = "too_deep"


@dataclass(frozen=True, slots=True)
class _Path:
    certs: tuple[x509.Certificate, ...]
    end: str
    links: tuple[_Problem, ...]


@dataclass(slots=True)
class _Context:
    """Everything one verification needs, with memos that live as long as it does."""

    leaf: x509.Certificate
    presented: tuple[x509.Certificate, ...]
    host: _Host
    now: dt.datetime
    stapled_ocsp: bytes | None
    spki: dict[x509.Certificate, bytes | None] = dataclasses.field(default_factory=dict)
    ocsp: dict[x509.Certificate, _Revocation | None] = dataclasses.field(default_factory=dict)
    self_signed: dict[x509.Certificate, bool] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Outcome:
    verdict: Verdict
    missing_issuer_of: x509.Certificate | None = None
    issuer: x509.Certificate | None = None


def _sorted(problems: Iterable[_Problem]) -> list[_Problem]:
    return sorted(problems, key=lambda p: _RANK[p.error])


class UpstreamVerifier:
    """Verifies upstream certificate chains the way a browser would, and then some.

    Build one per trust configuration and keep it: the trust store and the public-suffix list
    are loaded here, once. :meth:`verify` is synchronous, pure and fast (about a quarter of a
    millisecond for a valid two-certificate chain on a 2-core machine; see ``benchmarks/``).

    Args:
        trust: what to trust; certifi's Mozilla bundle by default.
        revocation: what to do with revocation data that has to be *fetched* (stapled OCSP is
            always checked): ``"soft-fail"`` (default; unavailable data does not block),
            ``"hard-fail"`` (unavailable data blocks, with :attr:`~tlsmitm.CertError.REVOKED`)
            or ``"off"`` (never fetch).
        max_chain_depth: the most intermediates a path may have.
        public_root_policy: apply the rules browsers apply to publicly trusted roots only
            (maximum validity, non-unique names, CA/B subject profile).
        aia_max_fetches: the most "CA Issuers" downloads for one verification.
        fetch_max_bytes: the largest AIA certificate or OCSP response accepted.
        crl_max_bytes: the largest CRL accepted.
        cache_entries: bound of the AIA (by URL) and OCSP (by certificate) caches; at most 16
            CRLs are cached (by URL).

    Raises:
        ConfigurationError: tlsmitm's own CA is configured as a trust anchor, no anchor is
            left, or an argument is out of range.
    """

    def __init__(
        self,
        trust: TrustConfig | None = None,
        *,
        revocation: RevocationMode = "soft-fail",
        max_chain_depth: int = _DEFAULT_MAX_CHAIN_DEPTH,
        public_root_policy: bool = True,
        aia_max_fetches: int = 3,
        fetch_max_bytes: int = 64 * 1024,
        crl_max_bytes: int = 4 * 1024 * 1024,
        cache_entries: int = 1024,
    ) -> None:
        if revocation not in ("soft-fail", "hard-fail", "off"):
            raise ConfigurationError(
                f"revocation must be 'soft-fail', 'hard-fail' or 'off', not {revocation!r}",
                reason="verifier_config",
            )
        if not 1 <= max_chain_depth <= 16:
            raise ConfigurationError(
                f"max_chain_depth must be between 1 and 16, not {max_chain_depth}",
                reason="verifier_config",
            )
        for name, value in (
            ("aia_max_fetches", aia_max_fetches),
            ("fetch_max_bytes", fetch_max_bytes),
            ("crl_max_bytes", crl_max_bytes),
            ("cache_entries", cache_entries),
        ):
            if value < 0 or (name != "aia_max_fetches" and value == 0):
                raise ConfigurationError(
                    f"{name} must be positive, not {value}", reason="verifier_config"
                )
        self.trust = trust if trust is not None else TrustConfig()
        self.revocation: RevocationMode = revocation
        self.max_chain_depth = max_chain_depth
        self.public_root_policy = public_root_policy
        self._aia_max_fetches = aia_max_fetches
        self._fetch_max_bytes = fetch_max_bytes
        self._crl_max_bytes = crl_max_bytes

        trust = self.trust
        bundle = trust.replace_bundle if trust.replace_bundle is not None else _certifi_roots()
        public = set(trust.public_roots)
        if trust.replace_bundle is None:
            public.update(bundle)
        roots = list(dict.fromkeys((*bundle, *trust.extra_roots, *trust.public_roots)))
        if not roots:
            raise ConfigurationError(
                "the upstream trust store is empty: give TrustConfig.replace_bundle at least "
                "one root, or leave it unset to use certifi's Mozilla bundle",
                reason="trust_config",
            )
        self._own_spki = frozenset(
            s for s in (_safe_spki_sha256(c) for c in trust.own_certificates) if s
        )
        self._own: frozenset[x509.Certificate] = frozenset(trust.own_certificates)
        self._own_by_subject: dict[bytes, list[x509.Certificate]] = {}
        for cert in trust.own_certificates:
            self._own_by_subject.setdefault(_name_der(cert.subject), []).append(cert)
        self._anchors: dict[x509.Certificate, _Anchor] = {}
        self._anchors_by_subject: dict[bytes, list[_Anchor]] = {}
        for root in roots:
            anchor = _Anchor(root, _safe_spki_sha256(root), root in public)
            if root in self._own or (anchor.spki is not None and anchor.spki in self._own_spki):
                raise ConfigurationError(
                    f"tlsmitm's own certificate {_describe(root)!r} is configured as an upstream "
                    "trust anchor; remove it from the extra, public or replacement roots "
                    "(tlsmitm must never trust its own CA upstream)",
                    reason="own_ca_trusted",
                )
            self._anchors[root] = anchor
            self._anchors_by_subject.setdefault(_name_der(root.subject), []).append(anchor)
        self._distrusted = trust.distrusted_spki_sha256
        self._store = Store(roots)  # built once per trust configuration, never per connection

        ee = (
            ExtensionPolicy.webpki_defaults_ee()
            # Browsers do not require an AKI in leaves; nor does RFC 5280 for verification.
            .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
            # The CA/B SAN/subject consistency rule is applied to public roots only (below);
            # cryptography still matches the subject against the SAN.
            .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        )
        ca = ExtensionPolicy.webpki_defaults_ca()
        self._builder = (
            PolicyBuilder()
            .store(self._store)
            .max_chain_depth(max_chain_depth)
            .extension_policies(ca_policy=ca, ee_policy=ee)
        )
        # "Chain only": the same rules without names or EKUs, used to confirm a classification.
        self._chain_ee = (
            ExtensionPolicy.webpki_defaults_ee()
            .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
            .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
            .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
        )
        self._chain_ca = ExtensionPolicy.webpki_defaults_ca().may_be_present(
            x509.ExtendedKeyUsage, Criticality.NON_CRITICAL, None
        )
        self._aia_cache: _Lru[str, tuple[dt.datetime, tuple[x509.Certificate, ...]]] = _Lru(
            cache_entries
        )
        self._ocsp_cache: _Lru[tuple[bytes, int], tuple[dt.datetime, _Revocation | None]] = _Lru(
            cache_entries
        )
        # CRLs can be megabytes: keep only a few (each at most crl_max_bytes).
        self._crl_cache: _Lru[str, tuple[dt.datetime, bytes | None]] = _Lru(min(16, cache_entries))

    @property
    def anchor_count(self) -> int:
        """How many trust anchors the store holds."""
        return len(self._anchors)

    # -- public API ---------------------------------------------------------------------------

    def verify(
        self,
        chain: Sequence[x509.Certificate],
        host: str,
        *,
        now: dt.datetime,
        stapled_ocsp: bytes | None = None,
        extra_intermediates: Sequence[x509.Certificate] = (),
    ) -> Verdict:
        """Verify ``chain`` (leaf first, the rest in any order) for ``host`` at ``now``.

        Args:
            chain: the certificates the server sent.
            host: the host the client asked for (SNI / CONNECT target), in any case, with or
                without a trailing dot, U-labels or A-labels, or an IP literal.
            now: the verification time, timezone-aware.
            stapled_ocsp: the DER OCSP response the server stapled, if any. A valid
                "revoked" answer rejects the chain; unusable or stale responses are ignored.
            extra_intermediates: more candidate intermediates (preloaded or fetched); never
                trusted by themselves.

        Returns:
            The :class:`Verdict`; never raises for any certificate content.
        """
        return self._verify(chain, host, _utc(now), stapled_ocsp, extra_intermediates).verdict

    def verdict_for_host(self, verdict: Verdict, host: str, *, now: dt.datetime) -> Verdict | None:
        """``verdict``, a success for some host, carried over to ``host``; ``None`` if it cannot be.

        A verdict for the same presented chain and stapled response at the same time differs
        between two hosts only in the checks that read the host: the name match (cryptography's
        and tlsmitm's, both of which must accept) and the rules for publicly trusted roots. They
        are run here for ``host``; everything else (the path, signatures, validity, usages,
        revocation, distrust, the own CA) depends on the certificates alone. The caller keys
        its cache by the exact chain and stapled OCSP bytes, and bounds its age; ``now`` is
        the time of this connection (the rules read here do not depend on it).

        ``None`` (verify in full) whenever the two matchers could read ``host`` differently: an
        IP literal, a name outside the plain letters-digits-hyphens syntax, no plain SAN entry
        that matches it by exact or left-most-label wildcard comparison, or a CA in the path
        with name constraints (cryptography might apply them to the requested name).
        """
        leaf = verdict.leaf
        if not verdict.ok or leaf is None:
            return None
        parsed = _Host.parse(host)
        name = parsed.name
        if name is None or not _PLAIN_DNS_NAME.match(name):
            return None
        parent = name.partition(".")[2]
        try:
            names = _san_names(leaf)
            if names is None:
                return None
            plain_match = False
            for value in names[0]:
                if not value.isascii():  # (str.lower maps some non-ASCII letters to ASCII)
                    continue
                presented = value.lower()
                if presented.startswith("*."):
                    pattern = presented[2:]
                    if parent and pattern == parent and _PLAIN_DNS_NAME.match(pattern):
                        plain_match = True
                elif presented == name and _PLAIN_DNS_NAME.match(presented):
                    plain_match = True
            if not plain_match:
                return None
            for ca in verdict.chain[1:]:
                try:
                    ca.extensions.get_extension_for_class(x509.NameConstraints)
                except x509.ExtensionNotFound:
                    continue
                return None
            ctx = _Context(leaf, verdict.chain, parsed, _utc(now), None)
            problems = self._name_problems(ctx)
            if verdict.public_root and self.public_root_policy:
                problems.extend(self._public_root_problems(ctx))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return None
        if problems:
            return None  # the full verification classifies it
        return dataclasses.replace(verdict, host=parsed.text)

    async def verify_with_fetching(
        self,
        chain: Sequence[x509.Certificate],
        host: str,
        *,
        now: dt.datetime,
        fetcher: Fetcher,
        stapled_ocsp: bytes | None = None,
    ) -> Verdict:
        """:meth:`verify`, plus what needs the network, through ``fetcher``.

        * Incomplete chains: the "CA Issuers" URLs of the certificate whose issuer is missing
          are fetched (http only, at most ``aia_max_fetches``, each response at most
          ``fetch_max_bytes``; cached by URL), and verification is repeated with the fetched
          certificates as untrusted intermediates.
        * Revocation (unless ``revocation="off"``): when the chain verifies and no stapled
          response settled it, the leaf's OCSP responder is asked (POST), then its CRL
          distribution point, cached until the data's nextUpdate. "Revoked" always rejects;
          no answer rejects only in ``"hard-fail"`` mode.

        Any exception the fetcher raises counts as a failed fetch (cancellation, a
        ``BaseException``, propagates). The fetcher enforces timeouts.
        """
        now = _utc(now)
        fetched: list[x509.Certificate] = []
        tried: set[str] = set()
        fetches = 0
        outcome = self._verify(chain, host, now, stapled_ocsp, ())
        while (
            not outcome.verdict.ok
            and outcome.missing_issuer_of is not None
            and fetches < self._aia_max_fetches
        ):
            urls = [
                u
                for u in _aia_urls(
                    outcome.missing_issuer_of, AuthorityInformationAccessOID.CA_ISSUERS
                )
                if u not in tried
            ]
            new: list[x509.Certificate] = []
            for url in urls[: self._aia_max_fetches - fetches]:
                tried.add(url)
                fetches += 1
                for cert in await self._fetch_ca_issuers(url, now, fetcher):
                    if cert not in fetched and cert not in new:
                        new.append(cert)
            if not new:
                break
            fetched.extend(new)
            outcome = self._verify(chain, host, now, stapled_ocsp, tuple(fetched))
        verdict = outcome.verdict
        if (
            verdict.ok
            and self.revocation != "off"
            and verdict.revocation == "unchecked"
            and outcome.issuer is not None
            and verdict.leaf is not None
        ):
            verdict = await self._fetched_revocation(
                verdict, outcome.issuer, now, fetcher, tuple(chain)
            )
        return verdict

    # -- verification -------------------------------------------------------------------------

    def _verify(
        self,
        chain: Sequence[x509.Certificate],
        host: str,
        now: dt.datetime,
        stapled_ocsp: bytes | None,
        extra_intermediates: Sequence[x509.Certificate],
    ) -> _Outcome:
        presented = tuple(chain)
        for cert in (*presented, *extra_intermediates):
            if not isinstance(cert, x509.Certificate):
                raise TypeError(
                    f"chain entries must be cryptography x509.Certificate objects, not "
                    f"{type(cert).__name__}"
                )
        parsed_host = _Host.parse(host)
        if not presented:
            return _Outcome(
                Verdict(
                    host=parsed_host.text,
                    ok=False,
                    error=CertError.MALFORMED,
                    detail="the server presented no certificate",
                    chain=(),
                    leaf=None,
                    leaf_sha256=None,
                )
            )
        leaf = presented[0]
        ctx = _Context(leaf, presented, parsed_host, now, stapled_ocsp)
        pool = tuple(
            c
            for c in dict.fromkeys((*presented[1:_MAX_PRESENTED], *extra_intermediates))
            if c != leaf
        )
        try:
            return self._verify_parsed(ctx, pool)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # Defence in depth: some field that cryptography parses lazily still failed.
            return self._failure(
                ctx,
                _Problem(CertError.MALFORMED, f"a certificate of the chain is malformed ({exc})"),
            )

    def _verify_parsed(self, ctx: _Context, pool: tuple[x509.Certificate, ...]) -> _Outcome:
        leaf = ctx.leaf
        parsed_host = ctx.host
        now = ctx.now
        built: list[x509.Certificate] | None = None
        subject = parsed_host.subject()
        if subject is not None:
            try:
                verifier = self._builder.time(now).build_server_verifier(subject)
                built = verifier.verify(leaf, list(pool))
            except Exception:  # any refusal: classified below from the certificates
                built = None
        if built is not None:
            path = _Path(tuple(built), _ANCHORED, ())
            problems = self._path_problems(path, ctx, verified=True)
            if not problems:
                return self._success(ctx, path)
        return self._classify(ctx, pool)

    def _success(self, ctx: _Context, path: _Path) -> _Outcome:
        anchor = self._anchors.get(path.certs[-1])
        issuer = path.certs[1] if len(path.certs) > 1 else None
        revocation: RevocationStatus = "unchecked"
        if issuer is not None and self._stapled(ctx, issuer) is not None:
            revocation = "good"  # "revoked" was a problem, so it cannot be here
        return _Outcome(
            Verdict(
                host=ctx.host.text,
                ok=True,
                error=None,
                detail="",
                chain=path.certs,
                leaf=ctx.leaf,
                leaf_sha256=ctx.leaf.fingerprint(hashes.SHA256()),
                public_root=anchor is not None and anchor.public,
                revocation=revocation,
            ),
            issuer=issuer,
        )

    def _failure(
        self, ctx: _Context, problem: _Problem, missing_issuer_of: x509.Certificate | None = None
    ) -> _Outcome:
        return _Outcome(
            Verdict(
                host=ctx.host.text,
                ok=False,
                error=problem.error,
                detail=problem.detail,
                chain=ctx.presented,
                leaf=ctx.leaf,
                leaf_sha256=ctx.leaf.fingerprint(hashes.SHA256()),
                revocation="revoked" if problem.error is CertError.REVOKED else "unchecked",
            ),
            missing_issuer_of=missing_issuer_of,
        )

    def _classify(self, ctx: _Context, pool: tuple[x509.Certificate, ...]) -> _Outcome:
        broken = _malformed_reason(ctx.leaf)
        if broken is not None:
            return self._failure(
                ctx, _Problem(CertError.MALFORMED, f"the certificate cannot be parsed: {broken}")
            )
        # Certificates that cannot be parsed are of no use to any path: leave them out.
        pool = tuple(c for c in pool if _malformed_reason(c) is None)
        paths = self._candidate_paths(ctx, pool)
        scored: list[tuple[tuple[int, int, int, int], _Path, list[_Problem]]] = []
        for path in paths:
            problems = self._path_problems(path, ctx, verified=False)
            worst = _RANK[problems[0].error] if problems else len(_SEVERITY)
            key = (-worst, len(problems), 0 if path.end == _ANCHORED else 1, len(path.certs))
            scored.append((key, path, problems))
        scored.sort(key=lambda item: item[0])
        _, best, problems = scored[0]
        missing = best.certs[-1] if best.end == _INCOMPLETE else None
        if problems and not problems[0].error.overridable:
            return self._failure(ctx, problems[0], missing)
        if not problems:
            # A path with nothing wrong that the full run refused (or an alternative to a path
            # the post-checks refused): accept it only if cryptography accepts exactly it.
            built = self._restricted_server_run(best, ctx)
            if built is not None:
                path = _Path(tuple(built), _ANCHORED, ())
                if not self._path_problems(path, ctx, verified=True):
                    return self._success(ctx, path)
        confirmed, why = self._confirm(best, problems, ctx)
        if not confirmed:
            return self._failure(
                ctx,
                _Problem(
                    CertError.INVALID_CHAIN,
                    "the chain fails path validation for a reason tlsmitm did not classify"
                    + (f" (cryptography: {why})" if why else ""),
                ),
                missing,
            )
        if problems:
            return self._failure(ctx, problems[0], missing)
        return self._failure(
            ctx,
            _Problem(
                CertError.NAME_MISMATCH,
                f"the path validator found no subjectAltName matching {ctx.host.text!r}",
            ),
        )

    def _restricted_server_run(self, path: _Path, ctx: _Context) -> list[x509.Certificate] | None:
        subject = ctx.host.subject()
        if subject is None or path.end != _ANCHORED:
            return None
        try:
            verifier = (
                PolicyBuilder()
                .store(Store([path.certs[-1]]))
                .time(ctx.now)
                .max_chain_depth(self.max_chain_depth)
                .extension_policies(
                    ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                    ee_policy=ExtensionPolicy.webpki_defaults_ee()
                    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
                    .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None),
                )
                .build_server_verifier(subject)
            )
            return verifier.verify(ctx.leaf, list(path.certs[1:-1]))
        except Exception:  # a refusal: the caller falls back to classification
            return None

    def _confirm(
        self, path: _Path, problems: Sequence[_Problem], ctx: _Context
    ) -> tuple[bool, str]:
        """Whether cryptography accepts ``path`` once its overridable problems are neutralised."""
        errors = {p.error for p in problems}
        certs = path.certs
        if path.end == _ANCHORED:
            store = self._store if certs[-1] in self._anchors else Store([certs[-1]])
            intermediates = list(certs[1:-1])
        elif path.end in (_UNTRUSTED_ROOT, _SELF_SIGNED_LEAF, _INCOMPLETE):
            store = Store([certs[-1]])  # the untrusted top stands in for a trust anchor
            intermediates = list(certs[1:-1])
        else:
            return False, ""
        when = ctx.now
        if errors & _TIME_ERRORS:
            start, end = _validity_window(certs)
            if start > end:
                return False, "no instant at which every certificate in the chain is valid"
            when = start + (end - start) / 2
        try:
            verifier = (
                PolicyBuilder()
                .store(store)
                .time(when)
                .max_chain_depth(self.max_chain_depth)
                .extension_policies(ca_policy=self._chain_ca, ee_policy=self._chain_ee)
                .build_client_verifier()
            )
            verifier.verify(ctx.leaf, intermediates)
        except Exception as exc:  # the message goes to a human, nowhere else
            return False, str(exc)
        return True, ""

    # -- diagnostic path building -------------------------------------------------------------

    def _is_self_signed(self, cert: x509.Certificate, ctx: _Context) -> bool:
        known = ctx.self_signed.get(cert)
        if known is not None:
            return known
        result = False
        if cert.subject == cert.issuer and not _aki_ski_mismatch(cert, cert):
            try:
                cert.verify_directly_issued_by(cert)
                result = True
            except InvalidSignature:
                result = False
            except (ValueError, TypeError, UnsupportedAlgorithm):
                result = True  # self-issued, signature not checkable: treat as a root
        ctx.self_signed[cert] = result
        return result

    def _link_problem(self, child: x509.Certificate, issuer: x509.Certificate) -> _Problem | None:
        weak = _signature_problem(child)
        if weak is not None:
            return _Problem(CertError.WEAK_SIGNATURE, f"certificate {_describe(child)!r}: {weak}")
        try:
            child.verify_directly_issued_by(issuer)
        except InvalidSignature:
            return _Problem(
                CertError.BAD_SIGNATURE,
                f"the signature on {_describe(child)!r} does not verify with the key of "
                f"{_describe(issuer)!r}: the certificate was altered or forged",
            )
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            return _Problem(
                CertError.BAD_SIGNATURE,
                f"the signature on {_describe(child)!r} cannot be verified with the key of "
                f"{_describe(issuer)!r} ({exc})",
            )
        return None

    def _candidate_paths(self, ctx: _Context, pool: tuple[x509.Certificate, ...]) -> list[_Path]:
        by_subject: dict[bytes, list[x509.Certificate]] = {}
        for cert in pool:
            by_subject.setdefault(_name_der(cert.subject), []).append(cert)
        results: list[_Path] = []
        links: dict[tuple[x509.Certificate, x509.Certificate], _Problem | None] = {}
        budget = [_MAX_EXPANSIONS]

        def issuers(cert: x509.Certificate) -> list[x509.Certificate]:
            key = _name_der(cert.issuer)
            found = [a.cert for a in self._anchors_by_subject.get(key, ())]
            found += self._own_by_subject.get(key, [])
            found += by_subject.get(key, [])
            unique = [c for c in dict.fromkeys(found) if c != cert]
            # Like cryptography (and Go): an issuer whose SKI disagrees with the AKI is not
            # the issuer; one that agrees or says nothing is tried.
            return [c for c in unique if not _aki_ski_mismatch(cert, c)]

        def walk(certs: tuple[x509.Certificate, ...], problems: tuple[_Problem, ...]) -> None:
            if len(results) >= _MAX_PATHS:
                return
            top = certs[-1]
            if top in self._anchors:
                results.append(_Path(certs, _ANCHORED, problems))
                return
            if top in self._own:
                results.append(_Path(certs, _OWN, problems))
                return
            if self._is_self_signed(top, ctx):
                end = _SELF_SIGNED_LEAF if len(certs) == 1 else _UNTRUSTED_ROOT
                results.append(_Path(certs, end, problems))
                return
            if len(certs) - 1 > self.max_chain_depth or budget[0] <= 0:
                results.append(_Path(certs, _TOO_DEEP, problems))
                return
            budget[0] -= 1
            candidates = [c for c in issuers(top) if c not in certs]
            if not candidates:
                results.append(_Path(certs, _INCOMPLETE, problems))
                return
            for candidate in candidates:
                if (top, candidate) not in links:
                    links[(top, candidate)] = self._link_problem(top, candidate)
                link = links[(top, candidate)]
                walk((*certs, candidate), (*problems, link) if link else problems)

        walk((ctx.leaf,), ())
        return results

    # -- the per-path rules -------------------------------------------------------------------

    def _spki(self, cert: x509.Certificate, ctx: _Context) -> bytes | None:
        anchor = self._anchors.get(cert)
        if anchor is not None:
            return anchor.spki
        if cert not in ctx.spki:
            ctx.spki[cert] = _safe_spki_sha256(cert)
        return ctx.spki[cert]

    def _stapled(self, ctx: _Context, issuer: x509.Certificate) -> _Revocation | None:
        if ctx.stapled_ocsp is None:
            return None
        if issuer not in ctx.ocsp:
            ctx.ocsp[issuer] = _evaluate_ocsp(ctx.stapled_ocsp, ctx.leaf, issuer, ctx.now)
        return ctx.ocsp[issuer]

    def _path_problems(self, path: _Path, ctx: _Context, *, verified: bool) -> list[_Problem]:
        """Every rule ``path`` breaks, most severe first.

        ``verified`` paths were built by cryptography, so only the checks it lacks are run.
        """
        certs = path.certs
        problems: list[_Problem] = list(path.links)
        anchored = path.end == _ANCHORED
        anchor = self._anchors.get(certs[-1]) if anchored else None
        for index, cert in enumerate(certs):
            spki = self._spki(cert, ctx)
            if (spki is not None and spki in self._own_spki) or cert in self._own:
                problems.append(
                    _Problem(
                        CertError.OWN_CA,
                        f"the chain contains or chains to tlsmitm's own certificate "
                        f"{_describe(cert)!r}: the upstream is tlsmitm itself (a loop) or "
                        "someone holding its key",
                    )
                )
            if spki is not None and spki in self._distrusted:
                problems.append(
                    _Problem(
                        CertError.DISTRUSTED,
                        f"certificate {_describe(cert)!r} has a distrusted key (a known "
                        "interception root whose private key is public)",
                    )
                )
            weak_key = _key_problem(cert)
            if weak_key is not None:
                problems.append(
                    _Problem(CertError.WEAK_KEY, f"certificate {_describe(cert)!r}: {weak_key}")
                )
            if not verified:
                problems.extend(self._structure_problems(certs, index, ctx))
        problems.extend(self._end_problems(path))
        problems.extend(self._name_problems(ctx))
        if anchor is not None and anchor.public and self.public_root_policy:
            problems.extend(self._public_root_problems(ctx))
        if len(certs) > 1 and ctx.stapled_ocsp is not None:
            status = self._stapled(ctx, certs[1])
            if status is not None and status.status == "revoked":
                problems.append(_Problem(CertError.REVOKED, status.detail))
        return _sorted(problems)

    def _structure_problems(
        self, certs: tuple[x509.Certificate, ...], index: int, ctx: _Context
    ) -> list[_Problem]:
        """The rules cryptography applies to one certificate of a path (RFC 5280, CA/B BR).

        Anchors get the same CA rules as intermediates: cryptography applies them to every
        issuer, trusted or not.
        """
        cert = certs[index]
        name = _describe(cert)
        out: list[_Problem] = []
        is_leaf = index == 0
        # RFC 5280 §4.1.2.5: valid from notBefore through notAfter, inclusive.
        if ctx.now > cert.not_valid_after_utc:
            role = "certificate" if is_leaf else "issuing certificate"
            out.append(
                _Problem(
                    CertError.EXPIRED,
                    f"the {role} {name!r} expired on {_when(cert.not_valid_after_utc)}",
                )
            )
        elif ctx.now < cert.not_valid_before_utc:
            role = "certificate" if is_leaf else "issuing certificate"
            out.append(
                _Problem(
                    CertError.NOT_YET_VALID,
                    f"the {role} {name!r} is not valid before {_when(cert.not_valid_before_utc)}",
                )
            )
        if cert.version is not x509.Version.v3:  # CA/B BR §7.1.1
            error = CertError.MALFORMED if is_leaf else CertError.INVALID_CHAIN
            out.append(_Problem(error, f"certificate {name!r} is X.509 v1; only v3 may be used"))
            return out
        serial = _serial(cert)
        if serial < 0 or (serial.bit_length() + 8) // 8 > 21:  # RFC 5280 §4.1.2.2
            out.append(
                _Problem(CertError.MALFORMED, f"certificate {name!r} has an invalid serial number")
            )
        if not cert.issuer.rdns:  # RFC 5280 §4.1.2.4
            out.append(_Problem(CertError.MALFORMED, f"certificate {name!r} has an empty issuer"))
        try:
            extensions = cert.extensions
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
            out.append(
                _Problem(
                    CertError.MALFORMED, f"certificate {name!r} has malformed extensions ({exc})"
                )
            )
            return out
        non_critical = _NON_CRITICAL_EE if is_leaf else _NON_CRITICAL_CA
        for ext in extensions:
            if ext.critical and ext.oid not in _KNOWN_EXTENSIONS:  # RFC 5280 §4.2
                out.append(
                    _Problem(
                        CertError.UNKNOWN_CRITICAL_EXTENSION,
                        f"certificate {name!r} has a critical extension tlsmitm does not "
                        f"understand ({ext.oid.dotted_string})",
                    )
                )
            elif ext.critical and ext.oid in non_critical:
                out.append(
                    _Problem(
                        CertError.MALFORMED,
                        f"certificate {name!r} marks {ext.oid._name} critical, which the "
                        "web PKI profile forbids",
                    )
                )
        if is_leaf:
            out.extend(self._leaf_usage_problems(cert, name))
        else:
            out.extend(self._ca_problems(certs, index, name))
        return out

    def _leaf_usage_problems(self, cert: x509.Certificate, name: str) -> list[_Problem]:
        out: list[_Problem] = []
        extensions = cert.extensions
        try:
            bc = extensions.get_extension_for_class(x509.BasicConstraints).value
            if bc.ca:
                out.append(
                    _Problem(
                        CertError.WRONG_USAGE,
                        f"the server certificate {name!r} is a CA certificate "
                        "(basicConstraints cA=TRUE), not a server certificate",
                    )
                )
        except x509.ExtensionNotFound:
            pass
        try:
            eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            # CA/B BR §7.1.2.7.10: serverAuth must be present; anyExtendedKeyUsage is not enough.
            if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
                out.append(
                    _Problem(
                        CertError.WRONG_USAGE,
                        f"certificate {name!r} is not for TLS servers (extendedKeyUsage lacks "
                        "serverAuth)",
                    )
                )
        except x509.ExtensionNotFound:
            pass
        try:
            ku = extensions.get_extension_for_class(x509.KeyUsage).value
            if ku.key_cert_sign:
                out.append(
                    _Problem(
                        CertError.WRONG_USAGE,
                        f"the server certificate {name!r} asserts keyCertSign",
                    )
                )
        except x509.ExtensionNotFound:
            pass
        try:
            extensions.get_extension_for_class(x509.NameConstraints)
            out.append(
                _Problem(
                    CertError.INVALID_CHAIN,
                    f"the server certificate {name!r} carries nameConstraints",
                )
            )
        except x509.ExtensionNotFound:
            pass
        return out

    def _ca_problems(
        self, certs: tuple[x509.Certificate, ...], index: int, name: str
    ) -> list[_Problem]:
        cert = certs[index]
        extensions = cert.extensions
        out: list[_Problem] = []
        try:
            bc_ext = extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            bc_ext = None
        if bc_ext is None or not bc_ext.value.ca:  # RFC 5280 §4.2.1.9
            out.append(
                _Problem(
                    CertError.INVALID_CHAIN,
                    f"{name!r} issued a certificate but is not a CA "
                    f"({'no basicConstraints' if bc_ext is None else 'basicConstraints cA=FALSE'})",
                )
            )
        else:
            if not bc_ext.critical:  # RFC 5280 §4.2.1.9: MUST be critical in CA certificates
                out.append(
                    _Problem(
                        CertError.INVALID_CHAIN,
                        f"CA certificate {name!r} has a non-critical basicConstraints",
                    )
                )
            limit = bc_ext.value.path_length
            below = index - 1  # intermediates between this CA and the leaf
            if limit is not None and below > limit:
                out.append(
                    _Problem(
                        CertError.INVALID_CHAIN,
                        f"CA certificate {name!r} allows {limit} intermediate(s) below it "
                        f"(pathLenConstraint) but the chain has {below}",
                    )
                )
        try:
            ku = extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.key_cert_sign:  # RFC 5280 §4.2.1.3
                out.append(
                    _Problem(
                        CertError.INVALID_CHAIN,
                        f"CA certificate {name!r} may not sign certificates (keyUsage lacks "
                        "keyCertSign)",
                    )
                )
        except x509.ExtensionNotFound:
            out.append(
                _Problem(
                    CertError.INVALID_CHAIN,
                    f"CA certificate {name!r} has no keyUsage (CA/B BR §7.1.2.10.7)",
                )
            )
        try:
            eku = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if (
                ExtendedKeyUsageOID.SERVER_AUTH not in eku
                and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
            ):
                out.append(
                    _Problem(
                        CertError.WRONG_USAGE,
                        f"CA certificate {name!r} may not issue TLS server certificates "
                        "(extendedKeyUsage lacks serverAuth)",
                    )
                )
        except x509.ExtensionNotFound:
            pass
        try:
            nc = extensions.get_extension_for_class(x509.NameConstraints).value
            below_certs = [
                c
                for i, c in enumerate(certs[:index])
                if i == 0 or c.subject != c.issuer  # RFC 5280 §4.2.1.10: not self-issued
            ]
            violation = _name_constraint_violation(nc, below_certs)
            if violation is not None:
                out.append(
                    _Problem(CertError.INVALID_CHAIN, f"CA certificate {name!r}: {violation}")
                )
        except x509.ExtensionNotFound:
            pass
        return out

    def _end_problems(self, path: _Path) -> list[_Problem]:
        top = _describe(path.certs[-1])
        if path.end == _SELF_SIGNED_LEAF:
            return [
                _Problem(
                    CertError.SELF_SIGNED,
                    f"the certificate {top!r} is self-signed and not trusted",
                )
            ]
        if path.end == _UNTRUSTED_ROOT:
            return [
                _Problem(
                    CertError.UNKNOWN_ISSUER,
                    f"the chain ends at root {top!r}, which is not trusted",
                )
            ]
        if path.end == _INCOMPLETE:
            return [
                _Problem(
                    CertError.INCOMPLETE_CHAIN,
                    f"the issuer of {top!r} "
                    f"({path.certs[-1].issuer.rfc4514_string() or 'empty name'}) was not sent by "
                    "the server and is not a trusted root",
                )
            ]
        if path.end == _TOO_DEEP:
            return [
                _Problem(
                    CertError.INVALID_CHAIN,
                    f"the chain is longer than {self.max_chain_depth} intermediates",
                )
            ]
        return []  # anchored; own-CA ends are reported by the per-certificate rule

    def _name_problems(self, ctx: _Context) -> list[_Problem]:
        host = ctx.host
        if host.name is None and host.ip is None:
            return [
                _Problem(
                    CertError.NAME_MISMATCH,
                    "the requested host is not a valid DNS name or IP address "
                    f"({host.why_invalid})",
                )
            ]
        try:
            names = _san_names(ctx.leaf)
        except ValueError as exc:
            return [
                _Problem(
                    CertError.MALFORMED, f"the certificate's subjectAltName is malformed ({exc})"
                )
            ]
        if names is None:
            # RFC 9525 §6.3 / CA/B BR §7.1.2.7.12: no CN fallback (Chrome 58, matrix CV-29).
            return [
                _Problem(
                    CertError.NAME_MISMATCH,
                    f"the certificate has no subjectAltName, so it names no host (its common "
                    f"name is never used); {host.text!r} does not match",
                )
            ]
        if _names_match(names[0], names[1], host):
            return []
        shown = [*names[0][:5], *(str(ip) for ip in names[1][:5])]
        more = " ..." if len(names[0]) + len(names[1]) > len(shown) else ""
        return [
            _Problem(
                CertError.NAME_MISMATCH,
                f"the certificate is for {', '.join(shown) or 'no DNS name or IP'}{more}, "
                f"not {host.text!r}",
            )
        ]

    def _public_root_problems(self, ctx: _Context) -> list[_Problem]:
        """The rules browsers apply only to publicly trusted roots (matrix CV-35, CV-36, N-85+)."""
        leaf = ctx.leaf
        out: list[_Problem] = []
        not_before = leaf.not_valid_before_utc
        validity = leaf.not_valid_after_utc - not_before
        limit = _br_max_validity(not_before)
        if validity > limit:  # CA/B BR §6.3.2; Chromium HasTooLongValidity
            out.append(
                _Problem(
                    CertError.VALIDITY_TOO_LONG,
                    f"the certificate is valid for {validity.days} days; a publicly trusted "
                    f"certificate issued on {not_before.date()} may be valid for at most "
                    f"{limit.days} days",
                )
            )
        if _is_non_unique(ctx.host):  # Chromium IsHostnameNonUnique; BR "Internal Name"
            out.append(
                _Problem(
                    CertError.NAME_MISMATCH,
                    f"{ctx.host.text!r} is not a unique public name (an internal name or a "
                    "reserved IP address), which no publicly trusted CA may certify",
                )
            )
        try:
            san_ext = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except (x509.ExtensionNotFound, ValueError):
            return out
        empty_subject = not leaf.subject.rdns
        if san_ext.critical != empty_subject:  # CA/B BR §7.1.2.7.12 (matrix N-85)
            out.append(
                _Problem(
                    CertError.MALFORMED,
                    "the subjectAltName must be critical exactly when the subject is empty "
                    f"(it is {'critical' if san_ext.critical else 'not critical'} and the "
                    f"subject is {'empty' if empty_subject else 'not empty'})",
                )
            )
        dns_names = san_ext.value.get_values_for_type(x509.DNSName)
        ips = san_ext.value.get_values_for_type(x509.IPAddress)
        for attribute in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            cn = str(attribute.value)
            try:
                address: IpAddress | None = ipaddress.ip_address(cn)
            except ValueError:
                address = None
            # CA/B BR §7.1.4.3: a CN repeats one SAN value, IPs in canonical text (N-86..N-89).
            good = (str(address) == cn and address in ips) if address else cn in dns_names
            if not good:
                out.append(
                    _Problem(
                        CertError.MALFORMED,
                        f"the subject common name {cn!r} is not one of the certificate's "
                        "subjectAltName values, as CA/B BR §7.1.4.3 requires",
                    )
                )
        return out

    # -- fetching -----------------------------------------------------------------------------

    async def _fetch(
        self, url: str, body: bytes | None, fetcher: Fetcher, limit: int
    ) -> bytes | None:
        try:
            data = await fetcher(url, body)
        except Exception:  # any failure of the injected fetcher is a failed fetch
            return None
        if not isinstance(data, bytes | bytearray) or not data or len(data) > limit:
            return None
        return bytes(data)

    async def _fetch_ca_issuers(
        self, url: str, now: dt.datetime, fetcher: Fetcher
    ) -> tuple[x509.Certificate, ...]:
        cached = self._aia_cache.lookup(url)
        if cached is not None and now < cached[0]:
            return cached[1]
        data = await self._fetch(url, None, fetcher, self._fetch_max_bytes)
        certs = _parse_fetched_certificates(data) if data is not None else ()
        # Fetched certificates are only ever candidate intermediates, never anchors.
        self._aia_cache.store(url, (now + (_AIA_CACHE if certs else _NEGATIVE_CACHE), certs))
        return certs

    async def _fetched_revocation(
        self,
        verdict: Verdict,
        issuer: x509.Certificate,
        now: dt.datetime,
        fetcher: Fetcher,
        presented: tuple[x509.Certificate, ...],
    ) -> Verdict:
        leaf = verdict.leaf
        assert leaf is not None
        status = await self._fetch_ocsp(leaf, issuer, now, fetcher)
        if status is None:
            status = await self._fetch_crl(leaf, issuer, now, fetcher)
        if status is not None and status.status == "revoked":
            return dataclasses.replace(
                verdict,
                ok=False,
                error=CertError.REVOKED,
                detail=status.detail,
                chain=presented,
                revocation="revoked",
            )
        if status is not None:
            return dataclasses.replace(verdict, revocation="good")
        if self.revocation == "hard-fail":
            return dataclasses.replace(
                verdict,
                ok=False,
                error=CertError.REVOKED,
                detail="the certificate's revocation status could not be obtained (no usable "
                "OCSP or CRL answer) and revocation checking is hard-fail",
                chain=presented,
                revocation="unavailable",
            )
        return dataclasses.replace(verdict, revocation="unavailable")

    async def _fetch_ocsp(
        self, leaf: x509.Certificate, issuer: x509.Certificate, now: dt.datetime, fetcher: Fetcher
    ) -> _Revocation | None:
        urls = _aia_urls(leaf, AuthorityInformationAccessOID.OCSP)
        if not urls:
            return None
        try:
            request = (
                ocsp.OCSPRequestBuilder()
                .add_certificate(leaf, issuer, hashes.SHA1())  # noqa: S303 - RFC 6960 CertID
                .build()
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return None
        key = (request.issuer_key_hash, _serial(leaf))
        cached = self._ocsp_cache.lookup(key)
        if cached is not None and now < cached[0]:
            return cached[1]
        body = request.public_bytes(serialization.Encoding.DER)
        result: _Revocation | None = None
        for url in urls:
            data = await self._fetch(url, body, fetcher, self._fetch_max_bytes)
            if data is not None:
                result = _evaluate_ocsp(data, leaf, issuer, now)
                if result is not None:
                    break
        expires = min(result.expires, now + _AIA_CACHE) if result else now + _NEGATIVE_CACHE
        self._ocsp_cache.store(key, (max(expires, now), result))
        return result

    async def _fetch_crl(
        self, leaf: x509.Certificate, issuer: x509.Certificate, now: dt.datetime, fetcher: Fetcher
    ) -> _Revocation | None:
        for url in _crl_urls(leaf):
            cached = self._crl_cache.lookup(url)
            if cached is not None and now < cached[0]:
                if cached[1] is None:
                    continue  # failed recently: do not ask again yet
                status, _ = _evaluate_crl(cached[1], leaf, issuer, now)
            else:
                data = await self._fetch(url, None, fetcher, self._crl_max_bytes)
                status, next_update = (
                    _evaluate_crl(data, leaf, issuer, now) if data is not None else (None, None)
                )
                if data is not None and next_update is not None:
                    self._crl_cache.store(url, (min(next_update, now + _AIA_CACHE), data))
                else:
                    self._crl_cache.store(url, (now + _NEGATIVE_CACHE, None))
            if status is not None:
                return status
        return None
