"""Log output for the command line: ``--log-format text|json``, ``--log-level``, ``--access-log``.

tlsmitm's modules only *emit* records through :mod:`logging` (loggers under ``tlsmitm.``); they
never configure handlers, so an embedder keeps full control. The command line attaches one
handler to the root logger with one of the two formatters here.

JSON lines are one object per line with stable keys, always present and in this order (a value
that does not apply is ``null``):

``time``
    ISO 8601 UTC with milliseconds (``2026-05-09T07:35:25.123Z``).
``level``
    ``debug``, ``info``, ``warning``, ``error`` or ``critical``.
``logger``
    the emitting logger (``tlsmitm.decisions``, ``tlsmitm.relay``...).
``event``
    what the line is about: ``connection`` (one decision record per connection), ``exchange``
    (one access line per HTTP exchange), ``listening``, ``shutdown``, or ``log`` for any other
    message.
``message``
    the human-readable text.
``conn``
    the connection's id (unique within one process run), when the line is about a connection.
``client``, ``host``, ``port``
    the client's ``ip:port`` and the destination.
``action``, ``reason``, ``verdict``
    the decision (``intercept``, ``bypass``, ``block``, ``error``), its stable reason code and
    the upstream certificate verdict (``ok`` or a :class:`~tlsmitm.CertError` value).
``protocol``
    the HTTP protocol of an exchange (``http/1.1``, ``h2``).
``method``, ``status``
    of an exchange.
``bytes_up``, ``bytes_down``, ``duration_ms``
    application bytes each way and how long the connection or exchange took.

A line about an exception adds ``exc`` (the traceback text) at the end.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JSON_KEYS", "JsonFormatter", "configure_logging"]

JSON_KEYS = (
    "time",
    "level",
    "logger",
    "event",
    "message",
    "conn",
    "client",
    "host",
    "port",
    "action",
    "reason",
    "verdict",
    "protocol",
    "method",
    "status",
    "bytes_up",
    "bytes_down",
    "duration_ms",
)
# The extras a LogRecord may carry under these names (``logger.info(..., extra={...})``).
_EXTRA_KEYS = JSON_KEYS[5:]
_RECORD_KEYS = {
    "client": "client",
    "host": "host",
    "port": "port",
    "decision": "action",
    "reason": "reason",
    "verdict": "verdict",
    "bytes_up": "bytes_up",
    "bytes_down": "bytes_down",
    "duration_ms": "duration_ms",
}


def _time_text(created: float) -> str:
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """Formats every record as one JSON object with the stable keys of :data:`JSON_KEYS`.

    A decision-log record (``extra={"connection_record": ...}``) becomes ``event=connection``
    with its fields; other extras named like a key fill that key. Control characters and
    non-ASCII are escaped, so a hostile host name can never start a new line.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict.fromkeys(JSON_KEYS)
        fields["time"] = _time_text(record.created)
        fields["level"] = record.levelname.lower()
        fields["logger"] = record.name
        fields["message"] = record.getMessage()
        event = getattr(record, "event", None)
        connection = getattr(record, "connection_record", None)
        if connection is not None:
            values = connection.as_dict()
            for source, key in _RECORD_KEYS.items():
                fields[key] = values.get(source)
            fields["conn"] = getattr(connection, "connection_id", None)
            event = event or "connection"
        for key in _EXTRA_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                fields[key] = value
        fields["event"] = event or "log"
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return json.dumps(fields, ensure_ascii=True, default=str, separators=(",", ":"))


_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(
    *,
    log_format: str = "text",
    level: str = "info",
    access_log: bool = False,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Attach one handler to the root logger, as the command line does; returns it.

    Args:
        log_format: ``"text"`` (the classic one-line format) or ``"json"`` (:class:`JsonFormatter`).
        level: the level of tlsmitm's own loggers (``debug``, ``info``, ``warning``, ``error``).
        access_log: whether the per-exchange access lines (logger ``tlsmitm.access``) are written.
        stream: where lines go (default: stderr).
    """
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', not {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("tlsmitm").setLevel(getattr(logging, level.upper()))
    logging.getLogger("tlsmitm.access").setLevel(logging.INFO if access_log else logging.CRITICAL)
    return handler
