"""Shared fixtures and the rule that real components are required, not optional, in CI."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_REAL = (
    os.environ.get("TLSMITM_REQUIRE_REAL_CLIENTS") == "1" or os.environ.get("CI") == "true"
)


def require_tool(name: str) -> str:
    """Path of the executable ``name``; missing is a failure in CI and a skip elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (./run test installs it)"
        if REQUIRE_REAL:
            pytest.fail(message)
        pytest.skip(message)
    return path


# Session fixtures that start real engines (clamd, c-icap) when a test asks for them.
pytest_plugins = ("scan_engines",)
