"""The load generator: HTTPS clients, direct or through a proxy's CONNECT, in worker processes.

Every peer is measured by this same client, so a ratio between two peers compares the peers, not
the clients. The client is Python's ``ssl`` module (OpenSSL in C: the handshake work happens with
the GIL released), run in several processes with a few threads each, so that it does not become
the bottleneck before the proxies do. Each worker runs for a fixed time after a barrier that all
workers and the harness pass together; every socket operation has a timeout.

A client connection never resumes a TLS session: each one is a full handshake, as a browser's
first visit is.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConnectionRates",
    "HeldResult",
    "Target",
    "TransferResult",
    "connection_rate",
    "hold_connections",
    "keepalive_latency",
    "percentile",
    "transfer",
]

IO_TIMEOUT = 30.0
_SPAWN = multiprocessing.get_context("spawn")
_CHUNK = 1 << 20


class ProtocolFailure(Exception):
    """The peer answered something other than what the benchmark expects."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where a client connects and whom it trusts.

    Attributes:
        label: the peer's name in reports.
        address: the TCP address the client connects to (the proxy, or the origin itself).
        via_proxy: send ``CONNECT name:port`` first (an explicit HTTPS proxy).
        port: the origin's port, as written in ``CONNECT`` (and ignored when direct).
        cafile: the certificates the client trusts (the proxy's CA, or the origin's root).
    """

    label: str
    address: tuple[str, int]
    via_proxy: bool
    port: int
    cafile: str


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (``nan`` when empty)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def client_context(cafile: str) -> ssl.SSLContext:
    """A browser-like client context: verify against ``cafile``, TLS 1.2+, ALPN http/1.1."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class HttpsConnection:
    """One client connection: TCP (+ CONNECT) + TLS, then HTTP/1.1 requests on it."""

    def __init__(self, target: Target, name: str, context: ssl.SSLContext) -> None:
        sock = socket.create_connection(target.address, timeout=IO_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if target.via_proxy:
                authority = f"{name}:{target.port}".encode()
                sock.sendall(
                    b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n"
                )
                head = _read_head(sock.recv)
                if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    raise ProtocolFailure(f"CONNECT refused: {head[:80]!r}")
            self.tls = context.wrap_socket(sock, server_hostname=name)
        except BaseException:
            sock.close()
            raise
        self.name = name
        # RFC 9112 §3.2: Host carries the port when it is not the scheme's default; a proxy
        # that bumps the connection (Squid) routes the decrypted request by it.
        self.host = name if target.port == 443 else f"{name}:{target.port}"
        self._buffer = bytearray()

    def close(self) -> None:
        self.tls.close()

    def _recv(self, size: int) -> bytes:
        if self._buffer:
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
            return data
        return self.tls.recv(size)

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        close: bool = False,
        body_size: int = 0,
    ) -> tuple[int, int]:
        """Send one request (a ``body_size``-byte body of zeros), read the whole response.

        Returns:
            ``(status, body bytes received)``.
        """
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body_size:
            head += f"Content-Length: {body_size}\r\n"
        if close:
            head += "Connection: close\r\n"
        self.tls.sendall(head.encode() + b"\r\n")
        if body_size:
            chunk = memoryview(bytes(min(_CHUNK, body_size)))
            left = body_size
            while left:
                n = min(left, len(chunk))
                self.tls.sendall(chunk[:n])
                left -= n
        response = _read_head(self._recv, self._buffer)
        status, length = _parse_response_head(response)
        received = 0
        if self._buffer:
            take = min(length, len(self._buffer))
            del self._buffer[:take]
            received = take
        if received < length:
            sink = bytearray(min(_CHUNK, length))
            view = memoryview(sink)
            while received < length:
                n = self.tls.recv_into(view[: min(len(sink), length - received)])
                if not n:
                    raise ProtocolFailure(f"response body cut short at {received} of {length}")
                received += n
        return status, received


def _read_head(recv: Callable[[int], bytes], leftover: bytearray | None = None) -> bytes:
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            if leftover is not None:
                leftover[:0] = buffer[end + 4 :]
            elif end + 4 != len(buffer):
                raise ProtocolFailure("bytes after the CONNECT response before the handshake")
            return bytes(buffer[: end + 4])
        if len(buffer) > 65536:
            raise ProtocolFailure("response head too long")
        data = recv(65536)
        if not data:
            raise ProtocolFailure("connection closed before a complete response head")
        buffer += data


