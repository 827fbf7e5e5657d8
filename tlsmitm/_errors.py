"""One exception tree for tlsmitm, and the stable reason codes for certificate errors.

Errors are split by who is at fault, so that an embedder can decide what to do without parsing
messages:

* :class:`ClientError` -- the downstream client sent something we cannot accept (a malformed
  ClientHello, garbage instead of ``CONNECT``, a TLS alert).
* :class:`UpstreamError` -- the origin server misbehaved or presented a certificate that failed
  verification (:class:`UpstreamCertificateError` carries the :class:`CertError`).
* :class:`ConfigurationError` -- the deployer's setup is wrong (a key file readable by others, a
  corrupted state directory, a malformed rule file).

Foreign exceptions (``OpenSSL.SSL.Error``, ``trio`` errors, ``cryptography`` errors) are mapped
into this tree at exactly one edge each, always with ``raise ... from exc``.
"""

from __future__ import annotations

import enum

__all__ = [
    "CertError",
    "ClientError",
    "ConfigurationError",
    "TlsMitmError",
    "UpstreamCertificateError",
    "UpstreamError",
]


class CertError(enum.Enum):
    """Why an upstream certificate chain was refused.

    The values are stable strings: they appear in logs, decision records, metrics and on error
    pages, and an embedder may store them.

    Overridability follows Firefox's ``CategorizeCertificateError``: time, trust and domain
    errors are errors a user may choose to accept; revocation, broken or weak cryptography and
    malformed chains are not. tlsmitm is stricter than Firefox for weak keys (Firefox lets a
    user accept an inadequate key size; we do not).
    """

    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    NAME_MISMATCH = "name_mismatch"
    UNKNOWN_ISSUER = "unknown_issuer"
    SELF_SIGNED = "self_signed"
    INCOMPLETE_CHAIN = "incomplete_chain"
    VALIDITY_TOO_LONG = "validity_too_long"
    REVOKED = "revoked"
    WEAK_KEY = "weak_key"
    WEAK_SIGNATURE = "weak_signature"
    BAD_SIGNATURE = "bad_signature"
    INVALID_CHAIN = "invalid_chain"
    UNKNOWN_CRITICAL_EXTENSION = "unknown_critical_extension"
    WRONG_USAGE = "wrong_usage"
    DISTRUSTED = "distrusted"
    OWN_CA = "own_ca"
    MALFORMED = "malformed"
    PROTOCOL = "protocol"

    @property
    def overridable(self) -> bool:
        """Whether a user may ever be offered a way past this error.

        Even an overridable error is never overridable for a known HSTS host (RFC 6797 §12.1);
        that part of the decision belongs to :class:`~tlsmitm.ErrorResponder`.
        """
        return self in _OVERRIDABLE


# Firefox's ERROR_TIME, ERROR_DOMAIN and ERROR_TRUST categories (CategorizeCertificateError).
_OVERRIDABLE = frozenset(
    {
        CertError.EXPIRED,
        CertError.NOT_YET_VALID,
        CertError.NAME_MISMATCH,
        CertError.UNKNOWN_ISSUER,
        CertError.SELF_SIGNED,
        CertError.INCOMPLETE_CHAIN,
        CertError.VALIDITY_TOO_LONG,
    }
)


class TlsMitmError(Exception):
    """Root of every exception tlsmitm raises on purpose.

    Attributes:
        reason: a stable, machine-readable code (``"key_permissions"``, ``"malformed_hello"``...).
    """

    reason: str

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class ConfigurationError(TlsMitmError):
    """The deployment is misconfigured; the message says what to change."""


class ClientError(TlsMitmError):
    """The downstream client sent something tlsmitm cannot accept."""


class UpstreamError(TlsMitmError):
    """The upstream server could not be reached or misbehaved."""


class UpstreamCertificateError(UpstreamError):
    """The upstream certificate chain failed verification.

    Attributes:
        error: the classified :class:`CertError`.
        detail: a human-readable explanation (never parsed by tlsmitm itself).
    """

    error: CertError
    detail: str

    def __init__(self, error: CertError, detail: str) -> None:
        super().__init__(f"{error.value}: {detail}", reason=error.value)
        self.error = error
        self.detail = detail
