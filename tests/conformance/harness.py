"""The conformance harness: a local "badssl in a box", ``tlsmitm serve`` as a user runs it, and
real clients (Python's ``ssl``, curl, Chromium) that trust only tlsmitm's root.

Theory of operation
-------------------
* :class:`Fleet` owns the origins. Every origin's listening socket is bound on 127.0.0.1 when
  the origin is *added* (so its port is known while certificates that name it -- AIA, OCSP and
  CRL URLs -- are still being built); :meth:`Fleet.start` then serves all of them from one trio
  event loop in a background thread, so that synchronous clients (``http.client``, curl,
  Playwright's sync API) can run on the test's own thread.
* An :class:`Origin` serves HTTP/1.1 (h11) over the stdlib ``ssl`` module, with one
  :class:`ServerTls` per connection number (the last one repeats): that is how the seed exploit's
  "valid certificate first, bad one afterwards" server is built. It records every request it
  receives, which is how a test proves that a bad upstream never saw one.
* :class:`TlsmitmServe` runs ``python -m tlsmitm serve`` as a subprocess, reads the proxy address
  and the CA path it prints, and stops it with SIGINT.
* The client functions return an :class:`Outcome` whose ``label`` is what a person in front of
  that client would see: the content, the client's own certificate error, or tlsmitm's page on
  the error origin (with or without a way through).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
from origin import read_request, send_events

REPO = Path(__file__).resolve().parents[2]

# Outcome labels: what the user of a client sees.
DELIVERED = "delivered"
CERT_ERROR = "client's own certificate error"
PAGE_OVERRIDE = "error origin, with override"
PAGE_BLOCK = "error origin, no override"
SPLICED = "spliced (origin's own certificate)"
ERROR_ORIGIN = "https://error.invalid"

CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class NotBuildable(Exception):
    """This machine's OpenSSL refuses to build the server a case needs; the message says why."""


# -- origins ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTls:
    """How an origin's TLS server is configured (stdlib ``ssl``, the system's OpenSSL)."""

    chain: bytes
    key: bytes
    alpn: tuple[str, ...] = ("http/1.1",)
    min_version: ssl.TLSVersion | None = None
    max_version: ssl.TLSVersion | None = None
    ciphers: str | None = None
    seclevel0: bool = False
    dh_params: bytes | None = None
    client_ca: bytes | None = None

    def context(self, directory: Path, name: str) -> ssl.SSLContext:
        """A server context; raises :class:`NotBuildable` when OpenSSL refuses the setup."""
        cert_path = directory / f"{name}.pem"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(self.chain)
        key_path.write_bytes(self.key)
        key_path.chmod(0o600)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            with warnings.catch_warnings():
                # Python deprecates TLS 1.0/1.1 settings; building such servers is the point.
                warnings.simplefilter("ignore", DeprecationWarning)
                if self.ciphers is not None or self.seclevel0:
                    level = ":@SECLEVEL=0" if self.seclevel0 else ""
                    context.set_ciphers((self.ciphers or "DEFAULT") + level)
                if self.min_version is not None:
                    context.minimum_version = self.min_version
                if self.max_version is not None:
                    context.maximum_version = self.max_version
            context.load_cert_chain(cert_path, key_path)
            if self.dh_params is not None:
                dh_path = directory / f"{name}.dh.pem"
                dh_path.write_bytes(self.dh_params)
                context.load_dh_params(dh_path)
        except ssl.SSLError as exc:
            raise NotBuildable(f"OpenSSL {ssl.OPENSSL_VERSION.split()[1]} refuses: {exc}") from exc
        if self.alpn:
            context.set_alpn_protocols(list(self.alpn))
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=self.client_ca.decode("ascii"))
        return context


@dataclass(frozen=True)
class OriginRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    websocket: bool = False


