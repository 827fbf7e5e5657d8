"""Turning a :class:`~benchmarks._harness.RunResult` into a table, JSON, a chart and a docs page.

* :func:`text_report`: the table printed at the end of a run (figures, ratios, goals).
* :func:`to_json`: everything measured, machine-readable.
* :func:`write_chart`: a PNG (matplotlib).
* :func:`rst_include`: the reStructuredText that ``docs/benchmarks.rst`` includes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._harness import H2_CELLS, SETUP_CELLS, RunResult

__all__ = ["Goal", "evaluate_goals", "rst_include", "text_report", "to_json", "write_chart"]

PEER_ORDER = (
    "direct",
    "terminator",
    "tlsmitm",
    "tlsmitm-w2",
    "tlsmitm-auto",
    "tlsmitm-nopool",
    "mitmproxy",
    "squid",
)
RATIO_PEERS = ("mitmproxy", "squid", "terminator", "direct")
NAMING = {"one": "1 name", "fifty": "50 names", "fresh": "new name each"}
COLORS = {
    "direct": "#7f7f7f",
    "terminator": "#bcbd22",
    "tlsmitm": "#1f77b4",
    "tlsmitm-w2": "#17becf",
    "tlsmitm-auto": "#2ca02c",
    "tlsmitm-nopool": "#aec7e8",
    "mitmproxy": "#d62728",
    "squid": "#9467bd",
}
FLAT_MEMORY_MIB = 16.0  # "flat": a 256 MiB body may not raise the proxy's RSS by more than this


@dataclass(frozen=True, slots=True, kw_only=True)
class _Row:
    title: str
    key: str
    unit: str
    ratio: bool = False  # a throughput: show tlsmitm / peer
    digits: int = 1


def _rows(result: RunResult) -> list[_Row]:
    rows: list[_Row] = []
    for naming, concurrency in SETUP_CELLS:
        key = f"setup.{naming}.c{concurrency}"
        head = f"setup, {NAMING[naming]}, {concurrency} in flight"
        rows += [
            _Row(title=head, key=f"{key}.per_s", unit="conn/s", ratio=True, digits=0),
            _Row(title="  p50 / p99 latency", key=f"{key}.p50_ms", unit="ms"),
            _Row(title="", key=f"{key}.p99_ms", unit="ms"),
            _Row(title="  server CPU per connection", key=f"{key}.cpu_ms", unit="ms", digits=2),
        ]
    rows += [
        _Row(
            title="warm keep-alive, 4 connections",
            key="keepalive.c4.per_s",
            unit="req/s",
            ratio=True,
            digits=0,
        ),
        _Row(title="warm keep-alive request, p50", key="latency.p50_ms", unit="ms", digits=3),
        _Row(title="warm keep-alive request, p99", key="latency.p99_ms", unit="ms", digits=3),
    ]
    size = result.plan.bulk_size >> 20
    for direction in ("download", "upload"):
        rows += [
            _Row(
                title=f"{direction} {size} MiB",
                key=f"bulk.{direction}.mb_s",
                unit="MB/s",
                ratio=True,
                digits=0,
            ),
            _Row(
                title="  server CPU per MiB",
                key=f"bulk.{direction}.cpu_ms_per_mib",
                unit="ms",
                digits=2,
            ),
            _Row(title="  peak RSS", key=f"bulk.{direction}.peak_rss_mib", unit="MiB", digits=0),
            _Row(
                title="  RSS growth during it", key=f"bulk.{direction}.rss_growth_mib", unit="MiB"
            ),
        ]
    processes = max(
        (
            int(key.removeprefix("cpu_s.process")) + 1
            for record in result.peers.values()
            for key in record.metrics
            if key.startswith("cpu_s.process")
        ),
        default=0,
    )
    for index in range(processes):
        rows.append(
            _Row(
                title=f"CPU seconds, process {index + 1} (setup and keep-alive)",
                key=f"cpu_s.process{index}",
                unit="s",
            )
        )
    for connections, streams in H2_CELLS:
        rows.append(
            _Row(
                title=f"h2, {connections} connection(s) x {streams} streams",
                key=f"h2.c{connections}x{streams}.per_s",
                unit="req/s",
                ratio=True,
                digits=0,
            )
        )
    for direction in ("download", "upload"):
        rows += [
            _Row(
                title=f"h2 {direction} {size} MiB",
                key=f"h2.bulk.{direction}.mb_s",
                unit="MB/s",
                digits=0,
            ),
            _Row(
                title="  server CPU per MiB",
                key=f"h2.bulk.{direction}.cpu_ms_per_mib",
                unit="ms",
                digits=2,
            ),
            _Row(
                title="  h2 client CPU per MiB",
                key=f"h2.bulk.{direction}.client_cpu_ms_per_mib",
                unit="ms",
                digits=2,
            ),
            _Row(title="  peak RSS", key=f"h2.bulk.{direction}.peak_rss_mib", unit="MiB", digits=0),
        ]
    h2_held = result.plan.h2_held_count
    rows += [
        _Row(
            title=f"{h2_held:,} idle h2 held: opened",
            key=f"h2.held.{h2_held}.opened",
            unit="conn",
            digits=0,
        ),
        _Row(title="  answered again", key=f"h2.held.{h2_held}.answered", unit="conn", digits=0),
        _Row(title="  RSS per connection", key=f"h2.held.{h2_held}.kib_per_conn", unit="KiB"),
    ]
    counts = sorted({*result.plan.held_counts, *result.plan.held_counts_slow})
    for count in counts:
        rows += [
            _Row(
                title=f"{count:,} held: opened", key=f"held.{count}.opened", unit="conn", digits=0
            ),
            _Row(title="  answered again", key=f"held.{count}.answered", unit="conn", digits=0),
            _Row(title="  RSS per connection", key=f"held.{count}.kib_per_conn", unit="KiB"),
        ]
    return rows


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _with_spread(metrics: dict[str, float], row: _Row, value: float | None) -> str:
    """``median (smallest-largest)`` when the figure was measured in several rounds."""
    low, high = metrics.get(f"{row.key}_min"), metrics.get(f"{row.key}_max")
    if value is None or low is None or high is None or math.isnan(value):
        return _fmt(value, row.digits)
    return f"{_fmt(value, row.digits)} ({_fmt(low, row.digits)}-{_fmt(high, row.digits)})"


def _peers(result: RunResult) -> list[str]:
    return [p for p in PEER_ORDER if p in result.peers]


@dataclass(frozen=True, slots=True, kw_only=True)
class Goal:
    """One goal of issue 9 and how this run did against it."""

    goal: str
    measured: str
    met: bool | None  # None: not measurable in this run


def _ratio(result: RunResult, key: str, peer: str, ours_label: str = "tlsmitm") -> float | None:
    ours = result.peers.get(ours_label)
    theirs = result.peers.get(peer)
    if ours is None or theirs is None:
        return None
    a, b = ours.metrics.get(key), theirs.metrics.get(key)
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _ratio_goal(
    result: RunResult,
    goal: str,
    key: str,
    peer: str,
    at_least: float,
    *,
    ours_label: str = "tlsmitm",
) -> Goal:
    """A goal "``ours_label``'s ``key`` is at least ``at_least`` times ``peer``'s"."""
    ratio = _ratio(result, key, peer, ours_label)
    shown = "-" if ratio is None else (f"{ratio:.0%}" if at_least < 1 else f"{ratio:.1f}x")
    return Goal(goal=goal, measured=shown, met=None if ratio is None else ratio >= at_least)


def _metric(result: RunResult, label: str, key: str) -> float | None:
    record = result.peers.get(label)
    value = record.metrics.get(key) if record is not None else None
    return None if value is None or math.isnan(value) else value


def _compare(
    goal: str, ours: float | None, theirs: float | None, factor: float, *, at_most: bool = False
) -> Goal:
    """``ours / theirs`` against ``factor`` (at least, or at most), both figures shown."""
    if ours is None or theirs is None or not theirs:
        return Goal(goal=goal, measured="-", met=None)
    ratio = ours / theirs
    return Goal(
        goal=goal,
        measured=f"{ratio:.2f}x ({ours:,.3g} against {theirs:,.3g})",
        met=ratio <= factor if at_most else ratio >= factor,
    )


def _issue19_goals(result: RunResult) -> list[Goal]:
    """Issue 19: per core, ahead of Squid; costs as ratios to the terminator of the same run."""

    def m(label: str, key: str) -> float | None:
        return _metric(result, label, key)

    goals: list[Goal] = []
    for concurrency in (1, 16):
        key = f"setup.fresh.c{concurrency}.per_s"
        goals.append(
            _compare(
                f"issue 19: new-name setup, {concurrency} in flight >= 1.25x Squid",
                m("tlsmitm", key),
                m("squid", key),
                1.25,
            )
        )
    goals.append(
        _compare(
            "issue 19: CPU per new-name connection <= 2.8x the terminator's per connection",
            m("tlsmitm", "setup.fresh.c16.cpu_ms"),
            m("terminator", "setup.one.c16.cpu_ms"),
            2.8,
            at_most=True,
        )
    )
    for concurrency in (1, 16):
        key = f"setup.one.c{concurrency}.per_s"
        goals.append(
            _compare(
                f"issue 19: warm-name setup, {concurrency} in flight >= 2x Squid",
                m("tlsmitm", key),
                m("squid", key),
                2,
            )
        )
        key = f"setup.fresh.c{concurrency}.per_s"
        goals.append(
            _compare(
                f"issue 19: new names, {concurrency} in flight, with the pool >= without it",
                m("tlsmitm", key),
                m("tlsmitm-nopool", key),
                1,
            )
        )
    direct = m("direct", "latency.p50_ms") or 0.0  # added latency: beyond a direct request
    ours, squid = m("tlsmitm", "latency.p50_ms"), m("squid", "latency.p50_ms")
    goals.append(
        _compare(
            "issue 19: warm keep-alive request, added p50 <= Squid's",
            None if ours is None else ours - direct,
            None if squid is None else squid - direct,
            1,
            at_most=True,
        )
    )
    goals.append(
        _compare(
            "issue 19: warm keep-alive request, p99 <= 2x the terminator's",
            m("tlsmitm", "latency.p99_ms"),
            m("terminator", "latency.p99_ms"),
            2,
            at_most=True,
        )
    )
    for direction in ("download", "upload"):
        key = f"bulk.{direction}.mb_s"
        goals.append(
            _compare(
                f"issue 19: bulk {direction} >= Squid's", m("tlsmitm", key), m("squid", key), 1
            )
        )
    goals.append(
        _compare(
            "issue 19: the terminator uploads at least as fast as it downloads",
            m("terminator", "bulk.upload.mb_s"),
            m("terminator", "bulk.download.mb_s"),
            1,
        )
    )
    counts = sorted(result.plan.held_counts)
    if counts:
        key = f"held.{counts[-1]}.kib_per_conn"
        goals.append(
            _compare(
                f"issue 19: RSS per held connection ({counts[-1]:,}) <= 64 KiB",
                m("tlsmitm", key),
                64.0,
                1,
                at_most=True,
            )
        )
    return goals


def _issue14_goals(result: RunResult) -> list[Goal]:
    """Issue 14: HTTP/2 against mitmproxy in the same run and against tlsmitm's own HTTP/1.1."""
    goals = [
        _ratio_goal(
            result,
            f"issue 14: h2 requests/s, {connections} connection(s) x {streams} streams "
            ">= 3x mitmproxy",
            f"h2.c{connections}x{streams}.per_s",
            "mitmproxy",
            3,
        )
        for connections, streams in H2_CELLS
    ]
    for direction in ("download", "upload"):
        goals.append(
            _compare(
                f"issue 14: h2 bulk {direction} >= 0.8x tlsmitm's HTTP/1.1 bulk {direction}",
                _metric(result, "tlsmitm", f"h2.bulk.{direction}.mb_s"),
                _metric(result, "tlsmitm", f"bulk.{direction}.mb_s"),
                0.8,
            )
        )
    count = result.plan.h2_held_count
    key = f"h2.held.{count}"
    per = _metric(result, "tlsmitm", f"{key}.kib_per_conn")
    opened = _metric(result, "tlsmitm", f"{key}.opened")
    goals.append(
        Goal(
            goal=f"issue 14: RSS per idle intercepted h2 connection ({count:,}) <= 120 KiB",
            measured="-" if per is None else f"{per:.1f} KiB at {opened or 0:,.0f} connections",
            met=None if per is None else per <= 120 and opened == count,
        )
    )
    return goals


