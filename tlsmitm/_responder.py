"""What to do about an upstream certificate error, and the error origin that explains it.

Theory of operation
-------------------

The seed articles' central exploit: an interception product answers an upstream certificate error
with its own error page *inside the site's origin*. A malicious site serves a valid page, makes a
request that hits a bad certificate, and its script reads the product's error page -- and whatever
tokens are in it. :class:`ErrorResponder` makes that impossible in three ways:

1. :meth:`ErrorResponder.plan` turns a verification verdict into an :class:`Action`. Overridable
   errors on hosts without HSTS either go to the browser's own interstitial
   (``PASSTHROUGH_UNTRUSTED``: a leaf from the never-trusted error CA, profile ``"native"``) or to
   a two-step override page (``OVERRIDE_PAGE``, profile ``"page"``). Everything else -- a known HSTS
   host, a revoked certificate, broken or weak cryptography, a malformed chain -- gets a page with
   no way through (``BLOCK_PAGE``), whatever the profile or the embedder's mapping says. Clients
   that do not speak HTTP get a TLS alert (``ALERT``).
2. An error is never answered inside the site's origin. The relay answers the first request on the
   intercepted connection with :meth:`ErrorResponder.redirect_for`: a bodiless ``303`` to
   ``https://error.invalid/error/<ref>`` (RFC 6761 §6.4: ``.invalid`` is never a real site). The
   reference is 128 random bits naming an in-memory record; it carries no host, no user and no
   installation identifier, and expires after ``page_ttl``.
3. The proxy itself serves the error origin (:meth:`ErrorResponder.handle`). Its pages forbid
   framing, embedding, caching and cross-origin referrers; their only script is a same-origin
   file. The override is a ``POST`` that must come from the error origin itself (``Origin`` and
   ``Sec-Fetch-*``), carrying an HMAC token bound to (page reference, host, upstream certificate
   SHA-256, error class), minted at least one second earlier, single-use and short-lived. A grant
   covers exactly that (host, certificate, error class) triple for ``override_ttl``, and only for
   the client that clicked: its address, or its proxy user name when proxy authentication is on
   (see :func:`client_identity`). Another client behind the same proxy -- or a script on another
   client that forges the ``Sec-Fetch-*`` headers -- can neither use nor make that grant: the page
   reference remembers whom it was shown to and refuses a ``POST`` from anyone else.

Everything here is pure: time is the ``now`` argument, randomness is the injected ``random``
function, and the override store is an injected :class:`~tlsmitm.StateStore`. Pages (namespace
``page``) and spent nonces (``nonce``, an atomic ``add_if_absent``) are kept in that store too,
so a page one worker or node showed can be read and its override granted through another; the
token key can be kept there as well (:func:`shared_token_key`). Each process also keeps bounded
in-memory copies, so a failing store still lets it serve the pages it made; a grant or a nonce
that the store cannot check is refused.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import html
import importlib.resources
import json
import math
import secrets
import string
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import parse_qsl, urlsplit

from ._errors import CertError, ConfigurationError
from ._names import InvalidHostName, ip_address_of, normalize_host, try_normalize_host
from ._store import MemoryStore, StateStore

__all__ = [
    "OVERRIDE_NAMESPACE",
    "Action",
    "ActionKind",
    "ActionMapping",
    "ErrorResponder",
    "HttpRequest",
    "HttpResponse",
    "VerdictLike",
    "client_identity",
    "shared_token_key",
]

#: The :class:`~tlsmitm.StateStore` namespace that holds granted overrides.
OVERRIDE_NAMESPACE: Final = "override"
#: Namespaces for error pages (by reference), spent token nonces and the shared token key.
PAGE_NAMESPACE: Final = "page"
NONCE_NAMESPACE: Final = "nonce"
SECRET_NAMESPACE: Final = "secret"  # noqa: S105 (a namespace name, not a secret)
_TOKEN_KEY_NAME: Final = "override-token-key"  # noqa: S105 (a key name)

_REF_BYTES: Final = 16  # 128 bits: unguessable
_NONCE_BYTES: Final = 16
_MAC_BYTES: Final = 32  # HMAC-SHA-256
_MIN_KEY_BYTES: Final = 16
_TOKEN_BYTES: Final = 8 + _NONCE_BYTES + _MAC_BYTES  # issued (ms) || nonce || mac
_SHA256_BYTES: Final = 32
# Firefox's security.dialog_enable_delay (1000 ms); Chromium's PROCEED_CLICKJACKING_DELAY is 500 ms
# (matrix UI-02, §5). The page script enforces it per reveal and focus; the server per token.
_CLICK_DELAY_MS: Final = 1000
_MAX_OVERRIDE_TTL: Final = timedelta(days=30)
_MAX_PAGE_TTL: Final = timedelta(hours=1)
_MAX_FORM_BYTES: Final = 4096
_MAX_TARGET_CHARS: Final = 8192
_MAX_DETAIL_CHARS: Final = 1000
_MAX_TITLE_CHARS: Final = 200
_MAX_EXPLANATION_CHARS: Final = 2000
_MAX_BRAND_CHARS: Final = 100
_TOKEN_CONTEXT: Final = b"tlsmitm override token v1\x00"

_FORM_TYPE: Final = b"application/x-www-form-urlencoded"


def client_identity(address: str, *, user: str | None = None) -> str:
    """The identity an override grant is bound to: the proxy user, else the client address.

    With proxy authentication on, a user keeps their grants when their address changes, and two
    users behind one address (a terminal server) do not share them. Without it, the address is
    all the proxy knows. The two never collide: ``"user:NAME"`` versus ``"addr:ADDRESS"``.

    Args:
        address: the client's IP address as text (the port is not part of the identity: a
            browser opens many connections).
        user: the authenticated proxy user name, if any.
    """
    if user is not None:
        return f"user:{user}"
    return f"addr:{address}"


class ActionKind(enum.Enum):
    """What the relay does with a connection whose upstream has been verified."""

    INTERCEPT = "intercept"
    """Verified (or overridden by the user): mint a trusted leaf and relay."""
    PASSTHROUGH_UNTRUSTED = "passthrough_untrusted"
    """Hand the decision to the client: a leaf from the never-trusted error CA."""
    BLOCK_PAGE = "block_page"
    """Redirect to a page on the error origin that offers no way through."""
    OVERRIDE_PAGE = "override_page"
    """Redirect to a page on the error origin with a two-step override."""
    ALERT = "alert"
    """Abort the client handshake with a fatal TLS alert; nothing else."""


class VerdictLike(Protocol):
    """The part of ``tlsmitm.Verdict`` that :meth:`ErrorResponder.plan` reads."""

    @property
    def ok(self) -> bool:
        """Whether the upstream chain verified."""
        ...

    @property
    def error(self) -> CertError | None:
        """Why it did not, or ``None``."""
        ...

    @property
    def detail(self) -> str:
        """A human-readable explanation, shown behind "Technical details"."""
        ...

    @property
    def leaf_sha256(self) -> bytes | None:
        """SHA-256 of the upstream leaf's DER, when there was a leaf."""
        ...


