"""The sans-IO ClientHello peek: real clients' hellos, a spec-following encoder, fuzzing."""

from __future__ import annotations

import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from strategies import (
    alpn_ext,
    hello_message,
    records,
    sni_ext,
    u8,
    u16,
    vec8,
    vec16,
    versions_ext,
)

from tlsmitm._clienthello import (
    MAX_CLIENT_HELLO_BYTES,
    NEED_MORE,
    ClientHello,
    ClientHelloError,
    is_grease,
    looks_like_tls,
    parse_client_hello,
)
from tlsmitm._errors import ClientError
from tlsmitm._tls import upstream_connection, upstream_context

REASONS = {"not_tls", "malformed", "too_large", "unsupported_version"}
TLS13, TLS12 = 0x0304, 0x0303

# The encoder that follows RFC 8446 §4.1.2 / RFC 5246 §7.4.1.2 lives in tests/strategies.py.


def message_of(raw: bytes) -> bytes:
    """The handshake message carried by the records in ``raw`` (inverse of :func:`records`)."""
    out = b""
    pos = 0
    while pos < len(raw):
        length = int.from_bytes(raw[pos + 3 : pos + 5], "big")
        out += raw[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


def parse_ok(data: bytes) -> ClientHello:
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello), result
    return result


def reason_of(data: bytes) -> str:
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(data)
    return info.value.reason


def assert_clean(data: bytes) -> None:
    """The contract: a ClientHello, NEED_MORE (below the bound) or a ClientHelloError."""
    error: ClientHelloError | None = None
    try:
        result = parse_client_hello(data)
    except ClientHelloError as exc:
        error = exc
    if error is not None:
        assert error.reason in REASONS
        assert isinstance(error, ClientError)
    elif result is NEED_MORE:
        assert len(data) < MAX_CLIENT_HELLO_BYTES
    else:
        assert isinstance(result, ClientHello)
        assert result.raw_length <= len(data)


# --------------------------------------------------------------------------------------------
# Real clients


def python_ssl_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def pyopenssl_hello(server_name: bytes | None, alpn: list[bytes] | None = None) -> bytes:
    connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    if server_name is not None:
        connection.set_tlsext_host_name(server_name)
    if alpn:
        connection.set_alpn_protos(alpn)
    connection.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        connection.do_handshake()
    return connection.bio_read(65536)


def tlsmitm_upstream_hello(server_name: str | None, alpn: tuple[bytes, ...] = ()) -> bytes:
    connection = upstream_connection(upstream_context(), server_name=server_name, alpn_offer=alpn)
    with pytest.raises(SSL.WantReadError):
        connection.do_handshake()
    return connection.bio_read(65536)