def evaluate_goals(result: RunResult) -> list[Goal]:
    """The issue's goals, each with the figure that decides it."""
    goals: list[Goal] = []
    ours = result.peers.get("tlsmitm")
    metrics = ours.metrics if ours is not None else {}
    labels = [("tlsmitm", "")]
    if "tlsmitm-nopool" in result.peers:
        labels.append(("tlsmitm-nopool", "  without the upstream pool: "))
    for label, prefix in labels:
        for naming, concurrency in SETUP_CELLS:
            goals.append(
                _ratio_goal(
                    result,
                    f"{prefix}setup ({NAMING[naming]}, {concurrency} in flight) >= 4x mitmproxy",
                    f"setup.{naming}.c{concurrency}.per_s",
                    "mitmproxy",
                    4,
                    ours_label=label,
                )
            )
    # Issue 16: scaling with workers, on a 2-core machine, and --workers auto against mitmproxy.
    for naming, concurrency in SETUP_CELLS:
        if concurrency > 1:
            goals.append(
                _ratio_goal(
                    result,
                    f"--workers 2 / 1: setup ({NAMING[naming]}, {concurrency} in flight) >= 1.6x",
                    f"setup.{naming}.c{concurrency}.per_s",
                    "tlsmitm",
                    1.6,
                    ours_label="tlsmitm-w2",
                )
            )
        goals.append(
            _ratio_goal(
                result,
                f"--workers auto: setup ({NAMING[naming]}, {concurrency} in flight) >= 4x "
                "mitmproxy",
                f"setup.{naming}.c{concurrency}.per_s",
                "mitmproxy",
                4,
                ours_label="tlsmitm-auto",
            )
        )
    goals.append(
        _ratio_goal(
            result,
            "--workers 2 / 1: warm keep-alive requests/s (4 connections) >= 1.6x",
            "keepalive.c4.per_s",
            "tlsmitm",
            1.6,
            ours_label="tlsmitm-w2",
        )
    )
    for naming, concurrency in SETUP_CELLS[:2]:
        goals.append(
            _ratio_goal(
                result,
                f"setup ({NAMING[naming]}, {concurrency} in flight) >= 40 % of the terminator",
                f"setup.{naming}.c{concurrency}.per_s",
                "terminator",
                0.4,
            )
        )
    for direction in ("download", "upload"):
        key = f"bulk.{direction}.mb_s"
        goals.append(
            _ratio_goal(
                result, f"bulk {direction} >= 3x mitmproxy (streaming)", key, "mitmproxy", 3
            )
        )
        goals.append(_ratio_goal(result, f"bulk {direction} >= 50 % of direct", key, "direct", 0.5))
        growth = metrics.get(f"bulk.{direction}.rss_growth_mib")
        goals.append(
            Goal(
                goal=f"bulk {direction}: flat memory (RSS growth <= {FLAT_MEMORY_MIB:.0f} MiB)",
                measured="-" if growth is None else f"+{growth:.1f} MiB",
                met=None if growth is None else growth <= FLAT_MEMORY_MIB,
            )
        )
    counts = sorted(result.plan.held_counts)
    if counts:
        count = counts[-1]
        per = metrics.get(f"held.{count}.kib_per_conn")
        opened = metrics.get(f"held.{count}.opened")
        answered = metrics.get(f"held.{count}.answered")
        goals.append(
            Goal(
                goal=f"<= 100 KiB RSS per held connection ({count:,} requested)",
                measured="-" if per is None else f"{per:.1f} KiB at {opened or 0:,.0f} connections",
                met=None if per is None else per <= 100,
            )
        )
        goals.append(
            Goal(
                goal=f"all {count:,} held connections still answer",
                measured="-"
                if answered is None
                else f"{answered:,.0f} of {opened or 0:,.0f} opened",
                met=None if answered is None else answered == opened and bool(opened),
            )
        )
    direct = result.peers.get("direct")
    ours_p50 = metrics.get("latency.p50_ms")
    direct_p50 = direct.metrics.get("latency.p50_ms") if direct is not None else None
    if ours_p50 is not None and direct_p50 is not None:
        added = ours_p50 - direct_p50
        goals.append(
            Goal(
                goal="added p50 latency on a warm connection <= 1 ms",
                measured=f"{added:.3f} ms",
                met=added <= 1,
            )
        )
    else:
        goals.append(
            Goal(goal="added p50 latency on a warm connection <= 1 ms", measured="-", met=None)
        )
    goals += _issue19_goals(result)
    goals += _issue14_goals(result)
    return goals


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    out = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    out.append("  ".join("-" * w for w in widths))
    for row in lines:
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return out


