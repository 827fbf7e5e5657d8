"""The benchmark harness still runs: one tiny real measurement, then every report format.

No timing assertions (the machine is shared): only that real numbers come out and that the table,
JSON and docs include are produced from them. The full suite is ``python -m benchmarks``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))


def test_one_connection_setup_measurement_produces_numbers(bench: None, tmp_path: Path) -> None:
    from benchmarks import _client, _harness, _report
    from benchmarks._peers import PeerEnv, start_peer
    from benchmarks._pki import BENCH_DOMAIN, make_pki
    from benchmarks._proc import cpu_seconds

    pki = make_pki(tmp_path, now=dt.datetime.now(dt.UTC))
    env = PeerEnv(work=tmp_path, pki=pki, origin_port=0, names=())
    terminator = start_peer("terminator", env, origin_pids=[], origin_version="")
    try:
        before: list[float] = []
        rates = _client.connection_rate(
            terminator.target,
            names=(BENCH_DOMAIN,),
            fresh=False,
            concurrency=2,
            seconds=1.0,
            on_start=lambda: before.append(cpu_seconds(terminator.pids())),
        )
        used = cpu_seconds(terminator.pids()) - before[0]
        latency = _client.keepalive_latency(terminator.target, name=BENCH_DOMAIN, seconds=0.3)
        keepalive = _client.keepalive_rate(
            terminator.target, name=BENCH_DOMAIN, seconds=0.3, connections=2
        )
    finally:
        terminator.stop()
    assert terminator.process is not None
    assert terminator.process.returncode is not None
    assert rates.errors == {}
    assert rates.completed > 0
    assert rates.per_second > 0
    assert 0 < rates.p50_ms <= rates.p99_ms
    assert used >= 0
    assert latency.errors == {}
    assert latency.requests > 0
    assert 0 < latency.p50_ms <= latency.p99_ms
    assert keepalive > 0

    # The measured figures go through every output the harness writes.
    record = _harness.PeerRecord(label="terminator", version=terminator.version)
    record.metrics.update(
        {
            "setup.one.c1.per_s": rates.per_second,
            "setup.one.c1.p50_ms": rates.p50_ms,
            "setup.one.c1.p99_ms": rates.p99_ms,
            "latency.p50_ms": latency.p50_ms,
        }
    )
    missing = _harness.PeerRecord(label="mitmproxy", status="missing")
    missing.failures["start"] = "could not be installed: no *Python* >= 3.12 `here`"
    result = _harness.RunResult(
        plan=_harness.QUICK,
        meta={**_harness.machine_info(), "date": "2026-01-01T00:00:00+00:00", "duration_s": 1},
        peers={"terminator": record, "mitmproxy": missing},
        components={},
    )
    text = _report.text_report(result)
    assert "setup, 1 name, 1 in flight" in text
    assert f"{rates.per_second:,.0f}" in text
    assert "mitmproxy      missing" in text
    data = json.loads(json.dumps(_report.to_json(result)))
    assert data["peers"]["terminator"]["metrics"]["setup.one.c1.per_s"] == rates.per_second
    assert data["peers"]["mitmproxy"]["status"] == "missing"
    assert all(goal["met"] is None for goal in data["goals"])  # no tlsmitm figures here
    rst = _report.rst_include(result, None)
    assert "list-table" in rst
    assert r"\*Python\*" in rst  # markup in failure text is escaped for Sphinx -W
    chart = tmp_path / "chart.png"
    if _report.write_chart(result, chart):
        assert chart.read_bytes().startswith(b"\x89PNG")


def test_a_missing_component_benchmark_is_reported_not_raised(bench: None) -> None:
    from benchmarks._components import run_component

    result = run_component("bench_that_does_not_exist", 0.1, timeout=60)
    assert result.status == "missing"
    assert "does not exist" in result.detail
    assert result.figures == {}


def test_percentile_is_nearest_rank(bench: None) -> None:
    from benchmarks._client import percentile

    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def test_the_state_benchmark_measures_sqlite_redis_and_the_cache(bench: None) -> None:
    from conftest import require_tool

    require_tool("redis-server")
    from benchmarks import bench_state

    figures = bench_state.run(0.2)
    for key in ("sqlite_new_name_us", "redis_new_name_us", "sqlite_observe_us", "redis_observe_us"):
        assert figures[key] > 0, key
    assert 0 < figures["cache_hit_rate"] < 1
    assert figures["redis_over_sqlite_new_name"] > 0


def test_a_failed_measurement_is_retried_once_and_reported(bench: None) -> None:
    from typing import Any, cast

    from benchmarks import _harness

    class _Alive:
        def alive(self) -> bool:
            return True

    record = _harness.PeerRecord(label="squid")
    measurer = _harness._Measurer(_harness.QUICK, cast(Any, None), cast(Any, None), record, {})
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("SSLEOFError: EOF occurred in violation of protocol")

    measurer._guard(cast(Any, _Alive()), "bulk.upload", flaky)
    assert len(calls) == 2
    assert record.status == "ok"
    assert record.failures == {}
    assert record.notes == [
        "bulk.upload: failed once (OSError: SSLEOFError: EOF occurred in "
        "violation of protocol); retried"
    ]

    def broken() -> None:
        calls.append(1)
        raise OSError("still broken")

    calls.clear()
    measurer._guard(cast(Any, _Alive()), "bulk.download", broken)
    assert len(calls) == 2  # once, and once more: no further
    assert record.status == "partial"
    assert record.failures["bulk.download"] == "OSError: still broken (on the retry too)"


def test_rounds_show_their_spread_beside_the_median(bench: None) -> None:
    from benchmarks import _harness, _report

    record = _harness.PeerRecord(label="terminator")
    measurer = _harness._Measurer(_harness.FULL, None, None, record, {})  # type: ignore[arg-type]
    for value in (120.0, 100.0, 90.0, 110.0, 105.0):
        measurer._sample("setup.one.c1.per_s", value)
    measurer.finish_samples()
    assert _harness.FULL.repeats >= 5
    assert record.metrics["setup.one.c1.per_s"] == 105.0
    result = _harness.RunResult(
        plan=_harness.FULL,
        meta=_harness.machine_info(),
        peers={"terminator": record},
        components={},
    )
    assert "105 (90-120)" in _report.text_report(result)


def test_issue_19_goals_are_judged_against_peers_of_the_same_run(bench: None) -> None:
    from benchmarks import _harness, _report

    terminator = _harness.PeerRecord(label="terminator")
    terminator.metrics.update({"bulk.download.mb_s": 600.0, "bulk.upload.mb_s": 300.0})
    ours = _harness.PeerRecord(label="tlsmitm")
    ours.metrics.update({"bulk.upload.mb_s": 200.0, "held.1000.kib_per_conn": 60.0})
    squid = _harness.PeerRecord(label="squid")
    squid.metrics.update({"bulk.upload.mb_s": 400.0})
    result = _harness.RunResult(
        plan=_harness.QUICK,
        meta=_harness.machine_info(),
        peers={"terminator": terminator, "tlsmitm": ours, "squid": squid},
        components={},
    )
    goals = {g.goal: g for g in _report.evaluate_goals(result)}
    upload = goals["issue 19: the terminator uploads at least as fast as it downloads"]
    assert (upload.met, upload.measured) == (False, "0.50x (300 against 600)")
    assert goals["issue 19: bulk upload >= Squid's"].met is False
    assert goals["issue 19: bulk download >= Squid's"].met is None  # not measured here
    assert goals["issue 19: RSS per held connection (1,000) <= 64 KiB"].met is True
    assert "[MISS] issue 19: the terminator uploads" in _report.text_report(result)


def test_issue_14_goals_compare_h2_with_mitmproxy_and_with_tlsmitms_own_http1(
    bench: None,
) -> None:
    from benchmarks import _harness, _report

    ours = _harness.PeerRecord(label="tlsmitm")
    ours.metrics.update(
        {
            "h2.c1x100.per_s": 900.0,
            "h2.c16x10.per_s": 500.0,
            "h2.bulk.download.mb_s": 90.0,
            "bulk.download.mb_s": 100.0,
            "h2.bulk.upload.mb_s": 50.0,
            "bulk.upload.mb_s": 100.0,
            "h2.held.2000.opened": 2000.0,
            "h2.held.2000.kib_per_conn": 80.0,
        }
    )
    mitm = _harness.PeerRecord(label="mitmproxy")
    mitm.metrics.update({"h2.c1x100.per_s": 300.0, "h2.c16x10.per_s": 250.0})
    result = _harness.RunResult(
        plan=_harness.QUICK,
        meta=_harness.machine_info(),
        peers={"tlsmitm": ours, "mitmproxy": mitm},
        components={},
    )
    goals = {g.goal: g for g in _report.evaluate_goals(result)}
    one = goals["issue 14: h2 requests/s, 1 connection(s) x 100 streams >= 3x mitmproxy"]
    assert (one.met, one.measured) == (True, "3.0x")
    sixteen = goals["issue 14: h2 requests/s, 16 connection(s) x 10 streams >= 3x mitmproxy"]
    assert (sixteen.met, sixteen.measured) == (False, "2.0x")
    download = goals["issue 14: h2 bulk download >= 0.8x tlsmitm's HTTP/1.1 bulk download"]
    assert (download.met, download.measured) == (True, "0.90x (90 against 100)")
    assert goals["issue 14: h2 bulk upload >= 0.8x tlsmitm's HTTP/1.1 bulk upload"].met is False
    held = goals["issue 14: RSS per idle intercepted h2 connection (2,000) <= 120 KiB"]
    assert (held.met, held.measured) == (True, "80.0 KiB at 2,000 connections")
    report = _report.text_report(result)
    assert "[MISS] issue 14: h2 requests/s, 16 connection(s)" in report
    assert "h2, 1 connection(s) x 100 streams" in report  # the figure's row


def test_the_h2_client_measures_through_a_real_tlsmitm(bench: None, tmp_path: Path) -> None:
    """The ``h2`` scenario's client end to end: ``serve --workers 1``, nginx speaking h2."""
    from conftest import require_tool

    require_tool("nginx")
    from benchmarks import bench_h2
    from benchmarks._origin import NginxOrigin
    from benchmarks._peers import PeerEnv, start_peer
    from benchmarks._pki import make_pki
    from benchmarks._proc import rss_bytes

    pki = make_pki(tmp_path, now=dt.datetime.now(dt.UTC))
    origin = NginxOrigin.start(pki, big_sizes=(1 << 20,), http2=True)
    try:
        env = PeerEnv(work=tmp_path, pki=pki, origin_port=origin.port, names=())
        proxy = start_peer("tlsmitm", env, origin_pids=[], origin_version="")
        try:
            per_s = bench_h2.rate(proxy.target, connections=2, streams=4, seconds=0.3)
            download = bench_h2.bulk(proxy.target, direction="download", size=1 << 20)
            upload = bench_h2.bulk(proxy.target, direction="upload", size=1 << 20)
            seen: list[int] = []
            held = bench_h2.hold_idle(
                proxy.target,
                count=6,
                open_seconds=30,
                while_held=lambda: seen.append(rss_bytes(proxy.pids())),
            )
            alive = proxy.alive()
        finally:
            proxy.stop()
    finally:
        origin.stop()
    assert alive
    assert per_s > 0
    assert download > 0
    assert upload > 0
    assert (held.opened, held.answered, held.errors) == (6, 6, {})
    assert len(seen) == 1
    assert seen[0] > 0


def test_held_connections_stay_within_what_each_peer_can_hold() -> None:
    """The held measurement opens no more than a peer can hold: one descriptor per connection
    for direct and the terminator, two for a proxy, and for tlsmitm serve its own cap after its
    reserve (past it, serve sheds idle connections, which would count as failures)."""
    from benchmarks import _harness
    from tlsmitm._relay.guard import connection_cap

    assert _harness.held_possible("terminator", 10_000, 20_000)[0] == 19_936
    assert _harness.held_possible("squid", 10_000, 20_000)[0] == 9_968
    tlsmitm, why = _harness.held_possible("tlsmitm", 10_000, 20_000)
    assert tlsmitm == connection_cap(20_000, 10_000, idle_upstreams=256) == 9_840
    assert "reserve" in why
    assert _harness.held_possible("tlsmitm-nopool", 10_000, 20_000)[0] == 9_968  # no pool reserve
    assert _harness.held_possible("tlsmitm", 1_000, 20_000)[0] >= 1_000