#: An embedder's own mapping from a failed verdict and ``hsts_known`` to an :class:`ActionKind`;
#: ``None`` keeps the profile's choice. Its answers are clamped: see :meth:`ErrorResponder.plan`.
ActionMapping = Callable[[VerdictLike, bool], ActionKind | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    """The decision for one intercepted connection.

    Attributes:
        kind: what the relay does.
        host: the normalised host (IDNA A-labels).
        error: the upstream certificate error, ``None`` only for a verified ``INTERCEPT``.
        overridden: ``INTERCEPT`` granted by a user override; the relay must not record HSTS from
            this connection.
        detail: the verifier's explanation (shown behind "Technical details").
        leaf_sha256: SHA-256 of the upstream leaf, the certificate an override is bound to.
        hsts_known: whether the host was a known HSTS host when planned.
    """

    kind: ActionKind
    host: str
    error: CertError | None
    overridden: bool = False
    detail: str = ""
    leaf_sha256: bytes | None = None
    hsts_known: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ActionKind):
            raise TypeError(f"Action.kind must be an ActionKind, not {self.kind!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("Action.host must be a non-empty host name")
        if self.error is not None and not isinstance(self.error, CertError):
            raise TypeError(f"Action.error must be a CertError or None, not {self.error!r}")
        if self.leaf_sha256 is not None and (
            not isinstance(self.leaf_sha256, bytes) or len(self.leaf_sha256) != _SHA256_BYTES
        ):
            raise ValueError("Action.leaf_sha256 must be a 32-byte SHA-256 digest or None")
        may_override = (
            self.error is not None and self.error.overridable and not self.hsts_known
        )  # RFC 6797 §12.1: no user recourse on a known HSTS host
        if self.kind is ActionKind.INTERCEPT:
            if self.overridden:
                if not may_override or self.leaf_sha256 is None:
                    raise ValueError(
                        "an overridden INTERCEPT needs an overridable error, a leaf SHA-256 and a "
                        "host without HSTS"
                    )
            elif self.error is not None:
                raise ValueError("INTERCEPT with an error must be marked overridden=True")
            return
        if self.overridden:
            raise ValueError(f"only INTERCEPT can be overridden, not {self.kind.value}")
        if self.error is None:
            raise ValueError(f"{self.kind.value} needs the CertError that caused it")
        if (
            self.kind in (ActionKind.OVERRIDE_PAGE, ActionKind.PASSTHROUGH_UNTRUSTED)
            and not may_override
        ):
            raise ValueError(
                f"{self.kind.value} offers a way through, which {self.error.value} "
                f"{'on a known HSTS host ' if self.hsts_known else ''}never gets"
            )
        if self.kind is ActionKind.OVERRIDE_PAGE and self.leaf_sha256 is None:
            raise ValueError("OVERRIDE_PAGE needs the leaf SHA-256 the override is bound to")

    @property
    def needs_page(self) -> bool:
        """Whether the relay answers with :meth:`ErrorResponder.redirect_for`."""
        return self.kind in (ActionKind.BLOCK_PAGE, ActionKind.OVERRIDE_PAGE)

    @property
    def may_record_hsts(self) -> bool:
        """Whether ``Strict-Transport-Security`` from this connection may be recorded.

        Only a verified connection may teach HSTS (RFC 6797 §8.1: the header is ignored unless the
        connection had no certificate errors); an overridden or passed-through one may not.
        """
        return self.kind is ActionKind.INTERCEPT and not self.overridden


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest:
    """One HTTP request to the error origin, as the relay parsed it.

    Attributes:
        method: e.g. ``b"GET"``.
        target: the request target, origin-form (``b"/error/..."``).
        headers: ``(name, value)`` pairs, names in lower case.
        body: the whole request body.
    """

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpResponse:
    """One complete HTTP response for the relay to send.

    Attributes:
        status: the status code.
        reason: the reason phrase.
        headers: ``(name, value)`` pairs, names in lower case, ``content-length`` included.
        body: the whole body (empty for ``HEAD`` and redirects).
    """

    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"HTTP status {self.status} is not in 100..599")

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Page:
    """What a page reference stands for; kept in the shared store, never sent to a client."""

    kind: ActionKind
    host: str
    port: int
    error: CertError | None  # None: the embedder's own block
    detail: str
    leaf_sha256: bytes | None
    hsts_known: bool
    return_target: str
    title: str
    explanation: str
    expires: float
    client: str | None = None  # whom the page was shown to; only they may grant its override


# Template files and the placeholders each may use. Values are inserted HTML-escaped (fragments
# are built from escaped parts), so a translator's template cannot be broken by a hostile host
# name or verifier detail.
_TEMPLATES: Final[Mapping[str, frozenset[str]]] = {
    "page.html": frozenset(
        {
            "lang",
            "dir",
            "title",
            "brand",
            "page_class",
            "heading",
            "lead",
            "reason",
            "advice",
            "back",
            "advanced_button",
            "advanced_panel",
            "details",
        }
    ),
    "advanced-button.html": frozenset({"advanced", "host", "brand"}),
    "advanced-panel.html": frozenset({"advanced_text", "proceed", "ref", "token", "host", "brand"}),
    "details.html": frozenset(
        {
            "details_label",
            "label_address",
            "label_error",
            "label_detail",
            "label_fingerprint",
            "address",
            "error_code",
            "detail",
            "fingerprint",
            "host",
            "brand",
        }
    ),
}
_ASSETS: Final[Mapping[str, bytes]] = {
    "error.css": b"text/css; charset=utf-8",
    "error.js": b"text/javascript; charset=utf-8",
}
_STRINGS_FILE: Final = "strings.json"
_STRING_PLACEHOLDERS: Final = frozenset({"brand", "host", "duration", "n"})

_REASONS: Final[Mapping[int, bytes]] = {
    200: b"OK",
    303: b"See Other",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    421: b"Misdirected Request",
    502: b"Bad Gateway",
}

# Headers on every response the error origin serves (matrix UI-04, §5; issue 6 "Pages"), with
# Referrer-Policy added per response (see _response).
_COMMON_HEADERS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),  # RFC 7034
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


