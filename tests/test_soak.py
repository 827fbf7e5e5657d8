"""The short soak (``./run soak``'s mix for a few seconds): serve survives, leaks nothing, serves.

The long run is ``./run soak [MINUTES]``; its results are in docs/security.rst.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_short_hostile_soak() -> None:
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("soak.py")), "--seconds", "12"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "crashes: 0" in result.stdout
    assert "good client:" in result.stdout
    assert "held_tunnels 200" in result.stdout
