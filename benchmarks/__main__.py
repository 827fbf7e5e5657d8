"""``python -m benchmarks`` (``./run bench``): tlsmitm against its peers, in one run.

Prints a table of figures and ratios, and writes ``latest.json``, ``latest.png`` and
``latest.inc`` (included by ``docs/benchmarks.rst``) into ``docs/benchmarks/``; ``--quick``
writes ``quick.*`` there instead, which the docs do not show.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ._components import COMPONENTS
from ._harness import FULL, QUICK, run_benchmarks
from ._peers import PEERS
from ._report import rst_include, text_report, write_chart, write_json

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def _ensure_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("benchmarks: installing matplotlib for the chart", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=False, timeout=600
        )


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure tlsmitm against direct connections, a bare TLS terminator, "
        "mitmproxy and Squid in one run; print figures and ratios; write JSON and a chart.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds per measurement and 1,000 held connections (under 3 minutes); "
        "the default is the full run used for the published figures (about 20 minutes on 2 cores)",
    )
    parser.add_argument(
        "--peers",
        type=_csv(PEERS),
        default=list(PEERS),
        help=f"comma-separated subset of {','.join(PEERS)}",
    )
    parser.add_argument(
        "--scenarios",
        type=_csv(("setup", "bulk", "held", "h2")),
        default=["setup", "bulk", "held", "h2"],
        help="comma-separated subset of setup,bulk,held,h2 (setup includes keep-alive latency; "
        "h2: HTTP/2 through tlsmitm and mitmproxy)",
    )
    parser.add_argument(
        "--components",
        type=_csv(COMPONENTS),
        default=list(COMPONENTS),
        help=f"comma-separated subset of {','.join(COMPONENTS)}",
    )
    parser.add_argument("--no-components", action="store_true", help="skip component benchmarks")
    parser.add_argument(
        "--seconds", type=float, default=None, help="override the length of each measurement"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DOCS,
        help=f"where to write the JSON, chart and docs include (default {DOCS})",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seconds is not None:
        if args.seconds <= 0:
            parser.error("--seconds must be positive")
        plan = dataclasses.replace(plan, seconds=args.seconds)
    _ensure_matplotlib()
    result = run_benchmarks(
        plan,
        peers=args.peers,
        components=[] if args.no_components else args.components,
        scenarios=args.scenarios,
    )
    print(text_report(result), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    write_json(result, args.out / f"{stem}.json")
    chart = args.out / f"{stem}.png"
    drew = write_chart(result, chart)
    if not drew:
        print("benchmarks: matplotlib is missing, so no chart was drawn", file=sys.stderr)
    (args.out / f"{stem}.inc").write_text(
        rst_include(result, f"benchmarks/{chart.name}" if drew else None)
    )
    written = ", ".join(str(args.out / f"{stem}.{ext}") for ext in ("json", "png", "inc"))
    print(f"\nwritten: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
