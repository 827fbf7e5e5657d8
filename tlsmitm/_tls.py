"""The TLS engine: a trio stream over a pyOpenSSL ``Connection`` in memory-BIO mode.

Theory of operation
-------------------

An OpenSSL ``Connection`` created without a socket owns two memory buffers: ciphertext from the
peer goes into the *incoming* BIO (``bio_write``), ciphertext for the peer comes out of the
*outgoing* BIO (``bio_read``). Every OpenSSL operation -- ``do_handshake``, ``recv``, ``send``,
``shutdown`` -- runs to completion against those buffers or raises ``WantReadError`` when it needs
bytes the peer has not sent yet. Writes to a memory BIO always succeed, so "want write" never
happens. :class:`TLSStream` turns that into blocking trio calls with a single driver,
:meth:`TLSStream._retry`:

1. call the OpenSSL operation (never awaiting in between: the ``Connection`` is shared state);
2. take whatever it queued in the outgoing BIO and send it -- *first*, because ciphertext must
   reach the wire in the order OpenSSL produced it (the inner send lock is strictly FIFO);
3. otherwise, if OpenSSL wants bytes, receive once from the transport into the incoming BIO --
   unless another task did so while we waited for the lock, in which case just retry;
4. loop until the operation finished.

A ``send`` that was interrupted by "want read" is retried with exactly the same remaining bytes,
as OpenSSL requires. Because only one refill is ever outstanding and a refill is at most
``max_refill_bytes``, a peer can make us buffer at most one refill of ciphertext: that, plus
encrypting large writes in batches of 256 KiB sent before the next is encrypted, is the
backpressure. A refill is fed to OpenSSL in
32 KiB pieces as it decrypts them (no await in between), so one transport read and one trip
through the scheduler serve several records while the incoming BIO stays small. The records of
one receive are decrypted by ``SSL_read`` straight into one scratch buffer per thread and copied
out once (see :meth:`TLSStream._decrypt_into_scratch`).

Two OpenSSL habits are corrected here:

* A TLS 1.3 server writes its NewSessionTicket messages the moment the handshake completes. If we
  sent them then, a client that is not reading (it has just finished its own handshake and wants
  to write) could deadlock against a transport without buffering. They are held back and sent in
  front of the server's first real write (OpenSSL issues #7948 and #7967; BoringSSL does the same).
* OpenSSL reports an end of the transport the same way whether it fell between two records or in
  the middle of one. :class:`_RecordBoundary` watches the record framing of what we feed in, so
  that an end of stream at a record boundary reads as a clean end (HTTPS servers routinely skip
  ``close_notify``) while a cut inside a record is reported as truncation.

Failures are mapped here, once, into the tlsmitm tree: a server-side stream (the downstream
client is the peer) raises :class:`ClientTLSError`, a client-side stream (upstream is the peer)
raises :class:`UpstreamTLSError`. Both are also :class:`trio.BrokenResourceError`, so generic trio
code sees the usual "stream broken" signal. Any alert the peer sent is in ``.alert``.

Cancellation: cancelling a receive while it waits for the transport leaves the stream usable;
cancelling the handshake, or a send once encryption has started, leaves it broken (some unknown
amount of ciphertext may be on the wire), and every later call raises.
"""

from __future__ import annotations

import enum
import operator
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn, TypeAlias, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto

from ._errors import ClientError, ConfigurationError, TlsMitmError, UpstreamError
from ._names import is_ip_literal, normalize_host

__all__ = [
    "CLOSE_NOTIFY_TIMEOUT",
    "RELAYABLE_ALPN",
    "ClientTLSError",
    "TLSError",
    "TLSStream",
    "UpstreamTLSError",
    "keylog_file_writer",
    "server_connection",
    "server_context",
    "upstream_connection",
    "upstream_context",
]

RELAYABLE_ALPN: Final[tuple[bytes, ...]] = (b"h2", b"http/1.1")
"""ALPN protocols tlsmitm can relay: HTTP/1.1 through h11, HTTP/2 as opaque bytes."""

CLOSE_NOTIFY_TIMEOUT: Final = 2.0
"""Seconds :meth:`TLSStream.aclose` spends trying to deliver ``close_notify`` before giving up."""

_ALERT_FLUSH_TIMEOUT: Final = 1.0  # seconds to deliver our fatal alert after a failure
# Plaintext is encrypted in 64 KiB slices, each slice's ciphertext taken out of the outgoing
# memory BIO at once (so that BIO, which never shrinks, stays small), and up to 256 KiB of it is
# handed to the transport in one write: a quarter of the system calls and scheduler trips.
_SEND_SLICE: Final = 64 * 1024
_SEND_BATCH: Final = 256 * 1024
_DRAIN_SIZE: Final = 2 * _SEND_SLICE  # most ciphertext taken from the outgoing BIO at once
# Ciphertext handed to OpenSSL's incoming memory BIO at once. A refill (up to max_refill_bytes) is
# fed in such pieces as OpenSSL consumes them: a memory BIO never gives back memory it grew to, so
# feeding a whole 128 KiB refill would leave every connection that once received in bulk holding
# about 170 KiB; fed in 32 KiB pieces it holds about 43 KiB, and the refill itself is freed.
_FEED_SLICE: Final = 32 * 1024
_NOTHING: Final = memoryview(b"")  # shared: an empty read-only view
# Plaintext is decrypted by SSL_read straight into a scratch buffer shared by every stream of a
# thread (filled and emptied with no await in between), through the cffi binding pyOpenSSL itself
# uses, then copied out once per receive: no buffer, copy and Python call per 16 KiB record. The
# binding is pyOpenSSL's private API: without it, Connection.recv is used (one record per call).
_SCRATCH_SIZE: Final = 256 * 1024
try:
    from OpenSSL._util import ffi as _FFI
    from OpenSSL._util import lib as _LIB

    _SSL_READ: Any = _LIB.SSL_read
    _RAISE_SSL_ERROR: Any = SSL.Connection._raise_ssl_error
    # How many bytes a memory BIO holds: the outgoing BIO is asked before a bio_read, which
    # raises (a Python exception through pyOpenSSL) when it is empty, as after most receives.
    _BIO_HELD: Any = _LIB.BIO_get_mem_data
    _WANT_READ: Any = _LIB.SSL_ERROR_WANT_READ
    _LIB.SSL_get_error  # noqa: B018 - (fails here, not in a receive, if it is missing)
except (ImportError, AttributeError):  # pragma: no cover - a pyOpenSSL without them
    _FFI, _LIB, _SSL_READ, _RAISE_SSL_ERROR, _BIO_HELD = None, None, None, None, None
    _WANT_READ = None


