"""Scanners in the exchange, whatever the protocol: which bodies, what they are told, how a
verdict is answered and logged.

The relays (HTTP/1.1 today) call :func:`response_context` / :func:`request_context` to describe
a body, hold it in a :func:`~tlsmitm._scan.open_inspection` until the verdict, and answer a
block with :func:`block_for` through the same error-origin redirect as every other block. Every
decision goes to the ``tlsmitm.scan`` logger as one line (:func:`log_decision`), with the
:class:`ScanReport` attached to the log record as ``scan_report``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._decisionlog import SCAN_RESULTS
from .._scan import ScanContext, ScanDecision, ScanFailed
from .hooks import Block, FlowInfo, Headers, Request, Response
from .plan import Decision

if TYPE_CHECKING:
    from .interceptor import InterceptorStats
    from .state import FlowRecord

__all__ = [
    "ScanCallback",
    "ScanReport",
    "block_for",
    "content_encoding",
    "log_decision",
    "note_scan",
    "request_context",
    "response_context",
    "response_has_body",
]

log = logging.getLogger("tlsmitm.scan")
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+-]")


def response_has_body(method: bytes, status: int) -> bool:
    """RFC 9110 §6.4.1: no content in answers to HEAD, in 1xx, 204 and 304."""
    return method != b"HEAD" and status >= 200 and status not in (204, 304)


def content_encoding(headers: Headers) -> list[bytes]:
    """Every ``Content-Encoding`` field value, in order."""
    return [v for k, v in headers if k.lower() == b"content-encoding"]


def response_context(flow: FlowInfo, request: Request, response: Response) -> ScanContext:
    """What scanners are told about a response body."""
    return ScanContext(
        direction="response",
        host=flow.host,
        port=flow.port,
        client=flow.client,
        method=request.method,
        target=request.target,
        request_headers=request.headers,
        status=response.status,
        reason=response.reason,
        response_headers=response.headers,
    )


def request_context(flow: FlowInfo, request: Request) -> ScanContext:
    """What scanners are told about a request body (an upload)."""
    return ScanContext(
        direction="request",
        host=flow.host,
        port=flow.port,
        client=flow.client,
        method=request.method,
        target=request.target,
        request_headers=request.headers,
    )


def block_for(decision: ScanDecision) -> Block:
    """The block page's words: the threat's name, or that the scan could not be done."""
    if decision.threat is not None:
        return Block(
            title="Threat blocked",
            explanation=f"This content contains {decision.threat} and was blocked.",
        )
    failure = decision.failure or ScanFailed(scanner="tlsmitm", reason="failed")
    return Block(
        title="Content could not be scanned",
        explanation=(
            f"The scan could not be done ({failure.reason.replace('_', ' ')}), "
            "so the content was blocked."
        ),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanReport:
    """One scanned body, for the log and the connection's record.

    Attributes:
        host: the host the exchange went to.
        direction: ``"response"`` or ``"request"``.
        decision: the combined decision.
        latencies: seconds each scanner took.
        size: bytes of the body as received (still content-encoded).
    """

    host: str
    direction: str
    decision: ScanDecision
    latencies: dict[str, float]
    size: int

    def line(self) -> str:
        """``key=value`` words for one log line (values without spaces)."""
        decision = self.decision
        words = [
            f"host={self.host}",
            f"direction={self.direction}",
            f"scan={decision.summary}",
            f"action={decision.action}",
            f"bytes={self.size}",
        ]
        if decision.threat is not None:  # named by the engine: never trusted to be clean text
            words.append(f"threat={_UNSAFE.sub('_', decision.threat)[:200]}")
        if decision.failure is not None:
            words.append(f"failure={decision.failure.reason}")
        for name, seconds in self.latencies.items():
            words.append(f"latency_ms[{_UNSAFE.sub('_', name)}]={seconds * 1000:.1f}")
        return " ".join(words)


ScanCallback = Callable[[ScanReport], None]


def log_decision(report: ScanReport) -> None:
    """One line on ``tlsmitm.scan``: INFO for clean and replaced, WARNING otherwise."""
    level = logging.INFO if report.decision.summary in ("clean", "replaced") else logging.WARNING
    if report.decision.failure is not None and report.decision.failure.detail:
        log.log(
            level,
            "%s detail=%r",
            report.line(),
            report.decision.failure.detail,
            extra={"scan_report": report},
        )
    else:
        log.log(level, "%s", report.line(), extra={"scan_report": report})


def note_scan(stats: InterceptorStats, record: FlowRecord, report: ScanReport) -> None:
    """A scanned body: logged, counted, and a block shows in the connection's record."""
    log_decision(report)
    stats.scanned += 1
    summary = report.decision.summary
    if record.scan is None or SCAN_RESULTS.index(summary) > SCAN_RESULTS.index(record.scan):
        record.scan = summary
    slowest = max(report.latencies.values(), default=0.0) * 1000
    record.scan_ms = (record.scan_ms or 0.0) + slowest
    if report.decision.action == "block":
        stats.scan_blocked += 1
        reason = "scan_infected" if summary == "infected" else "scan_failed"
        record.decide(Decision.BLOCK, reason)
    elif summary == "failed_open":
        stats.scan_unscanned += 1
