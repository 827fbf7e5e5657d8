"""``--log-format json``: one JSON object per line with stable keys, made with ``logging``."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from pki import good_hierarchy
from serve_process import curl, serve, start_origin, upstream_args

from tlsmitm._decisionlog import ConnectionRecord, DecisionLog
from tlsmitm._logs import JSON_KEYS, JsonFormatter, configure_logging

HOST = "www.example.test"


def _record(**changes: object) -> ConnectionRecord:
    values: dict[str, object] = {
        "time": datetime(2026, 5, 9, 7, 35, 25, tzinfo=UTC),
        "client": "127.0.0.1:5000",
        "host": HOST,
        "port": 443,
        "decision": "intercept",
        "reason": "default",
        "verdict": "ok",
        "bytes_up": 10,
        "bytes_down": 20,
        "duration_ms": 1.5,
    }
    values.update(changes)
    return ConnectionRecord(**values)  # type: ignore[arg-type]


def test_a_decision_record_is_one_json_object_with_the_stable_keys() -> None:
    logger = logging.getLogger("test_logs.decisions")
    logger.propagate = False
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        DecisionLog(logger).emit(_record(host='evil.example\n{"x":1}\u2028'))
        logger.warning("plain %s", "message")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert tuple(first) == JSON_KEYS
    assert first["event"] == "connection"
    assert first["level"] == "info"
    assert first["action"] == "intercept"
    assert first["verdict"] == "ok"
    assert first["host"] == 'evil.example\n{"x":1}\u2028'  # escaped, still one line
    assert first["bytes_down"] == 20
    assert first["duration_ms"] == 1.5
    assert first["time"].endswith("Z")
    assert second["event"] == "log"
    assert second["message"] == "plain message"
    assert second["level"] == "warning"
    assert second["host"] is None


def test_configure_logging_adds_one_handler_and_keeps_the_embedders() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    out = io.StringIO()
    handler = configure_logging(log_format="json", level="warning", stream=out)
    try:
        assert root.handlers == [*before, handler]
        logging.getLogger("tlsmitm.test").info("not shown at warning")
        logging.getLogger("tlsmitm.test").error("shown")
        assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["shown"]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.getLogger("tlsmitm").setLevel(logging.NOTSET)
    with pytest.raises(ValueError, match="log_format"):
        configure_logging(log_format="xml")


@pytest.mark.e2e
async def test_serve_writes_json_lines_for_real_traffic(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    hierarchy = good_hierarchy(HOST)
    port, _ = await start_origin(nursery, tmp_path, hierarchy)
    async with serve(
        tmp_path / "state",
        *("--log-format", "json", "--access-log"),
        *upstream_args(tmp_path, hierarchy, HOST),
    ) as served:
        cacert = str(tmp_path / "state" / "ca" / "root.pem")
        result = await curl(
            "--http1.1", "--proxy", served.proxy, "--cacert", cacert, f"https://{HOST}:{port}/"
        )
        assert result.stdout == b"hello from origin"
        h2 = await curl(
            "--http2", "--proxy", served.proxy, "--cacert", cacert, f"https://{HOST}:{port}/"
        )
        assert h2.stdout == b"hello from origin"
        with trio.fail_after(20):
            while served.stderr.count(b'"event":"connection"') < 2:
                await trio.sleep(0.05)
        assert await served.stop() == 0
    lines = [json.loads(line) for line in served.stderr.decode().splitlines()]
    assert lines, served.stderr
    for line in lines:
        assert tuple(line)[: len(JSON_KEYS)] == JSON_KEYS
    connection = next(line for line in lines if line["event"] == "connection")
    assert connection["host"] == HOST
    assert connection["port"] == port
    assert connection["action"] == "intercept"
    assert connection["verdict"] == "ok"
    assert connection["client"].startswith("127.0.0.1:")
    assert connection["bytes_down"] > 0
    assert connection["logger"] == "tlsmitm.decisions"
    assert connection["conn"]  # the connection's id, unique in the process
    assert connection["duration_ms"] >= 0
    assert any(line["event"] == "shutdown" for line in lines)
    exchange = next(line for line in lines if line["event"] == "exchange")
    assert exchange["logger"] == "tlsmitm.access"
    assert (exchange["method"], exchange["status"], exchange["protocol"]) == (
        "GET",
        200,
        "http/1.1",
    )
    assert exchange["host"] == HOST
    assert exchange["conn"] == connection["conn"]
    assert exchange["duration_ms"] >= 0
    # curl --http2 speaks h2 to tlsmitm, which speaks HTTP/1.1 to this origin.
    assert any(line["event"] == "exchange" and line["protocol"] == "h2" for line in lines)
