"""Upstreams.verify's caches: a chain's success answers another name only as a full check would."""

from __future__ import annotations

import dataclasses
import datetime as dt
from types import SimpleNamespace
from typing import Any

import pytest
from pki import NOW, Hierarchy, good_hierarchy, issue

from tlsmitm._errors import CertError
from tlsmitm._relay.upstream import Upstreams
from tlsmitm._verify import TrustConfig, UpstreamVerifier


class CountingVerifier(UpstreamVerifier):
    """Counts full verifications (a subclass: Upstreams must not carry verdicts for it)."""

    calls = 0

    async def verify_with_fetching(self, *args: Any, **kwargs: Any) -> Any:
        type(self).calls += 1
        return await super().verify_with_fetching(*args, **kwargs)


@pytest.fixture
def h() -> Hierarchy:
    return good_hierarchy()


def make_upstreams(verifier: UpstreamVerifier, clock: list[dt.datetime]) -> Upstreams:
    ix = SimpleNamespace(
        config=SimpleNamespace(verdict_cache_seconds=60.0, verdict_cache_size=8),
        clock=lambda: clock[0],
        verifier=verifier,
    )
    return Upstreams(ix, connector=None, keylog=None)  # type: ignore[arg-type]


def full_verifications(monkeypatch: pytest.MonkeyPatch, verifier: UpstreamVerifier) -> list[str]:
    names: list[str] = []
    real = verifier.verify_with_fetching

    async def counting(chain: Any, host: str, **kwargs: Any) -> Any:
        names.append(host)
        return await real(chain, host, **kwargs)

    monkeypatch.setattr(verifier, "verify_with_fetching", counting)
    return names


async def test_a_new_name_on_a_verified_chain_is_answered_without_a_full_verification(
    h: Hierarchy, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)))
    calls = full_verifications(monkeypatch, verifier)
    clock = [NOW]
    upstreams = make_upstreams(verifier, clock)
    leaf = issue(subject_cn=None, issuer=h.intermediate, sans=["*.example.test"]).cert
    chain = [leaf, h.intermediate.cert]
    first = await upstreams.verify(chain, "a.example.test", None)
    second = await upstreams.verify(chain, "b.example.test", None)
    assert first.ok
    assert second == dataclasses.replace(first, host="b.example.test")
    assert calls == ["a.example.test"]
    # A name the chain does not cover is verified in full, and fails as it must.
    wrong = await upstreams.verify(chain, "a.other.test", None)
    assert wrong.error is CertError.NAME_MISMATCH
    # Another stapled response is another key; so is a chain of other bytes.
    await upstreams.verify(chain, "c.example.test", b"\x30\x00")
    assert calls[-1] == "c.example.test"
    # Past the cache's age the chain is verified again.
    clock[0] = NOW + dt.timedelta(seconds=61)
    await upstreams.verify(chain, "d.example.test", None)
    assert calls[-1] == "d.example.test"


async def test_a_replaced_verifier_or_a_subclass_gets_no_carried_verdict(
    h: Hierarchy, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = UpstreamVerifier(TrustConfig(extra_roots=(h.root.cert,)))
    clock = [NOW]
    upstreams = make_upstreams(verifier, clock)
    leaf = issue(subject_cn=None, issuer=h.intermediate, sans=["*.example.test"]).cert
    chain = [leaf, h.intermediate.cert]
    assert (await upstreams.verify(chain, "a.example.test", None)).ok
    # An embedder replaces the verifier, e.g. with a stricter trust store: judged afresh.
    other = UpstreamVerifier(TrustConfig(extra_roots=(good_hierarchy().root.cert,)))
    upstreams._ix.verifier = other  # type: ignore[attr-defined]
    assert (await upstreams.verify(chain, "b.example.test", None)).error is not None
    # A subclass may judge more than the chain and the name: every name verified by it.
    CountingVerifier.calls = 0
    upstreams._ix.verifier = CountingVerifier(TrustConfig(extra_roots=(h.root.cert,)))  # type: ignore[attr-defined]
    assert (await upstreams.verify(chain, "c.example.test", None)).ok
    assert (await upstreams.verify(chain, "d.example.test", None)).ok
    assert CountingVerifier.calls == 2
