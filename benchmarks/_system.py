"""Finding and installing the system programs the benchmark drives (nginx, Squid).

The benchmark installs what it needs the way ``./run`` does: Debian packages through apt-get
when running as root (or with sudo). Whatever cannot be installed is reported as missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = [
    "SYSTEM_PATH",
    "Unavailable",
    "ensure_debian_package",
    "free_port",
    "wait_for_port",
    "which",
]

SYSTEM_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class Unavailable(Exception):
    """A peer or tool cannot be used on this machine; the message says why."""


def which(name: str) -> str | None:
    """``name`` on PATH, including the sbin directories."""
    return shutil.which(name, path=SYSTEM_PATH)


def _as_root(command: list[str]) -> list[str] | None:
    if os.geteuid() == 0:
        return command
    if which("sudo"):
        return ["sudo", "-n", *command]
    return None


def ensure_debian_package(package: str, executable: str) -> str:
    """The path of ``executable``; installs Debian's ``package`` first when it is missing.

    Raises:
        Unavailable: not installed and it could not be installed (no apt-get, no root, or
            apt-get failed); the message has apt-get's last words.
    """
    found = which(executable) or (executable if Path(executable).is_file() else None)
    if found:
        return found
    apt = which("apt-get")
    if apt is None:
        raise Unavailable(f"{executable} is missing and this is not a Debian system (no apt-get)")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt_get(*arguments: str) -> tuple[int, str]:
        command = _as_root([apt, *arguments])
        if command is None:
            raise Unavailable(f"{executable} is missing; install {package} (needs root)")
        print(f"benchmarks: apt-get {' '.join(arguments)}", flush=True)
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=900, env=environment
            )
        except subprocess.TimeoutExpired:
            return 1, "apt-get timed out"
        last = (result.stderr or result.stdout).strip().splitlines()[-1:]
        return result.returncode, last[0] if last else f"exit {result.returncode}"

    install = ("install", "-y", "-qq", "--no-install-recommends", package)
    status, error = apt_get(*install)
    if status != 0:  # an old or missing package list: update once, then try again
        apt_get("update", "-qq")
        status, error = apt_get(*install)
    if status != 0:
        raise Unavailable(f"cannot install {package}: {error}")
    found = which(executable) or (executable if Path(executable).is_file() else None)
    if found is None:
        raise Unavailable(f"{package} installed but {executable} is still missing")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, seconds: float, alive: object = None) -> None:
    """Wait until something accepts TCP connections on ``127.0.0.1:port``.

    Args:
        port: the port.
        seconds: how long to wait at most.
        alive: a ``subprocess.Popen`` whose early exit ends the wait with an error.

    Raises:
        Unavailable: nothing listens within ``seconds``, or the process exited.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if isinstance(alive, subprocess.Popen) and alive.poll() is not None:
            raise Unavailable(f"the server exited with status {alive.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise Unavailable(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f} s")
