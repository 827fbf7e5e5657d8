"""The scanning core without engines: verdicts, decoding, ICAP messages, clamd replies, spooling,
and the fan-out driver with scanners made here."""

from __future__ import annotations

import gzip
import os
import stat
import zlib
from collections.abc import AsyncIterator

import brotli
import pytest
import trio
import trio.testing
import zstandard

from tlsmitm._errors import ConfigurationError, UpstreamError
from tlsmitm._scan import (
    BodyDecoder,
    ClamdScanner,
    Clean,
    DecodeLimits,
    FailureMode,
    IcapScanner,
    Infected,
    Replaced,
    ScanContext,
    ScanFailed,
    Scanner,
    ScanSettings,
    ScanVerdict,
    SpooledBody,
    decide,
    open_inspection,
    parse_content_encoding,
    parse_size,
    scanner_from_url,
)
from tlsmitm._scan._clamd import instream_chunk, parse_reply
from tlsmitm._scan._icap import (
    ResponseParser,
    build_options,
    build_request,
    encode_chunk,
    http_request_head,
    http_response_head,
    parse_options,
    threat_of,
)

CONTEXT = ScanContext(direction="response", host="a.test", port=443, status=200, reason=b"OK")

# -- verdicts -------------------------------------------------------------------------------

CLEAN = Clean(scanner="a")
FOUND = Infected(scanner="b", threat="Eicar")
DOWN = ScanFailed(scanner="c", reason="unreachable")
PAGE = Replaced(scanner="d", status=403, reason=b"Forbidden", headers=(), body=b"no")


@pytest.mark.parametrize(
    ("verdicts", "mode", "action", "summary"),
    [
        ([], FailureMode.CLOSED, "deliver", "clean"),
        ([CLEAN, CLEAN], FailureMode.CLOSED, "deliver", "clean"),
        ([CLEAN, FOUND], FailureMode.OPEN, "block", "infected"),
        ([DOWN, FOUND], FailureMode.OPEN, "block", "infected"),
        ([CLEAN, DOWN], FailureMode.CLOSED, "block", "failed_blocked"),
        ([CLEAN, DOWN], FailureMode.OPEN, "deliver", "failed_open"),
        ([PAGE, CLEAN], FailureMode.CLOSED, "replace", "replaced"),
        ([PAGE, DOWN], FailureMode.CLOSED, "block", "failed_blocked"),
        ([PAGE, DOWN], FailureMode.OPEN, "replace", "failed_open"),
    ],
)
def test_decide(verdicts: list[ScanVerdict], mode: FailureMode, action: str, summary: str) -> None:
    decision = decide(verdicts, mode)
    assert decision.action == action
    assert decision.summary == summary
    if action == "block" and summary == "infected":
        assert decision.threat == "Eicar"
    if action == "replace":
        assert decision.replacement is PAGE


def test_values_are_validated() -> None:
    with pytest.raises(ValueError, match="direction"):
        ScanContext(direction="sideways", host="a", port=1)
    with pytest.raises(ValueError, match="status"):
        ScanContext(direction="response", host="a", port=1, status=0)
    with pytest.raises(ValueError, match="identifier"):
        ScanFailed(scanner="x", reason="Not A Code")
    with pytest.raises(ValueError, match="positive"):
        ScanSettings(scanners=(), max_bytes=0)


# -- decoding -------------------------------------------------------------------------------

PLAIN = os.urandom(5000) * 40 + b"the end"


def _encode(coding: str, data: bytes) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    if coding == "br":
        return bytes(brotli.compress(data))
    if coding == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    raise AssertionError(coding)


def _decode_in_pieces(codings: list[str], data: bytes, step: int, **limits: int) -> bytes:
    decoder = BodyDecoder(codings, DecodeLimits(**limits))
    out = bytearray()
    for start in range(0, len(data), step):
        out += b"".join(decoder.feed(data[start : start + step]))
    out += b"".join(decoder.finish())
    return bytes(out)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("step", [1, 333, 1 << 20])
