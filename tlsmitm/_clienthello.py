"""Peek at a TLS ClientHello without consuming it: SNI, ALPN and versions, sans I/O.

The relay reads the first bytes a client sends after ``CONNECT`` (or on a transparent connection),
hands them to :func:`parse_client_hello`, and decides -- intercept, bypass, refuse -- before any
TLS handshake starts. The parser never consumes anything: the bytes it looked at are replayed
unchanged into the TLS engine (``TLSStream(..., initial_data=...)``) or spliced upstream.

Theory of operation
-------------------

A ClientHello is one handshake message (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2) carried in one or more
TLS records of content type ``handshake`` (RFC 8446 §5.1). A client may fragment it over several
records, and TCP may split those records anywhere. The parser is stateless: it is given everything
received so far and either

* returns a :class:`ClientHello` (``raw_length`` says how many bytes of the stream the records
  holding it occupy),
* returns :data:`NEED_MORE` when the bytes are a valid prefix of a ClientHello, or
* raises :class:`ClientHelloError` with a stable ``reason``: ``not_tls``, ``malformed``,
  ``too_large`` or ``unsupported_version`` (an SSL 2.0 CLIENT-HELLO).

It never raises anything else on bytes input, and it never asks for more than
:data:`MAX_CLIENT_HELLO_BYTES`: once that many bytes are buffered the answer is final, so a caller
that loops ``receive -> parse`` until it gets an answer is bounded in memory and time.

Encrypted Client Hello (draft-ietf-tls-esni) is reported, not decrypted: tlsmitm holds no ECH key,
so the hello it reads is the *outer* one and ``server_name`` is the ECH configuration's public name.
:attr:`ClientHello.ech` says so (and a GREASE ECH extension, RFC 8701 style, looks the same by
design: draft-ietf-tls-esni §6.2). The relay answers such a hello as the draft prescribes for a
client-facing server without the key (§7.1 and §8.3 "Middleboxes"): it completes the handshake
for the public name and sends no ``retry_configs``, so the client treats ECH as securely disabled
and retries without it (§6.1.6) -- a retry that is then intercepted like any other.

Values are reported as sent (``server_name`` is not normalised; GREASE values, RFC 8701, are kept
in every tuple) so that a policy can see exactly what the client offered;
:attr:`ClientHello.highest_version` ignores GREASE.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, Literal

from ._errors import ClientError

__all__ = [
    "MAX_CLIENT_HELLO_BYTES",
    "NEED_MORE",
    "ClientHello",
    "ClientHelloError",
    "EncryptedClientHello",
    "NeedMoreType",
    "is_grease",
    "looks_like_tls",
    "parse_client_hello",
]

MAX_CLIENT_HELLO_BYTES: Final = 64 * 1024
"""Most bytes of the stream the records holding one ClientHello may occupy.

