"""WebSocket messages through the real proxy: real TLS and sockets, third-party client and server.

The origin is a ``websockets`` server over TLS on 127.0.0.1 (an echo that notes what it
received); the client is a ``websockets`` client that reaches it through tlsmitm with CONNECT,
trusting only tlsmitm's root. Neither end is tlsmitm's own code, so the frames, the
permessage-deflate negotiation and the close handshakes are the ones real peers produce.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from origin import server_ssl_context
from pki import Hierarchy, good_hierarchy
from test_relay import HOST, connect_line, settle, start_proxy
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve

from tlsmitm import (
    DropMessage,
    FlowInfo,
    Hooks,
    InterceptorConfig,
    WebSocketClose,
    WebSocketMessage,
)

pytestmark = pytest.mark.e2e


@dataclass
class WsOrigin:
    port: int
    received: list[str | bytes] = field(default_factory=list)
    extensions: list[str | None] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)


@pytest.fixture
def hierarchy() -> Hierarchy:
    return good_hierarchy(HOST)


@pytest.fixture
def ws_origin(tmp_path: Path, hierarchy: Hierarchy) -> Iterator[WsOrigin]:
    """An echo origin: ``echo:`` + each message, same type; "close please" closes with 4002."""
    state = WsOrigin(port=0)

    def handler(ws: ServerConnection) -> None:
        state.extensions.append(
            ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
        )
        try:
            for message in ws:
                state.received.append(message)
                if message == "close please":
                    ws.close(4002, "origin says bye")
                    break
                ws.send("echo:" + message if isinstance(message, str) else b"echo:" + message)
        except ConnectionClosed:
            pass
        state.close_codes.append(ws.close_code)

    context = server_ssl_context(hierarchy.leaf, tmp_path)
    server: Server = serve(handler, "127.0.0.1", 0, ssl=context, max_size=2**24)
    state.port = server.socket.getsockname()[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        thread.join(timeout=10)
        assert not thread.is_alive()


async def origin_closed(origin: WsOrigin) -> None:
    """Wait (bounded) until the origin's handler has seen its connection end."""
    with trio.fail_after(10):
        while not origin.close_codes:
            await trio.sleep(0.01)


class Inspector(Hooks):
    """Sees every message; replaces, drops and closes on cue."""

    def __init__(self) -> None:
        self.seen: list[tuple[FlowInfo, WebSocketMessage]] = []

    async def on_websocket_message(
        self, flow: FlowInfo, message: WebSocketMessage
    ) -> WebSocketMessage | DropMessage | WebSocketClose | None:
        self.seen.append((flow, message))
        if message.data == "replace me":
            return WebSocketMessage(from_client=True, data="replaced by the hook")
        if message.data == b"drop me":
            return DropMessage()
        if message.data == "EICAR":
            return WebSocketClose(code=4001, reason="blocked by the hook")
        return None


def _client(
    setup_port: int, origin: WsOrigin, root_pem: Path, compression: str | None
) -> ClientConnection:
    context = ssl.create_default_context(cafile=str(root_pem))
    context.set_alpn_protocols(["http/1.1"])  # as browsers do
    return connect(
        f"wss://{HOST}:{origin.port}/chat",
        ssl=context,
        proxy=f"http://127.0.0.1:{setup_port}",
        compression=compression,
        max_size=2**24,
        open_timeout=20,
        close_timeout=10,
        ping_interval=None,
    )


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_messages_are_inspected_replaced_dropped_and_closed(
    nursery: trio.Nursery,
    tmp_path: Path,
    hierarchy: Hierarchy,
    ws_origin: WsOrigin,
    compression: str | None,
) -> None:
    hooks = Inspector()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)
    big = "0123456789abcdef" * 65536  # 1 MiB of text, very compressible

    def talk() -> tuple[str | None, int | None, str | None]:
        with _client(setup.proxy_port, ws_origin, setup.root_pem, compression) as ws:
            agreed = ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
            ws.send("hello")
            assert ws.recv(timeout=20) == "echo:hello"
            ws.send(b"\x00binary\xff")
            assert ws.recv(timeout=20) == b"echo:\x00binary\xff"
            ws.send("replace me")
            assert ws.recv(timeout=20) == "echo:replaced by the hook"
            ws.send(b"drop me")
            ws.send("after the drop")
            assert ws.recv(timeout=20) == "echo:after the drop"
            ws.send(big)
            assert ws.recv(timeout=20) == "echo:" + big
            ws.send("EICAR")
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=20)
            return agreed, ws.close_code, ws.close_reason

    agreed, code, reason = await trio.to_thread.run_sync(talk)
    assert (code, reason) == (4001, "blocked by the hook")
    # Each hop carried what the two ends agreed (RFC 7692: permessage-deflate, or nothing).
    if compression is None:
        assert agreed is None
        assert ws_origin.extensions == [None]
    else:
        assert agreed is not None
        assert agreed.startswith("permessage-deflate")
        assert ws_origin.extensions == [agreed]
    # The origin got the replacement, never the dropped message nor the blocked one.
    assert ws_origin.received == [
        "hello",
        b"\x00binary\xff",
        "replaced by the hook",
        "after the drop",
        big,
    ]
    await settle(setup)
    await origin_closed(ws_origin)
    assert ws_origin.close_codes == [4001]
    # The hook saw every message decoded, both ways, with the flow it travelled on.
    assert [(m.from_client, m.data) for _, m in hooks.seen] == [
        (True, "hello"),
        (False, "echo:hello"),
        (True, b"\x00binary\xff"),
        (False, b"echo:\x00binary\xff"),
        (True, "replace me"),
        (False, "echo:replaced by the hook"),
        (True, b"drop me"),
        (True, "after the drop"),
        (False, "echo:after the drop"),
        (True, big),
        (False, "echo:" + big),
        (True, "EICAR"),
    ]
    assert {
        (f.host, f.verified, f.client_protocol, f.upstream_protocol) for f, _ in hooks.seen
    } == {(HOST, True, "websocket", "websocket")}
    record = setup.records[-1]
    assert record.relay == "websocket"
    assert record.splice is None
    if compression == "deflate":
        assert record.bytes_up < len(big) // 10  # compressed on the wire, decoded for the hook


