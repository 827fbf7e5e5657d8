"""The TLS engine: TLSStream over memory streams and real sockets, and the context factories."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import ssl
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL, crypto
from pki import Hierarchy, cached_key, good_hierarchy, make_leaf, make_root

from tlsmitm import _tls as tls_module
from tlsmitm._clienthello import NEED_MORE, ClientHello, parse_client_hello
from tlsmitm._errors import ClientError, ConfigurationError, TlsMitmError, UpstreamError
from tlsmitm._names import InvalidHostName
from tlsmitm._tls import (
    CLOSE_NOTIFY_TIMEOUT,
    RELAYABLE_ALPN,
    ClientTLSError,
    TLSError,
    TLSStream,
    UpstreamTLSError,
    _ConnectionState,
    _on_info,
    _RecordBoundary,
    close_at_once,
    keylog_file_writer,
    release_bio_buffers,
    server_connection,
    server_context,
    upstream_connection,
    upstream_context,
)

pytestmark = pytest.mark.timeout(15)  # a regression here tends to hang, not fail

HOST = "www.example.test"
HIER: Hierarchy = good_hierarchy(HOST)
LEAF_X509 = crypto.X509.from_cryptography(HIER.leaf.cert)
LEAF_KEY = crypto.PKey.from_cryptography_key(HIER.leaf.key)
SERVER_CTX = server_context([HIER.intermediate.cert])
UPSTREAM_CTX = upstream_context()
TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}


@pytest.fixture(params=["scratch", "by_record"])
def decrypt_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a receiving test on both ways of decrypting: SSL_read into the shared scratch
    buffer (pyOpenSSL's binding), and ``Connection.recv`` (the fallback without it); the
    fallback also drains outgoing ciphertext without asking the BIO how much it holds."""
    assert tls_module._SSL_READ is not None  # the pinned pyOpenSSL has the fast path
    assert tls_module._BIO_HELD is not None
    if request.param == "by_record":
        monkeypatch.setattr(tls_module, "_SSL_READ", None)
        monkeypatch.setattr(tls_module, "_BIO_HELD", None)
    return str(request.param)


def tls12_server_context(**kw: object) -> SSL.Context:
    context = server_context([HIER.intermediate.cert], **kw)  # type: ignore[arg-type]
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    return context


def server_stream(
    transport: trio.abc.Stream,
    *,
    alpn: bytes | None = None,
    context: SSL.Context = SERVER_CTX,
    **kw: object,
) -> TLSStream:
    connection = server_connection(context, LEAF_X509, LEAF_KEY, alpn=alpn)
    return TLSStream(transport, connection, server_side=True, **kw)  # type: ignore[arg-type]


def client_stream(
    transport: trio.abc.Stream,
    *,
    server_name: str | None = HOST,
    alpn_offer: Sequence[bytes] = (),
    session: SSL.Session | None = None,
    context: SSL.Context = UPSTREAM_CTX,
    **kw: object,
) -> TLSStream:
    connection = upstream_connection(
        context, server_name=server_name, alpn_offer=alpn_offer, session=session
    )
    return TLSStream(transport, connection, server_side=False, **kw)  # type: ignore[arg-type]


def raw_client_stream(transport: trio.abc.Stream, context: SSL.Context) -> TLSStream:
    """A client-side TLSStream over a hand-made context (a peer tlsmitm would never be)."""
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    return TLSStream(transport, connection, server_side=False)


def raw_server_stream(transport: trio.abc.Stream, context: SSL.Context) -> TLSStream:
    connection = SSL.Connection(context, None)
    connection.set_accept_state()
    return TLSStream(transport, connection, server_side=True)


def raw_server_context(**versions: int) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(HIER.leaf.cert)
    context.use_privatekey(HIER.leaf.key)
    context.add_extra_chain_cert(HIER.intermediate.cert)
    if "max" in versions:
        context.set_max_proto_version(versions["max"])
    return context


async def handshake_both(*streams: TLSStream) -> None:
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(stream.do_handshake)


async def connected_pair(
    server_context_: SSL.Context = SERVER_CTX, **client_kw: object
) -> tuple[TLSStream, TLSStream]:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = client_stream(client_transport, **client_kw)  # type: ignore[arg-type]
    server = server_stream(server_transport, context=server_context_)
    await handshake_both(client, server)
    return client, server


class Recorder(trio.abc.HalfCloseableStream):
    """A transport that records what passes through it, for assertions."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.sent: list[bytes] = []
        self.receive_sizes: list[int | None] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.receive_sizes.append(max_bytes)
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


class NoHalfClose(trio.abc.Stream):
    """A transport without send_eof (like a stream tlsmitm does not know)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


class BreaksOnReceive(NoHalfClose):
    """A transport whose receive fails like a reset TCP connection."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("connection reset by peer")


# --------------------------------------------------------------------------------------------
# trio's generic stream conformance suite


@pytest.mark.usefixtures("decrypt_path")
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
async def test_check_half_closeable_stream(version: str) -> None:
    context = tls12_server_context() if version == "TLSv1.2" else SERVER_CTX

    def make(pair: tuple[trio.abc.Stream, trio.abc.Stream]) -> tuple[TLSStream, TLSStream]:
        return client_stream(pair[0]), server_stream(pair[1], context=context)

    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        return make(trio.testing.memory_stream_pair())

    async def clogged_stream_maker() -> tuple[TLSStream, TLSStream]:
        client, server = make(trio.testing.lockstep_stream_pair())
        # Handshake first: otherwise a receive meant to unclog the other side would itself
        # have to send handshake bytes into the clogged transport.
        await handshake_both(client, server)
        return client, server

    await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)
    client, server = await stream_maker()
    await handshake_both(client, server)
    assert client.tls_version() == version
    await client.aclose()
    await server.aclose()


async def test_check_two_way_stream_over_a_transport_without_half_close() -> None:
    async def stream_maker() -> tuple[TLSStream, TLSStream]:
        a, b = trio.testing.memory_stream_pair()
        return client_stream(NoHalfClose(a)), server_stream(NoHalfClose(b))

    await trio.testing.check_two_way_stream(stream_maker, None)


async def test_send_eof_without_transport_half_close_is_close_notify_only() -> None:
    a, b = trio.testing.memory_stream_pair()
    client, server = client_stream(NoHalfClose(a)), server_stream(NoHalfClose(b))
    await handshake_both(client, server)
    await client.send_eof()
    assert await server.receive_some() == b""
    assert await server.receive_some() == b""  # and stays at the end
    await server.send_all(b"after the client's close_notify")
    assert await client.receive_some() == b"after the client's close_notify"
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")


# --------------------------------------------------------------------------------------------
# Real sockets and real peers (stdlib ssl, the system OpenSSL)


def stdlib_server_context(hierarchy: Hierarchy, tmp_path: Path) -> ssl.SSLContext:
    cert, key = hierarchy.leaf.write(tmp_path, "origin")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@contextlib.contextmanager
def stdlib_server(
    context: ssl.SSLContext, handler: Callable[[ssl.SSLSocket], None], connections: int = 1
) -> Iterator[tuple[int, list[BaseException]]]:
    """A stdlib TLS server on 127.0.0.1 in a thread, serving ``connections`` connections."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            for _ in range(connections):
                raw, _ = listener.accept()
                raw.settimeout(10)
                with context.wrap_socket(raw, server_side=True) as tls:
                    handler(tls)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], errors
    finally:
        thread.join(timeout=10)
        listener.close()


