"""CachedStore: per-worker reads from memory, and state failures that never cost a response."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import pytest

from tlsmitm._errors import ConfigurationError
from tlsmitm._hsts import UNANSWERED, HstsStore, PreloadList
from tlsmitm._store import MemoryStore, StoredItem
from tlsmitm._store_cache import CachedStore

FAR = 4_000_000_000.0
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FlakyStore(MemoryStore):
    """A MemoryStore that fails every call while ``down``, and counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise ConfigurationError("attempt to write a readonly database", reason="state_store")

    def get(self, namespace: str, key: str) -> StoredItem | None:
        self._check()
        return super().get(namespace, key)

    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, StoredItem]:
        self._check()
        found = {}
        for key in keys:
            item = super().get(namespace, key)
            if item is not None:
                found[key] = item
        return found

    def put(self, namespace: str, key: str, value: bytes, *, expires: float) -> None:
        self._check()
        super().put(namespace, key, value, expires=expires)

    def add_if_absent(
        self, namespace: str, key: str, value: bytes, *, expires: float, now: float
    ) -> bool:
        self._check()
        return super().add_if_absent(namespace, key, value, expires=expires, now=now)

    def delete(self, namespace: str, key: str) -> None:
        self._check()
        super().delete(namespace, key)

    def items(self, namespace: str) -> Iterator[StoredItem]:
        self._check()
        return super().items(namespace)

    def evict(self, namespace: str, *, now: float, keep: int) -> int:
        self._check()
        return super().evict(namespace, now=now, keep=keep)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts() -> tuple[FlakyStore, Clock, CachedStore]:
    backend, clock = FlakyStore(), Clock()
    return backend, clock, CachedStore(backend, ttl=1.0, clock=clock, report_every=60.0)


def test_fresh_reads_come_from_memory_and_expire_after_ttl(
    parts: tuple[FlakyStore, Clock, CachedStore],
) -> None:
    backend, clock, cache = parts
    backend.put("hsts", "a.test", b"v", expires=FAR)
    calls = backend.calls
    assert cache.get("hsts", "a.test") is not None
    assert cache.get("hsts", "absent.test") is None
    assert backend.calls == calls + 2
    assert cache.get("hsts", "a.test") is not None  # fresh: no backend call
    assert cache.get("hsts", "absent.test") is None  # absence is cached too
    assert backend.calls == calls + 2
    backend.put("hsts", "absent.test", b"v", expires=FAR)  # another worker writes
    clock.now += 1.0
    assert cache.get("hsts", "absent.test") is not None  # seen within ttl
    assert cache.health.hits == 2
    assert cache.health.misses == 3
    assert 0 < cache.health.hit_rate < 1


def test_peek_never_does_io(parts: tuple[FlakyStore, Clock, CachedStore]) -> None:
    backend, clock, cache = parts
    assert cache.peek_many("hsts", ["a.test"]) is None
    cache.get_many("hsts", ["a.test", "test"])
    calls = backend.calls
    assert cache.peek_many("hsts", ["a.test", "test"]) == {}
    assert cache.peek_many("override", ["x"]) is None  # strict: never from memory
    clock.now += 5
    assert cache.peek_many("hsts", ["a.test"]) is None
    assert backend.calls == calls


def test_hsts_nowait_answers_from_the_cache_or_asks_for_a_thread(
    parts: tuple[FlakyStore, Clock, CachedStore],
) -> None:
    _, _, cache = parts
    hsts = HstsStore(cache, preload=PreloadList({"preloaded.test": True}))
    assert hsts.known_host_nowait("www.preloaded.test", now=NOW) is not None  # no store needed
    assert hsts.known_host_nowait("a.example.test", now=NOW) is UNANSWERED
    hsts.observe("a.example.test", ["max-age=600"], now=NOW, secure_and_verified=True)
    assert hsts.is_known_host("a.example.test", now=NOW)
    answer = hsts.known_host_nowait("a.example.test", now=NOW)
    assert answer is not UNANSWERED
    assert answer is not None


