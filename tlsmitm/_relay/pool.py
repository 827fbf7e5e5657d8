"""Idle upstream TLS connections kept for the next client connection to the same server.

A client that opens a new connection for each request (curl in a script, an update agent, an
app's HTTP library) would otherwise cost the proxy a second TLS handshake -- and a certificate
verification -- per request, on top of the one with the client. A clean, verified, idle
HTTP/1.1 upstream connection is kept here for a few seconds instead and handed to the next
connection that would have opened exactly the same one.

What makes a connection poolable is decided by the flow (:mod:`tlsmitm._relay.flow`):
HTTP/1.1 that ended at a request boundary with nothing left over, an upstream whose chain
verified and was not overridden, no connection-bound authentication (NTLM, Negotiate) on it.
This module only keeps them, bounded in number and time, and checks that one is still alive
before handing it out.

The key holds everything that made the connection what it is: the client's address (a
connection is never shared between clients), the dialled host and port, the SNI name, and the
ALPN list offered upstream.

A connection is kept only when its key was seen before, recently (:data:`REPEAT_WINDOW`): a
browser that visits a hundred hosts once each would otherwise leave a hundred idle connections
open on a hundred servers for nothing. The first connection to a server is closed as usual; from
the second on, a client that comes back finds one kept.
"""

from __future__ import annotations

import select
from collections import OrderedDict
from dataclasses import dataclass

from .._names import HostName
from .._tls import TLSStream
from .._verify import Verdict

__all__ = ["PoolKey", "PooledUpstream", "UpstreamPool"]

REPEAT_WINDOW = 60.0  # seconds: a key seen this recently is worth keeping a connection for


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolKey:
    """What made an upstream connection what it is; only an identical connection may reuse it.

    Attributes:
        client_ip: the client's address (a connection is never shared between clients).
        host: the dialled host.
        port: the dialled port.
        tls_name: the SNI name (the name the certificate was verified for).
        alpn_offer: the ALPN list offered upstream.
    """

    client_ip: str
    host: HostName
    port: int
    tls_name: HostName
    alpn_offer: tuple[bytes, ...]

    @property
    def route(self) -> tuple[str, str, int]:
        """(client IP, host, port): what :meth:`UpstreamPool.has_route` asks about."""
        return (self.client_ip, self.host, self.port)


@dataclass(slots=True, kw_only=True)
class PooledUpstream:
    """One idle upstream connection and what was learned when it was opened."""

    stream: TLSStream
    verdict: Verdict
    expires: float  # a time.monotonic()-style deadline (the caller's clock)


def _transport_quiet(stream: TLSStream) -> bool:
    """``True`` when the socket under ``stream`` has nothing to read and has not ended.

    An idle upstream that has anything to say (a close_notify, a FIN, a reset) is not reused.
    Streams without a socket (memory streams in tests) are taken at the TLS layer's word.
    """
    sock = getattr(stream.transport_stream, "socket", None)
    if sock is None:
        return True
    try:
        fd = sock.fileno()
    except OSError:
        return False
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return not poller.poll(0)


