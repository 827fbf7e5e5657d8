"""Scanning through the real proxy: curl -> tlsmitm (built from ``serve --scan ...`` arguments)
-> a real HTTPS origin, with the private clamd and c-icap of ``scan_engines``.

The contract checked here is the verdict before the first byte: a blocked response reaches the
client only as the redirect to the error origin (never a byte of it, however large), a clean one
arrives byte for byte as the origin sent it (still encoded).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from conftest import require_tool
from origin import read_request, send_events, server_ssl_context
from pki import good_hierarchy
from scan_engines import EICAR, EICAR_BODY_SIGNATURE, Clamd, Icap

from tlsmitm._ca import ROOT_CERT_FILE
from tlsmitm._cli import build_parser
from tlsmitm._cli_serve import build_interceptor
from tlsmitm._decisionlog import ConnectionRecord
from tlsmitm._relay import FlowInfo, Hooks, Interceptor, Request, Response

pytestmark = pytest.mark.e2e

HOST = "files.test"
BIG = 30 * 1024 * 1024
_BLOCK = os.urandom(1 << 20)


@functools.cache
def big_clean() -> bytes:
    return _BLOCK * (BIG // len(_BLOCK))


@functools.cache
def big_eicar() -> bytes:
    return big_clean()[: BIG - len(EICAR)] + EICAR


@functools.cache
def gzip_bomb() -> bytes:
    return gzip.compress(bytes(96 * 1024 * 1024), compresslevel=9)


CLEAN = b"An ordinary page.\n" * 60
CLEAN_GZ = gzip.compress(CLEAN, mtime=0)


def routes() -> dict[bytes, tuple[list[tuple[bytes, bytes]], Callable[[], bytes]]]:
    octets = [(b"content-type", b"application/octet-stream")]
    return {
        b"/clean": ([(b"content-type", b"text/plain")], lambda: CLEAN),
        b"/eicar": (octets, lambda: EICAR),
        b"/eicar.gz": (
            [*octets, (b"content-encoding", b"gzip")],
            lambda: gzip.compress(b"a readme first\n" + EICAR),
        ),
        b"/clean.gz": ([*octets, (b"content-encoding", b"gzip")], lambda: CLEAN_GZ),
        b"/big-clean": (octets, big_clean),
        b"/big-eicar": (octets, big_eicar),
        b"/bomb": ([*octets, (b"content-encoding", b"gzip")], gzip_bomb),
    }


@dataclass
class Origin:
    port: int
    sent: dict[bytes, int] = field(default_factory=dict)
    uploads: list[bytes] = field(default_factory=list)


async def start_origin(nursery: trio.Nursery, tmp: Path) -> tuple[Origin, Path]:
    hierarchy = good_hierarchy(HOST)
    context = server_ssl_context(hierarchy.leaf, tmp)
    table = routes()
    origin = Origin(port=0)

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        conn = h11.Connection(h11.SERVER)
        try:
            await tls.do_handshake()
            while True:
                received = await read_request(conn, tls)
                if received is None:
                    return
                request, body = received
                target = bytes(request.target)
                if target == b"/trailers":  # chunked, with a trailer field after the body
                    await send_events(
                        conn,
                        tls,
                        h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]),
                        h11.Data(data=CLEAN),
                        h11.EndOfMessage(headers=[(b"x-checksum", b"abc123")]),
                    )
                    conn.start_next_cycle()
                    continue
                if target == b"/upload":
                    origin.uploads.append(body)
                    headers, payload = [(b"content-type", b"text/plain")], b"stored"
                else:
                    headers, make = table[target]
                    payload = make()
                headers = [*headers, (b"content-length", str(len(payload)).encode())]
                await send_events(conn, tls, h11.Response(status_code=200, headers=headers))
                for start in range(0, len(payload), 256 * 1024):
                    await send_events(conn, tls, h11.Data(data=payload[start : start + 256 * 1024]))
                    origin.sent[target] = origin.sent.get(target, 0) + min(
                        256 * 1024, len(payload) - start
                    )
                await send_events(conn, tls, h11.EndOfMessage())
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(tls)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    origin.port = int(listeners[0].socket.getsockname()[1])
    roots = tmp / "origin-root.pem"
    roots.write_bytes(hierarchy.root.pem)
    return origin, roots


@dataclass
class Proxy:
    interceptor: Interceptor
    url: str
    cacert: Path
    records: list[ConnectionRecord]


async def start_proxy(nursery: trio.Nursery, tmp: Path, roots: Path, scan_args: list[str]) -> Proxy:
    args = build_parser().parse_args(
        [
            "serve",
            "--state-dir",
            str(tmp / "state"),
            "--extra-roots",
            str(roots),
            "--resolve",
            f"{HOST}=127.0.0.1",
            "--upstream-pool-seconds",
            "0",
            *scan_args,
        ]
    )
    interceptor = build_interceptor(args)
    assert isinstance(interceptor, Interceptor)
    records: list[ConnectionRecord] = []
    interceptor.decision_log.subscribe(records.append)
    addresses = await nursery.start(interceptor.serve, "127.0.0.1", 0)
    nursery.start_soon(close_scanners_at_the_end, interceptor)
    ca_dir = interceptor.ca.ca_dir
    assert ca_dir is not None
    return Proxy(
        interceptor=interceptor,
        url=f"http://127.0.0.1:{addresses[0][1]}",
        cacert=ca_dir / ROOT_CERT_FILE,
        records=records,
    )


async def close_scanners_at_the_end(interceptor: Interceptor) -> None:
    """The embedder owns its scanners: close their connections when the test ends."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            for scanner in interceptor.config.scan.scanners if interceptor.config.scan else ():
                await scanner.aclose()


