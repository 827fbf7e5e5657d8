"""The trio driver: listeners, CONNECT, the flow of one intercepted connection, and relaying.

Theory of operation
-------------------
Everything above this module is pure; here is where bytes move. One connection goes through the
steps of DESIGN.md:

1. **CONNECT** (explicit proxy): the request head is read (bounded, timed), the target host is
   normalised, and the upstream TCP connection is opened *before* answering, so that a host that
   cannot be reached gets ``502`` rather than a tunnel to nowhere -- unless an idle pooled
   connection to that host is kept for this client (:mod:`tlsmitm._pool`): then the
   ClientHello decides whether it fits, and the host is dialled only if not.
   ``CONNECT error.invalid:443`` is answered by tlsmitm itself: that is the error origin.
   Absolute-form ``http://`` requests are relayed as plain HTTP. In transparent mode the
   embedder supplies the destination instead.
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

Every step has a timeout; every failure closes both sides (at once, see ``_close``); each
connection runs in its own nursery and nothing outlives it. One record per connection goes to
the :class:`~tlsmitm.DecisionLog`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from ._ca import CertificateAuthority
from ._clienthello import NEED_MORE, ClientHello, ClientHelloError, parse_client_hello
from ._errors import CertError, ClientError, TlsMitmError, UpstreamError
from ._forge import CertForge, ForgedLeaf, IssuerKind
from ._hsts import HstsStore
from ._http import Block, FlowInfo, Hooks, HttpRelay, Request, Switched, fetch_http, run_relay
from ._names import InvalidHostName, ip_address_of, is_ip_literal, normalize_host
from ._policy import ConnectionRecord, DecisionLog, InterceptPolicy
from ._pool import PooledUpstream, PoolKey, UpstreamPool
from ._responder import Action, ActionKind, ErrorResponder, HttpRequest
from ._tls import (
    RELAYABLE_ALPN,
    TLSStream,
    close_at_once,
    keylog_file_writer,
    server_connection,
    server_context,
    upstream_connection,
    upstream_context,
)
from ._verify import UpstreamVerifier, Verdict

__all__ = [
    "CheckResult",
    "Interceptor",
    "InterceptorConfig",
    "InterceptorStats",
    "original_destination",
]

log = logging.getLogger("tlsmitm.relay")

Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]

_HEAD_LIMIT = 64 * 1024
_RECEIVE = 128 * 1024
_HTTP_PORTS = frozenset({80, 443, 8000, 8080, 8443})
# A fatal handshake_failure alert in a TLS 1.2 record (RFC 8446 §6): what a client that does not
# speak HTTP gets when upstream verification failed (ActionKind.ALERT).
_HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"
# Alerts a client sends when it rejects our certificate (RFC 8446 §6.2): the pinning signal.
_REJECTION_ALERTS = frozenset({"unknown_ca", "bad_certificate", "certificate_unknown"})


def _utc_now() -> datetime:
    return datetime.now(UTC)


async def _close(resource: trio.abc.AsyncResource) -> None:
    """Close ``resource`` now, without a graceful wait (the end of a connection, or a failure).

    Sockets and TLS over them close synchronously (:func:`~tlsmitm._tls.close_at_once`);
    anything else (an embedder's stream) through ``trio.aclose_forcefully``.
    """
    if not close_at_once(resource):
        await trio.aclose_forcefully(resource)


async def _close_all(resources: Sequence[trio.abc.AsyncResource]) -> None:
    for resource in resources:
        await _close(resource)


@dataclass(frozen=True, slots=True, kw_only=True)
class InterceptorConfig:
    """Timeouts, limits and switches of one :class:`Interceptor`.

    Attributes:
        head_timeout: seconds for a client to send its CONNECT/request head.
        connect_timeout: seconds to open the upstream TCP connection.
        handshake_timeout: seconds for each TLS handshake (upstream and client).
        idle_timeout: seconds without a byte in either direction before a connection is closed.
        max_connections: connections handled at once; further ones wait in the listen queue.
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
    """

    head_timeout: float = 30.0
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_connections: int = 10_000
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

    def __post_init__(self) -> None:
        for name in ("head_timeout", "connect_timeout", "handshake_timeout", "idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.upstream_pool_seconds < 0 or self.upstream_pool_size < 0:
            raise ValueError("upstream_pool_seconds and upstream_pool_size must not be negative")
        if self.upstream_pool_per_host < 1:
            raise ValueError("upstream_pool_per_host must be at least 1")


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
    errors: dict[str, int] = field(default_factory=dict)
    cert_errors: dict[str, int] = field(default_factory=dict)

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1


@dataclass
class _Conn:
    """What one connection has learned so far, for its decision-log record."""

    client: str
    started: datetime
    host: str | None = None
    port: int = 0
    decision: str = "error"
    reason: str = "incomplete"
    verdict: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_pooled: bool = False  # the upstream connection outlives this one, in the pool


@dataclass(slots=True, kw_only=True)
class UpstreamProbe:
    """The upstream side of one connection after the handshake and verification."""

    stream: TLSStream
    verdict: Verdict | None  # None when the server asked for a client certificate
    client_certificate_requested: bool = False


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


class _NotTLS(Exception):
    pass


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
        from ._verify import TrustConfig

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
        self._connector: Connector = connector or _tcp_connector
        keylog = keylog_file_writer(self.config.keylog_path) if self.config.keylog_path else None
        self._keylog = keylog
        self._upstream_ctx = upstream_context(keylog=keylog)
        self._server_contexts: dict[tuple[x509.Certificate, ...], SSL.Context] = {}
        self._sessions: OrderedDict[tuple[str, int], SSL.Session] = OrderedDict()
        self._verdicts: OrderedDict[tuple[str, bytes], tuple[Verdict, datetime]] = OrderedDict()
        self._pool = UpstreamPool(
            max_idle=self.config.upstream_pool_size,
            max_per_key=self.config.upstream_pool_per_host,
            idle_seconds=self.config.upstream_pool_seconds,
        )
        self._draining = False
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
    ) -> Interceptor:
        """A persistent installation in ``state_dir``: CA created on first use, HSTS in SQLite."""
        from ._sqlite_store import SqliteStore
        from ._verify import TrustConfig

        now = _utc_now()
        ca = CertificateAuthority.load_or_create(state_dir, passphrase=passphrase, now=now)
        store = SqliteStore(state_dir / "state.sqlite3")
        trust = TrustConfig(extra_roots=tuple(extra_roots), own_certificates=ca.own_certificates())
        return cls(
            ca=ca,
            verifier=UpstreamVerifier(trust),
            hsts=HstsStore(store),
            responder=ErrorResponder(profile=error_profile, override_store=store),
            policy=InterceptPolicy(store=store, rules_file=rules_file, extra_rules=bypass),
            config=config,
            hooks=hooks,
            connector=connector,
        )

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
        try:
            async with trio.open_nursery() as connections:
                connections.start_soon(self._expire_pool)
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
                    await self._all_done.wait()
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
            await _close_all(self._pool.drain())

    async def _expire_pool(self) -> None:
        while True:
            await trio.sleep(1.0)
            await _close_all(self._pool.expire(trio.current_time()))

    def shutdown(self) -> None:
        """Stop accepting; in-flight connections finish (within ``shutdown_grace``)."""
        self._draining = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def _accept_loop(
        self, listener: trio.SocketListener, nursery: trio.Nursery, slots: trio.Semaphore
    ) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed (%s); retrying in 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self._serve_accepted, stream, slots)

    async def _serve_accepted(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        try:
            try:
                peer = stream.socket.getpeername()
                client = (str(peer[0]), int(peer[1]))
            except OSError:
                await _close(stream)
                return
            await self.handle(stream, client=client)
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
        conn = _Conn(client=f"{client[0]}:{client[1]}", started=self.clock())
        self.stats.connections += 1
        self.stats.active += 1
        if self.stats.active == 1:
            self._all_done = trio.Event()
        try:
            if destination is None:
                await self._explicit(stream, client, conn)
            else:
                await self._transparent(stream, client, destination, conn)
        except* TlsMitmError as group:
            first = _first_error(group)
            conn.reason = getattr(first, "reason", "error")
            self.stats.count_error(conn.reason)
            log.debug("connection %s ended: %s", conn.client, first)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            conn.reason = conn.reason if conn.decision != "error" else "connection_lost"
            log.debug("connection %s lost: %s", conn.client, _first_error(group))
        except* (trio.TooSlowError, h11.ProtocolError) as group:
            conn.reason = (
                "timeout" if isinstance(_first_error(group), trio.TooSlowError) else ("bad_http")
            )
            self.stats.count_error(conn.reason)
        except* Exception as group:
            conn.reason = "internal_error"
            self.stats.count_error(conn.reason)
            log.error("bug while handling %s", conn.client, exc_info=_first_error(group))
        finally:
            await _close(stream)
            self.stats.active -= 1
            if self.stats.active == 0:
                self._all_done.set()
            self._emit(conn)

    def _emit(self, conn: _Conn) -> None:
        record = ConnectionRecord(
            time=conn.started,
            client=conn.client,
            host=conn.host,
            port=conn.port,
            decision=conn.decision,
            reason=conn.reason,
            verdict=conn.verdict,
            bytes_up=conn.bytes_up,
            bytes_down=conn.bytes_down,
        )
        self.decision_log.emit(record)

    async def _explicit(
        self, stream: trio.abc.Stream, client: tuple[str, int], conn: _Conn
    ) -> None:
        head, rest = await self._read_head(stream)
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=_HEAD_LIMIT)
        parser.receive_data(head + rest)
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            await _send_simple(stream, 400, b"Bad Request")
            raise ClientError(f"malformed request head: {exc}", reason="bad_request") from exc
        if not isinstance(event, h11.Request):
            await _send_simple(stream, 400, b"Bad Request")
            raise ClientError("malformed request head", reason="bad_request")
        if event.method == b"CONNECT":
            try:
                host, port = _split_authority(bytes(event.target))
                name = normalize_host(host)
            except (ValueError, InvalidHostName) as exc:
                await _send_simple(stream, 400, b"Bad Request")
                raise ClientError(
                    f"bad CONNECT target {event.target!r}", reason="bad_connect"
                ) from exc
            conn.host, conn.port = name, port
            if self.responder.is_error_origin(name, port):
                await self._answer_connect(parser, stream)
                await self._serve_error_origin(stream, parser.trailing_data[0], conn)
                return
            # With an idle upstream connection to this server on hand, do not dial: the
            # ClientHello (its SNI and ALPN) decides whether that connection fits.
            upstream_tcp = None
            if not self._pool.has_route(client[0], name, port):
                try:
                    upstream_tcp = await self._connect(name, port)
                except UpstreamError:
                    await _send_simple(stream, 502, b"Bad Gateway")
                    raise
            await self._answer_connect(parser, stream)
            await self._after_connect(
                stream, bytes(parser.trailing_data[0]), upstream_tcp, name, port, client, conn
            )
            return
        target = bytes(event.target)
        if target.startswith(b"http://"):
            await self._plain_http(stream, head + rest, target, client, conn)
            return
        await _send_simple(stream, 400, b"Bad Request")
        raise ClientError(
            "not a proxy request (expected CONNECT or http:// URL)", reason="bad_request"
        )

    async def _read_head(self, stream: trio.abc.Stream) -> tuple[bytes, bytes]:
        buffer = bytearray()
        with trio.fail_after(self.config.head_timeout):
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end >= 0:
                    return bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])
                if len(buffer) > _HEAD_LIMIT:
                    await _send_simple(stream, 431, b"Request Header Fields Too Large")
                    raise ClientError("request head too large", reason="head_too_large")
                data = await stream.receive_some(_RECEIVE)
                if not data:
                    raise ClientError(
                        "client closed before sending a request", reason="client_gone"
                    )
                buffer += data

    async def _answer_connect(self, parser: h11.Connection, stream: trio.abc.Stream) -> None:
        data = parser.send(
            h11.Response(status_code=200, reason=b"Connection established", headers=[])
        )
        if data:
            await stream.send_all(data)

    async def _transparent(
        self,
        stream: trio.abc.Stream,
        client: tuple[str, int],
        destination: tuple[str, int],
        conn: _Conn,
    ) -> None:
        address, port = destination
        conn.host, conn.port = normalize_host(address), port
        # The client speaks first: peek before dialling, so that a connection for the error
        # origin (the embedder routes error.invalid to this listener) is answered here.
        initial = b""
        try:
            initial, hello = await self._peek_hello(stream, b"")
        except _NotTLS as not_tls:
            initial = not_tls.args[0]
        else:
            if hello.server_name and self.responder.is_error_origin(hello.server_name, port):
                await self._serve_error_origin(stream, initial, conn)
                return
        upstream_tcp = None
        if not self._pool.has_route(client[0], conn.host, port):
            upstream_tcp = await self._connect(conn.host, port)
        await self._after_connect(stream, initial, upstream_tcp, conn.host, port, client, conn)

    async def _connect(self, host: str, port: int) -> trio.abc.Stream:
        target = self.config.resolve.get(host, host)
        try:
            with trio.fail_after(self.config.connect_timeout):
                return await self._connector(target, port)
        except trio.TooSlowError as exc:
            raise UpstreamError(
                f"connecting to {host}:{port} timed out", reason="connect_timeout"
            ) from exc
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {host}:{port}: {exc}", reason="connect_failed"
            ) from exc

    async def _peek_hello(
        self, stream: trio.abc.Stream, initial: bytes
    ) -> tuple[bytes, ClientHello]:
        data = bytearray(initial)
        with trio.fail_after(self.config.handshake_timeout):
            while True:
                if data:
                    try:
                        result = parse_client_hello(bytes(data))
                    except ClientHelloError as exc:
                        if exc.reason == "not_tls":
                            raise _NotTLS(bytes(data)) from exc
                        raise
                    if result is not NEED_MORE:
                        assert isinstance(result, ClientHello)
                        return bytes(data), result
                chunk = await stream.receive_some(_RECEIVE)
                if not chunk:
                    raise ClientError(
                        "client closed before its ClientHello was complete",
                        reason="truncated_hello",
                    )
                data += chunk

    async def _after_connect(
        self,
        client_stream: trio.abc.Stream,
        initial: bytes,
        upstream_tcp: trio.abc.Stream | None,
        name: str,
        port: int,
        client: tuple[str, int],
        conn: _Conn,
    ) -> None:
        """Steps 2 to 9 for a client whose destination ``name:port`` is known.

        ``upstream_tcp`` is ``None`` when an idle pooled connection to ``name:port`` was on hand
        and dialling was put off; it is dialled here if that connection does not fit. Whatever
        TCP connection this method ends up with is closed on return, unless it went back to
        the pool inside its TLS stream.
        """
        pooled: PooledUpstream | None = None
        try:
            try:
                peeked, hello = await self._peek_hello(client_stream, initial)
            except _NotTLS as not_tls:
                # Matrix: non-TLS bytes after CONNECT are spliced raw, byte for byte.
                conn.decision, conn.reason = "bypass", "not_tls"
                self.stats.bypassed += 1
                if upstream_tcp is None:
                    upstream_tcp = await self._connect(name, port)
                await self._splice(client_stream, upstream_tcp, conn, to_upstream=not_tls.args[0])
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
                    upstream_tcp = await self._connect(name, port)
            destination = pooled.stream.transport_stream if pooled else upstream_tcp
            assert destination is not None
            decision = await self.policy.decide(
                client_ip=client[0],
                host=tls_name,
                port=port,
                destination_ip=_peer_ip(destination),
                now=self.clock(),
            )
            if not decision.intercept:
                conn.decision, conn.reason = "bypass", decision.reason
                self.stats.bypassed += 1
                if upstream_tcp is None:
                    upstream_tcp = await self._connect(name, port)
                await self._splice(client_stream, upstream_tcp, conn, to_upstream=peeked)
                return
            await self._intercept(
                client_stream, peeked, hello, upstream_tcp, pooled, key, client, conn
            )
        finally:
            if not conn.upstream_pooled:
                if pooled is not None:
                    await _close(pooled.stream)
                if upstream_tcp is not None:
                    await _close(upstream_tcp)

    async def _take_pooled(self, key: PoolKey) -> PooledUpstream | None:
        pooled, stale = self._pool.take(key, trio.current_time())
        self.stats.upstream_stale += len(stale)
        await _close_all(stale)
        if pooled is not None:
            self.stats.upstream_reused += 1
        return pooled

    async def _intercept(
        self,
        client_stream: trio.abc.Stream,
        peeked: bytes,
        hello: ClientHello,
        upstream_tcp: trio.abc.Stream | None,
        pooled: PooledUpstream | None,
        key: PoolKey,
        client: tuple[str, int],
        conn: _Conn,
    ) -> None:
        name, port = key[3], key[2]
        if pooled is not None:
            upstream, verdict = pooled.stream, pooled.verdict
        else:
            assert upstream_tcp is not None
            probe = await self._probe_upstream(upstream_tcp, name, port, key[4])
            upstream = probe.stream
            if probe.client_certificate_requested:
                await self._save_client_cert_site(client_stream, peeked, upstream, name, port, conn)
                return
            assert probe.verdict is not None  # (None only with client_certificate_requested)
            verdict = probe.verdict
        conn.verdict = "ok" if verdict.ok else (verdict.error.value if verdict.error else None)
        if verdict.error is not None:
            self.stats.cert_errors[verdict.error.value] = (
                self.stats.cert_errors.get(verdict.error.value, 0) + 1
            )
        now = self.clock()
        speaks_http = b"http/1.1" in hello.alpn_protocols or (
            not hello.alpn_protocols and port in _HTTP_PORTS
        )
        action = self.responder.plan(
            verdict,
            host=name,
            hsts_known=self.hsts.is_known_host(name, now=now),
            client_speaks_http=speaks_http,
            now=now,
        )
        if action.kind is ActionKind.ALERT:
            conn.decision, conn.reason = "block", "alert"
            self.stats.blocked += 1
            await _close(upstream)
            await client_stream.send_all(_HANDSHAKE_FAILURE_ALERT)
            return
        if action.kind in (ActionKind.BLOCK_PAGE, ActionKind.OVERRIDE_PAGE):
            await _close(upstream)
            conn.decision, conn.reason = "block", action.kind.value
            self.stats.blocked += 1
            leaf = self.forge.leaf_for(name, None, issuer=IssuerKind.TRUSTED, now=now)
            downstream = await self._client_handshake(
                client_stream,
                peeked,
                leaf,
                b"http/1.1" if speaks_http and hello.alpn_protocols else None,
                client,
                name,
                port,
            )
            await self._redirect_to_error(downstream, action, port)
            return
        if action.kind is ActionKind.PASSTHROUGH_UNTRUSTED:
            conn.decision, conn.reason = "intercept", "passthrough_untrusted"
            self.stats.passthrough_untrusted += 1
            leaf = self.forge.leaf_for(name, verdict.leaf, issuer=IssuerKind.ERROR, now=now)
        else:
            conn.decision = "intercept"
            conn.reason = "overridden" if action.overridden else "verified"
            self.stats.intercepted += 1
            # A user override already accepted this upstream's error on tlsmitm's page: the
            # leaf names only the host and does not inherit the upstream's (e.g. expired)
            # dates, or the browser would raise the same error a second time. The override
            # itself is bounded (ErrorResponder's override_ttl) and re-checked per connection.
            leaf = self.forge.leaf_for(
                name,
                None if action.overridden else verdict.leaf,
                issuer=IssuerKind.TRUSTED,
                upstream_verified=verdict.ok,
                now=now,
            )
        selected = upstream.selected_alpn()
        downstream = await self._client_handshake(
            client_stream, peeked, leaf, selected, client, name, port
        )
        record_hsts = action.kind is ActionKind.INTERCEPT and verdict.ok and not action.overridden
        try:
            reusable, keep_alive_hint = await self._relay_tls(
                downstream, upstream, selected, name, port, record_hsts, conn
            )
            # A graceful close (close_notify) keeps the session resumable; an abortive one makes
            # OpenSSL mark it not resumable. Sessions are taken after the relay because TLS 1.3
            # tickets arrive after the handshake.
            session = upstream.session()
            if session is not None:
                self._remember_session((name, port), session)
            # Only a verified, not overridden upstream is kept (record_hsts says exactly that):
            # the next client gets it without a new verification.
            deadline = None
            if record_hsts and reusable and not self._draining:
                deadline = self._pool.deadline(trio.current_time(), keep_alive_hint)
            if deadline is not None:
                entry = PooledUpstream(stream=upstream, verdict=verdict, expires=deadline)
                dropped = self._pool.put(key, entry, trio.current_time())
                conn.upstream_pooled = upstream not in dropped
                await _close_all(dropped)
            else:
                await _close(upstream)  # (close_notify first: the session stays resumable)
        finally:
            if not conn.upstream_pooled:
                await _close(upstream)
            await _close(downstream)

    async def _probe_upstream(
        self, upstream_tcp: trio.abc.Stream, name: str, port: int, offer: Sequence[bytes]
    ) -> UpstreamProbe:
        """Steps 4 and 5: the upstream TLS handshake and the verification of what it presented.

        A failed handshake is not raised: it becomes a :data:`CertError.PROTOCOL` verdict (a
        server speaking only TLS 1.0, or only broken suites), which no profile lets a user
        override. This is exactly what ``python -m tlsmitm check`` runs.
        """
        upstream = TLSStream(
            upstream_tcp,
            upstream_connection(
                self._upstream_ctx,
                server_name=None if is_ip_literal(name) else name,
                alpn_offer=offer,
                session=self._sessions.get((name, port)),
            ),
            server_side=False,
            max_refill_bytes=_RECEIVE,
        )
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await upstream.do_handshake()
        except UpstreamError as exc:
            if upstream.client_certificate_requested():
                return UpstreamProbe(
                    stream=upstream, verdict=None, client_certificate_requested=True
                )
            self.stats.upstream_failures += 1
            verdict = Verdict(
                host=name,
                ok=False,
                error=CertError.PROTOCOL,
                detail=f"the TLS handshake with the server failed: {exc}",
                chain=(),
                leaf=None,
                leaf_sha256=None,
            )
            return UpstreamProbe(stream=upstream, verdict=verdict)
        except trio.TooSlowError as exc:
            await _close(upstream)
            raise UpstreamError(
                f"TLS handshake with {name}:{port} timed out", reason="handshake_timeout"
            ) from exc
        if upstream.client_certificate_requested():
            return UpstreamProbe(stream=upstream, verdict=None, client_certificate_requested=True)
        verdict = await self._verify(
            upstream.peer_certificate_chain(), name, upstream.stapled_ocsp()
        )
        return UpstreamProbe(stream=upstream, verdict=verdict)

    async def _verify(
        self, chain: Sequence[x509.Certificate], name: str, stapled_ocsp: bytes | None
    ) -> Verdict:
        """Verify ``chain`` for ``name``, reusing a recent *successful* verdict for it.

        Browsers cache verification results too. Only successes are cached, keyed by the host,
        the exact chain presented and the stapled OCSP response, for at most
        ``verdict_cache_seconds`` and never past the expiry of any certificate in the path.
        """
        now = self.clock()
        key = (
            name,
            hashlib.sha256(
                b"".join(c.public_bytes(Encoding.DER) for c in chain) + (stapled_ocsp or b"")
            ).digest(),
        )
        cached = self._verdicts.get(key)
        if cached is not None and cached[1] > now:
            self._verdicts.move_to_end(key)
            return cached[0]
        verdict = await self.verifier.verify_with_fetching(
            chain, name, now=now, fetcher=self._fetch, stapled_ocsp=stapled_ocsp
        )
        if verdict.ok and self.config.verdict_cache_seconds > 0:
            expires = min(
                [now + timedelta(seconds=self.config.verdict_cache_seconds)]
                + [c.not_valid_after_utc for c in verdict.chain]
            )
            self._verdicts[key] = (verdict, expires)
            while len(self._verdicts) > self.config.verdict_cache_size:
                self._verdicts.popitem(last=False)
        return verdict

    async def check_upstream(
        self, host: str, port: int = 443, *, alpn_offer: Sequence[bytes] = (b"http/1.1",)
    ) -> CheckResult:
        """Connect to ``host:port`` and decide about it exactly as the proxy would.

        Used by ``python -m tlsmitm check``; never relays anything.
        """
        name = normalize_host(host)
        upstream_tcp = await self._connect(name, port)
        probe = await self._probe_upstream(upstream_tcp, name, port, alpn_offer)
        try:
            now = self.clock()
            action = None
            if probe.verdict is not None:
                action = self.responder.plan(
                    probe.verdict,
                    host=name,
                    hsts_known=self.hsts.is_known_host(name, now=now),
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
                hsts_known=self.hsts.is_known_host(name, now=now),
                tls_version=stream.tls_version(),
                cipher=stream.cipher_name(),
                alpn=stream.selected_alpn(),
                chain=tuple(stream.peer_certificate_chain()),
            )
        finally:
            await _close(probe.stream)

    async def _save_client_cert_site(
        self,
        client_stream: trio.abc.Stream,
        peeked: bytes,
        upstream: TLSStream,
        name: str,
        port: int,
        conn: _Conn,
    ) -> None:
        """The server wants a client certificate: learn the bypass and splice this connection.

        The client's handshake is untouched (only peeked), so a fresh upstream connection fed
        the same ClientHello lets the browser talk to the server itself and present the user's
        certificate. The bypass is learned only if the server's chain verified for ``name``
        (a network attacker must not be able to switch off inspection for a host it does not
        hold a certificate for).
        """
        now = self.clock()
        # With TLS 1.2 the handshake failed (the server alerted after our empty Certificate),
        # but the chain it presented before asking was received: read it from the connection.
        chain = upstream.peer_certificate_chain() or (
            upstream.connection.get_peer_cert_chain(as_cryptography=True) or []
        )
        verified = False
        if chain:
            verified = self.verifier.verify(chain, name, now=now).ok
        self.policy.note_client_certificate_requested(
            host=name, port=port, upstream_verified=verified, now=now
        )
        await _close(upstream)
        conn.decision, conn.reason = "bypass", "client_certificate_requested"
        self.stats.bypassed += 1
        if not verified:
            raise UpstreamError(
                f"{name}:{port} asked for a client certificate but its own certificate did not "
                "verify",
                reason="client_cert_unverified",
            )
        fresh = await self._connect(name, port)
        try:
            await self._splice(client_stream, fresh, conn, to_upstream=peeked)
        finally:
            await _close(fresh)

    async def _client_handshake(
        self,
        client_stream: trio.abc.Stream,
        peeked: bytes,
        leaf: ForgedLeaf,
        alpn: bytes | None,
        client: tuple[str, int],
        name: str,
        port: int,
    ) -> TLSStream:
        context = self._server_context_for(leaf)
        connection = server_connection(context, leaf.ssl_certificate, leaf.ssl_key, alpn=alpn)
        downstream = TLSStream(
            client_stream,
            connection,
            server_side=True,
            initial_data=peeked,
            max_refill_bytes=_RECEIVE,
        )
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await downstream.do_handshake()
        except ClientError as exc:
            self.stats.client_handshake_failures += 1
            alert = getattr(exc, "alert", None)
            if leaf.issuer is IssuerKind.TRUSTED and alert in _REJECTION_ALERTS:
                self.policy.note_client_rejected_leaf(
                    client_ip=client[0], host=name, port=port, now=self.clock()
                )
            raise
        except trio.TooSlowError as exc:
            raise ClientError("client TLS handshake timed out", reason="handshake_timeout") from exc
        return downstream

    def _server_context_for(self, leaf: ForgedLeaf) -> SSL.Context:
        context = self._server_contexts.get(leaf.chain)
        if context is None:
            context = server_context(leaf.ssl_chain, keylog=self._keylog)
            self._server_contexts[leaf.chain] = context
        return context

    def _remember_session(self, key: tuple[str, int], session: SSL.Session) -> None:
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.config.session_cache_size:
            self._sessions.popitem(last=False)

    async def _fetch(self, url: str, body: bytes | None) -> bytes:
        async def connect(host: str, port: int) -> trio.abc.Stream:
            return await self._connect(normalize_host(host), port)

        return await fetch_http(url, body, connect=connect, seconds=self.config.fetch_timeout)

    async def _relay_tls(
        self,
        downstream: TLSStream,
        upstream: TLSStream,
        selected: bytes | None,
        name: str,
        port: int,
        record_hsts: bool,
        conn: _Conn,
    ) -> tuple[bool, float | None]:
        """Relay until done; returns whether ``upstream`` may be reused, and the server's
        ``Keep-Alive: timeout`` if it sent one."""
        http = selected == b"http/1.1" or (selected is None and port in _HTTP_PORTS)
        if not http:
            await self._splice(downstream, upstream, conn)
            return False, None

        def on_sts(values: Sequence[bytes]) -> None:
            self.hsts.observe(name, list(values), now=self.clock(), secure_and_verified=True)

        relay = HttpRelay(
            client=downstream,
            upstream=upstream,
            flow=FlowInfo(client=conn.client, host=name, port=port, verified=record_hsts),
            hooks=self.hooks,
            on_sts=on_sts if record_hsts else None,
            answer_block=self._block_answer(name, port),
            idle_timeout=self.config.idle_timeout,
            should_stop=lambda: self._draining,
            keep_upstream_alive=record_hsts and self._pool.enabled,
        )
        try:
            switched = await run_relay(relay)
        finally:
            conn.bytes_up += relay.counters.bytes_up
            conn.bytes_down += relay.counters.bytes_down
        if isinstance(switched, Switched):
            await self._splice(
                downstream,
                upstream,
                conn,
                to_upstream=switched.to_upstream,
                to_client=switched.to_client,
            )
            return False, None
        return relay.upstream_reusable, relay.keep_alive_hint

    def _block_answer(
        self, host: str, port: int
    ) -> Callable[
        [Block, bytes], Awaitable[tuple[int, bytes, tuple[tuple[bytes, bytes], ...], bytes]]
    ]:
        async def answer(
            block: Block, target: bytes
        ) -> tuple[int, bytes, tuple[tuple[bytes, bytes], ...], bytes]:
            self.stats.blocked += 1
            response = self.responder.block(
                host=host,
                title=block.title,
                explanation=block.explanation,
                now=self.clock(),
                port=port,
            )
            return response.status, response.reason, response.headers, response.body

        return answer

    async def _redirect_to_error(self, downstream: TLSStream, action: Action, port: int) -> None:
        """Answer the first request with a redirect to the error origin, then close."""
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=_HEAD_LIMIT)
        with trio.fail_after(self.config.head_timeout):
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    parser.receive_data(bytes(await downstream.receive_some(_RECEIVE)))
                    continue
                break
        if not isinstance(event, h11.Request):
            return
        response = self.responder.redirect_for(
            action, request_target=bytes(event.target), port=port, now=self.clock()
        )
        await _send_response(
            parser, downstream, response.status, response.reason, response.headers, response.body
        )
        await downstream.aclose()

    async def _serve_error_origin(
        self, client_stream: trio.abc.Stream, initial: bytes, conn: _Conn
    ) -> None:
        """tlsmitm's own origin (``https://error.invalid/``): error, block and override pages."""
        conn.decision, conn.reason = "intercept", "error_origin"
        self.stats.error_origin += 1
        peeked, hello = await self._peek_hello(client_stream, initial)
        host = self.responder.error_origin_host
        leaf = self.forge.leaf_for(host, None, issuer=IssuerKind.TRUSTED, now=self.clock())
        alpn = b"http/1.1" if b"http/1.1" in hello.alpn_protocols else None
        context = self._server_context_for(leaf)
        downstream = TLSStream(
            client_stream,
            server_connection(context, leaf.ssl_certificate, leaf.ssl_key, alpn=alpn),
            server_side=True,
            initial_data=peeked,
        )
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await downstream.do_handshake()
            await self._error_origin_loop(downstream)
        finally:
            await _close(downstream)

    async def _error_origin_loop(self, stream: trio.abc.Stream) -> None:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=_HEAD_LIMIT)
        while True:
            request: h11.Request | None = None
            body = bytearray()
            with trio.move_on_after(self.config.head_timeout) as idle:
                while True:
                    event = parser.next_event()
                    if event is h11.NEED_DATA:
                        parser.receive_data(bytes(await stream.receive_some(_RECEIVE)))
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > _HEAD_LIMIT:
                            raise ClientError("request body too large", reason="body_too_large")
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
            if idle.cancelled_caught or request is None:
                return
            response = self.responder.handle(
                HttpRequest(
                    method=bytes(request.method),
                    target=bytes(request.target),
                    headers=tuple((bytes(k), bytes(v)) for k, v in request.headers),
                    body=bytes(body),
                ),
                now=self.clock(),
            )
            await _send_response(
                parser, stream, response.status, response.reason, response.headers, response.body
            )
            if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
                return
            parser.start_next_cycle()

    async def _plain_http(
        self,
        stream: trio.abc.Stream,
        raw: bytes,
        target: bytes,
        client: tuple[str, int],
        conn: _Conn,
    ) -> None:
        """Relay absolute-form ``http://`` requests (no TLS, no HSTS recording: RFC 6797 §8.1)."""
        host, port, _ = _split_http_url(target)
        name = normalize_host(host)
        conn.host, conn.port = name, port
        conn.decision, conn.reason = "intercept", "plain_http"
        self.stats.plain_http += 1
        try:
            upstream = await self._connect(name, port)
        except UpstreamError:
            await _send_simple(stream, 502, b"Bad Gateway")
            raise

        def to_origin_form(request: Request) -> Request:
            if not request.target.startswith(b"http://"):
                return request
            req_host, req_port, path = _split_http_url(request.target)
            if normalize_host(req_host) != name or req_port != port:
                raise ClientError("one proxy connection, one origin", reason="origin_changed")
            headers = tuple(
                (k, v)
                for k, v in request.headers
                if k.lower() not in (b"proxy-connection", b"proxy-authorization")
            )
            return Request(
                method=request.method,
                target=path,
                headers=headers,
                http_version=request.http_version,
            )

        hooks = _RewritingHooks(self.hooks, to_origin_form)
        relay = HttpRelay(
            client=stream,
            upstream=upstream,
            flow=FlowInfo(client=conn.client, host=name, port=port, verified=False),
            hooks=hooks,
            on_sts=None,
            answer_block=self._block_answer(name, port),
            idle_timeout=self.config.idle_timeout,
            should_stop=lambda: self._draining,
            initial_client_data=raw,
        )
        try:
            switched = await run_relay(relay)
            if isinstance(switched, Switched):
                await self._splice(
                    stream,
                    upstream,
                    conn,
                    to_upstream=switched.to_upstream,
                    to_client=switched.to_client,
                )
        finally:
            conn.bytes_up += relay.counters.bytes_up
            conn.bytes_down += relay.counters.bytes_down
            await _close(upstream)

    # -- raw relaying -------------------------------------------------------------------------

    async def _splice(
        self,
        a: trio.abc.Stream,
        b: trio.abc.Stream,
        conn: _Conn,
        *,
        to_upstream: bytes = b"",
        to_client: bytes = b"",
    ) -> None:
        """Copy bytes both ways until both directions ended; ``a`` is the client side."""
        if to_upstream:
            await b.send_all(to_upstream)
            conn.bytes_up += len(to_upstream)
        if to_client:
            await a.send_all(to_client)
            conn.bytes_down += len(to_client)
        last_activity = [trio.current_time()]
        idle = self.config.idle_timeout

        async def pump(source: trio.abc.Stream, sink: trio.abc.Stream, up: bool) -> None:
            while True:
                data = await source.receive_some(_RECEIVE)
                if not data:
                    break
                last_activity[0] = trio.current_time()
                if up:
                    conn.bytes_up += len(data)
                else:
                    conn.bytes_down += len(data)
                await sink.send_all(data)
            if isinstance(sink, trio.abc.HalfCloseableStream):
                await sink.send_eof()
            else:
                await sink.aclose()

        async with trio.open_nursery() as nursery:

            async def watchdog() -> None:
                while True:
                    deadline = last_activity[0] + idle
                    if trio.current_time() >= deadline:
                        nursery.cancel_scope.cancel()
                        return
                    await trio.sleep_until(deadline)

            async def both() -> None:
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(pump, a, b, True)
                    pumps.start_soon(pump, b, a, False)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watchdog)
            nursery.start_soon(both)


