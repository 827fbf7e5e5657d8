"""ErrorResponder: the decision table, the error origin's pages, override tokens (issue 6).

Matrix §0 (block vs error passthrough), §5 and section G (UI-01..UI-07).
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tlsmitm._responder as responder_module
from tlsmitm._errors import CertError, ConfigurationError
from tlsmitm._names import InvalidHostName
from tlsmitm._responder import (
    OVERRIDE_NAMESPACE,
    Action,
    ActionKind,
    ErrorResponder,
    HttpRequest,
    HttpResponse,
    VerdictLike,
    client_identity,
    shared_token_key,
)
from tlsmitm._store import MemoryStore, StoredItem

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SEC = timedelta(seconds=1)
HOST = "www.example.test"
SHA = hashlib.sha256(b"upstream leaf").digest()
OTHER_SHA = hashlib.sha256(b"another leaf").digest()
ORIGIN = b"https://error.invalid"

# Written out here rather than read from CertError.overridable, so that the table below is an
# independent statement of the rule (Firefox's ERROR_TIME/DOMAIN/TRUST categories, matrix §5).
OVERRIDABLE = {
    CertError.EXPIRED,
    CertError.NOT_YET_VALID,
    CertError.NAME_MISMATCH,
    CertError.UNKNOWN_ISSUER,
    CertError.SELF_SIGNED,
    CertError.INCOMPLETE_CHAIN,
    CertError.VALIDITY_TOO_LONG,
}
NEVER_OVERRIDABLE = {
    CertError.REVOKED,
    CertError.WEAK_KEY,
    CertError.WEAK_SIGNATURE,
    CertError.BAD_SIGNATURE,
    CertError.MALFORMED,
    CertError.INVALID_CHAIN,
    CertError.DISTRUSTED,
    CertError.OWN_CA,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeVerdict:
    """Stands in for tlsmitm._verify.Verdict (same field names)."""

    ok: bool
    error: CertError | None
    detail: str = ""
    leaf_sha256: bytes | None = SHA


def failed(error: CertError, *, detail: str = "", sha: bytes | None = SHA) -> FakeVerdict:
    return FakeVerdict(ok=False, error=error, detail=detail, leaf_sha256=sha)


GOOD = FakeVerdict(ok=True, error=None)


class Counter:
    """Deterministic stand-in for secrets.token_bytes: distinct outputs, reproducible."""

    def __init__(self, seed: bytes = b"seed") -> None:
        self.seed = seed
        self.calls = 0

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.calls.to_bytes(8, "big") + out).digest()
        return out[:n]


def make(**kw: object) -> ErrorResponder:
    kw.setdefault("random", Counter())
    return ErrorResponder(**kw)  # type: ignore[arg-type]


def request(
    method: bytes = b"GET",
    target: bytes | str = b"/",
    *,
    host: bytes = b"error.invalid",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    body: bytes = b"",
) -> HttpRequest:
    if isinstance(target, str):
        target = target.encode("ascii")
    return HttpRequest(method=method, target=target, headers=((b"host", host), *headers), body=body)


def plan_page(
    r: ErrorResponder,
    *,
    error: CertError = CertError.EXPIRED,
    host: str = HOST,
    sha: bytes = SHA,
    hsts_known: bool = False,
    detail: str = "",
) -> Action:
    return r.plan(
        failed(error, sha=sha, detail=detail),
        host=host,
        hsts_known=hsts_known,
        client_speaks_http=True,
        now=NOW,
    )


def ref_of(redirect: HttpResponse) -> str:
    location = redirect.header(b"location")
    assert location is not None
    match = re.fullmatch(rb"https://error\.invalid/error/([0-9a-f]{32})", location)
    assert match, location
    return match.group(1).decode()


# -- a small DOM for html.parser ------------------------------------------------------------------

VOID = {"meta", "link", "input", "br", "img", "hr", "source", "wbr", "area", "base", "col"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    parent: Element | None
    text: list[str] = field(default_factory=list)

    def ancestors(self) -> list[Element]:
        out, node = [], self.parent
        while node is not None:
            out.append(node)
            node = node.parent
        return out

    def inside(self, other: Element) -> bool:
        return any(a is other for a in self.ancestors())


class Dom(HTMLParser):
    def __init__(self, body: bytes) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.stack: list[Element] = []
        self.texts: list[str] = []
        self.feed(body.decode("utf-8"))
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs), self.stack[-1] if self.stack else None)
        self.elements.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append(Element(tag, dict(attrs), self.stack[-1] if self.stack else None))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack, f"stray </{tag}>"
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        for element in self.stack:
            element.text.append(data)

    def by_id(self, ident: str) -> Element | None:
        found = [e for e in self.elements if e.attrs.get("id") == ident]
        assert len(found) <= 1, f"duplicate id {ident}"
        return found[0] if found else None

    def tags(self, tag: str) -> list[Element]:
        return [e for e in self.elements if e.tag == tag]

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.texts).split())


def page_of(r: ErrorResponder, redirect: HttpResponse, *, at: datetime = NOW) -> HttpResponse:
    return r.handle(request(target=f"/error/{ref_of(redirect)}"), now=at)


def override_page(r: ErrorResponder, **kw: object) -> tuple[str, str, HttpResponse]:
    """Plan an OVERRIDE_PAGE, follow the redirect, return (ref, token, page)."""
    action = plan_page(r, **kw)  # type: ignore[arg-type]
    assert action.kind is ActionKind.OVERRIDE_PAGE
    redirect = r.redirect_for(action, request_target=b"/path?q=secret", now=NOW)
    page = page_of(r, redirect)
    dom = Dom(page.body)
    ref = dom.tags("input")[0].attrs["value"]
    token = dom.tags("input")[1].attrs["value"]
    assert ref is not None
    assert token is not None
    assert ref == ref_of(redirect)
    return ref, token, page


GOOD_POST_HEADERS = (
    (b"origin", ORIGIN),
    (b"content-type", b"application/x-www-form-urlencoded"),
    (b"sec-fetch-site", b"same-origin"),
    (b"sec-fetch-mode", b"navigate"),
    (b"sec-fetch-dest", b"document"),
    (b"sec-fetch-user", b"?1"),
)


def post(
    r: ErrorResponder,
    ref: str,
    token: str,
    *,
    at: datetime = NOW + 2 * SEC,
    headers: tuple[tuple[bytes, bytes], ...] = GOOD_POST_HEADERS,
    body: bytes | None = None,
) -> HttpResponse:
    if body is None:
        body = f"ref={ref}&token={token}".encode()
    return r.handle(request(b"POST", "/override", headers=headers, body=body), now=at)


def granted(
    r: ErrorResponder,
    *,
    host: str = HOST,
    sha: bytes = SHA,
    error: CertError = CertError.EXPIRED,
    at: datetime = NOW,
    http: bool = True,
) -> bool:
    action = r.plan(
        failed(error, sha=sha), host=host, hsts_known=False, client_speaks_http=http, now=at
    )
    return action.kind is ActionKind.INTERCEPT and action.overridden


# -- the decision table ---------------------------------------------------------------------------


def expected_kind(error: CertError | None, hsts: bool, profile: str, http: bool) -> ActionKind:
    if error is None:
        return ActionKind.INTERCEPT
    if not http:
        return ActionKind.ALERT
    if error in OVERRIDABLE and not hsts:
        return ActionKind.PASSTHROUGH_UNTRUSTED if profile == "native" else ActionKind.OVERRIDE_PAGE
    return ActionKind.BLOCK_PAGE


RESPONDERS = {"native": make(profile="native"), "page": make(profile="page")}


@pytest.mark.parametrize("http", [True, False])
@pytest.mark.parametrize("profile", ["native", "page"])
@pytest.mark.parametrize("hsts", [False, True])
@pytest.mark.parametrize("error", [None, *CertError])
def test_decision_table(error: CertError | None, hsts: bool, profile: str, http: bool) -> None:
    verdict = GOOD if error is None else failed(error, detail="why")
    action = RESPONDERS[profile].plan(
        verdict, host=HOST, hsts_known=hsts, client_speaks_http=http, now=NOW
    )
    assert action.kind is expected_kind(error, hsts, profile, http)
    assert action.host == HOST
    assert action.error is error
    assert action.overridden is False
    assert action.may_record_hsts is (error is None)
    assert action.needs_page is (action.kind in {ActionKind.BLOCK_PAGE, ActionKind.OVERRIDE_PAGE})


def test_table_agrees_with_cert_error_overridable() -> None:
    assert {e for e in CertError if e.overridable} == OVERRIDABLE
    assert not NEVER_OVERRIDABLE & OVERRIDABLE


@pytest.mark.parametrize("error", sorted(NEVER_OVERRIDABLE, key=lambda e: e.value))
@pytest.mark.parametrize("profile", ["native", "page"])
def test_serious_errors_never_offer_a_way_through(error: CertError, profile: str) -> None:
    action = plan_page(RESPONDERS[profile], error=error)
    assert action.kind is ActionKind.BLOCK_PAGE


def test_plan_normalises_the_host_and_refuses_garbage() -> None:
    r = RESPONDERS["page"]
    action = plan_page(r, host="WWW.Bücher.Example.")
    assert action.host == "www.xn--bcher-kva.example"
    with pytest.raises(InvalidHostName):
        plan_page(r, host="<script>alert(1)</script>")


def test_a_verdict_that_failed_without_a_class_fails_closed() -> None:
    weird = FakeVerdict(ok=False, error=None)
    action = RESPONDERS["page"].plan(
        weird, host=HOST, hsts_known=False, client_speaks_http=True, now=NOW
    )
    assert action.kind is ActionKind.BLOCK_PAGE
    assert action.error is CertError.MALFORMED
    # ok=True with an error named is not trusted either.
    contradictory = FakeVerdict(ok=True, error=CertError.REVOKED)
    action = RESPONDERS["native"].plan(
        contradictory, host=HOST, hsts_known=False, client_speaks_http=True, now=NOW
    )
    assert action.kind is ActionKind.BLOCK_PAGE


@pytest.mark.parametrize("sha", [None, b"", b"short", SHA + b"x"])
def test_no_override_page_without_a_certificate_to_bind_to(sha: bytes | None) -> None:
    action = plan_page(RESPONDERS["page"], sha=sha)  # type: ignore[arg-type]
    assert action.kind is ActionKind.BLOCK_PAGE
    assert action.leaf_sha256 is None
    # The browser's own interstitial does not need one.
    native = plan_page(RESPONDERS["native"], sha=sha)  # type: ignore[arg-type]
    assert native.kind is ActionKind.PASSTHROUGH_UNTRUSTED


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        RESPONDERS["page"].plan(
            GOOD,
            host=HOST,
            hsts_known=False,
            client_speaks_http=True,
            now=datetime(2026, 1, 1),
        )


def test_real_verdict_with_a_real_leaf() -> None:
    """tlsmitm._verify.Verdict satisfies VerdictLike; the override binds to the leaf's DER."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from pki import good_hierarchy

    from tlsmitm._verify import Verdict

    leaf = good_hierarchy(HOST).leaf.cert
    digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest()
    verdict = Verdict(
        host=HOST,
        ok=False,
        error=CertError.UNKNOWN_ISSUER,
        detail="issuer not in the trust store",
        chain=(leaf,),
        leaf=leaf,
        leaf_sha256=digest,
    )
    r = make(profile="page")
    action = r.plan(verdict, host=HOST, hsts_known=False, client_speaks_http=True, now=NOW)
    assert action.kind is ActionKind.OVERRIDE_PAGE
    assert action.leaf_sha256 == digest
    page = page_of(r, r.redirect_for(action, now=NOW))
    assert ":".join(f"{b:02X}" for b in digest) in Dom(page.body).text