async def test_real_socket_stdlib_client_against_server_side(tmp_path: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    (tmp_path / "root.pem").write_bytes(HIER.root.pem)
    seen: dict[str, object] = {}

    def browser() -> None:
        context = ssl.create_default_context(cafile=str(tmp_path / "root.pem"))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            seen["alpn"] = tls.selected_alpn_protocol()
            seen["version"] = tls.version()
            tls.sendall(b"ping")
            seen["reply"] = tls.recv(100)
            seen["eof"] = tls.recv(100)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, browser)
        transport = await listeners[0].accept()
        server = server_stream(transport, alpn=b"http/1.1", handshake_timeout=10)
        await server.do_handshake()
        assert await server.receive_some(4) == b"ping"
        await server.send_all(b"pong")
        await server.aclose()
    await listeners[0].aclose()
    # The stdlib client verified the chain to the root: the intermediate was sent.
    assert seen == {"alpn": "http/1.1", "version": "TLSv1.3", "reply": b"pong", "eof": b""}


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_real_socket_stdlib_server_and_session_resumption(
    tmp_path: Path, version: ssl.TLSVersion
) -> None:
    context = stdlib_server_context(HIER, tmp_path)
    context.maximum_version = version
    context.set_alpn_protocols(["http/1.1"])
    names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,func-returns-value]
    reused: list[bool] = []

    def handler(tls: ssl.SSLSocket) -> None:
        reused.append(tls.session_reused)
        tls.sendall(b"hello " + tls.recv(100))
        tls.recv(100)  # our close_notify

    upstream = upstream_context()
    with stdlib_server(context, handler, connections=2) as (port, errors):
        session = None
        for attempt in range(2):
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            stream = client_stream(
                transport, alpn_offer=(b"h2", b"http/1.1"), session=session, context=upstream
            )
            with trio.fail_after(10):
                await stream.do_handshake()
                await stream.send_all(b"tlsmitm")
                assert await stream.receive_some() == b"hello tlsmitm"
            assert stream.selected_alpn() == b"http/1.1"
            assert stream.tls_version() == version.name.replace("_", ".")
            assert stream.session_reused() is (attempt == 1)
            # Resumed or not, the chain is there for UpstreamVerifier.
            assert [c.subject for c in stream.peer_certificate_chain()] == [
                HIER.leaf.cert.subject,
                HIER.intermediate.cert.subject,
            ]
            session = stream.session()
            assert session is not None
            await stream.aclose()
    assert not errors, errors
    assert reused == [False, True]
    assert names == [HOST, HOST]


# --------------------------------------------------------------------------------------------
# Renegotiation (matrix TLS-14)


async def test_server_side_refuses_client_renegotiation() -> None:
    """The client's renegotiation gets no_renegotiation; OpenSSL's client then gives up."""
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)  # renegotiation allowed here
    client_context.set_max_proto_version(SSL.TLS1_2_VERSION)
    a, b = trio.testing.memory_stream_pair()
    client = raw_client_stream(a, client_context)
    server = server_stream(b)
    await handshake_both(client, server)
    assert client.connection.renegotiate()

    async def renegotiating_client() -> None:
        with pytest.raises(UpstreamTLSError, match="no renegotiation"):
            await client.send_all(b"data after a renegotiation attempt")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(renegotiating_client)
        with pytest.raises(ClientTLSError) as info:
            await server.receive_some()
    assert info.value.alert == "handshake_failure"  # the client's answer to our refusal
    assert server.connection.total_renegotiations() == 0


async def test_upstream_side_ignores_hello_request() -> None:
    a, b = trio.testing.memory_stream_pair()
    client = client_stream(a)
    server = raw_server_stream(b, raw_server_context(max=SSL.TLS1_2_VERSION))
    await handshake_both(client, server)
    assert server.connection.renegotiate()
    await server.send_all(b"after a HelloRequest")
    assert await client.receive_some() == b"after a HelloRequest"
    await client.send_all(b"still talking")
    with pytest.raises(ClientTLSError) as info:  # the server's renegotiation failed
        await server.receive_some()
    assert "no renegotiation" in str(info.value)
    assert client.connection.total_renegotiations() == 0


# --------------------------------------------------------------------------------------------
# Timeouts, vanishing peers, truncation


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    _silent, transport = trio.testing.memory_stream_pair()
    server = server_stream(transport, handshake_timeout=5)
    start = trio.current_time()
    with pytest.raises(ClientTLSError) as info:
        await server.do_handshake()
    assert info.value.reason == "tls_handshake_timeout"
    assert trio.current_time() - start == pytest.approx(5)
    with pytest.raises(ClientTLSError) as again:
        await server.send_all(b"x")
    assert again.value.reason == "tls_handshake_timeout"
    await server.aclose()


async def test_caller_timeout_breaks_the_stream(autojump_clock: trio.testing.MockClock) -> None:
    transport, _silent = trio.testing.memory_stream_pair()
    client = client_stream(transport)
    with pytest.raises(trio.TooSlowError), trio.fail_after(3):
        await client.do_handshake()
    with pytest.raises(UpstreamTLSError) as info:
        await client.do_handshake()
    assert info.value.reason == "tls_broken"
    await client.aclose()