@dataclass
class Fetched:
    status: int
    location: str
    body: bytes


async def curl(
    proxy: Proxy, url: str, tmp: Path, *, upload: bytes | None = None, extra: tuple[str, ...] = ()
) -> Fetched:
    exe = require_tool("curl")
    out = tmp / f"body-{os.urandom(4).hex()}"
    command = [
        exe,
        "-sS",
        "--max-time",
        "90",
        "--proxy",
        proxy.url,
        "--cacert",
        str(proxy.cacert),
        "-o",
        str(out),
        "-w",
        "%{http_code} %{redirect_url}",
    ]
    # HTTP/1.1 unless a test asks for HTTP/2 (curl would offer h2 by ALPN, and the proxy take it).
    command += extra if "--http2" in extra else ("--http1.1", *extra)
    if upload is not None:
        sent = tmp / f"upload-{os.urandom(4).hex()}"
        sent.write_bytes(upload)
        command += ["--data-binary", f"@{sent}", "-H", "content-type: application/octet-stream"]
    result = await trio.run_process(
        [*command, url], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr
    status, _, location = result.stdout.decode().partition(" ")
    body = out.read_bytes() if out.exists() else b""
    out.unlink(missing_ok=True)
    return Fetched(status=int(status), location=location.strip(), body=body)


async def fetch(proxy: Proxy, origin: Origin, path: str, tmp: Path, **kw: Any) -> Fetched:
    return await curl(proxy, f"https://{HOST}:{origin.port}{path}", tmp, **kw)


async def block_page(proxy: Proxy, fetched: Fetched, tmp: Path) -> str:
    """The error origin's page a blocked download was redirected to."""
    assert fetched.status == 303, fetched
    assert fetched.location.startswith("https://error.invalid/")
    page = await curl(proxy, fetched.location, tmp)
    assert page.status == 403  # the block page itself
    return page.body.decode()


SCANNERS = ["clamd-unix", "clamd-tcp", "icap"]


def scan_url(kind: str, clamd: Clamd, icap: Icap | None) -> str:
    if kind == "clamd-unix":
        return f"clamd://{clamd.socket_path}?stream-max-length={clamd.stream_max_length}"
    if kind == "clamd-tcp":
        return f"clamd://{clamd.host}:{clamd.port}?stream-max-length={clamd.stream_max_length}"
    assert icap is not None
    return icap.url


@pytest.fixture
def engine_url(request: pytest.FixtureRequest, clamd: Clamd) -> str:
    kind = request.param
    icap = request.getfixturevalue("icap") if kind == "icap" else None
    return scan_url(kind, clamd, icap)


@pytest.mark.parametrize("engine_url", SCANNERS, indirect=True)
async def test_clean_delivered_threats_blocked_with_their_name(
    nursery: trio.Nursery, tmp_path: Path, engine_url: str
) -> None:
    origin, roots = await start_origin(nursery, tmp_path)
    proxy = await start_proxy(
        nursery,
        tmp_path,
        roots,
        ["--scan", engine_url, "--scan-requests", "--scan-max-bytes", "8M"],
    )
    clean = await fetch(proxy, origin, "/clean", tmp_path)
    assert (clean.status, clean.body) == (200, CLEAN)
    encoded = await fetch(proxy, origin, "/clean.gz", tmp_path)
    assert (encoded.status, encoded.body) == (200, CLEAN_GZ)  # still encoded

    for path in ("/eicar", "/eicar.gz"):
        blocked = await fetch(proxy, origin, path, tmp_path)
        assert EICAR not in blocked.body
        page = await block_page(proxy, blocked, tmp_path)
        assert EICAR_BODY_SIGNATURE in page, page

    upload = await fetch(proxy, origin, "/upload", tmp_path, upload=b"my notes\n" + EICAR)
    assert EICAR_BODY_SIGNATURE in await block_page(proxy, upload, tmp_path)
    assert origin.uploads == []  # the upload never reached the origin
    fine = await fetch(proxy, origin, "/upload", tmp_path, upload=b"my notes\n" * 1000)
    assert (fine.status, fine.body) == (200, b"stored")
    assert origin.uploads == [b"my notes\n" * 1000]

    bomb = await fetch(proxy, origin, "/bomb", tmp_path)
    assert "could not be scanned" in await block_page(proxy, bomb, tmp_path)

    stats = proxy.interceptor.stats
    assert stats.scan_blocked == 4
    blocked_records = [r for r in proxy.records if r.host == HOST and r.decision == "block"]
    assert sorted(r.reason for r in blocked_records) == ["scan_failed"] + ["scan_infected"] * 3
    assert sorted(r.scan or "" for r in blocked_records) == ["failed_blocked"] + ["infected"] * 3
    assert all(r.scan_ms is not None and r.scan_ms >= 0 for r in blocked_records)
    delivered = [r for r in proxy.records if r.host == HOST and r.decision == "intercept"]
    assert delivered
    assert {r.scan for r in delivered} == {"clean"}


@pytest.mark.slow
@pytest.mark.parametrize("engine_url", ["clamd-unix", "icap"], indirect=True)
async def test_30_mib_blocked_before_any_byte_and_clean_intact(
    nursery: trio.Nursery, tmp_path: Path, engine_url: str
) -> None:
    origin, roots = await start_origin(nursery, tmp_path)
    proxy = await start_proxy(nursery, tmp_path, roots, ["--scan", engine_url])
    blocked = await fetch(proxy, origin, "/big-eicar", tmp_path)
    # The only answer is the redirect: not one byte of the 30 MiB reached the client.
    assert blocked.status == 303
    assert len(blocked.body) < 4096
    assert origin.sent[b"/big-eicar"] == BIG
    assert EICAR_BODY_SIGNATURE in await block_page(proxy, blocked, tmp_path)
    clean = await fetch(proxy, origin, "/big-clean", tmp_path)
    assert clean.status == 200
    assert len(clean.body) == BIG
    assert hashlib.sha256(clean.body).digest() == hashlib.sha256(big_clean()).digest()


async def test_both_scanners_together(
    nursery: trio.Nursery, tmp_path: Path, clamd: Clamd, icap: Icap
) -> None:
    origin, roots = await start_origin(nursery, tmp_path)
    proxy = await start_proxy(
        nursery,
        tmp_path,
        roots,
        ["--scan", scan_url("clamd-unix", clamd, None), "--scan", icap.url],
    )
    assert (await fetch(proxy, origin, "/clean", tmp_path)).body == CLEAN
    blocked = await fetch(proxy, origin, "/eicar.gz", tmp_path)
    assert EICAR_BODY_SIGNATURE in await block_page(proxy, blocked, tmp_path)


@pytest.mark.parametrize("kind", ["clamd", "icap"])
async def test_scanner_down_blocks_by_default_and_delivers_when_open(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    from scan_engines import free_port

    down = (
        f"clamd://{tmp_path / 'no-clamd.sock'}"
        if kind == "clamd"
        else f"icap://127.0.0.1:{free_port()}/avscan"
    )
    origin, roots = await start_origin(nursery, tmp_path)
    closed = await start_proxy(nursery, tmp_path / "closed", roots, ["--scan", down])
    blocked = await fetch(closed, origin, "/clean", tmp_path)
    assert CLEAN not in blocked.body
    page = await block_page(closed, blocked, tmp_path)
    assert "could not be scanned" in page
    assert "unreachable" in page

    opened = await start_proxy(
        nursery, tmp_path / "open", roots, ["--scan", down, "--scan-failure", "open"]
    )
    with caplog.at_level(logging.WARNING, logger="tlsmitm.scan"):
        delivered = await fetch(opened, origin, "/clean", tmp_path)
    assert (delivered.status, delivered.body) == (200, CLEAN)
    lines = [r.getMessage() for r in caplog.records if r.name == "tlsmitm.scan"]
    assert any("scan=failed_open" in line and "failure=unreachable" in line for line in lines)
    assert opened.interceptor.stats.scan_unscanned == 1


async def test_serve_scan_option_end_to_end_in_a_subprocess(
    nursery: trio.Nursery, tmp_path: Path, clamd: Clamd
) -> None:
    origin, roots = await start_origin(nursery, tmp_path)
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "tlsmitm",
            "serve",
            "--workers",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "state"),
            "--extra-roots",
            str(roots),
            "--resolve",
            f"{HOST}=127.0.0.1",
            "--scan",
            f"clamd://{clamd.socket_path}",
            "--scan",
            f"clamd://{tmp_path / 'no-such-clamd.sock'}",
            "--scan-timeout",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while b"Stop with Ctrl-C" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
        text = output.decode()
        assert f"Scanning with clamd://{clamd.socket_path}" in text
        ca_dir = Path(text.split("CA certificate (trust this in clients): ")[1].split()[0])
        proxy = Proxy(
            interceptor=None,  # type: ignore[arg-type]
            url=text.split("listening on ")[1].split()[0],
            cacert=ca_dir,
            records=[],
        )
        # A threat wins over the other scanner's failure: the page names it.
        blocked = await fetch(proxy, origin, "/eicar", tmp_path)
        assert EICAR_BODY_SIGNATURE in await block_page(proxy, blocked, tmp_path)
    finally:
        process.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            code = await process.wait()
    assert code == 0
    assert process.stderr is not None
    errors = b""
    with trio.fail_after(10):
        while chunk := await process.stderr.receive_some(65536):
            errors += chunk
    assert b"no-such-clamd.sock is not answering" in errors
    assert b"--scan-failure closed" in errors


def test_bad_scan_options_are_refused(tmp_path: Path) -> None:
    parser = build_parser()
    state = ["serve", "--state-dir", str(tmp_path / "state")]
    for bad in (
        ["--scan-failure", "maybe"],
        ["--scan-max-bytes", "lots"],
        ["--scan-timeout", "0"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args([*state, *bad])
    result = subprocess.run(
        [sys.executable, "-m", "tlsmitm", *state, "--scan", "ftp://x/"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown scanner" in result.stderr


class BodyRecorder(Hooks):
    def __init__(self) -> None:
        self.responses: dict[bytes, bytearray] = {}
        self.uploads = bytearray()
        self.ends = 0

    async def on_response_body(
        self, flow: FlowInfo, request: Request, response: Response, chunk: bytes, *, end: bool
    ) -> None:
        self.responses.setdefault(request.target, bytearray()).extend(chunk)
        self.ends += end

    async def on_request_body(
        self, flow: FlowInfo, request: Request, chunk: bytes, *, end: bool
    ) -> None:
        self.uploads += chunk
        self.ends += end


async def test_body_hooks_see_held_bodies_once_delivered_and_never_blocked_ones(
    nursery: trio.Nursery, tmp_path: Path, clamd: Clamd
) -> None:
    origin, roots = await start_origin(nursery, tmp_path)
    proxy = await start_proxy(
        nursery, tmp_path, roots, ["--scan", scan_url("clamd-unix", clamd, None), "--scan-requests"]
    )
    hooks = BodyRecorder()
    proxy.interceptor.hooks = hooks
    assert (await fetch(proxy, origin, "/clean.gz", tmp_path)).status == 200
    assert (await fetch(proxy, origin, "/upload", tmp_path, upload=b"notes" * 100)).status == 200
    assert (await fetch(proxy, origin, "/eicar", tmp_path)).status == 303
    # The bytes as delivered (still gzip), each body ended once; the blocked one never shown.
    assert hooks.responses == {b"/clean.gz": bytearray(CLEAN_GZ), b"/upload": b"stored"}
    assert hooks.uploads == b"notes" * 100
    assert hooks.ends == 3


class DecodedRecorder(BodyRecorder):
    decode_bodies = True


@pytest.mark.parametrize("scanning", [False, True])
async def test_body_hooks_can_get_decoded_bodies_as_the_scanners_do(
    nursery: trio.Nursery, tmp_path: Path, clamd: Clamd, scanning: bool
) -> None:
    origin, roots = await start_origin(nursery, tmp_path)
    scan = ["--scan", scan_url("clamd-unix", clamd, None)] if scanning else []
    proxy = await start_proxy(nursery, tmp_path, roots, scan)
    hooks = DecodedRecorder()
    proxy.interceptor.hooks = hooks
    fetched = await fetch(proxy, origin, "/clean.gz", tmp_path)
    assert (fetched.status, fetched.body) == (200, CLEAN_GZ)  # the client: still gzip
    assert hooks.responses == {b"/clean.gz": bytearray(CLEAN)}  # the hook: decoded


async def test_body_tap_decodes_and_refuses_what_cannot_be_decoded() -> None:
    from tlsmitm._errors import UpstreamError
    from tlsmitm._relay.hooks import BodyTap

    hooks = DecodedRecorder()
    tap = BodyTap(hooks, FlowInfo(client="c:1", host=HOST, port=443, verified=True))
    request = Request(method=b"GET", target=b"/a", headers=())
    gz = Response(status=200, reason=b"OK", headers=((b"Content-Encoding", b"gzip"),))
    for start in range(0, len(CLEAN_GZ), 7):
        await tap.response(request, gz, CLEAN_GZ[start : start + 7], end=False)
    await tap.response(request, gz, b"", end=True)
    assert hooks.responses[b"/a"] == CLEAN
    bomb = Response(status=200, reason=b"OK", headers=((b"content-encoding", b"gzip"),))
    with pytest.raises(UpstreamError) as info:
        await tap.response(request, bomb, gzip_bomb(), end=True)
    assert info.value.reason == "decompression_bomb"
    odd = Response(status=200, reason=b"OK", headers=((b"content-encoding", b"compress"),))
    with pytest.raises(UpstreamError) as info:
        await tap.response(request, odd, b"\x1f\x9d", end=True)
    assert info.value.reason == "unknown_encoding"
    assert hooks.ends == 1


async def test_plain_http_downloads_and_uploads_are_scanned_too(
    nursery: trio.Nursery, tmp_path: Path, clamd: Clamd
) -> None:
    table = routes()
    uploads: list[bytes] = []

    async def plain(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            received = await read_request(conn, stream)
            if received is None:
                return
            request, body = received
            target = bytes(request.target)
            if target == b"/upload":
                uploads.append(body)
                headers, payload = [(b"content-type", b"text/plain")], b"stored"
            else:
                headers, make = table[target]
                payload = make()
            headers = [*headers, (b"content-length", str(len(payload)).encode())]
            with contextlib.suppress(trio.BrokenResourceError):
                await send_events(
                    conn,
                    stream,
                    h11.Response(status_code=200, headers=headers),
                    h11.Data(data=payload),
                    h11.EndOfMessage(),
                )

    listeners = await nursery.start(functools.partial(trio.serve_tcp, plain, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    _, roots = await start_origin(nursery, tmp_path)
    proxy = await start_proxy(
        nursery,
        tmp_path,
        roots,
        ["--scan", scan_url("clamd-unix", clamd, None), "--scan-requests"],
    )
    clean = await curl(proxy, f"http://{HOST}:{port}/clean.gz", tmp_path)
    assert (clean.status, clean.body) == (200, CLEAN_GZ)
    blocked = await curl(proxy, f"http://{HOST}:{port}/eicar.gz", tmp_path)
    assert EICAR_BODY_SIGNATURE in await block_page(proxy, blocked, tmp_path)
    upload = await curl(proxy, f"http://{HOST}:{port}/upload", tmp_path, upload=EICAR)
    assert EICAR_BODY_SIGNATURE in await block_page(proxy, upload, tmp_path)
    assert uploads == []


async def test_a_held_chunked_body_keeps_its_trailer_fields(
    nursery: trio.Nursery, tmp_path: Path, clamd: Clamd
) -> None:
    origin, roots = await start_origin(nursery, tmp_path)
    proxy = await start_proxy(
        nursery, tmp_path, roots, ["--scan", scan_url("clamd-unix", clamd, None)]
    )
    fetched = await curl(
        proxy, f"https://{HOST}:{origin.port}/trailers", tmp_path, extra=("--raw",)
    )
    assert fetched.status == 200
    assert fetched.body.endswith(b"0\r\nx-checksum: abc123\r\n\r\n")
    assert CLEAN in fetched.body


async def test_a_large_upload_waiting_for_100_continue_is_held_then_sent_whole(
    nursery: trio.Nursery, tmp_path: Path, clamd: Clamd
) -> None:
    origin, roots = await start_origin(nursery, tmp_path)
    proxy = await start_proxy(
        nursery, tmp_path, roots, ["--scan", scan_url("clamd-unix", clamd, None), "--scan-requests"]
    )
    body = _BLOCK * 3  # 3 MiB: curl sends "Expect: 100-continue" and waits for the 100
    # curl gives up waiting after --expect100-timeout; the proxy must answer long before.
    with trio.fail_after(60):
        fetched = await curl(
            proxy,
            f"https://{HOST}:{origin.port}/upload",
            tmp_path,
            upload=body,
            extra=("--expect100-timeout", "600", "-H", "Expect: 100-continue"),
        )
    assert (fetched.status, fetched.body) == (200, b"stored")
    assert origin.uploads == [body]
    blocked = await fetch(proxy, origin, "/upload", tmp_path, upload=body + EICAR)
    assert EICAR_BODY_SIGNATURE in await block_page(proxy, blocked, tmp_path)
    assert origin.uploads == [body]


async def test_over_http2_too(nursery: trio.Nursery, tmp_path: Path, icap: Icap) -> None:
    origin, roots = await start_origin(nursery, tmp_path)
    proxy = await start_proxy(nursery, tmp_path, roots, ["--scan", icap.url, "--scan-requests"])
    http2 = ("--http2", "-w", "%{http_code} %{redirect_url} %{http_version}")
    clean = await curl(proxy, f"https://{HOST}:{origin.port}/clean.gz", tmp_path, extra=http2)
    assert (clean.status, clean.body) == (200, CLEAN_GZ)
    assert clean.location == "2"  # the client spoke HTTP/2 to the proxy
    blocked = await curl(proxy, f"https://{HOST}:{origin.port}/eicar.gz", tmp_path, extra=http2)
    assert EICAR not in blocked.body
    url, version = blocked.location.split()
    assert version == "2"
    blocked = Fetched(status=blocked.status, location=url, body=b"")
    assert EICAR_BODY_SIGNATURE in await block_page(proxy, blocked, tmp_path)
    upload = await curl(
        proxy, f"https://{HOST}:{origin.port}/upload", tmp_path, upload=EICAR, extra=http2
    )
    url, version = upload.location.split()
    assert version == "2"
    page = await block_page(proxy, Fetched(status=upload.status, location=url, body=b""), tmp_path)
    assert EICAR_BODY_SIGNATURE in page
    assert origin.uploads == []  # held, judged, never sent
    fine = await curl(
        proxy, f"https://{HOST}:{origin.port}/upload", tmp_path, upload=CLEAN, extra=http2
    )
    assert (fine.status, fine.body) == (200, b"stored")
    assert origin.uploads == [CLEAN]
    assert proxy.interceptor.stats.scan_blocked == 2


@pytest.mark.parametrize("protocol", ["--http1.1", "--http2"])
async def test_a_blocked_connection_keeps_its_block_reason_after_the_client_leaves(
    nursery: trio.Nursery, tmp_path: Path, clamd: Clamd, protocol: str
) -> None:
    """The connection's end (curl closing, on either protocol) never overwrites the block."""
    origin, roots = await start_origin(nursery, tmp_path)
    proxy = await start_proxy(
        nursery, tmp_path, roots, ["--scan", scan_url("clamd-unix", clamd, None)]
    )
    for path in ("/bomb", "/eicar", "/clean"):
        fetched = await fetch(proxy, origin, path, tmp_path, extra=(protocol,))
        assert fetched.status == (200 if path == "/clean" else 303)
    with trio.fail_after(20):
        while len([r for r in proxy.records if r.host == HOST]) < 3:
            await trio.sleep(0.02)
    assert [(r.decision, r.reason) for r in proxy.records if r.host == HOST] == [
        ("block", "scan_failed"),
        ("block", "scan_infected"),
        ("intercept", "verified"),
    ]