# -- the embedder's mapping is clamped ------------------------------------------------------------


@pytest.mark.parametrize("hsts", [False, True])
@pytest.mark.parametrize("error", list(CertError))
@pytest.mark.parametrize("mapped", [None, *ActionKind])
def test_mapping_cannot_widen_what_is_overridable(
    mapped: ActionKind | None, error: CertError, hsts: bool
) -> None:
    seen: list[tuple[VerdictLike, bool]] = []

    def mapping(verdict: VerdictLike, hsts_known: bool) -> ActionKind | None:
        seen.append((verdict, hsts_known))
        return mapped

    r = make(profile="page", mapping=mapping)
    verdict = failed(error)
    action = r.plan(verdict, host=HOST, hsts_known=hsts, client_speaks_http=True, now=NOW)
    assert seen == [(verdict, hsts)]
    may_override = error in OVERRIDABLE and not hsts
    if mapped is None:
        want = ActionKind.OVERRIDE_PAGE if may_override else ActionKind.BLOCK_PAGE
    elif mapped is ActionKind.INTERCEPT:
        want = ActionKind.BLOCK_PAGE  # an error never silently becomes a trusted leaf
    elif mapped in (ActionKind.OVERRIDE_PAGE, ActionKind.PASSTHROUGH_UNTRUSTED):
        want = mapped if may_override else ActionKind.BLOCK_PAGE
    else:
        want = mapped
    assert action.kind is want


def test_mapping_is_not_consulted_for_verified_connections() -> None:
    def mapping(verdict: VerdictLike, hsts_known: bool) -> ActionKind | None:
        raise AssertionError("called")

    r = make(mapping=mapping)
    action = r.plan(GOOD, host=HOST, hsts_known=False, client_speaks_http=True, now=NOW)
    assert action.kind is ActionKind.INTERCEPT


def test_mapping_returning_garbage_is_a_configuration_error() -> None:
    r = make(mapping=lambda verdict, hsts: "block_page")  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="ActionKind"):
        plan_page(r)


def test_non_http_clients_get_an_alert_whatever_the_mapping() -> None:
    r = make(mapping=lambda verdict, hsts: ActionKind.BLOCK_PAGE)
    action = r.plan(
        failed(CertError.REVOKED), host=HOST, hsts_known=False, client_speaks_http=False, now=NOW
    )
    assert action.kind is ActionKind.ALERT


# -- Action validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": ActionKind.INTERCEPT, "error": CertError.EXPIRED},  # error without override
        {"kind": ActionKind.INTERCEPT, "error": None, "overridden": True},
        {"kind": ActionKind.INTERCEPT, "error": CertError.REVOKED, "overridden": True},
        {
            "kind": ActionKind.INTERCEPT,
            "error": CertError.EXPIRED,
            "overridden": True,
            "hsts_known": True,
        },
        {"kind": ActionKind.INTERCEPT, "error": CertError.EXPIRED, "overridden": True},  # no sha
        {"kind": ActionKind.BLOCK_PAGE, "error": None},
        {"kind": ActionKind.ALERT, "error": None},
        {"kind": ActionKind.BLOCK_PAGE, "error": CertError.REVOKED, "overridden": True},
        {"kind": ActionKind.OVERRIDE_PAGE, "error": CertError.REVOKED},
        {"kind": ActionKind.OVERRIDE_PAGE, "error": CertError.EXPIRED},  # no sha
        {"kind": ActionKind.PASSTHROUGH_UNTRUSTED, "error": CertError.BAD_SIGNATURE},
        {"kind": ActionKind.PASSTHROUGH_UNTRUSTED, "error": CertError.EXPIRED, "hsts_known": True},
        {"kind": ActionKind.BLOCK_PAGE, "error": CertError.EXPIRED, "leaf_sha256": b"x"},
        {"kind": ActionKind.BLOCK_PAGE, "error": CertError.EXPIRED, "host": ""},
    ],
)
def test_action_refuses_impossible_combinations(kwargs: dict[str, object]) -> None:
    kwargs = {"host": HOST, **kwargs}
    with pytest.raises(ValueError):  # each case has its own message
        Action(**kwargs)  # type: ignore[arg-type]