def figures_table(result: RunResult) -> tuple[list[str], list[list[str]]]:
    """The main table: one row per figure, one column per peer, then ratios tlsmitm / peer."""
    peers = _peers(result)
    ratio_peers = [p for p in RATIO_PEERS if p in result.peers and "tlsmitm" in result.peers]
    header = ["figure", "unit", *peers, *(f"/{p}" for p in ratio_peers)]
    lines: list[list[str]] = []
    for row in _rows(result):
        values = [result.peers[p].metrics.get(row.key) for p in peers]
        if all(v is None for v in values):
            continue
        ratios = []
        for peer in ratio_peers:
            ratio = _ratio(result, row.key, peer) if row.ratio else None
            ratios.append("" if ratio is None else f"{ratio:.2f}")
        cells = [
            _with_spread(result.peers[p].metrics, row, v)
            for p, v in zip(peers, values, strict=True)
        ]
        lines.append([row.title, row.unit, *cells, *ratios])
    return header, lines


def _describe_machine(meta: dict[str, Any]) -> str:
    return (
        f"{meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, "
        f"{meta.get('memory_gib', '?')} GiB, {meta.get('os', '?')}; "
        "a machine shared with other engineers' test runs "
        f"(load average {meta.get('load_average_at_start', [0])[0]:.1f} at the start, "
        f"{meta.get('load_average_at_end', [0])[0]:.1f} at the end)"
    )


