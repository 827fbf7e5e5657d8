"""Edge parsing of what a proxy client asks for: CONNECT authorities and absolute URLs (pure)."""

from __future__ import annotations

from .._errors import ClientError

__all__ = ["split_authority", "split_http_url"]


def split_authority(target: bytes) -> tuple[str, int]:
    """``host:port`` of a CONNECT request (RFC 9110 §9.3.6); IPv6 in brackets.

    Raises:
        ValueError: no port, a bad port, an empty host, or a malformed IPv6 literal.
    """
    text = target.decode("ascii")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("bad IPv6 authority")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("CONNECT target needs a port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("bad port")
    if not host:
        raise ValueError("empty host")
    return host, int(port_text)


def split_http_url(target: bytes) -> tuple[str, int, bytes]:
    """Host, port (80 by default) and origin-form path of an absolute ``http://`` target.

    Raises:
        ClientError: the URL carries credentials (``user@host``).
    """
    rest = target[len(b"http://") :]
    slash = rest.find(b"/")
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    if b"@" in authority:
        raise ClientError("credentials in proxy URLs are refused", reason="bad_request")
    text = authority.decode("ascii", "replace")
    if text.startswith("["):
        end = text.find("]")
        host = text[1:end]
        port_text = text[end + 2 :] if text[end + 1 : end + 2] == ":" else ""
    else:
        host, _, port_text = text.partition(":")
    port = int(port_text) if port_text.isdigit() else 80
    return host, port, path or b"/"