def test_action_accepts_an_override_grant() -> None:
    action = Action(
        kind=ActionKind.INTERCEPT,
        host=HOST,
        error=CertError.EXPIRED,
        overridden=True,
        leaf_sha256=SHA,
    )
    assert not action.may_record_hsts
    assert not action.needs_page


# -- the redirect (the only thing said inside the site's origin) ----------------------------------


def test_redirect_is_bodiless_uncacheable_and_carries_only_an_opaque_reference() -> None:
    r = make(profile="page")
    action = plan_page(r, detail="secret detail")
    redirect = r.redirect_for(action, request_target=b"/account?session=abc", port=8443, now=NOW)
    assert redirect.status == 303
    assert redirect.body == b""
    assert redirect.header(b"content-length") == b"0"
    assert redirect.header(b"cache-control") == b"no-store"
    assert redirect.header(b"referrer-policy") == b"no-referrer"
    assert redirect.header(b"connection") == b"close"
    ref_of(redirect)  # exactly origin + /error/ + 128 bits of hex
    everything = b"".join(k + v for k, v in redirect.headers)
    for secret in (HOST.encode(), b"session", b"8443", b"secret", SHA.hex().encode()):
        assert secret not in everything


def test_references_are_unique_and_drawn_from_the_injected_random() -> None:
    rng = Counter()
    r = make(profile="page", random=rng)
    action = plan_page(r)
    refs = {ref_of(r.redirect_for(action, now=NOW)) for _ in range(50)}
    assert len(refs) == 50
    before = rng.calls
    r.redirect_for(action, now=NOW)
    assert rng.calls == before + 1


def test_default_randomness_is_secrets() -> None:
    r = ErrorResponder(profile="page")
    a = ref_of(r.redirect_for(plan_page(r), now=NOW))
    b = ref_of(r.redirect_for(plan_page(r), now=NOW))
    assert a != b


@pytest.mark.parametrize(
    "kind", [ActionKind.INTERCEPT, ActionKind.PASSTHROUGH_UNTRUSTED, ActionKind.ALERT]
)
def test_redirect_only_for_page_actions(kind: ActionKind) -> None:
    r = make(profile="native")
    error = None if kind is ActionKind.INTERCEPT else CertError.EXPIRED
    action = Action(kind=kind, host=HOST, error=error)
    with pytest.raises(ValueError, match="BLOCK_PAGE or OVERRIDE_PAGE"):
        r.redirect_for(action, now=NOW)


@pytest.mark.parametrize("port", [0, 65536, -1, True])
def test_redirect_refuses_bad_ports(port: int) -> None:
    r = make(profile="page")
    with pytest.raises(ValueError, match="port"):
        r.redirect_for(plan_page(r), port=port, now=NOW)


def test_block_redirects_too() -> None:
    r = make()
    redirect = r.block(host=HOST, title="Virus found", explanation="EICAR", now=NOW)
    assert redirect.status == 303
    assert redirect.header(b"connection") == b"close"
    assert HOST.encode() not in redirect.header(b"location")  # type: ignore[operator]
    with pytest.raises(InvalidHostName):
        r.block(host="a..b", title="t", explanation="e", now=NOW)


# -- the pages ------------------------------------------------------------------------------------

SECURITY_HEADERS = {
    b"cache-control": b"no-store",
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
}


