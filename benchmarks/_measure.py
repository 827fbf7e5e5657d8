"""What every component benchmark needs: a timing loop and a table of figures."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

__all__ = ["component_main", "print_figures", "rate"]


def rate(
    operation: Callable[[], object], seconds: float, *, batch: int = 100, rounds: int = 1
) -> float:
    """Calls per second of ``operation``: the best of ``rounds`` rounds over about ``seconds``.

    The best round, not the mean: on a shared machine other processes only ever slow a round
    down, so the fastest round is the closest to the code's own cost.
    """
    best = 0.0
    for _ in range(rounds):
        done = 0
        start = time.perf_counter()
        while True:
            for _ in range(batch):
                operation()
            done += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / rounds:
                break
        best = max(best, done / elapsed)
    return best


def print_figures(figures: Mapping[str, float]) -> None:
    """Print ``figures`` as a two-column table (the unit is in each name)."""
    width = max((len(name) for name in figures), default=6)
    print(f"{'figure':<{width}}  {'value':>14}")
    print(f"{'-' * width}  {'-' * 14}")
    for name, value in figures.items():
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3f}"
        print(f"{name:<{width}}  {shown:>14}")


def component_main(run: Callable[[float], Mapping[str, float]], argv: Sequence[str]) -> int:
    """``python -m benchmarks.bench_X [SECONDS]``: run and print the figures."""
    print_figures(run(float(argv[0]) if argv else 2.0))
    return 0
