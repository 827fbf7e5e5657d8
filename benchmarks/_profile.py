"""Profile the tlsmitm proxy under the connection-setup load: where do its milliseconds go?

``python -m benchmarks._profile [--seconds 8] [--naming one|fifty|fresh] [--concurrency 16]``
starts the nginx origin and ``python -m cProfile -m tlsmitm serve ...`` exactly as the benchmark
does, runs one connection-setup measurement against it, stops it with SIGINT (so cProfile writes
its data), and prints the functions that took the most time, by own time and by cumulative time.

``--keepalive`` runs the warm keep-alive latency load instead (small requests one after another
on one connection, as the benchmark's latency figure) and reports CPU per request.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import pstats
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import _client, _peers
from ._harness import WARM_NAMES
from ._origin import NginxOrigin
from ._peers import PeerEnv, start_peer
from ._pki import BENCH_DOMAIN, make_pki
from ._proc import cpu_seconds, raise_fd_limit

__all__ = ["main", "profile_tlsmitm"]


def profile_tlsmitm(
    *,
    seconds: float,
    naming: str,
    concurrency: int,
    top: int = 35,
    sort: str = "tottime",
    save: Path | None = None,
    keepalive: bool = False,
) -> str:
    """Run the load against a profiled tlsmitm; returns the report text."""
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="tlsmitm-profile-"))
    pki = make_pki(work, now=dt.datetime.now(dt.UTC))
    origin = NginxOrigin.start(pki, big_sizes=())
    # Enough new names for a fast proxy; only passed to the proxy when they are used (every
    # one is a --resolve flag, and the proxy's start-up parses each).
    fresh = tuple(f"p{i}.{BENCH_DOMAIN}" for i in range(int(600 * seconds)))
    names = {"one": (BENCH_DOMAIN,), "fifty": WARM_NAMES, "fresh": fresh}[naming]
    env = PeerEnv(
        work=work,
        pki=pki,
        origin_port=origin.port,
        names=[*WARM_NAMES, *(fresh if naming == "fresh" else ())],
    )
    data = work / "tlsmitm.prof"
    try:
        # The peer module starts ``sys.executable -m tlsmitm``: put cProfile in front.
        _peers._PYTHON_PREFIX[:] = ["-m", "benchmarks._cpuprofile", str(data)]
        running = start_peer("tlsmitm", env, origin_pids=[], origin_version="")
        try:
            if keepalive:
                summary = _keepalive_load(running, seconds)
            else:
                summary = _setup_load(running, names, naming, concurrency, seconds)
        finally:
            running.stop(grace=30)
    finally:
        _peers._PYTHON_PREFIX[:] = []
        origin.stop()
    out = io.StringIO()
    out.write(summary)
    if data.exists() and save is not None:
        shutil.copy(data, save)
    if data.exists():
        stats = pstats.Stats(str(data), stream=out)
        stats.strip_dirs().sort_stats(sort).print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
    else:
        out.write("cProfile wrote no data (the proxy did not exit cleanly)\n")
    shutil.rmtree(work, ignore_errors=True)
    return out.getvalue()


def _setup_load(
    running: Any, names: tuple[str, ...], naming: str, concurrency: int, seconds: float
) -> str:
    before: list[float] = []
    rates = _client.connection_rate(
        running.target,
        names=names,
        fresh=naming == "fresh",
        concurrency=concurrency,
        seconds=seconds,
        on_start=lambda: before.append(cpu_seconds(running.pids())),
    )
    used = cpu_seconds(running.pids()) - before[0]
    return (
        f"{rates.per_second:.0f} connections/s ({naming}, {concurrency} in flight), "
        f"{used * 1000 / max(1, rates.completed):.2f} proxy CPU ms per connection "
        f"(under cProfile, which slows Python code down; times are CPU seconds), "
        f"errors: {rates.errors or 'none'}\n"
    )


def _keepalive_load(running: Any, seconds: float) -> str:
    # The profile also holds the connection's setup and the proxy's start: a long run dilutes
    # them (the report's per-request figure is CPU over the measured requests only).
    before = cpu_seconds(running.pids())
    latency = _client.keepalive_latency(running.target, name=BENCH_DOMAIN, seconds=seconds)
    used = cpu_seconds(running.pids()) - before
    return (
        f"{latency.requests} keep-alive requests on one connection, "
        f"{used * 1e6 / max(1, latency.requests):.0f} proxy CPU us per request "
        f"(under cProfile, which slows Python code down; times are CPU seconds), "
        f"errors: {latency.errors or 'none'}\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._profile")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--naming", choices=("one", "fifty", "fresh"), default="one")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--save", type=Path, default=None, help="keep the cProfile data here")
    parser.add_argument(
        "--keepalive", action="store_true", help="the warm keep-alive request load instead"
    )
    args = parser.parse_args(argv)
    print(
        profile_tlsmitm(
            seconds=args.seconds,
            naming=args.naming,
            concurrency=args.concurrency,
            top=args.top,
            save=args.save,
            keepalive=args.keepalive,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
