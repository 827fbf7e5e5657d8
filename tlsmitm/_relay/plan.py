"""The connection plan: what happens to one intercepted connection, decided without I/O.

Theory of operation
-------------------
The flow (:mod:`.flow`) learns about a connection in two stages, and after each it asks this
module what to do; it never decides anything itself.

1. With the intake (CONNECT target or transparent destination) and the ClientHello in hand,
   :func:`plan_upstream` decides the name the upstream certificate must match, the SNI to send and
   the ALPN list to offer upstream.
2. With the verdict, the responder's :class:`~tlsmitm.Action` (which already weighed HSTS
   knowledge) and the ALPN the upstream selected, :func:`plan_connection` decides the leaf
   (issuer, and whether it mirrors the upstream leaf), the ALPN selected for the client, which
   relay runs (or why the decrypted bytes are spliced), whether STS may be recorded and whether
   the upstream connection may be pooled.

The rules, with their sources:

* ALPN. Without an HTTP/2 relay, the client's own relayable protocols are offered upstream in
  its order and the client gets exactly what the upstream chose (``h2`` is then spliced, which
  the decision log says). With an HTTP/2 relay, ``h2, http/1.1`` is offered upstream whenever
  the client offered either, and each side is negotiated on its own (the relay translates).
* An upstream that selects no ALPN speaks HTTP/1.1 (RFC 7301 §3.2: no protocol was negotiated,
  so the default of the port's scheme applies; RFC 9113 §3.2: ``h2`` over TLS is only ever
  negotiated with ALPN). Such a connection goes through the HTTP/1.1 relay whatever the port,
  after a sniff of the first bytes (:func:`sniff`): what is not HTTP is spliced, and the record
  says so.
* STS is recorded only from a verified, not overridden upstream (RFC 6797 §8.1); only such an
  upstream may be pooled for the next client.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .._forge import IssuerKind
from .._names import HostName, is_ip_literal, normalize_host
from .._responder import Action, ActionKind
from .._websocket import Headers, negotiated_upgrade

__all__ = [
    "ConnectionPlan",
    "Decision",
    "LeafPlan",
    "RelayKind",
    "SniffResult",
    "SpliceReason",
    "UpstreamPlan",
    "client_speaks_http",
    "plan_connection",
    "plan_upstream",
    "relay_after_sniff",
    "relay_after_upgrade",
    "sniff",
]

H1: bytes = b"http/1.1"
H2: bytes = b"h2"
_RELAYABLE: tuple[bytes, ...] = (H2, H1)
# Ports where a client that offers no ALPN is taken to speak HTTP (so it can be shown a page).
_HTTP_PORTS = frozenset({80, 443, 8000, 8080, 8443})
# Longest method token we wait for before deciding (RFC 9110 §9: methods are tokens; the
# registered ones are at most 17 characters, "VERSION-CONTROL"); one more byte for the space.
_MAX_METHOD = 24
_TCHAR = frozenset(  # RFC 9110 §5.6.2
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4


class Decision(enum.StrEnum):
    """The decision-log decision of a connection."""

    INTERCEPT = "intercept"
    BYPASS = "bypass"
    BLOCK = "block"
    ERROR = "error"


class RelayKind(enum.StrEnum):
    """Which relay carries the decrypted bytes (:func:`~tlsmitm._relay.relays.relay_for`)."""

    H1 = "http/1.1"
    H2 = "h2"
    WEBSOCKET = "websocket"
    SPLICE = "splice"


class SpliceReason(enum.StrEnum):
    """Why decrypted bytes are relayed raw, without inspection (always in the decision log)."""

    ALPN_WITHOUT_RELAY = "alpn_without_relay"  # e.g. h2 before an HTTP/2 relay is registered
    NOT_HTTP = "not_http"  # no ALPN, and the client's first bytes are no HTTP request
    SERVER_SPOKE_FIRST = "server_spoke_first"  # no ALPN, a banner protocol (SMTP, IMAP, FTP)
    H2_WITHOUT_ALPN = "h2_without_alpn"  # an HTTP/2 preface with no h2 relay registered
    UPGRADE_WITHOUT_RELAY = "upgrade_without_relay"  # after 101, nothing can parse the protocol
    WEBSOCKET_EXTENSION = "websocket_extension"  # a WebSocket extension tlsmitm cannot parse


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamPlan:
    """Stage 1: how to talk to the upstream.

    Attributes:
        host: the dialled host (CONNECT host or transparent address), normalised.
        port: the dialled port.
        tls_name: the name the upstream certificate must match and the leaf is minted for: the
            SNI name, else the dialled host (matrix MIR-05: an IP literal then matches only an
            iPAddress SAN).
        sni: the server name to send upstream (``None`` for an IP literal, RFC 6066 §3).
        alpn_offer: the ALPN list offered upstream, in preference order.
        client_alpn: what the client offered (all of it, in its order).
        client_speaks_http: whether the client can be shown a page (``ErrorResponder.plan``).
    """

    host: HostName
    port: int
    tls_name: HostName
    sni: HostName | None
    alpn_offer: tuple[bytes, ...]
    client_alpn: tuple[bytes, ...]
    client_speaks_http: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LeafPlan:
    """Which leaf the client gets.

    Attributes:
        issuer: the trusted intermediate, or the never-trusted error CA (passthrough).
        mirror_upstream: the leaf copies the upstream leaf's names and dates (``False``: names
            only the host, as for pages and overridden connections).
        upstream_verified: the upstream chain verified (only then are its names mirrored into
            a trusted leaf).
    """

    issuer: IssuerKind
    mirror_upstream: bool
    upstream_verified: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPlan:
    """Stage 2: what the flow does after verification.

    Attributes:
        decision: the decision-log decision.
        reason: the decision-log reason (``verified``, ``overridden``,
            ``passthrough_untrusted``, ``block_page``, ``override_page``, ``alert``).
        leaf: the leaf for the client handshake; ``None``: no handshake (a TLS alert instead).
        client_alpn: the ALPN protocol selected for the client (``None``: none).
        relay: which relay runs; ``None`` for an alert or an error page.
        sniff: decide between :attr:`relay` and a splice by the first bytes (no ALPN).
        splice_reason: why the decrypted bytes are spliced (with ``relay`` ``SPLICE``).
        client_protocol: what the client speaks, when known (``http/1.1``, ``h2``).
        upstream_protocol: what the upstream speaks, when known.
        record_sts: STS headers from this upstream may be recorded (RFC 6797 §8.1).
        poolable: the upstream connection may be kept for the next client after a clean end.
        error_redirect: answer the first request with a redirect to the error origin.
    """

    decision: Decision
    reason: str
    leaf: LeafPlan | None
    client_alpn: bytes | None
    relay: RelayKind | None
    sniff: bool = False
    splice_reason: SpliceReason | None = None
    client_protocol: str | None = None
    upstream_protocol: str | None = None
    record_sts: bool = False
    poolable: bool = False
    error_redirect: bool = False

    def __post_init__(self) -> None:
        if (self.relay is RelayKind.SPLICE) != (self.splice_reason is not None):
            raise ValueError("a splice needs a reason, and only a splice has one")
        if self.record_sts and (self.leaf is None or self.leaf.issuer is not IssuerKind.TRUSTED):
            raise ValueError("STS is recorded only from intercepted, verified upstreams")
        if self.poolable and not self.record_sts:
            raise ValueError("only verified, not overridden upstreams are pooled")
        if self.error_redirect and self.relay is not None:
            raise ValueError("an error redirect runs no relay")


def client_speaks_http(client_alpn: Sequence[bytes], port: int) -> bool:
    """Can this client be shown a page? It offers ``http/1.1``, or no ALPN on an HTTP port."""
    return H1 in client_alpn or (not client_alpn and port in _HTTP_PORTS)


def plan_upstream(
    *,
    host: str,
    port: int,
    server_name: str | None,
    client_alpn: Sequence[bytes],
    relays: Collection[RelayKind],
) -> UpstreamPlan:
    """Stage 1, from the intake and the ClientHello.

    Args:
        host: the dialled host, normalised.
        port: the dialled port.
        server_name: the ClientHello's SNI, if any.
        client_alpn: the ClientHello's ALPN list.
        relays: the relays registered.

    Raises:
        InvalidHostName: the SNI name is not a valid host name.
    """
    dialled = normalize_host(host)  # (free for a HostName from the edge)
    tls_name = normalize_host(server_name) if server_name else dialled
    offered = tuple(client_alpn)
    if RelayKind.H2 in relays and any(p in _RELAYABLE for p in offered):
        offer = _RELAYABLE
    else:
        offer = tuple(p for p in offered if p in _RELAYABLE)
    return UpstreamPlan(
        host=dialled,
        port=port,
        tls_name=tls_name,
        sni=None if is_ip_literal(tls_name) else tls_name,
        alpn_offer=offer,
        client_alpn=offered,
        client_speaks_http=client_speaks_http(offered, port),
    )


def plan_connection(
    upstream: UpstreamPlan,
    *,
    verified: bool,
    action: Action,
    upstream_alpn: bytes | None,
    relays: Collection[RelayKind],
    pool_enabled: bool,
) -> ConnectionPlan:
    """Stage 2, from the verdict, the responder's action and the upstream's ALPN.

    Args:
        upstream: the stage-1 plan.
        verified: the upstream chain verified without errors.
        action: :meth:`ErrorResponder.plan`'s action (HSTS knowledge is in it).
        upstream_alpn: the ALPN protocol the upstream selected (``None``: none).
        relays: the relays registered.
        pool_enabled: the pool would keep this upstream connection after a clean end (pooling
            is on and this is not a first visit: :meth:`UpstreamPool.would_keep`).

    Raises:
        ValueError: the verdict and the action contradict each other.
    """
    kind = action.kind
    # (Action itself refuses an override on a known HSTS host, RFC 6797 §12.1.)
    if verified != (kind is ActionKind.INTERCEPT and not action.overridden):
        raise ValueError(f"the verdict (verified={verified}) contradicts the action {kind.value}")
    if kind is ActionKind.ALERT:
        return ConnectionPlan(
            decision=Decision.BLOCK, reason="alert", leaf=None, client_alpn=None, relay=None
        )
    if action.needs_page:
        page_alpn = H1 if upstream.client_speaks_http and upstream.client_alpn else None
        return ConnectionPlan(
            decision=Decision.BLOCK,
            reason=kind.value,
            leaf=LeafPlan(
                issuer=IssuerKind.TRUSTED, mirror_upstream=False, upstream_verified=False
            ),
            client_alpn=page_alpn,
            relay=None,
            client_protocol=H1.decode() if page_alpn else None,
            error_redirect=True,
        )
    if kind is ActionKind.PASSTHROUGH_UNTRUSTED:
        leaf = LeafPlan(issuer=IssuerKind.ERROR, mirror_upstream=True, upstream_verified=False)
        reason = "passthrough_untrusted"
    else:
        # A user override already accepted this upstream's error on tlsmitm's page: the leaf
        # names only the host and does not inherit the upstream's (e.g. expired) dates, or the
        # browser would raise the same error a second time.
        leaf = LeafPlan(
            issuer=IssuerKind.TRUSTED,
            mirror_upstream=not action.overridden,
            upstream_verified=verified,
        )
        reason = "overridden" if action.overridden else "verified"
    record_sts = action.may_record_hsts and verified  # RFC 6797 §8.1
    client_alpn, relay, splice_reason, sniff_first = _choose_relay(upstream, upstream_alpn, relays)
    upstream_protocol = H1.decode() if upstream_alpn is None else _text(upstream_alpn)
    if relay is RelayKind.SPLICE:
        client_protocol = _text(client_alpn) if client_alpn else None
    else:
        client_protocol = _text(client_alpn) if client_alpn else H1.decode()
    return ConnectionPlan(
        decision=Decision.INTERCEPT,
        reason=reason,
        leaf=leaf,
        client_alpn=client_alpn,
        relay=relay,
        sniff=sniff_first,
        splice_reason=splice_reason,
        client_protocol=client_protocol,
        upstream_protocol=upstream_protocol,
        record_sts=record_sts,
        poolable=record_sts and pool_enabled and relay is RelayKind.H1,
    )


def _choose_relay(
    upstream: UpstreamPlan, upstream_alpn: bytes | None, relays: Collection[RelayKind]
) -> tuple[bytes | None, RelayKind, SpliceReason | None, bool]:
    """(client ALPN, relay, splice reason, sniff first) for an intercepted connection."""
    h2_relay = RelayKind.H2 in relays
    client_h2 = h2_relay and H2 in upstream.client_alpn
    if upstream_alpn == H2:
        if not h2_relay:
            return H2, RelayKind.SPLICE, SpliceReason.ALPN_WITHOUT_RELAY, False
        return (H2 if client_h2 else _h1_or_none(upstream)), RelayKind.H2, None, False
    if upstream_alpn == H1:
        if client_h2:
            return H2, RelayKind.H2, None, False
        return H1, RelayKind.H1, None, False
    if upstream_alpn is None:
        # RFC 7301 §3.2 / RFC 9113 §3.2: no ALPN, so HTTP/1.1 -- if it is HTTP at all.
        if client_h2:
            return H2, RelayKind.H2, None, False
        return None, RelayKind.H1, None, True
    # A protocol tlsmitm never offered (a misbehaving server): the client gets it only if it
    # asked for it (RFC 7301 §3.2), and the bytes are spliced.
    mirrored = upstream_alpn if upstream_alpn in upstream.client_alpn else None
    return mirrored, RelayKind.SPLICE, SpliceReason.ALPN_WITHOUT_RELAY, False


def _h1_or_none(upstream: UpstreamPlan) -> bytes | None:
    return H1 if H1 in upstream.client_alpn else None


def _text(protocol: bytes) -> str:
    return protocol.decode("ascii", "replace")


class SniffResult(enum.Enum):
    """What the first bytes of a connection without ALPN look like."""

    NEED_MORE = "need_more"
    HTTP1 = "http/1.1"
    H2_PREFACE = "h2"
    NOT_HTTP = "not_http"


def sniff(data: bytes) -> SniffResult:
    """Classify the client's first decrypted bytes on a connection without ALPN.

    An HTTP/1.1 request starts with a method token and a space (RFC 9112 §3); the HTTP/2
    connection preface is ``PRI * HTTP/2.0`` (RFC 9113 §3.4). Anything else is not HTTP. Only
    the method is judged here; h11 validates the rest of the head.
    """
    if _H2_PREFACE.startswith(data[: len(_H2_PREFACE)]) and data:
        return SniffResult.H2_PREFACE if len(data) >= len(_H2_PREFACE) else SniffResult.NEED_MORE
    for index, byte in enumerate(data[: _MAX_METHOD + 1]):
        if byte == 0x20:
            return SniffResult.HTTP1 if index > 0 else SniffResult.NOT_HTTP
        if byte not in _TCHAR:
            return SniffResult.NOT_HTTP
    return SniffResult.NEED_MORE if len(data) <= _MAX_METHOD else SniffResult.NOT_HTTP


def relay_after_upgrade(
    request_headers: Headers, response_headers: Headers, relays: Collection[RelayKind]
) -> tuple[RelayKind, SpliceReason | None]:
    """Which relay takes over after ``101 Switching Protocols``.

    A WebSocket (RFC 6455 §4.2.2) goes to the WebSocket relay when one is registered and the
    101 accepted nothing it cannot parse (:func:`~tlsmitm._websocket.negotiated_upgrade`: an
    extension other than permessage-deflate changes what frames mean, RFC 6455 §9) --
    ``WEBSOCKET_EXTENSION`` otherwise; anything else, or a WebSocket without a relay, is spliced
    (``UPGRADE_WITHOUT_RELAY``).
    """
    upgrade = negotiated_upgrade(request_headers, response_headers)
    if RelayKind.WEBSOCKET not in relays or upgrade.unsupported_protocol:
        return RelayKind.SPLICE, SpliceReason.UPGRADE_WITHOUT_RELAY
    if upgrade.unsupported is not None:
        return RelayKind.SPLICE, SpliceReason.WEBSOCKET_EXTENSION
    return RelayKind.WEBSOCKET, None


def relay_after_sniff(
    result: SniffResult, relays: Collection[RelayKind]
) -> tuple[RelayKind, SpliceReason | None]:
    """Which relay takes a connection without ALPN once its first bytes are classified."""
    if result is SniffResult.HTTP1:
        return RelayKind.H1, None
    if result is SniffResult.H2_PREFACE:
        if RelayKind.H2 in relays:
            return RelayKind.H2, None
        return RelayKind.SPLICE, SpliceReason.H2_WITHOUT_ALPN
    return RelayKind.SPLICE, SpliceReason.NOT_HTTP
