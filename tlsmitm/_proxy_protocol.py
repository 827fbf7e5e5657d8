"""The PROXY protocol (versions 1 and 2) a TCP load balancer puts before a client's bytes, sans I/O.

Behind a TCP balancer (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB, ...) every connection
comes from the balancer's address. The balancer can prefix the stream with a short header that
carries the client's own address; the proxy reads it, then reads the client's bytes as usual. The
format is HAProxy's "The PROXY protocol", versions 1 (one text line) and 2 (binary).

Theory of operation
-------------------

The relay hands :func:`parse_proxy_header` everything received so far. The parser is stateless and
returns

* a :class:`ProxyHeader` (``length`` says how many bytes of the stream it occupied; what follows
  is the client's first byte),
* :data:`NEED_MORE` when the bytes are a valid prefix of a header, or
* raises :class:`ProxyProtocolError` (``reason`` ``"not_proxy"``, ``"malformed"`` or
  ``"too_large"``).

It never raises anything else on bytes input and never asks for more than
:data:`MAX_PROXY_HEADER_BYTES`, so a caller that loops ``receive -> parse`` is bounded. Only trusted
balancers may send a header (anyone could otherwise claim any address): that check belongs to the
caller, which knows the peer address; :func:`is_trusted` helps with it.

A ``LOCAL`` command (v2, a balancer's own health check) and the v1 ``UNKNOWN`` family carry no
client address: ``source`` is then ``None`` and the caller keeps the connection's own peer address
(spec §2.1 and §2.2: "the receiver must accept this connection as valid and must use the real
connection endpoints").
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from ._clienthello import NEED_MORE, NeedMoreType
from ._errors import ClientError

__all__ = [
    "MAX_PROXY_HEADER_BYTES",
    "V2_SIGNATURE",
    "ProxyCommand",
    "ProxyHeader",
    "ProxyProtocolError",
    "is_trusted",
    "parse_proxy_header",
    "parse_trusted_networks",
]

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes that open a version 2 header (spec §2.2)."""

_V1_PREFIX: Final = b"PROXY "
_V1_MAX: Final = 107  # spec §2.1: the longest v1 line, CRLF included
_V2_FIXED: Final = 16  # signature(12) ver_cmd(1) fam(1) len(2)
_V2_MAX_PAYLOAD: Final = 2048  # far above what balancers send (addresses + a few TLVs)
MAX_PROXY_HEADER_BYTES: Final = _V2_FIXED + _V2_MAX_PAYLOAD
"""Most bytes a header may occupy before the parser gives a final answer."""

ProxyProtocolReason = Literal["not_proxy", "malformed", "too_large"]

Address = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyProtocolError(ClientError):
    """The connection did not start with a valid PROXY protocol header.

    Attributes:
        reason: ``"not_proxy"`` (no header at all), ``"malformed"`` or ``"too_large"``.
    """

    def __init__(self, message: str, *, reason: ProxyProtocolReason) -> None:
        super().__init__(message, reason=reason)


