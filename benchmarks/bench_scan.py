"""Scanning benchmark: what holding a body for clamd or ICAP costs, against no scanning.

Run ``python -m benchmarks.bench_scan [seconds]`` (or as a component of ``./run bench``).
:func:`run` starts the nginx origin, a private clamd and c-icap (EICAR-only signatures, as in the
tests), and ``tlsmitm serve`` three times -- without ``--scan``, with ``--scan clamd://...`` and
with ``--scan icap://...`` -- and downloads 1 KiB, 1 MiB and 30 MiB through each.

Figures, per mode (``none``, ``clamd``, ``icap``) and size (``1KiB``, ``1MiB``, ``30MiB``):

* ``{mode}_{size}_ttlb_ms`` -- time to last byte of one download, the best of the rounds (a
  scanned body reaches the client only after the verdict, so this includes the scan);
* ``{mode}_{size}_proxy_cpu_ms`` -- the proxy process's CPU time per download (user + system),
  the median of the rounds: what the proxy itself spends, without the scanner's own time;
* ``{mode}_30MiB_proxy_peak_rss_mib`` -- the proxy's peak resident memory while a 30 MiB body is
  held (it is spooled to a file past 1 MiB, so this stays near the idle figure);
* ``{mode}_idle_rss_mib`` -- the proxy's resident memory before the downloads.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ._client import Target, transfer
from ._measure import component_main
from ._origin import NginxOrigin
from ._peers import _popen, _wait_for_line
from ._pki import make_pki
from ._proc import RssSampler, cpu_seconds, descendants, rss_bytes
from ._scan_engines import Clamd, Icap, run_c_icap, run_clamd

SIZES = {"1KiB": 1024, "1MiB": 1024 * 1024, "30MiB": 30 * 1024 * 1024}
REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _proxy(
    work: Path, origin_port: int, root_pem: Path, scan: list[str]
) -> Iterator[tuple[Target, int]]:
    label = "tlsmitm-" + ("none" if not scan else scan[1].split(":")[0])
    log = work / f"{label}.log"
    process = _popen(
        [
            sys.executable,
            "-m",
            "tlsmitm",
            "serve",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(work / f"{label}-state"),
            "--extra-roots",
            str(root_pem),
            "--resolve",
            "bench.test=127.0.0.1",
            "--log-level",
            "warning",
            *scan,
        ],
        log,
        cwd=str(REPO),
    )
    try:
        text = _wait_for_line(process, log, "Stop with Ctrl-C", 60)
        address = text.split("tlsmitm is listening on http://")[1].split()[0]
        port = int(address.rpartition(":")[2])
        target = Target(
            label=label,
            address=("127.0.0.1", port),
            via_proxy=True,
            port=origin_port,
            cafile=str(work / f"{label}-state" / "ca" / "root.pem"),
        )
        yield target, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def _measure_mode(target: Target, pid: int, rounds: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    warm = transfer(target, name="bench.test", direction="download", size=1024, timeout=60)
    if warm.error is not None:
        raise RuntimeError(f"{target.label}: {warm.error}")
    figures["idle_rss_mib"] = rss_bytes(descendants(pid)) / 2**20
    for label, size in SIZES.items():
        times: list[float] = []
        cpus: list[float] = []
        peak = 0
        for _ in range(1 if size > 2**24 else rounds):
            before = cpu_seconds(descendants(pid))
            with RssSampler(descendants(pid)) as sampler:
                result = transfer(
                    target, name="bench.test", direction="download", size=size, timeout=300
                )
            if result.error is not None:
                raise RuntimeError(f"{target.label} {label}: {result.error}")
            cpus.append(cpu_seconds(descendants(pid)) - before)
            times.append(result.seconds)
            peak = max(peak, sampler.peak)
        figures[f"{label}_ttlb_ms"] = min(times) * 1000
        figures[f"{label}_proxy_cpu_ms"] = statistics.median(cpus) * 1000
        if size > 2**24:
            figures[f"{label}_proxy_peak_rss_mib"] = peak / 2**20
    return figures


def run(seconds: float = 2.0) -> dict[str, float]:
    """Measure; ``seconds`` sets the rounds per small size (at least 3)."""
    rounds = max(3, int(seconds * 2))
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tlsmitm-bench-scan-") as scratch:
        work = Path(scratch)
        pki = make_pki(work, now=dt.datetime.now(dt.UTC))
        origin = NginxOrigin.start(pki, big_sizes=tuple(SIZES.values()))
        try:
            with run_clamd(work / "clamd") as clamd, run_c_icap(work / "icap", clamd) as icap:
                for mode, scan in _modes(clamd, icap):
                    with _proxy(work, origin.port, pki.root_pem, scan) as (target, pid):
                        started = time.monotonic()
                        for key, value in _measure_mode(target, pid, rounds).items():
                            figures[f"{mode}_{key}"] = value
                        figures[f"{mode}_wall_s"] = time.monotonic() - started
        finally:
            origin.stop()
    for label in SIZES:
        base = figures[f"none_{label}_proxy_cpu_ms"]
        for mode in ("clamd", "icap"):
            figures[f"{mode}_{label}_proxy_cpu_ratio"] = figures[f"{mode}_{label}_proxy_cpu_ms"] / (
                base or float("nan")
            )
    return figures


def _modes(clamd: Clamd, icap: Icap) -> list[tuple[str, list[str]]]:
    max_length = f"?stream-max-length={clamd.stream_max_length}"
    return [
        ("none", []),
        ("clamd", ["--scan", f"clamd://{clamd.socket_path}{max_length}"]),
        ("icap", ["--scan", icap.url]),
    ]


__all__ = ["run"]

if __name__ == "__main__":
    sys.exit(component_main(run, sys.argv[1:]))
