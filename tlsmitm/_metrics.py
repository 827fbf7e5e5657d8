"""Prometheus metrics and ``/healthz`` for ``serve --metrics HOST:PORT`` (``prometheus_client``).

Theory of operation
-------------------
Nothing is counted twice and almost nothing on the hot path:

* most counters already exist as plain integers (:class:`~tlsmitm._relay.InterceptorStats`, the
  forge's and the state cache's counters); a **sampler** task adds their growth to the
  Prometheus counters once a second, and sets the gauges (active connections and tunnels);
* what only a closed connection knows (its decision and reason, bytes, requests by protocol,
  handshake durations) is read from its record once, when it closes
  (:meth:`Metrics.connection_closed`): two histogram observations and a few dictionary
  additions per connection.

**Several worker processes** (``serve --workers N``): the supervisor makes a fresh directory for
this run and hands it to every worker in ``PROMETHEUS_MULTIPROC_DIR`` (``prometheus_client``'s
multiprocess mode: each process writes its values to memory-mapped files there). The supervisor
serves ``/metrics`` by adding the files up (``prometheus_client``'s ``MultiProcessCollector``),
gauges summed over the live workers (``livesum``), and marks a worker's files dead when it
exits; the directory is removed when the supervisor stops. One process (``--workers 1``) keeps its
metrics in memory and serves them itself.

``/healthz`` answers ``200 ok`` when the proxy listens and its state store accepts writes, and
``503`` with the reason otherwise (also while shutting down).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import h11
import trio

if TYPE_CHECKING:
    from ._relay import Interceptor
    from ._relay.state import FlowRecord

__all__ = ["MULTIPROC_ENV", "Metrics", "serve_metrics"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_SECONDS = 1.0

# Seconds: a loopback handshake takes ~1 ms, a far server 100+ ms, a stalled one the timeout.
_HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# InterceptorStats counters exported as they are: attribute -> (metric, help).
_STATS_COUNTERS = {
    "client_handshake_failures": (
        "tlsmitm_client_handshake_failures",
        "Client TLS handshakes with a forged leaf that failed.",
    ),
    "upstream_failures": (
        "tlsmitm_upstream_failures",
        "Upstream connections that could not be made or handshaken.",
    ),
    "upstream_reused": (
        "tlsmitm_upstream_reused",
        "Connections served over a pooled upstream connection.",
    ),
    "refused_busy": (
        "tlsmitm_refused_busy",
        "Connections refused with 503 because every slot was taken.",
    ),
    "shed_idle": ("tlsmitm_shed_idle", "Idle connections closed to make room near the cap."),
    "error_origin": ("tlsmitm_error_origin_connections", "Connections to https://error.invalid/."),
    "override_pages": (
        "tlsmitm_override_pages",
        "Connections sent to an error page that offers an override.",
    ),
    "override_grants": ("tlsmitm_override_grants", "Overrides users granted on such pages."),
    "scanned": ("tlsmitm_scanned_bodies", "Bodies that went to the content scanners."),
    "scan_blocked": ("tlsmitm_scan_blocked", "Scanned bodies that were blocked."),
    "scan_unscanned": (
        "tlsmitm_scan_unscanned",
        "Bodies delivered unscanned because a scanner failed (--scan-failure open).",
    ),
}


class Metrics:
    """The Prometheus metrics of one process, fed by :class:`~tlsmitm.Interceptor`.

    Args:
        registry: where the metrics are registered (default: a fresh registry; in multiprocess
            mode values go to the files of ``$PROMETHEUS_MULTIPROC_DIR`` regardless).
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter(
            "tlsmitm_connections",
            "Closed client connections by decision (intercept, bypass, block, error) and reason.",
            ["decision", "reason"],
            registry=r,
        )
        self.bytes = Counter(
            "tlsmitm_relayed_bytes",
            "Application bytes relayed, by direction (up: client to server).",
            ["direction"],
            registry=r,
        )
        self.requests = Counter(
            "tlsmitm_requests",
            "HTTP requests relayed, by the protocol the relay spoke to the client.",
            ["protocol"],
            registry=r,
        )
        self.verification_failures = Counter(
            "tlsmitm_upstream_verification_failures",
            "Upstream certificate chains refused, by CertError reason.",
            ["reason"],
            registry=r,
        )
        self.hsts_hits = Counter(
            "tlsmitm_hsts_known_host_connections",
            "Verified connections to hosts tlsmitm knows as HSTS hosts (no override possible).",
            registry=r,
        )
        self.handshake = Histogram(
            "tlsmitm_handshake_seconds",
            "TLS handshake durations: side=upstream (handshake and verification), side=client.",
            ["side"],
            buckets=_HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.leaves_minted = Counter(
            "tlsmitm_leaves_minted", "Leaf certificates minted.", registry=r
        )
        self.leaf_cache = Counter(
            "tlsmitm_leaf_cache_lookups",
            "Forged-leaf cache lookups by result (hit, miss); hit ratio = hit / (hit + miss).",
            ["result"],
            registry=r,
        )
        self.scan_results = Counter(
            "tlsmitm_scan_results",
            "Connections whose bodies were scanned, by their most severe scan result.",
            ["result"],
            registry=r,
        )
        self.scan_seconds = Histogram(
            "tlsmitm_scan_seconds",
            "Time the content scanners took on one connection's bodies.",
            buckets=_HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.state_errors = Counter(
            "tlsmitm_state_store_errors", "State-store operations that failed.", registry=r
        )
        self.stats_counters = {
            attribute: Counter(name, help_text, registry=r)
            for attribute, (name, help_text) in _STATS_COUNTERS.items()
        }
        self.active = Gauge(
            "tlsmitm_active_connections",
            "Client connections open now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.tunnels = Gauge(
            "tlsmitm_active_tunnels",
            "Open connections relaying raw bytes (bypassed or spliced) now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._seen: dict[str, float] = {}
        # Per-connection additions, flushed to the counters by the sampler.
        self._pending_connections: dict[tuple[str, str], int] = {}
        self._pending_requests: dict[str, int] = {}
        self._pending_up = 0
        self._pending_down = 0
        self._pending_hsts = 0
        self._pending_scans: dict[str, int] = {}

    # -- the hot path: one call per closed connection -------------------------------------------

    def connection_closed(self, conn: FlowRecord) -> None:
        """Note what a closed connection learned (dictionary additions, two observations)."""
        key = (conn.decision.value, conn.reason)
        self._pending_connections[key] = self._pending_connections.get(key, 0) + 1
        self._pending_up += conn.bytes_up
        self._pending_down += conn.bytes_down
        if conn.requests and conn.relay is not None:
            protocol = conn.relay.value
            self._pending_requests[protocol] = (
                self._pending_requests.get(protocol, 0) + conn.requests
            )
        if conn.hsts_known:
            self._pending_hsts += 1
        if conn.upstream_handshake_s is not None:
            self.handshake.labels("upstream").observe(conn.upstream_handshake_s)
        if conn.client_handshake_s is not None:
            self.handshake.labels("client").observe(conn.client_handshake_s)
        if conn.scan is not None:
            self._pending_scans[conn.scan] = self._pending_scans.get(conn.scan, 0) + 1
            if conn.scan_ms is not None:
                self.scan_seconds.observe(conn.scan_ms / 1000)

    # -- the sampler ---------------------------------------------------------------------------

    def _grow(self, key: str, value: float, counter: Any) -> None:
        """Add ``value``'s growth since the last sample to ``counter``."""
        delta = value - self._seen.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._seen[key] = value

    def sample(self, interceptor: Interceptor) -> None:
        """Bring every metric up to date with ``interceptor`` (the sampler calls it each second)."""
        from ._relay.state import FlowState

        pending, self._pending_connections = self._pending_connections, {}
        for (decision, reason), count in pending.items():
            self.connections.labels(decision, reason).inc(count)
        scans, self._pending_scans = self._pending_scans, {}
        for result, count in scans.items():
            self.scan_results.labels(result).inc(count)
        requests, self._pending_requests = self._pending_requests, {}
        for protocol, count in requests.items():
            self.requests.labels(protocol).inc(count)
        if self._pending_up:
            self.bytes.labels("up").inc(self._pending_up)
        if self._pending_down:
            self.bytes.labels("down").inc(self._pending_down)
        if self._pending_hsts:
            self.hsts_hits.inc(self._pending_hsts)
        self._pending_up = self._pending_down = self._pending_hsts = 0
        stats = interceptor.stats
        for attribute, counter in self.stats_counters.items():
            self._grow(attribute, getattr(stats, attribute, 0), counter)
        for reason, count in list(stats.cert_errors.items()):
            self._grow(f"cert:{reason}", count, self.verification_failures.labels(reason))
        forge = interceptor.forge.stats()
        self._grow("mints", forge["mints"], self.leaves_minted)
        self._grow("hits", forge["hits"], self.leaf_cache.labels("hit"))
        self._grow("misses", forge["misses"], self.leaf_cache.labels("miss"))
        store = getattr(interceptor.hsts, "store", None)
        health = getattr(store, "health", None)
        if health is not None:
            self._grow("state_failures", health.failures, self.state_errors)
        self.active.set(stats.active)
        self.tunnels.set(
            sum(1 for conn in list(interceptor._open) if conn.state is FlowState.SPLICING)
        )

    async def run_sampler(self, interceptor: Interceptor) -> None:
        """Sample once a second until cancelled (and once more then)."""
        try:
            while True:
                self.sample(interceptor)
                await trio.sleep(SAMPLE_SECONDS)
        finally:
            self.sample(interceptor)


# -- /metrics and /healthz ----------------------------------------------------------------------

Health = Callable[[], Awaitable[str | None]]  # None: healthy; else the reason


def exposition(registry: Any) -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


def multiprocess_registry() -> Any:
    """A registry that adds up every process's files in ``$PROMETHEUS_MULTIPROC_DIR``."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.environ[MULTIPROC_ENV])  # type: ignore[no-untyped-call]
    return registry


async def _answer(stream: trio.SocketStream, registry: Any, health: Health) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    with trio.move_on_after(10):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(16 * 1024)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if not isinstance(event, h11.Request):
                return
            break
        path = bytes(event.target).split(b"?")[0]
        if event.method not in (b"GET", b"HEAD"):
            status, body, kind = 405, b"GET only\n", "text/plain; charset=utf-8"
        elif path == b"/metrics":
            body, kind = await trio.to_thread.run_sync(exposition, registry)
            status = 200
        elif path == b"/healthz":
            problem = await health()
            status = 200 if problem is None else 503
            body = b"ok\n" if problem is None else problem.encode("utf-8", "replace") + b"\n"
            kind = "text/plain; charset=utf-8"
        else:
            status, body, kind = 404, b"try /metrics or /healthz\n", "text/plain; charset=utf-8"
        headers = [
            (b"content-type", kind.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"cache-control", b"no-store"),
        ]
        data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if event.method != b"HEAD":
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)


async def serve_metrics(
    listeners: list[trio.SocketListener],
    registry: Any,
    health: Health,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` and ``GET /healthz`` on ``listeners`` until cancelled."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _answer(stream, registry, health)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, handler, [listener])
        task_status.started()


async def interceptor_health(interceptor: Interceptor, listening: Callable[[], bool]) -> str | None:
    """``None`` when ``interceptor`` listens and its state store accepts writes, else why not."""
    if not listening():
        return "not listening (starting or shutting down)"
    if interceptor._draining:
        return "shutting down"
    store = getattr(interceptor.hsts, "store", None)
    health = getattr(store, "health", None)
    if health is not None and not health.ok:
        return f"state store failing: {health.last_error}"
    backend = getattr(store, "backend", store)
    check = getattr(backend, "check_writable", None)
    if callable(check):
        problem: str | None = await trio.to_thread.run_sync(check)
        if problem:
            return f"state store not writable: {problem}"
    return None