async def test_the_origin_closing_reaches_the_client_with_its_code(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, ws_origin: WsOrigin
) -> None:
    setup = await start_proxy(nursery, tmp_path, hierarchy)

    def talk() -> tuple[int | None, str | None]:
        with _client(setup.proxy_port, ws_origin, setup.root_pem, "deflate") as ws:
            assert ws.ping(b"are you there").wait(timeout=20)  # the origin's pong, relayed
            ws.send("close please")
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=20)
            return ws.close_code, ws.close_reason

    assert await trio.to_thread.run_sync(talk) == (4002, "origin says bye")
    await settle(setup)
    await origin_closed(ws_origin)
    assert ws_origin.close_codes == [4002]


async def test_shutdown_closes_open_websockets_with_1001(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, ws_origin: WsOrigin
) -> None:
    setup = await start_proxy(nursery, tmp_path, hierarchy)
    connected = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def talk() -> tuple[int | None, str | None]:
        with _client(setup.proxy_port, ws_origin, setup.root_pem, "deflate") as ws:
            ws.send("hello")
            assert ws.recv(timeout=20) == "echo:hello"
            trio.from_thread.run_sync(connected.set, trio_token=token)
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=20)  # nothing comes but the Close
            return ws.close_code, ws.close_reason

    async with trio.open_nursery() as inner:
        results: list[tuple[int | None, str | None]] = []

        async def run_client() -> None:
            results.append(await trio.to_thread.run_sync(talk))

        inner.start_soon(run_client)
        with trio.fail_after(20):
            await connected.wait()
        setup.interceptor.shutdown()
    # RFC 6455 §7.4.1: 1001, going away -- not a dropped connection (1006).
    assert results == [(1001, "proxy shutting down")]
    await origin_closed(ws_origin)
    assert ws_origin.close_codes == [1001]


def _raw_websocket(setup_port: int, origin: WsOrigin, root_pem: Path) -> ssl.SSLSocket:
    """A hand-made WebSocket client through the proxy, free to send anything after the 101."""
    raw = socket.create_connection(("127.0.0.1", setup_port), timeout=20)
    raw.sendall(connect_line(HOST, origin.port))
    assert raw.recv(4096).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(root_pem))
    context.set_alpn_protocols(["http/1.1"])
    tls = context.wrap_socket(raw, server_hostname=HOST)
    tls.sendall(
        f"GET /chat HTTP/1.1\r\nHost: {HOST}:{origin.port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return tls


def _read_close(tls: ssl.SSLSocket) -> int:
    """The status code of the Close frame the proxy sends, then the end of the stream."""
    data = b""
    while len(data) < 4:
        chunk = tls.recv(4096)
        assert chunk, data
        data += chunk
    assert data[0] == 0x88, data  # FIN + Close, unmasked from a server (RFC 6455 §5.1)
    code = int.from_bytes(data[2:4], "big")
    while tls.recv(4096):  # then the proxy closes the connection
        pass
    return code


async def test_hostile_clients_get_clean_closes_and_leave_nothing_behind(
    nursery: trio.Nursery, tmp_path: Path, hierarchy: Hierarchy, ws_origin: WsOrigin
) -> None:
    config = InterceptorConfig(resolve={HOST: "127.0.0.1"}, websocket_max_message=65536)
    setup = await start_proxy(nursery, tmp_path, hierarchy, config=config)
    await trio.to_thread.run_sync(  # warm up: contexts and caches, before counting descriptors
        lambda: _read_close_after(setup.proxy_port, ws_origin, setup.root_pem, b"")
    )
    await settle(setup)
    fds_before = len(os.listdir("/proc/self/fd"))
    mask = b"\x00\x00\x00\x00"
    cases = [
        (b"\x81\x05hello", 1002),  # unmasked client frame (RFC 6455 §5.1)
        (b"\x81\x82" + mask + b"\xff\xfe", 1007),  # text that is not UTF-8 (RFC 6455 §8.1)
        (b"\x82\xff" + (200_000).to_bytes(8, "big") + mask + b"\0" * 70_000, 1009),
        (b"\x83\x80" + mask, 1002),  # a reserved opcode
    ]
    for frame, code in cases:
        got = await trio.to_thread.run_sync(
            _read_close_after, setup.proxy_port, ws_origin, setup.root_pem, frame
        )
        assert got == code, frame[:2]
    # A client that vanishes mid-frame: the origin gets 1001 ("going away").
    tls = await trio.to_thread.run_sync(_raw_websocket, setup.proxy_port, ws_origin, setup.root_pem)
    tls.sendall(b"\x81\xfe\x01\x00" + mask + b"half")
    tls.close()
    await settle(setup)
    with trio.fail_after(10):
        while len(ws_origin.close_codes) < len(cases) + 2:
            await trio.sleep(0.01)
    assert ws_origin.close_codes[1:] == [1001] * (len(cases) + 1)
    assert ws_origin.received == []  # nothing hostile reached the origin
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2


def _read_close_after(port: int, origin: WsOrigin, root_pem: Path, frame: bytes) -> int:
    tls = _raw_websocket(port, origin, root_pem)
    try:
        if not frame:  # a clean close: masked Close 1000
            tls.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")
        else:
            tls.sendall(frame)
        return _read_close(tls)
    finally:
        tls.close()
