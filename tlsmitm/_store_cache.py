"""A per-worker cache and failure boundary in front of a shared :class:`~tlsmitm.StateStore`.

Theory of operation
-------------------

Several workers (processes) and several machines share one store -- SQLite in the state
directory, or Redis. Two things must hold whatever that store does:

* **The hot path does not wait for it.** Every connection asks whether its host is a Known HSTS
  Host and whether a bypass was learned for it. :class:`CachedStore` answers a read from memory
  when the entry (present *or absent*) was fetched less than ``ttl`` seconds ago, and
  :meth:`CachedStore.peek_many` tells a driver, without any I/O, whether it can answer on the event
  loop or must go to a thread. Writes update the cache at once (write-through), so this worker
  sees its own writes immediately and other workers within ``ttl``.
* **A state failure never costs a response.** A read-only, full, locked or unreachable store
  raises from the backend; the cache catches that, counts it, and logs it at WARNING at most once
  per ``report_every`` seconds. What happens next depends on the namespace:

  - *Remembered* namespaces (HSTS knowledge, learned bypasses: everything not in
    :data:`STRICT_NAMESPACES`) fall back to memory for the life of the process. A read is answered
    from the last value this worker saw, however old; a write that the backend refused is kept
    here ("pinned"), answered to every later read, and written to the backend again once it
    works. An HSTS host learned while Redis is away stays enforced.
  - *Strict* namespaces (override grants, error pages, spent nonces, the token key) are never
    cached and never answered from memory: their failures raise
    :class:`~tlsmitm.ConfigurationError` (``reason="state_unavailable"``) so that the caller
    refuses. No override is granted that cannot be checked, and a nonce that cannot be marked
    spent is not accepted.

Nothing here does I/O of its own or reads a wall clock: the backend does the I/O (call this from
a thread, not the event loop, when a read may miss), and ``clock`` (monotonic seconds) is
injected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from ._errors import ConfigurationError, TlsMitmError
from ._store import StateStore, StoredItem

__all__ = ["STRICT_NAMESPACES", "CachedStore", "StateHealth"]

#: Namespaces whose answers must come from the shared store itself, never from memory.
STRICT_NAMESPACES: Final[frozenset[str]] = frozenset({"override", "page", "nonce", "secret"})

_log = logging.getLogger("tlsmitm.state")

_Key = tuple[str, str]


@runtime_checkable
class _BatchGet(Protocol):
    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, StoredItem]: ...


@runtime_checkable
class _AddIfAbsent(Protocol):
    def add_if_absent(
        self, namespace: str, key: str, value: bytes, *, expires: float, now: float
    ) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StateHealth:
    """What :attr:`CachedStore.health` reports.

    Attributes:
        ok: the last backend call succeeded.
        failures: backend calls that failed since the process started.
        last_error: the message of the last failure (``""`` if none).
        pinned: entries held only in memory because the backend refused them.
        hits: reads answered from the cache.
        misses: reads that went to the backend.
    """

    ok: bool
    failures: int
    last_error: str
    pinned: int
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        """Hits over all reads (0.0 before the first read)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class CachedStore:
    """A :class:`~tlsmitm.StateStore` that caches reads and survives its backend's failures.

    Args:
        backend: the shared store (``SqliteStore``, ``RedisStore``, ...).
        ttl: how long (seconds) a fetched entry, present or absent, answers reads without asking
            the backend. Another worker's write becomes visible here within ``ttl``.
        clock: monotonic seconds (``time.monotonic`` by default).
        max_entries: the most entries cached (least recently used dropped first), and the most
            held in memory while the backend refuses writes (soonest-expiring dropped first).
        report_every: the least time (seconds) between two WARNING lines about failures.
        logger: where failures are reported (``tlsmitm.state`` by default).
    """

    def __init__(
        self,
        backend: StateStore,
        *,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 100_000,
        report_every: float = 60.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if not ttl >= 0:
            raise ValueError(f"ttl must be >= 0 seconds, not {ttl!r}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries!r}")
        self._backend = backend
        self._ttl = float(ttl)
        self._clock = clock
        self._max_entries = max_entries
        self._report_every = float(report_every)
        self._log = logger if logger is not None else _log
        self._lock = threading.Lock()
        # (namespace, key) -> (item or None for "absent", fetched at)
        self._cache: OrderedDict[_Key, tuple[StoredItem | None, float]] = OrderedDict()
        self._pinned: dict[_Key, StoredItem] = {}
        self._ok = True
        self._failures = 0
        self._unreported = 0
        self._last_report = -float("inf")
        self._last_error = ""
        self._hits = 0
        self._misses = 0

    @property
    def backend(self) -> StateStore:
        """The shared store behind the cache."""
        return self._backend

    @property
    def health(self) -> StateHealth:
        """Counters for logs, metrics and tests."""
        with self._lock:
            return StateHealth(
                ok=self._ok,
                failures=self._failures,
                last_error=self._last_error,
                pinned=len(self._pinned),
                hits=self._hits,
                misses=self._misses,
            )

    def close(self) -> None:
        """Close the backend, if it can be closed."""
        close = getattr(self._backend, "close", None)
        if callable(close):
            close()

    # -- failure accounting ----------------------------------------------------------------------

    def _failed(self, doing: str, exc: BaseException) -> None:
        now = self._clock()
        with self._lock:
            self._ok = False
            self._failures += 1
            self._unreported += 1
            self._last_error = str(exc)
            due = now - self._last_report >= self._report_every
            if due:
                count, self._unreported = self._unreported, 0
                self._last_report = now
        if due:
            self._log.warning(
                "state store failed during %s (%d failure(s) since the last report, %d in all): "
                "%s; HSTS knowledge and learned bypasses are kept in memory, overrides are "
                "refused until the store works again",
                doing,
                count,
                self._failures,
                exc,
            )

    def _succeeded(self) -> None:
        if self._ok:
            return
        with self._lock:
            was_ok, self._ok = self._ok, True
            pinned = list(self._pinned.items())
        if not was_ok and pinned:
            self._log.warning("state store works again; writing %d held entries", len(pinned))
        for (namespace, key), item in pinned:
            try:
                self._backend.put(namespace, key, item.value, expires=item.expires)
            except (TlsMitmError, OSError) as exc:
                self._failed("put", exc)
                return
            with self._lock:
                if self._pinned.get((namespace, key)) is item:
                    del self._pinned[(namespace, key)]
            self._remember(namespace, key, item, self._clock())

    def _strict_error(self, doing: str, exc: BaseException) -> ConfigurationError:
        self._failed(doing, exc)
        return ConfigurationError(
            f"the state store is unavailable ({exc}); refused rather than answered from memory",
            reason="state_unavailable",
        )

    # -- cache bookkeeping -----------------------------------------------------------------------

    def _remember(self, namespace: str, key: str, item: StoredItem | None, now: float) -> None:
        with self._lock:
            self._cache[(namespace, key)] = (item, now)
            self._cache.move_to_end((namespace, key))
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)

    def _merge(self, namespace: str, key: str, item: StoredItem | None) -> StoredItem | None:
        """The backend's answer, unless a pinned entry outlives it."""
        pinned = self._pinned.get((namespace, key))
        if pinned is not None and (item is None or pinned.expires > item.expires):
            return pinned
        return item

    def peek_many(self, namespace: str, keys: Sequence[str]) -> dict[str, StoredItem] | None:
        """Answer :meth:`get_many` from memory alone, or ``None`` when that needs the backend.

        Never does I/O: a driver calls it on its event loop, and goes to a thread only on
        ``None``.
        """
        if namespace in STRICT_NAMESPACES:
            return None
        now = self._clock()
        found: dict[str, StoredItem] = {}
        with self._lock:
            for key in keys:
                cached = self._cache.get((namespace, key))
                if cached is None or now - cached[1] >= self._ttl:
                    return None
                item = self._merge(namespace, key, cached[0])
                if item is not None:
                    found[key] = item
            self._hits += 1
        return found

    # -- StateStore ------------------------------------------------------------------------------

    def get(self, namespace: str, key: str) -> StoredItem | None:
        """The entry for ``key``: from the cache when fresh, else from the backend."""
        return self.get_many(namespace, [key]).get(key)

    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, StoredItem]:
        """The present entries among ``keys``, in one backend round trip on a miss."""
        if namespace in STRICT_NAMESPACES:
            try:
                result = self._fetch(namespace, keys)
            except (TlsMitmError, OSError) as exc:
                raise self._strict_error("get", exc) from exc
            self._succeeded()
            return result
        peeked = self.peek_many(namespace, keys)
        if peeked is not None:
            return peeked
        with self._lock:
            self._misses += 1
        now = self._clock()
        try:
            fetched = self._fetch(namespace, keys)
        except (TlsMitmError, OSError) as exc:
            self._failed("get", exc)
            with self._lock:  # memory fallback: the last value seen, however old
                found = {}
                for key in keys:
                    cached = self._cache.get((namespace, key))
                    item = self._merge(namespace, key, cached[0] if cached else None)
                    if item is not None:
                        found[key] = item
            return found
        found = {}
        for key in keys:
            self._remember(namespace, key, fetched.get(key), now)
            with self._lock:
                item = self._merge(namespace, key, fetched.get(key))
            if item is not None:
                found[key] = item
        self._succeeded()  # after the merge: it writes pinned entries back and unpins them
        return found

    def _fetch(self, namespace: str, keys: Sequence[str]) -> dict[str, StoredItem]:
        backend = self._backend
        if isinstance(backend, _BatchGet) and len(keys) > 1:
            return backend.get_many(namespace, keys)
        result: dict[str, StoredItem] = {}
        for key in keys:
            item = backend.get(namespace, key)
            if item is not None:
                result[key] = item
        return result

    def put(self, namespace: str, key: str, value: bytes, *, expires: float) -> None:
        """Write through; a remembered namespace keeps the entry in memory if the backend fails."""
        item = StoredItem(key=key, value=bytes(value), expires=float(expires))
        if namespace in STRICT_NAMESPACES:
            try:
                self._backend.put(namespace, key, item.value, expires=item.expires)
            except (TlsMitmError, OSError) as exc:
                raise self._strict_error("put", exc) from exc
            self._succeeded()
            return
        self._remember(namespace, key, item, self._clock())
        try:
            self._backend.put(namespace, key, item.value, expires=item.expires)
        except (TlsMitmError, OSError) as exc:
            with self._lock:
                self._pinned[(namespace, key)] = item
                if len(self._pinned) > self._max_entries:
                    # Bounded like the cache: a long outage cannot grow memory without end.
                    soonest = min(self._pinned, key=lambda k: self._pinned[k].expires)
                    del self._pinned[soonest]
            self._failed("put", exc)
            return
        with self._lock:
            self._pinned.pop((namespace, key), None)
        self._succeeded()

    def add_if_absent(
        self, namespace: str, key: str, value: bytes, *, expires: float, now: float
    ) -> bool:
        """The backend's atomic insert-if-absent; a failure raises (``state_unavailable``).

        Raises:
            ConfigurationError: the backend failed, or it has no atomic ``add_if_absent``.
        """
        backend = self._backend
        if not isinstance(backend, _AddIfAbsent):
            raise ConfigurationError(
                f"{type(backend).__name__} has no atomic add_if_absent; use MemoryStore, "
                "SqliteStore or RedisStore",
                reason="state_store",
            )
        try:
            added = backend.add_if_absent(namespace, key, value, expires=expires, now=now)
        except (TlsMitmError, OSError) as exc:
            raise self._strict_error("put", exc) from exc
        self._succeeded()
        return added

    def delete(self, namespace: str, key: str) -> None:
        """Delete here and in the backend (a strict namespace raises if the backend fails)."""
        if namespace not in STRICT_NAMESPACES:
            self._remember(namespace, key, None, self._clock())
            with self._lock:
                self._pinned.pop((namespace, key), None)
        try:
            self._backend.delete(namespace, key)
        except (TlsMitmError, OSError) as exc:
            if namespace in STRICT_NAMESPACES:
                raise self._strict_error("delete", exc) from exc
            self._failed("delete", exc)
            return
        self._succeeded()

    def items(self, namespace: str) -> Iterator[StoredItem]:
        """Every entry: the backend's, plus pinned ones; cached ones if the backend fails."""
        try:
            listed = list(self._backend.items(namespace))
        except (TlsMitmError, OSError) as exc:
            if namespace in STRICT_NAMESPACES:
                raise self._strict_error("items", exc) from exc
            self._failed("items", exc)
            with self._lock:
                seen = {k: c[0] for (ns, k), c in self._cache.items() if ns == namespace and c[0]}
                seen.update({k: v for (ns, k), v in self._pinned.items() if ns == namespace})
            return iter([item for item in seen.values() if item is not None])
        self._succeeded()
        with self._lock:
            merged = {item.key: item for item in listed}
            merged.update({k: v for (ns, k), v in self._pinned.items() if ns == namespace})
        return iter(list(merged.values()))

    def evict(self, namespace: str, *, now: float, keep: int) -> int:
        """The backend's eviction; ``0`` when it fails (a remembered namespace carries on)."""
        try:
            removed = self._backend.evict(namespace, now=now, keep=keep)
        except (TlsMitmError, OSError) as exc:
            if namespace in STRICT_NAMESPACES:
                raise self._strict_error("evict", exc) from exc
            self._failed("evict", exc)
            return 0
        self._succeeded()
        if removed:
            with self._lock:  # entries the backend dropped must not live on here
                for cached_key in [k for k in self._cache if k[0] == namespace]:
                    del self._cache[cached_key]
        return removed

    def invalidate(self, namespace: str | None = None) -> None:
        """Forget cached reads (all, or one namespace's); pinned entries stay."""
        with self._lock:
            if namespace is None:
                self._cache.clear()
            else:
                for cached_key in [k for k in self._cache if k[0] == namespace]:
                    del self._cache[cached_key]
