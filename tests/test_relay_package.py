"""The relay's layout: old import paths still work, and no class in the package grows past ~400
lines (issue 14: one module per concern, no 1,000-line driver class)."""

from __future__ import annotations

import ast
from pathlib import Path

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
