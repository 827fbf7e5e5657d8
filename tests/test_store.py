"""The in-memory StateStore (the SQLite one has its own tests)."""

from __future__ import annotations

import threading

from tlsmitm._store import MemoryStore, StateStore


def test_memory_store_round_trip_and_namespaces() -> None:
    store = MemoryStore()
    assert isinstance(store, StateStore)
    store.put("a", "k", b"v1", expires=10.0)
    store.put("b", "k", b"v2", expires=20.0)
    item = store.get("a", "k")
    assert item is not None
    assert (item.value, item.expires) == (b"v1", 10.0)
    assert store.get("b", "k") is not None
    store.delete("a", "k")
    assert store.get("a", "k") is None
    assert store.get("b", "k") is not None
    store.delete("a", "missing")  # no error


def test_evict_expired_then_soonest_expiring() -> None:
    store = MemoryStore()
    for i in range(10):
        store.put("ns", f"k{i}", b"x", expires=float(i))
    removed = store.evict("ns", now=2.0, keep=5)  # k0..k2 expired, then k3..k4 soonest
    assert removed == 5
    assert sorted(item.key for item in store.items("ns")) == ["k5", "k6", "k7", "k8", "k9"]


def test_thread_safety() -> None:
    store = MemoryStore()

    def writer(n: int) -> None:
        for i in range(500):
            store.put("ns", f"{n}-{i}", b"x", expires=1e9)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list(store.items("ns"))) == 2000
