"""What a scanner is given and what it answers, and how several answers become one decision.

Pure: no trio, no I/O. The scanners themselves (:mod:`._icap_client`, :mod:`._clamd`) and the
driver that feeds them (:mod:`._inspect`) live next door.
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

__all__ = [
    "Clean",
    "FailureMode",
    "Infected",
    "Replaced",
    "ScanContext",
    "ScanDecision",
    "ScanFailed",
    "ScanVerdict",
    "Scanner",
    "decide",
]

Headers = tuple[tuple[bytes, bytes], ...]

_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanContext:
    """The exchange a body belongs to: what a scanner may know besides the bytes.

    Attributes:
        direction: ``"response"`` (a body from the origin: ICAP RESPMOD) or ``"request"`` (an
            upload: ICAP REQMOD).
        host: the normalised host name the client reached.
        port: the upstream port.
        client: ``"ip:port"`` of the downstream client.
        method: the request method.
        target: the request target (origin-form path and query).
        request_headers: the request's header fields as sent upstream.
        status: the response status (0 for a request body).
        reason: the response reason phrase (empty for a request body).
        response_headers: the response's header fields (empty for a request body).

    The body handed to :meth:`Scanner.scan` is already *decoded* (no ``Content-Encoding``);
    the headers are the ones of the original message, ``Content-Encoding`` included.
    """

    direction: str
    host: str
    port: int
    client: str = ""
    method: bytes = b"GET"
    target: bytes = b"/"
    request_headers: Headers = ()
    status: int = 0
    reason: bytes = b""
    response_headers: Headers = ()

    def __post_init__(self) -> None:
        if self.direction not in ("request", "response"):
            raise ValueError(
                f"ScanContext.direction must be 'request' or 'response', not {self.direction!r}"
            )
        if self.direction == "response" and not 100 <= self.status <= 999:
            raise ValueError(f"ScanContext.status must be an HTTP status, not {self.status!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Clean:
    """The scanner looked at the whole body and found nothing."""

    scanner: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Infected:
    """The scanner found a threat; ``threat`` is its name as the engine reports it."""

    scanner: str
    threat: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Replaced:
    """The scanner answered with content of its own (a cleaned body or its own block page).

    The client receives this response instead of the origin's (RFC 3507 §4.8: an ICAP server
    may modify the encapsulated message). ``body`` is unencoded.
    """

    scanner: str
    status: int
    reason: bytes
    headers: Headers
    body: bytes

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 999:
            raise ValueError(f"Replaced.status must be an HTTP status, not {self.status!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanFailed:
    """The scanner could not give a verdict -- never read as clean.

    Attributes:
        scanner: the scanner's name.
        reason: a stable code: ``"unreachable"``, ``"timeout"``, ``"too_large"``,
            ``"protocol"``, ``"engine_error"``, ``"decompression_bomb"``, ``"bad_encoding"``...
        detail: a human-readable explanation for logs.
    """

    scanner: str
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if not _REASON.fullmatch(self.reason):
            raise ValueError(f"ScanFailed.reason must be a lower-case identifier: {self.reason!r}")


ScanVerdict = Clean | Infected | Replaced | ScanFailed


class Scanner(abc.ABC):
    """A content scanner: an engine that judges a whole body.

    Implement :meth:`scan`; :meth:`open` and :meth:`aclose` are called once around the scanner's
    use (the proxy opens every scanner at start-up, and a failure there is logged, not fatal: a
    scanner that is down gives :class:`ScanFailed` verdicts until it is back).

    A scanner must never answer :class:`Clean` for a body it did not see whole: if it stops
    early (a size limit, an error), it answers :class:`ScanFailed`.

    Attributes:
        name: a short name for logs and block pages (``"clamd"``, ``"icap"``).
    """

    name: str = "scanner"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect and learn the engine's parameters (ICAP OPTIONS, clamd PING/VERSION)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def scan(self, context: ScanContext, body: AsyncIterator[bytes]) -> ScanVerdict:
        """Judge the decoded body that ``body`` yields, chunk by chunk.

        The scanner may return before ``body`` is exhausted (an early verdict); it must not
        raise for an engine failure (return :class:`ScanFailed`). Cancellation (the proxy's
        timeout, or a body over the size limit) may arrive at any await.
        """


class FailureMode(enum.Enum):
    """What happens when a scanner cannot give a verdict (``--scan-failure``)."""

    CLOSED = "closed"  #: block the body (the default)
    OPEN = "open"  #: deliver it unscanned, and log that


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanDecision:
    """The decision for one body, from every scanner's verdict.

    Attributes:
        action: ``"deliver"`` (the original bytes), ``"block"`` (a block page on the error
            origin) or ``"replace"`` (``replacement`` instead of the origin's response).
        verdicts: every scanner's verdict, for the log.
        threat: the threat's name when a scanner found one.
        failure: the first :class:`ScanFailed` when the decision rests on a failure (a block
            under ``closed``, an unscanned delivery under ``open``).
        replacement: the content to send for ``"replace"``.
    """

    action: str
    verdicts: tuple[ScanVerdict, ...]
    threat: str | None = None
    failure: ScanFailed | None = None
    replacement: Replaced | None = None

    @property
    def summary(self) -> str:
        """One token for the decision log: ``clean``, ``infected``, ``replaced``,
        ``failed_blocked`` or ``failed_open``."""
        if self.threat is not None:
            return "infected"
        if self.failure is not None:
            return "failed_blocked" if self.action == "block" else "failed_open"
        if self.action == "replace":
            return "replaced"
        return "clean"


def decide(verdicts: Sequence[ScanVerdict], mode: FailureMode) -> ScanDecision:
    """Combine the verdicts of every scanner on one body.

    Any threat blocks. Otherwise any failure is handled by ``mode``. Otherwise the first
    replacement is served; with only clean verdicts the body is delivered. No verdict at all
    (no scanner) delivers.
    """
    kept = tuple(verdicts)
    for verdict in kept:
        if isinstance(verdict, Infected):
            return ScanDecision(action="block", verdicts=kept, threat=verdict.threat)
    replacement = next((v for v in kept if isinstance(v, Replaced)), None)
    failure = next((v for v in kept if isinstance(v, ScanFailed)), None)
    if failure is not None:
        if mode is FailureMode.CLOSED:
            return ScanDecision(action="block", verdicts=kept, failure=failure)
        if replacement is None:
            return ScanDecision(action="deliver", verdicts=kept, failure=failure)
        return ScanDecision(
            action="replace", verdicts=kept, failure=failure, replacement=replacement
        )
    if replacement is not None:
        return ScanDecision(action="replace", verdicts=kept, replacement=replacement)
    return ScanDecision(action="deliver", verdicts=kept)
