"""The scanners against real engines: a private clamd and c-icap with ``virus_scan`` on it
(started by ``scan_engines``), and a small ICAP server written here for what c-icap's
antivirus service never does (replace a clean body)."""

from __future__ import annotations

import functools
import gzip
import io
import os
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from scan_engines import EICAR, EICAR_BODY_SIGNATURE, Clamd, Icap, free_port

from tlsmitm._errors import UpstreamError
from tlsmitm._scan import (
    ClamdScanner,
    Clean,
    IcapScanner,
    Infected,
    Replaced,
    ScanContext,
    ScanFailed,
    ScanSettings,
    ScanVerdict,
    open_inspection,
)

pytestmark = pytest.mark.e2e

RESPONSE = ScanContext(
    direction="response",
    host="files.test",
    port=443,
    method=b"GET",
    target=b"/download",
    request_headers=((b"host", b"files.test"),),
    status=200,
    reason=b"OK",
    response_headers=((b"content-type", b"application/octet-stream"),),
)
UPLOAD = ScanContext(
    direction="request",
    host="files.test",
    port=443,
    method=b"POST",
    target=b"/upload",
    request_headers=((b"host", b"files.test"), (b"content-type", b"text/plain")),
)


class _Pieces:
    """``data`` in pieces, as an async iterator a scanner may leave unfinished."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data = data
        self._size = size
        self._at = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._at >= len(self._data):
            raise StopAsyncIteration
        piece = self._data[self._at : self._at + self._size]
        self._at += self._size
        return piece


def _pieces(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    return _Pieces(data, size)


def _zip_with_eicar() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme.txt", b"nothing to see\n" * 100)
        archive.writestr("tools/eicar.com", EICAR)
    return out.getvalue()


def test_engines_start_quickly(clamd: Clamd, icap: Icap) -> None:
    # Two signatures: clamd is ready in well under the time a full database takes (~20 s).
    assert clamd.startup_seconds < 30
    assert icap.startup_seconds < 30


# -- clamd ----------------------------------------------------------------------------------


@pytest.fixture(params=["unix", "tcp"])
def clamd_scanner(request: pytest.FixtureRequest, clamd: Clamd) -> ClamdScanner:
    if request.param == "unix":
        return ClamdScanner(
            socket_path=str(clamd.socket_path), stream_max_length=clamd.stream_max_length
        )
    return ClamdScanner(host=clamd.host, port=clamd.port, stream_max_length=clamd.stream_max_length)


async def test_clamd_ping_version_clean_and_eicar(clamd_scanner: ClamdScanner) -> None:
    await clamd_scanner.open()
    assert clamd_scanner.version is not None
    assert clamd_scanner.version.startswith("ClamAV")
    assert await clamd_scanner.scan(RESPONSE, _pieces(b"hello, world\n" * 1000)) == Clean(
        scanner=clamd_scanner.name
    )
    verdict = await clamd_scanner.scan(RESPONSE, _pieces(b"a" * 200_000 + EICAR, 4096))
    assert isinstance(verdict, Infected)
    assert verdict.threat.startswith(EICAR_BODY_SIGNATURE)


async def test_clamd_finds_eicar_inside_an_archive(clamd: Clamd) -> None:
    scanner = ClamdScanner(socket_path=str(clamd.socket_path))
    verdict = await scanner.scan(RESPONSE, _pieces(_zip_with_eicar()))
    assert isinstance(verdict, Infected)


async def test_clamd_size_refusal_is_a_failure_never_clean(clamd: Clamd) -> None:
    # Told a larger limit than clamd's: clamd itself refuses ("size limit exceeded").
    optimistic = ClamdScanner(
        socket_path=str(clamd.socket_path), stream_max_length=4 * clamd.stream_max_length
    )
    body = bytes(clamd.stream_max_length + 1024 * 1024)
    verdict = await optimistic.scan(RESPONSE, _pieces(body, 1 << 20))
    assert isinstance(verdict, ScanFailed)
    assert verdict.reason == "too_large"
    # Told the right limit: not even sent.
    knowing = ClamdScanner(socket_path=str(clamd.socket_path), stream_max_length=1000)
    verdict = await knowing.scan(RESPONSE, _pieces(b"x" * 2000))
    assert isinstance(verdict, ScanFailed)
    assert verdict.reason == "too_large"


async def test_clamd_down_is_a_failure(tmp_path: Path) -> None:
    scanner = ClamdScanner(socket_path=str(tmp_path / "nobody.sock"))
    verdict = await scanner.scan(RESPONSE, _pieces(b"x"))
    assert isinstance(verdict, ScanFailed)
    assert verdict.reason == "unreachable"
    with pytest.raises(UpstreamError):
        await scanner.open()
    tcp = ClamdScanner(host="127.0.0.1", port=free_port())
    assert isinstance(await tcp.scan(RESPONSE, _pieces(b"x")), ScanFailed)


async def test_clamd_sees_decoded_gzip_through_an_inspection(clamd: Clamd) -> None:
    scanner = ClamdScanner(socket_path=str(clamd.socket_path))
    encoded = gzip.compress(os.urandom(100_000) + EICAR)
    settings = ScanSettings(scanners=(scanner,))
    async with open_inspection(settings, RESPONSE, (b"gzip",)) as inspection:
        for start in range(0, len(encoded), 8192):
            await inspection.feed(encoded[start : start + 8192])
        decision = await inspection.finish()
    assert decision.action == "block"
    assert decision.threat is not None
    assert decision.threat.startswith(EICAR_BODY_SIGNATURE)


# -- c-icap ---------------------------------------------------------------------------------


async def test_icap_options_then_204_for_clean_and_a_threat_for_eicar(icap: Icap) -> None:
    scanner = IcapScanner(icap.host, icap.port, icap.service)
    try:
        await scanner.open()
        assert scanner.options is not None
        assert {"RESPMOD", "REQMOD"} <= scanner.options.methods
        assert scanner.options.istag
        assert scanner.options.preview is not None
        clean = await scanner.scan(RESPONSE, _pieces(b"hello, world\n" * 50))  # in the preview
        assert clean == Clean(scanner=scanner.name)
        bigger = await scanner.scan(RESPONSE, _pieces(os.urandom(300_000)))  # 100 Continue
        assert bigger == Clean(scanner=scanner.name)
        infected = await scanner.scan(RESPONSE, _pieces(os.urandom(300_000) + EICAR))
        assert isinstance(infected, Infected)
        assert EICAR_BODY_SIGNATURE in infected.threat
        upload = await scanner.scan(UPLOAD, _pieces(b"form data " + EICAR))
        assert isinstance(upload, Infected)
        # One persistent connection carried the OPTIONS and every scan.
        assert scanner.connections_made == 1
    finally:
        await scanner.aclose()


async def test_icap_down_is_a_failure() -> None:
    scanner = IcapScanner("127.0.0.1", free_port(), "virus_scan", connect_timeout=5)
    verdict = await scanner.scan(RESPONSE, _pieces(b"x"))
    assert isinstance(verdict, ScanFailed)
    assert verdict.reason == "unreachable"
    with pytest.raises(UpstreamError):
        await scanner.open()


# -- an ICAP server that modifies content (written here) --------------------------------------


async def _read_until(stream: trio.SocketStream, buffer: bytearray, marker: bytes) -> bytes:
    while marker not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError
        buffer += data
    index = buffer.index(marker) + len(marker)
    out = bytes(buffer[:index])
    del buffer[:index]
    return out


async def _read_chunks(stream: trio.SocketStream, buffer: bytearray) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        line = await _read_until(stream, buffer, b"\r\n")
        size_text, _, ext = line[:-2].partition(b";")
        size = int(size_text, 16)
        if size == 0:
            await _read_until(stream, buffer, b"\r\n")
            return bytes(body), b"ieof" in ext
        while len(buffer) < size + 2:
            buffer += await stream.receive_some(65536)
        body += buffer[:size]
        del buffer[: size + 2]


class Replacer:
    """RESPMOD with preview 4: a 100 Continue, then a 200 whose body is the original reversed."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        async with stream:
            while True:
                try:
                    head = await _read_until(stream, buffer, b"\r\n\r\n")
                except (EOFError, trio.BrokenResourceError):
                    return
                self.requests.append(head)
                if head.startswith(b"OPTIONS"):
                    await stream.send_all(
                        b'ICAP/1.0 200 OK\r\nMethods: RESPMOD\r\nISTag: "r1"\r\nPreview: 4\r\n'
                        b"Allow: 204\r\nMax-Connections: 3\r\nEncapsulated: null-body=0\r\n\r\n"
                    )
                    continue
                encapsulated = head.split(b"Encapsulated: ")[1].split(b"\r\n")[0]
                body_offset = int(encapsulated.rsplit(b"=", 1)[1])
                while len(buffer) < body_offset:
                    buffer += await stream.receive_some(65536)
                del buffer[:body_offset]
                preview, ieof = await _read_chunks(stream, buffer)
                body = preview
                if not ieof:
                    await stream.send_all(b"ICAP/1.0 100 Continue\r\n\r\n")
                    rest, _ = await _read_chunks(stream, buffer)
                    body += rest
                res_hdr = b"HTTP/1.1 200 OK\r\nX-Cleaned: yes\r\n\r\n"
                new = body[::-1]
                await stream.send_all(
                    b'ICAP/1.0 200 OK\r\nISTag: "r1"\r\n'
                    + f"Encapsulated: res-hdr=0, res-body={len(res_hdr)}\r\n\r\n".encode()
                    + res_hdr
                    + f"{len(new):x}\r\n".encode()
                    + new
                    + b"\r\n0\r\n\r\n"
                )