def curl_hello(*extra: str, host: str = "curl.example.test") -> bytes:
    """Capture curl's ClientHello with a one-shot 127.0.0.1 server that never answers."""
    curl = require_tool("curl")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(10)
        port = server.getsockname()[1]
        resolve = f"{host}:{port}:127.0.0.1"
        url = f"https://{host}:{port}/"
        process = subprocess.Popen(
            [curl, "-sS", "--max-time", "10", *extra, "--resolve", resolve, url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            connection, _ = server.accept()
            with connection:
                connection.settimeout(10)
                data = b""
                while parse_client_hello(data) is NEED_MORE:
                    chunk = connection.recv(65536)
                    assert chunk, "curl closed before its ClientHello was complete"
                    data += chunk
        finally:
            process.kill()
            process.wait(timeout=10)
    return data


def test_python_ssl_hello() -> None:
    raw = python_ssl_hello("www.example.test", ["h2", "http/1.1"])
    hello = parse_ok(raw)
    assert hello.server_name == "www.example.test"
    assert hello.alpn_protocols == (b"h2", b"http/1.1")
    assert TLS13 in hello.supported_versions
    assert hello.highest_version == TLS13
    assert hello.legacy_version == TLS12
    assert hello.compression_methods == (0,)
    assert hello.raw_length == len(raw)
    assert 0 in hello.extensions
    assert 16 in hello.extensions


def test_python_ssl_hello_without_sni_or_alpn() -> None:
    hello = parse_ok(python_ssl_hello(None))
    assert hello.server_name is None
    assert hello.alpn_protocols == ()
    assert 0 not in hello.extensions


def test_pyopenssl_hello() -> None:
    raw = pyopenssl_hello(b"api.example.test", [b"http/1.1"])
    hello = parse_ok(raw)
    assert hello.server_name == "api.example.test"
    assert hello.alpn_protocols == (b"http/1.1",)
    assert hello.raw_length == len(raw)


def test_tlsmitm_upstream_hello_is_parsed() -> None:
    hello = parse_ok(tlsmitm_upstream_hello("Www.Example.Test.", (b"h2", b"spdy/3", b"http/1.1")))
    assert hello.server_name == "www.example.test"
    assert hello.alpn_protocols == (b"h2", b"http/1.1")


@pytest.mark.parametrize(
    ("extra", "alpn"),
    [((), (b"h2", b"http/1.1")), (("--http1.1",), (b"http/1.1",))],
)
def test_curl_hello(extra: tuple[str, ...], alpn: tuple[bytes, ...]) -> None:
    raw = curl_hello(*extra)
    hello = parse_ok(raw)
    assert hello.server_name == "curl.example.test"
    assert hello.alpn_protocols == alpn
    assert TLS13 in hello.supported_versions
    assert hello.compression_methods == (0,)
    assert hello.raw_length == len(raw)


SAMPLE_HELLOS = {
    "python": python_ssl_hello("www.example.test", ["h2", "http/1.1"]),
    "pyopenssl": pyopenssl_hello(b"www.example.test", [b"h2"]),
}


# Hypothesis: names and ALPN lists through real clients, then back out of the parser.

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
dns_names = st.builds(
    lambda parts, tld: ".".join([*parts, tld]),
    st.lists(labels, min_size=1, max_size=4),
    st.from_regex(r"[a-z]{2,8}", fullmatch=True),
)
ascii_protocols = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20
)
binary_protocols = st.binary(min_size=1, max_size=40)
REAL_CLIENT_SETTINGS = settings(max_examples=25, deadline=None)


@REAL_CLIENT_SETTINGS
@given(name=dns_names, alpn=st.lists(ascii_protocols, min_size=0, max_size=5, unique=True))
def test_round_trip_python_ssl(name: str, alpn: list[str]) -> None:
    raw = python_ssl_hello(name, alpn)
    hello = parse_ok(raw)
    assert hello.server_name == name
    assert hello.alpn_protocols == tuple(p.encode() for p in alpn)
    assert hello.raw_length == len(raw)


@REAL_CLIENT_SETTINGS
@given(name=dns_names, alpn=st.lists(binary_protocols, min_size=0, max_size=5, unique=True))
def test_round_trip_pyopenssl(name: str, alpn: list[bytes]) -> None:
    raw = pyopenssl_hello(name.encode(), alpn)
    hello = parse_ok(raw)
    assert hello.server_name == name
    assert hello.alpn_protocols == tuple(alpn)


@settings(max_examples=150, deadline=None)
@given(
    source=st.sampled_from(["python", "pyopenssl"]),
    sizes=st.lists(st.integers(min_value=1, max_value=700), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
    trailing=st.binary(max_size=40),
)
def test_fragmented_records_and_tcp_segments(
    source: str, sizes: list[int], cuts: list[int], trailing: bytes
) -> None:
    """A hello split over records and segments parses the same; prefixes need more; nothing lost."""
    raw = SAMPLE_HELLOS[source]
    reference = parse_ok(raw)
    fragmented = records(message_of(raw), sizes, version=0x0303)
    hello = parse_ok(fragmented + trailing)
    assert hello == ClientHello(
        **{**_fields(reference), "raw_length": len(fragmented)},
    )
    for cut in sorted({c % len(fragmented) for c in cuts} | {0, len(fragmented) - 1}):
        assert parse_client_hello(fragmented[:cut]) is NEED_MORE


def _fields(hello: ClientHello) -> dict[str, object]:
    return {name: getattr(hello, name) for name in ClientHello.__dataclass_fields__}


# Hypothesis: arbitrary well-formed hellos from the encoder.


@dataclass(frozen=True)
class Spec:
    legacy_version: int
    session_id: bytes
    suites: list[int]
    compression: list[int]
    sni: bytes | None
    alpn: list[bytes] | None
    versions: list[int] | None
    extensions: list[tuple[int, bytes]]
    omit: bool


@st.composite
def hello_specs(draw: st.DrawFn) -> Spec:
    sni = draw(
        st.none() | st.binary(min_size=1, max_size=80).map(lambda b: bytes(x & 0x7F for x in b))
    )
    alpn = draw(st.none() | st.lists(binary_protocols, min_size=1, max_size=5))
    versions = draw(st.none() | st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8))
    others = draw(
        st.dictionaries(
            st.integers(0, 0xFFFF).filter(lambda t: t not in (0, 16, 43, 0xFE0D)),
            st.binary(max_size=30),
            max_size=8,
        )
    )
    extensions: list[tuple[int, bytes]] = list(others.items())
    if sni is not None:
        extensions.append((0, sni_ext(sni)))
    if alpn is not None:
        extensions.append((16, alpn_ext(alpn)))
    if versions is not None:
        extensions.append((43, versions_ext(versions)))
    order = list(draw(st.permutations(extensions)))
    return Spec(
        legacy_version=draw(st.integers(0x0300, 0x03FF)),
        session_id=draw(st.binary(max_size=32)),
        suites=draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40)),
        compression=draw(st.lists(st.integers(0, 255), min_size=1, max_size=4)),
        sni=sni,
        alpn=alpn,
        versions=versions,
        extensions=order,
        omit=not order and draw(st.booleans()),
    )


