"""Kept for embedders that imported from here: the HTTP/1.1 relay lives in :mod:`tlsmitm._relay`.

Import hook types from :mod:`tlsmitm` (``tlsmitm.Hooks``, ``tlsmitm.Request``...).
"""

from __future__ import annotations

from ._relay.fetch import fetch_http
from ._relay.h1 import HttpRelay, Switched, run_relay
from ._relay.hooks import Block, FlowInfo, Hooks, Request, Response

__all__ = [
    "Block",
    "FlowInfo",
    "Hooks",
    "HttpRelay",
    "Request",
    "Response",
    "Switched",
    "fetch_http",
    "run_relay",
]
