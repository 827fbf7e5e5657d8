"""State calls off the event loop: HSTS reads from the per-worker cache, writes in a thread.

Every connection asks whether its host is a Known HSTS Host. When the answer is in memory (the
preload list, or a :class:`~tlsmitm.CachedStore` entry fetched less than its ``ttl`` ago) it is
given at once on the event loop; otherwise the store is asked from a worker thread
(``trio.to_thread``), so an SQLite ``fsync`` or a Redis round trip never stalls the other
connections of this worker. :func:`prefetch_state` gathers a connection's reads (learned bypasses,
HSTS entries) into one such thread hop, before the policy decides.

Writes (``Strict-Transport-Security`` observations) are queued to :class:`StateWriter`, whose one
task runs them in a thread, in order. The response they came with is never held back by them,
and a failing store costs nothing but the write (the cache keeps the knowledge in memory).
What an STS observation teaches is known at once all the same: :meth:`StateWriter.observe_sts`
notes the host in memory before queueing the write, so a connection that starts while the write
is still queued already finds a Known HSTS Host (RFC 6797 §12.1: no override for it).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import trio

from .._hsts import UNANSWERED, HstsStore, parse_sts
from .._names import is_ip_literal, try_normalize_host

if TYPE_CHECKING:
    from .interceptor import Interceptor

__all__ = ["StateWriter", "hsts_known", "prefetch_state"]

log = logging.getLogger("tlsmitm.state")

_QUEUE = 1024  # pending writes; past that a write runs inline (the loop pays, nothing is lost)
_RECENT_STS_SECONDS = 120.0  # how long an observation is known from memory (the write is long done)
_RECENT_STS_HOSTS = 4096
_SETTLE_SECONDS = 5.0  # longest a connection waits for its host's queued STS writes


async def hsts_known(ix: Interceptor, name: str, now: datetime) -> bool:
    """Whether ``name`` is a Known HSTS Host: from memory when possible, else from a thread."""
    if ix.state_writer.recently_known(name, now):
        return True
    # An STS write for this host still queued (a max-age=0, say) would change the answer.
    await ix.state_writer.settled(name)
    answer = ix.hsts.known_host_nowait(name, now=now)
    if answer is UNANSWERED:
        answer = await trio.to_thread.run_sync(functools.partial(ix.hsts.known_host, name, now=now))
    return answer is not None


async def prefetch_state(
    ix: Interceptor,
    client_ip: str,
    hosts: Sequence[str],
    port: int,
    hsts_host: str | None,
    now: datetime,
) -> None:
    """Fetch, in *one* thread hop, what this connection is about to read from the store.

    That is the learned bypasses :meth:`~tlsmitm.InterceptPolicy.decide` reads for each of
    ``hosts`` and the HSTS entries :func:`hsts_known` later reads
    for ``hsts_host``. A new name otherwise costs three hops (two policy lookups, one HSTS read),
    each a pair of thread wake-ups; here they share one. Nothing is decided here: the readers
    still ask the cache, and a read whose entry is stale by then (older than the cache's
    ``ttl``) goes to the store again. The HSTS part is left out when the answer is known from
    memory, when an STS write for the host is queued (:func:`hsts_known` waits for it first), and
    for stores without a cache.
    """
    reads: list[Callable[[], object]] = []
    store = ix.policy.store
    peek = getattr(store, "peek_many", None)
    if peek is not None:
        for host in dict.fromkeys(hosts):
            try:
                lookups = ix.policy.learned_lookups(client_ip=client_ip, host=host, port=port)
            except ValueError:
                continue  # decide() raises the same, with the error the caller handles
            for namespace, key in lookups:
                if peek(namespace, [key]) is None:
                    get_many = store.get_many  # type: ignore[attr-defined]
                    reads.append(functools.partial(get_many, namespace, [key]))
    if (
        hsts_host is not None
        and getattr(ix.hsts.store, "peek_many", None) is not None
        and not ix.state_writer.pending_for(hsts_host)
        and not ix.state_writer.recently_known(hsts_host, now)
        and ix.hsts.known_host_nowait(hsts_host, now=now) is UNANSWERED
    ):
        reads.append(functools.partial(ix.hsts.known_host, hsts_host, now=now))
    if not reads:
        return
    if len(reads) == 1:
        await trio.to_thread.run_sync(reads[0])
        return

    def read_all() -> None:
        for read in reads:
            read()

    await trio.to_thread.run_sync(read_all)


_Queued = tuple[Callable[[], object], str | None]  # a write, and the host of an STS write


class StateWriter:
    """Runs queued state writes in a thread, one at a time, in order."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[_Queued](_QUEUE)
        self._running = False
        self.written = 0
        self._pending: dict[str, int] = {}  # host -> its STS writes queued or running
        self._progress = trio.Event()  # set (and replaced) after every queued write
        # Host -> (until, includeSubDomains) for STS observed here, whether or not written yet.
        self._recent_sts: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    def observe_sts(
        self, hsts: HstsStore, host: str, values: Sequence[bytes], *, now: datetime
    ) -> None:
        """Queue the observation of a verified response's STS headers; know it at once.

        Only the first header counts (RFC 6797 §8.1), never for an IP literal (§8.1.1); a
        ``max-age=0`` drops the in-memory note (the store drops the host when it gets there).
        """
        policy = parse_sts(values[0]) if values else None
        name = try_normalize_host(host)
        localhost = name is not None and (name == "localhost" or name.endswith(".localhost"))
        if policy is not None and name is not None and not is_ip_literal(name) and not localhost:
            if policy.max_age == 0:
                self._recent_sts.pop(name, None)
            else:
                seconds = min(float(policy.max_age), _RECENT_STS_SECONDS)
                self._recent_sts[name] = (now.timestamp() + seconds, policy.include_subdomains)
                self._recent_sts.move_to_end(name)
                while len(self._recent_sts) > _RECENT_STS_HOSTS:
                    self._recent_sts.popitem(last=False)
        self.submit(
            functools.partial(hsts.observe, host, list(values), now=now, secure_and_verified=True),
            host=name,
        )

    def pending_for(self, host: str) -> bool:
        """Whether an STS write for ``host`` or a parent domain is queued or running."""
        if not self._pending:
            return False
        name = try_normalize_host(host)
        if name is None:
            return False
        labels = name.split(".")
        return any(".".join(labels[i:]) in self._pending for i in range(len(labels)))

    async def settled(self, host: str) -> None:
        """Wait (at most :data:`_SETTLE_SECONDS`) until no STS write for ``host`` or a parent
        domain is queued or running."""
        if not self._pending:
            return
        name = try_normalize_host(host)
        if name is None:
            return
        labels = name.split(".")
        with trio.move_on_after(_SETTLE_SECONDS):
            while any(".".join(labels[i:]) in self._pending for i in range(len(labels))):
                await self._progress.wait()

    def recently_known(self, host: str, now: datetime) -> bool:
        """Did an STS header observed in the last minutes make ``host`` a Known HSTS Host?"""
        if not self._recent_sts:
            return False
        name = try_normalize_host(host)
        if name is None:
            return False
        stamp = now.timestamp()
        labels = name.split(".")
        for index in range(len(labels)):
            entry = self._recent_sts.get(".".join(labels[index:]))
            if entry is not None and entry[0] > stamp and (index == 0 or entry[1]):
                return True
        return False

    def submit(self, write: Callable[[], object], *, host: str | None = None) -> None:
        """Queue ``write``; runs it at once when no :meth:`run` task is serving the queue.

        ``host``: the write is an STS observation for it (:meth:`settled` waits for it).
        """
        if self._running:
            try:
                self._send.send_nowait((write, host))
                if host is not None:
                    self._pending[host] = self._pending.get(host, 0) + 1
                return
            except trio.WouldBlock:
                log.warning("state writes are queued faster than the store takes them")
        self._call(write)

    def _call(self, write: Callable[[], object]) -> None:
        try:
            write()
        except Exception:  # a store failure is CachedStore's to report; anything else, log once
            log.exception("a state write failed")
        self.written += 1

    def _finished(self, host: str | None) -> None:
        if host is not None:
            left = self._pending.pop(host, 1) - 1
            if left > 0:
                self._pending[host] = left
        self._progress.set()
        self._progress = trio.Event()

    async def run(self) -> None:
        """Serve the queue until cancelled; then finish what is queued (in a shielded scope)."""
        self._running = True
        try:
            async for write, host in self._receive:
                await trio.to_thread.run_sync(self._call, write)
                self._finished(host)
        finally:
            self._running = False
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                while True:
                    try:
                        write, host = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    await trio.to_thread.run_sync(self._call, write)
                    self._finished(host)
