"""Shared-state benchmark: what a new-name connection costs with SQLite and with Redis, and how
often the per-worker cache answers.

Run ``python -m benchmarks.bench_state [seconds]``. It starts its own ``redis-server`` on a free
loopback port (stopped at the end) and an SQLite store in a temporary directory.

A *new-name connection* is what a worker's driver asks the state store for a host name it has not
seen: the HSTS lookup of every suffix of the name (one ``get_many``) and the two learned-bypass
keys of the policy (two ``get_many``), all misses of the :class:`~tlsmitm.CachedStore`. Figures:

* ``{sqlite,redis}_new_name_us`` -- microseconds per new-name connection (store round trips
  included, run in the calling thread as the driver's worker thread would).
* ``redis_over_sqlite_new_name`` -- the ratio of the two.
* ``{sqlite,redis}_observe_us`` -- one STS observation written (SQLite: ``synchronous=FULL``,
  an fsync; Redis: one ``MULTI``/``EXEC``).
* ``cached_lookup_us`` -- an HSTS answer from the cache alone (``known_host_nowait``), what every
  connection to a recently seen name costs on the event loop.
* ``cache_hit_rate`` -- the share of HSTS lookups the cache answered, for 20,000 simulated
  connections at 500/s over 2,000 names with a Zipf-like popularity (s = 1.1), ``ttl`` 1 s.
"""

from __future__ import annotations

import itertools
import random
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from shutil import which

from tlsmitm import CachedStore, HstsStore, InterceptPolicy, PreloadList
from tlsmitm._hsts import UNANSWERED
from tlsmitm._sqlite_store import SqliteStore
from tlsmitm._store import MemoryStore, StateStore

from ._measure import component_main

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (./run installs it)")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def _per_call_us(operation: object, seconds: float) -> float:
    """Microseconds per call of ``operation()`` (best of three rounds)."""
    best = float("inf")
    counter = itertools.count()
    for _ in range(3):
        done = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / 3 or done < 20:
            operation(next(counter))  # type: ignore[operator]
            done += 1
        best = min(best, (time.perf_counter() - start) / done)
    return best * 1e6


def _measure_backend(backend: StateStore, seconds: float, tag: str) -> dict[str, float]:
    cache = CachedStore(backend, ttl=1.0)
    hsts = HstsStore(cache, preload=PreloadList.empty())
    policy = InterceptPolicy(store=cache)

    def new_name(n: int) -> None:
        name = f"n{n}.{tag}.example.org"
        hsts.known_host(name, now=NOW)
        for namespace, key in policy.learned_lookups(client_ip="192.0.2.7", host=name, port=443):
            cache.get_many(namespace, [key])

    def observe(n: int) -> None:
        hsts.observe(f"o{n}.{tag}.example.org", ["max-age=600"], now=NOW, secure_and_verified=True)

    return {
        f"{tag}_new_name_us": _per_call_us(new_name, seconds),
        f"{tag}_observe_us": _per_call_us(observe, seconds / 2),
    }


def _hit_rate() -> tuple[float, float]:
    clock = [0.0]
    cache = CachedStore(MemoryStore(), ttl=1.0, clock=lambda: clock[0])
    hsts = HstsStore(cache, preload=PreloadList.empty())
    rng = random.Random(7)
    names = [f"site{i}.example.org" for i in range(2000)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(names))]
    picks = rng.choices(names, weights=weights, k=20_000)
    for index, name in enumerate(picks):
        clock[0] = index / 500.0  # 500 connections per second
        if hsts.known_host_nowait(name, now=NOW) is UNANSWERED:
            hsts.known_host(name, now=NOW)  # the driver's thread fetches it
    hot = picks[-1]
    start = time.perf_counter()
    for _ in range(2000):
        hsts.known_host_nowait(hot, now=NOW)
    cached_us = (time.perf_counter() - start) / 2000 * 1e6
    return cache.health.hit_rate, cached_us


def run(seconds: float = 2.0) -> dict[str, float]:
    """Measure; returns the figures (see the module docstring)."""
    slot = max(seconds / 2, 0.3)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteStore(Path(tmp) / "state.sqlite3")
        try:
            results.update(_measure_backend(sqlite, slot, "sqlite"))
        finally:
            sqlite.close()
        from tlsmitm._redis_store import RedisStore

        process, url = _start_redis(Path(tmp))
        try:
            redis_store = RedisStore(url)
            try:
                results.update(_measure_backend(redis_store, slot, "redis"))
            finally:
                redis_store.close()
        finally:
            process.terminate()
            process.wait(timeout=10)
    results["redis_over_sqlite_new_name"] = (
        results["redis_new_name_us"] / results["sqlite_new_name_us"]
    )
    results["cache_hit_rate"], results["cached_lookup_us"] = _hit_rate()
    return results


def main(argv: list[str]) -> int:
    """Print the figures as a table."""
    return component_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