def assert_protected(response: HttpResponse) -> None:
    names = [k for k, _ in response.headers]
    assert len(names) == len(set(names)), "duplicate headers"
    for name, value in SECURITY_HEADERS.items():
        assert response.header(name) == value, name
    csp = response.header(b"content-security-policy")
    assert csp is not None
    directives = {d.split()[0]: d.split()[1:] for d in csp.decode().split(";") if d.strip()}
    assert directives["default-src"] == ["'none'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["base-uri"] == ["'none'"]
    assert "form-action" in directives
    # No referrer to any other origin. Only the override page, whose form must send a real Origin
    # (browsers send "Origin: null" under no-referrer), relaxes it to same-origin.
    with_form = directives["form-action"] != ["'none'"]
    want = b"same-origin" if with_form else b"no-referrer"
    assert response.header(b"referrer-policy") == want
    assert b"unsafe" not in csp
    length = response.header(b"content-length")
    assert length is not None
    assert response.body == b"" or int(length) == len(response.body)


def assert_static_markup(dom: Dom) -> None:
    """Nothing the page's CSP would have to allow inline: one same-origin script, no handlers."""
    scripts = dom.tags("script")
    assert [s.attrs.get("src") for s in scripts] == ["/static/error.js"]
    assert all(not "".join(s.text).strip() for s in scripts)
    assert not dom.tags("style")
    assert not dom.tags("iframe")
    assert not dom.tags("img")
    for element in dom.elements:
        for name in element.attrs:
            assert not name.startswith("on"), (element.tag, name)
            assert name != "style", element.tag
    # A <meta name="referrer"> would override the Referrer-Policy header.
    assert not [m for m in dom.tags("meta") if (m.attrs.get("name") or "").lower() == "referrer"]
    links = [e.attrs.get("href") for e in dom.tags("link") if e.attrs.get("rel") == "stylesheet"]
    assert links == ["/static/error.css"]


def test_override_page_structure() -> None:  # matrix UI-01, UI-04
    r = make(profile="page")
    ref, token, page = override_page(r)
    assert page.status == 502
    assert page.header(b"content-type") == b"text/html; charset=utf-8"
    assert_protected(page)
    csp = page.header(b"content-security-policy")
    assert b"form-action 'self' https://www.example.test:443" in csp  # type: ignore[operator]
    assert page.header(b"referrer-policy") == b"same-origin"  # so the POST carries its Origin
    dom = Dom(page.body)
    assert_static_markup(dom)
    back, advanced = dom.by_id("back"), dom.by_id("advanced")
    panel, form, proceed = (
        dom.by_id("advanced-panel"),
        dom.by_id("proceed-form"),
        dom.by_id("proceed"),
    )
    assert back is not None
    assert advanced is not None
    assert panel is not None
    assert form is not None
    assert proceed is not None
    assert len({id(back), id(advanced), id(proceed)}) == 3
    assert back.tag == "a"
    assert back.attrs["href"] == "/"  # works without script too
    assert "primary" in (back.attrs.get("class") or "")
    assert advanced.tag == "button"
    assert advanced.attrs["type"] == "button"
    # "Proceed" is hidden behind "Advanced", in another place, and starts disabled.
    assert "hidden" in panel.attrs
    assert proceed.inside(panel)
    assert proceed.inside(form)
    assert not advanced.inside(panel)
    assert not proceed.inside(advanced.parent)  # type: ignore[arg-type]
    assert proceed.attrs["type"] == "submit"
    assert "disabled" in proceed.attrs
    assert "small-link" in (proceed.attrs.get("class") or "")
    assert form.attrs["method"] == "post"
    assert form.attrs["action"] == "/override"
    inputs = dom.tags("input")
    assert [(i.attrs["type"], i.attrs["name"]) for i in inputs] == [
        ("hidden", "ref"),
        ("hidden", "token"),
    ]
    assert all(i.inside(form) for i in inputs)
    assert inputs[0].attrs["value"] == ref
    assert inputs[1].attrs["value"] == token
    # UI-07: the error class and the fingerprint, behind a disclosure.
    details = dom.tags("details")
    assert len(details) == 1
    detail_text = " ".join("".join(details[0].text).split())
    assert "expired" in detail_text
    assert ":".join(f"{b:02X}" for b in SHA) in detail_text
    assert "Continue to www.example.test (unsafe)" in dom.text
    assert "1 hour" in dom.text
    assert dom.tags("h1")
    assert dom.tags("html")[0].attrs["lang"] == "en"


@pytest.mark.parametrize(
    ("error", "hsts", "wording"),
    [
        (CertError.REVOKED, False, "This problem is serious"),
        (CertError.EXPIRED, True, "only allows secure connections"),
        (CertError.BAD_SIGNATURE, True, "only allows secure connections"),
    ],
)
def test_block_page_has_no_way_through(error: CertError, hsts: bool, wording: str) -> None:
    r = make(profile="page")
    action = plan_page(r, error=error, hsts_known=hsts)
    assert action.kind is ActionKind.BLOCK_PAGE
    page = page_of(r, r.redirect_for(action, now=NOW))
    assert page.status == 502
    assert_protected(page)
    assert b"form-action 'none'" in page.header(b"content-security-policy")  # type: ignore[operator]
    dom = Dom(page.body)
    assert_static_markup(dom)
    assert dom.by_id("back") is not None
    for absent in ("advanced", "advanced-panel", "proceed", "proceed-form"):
        assert dom.by_id(absent) is None
    assert not dom.tags("form")
    assert not dom.tags("input")  # no token, no reference
    assert not dom.tags("button")
    assert wording in dom.text
    assert error.value in dom.text


def test_every_error_class_has_wording() -> None:
    r = make(profile="page")
    texts = set()
    for error in CertError:
        page = page_of(r, r.redirect_for(plan_page(r, error=error), now=NOW))
        reason = [e for e in Dom(page.body).elements if e.attrs.get("class") == "reason"]
        assert len(reason) == 1
        text = "".join(reason[0].text)
        assert len(text) > 20
        texts.add(text)
    assert len(texts) == len(CertError)


def test_embedder_block_page() -> None:
    r = make(profile="page", brand="Acme Shield")
    redirect = r.block(
        host="Bücher.example",
        title="Virus found",
        explanation="The download contained EICAR-Test-File.",
        now=NOW,
    )
    page = page_of(r, redirect)
    assert page.status == 403
    assert_protected(page)
    dom = Dom(page.body)
    assert_static_markup(dom)
    assert not dom.tags("form")
    assert not dom.tags("input")
    assert "".join(dom.tags("h1")[0].text) == "Virus found"
    assert "EICAR-Test-File" in dom.text
    assert "Acme Shield" in dom.text
    assert dom.by_id("back") is not None


def test_host_is_shown_as_punycode() -> None:  # matrix UI-07
    r = make(profile="page")
    _, _, page = override_page(r, host="bücher.example")
    text = Dom(page.body).text
    assert "xn--bcher-kva.example" in text
    assert "bücher" not in page.body.decode("utf-8")


XSS = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>&amp;"


def test_echoed_text_is_escaped() -> None:
    r = make(profile="page")
    _, _, page = override_page(r, detail=XSS)
    dom = Dom(page.body)
    assert_static_markup(dom)  # no injected script, img or handler
    assert "<script>alert(1)</script>" in dom.text  # shown as text
    assert "&amp;" in dom.text  # and not decoded twice
    redirect = r.block(host=HOST, title=XSS, explanation=XSS, now=NOW)
    dom = Dom(page_of(r, redirect).body)
    assert_static_markup(dom)
    assert "onerror=alert(2)" in dom.text


def test_brand_is_escaped_too() -> None:
    r = make(profile="page", brand="<b>Evil</b>")
    dom = Dom(page_of(r, r.redirect_for(plan_page(r, error=CertError.OWN_CA), now=NOW)).body)
    assert not dom.tags("b")
    assert "<b>Evil</b>" in dom.text


def test_pages_carry_no_identifiers() -> None:
    """Two installations, two users: the same error gives the same page, byte for byte.

    The only difference on an override page is the hidden form's reference and token.
    """
    a = make(profile="page", random=Counter(b"install-a"), token_key=b"A" * 32)
    b = make(profile="page", random=Counter(b"install-b"), token_key=b"B" * 32)
    for error, hsts in ((CertError.REVOKED, False), (CertError.EXPIRED, True)):
        pages = [
            page_of(r, r.redirect_for(plan_page(r, error=error, hsts_known=hsts), now=NOW))
            for r in (a, b)
        ]
        assert pages[0].body == pages[1].body
        assert pages[0].headers == pages[1].headers
    block = [page_of(r, r.block(host=HOST, title="t", explanation="e", now=NOW)) for r in (a, b)]
    assert block[0].body == block[1].body
    bodies = []
    for r in (a, b):
        ref, token, page = override_page(r)
        body = page.body.decode()
        assert body.count(ref) == 1
        assert body.count(token) == 1
        # Nothing visible: the reference and token are only attribute values of hidden inputs.
        assert ref not in Dom(page.body).text
        assert token not in Dom(page.body).text
        bodies.append(body.replace(ref, "REF").replace(token, "TOKEN"))
    assert bodies[0] == bodies[1]
    assert b"A" * 16 not in a.handle(request(target="/static/error.js"), now=NOW).body


def test_query_strings_are_never_echoed() -> None:
    r = make(profile="page")
    _, _, page = override_page(r)  # first request was /path?q=secret
    assert b"secret" not in page.body
    assert b"/path" not in page.body


def test_page_can_be_viewed_again_until_it_expires() -> None:
    r = make(profile="page", page_ttl=timedelta(minutes=10))
    redirect = r.redirect_for(plan_page(r), now=NOW)
    assert page_of(r, redirect).status == 502
    assert page_of(r, redirect, at=NOW + timedelta(minutes=9)).status == 502
    expired = page_of(r, redirect, at=NOW + timedelta(minutes=10))
    assert expired.status == 404
    assert_protected(expired)
    assert "expired" in Dom(expired.body).text.lower()


def test_page_table_is_bounded() -> None:
    r = make(profile="page", max_pages=3)
    redirects = [r.redirect_for(plan_page(r), now=NOW) for _ in range(5)]
    statuses = [page_of(r, x).status for x in redirects]
    assert statuses == [404, 404, 502, 502, 502]


@pytest.mark.parametrize(
    ("ttl", "text"),
    [
        (timedelta(minutes=1), "1 minute"),
        (timedelta(minutes=90), "90 minutes"),
        (timedelta(hours=1), "1 hour"),
        (timedelta(hours=5), "5 hours"),
        (timedelta(days=1), "1 day"),
        (timedelta(days=7), "7 days"),
    ],
)
def test_override_duration_is_stated(ttl: timedelta, text: str) -> None:
    r = make(profile="page", override_ttl=ttl)
    _, _, page = override_page(r)
    assert f"for {text}." in Dom(page.body).text


# -- the rest of the error origin -----------------------------------------------------------------


def test_static_assets() -> None:
    r = make()
    css = r.handle(request(target="/static/error.css"), now=NOW)
    js = r.handle(request(target="/static/error.js"), now=NOW)
    assert css.status == js.status == 200
    assert css.header(b"content-type") == b"text/css; charset=utf-8"
    assert js.header(b"content-type") == b"text/javascript; charset=utf-8"
    assert_protected(css)
    assert_protected(js)
    assert b"[hidden]" in css.body
    assert b"DELAY_MS = 1000" in js.body  # matrix UI-02
    assert b"window.top !== window.self" in js.body  # UI-04: no override in frames
    for forbidden in (b"keydown", b"keypress", b"keyup", b"atob"):  # UI-06: no bypass keyword
        assert forbidden not in js.body
    head = r.handle(request(b"HEAD", "/static/error.js"), now=NOW)
    assert head.body == b""
    assert head.header(b"content-length") == js.header(b"content-length")


def test_root_is_a_neutral_page() -> None:
    r = make()
    response = r.handle(request(target="/"), now=NOW)
    assert response.status == 200
    assert_protected(response)
    assert "You left the site" in Dom(response.body).text


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        (b"GET", "/nothing", 404),
        (b"GET", "/static/other.js", 404),
        (b"GET", "/static/../error.js", 404),
        (b"GET", "/error/", 404),
        (b"GET", "/error/zz", 404),
        (b"GET", "/error/" + "A" * 32, 404),
        (b"GET", "/override", 405),
        (b"PUT", "/override", 405),
        (b"POST", "/error/" + "a" * 32, 405),
        (b"DELETE", "/", 405),
        (b"OPTIONS", "/static/error.css", 405),
        (b"GET", "http://error.invalid/", 400),
        (b"GET", "*", 400),
        (b"GET", "/a b", 400),
    ],
)
def test_routing(method: bytes, target: str, status: int) -> None:
    response = make().handle(request(method, target), now=NOW)
    assert response.status == status
    assert_protected(response)
    if status == 405:
        assert response.header(b"allow") in (b"POST", b"GET, HEAD")