class UpstreamPool:
    """Idle upstream connections by :data:`PoolKey`, newest first, bounded and expiring.

    Closing is async and belongs to the caller: every method that drops connections returns
    the streams to close (with ``trio.aclose_forcefully``).

    Args:
        max_idle: connections kept in all (0 disables the pool).
        max_per_key: connections kept for one key.
        idle_seconds: how long an idle connection is kept (a server's shorter
            ``Keep-Alive: timeout`` wins, see :meth:`put`).
    """

    def __init__(self, *, max_idle: int, max_per_key: int, idle_seconds: float) -> None:
        if max_idle < 0 or max_per_key < 1 or idle_seconds < 0:
            raise ValueError("pool limits must be non-negative (max_per_key at least 1)")
        self.max_idle = max_idle
        self.max_per_key = max_per_key
        self.idle_seconds = idle_seconds
        self._idle: OrderedDict[PoolKey, list[PooledUpstream]] = OrderedDict()
        self._routes: dict[tuple[str, str, int], int] = {}
        self._count = 0
        self._seen: OrderedDict[PoolKey, float] = OrderedDict()  # key -> when last seen
        self.reused = 0
        self.stale = 0

    @property
    def enabled(self) -> bool:
        return self.max_idle > 0 and self.idle_seconds > 0

    def __len__(self) -> int:
        return self._count

    def has_route(self, client_ip: str, host: str, port: int) -> bool:
        """Is any connection kept for this client to ``host:port`` (whatever its SNI/ALPN)?"""
        return self._routes.get((client_ip, host, port), 0) > 0

    def deadline(self, now: float, keep_alive_hint: float | None) -> float | None:
        """When a connection put back at ``now`` expires; ``None`` if it should not be kept.

        A server that announced ``Keep-Alive: timeout=N`` closes idle connections after N
        seconds: keep them one second less than that, so the race with its close is avoided.
        """
        seconds = self.idle_seconds
        if keep_alive_hint is not None:
            seconds = min(seconds, keep_alive_hint - 1.0)
        if not self.enabled or seconds <= 0:
            return None
        return now + seconds

    def would_keep(self, key: PoolKey, now: float) -> bool:
        """Would a connection for ``key`` be kept after this visit? Notes ``key`` as seen now.

        Asked before relaying: when the answer is no (pooling is off, or this is a first visit
        in :data:`REPEAT_WINDOW`), the relay treats the upstream connection exactly as without
        a pool -- the client's ``Connection: close`` goes upstream, its head is forwarded as
        parsed -- so a miss costs nothing the pool would not use.
        """
        return self.enabled and self._seen_recently(key, now)

    def put(self, key: PoolKey, entry: PooledUpstream, now: float) -> list[TLSStream]:
        """Keep ``entry``; returns the connections that expired or no longer fit.

        ``entry`` itself is among them when pooling is off, and when ``key`` was not seen in
        the last :data:`REPEAT_WINDOW` seconds (a first visit is not kept).
        """
        dropped = self.expire(now)
        if not self.enabled or not self._seen_recently(key, now):
            return [*dropped, entry.stream]
        entries = self._idle.setdefault(key, [])
        entries.append(entry)
        self._idle.move_to_end(key)
        self._add_route(key, 1)
        if len(entries) > self.max_per_key:
            dropped.append(self._pop(key, 0).stream)
        while self._count > self.max_idle:
            oldest = next(iter(self._idle))
            dropped.append(self._pop(oldest, 0).stream)
        return dropped

    def take(self, key: PoolKey, now: float) -> tuple[PooledUpstream | None, list[TLSStream]]:
        """The newest live connection for ``key`` (removed from the pool), and ones to close."""
        self._seen_recently(key, now)
        dropped: list[TLSStream] = []
        while self._idle.get(key):
            entry = self._pop(key, -1)
            if entry.expires > now and entry.stream.is_idle() and _transport_quiet(entry.stream):
                self.reused += 1
                return entry, dropped
            self.stale += 1
            dropped.append(entry.stream)
        return None, dropped

    def expire(self, now: float) -> list[TLSStream]:
        """Remove and return the connections whose time is up, oldest keys first.

        Keys are kept in the order they were last put back, so the walk stops at the first key
        with nothing expired: this runs on every :meth:`put` and must not cost a walk over the
        whole pool. (A server's short ``Keep-Alive`` can leave an expired connection behind a
        live one for a while; :meth:`take` never hands one out.)
        """
        dropped: list[TLSStream] = []
        while self._idle:
            key = next(iter(self._idle))
            entries = self._idle[key]
            if entries[0].expires > now:
                break
            while key in self._idle and self._idle[key][0].expires <= now:
                dropped.append(self._pop(key, 0).stream)
            if key in self._idle:
                break
        return dropped

    def drain(self) -> list[TLSStream]:
        """Remove and return everything (on shutdown)."""
        dropped = [entry.stream for entries in self._idle.values() for entry in entries]
        self._idle.clear()
        self._routes.clear()
        self._count = 0
        return dropped

    def _seen_recently(self, key: PoolKey, now: float) -> bool:
        """Was ``key`` seen in the last :data:`REPEAT_WINDOW` seconds? Notes it as seen now."""
        last = self._seen.pop(key, None)
        self._seen[key] = now
        while len(self._seen) > 4 * max(self.max_idle, 64):
            self._seen.popitem(last=False)
        return last is not None and now - last <= REPEAT_WINDOW

    def _pop(self, key: PoolKey, index: int) -> PooledUpstream:
        entries = self._idle[key]
        entry = entries.pop(index)
        if not entries:
            del self._idle[key]
        self._add_route(key, -1)
        return entry

    def _add_route(self, key: PoolKey, delta: int) -> None:
        route = key.route
        left = self._routes.get(route, 0) + delta
        if left > 0:
            self._routes[route] = left
        else:
            self._routes.pop(route, None)
        self._count += delta