def tiny_png() -> bytes:
    """A 1x1 opaque green PNG (RFC 2083), built here rather than stored."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = (1).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    pixels = zlib.compress(b"\x00\x00\x80\x00")  # filter 0, then one RGB pixel
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def download_bytes(marker: str) -> bytes:
    """The deterministic body of ``/download`` (128 KiB)."""
    return hashlib.sha256(marker.encode()).digest() * 4096


@dataclass
class Site:
    """The content of one origin.

    Routes: ``/`` (the marker, text/plain), ``/hsts`` (the marker with ``sts``), ``/hsts0``
    (``max-age=0``), ``/submit`` (POST: the form body back as HTML), ``/ws`` (a WebSocket echo),
    ``/download`` (an attachment), plus any path in ``pages``.
    """

    marker: str
    sts: str = "max-age=15768000; includeSubDomains"
    pages: dict[str, Reply] = field(default_factory=dict)

    def __call__(self, request: OriginRequest) -> Reply:
        path = request.target.split("?", 1)[0]
        if path in self.pages:
            return self.pages[path]
        if path == "/hsts":
            return Reply(
                body=self.marker.encode(), headers=(("Strict-Transport-Security", self.sts),)
            )
        if path == "/hsts0":
            return Reply(
                body=self.marker.encode(), headers=(("Strict-Transport-Security", "max-age=0"),)
            )
        if path == "/submit" and request.method == "POST":
            shown = html.escape(request.body.decode("utf-8", "replace"))
            page = f"<!doctype html><title>posted</title><p id=posted>posted: {shown}</p>"
            return Reply(body=page.encode(), content_type="text/html; charset=utf-8")
        if path == "/ws" and (request.header("upgrade") or "").lower() == "websocket":
            return Reply(status=101, websocket=True)
        if path == "/download":
            return Reply(
                body=download_bytes(self.marker),
                content_type="application/octet-stream",
                headers=(("Content-Disposition", 'attachment; filename="payload.bin"'),),
            )
        return Reply(body=self.marker.encode())


@dataclass
class Origin:
    """One server of the fleet (see :meth:`Fleet.add`)."""

    name: str
    port: int
    site: Site
    contexts: list[ssl.SSLContext] | None  # None: plain HTTP
    close_each_response: bool = False
    unbuildable: str | None = None
    connections: int = 0
    requests: list[OriginRequest] = field(default_factory=list)
    socket: socket.socket | None = None

    @property
    def marker(self) -> bytes:
        return self.site.marker.encode()

    def request_count(self) -> int:
        return len(self.requests)


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def websocket_accept(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()


async def _websocket_echo(stream: trio.abc.Stream, pending: bytes) -> None:
    """Echo text/binary frames (RFC 6455 §5.2) until a close frame; server frames are unmasked."""
    buffer = bytearray(pending)

    async def need(n: int) -> bool:
        while len(buffer) < n:
            data = await stream.receive_some(65536)
            if not data:
                return False
            buffer.extend(data)
        return True

    while True:
        if not await need(2):
            return
        opcode = buffer[0] & 0x0F
        masked = buffer[1] & 0x80
        length = buffer[1] & 0x7F
        offset = 2
        if length == 126:
            if not await need(4):
                return
            length = int.from_bytes(buffer[2:4], "big")
            offset = 4
        elif length == 127:
            if not await need(10):
                return
            length = int.from_bytes(buffer[2:10], "big")
            offset = 10
        mask = b""
        if masked:
            if not await need(offset + 4):
                return
            mask = bytes(buffer[offset : offset + 4])
            offset += 4
        if not await need(offset + length):
            return
        payload = bytes(buffer[offset : offset + length])
        del buffer[: offset + length]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if opcode == 0x8:  # close: answer and stop
            await stream.send_all(b"\x88" + bytes([len(payload[:125])]) + payload[:125])
            return
        if opcode in (0x1, 0x2):
            if length < 126:
                head = bytes([0x80 | opcode, length])
            elif length < 65536:
                head = bytes([0x80 | opcode, 126]) + length.to_bytes(2, "big")
            else:
                head = bytes([0x80 | opcode, 127]) + length.to_bytes(8, "big")
            await stream.send_all(head + payload)


async def _serve_http(stream: trio.abc.Stream, origin: Origin) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        received = await read_request(conn, stream)
        if received is None:
            return
        request, body = received
        seen = OriginRequest(
            method=bytes(request.method).decode(),
            target=bytes(request.target).decode("ascii", "replace"),
            headers=tuple(
                (bytes(k).decode("latin-1").lower(), bytes(v).decode("latin-1"))
                for k, v in request.headers
            ),
            body=bytes(body),
        )
        origin.requests.append(seen)
        reply = origin.site(seen)
        if reply.websocket:
            key = seen.header("sec-websocket-key") or ""
            await send_events(
                conn,
                stream,
                h11.InformationalResponse(
                    status_code=101,
                    headers=[
                        (b"upgrade", b"websocket"),
                        (b"connection", b"Upgrade"),
                        (b"sec-websocket-accept", websocket_accept(key).encode()),
                    ],
                ),
            )
            pending, _ = conn.trailing_data
            await _websocket_echo(stream, bytes(pending))
            return
        headers = [(b"content-type", reply.content_type.encode())]
        headers += [(k.encode(), v.encode()) for k, v in reply.headers]
        headers.append((b"content-length", str(len(reply.body)).encode()))
        if origin.close_each_response:
            headers.append((b"connection", b"close"))
        await send_events(
            conn,
            stream,
            h11.Response(status_code=reply.status, headers=headers),
            h11.Data(data=reply.body),
            h11.EndOfMessage(),
        )
        if conn.our_state is h11.MUST_CLOSE or origin.close_each_response:
            return
        conn.start_next_cycle()


async def _serve_connection(stream: trio.SocketStream, origin: Origin) -> None:
    number = origin.connections
    origin.connections += 1
    if origin.contexts is None:
        transport: trio.abc.Stream = stream
    else:
        context = origin.contexts[min(number, len(origin.contexts) - 1)]
        transport = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    try:
        with trio.move_on_after(60):
            if isinstance(transport, trio.SSLStream):
                await transport.do_handshake()
            await _serve_http(transport, origin)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(transport)


class Fleet:
    """Many origins on 127.0.0.1, served from one trio loop in a background thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.origins: list[Origin] = []
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    def add(
        self,
        name: str,
        tls: ServerTls | Sequence[ServerTls] | None,
        site: Site | None = None,
        *,
        close_each_response: bool = False,
    ) -> Origin:
        """Bind a listener now (the port is known at once) and configure its server.

        ``tls`` is one configuration, one per connection number (the last repeats), or ``None``
        for plain HTTP. When OpenSSL refuses a configuration the origin is still returned, with
        ``unbuildable`` set to the reason and nothing listening.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        origin = Origin(
            name=name,
            port=sock.getsockname()[1],
            site=site or Site(marker=f"content of {name}"),
            contexts=None,
            close_each_response=close_each_response,
        )
        if tls is not None:
            configs = [tls] if isinstance(tls, ServerTls) else list(tls)
            try:
                origin.contexts = [
                    c.context(self.directory, f"{_slug(name)}-{i}") for i, c in enumerate(configs)
                ]
            except NotBuildable as exc:
                origin.unbuildable = str(exc)
                sock.close()
                self.origins.append(origin)
                return origin
        sock.listen(128)
        origin.socket = sock
        self.origins.append(origin)
        return origin

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="conformance-origins", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the origin fleet did not start within 30 s")
        if self._failure is not None:
            raise RuntimeError("the origin fleet failed to start") from self._failure

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the test thread
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            for origin in self.origins:
                if origin.socket is None:
                    continue
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(origin.socket))

                async def handler(stream: trio.SocketStream, origin: Origin = origin) -> None:
                    await _serve_connection(stream, origin)

                nursery.start_soon(trio.serve_listeners, handler, [listener])
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Stop serving and close every listener (also when :meth:`start` was never called)."""
        if self._thread is not None and self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(10)
        for origin in self.origins:
            if origin.socket is not None:
                origin.socket.close()


