"""Start-up: the big tables load after ``serve`` listens, not before (docs/operations.rst)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

import tlsmitm._hsts as hsts_module
import tlsmitm._verify as verify_module
from tlsmitm import HstsStore, TrustConfig, UpstreamVerifier


def test_building_the_parts_loads_neither_the_preload_list_nor_the_suffix_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden(*args: object, **kwargs: object) -> object:
        raise AssertionError("loaded at construction")

    monkeypatch.setattr(hsts_module, "_BUNDLED", None)
    monkeypatch.setattr(hsts_module, "_decode_hstspreload", forbidden)
    verify_module._psl.cache_clear()
    monkeypatch.setattr(verify_module, "PublicSuffixList", forbidden)
    store = HstsStore()
    UpstreamVerifier(TrustConfig())
    with pytest.raises(AssertionError, match="loaded at construction"):
        store.warm_up()  # ...but at the first use (serve warms up in a thread after listening)
    with pytest.raises(AssertionError, match="loaded at construction"):
        verify_module.warm_up()
    verify_module._psl.cache_clear()


def test_after_warm_up_lookups_use_the_bundled_list() -> None:
    store = HstsStore()
    store.warm_up()
    verify_module.warm_up()
    now = datetime(2026, 5, 9, tzinfo=UTC)
    assert store.is_known_host("anything.dev", now=now)  # a preloaded TLD
    assert not store.is_known_host("example.test", now=now)
