"""Matrix section D: what tlsmitm offers as a TLS client, and what it does with old servers.

The servers are pyOpenSSL (the OpenSSL 4 inside cryptography's wheel) over memory streams, and
the system OpenSSL through Python's ``ssl`` on 127.0.0.1. Our own ClientHello is read back with
tlsmitm's parser.

Not configurable in this environment, so tested only as "cannot even be set up" plus "never
offered": RC4 (TLS-05) and 3DES (TLS-07) servers -- OpenSSL 4.0 has no such suites ("no cipher
match"); SSLv3/SSLv2 servers (TLS-04); TLS compression (TLS-13, no zlib in the build); DHE servers
(TLS-10..12) would need a finite-field group file, and tlsmitm does not offer DHE suites at all.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL
from pki import Issued, cached_key, good_hierarchy, make_leaf

from tlsmitm._clienthello import ClientHello, is_grease, parse_client_hello
from tlsmitm._tls import (
    ClientTLSError,
    TLSStream,
    UpstreamTLSError,
    server_connection,
    server_context,
    upstream_connection,
    upstream_context,
)

pytestmark = pytest.mark.timeout(15)

HOST = "www.example.test"
HIER = good_hierarchy(HOST)
RSA_LEAF = make_leaf(HIER.intermediate, HOST, key=cached_key("rsa2048"))
UPSTREAM = upstream_context()

# What a current browser and tlsmitm may offer: TLS 1.3 suites, ECDHE + AEAD for TLS 1.2, and
# the RFC 5746 renegotiation SCSV.
ALLOWED_SUITES = {
    0x1301,  # TLS_AES_128_GCM_SHA256
    0x1302,  # TLS_AES_256_GCM_SHA384
    0x1303,  # TLS_CHACHA20_POLY1305_SHA256
    0xC02B,  # ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    0xC02C,  # ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
    0xC02F,  # ECDHE_RSA_WITH_AES_128_GCM_SHA256
    0xC030,  # ECDHE_RSA_WITH_AES_256_GCM_SHA384
    0xCCA8,  # ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    0xCCA9,  # ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
    0x00FF,  # TLS_EMPTY_RENEGOTIATION_INFO_SCSV (RFC 5746)
}
# The list, spelled out (IANA TLS Cipher Suites registry).
FORBIDDEN_SUITES = {
    "NULL": {0x0000, 0x0001, 0x0002, 0x003B, 0xC006, 0xC010, 0xC015},
    "EXPORT": {0x0003, 0x0006, 0x0008, 0x000B, 0x000E, 0x0011, 0x0014, 0x0017, 0x0019},
    "RC4": {0x0004, 0x0005, 0x0018, 0xC007, 0xC011, 0xC016},
    "DES": {0x0009, 0x000C, 0x000F, 0x0012, 0x0015, 0x001A},
    "3DES": {0x000A, 0x000D, 0x0010, 0x0013, 0x0016, 0x001B, 0xC008, 0xC012, 0xC017},
    "anon": {0x0018, 0x001B, 0x0034, 0x003A, 0x006C, 0x006D, 0x00A6, 0x00A7, 0xC018, 0xC019},
    "static RSA": {0x002F, 0x0035, 0x003C, 0x003D, 0x009C, 0x009D, 0xC09C, 0xC09D},
    "CBC-SHA1": {0x0033, 0x0039, 0xC009, 0xC00A, 0xC013, 0xC014},
    "fallback SCSV": {0x5600},  # RFC 7507: only sent on a fallback, and tlsmitm never falls back
}


class Recorder(trio.abc.HalfCloseableStream):
    """Records everything the client sends."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.sent: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()

    def client_hellos(self) -> list[ClientHello]:
        return [h for h in (_try_parse(chunk) for chunk in self.sent) if h is not None]


def _try_parse(data: bytes) -> ClientHello | None:
    with contextlib.suppress(Exception):
        result = parse_client_hello(data)
        if isinstance(result, ClientHello):
            return result
    return None


