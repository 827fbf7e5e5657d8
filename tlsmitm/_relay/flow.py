"""One intercepted connection, from the peeked ClientHello to the end of the relay.

Theory of operation
-------------------
Steps 2 to 9 of DESIGN.md for a client whose destination is known (:mod:`.intake` found it):

2. **Peek** the ClientHello without consuming it: the bytes are replayed into the TLS engine (or
   spliced unchanged when the connection is bypassed or is not TLS at all).
3. **Policy**: bypass -> splice raw bytes both ways, byte for byte.
4. **Upstream TLS**: SNI = the host, ALPN = what the client offered that tlsmitm can relay,
   OCSP stapling requested, a cached session resumed when there is one. A server that asks for
   a client certificate is learned as a bypass and *this* connection is saved by splicing a
   fresh upstream connection to the untouched client handshake.
5. **Verify** the presented chain (:class:`~tlsmitm.UpstreamVerifier`, with AIA/OCSP fetching
   through the same connector).
6. **Plan** with :class:`~tlsmitm.ErrorResponder` (HSTS-known hosts never get an override).
7. **Forge** the leaf (trusted CA for intercept and for error pages; the never-trusted error CA
   for passthrough) and 8. **handshake** with the client, ALPN = exactly what upstream chose.
9. **Relay**: HTTP/1.1 through h11 with the embedder's hooks and HSTS recording (only for
   verified connections), raw bytes for h2 and non-HTTP protocols, a redirect to the error
   origin for error pages. A verified upstream that ended cleanly between requests goes to the
   pool for the same client's next connection.

Every failure closes both sides (at once); nothing outlives the connection.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from .._clienthello import ClientHello
from .._errors import UpstreamError
from .._forge import IssuerKind
from .._names import normalize_host
from .._responder import ActionKind
from .._tls import RELAYABLE_ALPN, TLSStream
from .downstream import NotTLS
from .error_origin import block_answer, redirect_to_error
from .h1 import HttpRelay, Switched, run_relay
from .hooks import FlowInfo
from .pool import PooledUpstream, PoolKey
from .splice import splice
from .state import FlowRecord
from .state_io import hsts_known
from .streams import close, close_all, peer_ip

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["Flow"]

_HTTP_PORTS = frozenset({80, 443, 8000, 8080, 8443})
# A fatal handshake_failure alert in a TLS 1.2 record (RFC 8446 §6): what a client that does not
# speak HTTP gets when upstream verification failed (ActionKind.ALERT).
_HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"


class Flow:
    """Carries one client connection from its first bytes to the end of the relay.

    Args:
        interceptor: the parts and shared caches.
        conn: the connection's decision-log record, filled in as the flow learns.
        client: the client's address.
    """

    def __init__(self, interceptor: Interceptor, conn: FlowRecord, client: tuple[str, int]) -> None:
        self._ix = interceptor
        self._conn = conn
        self._client = client

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
            try:
                peeked, hello = await ix._downstream.peek_hello(client_stream, initial)
            except NotTLS as not_tls:
                # Matrix: non-TLS bytes after CONNECT are spliced raw, byte for byte.
                conn.decision, conn.reason = "bypass", "not_tls"
                ix.stats.bypassed += 1
                if upstream_tcp is None:
                    upstream_tcp = await ix._upstreams.connect(name, port)
                await self._splice(client_stream, upstream_tcp, to_upstream=not_tls.args[0])
                return
            # The client verifies our leaf against the name it put in SNI, so that is the name
            # the upstream certificate must match too; without SNI, the CONNECT host (matrix
            # MIR-05: an IP literal then matches only an iPAddress SAN).
            tls_name = normalize_host(hello.server_name) if hello.server_name else name
            conn.host = tls_name
            offer = tuple(p for p in hello.alpn_protocols if p in RELAYABLE_ALPN)
            key: PoolKey = (client[0], name, port, tls_name, offer)
            if upstream_tcp is None:
                pooled = await self._take_pooled(key)
                if pooled is None:
                    upstream_tcp = await ix._upstreams.connect(name, port)
            destination = pooled.stream.transport_stream if pooled else upstream_tcp
            assert destination is not None
            decision = await ix.policy.decide(
                client_ip=client[0],
                host=tls_name,
                port=port,
                destination_ip=peer_ip(destination),
                now=ix.clock(),
            )
            if not decision.intercept:
                conn.decision, conn.reason = "bypass", decision.reason
                ix.stats.bypassed += 1
                if upstream_tcp is None:
                    upstream_tcp = await ix._upstreams.connect(name, port)
                await self._splice(client_stream, upstream_tcp, to_upstream=peeked)
                return
            await self._intercept(client_stream, peeked, hello, upstream_tcp, pooled, key)
        finally:
            if not conn.upstream_pooled:
                if pooled is not None:
                    await close(pooled.stream)
                if upstream_tcp is not None:
                    await close(upstream_tcp)

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
        hello: ClientHello,
        upstream_tcp: trio.abc.Stream | None,
        pooled: PooledUpstream | None,
        key: PoolKey,
    ) -> None:
        ix, conn, client = self._ix, self._conn, self._client
        name, port = key[3], key[2]
        if pooled is not None:
            upstream, verdict = pooled.stream, pooled.verdict
        else:
            assert upstream_tcp is not None
            probe = await ix._upstreams.probe(upstream_tcp, name, port, key[4])
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
        speaks_http = b"http/1.1" in hello.alpn_protocols or (
            not hello.alpn_protocols and port in _HTTP_PORTS
        )
        hsts_is_known = await hsts_known(ix, name, now)
        plan = functools.partial(
            ix.responder.plan,
            verdict,
            host=name,
            hsts_known=hsts_is_known,
            client_speaks_http=speaks_http,
            now=now,
        )
        # A verified verdict needs no state; an error may look up an override grant in the
        # shared store: never on the event loop.
        action = plan() if verdict.ok else await trio.to_thread.run_sync(plan)
        if action.kind is ActionKind.ALERT:
            conn.decision, conn.reason = "block", "alert"
            ix.stats.blocked += 1
            await close(upstream)
            await client_stream.send_all(_HANDSHAKE_FAILURE_ALERT)
            return
        if action.kind in (ActionKind.BLOCK_PAGE, ActionKind.OVERRIDE_PAGE):
            await close(upstream)
            conn.decision, conn.reason = "block", action.kind.value
            ix.stats.blocked += 1
            leaf = ix.forge.leaf_for(name, None, issuer=IssuerKind.TRUSTED, now=now)
            downstream = await ix._downstream.handshake(
                client_stream,
                peeked,
                leaf,
                b"http/1.1" if speaks_http and hello.alpn_protocols else None,
                client,
                name,
                port,
            )
            await redirect_to_error(ix, downstream, action, port)
            return
        if action.kind is ActionKind.PASSTHROUGH_UNTRUSTED:
            conn.decision, conn.reason = "intercept", "passthrough_untrusted"
            ix.stats.passthrough_untrusted += 1
            leaf = ix.forge.leaf_for(name, verdict.leaf, issuer=IssuerKind.ERROR, now=now)
        else:
            conn.decision = "intercept"
            conn.reason = "overridden" if action.overridden else "verified"
            ix.stats.intercepted += 1
            # A user override already accepted this upstream's error on tlsmitm's page: the
            # leaf names only the host and does not inherit the upstream's (e.g. expired)
            # dates, or the browser would raise the same error a second time. The override
            # itself is bounded (ErrorResponder's override_ttl) and re-checked per connection.
            leaf = ix.forge.leaf_for(
                name,
                None if action.overridden else verdict.leaf,
                issuer=IssuerKind.TRUSTED,
                upstream_verified=verdict.ok,
                now=now,
            )
        selected = upstream.selected_alpn()
        downstream = await ix._downstream.handshake(
            client_stream, peeked, leaf, selected, client, name, port
        )
        record_hsts = action.kind is ActionKind.INTERCEPT and verdict.ok and not action.overridden
        try:
            reusable, keep_alive_hint = await self._relay_tls(
                downstream, upstream, selected, name, port, record_hsts
            )
            # A graceful close (close_notify) keeps the session resumable; an abortive one makes
            # OpenSSL mark it not resumable. Sessions are taken after the relay because TLS 1.3
            # tickets arrive after the handshake.
            session = upstream.session()
            if session is not None:
                ix._upstreams.remember_session((name, port), session)
            # Only a verified, not overridden upstream is kept (record_hsts says exactly that):
            # the next client gets it without a new verification.
            deadline = None
            if record_hsts and reusable and not ix._draining:
                deadline = ix._pool.deadline(trio.current_time(), keep_alive_hint)
            if deadline is not None:
                entry = PooledUpstream(stream=upstream, verdict=verdict, expires=deadline)
                dropped = ix._pool.put(key, entry, trio.current_time())
                conn.upstream_pooled = upstream not in dropped
                await close_all(dropped)
            else:
                await close(upstream)  # (close_notify first: the session stays resumable)
        finally:
            if not conn.upstream_pooled:
                await close(upstream)
            await close(downstream)

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
        ix.policy.note_client_certificate_requested(
            host=name, port=port, upstream_verified=verified, now=now
        )
        await close(upstream)
        conn.decision, conn.reason = "bypass", "client_certificate_requested"
        ix.stats.bypassed += 1
        if not verified:
            raise UpstreamError(
                f"{name}:{port} asked for a client certificate but its own certificate did not "
                "verify",
                reason="client_cert_unverified",
            )
        fresh = await ix._upstreams.connect(name, port)
        try:
            await self._splice(client_stream, fresh, to_upstream=peeked)
        finally:
            await close(fresh)

    async def _relay_tls(
        self,
        downstream: TLSStream,
        upstream: TLSStream,
        selected: bytes | None,
        name: str,
        port: int,
        record_hsts: bool,
    ) -> tuple[bool, float | None]:
        """Relay until done; returns whether ``upstream`` may be reused, and the server's
        ``Keep-Alive: timeout`` if it sent one."""
        ix, conn = self._ix, self._conn
        http = selected == b"http/1.1" or (selected is None and port in _HTTP_PORTS)
        if not http:
            await self._splice(downstream, upstream)
            return False, None

        def on_sts(values: Sequence[bytes]) -> None:
            # Recorded off the event loop; the response is not held back by it.
            ix.state_writer.submit(
                functools.partial(
                    ix.hsts.observe, name, list(values), now=ix.clock(), secure_and_verified=True
                )
            )

        relay = HttpRelay(
            client=downstream,
            upstream=upstream,
            flow=FlowInfo(client=conn.client, host=name, port=port, verified=record_hsts),
            hooks=ix.hooks,
            on_sts=on_sts if record_hsts else None,
            answer_block=block_answer(ix, name, port),
            idle_timeout=ix.config.idle_timeout,
            should_stop=lambda: ix._draining,
            keep_upstream_alive=record_hsts and ix._pool.enabled,
        )
        try:
            switched = await run_relay(relay)
        finally:
            conn.bytes_up += relay.counters.bytes_up
            conn.bytes_down += relay.counters.bytes_down
        if isinstance(switched, Switched):
            await self._splice(
                downstream, upstream, to_upstream=switched.to_upstream, to_client=switched.to_client
            )
            return False, None
        return relay.upstream_reusable, relay.keep_alive_hint

    async def _splice(
        self,
        a: trio.abc.Stream,
        b: trio.abc.Stream,
        *,
        to_upstream: bytes = b"",
        to_client: bytes = b"",
    ) -> None:
        await splice(
            a,
            b,
            self._conn,
            idle_timeout=self._ix.config.idle_timeout,
            to_upstream=to_upstream,
            to_client=to_client,
        )
