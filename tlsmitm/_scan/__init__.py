"""Content scanning: the :class:`Scanner` interface, ICAP and clamd clients, decoded and
spooled bodies.

The relay holds each body until every scanner has answered (the verdict before the first byte),
decodes its ``Content-Encoding`` for the scanners, and blocks through the error origin when a
scanner finds something -- or, under ``--scan-failure closed``, cannot tell.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._clamd import ClamdScanner
    from ._config import parse_size, scanner_from_url
    from ._decode import BodyDecoder, DecodeLimits, parse_content_encoding
    from ._icap_client import IcapScanner
    from ._inspect import BodyInspection, ScanSettings, open_inspection
    from ._model import (
        Clean,
        FailureMode,
        Infected,
        Replaced,
        ScanContext,
        ScanDecision,
        ScanFailed,
        Scanner,
        ScanVerdict,
        decide,
    )
    from ._spool import SpooledBody

# Imported on first use: the sans-IO parts (ICAP messages, decoding, verdicts) work with trio
# absent, and importing one of them does not start the trio driver's imports.
_WHERE = {
    "BodyDecoder": "_decode",
    "BodyInspection": "_inspect",
    "ClamdScanner": "_clamd",
    "Clean": "_model",
    "DecodeLimits": "_decode",
    "FailureMode": "_model",
    "IcapScanner": "_icap_client",
    "Infected": "_model",
    "Replaced": "_model",
    "ScanContext": "_model",
    "ScanDecision": "_model",
    "ScanFailed": "_model",
    "ScanSettings": "_inspect",
    "ScanVerdict": "_model",
    "Scanner": "_model",
    "SpooledBody": "_spool",
    "decide": "_model",
    "open_inspection": "_inspect",
    "parse_content_encoding": "_decode",
    "parse_size": "_config",
    "scanner_from_url": "_config",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "BodyDecoder",
    "BodyInspection",
    "ClamdScanner",
    "Clean",
    "DecodeLimits",
    "FailureMode",
    "IcapScanner",
    "Infected",
    "Replaced",
    "ScanContext",
    "ScanDecision",
    "ScanFailed",
    "ScanSettings",
    "ScanVerdict",
    "Scanner",
    "SpooledBody",
    "decide",
    "open_inspection",
    "parse_content_encoding",
    "parse_size",
    "scanner_from_url",
]