def test_a_failing_store_falls_back_to_memory_for_hsts(
    parts: tuple[FlakyStore, Clock, CachedStore], caplog: pytest.LogCaptureFixture
) -> None:
    backend, clock, cache = parts
    hsts = HstsStore(cache, preload=PreloadList.empty())
    hsts.observe("before.test", ["max-age=600"], now=NOW, secure_and_verified=True)
    backend.down = True
    clock.now += 10  # the cache entry is stale: the store is asked, and fails
    with caplog.at_level(logging.WARNING, logger="tlsmitm.state"):
        assert hsts.is_known_host("before.test", now=NOW)  # the last value seen
        policy = hsts.observe("during.test", ["max-age=600"], now=NOW, secure_and_verified=True)
        assert policy is not None  # no exception: the response goes on
        assert hsts.is_known_host("during.test", now=NOW)
        for _ in range(50):
            hsts.is_known_host("other.test", now=NOW)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited: one line per report_every
    assert "readonly" in warnings[0].getMessage()
    assert cache.health.failures >= 50
    clock.now += 61
    with caplog.at_level(logging.WARNING, logger="tlsmitm.state"):
        hsts.is_known_host("other.test", now=NOW)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert "failure(s) since the last report" in caplog.records[-1].getMessage()
    # Back: the entry held in memory is written to the store.
    backend.down = False
    clock.now += 10
    assert hsts.is_known_host("during.test", now=NOW)
    assert backend.get("hsts", "during.test") is not None
    assert cache.health.pinned == 0
    assert hsts.is_known_host("during.test", now=NOW)  # and the cache agrees
    assert cache.health.ok


def test_strict_namespaces_refuse_rather_than_answer_from_memory(
    parts: tuple[FlakyStore, Clock, CachedStore],
) -> None:
    backend, _, cache = parts
    cache.put("override", "grant", b"granted", expires=FAR)
    assert cache.get("override", "grant") is not None
    backend.down = True
    for call in (
        lambda: cache.get("override", "grant"),
        lambda: cache.put("override", "g2", b"x", expires=FAR),
        lambda: cache.add_if_absent("nonce", "n", b"x", expires=FAR, now=0.0),
        lambda: cache.delete("page", "p"),
        lambda: list(cache.items("override")),
    ):
        with pytest.raises(ConfigurationError) as info:
            call()
        assert info.value.reason == "state_unavailable"


def test_add_if_absent_is_single_use(parts: tuple[FlakyStore, Clock, CachedStore]) -> None:
    _, _, cache = parts
    assert cache.add_if_absent("nonce", "n", b"x", expires=2000.0, now=1000.0)
    assert not cache.add_if_absent("nonce", "n", b"x", expires=2000.0, now=1500.0)
    assert cache.add_if_absent("nonce", "n", b"x", expires=4000.0, now=2000.0)  # expired


def test_evict_and_delete_keep_the_cache_honest(
    parts: tuple[FlakyStore, Clock, CachedStore],
) -> None:
    _, _, cache = parts
    cache.put("hsts", "a", b"v", expires=1.0)
    cache.put("hsts", "b", b"v", expires=FAR)
    assert cache.evict("hsts", now=500.0, keep=10) == 1
    assert cache.get("hsts", "a") is None
    cache.delete("hsts", "b")
    assert cache.get("hsts", "b") is None
    assert list(cache.items("hsts")) == []


async def test_prefetch_fetches_learned_bypasses_so_decide_does_no_io() -> None:
    from types import SimpleNamespace

    from tlsmitm import InterceptPolicy
    from tlsmitm._relay.state_io import prefetch_state

    backend = FlakyStore()
    InterceptPolicy(store=backend).note_client_certificate_requested(
        host="bank.test", port=443, upstream_verified=True, now=NOW
    )
    cache = CachedStore(backend, ttl=60.0)
    policy = InterceptPolicy(store=cache)
    ix = SimpleNamespace(policy=policy)
    await prefetch_state(ix, "192.0.2.1", ["bank.test"], 443, None, NOW)  # type: ignore[arg-type]
    calls = backend.calls
    decision = await policy.decide(client_ip="192.0.2.1", host="bank.test", port=443, now=NOW)
    assert (decision.intercept, decision.reason) == (False, "learned_client_cert")
    assert backend.calls == calls  # answered from the cache: no store call on the event loop
    await prefetch_state(ix, "192.0.2.1", ["bank.test"], 443, None, NOW)  # type: ignore[arg-type]
    assert backend.calls == calls  # already cached: nothing fetched


def test_entries_held_during_an_outage_are_bounded() -> None:
    backend, clock = FlakyStore(), Clock()
    cache = CachedStore(backend, ttl=1.0, clock=clock, max_entries=3)
    backend.down = True
    for n in range(5):
        cache.put("hsts", f"h{n}.test", b"v", expires=FAR + n)
    assert cache.health.pinned == 3
    backend.down = False
    clock.now += 5
    cache.get("hsts", "h4.test")  # works again: the held entries are written back
    assert sorted(item.key for item in backend.items("hsts")) == ["h2.test", "h3.test", "h4.test"]
