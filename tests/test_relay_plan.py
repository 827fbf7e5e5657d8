"""The connection plan (tlsmitm._relay.plan) and the flow-state table, without sockets."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsmitm._errors import CertError
from tlsmitm._forge import IssuerKind
from tlsmitm._relay.plan import (
    ConnectionPlan,
    Decision,
    LeafPlan,
    RelayKind,
    SniffResult,
    SpliceReason,
    UpstreamPlan,
    client_speaks_http,
    plan_connection,
    plan_upstream,
    relay_after_sniff,
    relay_after_upgrade,
    sniff,
)
from tlsmitm._relay.state import TRANSITIONS, FlowRecord, FlowState
from tlsmitm._responder import Action, ActionKind

H1, H2 = b"http/1.1", b"h2"
HOST = "www.example.test"
SHA = bytes(32)
BASIC = frozenset({RelayKind.H1, RelayKind.SPLICE})
WITH_H2 = BASIC | {RelayKind.H2}


def upstream(
    client_alpn: tuple[bytes, ...] = (H2, H1),
    *,
    port: int = 443,
    relays: frozenset[RelayKind] = BASIC,
    sni: str | None = HOST,
) -> UpstreamPlan:
    return plan_upstream(
        host=HOST, port=port, server_name=sni, client_alpn=client_alpn, relays=relays
    )


def intercept(*, overridden: bool = False) -> Action:
    if overridden:
        return Action(
            kind=ActionKind.INTERCEPT,
            host=HOST,
            error=CertError.EXPIRED,
            overridden=True,
            leaf_sha256=SHA,
        )
    return Action(kind=ActionKind.INTERCEPT, host=HOST, error=None)


def failing(kind: ActionKind, *, hsts_known: bool = False) -> Action:
    error = CertError.REVOKED if kind is ActionKind.BLOCK_PAGE else CertError.EXPIRED
    return Action(kind=kind, host=HOST, error=error, leaf_sha256=SHA, hsts_known=hsts_known)


# -- stage 1 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_alpn", "relays", "offer"),
    [
        ((H2, H1), BASIC, (H2, H1)),  # today: the client's list (h2 is then spliced)
        ((H1,), BASIC, (H1,)),
        ((H1, H2), BASIC, (H1, H2)),  # the client's order
        ((b"imap", H1), BASIC, (H1,)),  # only what tlsmitm relays
        ((), BASIC, ()),
        ((b"acme-tls/1",), BASIC, ()),
        ((H1,), WITH_H2, (H2, H1)),  # an h2 relay: each side negotiated on its own
        ((H2,), WITH_H2, (H2, H1)),
        ((), WITH_H2, ()),  # a client without ALPN: nothing offered (it may not be HTTP)
        ((b"imap",), WITH_H2, ()),
    ],
)
def test_the_upstream_offer(
    client_alpn: tuple[bytes, ...], relays: frozenset[RelayKind], offer: tuple[bytes, ...]
) -> None:
    assert upstream(client_alpn, relays=relays).alpn_offer == offer


def test_the_tls_name_is_the_sni_name_else_the_dialled_host() -> None:
    plan = plan_upstream(
        host="10.0.0.1", port=443, server_name="WWW.Example.TEST.", client_alpn=(), relays=BASIC
    )
    assert plan.tls_name == "www.example.test"
    assert plan.sni == "www.example.test"
    bare = plan_upstream(host="10.0.0.1", port=443, server_name=None, client_alpn=(), relays=BASIC)
    assert bare.tls_name == "10.0.0.1"
    assert bare.sni is None  # RFC 6066 §3: no IP literals in SNI


@pytest.mark.parametrize(
    ("client_alpn", "port", "speaks"),
    [((H1,), 993, True), ((H2,), 443, False), ((), 443, True), ((), 993, False), ((), 8080, True)],
)
def test_client_speaks_http(client_alpn: tuple[bytes, ...], port: int, speaks: bool) -> None:
    assert client_speaks_http(client_alpn, port) is speaks


# -- stage 2: a table -------------------------------------------------------------------------

TABLE = [
    # (name, client ALPN, relays, verified, action, upstream ALPN) -> expected fields
    (
        "verified h1",
        (H1,),
        BASIC,
        True,
        intercept(),
        H1,
        {"relay": RelayKind.H1, "client_alpn": H1, "record_sts": True, "poolable": True},
    ),
    (
        "verified, no ALPN upstream: HTTP/1.1 after a sniff, STS recorded",
        (H1,),
        BASIC,
        True,
        intercept(),
        None,
        {"relay": RelayKind.H1, "sniff": True, "client_alpn": None, "record_sts": True},
    ),
    (
        "h2 without an h2 relay: spliced, and the plan says why",
        (H2, H1),
        BASIC,
        True,
        intercept(),
        H2,
        {
            "relay": RelayKind.SPLICE,
            "splice_reason": SpliceReason.ALPN_WITHOUT_RELAY,
            "client_alpn": H2,
            "poolable": False,
        },
    ),
    (
        "h2 with an h2 relay",
        (H2, H1),
        WITH_H2,
        True,
        intercept(),
        H2,
        {"relay": RelayKind.H2, "client_alpn": H2, "poolable": False, "record_sts": True},
    ),
    (
        "client h1, upstream h2: the h2 relay translates",
        (H1,),
        WITH_H2,
        True,
        intercept(),
        H2,
        {"relay": RelayKind.H2, "client_alpn": H1, "client_protocol": "http/1.1"},
    ),
    (
        "client h2, upstream h1",
        (H2, H1),
        WITH_H2,
        True,
        intercept(),
        H1,
        {"relay": RelayKind.H2, "client_alpn": H2, "upstream_protocol": "http/1.1"},
    ),
    (
        "overridden: no STS, no pool, the leaf names only the host",
        (H1,),
        BASIC,
        False,
        intercept(overridden=True),
        H1,
        {"reason": "overridden", "record_sts": False, "poolable": False},
    ),
    (
        "passthrough: the error CA, mirroring the upstream leaf",
        (H1,),
        BASIC,
        False,
        failing(ActionKind.PASSTHROUGH_UNTRUSTED),
        H1,
        {
            "leaf": LeafPlan(
                issuer=IssuerKind.ERROR, mirror_upstream=True, upstream_verified=False
            ),
            "record_sts": False,
        },
    ),
    (
        "block page",
        (H2, H1),
        BASIC,
        False,
        failing(ActionKind.BLOCK_PAGE),
        H2,
        {"decision": Decision.BLOCK, "error_redirect": True, "relay": None, "client_alpn": H1},
    ),
    (
        "a page for a client without ALPN on 443",
        (),
        BASIC,
        False,
        failing(ActionKind.OVERRIDE_PAGE),
        None,
        {"reason": "override_page", "client_alpn": None, "error_redirect": True},
    ),
    (
        "alert",
        (b"imap",),
        BASIC,
        False,
        Action(kind=ActionKind.ALERT, host=HOST, error=CertError.EXPIRED),
        None,
        {"decision": Decision.BLOCK, "reason": "alert", "leaf": None, "relay": None},
    ),
]


@pytest.mark.parametrize(
    ("client_alpn", "relays", "verified", "action", "upstream_alpn", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_plan_table(
    client_alpn: tuple[bytes, ...],
    relays: frozenset[RelayKind],
    verified: bool,
    action: Action,
    upstream_alpn: bytes | None,
    expected: dict[str, object],
) -> None:
    plan = plan_connection(
        upstream(client_alpn, relays=relays),
        verified=verified,
        action=action,
        upstream_alpn=upstream_alpn,
        relays=relays,
        pool_enabled=True,
    )
    for field, value in expected.items():
        assert getattr(plan, field) == value, field


def test_a_verdict_that_contradicts_the_action_is_refused() -> None:
    with pytest.raises(ValueError, match="contradicts"):
        plan_connection(
            upstream(),
            verified=True,
            action=failing(ActionKind.BLOCK_PAGE),
            upstream_alpn=H1,
            relays=BASIC,
            pool_enabled=True,
        )
    with pytest.raises(ValueError, match="contradicts"):
        plan_connection(
            upstream(),
            verified=False,
            action=intercept(),
            upstream_alpn=H1,
            relays=BASIC,
            pool_enabled=True,
        )


def test_the_plan_refuses_inconsistent_values() -> None:
    trusted = LeafPlan(issuer=IssuerKind.TRUSTED, mirror_upstream=True, upstream_verified=True)
    base = {"decision": Decision.INTERCEPT, "reason": "verified", "client_alpn": H1}
    with pytest.raises(ValueError, match="reason"):
        ConnectionPlan(**base, leaf=trusted, relay=RelayKind.SPLICE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="STS"):
        ConnectionPlan(**base, leaf=None, relay=RelayKind.H1, record_sts=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pooled"):
        ConnectionPlan(**base, leaf=trusted, relay=RelayKind.H1, poolable=True)  # type: ignore[arg-type]


# -- stage 2: properties over every input --------------------------------------------------------

ALPNS = st.lists(st.sampled_from([H1, H2, b"imap", b"acme-tls/1"]), unique=True, max_size=3)
RELAY_SETS = st.sets(st.sampled_from([RelayKind.H2, RelayKind.WEBSOCKET])).map(
    lambda extra: BASIC | extra
)


@st.composite
def verdict_and_action(draw: st.DrawFn) -> tuple[bool, Action]:
    hsts_known = draw(st.booleans())
    choices = [
        (True, intercept()),
        (False, failing(ActionKind.BLOCK_PAGE, hsts_known=hsts_known)),
        (False, Action(kind=ActionKind.ALERT, host=HOST, error=CertError.EXPIRED)),
    ]
    if not hsts_known:
        choices += [
            (False, intercept(overridden=True)),
            (False, failing(ActionKind.OVERRIDE_PAGE)),
            (False, failing(ActionKind.PASSTHROUGH_UNTRUSTED)),
        ]
    return draw(st.sampled_from(choices))


@settings(deadline=None)  # (a loaded CI machine must not turn a slow example into a failure)
@given(
    client_alpn=ALPNS,
    port=st.sampled_from([443, 993, 8443, 25]),
    relays=RELAY_SETS,
    verdict_action=verdict_and_action(),
    upstream_pick=st.integers(min_value=-1, max_value=3),
    pool_enabled=st.booleans(),
)
def test_plan_invariants(
    client_alpn: list[bytes],
    port: int,
    relays: frozenset[RelayKind],
    verdict_action: tuple[bool, Action],
    upstream_pick: int,
    pool_enabled: bool,
) -> None:
    verified, action = verdict_action
    stage1 = upstream(tuple(client_alpn), port=port, relays=relays)
    assert set(stage1.alpn_offer) <= {H1, H2}
    if RelayKind.H2 not in relays:
        assert set(stage1.alpn_offer) <= set(client_alpn)
    # The upstream selects one of what was offered, or nothing.
    offered = stage1.alpn_offer
    upstream_alpn = offered[upstream_pick] if 0 <= upstream_pick < len(offered) else None
    plan = plan_connection(
        stage1,
        verified=verified,
        action=action,
        upstream_alpn=upstream_alpn,
        relays=relays,
        pool_enabled=pool_enabled,
    )
    # RFC 7301 §3.2: the client only ever gets a protocol it offered.
    assert plan.client_alpn is None or plan.client_alpn in client_alpn
    # RFC 6797 §8.1: STS only from a verified, not overridden upstream; only those are pooled.
    if plan.record_sts:
        assert verified
        assert action.kind is ActionKind.INTERCEPT
        assert not action.overridden
    assert not plan.poolable or (plan.record_sts and pool_enabled)
    # No override control, in any form, on a known HSTS host (RFC 6797 §12.1).
    if action.hsts_known:
        assert plan.reason != "override_page"
        assert plan.leaf is None or plan.leaf.issuer is IssuerKind.TRUSTED
    # A trusted leaf mirrors the upstream leaf only when that verified.
    if (
        plan.leaf is not None
        and plan.leaf.issuer is IssuerKind.TRUSTED
        and plan.leaf.mirror_upstream
    ):
        assert verified
    # The plan names only relays that exist, and a splice always says why.
    assert plan.relay is None or plan.relay in relays
    assert (plan.relay is RelayKind.SPLICE) == (plan.splice_reason is not None)
    assert plan.relay is not RelayKind.WEBSOCKET  # only after a 101
    if plan.error_redirect:
        assert plan.relay is None
        assert plan.leaf == LeafPlan(
            issuer=IssuerKind.TRUSTED, mirror_upstream=False, upstream_verified=False
        )
    # Without ALPN upstream, HTTP/1.1 (after a sniff) unless the client speaks h2 to an h2 relay.
    if plan.relay is not None and upstream_alpn is None:
        assert plan.relay in (RelayKind.H1, RelayKind.H2)
        assert plan.sniff == (plan.relay is RelayKind.H1)
        assert plan.upstream_protocol == "http/1.1"


# -- sniffing a connection without ALPN ----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "result"),
    [
        (b"", SniffResult.NEED_MORE),
        (b"GE", SniffResult.NEED_MORE),
        (b"GET / HTTP/1.1\r\n", SniffResult.HTTP1),
        (b"M-SEARCH * HTTP/1.1\r\n", SniffResult.HTTP1),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", SniffResult.H2_PREFACE),
        (b"PRI * HTTP/2", SniffResult.NEED_MORE),
        (b"EHLO client.example\r\n", SniffResult.HTTP1),  # method-shaped: h11 judges the rest
        (b"\x16\x03\x01\x02\x00", SniffResult.NOT_HTTP),
        (b" GET /", SniffResult.NOT_HTTP),
        (b"a001 LOGIN", SniffResult.HTTP1),
        (b"\x00\x01binary", SniffResult.NOT_HTTP),
        (b"GET\r\n", SniffResult.NOT_HTTP),
        (b"A" * 40, SniffResult.NOT_HTTP),
    ],
)
def test_sniff(data: bytes, result: SniffResult) -> None:
    assert sniff(data) is result


@settings(deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_sniff_never_changes_its_mind(first: bytes, more: bytes) -> None:
    decided = sniff(first)
    if decided is not SniffResult.NEED_MORE:
        assert sniff(first + more) is decided


def test_relay_after_sniff_and_after_an_upgrade() -> None:
    assert relay_after_sniff(SniffResult.HTTP1, BASIC) == (RelayKind.H1, None)
    assert relay_after_sniff(SniffResult.NOT_HTTP, BASIC) == (
        RelayKind.SPLICE,
        SpliceReason.NOT_HTTP,
    )
    assert relay_after_sniff(SniffResult.H2_PREFACE, BASIC) == (
        RelayKind.SPLICE,
        SpliceReason.H2_WITHOUT_ALPN,
    )
    assert relay_after_sniff(SniffResult.H2_PREFACE, WITH_H2) == (RelayKind.H2, None)
    ws = BASIC | {RelayKind.WEBSOCKET}
    request = ((b"Upgrade", b"websocket"), (b"Sec-WebSocket-Extensions", b"permessage-deflate"))

    def response(upgrade: bytes, *extensions: bytes) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"Upgrade", upgrade), *((b"Sec-WebSocket-Extensions", e) for e in extensions))

    assert relay_after_upgrade(request, response(b"WebSocket"), ws) == (RelayKind.WEBSOCKET, None)
    deflate = response(b"websocket", b"permessage-deflate; server_no_context_takeover")
    assert relay_after_upgrade(request, deflate, ws) == (RelayKind.WEBSOCKET, None)
    assert relay_after_upgrade(request, response(b"websocket"), BASIC) == (
        RelayKind.SPLICE,
        SpliceReason.UPGRADE_WITHOUT_RELAY,
    )
    assert relay_after_upgrade(request, response(b"h2c"), ws) == (
        RelayKind.SPLICE,
        SpliceReason.UPGRADE_WITHOUT_RELAY,
    )
    assert relay_after_upgrade(request, (), ws)[0] is RelayKind.SPLICE
    # RFC 6455 §9: an extension tlsmitm does not know changes what the frames mean.
    unknown = response(b"websocket", b"x-webkit-deflate-frame")
    assert relay_after_upgrade(request, unknown, ws) == (
        RelayKind.SPLICE,
        SpliceReason.WEBSOCKET_EXTENSION,
    )


# -- flow states --------------------------------------------------------------------------------


def record() -> FlowRecord:
    return FlowRecord(client="127.0.0.1:1", started=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))


@pytest.mark.parametrize(
    "path",
    [
        [FlowState.PEEKING, FlowState.DECIDING, FlowState.UPSTREAM, FlowState.HANDSHAKING],
        [FlowState.PEEKING, FlowState.SPLICING],  # not TLS
        [FlowState.PEEKING, FlowState.DECIDING, FlowState.SPLICING],  # bypass
        [FlowState.PEEKING, FlowState.PEEKING, FlowState.ERROR_ORIGIN],  # transparent
        [FlowState.PLAIN_HTTP, FlowState.RELAYING, FlowState.SPLICING],
    ],
)
def test_allowed_flow_paths(path: list[FlowState]) -> None:
    conn = record()
    for state in path:
        conn.enter(state)
    conn.enter(FlowState.CLOSED)
    assert conn.state is FlowState.CLOSED


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ([], FlowState.RELAYING),  # no relay before a handshake
        ([FlowState.PEEKING], FlowState.HANDSHAKING),  # no handshake before the policy
        ([FlowState.PEEKING, FlowState.SPLICING], FlowState.RELAYING),  # a splice is final
    ],
)
def test_out_of_order_steps_are_refused(before: list[FlowState], after: FlowState) -> None:
    conn = record()
    for state in before:
        conn.enter(state)
    with pytest.raises(RuntimeError, match="cannot move"):
        conn.enter(after)


def test_every_state_is_in_the_table_and_a_relay_is_in_the_record() -> None:
    assert set(TRANSITIONS) == set(FlowState)
    conn = record()
    for state in (FlowState.PEEKING, FlowState.DECIDING, FlowState.UPSTREAM):
        conn.enter(state)
    conn.enter(FlowState.HANDSHAKING)
    conn.decide(Decision.INTERCEPT, "verified")
    conn.relayed_by(RelayKind.SPLICE, SpliceReason.NOT_HTTP)
    line = conn.to_record()
    assert (line.decision, line.relay, line.splice) == ("intercept", "splice", "not_http")