@settings(max_examples=200, deadline=None)
@given(spec=hello_specs(), sizes=st.lists(st.integers(1, 300), max_size=5))
def test_round_trip_encoder(spec: Spec, sizes: list[int]) -> None:
    message = hello_message(
        legacy_version=spec.legacy_version,
        session_id=spec.session_id,
        cipher_suites=spec.suites,
        compression=bytes(spec.compression),
        extensions=spec.extensions,
        omit_extensions=spec.omit,
    )
    raw = records(message, sizes)
    hello = parse_ok(raw)
    assert hello.server_name == (spec.sni.decode() if spec.sni is not None else None)
    assert hello.alpn_protocols == tuple(spec.alpn or ())
    expected = (spec.legacy_version,) if spec.versions is None else tuple(spec.versions)
    assert hello.supported_versions == expected
    assert hello.legacy_version == spec.legacy_version
    assert hello.cipher_suites == tuple(spec.suites)
    assert hello.compression_methods == tuple(spec.compression)
    assert hello.extensions == tuple(t for t, _ in spec.extensions)
    assert hello.raw_length == len(raw)


# Fuzzing: whatever arrives, the answer is clean.


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes(data: bytes) -> None:
    assert_clean(data)


@settings(max_examples=400, deadline=None)
@given(
    body=st.binary(max_size=600),
    record_version=st.integers(0, 0xFFFF),
    declared=st.integers(0, 0xFFFFFF),
)
def test_fuzz_behind_valid_headers(body: bytes, record_version: int, declared: int) -> None:
    message = b"\x01" + declared.to_bytes(3, "big") + body
    assert_clean(b"\x16" + u16(record_version) + u16(len(message)) + message)
    assert_clean(records(message))