def server_ctx(
    *,
    versions: tuple[int, int] = (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION),
    ciphers: bytes = b"ALL",
    leaf: Issued = RSA_LEAF,
) -> SSL.Context:
    """A server as old-fashioned as asked, at security level 0 so OpenSSL lets it be."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(versions[0])
    context.set_max_proto_version(versions[1])
    context.set_cipher_list(ciphers + b":@SECLEVEL=0")
    context.use_certificate(leaf.cert)
    context.use_privatekey(leaf.key)
    return context


async def attempt(
    context: SSL.Context,
) -> tuple[TLSStream, Recorder, UpstreamTLSError | None]:
    """One upstream handshake against a server with ``context``."""
    a, b = trio.testing.memory_stream_pair()
    recorder = Recorder(a)
    client = TLSStream(
        recorder,
        upstream_connection(UPSTREAM, server_name=HOST, alpn_offer=(b"h2", b"http/1.1")),
        server_side=False,
    )
    connection = SSL.Connection(context, None)
    connection.set_accept_state()
    server = TLSStream(b, connection, server_side=True)
    failure: UpstreamTLSError | None = None

    async def serve() -> None:
        with contextlib.suppress(ClientTLSError):
            await server.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            await client.do_handshake()
        except UpstreamTLSError as exc:
            failure = exc
    return client, recorder, failure


REFUSED = [
    pytest.param((SSL.TLS1_VERSION, SSL.TLS1_VERSION), b"ALL", "protocol_version", id="TLS-01"),
    pytest.param((SSL.TLS1_1_VERSION, SSL.TLS1_1_VERSION), b"ALL", "protocol_version", id="TLS-02"),
    pytest.param(
        (SSL.TLS1_VERSION, SSL.TLS1_2_VERSION),
        b"NULL-SHA256:NULL-SHA",
        "handshake_failure",
        id="TLS-06-null",
    ),
    pytest.param(
        (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
        b"aNULL",
        "handshake_failure",
        id="TLS-06-anonymous",
    ),
    pytest.param(
        (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
        b"ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA256",
        "handshake_failure",
        id="TLS-08-cbc",
    ),
    pytest.param(
        (SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION),
        b"AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA",
        "handshake_failure",
        id="TLS-09-static-rsa",
    ),
    pytest.param(
        (SSL.TLS1_VERSION, SSL.TLS1_2_VERSION),
        b"ECDHE-RSA-AES128-SHA:AES128-SHA",
        "handshake_failure",
        id="TLS-17-mozilla-old-without-tls13-or-gcm",
    ),
]


@pytest.mark.parametrize(("versions", "ciphers", "alert"), REFUSED)
async def test_weak_servers_are_refused_without_fallback(
    versions: tuple[int, int], ciphers: bytes, alert: str
) -> None:
    client, recorder, failure = await attempt(server_ctx(versions=versions, ciphers=ciphers))
    assert failure is not None, "the handshake must fail"
    assert failure.reason == "tls_protocol"
    assert failure.alert == alert
    assert "never falls back" in str(failure)
    # One ClientHello, offering TLS 1.2 and 1.3 only; nothing is retried on the broken stream.
    hellos = recorder.client_hellos()
    assert len(hellos) == 1
    assert {v for v in hellos[0].supported_versions if not is_grease(v)} <= {0x0303, 0x0304}
    sent_before = len(recorder.sent)
    with pytest.raises(UpstreamTLSError) as again:
        await client.do_handshake()
    assert again.value.reason == "tls_protocol"
    assert len(recorder.sent) == sent_before


@pytest.mark.parametrize(
    "ciphers",
    [pytest.param(b"RC4-SHA:RC4-MD5", id="TLS-05-rc4"), pytest.param(b"DES-CBC3-SHA", id="TLS-07")],
)
def test_rc4_and_3des_servers_cannot_even_be_configured(ciphers: bytes) -> None:
    """OpenSSL 4.0 (cryptography's wheel) has no RC4 or 3DES suites; the hello test covers us."""
    with pytest.raises(SSL.Error, match="no cipher match"):
        server_ctx(versions=(SSL.TLS1_VERSION, SSL.TLS1_2_VERSION), ciphers=ciphers)


ACCEPTED = [
    pytest.param((SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION), b"ALL", "TLSv1.2", id="TLS-03-tls12"),
    pytest.param((SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION), b"ALL", "TLSv1.3", id="TLS-03-tls13"),
    pytest.param(
        (SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION), b"ALL", "TLSv1.3", id="TLS-17-mozilla-modern"
    ),
    pytest.param(
        (SSL.TLS1_VERSION, SSL.TLS1_3_VERSION),
        b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-SHA:"
        b"AES128-SHA:AES256-SHA",
        "TLSv1.3",
        id="TLS-17-mozilla-old",
    ),
    pytest.param(
        (SSL.TLS1_VERSION, SSL.TLS1_2_VERSION),
        b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-SHA:"
        b"AES128-SHA:AES256-SHA",
        "TLSv1.2",
        id="TLS-17-mozilla-old-tls12",
    ),
]


@pytest.mark.parametrize(("versions", "ciphers", "negotiated"), ACCEPTED)
async def test_good_servers_are_accepted_with_strong_parameters(
    versions: tuple[int, int], ciphers: bytes, negotiated: str
) -> None:
    client, _recorder, failure = await attempt(server_ctx(versions=versions, ciphers=ciphers))
    assert failure is None
    assert client.tls_version() == negotiated
    cipher = client.cipher_name()
    assert cipher is not None
    assert cipher.startswith(("TLS_AES_", "TLS_CHACHA20_", "ECDHE-"))
    assert "GCM" in cipher or "CHACHA20" in cipher


async def test_mozilla_intermediate_server_is_accepted() -> None:
    """TLS-17: tlsmitm's own client-facing profile is Mozilla intermediate."""
    a, b = trio.testing.memory_stream_pair()
    client = TLSStream(a, upstream_connection(UPSTREAM, server_name=HOST), server_side=False)
    intermediate = server_connection(
        server_context([HIER.intermediate.cert]), HIER.leaf.cert, HIER.leaf.key, alpn=None
    )
    server = TLSStream(b, intermediate, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    assert client.tls_version() == "TLSv1.3"


async def test_a_weak_upstream_key_still_reaches_the_verifier() -> None:
    """RSA-1024 upstream: the handshake completes so UpstreamVerifier can classify WEAK_KEY."""
    weak = make_leaf(HIER.intermediate, HOST, key=rsa.generate_private_key(65537, 1024))
    client, _recorder, failure = await attempt(server_ctx(leaf=weak))
    assert failure is None
    chain = client.peer_certificate_chain()
    assert chain[0] == weak.cert


# --------------------------------------------------------------------------------------------
# Our ClientHello, read back with our own parser


def _our_hello(server_name: str | None = HOST, alpn: tuple[bytes, ...] = ()) -> ClientHello:
    connection = upstream_connection(UPSTREAM, server_name=server_name, alpn_offer=alpn)
    with pytest.raises(SSL.WantReadError):
        connection.do_handshake()
    hello = parse_client_hello(connection.bio_read(65536))
    assert isinstance(hello, ClientHello)
    return hello


def _pyopenssl_default_hello() -> ClientHello:
    connection = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    connection.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        connection.do_handshake()
    hello = parse_client_hello(connection.bio_read(65536))
    assert isinstance(hello, ClientHello)
    return hello


def _forbidden_in(hello: ClientHello) -> set[str]:
    offered = set(hello.cipher_suites)
    return {name for name, codes in FORBIDDEN_SUITES.items() if offered & codes}


@pytest.mark.parametrize("alpn", [(), (b"http/1.1",), (b"h2", b"http/1.1")])
def test_our_client_hello_is_as_good_as_a_browsers(alpn: tuple[bytes, ...]) -> None:
    hello = _our_hello(alpn=alpn)
    suites = {s for s in hello.cipher_suites if not is_grease(s)}
    assert suites <= ALLOWED_SUITES, sorted(hex(s) for s in suites - ALLOWED_SUITES)
    assert not _forbidden_in(hello)
    assert {0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F} <= suites
    assert set(hello.supported_versions) == {0x0304, 0x0303}  # TLS-01/02/04: nothing older
    assert hello.supported_versions[0] == 0x0304  # TLS 1.3 preferred
    assert hello.legacy_version == 0x0303
    assert hello.compression_methods == (0,)  # TLS-13: never offer compression
    assert hello.server_name == HOST  # SNI always (for names)
    assert 5 in hello.extensions  # status_request: OCSP stapling asked for
    assert 0xFF01 in hello.extensions or 0x00FF in hello.cipher_suites  # RFC 5746
    assert hello.alpn_protocols == alpn


def test_the_forbidden_list_would_catch_a_default_client() -> None:
    """The check above is not vacuous: pyOpenSSL's default client offers such suites."""
    assert {"static RSA", "CBC-SHA1"} <= _forbidden_in(_pyopenssl_default_hello())


# --------------------------------------------------------------------------------------------
# TLS-14: a server without RFC 5746 secure renegotiation


def _strip_renegotiation_info(flight: bytes) -> bytes:
    """Remove renegotiation_info (0xff01) from the ServerHello of a TLS 1.2 server flight."""
    payload = b""
    pos = 0
    while pos < len(flight):
        length = int.from_bytes(flight[pos + 3 : pos + 5], "big")
        payload += flight[pos + 5 : pos + 5 + length]
        pos += 5 + length
    assert payload[0] == 2, "ServerHello first"
    length = int.from_bytes(payload[1:4], "big")
    body, rest = payload[4 : 4 + length], payload[4 + length :]
    fixed = 2 + 32
    fixed += 1 + body[fixed]  # session_id
    fixed += 3  # cipher_suite, compression_method
    extensions = body[fixed + 2 :]
    kept = b""
    i = 0
    while i < len(extensions):
        kind = int.from_bytes(extensions[i : i + 2], "big")
        size = int.from_bytes(extensions[i + 2 : i + 4], "big")
        if kind != 0xFF01:
            kept += extensions[i : i + 4 + size]
        i += 4 + size
    assert len(kept) < len(extensions), "the server did send renegotiation_info"
    body = body[:fixed] + len(kept).to_bytes(2, "big") + kept
    messages = b"\x02" + len(body).to_bytes(3, "big") + body + rest
    return b"".join(
        b"\x16\x03\x03" + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (messages[i : i + 16384] for i in range(0, len(messages), 16384))
    )


async def test_server_without_secure_renegotiation_is_refused() -> None:
    """TLS-14: a ServerHello without renegotiation_info (RFC 5746) ends the handshake."""
    context = server_ctx(versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION), leaf=HIER.leaf)
    client_near, legacy_near = trio.testing.memory_stream_pair()
    legacy_far, server_far = trio.testing.memory_stream_pair()
    client = TLSStream(
        client_near, upstream_connection(UPSTREAM, server_name=HOST), server_side=False
    )
    connection = SSL.Connection(context, None)
    connection.set_accept_state()
    server = TLSStream(server_far, connection, server_side=True)

    async def legacy_box() -> None:
        await legacy_far.send_all(await legacy_near.receive_some())
        flight = b""
        while b"\x0e\x00\x00\x00" not in flight:  # ServerHelloDone
            flight += await legacy_far.receive_some()
        await legacy_near.send_all(_strip_renegotiation_info(flight))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await legacy_far.send_all(await legacy_near.receive_some())
        await legacy_far.aclose()

    async def serve() -> None:
        with contextlib.suppress(ClientTLSError):
            await server.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(legacy_box)
        nursery.start_soon(serve)
        with pytest.raises(UpstreamTLSError) as info:
            await client.do_handshake()
    assert info.value.reason == "tls_protocol"
    assert "unsafe legacy renegotiation" in str(info.value)


# --------------------------------------------------------------------------------------------
# The system OpenSSL as a TLS 1.0-only server on 127.0.0.1 (TLS-01, TLS-16)


@contextlib.contextmanager
def counting_server(context: ssl.SSLContext) -> Iterator[tuple[int, list[int]]]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            raw.settimeout(5)
            with raw, contextlib.suppress(OSError):
                context.wrap_socket(raw, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
async def test_real_tls10_server_gets_one_attempt_and_no_fallback(tmp_path: Path) -> None:
    cert, key = RSA_LEAF.write(tmp_path, "old")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(cert, key)
    with counting_server(context) as (port, accepted):
        transport = await trio.open_tcp_stream("127.0.0.1", port)
        client = TLSStream(
            transport, upstream_connection(UPSTREAM, server_name=HOST), server_side=False
        )
        with pytest.raises(UpstreamTLSError) as info, trio.fail_after(10):
            await client.do_handshake()
        await client.aclose()
        await trio.sleep(1)  # time for a retry to show up, if there were one
    assert info.value.reason == "tls_protocol"
    assert info.value.alert == "protocol_version"
    assert accepted == [1]
