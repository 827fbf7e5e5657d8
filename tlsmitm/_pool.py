"""Kept for embedders that imported from here: the pool lives in :mod:`tlsmitm._relay.pool`."""

from __future__ import annotations

from ._relay.pool import REPEAT_WINDOW, PooledUpstream, PoolKey, UpstreamPool

__all__ = ["REPEAT_WINDOW", "PoolKey", "PooledUpstream", "UpstreamPool"]
