"""What a stranger sends the proxy port, checked before anything acts on it (pure).

Theory of operation
-------------------

A proxy's input is written by strangers, so every value the intake uses is parsed here, once, by a
pure function that either returns a validated value or raises :class:`BadRequest` carrying the HTTP
status to answer with. Nothing here does I/O, and nothing here raises anything but
:class:`BadRequest` on bytes input (the property tests in ``tests/test_edge.py`` and the
``./run fuzz`` targets hold it to that).

* :func:`find_head_end`: where a request head ends in what has been received so far. A bare LF or a
  bare CR is refused at once with ``400`` (RFC 9112 §2.2), a head longer than the limit with
  ``431`` (RFC 6585 §5) -- never a wait for a ``CRLF CRLF`` that will not come.
* :func:`parse_connect_target`: the authority-form target of ``CONNECT`` (RFC 9110 §9.3.6), port
  required, in 1..65535.
* :func:`parse_absolute_url`: the absolute-form target a client sends a proxy (RFC 9112 §3.2.2),
  ``http`` only, no user information, port in 1..65535, IPv6 literals in brackets.
* :func:`via_names` / :func:`via_value`: the ``Via`` header (RFC 9110 §7.6.3) a proxy adds and
  reads back to recognise a request it has already forwarded once (a loop).

Host names come out normalised (:func:`~tlsmitm._names.normalize_host`), so the rest of the proxy
compares them as plain strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ._errors import ClientError
from ._names import InvalidHostName, ip_address_of, normalize_host

__all__ = [
    "DEFAULT_HEAD_LIMIT",
    "AbsoluteUrl",
    "Authority",
    "BadRequest",
    "find_head_end",
    "parse_absolute_url",
    "parse_authority",
    "parse_connect_target",
    "parse_port",
    "via_names",
    "via_value",
]

DEFAULT_HEAD_LIMIT: Final = 64 * 1024
"""Most bytes a request head may have (request line and fields), CRLF CRLF included."""

_MAX_TARGET: Final = 8192  # RFC 9112 §3: at least 8000 octets of request-line must be supported
_MAX_PORT_DIGITS: Final = 5
_VISIBLE: Final = frozenset(range(0x21, 0x7F))


class BadRequest(ClientError):
    """The client's request head or target is refused; answer with :attr:`status`.

    Attributes:
        status: ``400`` (malformed), ``431`` (head too large) or ``414`` (target too long).
        reason: a stable code: ``bare_lf``, ``bare_cr``, ``head_too_large``, ``bad_port``,
            ``bad_host``, ``bad_ipv6``, ``bad_target``, ``unsupported_scheme``,
            ``userinfo``, ``target_too_long``.
    """

    status: int

    def __init__(self, message: str, *, reason: str, status: int = 400) -> None:
        super().__init__(message, reason=reason)
        self.status = status


@dataclass(frozen=True, slots=True, kw_only=True)
class Authority:
    """A validated ``host:port``.

    Attributes:
        host: the normalised host name or IP literal (IPv6 without brackets).
        port: 1..65535.
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 1..65535")

    @property
    def host_text(self) -> str:
        """The host as it is written in a URL or a ``Host`` field (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    def text(self, *, default_port: int | None = None) -> str:
        """``host:port``, or ``host`` alone when ``port`` is ``default_port``."""
        if self.port == default_port:
            return self.host_text
        return f"{self.host_text}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AbsoluteUrl:
    """A validated absolute-form ``http://`` request target.

    Attributes:
        authority: where the request goes (port 80 when the URL names none).
        target: the origin-form target to send upstream (path and query; ``/`` when empty).
    """

    authority: Authority
    target: bytes


def _text(data: bytes | bytearray | memoryview, what: str) -> str:
    raw = bytes(data)
    if not raw or not all(b in _VISIBLE for b in raw):
        raise BadRequest(f"{what} is empty or has characters outside visible ASCII", reason=what)
    return raw.decode("ascii")


def parse_port(text: str | bytes) -> int:
    """A port number: 1 to 5 ASCII digits, value 1..65535 (RFC 3986 §3.2.3, RFC 6335 §6).

    Raises:
        BadRequest: ``bad_port`` (status 400).
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    # str.isdigit accepts non-ASCII digits ("٣"); the grammar is DIGIT (RFC 5234 B.1): 0-9 only.
    if not 1 <= len(text) <= _MAX_PORT_DIGITS or not all("0" <= c <= "9" for c in text):
        raise BadRequest(f"port {text[:16]!r} is not a number", reason="bad_port")
    port = int(text)
    if not 1 <= port <= 65535:
        raise BadRequest(f"port {port} is not in 1..65535", reason="bad_port")
    return port