class _WantsRead:
    """What :meth:`TLSStream._read` returns for OpenSSL's "want read" (cheaper than pyOpenSSL
    raising ``WantReadError``, which :meth:`TLSStream._retry` treats the same)."""


_WANTS_READ: Final = _WantsRead()


try:  # (pyOpenSSL's private binding again; without it, writes stay one record per call)
    _CLEAR_MODE: Any = _LIB.SSL_clear_mode
    _PARTIAL_WRITE: Any = _LIB.SSL_MODE_ENABLE_PARTIAL_WRITE
except AttributeError:  # pragma: no cover - a pyOpenSSL without them
    _CLEAR_MODE, _PARTIAL_WRITE = None, None


_HANDSHAKE_DONE: Final = trio.Event()  # set below: what a stream's finished handshake is
_HANDSHAKE_DONE.set()


class _Scratch(threading.local):
    buffer: Any = None


_scratch = _Scratch()


def _scratch_buffer() -> Any:
    """This thread's decryption buffer (allocated on first use, never shrinks or grows)."""
    buffer = _scratch.buffer
    if buffer is None:
        buffer = _scratch.buffer = _FFI.new("char[]", _SCRATCH_SIZE)
    return buffer


_MAX_PLAINTEXT_RECORD: Final = 2**14  # RFC 8446 §5.1; one SSL_read returns at most one record
_RECORD_HEADER: Final = 5  # RFC 8446 §5.1

# Mozilla "intermediate" server profile (ssl-config.mozilla.org, guidelines 5.7): TLS 1.2 suites,
# ECDHE with AEAD only. Its three DHE-RSA suites are left out: they need a finite-field group
# configured from a file, and every TLS 1.2 client also supports the ECDHE suites.
_SERVER_TLS12_CIPHERS: Final = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# Upstream, the same: forward secrecy and AEAD, as a current browser negotiates with any modern
# server -- no static RSA, CBC, 3DES, RC4, NULL, EXPORT or anonymous suites (matrix TLS-05..09, 15).
_UPSTREAM_TLS12_CIPHERS: Final = _SERVER_TLS12_CIPHERS
_TLS13_SUITES: Final = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# Security level 2 (112-bit: RSA/DH >= 2048, ECC >= 224, no SHA-1 signatures), pinned so that
# neither an OpenSSL build default nor an openssl.cnf can lower it (matrix §A.3).
_SECLEVEL: Final = b":@SECLEVEL=2"

# RFC 8446 §6 and RFC 5246 §7.2 AlertDescription names.
_ALERT_NAMES: Final = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    21: "decryption_failed",
    22: "record_overflow",
    30: "decompression_failure",
    40: "handshake_failure",
    41: "no_certificate",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    60: "export_restriction",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    100: "no_renegotiation",
    109: "missing_extension",
    110: "unsupported_extension",
    111: "certificate_unobtainable",
    112: "unrecognized_name",
    113: "bad_certificate_status_response",
    114: "bad_certificate_hash_value",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
    121: "ech_required",
}
# Alerts that do not explain a failure: the end of a connection, a refused renegotiation.
_BENIGN_ALERTS: Final = frozenset({"close_notify", "user_canceled", "no_renegotiation"})
# An upstream handshake that ends with one of these (sent or received) failed because the server
# insists on a protocol version or cipher suite tlsmitm will not use.
_PROTOCOL_ALERTS: Final = frozenset(
    {"protocol_version", "insufficient_security", "handshake_failure", "inappropriate_fallback"}
)
_PROTOCOL_REASONS: Final = (
    "unsupported protocol",
    "no protocols available",
    "no ciphers available",
    "no shared cipher",
    "wrong cipher returned",
    "unknown cipher returned",
    "unsafe legacy renegotiation disabled",  # RFC 5746 missing (matrix TLS-14)
    "dh key too small",
    "version too low",
)
_CLIENT_CERT_ALERTS: Final = frozenset(
    {"handshake_failure", "certificate_required", "bad_certificate", "access_denied"}
)

_T = TypeVar("_T")

PrivateKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
"""The private key types OpenSSL can use for a server certificate."""


# --------------------------------------------------------------------------------------------
# Errors


class TLSError(TlsMitmError, trio.BrokenResourceError):
    """A TLS failure on one side of an intercepted connection.

    Never raised as such: see :class:`ClientTLSError` and :class:`UpstreamTLSError`.

    Attributes:
        reason: ``tls_handshake``, ``tls_handshake_timeout``, ``tls_protocol`` (upstream only:
            the server insists on a version or cipher suite tlsmitm refuses),
            ``tls_client_certificate`` (upstream only: the server wanted a client certificate),
            ``tls_error`` (an alert or corrupt record after the handshake), ``tls_truncated``
            (the connection ended inside a record), ``connection_lost`` (the transport broke
            after the handshake, or the peer had closed it) or ``tls_broken`` (the stream was
            already broken).
        alert: the name of the alert the peer sent (``"unknown_ca"``, ``"protocol_version"``...),
            or ``None``.
        alert_sent: the name of the alert we sent, or ``None``.
    """

    alert: str | None
    alert_sent: str | None

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        alert: str | None = None,
        alert_sent: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.alert = alert
        self.alert_sent = alert_sent


class ClientTLSError(TLSError, ClientError):
    """TLS with the downstream client failed (the client is at fault, or went away)."""


class UpstreamTLSError(TLSError, UpstreamError):
    """TLS with the upstream server failed (the server is at fault, or went away)."""


# --------------------------------------------------------------------------------------------
# Per-connection state shared with the context callbacks


class _ConnectionState:
    """What the context callbacks learn about one connection (stored as its app data)."""

    __slots__ = (
        "alert_received",
        "alert_sent",
        "alpn",
        "certificate_requested",
        "ocsp_response",
        "server_certificate_seen",
        "server_key_proven",
    )

    def __init__(self, alpn: bytes | None = None) -> None:
        self.alpn = alpn
        self.alert_received: str | None = None
        self.alert_sent: str | None = None
        self.certificate_requested = False
        self.server_certificate_seen = False
        self.server_key_proven = False
        self.ocsp_response: bytes | None = None


def _state_of(connection: SSL.Connection) -> _ConnectionState | None:
    state = connection.get_app_data()
    return state if isinstance(state, _ConnectionState) else None


