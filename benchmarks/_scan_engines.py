"""Real scanning engines for tests and benchmarks: a private clamd and c-icap with ``virus_scan``.

There is no network for ``freshclam``: the signature directory holds EICAR only -- a body
signature (``.ndb``, target 0 = any file, offset ``*`` = anywhere, so it also matches inside
archives and at the end of a large file) and the standard MD5 line (``.hdb``). Each engine listens
on a private Unix socket or a free port on 127.0.0.1 and is stopped when its ``with`` block ends.
The tests' fixtures (``tests/scan_engines.py``) and ``benchmarks/bench_scan.py`` both use these.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ._system import Unavailable, which

# The EICAR test file (eicar.org): not a virus, recognised as one by every engine.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_BODY_SIGNATURE = "Test.EICAR.Body"
STREAM_MAX_LENGTH = 32 * 1024 * 1024  # clamd's StreamMaxLength in these tests
_START_SECONDS = 60.0


@dataclass(frozen=True)
class Clamd:
    socket_path: Path
    host: str
    port: int
    stream_max_length: int
    startup_seconds: float


@dataclass(frozen=True)
class Icap:
    host: str
    port: int
    service: str
    startup_seconds: float

    @property
    def url(self) -> str:
        return f"icap://{self.host}:{self.port}/{self.service}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    path = which(name)
    if path is None:
        raise Unavailable(f"{name} is not installed (./run test installs it)")
    return path


def write_signatures(directory: Path) -> None:
    """EICAR only: a body signature that matches anywhere, and its MD5."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "eicar.ndb").write_text(f"{EICAR_BODY_SIGNATURE}:0:*:{EICAR.hex()}\n")
    md5 = hashlib.md5(EICAR).hexdigest()
    (directory / "eicar.hdb").write_text(f"{md5}:{len(EICAR)}:Test.EICAR.MD5\n")


def _clamd_ping(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
            sock.sendall(b"zPING\0")
            return sock.recv(16).startswith(b"PONG")
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the engine's own process group (it was started in a new session), then wait."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def _log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


@contextlib.contextmanager
def run_clamd(directory: Path) -> Iterator[Clamd]:
    """A private clamd with the EICAR-only signatures in ``directory``."""
    exe = _tool("clamd")
    write_signatures(directory / "db")
    (directory / "tmp").mkdir(exist_ok=True)
    sock = directory / "clamd.sock"
    port = free_port()
    config = directory / "clamd.conf"
    config.write_text(
        "\n".join(
            [
                "Foreground yes",
                f"DatabaseDirectory {directory / 'db'}",
                f"LocalSocket {sock}",
                "LocalSocketMode 600",
                "TCPAddr 127.0.0.1",
                f"TCPSocket {port}",
                f"StreamMaxLength {STREAM_MAX_LENGTH}",
                "MaxFileSize 64M",
                "MaxScanSize 128M",
                f"TemporaryDirectory {directory / 'tmp'}",
                f"PidFile {directory / 'clamd.pid'}",
                "SelfCheck 0",
                "",
            ]
        )
    )
    log = directory / "clamd.out"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "-c", str(config)], stdout=out, stderr=out, start_new_session=True
        )
    try:
        while not _clamd_ping(sock):
            if proc.poll() is not None or time.monotonic() - started > _START_SECONDS:
                raise Unavailable(f"clamd did not start: {_log_tail(log)}")
            time.sleep(0.05)
        yield Clamd(
            socket_path=sock,
            host="127.0.0.1",
            port=port,
            stream_max_length=STREAM_MAX_LENGTH,
            startup_seconds=time.monotonic() - started,
        )
    finally:
        _stop(proc)


def _icap_options_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(
                f"OPTIONS icap://127.0.0.1:{port}/virus_scan ICAP/1.0\r\n"
                "Host: 127.0.0.1\r\nEncapsulated: null-body=0\r\n\r\n".encode()
            )
            return sock.recv(64).startswith(b"ICAP/1.0 200")
    except OSError:
        return False


@contextlib.contextmanager
def run_c_icap(directory: Path, clamd: Clamd) -> Iterator[Icap]:
    """A private c-icap whose ``avscan`` service scans with ``clamd``."""
    exe = _tool("c-icap")
    modules = _c_icap_modules_dir()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tmp").mkdir(exist_ok=True)
    port = free_port()
    config = directory / "c-icap.conf"
    config.write_text(
        "\n".join(
            [
                f"PidFile {directory / 'c-icap.pid'}",
                f"CommandsSocket {directory / 'c-icap.ctl'}",
                "Timeout 60",
                "MaxKeepAliveRequests 1000",
                "KeepAliveTimeout 60",
                "StartServers 1",
                "MaxServers 2",
                "MinSpareThreads 4",
                "MaxSpareThreads 16",
                "ThreadsPerChild 16",
                f"Port 127.0.0.1:{port}",
                f"TmpDir {directory / 'tmp'}",
                "MaxMemObject 131072",
                "DebugLevel 1",
                f"ModulesDir {modules}",
                f"ServicesDir {modules}",
                "TemplateDir /usr/share/c_icap/templates/",
                "TemplateDefaultLanguage en",
                "LoadMagicFile /etc/c-icap/c-icap.magic",
                f"ServerLog {directory / 'server.log'}",
                f"AccessLog {directory / 'access.log'}",
                "Module common clamd_mod.so",
                f"clamd_mod.ClamdSocket {clamd.socket_path}",
                "Service virus_scan virus_scan.so",
                "virus_scan.ScanFileTypes TEXT DATA EXECUTABLE ARCHIVE GIF JPEG MSOFFICE",
                "virus_scan.MaxObjectSize 64M",
                "virus_scan.DefaultEngine clamd",
                # 204 for clean bodies also after a preview, and no data trickled early.
                "ServiceAlias avscan virus_scan?allow204=on&sizelimit=off&mode=simple",
                "",
            ]
        )
    )
    log = directory / "c-icap.out"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "-N", "-f", str(config)], stdout=out, stderr=out, start_new_session=True
        )
    try:
        while not _icap_options_ok(port):
            if proc.poll() is not None or time.monotonic() - started > _START_SECONDS:
                raise Unavailable(
                    f"c-icap did not start: {_log_tail(log)} {_log_tail(directory / 'server.log')}"
                )
            time.sleep(0.05)
        yield Icap(
            host="127.0.0.1",
            port=port,
            service="avscan",
            startup_seconds=time.monotonic() - started,
        )
    finally:
        _stop(proc)


def _c_icap_modules_dir() -> Path:
    for candidate in [*sorted(Path("/usr/lib").glob("*/c_icap")), Path("/usr/lib/c_icap")]:
        if (candidate / "virus_scan.so").exists():
            return candidate
    raise Unavailable(
        "c-icap's virus_scan module is missing (./run test installs libc-icap-mod-virus-scan)"
    )