Real hellos are 200 bytes to about 2 KiB (a post-quantum key share adds ~1.2 KiB); 64 KiB leaves
room for a hello fragmented into many small records while bounding what a peer can make us buffer.
"""

ClientHelloReason = Literal["not_tls", "malformed", "too_large", "unsupported_version"]

_RECORD_HEADER = 5  # type(1) legacy_record_version(2) length(2), RFC 8446 §5.1
_HANDSHAKE_HEADER = 4  # msg_type(1) length(3), RFC 8446 §4
_CONTENT_HANDSHAKE = 22  # RFC 8446 §5.1 ContentType.handshake
_MSG_CLIENT_HELLO = 1  # RFC 8446 §4 HandshakeType.client_hello
_MAX_RECORD_PAYLOAD = 1 << 14  # RFC 8446 §5.1: "The length MUST NOT exceed 2^14 bytes"
_EXT_SERVER_NAME = 0  # RFC 6066 §3
_EXT_ALPN = 16  # RFC 7301 §3.1
_EXT_SUPPORTED_VERSIONS = 43  # RFC 8446 §4.2.1
_NAME_TYPE_HOST_NAME = 0  # RFC 6066 §3
_EXT_ECH = 0xFE0D  # draft-ietf-tls-esni §11.1 "encrypted_client_hello"
_ECH_OUTER, _ECH_INNER = 0, 1  # draft-ietf-tls-esni §5 ECHClientHelloType


class NeedMoreType(enum.Enum):
    """Type of the :data:`NEED_MORE` sentinel (an enum, so that ``is`` narrows for mypy)."""

    NEED_MORE = "need_more"

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMoreType.NEED_MORE
"""Returned by :func:`parse_client_hello` when the bytes so far are a valid, incomplete prefix."""


class ClientHelloError(ClientError):
    """The client's first bytes are not a ClientHello tlsmitm can read.

    Attributes:
        reason: ``"not_tls"`` (the client speaks something else, e.g. plain HTTP to a TLS port),
            ``"malformed"`` (TLS framing, but a broken hello), ``"too_large"`` (more than
            :data:`MAX_CLIENT_HELLO_BYTES`), or ``"unsupported_version"`` (an SSL 2.0 hello).
    """

    reason: ClientHelloReason

    def __init__(self, message: str, *, reason: ClientHelloReason) -> None:
        super().__init__(message, reason=reason)


def is_grease(value: int) -> bool:
    """Whether ``value`` is a GREASE code point (RFC 8701 §2: 0x0A0A, 0x1A1A, ... 0xFAFA)."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedClientHello:
    """The ``encrypted_client_hello`` extension of a ClientHello (draft-ietf-tls-esni §5).

    Attributes:
        outer: ``True`` for the outer ClientHello's extension (a client hiding its real hello;
            or GREASE), ``False`` for the ``inner`` marker, which only belongs inside an
            encrypted hello and is a protocol error in a hello seen on the wire.
        config_id: the ECHConfig the client used (outer only).
        kdf_id: the HPKE KDF of the cipher suite (outer only).
        aead_id: the HPKE AEAD of the cipher suite (outer only).
        payload_length: the length of the encrypted inner hello (outer only).
    """

    outer: bool
    config_id: int | None = None
    kdf_id: int | None = None
    aead_id: int | None = None
    payload_length: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    """What a client offered in its ClientHello, as sent.

    Attributes:
        server_name: the SNI ``host_name`` (RFC 6066 §3) as sent, ASCII, not normalised; ``None``
            without the extension.
        alpn_protocols: the ALPN protocol names in the client's order (RFC 7301 §3.1).
        supported_versions: the ``supported_versions`` list (RFC 8446 §4.2.1), GREASE included;
            without the extension, ``(legacy_version,)``.
        legacy_version: the ``legacy_version`` field (0x0303 for TLS 1.2 and 1.3 clients).
        cipher_suites: the offered cipher suite code points, in order.
        extensions: the extension type codes, in order.
        compression_methods: the offered compression methods (``(0,)`` for any sane client).
        raw_length: how many bytes of the stream the records holding the hello occupy; the
            caller replays at least these into the TLS engine.
        ech: the ``encrypted_client_hello`` extension, when present; ``server_name`` is then the
            ECH public name, not the host the client really wants.
    """

    server_name: str | None
    alpn_protocols: tuple[bytes, ...]
    supported_versions: tuple[int, ...]
    legacy_version: int
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]
    compression_methods: tuple[int, ...]
    raw_length: int
    ech: EncryptedClientHello | None = None

    def __post_init__(self) -> None:
        if self.server_name is not None and (
            not self.server_name or not self.server_name.isascii()
        ):
            raise ValueError(f"server_name must be non-empty ASCII, not {self.server_name!r}")
        if any(not 0 < len(p) < 256 for p in self.alpn_protocols):
            raise ValueError("each ALPN protocol name is 1 to 255 bytes (RFC 7301 §3.1)")
        if not self.supported_versions:
            raise ValueError("supported_versions is never empty")
        for field_name in ("supported_versions", "cipher_suites", "extensions"):
            values = getattr(self, field_name)
            if values and (min(values) < 0 or max(values) > 0xFFFF):
                raise ValueError(f"{field_name} holds 16-bit code points")
        if not 0 <= self.legacy_version <= 0xFFFF:
            raise ValueError("legacy_version is a 16-bit value")
        methods = self.compression_methods
        if methods and (min(methods) < 0 or max(methods) > 0xFF):
            raise ValueError("compression_methods holds 8-bit code points")
        if self.raw_length < _RECORD_HEADER + _HANDSHAKE_HEADER:
            raise ValueError("raw_length cannot be smaller than one record and handshake header")

    @property
    def highest_version(self) -> int:
        """The highest version offered, ignoring GREASE (0x0304 is TLS 1.3)."""
        real = [v for v in self.supported_versions if not is_grease(v)]
        return max(real) if real else self.legacy_version


