"""The error origin's pages in a real Chromium: the two-step override, the click delay, the CSP.

Only a browser decides what ``Origin`` a form POST carries, whether the page's own script and
stylesheet pass its CSP, and whether ``form-action`` lets the redirect back through. This test
once caught ``Referrer-Policy: no-referrer`` turning the override POST's ``Origin`` into ``null``.

The error origin is served on a loopback address (``http://127.0.0.1:<port>``, the transparent-mode
configuration) by a stdlib HTTP server that hands every request to ``ErrorResponder.handle``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import require_tool

from tlsmitm._errors import CertError
from tlsmitm._responder import ErrorResponder, HttpRequest

pytestmark = pytest.mark.browser

HOST = "www.example.test"
SHA = hashlib.sha256(b"upstream leaf").digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeVerdict:
    ok: bool
    error: CertError | None
    detail: str = ""
    leaf_sha256: bytes | None = SHA


@dataclass
class Origin:
    responder: ErrorResponder
    url: str
    seen: list[tuple[str, str, int, dict[bytes, bytes]]]

    def page(self, error: CertError, *, host: str = HOST, target: bytes = b"/") -> str:
        now = datetime.now(UTC)
        action = self.responder.plan(
            FakeVerdict(ok=False, error=error),
            host=host,
            hsts_known=False,
            client_speaks_http=True,
            now=now,
        )
        location = self.responder.redirect_for(action, request_target=target, now=now).header(
            b"location"
        )
        assert location is not None
        return location.decode()

    def granted(self) -> bool:
        action = self.responder.plan(
            FakeVerdict(ok=False, error=CertError.EXPIRED),
            host=HOST,
            hsts_known=False,
            client_speaks_http=True,
            now=datetime.now(UTC),
        )
        return action.overridden

    def posts(self) -> list[tuple[str, str, int, dict[bytes, bytes]]]:
        return [entry for entry in self.seen if entry[0] == "POST"]


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True
    url = f"http://127.0.0.1:{server.server_address[1]}"
    state = Origin(ErrorResponder(profile="page", error_origin=url), url, [])

    class Handler(BaseHTTPRequestHandler):
        def handle_one(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = tuple(
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in self.headers.items()
            )
            request = HttpRequest(
                method=self.command.encode(), target=self.path.encode(), headers=headers, body=body
            )
            response = state.responder.handle(request, now=datetime.now(UTC))
            interesting = {k: v for k, v in headers if k == b"origin" or k.startswith(b"sec-")}
            state.seen.append((self.command, self.path, response.status, interesting))
            self.send_response(response.status, response.reason.decode())
            for name, value in response.headers:
                self.send_header(name.decode(), value.decode())
            self.end_headers()
            self.wfile.write(response.body)

        do_GET = do_POST = do_HEAD = handle_one

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(5000)
    tab.console_messages = []
    tab.on("console", lambda message: tab.console_messages.append(message.text))
    try:
        yield tab
    finally:
        context.close()


def csp_violations(tab: Any) -> list[str]:
    return [m for m in tab.console_messages if "Content Security Policy" in m]


def test_two_step_override_with_click_delay(origin: Origin, page: Any) -> None:
    page.goto(origin.page(CertError.EXPIRED, target=b"/back/here?x=1"))
    assert page.title() == "Connection not secure"
    assert not page.is_visible("#proceed")
    page.click("#advanced")
    assert page.is_visible("#proceed")
    assert page.is_disabled("#proceed")
    page.click("#proceed", force=True)  # at once: ignored (matrix UI-02)
    page.wait_for_timeout(200)
    assert origin.posts() == []
    # Losing and regaining focus restarts the delay.
    page.wait_for_selector("#proceed:enabled", timeout=3000)
    page.evaluate("window.dispatchEvent(new Event('blur'))")
    assert page.is_disabled("#proceed")
    page.evaluate("window.dispatchEvent(new Event('focus'))")
    assert page.is_disabled("#proceed")
    page.wait_for_selector("#proceed:enabled", timeout=3000)
    with page.expect_request(f"https://{HOST}/back/here?x=1"):
        page.click("#proceed")
    [(_, path, status, headers)] = origin.posts()
    assert (path, status) == ("/override", 303)
    assert headers[b"origin"] == origin.url.encode()  # not "null"
    assert headers[b"sec-fetch-site"] == b"same-origin"
    assert headers[b"sec-fetch-user"] == b"?1"
    assert origin.granted()
    assert csp_violations(page) == []


def test_block_page_has_no_override(origin: Origin, page: Any) -> None:
    page.goto(origin.page(CertError.REVOKED, host="blocked.example.test"))
    assert page.is_visible("#back")
    assert page.query_selector("#advanced") is None
    assert page.query_selector("form") is None
    assert "serious" in page.inner_text("body")
    assert csp_violations(page) == []


def test_go_back(origin: Origin, page: Any) -> None:
    page.goto(origin.url + "/")
    page.goto(origin.page(CertError.EXPIRED, host="back.example.test"))
    page.click("#back")
    page.wait_for_url(origin.url + "/")


def test_pages_cannot_be_framed(origin: Origin, page: Any) -> None:  # matrix UI-04
    url = origin.page(CertError.EXPIRED, host="framed.example.test")
    page.set_content(f'<iframe src="{url}"></iframe>')
    page.wait_for_timeout(500)
    frames = [frame for frame in page.frames if frame is not page.main_frame]
    assert len(frames) == 1
    assert frames[0].query_selector("#advanced") is None
    assert any("frame-ancestors" in m for m in page.console_messages)