async def test_modified_content_is_honoured_after_a_preview(nursery: trio.Nursery) -> None:
    server = Replacer()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    scanner = IcapScanner("127.0.0.1", port, "clean")
    try:
        verdicts: list[ScanVerdict] = []
        for body in (b"abc", b"abcdefghij" * 1000):
            verdicts.append(await scanner.scan(RESPONSE, _pieces(body, 3)))
        for verdict, body in zip(verdicts, (b"abc", b"abcdefghij" * 1000), strict=True):
            assert isinstance(verdict, Replaced)
            assert verdict.body == body[::-1]
            assert (b"x-cleaned", b"yes") in verdict.headers
        assert scanner.options is not None
        assert scanner.options.max_connections == 3
        first, second = server.requests[1], server.requests[2]
        assert b"Preview: 4" in first
        assert b"Allow: 204" in first
        assert b"Preview: 4" in second
        assert scanner.connections_made == 1
    finally:
        await scanner.aclose()


# -- ICAP servers that misbehave (written here) -------------------------------------------------

OPTIONS_OK = (
    b'ICAP/1.0 200 OK\r\nMethods: RESPMOD, REQMOD\r\nISTag: "t1"\r\nOptions-TTL: 60\r\n'
    b"Encapsulated: null-body=0\r\n\r\n"
)


