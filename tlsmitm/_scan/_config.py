"""Scanners from URLs, as ``--scan`` takes them (pure parsing; the scanners connect later)."""

from __future__ import annotations

import urllib.parse

from .._errors import ConfigurationError
from ._clamd import DEFAULT_STREAM_MAX_LENGTH, ClamdScanner
from ._icap_client import IcapScanner
from ._model import Scanner

__all__ = ["parse_size", "scanner_from_url"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``"1048576"``, ``"512K"``, ``"30M"``, ``"2G"`` -> bytes (binary units)."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] else ""
    number = value[: len(value) - len(unit)]
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"not a size in bytes: {text!r} (e.g. 1048576, 512K, 30M, 2G)")
    return int(number) * _UNITS[unit]


def scanner_from_url(url: str, *, connect_timeout: float = 5.0) -> Scanner:
    """The scanner a ``--scan`` URL names.

    * ``icap://HOST[:PORT]/SERVICE`` -- :class:`IcapScanner` (port 1344 by default);
    * ``clamd:///PATH/clamd.sock`` -- :class:`ClamdScanner` on a Unix socket;
    * ``clamd://HOST:PORT`` -- :class:`ClamdScanner` over TCP.

    A clamd URL may end with ``?stream-max-length=SIZE`` when clamd's ``StreamMaxLength`` is
    not the default 25M.

    Raises:
        ConfigurationError: the URL names no scanner tlsmitm knows.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"--scan {url!r}: {exc}", reason="bad_scanner") from exc
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if parts.scheme == "icap":
        service = parts.path.strip("/")
        if not parts.hostname or not service or query:
            raise ConfigurationError(
                f"--scan {url!r}: expected icap://HOST:PORT/SERVICE", reason="bad_scanner"
            )
        return IcapScanner(parts.hostname, port or 1344, service, connect_timeout=connect_timeout)
    if parts.scheme == "clamd":
        max_length = DEFAULT_STREAM_MAX_LENGTH
        for key, values in query.items():
            if key != "stream-max-length" or len(values) != 1:
                raise ConfigurationError(
                    f"--scan {url!r}: unknown parameter {key!r} (only stream-max-length)",
                    reason="bad_scanner",
                )
            try:
                max_length = parse_size(values[0])
            except ValueError as exc:
                raise ConfigurationError(f"--scan {url!r}: {exc}", reason="bad_scanner") from exc
        if parts.hostname and port:
            if parts.path not in ("", "/"):
                raise ConfigurationError(
                    f"--scan {url!r}: expected clamd://HOST:PORT", reason="bad_scanner"
                )
            return ClamdScanner(
                host=parts.hostname,
                port=port,
                stream_max_length=max_length,
                connect_timeout=connect_timeout,
            )
        if not parts.netloc and parts.path.startswith("/"):
            return ClamdScanner(
                socket_path=urllib.parse.unquote(parts.path),
                stream_max_length=max_length,
                connect_timeout=connect_timeout,
            )
        raise ConfigurationError(
            f"--scan {url!r}: expected clamd:///PATH/clamd.sock or clamd://HOST:PORT",
            reason="bad_scanner",
        )
    raise ConfigurationError(
        f"--scan {url!r}: unknown scanner; use icap://HOST:PORT/SERVICE, "
        "clamd:///PATH/clamd.sock or clamd://HOST:PORT",
        reason="bad_scanner",
    )
