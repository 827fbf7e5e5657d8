"""What a process (and its children) costs, read from ``/proc``: CPU seconds and resident memory.

Squid and nginx are several processes; a figure for "the proxy" is the sum over its process tree.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path

__all__ = [
    "RssSampler",
    "cpu_seconds",
    "descendants",
    "fd_hard_limit",
    "raise_fd_limit",
    "rss_bytes",
]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # proc(5): fields 14 and 15 (utime, stime), 1-based, counted from the pid.
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def rss_bytes(pids: list[int]) -> int:
    """Resident set size of ``pids`` added up, in bytes."""
    total = 0
    for pid in pids:
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += pages * _PAGE
    return total


FD_TARGET = 65_536  # descriptors wanted for the held connections (and their peers)


def fd_hard_limit() -> int:
    """This process's hard limit on open descriptors (children inherit it)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one; returns the new soft limit.

    The hard limit itself is raised to :data:`FD_TARGET` first where the process may (root, or
    ``CAP_SYS_RESOURCE``): the full run holds 10,000 intercepted connections, two descriptors
    each, and a common hard limit of 20,000 would stop it at 9,968. Meant as a ``preexec_fn``
    too: children started after it inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if hard < FD_TARGET:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (FD_TARGET, FD_TARGET))
        except (ValueError, OSError):  # not allowed: keep the hard limit there is
            pass
        else:
            return FD_TARGET
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class RssSampler:
    """Samples the RSS of a process tree in a thread while a transfer runs.

    Use as a context manager; ``peak`` and ``samples`` are valid after exit.
    """

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = rss_bytes(pids)
        self.peak = self.baseline
        self.samples: list[tuple[float, int]] = []

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            rss = rss_bytes(self._pids)
            self.samples.append((time.monotonic() - start, rss))
            self.peak = max(self.peak, rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self._pids))