async def test_client_vanishing_mid_handshake_is_a_client_error() -> None:
    hello = _python_client_hello()
    a, b = trio.testing.memory_stream_pair()
    server = server_stream(b)
    await a.send_all(hello[: len(hello) // 2])
    await a.aclose()
    with pytest.raises(ClientTLSError) as info:
        await server.do_handshake()
    assert info.value.reason == "tls_handshake"
    assert "client closed the connection" in str(info.value)
    assert isinstance(info.value, ClientError)
    await server.aclose()


async def test_upstream_vanishing_mid_handshake_is_an_upstream_error() -> None:
    a, b = trio.testing.memory_stream_pair()
    client = client_stream(a)

    async def hang_up() -> None:
        await b.receive_some()
        await b.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang_up)
        with pytest.raises(UpstreamTLSError) as info:
            await client.do_handshake()
    assert info.value.reason == "tls_handshake"
    assert isinstance(info.value, UpstreamError)


async def test_reset_transport_is_mapped() -> None:
    a, _b = trio.testing.memory_stream_pair()
    client = client_stream(BreaksOnReceive(a))
    with pytest.raises(UpstreamTLSError) as info:
        await client.do_handshake()
    assert info.value.reason == "tls_handshake"
    assert isinstance(info.value.__cause__, trio.BrokenResourceError)


async def test_reset_after_handshake_is_connection_lost() -> None:
    a, b = trio.testing.memory_stream_pair()

    class Switchable(NoHalfClose):
        broken = False

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            if self.broken:
                raise trio.BrokenResourceError("reset")
            return await super().receive_some(max_bytes)

    transport = Switchable(a)
    client, server = client_stream(transport), server_stream(b)
    await handshake_both(client, server)
    transport.broken = True
    with pytest.raises(UpstreamTLSError) as info:
        await client.receive_some()
    assert info.value.reason == "connection_lost"


async def _server_writes_raw(server: TLSStream, plaintext: bytes) -> bytes:
    """Ciphertext for ``plaintext``, made by the server's connection but not sent."""
    server.connection.send(plaintext)
    return server.connection.bio_read(65536)


@pytest.mark.usefixtures("decrypt_path")
async def test_end_of_transport_at_a_record_boundary_is_a_clean_end() -> None:
    client, server = await connected_pair()
    await server.send_all(b"first")  # also delivers the delayed TLS 1.3 tickets
    assert await client.receive_some() == b"first"
    record = await _server_writes_raw(server, b"last words")
    await server.transport_stream.send_all(record)
    await server.transport_stream.aclose()  # no close_notify, as many HTTPS servers do
    assert await client.receive_some() == b"last words"
    assert await client.receive_some() == b""
    assert await client.receive_some() == b""
    with pytest.raises(UpstreamTLSError) as info:  # the server is gone
        await client.send_all(b"too late")
    assert info.value.reason == "connection_lost"
    assert info.value.alert_sent is None
    await client.aclose()


@pytest.mark.usefixtures("decrypt_path")
async def test_end_of_transport_inside_a_record_is_truncation() -> None:
    client, server = await connected_pair()
    await server.send_all(b"first")
    assert await client.receive_some() == b"first"
    record = await _server_writes_raw(server, b"cut short")
    await server.transport_stream.send_all(record[:-4])
    await server.transport_stream.aclose()
    with pytest.raises(UpstreamTLSError) as info:
        await client.receive_some()
    assert info.value.reason == "tls_truncated"
    with pytest.raises(UpstreamTLSError):
        await client.receive_some()


@pytest.mark.usefixtures("decrypt_path")
async def test_truncation_after_a_refill_of_many_records() -> None:
    """A refill is fed to OpenSSL piece by piece; the framing check still sees the cut record."""
    client, server = await connected_pair()
    await server.send_all(b"first")
    assert await client.receive_some() == b"first"
    payload = os.urandom(60_000)  # four records, more than one 32 KiB feed piece
    ciphertext = b"".join(
        [
            await _server_writes_raw(server, payload[i : i + 16384])
            for i in range(0, len(payload), 16384)
        ]
    )
    cut = await _server_writes_raw(server, b"cut short")
    await server.transport_stream.send_all(ciphertext + cut[:-4])
    await server.transport_stream.aclose()
    # Everything before the cut arrives first (in one call: it all came in one refill).
    assert await client.receive_some(1_000_000) == payload
    with pytest.raises(UpstreamTLSError) as info:
        await client.receive_some(1_000_000)
    assert info.value.reason == "tls_truncated"


@pytest.mark.usefixtures("decrypt_path")
async def test_one_refill_serves_many_records() -> None:
    """Ciphertext already in the transport is read at once, not one record per transport read."""
    a, b = trio.testing.memory_stream_pair()
    recorder = Recorder(a)
    client, server = client_stream(recorder), server_stream(b)
    await handshake_both(client, server)
    await server.send_all(b"tickets")
    assert await client.receive_some() == b"tickets"
    payload = os.urandom(100_000)  # seven records, about 100 KiB of ciphertext
    await server.send_all(payload)  # buffered by the memory stream
    reads_before = len(recorder.receive_sizes)
    assert await client.receive_some(1_000_000) == payload
    assert len(recorder.receive_sizes) == reads_before + 1
    assert recorder.receive_sizes[-1] == 128 * 1024  # the default refill
    assert client.is_idle()


async def receive_exactly(stream: TLSStream, size: int) -> bytes:
    received = b""
    while len(received) < size:
        received += await stream.receive_some()
    return received


def _bios(stream: TLSStream) -> tuple[object, object]:
    return stream.connection._into_ssl, stream.connection._from_ssl  # type: ignore[attr-defined]


async def test_an_idle_stream_gives_back_its_handshake_bio_buffers() -> None:
    """Memory: after the handshake, the first wait for the transport swaps in new, empty memory
    BIOs (the old ones keep the size of the handshake flights, 5-6 KiB per intercepted
    connection); data still flows both ways, in order, afterwards."""
    client, server = await connected_pair()
    handshake_bios = _bios(client), _bios(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"ping")
        assert await client.receive_some() == b"ping"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"pong")
        assert await server.receive_some() == b"pong"
    assert _bios(client) != handshake_bios[0]
    assert _bios(server) != handshake_bios[1]
    swapped = _bios(client), _bios(server)
    payload = os.urandom(50_000)
    for sender, receiver in ((server, client), (client, server)):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_all, payload)
            assert await receive_exactly(receiver, len(payload)) == payload
    assert (_bios(client), _bios(server)) == swapped  # once per connection, not per read
    # Nor does a stream keep an Event of its own for its finished handshake.
    assert client._handshake_done is server._handshake_done
    assert client._handshake_done.is_set()
    assert client.is_idle()
    assert server.is_idle()


