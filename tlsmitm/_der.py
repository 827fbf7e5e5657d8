"""The few DER encodings (ITU-T X.690 §8, §10) that tlsmitm writes by hand.

:class:`~tlsmitm.CertForge` builds a leaf's TBSCertificate (RFC 5280 §4.1) by concatenating
pre-encoded parts instead of going through ``cryptography``'s ``CertificateBuilder``: on the cold
path the builder costs more than the signature itself. :mod:`tlsmitm._ca` writes the PKCS #8
``EncryptedPrivateKeyInfo`` of a passphrase-protected root key (RFC 5958 §3, PBES2 from RFC 8018
§6.2) with a PBKDF2 iteration count that ``cryptography``'s ``BestAvailableEncryption`` does not
let us choose.

Only definite-length, minimal encodings are produced (DER, X.690 §10.1). The output of every
function here is checked against ``cryptography``'s own encoder in the tests.
"""

from __future__ import annotations

import datetime as dt

__all__ = [
    "BOOLEAN_TRUE",
    "NULL",
    "bit_string",
    "context_constructed",
    "context_primitive",
    "ia5_string",
    "integer",
    "octet_string",
    "oid",
    "read_tlv",
    "sequence",
    "set_of",
    "time",
    "tlv",
    "utf8_string",
]

NULL = b"\x05\x00"
BOOLEAN_TRUE = b"\x01\x01\xff"  # X.690 §11.1: DER encodes TRUE as 0xFF


def _length(size: int) -> bytes:
    """X.690 §8.1.3: short form below 128, otherwise the minimal long form."""
    if size < 0x80:
        return bytes((size,))
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def tlv(tag: int, content: bytes) -> bytes:
    """One tag-length-value element with a single-octet tag."""
    return bytes((tag,)) + _length(len(content)) + content


def sequence(*parts: bytes) -> bytes:
    """A SEQUENCE of already-encoded elements."""
    return tlv(0x30, b"".join(parts))


def set_of(*parts: bytes) -> bytes:
    """A SET OF already-encoded elements, sorted as DER requires (X.690 §11.6)."""
    return tlv(0x31, b"".join(sorted(parts)))


def integer(value: int) -> bytes:
    """An INTEGER in minimal two's-complement form (X.690 §8.3)."""
    size = value.bit_length() // 8 + 1  # room for the sign bit
    return tlv(0x02, value.to_bytes(size, "big", signed=True))


def octet_string(content: bytes) -> bytes:
    """An OCTET STRING."""
    return tlv(0x04, content)


def bit_string(content: bytes) -> bytes:
    """A BIT STRING of whole octets (no unused bits), as used for keys and signatures."""
    return tlv(0x03, b"\x00" + content)


def utf8_string(text: str) -> bytes:
    """A UTF8String."""
    return tlv(0x0C, text.encode("utf-8"))


def ia5_string(text: str) -> bytes:
    """An IA5String (ASCII); raises ``UnicodeEncodeError`` for anything else."""
    return tlv(0x16, text.encode("ascii"))


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form (X.690 §8.19)."""
    arcs = [int(arc) for arc in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"not an object identifier: {dotted!r}")
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


def context_primitive(number: int, content: bytes) -> bytes:
    """An IMPLICIT context-specific primitive element ``[number]`` (number < 31)."""
    return tlv(0x80 | number, content)


def context_constructed(number: int, content: bytes) -> bytes:
    """An EXPLICIT (or constructed IMPLICIT) context-specific element ``[number]``."""
    return tlv(0xA0 | number, content)


def time(when: dt.datetime) -> bytes:
    """A certificate Time (RFC 5280 §4.1.2.5).

    UTCTime for the years 1950 through 2049, GeneralizedTime otherwise; both in UTC with whole
    seconds (fractions are dropped, as RFC 5280 §4.1.2.5.1/§4.1.2.5.2 require).
    """
    if when.tzinfo is None:
        raise ValueError("certificate times must be timezone-aware")
    if when.tzinfo is not dt.UTC:
        when = when.astimezone(dt.UTC)
    rest = f"{when.month:02d}{when.day:02d}{when.hour:02d}{when.minute:02d}{when.second:02d}Z"
    if 1950 <= when.year < 2050:
        return b"\x17\x0d" + f"{when.year % 100:02d}{rest}".encode("ascii")
    return b"\x18\x0f" + f"{when.year:04d}{rest}".encode("ascii")


def read_tlv(data: bytes, offset: int = 0) -> tuple[int, int, int]:
    """Parse the element at ``offset``: returns ``(tag, content_start, content_end)``.

    Only for trusted input that tlsmitm itself or ``cryptography`` produced (a public key's
    SubjectPublicKeyInfo); raises ``ValueError`` on anything truncated.
    """
    if offset + 2 > len(data):
        raise ValueError("truncated DER element")
    tag = data[offset]
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise ValueError("unsupported DER length")
        size = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + size
    if end > len(data):
        raise ValueError("truncated DER element")
    return tag, start, end