def looks_like_tls(first_bytes: bytes | bytearray | memoryview) -> bool:
    """Cheap test of the first byte(s): a TLS handshake record starts ``0x16 0x03``.

    With one byte only the first is checked. Empty input is not TLS (yet). Use it to route a
    connection early; :func:`parse_client_hello` gives the definitive answer.
    """
    if not first_bytes or first_bytes[0] != _CONTENT_HANDSHAKE:
        return False
    return len(first_bytes) < 2 or first_bytes[1] == 3


def _fail(reason: ClientHelloReason, message: str) -> ClientHelloError:
    return ClientHelloError(message, reason=reason)


def _malformed(what: str) -> ClientHelloError:
    return ClientHelloError(f"malformed ClientHello: {what}", reason="malformed")


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello | NeedMoreType:
    """Parse the ClientHello at the start of ``data``, or say that more bytes are needed.

    Args:
        data: everything the client has sent so far (any bytes after the hello are ignored).

    Returns:
        The :class:`ClientHello`, or :data:`NEED_MORE` if ``data`` is a valid but incomplete
        prefix. ``NEED_MORE`` is never returned once ``len(data) >= MAX_CLIENT_HELLO_BYTES``.

    Raises:
        ClientHelloError: ``not_tls``, ``malformed``, ``too_large`` or ``unsupported_version``.
            No other exception escapes for bytes-like input.
    """
    view = memoryview(data).cast("B")
    total = len(view)
    if total == 0:
        return NEED_MORE
    first = view[0]
    if first != _CONTENT_HANDSHAKE:
        if first & 0x80:
            # SSL 2.0 record: 2-byte header with the high bit set, then msg_type 1 for
            # CLIENT-HELLO (RFC 6101 Appendix E.2). RFC 6176 prohibits SSL 2.0.
            if total < 3:
                return NEED_MORE
            if view[2] == _MSG_CLIENT_HELLO:
                raise _fail(
                    "unsupported_version",
                    "the client sent an SSL 2.0 ClientHello; SSL 2.0 is prohibited (RFC 6176)",
                )
        raise _fail(
            "not_tls",
            f"the client did not start a TLS handshake (first byte 0x{first:02x}); "
            "is it speaking plain HTTP or another protocol to a TLS port?",
        )

    fragments: list[memoryview] = []
    collected = 0
    message_end: int | None = None  # 4 + hello length, once the handshake header is known
    pos = 0
    while True:
        header = view[pos : pos + _RECORD_HEADER]
        if header and header[0] != _CONTENT_HANDSHAKE:
            # RFC 8446 §5.1: handshake messages MUST NOT be interleaved with other record types.
            raise _malformed(f"record of content type {header[0]} inside the ClientHello")
        if len(header) >= 2 and header[1] != 3:
            if pos == 0:
                raise _fail(
                    "not_tls",
                    f"record version 0x{header[1]:02x}.. is not TLS; "
                    "the client is not speaking TLS",
                )
            raise _malformed(f"record version major 0x{header[1]:02x} is not 3")
        if len(header) < _RECORD_HEADER:
            return _need_more(total)
        length = (header[3] << 8) | header[4]
        if length == 0:
            # RFC 8446 §5.1: "MUST NOT send zero-length fragments of Handshake types"
            raise _malformed("zero-length handshake record")
        if length > _MAX_RECORD_PAYLOAD:
            raise _malformed(f"record length {length} exceeds 2^14 (RFC 8446 §5.1)")
        record_end = pos + _RECORD_HEADER + length
        if record_end > MAX_CLIENT_HELLO_BYTES:
            raise _too_large()
        fragment = view[pos + _RECORD_HEADER : min(record_end, total)]
        fragments.append(fragment)
        collected += len(fragment)
        if message_end is None and collected >= _HANDSHAKE_HEADER:
            head = bytes(fragments[0][:_HANDSHAKE_HEADER])
            if len(head) < _HANDSHAKE_HEADER:  # handshake header split over tiny records
                head = b"".join(bytes(f) for f in fragments)[:_HANDSHAKE_HEADER]
            if head[0] != _MSG_CLIENT_HELLO:
                raise _malformed(f"first handshake message has type {head[0]}, not client_hello")
            hello_length = int.from_bytes(head[1:4], "big")
            message_end = _HANDSHAKE_HEADER + hello_length
            if _RECORD_HEADER + message_end > MAX_CLIENT_HELLO_BYTES:
                raise _too_large()
        if record_end > total:
            return _need_more(total)
        pos = record_end
        if message_end is not None and collected >= message_end:
            break

    assert message_end is not None  # the loop only breaks once it is known
    message = bytes(fragments[0]) if len(fragments) == 1 else b"".join(fragments)
    return _parse_body(message, message_end, raw_length=pos)