class Scripted:
    """Answers OPTIONS, then each modification request with the next of ``answers``.

    An answer of ``None`` closes the connection without a word; ``"hang"`` never answers.
    """

    def __init__(self, answers: list[bytes | str | None], *, close_after: bool = False) -> None:
        self.answers = answers
        self.close_after = close_after
        self.options_asked = 0
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = bytearray()
        async with stream:
            while True:
                try:
                    head = await _read_until(stream, buffer, b"\r\n\r\n")
                except (EOFError, trio.BrokenResourceError):
                    return
                if head.startswith(b"OPTIONS"):
                    self.options_asked += 1
                    await stream.send_all(OPTIONS_OK)
                    continue
                body_offset = int(
                    head.split(b"Encapsulated: ")[1].split(b"\r\n")[0].rsplit(b"=", 1)[1]
                )
                while len(buffer) < body_offset:
                    buffer += await stream.receive_some(65536)
                del buffer[:body_offset]
                if b"null-body" not in head.split(b"Encapsulated: ")[1].split(b"\r\n")[0]:
                    await _read_chunks(stream, buffer)
                answer = self.answers.pop(0)
                if answer is None:
                    return
                if answer == "hang":
                    await trio.sleep_forever()
                assert isinstance(answer, bytes)
                await stream.send_all(answer)
                if self.close_after:
                    return


