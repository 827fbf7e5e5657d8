"""``serve --workers N``: one worker process per core behind one port, and a small supervisor.

Theory of operation
-------------------

trio runs one thread, so one ``serve`` process uses one core. With ``--workers N`` (default
``auto``: the CPUs this process may use) the command becomes a supervisor:

1. **The CA is created once, before any worker starts**: the supervisor builds the interceptor
   once (the same checks and errors as one process), under an exclusive lock on
   ``<state dir>/.lock`` (``flock``), so workers -- and several supervisors or single processes
   started together on a fresh state directory -- share one root and one issuing intermediate.
   Workers open the same directory under the same lock and find the CA there.
2. **One port, many listening sockets.** The supervisor binds (but never listens on) a socket with
   ``SO_REUSEPORT`` to learn the port (``--listen HOST:0`` picks one) and to hold it; each worker
   binds its own ``SO_REUSEPORT`` socket to that port and listens. The kernel spreads new
   connections over the listening sockets; a worker that dies takes only its own queue with it.
3. **Workers are the ordinary single-process ``serve``** (``--workers 1``) started with a hidden
   ``--worker-of-supervisor`` flag, so the embedding API and every option are unchanged. Each
   prints its banner on a pipe; the supervisor prints its own once every worker is listening, then
   relays what workers print.
4. **Supervision.** A worker that exits unasked is restarted after a backoff (1 s, doubling to
   30 s; back to 1 s once a worker has run for a minute), and each restart is logged. SIGTERM and
   SIGINT are forwarded (each worker stops accepting and finishes its connections), and the
   supervisor exits when all have. SIGHUP is forwarded: each worker reloads its rules, trust store
   and preload list, without dropping a connection.

State the workers share lives in the state directory's SQLite file (WAL mode, several processes)
or in Redis (``--state``); see ``docs/state.rst``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import trio

__all__ = [
    "bind_shared_port",
    "parse_workers",
    "reuse_port_listener",
    "state_lock",
    "supervise",
    "watch_supervisor",
]

log = logging.getLogger("tlsmitm.workers")

_BACKOFF_FIRST = 1.0
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 60.0  # a worker up this long resets the backoff
_BANNER_END = b"Stop with Ctrl-C"


async def watch_supervisor(supervisor_pid: int, done: trio.Event) -> None:
    """In a worker: stop (SIGTERM to itself, so it drains) once the supervisor is gone; return
    when ``done`` is set.

    A worker never outlives its supervisor, however that one died (``kill -9`` included): when
    it does, the worker is re-parented and :func:`os.getppid` changes. (``PR_SET_PDEATHSIG`` is
    not used: it fires when the parent *thread* that forked exits, and trio forks from threads.)
    """
    # Polling: the kernel offers no event for "my parent changed" that trio can wait on.
    while os.getppid() == supervisor_pid:
        with trio.move_on_after(0.5):
            await done.wait()
        if done.is_set():
            return  # this worker is stopping anyway
    os.kill(os.getpid(), signal.SIGTERM)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_workers(text: str) -> int:
    """``auto`` -> the usable CPUs; ``N`` -> N (1 to 256)."""
    if text == "auto":
        return usable_cpus()
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"--workers takes auto or a number 1-256, not {text!r}")
    return int(text)


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``state_dir/.lock`` (created ``0700``/``0600`` as needed)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def bind_shared_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with ``SO_REUSEPORT``: it learns the port
    (``port`` 0 picks one) and holds it for the workers' listening sockets."""
    return _bind_reuse_port(host, port)


