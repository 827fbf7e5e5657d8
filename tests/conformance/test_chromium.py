"""Chromium behind ``tlsmitm serve``: browsing, the seed exploit, the override, HSTS.

Debian's Chromium is driven through Playwright's sync API with ``executable_path``; it trusts
tlsmitm's root through the NSS database of a temporary ``HOME`` (``certutil``), exactly as a user
who installed the root would -- never through ``--ignore-certificate-errors*``. One ``tlsmitm
serve`` subprocess and one browser run per error profile for the whole module; every test gets a
fresh browser context.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from harness import (
    CERT_ERROR,
    ERROR_ORIGIN,
    PAGE_BLOCK,
    PAGE_OVERRIDE,
    Fleet,
    Origin,
    Reply,
    ServerTls,
    Site,
    TlsmitmServe,
    chromium_args,
    chromium_env,
    chromium_executable,
    chromium_goto,
    download_bytes,
    nss_home,
    reset_page,
    tiny_png,
)
from pki import DAY, NOW, Issued, make_intermediate, make_leaf, make_root

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

PROFILES = ("native", "page")
HSTS_HOST = "hsts.example.test"
STS = "max-age=15768000; includeSubDomains"

_BROWSE_PAGE = b"""<!doctype html>
<html><head><title>browse</title>
<link rel="stylesheet" href="/style.css">
<script src="/app.js"></script>
</head><body>
<p id="status">script did not run</p>
<img id="img" src="/img.png" alt="pixel">
<a id="dl" href="/download">download</a>
</body></html>"""
_APP_JS = b"document.addEventListener('DOMContentLoaded', () => {"
_APP_JS += b" document.getElementById('status').textContent = 'script ran'; });"
_STYLE = b"#status { color: rgb(0, 128, 0); }"
_FORM_PAGE = b"""<!doctype html><title>form</title>
<form method="post" action="/submit"><input name="q" value="hello world">
<button id="send" type="submit">send</button></form>"""

# The seed exploit: a page served over the origin's one good connection whose script then asks
# its own origin for more (every later connection presents an expired certificate), tries to
# read what comes back, and tries to frame the error page.
_SEED_PAGE = b"""<!doctype html><html><head><title>seed</title></head><body>
<pre id="out"></pre>
<script>
(async () => {
  const results = {};
  const note = (key, value) => { results[key] = String(value).slice(0, 2000); };
  const attempt = async (key, run) => {
    try { note(key, await run()); } catch (e) { note(key, 'error ' + e.name); }
  };
  await attempt('fetch', async () => {
    const r = await fetch('/secret?cors', {cache: 'no-store'});
    return 'read ' + r.status + ': ' + await r.text();
  });
  await attempt('fetch_no_cors', async () => {
    const r = await fetch('/secret?no-cors', {mode: 'no-cors', cache: 'no-store'});
    return r.type + ' ' + r.status + ': ' + await r.text();
  });
  await attempt('fetch_manual', async () => {
    const r = await fetch('/secret?manual', {redirect: 'manual', cache: 'no-store'});
    return r.type + ' ' + r.status + ' location=' + r.headers.get('location') + ': ' +
      await r.text();
  });
  note('xhr', await new Promise(resolve => {
    const x = new XMLHttpRequest();
    x.open('GET', '/secret?xhr');
    x.onload = () => resolve('read ' + x.status + ': ' + x.responseText);
    x.onerror = () => resolve('error status ' + x.status);
    x.send();
  }));
  await attempt('fetch_error_origin', async () => {
    const r = await fetch('https://error.invalid/', {cache: 'no-store'});
    return 'read ' + r.status + ': ' + await r.text();
  });
  for (const [key, src] of [['frame_site', '/secret?frame'],
                            ['frame_error_origin', 'https://error.invalid/']]) {
    note(key, await new Promise(resolve => {
      const frame = document.createElement('iframe');
      frame.name = key;
      frame.src = src;
      let settled = false;
      const done = () => {
        if (settled) return;
        settled = true;
        try { resolve('read: ' + frame.contentDocument.documentElement.innerText); }
        catch (e) { resolve('blocked ' + e.name); }
      };
      frame.onload = done;
      setTimeout(done, 5000);
      document.body.appendChild(frame);
    }));
  }
  document.getElementById('out').textContent = JSON.stringify(results);
  document.title = 'done';
})();
</script></body></html>"""

# A page on another origin that tries to submit the override with a stolen page reference and
# token: first as a script (fetch), then as a form the user clicks.
_EVIL_PAGE = b"""<!doctype html><title>evil</title>
<form id="steal" method="post" action="https://error.invalid/override">
<input name="ref" id="ref"><input name="token" id="token">
<button id="go" type="submit">Win a prize</button></form>
<p id="fetch-result"></p>
<script>
window.tryFetch = async (ref, token) => {
  try {
    const r = await fetch('https://error.invalid/override', {
      method: 'POST', mode: 'no-cors', credentials: 'include',
      body: new URLSearchParams({ref, token})});
    return r.type + ' ' + r.status;
  } catch (e) { return 'error ' + e.name; }
};
</script>"""


@dataclass
class Lab:
    fleet: Fleet
    origins: dict[str, Origin]
    proxies: dict[str, TlsmitmServe]
    directory: Path
    browsers: dict[str, Any] = field(default_factory=dict)
    playwright: Any = None

    def url(self, key: str, host: str, path: str = "/") -> str:
        return f"https://{host}:{self.origins[key].port}{path}"

    def page(self, profile: str) -> Any:
        context = self.browsers[profile].new_context()
        return context.new_page()


def _tls(leaf: Issued) -> ServerTls:
    return ServerTls(chain=leaf.chain_pem(), key=leaf.key_pem)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_tool("chromium")
    certutil = require_tool("certutil")
    from playwright.sync_api import sync_playwright

    directory = tmp_path_factory.mktemp("chromium")
    root = make_root("Chromium Lab Root")
    inter = make_intermediate(root, "Chromium Lab Intermediate")
    expired = {"not_before": NOW - 30 * DAY, "not_after": NOW - DAY}
    fleet = Fleet(directory / "origins")
    origins: dict[str, Origin] = {}
    pages = {
        "/": Reply(body=_BROWSE_PAGE, content_type="text/html; charset=utf-8"),
        "/app.js": Reply(body=_APP_JS, content_type="text/javascript"),
        "/style.css": Reply(body=_STYLE, content_type="text/css"),
        "/img.png": Reply(body=tiny_png(), content_type="image/png"),
        "/form": Reply(body=_FORM_PAGE, content_type="text/html; charset=utf-8"),
    }
    origins["browse"] = fleet.add(
        "browse", _tls(make_leaf(inter, "www.example.test")), Site("browse", pages=pages)
    )
    seed_good = make_leaf(inter, "seed.example.test")
    seed_bad = make_leaf(inter, "seed.example.test", **expired)
    seed_site = Site(
        "seed secret 5f2c",
        pages={"/": Reply(body=_SEED_PAGE, content_type="text/html; charset=utf-8")},
    )
    for profile in PROFILES:
        origins[f"seed-{profile}"] = fleet.add(
            f"seed-{profile}",
            [_tls(seed_good), _tls(seed_bad)],
            seed_site,
            close_each_response=True,
        )
    # Overridable, and not a date error: a chain to a root nobody trusts (unknown_issuer).
    stranger = make_root("Stranger Root")
    both = make_leaf(
        make_intermediate(stranger, "Stranger Intermediate"),
        "override.example.test",
        sans=[
            "override.example.test",
            "other.example.test",
            "victim.example.test",
            "early.example.test",
        ],
    )
    origins["override"] = fleet.add(
        "override",
        ServerTls(chain=both.chain_pem() + stranger.pem, key=both.key_pem),
        Site("override content 81ad"),
    )
    origins["evil"] = fleet.add(
        "evil",
        _tls(make_leaf(inter, "evil.example.test")),
        Site("evil", pages={"/": Reply(body=_EVIL_PAGE, content_type="text/html; charset=utf-8")}),
    )
    hsts_site = Site("hsts content 3c9e", sts=STS, pages={})
    hsts_site.pages["/"] = Reply(
        body=b"hsts content 3c9e", headers=(("Strict-Transport-Security", STS),)
    )
    origins["hsts-good"] = fleet.add("hsts-good", _tls(make_leaf(inter, HSTS_HOST)), hsts_site)
    origins["hsts-bad"] = fleet.add(
        "hsts-bad", _tls(make_leaf(inter, HSTS_HOST, **expired)), Site("hsts bad content")
    )
    origins["hsts-sub-bad"] = fleet.add(
        "hsts-sub-bad",
        _tls(make_leaf(inter, f"sub.{HSTS_HOST}", **expired)),
        Site("hsts sub bad content"),
    )
    origins["control-bad"] = fleet.add(
        "control-bad", _tls(make_leaf(inter, "control.example.test", **expired)), Site("control")
    )
    roots = directory / "upstream-roots.pem"
    roots.write_bytes(root.pem)
    hosts = [
        "www.example.test",
        "seed.example.test",
        "override.example.test",
        "other.example.test",
        "victim.example.test",
        "early.example.test",
        "evil.example.test",
        HSTS_HOST,
        f"sub.{HSTS_HOST}",
        "control.example.test",
    ]
    state = Lab(fleet=fleet, origins=origins, proxies={}, directory=directory)
    try:
        fleet.start()
        for profile in PROFILES:
            state.proxies[profile] = TlsmitmServe(
                directory / f"serve-{profile}",
                profile=profile,
                extra_roots=roots,
                resolve=[f"{h}=127.0.0.1" for h in hosts],
            ).start()
        state.playwright = sync_playwright().start()
        for profile in PROFILES:
            proxy = state.proxies[profile]
            home = nss_home(directory / f"home-{profile}", certutil, [("tlsmitm", proxy.ca_path)])
            state.browsers[profile] = state.playwright.chromium.launch(
                executable_path=chromium_executable(),
                args=chromium_args(proxy.port),
                env=chromium_env(home),
            )
        yield state
    finally:
        for browser in state.browsers.values():
            browser.close()
        if state.playwright is not None:
            state.playwright.stop()
        codes = [proxy.stop() for proxy in state.proxies.values()]
        fleet.stop()
        assert all(code == 0 for code in codes), codes


# -- browsing through the proxy -------------------------------------------------------------------


def test_a_page_with_subresources_a_form_a_websocket_and_a_download(lab: Lab) -> None:
    page = lab.page("native")
    origin = lab.origins["browse"]
    try:
        response = page.goto(lab.url("browse", "www.example.test"), wait_until="load")
        assert response is not None
        assert response.status == 200
        page.wait_for_function("document.getElementById('status').textContent === 'script ran'")
        color = page.evaluate("getComputedStyle(document.getElementById('status')).color")
        assert color == "rgb(0, 128, 0)"  # the stylesheet applied
        assert page.evaluate(
            "document.getElementById('img').complete && "
            "document.getElementById('img').naturalWidth === 1"
        )
        seen = {r.target for r in origin.requests}
        assert {"/", "/app.js", "/style.css", "/img.png"} <= seen
        # The certificate Chromium accepted is tlsmitm's (it trusts nothing else).
        details = response.security_details()
        assert details is not None
        assert "tlsmitm" in str(details.get("issuer")), details

        # A download (Content-Disposition: attachment), byte for byte.
        with page.expect_download() as info:
            page.click("#dl")
        download = info.value
        assert Path(download.path()).read_bytes() == download_bytes("browse")

        # A form POST, and the response page.
        page.goto(lab.url("browse", "www.example.test", "/form"), wait_until="load")
        with page.expect_navigation():
            page.click("#send")
        assert page.inner_text("#posted") == "posted: q=hello+world"
        posted = [r for r in origin.requests if r.method == "POST"]
        assert posted[-1].target == "/submit"
        assert posted[-1].body == b"q=hello+world"

        # A WebSocket through the CONNECT tunnel: after the 101, its messages go through the
        # WebSocket relay (the hook's side of it: test_chromium_websocket.py).
        echoed = page.evaluate(
            """url => new Promise(resolve => {
                const ws = new WebSocket(url);
                ws.onopen = () => ws.send('ping over tlsmitm');
                ws.onmessage = event => { resolve(event.data); ws.close(); };
                ws.onerror = () => resolve('websocket error');
            })""",
            f"wss://www.example.test:{origin.port}/ws",
        )
        assert echoed == "ping over tlsmitm"
    finally:
        page.context.close()


# -- the seed exploit -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_seed_exploit_reads_nothing_and_cannot_frame_the_error_page(lab: Lab, profile: str) -> None:
    origin = lab.origins[f"seed-{profile}"]
    page = lab.page(profile)
    try:
        response = page.goto(lab.url(f"seed-{profile}", "seed.example.test"), wait_until="load")
        assert response is not None
        assert response.status == 200
        page.wait_for_function("document.title === 'done'", timeout=30_000)
        results: dict[str, str] = json.loads(page.inner_text("#out"))
        frames = [
            (frame.url, _frame_text(frame)) for frame in page.frames if frame != page.main_frame
        ]
    finally:
        page.context.close()

    # The one good connection served the page; every later one presented the bad certificate
    # and never carried a request to the origin.
    assert [(r.method, r.target) for r in origin.requests] == [("GET", "/")]
    assert origin.connections > 1, "the script's requests never reached the bad certificate"
    # Nothing readable: cross-origin redirects and TLS failures look the same to the script.
    assert results["fetch"] == "error TypeError", results
    assert results["xhr"] == "error status 0", results
    assert results["fetch_error_origin"] == "error TypeError", results
    assert results["fetch_no_cors"] in ("error TypeError", "opaque 0: "), results
    assert results["fetch_manual"] in ("error TypeError", "opaqueredirect 0 location=null: "), (
        results
    )
    assert results["frame_site"].startswith("blocked"), results
    assert results["frame_error_origin"].startswith("blocked"), results
    for value in results.values():
        for leaked in ("error.invalid", "tlsmitm", "token", "proceed", "seed secret"):
            assert leaked not in value, (leaked, results)
    # And the frames themselves never rendered an error-origin page (X-Frame-Options: DENY,
    # frame-ancestors 'none'), nor anything of the site: what they show is Chromium's own error.
    assert len(frames) == 2, frames
    for url, text in frames:
        assert url.startswith("chrome-error://"), (url, text)
        assert "tlsmitm" not in text, (url, text)


def _frame_text(frame: Any) -> str:
    from playwright.sync_api import Error as PlaywrightError

    try:
        return str(
            frame.evaluate("document.documentElement ? document.documentElement.innerText : ''")
        )
    except PlaywrightError:
        return ""


# -- the override (page profile) ------------------------------------------------------------------


def _to_error_page(page: Any, url: str) -> None:
    outcome = chromium_goto(page, url, b"override content 81ad")
    assert outcome.label == PAGE_OVERRIDE, outcome
    page.wait_for_load_state("load")
    assert page.url.startswith(ERROR_ORIGIN + "/error/")


def test_override_takes_two_separate_clicks_after_a_delay(lab: Lab) -> None:
    origin = lab.origins["override"]
    url = lab.url("override", "override.example.test")
    page = lab.page("page")
    proceed = page.locator("#proceed")
    advanced = page.locator("#advanced")
    try:
        # A click right after the control appears does nothing (clickjacking delay). On its own
        # host (same certificate), and retried on a fresh page if this machine was too slow to
        # click within 0.8 s of the reveal: such an attempt proves nothing either way.
        early = lab.url("override", "early.example.test")
        for _ in range(3):
            _to_error_page(page, early)
            error_page = page.url
            assert not proceed.is_visible()  # step 2 is hidden until step 1
            assert proceed.is_disabled()
            started = time.monotonic()
            advanced.click()
            box = proceed.bounding_box()
            assert box is not None
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            if time.monotonic() - started < 0.8:
                break
        else:
            pytest.fail("could not click within 0.8 s of revealing the control, three times")
        page.wait_for_timeout(300)
        assert page.url == error_page
        assert origin.requests == []

        # The two clicks are at different places: the second control is not under the first.
        first = advanced.bounding_box()
        assert first is not None
        assert not _overlap(first, box)
        # Closing the panel hides the second control again; a double click on the first
        # control (open, close) leaves nothing clickable under the pointer either.
        advanced.click()
        assert not proceed.is_visible()
        advanced.dblclick()
        assert not proceed.is_visible()
        assert page.url == error_page

        # After the delay, the second click goes through: the site loads...
        _to_error_page(page, url)
        advanced.click()
        page.wait_for_timeout(1200)
        with page.expect_navigation(url=url, wait_until="load"):
            proceed.click()
        assert "override content 81ad" in page.inner_text("body")
        overridden = f"override.example.test:{origin.port}"
        assert {r.header("host") for r in origin.requests} == {overridden}
        assert "/" in {r.target for r in origin.requests}

        # ...and only that site: the same certificate for another host still gets the page.
        other = chromium_goto(
            page, lab.url("override", "other.example.test"), b"override content 81ad"
        )
        assert other.label == PAGE_OVERRIDE, other
        assert {r.header("host") for r in origin.requests} == {overridden}
    finally:
        page.context.close()


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return not (
        a["x"] + a["width"] <= b["x"]
        or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"]
        or b["y"] + b["height"] <= a["y"]
    )


def test_another_origin_cannot_submit_the_override(lab: Lab) -> None:
    origin = lab.origins["override"]
    url = lab.url("override", "victim.example.test")
    page = lab.page("page")
    try:
        _to_error_page(page, url)
        # The worst case: the attacker somehow knows this page's reference and token.
        ref = page.locator("input[name=ref]").input_value()
        token = page.locator("input[name=token]").input_value()
        assert ref
        assert token
        page.wait_for_timeout(1100)  # the token is old enough; only its origin is wrong

        reset_page(page)
        page.goto(lab.url("evil", "evil.example.test"), wait_until="load")
        fetched = page.evaluate("([r, t]) => window.tryFetch(r, t)", [ref, token])
        assert fetched in ("opaque 0", "error TypeError"), fetched
        page.fill("#ref", ref)
        page.fill("#token", token)
        with page.expect_navigation(wait_until="load") as navigation:
            page.click("#go")  # a real user click, top-level, but from another origin
        response = navigation.value
        assert response is not None
        assert response.status == 403
        assert page.url.startswith(ERROR_ORIGIN)

        # No override was granted: the site still gets the page, and never saw a request.
        again = chromium_goto(page, url, b"override content 81ad")
        assert again.label == PAGE_OVERRIDE, again
        victim = f"victim.example.test:{origin.port}"
        assert all(r.header("host") != victim for r in origin.requests)
    finally:
        page.context.close()


# -- HSTS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_after_hsts_a_bad_certificate_offers_no_way_through(lab: Lab, profile: str) -> None:
    page = lab.page(profile)
    try:
        # Control: the same kind of error on a host without HSTS is overridable.
        control = chromium_goto(page, lab.url("control-bad", "control.example.test"), b"control")
        assert control.label == (CERT_ERROR if profile == "native" else PAGE_OVERRIDE), control

        reset_page(page)
        good = page.goto(lab.url("hsts-good", HSTS_HOST), wait_until="load")
        assert good is not None
        assert good.status == 200
        assert good.headers["strict-transport-security"] == STS

        for key, host in (("hsts-bad", HSTS_HOST), ("hsts-sub-bad", f"sub.{HSTS_HOST}")):
            outcome = chromium_goto(page, lab.url(key, host), lab.origins[key].marker)
            assert outcome.label == PAGE_BLOCK, (host, outcome)
            assert page.locator("#advanced").count() == 0
            assert page.locator("form").count() == 0
            assert lab.origins[key].requests == []
    finally:
        page.context.close()