def test_release_bio_buffers_keeps_bios_that_hold_data() -> None:
    holding = SSL.Connection(SERVER_CTX, None)
    holding.bio_write(b"\x16\x03\x01")
    assert not release_bio_buffers(holding)
    fresh = SSL.Connection(UPSTREAM_CTX, None)
    assert release_bio_buffers(fresh)
    fresh.set_connect_state()
    with pytest.raises(SSL.WantReadError):
        fresh.do_handshake()
    assert fresh.bio_read(65536).startswith(b"\x16\x03")  # pyOpenSSL uses the new BIOs


@pytest.mark.usefixtures("decrypt_path")
async def test_corrupt_record_is_a_tls_error() -> None:
    client, server = await connected_pair()
    await server.send_all(b"first")
    assert await client.receive_some() == b"first"
    record = bytearray(await _server_writes_raw(server, b"tampered"))
    record[-1] ^= 1
    await server.transport_stream.send_all(bytes(record))
    with pytest.raises(UpstreamTLSError) as info:
        await client.receive_some()
    assert info.value.reason == "tls_error"
    assert info.value.alert_sent == "bad_record_mac"


@pytest.mark.usefixtures("decrypt_path")
async def test_close_notify_then_data_is_ordered() -> None:
    client, server = await connected_pair()
    await server.send_all(b"a")
    await server.send_all(b"b")
    await server.aclose()
    received = b""
    while chunk := await client.receive_some():
        received += chunk
    assert received == b"ab"


@pytest.mark.usefixtures("decrypt_path")
@pytest.mark.parametrize("max_bytes", [1, 1000, 16384, 65536, 300_000, None])
async def test_bulk_plaintext_arrives_intact_whatever_the_read_size(max_bytes: int | None) -> None:
    """8 MiB in writes of odd sizes, read in pieces of at most ``max_bytes`` (more than the
    256 KiB scratch buffer too): every byte, in order, and no read longer than asked."""
    client, server = await connected_pair(max_refill_bytes=256 * 1024)
    payload = os.urandom(8 * 1024 * 1024 + 12345 if (max_bytes or 1000) >= 1000 else 50_000)
    received = bytearray()
    sizes: list[int] = []

    async def send() -> None:
        view = memoryview(payload)
        for start in range(0, len(view), 99_991):
            await server.send_all(view[start : start + 99_991])
        await server.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while chunk := await client.receive_some(max_bytes):
            assert isinstance(chunk, bytes)
            sizes.append(len(chunk))
            received += chunk
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert max(sizes) <= (max_bytes or 256 * 1024)
    assert max(sizes) <= 256 * 1024  # the scratch buffer (or 16 records) bounds one read


