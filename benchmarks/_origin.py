"""The origin server every peer talks to: nginx (C speed), serving the benchmark's routes.

Routes: ``/small`` (a 32-byte text answer), ``/big/N`` (an N-byte file of zeros, Content-Length),
``PUT /upload/NAME`` (stores the body, answers 201/204 once all of it has arrived). Keep-alive
connections live for 10 minutes, so held connections are not closed under the measurement.

Bulk bodies are served in large pieces on both protocols: ``output_buffers 2 1m`` for HTTP/1.1,
and for HTTP/2 ``http2_chunk_size 64k`` (nginx's default is 8k: eight times the DATA frames
for the same body; nginx still never exceeds the frame size its peer allows).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from ._pki import BenchPki
from ._proc import descendants, raise_fd_limit
from ._system import Unavailable, ensure_debian_package, free_port, wait_for_port

__all__ = ["SMALL_BODY", "NginxOrigin"]

SMALL_BODY = b"hello from the benchmark origin\n"

_CONFIG = """\
worker_processes 2;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
worker_rlimit_nofile {nofile};
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    keepalive_timeout 600s;
    keepalive_requests 10000000;
    sendfile off;
    output_buffers 2 1m;
    http2_chunk_size 64k;
    server {{
        listen 127.0.0.1:{port} ssl{http2} backlog=4096;
        server_name bench.test *.bench.test;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench:20m;
        location = /small {{
            default_type text/plain;
            return 200 "{small}";
        }}
        location /big/ {{
            root {work}/www;
            default_type application/octet-stream;
        }}
        location /upload/ {{
            root {work}/www;
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
            client_body_buffer_size 1m;
        }}
    }}
}}
"""


class NginxOrigin:
    """A running nginx origin on 127.0.0.1 (``start`` it, ``stop`` it).

    Its files live in a directory under ``/dev/shm`` when there is one (uploads land in memory,
    not on disk). ``/big/N`` files are sparse: reading them costs no disk either.
    """

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, work: Path, executable: str
    ) -> None:
        self.process = process
        self.executable = executable
        self.port = port
        self.work = work

    @classmethod
    def start(
        cls, pki: BenchPki, *, big_sizes: tuple[int, ...], http2: bool = False
    ) -> NginxOrigin:
        """Install nginx if needed, write its configuration, start it and wait until it listens.

        Raises:
            Unavailable: nginx is not installed and cannot be, or does not start.
        """
        nginx = ensure_debian_package("nginx-light", "nginx")
        shm = Path("/dev/shm")
        work = Path(
            tempfile.mkdtemp(prefix="tlsmitm-bench-origin-", dir=shm if shm.is_dir() else None)
        )
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi", "www/big", "www/upload"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        # Workers may run as an unprivileged user: let them write uploads.
        for sub in ("body", "www/upload"):
            (work / sub).chmod(0o777)
        work.chmod(0o755)
        (work / "www").chmod(0o755)
        for size in big_sizes:
            with (work / "www" / "big" / str(size)).open("wb") as blob:
                blob.truncate(size)
        nofile = raise_fd_limit()
        port = free_port()
        config = work / "nginx.conf"
        config.write_text(
            _CONFIG.format(
                work=work,
                port=port,
                cert=pki.leaf_pem,
                key=pki.leaf_key,
                small=SMALL_BODY.decode().replace("\n", "\\n"),
                nofile=nofile - 16,
                connections=max(1024, nofile - 64),
                http2=" http2" if http2 else "",
            )
        )
        with (work / "stderr.log").open("wb") as log:  # (nginx keeps its own descriptor)
            process = subprocess.Popen(
                [nginx, "-p", str(work), "-e", str(work / "error.log"), "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        origin = cls(process, port, work, nginx)
        try:
            wait_for_port(port, seconds=15, alive=process)
        except Unavailable as exc:
            origin.stop()
            detail = (
                (work / "error.log").read_text(errors="replace")[-500:]
                if (work / "error.log").exists()
                else ""
            )
            raise Unavailable(f"nginx did not start: {exc} {detail}".strip()) from exc
        return origin

    def pids(self) -> list[int]:
        """The master and its workers."""
        return descendants(self.process.pid)

    def version(self) -> str:
        """``nginx/1.22.1`` or similar."""
        result = subprocess.run(
            [self.executable, "-v"], capture_output=True, text=True, check=False
        )
        return (result.stderr or result.stdout).strip().rpartition(": ")[2]

    def clear_uploads(self) -> None:
        """Drop uploaded bodies (they sit in memory under /dev/shm)."""
        shutil.rmtree(self.work / "www" / "upload", ignore_errors=True)
        (self.work / "www" / "upload").mkdir(exist_ok=True)
        (self.work / "www" / "upload").chmod(0o777)

    def stop(self) -> None:
        """Stop nginx (fast shutdown) and delete its files."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.work, ignore_errors=True)
