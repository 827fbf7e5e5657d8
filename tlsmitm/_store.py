"""The small storage interface behind every piece of state tlsmitm remembers.

HSTS entries, learned bypasses and granted overrides all have the same shape: a key in a
namespace, an opaque value, and an expiry. :class:`StateStore` is that shape, so a deployment can
put the state of many machines in one shared server by implementing five methods. tlsmitm ships
:class:`MemoryStore` (tests and short-lived use) and ``SqliteStore`` (the embedded default, in
``_sqlite_store.py``).

Times are POSIX seconds (floats) passed in by the caller: stores never read a clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["MemoryStore", "StateStore", "StoredItem"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredItem:
    """One stored entry."""

    key: str
    value: bytes
    expires: float


@runtime_checkable
class StateStore(Protocol):
    """Key/value storage with expiry, partitioned into namespaces.

    Implementations must be safe to call from several threads. ``put`` must be durable when it
    returns (for persistent stores): an acknowledged write survives a crash.
    """

    def get(self, namespace: str, key: str) -> StoredItem | None:
        """The entry for ``key``, expired or not; ``None`` if absent."""
        ...

    def put(self, namespace: str, key: str, value: bytes, *, expires: float) -> None:
        """Insert or replace the entry for ``key``."""
        ...

    def delete(self, namespace: str, key: str) -> None:
        """Remove the entry for ``key`` if present."""
        ...

    def items(self, namespace: str) -> Iterator[StoredItem]:
        """Every entry in ``namespace`` (in no particular order)."""
        ...

    def evict(self, namespace: str, *, now: float, keep: int) -> int:
        """Drop expired entries, then the soonest-expiring ones until at most ``keep`` remain.

        Returns the number of entries removed.
        """
        ...


class MemoryStore:
    """A :class:`StateStore` in a dict; nothing survives the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, StoredItem]] = {}

    def get(self, namespace: str, key: str) -> StoredItem | None:
        with self._lock:
            return self._data.get(namespace, {}).get(key)

    def put(self, namespace: str, key: str, value: bytes, *, expires: float) -> None:
        item = StoredItem(key=key, value=bytes(value), expires=float(expires))
        with self._lock:
            self._data.setdefault(namespace, {})[key] = item

    def add_if_absent(
        self, namespace: str, key: str, value: bytes, *, expires: float, now: float
    ) -> bool:
        """Insert ``key`` unless an unexpired entry holds it; ``True`` when this call inserted."""
        with self._lock:
            table = self._data.setdefault(namespace, {})
            current = table.get(key)
            if current is not None and current.expires > now:
                return False
            table[key] = StoredItem(key=key, value=bytes(value), expires=float(expires))
            return True

    def delete(self, namespace: str, key: str) -> None:
        with self._lock:
            self._data.get(namespace, {}).pop(key, None)

    def items(self, namespace: str) -> Iterator[StoredItem]:
        with self._lock:
            snapshot = list(self._data.get(namespace, {}).values())
        return iter(snapshot)

    def evict(self, namespace: str, *, now: float, keep: int) -> int:
        with self._lock:
            table = self._data.get(namespace, {})
            before = len(table)
            for key in [k for k, item in table.items() if item.expires <= now]:
                del table[key]
            if len(table) > keep:
                by_expiry = sorted(table.values(), key=lambda item: item.expires)
                for item in by_expiry[: len(table) - max(keep, 0)]:
                    del table[item.key]
            return before - len(table)