def _on_info(connection: SSL.Connection, where: int, ret: int) -> None:
    state = _state_of(connection)
    if state is None:
        return
    if where & SSL.SSL_CB_ALERT:
        # SSL_CTX_set_info_callback(3): ret carries the alert level and description.
        name = _ALERT_NAMES.get(ret & 0xFF, f"alert_{ret & 0xFF}")
        if name in _BENIGN_ALERTS:
            return
        if where & SSL.SSL_CB_READ:
            state.alert_received = state.alert_received or name
        else:
            state.alert_sent = state.alert_sent or name
    elif where == SSL.SSL_CB_CONNECT_LOOP:
        # The state names are SSL_state_string_long(3)'s, stable since OpenSSL 1.1.0. OpenSSL
        # announces a state when the next message's header arrives, before processing its body:
        # reaching a state means every earlier message was processed successfully.
        step = connection.get_state_string()
        if step.endswith(b"read server certificate request"):
            state.certificate_requested = True
            # TLS 1.2 order: Certificate, ServerKeyExchange (signed with the certificate's key,
            # RFC 5246 §7.4.3; we only offer ECDHE), CertificateRequest. TLS 1.3 sends the
            # request before the certificate, so there this proves nothing.
            state.server_key_proven = state.server_certificate_seen
        elif step.endswith(b"read server certificate"):
            state.server_certificate_seen = True


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
    # Answer exactly what upstream selected (matrix MIR-03); without that, no ALPN at all, which
    # means HTTP/1.1 -- what upstream speaks when it selected nothing.
    state = _state_of(connection)
    if state is not None and state.alpn is not None and state.alpn in offered:
        return state.alpn
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _record_ocsp(connection: SSL.Connection, response: bytes, _data: object) -> bool:
    # The stapled response is judged by UpstreamVerifier after the handshake, never here.
    state = _state_of(connection)
    if state is not None:
        state.ocsp_response = response or None
    return True


# --------------------------------------------------------------------------------------------
# Contexts and connections


def _harden(context: SSL.Context, tls12_ciphers: bytes) -> None:
    context.set_min_proto_version(SSL.TLS1_2_VERSION)  # matrix TLS-01/02/04
    # RFC 7457 §2.6 (CRIME): no compression. No renegotiation in either direction (matrix TLS-14;
    # RFC 9113 §9.2.1 forbids it under HTTP/2 anyway). OpenSSL 3 leaves OP_LEGACY_SERVER_CONNECT
    # off, so servers without RFC 5746 are refused.
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    # Idle connections give their 16 KiB record buffers back (two per direction per TLS
    # session): what a proxy holding thousands of keep-alive connections needs.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(tls12_ciphers + _SECLEVEL)
    context.set_tls13_ciphersuites(_TLS13_SUITES)
    context.set_info_callback(_on_info)


def _keylog_adapter(keylog: Callable[[bytes], None]) -> Callable[[SSL.Connection, bytes], None]:
    def write(_connection: SSL.Connection, line: bytes) -> None:
        keylog(line)

    return write


def _as_cryptography(certificate: x509.Certificate | crypto.X509) -> x509.Certificate:
    if isinstance(certificate, crypto.X509):
        return certificate.to_cryptography()
    return certificate


def server_context(
    extra_chain: Sequence[x509.Certificate | crypto.X509] = (),
    *,
    keylog: Callable[[bytes], None] | None = None,
) -> SSL.Context:
    """The context for client-facing (downstream) handshakes; build one per issuing chain.

    Mozilla's "intermediate" profile: TLS 1.2 minimum, TLS 1.3 preferred (OpenSSL always picks
    the highest common version), ECDHE + AEAD suites, no compression, no renegotiation. The leaf
    and its key are set per connection by :func:`server_connection`; the chain above the leaf is
    shared by every connection of this context, so the normal CA and the error CA each get one.

    Args:
        extra_chain: the certificates sent after the leaf (the issuing intermediate), leaf's
            issuer first.
        keylog: called with each NSS key-log line (``SSLKEYLOGFILE`` format), for debugging only;
            see :func:`keylog_file_writer`.

    Returns:
        A context; configure nothing on it after the first connection (pyOpenSSL forbids it).
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    _harden(context, _SERVER_TLS12_CIPHERS)
    context.set_alpn_select_callback(_select_alpn)  # type: ignore[arg-type]
    for certificate in extra_chain:
        context.add_extra_chain_cert(_as_cryptography(certificate))
    if keylog is not None:
        context.set_keylog_callback(_keylog_adapter(keylog))
    return context


def server_connection(
    context: SSL.Context,
    certificate: x509.Certificate | crypto.X509,
    key: PrivateKey | crypto.PKey,
    *,
    alpn: bytes | None,
) -> SSL.Connection:
    """A server-side connection presenting ``certificate`` (the forged leaf) and its ``key``.

    Pass pyOpenSSL ``X509``/``PKey`` objects converted once and cached (``X509.from_cryptography``,
    ``PKey.from_cryptography_key``): installing them costs about 0.02 ms, while cryptography
    objects are re-encoded by pyOpenSSL on every call (about 0.16 ms).

    Args:
        context: from :func:`server_context`.
        certificate: the leaf.
        key: the leaf's private key.
        alpn: the protocol upstream selected; the client gets exactly that, or no ALPN at all
            when it is ``None`` or the client did not offer it.

    Raises:
        ConfigurationError: the key does not belong to the certificate.
    """
    connection = SSL.Connection(context, None)
    connection.set_app_data(_ConnectionState(alpn))
    try:
        if isinstance(certificate, crypto.X509) or isinstance(key, crypto.PKey):
            # pyOpenSSL deprecates its own types here, but they are the fast path (see above).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                connection.use_certificate(certificate)
                connection.use_privatekey(key)
        else:
            connection.use_certificate(certificate)
            connection.use_privatekey(key)
    except SSL.Error as exc:
        raise ConfigurationError(
            f"the private key does not match the certificate ({_openssl_reasons(exc)}); "
            "pass the key the certificate was issued for",
            reason="key_mismatch",
        ) from exc
    connection.set_accept_state()
    return connection


def upstream_context(*, keylog: Callable[[bytes], None] | None = None) -> SSL.Context:
    """The context for upstream handshakes; build it once and share it.

    TLS 1.2 minimum and never a fallback to anything older (matrix TLS-01/02/04/16), ECDHE + AEAD
    suites only, no compression, no renegotiation, OCSP stapling requested per connection.
    Certificates are *not* verified during the handshake (``VERIFY_NONE``): the presented chain is
    judged afterwards by :class:`~tlsmitm.UpstreamVerifier`, which classifies what is wrong.

    Args:
        keylog: called with each NSS key-log line, for debugging only.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    _harden(context, _UPSTREAM_TLS12_CIPHERS)
    context.set_verify(SSL.VERIFY_NONE)
    context.set_ocsp_client_callback(_record_ocsp)
    if keylog is not None:
        context.set_keylog_callback(_keylog_adapter(keylog))
    return context


