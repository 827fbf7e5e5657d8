"""The benchmark run: every peer through every scenario, in one run, on one machine.

Scenarios (all traffic on 127.0.0.1, every loop bounded in time):

1. ``setup``: new connections per second, one small request each, at 1 and 16 in flight, with
   one host name (warm), 50 names (warm) and a new name per connection (cold minting); p50/p99
   latency and the peer's CPU milliseconds per connection.
2. ``latency``: small requests one after another on one warm keep-alive connection.
3. ``bulk``: a download and an upload of one large body through one connection; MB/s, and the
   peer's peak RSS over its RSS before the transfer.
4. ``held``: N connections opened and held, RSS per connection, then every one asked again.
5. ``h2`` (issue 14), tlsmitm and mitmproxy only, the client offering ``h2`` and an origin of
   its own speaking it (the other scenarios' origin speaks HTTP/1.1 only): requests/s over 1
   connection x 100 concurrent streams and 16 connections x 10 streams (the peers taking turns);
   tlsmitm's HTTP/2 bulk download and upload (compare with its HTTP/1.1 ``bulk``); and RSS per
   idle intercepted HTTP/2 connection with :attr:`Plan.h2_held_count` held.

Each group of scenarios gets a freshly started peer. Figures land in :class:`PeerRecord`
``metrics`` under dotted keys (``setup.fresh.c16.per_s``, ``bulk.download.mb_s``, ...).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlsmitm._relay.guard import connection_cap

from . import _client, bench_h2
from ._client import HttpsConnection, Target, client_context
from ._components import COMPONENTS, ComponentResult, run_component
from ._origin import NginxOrigin
from ._peers import PEERS, PeerEnv, Running, start_peer
from ._pki import BENCH_DOMAIN, BenchPki, make_pki
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
PROXIES = frozenset(
    {"tlsmitm", "tlsmitm-w2", "tlsmitm-auto", "tlsmitm-nopool", "mitmproxy", "squid"}
)
# ``serve --workers 2`` and ``--workers auto``: measured for setup and keep-alive (scaling).
WORKER_PEERS = frozenset({"tlsmitm-w2", "tlsmitm-auto"})
# Peers measured for connection setup only (pooling changes nothing on one long connection).
SETUP_ONLY = frozenset({"tlsmitm-nopool"})
SLOW_TO_OPEN = frozenset({"mitmproxy", "squid"})
# The ``h2`` scenario: request rates for these; bulk and idle memory for tlsmitm only (its
# goals compare with tlsmitm's own HTTP/1.1 figures and a fixed budget).
H2_PEERS = frozenset({"tlsmitm", "mitmproxy"})
H2_CELLS = ((1, 100), (16, 10))  # (connections, concurrent streams on each)
H2_HELD_OPEN_SECONDS = 60.0  # at least this long to open the idle HTTP/2 connections


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """How long and how big each measurement is.

    Attributes:
        mode: ``quick`` or ``full``.
        seconds: length of each connection-setup and latency measurement.
        repeats: how often each measurement is repeated (rounds); for connection setup and
            latency the peers take turns, round by round (A, B, A, B...: a change in the
            shared machine's load hits all of them), and the median is reported with the
            smallest and largest round beside it.
        bulk_size: bytes of each bulk download and upload.
        held_counts: connections held open (each count a fresh peer).
        held_counts_slow: the same for the peers that open connections slowly (mitmproxy,
            Squid), to keep the run bounded.
        held_open_seconds: most time spent opening held connections.
        component_seconds: ``seconds`` passed to each component benchmark's ``run``.
        fresh_names: new names for one cold-minting measurement (each repetition and each
            concurrency gets its own).
        h2_held_count: idle intercepted HTTP/2 connections held for the memory figure.
    """

    mode: str
    seconds: float
    repeats: int
    bulk_size: int
    held_counts: tuple[int, ...]
    held_counts_slow: tuple[int, ...]
    held_open_seconds: float
    component_seconds: float
    fresh_names: int
    h2_held_count: int


QUICK = Plan(
    mode="quick",
    seconds=1.5,
    repeats=1,
    bulk_size=256 * MiB,
    held_counts=(1000,),
    held_counts_slow=(1000,),
    held_open_seconds=15.0,
    component_seconds=0.5,
    fresh_names=1000,
    h2_held_count=2000,
)
FULL = Plan(
    mode="full",
    seconds=2.5,
    repeats=5,
    bulk_size=256 * MiB,
    held_counts=(1000, 10_000),
    held_counts_slow=(1000,),
    held_open_seconds=90.0,
    component_seconds=2.0,
    fresh_names=1500,
    h2_held_count=2000,
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
    # The load average on every line: a figure taken on a busy machine is visible as such.
    load = os.getloadavg()[0]
    print(f"benchmarks [load {load:.1f}]: {message}", file=sys.stderr, flush=True)


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


def held_possible(label: str, count: int, hard_limit: int) -> tuple[int, str]:
    """How many of ``count`` held connections peer ``label`` can hold under ``hard_limit``
    descriptors, and the reason when that is fewer (for the peer's notes)."""
    per_connection = 2 if label in PROXIES else 1
    possible = (hard_limit - 64) // per_connection
    why = f"allows no more at {per_connection} descriptors each"
    if label.startswith("tlsmitm"):
        # tlsmitm serve caps its connections by the same budget, after a reserve of its own
        # (listeners, fetches, the pool's idle upstream connections); past the cap it sheds
        # idle connections, which the held clients would count as failures.
        pool = 0 if label == "tlsmitm-nopool" else 256
        possible = min(possible, connection_cap(hard_limit, count, idle_upstreams=pool))
        why = "leaves tlsmitm serve this many after its own reserve (serve's banner says so)"
    return possible, why


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
        self.samples: dict[str, list[float]] = {}

    # -- plumbing ------------------------------------------------------------------------------

    def _start(self, *, fresh_names: bool = False) -> Running:
        env = self.env
        if not fresh_names:  # each name is a --resolve flag tlsmitm parses at start-up
            env = dataclasses.replace(env, names=WARM_NAMES)
        running = start_peer(
            self.record.label,
            env,
            origin_pids=self.origin.pids(),
            origin_version=self.origin.version(),
        )
        self.record.version = running.version
        return running

    def _guard(self, running: Running, scenario: str, body: Callable[[], None]) -> None:
        """Run one measurement; a failure is retried once, and reported either way."""
        for attempt in (1, 2):
            try:
                body()
            except Exception as exc:  # one scenario failing must not end the run: report it
                failure = f"{type(exc).__name__}: {exc}"
                _log(f"[{self.record.label}] {scenario} failed:\n{traceback.format_exc()}")
                if attempt == 1 and running.alive():
                    self.record.notes.append(f"{scenario}: failed once ({failure}); retried")
                    continue
                self.record.failures[scenario] = (
                    f"{failure} (on the retry too)" if attempt == 2 else failure
                )
                self.record.status = "partial"
            break
        if not running.alive():
            self.record.failures[scenario] = (
                f"the peer exited (status {running.process.returncode if running.process else '?'})"
                f"; log: {running.log_tail(1500)}"
            )
            self.record.status = "partial"
            raise Unavailable(f"{self.record.label} exited during {scenario}")

    def _note_errors(self, scenario: str, errors: dict[str, int]) -> None:
        if errors:
            seen = self.record.errors.setdefault(scenario, {})
            for error, count in errors.items():
                seen[error] = seen.get(error, 0) + count
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

    def start_for_setup(self) -> Running:
        """Start the peer for the connection-setup and latency measurements."""
        return self._start(fresh_names=True)

    def setup_cells(self) -> tuple[tuple[str, int], ...]:
        """The connection-setup cells that apply to this peer (names matter to proxies only)."""
        return SETUP_CELLS if self.record.label in PROXIES else SETUP_CELLS[:2]

    def _sample(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def finish_samples(self) -> None:
        """Median of each repeated figure into ``metrics``, its smallest and largest beside."""
        for key, values in self.samples.items():
            finite = sorted(v for v in values if not math.isnan(v))
            self.record.metrics[key] = statistics.median(finite) if finite else math.nan
            if len(finite) > 1:
                self.record.metrics[f"{key}_min"] = finite[0]
                self.record.metrics[f"{key}_max"] = finite[-1]

    def setup_cell(self, running: Running, naming: str, concurrency: int, repeat: int) -> None:
        """One repetition of one connection-setup cell."""
        target = running.target
        if naming == "one":
            names: Sequence[str] = (BENCH_DOMAIN,)
            if repeat == 0:
                self._warm(target, names)
        elif naming == "fifty":
            names = WARM_NAMES
            if repeat == 0:
                self._warm(target, names)
        else:
            size = self.plan.fresh_names
            names = self.fresh_pools[concurrency][repeat * size : (repeat + 1) * size]
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
        cpu_ms = used * 1000 / rates.completed if rates.completed else math.nan
        self._sample(f"{key}.per_s", rates.per_second)
        self._sample(f"{key}.p50_ms", rates.p50_ms)
        self._sample(f"{key}.p99_ms", rates.p99_ms)
        self._sample(f"{key}.cpu_ms", cpu_ms)
        self._sample(f"{key}.client_cpu_ms", rates.client_cpu_ms_per_connection)
        self._note_errors(key, rates.errors)
        if rates.names_exhausted:
            note = f"{key}: ran out of fresh names early; the rate is over the time they lasted"
            if note not in self.record.notes:
                self.record.notes.append(note)
        _log(
            f"[{self.record.label}] {key} #{repeat + 1}: {rates.per_second:.0f}/s, "
            f"p50 {rates.p50_ms:.1f} ms, p99 {rates.p99_ms:.1f} ms, "
            f"{cpu_ms:.2f} CPU ms/connection"
        )

    def latency(self, running: Running, repeat: int) -> None:
        """One repetition of the warm keep-alive latency measurement."""
        result = _client.keepalive_latency(
            running.target, name=BENCH_DOMAIN, seconds=self.plan.seconds
        )
        self._sample("latency.p50_ms", result.p50_ms)
        self._sample("latency.p99_ms", result.p99_ms)
        self._note_errors("latency", result.errors)
        _log(
            f"[{self.record.label}] keep-alive latency #{repeat + 1}: p50 {result.p50_ms:.3f} ms, "
            f"p99 {result.p99_ms:.3f} ms ({result.requests} requests)"
        )

    def keepalive(self, running: Running, repeat: int) -> None:
        """One repetition of warm keep-alive requests/s over four connections at once."""
        per_s = _client.keepalive_rate(running.target, name=BENCH_DOMAIN, seconds=self.plan.seconds)
        self._sample("keepalive.c4.per_s", per_s)
        _log(f"[{self.record.label}] keep-alive, 4 connections #{repeat + 1}: {per_s:,.0f} req/s")

    def start_for_bulk(self) -> Running:
        """Start the peer for the bulk transfers (all peers run; they take turns by round)."""
        running = self._start()
        self._warm(running.target, (BENCH_DOMAIN,))
        return running

    def bulk_round(self, running: Running, repeat: int) -> None:
        """One round of bulk transfers: a download, then an upload."""
        for direction in ("download", "upload"):
            self._guard(
                running,
                f"bulk.{direction}",
                functools.partial(self._transfer, running, direction, repeat),
            )
            self.origin.clear_uploads()

    def finish_bulk(self) -> None:
        """Median, spread and worst memory of the bulk rounds into ``metrics``."""
        for direction in ("download", "upload"):
            key = f"bulk.{direction}"
            rates = sorted(self.samples.pop(f"{key}.mb_s", []))
            if rates:
                self.record.metrics[f"{key}.mb_s"] = statistics.median(rates)
                if len(rates) > 1:
                    self.record.metrics[f"{key}.mb_s_min"] = rates[0]
                    self.record.metrics[f"{key}.mb_s_max"] = rates[-1]
            for figure in ("peak_rss_mib", "rss_growth_mib"):  # the worst repetition counts
                values = self.samples.pop(f"{key}.{figure}", [])
                if values:
                    self.record.metrics[f"{key}.{figure}"] = max(values)
            cpu = sorted(self.samples.pop(f"{key}.cpu_ms_per_mib", []))
            if cpu:
                self.record.metrics[f"{key}.cpu_ms_per_mib"] = statistics.median(cpu)

    def _transfer(self, running: Running, direction: str, repeat: int) -> None:
        size = self.plan.bulk_size
        cpu_before = cpu_seconds(running.pids())
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
        cpu_ms_per_mib = (cpu_seconds(running.pids()) - cpu_before) * 1000 / (size / MiB)
        key = f"bulk.{direction}"
        self._sample(f"{key}.mb_s", result.megabytes_per_second)
        self._sample(f"{key}.cpu_ms_per_mib", cpu_ms_per_mib)
        self._sample(f"{key}.peak_rss_mib", sampler.peak / MiB)
        self._sample(f"{key}.rss_growth_mib", (sampler.peak - sampler.baseline) / MiB)
        _log(
            f"[{self.record.label}] {direction} {size // MiB} MiB #{repeat + 1}: "
            f"{result.megabytes_per_second:.0f} MB/s, {cpu_ms_per_mib:.2f} CPU ms/MiB, "
            f"peak RSS {sampler.peak / MiB:.0f} MiB "
            f"(+{(sampler.peak - sampler.baseline) / MiB:.1f} MiB)"
        )

    def held(self, count: int) -> None:
        running = self._start()
        try:
            self._guard(running, f"held.{count}", lambda: self._hold(running, count))
        finally:
            running.stop()

    def _hold(self, running: Running, count: int) -> None:
        possible, why = held_possible(self.record.label, count, fd_hard_limit())
        key = f"held.{count}"
        if count > possible:
            self.record.notes.append(
                f"{key}: {possible} connections, not {count}: the descriptor hard limit "
                f"({fd_hard_limit()}) {why}"
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

    # -- HTTP/2 (issue 14) ----------------------------------------------------------------------

    def h2_rate(self, running: Running, connections: int, streams: int, repeat: int) -> None:
        """One repetition of HTTP/2 requests/s, ``streams`` in flight on each connection."""
        per_s = bench_h2.rate(
            running.target, connections=connections, streams=streams, seconds=self.plan.seconds
        )
        self._sample(f"h2.c{connections}x{streams}.per_s", per_s)
        _log(
            f"[{self.record.label}] h2, {connections} connection(s) x {streams} streams "
            f"#{repeat + 1}: {per_s:,.0f} req/s"
        )

    def h2_bulk(self, running: Running, direction: str, repeat: int) -> None:
        """One HTTP/2 download or upload of the bulk size on one connection."""
        size = self.plan.bulk_size
        cpu_before, client_before = cpu_seconds(running.pids()), time.process_time()
        with RssSampler(running.pids()) as sampler:
            mb_s = bench_h2.bulk(running.target, direction=direction, size=size)
        # The proxy's CPU per MiB, and the Python h2 client's (in this process; it shares the
        # cores): a client costing more than the proxy would make the rate measure the client.
        cpu_ms_per_mib = (cpu_seconds(running.pids()) - cpu_before) * 1000 / (size / MiB)
        client_ms_per_mib = (time.process_time() - client_before) * 1000 / (size / MiB)
        self.origin.clear_uploads()
        key = f"h2.bulk.{direction}"
        self._sample(f"{key}.mb_s", mb_s)
        self._sample(f"{key}.cpu_ms_per_mib", cpu_ms_per_mib)
        self._sample(f"{key}.client_cpu_ms_per_mib", client_ms_per_mib)
        self._sample(f"{key}.peak_rss_mib", sampler.peak / MiB)
        _log(
            f"[{self.record.label}] h2 {direction} {size // MiB} MiB #{repeat + 1}: "
            f"{mb_s:.0f} MB/s, {cpu_ms_per_mib:.2f} CPU ms/MiB (client {client_ms_per_mib:.2f}), "
            f"peak RSS {sampler.peak / MiB:.0f} MiB"
        )

    def h2_held(self) -> None:
        """RSS per idle intercepted HTTP/2 connection, on a freshly started peer."""
        running = self._start()
        try:
            self._guard(running, "h2.held", lambda: self._hold_h2(running))
        finally:
            running.stop()

    def _hold_h2(self, running: Running) -> None:
        count = min(self.plan.h2_held_count, (fd_hard_limit() - 64) // 2)
        key = f"h2.held.{self.plan.h2_held_count}"
        bench_h2.rate(running.target, connections=5, streams=1, seconds=0.2)  # leaf, upstream
        time.sleep(0.3)
        baseline = rss_bytes(running.pids())
        held_rss: list[int] = []
        result = bench_h2.hold_idle(
            running.target,
            count=count,
            # (2,000 TLS handshakes and h2 prefaces through one process: the quick plan's 15 s
            # is too short for them on a loaded machine)
            open_seconds=max(self.plan.held_open_seconds, H2_HELD_OPEN_SECONDS),
            while_held=lambda: held_rss.append(rss_bytes(running.pids())),
        )
        metrics = self.record.metrics
        metrics[f"{key}.opened"] = result.opened
        metrics[f"{key}.answered"] = result.answered
        metrics[f"{key}.open_s"] = result.open_seconds
        if result.opened:
            metrics[f"{key}.kib_per_conn"] = (held_rss[0] - baseline) / result.opened / 1024
        self._note_errors(key, result.errors)
        _log(
            f"[{self.record.label}] held {result.opened}/{count} idle h2 connections in "
            f"{result.open_seconds:.1f} s, {result.answered} answered again; RSS "
            f"{baseline / MiB:.0f} -> {held_rss[0] / MiB:.0f} MiB "
            f"({metrics.get(f'{key}.kib_per_conn', math.nan):.1f} KiB per connection)"
        )


def _start_all(
    measurers: Sequence[_Measurer], running: dict[str, Running], what: str, key: str
) -> None:
    """Start every peer for ``what`` into ``running``; a peer that fails is recorded, not run."""
    for measurer in measurers:
        label = measurer.record.label
        _log(f"[{label}] starting for {what}")
        try:
            running[label] = measurer.start_for_bulk()
        except Exception as exc:  # (Unavailable, or the warm-up request failing)
            measurer.record.status = "partial" if measurer.record.metrics else "missing"
            measurer.record.failures[key] = f"{type(exc).__name__}: {exc}"
            _log(f"[{label}] {key}: {exc}")


_Turn = tuple[str, Callable[["_Measurer", Running, int], None]]


def _take_turns(
    plan: Plan,
    measurers: Sequence[_Measurer],
    running: dict[str, Running],
    turns: Sequence[_Turn],
    measures: Callable[[_Measurer, str], bool],
) -> None:
    """Each turn's scenario, ``plan.repeats`` rounds, every running peer in each round (A, B,
    A, B...) for which ``measures(measurer, scenario)``; a peer that turns out unavailable is
    stopped and left out of the rest."""
    for scenario, measure in turns:
        for repeat in range(plan.repeats):
            for measurer in measurers:
                label = measurer.record.label
                peer = running.get(label)
                if peer is None or not measures(measurer, scenario):
                    continue
                try:
                    measurer._guard(
                        peer, scenario, functools.partial(measure, measurer, peer, repeat)
                    )
                except Unavailable as exc:
                    _log(f"[{label}] {exc}")
                    del running[label]
                    peer.stop()


def _measures_in_setup(measurer: _Measurer, scenario: str) -> bool:
    """Whether ``measurer``'s peer takes part in this setup-group scenario."""
    if scenario.startswith("setup."):
        return any(scenario == f"setup.{n}.c{c}" for n, c in measurer.setup_cells())
    # latency and keepalive: not for the peers measured for connection setup only
    return measurer.record.label not in SETUP_ONLY


def _h2_in_turns(plan: Plan, measurers: Sequence[_Measurer]) -> None:
    """HTTP/2 request rates (peers taking turns), tlsmitm's HTTP/2 bulk, then idle memory."""
    running: dict[str, Running] = {}
    try:
        _start_all(measurers, running, "HTTP/2", "h2")
        turns: list[_Turn] = [
            (
                f"h2.c{c}x{s}",
                lambda m, r, i, c=c, s=s: m.h2_rate(r, c, s, i),
            )
            for c, s in H2_CELLS
        ]
        turns += [
            (f"h2.bulk.{d}", lambda m, r, i, d=d: m.h2_bulk(r, d, i))
            for d in ("download", "upload")
        ]
        _take_turns(
            plan,
            measurers,
            running,
            turns,
            lambda m, scenario: not scenario.startswith("h2.bulk") or m.record.label == "tlsmitm",
        )
    finally:
        for peer in running.values():
            peer.stop()
        for measurer in measurers:
            measurer.finish_samples()
            measurer.samples.clear()
    for measurer in measurers:
        if measurer.record.label == "tlsmitm" and measurer.record.status != "missing":
            _log(f"[tlsmitm] h2.held.{plan.h2_held_count}")
            try:
                measurer.h2_held()
            except Unavailable as exc:
                measurer.record.status = "partial"
                measurer.record.failures.setdefault("h2.held", str(exc))


def _h2_with_its_origin(
    plan: Plan, env: PeerEnv, pki: BenchPki, measurers: Sequence[_Measurer]
) -> None:
    """The ``h2`` scenario against an nginx of its own with ``http2`` on.

    The other scenarios keep an HTTP/1.1-only origin: tlsmitm offers ``h2`` upstream to an
    HTTP/1.1 client too when the relay allows it, so an origin speaking h2 would change (and
    make incomparable with earlier runs) every HTTP/1.1 figure.
    """
    chosen = [m for m in measurers if m.record.label in H2_PEERS]
    try:
        origin = NginxOrigin.start(pki, big_sizes=(plan.bulk_size,), http2=True)
    except Unavailable as exc:
        for measurer in chosen:
            measurer.record.failures["h2"] = f"the HTTP/2 nginx origin is unavailable: {exc}"
            measurer.record.status = "partial"
        return
    try:
        h2_env = dataclasses.replace(env, origin_port=origin.port)
        _h2_in_turns(
            plan, [_Measurer(plan, h2_env, origin, m.record, m.fresh_pools) for m in chosen]
        )
    finally:
        origin.stop()


def _fresh_pools(plan: Plan) -> dict[int, tuple[str, ...]]:
    size = plan.fresh_names * plan.repeats
    return {
        concurrency: tuple(f"c{concurrency}-{i}.{BENCH_DOMAIN}" for i in range(size))
        for concurrency in (1, 16)
    }


def _setup_turn(naming: str, concurrency: int) -> Callable[[_Measurer, Running, int], None]:
    def turn(measurer: _Measurer, running: Running, repeat: int) -> None:
        measurer.setup_cell(running, naming, concurrency, repeat)

    return turn


def _setup_in_turns(plan: Plan, measurers: Sequence[_Measurer]) -> None:
    """Connection setup and latency, all peers running, taking turns cell by cell."""
    running: dict[str, Running] = {}
    try:
        for measurer in measurers:
            label = measurer.record.label
            _log(f"[{label}] starting for connection setup")
            try:
                running[label] = measurer.start_for_setup()
            except Unavailable as exc:
                measurer.record.status = "missing"
                measurer.record.failures["start"] = str(exc)
                _log(f"[{label}] missing: {exc}")
        turns: list[_Turn] = [
            (f"setup.{naming}.c{concurrency}", _setup_turn(naming, concurrency))
            for naming, concurrency in SETUP_CELLS
        ]
        turns.append(("latency", lambda m, r, i: m.latency(r, i)))  # (not SETUP_ONLY peers)
        turns.append(("keepalive", lambda m, r, i: m.keepalive(r, i)))  # (not SETUP_ONLY peers)
        _take_turns(plan, measurers, running, turns, _measures_in_setup)
    finally:
        for label, peer in running.items():
            if label in WORKER_PEERS or label == "tlsmitm":
                # CPU seconds of each process (supervisor and workers): contention is visible.
                per_process = [(pid, cpu_seconds([pid])) for pid in peer.pids()]
                _log(
                    f"[{label}] CPU seconds per process: "
                    + ", ".join(f"pid {pid} {cpu:.1f} s" for pid, cpu in per_process)
                )
                record = next(m.record for m in measurers if m.record.label == label)
                for index, (_, cpu) in enumerate(per_process):
                    record.metrics[f"cpu_s.process{index}"] = cpu
            peer.stop()
        for measurer in measurers:
            measurer.finish_samples()


def _bulk_in_turns(plan: Plan, measurers: Sequence[_Measurer]) -> None:
    """Bulk transfers, all peers running, taking turns round by round (A, B, A, B...)."""
    running: dict[str, Running] = {}
    try:
        _start_all(measurers, running, "bulk transfers", "bulk")
        for repeat in range(plan.repeats):
            for measurer in measurers:
                label = measurer.record.label
                peer = running.get(label)
                if peer is None:
                    continue
                try:
                    measurer.bulk_round(peer, repeat)
                except Unavailable as exc:
                    _log(f"[{label}] {exc}")
                    del running[label]
                    peer.stop()
    finally:
        for peer in running.values():
            peer.stop()
        for measurer in measurers:
            measurer.finish_bulk()


def run_benchmarks(
    plan: Plan,
    *,
    peers: Sequence[str] = PEERS,
    components: Sequence[str] = COMPONENTS,
    scenarios: Sequence[str] = ("setup", "bulk", "held", "h2"),
) -> RunResult:
    """Run the whole benchmark; never raises for a peer that is missing or fails.

    Args:
        plan: :data:`QUICK`, :data:`FULL` or your own.
        peers: which of :data:`~benchmarks._peers.PEERS` to measure.
        components: which component benchmarks to run.
        scenarios: which scenario groups (``setup`` includes the keep-alive latency; ``h2``
            gets an origin of its own speaking HTTP/2).
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
            measurers = [_Measurer(plan, env, origin, records[label], pools) for label in peers]
            if "setup" in scenarios:
                _setup_in_turns(plan, measurers)
            if "bulk" in scenarios:
                _bulk_in_turns(
                    plan,
                    [
                        m
                        for m in measurers
                        if m.record.status != "missing"
                        and m.record.label not in SETUP_ONLY
                        and m.record.label not in WORKER_PEERS
                    ],
                )
            if "h2" in scenarios:
                _h2_with_its_origin(
                    plan, env, pki, [m for m in measurers if m.record.status != "missing"]
                )
            for measurer in measurers:
                record = measurer.record
                label = record.label
                if record.status == "missing" or label in SETUP_ONLY or label in WORKER_PEERS:
                    continue
                counts = plan.held_counts_slow if label in SLOW_TO_OPEN else plan.held_counts
                groups: list[tuple[str, Callable[[], None]]] = []
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