def _slug(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9.-]", "_", name)


# -- tlsmitm serve --------------------------------------------------------------------------------


class TlsmitmServe:
    """``python -m tlsmitm serve`` in a subprocess, as a user starts it."""

    def __init__(
        self,
        directory: Path,
        *,
        profile: str,
        extra_roots: Path,
        resolve: Iterable[str],
        bypass: Iterable[str] = (),
    ) -> None:
        self.directory = directory
        self.profile = profile
        directory.mkdir(parents=True, exist_ok=True)
        self.args = [
            sys.executable,
            "-m",
            "tlsmitm",
            "serve",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(directory / "state"),
            "--extra-roots",
            str(extra_roots),
            "--error-mode",
            profile,
        ]
        for item in sorted(set(resolve)):
            self.args += ["--resolve", item]
        for pattern in bypass:
            self.args += ["--bypass", pattern]
        self.stdout_path = directory / "stdout.txt"
        self.stderr_path = directory / "stderr.txt"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ca_path = Path()
        self.started_in = 0.0

    def start(self, timeout: float = 60) -> TlsmitmServe:
        started = time.monotonic()
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=err, cwd=REPO)
        deadline = started + timeout
        while True:
            text = self.stdout_path.read_text(errors="replace")
            if "Stop with Ctrl-C" in text:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"tlsmitm serve did not start (exit {self.process.returncode}):\n{text}\n"
                    + self.log_tail()
                )
            time.sleep(0.05)
        listening = re.search(r"listening on http://127\.0\.0\.1:(\d+)", text)
        ca = re.search(r"CA certificate \(trust this in clients\): (.+)", text)
        assert listening, text
        assert ca, text
        self.port = int(listening.group(1))
        self.ca_path = Path(ca.group(1).strip())
        if not self.ca_path.is_absolute():
            self.ca_path = REPO / self.ca_path
        self.started_in = time.monotonic() - started
        return self

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGINT, as Ctrl-C would; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                raise RuntimeError("tlsmitm serve did not stop within 20 s of SIGINT") from None
        return self.process.returncode


