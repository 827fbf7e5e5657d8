"""CertForge: forged leaf certificates, minted fast, cached safely.

Theory of operation
-------------------

:meth:`CertForge.leaf_for` answers "which certificate do I show the client for this host?".

* **Names.** The requested host always comes first: a dNSName (IDNA 2008 A-labels, via
  :func:`~tlsmitm.normalize_host`) or an iPAddress for an IP literal. For a trusted leaf the
  upstream certificate's DNS and IP SANs are added *only when the caller says the upstream chain
  verified* -- the forge copies names, never trust: a CN-only or otherwise broken upstream never
  gets a SAN-bearing leaf that repairs it (matrix CA-08). The upstream's commonName is never
  read. Mirrored names are capped, deduplicated, limited to full-label wildcards over at least
  two labels, and dropped when the CA's name constraints exclude them.
* **Shape** (RFC 5280 §4.1, accepted by OpenSSL's strict mode and ``cryptography``'s web-PKI
  verifier): v3, a random 128-bit positive serial, CN = host (when it fits in 64 characters;
  otherwise an empty subject and a critical SAN, RFC 5280 §4.2.1.6), SAN non-critical,
  basicConstraints CA:FALSE critical, keyUsage digitalSignature critical, EKU serverAuth,
  SKI and AKI. A fresh key per leaf (P-256 unless configured), never a CA key.
* **Validity.** notBefore an hour in the past; notAfter at most ``lifetime`` later, never past
  the CA/Browser Forum maximum for the issue date (BR §6.3.2), the upstream leaf's notAfter or
  the issuing CA's notAfter. An expired or not-yet-valid upstream yields an equally expired or
  not-yet-valid leaf: the client reaches the same verdict it would have reached directly.
  Error-CA leaves copy the upstream's dates exactly.
* **Speed.** The TBSCertificate is concatenated from pre-encoded DER parts (:mod:`._der`) rather
  than built with ``CertificateBuilder``, whose overhead exceeds the signature's cost. The
  result is parsed back by ``cryptography`` and by pyOpenSSL once, so a cache hit does no work.
* **Cache.** LRU, bounded in entries and bytes; an entry expires when half of its leaf's
  remaining lifetime has passed. The key is (host, SHA-256 of the upstream leaf, whether the
  upstream verified, issuer kind, SHA-256 of the issuing CA certificate) -- never the host
  alone, never a truncated or weak hash (matrix CA-07: Kaspersky's 32-bit MD5 key collided).
  Concurrent misses for one key mint once (single flight); everything is thread-safe.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding
from OpenSSL import crypto

from . import _der
from ._ca import (
    CertificateAuthority,
    IssuerKind,
    PrivateKey,
    _check_key_type,
    _Signer,
    generate_key,
    signature_hash,
)
from ._errors import ConfigurationError
from ._names import ip_address_of, normalize_host, try_normalize_host

__all__ = ["CertForge", "ForgedLeaf", "IssuerKind", "br_max_validity"]

LEAF_BACKDATE = dt.timedelta(hours=1)  # tolerate clients whose clocks run a little slow
_ERROR_CACHE_TTL = dt.timedelta(hours=1)
# Memory a cache entry holds besides the DER and PEM it is sized by: the Python, cryptography and
# OpenSSL objects (an X509 with its cached extensions, two EVP_PKEYs). Measured as process RSS
# growth over 5 000 P-256 leaves: about 12.5 KiB per entry in all.
_ENTRY_OVERHEAD = 11_000
_ONE_SECOND = dt.timedelta(seconds=1)

# CA/Browser Forum Baseline Requirements §6.3.2 (ballot SC-081): the longest validity period of
# a subscriber certificate by issue date. The validity period counts notBefore through notAfter
# inclusive (BR §1.6.1 "Validity Period"), hence the one-second margin where it is applied.
_BR_SCHEDULE = (
    (dt.datetime(2029, 3, 15, tzinfo=dt.UTC), dt.timedelta(days=47)),
    (dt.datetime(2027, 3, 15, tzinfo=dt.UTC), dt.timedelta(days=100)),
    (dt.datetime(2026, 3, 15, tzinfo=dt.UTC), dt.timedelta(days=200)),
)
_BR_BEFORE_2026 = dt.timedelta(days=398)


# Normalising a name costs more than the rest of a cache hit (``ipaddress`` parses every name
# twice); hosts repeat, so remember the recent ones. Invalid names raise and are not cached.
_normalize = functools.lru_cache(maxsize=8192)(normalize_host)


def br_max_validity(issued: dt.datetime) -> dt.timedelta:
    """The CA/B Forum maximum validity period for a certificate issued at ``issued``."""
    for start, limit in _BR_SCHEDULE:
        if issued >= start:
            return limit
    return _BR_BEFORE_2026


# -- pre-encoded DER ----------------------------------------------------------------------------

_VERSION_V3 = _der.context_constructed(0, _der.integer(2))  # RFC 5280 §4.1.2.1
_OID_COMMON_NAME = _der.oid("2.5.4.3")
_OID_SAN = _der.oid("2.5.29.17")


def _extension(oid: str, value: bytes, *, critical: bool) -> bytes:
    # RFC 5280 §4.1: critical BOOLEAN DEFAULT FALSE, so DER omits it when false (X.690 §11.5).
    return _der.sequence(
        _der.oid(oid), *([_der.BOOLEAN_TRUE] if critical else []), _der.octet_string(value)
    )


# RFC 5280 §4.2.1.9: cA FALSE is the default and therefore absent; critical.
_EXT_BASIC_CONSTRAINTS = _extension("2.5.29.19", _der.sequence(), critical=True)
# RFC 5280 §4.2.1.3: digitalSignature (bit 0) only -- ECDHE key exchange signs, it never
# encrypts to the leaf key. DER drops trailing zero bits: one used bit, seven unused.
_EXT_KEY_USAGE = _extension("2.5.29.15", b"\x03\x02\x07\x80", critical=True)
# RFC 5280 §4.2.1.12: id-kp-serverAuth, non-critical (BR §7.1.2.7.10).
_EXT_EKU = _extension("2.5.29.37", _der.sequence(_der.oid("1.3.6.1.5.5.7.3.1")), critical=False)

_EXT_FIXED = _EXT_BASIC_CONSTRAINTS + _EXT_KEY_USAGE + _EXT_EKU

_SIGNATURE_ALGORITHMS = {
    # RFC 5758 §3.2: ECDSA identifiers carry no parameters; RFC 4055 §5: RSA ones carry NULL.
    ("ec", "sha256"): _der.sequence(_der.oid("1.2.840.10045.4.3.2")),
    ("ec", "sha384"): _der.sequence(_der.oid("1.2.840.10045.4.3.3")),
    ("rsa", "sha256"): _der.sequence(_der.oid("1.2.840.113549.1.1.11"), _der.NULL),
    ("rsa", "sha384"): _der.sequence(_der.oid("1.2.840.113549.1.1.12"), _der.NULL),
}


# The SKI extension of a leaf: everything but the 20-byte key identifier at the end.
_EXT_SKI_PREFIX = _extension("2.5.29.14", _der.octet_string(bytes(20)), critical=False)[:-20]


def _general_name(name: str) -> bytes:
    """GeneralName (RFC 5280 §4.2.1.6): [2] dNSName IA5String or [7] iPAddress OCTET STRING.

    ``name`` is normalised: an IPv6 literal has a colon, an IPv4 one only digits and dots (a
    normalised DNS name is never all-numeric), so most names skip the ``ipaddress`` parser.
    """
    if ":" in name or name.replace(".", "").isdigit():
        address = ip_address_of(name)
        if address is not None:
            return _der.context_primitive(7, address.packed)
    return _der.context_primitive(2, name.encode("ascii"))


def _key_identifier(spki: bytes) -> bytes:
    """RFC 5280 §4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING's value."""
    _, start, _ = _der.read_tlv(spki)  # SubjectPublicKeyInfo
    _, _, algorithm_end = _der.read_tlv(spki, start)  # AlgorithmIdentifier
    tag, key_start, key_end = _der.read_tlv(spki, algorithm_end)  # subjectPublicKey
    if tag != 0x03:
        raise ValueError("SubjectPublicKeyInfo without a BIT STRING")
    # SHA-1 here is an identifier, not a security function (RFC 5280 §4.2.1.2).
    return hashlib.sha1(spki[key_start + 1 : key_end], usedforsecurity=False).digest()