def _too_large() -> ClientHelloError:
    return _fail(
        "too_large",
        f"the ClientHello would exceed {MAX_CLIENT_HELLO_BYTES} bytes; refusing to buffer it",
    )


def _need_more(total: int) -> NeedMoreType:
    # The invariant documented on parse_client_hello: at the bound, the answer is final.
    if total >= MAX_CLIENT_HELLO_BYTES:
        raise _too_large()
    return NEED_MORE


class _Reader:
    """Bounds-checked big-endian reads over ``view[pos:end]`` (RFC 8446 §3 presentation)."""

    __slots__ = ("_end", "_pos", "_view")

    def __init__(self, view: bytes | memoryview, pos: int, end: int) -> None:
        self._view = view
        self._pos = pos
        self._end = end

    def done(self) -> bool:
        return self._pos == self._end

    def take(self, n: int, what: str) -> bytes | memoryview:
        start = self._pos
        if n > self._end - start:
            raise _malformed(f"{what} runs past its enclosing length")
        self._pos = start + n
        return self._view[start : start + n]

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def vector(self, length_bytes: int, what: str, *, minimum: int = 0) -> _Reader:
        """A sub-reader over a ``<minimum..2^(8*length_bytes)-1>`` vector."""
        size = int.from_bytes(self.take(length_bytes, f"{what} length"), "big")
        if size < minimum:
            raise _malformed(f"{what} is shorter than {minimum} bytes")
        start = self._pos
        self.take(size, what)
        return _Reader(self._view, start, start + size)

    def rest(self, what: str) -> bytes | memoryview:
        """Everything left in this reader."""
        return self.take(self._end - self._pos, what)

    def u16_list(self, what: str) -> tuple[int, ...]:
        raw = self.rest(what)
        if len(raw) % 2:
            raise _malformed(f"{what} has an odd length")
        return tuple((raw[i] << 8) | raw[i + 1] for i in range(0, len(raw), 2))


