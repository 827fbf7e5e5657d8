"""RedisStore against a real redis-server: the StateStore contract, atomicity, outages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis_server import RedisServer, free_port, running_redis

from tlsmitm._errors import ConfigurationError
from tlsmitm._hsts import HstsStore, PreloadList
from tlsmitm._redis_store import RedisStore
from tlsmitm._store import StoredItem
from tlsmitm._store_cache import CachedStore

FAR = 4_000_000_000.0  # 2096: far future, POSIX seconds


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path) as running:
        yield running


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisStore]:
    redis_store = RedisStore(server.url)
    yield redis_store
    redis_store.close()


def test_contract(store: RedisStore) -> None:
    assert store.get("ns", "missing") is None
    store.put("ns", "a", b"\x00one", expires=FAR)
    store.put("ns", "b:with:colons", b"two", expires=FAR + 1)
    store.put("other", "a", b"elsewhere", expires=FAR)
    assert store.get("ns", "a") == StoredItem(key="a", value=b"\x00one", expires=FAR)
    assert store.get_many("ns", ["a", "b:with:colons", "c"]) == {
        "a": StoredItem(key="a", value=b"\x00one", expires=FAR),
        "b:with:colons": StoredItem(key="b:with:colons", value=b"two", expires=FAR + 1),
    }
    assert sorted(item.key for item in store.items("ns")) == ["a", "b:with:colons"]
    store.delete("ns", "a")
    assert store.get("ns", "a") is None
    assert store.get("other", "a") is not None
    assert [item.key for item in store.items("ns")] == ["b:with:colons"]


def test_redis_expires_entries_itself(store: RedisStore) -> None:
    soon = time.time() + 0.2
    store.put("ns", "short", b"v", expires=soon)
    assert store.get("ns", "short") is not None
    deadline = time.monotonic() + 10
    while store.get("ns", "short") is not None:
        assert time.monotonic() < deadline, "Redis never expired the entry"
        time.sleep(0.05)


def test_evict_expired_then_soonest(store: RedisStore) -> None:
    now = time.time()
    store.put("ns", "past", b"v", expires=now - 1)  # already gone from Redis, still indexed
    for n in range(5):
        store.put("ns", f"k{n}", b"v", expires=FAR + n)
    removed = store.evict("ns", now=now, keep=3)
    assert removed == 3  # "past" and the two soonest-expiring
    assert sorted(item.key for item in store.items("ns")) == ["k2", "k3", "k4"]


def test_add_if_absent_has_exactly_one_winner(store: RedisStore) -> None:
    winners: list[int] = []
    barrier = threading.Barrier(8)

    def race(n: int) -> None:
        other = RedisStore(store._url)
        try:
            barrier.wait()
            if other.add_if_absent("nonce", "n1", b"spent", expires=FAR, now=time.time()):
                winners.append(n)
        finally:
            other.close()

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(winners) == 1
    assert not store.add_if_absent("nonce", "n1", b"again", expires=FAR, now=time.time())


def test_unreachable_redis_fails_fast_and_says_what_to_do() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as info:
        store.get("hsts", "example.com")
    assert info.value.reason == "state_unavailable"
    assert "check that Redis is running" in str(info.value)
    assert time.monotonic() - started < 10
    store.close()


def test_not_a_redis_url() -> None:
    with pytest.raises(ConfigurationError, match="redis://HOST:PORT/DB"):
        RedisStore("http://127.0.0.1:6379/0")


def test_password_is_not_shown() -> None:
    store = RedisStore("redis://:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in repr(store)
    store.close()


# -- outages, through the cache every node puts in front of Redis -------------------------------


def _hsts(store: CachedStore) -> HstsStore:
    return HstsStore(store, preload=PreloadList({"preloaded.test": True}))


def test_when_redis_goes_away_hsts_stays_enforced_and_overrides_are_refused(
    server: RedisServer,
) -> None:
    now = datetime.now(UTC)
    cache = CachedStore(RedisStore(server.url, timeout=0.5), ttl=0.0)
    hsts = _hsts(cache)
    hsts.observe("bank.test", ["max-age=31536000"], now=now, secure_and_verified=True)
    assert hsts.is_known_host("bank.test", now=now)
    cache.put("override", "grant", b"granted", expires=FAR)
    assert cache.get("override", "grant") is not None

    server.stop()
    # HSTS: from the local cache (ttl 0: every read goes to Redis first, and fails) and the
    # preload list.
    assert hsts.is_known_host("bank.test", now=now)
    assert hsts.is_known_host("www.preloaded.test", now=now)
    assert not hsts.is_known_host("unknown.test", now=now)
    # A host learned while Redis is away is enforced for the life of the process.
    hsts.observe("learned-offline.test", ["max-age=600"], now=now, secure_and_verified=True)
    assert hsts.is_known_host("learned-offline.test", now=now)
    # An override cannot be checked, so it is not granted.
    with pytest.raises(ConfigurationError) as info:
        cache.get("override", "grant")
    assert info.value.reason == "state_unavailable"
    health = cache.health
    assert not health.ok
    assert health.failures >= 3
    assert health.pinned == 1

    server.start()  # same port, empty database (no persistence): a Redis that lost its data
    assert cache.get("override", "grant") is None  # reconnected; the grant is gone with Redis
    assert cache.health.ok
    # The entry learned during the outage was written back once Redis answered again.
    other_node = RedisStore(server.url)
    assert other_node.get("hsts", "learned-offline.test") is not None
    other_node.close()
    assert cache.health.pinned == 0
    cache.close()