@settings(max_examples=400, deadline=None)
@given(
    source=st.sampled_from(sorted(SAMPLE_HELLOS)),
    edits=st.lists(
        st.tuples(
            st.integers(0, 5000), st.integers(0, 255), st.sampled_from(["set", "del", "ins"])
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_fuzz_mutated_real_hellos(source: str, edits: list[tuple[int, int, str]]) -> None:
    data = bytearray(SAMPLE_HELLOS[source])
    for position, value, kind in edits:
        position %= len(data) or 1
        if kind == "set" and data:
            data[position] = value
        elif kind == "del" and data:
            del data[position]
        else:
            data.insert(position, value)
    assert_clean(bytes(data))


# --------------------------------------------------------------------------------------------
# Tables

GOOD = hello_message(extensions=[(0, sni_ext(b"a.test")), (43, versions_ext([TLS13, TLS12]))])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "not_tls"),
        (b"\x17\x03\x03\x00\x10" + b"\x00" * 16, "not_tls"),  # application data first
        (b"\x16\x02\x00", "not_tls"),  # record version 2.x
        (b"\x80\x2e\x01\x00\x02\x00\x15", "unsupported_version"),  # SSL 2.0 CLIENT-HELLO
        (b"\x80\x2e\x04", "not_tls"),  # SSL 2.0 framing, not a hello
        (b"\x16\x03\x01\x00\x00", "malformed"),  # zero-length handshake record
        (b"\x16\x03\x01\x40\x01", "malformed"),  # record longer than 2^14
        (records(b"\x02\x00\x00\x04" + b"\x03\x03\x00\x00"), "malformed"),  # server_hello
        (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", "too_large"),  # 64 KiB hello announced
        (records(GOOD[:20]) + b"\x15\x03\x03\x00\x02\x02\x28", "malformed"),  # alert interleaved
        (records(GOOD[:20]) + b"\x16\x02\x03\x00\x02ab", "malformed"),  # bad 2nd record version
        (records(hello_message(legacy_version=0x0200)), "malformed"),
        (records(hello_message(session_id=b"x" * 33)), "malformed"),
        (records(hello_message(cipher_suites=[])), "malformed"),
        (records(hello_message(compression=b"")), "malformed"),
        (records(hello_message(extensions=[(5, b""), (5, b"")])), "malformed"),  # duplicate
        (records(hello_message(extensions=[(0, sni_ext(b"a.test", b"b.test"))])), "malformed"),
        (records(hello_message(extensions=[(0, sni_ext("é.test".encode()))])), "malformed"),
        (records(hello_message(extensions=[(0, sni_ext(b""))])), "malformed"),
        (records(hello_message(extensions=[(0, vec16(b""))])), "malformed"),  # empty list
        (records(hello_message(extensions=[(0, b"")])), "malformed"),
        (records(hello_message(extensions=[(16, alpn_ext([b"h2", b""]))])), "malformed"),
        (records(hello_message(extensions=[(16, vec16(b""))])), "malformed"),
        (records(hello_message(extensions=[(16, alpn_ext([b"h2"]) + b"x")])), "malformed"),
        (records(hello_message(extensions=[(43, vec8(b"\x03\x04\x03"))])), "malformed"),
        (records(hello_message(extensions=[(43, vec8(b""))])), "malformed"),
        (records(hello_message(raw_extensions=u16(5) + u16(10) + b"abc")), "malformed"),
        (records(hello_message(raw_extensions=u16(5) + b"\x00")), "malformed"),
        (records(GOOD[:1] + (len(GOOD) - 3).to_bytes(3, "big") + GOOD[4:] + b"xx"), "malformed"),
    ],
)
def test_rejections(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason


def test_odd_cipher_suites_length_is_malformed() -> None:
    message = bytearray(hello_message(cipher_suites=[0x1301]))
    offset = 4 + 2 + 32 + 1 + 32
    message[offset : offset + 4] = b"\x00\x03\x13\x01"  # declares 3 bytes of suites
    message[offset + 4 : offset + 4] = b"\x02"
    with pytest.raises(ClientHelloError, match="odd length") as info:
        parse_client_hello(records(bytes(message)))
    assert info.value.reason == "malformed"


def test_unknown_server_name_types_are_skipped() -> None:
    ext = vec16(u8(7) + vec16(b"opaque") + u8(0) + vec16(b"x.test"))
    hello = parse_ok(records(hello_message(extensions=[(0, ext)])))
    assert hello.server_name == "x.test"


def test_hello_without_extensions() -> None:
    hello = parse_ok(records(hello_message(omit_extensions=True, legacy_version=0x0301)))
    assert hello.extensions == ()
    assert hello.supported_versions == (0x0301,)
    assert hello.server_name is None


def test_handshake_header_split_over_tiny_records() -> None:
    raw = records(GOOD, [1, 1, 1, 1, 2])
    hello = parse_ok(raw)
    assert hello.server_name == "a.test"
    assert hello.raw_length == len(raw)
    for cut in range(len(raw)):
        assert parse_client_hello(raw[:cut]) is NEED_MORE


def test_accepts_bytearray_and_memoryview() -> None:
    raw = records(GOOD)
    assert parse_ok(bytearray(raw)) == parse_ok(memoryview(raw)) == parse_ok(raw)


def test_bounded_many_tiny_records() -> None:
    """A valid prefix never makes the caller buffer more than MAX_CLIENT_HELLO_BYTES."""
    message = hello_message(extensions=[(21, b"\x00" * 20000)])  # a 20 KB padded hello
    raw = records(message, [1] * len(message))  # 6 bytes of stream per byte of hello
    assert len(raw) > MAX_CLIENT_HELLO_BYTES
    assert parse_client_hello(raw[: MAX_CLIENT_HELLO_BYTES - 1]) is NEED_MORE
    assert reason_of(raw[:MAX_CLIENT_HELLO_BYTES]) == "too_large"
    assert reason_of(raw) == "too_large"


def test_largest_single_record_hello_is_accepted() -> None:
    message = hello_message(extensions=[(21, b"\x00" * 16000)])
    hello = parse_ok(records(message))
    assert hello.extensions == (21,)


def test_grease_is_kept_but_ignored_by_highest_version() -> None:
    ext = [(43, versions_ext([0x7A7A, TLS13, TLS12]))]
    hello = parse_ok(records(hello_message(cipher_suites=[0x0A0A, 0x1301], extensions=ext)))
    assert hello.supported_versions == (0x7A7A, TLS13, TLS12)
    assert hello.cipher_suites == (0x0A0A, 0x1301)
    assert hello.highest_version == TLS13
    only_grease = parse_ok(records(hello_message(extensions=[(43, versions_ext([0xFAFA]))])))
    assert only_grease.highest_version == TLS12


@pytest.mark.parametrize(
    ("value", "grease"),
    [(0x0A0A, True), (0xFAFA, True), (0x1A1A, True), (0x0A1A, False), (0x1301, False), (0, False)],
)
def test_is_grease(value: int, grease: bool) -> None:
    assert is_grease(value) is grease


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", False),
        (b"\x16", True),
        (b"\x16\x03", True),
        (b"\x16\x03\x01\x02\x00", True),
        (b"\x16\x02", False),
        (b"G", False),
        (b"GET /", False),
        (b"\x80\x2e", False),
    ],
)
def test_looks_like_tls(data: bytes, expected: bool) -> None:
    assert looks_like_tls(data) is expected