@pytest.mark.parametrize(
    ("hosts", "status"),
    [
        ((), 400),
        ((b"error.invalid", b"error.invalid"), 400),
        ((b"error.invalid:443",), 200),
        ((b"ERROR.invalid.",), 200),
        ((b"error.invalid:8443",), 421),
        ((b"attacker.example",), 421),  # DNS rebinding onto the error origin
        ((b"error.invalid:",), 421),
        ((b"\xff",), 421),
        ((b"[::1",), 421),
    ],
)
def test_host_header_must_name_the_error_origin(hosts: tuple[bytes, ...], status: int) -> None:
    req = HttpRequest(
        method=b"GET", target=b"/", headers=tuple((b"host", h) for h in hosts), body=b""
    )
    response = make().handle(req, now=NOW)
    assert response.status == status
    assert_protected(response)


def test_non_ascii_target_is_a_bad_request() -> None:
    response = make().handle(request(target=b"/\xff"), now=NOW)
    assert response.status == 400


def test_is_error_origin() -> None:
    r = make()
    assert r.error_origin == "https://error.invalid"
    assert (r.error_origin_host, r.error_origin_port) == ("error.invalid", 443)
    assert r.is_error_origin("error.invalid", 443)
    assert r.is_error_origin("ERROR.Invalid.", 443)
    assert r.is_error_origin(b"error.invalid", 443)
    assert not r.is_error_origin("error.invalid", 8443)
    assert not r.is_error_origin("www.error.invalid", 443)
    assert not r.is_error_origin("a..b", 443)


