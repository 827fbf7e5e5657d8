"""The systems measured side by side: direct, the bare terminator, tlsmitm, mitmproxy, Squid.

Each peer is started fresh for each group of measurements (so memory and caches start from the
same place) and stopped after it. A peer that cannot be installed or started raises
:class:`~benchmarks._system.Unavailable`, and the harness reports it as missing.

* **direct**: the client talks to the nginx origin itself: the ceiling.
* **terminator**: :mod:`benchmarks._terminator`, one TLS hop on tlsmitm's engine.
* **tlsmitm**: ``python -m tlsmitm serve`` exactly as a user starts it.
* **tlsmitm-nopool**: the same with ``--upstream-pool-seconds 0``: every client connection gets
  its own upstream connection (two handshakes per connection, as with the other proxies), to
  show what the upstream pool is worth and what tlsmitm does without it.
* **mitmproxy**: ``mitmdump`` from a virtualenv of its own (it needs Python >= 3.12), verifying
  upstream against the benchmark root and streaming large bodies, with a tiny addon that maps
  ``*.bench.test`` to 127.0.0.1 (mitmproxy has no ``--resolve``).
* **squid**: Debian's ``squid-openssl`` with SslBump (peek at step 1, then bump), certificates
  minted by its ``security_file_certgen`` helpers, names from a hosts file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ._client import Target
from ._pki import BenchPki
from ._proc import descendants, raise_fd_limit
from ._system import Unavailable, ensure_debian_package, free_port, wait_for_port

__all__ = ["PEERS", "PeerEnv", "Running", "start_peer"]

PEERS = (
    "direct",
    "terminator",
    "tlsmitm",
    "tlsmitm-w2",
    "tlsmitm-auto",
    "tlsmitm-nopool",
    "mitmproxy",
    "squid",
)
REPO = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(__file__).resolve().parent / ".peers"
MITMPROXY_PYTHONS = ("python3.14", "python3.13", "python3.12")


def _mitmproxy_pythons() -> list[str]:
    """Interpreters new enough for mitmproxy: ``$TLSMITM_BENCH_PYTHON``, then pyenv's (newest
    first), then the ones on ``PATH`` -- found, so that no machine's own path is written here.
    (pyenv's shims are skipped: they fail for a version that is installed but not selected.)"""
    found = [os.environ.get("TLSMITM_BENCH_PYTHON", "")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found += sorted((str(p) for p in pyenv.glob("3.1[2-9]*/bin/python")), reverse=True)
    found += [shutil.which(name) or "" for name in MITMPROXY_PYTHONS]
    return [p for p in found if p and "/shims/" not in p and Path(p).is_file()]


MITMPROXY_SPEC = "mitmproxy==12.2.3"  # the version of the reference figures in issue 9
# Interpreter options put in front of ``-m tlsmitm`` (``benchmarks._profile`` adds cProfile).
_PYTHON_PREFIX: list[str] = []

_MITM_ADDON = '''\
"""Benchmark addon: connect *.bench.test to 127.0.0.1 (mitmproxy has no --resolve)."""


class Resolve:
    def server_connect(self, data):
        host, port = data.server.address
        if host == "bench.test" or host.endswith(".bench.test"):
            data.server.address = ("127.0.0.1", port)


addons = [Resolve()]
'''


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEnv:
    """What every peer needs to know about the run.

    Attributes:
        work: a scratch directory for this run.
        pki: the origin's PKI.
        origin_port: the nginx origin's port on 127.0.0.1.
        names: every host name a client may use (each resolves to 127.0.0.1 in every proxy).
    """

    work: Path
    pki: BenchPki
    origin_port: int
    names: Sequence[str]


@dataclass(slots=True, kw_only=True)
class Running:
    """A started peer."""

    label: str
    target: Target
    process: subprocess.Popen[bytes] | None
    version: str
    log: Path | None = None
    extra_pids: list[int] = field(default_factory=list)
    scratch: Path | None = None

    def pids(self) -> list[int]:
        """The processes whose CPU and memory count as this peer's."""
        if self.process is None:
            return list(self.extra_pids)
        return descendants(self.process.pid)

    def alive(self) -> bool:
        """Whether the peer's main process is still running."""
        return self.process is None or self.process.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGINT (a user's Ctrl-C), then SIGKILL after ``grace`` seconds."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the peer's log (for failure reports)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]


def _popen(command: list[str], log: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    try:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            command,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=raise_fd_limit,
            **kwargs,
        )
    finally:
        handle.close()


def _wait_for_line(process: subprocess.Popen[bytes], log: Path, marker: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if marker in text:
            return text
        if process.poll() is not None:
            raise Unavailable(f"exited with status {process.returncode}: {text[-800:]}")
        time.sleep(0.05)
    raise Unavailable(f"did not print {marker!r} within {seconds:.0f} s")


def _fresh_log(env: PeerEnv, label: str) -> Path:
    logs = env.work / "logs"
    logs.mkdir(exist_ok=True)
    index = len(list(logs.glob(f"{label}-*.log")))
    return logs / f"{label}-{index}.log"


# -- direct and the terminator ---------------------------------------------------------------


def _start_direct(env: PeerEnv, origin_pids: list[int], origin_version: str) -> Running:
    return Running(
        label="direct",
        target=Target(
            label="direct",
            address=("127.0.0.1", env.origin_port),
            via_proxy=False,
            port=env.origin_port,
            cafile=str(env.pki.root_pem),
        ),
        process=None,
        version=origin_version,
        extra_pids=origin_pids,
    )


def _start_terminator(env: PeerEnv) -> Running:
    try:
        import tlsmitm._tls  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"tlsmitm._tls cannot be imported: {exc}") from exc
    log = _fresh_log(env, "terminator")
    process = _popen(
        [
            sys.executable,
            "-m",
            "benchmarks._terminator",
            "--cert",
            str(env.pki.leaf_pem),
            "--key",
            str(env.pki.leaf_key),
            "--port",
            "0",
        ],
        log,
        cwd=str(REPO),
    )
    text = _wait_for_line(process, log, "listening on ", 30)
    port = int(text.split("listening on ")[1].split()[0])
    return Running(
        label="terminator",
        target=Target(
            label="terminator",
            address=("127.0.0.1", port),
            via_proxy=False,
            port=port,
            cafile=str(env.pki.root_pem),
        ),
        process=process,
        version="tlsmitm._tls",
        log=log,
    )


# -- tlsmitm ----------------------------------------------------------------------------------


def _start_tlsmitm(
    env: PeerEnv, *, label: str = "tlsmitm", pool: bool = True, workers: str = "1"
) -> Running:
    state = env.work / f"{label}-state"
    log = _fresh_log(env, label)
    resolve = [arg for name in env.names for arg in ("--resolve", f"{name}=127.0.0.1")]
    process = _popen(
        [
            sys.executable,
            *_PYTHON_PREFIX,
            "-m",
            "tlsmitm",
            "serve",
            "--workers",
            workers,
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
            "--extra-roots",
            str(env.pki.root_pem),
            "--resolve",
            "bench.test=127.0.0.1",
            *resolve,
            "--max-connections",
            "30000",
            # Every benchmark client is 127.0.0.1: the per-client cap (512 by default) would
            # refuse the held connections with 429.
            "--max-connections-per-client",
            "0",
            *([] if pool else ["--upstream-pool-seconds", "0"]),
            "--log-level",
            "warning",
        ],
        log,
        cwd=str(REPO),
    )
    text = _wait_for_line(process, log, "Stop with Ctrl-C", 60)
    address = text.split("tlsmitm is listening on http://")[1].split()[0]
    port = int(address.rpartition(":")[2])
    return Running(
        label=label,
        target=Target(
            label=label,
            address=("127.0.0.1", port),
            via_proxy=True,
            port=env.origin_port,
            cafile=str(state / "ca" / "root.pem"),
        ),
        process=process,
        version=_tlsmitm_version(),
        log=log,
    )


def _tlsmitm_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"git {commit}"


# -- mitmproxy --------------------------------------------------------------------------------


def mitmproxy_venv() -> Path:
    """The virtualenv with mitmproxy (made and filled on first use).

    Raises:
        Unavailable: no Python >= 3.12 on this machine, or pip failed.
    """
    venv = PEERS_DIR / "mitmproxy-venv"
    mitmdump = venv / "bin" / "mitmdump"
    if mitmdump.exists():
        return venv
    python = next(iter(_mitmproxy_pythons()), None)
    if python is None:
        raise Unavailable("mitmproxy needs Python >= 3.12, and none was found")
    PEERS_DIR.mkdir(exist_ok=True)
    print(f"benchmarks: installing mitmproxy into {venv} (first run only)", flush=True)
    for step in (
        [python, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", MITMPROXY_SPEC],
    ):
        result = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            last = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise Unavailable(f"installing mitmproxy failed: {' '.join(last)}")
    return venv


def _start_mitmproxy(env: PeerEnv) -> Running:
    venv = mitmproxy_venv()
    confdir = env.work / "mitmproxy-conf"
    confdir.mkdir(exist_ok=True)
    addon = env.work / "mitmproxy_resolve.py"
    addon.write_text(_MITM_ADDON)
    port = free_port()
    log = _fresh_log(env, "mitmproxy")
    process = _popen(
        [
            str(venv / "bin" / "mitmdump"),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "--set",
            f"confdir={confdir}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={env.pki.root_pem}",
            "--set",
            "stream_large_bodies=1m",
            "--set",
            "termlog_verbosity=warn",
            "--set",
            "flow_detail=0",
            "-s",
            str(addon),
        ],
        log,
    )
    wait_for_port(port, seconds=60, alive=process)
    version = subprocess.run(
        [str(venv / "bin" / "mitmdump"), "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return Running(
        label="mitmproxy",
        target=Target(
            label="mitmproxy",
            address=("127.0.0.1", port),
            via_proxy=True,
            port=env.origin_port,
            cafile=str(confdir / "mitmproxy-ca-cert.pem"),
        ),
        process=process,
        version=version[0].split(":", 1)[1].strip() if version else "?",
        log=log,
    )


# -- Squid ------------------------------------------------------------------------------------

_SQUID_CONFIG = """\
http_port 127.0.0.1:{port} ssl-bump generate-host-certificates=on \
dynamic_cert_mem_cache_size=64MB tls-cert={ca_cert} tls-key={ca_key}
sslcrtd_program {certgen} -s {work}/ssl_db -M 64MB
sslcrtd_children 8 startup=2 idle=1
acl step1 at_step SslBump1
ssl_bump peek step1
ssl_bump bump all
tls_outgoing_options cafile={root}
http_access allow localhost
http_access deny all
cache deny all
cache_mem 8 MB
access_log none
cache_log {work}/cache.log
pid_filename {work}/squid.pid
coredump_dir {work}
hosts_file {work}/hosts
dns_nameservers 127.0.0.1
max_filedescriptors {nofile}
shutdown_lifetime 1 seconds
client_persistent_connections on
server_persistent_connections on
pconn_timeout 600 seconds
client_lifetime 1 hour
read_timeout 10 minutes
request_body_max_size 0
{user}
"""


def _squid_ca(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Squid benchmark CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "squid-ca.pem", directory / "squid-ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _start_squid(env: PeerEnv) -> Running:
    squid = ensure_debian_package("squid-openssl", "squid")
    built = subprocess.run([squid, "-v"], capture_output=True, text=True, check=False).stdout
    if "--with-openssl" not in built:
        raise Unavailable("the installed squid is built without OpenSSL (install squid-openssl)")
    certgen = next(
        (
            p
            for p in (
                "/usr/lib/squid/security_file_certgen",
                "/usr/libexec/squid/security_file_certgen",
            )
            if Path(p).is_file()
        ),
        None,
    )
    if certgen is None:
        raise Unavailable("squid's security_file_certgen helper is missing")
    # Not under env.work: Squid runs as the proxy user, which may not enter that directory.
    work = Path(tempfile.mkdtemp(prefix="tlsmitm-bench-squid-"))
    work.chmod(0o755)
    ca_cert, ca_key = _squid_ca(work)
    (work / "hosts").write_text(
        "127.0.0.1 bench.test\n" + "".join(f"127.0.0.1 {name}\n" for name in env.names)
    )
    db = subprocess.run(
        [certgen, "-c", "-s", str(work / "ssl_db"), "-M", "64MB"],
        capture_output=True,
        text=True,
        check=False,
    )
    if db.returncode != 0:
        raise Unavailable(f"security_file_certgen -c failed: {db.stderr.strip()}")
    user = ""
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("proxy")
        except KeyError:
            entry = None
        if entry is not None:
            user = "cache_effective_user proxy"
            for path in [work, *work.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
            # Squid reads the root the client's origin chains to, as the proxy user.
            shutil.copy(env.pki.root_pem, work / "origin-root.pem")
            os.chown(work / "origin-root.pem", entry.pw_uid, entry.pw_gid)
    root = work / "origin-root.pem" if user else env.pki.root_pem
    port = free_port()
    config = work / "squid.conf"
    config.write_text(
        _SQUID_CONFIG.format(
            port=port,
            ca_cert=ca_cert,
            ca_key=ca_key,
            certgen=certgen,
            work=work,
            root=root,
            nofile=raise_fd_limit(),
            user=user,
        )
    )
    check = subprocess.run(
        [squid, "-k", "parse", "-f", str(config)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise Unavailable(f"squid -k parse failed: {(check.stderr or check.stdout)[-600:]}")
    log = _fresh_log(env, "squid")
    process = _popen([squid, "-N", "-f", str(config)], log)
    try:
        wait_for_port(port, seconds=60, alive=process)
    except Unavailable as exc:
        cache_log = work / "cache.log"
        tail = cache_log.read_text(errors="replace")[-600:] if cache_log.exists() else ""
        shutil.rmtree(work, ignore_errors=True)
        raise Unavailable(f"squid did not start: {exc} {tail}") from exc
    return Running(
        label="squid",
        target=Target(
            label="squid",
            address=("127.0.0.1", port),
            via_proxy=True,
            port=env.origin_port,
            cafile=str(ca_cert),
        ),
        process=process,
        version=built.splitlines()[0].rpartition(" ")[2] if built else "?",
        log=work / "cache.log",
        scratch=work,
    )


def start_peer(label: str, env: PeerEnv, *, origin_pids: list[int], origin_version: str) -> Running:
    """Start the peer called ``label`` (one of :data:`PEERS`).

    Raises:
        Unavailable: it cannot be installed or started.
    """
    if label == "direct":
        return _start_direct(env, origin_pids, origin_version)
    if label == "terminator":
        return _start_terminator(env)
    if label == "tlsmitm":
        return _start_tlsmitm(env)
    if label == "tlsmitm-w2":
        return _start_tlsmitm(env, label=label, workers="2")
    if label == "tlsmitm-auto":
        return _start_tlsmitm(env, label=label, workers="auto")
    if label == "tlsmitm-nopool":
        return _start_tlsmitm(env, label=label, pool=False)
    if label == "mitmproxy":
        return _start_mitmproxy(env)
    if label == "squid":
        return _start_squid(env)
    raise ValueError(f"unknown peer {label!r}; expected one of {', '.join(PEERS)}")