class ErrorResponder:
    """Decides what an upstream certificate error becomes, and serves the error origin.

    Args:
        profile: ``"native"`` (overridable errors go to the browser's own interstitial) or
            ``"page"`` (they get tlsmitm's two-step override page).
        error_origin: the origin that serves the pages: ``https://<host>[:port]``, or
            ``http://<loopback>:<port>`` for a transparent deployment served on this machine.
        override_store: where granted overrides live (namespace :data:`OVERRIDE_NAMESPACE`);
            a fresh :class:`~tlsmitm.MemoryStore` by default.
        token_key: the HMAC key for override tokens (at least 16 bytes); by default 32 bytes drawn
            from ``random`` once, so tokens die with the process.
        random: the source of page references, nonces and the default key.
        override_ttl: how long a granted override lasts (at most 30 days); it covers one client
            (see :func:`client_identity`), one host, one certificate and one error class.
        page_ttl: how long a page reference (and its override token) stays valid (at most 1 h).
        templates: a directory whose files replace the built-in ones of the same name
            (``page.html``, ``advanced-button.html``, ``advanced-panel.html``, ``details.html``,
            ``error.css``, ``error.js``; ``strings.json`` is merged key by key).
        mapping: the embedder's own choice per failed verdict; clamped, see :meth:`plan`.
        brand: the product name shown on the pages.
        max_pages: how many page references are remembered at once (oldest dropped first).
        max_overrides: how many granted overrides the store keeps (soonest-expiring dropped).

    Raises:
        ConfigurationError: an argument is out of range or a template is unusable; the message
            says which and what to change.
    """

    def __init__(
        self,
        *,
        profile: str = "native",
        error_origin: str = "https://error.invalid",
        override_store: StateStore | None = None,
        token_key: bytes | None = None,
        random: Callable[[int], bytes] = secrets.token_bytes,
        override_ttl: timedelta = timedelta(hours=1),
        page_ttl: timedelta = timedelta(minutes=10),
        templates: Path | None = None,
        mapping: ActionMapping | None = None,
        brand: str = "tlsmitm",
        max_pages: int = 10_000,
        max_overrides: int = 100_000,
    ) -> None:
        if profile not in ("native", "page"):
            raise ConfigurationError(
                f'unknown error profile {profile!r}: use "native" or "page"', reason="profile"
            )
        for name, ttl, limit in (
            ("override_ttl", override_ttl, _MAX_OVERRIDE_TTL),
            ("page_ttl", page_ttl, _MAX_PAGE_TTL),
        ):
            if not isinstance(ttl, timedelta) or not timedelta(seconds=1) <= ttl <= limit:
                raise ConfigurationError(
                    f"{name} must be a timedelta between 1 second and {limit}, not {ttl!r}",
                    reason="ttl",
                )
        if max_pages < 1 or max_overrides < 1:
            raise ConfigurationError("max_pages and max_overrides must be at least 1")
        if not isinstance(brand, str) or not brand.strip() or len(brand) > _MAX_BRAND_CHARS:
            raise ConfigurationError(
                f"brand must be a non-empty name of at most {_MAX_BRAND_CHARS} characters",
                reason="brand",
            )
        self.profile: Final = profile
        self.override_ttl: Final = override_ttl
        self.page_ttl: Final = page_ttl
        self.brand: Final = _clean_text(brand, _MAX_BRAND_CHARS)
        scheme, host, port, origin = _parse_origin(error_origin)
        self.error_origin_scheme: Final = scheme
        self.error_origin_host: Final = host
        self.error_origin_port: Final = port
        #: The serialised origin (RFC 6454 §6.2), as browsers send it in ``Origin``.
        self.error_origin: Final = origin
        self._random = random
        self._mapping = mapping
        self._store: StateStore = override_store if override_store is not None else MemoryStore()
        self._max_pages = max_pages
        self._max_overrides = max_overrides
        if token_key is None:
            token_key = self._draw(32)
        if not isinstance(token_key, bytes) or len(token_key) < _MIN_KEY_BYTES:
            raise ConfigurationError(
                f"token_key must be at least {_MIN_KEY_BYTES} random bytes", reason="token_key"
            )
        self._key = token_key
        self._templates, self._assets, self._strings = _load_templates(templates)
        self._lock = threading.Lock()
        self._pages: OrderedDict[str, _Page] = OrderedDict()
        self._spent: OrderedDict[bytes, float] = OrderedDict()  # token nonce -> expiry

    # -- the decision ---------------------------------------------------------------------------

    def plan(
        self,
        verdict: VerdictLike,
        *,
        host: str,
        hsts_known: bool,
        client_speaks_http: bool,
        now: datetime,
        client: str | None = None,
    ) -> Action:
        """Decide what the relay does with a connection to ``host``.

        * A verified verdict is ``INTERCEPT``.
        * An overridable error on a host without HSTS: ``PASSTHROUGH_UNTRUSTED`` (profile
          ``"native"``) or ``OVERRIDE_PAGE`` (profile ``"page"``), unless the embedder's
          ``mapping`` chooses otherwise. If this ``client`` already granted an override for
          exactly (host, leaf SHA-256, error class) and the choice would be ``OVERRIDE_PAGE``,
          the answer is ``INTERCEPT`` with ``overridden=True``. Another client's grant never
          counts. ``client`` is :func:`client_identity`'s value; ``None`` stands for one
          anonymous client (an embedder that does not tell clients apart).
        * Everything else is ``BLOCK_PAGE``: a known HSTS host (RFC 6797 §12.1), a revoked
          certificate, weak or broken cryptography, a malformed chain (matrix UI-03). A mapping
          that answers ``OVERRIDE_PAGE`` or ``PASSTHROUGH_UNTRUSTED`` (the browser's own override)
          for those, or ``INTERCEPT`` for any error, is overruled to ``BLOCK_PAGE``.
        * A client that does not speak HTTP cannot be shown a page: ``ALERT``.

        A verdict that is not ok but names no error is treated as ``MALFORMED`` (fail closed).

        Raises:
            InvalidHostName: ``host`` is not a host name.
            ConfigurationError: the mapping returned something that is not an ActionKind.
        """
        t = _timestamp(now)
        name = normalize_host(host)
        error = verdict.error
        if verdict.ok and error is None:
            return Action(kind=ActionKind.INTERCEPT, host=name, error=None)
        if not isinstance(error, CertError):
            error = CertError.MALFORMED
        detail = verdict.detail if isinstance(verdict.detail, str) else ""
        sha = verdict.leaf_sha256
        if not isinstance(sha, bytes) or len(sha) != _SHA256_BYTES:
            sha = None
        # RFC 6797 §12.1: no user recourse for a known HSTS host; CertError.overridable follows
        # Firefox's CategorizeCertificateError (matrix §5).
        may_override = error.overridable and not hsts_known
        kind = self._choose(verdict, hsts_known=hsts_known, may_override=may_override, sha=sha)
        if (
            kind is ActionKind.OVERRIDE_PAGE
            and sha is not None
            and self._override_granted(client, name, sha, error, t)
        ):
            return Action(
                kind=ActionKind.INTERCEPT,
                host=name,
                error=error,
                overridden=True,
                detail=detail,
                leaf_sha256=sha,
            )
        if not client_speaks_http:
            kind = ActionKind.ALERT
        return Action(
            kind=kind, host=name, error=error, detail=detail, leaf_sha256=sha, hsts_known=hsts_known
        )

    def _choose(
        self, verdict: VerdictLike, *, hsts_known: bool, may_override: bool, sha: bytes | None
    ) -> ActionKind:
        if not may_override:
            chosen = ActionKind.BLOCK_PAGE
        elif self.profile == "native":
            chosen = ActionKind.PASSTHROUGH_UNTRUSTED
        else:
            chosen = ActionKind.OVERRIDE_PAGE
        if self._mapping is not None:
            mapped = self._mapping(verdict, hsts_known)
            if mapped is not None:
                if not isinstance(mapped, ActionKind):
                    raise ConfigurationError(
                        f"the error mapping returned {mapped!r}; return an ActionKind or None",
                        reason="mapping",
                    )
                chosen = mapped
        if chosen is ActionKind.INTERCEPT:
            # An upstream error never becomes a trusted certificate without the user's decision
            # (matrix §0: never "fix" an upstream error by re-signing with the trusted root).
            chosen = ActionKind.BLOCK_PAGE
        if chosen in (ActionKind.OVERRIDE_PAGE, ActionKind.PASSTHROUGH_UNTRUSTED) and not (
            may_override
        ):
            # Passthrough is an override too (the browser's): matrix §0 caveat, UI-03.
            chosen = ActionKind.BLOCK_PAGE
        if chosen is ActionKind.OVERRIDE_PAGE and sha is None:
            chosen = ActionKind.BLOCK_PAGE  # nothing to bind an override to (matrix UI-05)
        return chosen

    # -- the site-origin side: redirects --------------------------------------------------------

    def redirect_for(
        self,
        action: Action,
        *,
        request_target: bytes = b"/",
        port: int = 443,
        now: datetime,
        client: str | None = None,
    ) -> HttpResponse:
        """The answer to the first request on a connection planned as a page.

        A ``303`` to ``<error origin>/error/<ref>`` with ``Cache-Control: no-store``, no body and
        ``Connection: close`` (the connection must not serve anything else). ``request_target``
        (the first request's origin-form target) is remembered, never shown, so that a granted
        override returns the user to it. ``client`` (:func:`client_identity`) is remembered too:
        only that client may use the page's override.

        Raises:
            ValueError: ``action`` is not ``BLOCK_PAGE`` or ``OVERRIDE_PAGE``, or ``port`` is not
                a port number.
        """
        if not action.needs_page:
            raise ValueError(
                f"redirect_for needs a BLOCK_PAGE or OVERRIDE_PAGE action, not "
                f"{action.kind.value}; only those are answered with a page"
            )
        t = _timestamp(now)
        page = _Page(
            kind=action.kind,
            host=normalize_host(action.host),
            port=_check_port(port),
            error=action.error,
            detail=_clean_text(action.detail, _MAX_DETAIL_CHARS),
            leaf_sha256=action.leaf_sha256,
            hsts_known=action.hsts_known,
            return_target=_safe_return_target(request_target),
            title="",
            explanation="",
            expires=t + self.page_ttl.total_seconds(),
            client=client,
        )
        return self._redirect_to(self._remember(page, t), close=True)

    def block(
        self, *, host: str, title: str, explanation: str, now: datetime, port: int = 443
    ) -> HttpResponse:
        """Block a request for the embedder's own reasons (a virus found, a category filtered).

        Returns the same kind of ``303`` as :meth:`redirect_for`, to a page on the error origin
        that shows ``title`` and ``explanation`` (plain text, escaped; cut to 200 and 2,000
        characters) and offers no way through.

        Raises:
            InvalidHostName: ``host`` is not a host name.
            ValueError: ``port`` is not a port number.
        """
        t = _timestamp(now)
        page = _Page(
            kind=ActionKind.BLOCK_PAGE,
            host=normalize_host(host),
            port=_check_port(port),
            error=None,
            detail="",
            leaf_sha256=None,
            hsts_known=False,
            return_target="/",
            title=_clean_text(title, _MAX_TITLE_CHARS) or self._plain("title_block"),
            explanation=_clean_text(explanation, _MAX_EXPLANATION_CHARS),
            expires=t + self.page_ttl.total_seconds(),
        )
        return self._redirect_to(self._remember(page, t), close=True)

    def is_error_origin(self, host: str | bytes, port: int) -> bool:
        """Whether ``host:port`` (a CONNECT target, an SNI name) is the error origin."""
        name = try_normalize_host(host)
        return (
            name is not None and name == self.error_origin_host and port == self.error_origin_port
        )

    # -- overrides ------------------------------------------------------------------------------

    def revoke_overrides(self, *, host: str | None = None, client: str | None = None) -> int:
        """Forget granted overrides: all of them, or those for ``host`` and/or ``client``.

        Returns how many were removed.
        """
        wanted = None if host is None else normalize_host(host)
        who = None if client is None else _client_tag(client)
        removed = 0
        for item in list(self._store.items(OVERRIDE_NAMESPACE)):
            parts = item.key.split(" ")
            if (wanted is None or parts[0] == wanted) and (who is None or parts[-1] == who):
                self._store.delete(OVERRIDE_NAMESPACE, item.key)
                removed += 1
        return removed

    def _override_granted(
        self, client: str | None, host: str, sha: bytes, error: CertError, t: float
    ) -> bool:
        try:
            item = self._store.get(OVERRIDE_NAMESPACE, _override_key(client, host, sha, error))
        except ConfigurationError:
            return False  # a grant that cannot be checked is not granted (fail closed)
        return item is not None and item.expires > t

    def _grant(self, page: _Page, t: float) -> None:
        assert page.error is not None  # OVERRIDE_PAGE invariant, checked by Action
        assert page.leaf_sha256 is not None
        self._store.put(
            OVERRIDE_NAMESPACE,
            _override_key(page.client, page.host, page.leaf_sha256, page.error),
            b"granted",
            expires=t + self.override_ttl.total_seconds(),
        )
        self._store.evict(OVERRIDE_NAMESPACE, now=t, keep=self._max_overrides)

    # -- the error origin -----------------------------------------------------------------------

    def handle(
        self, request: HttpRequest, *, now: datetime, client: str | None = None
    ) -> HttpResponse:
        """Serve one request on the error origin; never raises on bad input.

        * ``GET``/``HEAD /error/<ref>``: the page (``502`` for certificate errors, ``403`` for the
          embedder's blocks, ``404`` when unknown or expired). Re-viewable until it expires or its
          override is used.
        * ``GET``/``HEAD /static/error.css``, ``/static/error.js``: the page assets.
        * ``GET``/``HEAD /``: a neutral "you left the site" page (the no-script "Go back").
        * ``POST /override``: grant an override to ``client`` (:func:`client_identity`; it must be
          the client the page was shown to, else ``403``), then ``303`` back to the site.
        * Anything else: ``404``; a wrong method ``405``; a malformed request ``400``; a ``Host``
          that is not the error origin ``421`` (a DNS-rebinding defence for loopback origins).
        """
        t = _timestamp(now)
        head = request.method == b"HEAD"
        try:
            target = request.target.decode("ascii")
        except UnicodeDecodeError:
            return self._message_page(400, "bad_request", head=head)
        if not target.startswith("/") or not _is_visible_ascii(target):
            return self._message_page(400, "bad_request", head=head)
        hosts = request.header_values(b"host")
        if len(hosts) != 1:
            return self._message_page(400, "bad_request", head=head)  # RFC 9112 §3.2
        if not self._is_own_authority(hosts[0]):
            return self._message_page(421, "bad_request", head=head)
        path = target.split("?", 1)[0]
        if path == "/override":
            if request.method != b"POST":
                return self._method_not_allowed(b"POST", head=head)
            return self._override(request, t, client)
        if request.method not in (b"GET", b"HEAD"):
            if path == "/" or path.startswith(("/error/", "/static/")):
                return self._method_not_allowed(b"GET, HEAD", head=False)
            return self._message_page(404, "not_found", head=False)
        if path == "/":
            return self._message_page(200, "left", head=head)
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if name in self._assets:
                return self._response(
                    200, self._assets[name], content_type=_ASSETS[name], head=head
                )
            return self._message_page(404, "not_found", head=head)
        if path.startswith("/error/"):
            page = self._lookup(path.removeprefix("/error/"), t)
            if page is None:
                return self._message_page(404, "expired", head=head)
            return self._render_page(path.removeprefix("/error/"), page, t, head=head)
        return self._message_page(404, "not_found", head=head)

    def _override(self, request: HttpRequest, t: float, client: str | None) -> HttpResponse:
        # The form must come from the error origin itself, top-level, by a user's click: no
        # other origin can submit it (matrix UI-05: "never from a page-scriptable endpoint").
        if request.header_values(b"origin") != [self.error_origin.encode("ascii")]:
            return self._message_page(403, "refused")
        for name, allowed in (
            (b"sec-fetch-site", b"same-origin"),
            (b"sec-fetch-mode", b"navigate"),
            (b"sec-fetch-dest", b"document"),  # not from a frame (matrix UI-04)
        ):
            values = request.header_values(name)
            if values and values != [allowed]:
                return self._message_page(403, "refused")
        if request.header_values(b"sec-fetch-site") and request.header_values(
            b"sec-fetch-user"
        ) != [b"?1"]:
            return self._message_page(403, "refused")  # not a user-activated navigation
        content_types = request.header_values(b"content-type")
        if (
            len(content_types) != 1
            or content_types[0].split(b";", 1)[0].strip().lower() != _FORM_TYPE
        ):
            return self._message_page(415, "bad_request")
        if len(request.body) > _MAX_FORM_BYTES:
            return self._message_page(413, "bad_request")
        fields = _parse_form(request.body)
        if fields is None:
            return self._message_page(400, "bad_request")
        ref, token = fields
        page = self._lookup(ref, t)
        if page is None:
            return self._message_page(404, "expired")
        if page.client != client:
            # Issue 15 fault 4: a grant is the decision of the client that saw the page, never
            # one made for everyone behind the proxy (nor by a script forging Sec-Fetch-*).
            return self._message_page(403, "refused")
        if page.kind is not ActionKind.OVERRIDE_PAGE or not self._redeem(token, ref, page, t):
            return self._message_page(403, "refused")
        self._grant(page, t)
        with self._lock:
            self._pages.pop(ref, None)  # single use
        try:  # noqa: SIM105 (contextlib is not among this pure module's imports)
            self._store.delete(PAGE_NAMESPACE, ref)
        except ConfigurationError:
            pass  # the spent nonce still makes the page's token single-use
        location = f"https://{_authority(page.host, page.port, 443)}{page.return_target}"
        return self._redirect(location, close=False)

    # -- tokens ---------------------------------------------------------------------------------

    def _mint(self, ref: str, page: _Page, t: float) -> str:
        issued = _ms(t)
        nonce = self._draw(_NONCE_BYTES)
        mac = self._mac(ref, page, issued, nonce)
        raw = issued.to_bytes(8, "big") + nonce + mac
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def _mac(self, ref: str, page: _Page, issued: int, nonce: bytes) -> bytes:
        assert page.error is not None
        assert page.leaf_sha256 is not None
        parts = (
            ref.encode("ascii"),
            page.host.encode("ascii"),
            page.leaf_sha256,
            page.error.value.encode("ascii"),
            issued.to_bytes(8, "big"),
            nonce,
        )
        message = _TOKEN_CONTEXT + b"".join(len(p).to_bytes(4, "big") + p for p in parts)
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _redeem(self, token: str, ref: str, page: _Page, t: float) -> bool:
        raw = _b64decode(token)
        if raw is None or len(raw) != _TOKEN_BYTES:
            return False
        issued = int.from_bytes(raw[:8], "big")
        nonce = raw[8 : 8 + _NONCE_BYTES]
        mac = raw[8 + _NONCE_BYTES :]
        if not hmac.compare_digest(mac, self._mac(ref, page, issued, nonce)):
            return False
        age = _ms(t) - issued
        if not _CLICK_DELAY_MS <= age <= _ms(self.page_ttl.total_seconds()):
            return False  # too soon after the page was served (UI-02), or stale
        expires = t + self.page_ttl.total_seconds()
        with self._lock:
            while self._spent and next(iter(self._spent.values())) <= t:
                self._spent.popitem(last=False)
            if nonce in self._spent:
                return False
            self._spent[nonce] = expires
            while len(self._spent) > self._max_pages:
                self._spent.popitem(last=False)
        # Single use across every worker and node sharing the store: an atomic insert. A store
        # that cannot say whether the nonce was spent refuses the token (fail closed).
        add = getattr(self._store, "add_if_absent", None)
        if add is not None:
            try:
                fresh = bool(add(NONCE_NAMESPACE, nonce.hex(), b"", expires=expires, now=t))
                self._store.evict(NONCE_NAMESPACE, now=t, keep=self._max_pages)
            except ConfigurationError:
                return False
            return fresh
        return True

    # -- page table -----------------------------------------------------------------------------

    def _remember(self, page: _Page, t: float) -> str:
        ref = self._draw(_REF_BYTES).hex()
        with self._lock:
            self._expire_pages(t)
            while len(self._pages) >= self._max_pages:
                self._pages.popitem(last=False)
            self._pages[ref] = page
        # Shared, so that the next request -- on another worker or node -- finds the page. If
        # the store fails, this process still serves it.
        try:
            self._store.put(PAGE_NAMESPACE, ref, _encode_page(page), expires=page.expires)
            self._store.evict(PAGE_NAMESPACE, now=t, keep=self._max_pages)
        except ConfigurationError:
            pass  # CachedStore has counted and logged it
        return ref

    def _lookup(self, ref: str, t: float) -> _Page | None:
        if len(ref) != 2 * _REF_BYTES or not all(c in "0123456789abcdef" for c in ref):
            return None
        with self._lock:
            self._expire_pages(t)
            page = self._pages.get(ref)
        if page is None:
            try:
                item = self._store.get(PAGE_NAMESPACE, ref)
            except ConfigurationError:
                item = None
            page = _decode_page(item.value) if item is not None else None
        if page is None or page.expires <= t:
            return None
        return page

    def _expire_pages(self, t: float) -> None:
        while self._pages:
            ref, page = next(iter(self._pages.items()))
            if page.expires > t:
                break
            del self._pages[ref]

    def _draw(self, n: int) -> bytes:
        value = self._random(n)
        if not isinstance(value, bytes) or len(value) != n:
            raise ConfigurationError(
                f"random({n}) returned {type(value).__name__} of the wrong length; it must return "
                f"{n} random bytes, like secrets.token_bytes",
                reason="random",
            )
        return value

    # -- rendering ------------------------------------------------------------------------------

    def _plain(self, key: str, **values: str) -> str:
        """A string from ``strings.json`` with its placeholders filled, as plain text."""
        return string.Template(self._strings[key]).substitute(
            {"brand": self.brand, "host": "", "duration": "", "n": "", **values}
        )

    def _text(self, key: str, **values: str) -> str:
        """A string from ``strings.json`` as escaped HTML, its placeholders filled and escaped."""
        escaped = {name: _esc(value) for name, value in values.items()}
        return string.Template(_esc(self._strings[key])).substitute(
            {"brand": _esc(self.brand), "host": "", "duration": "", "n": "", **escaped}
        )

    def _fill(self, name: str, **values: str) -> str:
        filled = self._templates[name].substitute(values)
        return filled if name == "page.html" else filled.strip()

    def _render_page(self, ref: str, page: _Page, t: float, *, head: bool) -> HttpResponse:
        host = page.host  # already IDNA A-labels ("punycode"): homographs show as xn--
        address = f"https://{_authority(host, page.port, 443)}"
        if page.error is None:
            body = self._page_html(
                page_class="blocked",
                title=_esc(page.title),
                heading=_esc(page.title),
                lead=_esc(page.explanation),
                advice=self._text("advice_block", host=host),
            )
            return self._response(403, body, head=head)
        error = page.error
        details = self._fill(
            "details.html",
            details_label=self._text("details"),
            label_address=self._text("label_address"),
            label_error=self._text("label_error"),
            label_detail=self._text("label_detail"),
            label_fingerprint=self._text("label_fingerprint"),
            address=_esc(address),
            error_code=_esc(error.value),
            detail=_esc(page.detail) if page.detail else self._text("unknown"),
            fingerprint=(
                _esc(_fingerprint(page.leaf_sha256))
                if page.leaf_sha256 is not None
                else self._text("unknown")
            ),
            host=_esc(host),
            brand=_esc(self.brand),
        )
        reason = self._text(f"reason.{error.value}", host=host)
        button = panel = ""
        form_action = None
        if page.kind is ActionKind.OVERRIDE_PAGE:
            button = self._fill(
                "advanced-button.html",
                advanced=self._text("advanced"),
                host=_esc(host),
                brand=_esc(self.brand),
            )
            panel = self._fill(
                "advanced-panel.html",
                advanced_text=self._text(
                    "advanced_text", host=host, duration=self._duration(self.override_ttl)
                ),
                proceed=self._text("proceed", host=host),
                ref=_esc(ref),
                token=_esc(self._mint(ref, page, t)),
                host=_esc(host),
                brand=_esc(self.brand),
            )
            form_action = _form_action_target(host, page.port)
        else:
            key = "no_override_hsts" if page.hsts_known else "no_override_serious"
            reason = f"{reason} {self._text(key, host=host)}"
        body = self._page_html(
            page_class="cert-error",
            title=self._text("title_cert"),
            heading=self._text("heading_cert"),
            lead=self._text("lead_cert", host=host),
            reason=reason,
            advice=self._text("advice_cert", host=host),
            advanced_button=button,
            advanced_panel=panel,
            details=details,
        )
        return self._response(502, body, head=head, form_action=form_action)

    def _page_html(
        self,
        *,
        page_class: str,
        title: str,
        heading: str,
        lead: str,
        reason: str = "",
        advice: str = "",
        advanced_button: str = "",
        advanced_panel: str = "",
        details: str = "",
    ) -> bytes:
        return self._fill(
            "page.html",
            lang=_esc(self._strings["lang"]),
            dir=_esc(self._strings["dir"]),
            title=title,
            brand=_esc(self.brand),
            page_class=page_class,
            heading=heading,
            lead=lead,
            reason=reason,
            advice=advice,
            back=self._text("back"),
            advanced_button=advanced_button,
            advanced_panel=advanced_panel,
            details=details,
        ).encode("utf-8")

    def _message_page(self, status: int, key: str, *, head: bool = False) -> HttpResponse:
        title = self._text(f"title_{key}")
        body = self._page_html(
            page_class=f"message {key.replace('_', '-')}",
            title=title,
            heading=title,
            lead=self._text(f"lead_{key}"),
        )
        return self._response(status, body, head=head)

    def _method_not_allowed(self, allow: bytes, *, head: bool) -> HttpResponse:
        response = self._message_page(405, "bad_request", head=head)
        return HttpResponse(
            status=405,
            reason=response.reason,
            headers=(*response.headers, (b"allow", allow)),
            body=response.body,
        )

    def _duration(self, ttl: timedelta) -> str:
        seconds = int(ttl.total_seconds())
        if seconds % 86400 == 0:
            unit, count = "day", seconds // 86400
        elif seconds % 3600 == 0:
            unit, count = "hour", seconds // 3600
        else:
            unit, count = "minute", math.ceil(seconds / 60)
        if count == 1:
            return self._plain(f"duration_{unit}")
        return self._plain(f"duration_{unit}s", n=str(count))

    # -- responses ------------------------------------------------------------------------------

    def _response(
        self,
        status: int,
        body: bytes,
        *,
        head: bool,
        content_type: bytes = b"text/html; charset=utf-8",
        form_action: str | None = None,
    ) -> HttpResponse:
        # A page with the override form must let its own POST carry a real Origin: under
        # "no-referrer" browsers send "Origin: null" for a form POST (Fetch, "append a request
        # Origin header"), which the Origin check rightly refuses. "same-origin" still sends no
        # referrer to any other origin.
        referrer = b"no-referrer" if form_action is None else b"same-origin"
        headers = (
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"content-security-policy", _csp(form_action).encode("ascii")),
            (b"referrer-policy", referrer),
            *_COMMON_HEADERS,
        )
        return HttpResponse(
            status=status, reason=_REASONS[status], headers=headers, body=b"" if head else body
        )

    def _redirect(self, location: str, *, close: bool) -> HttpResponse:
        headers: tuple[tuple[bytes, bytes], ...] = (
            (b"location", location.encode("ascii")),
            (b"content-length", b"0"),
            (b"cache-control", b"no-store"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-content-type-options", b"nosniff"),
        )
        if close:
            headers = (*headers, (b"connection", b"close"))
        return HttpResponse(status=303, reason=_REASONS[303], headers=headers, body=b"")

    def _redirect_to(self, ref: str, *, close: bool) -> HttpResponse:
        return self._redirect(f"{self.error_origin}/error/{ref}", close=close)

    def _is_own_authority(self, value: bytes) -> bool:
        parsed = _parse_authority(value)
        if parsed is None:
            return False
        host, port = parsed
        default = 443 if self.error_origin_scheme == "https" else 80
        return self.is_error_origin(host, default if port is None else port)


# -- helpers --------------------------------------------------------------------------------------


def _timestamp(now: datetime) -> float:
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise ValueError(f"now must be an aware UTC datetime, not {now!r}")
    return now.timestamp()


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _clean_text(text: object, limit: int) -> str:
    """Plain text for a page: control characters dropped, whitespace collapsed, cut to ``limit``."""
    if not isinstance(text, str):
        return ""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    cleaned = " ".join(cleaned.split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 1].rstrip() + "…"
    return cleaned


def _is_visible_ascii(text: str) -> bool:
    return all("!" <= c <= "~" for c in text)


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, not {port!r}")
    return port


def _authority(host: str, port: int, default: int) -> str:
    """``host[:port]`` as in a URL (RFC 3986 §3.2.2: IPv6 literals in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default else f"{shown}:{port}"


def _form_action_target(host: str, port: int) -> str:
    """The CSP source for the override's redirect back to the site (form-action covers it)."""
    if ip_address_of(host) is not None:
        # CSP3 host-source has no IPv6 syntax, and its host matching is defined for domains.
        return "https:"
    return f"https://{host}:{port}"


def _csp(form_action: str | None) -> str:
    # No 'unsafe-inline' anywhere: the only script and style are same-origin files.
    form = "'none'" if form_action is None else f"'self' {form_action}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"form-action {form}; base-uri 'none'; frame-ancestors 'none'"
    )


