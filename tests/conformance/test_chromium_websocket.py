"""Chromium's WebSockets through tlsmitm reach the embedder's hook, message by message.

Debian's Chromium (Playwright, trusting tlsmitm's root through an NSS database) talks to a
``websockets`` origin over TLS through an in-process :class:`~tlsmitm.Interceptor` whose hooks
record, replace and block messages. Chromium offers permessage-deflate and the origin accepts
it, so the messages the hook sees were compressed on both hops.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import require_tool
from harness import chromium_args, chromium_env, chromium_executable, nss_home
from origin import server_ssl_context
from pki import Hierarchy, good_hierarchy
from test_relay import HOST, settle, start_proxy
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request as WsRequest
from websockets.http11 import Response as WsResponse
from websockets.sync.server import ServerConnection, serve

from tlsmitm import DropMessage, FlowInfo, Hooks, WebSocketClose, WebSocketMessage

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

_PAGE = "<!doctype html><title>ws</title><p>websocket test page</p>"
_SCRIPT = """url => new Promise(resolve => {
    const ws = new WebSocket(url);
    const got = [];
    ws.onopen = () => { ws.send('hello from chromium'); ws.send('replace me'); };
    ws.onmessage = event => {
        got.push(event.data);
        if (got.length === 2) ws.send('EICAR');
    };
    ws.onclose = event => resolve({got, code: event.code, reason: event.reason,
                                   extensions: ws.extensions});
    setTimeout(() => resolve({got, code: 'timeout'}), 20000);
})"""


class Inspector(Hooks):
    def __init__(self) -> None:
        self.seen: list[WebSocketMessage] = []

    async def on_websocket_message(
        self, flow: FlowInfo, message: WebSocketMessage
    ) -> WebSocketMessage | DropMessage | WebSocketClose | None:
        self.seen.append(message)
        if message.data == "replace me":
            return WebSocketMessage(from_client=True, data="replaced by tlsmitm")
        if message.data == "EICAR":
            return WebSocketClose(code=4001, reason="blocked by the hook")
        return None


@pytest.fixture
def ws_origin(tmp_path: Path) -> Iterator[tuple[int, Hierarchy, list[str | bytes]]]:
    hierarchy = good_hierarchy(HOST)
    received: list[str | bytes] = []

    def page(connection: ServerConnection, request: WsRequest) -> WsResponse | None:
        if request.headers.get("Upgrade") is None:
            response = connection.respond(200, _PAGE)
            response.headers["Content-Type"] = "text/html; charset=utf-8"
            return response
        return None

    def handler(ws: ServerConnection) -> None:
        try:
            for message in ws:
                received.append(message)
                ws.send(f"echo:{message}")
        except ConnectionClosed:
            pass

    server = serve(
        handler,
        "127.0.0.1",
        0,
        ssl=server_ssl_context(hierarchy.leaf, tmp_path),
        process_request=page,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.socket.getsockname()[1], hierarchy, received
    finally:
        server.shutdown()
        thread.join(timeout=10)


async def test_chromium_websocket_messages_go_through_the_hook(
    nursery: trio.Nursery,
    tmp_path: Path,
    ws_origin: tuple[int, Hierarchy, list[str | bytes]],
) -> None:
    require_tool("chromium")
    certutil = require_tool("certutil")
    port, hierarchy, received = ws_origin
    hooks = Inspector()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)
    home = nss_home(tmp_path / "home", certutil, [("tlsmitm", setup.root_pem)])

    def browse() -> Any:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium_executable(),
                args=chromium_args(setup.proxy_port),
                env=chromium_env(home),
            )
            try:
                page = browser.new_page()
                response = page.goto(f"https://{HOST}:{port}/", wait_until="load")
                assert response is not None
                assert response.status == 200
                return page.evaluate(_SCRIPT, f"wss://{HOST}:{port}/chat")
            finally:
                browser.close()

    result = await trio.to_thread.run_sync(browse)
    assert result["got"] == ["echo:hello from chromium", "echo:replaced by tlsmitm"]
    assert (result["code"], result["reason"]) == (4001, "blocked by the hook")
    assert result["extensions"].startswith("permessage-deflate")
    assert received == ["hello from chromium", "replaced by tlsmitm"]
    # Each direction in order (the two directions interleave as the network has it).
    assert [m.data for m in hooks.seen if m.from_client] == [
        "hello from chromium",
        "replace me",
        "EICAR",
    ]
    assert [m.data for m in hooks.seen if not m.from_client] == [
        "echo:hello from chromium",
        "echo:replaced by tlsmitm",
    ]
    await settle(setup)
    assert any(record.relay == "websocket" for record in setup.records)