def _bind_reuse_port(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def reuse_port_listener(host: str, port: int, backlog: int = 1024) -> trio.SocketListener:
    """A listening socket on ``host:port`` that other workers' sockets share (``SO_REUSEPORT``)."""
    sock = _bind_reuse_port(host, port)
    sock.listen(backlog)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _worker_argv(argv: Sequence[str], host: str, port: int, index: int) -> list[str]:
    """The worker's command line: the supervisor's, with one worker, a fixed port, a flag."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--listen"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--listen=")):
            continue
        out.append(arg)
    shown = f"[{host}]" if ":" in host else host
    return [
        sys.executable,
        "-m",
        "tlsmitm",
        *out,
        "--workers",
        "1",
        "--listen",
        f"{shown}:{port}",
        "--worker-of-supervisor",
        f"{index}:{os.getpid()}",
    ]


async def _watchdog(interval: float, until: trio.CancelScope) -> None:
    from . import _systemd

    with until:
        while True:
            _systemd.notify("WATCHDOG=1")
            await trio.sleep(interval)


def _mark_dead(pid: int) -> None:
    """A worker's live gauges no longer count (multiprocess metrics, when they are on)."""
    from ._metrics import MULTIPROC_ENV

    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class _Worker:
    def __init__(self, index: int, argv: list[str]) -> None:
        self.index = index
        self.argv = argv
        self.process: trio.Process | None = None
        self.backoff = _BACKOFF_FIRST
        self.restarts = 0


class Supervisor:
    """Starts, watches and stops the workers (see the module's theory of operation)."""

    def __init__(self, argv: Sequence[str], host: str, port: int, workers: int) -> None:
        self.workers = [
            _Worker(index, _worker_argv(argv, host, port, index)) for index in range(workers)
        ]
        self.stopping = False
        self.metrics_sockets: list[socket.socket] = []
        self.state: tuple[Path | None, str | None] = (None, None)
        self._store_check: Callable[[], str | None] | None = None

    async def _run_worker(
        self,
        worker: _Worker,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        first = True
        while not self.stopping:
            started = trio.current_time()
            # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards it once (a second one would make the worker stop at once, without grace).
            process = await trio.lowlevel.open_process(
                worker.argv,
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            worker.process = process
            assert process.stdout is not None
            banner: list[str] | None = []
            pending = b""
            try:
                async with process.stdout:
                    while True:
                        chunk = await process.stdout.receive_some(4096)
                        if not chunk:
                            break
                        pending += chunk
                        *lines, pending = pending.split(b"\n")
                        for raw in lines:
                            line = raw.decode("utf-8", "replace")
                            if banner is not None:
                                banner.append(line)
                                if _BANNER_END in raw:
                                    if first:
                                        first = False
                                        task_status.started(banner)
                                    else:
                                        log.warning("worker %d is listening again", worker.index)
                                    banner = None
                                continue
                            print(line, flush=True)  # reloads, shutdown notes
            except BaseException:
                if process.returncode is None:
                    process.terminate()  # the worker drains, like on SIGTERM
                raise
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(60):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                    code = await process.wait()
                    _mark_dead(process.pid)
            if self.stopping:
                return
            if first:
                raise RuntimeError(
                    f"worker {worker.index} exited with code {code} before listening"
                )
            if trio.current_time() - started >= _STABLE_AFTER:
                worker.backoff = _BACKOFF_FIRST
            worker.restarts += 1
            log.warning(
                "worker %d (pid %d) exited with code %s; restarting it in %.0f s (restart %d)",
                worker.index,
                process.pid,
                code,
                worker.backoff,
                worker.restarts,
            )
            await trio.sleep(worker.backoff)
            worker.backoff = min(worker.backoff * 2, _BACKOFF_MAX)

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    async def run(self) -> None:
        from . import _systemd

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                banners = [await nursery.start(self._run_worker, w) for w in self.workers]
                pids = ", ".join(str(w.process.pid) for w in self.workers if w.process)
                print(f"tlsmitm: {len(self.workers)} workers (pids {pids})")
                for sock in self.metrics_sockets:
                    from ._cli_serve import _http_url

                    print(f"Metrics:  {_http_url(sock)}/metrics (health: /healthz, all workers)")
                print("\n".join(banners[0]), flush=True)
                if self.metrics_sockets:
                    await nursery.start(self._serve_metrics)
                _systemd.notify(
                    f"READY=1\nSTATUS={len(self.workers)} workers\nMAINPID={os.getpid()}"
                )
                interval = _systemd.watchdog_interval()
                watchdog = trio.CancelScope()
                if interval is not None:
                    nursery.start_soon(_watchdog, interval, watchdog)
                with trio.CancelScope() as signal_loop:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            self.signal_all(signal.SIGHUP)
                            continue
                        if self.stopping:  # a second signal: the workers stop at once
                            log.warning("stopping now", extra={"event": "shutdown"})
                            self.signal_all(signal.SIGTERM)
                            break
                        _systemd.notify("STOPPING=1")
                        log.warning(
                            "shutting down (workers close idle connections now and finish "
                            "exchanges in flight; Ctrl-C again to stop now)",
                            extra={"event": "shutdown"},
                        )
                        self.stopping = True
                        self.signal_all(signal.SIGTERM)
                        nursery.start_soon(self._end_when_done, (signal_loop, watchdog))
                # The worker tasks return as their processes exit.

    async def _serve_metrics(self, task_status: trio.TaskStatus[None]) -> None:
        """``/metrics`` (the workers' files added up) and ``/healthz`` until the workers end."""
        from ._cli_serve import metrics_listeners
        from ._metrics import multiprocess_registry, serve_metrics

        state_dir, state = self.state
        if state_dir is not None or state is None:
            from ._cli import default_state_dir
            from ._relay.interceptor import open_state_store

            backend, _ = open_state_store(state_dir or default_state_dir(), state)
            check = getattr(backend, "check_writable", None)
            self._store_check = check if callable(check) else None
        with trio.CancelScope() as scope:
            self._metrics_scope = scope
            await serve_metrics(
                metrics_listeners(self.metrics_sockets),
                multiprocess_registry(),
                self._health,
                task_status=task_status,
            )

    async def _health(self) -> str | None:
        if self.stopping:
            return "shutting down"
        for worker in self.workers:
            if worker.process is None or worker.process.returncode is not None:
                return f"worker {worker.index} is not running (restarting)"
        if self._store_check is not None:
            problem: str | None = await trio.to_thread.run_sync(self._store_check)
            if problem:
                return f"state store not writable: {problem}"
        return None

    async def _end_when_done(self, scopes: Sequence[trio.CancelScope]) -> None:
        """Once every worker exited (none is restarted while stopping): end ``scopes``."""
        for worker in self.workers:
            if worker.process is not None:
                await worker.process.wait()
        for scope in scopes:
            scope.cancel()
        metrics = getattr(self, "_metrics_scope", None)
        if metrics is not None:
            metrics.cancel()


def supervise(
    args: argparse.Namespace,
    workers: int,
    holder: socket.socket,
    metrics_sockets: Sequence[socket.socket] = (),
) -> int:
    """Run ``serve`` as ``workers`` processes on the port ``holder`` holds; returns when they
    have all stopped (0), or 2 when a worker could not start.

    With ``metrics_sockets`` (``--metrics``), the workers write their metrics to a directory made
    for this run (``prometheus_client``'s multiprocess mode) and the supervisor serves the sum.
    """
    import shutil
    import tempfile

    from ._metrics import MULTIPROC_ENV

    host = args.listen[0]
    bound_port = int(holder.getsockname()[1])
    supervisor = Supervisor(args.argv, host, bound_port, workers)
    metrics_dir = None
    if metrics_sockets:
        metrics_dir = tempfile.mkdtemp(prefix="tlsmitm-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by every worker
        supervisor.metrics_sockets = list(metrics_sockets)
        supervisor.state = (args.state_dir, getattr(args, "state", None))
    try:
        trio.run(supervisor.run)
    except (RuntimeError, BaseExceptionGroup) as exc:
        failures = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
        print(f"tlsmitm: {'; '.join(map(str, failures))}", file=sys.stderr)
        return 2
    finally:
        holder.close()
        for sock in metrics_sockets:
            sock.close()
        if metrics_dir is not None:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