def test_decoding_round_trips_in_any_pieces(coding: str, step: int) -> None:
    data = PLAIN if step > 1 else PLAIN[:3000]
    assert _decode_in_pieces([coding], _encode(coding, data), step) == data


def test_codings_are_undone_last_first_and_identity_is_none() -> None:
    assert parse_content_encoding([b"gzip, identity", b" BR "]) == ["gzip", "br"]
    both = _encode("br", _encode("gzip", PLAIN))  # gzip applied first, then br
    assert _decode_in_pieces(["gzip", "br"], both, 4096) == PLAIN
    assert BodyDecoder([]).identity


def test_concatenated_gzip_members_raw_deflate_and_zstd_frames() -> None:
    assert _decode_in_pieces(["gzip"], gzip.compress(b"ab") + gzip.compress(b"cd"), 3) == b"abcd"
    raw = zlib.compressobj(wbits=-15)
    assert _decode_in_pieces(["deflate"], raw.compress(PLAIN) + raw.flush(), 100) == PLAIN
    two = _encode("zstd", b"ab") + _encode("zstd", b"cd")
    assert _decode_in_pieces(["zstd"], two, 5) == b"abcd"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_truncated_or_corrupt_bodies_are_errors(coding: str) -> None:
    encoded = _encode(coding, PLAIN)
    with pytest.raises(UpstreamError) as info:
        _decode_in_pieces([coding], encoded[: len(encoded) // 2], 1000)
    assert info.value.reason == "bad_encoding"
    with pytest.raises(UpstreamError) as info:
        _decode_in_pieces([coding], b"\xff" * 64 + encoded, 1000)
    assert info.value.reason == "bad_encoding"


def test_unknown_coding_cannot_be_decoded() -> None:
    with pytest.raises(UpstreamError) as info:
        BodyDecoder(["compress"])
    assert info.value.reason == "unknown_encoding"


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_bombs_stop_early_by_ratio(coding: str) -> None:
    bomb = _encode(coding, b"\0" * (64 << 20))
    decoder = BodyDecoder([coding], DecodeLimits(max_decoded=1 << 30, ratio_floor=1 << 20))
    with pytest.raises(UpstreamError) as info:
        decoder.feed(bomb)
    assert info.value.reason == "decompression_bomb"
    assert decoder.decoded_bytes < 16 << 20  # stopped long before the 64 MiB


def test_absolute_bound_and_small_compressible_bodies() -> None:
    spaces = b" " * 100_000  # compresses ~1000x, but is small: not a bomb
    assert _decode_in_pieces(["gzip"], gzip.compress(spaces), 4096) == spaces
    with pytest.raises(UpstreamError) as info:
        _decode_in_pieces(["gzip"], gzip.compress(PLAIN), 4096, max_decoded=1000)
    assert info.value.reason == "decompression_bomb"


# -- ICAP messages --------------------------------------------------------------------------


def test_respmod_head_gives_encapsulated_offsets() -> None:
    req = http_request_head(b"GET", b"/x", ((b"host", b"a.test"),))
    res = http_response_head(200, b"OK", ((b"content-type", b"text/plain"),))
    head = build_request(
        b"RESPMOD",
        b"icap://s/av",
        b"s",
        request_head=req,
        response_head=res,
        has_body=True,
        preview=1024,
    )
    icap_head, _, rest = head.partition(b"\r\n\r\n")
    assert b"Allow: 204" in icap_head
    assert b"Preview: 1024" in icap_head
    assert (
        f"Encapsulated: req-hdr=0, res-hdr={len(req)}, res-body={len(req) + len(res)}".encode()
        in icap_head
    )
    assert rest == req + res
    nobody = build_request(
        b"REQMOD",
        b"icap://s/av",
        b"s",
        request_head=req,
        response_head=None,
        has_body=False,
        preview=10,
    )
    assert b"Encapsulated: req-hdr=0, null-body=" in nobody
    assert b"Preview" not in nobody
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"") == b""
    with pytest.raises(ValueError, match="header"):
        http_request_head(b"GET", b"/", ((b"bad name", b"v"),))
    assert build_options(b"icap://s/av", b"s").startswith(b"OPTIONS icap://s/av ICAP/1.0\r\n")


def _feed_bytewise(data: bytes) -> tuple[ResponseParser, object]:
    parser = ResponseParser()
    result = None
    for index in range(len(data)):
        result = parser.feed(data[index : index + 1])
        if result is not None:
            parser.feed(data[index + 1 :])
            break
    return parser, result


def test_parses_options_204_100_and_a_modified_response_in_any_pieces() -> None:
    options = (
        b'ICAP/1.0 200 OK\r\nMethods: RESPMOD, REQMOD\r\nISTag: "abc"\r\nPreview: 1024\r\n'
        b"Allow: 204\r\nMax-Connections: 7\r\nOptions-TTL: 3600\r\n"
        b"Encapsulated: null-body=0\r\n\r\n"
    )
    _, response = _feed_bytewise(options)
    parsed = parse_options(response)  # type: ignore[arg-type]
    assert parsed.methods == {"RESPMOD", "REQMOD"}
    assert (parsed.istag, parsed.preview, parsed.allow_204) == ("abc", 1024, True)
    assert (parsed.max_connections, parsed.ttl) == (7, 3600.0)

    _, response = _feed_bytewise(b"ICAP/1.0 204 No Content\r\nISTag: x\r\n\r\nEXTRA")
    assert response.status == 204  # type: ignore[attr-defined]
    parser, response = _feed_bytewise(b"ICAP/1.0 100 Continue\r\n\r\n")
    assert response.status == 100  # type: ignore[attr-defined]

    res_hdr = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\n\r\n"
    modified = (
        b"ICAP/1.0 200 OK\r\nX-Infection-Found: Type=0; Resolution=2; Threat=Eicar-Test;\r\n"
        + f"Encapsulated: res-hdr=0, res-body={len(res_hdr)}\r\n\r\n".encode()
        + res_hdr
        + b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT"
    )
    parser, response = _feed_bytewise(modified)
    assert response.http_status == 403  # type: ignore[attr-defined]
    assert response.body == b"hello world"  # type: ignore[attr-defined]
    assert parser.trailing == b"NEXT"
    assert threat_of(response.headers) == "Eicar-Test"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"ICAP/1.0 2x0 OK\r\n\r\n",
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=5, res-hdr=0\r\n\r\n",
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0\r\n\r\n",
        b"ICAP/1.0 200 OK\r\nno colon here\r\n\r\n",
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\nzz\r\n",
        b"ICAP/1.0 200 OK\r\nEncapsulated: res-body=0\r\n\r\n2\r\nabX\r\n",
    ],
)
def test_malformed_icap_responses_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(UpstreamError) as info:
        ResponseParser().feed(data)
    assert info.value.reason == "icap_protocol"


