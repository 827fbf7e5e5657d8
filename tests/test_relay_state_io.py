"""The relay's state reads: one thread hop per connection, and no answer a read would not give."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from tlsmitm import CachedStore, HstsStore, InterceptPolicy, MemoryStore
from tlsmitm._hsts import PreloadList
from tlsmitm._relay.state_io import StateWriter, hsts_known, prefetch_state

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


class CountingStore(MemoryStore):
    """A MemoryStore that counts the reads that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get(self, namespace: str, key: str) -> Any:
        self.reads += 1
        return super().get(namespace, key)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_ix(backend: MemoryStore, clock: Clock) -> SimpleNamespace:
    store = CachedStore(backend, ttl=1.0, clock=clock)
    return SimpleNamespace(
        policy=InterceptPolicy(store=store),
        hsts=HstsStore(store=store, preload=PreloadList.empty()),
        state_writer=StateWriter(),
    )


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[], object]]:
    calls: list[Callable[[], object]] = []
    real = trio.to_thread.run_sync

    async def counting(fn: Callable[..., object], *args: object, **kwargs: Any) -> object:
        calls.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    return calls


async def test_a_new_name_costs_one_thread_hop_then_reads_from_memory(
    hops: list[Callable[[], object]],
) -> None:
    backend, clock = CountingStore(), Clock()
    ix = make_ix(backend, clock)
    await prefetch_state(ix, "10.0.0.1", ("a.test", "b.test"), 443, "b.test", NOW)  # type: ignore[arg-type]
    assert len(hops) == 1
    assert backend.reads > 0
    reads = backend.reads
    decision = await ix.policy.decide(client_ip="10.0.0.1", host="a.test", port=443, now=NOW)
    assert decision.intercept
    assert await hsts_known(ix, "b.test", NOW) is False  # type: ignore[arg-type]
    assert len(hops) == 1  # all answered from the cache
    assert backend.reads == reads
    # Everything fresh: a second prefetch needs no hop at all.
    await prefetch_state(ix, "10.0.0.1", ("a.test",), 443, "b.test", NOW)  # type: ignore[arg-type]
    assert len(hops) == 1


async def test_prefetched_entries_past_the_ttl_are_read_again(
    hops: list[Callable[[], object]],
) -> None:
    backend, clock = CountingStore(), Clock()
    ix = make_ix(backend, clock)
    await prefetch_state(ix, "10.0.0.1", ("a.test",), 443, "a.test", NOW)  # type: ignore[arg-type]
    assert len(hops) == 1
    # Another worker records STS for a.test in the shared store after the prefetch...
    HstsStore(store=backend, preload=PreloadList.empty()).observe(
        "a.test", ["max-age=3600"], now=NOW, secure_and_verified=True
    )
    clock.now += 1.5  # ...and the prefetched "absent" is older than the cache's ttl
    assert await hsts_known(ix, "a.test", NOW) is True  # type: ignore[arg-type]
    assert len(hops) == 2  # read again, from a thread


async def test_a_queued_sts_write_keeps_hsts_out_of_the_prefetch(
    hops: list[Callable[[], object]],
) -> None:
    backend, clock = CountingStore(), Clock()
    ix = make_ix(backend, clock)
    ix.state_writer._running = True  # queue writes instead of running them inline
    ix.state_writer.observe_sts(ix.hsts, "a.test", [b"max-age=0"], now=NOW)
    assert ix.state_writer.pending_for("www.a.test")
    await prefetch_state(ix, "10.0.0.1", ("a.test",), 443, "www.a.test", NOW)  # type: ignore[arg-type]
    # Only the policy's reads went: HSTS waits for the write (hsts_known settles first).
    assert len(hops) == 1
    assert ix.hsts.known_host_nowait("www.a.test", now=NOW) is not None
    assert not ix.state_writer.pending_for("b.test")


async def test_a_host_known_from_memory_needs_no_hsts_read(
    hops: list[Callable[[], object]],
) -> None:
    backend, clock = CountingStore(), Clock()
    ix = make_ix(backend, clock)
    ix.state_writer.observe_sts(ix.hsts, "a.test", [b"max-age=3600"], now=NOW)  # inline write
    await prefetch_state(ix, "10.0.0.1", (), 443, "a.test", NOW)  # type: ignore[arg-type]
    assert hops == []
    assert await hsts_known(ix, "a.test", NOW) is True  # type: ignore[arg-type]