http_methods = st.one_of(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"get", b""]), st.binary(max_size=8)
)
http_targets = st.one_of(
    st.sampled_from([b"/", b"/override", b"/error/", b"/static/error.js", b"/error/" + b"a" * 32]),
    st.binary(max_size=64),
    st.text(max_size=40).map(lambda t: ("/" + t).encode("utf-8")),
)
header_names = st.sampled_from(
    [b"host", b"origin", b"content-type", b"sec-fetch-site", b"sec-fetch-user", b"Host", b"x"]
)
header_values = st.one_of(
    st.sampled_from(
        [b"error.invalid", ORIGIN, b"application/x-www-form-urlencoded", b"same-origin", b"?1"]
    ),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=http_methods,
    target=http_targets,
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    body=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=100).map(str.encode),
        st.just(b"ref=" + b"a" * 32 + b"&token=AAAA"),
    ),
)
def test_handle_never_raises_and_never_grants_by_accident(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    r = FUZZ_RESPONDER
    response = r.handle(
        HttpRequest(method=method, target=target, headers=tuple(headers), body=body), now=NOW
    )
    assert isinstance(response, HttpResponse)
    assert response.status != 303
    assert_protected(response)


FUZZ_RESPONDER = make(profile="page")


# -- overrides ------------------------------------------------------------------------------------


def test_override_flow() -> None:  # matrix UI-05
    store = MemoryStore()
    r = make(profile="page", override_store=store)
    ref, token, _ = override_page(r)
    response = post(r, ref, token)
    assert response.status == 303
    assert response.header(b"location") == b"https://www.example.test/path?q=secret"
    assert response.header(b"cache-control") == b"no-store"
    assert response.body == b""
    action = r.plan(
        failed(CertError.EXPIRED), host=HOST, hsts_known=False, client_speaks_http=True, now=NOW
    )
    assert action.kind is ActionKind.INTERCEPT
    assert action.overridden
    assert action.error is CertError.EXPIRED
    assert not action.may_record_hsts  # the relay must not learn HSTS from this connection
    items = list(store.items(OVERRIDE_NAMESPACE))
    assert len(items) == 1
    assert items[0].key.startswith(f"{HOST} {SHA.hex()} expired ")
    assert items[0].expires == (NOW + 2 * SEC + timedelta(hours=1)).timestamp()


def test_override_applies_to_exactly_one_triple() -> None:
    r = make(profile="page")
    ref, token, _ = override_page(r)
    assert post(r, ref, token).status == 303
    assert granted(r)
    assert not granted(r, host="other.example.test")
    assert not granted(r, host="sub.www.example.test")
    assert not granted(r, sha=OTHER_SHA)
    assert not granted(r, error=CertError.NAME_MISMATCH)
    assert granted(r, http=False)  # the same user decision, whatever protocol follows
    # Never for a host that became a known HSTS host, nor for a serious error.
    hsts = r.plan(
        failed(CertError.EXPIRED), host=HOST, hsts_known=True, client_speaks_http=True, now=NOW
    )
    assert hsts.kind is ActionKind.BLOCK_PAGE


ALICE = client_identity("192.0.2.10")
BOB = client_identity("192.0.2.11")


def client_page(r: ErrorResponder, client: str | None) -> tuple[str, str]:
    """An override page shown to ``client``: (ref, token)."""
    action = r.plan(
        failed(CertError.EXPIRED),
        host=HOST,
        hsts_known=False,
        client_speaks_http=True,
        now=NOW,
        client=client,
    )
    assert action.kind is ActionKind.OVERRIDE_PAGE
    redirect = r.redirect_for(action, now=NOW, client=client)
    page = r.handle(request(target=f"/error/{ref_of(redirect)}"), now=NOW, client=client)
    dom = Dom(page.body)
    ref, token = (dom.tags("input")[i].attrs["value"] for i in (0, 1))
    assert ref is not None
    assert token is not None
    return ref, token


def client_post(r: ErrorResponder, ref: str, token: str, client: str | None) -> HttpResponse:
    body = f"ref={ref}&token={token}".encode()
    return r.handle(
        request(b"POST", "/override", headers=GOOD_POST_HEADERS, body=body),
        now=NOW + 2 * SEC,
        client=client,
    )


def client_granted(r: ErrorResponder, client: str | None) -> bool:
    action = r.plan(
        failed(CertError.EXPIRED),
        host=HOST,
        hsts_known=False,
        client_speaks_http=True,
        now=NOW + 3 * SEC,
        client=client,
    )
    return action.overridden


def test_override_is_granted_only_to_the_client_that_clicked() -> None:  # issue 15 fault 4
    store = MemoryStore()
    r = make(profile="page", override_store=store)
    ref, token = client_page(r, ALICE)
    assert client_post(r, ref, token, ALICE).status == 303
    assert client_granted(r, ALICE)
    assert not client_granted(r, BOB)  # another client behind the same proxy
    assert not client_granted(r, None)  # nor the anonymous client
    assert not client_granted(r, client_identity("192.0.2.10", user="alice"))
    # A second responder on the same store (another worker) honours exactly the same binding.
    again = make(profile="page", override_store=store)
    assert client_granted(again, ALICE)
    assert not client_granted(again, BOB)
    # The store holds no client address in clear.
    assert all("192.0.2" not in item.key for item in store.items(OVERRIDE_NAMESPACE))


def test_another_client_cannot_grant_with_a_page_it_was_not_shown() -> None:
    """Bob's script learns Alice's ref and token and forges every Sec-Fetch-* header."""
    r = make(profile="page")
    ref, token = client_page(r, ALICE)
    refused = client_post(r, ref, token, BOB)
    assert refused.status == 403
    assert not client_granted(r, BOB)
    assert not client_granted(r, ALICE)  # Bob's forgery did not grant for Alice either
    # Alice's own click still works: the refused attempt did not spend her token.
    assert client_post(r, ref, token, ALICE).status == 303
    assert client_granted(r, ALICE)
    assert not client_granted(r, BOB)


def test_override_of_an_authenticated_user_follows_the_user() -> None:
    r = make(profile="page")
    carol_at_desk = client_identity("192.0.2.20", user="carol")
    ref, token = client_page(r, carol_at_desk)
    assert client_post(r, ref, token, carol_at_desk).status == 303
    assert client_granted(r, client_identity("198.51.100.7", user="carol"))
    assert not client_granted(r, client_identity("192.0.2.20", user="dave"))
    assert not client_granted(r, client_identity("192.0.2.20"))


def test_revoke_overrides_of_one_client() -> None:
    r = make(profile="page")
    for who in (ALICE, BOB):
        ref, token = client_page(r, who)
        assert client_post(r, ref, token, who).status == 303
    assert r.revoke_overrides(client=ALICE) == 1
    assert not client_granted(r, ALICE)
    assert client_granted(r, BOB)


def test_client_identity() -> None:
    assert client_identity("192.0.2.1") == "addr:192.0.2.1"
    assert client_identity("192.0.2.1", user="u") == "user:u"
    assert client_identity("2001:db8::1") != client_identity("2001:db8::1", user="2001:db8::1")


def test_override_is_time_limited() -> None:
    r = make(profile="page", override_ttl=timedelta(hours=1))
    ref, token, _ = override_page(r)
    assert post(r, ref, token).status == 303
    granted_at = NOW + 2 * SEC
    assert granted(r, at=granted_at + timedelta(minutes=59))
    assert not granted(r, at=granted_at + timedelta(hours=1))


def test_override_only_counts_where_the_profile_offers_it() -> None:
    store = MemoryStore()
    page = make(profile="page", override_store=store)
    ref, token, _ = override_page(page)
    assert post(page, ref, token).status == 303
    # Same store, other policy: the browser's own interstitial decides, not our old grant.
    native = make(profile="native", override_store=store)
    action = plan_page(native)
    assert action.kind is ActionKind.PASSTHROUGH_UNTRUSTED
    blocking = make(
        profile="page", override_store=store, mapping=lambda v, h: ActionKind.BLOCK_PAGE
    )
    assert plan_page(blocking).kind is ActionKind.BLOCK_PAGE
    # A second process with the same persistent store honours it.
    again = make(profile="page", override_store=store)
    assert granted(again)


def test_revoke_overrides() -> None:
    r = make(profile="page")
    for host in (HOST, "two.example.test"):
        ref, token, _ = override_page(r, host=host)
        assert post(r, ref, token).status == 303
    assert r.revoke_overrides(host="WWW.example.test") == 1
    assert not granted(r)
    assert granted(r, host="two.example.test")
    assert r.revoke_overrides() == 1
    assert not granted(r, host="two.example.test")


def test_override_store_is_bounded() -> None:
    store = MemoryStore()
    r = make(profile="page", override_store=store, max_overrides=2)
    for i in range(4):
        ref, token, _ = override_page(r, host=f"h{i}.example.test")
        assert post(r, ref, token).status == 303
    assert len(list(store.items(OVERRIDE_NAMESPACE))) == 2


def test_return_target_keeps_the_port_and_ipv6_brackets() -> None:
    r = make(profile="page")
    for host, port, want in (
        (HOST, 8443, b"https://www.example.test:8443/"),
        ("2001:db8::1", 443, b"https://[2001:db8::1]/"),
        ("192.0.2.7", 443, b"https://192.0.2.7/"),
    ):
        action = plan_page(r, host=host)
        ref = ref_of(r.redirect_for(action, port=port, now=NOW))
        page = r.handle(request(target=f"/error/{ref}"), now=NOW)
        token = Dom(page.body).tags("input")[1].attrs["value"]
        assert token is not None
        csp = page.header(b"content-security-policy")
        assert csp is not None
        # form-action must allow the redirect back (browsers apply it to redirects).
        allowed = b"https:" if host[0].isdigit() else b"https://%s:%d" % (host.encode(), port)
        assert b"form-action 'self' " + allowed + b";" in csp
        assert post(r, ref, token).header(b"location") == want


@pytest.mark.parametrize(
    "target",
    [b"http://evil.example/", b"*", b"evil.example:443", b"/a b", b"/\x00", b"/\xc3\xa9", b"/#x"],
)
def test_odd_first_targets_return_to_the_root(target: bytes) -> None:
    r = make(profile="page")
    ref = ref_of(r.redirect_for(plan_page(r), request_target=target, now=NOW))
    page = r.handle(request(target=f"/error/{ref}"), now=NOW)
    token = Dom(page.body).tags("input")[1].attrs["value"]
    assert token is not None
    assert post(r, ref, token).header(b"location") == b"https://www.example.test/"


def test_token_is_single_use_and_so_is_the_page() -> None:
    r = make(profile="page")
    ref, token, _ = override_page(r)
    # A second token for the same page, minted by viewing it again.
    second = Dom(page_of_ref(r, ref).body).tags("input")[1].attrs["value"]
    assert second is not None
    assert second != token
    assert post(r, ref, token).status == 303
    assert post(r, ref, token).status == 404  # replay: the reference is spent
    assert post(r, ref, second).status == 404
    assert page_of_ref(r, ref).status == 404


def page_of_ref(r: ErrorResponder, ref: str, at: datetime = NOW) -> HttpResponse:
    return r.handle(request(target=f"/error/{ref}"), now=at)


def test_spent_nonces_are_refused_even_if_a_page_came_back() -> None:
    """Defence in depth: the nonce set refuses a replay on its own."""
    r = make(profile="page")
    ref, token, _ = override_page(r)
    saved = r._pages[ref]
    assert post(r, ref, token).status == 303
    r._pages[ref] = saved  # as if the reference had not been consumed
    assert post(r, ref, token).status == 403


def test_too_fast_is_refused_but_does_not_burn_the_token() -> None:  # matrix UI-02
    r = make(profile="page")
    ref, token, _ = override_page(r)
    assert post(r, ref, token, at=NOW + timedelta(milliseconds=500)).status == 403
    assert post(r, ref, token, at=NOW - SEC).status == 403  # minted "in the future"
    assert not granted(r)
    assert post(r, ref, token, at=NOW + timedelta(milliseconds=1000)).status == 303


def test_stale_token_is_refused() -> None:
    r = make(profile="page", page_ttl=timedelta(minutes=10))
    redirect = r.redirect_for(plan_page(r), now=NOW)
    ref = ref_of(redirect)
    # Viewed late, posted after the page expired.
    late = NOW + timedelta(minutes=9)
    token = Dom(page_of_ref(r, ref, late).body).tags("input")[1].attrs["value"]
    assert token is not None
    assert post(r, ref, token, at=NOW + timedelta(minutes=10)).status == 404
    assert not granted(r)


def tweak(token: str, index: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[index] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize("index", [0, 7, 8, 23, 24, 55])  # issued time, nonce, mac
def test_tampered_tokens_are_refused(index: int) -> None:
    r = make(profile="page")
    ref, token, _ = override_page(r)
    assert post(r, ref, tweak(token, index)).status == 403
    assert not granted(r)


@pytest.mark.parametrize(
    "forged",
    ["", "A", "A" * 75, "A" * 76, "!!!!", "A" * 74 + "é", "AAAA" * 19, "ref"],
)
def test_garbage_tokens_are_refused(forged: str) -> None:
    r = make(profile="page")
    ref, _, _ = override_page(r)
    body = f"ref={ref}&token={forged}".encode()
    assert post(r, ref, forged, body=body).status in (400, 403)
    assert not granted(r)


def test_token_is_bound_to_its_page() -> None:
    r = make(profile="page")
    ref_a, token_a, _ = override_page(r)
    ref_b, _, _ = override_page(r)  # the same triple, another page
    assert post(r, ref_b, token_a).status == 403
    ref_c, _, _ = override_page(r, host="evil.example.test")
    assert post(r, ref_c, token_a).status == 403  # can't move a token to another host
    assert not granted(r, host="evil.example.test")
    assert post(r, ref_a, token_a).status == 303


@pytest.mark.parametrize(
    "change",
    [
        {"host": "other.example.test"},
        {"leaf_sha256": OTHER_SHA},
        {"error": CertError.NAME_MISMATCH},
    ],
)
def test_token_is_bound_to_the_triple(change: dict[str, object]) -> None:
    """The MAC covers (host, certificate SHA-256, error class), not only the reference."""
    r = make(profile="page")
    ref, token, _ = override_page(r)
    r._pages[ref] = dataclasses.replace(r._pages[ref], **change)  # type: ignore[arg-type]
    assert post(r, ref, token).status == 403


def test_token_is_bound_to_the_key() -> None:
    a = make(profile="page", random=Counter(b"same"), token_key=b"k" * 32)
    b = make(profile="page", random=Counter(b"same"), token_key=b"K" * 32)
    ref_a, token_a, _ = override_page(a)
    ref_b, token_b, _ = override_page(b)
    assert ref_a == ref_b  # same randomness, so same reference and nonce...
    assert token_a != token_b  # ...but another key
    assert post(b, ref_b, token_a).status == 403


def test_block_page_references_cannot_be_used_to_override() -> None:
    r = make(profile="page")
    _, token, _ = override_page(r)
    action = plan_page(r, error=CertError.REVOKED)
    blocked = ref_of(r.redirect_for(action, now=NOW))
    assert post(r, blocked, token).status == 403
    embedder = ref_of(r.block(host=HOST, title="t", explanation="e", now=NOW))
    assert post(r, embedder, token).status == 403
    assert not granted(r, error=CertError.REVOKED)


def without(name: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((k, v) for k, v in GOOD_POST_HEADERS if k != name)


def replaced(name: bytes, value: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return (*without(name), (name, value))


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (without(b"origin"), 403),  # missing Origin: refuse
        (replaced(b"origin", b"null"), 403),
        (replaced(b"origin", b"https://www.example.test"), 403),  # the site itself
        (replaced(b"origin", b"https://error.invalid:443"), 403),  # not the serialisation
        (replaced(b"origin", b"http://error.invalid"), 403),
        (replaced(b"origin", b"https://error.invalid/"), 403),
        ((*GOOD_POST_HEADERS, (b"origin", ORIGIN)), 403),  # two Origin headers
        (replaced(b"sec-fetch-site", b"cross-site"), 403),
        (replaced(b"sec-fetch-site", b"same-site"), 403),
        (replaced(b"sec-fetch-site", b"none"), 403),
        (replaced(b"sec-fetch-mode", b"cors"), 403),  # fetch() from a script
        (replaced(b"sec-fetch-mode", b"no-cors"), 403),
        (replaced(b"sec-fetch-dest", b"iframe"), 403),  # UI-04: never from a frame
        (replaced(b"sec-fetch-dest", b"empty"), 403),
        (without(b"sec-fetch-user"), 403),  # not user-activated
        (replaced(b"sec-fetch-user", b"?0"), 403),
        (without(b"content-type"), 415),
        (replaced(b"content-type", b"multipart/form-data; boundary=x"), 415),
        (replaced(b"content-type", b"text/plain"), 415),
        # Browsers without Fetch Metadata: Origin alone is enough.
        (
            (
                (b"origin", ORIGIN),
                (b"content-type", b"application/x-www-form-urlencoded; charset=UTF-8"),
            ),
            303,
        ),
    ],
)
def test_override_post_must_come_from_the_error_origin(
    headers: tuple[tuple[bytes, bytes], ...], status: int
) -> None:
    r = make(profile="page")
    ref, token, _ = override_page(r)
    response = post(r, ref, token, headers=headers)
    assert response.status == status
    assert granted(r) is (status == 303)
    if status != 303:
        assert_protected(response)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"ref=REF", 400),
        (b"token=TOKEN", 400),
        (b"ref=REF&token=TOKEN&ref=REF", 400),
        (b"ref=REF&token=TOKEN&token=TOKEN", 400),
        (b"ref=REF&token=", 400),
        (b"ref=REF;token=TOKEN", 400),
        (b"\xff", 400),
        (b"ref=REF&token=TOKEN&" + b"x" * 5000, 413),
        (b"ref=REF&token=TOKEN&a=1&b=2&c=3&d=4&e=5&f=6&g=7", 400),
        (b"ref=" + b"b" * 32 + b"&token=TOKEN", 404),  # unknown reference
        (b"ref=REF&token=TOKEN&extra=1", 303),
    ],
)
def test_override_form_parsing(body: bytes, status: int) -> None:
    r = make(profile="page")
    ref, token, _ = override_page(r)
    body = body.replace(b"REF", ref.encode()).replace(b"TOKEN", token.encode())
    assert post(r, ref, token, body=body).status == status
    assert granted(r) is (status == 303)