def text_report(result: RunResult) -> str:
    """The table printed at the end of a run."""
    meta = result.meta
    lines = [
        f"tlsmitm benchmarks ({result.plan.mode} mode), {meta.get('date')}, "
        f"took {meta.get('duration_s')} s",
        f"machine: {_describe_machine(meta)}",
        f"connection setup and latency: median of {result.plan.repeats} run(s) of "
        f"{result.plan.seconds:g} s each, the peers taking turns; bulk: median of "
        f"{result.plan.repeats} transfer(s) each way",
        f"tlsmitm {meta.get('tlsmitm_commit')} on Python {meta.get('python')}, "
        f"{meta.get('tlsmitm_openssl')}; client {meta.get('client_openssl')}",
        "",
    ]
    for label in _peers(result):
        record = result.peers[label]
        status = record.status
        line = f"  {label:<14} {status:<8} {record.version}"
        lines.append(line)
        for scenario, why in record.failures.items():
            lines.append(f"      {scenario}: {why[:300]}")
        for scenario, errors in record.errors.items():
            total = sum(errors.values())
            first = next(iter(errors))
            lines.append(f"      {scenario}: {total} client errors, e.g. {first}")
        for note in record.notes:
            lines.append(f"      note: {note}")
    lines.append("")
    header, rows = figures_table(result)
    lines += _table(header, rows)
    lines.append("(/peer columns: tlsmitm's figure divided by that peer's, for throughputs)")
    lines.append("")
    lines.append("components:")
    for name, component in result.components.items():
        if component.status != "ok":
            lines.append(f"  {name}: {component.status.upper()} ({component.detail})")
            continue
        shown = ", ".join(
            f"{k} {_fmt(v, 0 if abs(v) >= 100 else 2)}" for k, v in component.figures.items()
        )
        lines.append(f"  {name}: {shown}")
    lines.append("")
    lines.append("goals (issue 9 unless named):")
    for goal in evaluate_goals(result):
        mark = "n/a " if goal.met is None else ("MET " if goal.met else "MISS")
        lines.append(f"  [{mark}] {goal.goal}: {goal.measured}")
    return "\n".join(lines)