def upstream_connection(
    context: SSL.Context,
    *,
    server_name: str | None,
    alpn_offer: Sequence[bytes] = (),
    session: SSL.Session | None = None,
) -> SSL.Connection:
    """A client-side connection to an upstream server.

    Args:
        context: from :func:`upstream_context`.
        server_name: the host; sent as SNI after normalisation, except for IP literals
            (RFC 6066 §3: "Literal IPv4 and IPv6 addresses are not permitted in HostName").
        alpn_offer: the client's ALPN offer; only :data:`RELAYABLE_ALPN` protocols are passed on,
            in the client's order.
        session: a session from an earlier connection to the same host (same context), from
            :meth:`TLSStream.session`, to resume it. OpenSSL only resumes sessions of connections
            that were closed with ``close_notify``: close that stream with
            :meth:`TLSStream.aclose` (also fine when cancelled, as by ``aclose_forcefully``).

    Raises:
        InvalidHostName: ``server_name`` is not a valid host name.
    """
    connection = SSL.Connection(context, None)
    connection.set_app_data(_ConnectionState())
    if server_name is not None:
        host = normalize_host(server_name)
        if not is_ip_literal(host):
            connection.set_tlsext_host_name(host.encode("ascii"))
    offer = list(dict.fromkeys(p for p in alpn_offer if p in RELAYABLE_ALPN))
    if offer:
        connection.set_alpn_protos(offer)
    connection.request_ocsp()  # RFC 6066 §8 status_request
    if session is not None:
        connection.set_session(session)
    connection.set_connect_state()
    return connection


def keylog_file_writer(path: Path | str) -> Callable[[bytes], None]:
    """A key-log callback appending NSS key-log lines to ``path`` (what ``SSLKEYLOGFILE`` does).

    For debugging only: whoever reads the file can decrypt the captured traffic. The file is
    created with mode 0600; each line is appended with a short blocking write.
    """
    target = os.fspath(path)

    def write(line: bytes) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line + b"\n")
        finally:
            os.close(fd)

    return write


def _openssl_reasons(exc: SSL.Error) -> str:
    """The OpenSSL reason strings of ``exc`` (pyOpenSSL puts (lib, func, reason) tuples in args)."""
    reasons = [
        str(entry[2])
        for entry in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])
        if isinstance(entry, tuple) and len(entry) == 3
    ]
    return "; ".join(reasons) or (str(exc) or type(exc).__name__)


# --------------------------------------------------------------------------------------------
# The stream


class _Status(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raise :class:`trio.BusyResourceError` when two tasks use one direction at once."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._held = False


class _RecordBoundary:
    """Follows TLS record framing (RFC 8446 §5.1) over the ciphertext fed to OpenSSL."""

    __slots__ = ("_header", "_remaining")

    def __init__(self) -> None:
        self._header = b""
        self._remaining = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        end = len(data)
        header = self._header
        if header:  # a header cut across two feeds: complete it first
            taken = bytes(data[: _RECORD_HEADER - len(header)])
            header += taken
            if len(header) < _RECORD_HEADER:
                self._header = header
                return
            self._header = b""
            position = len(taken) + int.from_bytes(header[3:5], "big")
        else:
            position = self._remaining  # the rest of the record under way
        # Whole headers in ``data``: jump from one to the next (two indexings, no slices).
        while position + _RECORD_HEADER <= end:
            position += _RECORD_HEADER + (data[position + 3] << 8 | data[position + 4])
        if position >= end:
            self._remaining = position - end
        else:  # a header starts here and ends in the next feed
            self._remaining = 0
            self._header = bytes(data[position:end])

    @property
    def at_boundary(self) -> bool:
        return not self._header and not self._remaining


def release_bio_buffers(connection: SSL.Connection) -> bool:
    """Give a memory-BIO ``connection`` two new, empty BIOs; the old ones and their buffers go.

    A memory BIO keeps the largest buffer it ever held until it is freed, so a connection
    idling after its handshake would keep the size of its handshake flights (the ClientHello
    with its key shares, the certificate chain: 5-6 KiB per intercepted connection for its two
    TLS sessions). ``SSL_MODE_RELEASE_BUFFERS`` covers OpenSSL's record buffers, not these.
    Only done when both BIOs are empty, so no byte is lost or reordered.

    Returns:
        Whether they were replaced (``False``: not memory-BIO mode, a BIO holds data, or
        pyOpenSSL's internals are not the ones this was written for).
    """
    into = getattr(connection, "_into_ssl", None)
    out = getattr(connection, "_from_ssl", None)
    ssl = getattr(connection, "_ssl", None)
    if into is None or out is None or ssl is None or _FFI is None:
        return False
    if _LIB.BIO_get_mem_data(into, _FFI.NULL) or _LIB.BIO_get_mem_data(out, _FFI.NULL):
        return False
    fresh_into = _LIB.BIO_new(_LIB.BIO_s_mem())
    fresh_out = _LIB.BIO_new(_LIB.BIO_s_mem())
    if fresh_into == _FFI.NULL or fresh_out == _FFI.NULL:
        for bio in (fresh_into, fresh_out):
            if bio != _FFI.NULL:
                _LIB.BIO_free(bio)
        return False
    # Both changed, so SSL_set_bio frees the old pair (SSL_set0_rbio/SSL_set0_wbio), and the
    # record layers are pointed at the new ones. pyOpenSSL reads and writes through these two.
    _LIB.SSL_set_bio(ssl, fresh_into, fresh_out)
    connection._into_ssl = fresh_into
    connection._from_ssl = fresh_out
    return True


class _TransportLock:
    """A fair FIFO lock on one direction of the transport, free in the usual uncontended case.

    ``trio.Lock`` yields to the scheduler on every acquire, and its acquire and release look up
    the current task; taking this lock when it is free and nobody waits is two attribute
    writes. The transport operation that always follows the lock is the checkpoint. A waiter
    parks in FIFO order and :meth:`release` hands the lock over to it directly (still held),
    so a later arrival cannot overtake it (wire order = OpenSSL order).
    """

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def acquire(self) -> None:
        """Take the lock: at once when it is free and nobody waits, else in turn."""
        if self._held or self._waiters:
            await self._waiters.park()  # woken by release(), which hands the lock over
        else:
            self._held = True

    def release(self) -> None:
        """Hand the lock to the longest waiter, or free it."""
        if self._waiters:
            self._waiters.unpark()
        else:
            self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *_exc: object) -> None:
        self.release()


def _queued_output() -> None:
    """An OpenSSL "operation" that only lets :meth:`TLSStream._retry` send what is queued."""