def _parse_response_head(head: bytes) -> tuple[int, int]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ProtocolFailure(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value.strip())
        elif key.strip().lower() == b"transfer-encoding":
            raise ProtocolFailure("chunked responses are not expected from the benchmark origin")
    if status >= 400:
        raise ProtocolFailure(f"HTTP {status}")
    return status, length


def _error_key(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


# -- worker processes -------------------------------------------------------------------------


@dataclass(slots=True)
class _WorkerReport:
    completed: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    exhausted: bool = False
    elapsed: float = 0.0  # seconds from the start to the last completion


def _rate_worker(
    target: Target,
    names: Sequence[str],
    fresh: bool,
    threads: int,
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    context = client_context(target.cafile)
    report = _WorkerReport()
    lock = threading.Lock()
    cpu0 = sum(os.times()[:2])
    barrier.wait(timeout=120)
    started = time.monotonic()
    deadline = started + seconds

    def loop(index: int) -> None:
        mine = list(names[index::threads]) if fresh else list(names)
        position = index
        while True:
            if fresh:
                if position // threads >= len(mine):
                    report.exhausted = True
                    return
                name = mine[position // threads]
            else:
                name = mine[position % len(mine)]
            position += threads
            start = time.monotonic()
            if start >= deadline:
                return
            try:
                connection = HttpsConnection(target, name, context)
                try:
                    connection.request("/small", close=True)
                finally:
                    connection.close()
            except (OSError, ProtocolFailure, ValueError) as exc:
                with lock:
                    key = _error_key(exc)
                    report.errors[key] = report.errors.get(key, 0) + 1
                time.sleep(0.001)
                continue
            end = time.monotonic()
            if end <= deadline:
                with lock:
                    report.completed += 1
                    report.latencies.append(end - start)
                    report.elapsed = max(report.elapsed, end - started)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    report.cpu_seconds = sum(os.times()[:2]) - cpu0
    results.put(report)


def _run_processes(
    function: Callable[..., None],
    per_process_args: Sequence[tuple[Any, ...]],
    *,
    timeout: float,
    during: Callable[[], None] | None = None,
) -> tuple[list[Any], float]:
    """Start one process per argument tuple; returns their reports and the barrier time."""
    barrier = _SPAWN.Barrier(len(per_process_args) + 1)
    results = _SPAWN.Queue()
    processes = [
        _SPAWN.Process(target=function, args=(*args, barrier, results), daemon=True)
        for args in per_process_args
    ]
    for process in processes:
        process.start()
    reports: list[Any] = []
    try:
        barrier.wait(timeout=120)
        started = time.monotonic()
        if during is not None:
            during()
        deadline = started + timeout
        while len(reports) < len(processes):
            try:
                reports.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"client workers did not finish within {timeout:.0f} s"
                    ) from exc
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    return reports, started


def _split(concurrency: int) -> tuple[int, int]:
    """(processes, threads per process) for ``concurrency`` connections in flight."""
    processes = min(concurrency, 4)
    return processes, -(-concurrency // processes)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRates:
    """New connections per second, each with one small request and response."""

    per_second: float
    completed: int
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    client_cpu_ms_per_connection: float
    names_exhausted: bool


def connection_rate(
    target: Target,
    *,
    names: Sequence[str],
    fresh: bool,
    concurrency: int,
    seconds: float,
    on_start: Callable[[], None] | None = None,
) -> ConnectionRates:
    """Open connections for ``seconds`` with ``concurrency`` in flight.

    Args:
        target: where to connect.
        names: host names to use, cycled through; with ``fresh``, each is used once (the
            workers split them) and a worker stops when its share runs out.
        fresh: one new name per connection (cold certificate minting in the proxy).
        concurrency: connections in flight.
        seconds: how long to measure.
        on_start: called in this process when the workers start (e.g. to read CPU counters).
    """
    processes, threads = _split(concurrency)
    args = []
    for index in range(processes):
        share = names[index::processes] if fresh else names
        args.append((target, tuple(share), fresh, threads, seconds))
    reports, _ = _run_processes(
        _rate_worker, args, timeout=seconds + 3 * IO_TIMEOUT, during=on_start
    )
    latencies = sorted(x for r in reports for x in r.latencies)
    completed = sum(r.completed for r in reports)
    errors: dict[str, int] = {}
    for report in reports:
        for key, count in report.errors.items():
            errors[key] = errors.get(key, 0) + count
    cpu = sum(r.cpu_seconds for r in reports)
    exhausted = any(r.exhausted for r in reports)
    # Out of fresh names early: the rate is over the time actually spent.
    elapsed = max((r.elapsed for r in reports), default=0.0) if exhausted else seconds
    return ConnectionRates(
        per_second=completed / elapsed if elapsed > 0 else 0.0,
        completed=completed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=errors,
        client_cpu_ms_per_connection=cpu * 1000 / completed if completed else float("nan"),
        names_exhausted=exhausted,
    )


# -- keep-alive latency -------------------------------------------------------------------------


def _latency_worker(target: Target, name: str, seconds: float, barrier: Any, results: Any) -> None:
    context = client_context(target.cafile)
    report = _WorkerReport()
    connection: HttpsConnection | None = None
    try:
        connection = HttpsConnection(target, name, context)
        for _ in range(50):  # warm up: the first requests fill caches along the way
            connection.request("/small")
    except (OSError, ProtocolFailure, ValueError) as exc:
        report.errors[_error_key(exc)] = 1
        if connection is not None:
            connection.close()
        connection = None
    barrier.wait(timeout=120)
    if connection is not None:
        try:
            deadline = time.monotonic() + seconds
            while (start := time.monotonic()) < deadline:
                connection.request("/small")
                report.latencies.append(time.monotonic() - start)
                report.completed += 1
        except (OSError, ProtocolFailure, ValueError) as exc:
            report.errors[_error_key(exc)] = report.errors.get(_error_key(exc), 0) + 1
        finally:
            connection.close()
    results.put(report)


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    """Request latency on one warm keep-alive connection, one request at a time."""

    p50_ms: float
    p99_ms: float
    requests: int
    errors: dict[str, int]


def keepalive_latency(target: Target, *, name: str, seconds: float) -> Latency:
    """Sequential small requests on one kept-alive connection for ``seconds``."""
    reports, _ = _run_processes(
        _latency_worker, [(target, name, seconds)], timeout=seconds + 3 * IO_TIMEOUT
    )
    report = reports[0]
    latencies = sorted(report.latencies)
    return Latency(
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        requests=report.completed,
        errors=report.errors,
    )


def keepalive_rate(target: Target, *, name: str, seconds: float, connections: int = 4) -> float:
    """Small requests per second over ``connections`` warm keep-alive connections at once
    (one client process each, one request at a time on each)."""
    reports, _ = _run_processes(
        _latency_worker,
        [(target, name, seconds)] * connections,
        timeout=seconds + 3 * IO_TIMEOUT,
    )
    return sum(report.completed for report in reports) / seconds


# -- bulk transfers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferResult:
    """One large body through one connection."""

    megabytes_per_second: float
    seconds: float
    size: int
    error: str | None


def _transfer_worker(
    target: Target, name: str, direction: str, size: int, barrier: Any, results: Any
) -> None:
    context = client_context(target.cafile)
    outcome: dict[str, Any] = {"seconds": float("nan"), "error": None}
    try:
        connection = HttpsConnection(target, name, context)
        try:
            connection.request("/small")
            barrier.wait(timeout=120)
            start = time.monotonic()
            if direction == "download":
                _, received = connection.request(f"/big/{size}")
                if received != size:
                    raise ProtocolFailure(f"received {received} of {size} bytes")
            else:
                connection.request("/upload/blob", method="PUT", body_size=size)
            outcome["seconds"] = time.monotonic() - start
        finally:
            connection.close()
    except (OSError, ProtocolFailure, ValueError, threading.BrokenBarrierError) as exc:
        outcome["error"] = _error_key(exc)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=1)
    results.put(outcome)


def transfer(
    target: Target,
    *,
    name: str,
    direction: str,
    size: int,
    timeout: float,
    during: Callable[[], None] | None = None,
) -> TransferResult:
    """Download (``GET /big/SIZE``) or upload (``PUT /upload/blob``) ``size`` bytes."""
    reports, _ = _run_processes(
        _transfer_worker, [(target, name, direction, size)], timeout=timeout, during=during
    )
    outcome = reports[0]
    seconds = float(outcome["seconds"])
    return TransferResult(
        megabytes_per_second=size / seconds / 1e6 if outcome["error"] is None else float("nan"),
        seconds=seconds,
        size=size,
        error=outcome["error"],
    )


# -- held-open connections ----------------------------------------------------------------------


def _hold_worker(
    target: Target,
    names: Sequence[str],
    count: int,
    threads: int,
    open_seconds: float,
    verify_event: Any,
    release_event: Any,
    barrier: Any,
    results: Any,
) -> None:
    context = client_context(target.cafile)
    held: list[HttpsConnection] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    barrier.wait(timeout=120)
    deadline = time.monotonic() + open_seconds
    counter = iter(range(count))

    def opener() -> None:
        while time.monotonic() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            try:
                connection = HttpsConnection(target, names[index % len(names)], context)
                connection.request("/small")
            except (OSError, ProtocolFailure, ValueError) as exc:
                with lock:
                    key = _error_key(exc)
                    errors[key] = errors.get(key, 0) + 1
                continue
            with lock:
                held.append(connection)

    workers = [threading.Thread(target=opener) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put(("opened", len(held), dict(errors)))
    answered = 0
    if verify_event.wait(timeout=600):
        pending = iter(list(held))

        def verifier() -> None:
            nonlocal answered
            while True:
                with lock:
                    connection = next(pending, None)
                if connection is None:
                    return
                try:
                    connection.request("/small")
                except (OSError, ProtocolFailure, ValueError) as exc:
                    with lock:
                        key = "verify: " + _error_key(exc)
                        errors[key] = errors.get(key, 0) + 1
                    continue
                with lock:
                    answered += 1

        workers = [threading.Thread(target=verifier) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    results.put(("answered", answered, dict(errors)))
    release_event.wait(timeout=600)
    for connection in held:
        with contextlib.suppress(OSError):
            connection.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldResult:
    """Connections opened, held, then all asked one more request."""

    requested: int
    opened: int
    answered: int
    open_seconds: float
    errors: dict[str, int]


def hold_connections(
    target: Target,
    *,
    names: Sequence[str],
    count: int,
    open_seconds: float,
    while_held: Callable[[], None],
    processes: int = 4,
    threads: int = 8,
) -> HeldResult:
    """Open ``count`` connections (one request each) and keep them open.

    ``while_held`` runs once all are open (measure memory there); then every held connection
    sends one more request and the answers are counted; then all are closed.
    """
    processes = max(1, min(processes, count))
    verify_event = _SPAWN.Event()
    release_event = _SPAWN.Event()
    barrier = _SPAWN.Barrier(processes + 1)
    results = _SPAWN.Queue()
    shares = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    workers = [
        _SPAWN.Process(
            target=_hold_worker,
            args=(
                target,
                tuple(names),
                share,
                threads,
                open_seconds,
                verify_event,
                release_event,
                barrier,
                results,
            ),
            daemon=True,
        )
        for share in shares
    ]
    for worker in workers:
        worker.start()
    errors: dict[str, int] = {}
    opened = answered = 0
    try:
        barrier.wait(timeout=120)
        start = time.monotonic()
        limit = open_seconds + 2 * IO_TIMEOUT
        for _ in workers:
            _, n, worker_errors = results.get(timeout=limit)
            opened += n
        open_time = time.monotonic() - start
        while_held()
        verify_event.set()
        for _ in workers:
            _, n, worker_errors = results.get(timeout=limit)
            answered += n
            for key, value in worker_errors.items():
                errors[key] = errors.get(key, 0) + value
    finally:
        verify_event.set()
        release_event.set()
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
                worker.join()
    return HeldResult(
        requested=count, opened=opened, answered=answered, open_seconds=open_time, errors=errors
    )