def to_json(result: RunResult) -> dict[str, Any]:
    """Everything measured, ready for ``json.dump`` (NaN becomes null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    answer: dict[str, Any] = clean(
        {
            "meta": result.meta,
            "plan": dataclasses.asdict(result.plan),
            "peers": {label: dataclasses.asdict(record) for label, record in result.peers.items()},
            "components": {
                name: dataclasses.asdict(component) for name, component in result.components.items()
            },
            "goals": [dataclasses.asdict(goal) for goal in evaluate_goals(result)],
        }
    )
    return answer


def write_json(result: RunResult, path: Path) -> None:
    """Write :func:`to_json` to ``path``."""
    path.write_text(json.dumps(to_json(result), indent=2, sort_keys=False) + "\n")


def write_chart(result: RunResult, path: Path) -> bool:
    """Draw the four headline panels into a PNG; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    peers = _peers(result)
    figure, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    meta = result.meta
    figure.suptitle(
        f"tlsmitm benchmarks ({result.plan.mode}) - {meta.get('date', '')} - "
        f"{meta.get('cpu', '')}, {meta.get('cores', '?')} cores (shared machine)",
        fontsize=11,
    )

    def bars(
        ax: Any, groups: Sequence[tuple[str, str]], title: str, unit: str, log: bool = False
    ) -> None:
        shown = [
            p for p in peers if any(result.peers[p].metrics.get(k) is not None for _, k in groups)
        ]
        width = 0.8 / max(1, len(shown))
        for index, peer in enumerate(shown):
            values = [result.peers[peer].metrics.get(key) for _, key in groups]
            xs = [g + (index - (len(shown) - 1) / 2) * width for g in range(len(groups))]
            heights = [0.0 if v is None or math.isnan(v) else v for v in values]
            drawn = ax.bar(xs, heights, width, label=peer, color=COLORS.get(peer))
            for rect, value in zip(drawn, values, strict=True):
                if value is not None and not math.isnan(value) and value > 0:
                    text = f"{value:.0f}" if value >= 10 else f"{value:.2f}"
                    ax.annotate(
                        text,
                        (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=6,
                    )
        ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        if not shown:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
            return
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)

    bars(
        axes[0][0],
        [(f"{NAMING[n]}\n{c} in flight", f"setup.{n}.c{c}.per_s") for n, c in SETUP_CELLS],
        "New intercepted connections per second (one small request each)",
        "connections/s",
    )
    bars(
        axes[0][1],
        [
            (f"download {result.plan.bulk_size >> 20} MiB", "bulk.download.mb_s"),
            (f"upload {result.plan.bulk_size >> 20} MiB", "bulk.upload.mb_s"),
        ],
        "Bulk relay through one connection",
        "MB/s",
    )
    counts = sorted({*result.plan.held_counts, *result.plan.held_counts_slow})
    bars(
        axes[1][0],
        [(f"{c:,} held", f"held.{c}.kib_per_conn") for c in counts],
        "Memory per held-open connection (RSS growth / connections)",
        "KiB per connection",
    )
    bars(
        axes[1][1],
        [("p50", "latency.p50_ms"), ("p99", "latency.p99_ms")],
        "Request latency on a warm keep-alive connection",
        "ms (log scale)",
        log=True,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _escape(text: str) -> str:
    """``text`` with every character reStructuredText could take as markup escaped."""
    return re.sub(r"([\\`*_|\[\]<>])", r"\\\1", " ".join(text.split()))


def _rst_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *lines]:
        out.append(f"   * - {_escape(row[0]) or ' '}")
        out += [f"     - {_escape(cell) or ' '}" for cell in row[1:]]
    return out