# -- outcomes -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one client got for one URL."""

    label: str
    detail: str = ""
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    alpn: str | None = None
    version: str | None = None
    peer_der: bytes | None = None
    error_page: bytes = b""

    def __str__(self) -> str:
        return self.label + (f" ({self.detail})" if self.detail else "")


def classify_error_page(body: bytes) -> str:
    """Whether a page of the error origin offers the override form."""
    return PAGE_OVERRIDE if b'id="proceed"' in body else PAGE_BLOCK


def error_code_of(page: bytes) -> str:
    """The ``CertError`` value an error-origin page shows under "Technical details"."""
    found = re.search(rb"<dd><code>([a-z_]+)</code></dd>", page)
    return found.group(1).decode() if found else ""


def is_error_origin_location(location: str | None) -> bool:
    return bool(location) and str(location).startswith(ERROR_ORIGIN + "/error/")


# -- Python's ssl ---------------------------------------------------------------------------------


def client_context(cafile: Path, *, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """A default client context trusting only ``cafile``, offering ALPN like every HTTP client.

    (A client that offers no ALPN on a port that is not a usual HTTP port is not assumed to speak
    HTTP: tlsmitm answers an upstream error with a TLS alert, not a page.)
    """
    context = ssl.create_default_context(cafile=str(cafile))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def python_request(
    proxy: TlsmitmServe,
    host: str,
    port: int,
    path: str = "/",
    *,
    context: ssl.SSLContext | None = None,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 20,
) -> Outcome:
    """One request through the proxy's CONNECT tunnel with ``http.client``.

    The label is ``DELIVERED`` for a 200, ``CERT_ERROR`` when ``ssl`` refused the certificate,
    and the error-origin page's kind for a 303 to ``https://error.invalid/error/...`` (which is
    then fetched through the proxy, as a browser would).
    """
    context = context or client_context(proxy.ca_path)
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=context, timeout=timeout)
    conn.set_tunnel(host, port)
    try:
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as exc:
            return Outcome(CERT_ERROR, detail=exc.verify_message or str(exc))
        except ssl.SSLError as exc:
            return Outcome(f"TLS failure: {exc.reason or exc}")
        except OSError as exc:
            return Outcome(f"connection failure: {exc}")
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        alpn = sock.selected_alpn_protocol()
        version = sock.version()
        der = sock.getpeercert(binary_form=True)
        if alpn == "h2":
            return Outcome("h2 negotiated", alpn=alpn, version=version, peer_der=der)
        try:
            conn.request(method, path, body=body, headers={"Host": _authority(host, port)})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return Outcome(f"HTTP failure: {exc!r}", alpn=alpn, version=version, peer_der=der)
        headers = {k.lower(): v for k, v in response.getheaders()}
        outcome = Outcome(
            label=f"HTTP {response.status}",
            status=response.status,
            headers=headers,
            body=data,
            alpn=alpn,
            version=version,
            peer_der=der,
        )
    finally:
        conn.close()
    if outcome.status == 200:
        outcome.label = DELIVERED
    elif outcome.status == 303 and is_error_origin_location(outcome.headers.get("location")):
        if outcome.body:
            outcome.label = "303 to the error origin, with a body inside the site's origin"
            return outcome
        page = python_request(
            proxy, "error.invalid", 443, outcome.headers["location"][len(ERROR_ORIGIN) :]
        )
        outcome.error_page = page.body
        if page.status != 502:
            outcome.label = f"error origin answered {page.label}"
        else:
            outcome.label = classify_error_page(page.body)
            outcome.detail = error_code_of(page.body)
    return outcome