def parse_authority(text: str, *, default_port: int | None) -> Authority:
    """``host[:port]`` (RFC 3986 §3.2.2-3): a reg-name, an IPv4 address or ``[IPv6]``.

    Args:
        text: the authority, without user information.
        default_port: the port when none is written (an empty port counts as none, RFC 3986
            §3.2.3); ``None`` makes the port required.

    Raises:
        BadRequest: ``bad_host``, ``bad_ipv6`` or ``bad_port`` (status 400).
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadRequest(f"IPv6 literal without ']' in {text[:64]!r}", reason="bad_ipv6")
        literal = text[1:end]
        rest = text[end + 1 :]
        # RFC 3986 §3.2.2: only an IPv6 address (or IPvFuture, which nothing routes) in brackets;
        # a zone identifier (RFC 6874) names an interface of the client, not a server.
        address = ip_address_of(f"[{literal}]")
        if address is None or address.version != 6:
            raise BadRequest(f"{literal[:64]!r} is not an IPv6 address", reason="bad_ipv6")
        host = str(address)
        if rest and not rest.startswith(":"):
            raise BadRequest(f"junk after the IPv6 literal: {rest[:32]!r}", reason="bad_host")
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_part = text.rpartition(":")
        if not sep:
            name, port_part = text, ""
        port_text = port_part if sep else None
        if ":" in name:
            raise BadRequest(
                f"{text[:64]!r}: an IPv6 address must be in brackets", reason="bad_ipv6"
            )
        try:
            host = normalize_host(name)
        except InvalidHostName as exc:
            raise BadRequest(str(exc), reason="bad_host") from exc
    if port_text is None or port_text == "":
        if default_port is None:
            raise BadRequest(f"{text[:64]!r} names no port", reason="bad_port")
        return Authority(host=host, port=default_port)
    return Authority(host=host, port=parse_port(port_text))


def parse_connect_target(target: bytes | bytearray | memoryview) -> Authority:
    """The target of ``CONNECT``: authority-form ``host:port`` (RFC 9110 §9.3.6, RFC 9112 §3.2.3).

    Raises:
        BadRequest: status 400 with a reason from :func:`parse_authority`, or ``bad_target``.
    """
    if len(target) > _MAX_TARGET:
        raise BadRequest("CONNECT target too long", reason="target_too_long", status=414)
    text = _text(target, "bad_target")
    if "@" in text or "/" in text:
        # RFC 9112 §3.2.3: authority-form is "uri-host:port", nothing else.
        raise BadRequest(f"CONNECT target {text[:64]!r} is not host:port", reason="bad_target")
    return parse_authority(text, default_port=None)


def parse_absolute_url(target: bytes | bytearray | memoryview) -> AbsoluteUrl:
    """An absolute-form request target for a proxy (RFC 9112 §3.2.2): ``http://authority/path``.

    ``https`` is not accepted here: a client reaches an HTTPS server through ``CONNECT``.

    Raises:
        BadRequest: status 400 (``bad_target``, ``unsupported_scheme``, ``userinfo`` or a reason
            from :func:`parse_authority`), or 414 for a target over 8 KiB.
    """
    if len(target) > _MAX_TARGET:
        raise BadRequest("request target too long", reason="target_too_long", status=414)
    text = _text(target, "bad_target")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise BadRequest(f"{text[:64]!r} is not an absolute URL", reason="bad_target")
    if scheme.lower() != "http":  # RFC 3986 §3.1: schemes are case-insensitive
        raise BadRequest(
            f"scheme {scheme[:16]!r} is not proxied (use CONNECT for https)",
            reason="unsupported_scheme",
        )
    if "#" in rest:
        raise BadRequest("a fragment is not part of a request target", reason="bad_target")
    cut = len(rest)
    for delimiter in "/?":
        found = rest.find(delimiter)
        if 0 <= found < cut:
            cut = found
    authority_text, path = rest[:cut], rest[cut:]
    if "@" in authority_text:
        # RFC 9110 §4.2.4: userinfo is deprecated in http URIs; a proxy must not pass it on.
        raise BadRequest("credentials in a proxy URL are refused", reason="userinfo")
    authority = parse_authority(authority_text, default_port=80)
    if not path.startswith("/"):
        path = "/" + path  # RFC 9112 §3.2.1: an empty path is sent as "/"
    return AbsoluteUrl(authority=authority, target=path.encode("ascii"))


def find_head_end(buffer: bytes | bytearray, *, limit: int = DEFAULT_HEAD_LIMIT) -> int | None:
    """Where the request head in ``buffer`` ends (the index after ``CRLF CRLF``), or ``None``.

    ``None`` means "no complete head yet, and nothing wrong so far": read more (under a deadline).
    Leading empty lines are part of the head (RFC 9112 §2.2 lets a server ignore them).

    Raises:
        BadRequest: ``bare_lf`` / ``bare_cr`` (400) as soon as one is seen -- RFC 9112 §2.2 lets
            a recipient accept a bare LF, but two parsers that disagree on it are how requests
            are smuggled, and waiting for a CRLF that never comes is how a client hangs; or
            ``head_too_large`` (431, RFC 6585 §5) once ``limit`` bytes hold no complete head.
    """
    end = buffer.find(b"\r\n\r\n")
    scan = len(buffer) if end < 0 else end + 4
    lf = buffer.find(b"\n", 0, scan)
    while lf >= 0:
        if lf == 0 or buffer[lf - 1] != 0x0D:
            raise BadRequest("bare LF in the request head", reason="bare_lf")
        lf = buffer.find(b"\n", lf + 1, scan)
    cr = buffer.find(b"\r", 0, scan)
    while cr >= 0:
        if cr + 1 < len(buffer) and buffer[cr + 1] != 0x0A:
            raise BadRequest("bare CR in the request head", reason="bare_cr")
        cr = buffer.find(b"\r", cr + 1, scan)
    if end >= 0 and end + 4 <= limit:
        return end + 4
    if (end >= 0 and end + 4 > limit) or len(buffer) >= limit:
        raise BadRequest(
            f"request head larger than {limit} bytes", reason="head_too_large", status=431
        )
    return None


def via_value(pseudonym: str) -> str:
    """The ``Via`` member this proxy appends (RFC 9110 §7.6.3): ``1.1 <pseudonym>``."""
    return f"1.1 {pseudonym}"


def via_names(values: list[bytes]) -> list[str]:
    """The ``received-by`` names of every ``Via`` member, in order (RFC 9110 §7.6.3).

    Malformed members are skipped (they cannot carry our pseudonym); comments are dropped.
    """
    names: list[str] = []
    for value in values:
        for member in value.split(b","):
            words = member.strip().split()
            if len(words) >= 2 and all(b in _VISIBLE for b in words[0] + words[1]):
                names.append(words[1].decode("ascii").lower())
    return names