class ProxyCommand(enum.Enum):
    """What the balancer says about the connection."""

    PROXY = "proxy"
    """Relayed on behalf of a client whose addresses the header carries (or not, if unknown)."""
    LOCAL = "local"
    """The balancer's own connection (a health check): use the real endpoints."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    """One parsed header.

    Attributes:
        version: 1 or 2.
        command: :attr:`ProxyCommand.PROXY` or :attr:`ProxyCommand.LOCAL`.
        source: the client's (address, port), or ``None`` when the header carries none
            (``LOCAL``, v1 ``UNKNOWN``, v2 ``AF_UNSPEC`` or ``AF_UNIX``).
        destination: the address and port the client connected to, or ``None`` likewise.
        length: how many bytes of the stream the header occupied.
    """

    version: int
    command: ProxyCommand
    source: Address | None
    destination: Address | None
    length: int

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, not {self.version!r}")
        if (self.source is None) != (self.destination is None):
            raise ValueError("source and destination are both known or both unknown")
        if not 0 < self.length <= MAX_PROXY_HEADER_BYTES:
            raise ValueError(f"length out of range: {self.length!r}")


def parse_proxy_header(data: bytes | bytearray | memoryview) -> ProxyHeader | NeedMoreType:
    """Parse the PROXY protocol header at the start of ``data``.

    Returns:
        The header, or :data:`NEED_MORE` when ``data`` is a proper prefix of one.

    Raises:
        ProxyProtocolError: ``data`` cannot start a header (``"not_proxy"``), the header is
            malformed, or it is longer than :data:`MAX_PROXY_HEADER_BYTES` (``"too_large"``).
    """
    buf = bytes(data[:MAX_PROXY_HEADER_BYTES])
    if buf[:1] == b"P":
        if not _V1_PREFIX.startswith(buf[:6]):
            raise ProxyProtocolError("not a PROXY protocol header", reason="not_proxy")
        return _parse_v1(buf)
    if buf[:1] == b"\r":
        if not V2_SIGNATURE.startswith(buf[:12]):
            raise ProxyProtocolError("not a PROXY protocol header", reason="not_proxy")
        return _parse_v2(buf)
    if not buf:
        return NEED_MORE
    raise ProxyProtocolError("not a PROXY protocol header", reason="not_proxy")


def _parse_v1(buf: bytes) -> ProxyHeader | NeedMoreType:
    end = buf.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(buf) >= _V1_MAX:
            raise ProxyProtocolError(
                f"PROXY v1 line longer than {_V1_MAX} bytes", reason="too_large"
            )
        if b"\n" in buf or (b"\r" in buf and not buf.endswith(b"\r")):
            raise ProxyProtocolError("PROXY v1 line not ended by CRLF", reason="malformed")
        return NEED_MORE
    line = buf[:end]
    # Spec §2.1: single spaces between fields, printable US-ASCII only.
    if any(not 0x20 <= byte < 0x7F for byte in line):
        raise ProxyProtocolError("PROXY v1 line has a non-printable byte", reason="malformed")
    fields = line.split(b" ")
    length = end + 2
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF is found" (§2.1).
        return ProxyHeader(
            version=1, command=ProxyCommand.PROXY, source=None, destination=None, length=length
        )
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(
            "PROXY v1 line is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'", reason="malformed"
        )
    version = 4 if fields[1] == b"TCP4" else 6
    source = (_v1_address(fields[2], version), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(
        version=1,
        command=ProxyCommand.PROXY,
        source=source,
        destination=destination,
        length=length,
    )


def _v1_address(text: bytes, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyProtocolError(
            f"PROXY v1 address {text[:45]!r} is not an IP address", reason="malformed"
        ) from None
    if address.version != version or (version == 6 and "%" in str(address)):
        raise ProxyProtocolError(
            f"PROXY v1 address {text[:45]!r} is not of family TCP{version}", reason="malformed"
        )
    return address


def _v1_port(text: bytes) -> int:
    # Spec §2.1: decimal 0..65535; a leading zero is refused, as HAProxy does.
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyProtocolError(f"PROXY v1 port {text[:8]!r} is not a port", reason="malformed")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"PROXY v1 port {port} is out of range", reason="malformed")
    return port


def _parse_v2(buf: bytes) -> ProxyHeader | NeedMoreType:
    if len(buf) < _V2_FIXED:
        return NEED_MORE
    version_command, family_protocol = buf[12], buf[13]
    if version_command >> 4 != 2:  # spec §2.2: the highest four bits are the version, 0x2
        raise ProxyProtocolError(
            f"PROXY v2 header with version {version_command >> 4}", reason="malformed"
        )
    command_bits = version_command & 0x0F
    if command_bits not in (0, 1):
        raise ProxyProtocolError(f"PROXY v2 command {command_bits} unknown", reason="malformed")
    payload_length = int.from_bytes(buf[14:16], "big")
    if payload_length > _V2_MAX_PAYLOAD:
        raise ProxyProtocolError(
            f"PROXY v2 header of {payload_length} bytes is longer than {_V2_MAX_PAYLOAD}",
            reason="too_large",
        )
    total = _V2_FIXED + payload_length
    if len(buf) < total:
        return NEED_MORE
    family, protocol = family_protocol >> 4, family_protocol & 0x0F
    if family > 3 or protocol > 2:
        raise ProxyProtocolError(
            f"PROXY v2 family/protocol byte {family_protocol:#04x} unknown", reason="malformed"
        )
    payload = buf[_V2_FIXED:total]
    if command_bits == 0:
        # LOCAL: "the receiver must accept this connection as valid and must use the real
        # connection endpoints and discard the protocol block including the family" (§2.2).
        return ProxyHeader(
            version=2, command=ProxyCommand.LOCAL, source=None, destination=None, length=total
        )
    if family in (1, 2) and protocol == 1:  # AF_INET/AF_INET6 over STREAM: what we relay
        size = 4 if family == 1 else 16
        if payload_length < 2 * size + 4:
            raise ProxyProtocolError(
                f"PROXY v2 address block of {payload_length} bytes is too short",
                reason="malformed",
            )
        make = ipaddress.IPv4Address if family == 1 else ipaddress.IPv6Address
        src = make(payload[:size])
        dst = make(payload[size : 2 * size])
        sport = int.from_bytes(payload[2 * size : 2 * size + 2], "big")
        dport = int.from_bytes(payload[2 * size + 2 : 2 * size + 4], "big")
        # TLVs after the addresses (spec §2.2.7) are not needed: skipped whole by `total`.
        return ProxyHeader(
            version=2,
            command=ProxyCommand.PROXY,
            source=(src, sport),
            destination=(dst, dport),
            length=total,
        )
    if protocol == 1 or family == 0:
        # AF_UNSPEC, or AF_UNIX over STREAM: no IP address to use; keep the real endpoints.
        return ProxyHeader(
            version=2, command=ProxyCommand.PROXY, source=None, destination=None, length=total
        )
    raise ProxyProtocolError(
        "PROXY v2 header for a datagram or unspecified protocol on a stream listener",
        reason="malformed",
    )


def parse_trusted_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (``10.0.0.0/8``, ``::1``, ``192.0.2.7``) -> networks.

    Raises:
        ValueError: a text is not an address or network (the message names it).
    """
    networks: list[Network] = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{text!r} is not an address or CIDR network: {exc}") from None
    return tuple(networks)


def is_trusted(peer: str, networks: Iterable[Network]) -> bool:
    """Whether the connection's own peer address ``peer`` lies in one of ``networks``.

    An IPv4-mapped IPv6 peer (``::ffff:192.0.2.7``) is matched as its IPv4 address.
    """
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)