async def _serve(nursery: trio.Nursery, server: Scripted) -> int:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
    )
    return int(listeners[0].socket.getsockname()[1])


NO_CONTENT = b'ICAP/1.0 204 No Content\r\nISTag: "t1"\r\nEncapsulated: null-body=0\r\n\r\n'


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", "protocol"),
        (
            b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=10\r\n\r\nshort",
            "connection_lost",
        ),
        (None, "connection_lost"),
        (b'ICAP/1.0 500 Server Error\r\nISTag: "t1"\r\n\r\n', "engine_error"),
        (
            b"ICAP/1.0 200 OK\r\nEncapsulated: req-hdr=0, null-body=20\r\n\r\n"
            b"POST /x HTTP/1.1\r\n\r\n",
            "unsupported",
        ),
    ],
)
async def test_a_misbehaving_icap_server_is_a_failure_never_clean(
    nursery: trio.Nursery, answer: bytes | None, reason: str
) -> None:
    port = await _serve(nursery, Scripted([answer], close_after=True))
    scanner = IcapScanner("127.0.0.1", port, "svc")
    try:
        verdict = await scanner.scan(RESPONSE, _pieces(b"some body" * 100))
    finally:
        await scanner.aclose()
    assert isinstance(verdict, ScanFailed), verdict
    assert verdict.reason == reason


async def test_options_ttl_is_honoured_and_stale_connections_are_replaced(
    nursery: trio.Nursery,
) -> None:
    server = Scripted([NO_CONTENT, NO_CONTENT, NO_CONTENT], close_after=True)
    port = await _serve(nursery, server)
    now = [0.0]
    scanner = IcapScanner("127.0.0.1", port, "svc", clock=lambda: now[0])
    try:
        assert await scanner.scan(RESPONSE, _pieces(b"a")) == Clean(scanner=scanner.name)
        # The server closed that connection after answering: the next scan needs a new one.
        assert await scanner.scan(RESPONSE, _pieces(b"b")) == Clean(scanner=scanner.name)
        assert server.options_asked == 1
        now[0] = 61.0  # past Options-TTL: asked again before the next scan
        assert await scanner.scan(RESPONSE, _pieces(b"c")) == Clean(scanner=scanner.name)
        assert server.options_asked == 2
    finally:
        await scanner.aclose()


async def test_a_silent_icap_server_times_out_through_the_inspection(
    nursery: trio.Nursery,
) -> None:
    port = await _serve(nursery, Scripted(["hang"]))
    scanner = IcapScanner("127.0.0.1", port, "svc")
    settings = ScanSettings(scanners=(scanner,), timeout=1.0)
    try:
        with trio.fail_after(30):
            async with open_inspection(settings, RESPONSE) as inspection:
                await inspection.feed(b"body")
                decision = await inspection.finish()
    finally:
        await scanner.aclose()
    assert decision.action == "block"
    assert decision.failure is not None
    assert decision.failure.reason == "timeout"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [(b"stream: something odd\0", "engine_error"), (b"", "connection_lost")],
)
async def test_a_misbehaving_clamd_is_a_failure_never_clean(
    nursery: trio.Nursery, tmp_path: Path, reply: bytes, reason: str
) -> None:
    path = tmp_path / "fake-clamd.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(str(path))
    sock.listen()

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while not data.endswith(b"\0\0\0\0"):  # up to the zero-length chunk
                received = await stream.receive_some(65536)
                if not received:
                    return
                data += received
            if reply:
                await stream.send_all(reply)

    await nursery.start(trio.serve_listeners, answer, [trio.SocketListener(sock)])
    scanner = ClamdScanner(socket_path=str(path))
    verdict = await scanner.scan(RESPONSE, _pieces(b"x" * 1000))
    assert isinstance(verdict, ScanFailed), verdict
    assert verdict.reason == reason
