"""One intercepted connection, from the peeked ClientHello to the end of the relay.

Theory of operation
-------------------
Steps 2 to 9 of DESIGN.md for a client whose destination is known (:mod:`.intake` found it).
The flow decides nothing itself: it gathers the inputs, asks the pure parts (the policy, the
verifier, the responder, the plan in :mod:`.plan`) and carries out what they say, moving its
record through the :class:`~tlsmitm._relay.state.FlowState` table.

2. **Peek** the ClientHello without consuming it: the bytes are replayed into the TLS engine (or
   spliced unchanged when the connection is bypassed or is not TLS at all).
3. **Policy**: bypass -> splice raw bytes both ways, byte for byte.
4. **Upstream TLS** as :func:`~tlsmitm._relay.plan.plan_upstream` says (SNI, ALPN offer), OCSP
   stapling requested, a cached session resumed when there is one. A server that asks for a
   client certificate is learned as a bypass and *this* connection is saved by splicing a fresh
   upstream connection to the untouched client handshake.
5. **Verify** the presented chain (:class:`~tlsmitm.UpstreamVerifier`, with AIA/OCSP fetching
   through the same connector).
6. **Action** from :class:`~tlsmitm.ErrorResponder` (HSTS-known hosts never get an override),
   then 7. the **plan** (:func:`~tlsmitm._relay.plan.plan_connection`): leaf, ALPN per side,
   relay, STS, pooling.
8. **Forge** the leaf and **handshake** with the client.
9. **Relay** with :func:`~tlsmitm._relay.relays.relay_for`: HTTP/1.1 through h11 (after a sniff
   of the first bytes when no ALPN was negotiated), a registered HTTP/2 or WebSocket relay, or a
   splice whose reason goes to the decision log; a redirect to the error origin for error pages.
   A verified upstream that ended cleanly between requests goes to the pool.

Every failure closes both sides (at once); nothing outlives the connection.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from .._clienthello import ClientHello
from .._errors import ClientError, UpstreamError
from .._policy import Decision as PolicyDecision
from .._responder import ActionKind
from .._tls import TLSStream
from .._verify import Verdict
from .downstream import NotTLS
from .error_origin import block_answer, redirect_to_error
from .hooks import FlowInfo, Request
from .plan import (
    ConnectionPlan,
    Decision,
    UpstreamPlan,
    plan_connection,
    plan_upstream,
)
from .pool import PooledUpstream, PoolKey
from .relays import RELAYS, RelayJob, RelayOutcome, run_relays
from .scanning import note_scan
from .sniffing import first_bytes
from .splice import splice
from .state import FlowRecord, FlowState
from .state_io import hsts_known, prefetch_state
from .streams import close, close_all, peer_ip

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["Flow"]

log = logging.getLogger("tlsmitm.relay")
_access = logging.getLogger("tlsmitm.access")

# A fatal handshake_failure alert in a TLS 1.2 record (RFC 8446 §6): what a client that does not
# speak HTTP gets when upstream verification failed (ActionKind.ALERT).
_HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"


# trio.current_time() of each interceptor's last INFO line about ECH (one a minute). Kept per
# interceptor: trio's clock has a random offset per run, so times from two runs do not compare.
_ech_logged: weakref.WeakKeyDictionary[Interceptor, float] = weakref.WeakKeyDictionary()


def _note_ech(ix: Interceptor, conn: FlowRecord, hello: ClientHello, name: str) -> None:
    """A ClientHello with ``encrypted_client_hello`` (draft-ietf-tls-esni).

    tlsmitm holds no ECH key, so it acts as the draft's client-facing server that cannot
    decrypt (§7.1): the handshake is completed with the outer hello, for the public name its
    SNI carries, and no ``retry_configs`` are sent. The client then sees ECH rejected by a
    server authenticated for the public name and retries without ECH (§6.1.6, §8.3), and that
    connection is intercepted like any other. An ``inner`` marker on the wire is an
    illegal_parameter (§7).
    """
    assert hello.ech is not None
    if not hello.ech.outer:
        raise ClientError("an inner ECH marker in a ClientHello on the wire", reason="ech_inner")
    ix.stats.ech_offered += 1
    now = trio.current_time()
    level = logging.DEBUG
    last = _ech_logged.get(ix)
    if last is None or now - last >= 60:
        _ech_logged[ix] = now
        level = logging.INFO
    log.log(
        level,
        "client %s offered Encrypted Client Hello to %s (public name %s): answered for the "
        "public name without retry_configs, so it retries without ECH (%d so far)",
        conn.client,
        name,
        hello.server_name,
        ix.stats.ech_offered,
    )


def _count(ix: Interceptor, plan: ConnectionPlan) -> None:
    """Count a planned connection in the interceptor's statistics."""
    stats = ix.stats
    if plan.decision is Decision.BLOCK:
        stats.blocked += 1
    elif plan.reason == "passthrough_untrusted":
        stats.passthrough_untrusted += 1
    else:
        stats.intercepted += 1