class _PendingWrite:
    """Plaintext being encrypted; ``offset`` survives a "want read" so the retry is exact."""

    __slots__ = ("drained", "offset", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.offset = 0
        self.drained = 0  # offset up to which the ciphertext was taken from the BIO


class TLSStream(trio.abc.HalfCloseableStream):
    """TLS over any trio stream, driven by a pyOpenSSL ``Connection`` in memory-BIO mode.

    Behaves like :class:`trio.SSLStream` in ``https_compatible`` mode for reading (an end of the
    transport at a record boundary reads as ``b""``) but always sends ``close_notify`` on a
    graceful close, and maps failures into :class:`ClientTLSError` / :class:`UpstreamTLSError`.

    Args:
        transport_stream: the stream carrying ciphertext.
        connection: from :func:`server_connection` or :func:`upstream_connection` (any
            memory-BIO ``Connection`` works, with less failure detail).
        server_side: ``True`` when the peer is the downstream client.
        initial_data: ciphertext already read from the transport (the peeked ClientHello); it is
            processed before anything else is received.
        max_refill_bytes: most ciphertext read from the transport at once.
        handshake_timeout: seconds the handshake may take; ``None`` leaves it to the caller.

    Attributes:
        transport_stream: the underlying stream.
        connection: the pyOpenSSL connection.
        server_side: as given.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        connection: SSL.Connection,
        *,
        server_side: bool,
        initial_data: bytes = b"",
        max_refill_bytes: int = 128 * 1024,
        handshake_timeout: float | None = None,
    ) -> None:
        if max_refill_bytes < 1:
            raise ValueError("max_refill_bytes must be at least 1")
        self.transport_stream = transport_stream
        self.connection = connection
        self.server_side = server_side
        self._info = _state_of(connection)
        if self._info is None and connection.get_app_data() is None:
            self._info = _ConnectionState()
            connection.set_app_data(self._info)
        self._max_refill = max_refill_bytes
        self._handshake_timeout = handshake_timeout
        self._status = _Status.OK
        self._failure: TLSError | None = None
        self._records = _RecordBoundary()
        self._transport_eof = False
        self._unfed = _NOTHING  # received ciphertext not yet given to OpenSSL
        self._received_close = False
        self._sent_close = False
        self._deferred: SSL.Error | None = None
        self._delayed_outgoing = b""
        # Ciphertext taken from the BIO, not yet sent; a list only while a large write runs
        # (an idle connection holds nothing of its own here).
        self._encrypted: list[bytes] | None = None
        self._handshake_started = False
        self._handshake_done = trio.Event()
        self._handshake_ok = False
        # Set when the handshake ends: the next wait for the transport releases the BIOs'
        # buffers, which the handshake flights grew (:func:`release_bio_buffers`).
        self._release_bios = False
        self._inner_send_lock = _TransportLock()
        self._inner_recv_lock = _TransportLock()
        self._inner_recv_count = 0
        self._outer_send = _ConflictDetector("another task is sending on this TLSStream")
        self._outer_recv = _ConflictDetector("another task is receiving on this TLSStream")
        # pyOpenSSL sets SSL_MODE_ENABLE_PARTIAL_WRITE, with which SSL_write returns after each
        # 16 KiB record. Writes to a memory BIO never block, so a write without it encrypts a
        # whole slice in one call (four records, one trip through pyOpenSSL instead of four); a
        # "want read" before the end is retried with the same bytes, as OpenSSL requires.
        ssl = getattr(connection, "_ssl", None)
        if _CLEAR_MODE is not None and ssl is not None:
            _CLEAR_MODE(ssl, _PARTIAL_WRITE)
        if initial_data:
            connection.bio_write(initial_data)
            self._records.feed(initial_data)

    # -- errors ----------------------------------------------------------------------------

    @property
    def _peer(self) -> str:
        return "client" if self.server_side else "upstream server"

    def _error(self, message: str, *, reason: str) -> TLSError:
        cls = ClientTLSError if self.server_side else UpstreamTLSError
        info = self._info
        return cls(
            message,
            reason=reason,
            alert=info.alert_received if info else None,
            alert_sent=info.alert_sent if info else None,
        )

    def _classify(self, exc: SSL.Error, *, handshake: bool) -> TLSError:
        info = self._info
        received = info.alert_received if info else None
        sent = info.alert_sent if info else None
        if isinstance(exc, SSL.SysCallError):
            detail = f"the {self._peer} closed the connection"
        else:
            detail = _openssl_reasons(exc)
        if received:
            detail += f" (the {self._peer} sent the alert {received})"
        elif sent:
            detail += f" (we sent the alert {sent})"
        if not handshake and self._transport_eof:
            # E.g. a write after the peer closed without close_notify: OpenSSL calls it an error.
            message = f"the {self._peer} closed the connection"
            return self._error(message, reason="connection_lost")
        if not handshake:
            return self._error(f"TLS error with the {self._peer}: {detail}", reason="tls_error")
        reason = "tls_handshake"
        hint = ""
        if not self.server_side:
            openssl = "" if isinstance(exc, SSL.SysCallError) else _openssl_reasons(exc)
            if info is not None and info.certificate_requested and received in _CLIENT_CERT_ALERTS:
                reason = "tls_client_certificate"
                hint = "; the server requires a client certificate, so bypass it instead"
            elif (
                received in _PROTOCOL_ALERTS
                or sent in _PROTOCOL_ALERTS
                or any(r in openssl for r in _PROTOCOL_REASONS)
            ):
                reason = "tls_protocol"
                hint = (
                    "; the server insists on a protocol version or cipher suite below tlsmitm's "
                    "floor (TLS 1.2 with ECDHE and AEAD), and tlsmitm never falls back"
                )
        return self._error(
            f"TLS handshake with the {self._peer} failed: {detail}{hint}", reason=reason
        )

    def _mark_broken(self) -> None:
        if self._status is _Status.OK:  # a concurrent aclose() wins: CLOSED stays CLOSED
            self._status = _Status.BROKEN

    def _break(self, error: TLSError) -> TLSError:
        self._mark_broken()
        self._failure = self._failure or error
        return error

    def _check_status(self) -> None:
        if self._status is _Status.OK:
            return
        if self._status is _Status.CLOSED:
            raise trio.ClosedResourceError("this TLSStream was closed")
        failure = self._failure
        if failure is None:
            raise self._error(
                f"the TLS stream with the {self._peer} is broken: an earlier operation was "
                "cancelled or failed part-way",
                reason="tls_broken",
            )
        raise type(failure)(
            f"the TLS stream is broken: {failure}",
            reason=failure.reason,
            alert=failure.alert,
            alert_sent=failure.alert_sent,
        ) from failure

    async def _fail(self, exc: SSL.Error, *, handshake: bool) -> NoReturn:
        """Record the failure, try briefly to deliver OpenSSL's fatal alert, and raise."""
        error = self._break(self._classify(exc, handshake=handshake))
        alert = self._delayed_outgoing + self._drain_outgoing()
        self._delayed_outgoing = b""
        if alert:
            # The peer deserves to learn why (e.g. protocol_version), but never wait long.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + _ALERT_FLUSH_TIMEOUT
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    async with self._inner_send_lock:
                        await self.transport_stream.send_all(alert)
        raise error from exc

    def _transport_broken(self, exc: BaseException, *, handshake: bool) -> TLSError:
        if handshake:
            message = f"TLS handshake with the {self._peer} failed: the connection broke ({exc})"
            return self._break(self._error(message, reason="tls_handshake"))
        message = f"the connection to the {self._peer} broke: {exc}"
        return self._break(self._error(message, reason="connection_lost"))

    # -- the driver ------------------------------------------------------------------------

    def _drain_outgoing(self) -> bytes:
        chunks, self._encrypted = self._encrypted or [], None
        if not chunks and _BIO_HELD is not None:
            # (read each time: release_bio_buffers may have replaced the BIO)
            out = getattr(self.connection, "_from_ssl", None)
            if out is not None and not _BIO_HELD(out, _FFI.NULL):
                return b""  # nothing queued: no bio_read and its WantReadError
        while True:
            try:
                chunk = self.connection.bio_read(_DRAIN_SIZE)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _DRAIN_SIZE:
                # A memory BIO hands out everything it holds up to the size asked: it is empty
                # now, and asking again would only raise (an exception per send saved).
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _feed(self) -> None:
        """Give OpenSSL the next piece of the refill (call only while ``_unfed`` holds some)."""
        unfed = self._unfed
        piece = unfed[:_FEED_SLICE]
        self.connection.bio_write(piece)
        self._records.feed(piece)
        self._unfed = unfed[_FEED_SLICE:] if len(unfed) > _FEED_SLICE else _NOTHING

    async def _retry(
        self,
        fn: Callable[..., _T],
        *args: object,
        ignore_want_read: bool = False,
        is_handshake: bool = False,
    ) -> _T | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        result: _T | None = None
        while True:
            want_read = False
            try:
                result = fn(*args)
                if result is _WANTS_READ:  # (a receive's "want read", not raised: see _read)
                    result, want_read = None, not ignore_want_read
            except SSL.WantReadError:
                want_read = not ignore_want_read
            except SSL.Error as exc:
                await self._fail(exc, handshake=is_handshake)
            except TLSError as exc:
                raise self._break(exc) from None
            finished = not want_read
            to_send = self._drain_outgoing()
            if (
                is_handshake
                and finished
                and self.server_side
                and self.connection.get_protocol_version_name() == "TLSv1.3"
            ):
                self._delayed_outgoing += to_send  # session tickets: see the module docstring
                to_send = b""
            if to_send:
                # Strictly FIFO: wire order = OpenSSL order.
                await self._inner_send_lock.acquire()
                try:
                    yielded = True
                    if self._delayed_outgoing:
                        to_send = self._delayed_outgoing + to_send
                        self._delayed_outgoing = b""
                    try:
                        await self.transport_stream.send_all(to_send)
                    except trio.BrokenResourceError as exc:
                        raise self._transport_broken(exc, handshake=is_handshake) from exc
                    except BaseException:
                        # An unknown part of the ciphertext is on the wire: nothing can follow.
                        self._mark_broken()
                        raise
                finally:
                    self._inner_send_lock.release()
            elif want_read and self._unfed:
                self._feed()  # more of the last refill: no transport read needed
                continue
            elif want_read:
                seen = self._inner_recv_count
                await self._inner_recv_lock.acquire()
                try:
                    yielded = True
                    if seen == self._inner_recv_count:  # nobody refilled while we waited
                        if self._release_bios:
                            # (OpenSSL took all the ciphertext and everything out was sent)
                            self._release_bios = False
                            release_bio_buffers(self.connection)
                        try:
                            data = await self.transport_stream.receive_some(self._max_refill)
                        except trio.BrokenResourceError as exc:
                            raise self._transport_broken(exc, handshake=is_handshake) from exc
                        if len(data) > _FEED_SLICE:
                            self._unfed = memoryview(data)
                            self._feed()
                        elif data:  # (the usual small refill: fed whole, no view)
                            self.connection.bio_write(data)
                            self._records.feed(data)
                        else:
                            self.connection.bio_shutdown()
                            self._transport_eof = True
                        self._inner_recv_count += 1
                finally:
                    self._inner_recv_lock.release()
            if finished:
                break
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    # -- handshake -------------------------------------------------------------------------

    async def _ensure_handshake(self) -> None:
        if self._handshake_done.is_set():
            self._check_status()
            return
        if self._handshake_started:
            await self._handshake_done.wait()
            self._check_status()
            return
        self._handshake_started = True
        timeout = (
            trio.fail_after(self._handshake_timeout)
            if self._handshake_timeout is not None
            else nullcontext()
        )
        try:
            with timeout:
                await self._retry(self.connection.do_handshake, is_handshake=True)
            self._handshake_ok = True
            self._release_bios = True
        except trio.TooSlowError:
            raise self._break(
                self._error(
                    f"TLS handshake with the {self._peer} did not finish within "
                    f"{self._handshake_timeout} s",
                    reason="tls_handshake_timeout",
                )
            ) from None
        except BaseException:
            self._mark_broken()
            raise
        finally:
            self._handshake_done.set()  # (wakes the tasks waiting for it)
            # An event once set stays set: every stream then shares one, and an idle stream
            # keeps no Event and parking lot of its own (about 0.4 KiB).
            self._handshake_done = _HANDSHAKE_DONE

    async def do_handshake(self) -> None:
        """Run the handshake now (otherwise the first send or receive runs it).

        Idempotent: once the handshake is done this is only a checkpoint; while another task is
        running it, this waits for that task. Cancelling it breaks the stream.

        Raises:
            ClientTLSError: server side, the client failed the handshake.
            UpstreamTLSError: client side; ``reason`` is ``tls_protocol`` when the server
                insists on an old version or weak suites, ``tls_client_certificate`` when it
                demanded a client certificate.
        """
        self._check_status()
        if self._handshake_done.is_set():
            await trio.lowlevel.checkpoint()
            self._check_status()
            return
        await self._ensure_handshake()

    # -- receiving -------------------------------------------------------------------------

    def _read(self, max_bytes: int) -> bytes | _WantsRead:
        if self._deferred is not None:
            exc, self._deferred = self._deferred, None
            raise exc
        if self._received_close:
            return b""
        try:
            # (A "want read" here goes to _retry, which feeds the refill or reads more.)
            if _SSL_READ is not None:
                return self._decrypt_into_scratch(max_bytes)
            return self._decrypt_by_record(max_bytes)
        except SSL.ZeroReturnError:  # close_notify
            self._received_close = True
            return b""
        except SSL.SysCallError:
            if not self._transport_eof:
                raise
            if not self._records.at_boundary:
                raise self._error(
                    f"the connection to the {self._peer} ended in the middle of a TLS record",
                    reason="tls_truncated",
                ) from None
            # No close_notify, but a whole number of records: what HTTPS peers usually do.
            # OpenSSL has queued a fatal alert for the EOF; the peer is gone, so drop it.
            self._drain_outgoing()
            if self._info is not None:
                self._info.alert_sent = None
            self._received_close = True
            return b""

    def _more_after_data(self, exc: SSL.Error) -> bool:
        """Some plaintext is in hand and OpenSSL raised ``exc``: decrypt more (``True``), or
        stop and return what is in hand, keeping what ``exc`` means for the next call."""
        if isinstance(exc, SSL.WantReadError):
            if self._unfed:  # more of the refill to decrypt
                self._feed()
                return True
        elif isinstance(exc, SSL.ZeroReturnError):
            self._received_close = True
        elif not isinstance(exc, SSL.SysCallError):  # (the end of the transport: sorted out
            self._deferred = exc  # by the next call) -- an error is reported after this data
        return False

    def _decrypt_into_scratch(self, max_bytes: int) -> bytes | _WantsRead:
        """Decrypt up to ``max_bytes`` straight into this thread's scratch buffer, one copy out.

        ``SSL_read`` is called through pyOpenSSL's own binding, and its failures are raised by
        pyOpenSSL's own mapping, exactly as ``Connection.recv`` does it, minus a buffer
        allocation and a copy per record and the join of the records.
        """
        connection = self.connection
        ssl = getattr(connection, "_ssl", None)
        if ssl is None:  # pragma: no cover - a pyOpenSSL that renamed it
            return self._decrypt_by_record(max_bytes)
        buffer = _scratch_buffer()
        limit = min(max_bytes, _SCRATCH_SIZE)
        total = 0
        while total < limit:
            result = _SSL_READ(ssl, buffer + total, limit - total)
            if result > 0:
                total += result
                continue
            # pyOpenSSL's mapping also raises what its verify/ALPN/OCSP callbacks recorded:
            # only handshakes run those (renegotiation is off), never a plain "want read".
            want_read = _LIB.SSL_get_error(ssl, result) == _WANT_READ
            if not total:  # nothing in hand: the caller handles it (want read, end, error)
                if want_read:  # (the usual start of a receive: returned, not raised)
                    return _WANTS_READ
                _RAISE_SSL_ERROR(connection, ssl, result)
                raise SSL.Error("SSL_read failed without an error")  # (never: SSL_get_error(3))
            if want_read:
                # Data in hand and the records are used up (the usual end of a receive):
                # _more_after_data's want-read case, without pyOpenSSL raising it first.
                if self._unfed:
                    self._feed()
                    continue
                break
            try:
                _RAISE_SSL_ERROR(connection, ssl, result)
            except SSL.Error as exc:
                if self._more_after_data(exc):
                    continue
            break
        data: bytes = _FFI.buffer(buffer, total)[:]
        return data

    def _decrypt_by_record(self, max_bytes: int) -> bytes:
        """:meth:`_decrypt_into_scratch` through pyOpenSSL's public API: one record per call."""
        data = self.connection.recv(min(max_bytes, _MAX_PLAINTEXT_RECORD))
        if len(data) >= max_bytes:
            return data
        # OpenSSL returns one record per call; take what else is already decrypted-able.
        chunks = [data]
        total = len(data)
        while total < max_bytes:
            try:
                # One record per call; never a buffer bigger than a record needs.
                more = self.connection.recv(min(max_bytes - total, _MAX_PLAINTEXT_RECORD))
            except SSL.Error as exc:
                if self._more_after_data(exc):
                    continue
                break
            chunks.append(more)
            total += len(more)
        return b"".join(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Receive and decrypt some data; ``b""`` at the end of the stream.

        The end is ``close_notify``, or the transport ending at a record boundary (HTTPS peers
        often skip ``close_notify``). A cancelled receive leaves the stream usable.

        Raises:
            ClientTLSError | UpstreamTLSError: an alert or corrupt record (``tls_error``), a
                stream cut inside a record (``tls_truncated``), a broken transport
                (``connection_lost``), or a failed handshake.
        """
        if max_bytes is None:
            max_bytes = self._max_refill
        else:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        with self._outer_recv:
            self._check_status()
            await self._ensure_handshake()
            received = await self._retry(self._read, max_bytes)
            assert isinstance(received, bytes)
            return received

    # -- sending ---------------------------------------------------------------------------

    def _write(self, pending: _PendingWrite) -> None:
        # One call per slice (see __init__), or per record where pyOpenSSL's partial-write mode
        # stayed on.
        connection, view = self.connection, pending.view
        while pending.offset < len(view):
            pending.offset += connection.send(view[pending.offset : pending.offset + _SEND_SLICE])
            if pending.offset - pending.drained >= _SEND_SLICE and pending.offset < len(view):
                # A slice's records fit in twice its size; anything left is drained in order.
                if self._encrypted is None:
                    self._encrypted = []
                self._encrypted.append(connection.bio_read(_DRAIN_SIZE))
                pending.drained = pending.offset

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send ``data``. Cancelling it breaks the stream once encryption started."""
        with self._outer_send:
            self._check_status()
            if self._sent_close:
                raise trio.ClosedResourceError("can't send data after send_eof()")
            await self._ensure_handshake()
            view = memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            for start in range(0, len(view), _SEND_BATCH):
                await self._retry(self._write, _PendingWrite(view[start : start + _SEND_BATCH]))

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport can take more data (see trio's ``SendStream``)."""
        with self._outer_send:
            self._check_status()
            if self._sent_close:
                raise trio.ClosedResourceError("can't send data after send_eof()")
            # A receive may be sending handshake or alert bytes: take the inner lock too.
            async with self._inner_send_lock:
                try:
                    await self.transport_stream.wait_send_all_might_not_block()
                except trio.BrokenResourceError as exc:
                    raise self._transport_broken(exc, handshake=False) from exc

    async def send_eof(self) -> None:
        """Send ``close_notify``, then half-close the transport when it supports that.

        The peer reads ``b""``; we can keep receiving (RFC 8446 §6.1). Repeating it is harmless.
        """
        with self._outer_send:
            self._check_status()
            if self._sent_close:
                await trio.lowlevel.checkpoint()
                return
            await self._ensure_handshake()
            self._sent_close = True
            await self._retry(self.connection.shutdown, ignore_want_read=True)
            if isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
                try:
                    await self.transport_stream.send_eof()
                except trio.BrokenResourceError as exc:
                    raise self._transport_broken(exc, handshake=False) from exc

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send ``close_notify`` (for at most :data:`CLOSE_NOTIFY_TIMEOUT` s), close the transport.

        A broken stream, or one whose handshake never completed, is closed without
        ``close_notify``. We do not wait for the peer's ``close_notify`` (RFC 8446 §6.1 allows
        it). Always closes the transport, also when cancelled.
        """
        if self._status is _Status.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        graceful = self._status is _Status.OK and self._handshake_ok and not self._sent_close
        if graceful:
            self._sent_close = True
            try:
                # Queue close_notify right away: even if delivering it is cancelled (as by
                # trio.aclose_forcefully), OpenSSL then counts the close as clean and keeps the
                # session resumable. Since TLS 1.1 an improper close need not prevent resumption
                # anyway (RFC 4346 §7.2.1).
                self.connection.shutdown()
            except SSL.Error:
                graceful = False
        if not graceful:
            self._status = _Status.CLOSED
            await self.transport_stream.aclose()
            return
        try:
            with (
                trio.move_on_after(CLOSE_NOTIFY_TIMEOUT) as scope,
                suppress(trio.BrokenResourceError, trio.BusyResourceError),
            ):
                await self._retry(_queued_output)
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        else:
            if scope.cancelled_caught:
                await trio.aclose_forcefully(self.transport_stream)
            else:
                await self.transport_stream.aclose()
        finally:
            self._status = _Status.CLOSED

    # -- what was negotiated ---------------------------------------------------------------

    def _negotiated(self) -> bool:
        return self._handshake_ok

    def selected_alpn(self) -> bytes | None:
        """The negotiated ALPN protocol, or ``None`` (also before the handshake)."""
        if not self._negotiated():
            return None
        return self.connection.get_alpn_proto_negotiated() or None

    def peer_certificate_chain(self) -> list[x509.Certificate]:
        """The chain the peer presented, leaf first, not verified.

        Empty until the handshake succeeded -- with one exception, client side: a TLS 1.2 server
        that asked for a client certificate had already proved that it holds the leaf's key
        (by signing its ServerKeyExchange), so its chain is returned even when the handshake then
        failed. A chain from a server that never proved possession of the key is worthless.
        """
        proven = self._info is not None and self._info.server_key_proven
        if not (self._negotiated() or (proven and not self.server_side)):
            return []
        return self.connection.get_peer_cert_chain(as_cryptography=True) or []

    def stapled_ocsp(self) -> bytes | None:
        """Client side: the OCSP response the server stapled (RFC 6066 §8), or ``None``."""
        return self._info.ocsp_response if self._info else None

    def tls_version(self) -> str | None:
        """The negotiated version (``"TLSv1.3"``, ``"TLSv1.2"``), or ``None``."""
        if not self._negotiated():
            return None
        return self.connection.get_protocol_version_name()

    def cipher_name(self) -> str | None:
        """The negotiated cipher suite (OpenSSL name), or ``None``."""
        if not self._negotiated():
            return None
        return self.connection.get_cipher_name()

    def client_certificate_requested(self) -> bool:
        """Client side: whether the server sent a CertificateRequest (bypass such sites)."""
        return bool(self._info and self._info.certificate_requested)

    def session(self) -> SSL.Session | None:
        """Client side: the session to pass to :func:`upstream_connection` next time.

        With TLS 1.3 the server sends its tickets after the handshake, so take the session after
        the first receive, and close this stream gracefully.
        """
        if not self._negotiated():
            return None
        return self.connection.get_session()

    def session_reused(self) -> bool:
        """Client side: whether the handshake resumed a session (no certificate was sent)."""
        return bool(
            not self.server_side
            and self._negotiated()
            and self._info
            and not self._info.server_certificate_seen
        )

    def is_idle(self) -> bool:
        """Whether this stream is open, between records, and has nothing unread or unsent.

        Decides whether a kept-alive upstream connection may carry a new client's requests
        (:mod:`tlsmitm._pool`): any buffered plaintext, partial record, pending alert or close
        means no. Post-handshake messages already buffered (tickets) are processed on the way.
        """
        if (
            self._status is not _Status.OK
            or not self._handshake_ok
            or self._received_close
            or self._sent_close
            or self._transport_eof
            or self._unfed
            or self._deferred is not None
            or self._delayed_outgoing
            or not self._records.at_boundary
        ):
            return False
        try:
            self.connection.recv(1)
        except SSL.WantReadError:
            pass
        except SSL.Error:
            return False
        else:
            return False  # application data nobody asked for
        return not self._drain_outgoing()

    def _close_now(self) -> None:
        """Close without waiting: hand ``close_notify`` to the transport if it takes it at once.

        For the end of a relay, when nothing more is expected and waiting buys nothing: no
        checkpoint and no cancel scope (``trio.aclose_forcefully`` costs tens of microseconds
        even on a closed stream). ``close_notify`` is queued first, which keeps the session
        resumable; whether it reaches the peer is best effort. Called by :func:`close_at_once`
        only when the transport can be closed synchronously too.
        """
        if self._status is _Status.CLOSED:
            return
        if self._status is _Status.OK and self._handshake_ok and not self._sent_close:
            self._sent_close = True
            try:
                self.connection.shutdown()
                pending = self._delayed_outgoing + self._drain_outgoing()
            except SSL.Error:
                pending = b""
            if pending:
                _send_without_waiting(self.transport_stream, pending)
        self._status = _Status.CLOSED
        self._delayed_outgoing = b""
        close_at_once(self.transport_stream)


def _send_without_waiting(stream: trio.abc.Stream, data: bytes) -> None:
    if isinstance(stream, trio.SocketStream):
        with suppress(OSError):
            os.write(stream.socket.fileno(), data)  # non-blocking: what does not fit is dropped


def close_at_once(resource: trio.abc.AsyncResource) -> bool:
    """Close a trio socket stream, or a :class:`TLSStream` over one, synchronously.

    Returns ``False`` (and does nothing) for any other resource: close that with
    ``trio.aclose_forcefully``. Used where a connection ends, on the hot path.
    """
    if isinstance(resource, TLSStream):
        if not isinstance(resource.transport_stream, trio.SocketStream | TLSStream):
            return False
        resource._close_now()
        return True
    if isinstance(resource, trio.SocketStream):
        resource.socket.close()
        return True
    return False