def test_threat_headers_of_other_engines() -> None:
    assert threat_of(((b"x-virus-id", b"W97M/Foo"),)) == "W97M/Foo"
    violations = b"1\n\tfile.exe\n\tTrojan.Bar\n\t2\n\t0"
    assert threat_of(((b"x-violations-found", violations),)) == "Trojan.Bar"
    assert threat_of(((b"istag", b"x"),)) is None


# -- clamd ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"stream: OK\0", ("ok", "")),
        (b"stream: Eicar-Signature FOUND\0", ("found", "Eicar-Signature")),
        (
            b"INSTREAM size limit exceeded. ERROR\0",
            ("too_large", "INSTREAM size limit exceeded. ERROR"),
        ),
        (
            b"stream: Can't allocate memory ERROR\0",
            ("error", "stream: Can't allocate memory ERROR"),
        ),
        (b"", ("error", "empty reply")),
    ],
)
def test_clamd_replies(reply: bytes, expected: tuple[str, str]) -> None:
    assert parse_reply(reply) == expected


def test_instream_chunk_is_length_prefixed() -> None:
    assert instream_chunk(b"abc") == b"\0\0\0\x03abc"
    assert instream_chunk(b"") == b"\0\0\0\0"


# -- configuration --------------------------------------------------------------------------


