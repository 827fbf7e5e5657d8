"""Defences of the proxy itself: the error boundary, loop protection, per-client limits.

Theory of operation
-------------------
A proxy's input is written by strangers (issue 15). Three things here keep one stranger from
hurting everyone else behind the same proxy:

* :class:`ErrorBoundary`: whatever goes wrong while one connection is handled -- a bug included --
  ends that connection only. It is logged as one line per cause, at most once a minute per cause
  with a count of the repeats (a traceback only at DEBUG), so a client cannot fill the log with its
  own bytes.
* :class:`LoopGuard`: a CONNECT or ``http://`` request aimed at one of the proxy's own listening
  addresses -- directly, through a wildcard listener (``0.0.0.0``/``::`` stand for every local
  address), or through a name that resolves to one -- is refused with ``508 Loop Detected``
  (RFC 5842 §7.2) instead of making the proxy connect to itself over and over. The ``Via``
  pseudonym (RFC 9110 §7.6.3) catches loops through a chain of proxies.
* :class:`ClientSlots`: at most ``limit`` connections at once per client address.
* :func:`admit` and :class:`Authenticator`: the allow-list and proxy authentication of
  :class:`~tlsmitm._access.AccessPolicy` (``403``, ``407``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import logging
import secrets
import socket
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .._access import Credentials, parse_basic
from .._errors import ClientError, ConfigurationError
from .._names import ip_address_of
from .state import FlowRecord
from .streams import close, send_simple

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = [
    "Authenticator",
    "ClientSlots",
    "ErrorBoundary",
    "LoopGuard",
    "admit",
    "connection_cap",
    "is_local_address",
    "private_state_dir",
    "raise_descriptor_limit",
    "refuse_busy",
    "shed_idle",
]

_MAX_MESSAGE = 200  # characters of an exception's message that reach the log


@dataclass
class _Cause:
    last_logged: float
    suppressed: int = 0


@dataclass
class ErrorBoundary:
    """Logs failures that end one connection: one line per cause, rate-limited per cause.

    Attributes:
        logger: where the lines go.
        interval: seconds between two lines about the same cause.
        clock: a monotonic clock (injected in tests).
        reported: how many failures were reported (logged or counted), for tests and stats.
    """

    logger: logging.Logger
    interval: float = 60.0
    clock: Callable[[], float] = time.monotonic
    reported: int = 0
    _causes: dict[str, _Cause] = field(default_factory=dict)

    def report(
        self, exc: BaseException, *, client: str, where: str = "handling", outage: bool = False
    ) -> None:
        """Record that ``exc`` ended a connection from ``client``; never raises.

        ``outage``: not a bug but the machine running out of something (descriptors, memory)
        while accepting; logged at WARNING with what the proxy does about it.
        """
        self.reported += 1
        try:
            frames = traceback.extract_tb(exc.__traceback__)
            origin = (
                f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
            )
            cause = f"{type(exc).__qualname__}@{origin}"
            now = self.clock()
            seen = self._causes.get(cause)
            if seen is not None and now - seen.last_logged < self.interval:
                seen.suppressed += 1
                return
            repeats = f" ({seen.suppressed} more like it since)" if seen and seen.suppressed else ""
            if len(self._causes) > 1000:
                self._causes.clear()  # bounded: a flood of distinct causes cannot grow it
            self._causes[cause] = _Cause(last_logged=now)
            text = " ".join(str(exc)[: 4 * _MAX_MESSAGE].split())
            message = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
            message = message[:_MAX_MESSAGE]
            if outage:
                self.logger.warning(
                    "cannot accept connections: %s; closing the oldest idle connection and "
                    "backing off (raise the descriptor limit, or lower --max-connections)%s",
                    message,
                    repeats,
                )
                return
            self.logger.error(
                "internal error while %s a connection from %s, closed it: %s: %s [%s]%s",
                where,
                client,
                type(exc).__name__,
                message,
                origin,
                repeats,
            )
            self.logger.debug("traceback of the error above", exc_info=exc)
        except Exception:
            return


@functools.lru_cache(maxsize=1024)
def is_local_address(address: str) -> bool:
    """Whether ``address`` is one of this machine's addresses (bind test; cached).

    A socket can bind only to a local address (``EADDRNOTAVAIL`` otherwise); loopback and
    unspecified addresses are local by definition.
    """
    ip = ip_address_of(address)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


def _canonical(address: str) -> str | None:
    ip = ip_address_of(address)
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


class LoopGuard:
    """Knows the proxy's own listening addresses and its ``Via`` pseudonym.

    Args:
        pseudonym: the ``received-by`` name this proxy puts in ``Via`` (default: ``tlsmitm-``
            and 48 random bits, so that two proxies in a chain have different ones).
    """

    def __init__(self, pseudonym: str | None = None) -> None:
        self.pseudonym = (pseudonym or f"tlsmitm-{secrets.token_hex(6)}").lower()
        self._listening: set[tuple[str, int]] = set()

    def add_listeners(self, addresses: Iterable[tuple[str, int]]) -> None:
        """Remember bound listening addresses (``(ip, port)``, as ``getsockname`` gives them)."""
        for host, port in addresses:
            canonical = _canonical(host)
            if canonical is not None:
                self._listening.add((canonical, port))

    def is_self(self, address: str, port: int) -> bool:
        """Whether a connection to ``address:port`` would reach one of our own listeners."""
        canonical = _canonical(address)
        if canonical is None:
            return False
        for host, listening_port in self._listening:
            if listening_port != port:
                continue
            if host == canonical:
                return True
            if host in ("0.0.0.0", "::") and is_local_address(canonical):  # noqa: S104
                return True
        return False

    def seen_in(self, via_names: Iterable[str]) -> bool:
        """Whether our pseudonym is among a request's ``Via`` names (the request looped)."""
        return self.pseudonym in via_names