def test_override_with_a_loopback_error_origin() -> None:
    r = make(profile="page", error_origin="http://127.0.0.1:8080")
    assert r.is_error_origin("127.0.0.1", 8080)
    action = plan_page(r)
    location = r.redirect_for(action, now=NOW).header(b"location")
    assert location is not None
    assert location.startswith(b"http://127.0.0.1:8080/error/")
    ref = location.rsplit(b"/", 1)[1].decode()
    page = r.handle(request(target=f"/error/{ref}", host=b"127.0.0.1:8080"), now=NOW)
    assert page.status == 502
    token = Dom(page.body).tags("input")[1].attrs["value"]
    assert token is not None
    # Only the exact loopback origin may post.
    refused = r.handle(
        request(
            b"POST",
            "/override",
            host=b"127.0.0.1:8080",
            headers=replaced(b"origin", b"http://localhost:8080"),
            body=f"ref={ref}&token={token}".encode(),
        ),
        now=NOW + 2 * SEC,
    )
    assert refused.status == 403
    response = r.handle(
        request(
            b"POST",
            "/override",
            host=b"127.0.0.1:8080",
            headers=replaced(b"origin", b"http://127.0.0.1:8080"),
            body=f"ref={ref}&token={token}".encode(),
        ),
        now=NOW + 2 * SEC,
    )
    assert response.status == 303
    assert granted(r)


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "serialised", "host", "port"),
    [
        ("https://error.invalid", "https://error.invalid", "error.invalid", 443),
        ("https://Error.Invalid:8443/", "https://error.invalid:8443", "error.invalid", 8443),
        ("https://error.invalid:443", "https://error.invalid", "error.invalid", 443),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080", "127.0.0.1", 8080),
        ("http://[::1]:8080", "http://[::1]:8080", "::1", 8080),
        ("http://localhost:9000", "http://localhost:9000", "localhost", 9000),
        ("https://block.acme.example", "https://block.acme.example", "block.acme.example", 443),
    ],
)
def test_error_origin_forms(origin: str, serialised: str, host: str, port: int) -> None:
    r = make(error_origin=origin)
    assert (r.error_origin, r.error_origin_host, r.error_origin_port) == (serialised, host, port)