def python_override(proxy: TlsmitmServe, error_page: bytes) -> int:
    """Submit the override form of ``error_page`` as the error origin's own page would.

    Returns the status of ``POST /override`` (303 when granted). Waits out the click delay the
    token enforces (one second after the page was served).
    """
    ref = re.search(rb'name="ref" value="([0-9a-f]+)"', error_page)
    token = re.search(rb'name="token" value="([A-Za-z0-9_-]+)"', error_page)
    if ref is None or token is None:
        raise AssertionError("the page has no override form")
    time.sleep(1.05)
    conn = http.client.HTTPSConnection(
        "127.0.0.1", proxy.port, context=client_context(proxy.ca_path), timeout=20
    )
    conn.set_tunnel("error.invalid", 443)
    try:
        conn.request(
            "POST",
            "/override",
            body=b"ref=" + ref.group(1) + b"&token=" + token.group(1),
            headers={
                "Host": "error.invalid",
                "Origin": ERROR_ORIGIN,
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def python_alpn(proxy: TlsmitmServe, host: str, port: int, offer: Sequence[str]) -> Outcome:
    """The ALPN protocol and TLS version a client offering ``offer`` gets downstream."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
    try:
        raw.sendall(f"CONNECT {_authority(host, port)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = raw.recv(4096)
            if not chunk:
                return Outcome("proxy closed the CONNECT")
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 200"):
            return Outcome(f"CONNECT refused: {answer.splitlines()[0]!r}")
        context = client_context(proxy.ca_path, alpn=offer)
        try:
            tls = context.wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            return Outcome(CERT_ERROR, detail=exc.verify_message or str(exc))
        except ssl.SSLError as exc:
            return Outcome(f"TLS failure: {exc.reason or exc}")
        selected = tls.selected_alpn_protocol()
        version = tls.version()
        tls.close()
        return Outcome(f"ALPN {selected}", alpn=selected, version=version)
    finally:
        raw.close()


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- curl -----------------------------------------------------------------------------------------


def curl_request(
    curl: str,
    proxy: TlsmitmServe,
    url: str,
    directory: Path,
    *,
    cacert: Path | None = None,
    extra: Sequence[str] = (),
    follow_error_page: bool = True,
) -> Outcome:
    """``curl --proxy … --cacert <tlsmitm root> URL``; exit 60 is curl's own certificate error."""
    directory.mkdir(parents=True, exist_ok=True)
    body_path = directory / "body"
    head_path = directory / "headers"
    for path in (body_path, head_path):
        path.unlink(missing_ok=True)
    result = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "20",
            "--proxy",
            proxy.proxy_url,
            "--cacert",
            str(cacert or proxy.ca_path),
            "-o",
            str(body_path),
            "-D",
            str(head_path),
            "-w",
            "%{http_code} %{http_version}",
            *extra,
            url,
        ],
        capture_output=True,
        check=False,
        timeout=60,
    )
    stderr = result.stderr.decode(errors="replace").strip()
    if result.returncode == 60:
        return Outcome(CERT_ERROR, detail=f"curl exit 60: {stderr}")
    if result.returncode != 0:
        return Outcome(f"curl exit {result.returncode}", detail=stderr)
    code_text, _, http_version = result.stdout.decode().partition(" ")
    headers: dict[str, str] = {}
    if head_path.exists():
        for line in head_path.read_text(errors="replace").splitlines():
            name, sep, value = line.partition(":")
            if sep and not line.startswith("HTTP/"):
                headers[name.strip().lower()] = value.strip()
    body = body_path.read_bytes() if body_path.exists() else b""
    status = int(code_text)
    outcome = Outcome(
        f"HTTP {status}", status=status, headers=headers, body=body, version=http_version
    )
    if status == 200:
        outcome.label = DELIVERED
    elif status == 303 and is_error_origin_location(headers.get("location")):
        if body:
            outcome.label = "303 to the error origin, with a body inside the site's origin"
        elif follow_error_page:
            page = curl_request(
                curl, proxy, headers["location"], directory / "page", follow_error_page=False
            )
            outcome.error_page = page.body
            if page.status == 502:
                outcome.label = classify_error_page(page.body)
                outcome.detail = error_code_of(page.body)
            else:
                outcome.label = f"error origin answered {page.label}"
    return outcome


