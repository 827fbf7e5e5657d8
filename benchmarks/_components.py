"""Component benchmarks (``bench_forge``, ``bench_verify``, ``bench_hsts``, ``bench_clienthello``,
``bench_scan``).

Each module exposes ``run(seconds: float = 2.0) -> dict[str, float]``. They are imported lazily,
each in a subprocess of its own (``python -m benchmarks._components NAME SECONDS``), so that one
that is missing, broken or slow is reported as such and cannot take the rest of the run down.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["COMPONENTS", "ComponentResult", "run_component"]

COMPONENTS = (
    "bench_forge",
    "bench_verify",
    "bench_hsts",
    "bench_clienthello",
    "bench_token",
    "bench_scan",
    "bench_state",
    "bench_h2",
)
REPO = Path(__file__).resolve().parent.parent
# Components that start servers of their own (bench_scan: nginx, clamd, c-icap, three proxies).
_MIN_TIMEOUT = {"bench_scan": 300.0, "bench_state": 120.0, "bench_h2": 180.0}


@dataclass(frozen=True, slots=True, kw_only=True)
class ComponentResult:
    """What one component benchmark produced.

    Attributes:
        name: the module name (``bench_forge``...).
        status: ``ok``, ``missing`` (no such module yet) or ``failed``.
        figures: its ``run()`` result (empty unless ``ok``).
        detail: why it is missing or failed.
    """

    name: str
    status: str
    figures: dict[str, float] = field(default_factory=dict)
    detail: str = ""


def run_component(name: str, seconds: float, *, timeout: float | None = None) -> ComponentResult:
    """Run ``benchmarks.NAME.run(seconds)`` in a subprocess and collect its figures."""
    limit = timeout if timeout is not None else max(20 * seconds + 60, _MIN_TIMEOUT.get(name, 0))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks._components", name, str(seconds)],
            capture_output=True,
            text=True,
            timeout=limit,
            cwd=str(REPO),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ComponentResult(name=name, status="failed", detail=f"timed out after {limit:.0f} s")
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        return ComponentResult(
            name=name, status="failed", detail=tail[0] if tail else f"exit {result.returncode}"
        )
    answer = json.loads(lines[-1])
    return ComponentResult(
        name=name,
        status=answer["status"],
        figures={k: float(v) for k, v in answer.get("figures", {}).items()},
        detail=answer.get("detail", ""),
    )


def _child(name: str, seconds: float) -> dict[str, object]:
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name in (f"benchmarks.{name}",):
            return {"status": "missing", "detail": f"benchmarks/{name}.py does not exist yet"}
        return {"status": "failed", "detail": f"import failed: {exc}"}
    run = getattr(module, "run", None)
    if not callable(run):
        return {"status": "failed", "detail": f"benchmarks.{name} has no run(seconds) function"}
    figures = run(seconds)
    if not isinstance(figures, dict):
        return {"status": "failed", "detail": f"run() returned {type(figures).__name__}, not dict"}
    clean = {
        str(k): float(v)
        for k, v in figures.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }
    return {"status": "ok", "figures": clean}


if __name__ == "__main__":
    # Whatever run() prints goes to stderr: stdout carries one JSON line.
    real_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        answer = _child(sys.argv[1], float(sys.argv[2]))
    except Exception as exc:  # a broken benchmark is reported, not raised
        answer = {"status": "failed", "detail": f"{type(exc).__name__}: {exc}"}
    real_stdout.write(json.dumps(answer) + "\n")
    real_stdout.flush()