def test_scanner_urls() -> None:
    icap = scanner_from_url("icap://127.0.0.1:1344/avscan")
    assert isinstance(icap, IcapScanner)
    assert (icap.host, icap.port, icap.service) == ("127.0.0.1", 1344, "avscan")
    assert isinstance(scanner_from_url("icap://av.example/x"), IcapScanner)
    unix = scanner_from_url("clamd:///run/clamav/clamd.ctl")
    assert isinstance(unix, ClamdScanner)
    assert unix.socket_path == "/run/clamav/clamd.ctl"
    tcp = scanner_from_url("clamd://127.0.0.1:3310?stream-max-length=100M")
    assert isinstance(tcp, ClamdScanner)
    assert (tcp.host, tcp.port, tcp.stream_max_length) == ("127.0.0.1", 3310, 100 << 20)


@pytest.mark.parametrize(
    "url",
    [
        "http://x/",
        "icap://host",
        "icap://host:99999/x",
        "clamd://host",
        "clamd://h:1/path",
        "clamd:///s?other=1",
        "clamd:///s?stream-max-length=lots",
    ],
)
def test_bad_scanner_urls_say_what_is_expected(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        scanner_from_url(url)
    assert info.value.reason == "bad_scanner"
    assert "--scan" in str(info.value)


def test_sizes() -> None:
    assert [parse_size(t) for t in ("10", "512K", "30M", "2g", "3MiB")] == [
        10,
        512 << 10,
        30 << 20,
        2 << 30,
        3 << 20,
    ]
    for bad in ("", "-1", "0", "1.5M", "M"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


# -- spooling -------------------------------------------------------------------------------


async def test_spool_keeps_small_bodies_in_memory_and_large_ones_in_an_unlinked_0600_file(
    tmp_path: object,
) -> None:
    small = SpooledBody(memory_limit=100)
    await small.write(b"x" * 100)
    assert not small.on_disk
    assert b"".join([c async for c in small.chunks()]) == b"x" * 100
    await small.aclose()

    big = SpooledBody(memory_limit=100)
    data = os.urandom(300_000)
    for start in range(0, len(data), 7000):
        await big.write(data[start : start + 7000])
    assert big.on_disk
    fd = big.fileno()
    assert fd is not None
    info = os.fstat(fd)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_nlink == 0  # unlinked at once: no name to open
    assert big.size == len(data)
    assert b"".join([c async for c in big.chunks(size=4096)]) == data
    await big.aclose()
    with pytest.raises(OSError):
        os.fstat(fd)


# -- the fan-out driver ---------------------------------------------------------------------


class Recorder(Scanner):
    """A scanner made here: reads everything (or ``stop_after`` bytes) and answers ``answer``."""

    def __init__(
        self,
        name: str,
        answer: ScanVerdict | None = None,
        *,
        stop_after: int | None = None,
        hang: bool = False,
    ) -> None:
        self.name = name
        self.answer = answer or Clean(scanner=name)
        self.stop_after = stop_after
        self.hang = hang
        self.seen = bytearray()
        self.cancelled = False

    async def scan(self, context: ScanContext, body: AsyncIterator[bytes]) -> ScanVerdict:
        try:
            async for chunk in body:
                self.seen += chunk
                if self.stop_after is not None and len(self.seen) >= self.stop_after:
                    return self.answer
            if self.hang:
                await trio.sleep_forever()
            return self.answer
        except trio.Cancelled:
            self.cancelled = True
            raise


async def _inspect(
    settings: ScanSettings, pieces: list[bytes], encoding: tuple[bytes, ...] = ()
) -> tuple[object, bytes]:
    async with open_inspection(settings, CONTEXT, encoding) as inspection:
        for piece in pieces:
            await inspection.feed(piece)
        decision = await inspection.finish()
        held = b"".join([c async for c in inspection.spool.chunks()])
    return decision, held


async def test_every_scanner_sees_the_decoded_body_and_the_client_bytes_stay_encoded() -> None:
    a, b = Recorder("a"), Recorder("b")
    encoded = gzip.compress(PLAIN)
    pieces = [encoded[i : i + 1000] for i in range(0, len(encoded), 1000)]
    decision, held = await _inspect(ScanSettings(scanners=(a, b)), pieces, (b"gzip",))
    assert decision.action == "deliver"  # type: ignore[attr-defined]
    assert bytes(a.seen) == bytes(b.seen) == PLAIN
    assert held == encoded


async def test_an_early_answer_does_not_stall_the_others() -> None:
    early = Recorder("early", Infected(scanner="early", threat="T"), stop_after=1)
    slow = Recorder("slow")
    async with open_inspection(ScanSettings(scanners=(early, slow)), CONTEXT) as inspection:
        for _ in range(200):
            await inspection.feed(b"z" * 1000)
        assert inspection.settled
        decision = await inspection.finish()
    assert decision.threat == "T"
    assert len(slow.seen) == 200_000


async def test_too_large_and_bombs_end_running_scans_as_failures() -> None:
    scanner = Recorder("s")
    settings = ScanSettings(scanners=(scanner,), max_bytes=5000)
    decision, _ = await _inspect(settings, [b"x" * 4000, b"x" * 4000])
    assert decision.action == "block"  # type: ignore[attr-defined]
    assert decision.failure.reason == "too_large"  # type: ignore[attr-defined]
    assert scanner.cancelled
    bomb = gzip.compress(b"\0" * (32 << 20))
    settings = ScanSettings(
        scanners=(Recorder("s"),),
        failure=FailureMode.OPEN,
        decode_limits=DecodeLimits(ratio_floor=1 << 20),
    )
    decision, held = await _inspect(settings, [bomb], (b"gzip",))
    assert decision.action == "deliver"  # type: ignore[attr-defined]
    assert decision.failure.reason == "decompression_bomb"  # type: ignore[attr-defined]
    assert held == bomb


async def test_a_scanner_that_never_answers_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stuck = Recorder("stuck", hang=True)
    decision, _ = await _inspect(ScanSettings(scanners=(stuck,), timeout=30), [b"abc"])
    assert decision.failure.reason == "timeout"  # type: ignore[attr-defined]
    assert decision.action == "block"  # type: ignore[attr-defined]


async def test_an_unknown_coding_cannot_be_scanned() -> None:
    scanner = Recorder("s")
    decision, held = await _inspect(
        ScanSettings(scanners=(scanner,)), [b"\x1f\x9d..."], (b"compress",)
    )
    assert decision.failure.reason == "unknown_encoding"  # type: ignore[attr-defined]
    assert held == b"\x1f\x9d..."
    assert scanner.seen == b""


async def test_leaving_early_cancels_the_scans() -> None:
    scanner = Recorder("s", hang=True)
    async with open_inspection(ScanSettings(scanners=(scanner,)), CONTEXT) as inspection:
        await inspection.feed(b"abc")
    assert scanner.cancelled


async def test_a_failure_does_not_hide_a_threat_another_scanner_finds() -> None:
    down = Recorder("down", ScanFailed(scanner="down", reason="unreachable"), stop_after=0)
    finder = Recorder("finder", Infected(scanner="finder", threat="T"))
    async with open_inspection(ScanSettings(scanners=(down, finder)), CONTEXT) as inspection:
        await inspection.feed(b"first")
        await trio.testing.wait_all_tasks_blocked()
        assert not inspection.settled  # "finder" is still reading
        await inspection.feed(b"rest")
        decision = await inspection.finish()
    assert decision.action == "block"
    assert decision.threat == "T"


def test_a_hostile_threat_name_cannot_forge_log_fields() -> None:
    from tlsmitm._relay.scanning import ScanReport

    decision = decide(
        [Infected(scanner="icap", threat="Evil\nhost=bank.test scan=clean")], FailureMode.CLOSED
    )
    line = ScanReport(
        host="a.test", direction="response", decision=decision, latencies={"x y": 0.5}, size=3
    ).line()
    assert "\n" not in line
    assert line.count("host=") == 1
    assert line.count("scan=") == 1
    assert "threat=Evil_host_bank.test_scan_clean" in line
    assert "latency_ms[x_y]=500.0" in line