# -- Chromium -------------------------------------------------------------------------------------


def nss_home(directory: Path, certutil: str, roots: Sequence[tuple[str, Path]]) -> Path:
    """A HOME whose NSS database (what Chromium on Linux trusts) trusts exactly ``roots``."""
    home = directory
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [certutil, "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, capture_output=True
    )
    for nickname, path in roots:
        subprocess.run(
            [certutil, "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", nickname, "-i", str(path)],
            check=True,
            capture_output=True,
        )
    return home


def chromium_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOME", "XDG_"))}
    env["HOME"] = str(home)
    return env


def chromium_args(proxy_port: int | None) -> list[str]:
    args = list(CHROMIUM_ARGS)
    if proxy_port is not None:
        # <-loopback>: 127.0.0.1 targets go through the proxy too.
        args += [f"--proxy-server=http://127.0.0.1:{proxy_port}", "--proxy-bypass-list=<-loopback>"]
    return args


def chromium_executable() -> str:
    path = shutil.which("chromium")
    assert path is not None
    return path


def reset_page(page: Any) -> None:
    """Navigate to ``about:blank``, waiting out an interstitial Chromium is still committing.

    After a certificate error, Chromium commits its error page (``chrome-error://``) a moment
    later; a navigation started in between is interrupted by that commit, so it is retried.
    """
    from playwright.sync_api import Error as PlaywrightError

    for _ in range(50):
        try:
            page.goto("about:blank")
        except PlaywrightError as exc:
            if "interrupted by another navigation" not in str(exc):
                raise
            page.wait_for_timeout(100)
            continue
        if page.url == "about:blank":
            return
    raise AssertionError(f"the page did not settle on about:blank (at {page.url})")


