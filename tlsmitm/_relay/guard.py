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
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import secrets
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .._names import ip_address_of

__all__ = ["ClientSlots", "ErrorBoundary", "LoopGuard", "is_local_address"]

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

    def report(self, exc: BaseException, *, client: str, where: str = "handling") -> None:
        """Record that ``exc`` ended a connection from ``client``; never raises."""
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

    def try_acquire(self, address: str) -> bool:
        """Take a slot for ``address``; ``False`` when it already holds ``limit``."""
        count = self._open.get(address, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        """Give back a slot taken by :meth:`try_acquire`."""
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)