def _parse_body(message: bytes, end: int, *, raw_length: int) -> ClientHello:
    """Parse ``message[4:end]``, a ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).

    Written with flat offsets rather than :class:`_Reader` objects: this is the hot path, about
    twenty extensions per hello. Every length is checked against ``end`` before it is used.
    """
    pos = _HANDSHAKE_HEADER
    if end - pos < 2 + 32 + 1:
        raise _malformed("legacy_version, random and legacy_session_id run past the message")
    legacy_version = (message[pos] << 8) | message[pos + 1]
    if legacy_version >> 8 != 3:
        raise _malformed(f"legacy_version 0x{legacy_version:04x} is not 3.x")
    pos += 2 + 32
    session_id_length = message[pos]
    if session_id_length > 32:  # legacy_session_id<0..32>
        raise _malformed("legacy_session_id is longer than 32 bytes")
    pos += 1 + session_id_length
    if end - pos < 2:
        raise _malformed("cipher_suites runs past the message")
    length = (message[pos] << 8) | message[pos + 1]
    pos += 2
    if length < 2 or length % 2 or length > end - pos:  # cipher_suites<2..2^16-2>
        raise _malformed("cipher_suites is empty, has an odd length or runs past the message")
    cipher_suites = struct.unpack_from(f">{length // 2}H", message, pos)
    pos += length
    if pos >= end:
        raise _malformed("legacy_compression_methods runs past the message")
    length = message[pos]
    pos += 1
    if length < 1 or length > end - pos:  # legacy_compression_methods<1..2^8-1>
        raise _malformed("legacy_compression_methods is empty or runs past the message")
    compression_methods = tuple(message[pos : pos + length])
    pos += length

    server_name: str | None = None
    alpn: tuple[bytes, ...] = ()
    versions: tuple[int, ...] | None = None
    types: list[int] = []
    ech: EncryptedClientHello | None = None
    if pos < end:  # RFC 5246 §7.4.1.2: the extensions block may be absent
        if end - pos < 2:
            raise _malformed("extensions length runs past the message")
        length = (message[pos] << 8) | message[pos + 1]
        pos += 2
        if length != end - pos:
            raise _malformed("the extensions block does not end where the ClientHello ends")
        seen: set[int] = set()
        while pos < end:
            if end - pos < 4:
                raise _malformed("extension header runs past the extensions block")
            ext_type = (message[pos] << 8) | message[pos + 1]
            length = (message[pos + 2] << 8) | message[pos + 3]
            pos += 4
            if length > end - pos:
                raise _malformed(f"extension {ext_type} runs past the extensions block")
            if ext_type in seen:
                # RFC 8446 §4.2: "There MUST NOT be more than one extension of the same type"
                raise _malformed(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            types.append(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                server_name = _parse_server_name(_Reader(message, pos, pos + length))
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(_Reader(message, pos, pos + length))
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(_Reader(message, pos, pos + length))
            elif ext_type == _EXT_ECH:
                ech = _parse_ech(_Reader(message, pos, pos + length))
            pos += length
    return ClientHello(
        server_name=server_name,
        alpn_protocols=alpn,
        supported_versions=versions if versions is not None else (legacy_version,),
        legacy_version=legacy_version,
        cipher_suites=cipher_suites,
        extensions=tuple(types),
        compression_methods=compression_methods,
        raw_length=raw_length,
        ech=ech,
    )


def _parse_ech(ext: _Reader) -> EncryptedClientHello:
    # draft-ietf-tls-esni §5: ECHClientHello { ECHClientHelloType type; select (type) {
    #   case outer: HpkeSymmetricCipherSuite cipher_suite; uint8 config_id;
    #               opaque enc<0..2^16-1>; opaque payload<1..2^16-1>;
    #   case inner: Empty; } }
    kind = ext.u8("ECHClientHello type")
    if kind == _ECH_INNER:
        if not ext.done():
            raise _malformed("bytes after an inner ECHClientHello")
        return EncryptedClientHello(outer=False)
    if kind != _ECH_OUTER:
        # §7: an unknown ECHClientHelloType is an illegal_parameter.
        raise _malformed(f"unknown ECHClientHello type {kind}")
    suite = ext.take(4, "ECH cipher_suite")
    config_id = ext.u8("ECH config_id")
    ext.vector(2, "ECH enc")
    payload = ext.vector(2, "ECH payload", minimum=1)
    if not ext.done():
        raise _malformed("bytes after the outer ECHClientHello")
    return EncryptedClientHello(
        outer=True,
        config_id=config_id,
        kdf_id=(suite[0] << 8) | suite[1],
        aead_id=(suite[2] << 8) | suite[3],
        payload_length=len(payload.rest("ECH payload")),
    )


def _parse_server_name(ext: _Reader) -> str | None:
    # RFC 6066 §3: ServerNameList server_name_list<1..2^16-1>; HostName<1..2^16-1>.
    names = ext.vector(2, "server_name_list", minimum=1)
    if not ext.done():
        raise _malformed("bytes after server_name_list")
    host: str | None = None
    while not names.done():
        name_type = names.u8("name_type")
        name = names.vector(2, "server name", minimum=1)
        if name_type != _NAME_TYPE_HOST_NAME:
            continue
        if host is not None:
            # RFC 6066 §3: "MUST NOT contain more than one name of the same name_type"
            raise _malformed("more than one host_name in server_name")
        raw = bytes(name.rest("host_name"))
        if not raw.isascii():
            # RFC 6066 §3: "HostName ... represented as a byte string using ASCII encoding"
            raise _malformed("server_name host_name is not ASCII")
        host = raw.decode("ascii")
    return host


def _parse_alpn(ext: _Reader) -> tuple[bytes, ...]:
    # RFC 7301 §3.1: ProtocolName<1..2^8-1>; ProtocolNameList<2..2^16-1>.
    names = ext.vector(2, "protocol_name_list", minimum=2)
    if not ext.done():
        raise _malformed("bytes after protocol_name_list")
    protocols: list[bytes] = []
    while not names.done():
        # "Empty strings MUST NOT be included"
        protocols.append(bytes(names.vector(1, "protocol name", minimum=1).rest("protocol name")))
    return tuple(protocols)


def _parse_supported_versions(ext: _Reader) -> tuple[int, ...]:
    # RFC 8446 §4.2.1: ProtocolVersion versions<2..254> in a ClientHello.
    versions = ext.vector(1, "supported_versions", minimum=2).u16_list("supported_versions")
    if not ext.done():
        raise _malformed("bytes after supported_versions")
    return versions