def _fingerprint(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def _client_tag(client: str | None) -> str:
    """A client identity as it appears in a store key: hashed, so the store holds no addresses."""
    if client is None:
        return "-"
    return hashlib.sha256(b"tlsmitm client\x00" + client.encode("utf-8")).hexdigest()[:32]


def _override_key(client: str | None, host: str, sha: bytes, error: CertError) -> str:
    # matrix UI-05: the exact (host, certificate SHA-256, error class) triple, nothing wider,
    # and only for the client that made the decision (issue 15 fault 4).
    return f"{host} {sha.hex()} {error.value} {_client_tag(client)}"


def _safe_return_target(target: bytes) -> str:
    """The first request's target if it is a plain origin-form target, else ``/``."""
    try:
        text = target.decode("ascii")
    except (UnicodeDecodeError, AttributeError):
        return "/"
    if (
        not text.startswith("/")
        or len(text) > _MAX_TARGET_CHARS
        or not _is_visible_ascii(text)
        or "#" in text
    ):
        return "/"
    return text


def _b64decode(text: str) -> bytes | None:
    if not text or not all(c.isalnum() or c in "-_" for c in text) or not text.isascii():
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _parse_form(body: bytes) -> tuple[str, str] | None:
    """``(ref, token)`` from a urlencoded body with exactly one of each, else ``None``."""
    try:
        text = body.decode("ascii")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True, max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        return None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            return None
        fields[name] = value
    ref, token = fields.get("ref"), fields.get("token")
    if not ref or not token:
        return None
    return ref, token


def _parse_authority(value: bytes) -> tuple[str, int | None] | None:
    """``(host, port)`` from a ``Host`` header value (RFC 9110 §7.2), else ``None``."""
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    port_text = ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else ""
        if rest and not port_text:
            return None
    else:
        host, sep, port_text = text.partition(":")
        if sep and not port_text:
            return None
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
            return None
        port = int(port_text)
    if not host:
        return None
    return host, port


def _parse_origin(origin: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, serialised origin)`` of the configured error origin."""

    def bad(why: str) -> ConfigurationError:
        return ConfigurationError(
            f"error_origin {origin!r} {why}; use e.g. https://error.invalid or "
            "http://127.0.0.1:8080",
            reason="error_origin",
        )

    if not isinstance(origin, str):
        raise bad("is not a string")
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError as exc:
        raise bad("is not a URL") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise bad("must start with https://")
    if parts.username is not None or parts.password is not None:
        raise bad("must not contain user information")
    if parts.query or parts.fragment or parts.path not in ("", "/") or origin.endswith("?"):
        raise bad("must be an origin, without a path, query or fragment")
    if not parts.hostname:
        raise bad("has no host")
    try:
        host = normalize_host(parts.hostname)
    except InvalidHostName as exc:
        raise bad(f"has an invalid host: {exc}") from exc
    default = 443 if scheme == "https" else 80
    if port == 0:
        raise bad("has port 0")
    port = default if port is None else port
    if scheme == "http":
        address = ip_address_of(host)
        if host != "localhost" and (address is None or not address.is_loopback):
            # The override token would cross the network in clear text.
            raise bad("uses http on a host that is not a loopback address")
    return scheme, host, port, f"{scheme}://{_authority(host, port, default)}"


def _read_template(directory: Path | None, name: str) -> str:
    if directory is not None and (directory / name).is_file():
        path = directory / name
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(
                f"cannot read template {path}: {exc}; it must be a readable UTF-8 file",
                reason="templates",
            ) from exc
    # Next to this module, not through importlib.resources.files("tlsmitm"): started from a
    # directory that holds a folder named tlsmitm/, an editable install's "tlsmitm" can resolve
    # to a namespace package over that folder (a MultiplexedPath without the templates; issue 15).
    bundled = Path(__file__).with_name("templates") / name
    if bundled.is_file():
        return bundled.read_text(encoding="utf-8")
    return (
        importlib.resources.files(__package__ or "tlsmitm")
        .joinpath("templates")
        .joinpath(name)
        .read_text("utf-8")
    )  # (a zip or other loader without files on disk)


def _check_template(text: str, allowed: frozenset[str], where: str) -> string.Template:
    template = string.Template(text)
    if not template.is_valid():
        raise ConfigurationError(
            f"{where} has a '$' that is not a placeholder; write '$$' for a literal dollar sign",
            reason="templates",
        )
    unknown = set(template.get_identifiers()) - allowed
    if unknown:
        raise ConfigurationError(
            f"{where} uses unknown placeholders {sorted(unknown)}; available: {sorted(allowed)}",
            reason="templates",
        )
    return template


def _load_strings(directory: Path | None) -> dict[str, str]:
    builtin: dict[str, str] = json.loads(_read_template(None, _STRINGS_FILE))
    strings = dict(builtin)
    if directory is not None and (directory / _STRINGS_FILE).is_file():
        where = directory / _STRINGS_FILE
        try:
            custom = json.loads(_read_template(directory, _STRINGS_FILE))
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"{where} is not valid JSON: {exc}", reason="templates"
            ) from exc
        if not isinstance(custom, dict):
            raise ConfigurationError(
                f"{where} must be a JSON object of strings", reason="templates"
            )
        for key, value in custom.items():
            if key not in builtin or not isinstance(value, str):
                raise ConfigurationError(
                    f"{where}: {key!r} is not a known string key or its value is not a string",
                    reason="templates",
                )
            strings[key] = value
    for key, value in strings.items():
        _check_template(value, _STRING_PLACEHOLDERS, f"{_STRINGS_FILE} key {key!r}")
    return strings


def _load_templates(
    directory: Path | None,
) -> tuple[dict[str, string.Template], dict[str, bytes], dict[str, str]]:
    if directory is not None and not Path(directory).is_dir():
        raise ConfigurationError(
            f"templates directory {directory} does not exist; create it or pass templates=None",
            reason="templates",
        )
    directory = None if directory is None else Path(directory)
    templates = {
        name: _check_template(_read_template(directory, name), allowed, name)
        for name, allowed in _TEMPLATES.items()
    }
    assets = {name: _read_template(directory, name).encode("utf-8") for name in _ASSETS}
    return templates, assets, _load_strings(directory)


def _encode_page(page: _Page) -> bytes:
    record = {
        "kind": page.kind.value,
        "host": page.host,
        "port": page.port,
        "error": page.error.value if page.error is not None else None,
        "detail": page.detail,
        "sha": page.leaf_sha256.hex() if page.leaf_sha256 is not None else None,
        "hsts": page.hsts_known,
        "return": page.return_target,
        "title": page.title,
        "explanation": page.explanation,
        "expires": page.expires,
        "client": page.client,
    }
    return json.dumps(record, separators=(",", ":")).encode("utf-8")


def _decode_page(raw: bytes) -> _Page | None:
    """A page another worker stored; ``None`` for anything this version cannot trust."""
    try:
        record = json.loads(raw)
        sha = record["sha"]
        error = record["error"]
        client = record["client"]
        page = _Page(
            kind=ActionKind(record["kind"]),
            host=normalize_host(str(record["host"])),
            port=_check_port(int(record["port"])),
            error=CertError(error) if error is not None else None,
            detail=str(record["detail"]),
            leaf_sha256=bytes.fromhex(sha) if sha is not None else None,
            hsts_known=bool(record["hsts"]),
            return_target=_safe_return_target(str(record["return"]).encode("ascii")),
            title=str(record["title"]),
            explanation=str(record["explanation"]),
            expires=float(record["expires"]),
            client=str(client) if client is not None else None,
        )
    except (ValueError, KeyError, TypeError, UnicodeError, InvalidHostName):
        return None
    if page.kind not in (ActionKind.BLOCK_PAGE, ActionKind.OVERRIDE_PAGE):
        return None
    if page.kind is ActionKind.OVERRIDE_PAGE and (page.error is None or page.leaf_sha256 is None):
        return None
    return page


def shared_token_key(
    store: StateStore, random: Callable[[int], bytes] = secrets.token_bytes
) -> bytes:
    """The override-token key of an installation: made once, kept in its shared store.

    Every worker and every node sharing ``store`` gets the same key, so a token minted on the
    page one worker served is accepted by another. The first caller's random key wins
    (``add_if_absent`` is atomic); later callers read it.

    Raises:
        ConfigurationError: the store cannot be read or written (``reason`` from the store), or
            has no atomic ``add_if_absent``.
    """
    add = getattr(store, "add_if_absent", None)
    if add is None:
        raise ConfigurationError(
            f"{type(store).__name__} cannot hold a shared key (no add_if_absent)",
            reason="state_store",
        )
    item = store.get(SECRET_NAMESPACE, _TOKEN_KEY_NAME)
    if item is None:  # the first process of the installation (a read-only store fails here)
        add(SECRET_NAMESPACE, _TOKEN_KEY_NAME, random(32), expires=math.inf, now=0.0)
        item = store.get(SECRET_NAMESPACE, _TOKEN_KEY_NAME)
    if item is None or len(item.value) < _MIN_KEY_BYTES:
        raise ConfigurationError(
            "the shared override-token key could not be read back from the state store",
            reason="state_store",
        )
    return item.value
