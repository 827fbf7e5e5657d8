"""The interceptor: the parts wired together, listeners, and the lifecycle of connections.

:class:`Interceptor` is thin: it owns the parts (CA, forge, verifier, HSTS, responder, policy,
hooks, decision log), the caches shared by connections (the upstream pool, TLS sessions, verdicts,
server contexts), the listeners and shutdown. One accepted connection goes to
:mod:`~tlsmitm._relay.intake` (how it arrived), then to :class:`~tlsmitm._relay.flow.Flow` (what
happens to it). Each connection runs in its own task and nothing outlives it; one record per
connection goes to the :class:`~tlsmitm.DecisionLog`.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Protocol

import h11
import trio
from cryptography import x509

from .._access import AccessPolicy
from .._ca import CertificateAuthority
from .._errors import ClientError, ConfigurationError, TlsMitmError
from .._forge import CertForge
from .._hsts import HstsStore
from .._names import normalize_host
from .._policy import DecisionLog, InterceptPolicy
from .._responder import Action, ErrorResponder, shared_token_key
from .._scan import ScanSettings
from .._store import StateStore
from .._store_cache import CachedStore
from .._tls import keylog_file_writer
from .._verify import UpstreamVerifier, Verdict
from .._websocket import DEFAULT_MAX_MESSAGE
from .downstream import Downstream
from .guard import (
    Authenticator,
    ClientSlots,
    ErrorBoundary,
    LoopGuard,
    admit,
    private_state_dir,
    refuse_busy,
    shed_idle,
)
from .hooks import Hooks
from .intake import explicit, transparent
from .plan import Decision
from .pool import UpstreamPool
from .proxy_header import read_proxy_header
from .state import FlowRecord, FlowState
from .state_io import StateWriter
from .streams import Connector, close, close_all, first_error, tcp_connector
from .upstream import Upstreams

__all__ = [
    "CheckResult",
    "Interceptor",
    "InterceptorConfig",
    "InterceptorStats",
    "original_destination",
]

log = logging.getLogger("tlsmitm.relay")

_ACCEPT_BACKOFF_MIN = 0.05
_ACCEPT_BACKOFF_MAX = 1.0
_PID = os.getpid()
_CONNECTION_IDS = itertools.count(1)

# On shutdown, a tunnel that moved no byte for this long counts as idle and is closed at once.
_IDLE_TUNNEL_SECONDS = 0.25
_DRAIN_POLL_SECONDS = 0.05


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class InterceptorConfig:
    """Timeouts, limits and switches of one :class:`Interceptor`.

    Attributes:
        head_timeout: seconds for a client to send a whole request head (total, not per byte:
            a head trickled one byte at a time is cut off too), on the proxy port and for each
            request inside a tunnel; over HTTP/2 the preface with the first SETTINGS and each
            header block (GOAWAY ENHANCE_YOUR_CALM).
        connect_timeout: seconds to open the upstream TCP connection.
        handshake_timeout: seconds for each TLS handshake (upstream and client).
        idle_timeout: seconds without a byte in either direction before a connection is closed
            (an HTTP/2 connection: without an open stream; a fragmented WebSocket message:
            from its first byte to its last fragment, in total).
        max_connections: connections handled at once; a client beyond that gets ``503`` at
            once (after idle keep-alive connections and idle tunnels were shed, oldest first).
        max_connections_per_client: connections one client address may hold at once (0: no
            limit); beyond that, ``429``.
        access: the allow-list of client networks (``403`` outside it) and the proxy users
            (``407`` without valid ``Proxy-Authorization``); open by default.
        shutdown_grace: seconds in-flight connections get to finish on shutdown.
        resolve: fixed name -> address mappings, like curl's ``--resolve``.
        keylog_path: append TLS secrets in NSS key log format (debugging only; off by default).
        session_cache_size: upstream TLS sessions kept for resumption.
        fetch_timeout: seconds for one AIA/OCSP/CRL fetch.
        verdict_cache_seconds: how long a successful verification of an exact chain is reused
            for the same host (0 turns the cache off); never past a certificate's expiry.
        verdict_cache_size: successful verdicts kept.
        upstream_pool_seconds: how long a clean, verified, idle HTTP/1.1 upstream connection is
            kept for the same client's next connection to the same server (0 turns pooling
            off); a server's shorter ``Keep-Alive: timeout`` wins.
        upstream_pool_size: idle upstream connections kept in all.
        upstream_pool_per_host: idle upstream connections kept per client and server.
        proxy_protocol: every connection starts with a PROXY protocol (v1 or v2) header from a
            TCP load balancer; its client address is the one used for logs, rules and grants.
        trusted_balancers: the networks whose connections may carry that header; with
            ``proxy_protocol`` on, a connection from anywhere else is refused (closed).
        websocket_max_message: the largest WebSocket message relayed, in bytes after
            reassembly and decompression; a larger one closes the WebSocket with 1009.
        scan: content scanners (ICAP, clamd...) and how they are used; ``None`` scans nothing.
            Bodies are held until every scanner answers (see ``docs/scanning.rst``).
    """

    head_timeout: float = 10.0
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_connections: int = 10_000
    max_connections_per_client: int = 512
    access: AccessPolicy = field(default_factory=AccessPolicy)
    shutdown_grace: float = 10.0
    resolve: Mapping[str, str] = field(default_factory=dict)
    keylog_path: Path | None = None
    session_cache_size: int = 1024
    fetch_timeout: float = 5.0
    verdict_cache_seconds: float = 300.0
    verdict_cache_size: int = 4096
    upstream_pool_seconds: float = 4.0
    upstream_pool_size: int = 256
    upstream_pool_per_host: int = 8
    proxy_protocol: bool = False
    trusted_balancers: tuple[IPv4Network | IPv6Network, ...] = ()
    websocket_max_message: int = DEFAULT_MAX_MESSAGE
    scan: ScanSettings | None = None

    def __post_init__(self) -> None:
        for name in ("head_timeout", "connect_timeout", "handshake_timeout", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.max_connections_per_client < 0:
            raise ValueError("max_connections_per_client must not be negative")
        if self.upstream_pool_seconds < 0 or self.upstream_pool_size < 0:
            raise ValueError("upstream_pool_seconds and upstream_pool_size must not be negative")
        if self.upstream_pool_per_host < 1:
            raise ValueError("upstream_pool_per_host must be at least 1")
        if self.websocket_max_message < 1:
            raise ValueError("websocket_max_message must be at least 1 byte")
        if self.proxy_protocol and not self.trusted_balancers:
            raise ValueError(
                "proxy_protocol needs trusted_balancers: the networks of the load balancers "
                "allowed to say who the client is"
            )


class ConnectionObserver(Protocol):
    """Told about every connection once it closed (the metrics; see :mod:`tlsmitm._metrics`)."""

    def connection_closed(self, conn: FlowRecord) -> None:
        """Read what ``conn`` learned; must be quick and must not raise."""


@dataclass
class InterceptorStats:
    """Counters an embedder can read at any time (``interceptor.stats``)."""

    connections: int = 0
    active: int = 0
    intercepted: int = 0
    bypassed: int = 0
    blocked: int = 0
    passthrough_untrusted: int = 0
    error_origin: int = 0
    plain_http: int = 0
    client_handshake_failures: int = 0
    upstream_failures: int = 0
    upstream_reused: int = 0
    upstream_stale: int = 0  # kept connections found closed or unclean when wanted
    refused_busy: int = 0  # answered 503: every connection slot was taken
    shed_idle: int = 0  # idle keep-alive connections and tunnels closed to make room
    ech_offered: int = 0  # ClientHellos with encrypted_client_hello (answered for the public name)
    scanned: int = 0  # bodies that went to the content scanners
    scan_blocked: int = 0  # of which blocked (a threat, or a failure under --scan-failure closed)
    scan_unscanned: int = 0  # of which delivered unscanned (--scan-failure open)
    override_pages: int = 0  # connections sent to an error page that offers an override
    override_grants: int = 0  # overrides a user granted on such a page
    errors: dict[str, int] = field(default_factory=dict)
    spliced: dict[str, int] = field(default_factory=dict)  # decrypted bytes spliced, by reason
    cert_errors: dict[str, int] = field(default_factory=dict)

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckResult:
    """What :meth:`Interceptor.check_upstream` found out about one upstream."""

    host: str
    port: int
    verdict: Verdict | None
    action: Action | None
    client_certificate_requested: bool
    hsts_known: bool
    tls_version: str | None
    cipher: str | None
    alpn: bytes | None
    chain: tuple[x509.Certificate, ...]


class Interceptor:
    """The intercepting proxy: wires the parts together and drives connections.

    Every part is replaceable; the defaults are the ones a standalone proxy uses. Build one with
    :meth:`from_state_dir` for a persistent installation, or pass the parts yourself.

    Args:
        ca: the installation's certificate authority.
        forge: mints leaves (default: ``CertForge(ca)``).
        verifier: checks upstream chains (default: certifi's roots, refusing tlsmitm's own CA).
        hsts: the HSTS store (default: in memory with the bundled preload list).
        responder: plans what to do with verdicts and serves the error origin.
        policy: what not to intercept.
        hooks: the embedder's request/response hooks.
        decision_log: receives one record per connection.
        config: timeouts and limits.
        connector: opens TCP connections (default: ``trio.open_tcp_stream``); tests and
            embedders inject their own.
        clock: returns the current time (aware UTC).
    """

    def __init__(
        self,
        *,
        ca: CertificateAuthority,
        forge: CertForge | None = None,
        verifier: UpstreamVerifier | None = None,
        hsts: HstsStore | None = None,
        responder: ErrorResponder | None = None,
        policy: InterceptPolicy | None = None,
        hooks: Hooks | None = None,
        decision_log: DecisionLog | None = None,
        config: InterceptorConfig | None = None,
        connector: Connector | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        from .._verify import TrustConfig

        self.ca = ca
        self.forge = forge or CertForge(ca)
        self.verifier = verifier or UpstreamVerifier(
            TrustConfig(own_certificates=ca.own_certificates())
        )
        self.hsts = hsts if hsts is not None else HstsStore()
        self.responder = responder or ErrorResponder()
        self.policy = policy or InterceptPolicy()
        self.hooks = hooks or Hooks()
        self.decision_log = decision_log or DecisionLog()
        self.config = config or InterceptorConfig()
        self.clock = clock
        self.stats = InterceptorStats()
        keylog = keylog_file_writer(self.config.keylog_path) if self.config.keylog_path else None
        self._upstreams = Upstreams(self, connector or tcp_connector, keylog)
        self._downstream = Downstream(self, keylog)
        self._pool = UpstreamPool(
            max_idle=self.config.upstream_pool_size,
            max_per_key=self.config.upstream_pool_per_host,
            idle_seconds=self.config.upstream_pool_seconds,
        )
        #: Runs state writes (HSTS observations) in a thread, off the event loop.
        self.state_writer = StateWriter()
        #: Why the state store cannot be written, if it cannot (``from_state_dir`` checks).
        self.state_problem: str | None = None
        self._draining = False
        #: Told about every closed connection (:class:`tlsmitm._metrics.Metrics`); ``None``: off.
        self.metrics: ConnectionObserver | None = None
        #: Log one line per HTTP exchange to ``tlsmitm.access`` (``serve --access-log``).
        self.access_log = False
        #: Set by :meth:`shutdown`, for relays that wait rather than poll (WebSocket: 1001).
        self._stopping = trio.Event()
        self._boundary = ErrorBoundary(log)
        self._loop = LoopGuard()
        self._client_slots = ClientSlots(self.config.max_connections_per_client)
        self._auth = Authenticator(self.config.access.credentials)
        # Open connections, oldest first: FlowRecord -> the scope that ends it (for shedding).
        self._open: dict[FlowRecord, trio.CancelScope] = {}
        self._accept_scope: trio.CancelScope | None = None
        self._all_done = trio.Event()
        self._all_done.set()

    # -- construction helpers -----------------------------------------------------------------

    @classmethod
    def from_state_dir(
        cls,
        state_dir: Path,
        *,
        passphrase: bytes | None = None,
        extra_roots: Sequence[x509.Certificate] = (),
        error_profile: str = "native",
        bypass: Sequence[str] = (),
        rules_file: Path | None = None,
        config: InterceptorConfig | None = None,
        hooks: Hooks | None = None,
        connector: Connector | None = None,
        state: str | None = None,
        ca: CertificateAuthority | None = None,
        override_ttl: timedelta = timedelta(hours=1),
    ) -> Interceptor:
        """A persistent installation in ``state_dir``: CA created on first use, state shared.

        ``state`` is where the journey's state lives: ``None`` for ``state_dir/state.sqlite3``
        (shared by the workers of this machine), or ``redis://HOST:PORT/DB`` (shared by several
        machines). Either sits behind a per-worker :class:`~tlsmitm.CachedStore`; a store that
        cannot be written is noted in :attr:`state_problem` (and costs no response).
        ``ca``: an already loaded CA (an imported intermediate, a key in a PKCS#11 token); by
        default the one in ``state_dir`` is loaded, or created.
        """
        from .._verify import TrustConfig

        now = _utc_now()
        private_state_dir(state_dir)
        if ca is None:
            ca = CertificateAuthority.load_or_create(state_dir, passphrase=passphrase, now=now)
        backend, problem = open_state_store(state_dir, state)
        store = CachedStore(backend)
        try:
            # One key for the installation: a token minted by any worker or node is checked by
            # any other.
            token_key: bytes | None = shared_token_key(store)
        except ConfigurationError as exc:
            log.warning("override tokens use a key of this process only: %s", exc)
            token_key = None
        trust = TrustConfig(extra_roots=tuple(extra_roots), own_certificates=ca.own_certificates())
        interceptor = cls(
            ca=ca,
            verifier=UpstreamVerifier(trust),
            hsts=HstsStore(store),
            responder=ErrorResponder(
                profile=error_profile,
                override_store=store,
                token_key=token_key,
                override_ttl=override_ttl,
            ),
            policy=InterceptPolicy(store=store, rules_file=rules_file, extra_rules=bypass),
            config=config,
            hooks=hooks,
            connector=connector,
        )
        interceptor.state_problem = problem
        return interceptor

    # -- serving ------------------------------------------------------------------------------

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until :meth:`shutdown` or cancellation.

        ``task_status.started`` receives the bound addresses (useful with ``port=0``).
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve connections from already-open listeners (closed on return)."""
        slots = trio.Semaphore(self.config.max_connections)
        self._loop.add_listeners(listener.socket.getsockname()[:2] for listener in listeners)
        try:
            async with trio.open_nursery() as connections:
                connections.start_soon(self._expire_pool)
                connections.start_soon(self.state_writer.run)
                with trio.CancelScope() as accept_scope:
                    self._accept_scope = accept_scope
                    async with trio.open_nursery() as accepters:
                        for listener in listeners:
                            accepters.start_soon(self._accept_loop, listener, connections, slots)
                        task_status.started(
                            [listener.socket.getsockname()[:2] for listener in listeners]
                        )
                for listener in listeners:
                    await listener.aclose()
                with trio.move_on_after(self.config.shutdown_grace):
                    async with trio.open_nursery() as draining:
                        draining.start_soon(self._close_idle_connections)
                        await self._all_done.wait()
                        draining.cancel_scope.cancel()
                connections.cancel_scope.cancel()
        finally:
            await self.close_idle_upstreams()
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def close_idle_upstreams(self) -> None:
        """Close the idle upstream connections kept for reuse (``serve`` does it on return).

        Runs to the end also when cancelled (each close is forceful, so it cannot block).
        """
        with trio.CancelScope(shield=True):
            await close_all(self._pool.drain())

    async def _expire_pool(self) -> None:
        while True:
            await trio.sleep(1.0)
            await close_all(self._pool.expire(trio.current_time()))

    async def _close_idle_connections(self) -> None:
        """While draining: close every connection with nothing in flight, as soon as it has none.

        Idle means: nothing read yet (``ACCEPTED``), waiting for the client's next request
        (``FlowRecord.idle_since`` set by the HTTP relay), or a tunnel that moved no byte for
        ``_IDLE_TUNNEL_SECONDS``. Exchanges in flight finish.
        """
        while True:
            now = trio.current_time()
            for conn, scope in list(self._open.items()):
                idle_since = conn.idle_since
                if conn.state is FlowState.ACCEPTED or (
                    idle_since is not None
                    and (
                        conn.state is not FlowState.SPLICING
                        or now - idle_since >= _IDLE_TUNNEL_SECONDS
                    )
                ):
                    scope.cancel()
            await trio.sleep(_DRAIN_POLL_SECONDS)

    def shutdown(self) -> None:
        """Stop accepting at once; close idle connections and idle tunnels at once; exchanges in
        flight finish within ``shutdown_grace`` (then everything is closed)."""
        self._draining = True
        self._stopping.set()
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def _accept_loop(
        self, listener: trio.SocketListener, nursery: trio.Nursery, slots: trio.Semaphore
    ) -> None:
        backoff = _ACCEPT_BACKOFF_MIN
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: make room, then back off (doubling, at most 1 s)
                    # instead of spinning on a listener that stays readable.
                    self._boundary.report(exc, client="-", outage=True)
                    shed_idle(self)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, _ACCEPT_BACKOFF_MAX)
                    continue
                raise
            backoff = _ACCEPT_BACKOFF_MIN
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                if not shed_idle(self):
                    # Issue 15 fault 5: a prompt 503 rather than minutes in the listen queue.
                    nursery.start_soon(refuse_busy, self, stream)
                    continue
                await slots.acquire()  # the shed connection gives its slot back at once
            nursery.start_soon(self._serve_accepted, stream, slots)

    async def _serve_accepted(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        client = "-"
        try:
            try:
                peer = stream.socket.getpeername()
                address = (str(peer[0]), int(peer[1]))
            except OSError:
                await close(stream)
                return
            client = address[0]
            if self.config.proxy_protocol:
                try:
                    accepted, address = await read_proxy_header(self, stream, address)
                except (ClientError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.debug("connection from %s:%s refused: %s", *address, exc)
                    await close(stream)
                    return
                client = address[0]
                await self.handle(accepted, client=address)
                return
            await self.handle(stream, client=address)
        except Exception as exc:
            # The error boundary (issue 15): nothing from one connection ends serve().
            self._boundary.report(exc, client=client)
        finally:
            slots.release()

    # -- one connection -----------------------------------------------------------------------

    async def handle(
        self,
        stream: trio.abc.Stream,
        *,
        client: tuple[str, int],
        destination: tuple[str, int] | None = None,
    ) -> None:
        """Handle one accepted client connection to completion; never raises (but Cancelled).

        Args:
            stream: the client's byte stream.
            client: the client's address.
            destination: ``None`` for an explicit proxy connection (the client sends CONNECT);
                the original destination ``(ip, port)`` in transparent mode.
        """
        conn = FlowRecord(
            client=f"{client[0]}:{client[1]}",
            started=self.clock(),
            connection_id=f"{_PID:x}-{next(_CONNECTION_IDS):x}",
        )
        opened = trio.current_time()
        self.stats.connections += 1
        self.stats.active += 1
        if self.stats.active == 1:
            self._all_done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._open[conn] = scope
                await admit(self, stream, client, conn, explicit=destination is None)
                if destination is None:
                    await explicit(self, stream, client, conn)
                else:
                    await transparent(self, stream, client, destination, conn)
        except* TlsMitmError as group:
            first = first_error(group)
            if conn.end_with(getattr(first, "reason", "error")):
                self.stats.count_error(conn.reason)
            log.debug("connection %s ended: %s", conn.client, first)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            conn.reason = conn.reason if conn.decision is not Decision.ERROR else "connection_lost"
            log.debug("connection %s lost: %s", conn.client, first_error(group))
        except* (trio.TooSlowError, h11.ProtocolError) as group:
            timeout = isinstance(first_error(group), trio.TooSlowError)
            if conn.end_with("timeout" if timeout else "bad_http"):
                self.stats.count_error(conn.reason)
        except* Exception as group:
            # The error boundary: one line per cause, never the client's bytes as a traceback.
            conn.reason = "internal_error"
            self.stats.count_error(conn.reason)
            self._boundary.report(first_error(group), client=conn.client)
        finally:
            conn.enter(FlowState.CLOSED)
            self._open.pop(conn, None)
            self._client_slots.release(conn)
            try:
                await close(stream)
            except Exception as exc:
                self._boundary.report(exc, client=conn.client, where="closing")
            self.stats.active -= 1
            if self.stats.active == 0:
                self._all_done.set()
            conn.duration_ms = round((trio.current_time() - opened) * 1000, 3)
            try:
                self._emit(conn)
            except Exception as exc:
                # Issue 15 fault 1: a record that cannot be built or written must not escape
                # this finally and end serve().
                self._boundary.report(exc, client=conn.client, where="logging")

    def _emit(self, conn: FlowRecord) -> None:
        if self.metrics is not None:
            self.metrics.connection_closed(conn)
        self.decision_log.emit(conn.to_record())

    async def check_upstream(
        self, host: str, port: int = 443, *, alpn_offer: Sequence[bytes] = (b"http/1.1",)
    ) -> CheckResult:
        """Connect to ``host:port`` and decide about it exactly as the proxy would.

        Used by ``python -m tlsmitm check``; never relays anything.
        """
        return await _check_upstream(self, host, port, alpn_offer)


async def _check_upstream(
    ix: Interceptor, host: str, port: int, alpn_offer: Sequence[bytes]
) -> CheckResult:
    name = normalize_host(host)
    upstream_tcp = await ix._upstreams.connect(name, port)
    probe = await ix._upstreams.probe(upstream_tcp, name, port, alpn_offer)
    try:
        now = ix.clock()
        action = None
        if probe.verdict is not None:
            action = ix.responder.plan(
                probe.verdict,
                host=name,
                hsts_known=ix.hsts.is_known_host(name, now=now),
                client_speaks_http=True,
                now=now,
            )
        stream = probe.stream
        return CheckResult(
            host=name,
            port=port,
            verdict=probe.verdict,
            action=action,
            client_certificate_requested=probe.client_certificate_requested,
            hsts_known=ix.hsts.is_known_host(name, now=now),
            tls_version=stream.tls_version(),
            cipher=stream.cipher_name(),
            alpn=stream.selected_alpn(),
            chain=tuple(stream.peer_certificate_chain()),
        )
    finally:
        await close(probe.stream)


def open_state_store(state_dir: Path, state: str | None) -> tuple[StateStore, str | None]:
    """The shared store ``state`` names, and why it cannot be written (``None`` if it can).

    Raises:
        ConfigurationError: ``state`` is neither empty nor a Redis URL, the redis package is
            missing, or the SQLite file is unusable (corrupt, newer schema).
    """
    if state is None or state in ("", "sqlite"):
        from .._sqlite_store import SqliteStore

        sqlite = SqliteStore(state_dir / "state.sqlite3")
        return sqlite, sqlite.check_writable()
    if not state.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(
            f"--state {state!r} is not understood; use redis://HOST:PORT/DB, or leave it out for "
            "SQLite in the state directory",
            reason="state_store",
        )
    try:
        from .._redis_store import RedisStore
    except ImportError as exc:
        raise ConfigurationError(
            "--state redis://... needs the redis package: pip install 'tlsmitm[redis]'",
            reason="state_store",
        ) from exc
    redis_store = RedisStore(state)
    try:
        redis_store.ping()
    except ConfigurationError as exc:
        return redis_store, f"{exc} -- until then HSTS is enforced from memory and the preload list"
    return redis_store, None


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The original destination of a connection redirected by iptables/nftables (Linux).

    Reads ``SO_ORIGINAL_DST`` (IPv4) or ``IP6T_SO_ORIGINAL_DST`` (IPv6); raises ``OSError``
    when the connection was not redirected or the platform lacks the option.
    """
    so_original_dst = 80
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, so_original_dst, 28)
        port = struct.unpack("!H", raw[2:4])[0]
        address = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        return address, port
    raw = sock.getsockopt(socket.SOL_IP, so_original_dst, 16)
    port, packed = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(packed), port