def chromium_goto(page: Any, url: str, marker: bytes, timeout: float = 20) -> Outcome:
    """Navigate a Playwright page to ``url`` and say what the user sees.

    A certificate error is read from the failed navigation request as soon as it fails:
    ``page.goto`` itself would wait for Chromium's interstitial, which Chromium delays by up to
    three seconds (``SSLErrorHandler``'s captive-portal and clock checks).
    """
    events: dict[str, Any] = {}

    def on_failed(request: Any) -> None:
        if request.is_navigation_request() and request.frame == page.main_frame:
            events.setdefault("failed", request.failure or "unknown failure")

    def on_response(response: Any) -> None:
        request = response.request
        if (
            request.is_navigation_request()
            and request.frame == page.main_frame
            and not 300 <= response.status < 400
        ):
            events.setdefault("response", response)

    reset_page(page)
    page.on("requestfailed", on_failed)
    page.on("response", on_response)
    try:
        page.evaluate("url => { window.location.href = url; }", url)
        deadline = time.monotonic() + timeout
        while "failed" not in events and "response" not in events:
            if time.monotonic() > deadline:
                return Outcome(f"navigation timed out at {page.url}")
            page.wait_for_timeout(20)
    finally:
        page.remove_listener("requestfailed", on_failed)
        page.remove_listener("response", on_response)
    if "failed" in events:
        found = re.search(r"net::(ERR_[A-Z_]+)", events["failed"])
        code = found.group(1) if found else events["failed"]
        if code.startswith("ERR_CERT_"):
            return Outcome(CERT_ERROR, detail=code)
        return Outcome(f"navigation failed: {code}")
    response = events["response"]
    status = response.status
    page.wait_for_url(response.url, wait_until="domcontentloaded", timeout=timeout * 1000)
    final = page.url
    if final.startswith(ERROR_ORIGIN + "/error/"):
        text = page.content().encode()
        kind = PAGE_OVERRIDE if page.locator("#proceed").count() else PAGE_BLOCK
        return Outcome(kind, detail=error_code_of(text), status=status, error_page=text)
    if final.startswith(ERROR_ORIGIN):
        return Outcome(f"error origin page {final}", status=status)
    text = page.evaluate("document.documentElement.innerText").encode()
    if status == 200 and marker in text:
        return Outcome(DELIVERED, status=status, body=text)
    return Outcome(f"page at {final} (HTTP {status})", status=status, body=text)


# -- a Chromium ClientHello -----------------------------------------------------------------------


def capture_chromium_client_hello(timeout: float = 20) -> bytes:
    """The first TLS record(s) Chromium sends to ``https://www.example.test/`` (a raw socket).

    The name is mapped to a local socket with ``--host-resolver-rules`` (no proxy), so the bytes
    are exactly what Chromium puts on the wire: SNI, ALPN, GREASE, key shares.
    """
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    from tlsmitm._clienthello import NEED_MORE, parse_client_hello

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(timeout)
    port = server.getsockname()[1]
    captured: list[bytes] = []

    def accept() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(timeout)
            data = b""
            with contextlib.suppress(OSError):
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    if parse_client_hello(data) is not NEED_MORE:
                        break
            captured.append(data)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium_executable(),
                args=[
                    *chromium_args(None),
                    f"--host-resolver-rules=MAP www.example.test 127.0.0.1:{port}",
                ],
            )
            try:
                page = browser.new_page()
                with contextlib.suppress(PlaywrightError):
                    page.goto("https://www.example.test/", timeout=3000)
            finally:
                browser.close()
        thread.join(timeout)
    finally:
        server.close()
    if not captured or not captured[0]:
        raise RuntimeError("Chromium sent no ClientHello")
    return captured[0]


if __name__ == "__main__":
    # Regenerate tests/data/chromium_clienthello.bin: python tests/conformance/harness.py
    target = REPO / "tests" / "data" / "chromium_clienthello.bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(capture_chromium_client_hello())
    print(f"wrote {target} ({target.stat().st_size} bytes)")