@pytest.mark.parametrize("whole_slices", [True, False])
async def test_large_writes_are_encrypted_a_slice_per_call_and_arrive_intact(
    whole_slices: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLSStream turns pyOpenSSL's partial-write mode off (one SSL_write per 64 KiB slice, not
    per record); without the binding it stays on. Either way every byte arrives, in order."""
    if not whole_slices:
        monkeypatch.setattr(tls_module, "_CLEAR_MODE", None)
    client, server = await connected_pair()
    calls = 0
    real_send = server.connection.send

    def counting_send(data: bytes | memoryview, flags: int = 0) -> int:
        nonlocal calls
        calls += 1
        return real_send(data, flags)

    monkeypatch.setattr(server.connection, "send", counting_send)
    payloads = [os.urandom(n) for n in (1_000_003, 65_536, 1, 300_000)]
    received = bytearray()

    async def send() -> None:
        for payload in payloads:
            await server.send_all(payload)
        await server.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while chunk := await client.receive_some():
            received += chunk
    assert hashlib.sha256(received).digest() == hashlib.sha256(b"".join(payloads)).digest()
    records = sum(-(-len(p) // 16384) for p in payloads)
    slices = sum(-(-len(p) // 65536) for p in payloads)
    assert calls == (slices if whole_slices else records)


async def test_streams_sharing_the_scratch_buffer_keep_their_own_bytes() -> None:
    """Two connections decrypting in turn through the one scratch buffer of the thread."""
    pairs = [await connected_pair() for _ in range(2)]
    payloads = [os.urandom(200_000), os.urandom(150_000)]
    for (_, server), payload in zip(pairs, payloads, strict=True):
        await server.send_all(payload)
    received = [bytearray(), bytearray()]
    while any(len(r) < len(p) for r, p in zip(received, payloads, strict=True)):
        for (client, _), payload, into in zip(pairs, payloads, received, strict=True):
            if len(into) < len(payload):
                into += await client.receive_some(40_000)
    assert [bytes(r) for r in received] == payloads


@given(
    lengths=st.lists(st.integers(0, 20_000), max_size=8),
    tail=st.integers(0, 20_004),
    cuts=st.lists(st.integers(0, 200_000), max_size=12),
)
def test_record_boundary_tracking_matches_a_byte_by_byte_reading(
    lengths: list[int], tail: int, cuts: list[int]
) -> None:
    """Records (headers with random lengths) cut into random pieces: the framing check says
    "at a boundary" exactly where the stream holds whole records only."""
    stream = b"".join(b"\x17\x03\x03" + n.to_bytes(2, "big") + bytes(n) for n in lengths)
    partial = b"\x17\x03\x03\xff\x00" + bytes(65280)
    stream += partial[:tail]  # then maybe part of one more record
    boundary = _RecordBoundary()
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, stop in itertools.pairwise(points):
        boundary.feed(memoryview(stream)[start:stop] if start % 2 else stream[start:stop])
    assert boundary.at_boundary is (tail == 0)


# --------------------------------------------------------------------------------------------
# Peeked ClientHello replay


def _python_client_hello() -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("segment", [7, 100, 65536])
async def test_peeked_hello_is_replayed_into_the_handshake(segment: int) -> None:
    a, b = trio.testing.memory_stream_pair()
    client = client_stream(a, alpn_offer=(b"h2", b"http/1.1"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        peeked = b""
        result: ClientHello | object = NEED_MORE
        while result is NEED_MORE:
            peeked += await b.receive_some(segment)
            result = parse_client_hello(peeked)
        assert isinstance(result, ClientHello)
        assert result.server_name == HOST
        assert result.alpn_protocols == (b"h2", b"http/1.1")
        assert result.raw_length <= len(peeked)
        server = server_stream(b, alpn=b"h2", initial_data=peeked)
        await server.do_handshake()
    assert client.selected_alpn() == b"h2"
    await client.send_all(b"nothing was lost")
    assert await server.receive_some() == b"nothing was lost"


# --------------------------------------------------------------------------------------------
# ALPN (matrix MIR-03)


def alpn_choosing_server_context(choice: Callable[[list[bytes]], bytes | None]) -> SSL.Context:
    context = raw_server_context()

    def select(_conn: SSL.Connection, offered: list[bytes]) -> bytes:
        chosen = choice(offered)
        return SSL.NO_OVERLAPPING_PROTOCOLS if chosen is None else chosen  # type: ignore[return-value]

    context.set_alpn_select_callback(select)  # type: ignore[arg-type]
    return context


@pytest.mark.parametrize(
    ("client_offer", "upstream_prefers", "expected"),
    [
        ((b"h2", b"http/1.1"), b"http/1.1", b"http/1.1"),
        ((b"h2", b"http/1.1"), b"h2", b"h2"),
        ((b"http/1.1",), b"h2", None),  # upstream wants h2, the client never offered it
        ((b"h2", b"http/1.1"), None, None),  # upstream without ALPN: HTTP/1.1 both ways
        ((), b"http/1.1", None),
    ],
)
async def test_alpn_downstream_equals_upstream(
    client_offer: tuple[bytes, ...], upstream_prefers: bytes | None, expected: bytes | None
) -> None:
    # Upstream: a server with its own preference.
    def choose(offered: list[bytes]) -> bytes | None:
        if upstream_prefers is not None and upstream_prefers in offered:
            return upstream_prefers
        return None

    up_a, up_b = trio.testing.memory_stream_pair()
    upstream = client_stream(up_a, alpn_offer=client_offer)
    origin = raw_server_stream(up_b, alpn_choosing_server_context(choose))
    await handshake_both(upstream, origin)
    assert upstream.selected_alpn() == expected
    # Downstream: the browser offers client_offer and gets exactly upstream's choice.
    down_a, down_b = trio.testing.memory_stream_pair()
    browser = client_stream(down_a, alpn_offer=client_offer)
    downstream = server_stream(down_b, alpn=upstream.selected_alpn())
    await handshake_both(browser, downstream)
    assert browser.selected_alpn() == downstream.selected_alpn() == expected


async def test_server_side_never_selects_a_protocol_the_client_did_not_offer() -> None:
    a, b = trio.testing.memory_stream_pair()
    browser = client_stream(a, alpn_offer=(b"http/1.1",))
    downstream = server_stream(b, alpn=b"h2")
    await handshake_both(browser, downstream)
    assert browser.selected_alpn() is None
    assert downstream.selected_alpn() is None


def test_upstream_alpn_offer_is_filtered_to_relayable_protocols() -> None:
    assert RELAYABLE_ALPN == (b"h2", b"http/1.1")
    hello = _upstream_hello(alpn_offer=(b"spdy/3", b"http/1.1", b"h2", b"http/1.1", b"h3"))
    assert hello.alpn_protocols == (b"http/1.1", b"h2")
    assert 16 not in _upstream_hello(alpn_offer=(b"spdy/3",)).extensions


# --------------------------------------------------------------------------------------------
# SNI, certificates, OCSP, client certificates


def _upstream_hello(
    server_name: str | None = HOST, alpn_offer: Sequence[bytes] = ()
) -> ClientHello:
    connection = upstream_connection(UPSTREAM_CTX, server_name=server_name, alpn_offer=alpn_offer)
    with pytest.raises(SSL.WantReadError):
        connection.do_handshake()
    result = parse_client_hello(connection.bio_read(65536))
    assert isinstance(result, ClientHello)
    return result


@pytest.mark.parametrize(
    ("name", "sent"),
    [
        ("WWW.Example.TEST.", "www.example.test"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("192.0.2.1", None),  # RFC 6066 §3: no IP literals in SNI
        ("[2001:db8::1]", None),
        (None, None),
    ],
)
def test_upstream_sni(name: str | None, sent: str | None) -> None:
    hello = _upstream_hello(server_name=name)
    assert hello.server_name == sent
    assert 5 in hello.extensions  # status_request, always


def test_upstream_sni_rejects_invalid_names() -> None:
    with pytest.raises(InvalidHostName):
        upstream_connection(UPSTREAM_CTX, server_name="bad..name")


async def test_accessors_before_and_after_the_handshake() -> None:
    a, b = trio.testing.memory_stream_pair()
    client, server = client_stream(a), server_stream(b)
    for stream in (client, server):
        assert stream.selected_alpn() is None
        assert stream.peer_certificate_chain() == []
        assert stream.tls_version() is None
        assert stream.cipher_name() is None
        assert stream.session() is None
        assert not stream.client_certificate_requested()
        assert not stream.session_reused()
    await handshake_both(client, server)
    assert [c.subject for c in client.peer_certificate_chain()] == [
        HIER.leaf.cert.subject,
        HIER.intermediate.cert.subject,
    ]
    assert server.peer_certificate_chain() == []  # tlsmitm never asks clients for certificates
    assert client.tls_version() == server.tls_version() == "TLSv1.3"
    assert client.cipher_name() in TLS13_SUITES
    assert client.stapled_ocsp() is None
    assert not client.client_certificate_requested()
    assert not client.session_reused()
    assert client.transport_stream is a
    assert client.server_side is False


async def test_stapled_ocsp_is_collected() -> None:
    context = raw_server_context()
    requests: list[bool] = []

    # OpenSSL 4 only staples what parses as an OCSPResponse; its content is judged later, by
    # UpstreamVerifier.
    response = ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.TRY_LATER
    ).public_bytes(serialization.Encoding.DER)

    def staple(_conn: SSL.Connection, _data: object) -> bytes:
        requests.append(True)
        return response

    context.set_ocsp_server_callback(staple)
    a, b = trio.testing.memory_stream_pair()
    client, server = client_stream(a), raw_server_stream(b, context)
    await handshake_both(client, server)
    assert requests == [True]
    assert client.stapled_ocsp() == response


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
async def test_client_certificate_request_is_detected(version: int) -> None:
    context = raw_server_context(max=version)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *_: True)
    a, b = trio.testing.memory_stream_pair()
    client, server = client_stream(a), raw_server_stream(b, context)

    async def handshake_then_read() -> None:
        await client.do_handshake()
        # TLS 1.3: the client finishes first and learns of the refusal on its first read.
        await client.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_client_error, server)
        with pytest.raises(UpstreamTLSError) as info:
            await handshake_then_read()
    assert client.client_certificate_requested()
    if version == SSL.TLS1_2_VERSION:
        assert info.value.reason == "tls_client_certificate"
        assert info.value.alert == "handshake_failure"
    else:
        assert info.value.reason == "tls_error"
        assert info.value.alert == "certificate_required"
    # The server proved it holds the key before asking, so its chain can be judged.
    assert [c.subject for c in client.peer_certificate_chain()] == [
        HIER.leaf.cert.subject,
        HIER.intermediate.cert.subject,
    ]


async def _handshake_and_read(stream: TLSStream) -> None:
    await stream.do_handshake()
    await stream.receive_some()


async def _expect_client_error(server: TLSStream) -> None:
    with pytest.raises(ClientTLSError):
        await _handshake_and_read(server)


async def test_peer_alert_is_reported_on_the_server_side() -> None:
    """A browser that does not trust the leaf sends unknown_ca; the error carries it."""
    distrusting = SSL.Context(SSL.TLS_CLIENT_METHOD)
    distrusting.set_verify(SSL.VERIFY_PEER)
    a, b = trio.testing.memory_stream_pair()
    browser, server = raw_client_stream(a, distrusting), server_stream(b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_upstream_error, browser)
        with pytest.raises(ClientTLSError) as info:
            await _handshake_and_read(server)
    assert info.value.alert == "unknown_ca"
    assert info.value.reason in {"tls_handshake", "tls_error"}


async def _expect_upstream_error(stream: TLSStream) -> None:
    with pytest.raises(UpstreamTLSError):
        await stream.do_handshake()


async def test_old_clients_get_a_protocol_version_alert() -> None:
    old = SSL.Context(SSL.TLS_CLIENT_METHOD)
    old.set_min_proto_version(SSL.TLS1_VERSION)
    old.set_max_proto_version(SSL.TLS1_1_VERSION)
    old.set_cipher_list(b"ALL:@SECLEVEL=0")
    a, b = trio.testing.memory_stream_pair()
    browser, server = raw_client_stream(a, old), server_stream(b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_upstream_error, browser)
        with pytest.raises(ClientTLSError) as info:
            await server.do_handshake()
    assert info.value.reason == "tls_handshake"
    assert info.value.alert_sent == "protocol_version"
    with pytest.raises(UpstreamTLSError, match="alert protocol version"):
        await browser.do_handshake()  # our alert was delivered


async def test_cbc_only_clients_are_refused() -> None:
    cbc = SSL.Context(SSL.TLS_CLIENT_METHOD)
    cbc.set_max_proto_version(SSL.TLS1_2_VERSION)
    cbc.set_cipher_list(b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA256")
    a, b = trio.testing.memory_stream_pair()
    browser, server = raw_client_stream(a, cbc), server_stream(b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_upstream_error, browser)
        with pytest.raises(ClientTLSError) as info:
            await server.do_handshake()
    assert info.value.alert_sent == "handshake_failure"


def _swap_certificate(flight: bytes, chain: list[bytes]) -> bytes:
    """Replace the Certificate message (RFC 5246 §7.4.2) in a TLS 1.2 server flight."""
    payload = b""
    pos = 0
    while pos < len(flight):
        assert flight[pos] == 22, "a TLS 1.2 server's first flight is all handshake records"
        length = int.from_bytes(flight[pos + 3 : pos + 5], "big")
        payload += flight[pos + 5 : pos + 5 + length]
        pos += 5 + length
    messages = b""
    pos = 0
    while pos < len(payload):
        kind, length = payload[pos], int.from_bytes(payload[pos + 1 : pos + 4], "big")
        body = payload[pos + 4 : pos + 4 + length]
        if kind == 11:
            entries = b"".join(len(c).to_bytes(3, "big") + c for c in chain)
            body = len(entries).to_bytes(3, "big") + entries
        messages += bytes([kind]) + len(body).to_bytes(3, "big") + body
        pos += 4 + length
    return b"".join(
        b"\x16\x03\x03" + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (messages[i : i + 16384] for i in range(0, len(messages), 16384))
    )


async def test_chain_of_a_server_that_never_proved_its_key_is_not_exposed() -> None:
    """An attacker replays a real certificate without its key: the chain is worthless."""
    context = raw_server_context(max=SSL.TLS1_2_VERSION)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *_: True)
    stolen = make_leaf(HIER.intermediate, HOST)  # same name, a key the server does not have
    client_side, attacker_near = trio.testing.memory_stream_pair()
    attacker_far, server_side = trio.testing.memory_stream_pair()
    client, server = client_stream(client_side), raw_server_stream(server_side, context)

    async def attacker() -> None:
        await attacker_far.send_all(await attacker_near.receive_some())  # ClientHello
        flight = b""
        while b"\x0e\x00\x00\x00" not in flight:  # ServerHelloDone
            flight += await attacker_far.receive_some()
        der = [c.public_bytes(serialization.Encoding.DER) for c in stolen.chain()]
        await attacker_near.send_all(_swap_certificate(flight, der))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await attacker_far.send_all(await attacker_near.receive_some())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attacker)
        nursery.start_soon(_expect_client_error, server)
        with pytest.raises(UpstreamTLSError) as info:
            await client.do_handshake()
    assert info.value.reason == "tls_handshake"
    assert client.peer_certificate_chain() == []
    assert client.connection.get_peer_cert_chain() is not None  # OpenSSL did keep it


class _FakeConnection:
    """Stands in for a Connection in the info callback: app data and a scripted state."""

    def __init__(self) -> None:
        self.state = _ConnectionState()
        self.step = b""

    def get_app_data(self) -> _ConnectionState:
        return self.state

    def get_state_string(self) -> bytes:
        return self.step


def _walk(steps: list[bytes]) -> _ConnectionState:
    connection = _FakeConnection()
    for step in steps:
        connection.step = step
        _on_info(connection, SSL.SSL_CB_CONNECT_LOOP, 1)  # type: ignore[arg-type]
    return connection.state


def test_key_proof_follows_the_message_order() -> None:
    """OpenSSL announces a state before processing its message (SSL_CTX_set_info_callback)."""
    tls12 = _walk(
        [
            b"SSLv3/TLS read server hello",
            b"SSLv3/TLS read server certificate",
            b"SSLv3/TLS read server key exchange",  # announced, signature not yet checked
            b"SSLv3/TLS read server certificate request",  # so now it was
        ]
    )
    assert (tls12.certificate_requested, tls12.server_key_proven) == (True, True)
    before_ske = _walk(
        [b"SSLv3/TLS read server certificate", b"SSLv3/TLS read server key exchange"]
    )
    assert not before_ske.server_key_proven
    tls13 = _walk(
        [
            b"TLSv1.3 read encrypted extensions",
            b"SSLv3/TLS read server certificate request",  # before the certificate in TLS 1.3
            b"SSLv3/TLS read server certificate",
            b"TLSv1.3 read server certificate verify",
        ]
    )
    assert (tls13.certificate_requested, tls13.server_key_proven) == (True, False)


def test_alerts_are_recorded_by_direction_and_benign_ones_ignored() -> None:
    connection = _FakeConnection()
    warning_no_renegotiation = (1 << 8) | 100
    fatal_unknown_ca = (2 << 8) | 48
    fatal_decode_error = (2 << 8) | 50
    _on_info(connection, SSL.SSL_CB_READ_ALERT, warning_no_renegotiation)  # type: ignore[arg-type]
    _on_info(connection, SSL.SSL_CB_READ_ALERT, fatal_unknown_ca)  # type: ignore[arg-type]
    _on_info(connection, SSL.SSL_CB_READ_ALERT, fatal_decode_error)  # type: ignore[arg-type]
    _on_info(connection, SSL.SSL_CB_WRITE_ALERT, (2 << 8) | 199)  # type: ignore[arg-type]
    assert connection.state.alert_received == "unknown_ca"  # the first one explains it
    assert connection.state.alert_sent == "alert_199"


# --------------------------------------------------------------------------------------------
# Credentials, key logging, errors


async def test_cryptography_credentials_work_too() -> None:
    connection = server_connection(SERVER_CTX, HIER.leaf.cert, HIER.leaf.key, alpn=None)
    a, b = trio.testing.memory_stream_pair()
    client, server = client_stream(a), TLSStream(b, connection, server_side=True)
    await handshake_both(client, server)
    assert client.peer_certificate_chain()[0] == HIER.leaf.cert


def test_mismatched_key_is_a_configuration_error() -> None:
    other = crypto.PKey.from_cryptography_key(cached_key("ec256", 7))
    with pytest.raises(ConfigurationError, match="does not match") as info:
        server_connection(SERVER_CTX, LEAF_X509, other, alpn=None)
    assert info.value.reason == "key_mismatch"


async def test_keylog_callbacks_and_file_writer(tmp_path: Path) -> None:
    lines: list[bytes] = []
    path = tmp_path / "keys.log"
    server_ctx = server_context([HIER.intermediate.cert], keylog=keylog_file_writer(path))
    a, b = trio.testing.memory_stream_pair()
    client = client_stream(a, context=upstream_context(keylog=lines.append))
    server = server_stream(b, context=server_ctx)
    await handshake_both(client, server)
    labels = {line.split()[0] for line in lines}
    assert b"CLIENT_HANDSHAKE_TRAFFIC_SECRET" in labels
    assert b"CLIENT_TRAFFIC_SECRET_0" in labels
    client_random = client.connection.client_random()
    assert client_random is not None
    assert all(line.split()[1] == client_random.hex().encode() for line in lines)
    written = path.read_bytes().splitlines()
    assert {line.split()[0] for line in written} == labels
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_error_classes() -> None:
    for cls, side in ((ClientTLSError, ClientError), (UpstreamTLSError, UpstreamError)):
        error = cls("x", reason="tls_error", alert="unknown_ca")
        assert isinstance(error, TLSError)
        assert isinstance(error, side)
        assert isinstance(error, TlsMitmError)
        assert isinstance(error, trio.BrokenResourceError)
        assert (error.reason, error.alert, error.alert_sent) == ("tls_error", "unknown_ca", None)


def test_server_context_is_tls12_minimum_without_compression_or_renegotiation() -> None:
    for context in (server_context(), upstream_context()):
        options = context.set_options(0)
        assert options & SSL.OP_NO_COMPRESSION
        assert options & SSL.OP_NO_RENEGOTIATION
        assert not options & SSL.OP_LEGACY_SERVER_CONNECT  # RFC 5746 required (TLS-14)


# --------------------------------------------------------------------------------------------
# Backpressure, concurrency, closing


@pytest.mark.usefixtures("decrypt_path")
async def test_refills_and_writes_are_bounded() -> None:
    a, b = trio.testing.memory_stream_pair()
    recorder = Recorder(a)
    client = client_stream(recorder, max_refill_bytes=1000)
    server = server_stream(Recorder(b))
    await handshake_both(client, server)
    payload = os.urandom(300_000)

    async def send() -> None:
        await server.send_all(payload)

    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while len(received) < len(payload):
            chunk = await client.receive_some(5000)
            assert 0 < len(chunk) <= 5000
            received += chunk
    assert received == payload
    assert set(recorder.receive_sizes) == {1000}
    assert isinstance(server.transport_stream, Recorder)
    # 256 KiB batches, each sent before the next is encrypted.
    assert max(len(s) for s in server.transport_stream.sent) < 256 * 1024 + 1000


async def test_concurrent_handshakes_share_one() -> None:
    a, b = trio.testing.memory_stream_pair()
    client, server = client_stream(a), server_stream(b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    await client.do_handshake()  # idempotent
    assert client.tls_version() == "TLSv1.3"


async def test_aclose_is_bounded_when_the_peer_never_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = trio.testing.lockstep_stream_pair()
    client, server = client_stream(a), server_stream(b)
    await handshake_both(client, server)
    start = trio.current_time()
    await server.aclose()  # the close_notify cannot be delivered: nobody reads
    assert trio.current_time() - start == pytest.approx(CLOSE_NOTIFY_TIMEOUT)
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()
    assert await client.receive_some() == b""  # the transport was closed anyway


async def test_aclose_before_the_handshake_sends_nothing() -> None:
    a, b = trio.testing.memory_stream_pair()
    server = server_stream(b)
    await server.aclose()
    assert await a.receive_some() == b""


@pytest.fixture
async def pair() -> AsyncIterator[tuple[TLSStream, TLSStream]]:
    client, server = await connected_pair()
    yield client, server
    await trio.aclose_forcefully(client)
    await trio.aclose_forcefully(server)


async def test_receive_max_bytes_validation(pair: tuple[TLSStream, TLSStream]) -> None:
    client, _server = pair
    with pytest.raises(ValueError, match="at least 1"):
        await client.receive_some(0)
    with pytest.raises(TypeError):
        await client.receive_some(1.5)  # type: ignore[arg-type]


def test_max_refill_bytes_validation() -> None:
    a, _b = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="max_refill_bytes"):
        client_stream(a, max_refill_bytes=0)


async def test_upstream_handshake_does_not_verify() -> None:
    """A self-signed leaf of an unknown root handshakes: judging it is UpstreamVerifier's job."""
    stranger = make_leaf(make_root("Nobody Trusts Me"), HOST)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(stranger.cert)
    context.use_privatekey(stranger.key)
    a, b = trio.testing.memory_stream_pair()
    client, server = client_stream(a), raw_server_stream(b, context)
    await handshake_both(client, server)
    assert client.peer_certificate_chain() == [stranger.cert]
    assert UPSTREAM_CTX.get_verify_mode() == SSL.VERIFY_NONE


