"""Host-name normalisation shared by every module that compares names.

Every name tlsmitm compares -- a CONNECT target, an SNI value, a SAN entry, an HSTS entry, a bypass
rule -- goes through :func:`normalize_host` first, so that the same host is always the same string:

* DNS names become IDNA 2008 A-labels (UTS #46 mapping for U-labels), in lower case, with one
  trailing dot removed (``example.com.`` is ``example.com``: Chromium, Firefox and curl agree).
* Empty labels are malformed (``.example.com``, ``a..b``, ``example.com..``): matrix M-02/M-04/M-05
  recommend rejecting them, as Chromium does.
* IP literals (IPv4 dotted-decimal, IPv6 with or without brackets) become their canonical text
  (RFC 5952 for IPv6). IPv4 short forms (``14.15``) are not accepted here: browsers canonicalise
  those in the URL layer before a name reaches a proxy.
* Percent signs, NULs, spaces and other characters outside letters, digits, ``-`` and ``_`` are
  malformed; nothing is unescaped (matrix N-19..N-25 are the URL layer's job).

The result is a :class:`HostName`: a ``str`` that is known to be normalised. The relay builds one
once, at the edge (CONNECT target, SNI, transparent destination, ``Host``), and every later
:func:`normalize_host` -- in the policy, verifier, forge, HSTS store, responder and stores --
returns it unchanged at the cost of one ``isinstance`` check.
"""

from __future__ import annotations

import functools
import ipaddress

import idna

from ._errors import ClientError

__all__ = [
    "HostName",
    "InvalidHostName",
    "ip_address_of",
    "is_ip_literal",
    "is_same_or_subdomain",
    "normalize_host",
    "try_normalize_host",
]

_MAX_NAME = 253  # RFC 1035 §2.3.4, without the trailing dot
_MAX_LABEL = 63
_CACHED_NAMES = 4096  # normalised names and IP-literal answers kept (each well under 1 KiB)
_ASCII_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class InvalidHostName(ClientError, ValueError):
    """A host name that cannot be normalised; it never matches anything."""

    def __init__(self, name: object, why: str) -> None:
        super().__init__(f"invalid host name {name!r}: {why}", reason="invalid_host")


class HostName(str):
    """A host name or IP literal in canonical form (see the module docs); it *is* a ``str``.

    ``HostName(value)`` normalises ``value`` (``str`` or ``bytes``) and raises
    :class:`InvalidHostName` when it cannot; a ``HostName`` given to it, or to
    :func:`normalize_host`, comes back as it is. Equal to, hashed like and usable anywhere as the
    plain string.
    """

    __slots__ = ()

    def __new__(cls, name: str | bytes) -> HostName:
        return normalize_host(name)


def _host_name(text: str) -> HostName:
    """Wrap text that is already canonical (only this module calls it)."""
    return str.__new__(HostName, text)


def _as_text(name: str | bytes) -> str:
    if isinstance(name, bytes):
        try:
            return name.decode("ascii")
        except UnicodeDecodeError as exc:
            raise InvalidHostName(name, "not ASCII") from exc
    return name


def ip_address_of(name: str | bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a literal denotes, or ``None`` when ``name`` is not an IP literal.

    Accepts ``[v6]`` brackets. IPv4 must be strict dotted-decimal with four parts; IPv6 zone
    identifiers (``%eth0``) are not host names and are refused. (Results are cached: every
    layer of one connection asks about the same few names.)
    """
    if not isinstance(name, str | bytes):
        name = bytes(name)
    return _ip_address_of(name)


@functools.lru_cache(maxsize=_CACHED_NAMES)
def _ip_address_of(name: str | bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = _as_text(name) if isinstance(name, bytes) else name
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if ":" not in text:
            return None
    if "%" in text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_ip_literal(name: str | bytes) -> bool:
    """Whether ``name`` is an IPv4 or IPv6 literal (RFC 3986 §3.2.2 IP-literal / IPv4address)."""
    return ip_address_of(name) is not None


def _normalize_label(label: str, name: object) -> str:
    if not label:
        raise InvalidHostName(name, "empty label")
    if label.isascii():
        lowered = label.lower()
        if not set(lowered) <= _ASCII_LABEL_CHARS:
            raise InvalidHostName(name, f"label {label!r} has characters not allowed in a name")
        if lowered.startswith("xn--"):
            try:
                idna.decode(lowered)
            except idna.IDNAError as exc:
                raise InvalidHostName(name, f"label {label!r} is not a valid A-label") from exc
        result = lowered
    else:
        try:
            result = idna.encode(label, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise InvalidHostName(name, f"label {label!r} is not valid IDNA 2008") from exc
    if len(result) > _MAX_LABEL:
        raise InvalidHostName(name, "label longer than 63 octets")
    return result


def normalize_host(name: str | bytes) -> HostName:
    """Return the canonical form of a host name or IP literal, as a :class:`HostName`.

    A :class:`HostName` is returned unchanged (it was normalised at the edge). Other results
    are cached (bounded, least recently used first out). Failures are not cached.

    Raises:
        InvalidHostName: the name is empty or malformed.
    """
    if type(name) is HostName:
        return name
    if not isinstance(name, str | bytes):  # (a bytearray or memoryview is not hashable)
        name = bytes(name)
    return _normalize_host(str(name) if isinstance(name, str) else name)


@functools.lru_cache(maxsize=_CACHED_NAMES)
def _normalize_host(name: str | bytes) -> HostName:
    text = _as_text(name)
    address = ip_address_of(text)
    if address is not None:
        return _host_name(str(address))  # ipaddress prints IPv6 in RFC 5952 form
    if text.endswith("."):
        text = text[:-1]  # one trailing dot: absolute == relative
    if not text:
        raise InvalidHostName(name, "empty")
    if "\x00" in text:
        raise InvalidHostName(name, "embedded NUL")
    labels = [_normalize_label(label, name) for label in text.split(".")]
    if all(label.isdigit() for label in labels):
        # Not a strict dotted quad (that was handled above): 14.15, 1.2.3.4.5, 999.1.1.1.
        raise InvalidHostName(name, "numeric name that is not an IPv4 address")
    result = ".".join(labels)
    if len(result) > _MAX_NAME:
        raise InvalidHostName(name, "longer than 253 octets")
    return _host_name(result)


def try_normalize_host(name: str | bytes) -> HostName | None:
    """:func:`normalize_host`, returning ``None`` instead of raising."""
    try:
        return normalize_host(name)
    except InvalidHostName:
        return None


def is_same_or_subdomain(host: str, parent: str) -> bool:
    """Whether normalised ``host`` equals ``parent`` or lies below it, at a label boundary.

    ``forexample.net`` is not below ``example.net`` (matrix M-11).
    """
    return host == parent or host.endswith("." + parent)