class ClientSlots:
    """Counts open connections per client address, with a limit.

    Args:
        limit: most connections one address may hold at once (0: no limit).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._holders: dict[object, str] = {}

    def try_acquire(self, holder: object, address: str) -> bool:
        """Take a slot of ``address`` for ``holder``; ``False`` when ``limit`` are taken."""
        count = self._open.get(address, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[address] = count + 1
        self._holders[holder] = address
        return True

    def release(self, holder: object) -> None:
        """Give back ``holder``'s slot, if it took one."""
        address = self._holders.pop(holder, None)
        if address is None:
            return
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)


async def admit(
    ix: Interceptor,
    stream: trio.abc.Stream,
    client: tuple[str, int],
    conn: FlowRecord,
    *,
    explicit: bool,
) -> None:
    """Let a new connection in, or answer and refuse it (raises :class:`ClientError`).

    The allow-list first (``403``; in transparent mode a closed connection, there is no one to
    answer in HTTP), then the per-client limit (``429``, RFC 6585 §4).
    """
    if not ix.config.access.client_allowed(client[0]):
        if explicit:
            await send_simple(stream, 403, b"Forbidden")
        raise ClientError(f"client {client[0]} is not in the allow-list", reason="not_allowed")
    if not ix._client_slots.try_acquire(conn, client[0]):
        if explicit:
            await send_simple(stream, 429, b"Too Many Requests")
        raise ClientError(
            f"client {client[0]} already holds {ix._client_slots.limit} connections",
            reason="too_many_connections",
        )


class Authenticator:
    """Checks ``Proxy-Authorization: Basic`` values off the event loop, with a small cache.

    A password hash costs ~0.3 s of CPU and 128 MiB by design, so at most two are computed at
    once (in threads), and a value that was right is remembered for ``ttl`` seconds (by its SHA-256,
    never in clear) so that a browser's many connections cost one check.

    Args:
        credentials: the users; ``None`` when authentication is off.
        ttl: seconds a verified value is remembered.
        size: verified values remembered at most.
    """

    def __init__(self, credentials: Credentials | None, *, ttl: float = 300.0, size: int = 1024):
        self.credentials = credentials
        self._ttl = ttl
        self._size = size
        self._cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._limiter = trio.CapacityLimiter(2)

    async def user_for(self, value: bytes | None) -> str | None:
        """The user a ``Proxy-Authorization`` value proves, or ``None``."""
        if self.credentials is None or value is None:
            return None
        parsed = parse_basic(value)
        if parsed is None:
            return None
        key = hashlib.sha256(value).digest()
        now = trio.current_time()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        user, password = parsed
        ok = await trio.to_thread.run_sync(
            self.credentials.verify, user, password, limiter=self._limiter
        )
        if not ok:
            return None
        self._cache[key] = (user, now + self._ttl)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return user


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the ``(soft, hard)`` now.

    The usual soft limit of 1024 runs out long before a 10,000-connection cap (issue 15 fault 5):
    each intercepted connection holds two descriptors. An unlimited hard limit is taken as the
    kernel's usual ``nr_open`` (2^20); a refusal leaves the limit as it was.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def connection_cap(soft_limit: int, wanted: int, *, idle_upstreams: int) -> int:
    """The connections a descriptor budget allows: two each, after a reserve.

    The reserve covers listeners, logs, the state store, verification fetches (64) and the idle
    upstream connections the pool may keep.
    """
    reserve = 64 + idle_upstreams
    return max(1, min(wanted, (soft_limit - reserve) // 2))


def private_state_dir(path: Path) -> None:
    """Make the state directory private (0700): it holds the users' browsing state.

    Created 0700 when missing. An existing one with group or other access is tightened; when
    that is impossible (another owner, a read-only file system), a :class:`ConfigurationError`
    says so and what to run, instead of silently keeping it open (issue 15, item 8).
    """
    import os
    import stat

    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077 or not hasattr(os, "getuid"):
        return
    try:
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ConfigurationError(
            f"the state directory {path} is open to other users (mode {mode:04o}) and cannot "
            f"be made private ({exc.strerror}); run as its owner: chmod 700 {path}, or pick "
            "another with --state-dir",
            reason="state_permissions",
        ) from exc
    logging.getLogger("tlsmitm").info(
        "state directory %s was mode %04o; tightened to 0700", path, mode
    )


_IDLE_TO_SHED = 1.0  # a connection quiet this long may be closed to make room for a new one


def shed_idle(ix: Interceptor) -> bool:
    """Close the oldest idle connection (keep-alive between requests, quiet tunnel).

    Returns whether one was closed (its slot comes back as soon as its task ends).
    """
    now = trio.current_time()
    oldest: FlowRecord | None = None
    for record in ix._open:
        if (
            record.idle_since is not None
            and now - record.idle_since >= _IDLE_TO_SHED
            and (oldest is None or record.idle_since < (oldest.idle_since or now))
        ):
            oldest = record
    if oldest is None:
        return False
    scope = ix._open.pop(oldest)
    oldest.reason = "shed_idle"
    ix.stats.shed_idle += 1
    scope.cancel()
    return True


async def refuse_busy(ix: Interceptor, stream: trio.SocketStream) -> None:
    """``503`` at once for a client that finds every connection slot taken (issue 15 fault 5)."""
    ix.stats.refused_busy += 1
    try:
        with trio.move_on_after(1.0):
            await send_simple(stream, 503, b"Service Unavailable")
    finally:
        await close(stream)
