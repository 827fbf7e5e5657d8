"""HSTS benchmark: header parsing, known-host lookups and observations, per store.

Run ``python -m benchmarks.bench_hsts [seconds]``. :func:`run` returns the figures as a dict so
that a benchmark driver can collect them.

Figures (all per second unless the name says otherwise):

* ``parse_per_s`` -- :func:`~tlsmitm.parse_sts` over a mix of real-world headers.
* ``preload_decode_s`` -- seconds to decode the bundled preload list (done once per process).
* ``lookup_{preloaded,observed,miss}_per_s`` -- :meth:`~tlsmitm.HstsStore.is_known_host` on a
  :class:`~tlsmitm.MemoryStore` with the bundled list, for names seen before (the normalisation
  cache is warm).
* ``lookup_distinct_per_s`` -- the same for names never seen before (cold cache).
* ``sqlite_lookup_{hit,miss}_per_s`` -- lookups against a SQLite store of 2 000 entries.
* ``memory_observe_per_s`` / ``sqlite_observe_per_s`` -- :meth:`~tlsmitm.HstsStore.observe`;
  every SQLite observation is a durable commit (one ``fsync``).
* ``hstspreload_package_per_s`` -- the ``hstspreload`` package's own per-name lookup (reads its
  data file each time) on distinct names, for comparison.
"""

from __future__ import annotations

import functools
import itertools
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tlsmitm._hsts import HstsStore, PreloadList, _decode_hstspreload, parse_sts
from tlsmitm._sqlite_store import SqliteStore
from tlsmitm._store import MemoryStore

from ._measure import component_main, rate

NOW = datetime(2026, 3, 1, tzinfo=UTC)
HEADERS = [
    "max-age=31536000; includeSubDomains; preload",
    "max-age=15768000",
    'max-age="63072000"; includeSubDomains',
    "max-age=0",
    ";;    ; ; max-age=394082038;;; includeSubdomains     ;;  ;",
    "max-age=1; includeSubDomains; iNcLUdEsUbDoMaInS",  # invalid
]


_rate = functools.partial(rate, batch=200)


def _cycle(items: list[str]) -> Callable[[], str]:
    iterator: Iterator[str] = itertools.cycle(items)
    return lambda: next(iterator)


def _fresh_names(prefix: str) -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter)}.example.org"


def run(seconds: float = 2.0) -> dict[str, float]:
    """Measure every figure, spending about ``seconds`` in total; returns ``{name: value}``."""
    slot = max(seconds, 0.1) / 11
    results: dict[str, float] = {}

    next_header = _cycle(HEADERS)
    results["parse_per_s"] = _rate(lambda: parse_sts(next_header()), slot)

    start = time.perf_counter()
    decoded = _decode_hstspreload()
    results["preload_decode_s"] = time.perf_counter() - start
    results["preload_entries"] = float(len(decoded))

    preload = PreloadList.bundled()
    memory = HstsStore(MemoryStore(), preload=preload)
    for i in range(1000):
        memory.observe(
            f"site{i}.example.net",
            ["max-age=31536000; includeSubDomains"],
            now=NOW,
            secure_and_verified=True,
        )
    later = NOW + timedelta(days=1)
    preloaded = _cycle(["mail.paypal.com", "www.preloaded-hsts.badssl.com", "x.y.dev"])
    observed = _cycle([f"www.site{i}.example.net" for i in range(100)])
    misses = _cycle([f"www.other{i}.example.com" for i in range(100)])
    distinct = _fresh_names("cold")
    results["lookup_preloaded_per_s"] = _rate(
        lambda: memory.is_known_host(preloaded(), now=later), slot
    )
    results["lookup_observed_per_s"] = _rate(
        lambda: memory.is_known_host(observed(), now=later), slot
    )
    results["lookup_miss_per_s"] = _rate(lambda: memory.is_known_host(misses(), now=later), slot)
    results["lookup_distinct_per_s"] = _rate(
        lambda: memory.is_known_host(distinct(), now=later), slot
    )
    fresh = _fresh_names("mem")
    results["memory_observe_per_s"] = _rate(
        lambda: memory.observe(fresh(), ["max-age=1000"], now=NOW, secure_and_verified=True),
        slot,
    )

    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "state.sqlite3")
        try:
            value = b'{"v":1,"include_subdomains":true,"observed":0}'
            expires = later.timestamp() + 1e6
            for i in range(2_000):
                store.put("hsts", f"site{i}.example.net", value, expires=expires)
            sqlite = HstsStore(store, preload=preload)
            results["sqlite_lookup_hit_per_s"] = _rate(
                lambda: sqlite.is_known_host(observed(), now=later), slot
            )
            results["sqlite_lookup_miss_per_s"] = _rate(
                lambda: sqlite.is_known_host(misses(), now=later), slot
            )
            fresh_sqlite = _fresh_names("sql")
            results["sqlite_observe_per_s"] = _rate(
                lambda: sqlite.observe(
                    fresh_sqlite(), ["max-age=1000"], now=NOW, secure_and_verified=True
                ),
                slot,
                batch=20,
            )
        finally:
            store.close()

    import hstspreload

    package_names = _fresh_names("pkg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its use of open_binary
        results["hstspreload_package_per_s"] = _rate(
            lambda: hstspreload.in_hsts_preload(package_names()), slot, batch=20
        )
    return results


def main(argv: list[str]) -> int:
    """Print the figures as a table."""
    return component_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