def test_benchmark_reports_positive_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_tls

    results = bench_tls.run(0.1)
    assert set(results) == {
        "server_connection_openssl_us",
        "server_connection_cryptography_us",
        "handshakes_per_s",
        "resumed_handshakes_per_s",
        "bulk_mb_per_s",
    }
    assert all(value > 0 for value in results.values())


async def test_forceful_close_keeps_the_session_resumable() -> None:
    """trio.aclose_forcefully skips delivering close_notify; resumption must still work."""
    session = None
    reused = []
    for _ in range(2):
        client, server = await connected_pair(session=session)
        reused.append(client.session_reused())
        await server.send_all(b"tickets come first")
        assert await client.receive_some() == b"tickets come first"
        session = client.session()
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)
    assert reused == [False, True]


def test_contexts_release_idle_record_buffers() -> None:
    """Held keep-alive connections must not pin 4 x 16 KiB of record buffers each."""
    from OpenSSL import SSL

    from tlsmitm._tls import server_context, upstream_context

    for context in (server_context(), upstream_context()):
        assert context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS  # set_mode returns the mode bits


# --------------------------------------------------------------------------------------------
# closing at once (the end of a relay)


async def test_close_at_once_sends_close_notify_over_a_real_socket() -> None:
    a, b = socket.socketpair()
    client = client_stream(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    server = server_stream(trio.SocketStream(trio.socket.from_stdlib_socket(b)))
    await handshake_both(client, server)
    await client.send_all(b"ping")
    assert await server.receive_some(10) == b"ping"
    assert close_at_once(server)
    # The peer reads a clean end (close_notify, not a cut), and the session stays resumable.
    assert await client.receive_some(10) == b""
    assert client.session() is not None
    assert close_at_once(server)  # twice is harmless
    assert server.transport_stream.socket.fileno() == -1  # type: ignore[attr-defined]
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    await client.aclose()


async def test_close_at_once_leaves_other_transports_to_aclose() -> None:
    client, server = await connected_pair()
    assert not close_at_once(server)  # a memory stream: the caller uses aclose_forcefully
    await server.send_all(b"still open")
    assert await client.receive_some(20) == b"still open"
    plain_a, plain_b = trio.testing.memory_stream_pair()
    assert not close_at_once(plain_a)
    for stream in (client, server, plain_a, plain_b):
        await trio.aclose_forcefully(stream)


async def test_is_idle_only_between_records_with_nothing_unread() -> None:
    client, server = await connected_pair()
    assert not TLSStream(
        trio.testing.memory_stream_pair()[0],
        upstream_connection(UPSTREAM_CTX, server_name=HOST, alpn_offer=(), session=None),
        server_side=False,
    ).is_idle()  # no handshake yet
    await server.send_all(b"hello")
    assert await client.receive_some(5) == b"hello"
    assert client.is_idle()
    await server.send_all(b"unread")
    # The record is in the transport, not yet in the TLS engine: the engine alone cannot tell
    # (the pool also polls the socket); once received into the engine, it is not idle.
    data = await client.transport_stream.receive_some(65536)
    client.connection.bio_write(data)
    assert not client.is_idle()
    await server.send_eof()
    await trio.aclose_forcefully(client)
    assert not client.is_idle()
    await trio.aclose_forcefully(server)


async def test_transport_lock_is_fifo_and_hands_over_to_waiters() -> None:
    """The inner lock of a direction: free when nobody holds it, else strictly in turn (a
    newcomer never overtakes a waiter), and a cancelled waiter leaves the queue."""
    lock = tls_module._TransportLock()
    order: list[str] = []

    async def take(name: str, hold: float) -> None:
        await lock.acquire()
        order.append(name)
        await trio.sleep(hold)
        lock.release()

    await lock.acquire()  # free: taken at once
    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):
            nursery.start_soon(take, name, 0.01)
            await trio.testing.wait_all_tasks_blocked()
        lock.release()  # handed to "a" (still held), not freed for anyone to grab
        assert lock._held
    assert order == ["a", "b", "c"]
    assert not lock._held

    await lock.acquire()
    with trio.move_on_after(0.01) as scope:
        await lock.acquire()  # held: waits, and a cancelled wait leaves the queue
    assert scope.cancelled_caught
    lock.release()
    assert not lock._held
    await lock.acquire()  # free again
    lock.release()


@pytest.mark.usefixtures("decrypt_path")
async def test_draining_gives_what_openssl_queued_and_nothing_else() -> None:
    """The outgoing BIO is drained whole, and an empty one gives b"" (with or without asking
    it how much it holds first), also after its buffers were released and replaced."""
    client, server = await connected_pair()
    await server.send_all(b"first")  # (delivers the delayed TLS 1.3 tickets too)
    assert await client.receive_some() == b"first"
    for _ in range(2):
        assert server._drain_outgoing() == b""
        server.connection.send(b"queued")
        record = server._drain_outgoing()
        assert record
        assert server._drain_outgoing() == b""
        await server.transport_stream.send_all(record)
        assert await client.receive_some() == b"queued"
        assert tls_module.release_bio_buffers(server.connection)
    await client.aclose()
    await server.aclose()
