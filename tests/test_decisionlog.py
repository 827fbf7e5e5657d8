"""The decision log: record fields, the stable line format, injection safety, subscribers."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsmitm._decisionlog import ConnectionRecord, DecisionLog, format_record
from tlsmitm._errors import CertError

TIME = datetime(2026, 5, 9, 7, 35, 25, 123456, tzinfo=UTC)
KEYS = [
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
]


def record(**overrides: object) -> ConnectionRecord:
    fields: dict[str, object] = {
        "time": TIME,
        "client": "192.168.1.5:51234",
        "host": "bank.example",
        "port": 443,
        "decision": "bypass",
        "reason": "rule",
        "verdict": None,
        "bytes_up": 517,
        "bytes_down": 4096,
        "duration_ms": 120.5,
        **overrides,
    }
    return ConnectionRecord(**fields)  # type: ignore[arg-type]


_PAIR = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^ "]+)(?: |$)')


def parse_line(line: str) -> dict[str, str | None]:
    """Read a decision-log line back, strictly: every byte must belong to a key=value pair."""
    fields: dict[str, str | None] = {}
    position = 0
    while position < len(line):
        found = _PAIR.match(line, position)
        assert found is not None, f"unparseable at {position}: {line[position:]!r}"
        key, raw = found.groups()
        assert key not in fields, f"{key} twice"
        fields[key] = None if raw == "-" else json.loads(raw) if raw.startswith('"') else raw
        position = found.end()
    return fields


def test_line_format_is_stable() -> None:
    assert format_record(record()) == (
        "time=2026-05-09T07:35:25.123Z client=192.168.1.5:51234 host=bank.example port=443 "
        "decision=bypass reason=rule verdict=- bytes_up=517 bytes_down=4096 duration_ms=120.5 "
        "relay=- splice=- scan=- scan_ms=-"
    )
    intercepted = record(
        time=datetime(2026, 5, 9, 9, 35, 25, tzinfo=timezone(timedelta(hours=2))),
        client="[2001:db8::5]:40000",
        host=None,
        decision="error",
        reason="upstream_unreachable",
        verdict=CertError.EXPIRED,
        bytes_up=0,
        bytes_down=0,
        duration_ms=None,
    )
    assert format_record(intercepted) == (
        "time=2026-05-09T07:35:25.000Z client=[2001:db8::5]:40000 host=- port=443 "
        "decision=error reason=upstream_unreachable verdict=expired bytes_up=0 bytes_down=0 "
        "duration_ms=- relay=- splice=- scan=- scan_ms=-"
    )
    assert list(parse_line(format_record(intercepted))) == KEYS


def test_record_fields_and_dict() -> None:
    value = record(decision="intercept", reason="default", verdict="ok", duration_ms=3)
    assert value.as_dict() == {
        "time": "2026-05-09T07:35:25.123Z",
        "client": "192.168.1.5:51234",
        "host": "bank.example",
        "port": 443,
        "decision": "intercept",
        "reason": "default",
        "verdict": "ok",
        "bytes_up": 517,
        "bytes_down": 4096,
        "duration_ms": 3,
        "relay": None,
        "splice": None,
        "scan": None,
        "scan_ms": None,
    }
    assert list(value.as_dict()) == KEYS
    assert record(verdict=CertError.NAME_MISMATCH).verdict == "name_mismatch"
    assert "duration_ms=0.04 " in format_record(record(duration_ms=0.04))
    assert "duration_ms=2 " in format_record(record(duration_ms=2.0))
    spliced = record(decision="intercept", reason="verified", relay="splice", splice="not_http")
    assert " relay=splice splice=not_http " in format_record(spliced)
    assert " relay=http/1.1 splice=- " in format_record(record(relay="http/1.1"))
    scanned = record(relay="http/1.1", scan="infected", scan_ms=12.5)
    assert format_record(scanned).endswith(" scan=infected scan_ms=12.5")
    with pytest.raises(ValueError, match="scan"):
        record(scan="dirty")
    with pytest.raises(ValueError, match="scan_ms"):
        record(scan_ms=-1.0)
    with pytest.raises(ValueError, match="relay"):
        record(relay="h2 extra=1")
    with pytest.raises(ValueError, match="splice"):
        record(splice="Not HTTP")


@pytest.mark.parametrize(
    "host",
    [
        "evil.test decision=intercept reason=default",
        "evil.test\ntime=2020-01-01T00:00:00Z client=1.2.3.4:1 decision=bypass",
        "evil.test\r\nx=y",
        'evil.test" decision="intercept',
        "evil.test\\",
        "evil\x00.test",
        "evil\x1b[31m.test",
        "evil\x7f.test",
        "evil\u2028decision=bypass",
        "evil\u0085.test",
        "bücher.example",
        "-",
        "",
        "=",
        "host=x",
    ],
)
def test_hostile_host_names_cannot_forge_fields_or_lines(host: str) -> None:
    line = format_record(record(host=host, client=host))
    assert line.isascii()
    assert line.isprintable()  # no newline, no control character, no line separator
    fields = parse_line(line)
    assert list(fields) == KEYS
    assert fields["host"] == host
    assert fields["client"] == host
    assert fields["decision"] == "bypass"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.one_of(st.none(), st.text(max_size=40)))
def test_any_text_round_trips_through_one_line(client: str, host: str | None) -> None:
    line = format_record(record(client=client, host=host))
    assert line.isascii()
    assert line.isprintable()
    fields = parse_line(line)
    assert list(fields) == KEYS
    assert fields["client"] == client
    assert fields["host"] == host


@pytest.mark.parametrize(
    ("overrides", "error", "text"),
    [
        ({"time": datetime(2026, 5, 9)}, ValueError, "aware"),
        ({"time": "2026-05-09"}, ValueError, "aware"),
        ({"client": None}, TypeError, "client"),
        ({"host": b"bank.example"}, TypeError, "host"),
        ({"port": "443"}, TypeError, "port"),
        ({"port": True}, TypeError, "port"),
        ({"port": 70000}, ValueError, "port"),
        ({"decision": "allow"}, ValueError, "decision"),
        ({"reason": "rule matched"}, ValueError, "reason"),
        ({"reason": "Rule"}, ValueError, "reason"),
        ({"verdict": "not ok"}, ValueError, "verdict"),
        ({"verdict": 3}, ValueError, "verdict"),
        ({"bytes_up": -1}, ValueError, "bytes_up"),
        ({"bytes_down": 1.5}, ValueError, "bytes_down"),
        ({"bytes_down": False}, ValueError, "bytes_down"),
        ({"duration_ms": float("nan")}, ValueError, "duration_ms"),
        ({"duration_ms": float("inf")}, ValueError, "duration_ms"),
        ({"duration_ms": -1.0}, ValueError, "duration_ms"),
        ({"duration_ms": "1"}, TypeError, "duration_ms"),
    ],
)
def test_record_is_validated(
    overrides: dict[str, object], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        record(**overrides)


def test_emit_logs_one_info_line_with_the_record_attached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = DecisionLog()
    assert log.logger.name == "tlsmitm.decisions"
    value = record()
    with caplog.at_level(logging.INFO, logger="tlsmitm.decisions"):
        log.emit(value)
    (entry,) = caplog.records
    assert entry.name == "tlsmitm.decisions"
    assert entry.levelno == logging.INFO
    assert entry.getMessage() == format_record(value)
    assert entry.connection_record is value  # type: ignore[attr-defined]


def test_emit_uses_the_given_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("product.audit")
    log = DecisionLog(logger)
    with caplog.at_level(logging.INFO, logger="product.audit"):
        log.emit(record(host="x.example"))
    assert [entry.name for entry in caplog.records] == ["product.audit"]
    assert "host=x.example" in caplog.records[0].getMessage()


def test_subscribers_get_every_record_and_can_leave() -> None:
    log = DecisionLog()
    seen: list[ConnectionRecord] = []
    also: list[ConnectionRecord] = []
    unsubscribe = log.subscribe(seen.append)
    log.subscribe(also.append)
    first, second = record(), record(host="two.example")
    log.emit(first)
    unsubscribe()
    unsubscribe()  # idempotent
    log.emit(second)
    assert seen == [first]
    assert also == [first, second]
    with pytest.raises(TypeError):
        log.subscribe("not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        log.emit({"host": "x"})  # type: ignore[arg-type]


def test_same_callback_twice_is_two_subscriptions() -> None:
    log = DecisionLog()
    seen: list[ConnectionRecord] = []
    first = log.subscribe(seen.append)
    log.subscribe(seen.append)
    log.emit(record())
    first()
    log.emit(record())
    assert len(seen) == 3


def test_failing_subscriber_is_logged_and_never_breaks_the_relay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = DecisionLog()
    seen: list[ConnectionRecord] = []

    def broken(value: ConnectionRecord) -> None:
        raise RuntimeError("subscriber bug")

    log.subscribe(broken)
    log.subscribe(seen.append)
    with caplog.at_level(logging.INFO, logger="tlsmitm.decisions"):
        log.emit(record())
    assert len(seen) == 1
    warnings = [entry for entry in caplog.records if entry.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "subscriber" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None
    assert isinstance(warnings[0].exc_info[1], RuntimeError)


def test_subscriber_may_unsubscribe_while_being_called() -> None:
    log = DecisionLog()
    seen: list[str] = []
    handle: list[object] = []

    def once(value: ConnectionRecord) -> None:
        seen.append("once")
        handle[0]()  # type: ignore[operator]

    handle.append(log.subscribe(once))
    log.subscribe(lambda value: seen.append("other"))
    log.emit(record())
    log.emit(record())
    assert seen == ["once", "other", "other"]


def test_subscribers_run_when_the_logger_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    log = DecisionLog()
    seen: list[ConnectionRecord] = []
    log.subscribe(seen.append)
    with caplog.at_level(logging.WARNING, logger="tlsmitm.decisions"):
        log.emit(record())
    assert caplog.records == []
    assert len(seen) == 1


def test_library_never_configures_logging() -> None:
    root_handlers = list(logging.getLogger().handlers)
    logger = logging.getLogger("tlsmitm.decisions")
    level = logger.level
    DecisionLog().emit(record())
    assert logger.handlers == []
    assert logger.propagate
    assert logger.level == level
    assert logging.getLogger().handlers == root_handlers