def test_need_more_is_a_singleton_with_a_readable_repr() -> None:
    assert parse_client_hello(b"") is NEED_MORE
    assert parse_client_hello(b"\x16\x03") is NEED_MORE
    assert parse_client_hello(b"\x80") is NEED_MORE
    assert repr(NEED_MORE) == "NEED_MORE"


def test_error_messages_say_what_happened() -> None:
    with pytest.raises(ClientHelloError, match="plain HTTP"):
        parse_client_hello(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ClientHelloError, match=r"SSL 2\.0"):
        parse_client_hello(b"\x80\x2e\x01\x00\x02")


@pytest.mark.parametrize(
    "changes",
    [
        {"server_name": ""},
        {"server_name": "é.test"},
        {"alpn_protocols": (b"",)},
        {"supported_versions": ()},
        {"cipher_suites": (0x10000,)},
        {"legacy_version": -1},
        {"compression_methods": (256,)},
        {"raw_length": 3},
    ],
)
def test_client_hello_validates_itself(changes: dict[str, object]) -> None:
    fields = _fields(parse_ok(records(GOOD)))
    with pytest.raises(ValueError, match=r"."):
        ClientHello(**{**fields, **changes})  # type: ignore[arg-type]


def test_benchmark_reports_positive_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_clienthello

    results = bench_clienthello.run(0.1)
    cases = ("python_ssl", "openssl4_pq", "fragmented", "need_more", "not_tls")
    assert set(results) == {
        "python_ssl_hello_bytes",
        "openssl4_pq_hello_bytes",
        *(f"{case}_per_s" for case in cases),
        *(f"{case}_us" for case in cases),
    }
    assert all(value > 0 for value in results.values())


# -- Encrypted Client Hello (draft-ietf-tls-esni §5) ----------------------------------------

ECH = 0xFE0D


def ech_outer(
    *, kdf: int = 0x0001, aead: int = 0x0001, config_id: int = 7, enc: bytes = b"E" * 32
) -> bytes:
    return u8(0) + u16(kdf) + u16(aead) + u8(config_id) + vec16(enc) + vec16(b"P" * 200)


def test_ech_outer_is_reported_with_the_public_name() -> None:
    hello = parse_ok(
        records(
            hello_message(
                extensions=[(0, sni_ext(b"public.example.test")), (ECH, ech_outer(kdf=1, aead=3))]
            )
        )
    )
    assert hello.server_name == "public.example.test"  # the outer SNI: the ECH public name
    assert hello.ech is not None
    assert hello.ech.outer
    assert (hello.ech.config_id, hello.ech.kdf_id, hello.ech.aead_id) == (7, 1, 3)
    assert hello.ech.payload_length == 200
    assert ECH in hello.extensions


def test_ech_inner_marker_is_reported() -> None:
    hello = parse_ok(records(hello_message(extensions=[(ECH, b"\x01")])))
    assert hello.ech is not None
    assert not hello.ech.outer
    assert hello.ech.config_id is None


def test_no_ech_without_the_extension() -> None:
    assert parse_ok(records(hello_message(extensions=[(0, sni_ext(b"a.test"))]))).ech is None


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no type
        b"\x02",  # unknown ECHClientHelloType: illegal_parameter (§7)
        b"\x01\x00",  # bytes after inner
        b"\x00\x00\x01\x00\x01",  # outer cut after the cipher suite
        b"\x00\x00\x01\x00\x01\x07\x00\x00\x00\x00",  # empty payload (payload<1..2^16-1>)
        ech_outer() + b"\x00",  # trailing bytes
    ],
)
def test_malformed_ech_is_malformed(body: bytes) -> None:
    assert reason_of(records(hello_message(extensions=[(ECH, body)]))) == "malformed"


@given(st.binary(max_size=64))
@settings(max_examples=200)
def test_fuzz_ech_extension(body: bytes) -> None:
    assert_clean(records(hello_message(extensions=[(ECH, body)])))