def _sign_ecdsa(key: ec.EllipticCurvePrivateKey, scheme: ec.ECDSA, tbs: bytes) -> bytes:
    return key.sign(tbs, scheme)


def _sign_rsa(key: rsa.RSAPrivateKey, digest: hashes.HashAlgorithm, tbs: bytes) -> bytes:
    return key.sign(tbs, rsa_padding.PKCS1v15(), digest)


@dataclass(frozen=True, slots=True)
class _Template:
    """The parts of every leaf an issuing CA signs that do not depend on the leaf."""

    signer: _Signer
    signature_algorithm: bytes
    issuer: bytes
    authority_key_identifier: bytes
    sign: Callable[[bytes], bytes] = field(repr=False)
    ssl_chain: tuple[crypto.X509, ...] = field(repr=False)

    @classmethod
    def for_signer(cls, signer: _Signer) -> _Template:
        key = signer.key
        digest = signature_hash(key)
        family = "ec" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsa"
        algorithm = _SIGNATURE_ALGORITHMS[(family, digest.name)]
        sign: Callable[[bytes], bytes]
        if isinstance(key, ec.EllipticCurvePrivateKey):
            sign = functools.partial(_sign_ecdsa, key, ec.ECDSA(digest))
        else:
            sign = functools.partial(_sign_rsa, key, digest)

        try:
            key_id = signer.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value.digest
        except x509.ExtensionNotFound:
            key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
        # RFC 5280 §4.2.1.1: keyIdentifier [0] matching the issuer's SKI.
        aki = _extension(
            "2.5.29.35", _der.sequence(_der.context_primitive(0, key_id)), critical=False
        )
        return cls(
            signer=signer,
            signature_algorithm=algorithm,
            issuer=signer.certificate.subject.public_bytes(),
            authority_key_identifier=aki,
            sign=sign,
            ssl_chain=tuple(crypto.X509.from_cryptography(c) for c in signer.chain),
        )