class _RewritingHooks(Hooks):
    """Rewrites absolute-form targets to origin form before the embedder's hooks see them."""

    def __init__(self, inner: Hooks, rewrite: Callable[[Request], Request]) -> None:
        self._inner = inner
        self._rewrite = rewrite
        self.body_limit = inner.body_limit

    async def on_request(self, flow: FlowInfo, request: Request) -> Request | Block | None:
        rewritten = self._rewrite(request)
        outcome = await self._inner.on_request(flow, rewritten)
        return rewritten if outcome is None else outcome

    async def on_response(self, flow: FlowInfo, request: Request, response: Any) -> Any:
        return await self._inner.on_response(flow, request, response)


# -- helpers ----------------------------------------------------------------------------------


async def _tcp_connector(host: str, port: int) -> trio.abc.Stream:
    address = ip_address_of(host)
    if address is None:
        return await trio.open_tcp_stream(host, port)
    # An address (a transparent destination, a --resolve target): one connect, without the
    # name resolution and happy-eyeballs tasks open_tcp_stream spends on a name.
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((str(address), port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _peer_ip(stream: trio.abc.Stream) -> str | None:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return None


def _split_authority(target: bytes) -> tuple[str, int]:
    """``host:port`` of a CONNECT request (RFC 9110 §9.3.6); IPv6 in brackets."""
    text = target.decode("ascii")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("bad IPv6 authority")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("CONNECT target needs a port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("bad port")
    if not host:
        raise ValueError("empty host")
    return host, int(port_text)


def _split_http_url(target: bytes) -> tuple[str, int, bytes]:
    rest = target[len(b"http://") :]
    slash = rest.find(b"/")
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    if b"@" in authority:
        raise ClientError("credentials in proxy URLs are refused", reason="bad_request")
    text = authority.decode("ascii", "replace")
    if text.startswith("["):
        end = text.find("]")
        host = text[1:end]
        port_text = text[end + 2 :] if text[end + 1 : end + 2] == ":" else ""
    else:
        host, _, port_text = text.partition(":")
    port = int(port_text) if port_text.isdigit() else 80
    return host, port, path or b"/"


async def _send_simple(stream: trio.abc.Stream, status: int, reason: bytes) -> None:
    body = reason + b"\n"
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body))
    )
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_all(head + body)


async def _send_response(
    parser: h11.Connection,
    stream: trio.abc.Stream,
    status: int,
    reason: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    out = parser.send(h11.Response(status_code=status, reason=reason, headers=list(headers)))
    out = out or b""
    if body:
        out += parser.send(h11.Data(data=body)) or b""
    out += parser.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)


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
