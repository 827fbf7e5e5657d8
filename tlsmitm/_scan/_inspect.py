"""The driver between a relay and its scanners: hold a body, decode it, fan it out, decide.

Theory of operation
-------------------
A relay that has a response (or, with ``--scan-requests``, a request) body to deliver opens a
:class:`BodyInspection` and feeds it the body's bytes *as received* (after transfer decoding,
still content-encoded). Each piece is

1. appended to a :class:`~._spool.SpooledBody` (memory up to a bound, then a private file): the
   client will receive exactly these bytes, and only after the verdict;
2. decoded (:class:`~._decode.BodyDecoder`: gzip, deflate, br, zstd) and sent to every
   scanner's task through its own small channel (backpressure: the slowest scanner paces the
   download, memory stays bounded).

Every scanner runs in its own task under the per-scan timeout, and may answer before the body
ends (an ICAP server after the preview; clamd past its size limit). A decoded body over
``max_bytes``, a decompression bomb or an undecodable body ends every scan that is still
running with :class:`~._model.ScanFailed`. :attr:`BodyInspection.settled` tells the relay that
the decision can no longer change (a threat was found, or a failure blocks), so it may stop
reading; :meth:`BodyInspection.finish` waits for every verdict and returns the
:class:`~._model.ScanDecision`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .._errors import UpstreamError
from ._decode import BodyDecoder, DecodeLimits, parse_content_encoding
from ._model import (
    FailureMode,
    Infected,
    ScanContext,
    ScanDecision,
    ScanFailed,
    Scanner,
    ScanVerdict,
    decide,
)
from ._spool import SpooledBody

__all__ = ["BodyInspection", "ScanSettings", "open_inspection"]

_CHANNEL_DEPTH = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanSettings:
    """How bodies are scanned (the ``--scan*`` options).

    Attributes:
        scanners: every scanner a body goes to; a body is blocked when any finds something.
        failure: what a failure to scan leads to (``--scan-failure``).
        max_bytes: decoded bytes sent to scanners; a larger body "could not be scanned"
            (``--scan-max-bytes``).
        timeout: seconds a scan may take, from the body's first byte (``--scan-timeout``).
        scan_requests: also scan request bodies (``--scan-requests``).
        memory_limit: bytes of a held body kept in memory before it is spooled to a file.
        spool_dir: where spool files are made (default: the system's temp directory).
        decode_limits: decompression-bomb bounds.
    """

    scanners: tuple[Scanner, ...]
    failure: FailureMode = FailureMode.CLOSED
    max_bytes: int = 64 * 1024 * 1024
    timeout: float = 60.0
    scan_requests: bool = False
    memory_limit: int = 1024 * 1024
    spool_dir: Path | None = None
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError("ScanSettings.max_bytes must be positive")
        if not self.timeout > 0:
            raise ValueError("ScanSettings.timeout must be positive")
        if self.memory_limit < 0:
            raise ValueError("ScanSettings.memory_limit must not be negative")


@dataclass(slots=True)
class _Lane:
    scanner: Scanner
    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    verdict: ScanVerdict | None = None
    seconds: float = 0.0


@asynccontextmanager
async def open_inspection(
    settings: ScanSettings, context: ScanContext, content_encoding: Sequence[bytes] = ()
) -> AsyncIterator[BodyInspection]:
    """A :class:`BodyInspection` whose scanner tasks live as long as the ``async with`` block.

    The held body (:attr:`BodyInspection.spool`) is dropped when the block ends: deliver it
    inside. Leaving the block before :meth:`BodyInspection.finish` cancels the scans.
    """
    inspection = BodyInspection(settings, context, content_encoding)
    try:
        async with trio.open_nursery() as nursery:
            inspection._start(nursery)
            try:
                yield inspection
            finally:
                if inspection.decision is None:
                    nursery.cancel_scope.cancel()
                for lane in inspection._lanes:
                    lane.send.close()
    finally:
        await inspection.spool.aclose()


class BodyInspection:
    """One body on its way through the scanners (made by :func:`open_inspection`).

    Args:
        settings: the scan settings.
        context: the exchange the body belongs to.
        content_encoding: the message's ``Content-Encoding`` field values.
    """

    def __init__(
        self,
        settings: ScanSettings,
        context: ScanContext,
        content_encoding: Sequence[bytes] = (),
    ) -> None:
        self.settings = settings
        self.context = context
        self.spool = SpooledBody(settings.memory_limit, settings.spool_dir)
        self._codings = parse_content_encoding(list(content_encoding))
        self._decoder: BodyDecoder | None = None
        self._lanes: list[_Lane] = []
        self._stopped: ScanFailed | None = None
        self.decoded_bytes = 0
        self.decision: ScanDecision | None = None

    def _start(self, nursery: trio.Nursery) -> None:
        for scanner in self.settings.scanners:
            send, receive = trio.open_memory_channel[bytes](_CHANNEL_DEPTH)
            lane = _Lane(scanner=scanner, send=send, receive=receive)
            self._lanes.append(lane)
            nursery.start_soon(self._run_lane, lane)
        try:
            self._decoder = BodyDecoder(self._codings, self.settings.decode_limits)
        except UpstreamError as exc:
            self._stop(exc.reason, str(exc))

    async def _run_lane(self, lane: _Lane) -> None:
        started = time.perf_counter()
        try:
            with lane.receive, lane.scope, trio.move_on_after(self.settings.timeout) as timer:
                verdict = await lane.scanner.scan(self.context, lane.receive)
                if lane.verdict is None:
                    lane.verdict = verdict
            if timer.cancelled_caught and lane.verdict is None:
                lane.verdict = ScanFailed(
                    scanner=lane.scanner.name,
                    reason="timeout",
                    detail=f"no verdict from {lane.scanner.name} in {self.settings.timeout} s",
                )
        finally:
            lane.seconds = time.perf_counter() - started
            lane.done.set()

    # -- feeding -----------------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """Whether the decision is already known whatever the rest of the body holds.

        A threat settles it at once. A failure under ``closed`` blocks too, but only settles it
        once no other scanner is still reading: one that goes on may yet name a threat, for
        the page and the log.
        """
        if self._stopped is not None:
            return True
        verdicts = [lane.verdict for lane in self._lanes]
        if any(isinstance(v, Infected) for v in verdicts):
            return True
        return (
            self.settings.failure is FailureMode.CLOSED
            and None not in verdicts
            and any(isinstance(v, ScanFailed) for v in verdicts)
        )

    async def feed(self, data: bytes) -> None:
        """The next bytes of the body, as received (still content-encoded)."""
        await self.spool.write(data)
        if self._stopped is not None or self._decoder is None:
            return
        try:
            decoded = self._decoder.feed(data)
        except UpstreamError as exc:
            self._stop(exc.reason, str(exc))
            return
        await self._fan_out(decoded)

    async def _fan_out(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.decoded_bytes += len(piece)
            if self.decoded_bytes > self.settings.max_bytes:
                self._stop(
                    "too_large", f"decoded body over --scan-max-bytes {self.settings.max_bytes}"
                )
                return
            for lane in self._lanes:
                if lane.verdict is not None:
                    continue
                # A scanner that answered without reading the rest closed its channel.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await lane.send.send(piece)

    def _stop(self, reason: str, detail: str) -> None:
        """End every scan still running: the body cannot be scanned whole."""
        self._stopped = ScanFailed(scanner="tlsmitm", reason=reason, detail=detail)
        for lane in self._lanes:
            if lane.verdict is None:
                lane.verdict = ScanFailed(scanner=lane.scanner.name, reason=reason, detail=detail)
                lane.scope.cancel()

    async def finish(self, *, complete: bool = True) -> ScanDecision:
        """The body ended (``complete``), or the relay stopped reading it because the decision
        was :attr:`settled`: wait for every verdict and decide.

        After this, :attr:`spool` holds the body to deliver, until the ``async with`` block
        ends.
        """
        if not complete:
            self._stop("incomplete", "the body was not read to its end")
        if self._stopped is None and self._decoder is not None:
            try:
                tail = self._decoder.finish()
            except UpstreamError as exc:
                self._stop(exc.reason, str(exc))
            else:
                await self._fan_out(tail)
        for lane in self._lanes:
            lane.send.close()
        for lane in self._lanes:
            await lane.done.wait()
        verdicts = [lane.verdict for lane in self._lanes if lane.verdict is not None]
        if self._stopped is not None and not self._lanes:
            verdicts = [self._stopped]
        self.decision = decide(verdicts, self.settings.failure)
        return self.decision

    @property
    def latencies(self) -> dict[str, float]:
        """Seconds each scanner took (for the decision log)."""
        return {lane.scanner.name: lane.seconds for lane in self._lanes}
