"""The benchmark run: every peer through every scenario, in one run, on one machine.

Scenarios (all traffic on 127.0.0.1, every loop bounded in time):

1. ``setup``: new connections per second, one small request each, at 1 and 16 in flight, with
   one host name (warm), 50 names (warm) and a new name per connection (cold minting); p50/p99
   latency and the peer's CPU milliseconds per connection.
2. ``latency``: small requests one after another on one warm keep-alive connection.
3. ``bulk``: a download and an upload of one large body through one connection; MB/s, and the
   peer's peak RSS over its RSS before the transfer.
4. ``held``: N connections opened and held, RSS per connection, then every one asked again.

Each group of scenarios gets a freshly started peer. Figures land in :class:`PeerRecord`
``metrics`` under dotted keys (``setup.fresh.c16.per_s``, ``bulk.download.mb_s``, ...).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _client
from ._client import HttpsConnection, Target, client_context
from ._components import COMPONENTS, ComponentResult, run_component
from ._origin import NginxOrigin
from ._peers import PEERS, PeerEnv, Running, start_peer
from ._pki import BENCH_DOMAIN, make_pki
from ._proc import RssSampler, cpu_seconds, fd_hard_limit, raise_fd_limit, rss_bytes
from ._system import Unavailable

__all__ = [
    "FULL",
    "QUICK",
    "SETUP_CELLS",
    "PeerRecord",
    "Plan",
    "RunResult",
    "machine_info",
    "run_benchmarks",
]

MiB = 1 << 20
WARM_NAMES = tuple(f"w{i}.{BENCH_DOMAIN}" for i in range(50))
# (naming, concurrency): naming is "one" (bench.test), "fifty" (50 warm names) or "fresh"
# (a name never seen before for every connection: cold minting).
SETUP_CELLS = (
    ("one", 1),
    ("one", 16),
    ("fifty", 1),
    ("fifty", 16),
    ("fresh", 1),
    ("fresh", 16),
)
PROXIES = frozenset({"tlsmitm", "mitmproxy", "squid"})
SLOW_TO_OPEN = frozenset({"mitmproxy", "squid"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """How long and how big each measurement is.

    Attributes:
        mode: ``quick`` or ``full``.
        seconds: length of each connection-setup and latency measurement.
        bulk_size: bytes of each bulk download and upload.
        held_counts: connections held open (each count a fresh peer).
        held_counts_slow: the same for the peers that open connections slowly (mitmproxy,
            Squid), to keep the run bounded.
        held_open_seconds: most time spent opening held connections.
        component_seconds: ``seconds`` passed to each component benchmark's ``run``.
        fresh_names: names in each cold-minting pool (one pool per concurrency).
    """

    mode: str
    seconds: float
    bulk_size: int
    held_counts: tuple[int, ...]
    held_counts_slow: tuple[int, ...]
    held_open_seconds: float
    component_seconds: float
    fresh_names: int


QUICK = Plan(
    mode="quick",
    seconds=1.5,
    bulk_size=256 * MiB,
    held_counts=(1000,),
    held_counts_slow=(1000,),
    held_open_seconds=15.0,
    component_seconds=0.5,
    fresh_names=3000,
)
FULL = Plan(
    mode="full",
    seconds=8.0,
    bulk_size=256 * MiB,
    held_counts=(1000, 10_000),
    held_counts_slow=(1000,),
    held_open_seconds=120.0,
    component_seconds=2.0,
    fresh_names=8000,
)


@dataclass(slots=True, kw_only=True)
class PeerRecord:
    """Everything measured for one peer.

    Attributes:
        label: the peer's name.
        status: ``ok``, ``missing`` (could not be installed or started) or ``partial`` (some
            scenario failed; see ``failures``).
        version: what ran.
        metrics: figures by dotted key.
        errors: client-side errors per scenario (``{scenario: {error: count}}``).
        failures: scenarios that could not be measured, and why.
        notes: anything a reader of the figures must know.
    """

    label: str
    status: str = "ok"
    version: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    errors: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class RunResult:
    """One benchmark run."""

    plan: Plan
    meta: dict[str, Any]
    peers: dict[str, PeerRecord]
    components: dict[str, ComponentResult]


def _log(message: str) -> None:
    print(f"benchmarks: {message}", file=sys.stderr, flush=True)


def _first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def machine_info() -> dict[str, Any]:
    """The machine and software the figures come from."""
    cpu = "?"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    distro = "?"
    if Path("/etc/os-release").exists():
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    from cryptography.hazmat.backends.openssl import backend

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / (1 << 30), 1),
        "os": f"{distro}, Linux {platform.release()}",
        "python": platform.python_version(),
        "client_openssl": ssl.OPENSSL_VERSION,
        "tlsmitm_openssl": backend.openssl_version_text(),
        "tlsmitm_commit": _first_line(
            [
                "git",
                "-C",
                str(Path(__file__).resolve().parent.parent),
                "describe",
                "--always",
                "--dirty",
            ]
        ),
        "fd_hard_limit": fd_hard_limit(),
        "load_average_at_start": list(os.getloadavg()),
        "shared_machine": True,
    }


class _Measurer:
    """Runs the scenarios of one peer; each group on a freshly started peer."""

    def __init__(
        self,
        plan: Plan,
        env: PeerEnv,
        origin: NginxOrigin,
        record: PeerRecord,
        fresh_pools: Mapping[int, Sequence[str]],
    ) -> None:
        self.plan = plan
        self.env = env
        self.origin = origin
        self.record = record
        self.fresh_pools = fresh_pools

    # -- plumbing ------------------------------------------------------------------------------

    def _start(self) -> Running:
        running = start_peer(
            self.record.label,
            self.env,
            origin_pids=self.origin.pids(),
            origin_version=self.origin.version(),
        )
        self.record.version = running.version
        return running

    def _guard(self, running: Running, scenario: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception as exc:  # one scenario failing must not end the run: report it
            self.record.failures[scenario] = f"{type(exc).__name__}: {exc}"
            self.record.status = "partial"
            _log(f"[{self.record.label}] {scenario} failed:\n{traceback.format_exc()}")
        if not running.alive():
            self.record.failures[scenario] = (
                f"the peer exited (status {running.process.returncode if running.process else '?'})"
                f"; log: {running.log_tail(1500)}"
            )
            self.record.status = "partial"
            raise Unavailable(f"{self.record.label} exited during {scenario}")

    def _note_errors(self, scenario: str, errors: dict[str, int]) -> None:
        if errors:
            self.record.errors[scenario] = dict(errors)
            _log(f"[{self.record.label}] {scenario}: client errors {errors}")

    def _warm(self, target: Target, names: Sequence[str]) -> None:
        context = client_context(target.cafile)
        for name in names:
            connection = HttpsConnection(target, name, context)
            try:
                connection.request("/small", close=True)
            finally:
                connection.close()

    # -- scenarios -------------------------------------------------------------------------------

    def setup_and_latency(self) -> None:
        running = self._start()
        try:
            cells = SETUP_CELLS if self.record.label in PROXIES else SETUP_CELLS[:2]
            for naming, concurrency in cells:
                self._guard(
                    running,
                    f"setup.{naming}.c{concurrency}",
                    functools.partial(self._setup_cell, running, naming, concurrency),
                )
            self._guard(running, "latency", lambda: self._latency(running))
        finally:
            running.stop()

    def _setup_cell(self, running: Running, naming: str, concurrency: int) -> None:
        target = running.target
        if naming == "one":
            names: Sequence[str] = (BENCH_DOMAIN,)
            self._warm(target, names)
        elif naming == "fifty":
            names = WARM_NAMES
            self._warm(target, names)
        else:
            names = self.fresh_pools[concurrency]
        counters: list[float] = []
        rates = _client.connection_rate(
            target,
            names=names,
            fresh=naming == "fresh",
            concurrency=concurrency,
            seconds=self.plan.seconds,
            on_start=lambda: counters.append(cpu_seconds(running.pids())),
        )
        used = cpu_seconds(running.pids()) - counters[0]
        key = f"setup.{naming}.c{concurrency}"
        metrics = self.record.metrics
        metrics[f"{key}.per_s"] = rates.per_second
        metrics[f"{key}.p50_ms"] = rates.p50_ms
        metrics[f"{key}.p99_ms"] = rates.p99_ms
        metrics[f"{key}.cpu_ms"] = used * 1000 / rates.completed if rates.completed else math.nan
        metrics[f"{key}.client_cpu_ms"] = rates.client_cpu_ms_per_connection
        self._note_errors(key, rates.errors)
        if rates.names_exhausted:
            self.record.notes.append(f"{key}: ran out of fresh names before the time was up")
        _log(
            f"[{self.record.label}] {key}: {rates.per_second:.0f}/s, p50 {rates.p50_ms:.1f} ms, "
            f"p99 {rates.p99_ms:.1f} ms, {metrics[f'{key}.cpu_ms']:.2f} CPU ms/connection"
        )

    def _latency(self, running: Running) -> None:
        result = _client.keepalive_latency(
            running.target, name=BENCH_DOMAIN, seconds=self.plan.seconds
        )
        self.record.metrics["latency.p50_ms"] = result.p50_ms
        self.record.metrics["latency.p99_ms"] = result.p99_ms
        self._note_errors("latency", result.errors)
        _log(
            f"[{self.record.label}] keep-alive latency: p50 {result.p50_ms:.3f} ms, "
            f"p99 {result.p99_ms:.3f} ms ({result.requests} requests)"
        )

    def bulk(self) -> None:
        running = self._start()
        try:
            self._warm(running.target, (BENCH_DOMAIN,))
            for direction in ("download", "upload"):
                self._guard(
                    running,
                    f"bulk.{direction}",
                    functools.partial(self._transfer, running, direction),
                )
                self.origin.clear_uploads()
        finally:
            running.stop()

    def _transfer(self, running: Running, direction: str) -> None:
        size = self.plan.bulk_size
        with RssSampler(running.pids()) as sampler:
            result = _client.transfer(
                running.target,
                name=BENCH_DOMAIN,
                direction=direction,
                size=size,
                timeout=size / 2e6 + 60,
            )
        if result.error is not None:
            raise _client.ProtocolFailure(result.error)
        key = f"bulk.{direction}"
        self.record.metrics[f"{key}.mb_s"] = result.megabytes_per_second
        self.record.metrics[f"{key}.peak_rss_mib"] = sampler.peak / MiB
        self.record.metrics[f"{key}.rss_growth_mib"] = (sampler.peak - sampler.baseline) / MiB
        _log(
            f"[{self.record.label}] {direction} {size // MiB} MiB: "
            f"{result.megabytes_per_second:.0f} MB/s, peak RSS {sampler.peak / MiB:.0f} MiB "
            f"(+{(sampler.peak - sampler.baseline) / MiB:.1f} MiB)"
        )

    def held(self, count: int) -> None:
        running = self._start()
        try:
            self._guard(running, f"held.{count}", lambda: self._hold(running, count))
        finally:
            running.stop()

    def _hold(self, running: Running, count: int) -> None:
        limit = fd_hard_limit() - 64
        per_connection = 2 if self.record.label in PROXIES else 1
        possible = limit // per_connection
        key = f"held.{count}"
        if count > possible:
            self.record.notes.append(
                f"{key}: {possible} connections, not {count}: the descriptor hard limit "
                f"({fd_hard_limit()}) allows no more at {per_connection} descriptors each"
            )
        target_count = min(count, possible)
        self._warm(running.target, (BENCH_DOMAIN,) * 5)
        time.sleep(0.3)
        baseline = rss_bytes(running.pids())
        held_rss: list[int] = []

        def measure() -> None:
            time.sleep(0.5)
            held_rss.append(rss_bytes(running.pids()))

        result = _client.hold_connections(
            running.target,
            names=(BENCH_DOMAIN,),
            count=target_count,
            open_seconds=self.plan.held_open_seconds,
            while_held=measure,
        )
        metrics = self.record.metrics
        metrics[f"{key}.opened"] = result.opened
        metrics[f"{key}.answered"] = result.answered
        metrics[f"{key}.open_s"] = result.open_seconds
        metrics[f"{key}.rss_mib"] = held_rss[0] / MiB
        if result.opened:
            metrics[f"{key}.kib_per_conn"] = (held_rss[0] - baseline) / result.opened / 1024
        self._note_errors(key, result.errors)
        _log(
            f"[{self.record.label}] held {result.opened}/{target_count} connections in "
            f"{result.open_seconds:.1f} s, {result.answered} answered again; RSS "
            f"{baseline / MiB:.0f} -> {held_rss[0] / MiB:.0f} MiB "
            f"({metrics.get(f'{key}.kib_per_conn', math.nan):.1f} KiB per connection)"
        )


def _fresh_pools(plan: Plan) -> dict[int, tuple[str, ...]]:
    return {
        concurrency: tuple(f"c{concurrency}-{i}.{BENCH_DOMAIN}" for i in range(plan.fresh_names))
        for concurrency in (1, 16)
    }


def run_benchmarks(
    plan: Plan,
    *,
    peers: Sequence[str] = PEERS,
    components: Sequence[str] = COMPONENTS,
    scenarios: Sequence[str] = ("setup", "bulk", "held"),
) -> RunResult:
    """Run the whole benchmark; never raises for a peer that is missing or fails.

    Args:
        plan: :data:`QUICK`, :data:`FULL` or your own.
        peers: which of :data:`~benchmarks._peers.PEERS` to measure.
        components: which component benchmarks to run.
        scenarios: which scenario groups (``setup`` includes the keep-alive latency).
    """
    raise_fd_limit()
    started = time.monotonic()
    meta = machine_info()
    meta["date"] = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    meta["mode"] = plan.mode
    records = {label: PeerRecord(label=label) for label in peers}
    work = Path(tempfile.mkdtemp(prefix="tlsmitm-bench-"))
    origin: NginxOrigin | None = None
    try:
        pki = make_pki(work, now=dt.datetime.now(dt.UTC))
        pools = _fresh_pools(plan)
        names = [*WARM_NAMES, *(n for pool in pools.values() for n in pool)]
        try:
            origin = NginxOrigin.start(pki, big_sizes=(plan.bulk_size,))
            meta["origin"] = origin.version()
        except Unavailable as exc:
            _log(f"no origin server: {exc}")
            for record in records.values():
                record.status = "missing"
                record.failures["origin"] = f"the nginx origin is unavailable: {exc}"
        if origin is not None:
            env = PeerEnv(work=work, pki=pki, origin_port=origin.port, names=names)
            for label in peers:
                record = records[label]
                measurer = _Measurer(plan, env, origin, record, pools)
                counts = plan.held_counts_slow if label in SLOW_TO_OPEN else plan.held_counts
                groups: list[tuple[str, Callable[[], None]]] = []
                if "setup" in scenarios:
                    groups.append(("setup", measurer.setup_and_latency))
                if "bulk" in scenarios:
                    groups.append(("bulk", measurer.bulk))
                if "held" in scenarios:
                    groups += [(f"held.{n}", functools.partial(measurer.held, n)) for n in counts]
                for name, group in groups:
                    _log(f"[{label}] {name} ({time.monotonic() - started:.0f} s into the run)")
                    try:
                        group()
                    except Unavailable as exc:
                        if not record.metrics:
                            record.status = "missing"
                            record.failures["start"] = str(exc)
                            _log(f"[{label}] missing: {exc}")
                            break
                        record.status = "partial"
                        record.failures.setdefault(name, str(exc))
                        _log(f"[{label}] {name}: {exc}")
        results: dict[str, ComponentResult] = {}
        for name in components:
            _log(f"component {name}")
            results[name] = run_component(name, plan.component_seconds)
            if results[name].status != "ok":
                _log(f"component {name}: {results[name].status} ({results[name].detail})")
    finally:
        if origin is not None:
            origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    meta["load_average_at_end"] = list(os.getloadavg())
    meta["duration_s"] = round(time.monotonic() - started, 1)
    return RunResult(plan=plan, meta=meta, peers=records, components=results)