# -- the value --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ForgedLeaf:
    """A minted leaf with everything a TLS server needs, ready to use.

    Attributes:
        host: the normalised host it was minted for (its first SAN).
        names: every SAN entry, the host first.
        certificate: the leaf.
        chain: certificates to send after the leaf: ``(intermediate,)`` for a trusted leaf,
            ``()`` for an error-CA leaf (its CA is never sent and never trusted).
        ssl_certificate: the leaf as a pyOpenSSL object.
        ssl_key: the leaf's private key as a pyOpenSSL object.
        ssl_chain: ``chain`` as pyOpenSSL objects.
        private_key: the leaf's private key as a ``cryptography`` object.
        issuer: which CA signed it.
        not_after: the leaf's notAfter.
        fingerprint_sha256: SHA-256 of the leaf's DER.
    """

    host: str
    names: tuple[str, ...]
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    ssl_certificate: crypto.X509 = field(repr=False)
    ssl_key: crypto.PKey = field(repr=False)
    ssl_chain: tuple[crypto.X509, ...] = field(repr=False)
    private_key: PrivateKey = field(repr=False)
    issuer: IssuerKind
    not_after: dt.datetime
    fingerprint_sha256: bytes

    def __post_init__(self) -> None:
        if not self.names or self.names[0] != self.host:
            raise ValueError("a forged leaf's first name is its host")
        if len(self.chain) != len(self.ssl_chain):
            raise ValueError("chain and ssl_chain differ in length")
        if len(self.fingerprint_sha256) != 32:
            raise ValueError("fingerprint_sha256 must be a SHA-256 digest")
        if self.not_after.tzinfo is None:
            raise ValueError("not_after must be timezone-aware")

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a ForgedLeaf holds a private key and cannot be pickled")


@dataclass(slots=True)
class _Entry:
    leaf: ForgedLeaf
    expires: dt.datetime
    size: int


class _Flight:
    """One mint in progress; other threads wanting the same leaf wait for it.

    ``done`` is held by the minting thread until the result is in; a waiter acquires and at
    once releases it (a plain lock costs a tenth of a ``threading.Event``).
    """

    __slots__ = ("done", "error", "leaf")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.leaf: ForgedLeaf | None = None
        self.error: BaseException | None = None

    def wait(self) -> None:
        with self.done:
            pass