class Flow:
    """Carries one client connection from its first bytes to the end of the relay.

    Args:
        interceptor: the parts and shared caches.
        conn: the connection's decision-log record, filled in as the flow learns.
        client: the client's address.
    """

    def __init__(
        self,
        interceptor: Interceptor,
        conn: FlowRecord,
        client: tuple[str, int],
        *,
        transparent: bool = False,
    ) -> None:
        self._ix = interceptor
        self._conn = conn
        self._client = client
        self._transparent = transparent
        self._dial_host = ""  # the upstream's dialled host, once planned

    async def run(
        self,
        client_stream: trio.abc.Stream,
        initial: bytes,
        upstream_tcp: trio.abc.Stream | None,
        name: str,
        port: int,
    ) -> None:
        """Steps 2 to 9 for a client whose destination ``name:port`` is known.

        ``upstream_tcp`` is ``None`` when an idle pooled connection to ``name:port`` was on hand
        and dialling was put off; it is dialled here if that connection does not fit. Whatever
        TCP connection this method ends up with is closed on return, unless it went back to
        the pool inside its TLS stream.
        """
        ix, conn, client = self._ix, self._conn, self._client
        pooled: PooledUpstream | None = None
        try:
            conn.enter(FlowState.PEEKING)
            try:
                peeked, hello = await ix._downstream.peek_hello(client_stream, initial)
            except NotTLS as not_tls:
                # Matrix: non-TLS bytes after CONNECT are spliced raw, byte for byte.
                conn.decide(Decision.BYPASS, "not_tls")
                ix.stats.bypassed += 1
                if upstream_tcp is None:
                    upstream_tcp = await ix._upstreams.connect(name, port)
                conn.enter(FlowState.SPLICING)
                await self._splice(client_stream, upstream_tcp, to_upstream=not_tls.args[0])
                return
            plan = plan_upstream(
                host=name,
                port=port,
                server_name=hello.server_name,
                client_alpn=hello.alpn_protocols,
                relays=RELAYS.available(),
            )
            conn.host = plan.tls_name
            key = PoolKey(
                client_ip=client[0],
                host=plan.host,
                port=port,
                tls_name=plan.tls_name,
                alpn_offer=plan.alpn_offer,
            )
            if upstream_tcp is None:
                pooled = await self._take_pooled(key)
                if pooled is None:
                    upstream_tcp = await ix._upstreams.connect(name, port)
            destination = pooled.stream.transport_stream if pooled else upstream_tcp
            assert destination is not None
            conn.enter(FlowState.DECIDING)
            if hello.ech is not None:
                _note_ech(ix, conn, hello, name)
            decision = await self._decide(name, plan.tls_name, port, peer_ip(destination))
            if not decision.intercept:
                conn.decide(Decision.BYPASS, decision.reason)
                ix.stats.bypassed += 1
                if upstream_tcp is None:
                    upstream_tcp = await ix._upstreams.connect(name, port)
                conn.enter(FlowState.SPLICING)
                await self._splice(client_stream, upstream_tcp, to_upstream=peeked)
                return
            # The relay may last hours: its frames do not keep the parsed ClientHello (its
            # cipher suites, groups and extensions: about 1 KiB, more from a browser).
            del hello
            conn.enter(FlowState.UPSTREAM)
            await self._intercept(client_stream, peeked, plan, upstream_tcp, pooled, key)
        finally:
            if not conn.upstream_pooled:
                if pooled is not None:
                    await close(pooled.stream)
                if upstream_tcp is not None:
                    await close(upstream_tcp)

    async def _decide(
        self, name: str, tls_name: str, port: int, destination_ip: str | None
    ) -> PolicyDecision:
        """The policy's decision on what the connection *reaches* (issue 15 fault 3).

        For CONNECT, the target decides: the SNI name is only what the client claims, and a
        ``CONNECT evil.test`` with SNI ``bank.test`` must not ride on a bypass of bank.test.
        When the two names differ, both are decided and the stricter (intercept) wins. In
        transparent mode the destination is an address (address rules match it); the SNI is
        the only name there is, so host rules match the SNI.
        """
        ix, client = self._ix, self._client
        now = ix.clock()
        first = name if not self._transparent else tls_name
        # Store reads off the event loop, in one thread hop: the learned bypasses for both
        # names, and the HSTS entries _intercept reads for tls_name after the handshake.
        await prefetch_state(ix, client[0], (first, tls_name), port, tls_name, now)
        decision = await ix.policy.decide(
            client_ip=client[0], host=first, port=port, destination_ip=destination_ip, now=now
        )
        if first == tls_name:
            return decision
        claimed = await ix.policy.decide(
            client_ip=client[0], host=tls_name, port=port, destination_ip=destination_ip, now=now
        )
        if claimed.intercept != decision.intercept:
            log.info(
                "client %s: SNI %s differs from the CONNECT target %s and the policy decides "
                "them differently; intercepting (the stricter decision)",
                self._conn.client,
                tls_name,
                name,
            )
            return decision if decision.intercept else claimed
        return decision

    async def _take_pooled(self, key: PoolKey) -> PooledUpstream | None:
        ix = self._ix
        pooled, stale = ix._pool.take(key, trio.current_time())
        ix.stats.upstream_stale += len(stale)
        await close_all(stale)
        if pooled is not None:
            ix.stats.upstream_reused += 1
        return pooled

    async def _intercept(
        self,
        client_stream: trio.abc.Stream,
        peeked: bytes,
        upstream_plan: UpstreamPlan,
        upstream_tcp: trio.abc.Stream | None,
        pooled: PooledUpstream | None,
        key: PoolKey,
    ) -> None:
        ix, conn, client = self._ix, self._conn, self._client
        name, port = upstream_plan.tls_name, upstream_plan.port
        self._dial_host = upstream_plan.host
        if pooled is not None:
            upstream, verdict = pooled.stream, pooled.verdict
        else:
            assert upstream_tcp is not None
            started = trio.current_time()
            probe = await ix._upstreams.probe(upstream_tcp, name, port, upstream_plan.alpn_offer)
            conn.upstream_handshake_s = trio.current_time() - started
            upstream = probe.stream
            if probe.client_certificate_requested:
                await self._save_client_cert_site(client_stream, peeked, upstream, name, port)
                return
            assert probe.verdict is not None  # (None only with client_certificate_requested)
            verdict = probe.verdict
        conn.verdict = "ok" if verdict.ok else (verdict.error.value if verdict.error else None)
        if verdict.error is not None:
            ix.stats.cert_errors[verdict.error.value] = (
                ix.stats.cert_errors.get(verdict.error.value, 0) + 1
            )
        now = ix.clock()
        hsts_is_known = await hsts_known(ix, name, now)
        conn.hsts_known = hsts_is_known
        respond = functools.partial(
            ix.responder.plan,
            verdict,
            host=name,
            hsts_known=hsts_is_known,
            client_speaks_http=upstream_plan.client_speaks_http,
            now=now,
            client=conn.identity,
        )
        # A verified verdict needs no state; an error may look up an override grant in the
        # shared store: never on the event loop.
        action = respond() if verdict.ok else await trio.to_thread.run_sync(respond)
        plan = plan_connection(
            upstream_plan,
            verified=verdict.ok,
            action=action,
            upstream_alpn=upstream.selected_alpn(),
            relays=RELAYS.available(),
            pool_enabled=ix._pool.would_keep(key, trio.current_time()),
        )
        conn.decide(plan.decision, plan.reason)
        _count(self._ix, plan)
        if action.kind is ActionKind.OVERRIDE_PAGE:
            ix.stats.override_pages += 1
        if plan.leaf is None:  # ActionKind.ALERT: a client that cannot be shown a page
            await close(upstream)
            await client_stream.send_all(_HANDSHAKE_FAILURE_ALERT)
            return
        if plan.error_redirect:
            await close(upstream)
        mint = functools.partial(
            ix.forge.leaf_for,
            name,
            verdict.leaf if plan.leaf.mirror_upstream else None,
            issuer=plan.leaf.issuer,
            upstream_verified=plan.leaf.upstream_verified,
            now=now,
        )
        # A PKCS#11 token signs at its own pace (a smart card: tens of milliseconds a
        # signature): then minting runs in a thread, never on the event loop.
        leaf = await trio.to_thread.run_sync(mint) if ix.forge.ca.signs_in_token else mint()
        conn.enter(FlowState.HANDSHAKING)
        started = trio.current_time()
        downstream = await ix._downstream.handshake(
            client_stream, peeked, leaf, plan.client_alpn, client, name, port
        )
        conn.client_handshake_s = trio.current_time() - started
        if plan.error_redirect:
            conn.enter(FlowState.ERROR_PAGE)
            await redirect_to_error(ix, downstream, action, port, conn.identity)
            return
        try:
            outcome = await self._relay(downstream, upstream, plan, name, port)
            await self._after_relay(upstream, verdict, plan, outcome, key)
        finally:
            if not conn.upstream_pooled:
                await close(upstream)
            await close(downstream)

    async def _after_relay(
        self,
        upstream: TLSStream,
        verdict: Verdict,
        plan: ConnectionPlan,
        outcome: RelayOutcome,
        key: PoolKey,
    ) -> None:
        """Keep the TLS session, and the connection itself when the plan and relay allow."""
        ix, conn = self._ix, self._conn
        # A graceful close (close_notify) keeps the session resumable; an abortive one makes
        # OpenSSL mark it not resumable. Sessions are taken after the relay because TLS 1.3
        # tickets arrive after the handshake.
        session = upstream.session()
        if session is not None:
            ix._upstreams.remember_session((key.tls_name, key.port), session)
        deadline = None
        if plan.poolable and outcome.upstream_reusable and not ix._draining:
            deadline = ix._pool.deadline(trio.current_time(), outcome.keep_alive_hint)
        if deadline is not None:
            entry = PooledUpstream(stream=upstream, verdict=verdict, expires=deadline)
            dropped = ix._pool.put(key, entry, trio.current_time())
            conn.upstream_pooled = upstream not in dropped
            await close_all(dropped)
        else:
            await close(upstream)  # (close_notify first: the session stays resumable)

    async def _another_upstream(self, dial: str, name: str, port: int) -> trio.abc.Stream:
        """One more HTTP/1.1 connection to the same origin (an HTTP/2 client's concurrent
        requests to an HTTP/1.1 origin), verified like the first: one that does not verify is
        never used."""
        ix = self._ix
        probe = await ix._upstreams.probe(
            await ix._upstreams.connect(dial, port), name, port, (b"http/1.1",)
        )
        if probe.verdict is None or not probe.verdict.ok:
            await close(probe.stream)
            raise UpstreamError(
                f"another connection to {name}:{port} did not verify", reason="upstream_changed"
            )
        return probe.stream

    async def _relay(
        self,
        downstream: TLSStream,
        upstream: TLSStream,
        plan: ConnectionPlan,
        name: str,
        port: int,
    ) -> RelayOutcome:
        """Run the relay the plan names (after a sniff, without ALPN), then any after a 101."""
        ix, conn = self._ix, self._conn
        assert plan.relay is not None

        def on_sts(values: Sequence[bytes]) -> None:
            # Known at once; written to the store off the event loop, after the response.
            ix.state_writer.observe_sts(ix.hsts, name, values, now=ix.clock())

        job = RelayJob(
            client=downstream,
            upstream=upstream,
            flow=FlowInfo(
                client=conn.client,
                host=name,
                port=port,
                verified=plan.record_sts,
                client_protocol=plan.client_protocol or "http/1.1",
                upstream_protocol=plan.upstream_protocol or "http/1.1",
            ),
            hooks=ix.hooks,
            on_sts=on_sts if plan.record_sts else None,
            answer_block=block_answer(ix, name, port),
            idle_timeout=ix.config.idle_timeout,
            head_timeout=ix.config.head_timeout,
            should_stop=lambda: ix._draining,
            websocket_max_message=ix.config.websocket_max_message,
            stopping=ix._stopping,
            record=conn,
            keep_upstream_alive=plan.poolable,
            on_exchange=access_logger(conn, name) if ix.access_log else None,
            scan=ix.config.scan,
            on_scan=functools.partial(note_scan, ix.stats, conn),
            # Only a verified flow gets more upstream connections, each verified again.
            open_upstream=(
                functools.partial(self._another_upstream, self._dial_host, name, port)
                if plan.record_sts
                else None
            ),
        )
        kind, reason = plan.relay, plan.splice_reason
        if plan.sniff:
            first = await first_bytes(
                downstream, upstream, idle_timeout=ix.config.idle_timeout, relays=RELAYS.available()
            )
            if first is None:
                return RelayOutcome()
            kind, reason = first.relay, first.splice_reason
            job = replace(job, to_upstream=first.from_client, to_client=first.from_server)
        return await run_relays(job, kind, reason, spliced=ix.stats.spliced)

    async def _save_client_cert_site(
        self,
        client_stream: trio.abc.Stream,
        peeked: bytes,
        upstream: TLSStream,
        name: str,
        port: int,
    ) -> None:
        """The server wants a client certificate: learn the bypass and splice this connection.

        The client's handshake is untouched (only peeked), so a fresh upstream connection fed
        the same ClientHello lets the browser talk to the server itself and present the user's
        certificate. The bypass is learned only if the server's chain verified for ``name``
        (a network attacker must not be able to switch off inspection for a host it does not
        hold a certificate for).
        """
        ix, conn = self._ix, self._conn
        now = ix.clock()
        # With TLS 1.2 the handshake failed (the server alerted after our empty Certificate),
        # but the chain it presented before asking was received: read it from the connection.
        chain = upstream.peer_certificate_chain() or (
            upstream.connection.get_peer_cert_chain(as_cryptography=True) or []
        )
        verified = False
        if chain:
            verified = ix.verifier.verify(chain, name, now=now).ok
        await trio.to_thread.run_sync(  # a store write: off the event loop
            functools.partial(
                ix.policy.note_client_certificate_requested,
                host=name,
                port=port,
                upstream_verified=verified,
                now=now,
            )
        )
        await close(upstream)
        conn.decide(Decision.BYPASS, "client_certificate_requested")
        ix.stats.bypassed += 1
        if not verified:
            raise UpstreamError(
                f"{name}:{port} asked for a client certificate but its own certificate did not "
                "verify",
                reason="client_cert_unverified",
            )
        fresh = await ix._upstreams.connect(name, port)
        try:
            conn.enter(FlowState.SPLICING)
            await self._splice(client_stream, fresh, to_upstream=peeked)
        finally:
            await close(fresh)

    async def _splice(
        self, a: trio.abc.Stream, b: trio.abc.Stream, *, to_upstream: bytes = b""
    ) -> None:
        """Splice the still-encrypted (or never-TLS) bytes of a connection that is not
        intercepted."""
        await splice(
            a, b, self._conn, idle_timeout=self._ix.config.idle_timeout, to_upstream=to_upstream
        )


def access_logger(conn: FlowRecord, host: str) -> Callable[[Request, int, float], None]:
    """The access-log callback of one connection's HTTP relay (one INFO line per exchange,
    logger ``tlsmitm.access``; no path or query: only method, host, status, protocol)."""

    def exchange(request: Request, status: int, seconds: float) -> None:
        protocol = conn.relay.value if conn.relay is not None else "http/1.1"
        duration_ms = round(seconds * 1000, 3)
        _access.info(
            "%s %s %s %s %.1f ms",
            request.method.decode("ascii", "replace"),
            host,
            status,
            protocol,
            duration_ms,
            extra={
                "event": "exchange",
                "conn": conn.connection_id,
                "client": conn.client,
                "host": host,
                "port": conn.port,
                "protocol": protocol,
                "method": request.method.decode("ascii", "replace"),
                "status": status,
                "duration_ms": duration_ms,
            },
        )

    return exchange
