"""The states of one connection, and what it has learned so far for its decision-log record.

The flow moves a :class:`FlowRecord` through :class:`FlowState` with :meth:`FlowRecord.enter`;
the allowed moves are a table (:data:`TRANSITIONS`), so a step taken out of order is a bug that
shows at once instead of a connection in an unknown state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from .._policy import ConnectionRecord
from .._responder import client_identity
from .plan import Decision, RelayKind, SpliceReason

__all__ = ["TRANSITIONS", "FlowRecord", "FlowState"]


class FlowState(enum.Enum):
    """Where one connection is."""

    ACCEPTED = "accepted"  # nothing read yet
    PEEKING = "peeking"  # reading the ClientHello, consuming nothing
    DECIDING = "deciding"  # the policy: intercept or bypass
    UPSTREAM = "upstream"  # dialling, the upstream handshake, verification
    HANDSHAKING = "handshaking"  # the plan is made; the client handshake with our leaf
    RELAYING = "relaying"  # a relay that parses the protocol (HTTP/1.1, h2, WebSocket)
    SPLICING = "splicing"  # raw bytes both ways
    ERROR_PAGE = "error_page"  # answering the first request with the error-origin redirect
    ERROR_ORIGIN = "error_origin"  # serving https://error.invalid/ itself
    PLAIN_HTTP = "plain_http"  # absolute-form http:// proxying
    CLOSED = "closed"


_S = FlowState
TRANSITIONS: Final[dict[FlowState, frozenset[FlowState]]] = {
    _S.ACCEPTED: frozenset({_S.PEEKING, _S.ERROR_ORIGIN, _S.PLAIN_HTTP}),
    _S.PEEKING: frozenset({_S.PEEKING, _S.DECIDING, _S.SPLICING, _S.ERROR_ORIGIN}),
    _S.DECIDING: frozenset({_S.UPSTREAM, _S.SPLICING}),
    _S.UPSTREAM: frozenset({_S.HANDSHAKING, _S.SPLICING}),
    _S.HANDSHAKING: frozenset({_S.RELAYING, _S.SPLICING, _S.ERROR_PAGE}),
    _S.RELAYING: frozenset({_S.RELAYING, _S.SPLICING}),
    _S.SPLICING: frozenset(),
    _S.ERROR_PAGE: frozenset(),
    _S.ERROR_ORIGIN: frozenset(),
    _S.PLAIN_HTTP: frozenset({_S.RELAYING, _S.SPLICING}),
    _S.CLOSED: frozenset(),
}
"""The moves :meth:`FlowRecord.enter` allows (any state may also move to ``CLOSED``)."""


@dataclass(eq=False)
class FlowRecord:
    """What one connection has learned so far, for its decision-log record."""

    client: str
    started: datetime
    state: FlowState = FlowState.ACCEPTED
    host: str | None = None
    port: int = 0
    decision: Decision = Decision.ERROR
    reason: str = "incomplete"
    verdict: str | None = None
    relay: RelayKind | None = None
    splice_reason: SpliceReason | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_pooled: bool = False  # the upstream connection outlives this one, in the pool
    # trio.current_time() since when the connection waits for a client's next request or its
    # tunnel is quiet; None while it is busy. The oldest idle one is shed first near the cap.
    idle_since: float | None = None
    user: str | None = None  # the authenticated proxy user, when proxy authentication is on
    scan: str | None = None  # the most severe outcome of the scanned bodies (SCAN_RESULTS)
    scan_ms: float | None = None  # the scanners' time on this connection's bodies
    # For the metrics (read once, when the connection closes; never on the hot path):
    requests: int = 0  # HTTP requests relayed (by the relay in ``relay``)
    upstream_handshake_s: float | None = None  # upstream TLS handshake and verification
    client_handshake_s: float | None = None  # the client's TLS handshake with our leaf
    hsts_known: bool = False  # the host was a known HSTS host when its action was planned
    connection_id: str | None = None  # unique within this process (JSON logs' "conn")
    duration_ms: float | None = None  # set when the connection closed

    @property
    def identity(self) -> str:
        """Whom override grants of this connection are bound to (the user, else the address)."""
        return client_identity(self.client.rpartition(":")[0], user=self.user)

    def enter(self, state: FlowState) -> None:
        """Move to ``state``.

        Raises:
            RuntimeError: the move is not in :data:`TRANSITIONS` (a bug in the flow).
        """
        if state is not FlowState.CLOSED and state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"flow state {self.state.value} cannot move to {state.value}")
        self.state = state

    def decide(self, decision: Decision, reason: str) -> None:
        """Set the decision-log decision and reason."""
        self.decision, self.reason = decision, reason

    def end_with(self, reason: str) -> bool:
        """The connection ended with the error ``reason``; ``True`` when that is its record's
        reason (and so an error to count).

        Two ends keep the reason the connection had: a block (``scan_infected``,
        ``scan_failed``...: the client leaving afterwards changes nothing about why it was
        blocked), and a ``connection_lost`` of an HTTP relay waiting for the client's next
        request (``idle_since`` set): the client closing or resetting its connection between
        complete exchanges ended it normally. A loss in the middle of an exchange is
        ``connection_lost``.
        """
        if self.decision is Decision.BLOCK:
            return False
        between_exchanges = self.state is FlowState.RELAYING and self.idle_since is not None
        if reason == "connection_lost" and between_exchanges:
            return False
        self.reason = reason
        return True

    def relayed_by(self, relay: RelayKind, splice_reason: SpliceReason | None = None) -> None:
        """Note which relay carries the decrypted bytes (and why, for a splice)."""
        self.enter(FlowState.SPLICING if relay is RelayKind.SPLICE else FlowState.RELAYING)
        self.relay, self.splice_reason = relay, splice_reason

    def to_record(self) -> ConnectionRecord:
        """The decision-log record of this connection."""
        return ConnectionRecord(
            time=self.started,
            client=self.client,
            host=self.host,
            port=self.port,
            decision=self.decision.value,
            reason=self.reason,
            verdict=self.verdict,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            relay=None if self.relay is None else self.relay.value,
            splice=None if self.splice_reason is None else self.splice_reason.value,
            scan=self.scan,
            scan_ms=None if self.scan_ms is None else round(self.scan_ms, 1),
            duration_ms=self.duration_ms,
            connection_id=self.connection_id,
        )
