"""Chromium through the interceptor to a real HTTP/2 origin, with in-process hooks: the page
comes over HTTP/2 (``nextHopProtocol``), the hooks see the navigation and a POST, and a download
the hook blocks ends on the block page, never on the user's disk.

Debian's Chromium trusts tlsmitm's root through the NSS database of a temporary ``HOME``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import require_tool
from harness import chromium_args, chromium_env, chromium_executable, nss_home
from origin import EICAR
from pki import good_hierarchy
from test_relay import HOST, EicarBlocker, settle, start_proxy
from test_relay_h2_e2e import start_h2_origin

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


async def test_chromium_loads_an_h2_origin_through_the_hooks(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    require_tool("chromium")
    certutil = require_tool("certutil")
    hierarchy = good_hierarchy(HOST)
    port = await start_h2_origin(nursery, tmp_path, hierarchy)
    hooks = EicarBlocker()
    setup = await start_proxy(nursery, tmp_path, hierarchy, hooks=hooks)
    home = nss_home(tmp_path / "home", certutil, [("tlsmitm", setup.root_pem)])
    base = f"https://{HOST}:{port}"

    def browse() -> dict[str, Any]:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium_executable(),
                args=chromium_args(setup.proxy_port),
                env=chromium_env(home),
            )
            try:
                page = browser.new_page()
                response = page.goto(f"{base}/page", wait_until="load")
                seen: dict[str, Any] = {
                    "status": response.status if response else None,
                    "text": page.inner_text("#hello"),
                    "protocol": page.evaluate(
                        "performance.getEntriesByType('navigation')[0].nextHopProtocol"
                    ),
                    "posted": page.evaluate(
                        "fetch('/echo', {method: 'POST', body: 'posted over h2'})"
                        ".then(r => r.text())"
                    ),
                }
                page.goto(f"{base}/eicar", wait_until="load")  # a download the hook blocks
                seen["blocked_url"] = page.url
                seen["blocked_content"] = page.content()
                return seen
            finally:
                browser.close()

    seen = await trio.to_thread.run_sync(browse)
    assert seen["status"] == 200
    assert seen["text"] == "hello over h2"
    assert seen["protocol"] == "h2"
    assert seen["posted"] == "posted over h2"
    assert seen["blocked_url"].startswith("https://error.invalid/")
    assert EICAR.decode() not in seen["blocked_content"]
    targets = [target for _, target in hooks.seen if target != b"/favicon.ico"]
    assert targets == [b"/page", b"/echo", b"/eicar"]
    assert all(flow.host == HOST and flow.verified for flow, _ in hooks.seen)
    await settle(setup)
    assert {r.relay for r in setup.records if r.host == HOST} == {"h2"}
