"""What one connection has learned so far: the material of its decision-log record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .._policy import ConnectionRecord

__all__ = ["FlowRecord"]


@dataclass
class FlowRecord:
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

    def to_record(self) -> ConnectionRecord:
        """The decision-log record of this connection."""
        return ConnectionRecord(
            time=self.started,
            client=self.client,
            host=self.host,
            port=self.port,
            decision=self.decision,
            reason=self.reason,
            verdict=self.verdict,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
        )
