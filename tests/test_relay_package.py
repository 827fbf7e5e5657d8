"""The relay's layout: old import paths still work, and no class in the package grows past ~400
lines (issue 14: one module per concern, no 1,000-line driver class)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tlsmitm
from tlsmitm import _relay

PACKAGE = Path(_relay.__file__).parent


def test_old_import_paths_still_work() -> None:
    from tlsmitm._http import Block, FlowInfo, Hooks, HttpRelay, Request, Response, fetch_http
    from tlsmitm._pool import PooledUpstream, PoolKey, UpstreamPool
    from tlsmitm._relay import CheckResult, Interceptor, InterceptorConfig, InterceptorStats

    assert Hooks is tlsmitm.Hooks
    assert FlowInfo is tlsmitm.FlowInfo
    assert Request is tlsmitm.Request
    assert Response is tlsmitm.Response
    assert Block is tlsmitm.Block
    assert Interceptor is tlsmitm.Interceptor
    assert InterceptorConfig is tlsmitm.InterceptorConfig
    assert InterceptorStats is tlsmitm.InterceptorStats
    assert CheckResult is tlsmitm.CheckResult
    assert HttpRelay.__module__ == "tlsmitm._relay.h1"
    assert fetch_http.__module__ == "tlsmitm._relay.fetch"
    assert UpstreamPool.__module__ == PooledUpstream.__module__ == "tlsmitm._relay.pool"
    assert PoolKey is not None


def test_no_class_in_the_relay_is_over_400_lines() -> None:
    sizes: dict[str, int] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                sizes[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert "interceptor.py:Interceptor" in sizes  # (the walk found the classes)
    too_big = {name: lines for name, lines in sizes.items() if lines > 400}
    assert not too_big, too_big


async def test_the_relay_registry() -> None:
    from tlsmitm._relay.plan import RelayKind
    from tlsmitm._relay.relays import RelayJob, RelayOutcome, RelayRegistry, run_h1, run_splice

    registry = RelayRegistry()
    assert registry.available() == {RelayKind.H1, RelayKind.SPLICE}
    assert registry.relay_for(RelayKind.H1) is run_h1
    assert registry.relay_for(RelayKind.SPLICE) is run_splice
    with pytest.raises(LookupError, match="h2"):
        registry.relay_for(RelayKind.H2)

    async def fake_h2(job: RelayJob) -> RelayOutcome:
        return RelayOutcome()

    registry.register(RelayKind.H2, fake_h2)
    assert RelayKind.H2 in registry.available()
    assert registry.relay_for(RelayKind.H2) is fake_h2
    with pytest.raises(TypeError):
        registry.register("h2", fake_h2)  # type: ignore[arg-type]
    registry.unregister(RelayKind.H2)
    registry.unregister(RelayKind.H1)  # the built-in ones stay
    assert registry.available() == {RelayKind.H1, RelayKind.SPLICE}
