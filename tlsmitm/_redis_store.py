"""A :class:`~tlsmitm.StateStore` in Redis, for several machines serving one user population.

Theory of operation
-------------------

Each entry is one Redis string ``<prefix>e:<namespace>:<key>`` whose value is the entry's expiry
(8 bytes, a big-endian IEEE double of POSIX seconds) followed by its value, and which Redis itself
expires at that time (``PXAT``). Each namespace also has a sorted set ``<prefix>i:<namespace>``
of its keys scored by expiry, so that :meth:`RedisStore.evict` can drop the soonest-expiring ones
and :meth:`RedisStore.items` can list them without ``KEYS``. A write is one ``MULTI``/``EXEC``
transaction (entry and index together); :meth:`RedisStore.add_if_absent` is ``SET NX``, atomic
across every node.

The client is redis-py's synchronous one with its thread-safe connection pool: call the store from
threads (``trio.to_thread``), never on an event loop. Every call is bounded by ``timeout``; when
Redis is away each call fails fast with :class:`~tlsmitm.ConfigurationError`
(``reason="state_unavailable"``) and redis-py reconnects on the next call once Redis is back.
:class:`~tlsmitm.CachedStore` turns those failures into the documented fallbacks.

This module is the one edge where :mod:`redis` exceptions are mapped into tlsmitm's tree.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.exceptions

from ._errors import ConfigurationError
from ._store import StoredItem

__all__ = ["RedisStore"]

_EXPIRY = struct.Struct("!d")
_MAX_MS = 2**62  # Redis accepts PXAT up to a signed 64-bit millisecond count


def _pxat(expires: float) -> int:
    if math.isnan(expires):
        raise ValueError("expires must be a number of POSIX seconds, not NaN")
    if expires == math.inf:
        return _MAX_MS
    return min(max(1, math.ceil(expires * 1000)), _MAX_MS)


class RedisStore:
    """Shared state in one Redis database.

    Args:
        url: ``redis://[:PASSWORD@]HOST:PORT/DB`` (``rediss://`` for TLS, ``unix:///path`` for a
            socket), as redis-py's ``from_url`` understands it.
        prefix: the start of every key this store writes, so that one database can hold other
            data (or several tlsmitm installations).
        timeout: the longest (seconds) one call may wait to connect or for an answer.

    Raises:
        ConfigurationError: the URL is not a Redis URL (``reason="state_store"``). An unreachable
            server is *not* an error here: the first call fails, and later calls retry.
    """

    def __init__(self, url: str, *, prefix: str = "tlsmitm:", timeout: float = 1.0) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigurationError(
                f"{url!r} is not a Redis URL; write redis://HOST:PORT/DB", reason="state_store"
            )
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        try:
            self._client: Any = redis.Redis.from_url(  # redis-py's return types are loose
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry_on_timeout=False,
                health_check_interval=30,
            )
        except (ValueError, redis.exceptions.RedisError) as exc:
            raise ConfigurationError(
                f"cannot use the Redis URL {url!r}: {exc}; write redis://HOST:PORT/DB",
                reason="state_store",
            ) from exc
        self._url = url
        self._prefix = prefix

    def __repr__(self) -> str:
        parts = urlsplit(self._url)
        shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no password
        return f"RedisStore({shown!r})"

    def close(self) -> None:
        """Close the connection pool (idempotent)."""
        self._client.close()

    # -- keys and values -------------------------------------------------------------------------

    def _entry(self, namespace: str, key: str) -> str:
        return f"{self._prefix}e:{namespace}:{key}"

    def _index(self, namespace: str) -> str:
        return f"{self._prefix}i:{namespace}"

    @staticmethod
    def _decode(key: str, raw: Any) -> StoredItem | None:
        if not isinstance(raw, bytes) or len(raw) < _EXPIRY.size:
            return None  # absent, or not ours: never raise on another writer's data
        (expires,) = _EXPIRY.unpack_from(raw)
        return StoredItem(key=key, value=raw[_EXPIRY.size :], expires=expires)

    def _call(self, doing: str, operation: Any, *args: Any) -> Any:
        try:
            return operation(*args)
        except redis.exceptions.RedisError as exc:
            raise ConfigurationError(
                f"the Redis state store {self!r} failed during {doing}: {exc}; check that Redis "
                "is running and reachable (tlsmitm retries on the next request)",
                reason="state_unavailable",
            ) from exc

    # -- StateStore ------------------------------------------------------------------------------

    def ping(self) -> None:
        """Ask Redis to answer; raises :class:`~tlsmitm.ConfigurationError` if it does not."""
        self._call("ping", self._client.ping)

    def get(self, namespace: str, key: str) -> StoredItem | None:
        """The entry for ``key``; ``None`` if absent (or expired: Redis drops it)."""
        raw = self._call("get", self._client.get, self._entry(namespace, key))
        return self._decode(key, raw)

    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, StoredItem]:
        """The present entries among ``keys``, in one ``MGET``."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        raws = self._call("get", self._client.mget, [self._entry(namespace, k) for k in wanted])
        found = {}
        for key, raw in zip(wanted, raws, strict=True):
            item = self._decode(key, raw)
            if item is not None:
                found[key] = item
        return found

    def put(self, namespace: str, key: str, value: bytes, *, expires: float) -> None:
        """Insert or replace the entry for ``key``; acknowledged by Redis when this returns."""
        pxat = _pxat(float(expires))
        blob = _EXPIRY.pack(float(expires)) + bytes(value)

        def operation() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._entry(namespace, key), blob, pxat=pxat)
            pipe.zadd(self._index(namespace), {key: float(expires)})
            pipe.execute()

        self._call("put", operation)

    def add_if_absent(
        self, namespace: str, key: str, value: bytes, *, expires: float, now: float
    ) -> bool:
        """``SET NX``: ``True`` when this call created the entry (exactly one caller wins).

        An entry past its expiry is already gone in Redis, so ``now`` is not consulted.
        """
        pxat = _pxat(float(expires))
        blob = _EXPIRY.pack(float(expires)) + bytes(value)

        def operation() -> bool:
            created = self._client.set(self._entry(namespace, key), blob, pxat=pxat, nx=True)
            if created:
                self._client.zadd(self._index(namespace), {key: float(expires)})
            return bool(created)

        result: bool = self._call("put", operation)
        return result

    def delete(self, namespace: str, key: str) -> None:
        """Remove the entry for ``key`` if present."""

        def operation() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._entry(namespace, key))
            pipe.zrem(self._index(namespace), key)
            pipe.execute()

        self._call("delete", operation)

    def items(self, namespace: str) -> Iterator[StoredItem]:
        """Every present entry in ``namespace``, as a snapshot."""

        def operation() -> list[StoredItem]:
            members = [
                m.decode("utf-8", "replace")
                for m in self._client.zrange(self._index(namespace), 0, -1)
            ]
            found: list[StoredItem] = []
            for start in range(0, len(members), 500):
                chunk = members[start : start + 500]
                raws = self._client.mget([self._entry(namespace, k) for k in chunk])
                for key, raw in zip(chunk, raws, strict=True):
                    item = self._decode(key, raw)
                    if item is not None:
                        found.append(item)
            return found

        listed: list[StoredItem] = self._call("items", operation)
        return iter(listed)

    def evict(self, namespace: str, *, now: float, keep: int) -> int:
        """Drop expired entries, then the soonest-expiring ones until at most ``keep`` remain."""
        keep = max(int(keep), 0)
        index = self._index(namespace)

        def operation() -> int:
            expired = self._client.zrangebyscore(index, "-inf", float(now))
            removed = 0
            if expired:
                pipe = self._client.pipeline(transaction=True)
                pipe.zrem(index, *expired)
                pipe.delete(*[self._entry(namespace, m.decode()) for m in expired])
                removed += int(pipe.execute()[0])
            excess = int(self._client.zcard(index)) - keep
            if excess > 0:
                popped = self._client.zpopmin(index, excess)
                if popped:
                    self._client.delete(*[self._entry(namespace, m.decode()) for m, _ in popped])
                    removed += len(popped)
            return removed

        result: int = self._call("evict", operation)
        return result