def rst_include(result: RunResult, chart: str | None) -> str:
    """The part of ``docs/benchmarks.rst`` that each published run rewrites."""
    meta = result.meta
    lines = [
        ".. This file is written by ``python -m benchmarks``; do not edit it by hand.",
        "",
        f"Latest published run: **{meta.get('date')}** ({result.plan.mode} mode, "
        f"{meta.get('duration_s')} s), tlsmitm ``{meta.get('tlsmitm_commit')}``.",
        "",
        f"Machine: {_describe_machine(meta)}.",
        f"Python {meta.get('python')}; tlsmitm's TLS engine: {meta.get('tlsmitm_openssl')}; "
        f"the load generator: Python's ``ssl`` with {meta.get('client_openssl')}; "
        f"origin: {meta.get('origin', '?')}. Connection-setup and latency figures are the "
        f"median of {result.plan.repeats} run(s) of {result.plan.seconds:g} s each, the peers "
        f"taking turns; bulk rates the median of {result.plan.repeats} transfer(s) each way.",
        "",
    ]
    if chart:
        lines += [f".. image:: {chart}", "   :alt: benchmark chart", ""]
    lines += ["Peers:", ""]
    for label in _peers(result):
        record = result.peers[label]
        text = f"* **{label}** ({record.status}): {_escape(record.version or 'not run')}"
        for scenario, why in record.failures.items():
            text += f"; {scenario}: {_escape(why[:200])}"
        lines.append(text)
        for scenario, errors in record.errors.items():
            total = sum(errors.values())
            lines.append(
                f"  ({scenario}: {total} client errors, e.g. {_escape(next(iter(errors)))})"
            )
        for note in record.notes:
            lines.append(f"  ({_escape(note)})")
    lines.append("")
    header, rows = figures_table(result)
    lines += _rst_table(header, rows)
    lines += ["", "Goals (issue 9):", ""]
    goal_rows = [
        [goal.goal, goal.measured, "n/a" if goal.met is None else ("met" if goal.met else "missed")]
        for goal in evaluate_goals(result)
    ]
    lines += _rst_table(["goal", "measured", "verdict"], goal_rows)
    lines += ["", "Component benchmarks:", ""]
    for name, component in result.components.items():
        if component.status != "ok":
            lines.append(f"* ``{name}``: {component.status} ({_escape(component.detail)})")
        else:
            shown = ", ".join(
                f"{k} {_fmt(v, 0 if abs(v) >= 100 else 2)}" for k, v in component.figures.items()
            )
            lines.append(f"* ``{name}``: {_escape(shown)}")
    lines.append("")
    return "\n".join(lines)
