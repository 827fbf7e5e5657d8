"""The decision log's ``reason`` survives the connection's end (``serve``, both protocols).

A client that closes its connection after complete exchanges ended it normally: its record
keeps the decision's reason (``verified``), on HTTP/1.1 and on HTTP/2 alike, whether it closes
with ``close_notify``, sends GOAWAY, or resets the TCP connection. Only a connection lost in the
middle of an exchange is ``connection_lost``.
"""

from __future__ import annotations

import functools
import json
import socket
import ssl
import struct
from datetime import UTC, datetime
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h11
import pytest
import trio
from pki import good_hierarchy
from serve_process import Served, curl, serve, start_origin, upstream_args

from tlsmitm._relay.plan import Decision, RelayKind
from tlsmitm._relay.state import FlowRecord, FlowState

HOST = "www.example.test"


async def _records(served: Served, count: int) -> list[dict[str, object]]:
    with trio.fail_after(30):
        while served.stderr.count(b'"event":"connection"') < count:
            await trio.sleep(0.05)
    lines = (json.loads(line) for line in served.stderr.decode().splitlines())
    return [line for line in lines if line["event"] == "connection"]


async def _tunnel(
    served: Served, port: int, cacert: Path, alpn: str
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection to the origin through ``CONNECT`` (what curl does), ALPN ``alpn``."""
    tcp = await trio.open_tcp_stream("127.0.0.1", served.port)
    await tcp.send_all(f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await tcp.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    context = ssl.create_default_context(cafile=str(cacert))
    context.set_alpn_protocols([alpn])
    tls = trio.SSLStream(tcp, context, server_hostname=HOST)
    await tls.do_handshake()
    assert tls.selected_alpn_protocol() == alpn
    return tls


def _reset(tls: trio.SSLStream[trio.SocketStream]) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a client killed or tidying idle connections does."""
    transport = tls.transport_stream
    assert isinstance(transport, trio.SocketStream)
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.socket.close()


async def _h1_exchange(tls: trio.SSLStream[trio.SocketStream], path: str, *, whole: bool) -> None:
    """GET ``path``; return after the whole response (``whole``) or after its head."""
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=path, headers=[("host", HOST)])
    await tls.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await tls.receive_some(65536))
        elif isinstance(event, h11.EndOfMessage if whole else h11.Response):
            return


async def _h2_exchange(
    tls: trio.SSLStream[trio.SocketStream], path: str, *, authority: str, whole: bool
) -> None:
    """GET ``path`` on stream 1; return after the whole response (``whole``) or its head."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", authority)]
    conn.send_headers(1, [*headers, (":path", path)], end_stream=True)
    await tls.send_all(conn.data_to_send())
    done = h2.events.StreamEnded if whole else h2.events.ResponseReceived
    while True:
        events = conn.receive_data(await tls.receive_some(65536))
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        await tls.send_all(conn.data_to_send())
        if any(isinstance(event, done) for event in events):
            return


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["--http1.1", "--http2"])
async def test_a_normal_client_close_keeps_the_verified_reason(
    nursery: trio.Nursery, tmp_path: Path, protocol: str
) -> None:
    hierarchy = good_hierarchy(HOST)
    port, _ = await start_origin(nursery, tmp_path, hierarchy)
    async with serve(
        tmp_path / "state", "--log-format", "json", *upstream_args(tmp_path, hierarchy, HOST)
    ) as served:
        cacert = tmp_path / "state" / "ca" / "root.pem"
        url = f"https://{HOST}:{port}/"
        version = protocol.removeprefix("--http").encode()
        for _ in range(3):  # (curl's close races the proxy's last writes: several chances)
            result = await curl(
                protocol, "-w", "%{http_version}", "--proxy", served.proxy, "--cacert", str(cacert),
                url, url,
            )  # fmt: skip
            assert result.stdout == (b"hello from origin" + version) * 2
        alpn = "h2" if protocol == "--http2" else "http/1.1"
        exchange = (
            functools.partial(_h2_exchange, authority=f"{HOST}:{port}")
            if protocol == "--http2"
            else _h1_exchange
        )
        tls = await _tunnel(served, port, cacert, alpn)
        await exchange(tls, "/", whole=True)
        _reset(tls)  # between exchanges: a normal end
        tls = await _tunnel(served, port, cacert, alpn)
        await exchange(tls, "/chunked/100000000", whole=False)  # 100 MB on their way
        _reset(tls)  # in the middle of an exchange: lost
        records = await _records(served, 5)
        assert await served.stop() == 0
    assert [(r["host"], r["action"], r["reason"]) for r in records] == [
        *[(HOST, "intercept", "verified")] * 4,
        (HOST, "intercept", "connection_lost"),
    ], served.stderr.decode()


def test_only_an_error_end_of_an_unblocked_exchange_replaces_the_reason() -> None:
    record = FlowRecord(client="127.0.0.1:5000", started=datetime.now(UTC))
    record.decide(Decision.INTERCEPT, "verified")
    record.enter(FlowState.PEEKING)
    record.enter(FlowState.DECIDING)
    record.enter(FlowState.UPSTREAM)
    record.enter(FlowState.HANDSHAKING)
    record.relayed_by(RelayKind.H1)
    record.idle_since = 1.0  # waiting for the next request
    assert not record.end_with("connection_lost")
    assert record.reason == "verified"
    record.idle_since = None  # in the middle of an exchange
    assert record.end_with("connection_lost")
    assert record.reason == "connection_lost"
    record.decide(Decision.BLOCK, "scan_infected")
    for reason in ("connection_lost", "timeout", "bad_http2"):
        assert not record.end_with(reason)
    assert (record.decision, record.reason) == (Decision.BLOCK, "scan_infected")
