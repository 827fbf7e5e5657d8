"""``relay_for(kind)``: the relays of decrypted traffic, and what each one is given.

A relay is an async function that takes a :class:`RelayJob` (the two decrypted streams, what
hooks are told, the callbacks for STS and blocks, the byte counters) and returns a
:class:`RelayOutcome` when the connection is done. The flow picks the relay the plan named
(:mod:`.plan`) from :data:`RELAYS`; HTTP/1.1 and splice are built in, and the HTTP/2 and WebSocket
relays register themselves here::

    RELAYS.register(RelayKind.H2, run_h2_relay)

Registering a relay changes what the plan offers: ``h2, http/1.1`` upstream once an HTTP/2
relay is registered, the WebSocket relay after a ``101`` once that one is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import trio

from .._scan import ScanSettings
from .._websocket import DEFAULT_MAX_MESSAGE
from .h1 import BlockAnswer, HttpRelay, StsCallback, Switched, run_relay
from .hooks import FlowInfo, Hooks, Request
from .plan import RelayKind, SpliceReason, relay_after_upgrade
from .scanning import ScanCallback, log_decision
from .splice import splice
from .state import FlowRecord

__all__ = [
    "RELAYS",
    "Relay",
    "RelayJob",
    "RelayOutcome",
    "RelayRegistry",
    "relay_for",
    "run_relays",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayJob:
    """Everything a relay of decrypted traffic is given.

    Attributes:
        client: the decrypted stream to the client.
        upstream: the decrypted stream to the origin.
        flow: what hooks are told about this connection.
        hooks: the embedder's hooks.
        on_sts: called with the Strict-Transport-Security values of each response; ``None``
            when STS must not be recorded (RFC 6797 §8.1).
        answer_block: turns a hook's block into the redirect to the error origin.
        idle_timeout: seconds without progress before the relay gives up.
        head_timeout: seconds from a request head's first byte to its end (total).
        should_stop: ``True`` once the interceptor shuts down (finish the exchange, then end).
        stopping: set when the interceptor shuts down, for relays that wait for it instead of
            polling ``should_stop`` (a WebSocket is closed with 1001 at once).
        record: the connection's record; relays add the bytes they move.
        keep_upstream_alive: the upstream may be pooled after a clean end.
        to_upstream: bytes already read from the client, not yet relayed.
        to_client: bytes already read from the origin, not yet relayed.
        upgrade: the exchange that ended with ``101`` (for the WebSocket relay).
        websocket_max_message: the largest WebSocket message, after reassembly and inflation.
        scan: the content scanners; a relay of HTTP holds every body until they answer
            (:mod:`.scanning`), ``None`` when nothing is scanned.
        on_scan: called with the report of every scanned body.
        open_upstream: opens another verified HTTP/1.1 connection to the same origin (the
            HTTP/2 relay's concurrent streams to an HTTP/1.1 origin); ``None``: none.
    """

    client: trio.abc.Stream
    upstream: trio.abc.Stream
    flow: FlowInfo
    hooks: Hooks
    on_sts: StsCallback | None
    answer_block: BlockAnswer
    idle_timeout: float
    should_stop: Callable[[], bool]
    record: FlowRecord
    head_timeout: float = 10.0
    keep_upstream_alive: bool = False
    to_upstream: bytes = b""
    to_client: bytes = b""
    upgrade: Switched | None = None
    on_exchange: Callable[[Request, int, float], None] | None = None
    websocket_max_message: int = DEFAULT_MAX_MESSAGE
    stopping: trio.Event | None = None
    scan: ScanSettings | None = None
    on_scan: ScanCallback = log_decision
    open_upstream: Callable[[], Awaitable[trio.abc.Stream]] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayOutcome:
    """How a relay ended.

    Attributes:
        upstream_reusable: the upstream connection is at a clean boundary and may be pooled.
        keep_alive_hint: the server's ``Keep-Alive: timeout``, if it sent one.
        switched: the relay ended with ``101 Switching Protocols``; another relay takes over.
    """

    upstream_reusable: bool = False
    keep_alive_hint: float | None = None
    switched: Switched | None = None


Relay = Callable[[RelayJob], Awaitable[RelayOutcome]]


async def run_h1(job: RelayJob) -> RelayOutcome:
    """HTTP/1.1 through h11 (:class:`~tlsmitm._relay.h1.HttpRelay`)."""
    relay = HttpRelay(
        client=job.client,
        upstream=job.upstream,
        flow=job.flow,
        hooks=job.hooks,
        on_sts=job.on_sts,
        answer_block=job.answer_block,
        idle_timeout=job.idle_timeout,
        head_timeout=job.head_timeout,
        record=job.record,
        should_stop=job.should_stop,
        on_exchange=job.on_exchange,
        initial_client_data=job.to_upstream,
        keep_upstream_alive=job.keep_upstream_alive,
        scan=job.scan,
        on_scan=job.on_scan,
    )
    try:
        switched = await run_relay(relay)
    finally:
        job.record.bytes_up += relay.counters.bytes_up
        job.record.bytes_down += relay.counters.bytes_down
        job.record.requests += relay.counters.requests
    if isinstance(switched, Switched):
        return RelayOutcome(switched=switched)
    return RelayOutcome(
        upstream_reusable=relay.upstream_reusable, keep_alive_hint=relay.keep_alive_hint
    )


async def run_splice(job: RelayJob) -> RelayOutcome:
    """Raw bytes both ways (:func:`~tlsmitm._relay.splice.splice`)."""
    await splice(
        job.client,
        job.upstream,
        job.record,
        idle_timeout=job.idle_timeout,
        to_upstream=job.to_upstream,
        to_client=job.to_client,
    )
    return RelayOutcome()


class RelayRegistry:
    """Relays by :class:`~tlsmitm._relay.plan.RelayKind`; HTTP/1.1 and splice built in."""

    def __init__(self) -> None:
        self._relays: dict[RelayKind, Relay] = {RelayKind.H1: run_h1, RelayKind.SPLICE: run_splice}

    def register(self, kind: RelayKind, relay: Relay) -> None:
        """Use ``relay`` for ``kind`` from now on (replacing any before it)."""
        if not isinstance(kind, RelayKind):
            raise TypeError(f"kind must be a RelayKind, not {kind!r}")
        self._relays[kind] = relay

    def unregister(self, kind: RelayKind) -> None:
        """Stop using a registered relay (the built-in ones stay)."""
        if kind not in (RelayKind.H1, RelayKind.SPLICE):
            self._relays.pop(kind, None)

    def available(self) -> frozenset[RelayKind]:
        """The kinds with a relay: what the plan may choose."""
        return frozenset(self._relays)

    def relay_for(self, kind: RelayKind) -> Relay:
        """The relay for ``kind``.

        Raises:
            LookupError: no relay is registered for ``kind`` (the plan never names one).
        """
        try:
            return self._relays[kind]
        except KeyError:
            raise LookupError(f"no relay registered for {kind.value}") from None


RELAYS = RelayRegistry()


def relay_for(kind: RelayKind) -> Relay:
    """The relay registered for ``kind`` in :data:`RELAYS`."""
    return RELAYS.relay_for(kind)


async def run_relays(
    job: RelayJob,
    kind: RelayKind,
    splice_reason: SpliceReason | None,
    *,
    spliced: dict[str, int],
) -> RelayOutcome:
    """Run the relay for ``kind``, then, after a ``101``, the one for the new protocol.

    Each relay (and each splice, with its reason) is noted in ``job.record`` for the decision
    log; ``spliced`` counts splices by reason (``InterceptorStats.spliced``).
    """
    while True:
        job.record.relayed_by(kind, splice_reason)
        if splice_reason is not None:
            spliced[splice_reason.value] = spliced.get(splice_reason.value, 0) + 1
        outcome = await relay_for(kind)(job)
        switched = outcome.switched
        if switched is None:
            return outcome
        kind, splice_reason = relay_after_upgrade(
            switched.request.headers if switched.request else (),
            switched.response.headers if switched.response else (),
            RELAYS.available(),
        )
        job = replace(
            job,
            to_upstream=switched.to_upstream,
            to_client=switched.to_client,
            upgrade=switched,
            keep_upstream_alive=False,
        )
