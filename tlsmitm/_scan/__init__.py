"""Content scanning: the :class:`Scanner` interface, ICAP and clamd clients, decoded and
spooled bodies.

The relay holds each body until every scanner has answered (the verdict before the first byte),
decodes its ``Content-Encoding`` for the scanners, and blocks through the error origin when a
scanner finds something -- or, under ``--scan-failure closed``, cannot tell.
"""

from __future__ import annotations

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
