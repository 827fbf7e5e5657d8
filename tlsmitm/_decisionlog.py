"""The decision log: one structured record per connection, for audit and support.

A record says who connected where, whether tlsmitm intercepted, spliced, blocked or failed, why,
what the upstream certificate verdict was, and how many bytes went each way. It never holds a
URL, a header or any content: only what the TLS layer sees before the first byte of HTTP.

Records reach two places:

* the stdlib logger ``tlsmitm.decisions`` (or one the embedder passes), one INFO line per
  connection in a stable ``key=value`` format (:func:`format_record`), with the record itself
  attached to the ``logging.LogRecord`` as ``connection_record``. tlsmitm never configures
  logging: attach a handler to see the lines;
* subscribers (:meth:`DecisionLog.subscribe`), called synchronously with the record.

The line format is stable: the keys always appear, in this order::

    time=2026-05-09T07:35:25.123Z client=192.168.1.5:51234 host=bank.example port=443
    decision=bypass reason=rule verdict=- bytes_up=517 bytes_down=4096 duration_ms=120.5
    relay=- splice=- scan=- scan_ms=-

(one line; ``relay`` and ``splice`` were added after the others, then ``scan`` and ``scan_ms``).
An absent value is ``-``. A value made only of ``A-Z a-z 0-9 . _ : / @ + [ ] -`` is written
bare; any other value (including an empty one and a literal ``-``) is written as a JSON string in
double quotes with every control, non-ASCII and DEL character escaped, so a hostile host name
can neither add fields nor start a new line.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["ConnectionRecord", "DecisionLog", "format_record"]

DECISIONS = frozenset({"intercept", "bypass", "block", "error"})
_TOKEN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_BARE = re.compile(r"[A-Za-z0-9._:/@+\[\]-]+")
_FIELDS = (
    "time",
    "client",
    "host",
    "port",
    "decision",
    "reason",
    "verdict",
    "bytes_up",
    "bytes_down",
    "duration_ms",
    "relay",
    "splice",
    "scan",
    "scan_ms",
)
# The outcomes of scanned bodies, from the least to the most severe.
SCAN_RESULTS = ("clean", "replaced", "failed_open", "failed_blocked", "infected")
_RELAY = re.compile(r"[a-z0-9][a-z0-9./_-]{0,31}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"ConnectionRecord.{name} must be a non-negative int, not {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRecord:
    """What happened to one connection, without any content.

    Attributes:
        time: when the connection was accepted (aware).
        client: the client's ``ip:port`` (``[v6]:port`` for IPv6).
        host: the CONNECT host or SNI name, ``None`` if there was none.
        port: the destination port.
        decision: ``"intercept"``, ``"bypass"``, ``"block"`` or ``"error"``.
        reason: why, as a stable code (:attr:`tlsmitm.Decision.reason`, or the relay's own such
            as ``"upstream_unreachable"``).
        verdict: the upstream certificate verdict: ``"ok"``, a :class:`~tlsmitm.CertError`
            value such as ``"expired"``, or ``None`` when tlsmitm never verified (a bypass).
        bytes_up: application bytes from client to server.
        bytes_down: application bytes from server to client.
        duration_ms: how long the connection lasted, if known.
        relay: what carried the decrypted bytes: ``"http/1.1"``, ``"h2"``, ``"websocket"``,
            or ``"splice"`` (raw bytes); ``None`` when nothing was relayed decrypted (a bypass,
            a page, an error).
        splice: why decrypted bytes were spliced without inspection (``"not_http"``,
            ``"server_spoke_first"``, ``"alpn_without_relay"``, ``"upgrade_without_relay"``...);
            ``None`` when nothing decrypted was spliced.
        scan: the most severe outcome of the bodies scanned on this connection (``"clean"``,
            ``"replaced"``, ``"failed_open"``, ``"failed_blocked"`` or ``"infected"``); ``None``
            when no body went to the content scanners.
        scan_ms: milliseconds the scanners took on this connection's bodies (for each body,
            the slowest scanner), ``None`` when nothing was scanned.
        connection_id: the connection's id, unique within the process that handled it (the
            ``conn`` key of JSON logs); not part of the ``key=value`` line.
    """

    time: datetime
    client: str
    host: str | None
    port: int
    decision: str
    reason: str
    verdict: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float | None = None
    relay: str | None = None
    splice: str | None = None
    scan: str | None = None
    scan_ms: float | None = None
    connection_id: str | None = None

    def __post_init__(self) -> None:
        if self.connection_id is not None and not isinstance(self.connection_id, str):
            raise TypeError(
                f"ConnectionRecord.connection_id must be a str or None, not {self.connection_id!r}"
            )
        if not isinstance(self.time, datetime) or self.time.utcoffset() is None:
            raise ValueError(f"ConnectionRecord.time must be an aware datetime, not {self.time!r}")
        if not isinstance(self.client, str):
            raise TypeError(f"ConnectionRecord.client must be a str, not {self.client!r}")
        if self.host is not None and not isinstance(self.host, str):
            raise TypeError(f"ConnectionRecord.host must be a str or None, not {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TypeError(f"ConnectionRecord.port must be an int, not {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ConnectionRecord.port must be 0..65535, not {self.port}")
        if self.decision not in DECISIONS:
            raise ValueError(
                f"ConnectionRecord.decision must be one of {sorted(DECISIONS)}, "
                f"not {self.decision!r}"
            )
        if not isinstance(self.reason, str) or not _TOKEN.fullmatch(self.reason):
            raise ValueError(
                f"ConnectionRecord.reason must be a lower-case identifier, not {self.reason!r}"
            )
        verdict = self.verdict
        if isinstance(verdict, enum.Enum):  # accept a CertError and store its stable value
            verdict = verdict.value
            object.__setattr__(self, "verdict", verdict)
        if verdict is not None and (not isinstance(verdict, str) or not _TOKEN.fullmatch(verdict)):
            raise ValueError(
                f"ConnectionRecord.verdict must be 'ok', a CertError value or None, not {verdict!r}"
            )
        _check_count("bytes_up", self.bytes_up)
        _check_count("bytes_down", self.bytes_down)
        if self.duration_ms is not None:
            if isinstance(self.duration_ms, bool) or not isinstance(self.duration_ms, int | float):
                raise TypeError(
                    f"ConnectionRecord.duration_ms must be a number, not {self.duration_ms!r}"
                )
            if not math.isfinite(self.duration_ms) or self.duration_ms < 0:
                raise ValueError(
                    f"ConnectionRecord.duration_ms must be finite and >= 0, "
                    f"not {self.duration_ms!r}"
                )

        if self.relay is not None and (
            not isinstance(self.relay, str) or not _RELAY.fullmatch(self.relay)
        ):
            raise ValueError(f"ConnectionRecord.relay must be a protocol name, not {self.relay!r}")
        if self.splice is not None and (
            not isinstance(self.splice, str) or not _TOKEN.fullmatch(self.splice)
        ):
            raise ValueError(
                f"ConnectionRecord.splice must be a lower-case identifier, not {self.splice!r}"
            )

        if self.scan is not None and self.scan not in SCAN_RESULTS:
            raise ValueError(
                f"ConnectionRecord.scan must be one of {list(SCAN_RESULTS)}, not {self.scan!r}"
            )
        if self.scan_ms is not None and (
            isinstance(self.scan_ms, bool)
            or not isinstance(self.scan_ms, int | float)
            or not math.isfinite(self.scan_ms)
            or self.scan_ms < 0
        ):
            raise ValueError(
                f"ConnectionRecord.scan_ms must be a finite number >= 0, not {self.scan_ms!r}"
            )

    def as_dict(self) -> dict[str, str | int | float | None]:
        """The fields as plain JSON-ready values (``time`` as ISO 8601 UTC)."""
        return {
            "time": _time_text(self.time),
            "client": self.client,
            "host": self.host,
            "port": self.port,
            "decision": self.decision,
            "reason": self.reason,
            "verdict": self.verdict,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_ms": self.duration_ms,
            "relay": self.relay,
            "splice": self.splice,
            "scan": self.scan,
            "scan_ms": self.scan_ms,
        }


def _time_text(time: datetime) -> str:
    return time.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _value_text(value: str | int | float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    text = str(value)
    if text != "-" and _BARE.fullmatch(text):
        return text
    # JSON escapes '"', '\\', C0 controls and (ensure_ascii) everything above U+007F, including
    # U+2028/U+2029; DEL is ASCII, so escape it by hand.
    return json.dumps(text, ensure_ascii=True).replace("\x7f", "\\u007f")


def format_record(record: ConnectionRecord) -> str:
    """The record as one log line in the stable ``key=value`` format (see the module docs)."""
    fields = record.as_dict()
    return " ".join(f"{key}={_value_text(fields[key])}" for key in _FIELDS)


Subscriber = Callable[[ConnectionRecord], None]


class DecisionLog:
    """Writes one record per connection to a logger and hands it to subscribers.

    Args:
        logger: where the lines go; default ``logging.getLogger("tlsmitm.decisions")``.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger if logger is not None else logging.getLogger("tlsmitm.decisions")
        self._lock = threading.Lock()
        self._subscribers: tuple[tuple[object, Subscriber], ...] = ()

    @property
    def logger(self) -> logging.Logger:
        """The logger the lines are written to."""
        return self._logger

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(record)`` for every record emitted from now on.

        The callback runs synchronously inside :meth:`emit`, on the relay's thread: keep it quick
        and non-blocking (queue the record if you need to do I/O). An exception it raises is
        logged and otherwise ignored.

        Returns:
            A function that unsubscribes this callback (calling it again does nothing).
        """
        if not callable(callback):
            raise TypeError(f"subscriber must be callable, not {callback!r}")
        token = object()
        with self._lock:
            self._subscribers = (*self._subscribers, (token, callback))

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(
                    entry for entry in self._subscribers if entry[0] is not token
                )

        return unsubscribe

    def emit(self, record: ConnectionRecord) -> None:
        """Log ``record`` at INFO and pass it to every subscriber; never raises for them."""
        if not isinstance(record, ConnectionRecord):
            raise TypeError(f"emit takes a ConnectionRecord, not {type(record).__name__}")
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info("%s", format_record(record), extra={"connection_record": record})
        for _, callback in self._subscribers:  # a snapshot: (un)subscribing meanwhile is safe
            try:
                callback(record)
            except Exception:
                self._logger.warning(
                    "decision-log subscriber %r failed; the connection is unaffected",
                    callback,
                    exc_info=True,
                )