_CacheKey = tuple[str, str, bytes, bytes, bool]


class CertForge:
    """Mints and caches leaf certificates signed by a :class:`~tlsmitm.CertificateAuthority`.

    Args:
        ca: the CA whose intermediate (trusted leaves) and error CA (error leaves) sign.
        lifetime: the longest validity of a leaf; capped at the CA/B Forum maximum in force on
            the issue date (BR §6.3.2) whatever is configured.
        key_type: the leaves' key type (``ec256`` by default; ``rsa2048`` is slow to mint).
        max_cache_entries: how many leaves to keep (0 disables the cache).
        max_cache_bytes: an estimate of the memory the cache may use.
        max_mirrored_names: how many upstream SANs a leaf may carry besides the host.

    Raises:
        ConfigurationError: a bad ``lifetime``, ``key_type`` or limit.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        lifetime: dt.timedelta = dt.timedelta(days=30),
        key_type: str = "ec256",
        max_cache_entries: int = 10_000,
        max_cache_bytes: int = 64 << 20,
        max_mirrored_names: int = 20,
    ) -> None:
        if not dt.timedelta(hours=1) <= lifetime <= _BR_BEFORE_2026:
            raise ConfigurationError(
                "the leaf lifetime must be between one hour and 398 days (BR §6.3.2); it is "
                "capped further by the maximum in force on each issue date",
                reason="leaf_lifetime",
            )
        if min(max_cache_entries, max_cache_bytes, max_mirrored_names) < 0:
            raise ConfigurationError("cache and name limits must not be negative", reason="limit")
        self._ca = ca
        self._lifetime = lifetime
        self._key_type = _check_key_type(key_type)
        self._max_entries = max_cache_entries
        self._max_bytes = max_cache_bytes
        self._max_mirrored = max_mirrored_names
        self._lock = threading.Lock()
        self._cache: OrderedDict[_CacheKey, _Entry] = OrderedDict()
        self._flights: dict[_CacheKey, _Flight] = {}
        self._templates: dict[bytes, _Template] = {}
        self._bytes = 0
        self._hits = self._misses = self._mints = self._evictions = self._coalesced = 0

    @property
    def ca(self) -> CertificateAuthority:
        """The CA this forge mints with."""
        return self._ca

    def leaf_for(
        self,
        host: str,
        upstream: x509.Certificate | None = None,
        *,
        issuer: IssuerKind = IssuerKind.TRUSTED,
        upstream_verified: bool = False,
        now: dt.datetime,
    ) -> ForgedLeaf:
        """The leaf to present to a client that asked for ``host``.

        Args:
            host: the requested name (SNI or CONNECT target): DNS name, IDN, or IP literal.
            upstream: the upstream server's leaf, when there is one.
            issuer: ``TRUSTED`` (the intermediate) or ``ERROR`` (the never-trusted error CA).
            upstream_verified: the upstream chain passed verification; only then are its
                names mirrored into a trusted leaf.
            now: the current time (aware).

        Raises:
            InvalidHostName: ``host`` is not a valid host name.
            ConfigurationError: ``name_excluded`` (the CA's name constraints exclude ``host``:
                bypass it instead), ``ca_expired`` (run ``ca rotate``).
        """
        if not isinstance(now, dt.datetime) or now.tzinfo is None:
            raise ValueError("now must be a timezone-aware datetime (UTC)")
        now = now.astimezone(dt.UTC).replace(microsecond=0)
        name = _normalize(host)
        if not isinstance(issuer, IssuerKind):
            raise TypeError("issuer must be an IssuerKind")
        signer = self._ca._signer(issuer)
        mirror = issuer is IssuerKind.ERROR or upstream_verified
        upstream_id = upstream.fingerprint(hashes.SHA256()) if upstream is not None else b""
        key: _CacheKey = (name, issuer.value, signer.fingerprint, upstream_id, mirror)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                if entry.expires > now:
                    self._cache.move_to_end(key)
                    self._hits += 1
                    return entry.leaf
                self._drop(key)
            self._misses += 1
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                self._coalesced += 1
        if not leader:
            flight.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.leaf is not None
            return flight.leaf
        try:
            leaf, size = self._mint(name, upstream, signer, mirror, now)
        except BaseException as exc:
            flight.error = exc
            with self._lock:
                del self._flights[key]
            flight.done.release()
            raise
        flight.leaf = leaf
        with self._lock:
            del self._flights[key]
            self._mints += 1
            self._store(key, leaf, size, now)
        flight.done.release()
        return leaf

    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, mints, evictions, coalesced (waited for another thread's
        mint), entries and bytes (an estimate)."""
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "mints": self._mints,
                "evictions": self._evictions,
                "coalesced": self._coalesced,
                "entries": len(self._cache),
                "bytes": self._bytes,
            }

    def clear(self) -> None:
        """Forget every cached leaf (counters are kept)."""
        with self._lock:
            self._cache.clear()
            self._bytes = 0

    def __repr__(self) -> str:
        return f"<CertForge entries={len(self._cache)} ca={self._ca!r}>"

    # -- internals ---------------------------------------------------------------------------

    def _drop(self, key: _CacheKey) -> None:
        entry = self._cache.pop(key)
        self._bytes -= entry.size

    def _store(self, key: _CacheKey, leaf: ForgedLeaf, size: int, now: dt.datetime) -> None:
        if self._max_entries == 0:
            return
        remaining = leaf.not_after - now
        ttl = remaining / 2 if remaining > dt.timedelta(0) else _ERROR_CACHE_TTL
        if key in self._cache:
            self._drop(key)
        self._cache[key] = _Entry(leaf=leaf, expires=now + ttl, size=size)
        self._bytes += size
        while len(self._cache) > self._max_entries or self._bytes > self._max_bytes:
            oldest = next(iter(self._cache))
            self._drop(oldest)
            self._evictions += 1

    def _template(self, signer: _Signer) -> _Template:
        template = self._templates.get(signer.fingerprint)
        if template is None:
            template = _Template.for_signer(signer)
            with self._lock:
                if len(self._templates) > 16:  # rotations: old intermediates are unused
                    self._templates.clear()
                self._templates[signer.fingerprint] = template
        return template

    def _names(
        self, host: str, upstream: x509.Certificate | None, mirror: bool, trusted: bool
    ) -> list[str]:
        if trusted and self._ca._excludes(host):
            raise ConfigurationError(
                f"{host} is excluded by (or not permitted under) the CA's name constraints, so "
                "no trusted leaf can be minted for it; add a bypass rule for it",
                reason="name_excluded",
            )
        names = [host]
        if upstream is None or not mirror or self._max_mirrored == 0:
            return names
        try:
            san = upstream.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, ValueError):
            return names  # no SAN (CN-only) or unparseable: mirror nothing, never the CN
        seen = {host}
        for general in san:
            if isinstance(general, x509.DNSName):
                candidate = _mirrorable_dns_name(general.value)
            elif isinstance(general, x509.IPAddress) and isinstance(
                general.value, ipaddress.IPv4Address | ipaddress.IPv6Address
            ):
                candidate = str(general.value)
            else:
                continue
            if candidate is None or candidate in seen:
                continue
            if trusted and self._ca._excludes(candidate):
                continue  # one excluded SAN would make clients refuse the whole leaf
            seen.add(candidate)
            names.append(candidate)
            if len(names) > self._max_mirrored:
                break
        return names

    def _validity(
        self,
        signer: _Signer,
        upstream: x509.Certificate | None,
        trusted: bool,
        now: dt.datetime,
    ) -> tuple[dt.datetime, dt.datetime]:
        ca_not_after = signer.certificate.not_valid_after_utc
        if ca_not_after <= now or signer.certificate.not_valid_before_utc > now:
            raise ConfigurationError(
                f"the issuing CA certificate ({signer.certificate.subject.rfc4514_string()}) is "
                f"not valid now (valid {signer.certificate.not_valid_before_utc:%Y-%m-%d} to "
                f"{ca_not_after:%Y-%m-%d}); run: python -m tlsmitm ca rotate",
                reason="ca_expired",
            )
        if not trusted and upstream is not None:
            # The error leaf tells the client the truth about the upstream's dates.
            return upstream.not_valid_before_utc, upstream.not_valid_after_utc
        limit = min(self._lifetime, br_max_validity(now) - _ONE_SECOND)
        not_before = now - LEAF_BACKDATE
        not_after = not_before + limit
        if upstream is not None:
            # Never repair the upstream: its notAfter bounds ours (and so does its notBefore).
            upstream_before = upstream.not_valid_before_utc
            upstream_after = upstream.not_valid_after_utc
            not_before = max(not_before, upstream_before)
            not_after = min(not_before + limit, upstream_after)
            if not_after < not_before:  # expired upstream: an equally expired leaf
                not_after = upstream_after
                not_before = max(upstream_before, upstream_after - limit)
        return not_before, min(not_after, ca_not_after)

    def _mint(
        self,
        host: str,
        upstream: x509.Certificate | None,
        signer: _Signer,
        mirror: bool,
        now: dt.datetime,
    ) -> tuple[ForgedLeaf, int]:
        """A new leaf, and an estimate of the memory a cache entry for it holds."""
        trusted = signer.kind is IssuerKind.TRUSTED
        names = self._names(host, upstream, mirror, trusted)
        not_before, not_after = self._validity(signer, upstream, trusted, now)
        template = self._template(signer)

        key = generate_key(self._key_type)
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        serial = 0
        while not serial:  # RFC 5280 §4.1.2.2: positive; BR §7.1: >= 64 bits of CSPRNG output
            serial = secrets.randbits(128)
        if len(host) <= 64:  # X.520 ub-common-name
            subject = _der.sequence(
                _der.set_of(_der.sequence(_OID_COMMON_NAME, _der.utf8_string(host)))
            )
            san_critical = False
        else:  # RFC 5280 §4.2.1.6: empty subject => SAN critical
            subject = _der.sequence()
            san_critical = True
        san = _der.octet_string(_der.sequence(*[_general_name(n) for n in names]))
        extensions = _der.sequence(
            _EXT_FIXED,
            _der.sequence(_OID_SAN, _der.BOOLEAN_TRUE, san)
            if san_critical
            else _der.sequence(_OID_SAN, san),
            _EXT_SKI_PREFIX + _key_identifier(spki),
            template.authority_key_identifier,
        )
        tbs = _der.sequence(
            _VERSION_V3,
            _der.integer(serial),
            template.signature_algorithm,
            template.issuer,
            _der.sequence(_der.time(not_before), _der.time(not_after)),
            subject,
            spki,
            _der.context_constructed(3, extensions),
        )
        der = _der.sequence(tbs, template.signature_algorithm, _der.bit_string(template.sign(tbs)))
        # OpenSSL 3+ decodes a typed PEM ("EC PRIVATE KEY") without trying every decoder it
        # has, which makes it the fastest way into a pyOpenSSL PKey (about 25 % faster than
        # PKCS #8 DER). The text never leaves this function.
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        leaf = ForgedLeaf(
            host=host,
            names=tuple(names),
            certificate=x509.load_der_x509_certificate(der),
            chain=signer.chain,
            ssl_certificate=crypto.load_certificate(crypto.FILETYPE_ASN1, der),
            ssl_key=crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
            ssl_chain=template.ssl_chain,
            private_key=key,
            issuer=signer.kind,
            not_after=not_after,
            fingerprint_sha256=hashlib.sha256(der).digest(),
        )
        return leaf, len(der) + len(key_pem) + _ENTRY_OVERHEAD


def _mirrorable_dns_name(value: str) -> str | None:
    """An upstream dNSName as it may appear in a forged leaf, or ``None`` to leave it out.

    Only ASCII names (IA5String, RFC 5280 §4.2.1.6), normalised; wildcards only as a whole
    leftmost label over at least two labels (RFC 9525 §6.3; never ``*.com`` or ``*``); names
    that look like IP addresses are not DNS names and are dropped.
    """
    if not value.isascii():
        return None
    wildcard = value.startswith("*.")
    rest = value[2:] if wildcard else value
    if "*" in rest:
        return None
    normalised = try_normalize_host(rest)
    if normalised is None or ip_address_of(normalised) is not None:
        return None
    if wildcard:
        if "." not in normalised:
            return None
        return "*." + normalised
    return normalised