@pytest.mark.parametrize(
    "origin",
    [
        "http://error.invalid",  # the token would cross the network in clear
        "http://192.0.2.1:8080",
        "ftp://error.invalid",
        "error.invalid",
        "https://error.invalid/path",
        "https://error.invalid?x",
        "https://error.invalid#f",
        "https://user@error.invalid",
        "https://",
        "https://error.invalid:0",
        "https://error.invalid:99999",
        "https://a..b",
        "https://exa mple.com",
    ],
)
def test_bad_error_origins(origin: str) -> None:
    with pytest.raises(ConfigurationError, match="error_origin"):
        make(error_origin=origin)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"profile": "strict"}, "profile"),
        ({"override_ttl": timedelta(days=31)}, "override_ttl"),
        ({"override_ttl": timedelta(0)}, "override_ttl"),
        ({"page_ttl": timedelta(hours=2)}, "page_ttl"),
        ({"page_ttl": 600}, "page_ttl"),
        ({"token_key": b"short"}, "token_key"),
        ({"brand": ""}, "brand"),
        ({"brand": "x" * 101}, "brand"),
        ({"max_pages": 0}, "max_pages"),
        ({"random": lambda n: b"x"}, "random"),
        ({"templates": Path("/nonexistent/tlsmitm-templates")}, "does not exist"),
    ],
)
def test_configuration_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make(**kwargs)


def test_translated_and_rebranded_templates(tmp_path: Path) -> None:
    (tmp_path / "strings.json").write_text(
        json.dumps(
            {
                "lang": "de",
                "back": "Zurück",
                "heading_cert": "Diese Verbindung ist nicht sicher",
                "reason.expired": "Das Zertifikat von $host ist abgelaufen.",
            }
        ),
        encoding="utf-8",
    )
    (tmp_path / "error.css").write_text("/* acme */ body { color: red; }", encoding="utf-8")
    r = make(profile="page", templates=tmp_path, brand="Acme Shield")
    _, _, page = override_page(r)
    dom = Dom(page.body)
    assert dom.tags("html")[0].attrs["lang"] == "de"
    assert "Zurück" in dom.text
    assert "Diese Verbindung ist nicht sicher" in dom.text
    assert "Das Zertifikat von www.example.test ist abgelaufen." in dom.text
    assert "Acme Shield" in dom.text
    assert "Advanced" in dom.text  # untranslated keys fall back to English
    css = r.handle(request(target="/static/error.css"), now=NOW)
    assert css.body == b"/* acme */ body { color: red; }"
    assert b"DELAY_MS" in r.handle(request(target="/static/error.js"), now=NOW).body


def test_custom_page_template(tmp_path: Path) -> None:
    builtin = (Path(responder_module.__file__).parent / "templates" / "page.html").read_text()
    (tmp_path / "page.html").write_text(
        builtin.replace("<main>", '<main class="acme">'), encoding="utf-8"
    )
    r = make(templates=tmp_path)
    page = page_of(r, r.block(host=HOST, title="t", explanation="e", now=NOW))
    assert b'<main class="acme">' in page.body


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("page.html", "<p>$secret</p>", "unknown placeholders"),
        ("page.html", "<p>costs $5</p>", "literal dollar"),
        ("details.html", "$token", "unknown placeholders"),  # a token has no place in details
        ("strings.json", "{", "not valid JSON"),
        ("strings.json", "[]", "JSON object"),
        ("strings.json", '{"no_such_key": "x"}', "not a known string key"),
        ("strings.json", '{"back": 1}', "not a known string key"),
        ("strings.json", '{"back": "$token"}', "unknown placeholders"),
        ("page.html", b"\xff\xfe", "UTF-8"),
    ],
)
def test_bad_templates_are_configuration_errors(
    tmp_path: Path, name: str, content: str | bytes, match: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigurationError, match=match):
        make(templates=tmp_path)


def test_builtin_strings_cover_every_error_class() -> None:
    path = Path(responder_module.__file__).parent / "templates" / "strings.json"
    strings = json.loads(path.read_text(encoding="utf-8"))
    for error in CertError:
        assert f"reason.{error.value}" in strings


# -- purity ---------------------------------------------------------------------------------------

ALLOWED_IMPORTS = {
    "__future__",
    "base64",
    "binascii",
    "collections",
    "collections.abc",
    "dataclasses",
    "datetime",
    "enum",
    "hashlib",
    "hmac",
    "html",
    "importlib.resources",
    "json",
    "math",
    "pathlib",
    "secrets",
    "string",
    "threading",
    "typing",
    "urllib.parse",
    "._errors",
    "._names",
    "._store",
}


def test_module_is_pure() -> None:
    source = Path(responder_module.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    # No clock reads and no hidden randomness: time is `now`, randomness is `random`.
    for call in (".now(", ".utcnow(", "time.time", "monotonic", "os.urandom", "token_bytes("):
        assert call not in source, call


def test_default_random_is_secrets_token_bytes() -> None:
    import inspect
    import secrets

    default = inspect.signature(ErrorResponder).parameters["random"].default
    assert default is secrets.token_bytes


# -- the journey across workers and nodes (issue 16) ----------------------------------------------


def test_a_page_shown_by_one_worker_is_served_and_granted_by_another() -> None:
    shared = MemoryStore()
    key = shared_token_key(shared)
    assert shared_token_key(shared) == key  # made once, then read by everyone sharing the store
    a = make(profile="page", override_store=shared, token_key=key)
    b = make(profile="page", override_store=shared, token_key=key, random=Counter(b"other"))
    ref, token = client_page(a, ALICE)
    page = b.handle(request(target=f"/error/{ref}"), now=NOW, client=ALICE)
    assert page.status == 502  # b never saw this page: it read it from the store
    assert client_post(b, ref, token, BOB).status == 403  # bound to the client it was shown to
    assert client_post(b, ref, token, ALICE).status == 303
    assert client_granted(a, ALICE)  # the grant is shared too
    assert not client_granted(a, BOB)


def test_a_token_is_single_use_across_workers() -> None:
    shared = MemoryStore()
    key = shared_token_key(shared)
    a = make(profile="page", override_store=shared, token_key=key)
    b = make(profile="page", override_store=shared, token_key=key, random=Counter(b"other"))
    ref, token = client_page(a, ALICE)
    # Both workers get the same click (a retried POST balanced to another worker): one wins.
    statuses = sorted(
        [client_post(a, ref, token, ALICE).status, client_post(b, ref, token, ALICE).status]
    )
    assert statuses[0] == 303
    assert statuses[1] in (403, 404)


def test_a_store_that_cannot_check_refuses_grants_and_tokens() -> None:
    class Broken(MemoryStore):
        broken = False

        def get(self, namespace: str, key: str) -> StoredItem | None:
            if self.broken:
                raise ConfigurationError("Redis is away", reason="state_unavailable")
            return super().get(namespace, key)

        def add_if_absent(
            self, namespace: str, key: str, value: bytes, *, expires: float, now: float
        ) -> bool:
            if self.broken:
                raise ConfigurationError("Redis is away", reason="state_unavailable")
            return super().add_if_absent(namespace, key, value, expires=expires, now=now)

    store = Broken()
    r = make(profile="page", override_store=store)
    ref, token = client_page(r, ALICE)
    assert client_post(r, ref, token, ALICE).status == 303
    assert client_granted(r, ALICE)
    store.broken = True
    assert not client_granted(r, ALICE)  # cannot be checked: not granted
    ref2, token2 = client_page(r, ALICE)  # this process still serves the page it made ...
    assert client_post(r, ref2, token2, ALICE).status == 403  # ... but the nonce cannot be spent
