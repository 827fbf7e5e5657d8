"""``serve --metrics``: Prometheus text format checked against real traffic, and ``/healthz``.

One process and two workers (the supervisor adds up the workers' multiprocess files) see the same
traffic and must report the same counts.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
from pki import DAY, NOW, good_hierarchy, make_leaf
from prometheus_client.parser import text_string_to_metric_families
from serve_process import Served, curl, serve, start_origin, upstream_args

pytestmark = pytest.mark.e2e

HOST = "www.example.test"
EXPIRED = "expired.example.test"
BYPASSED = "bank.example.test"


async def _get(url: str) -> tuple[int, str]:
    result = await curl("-o", "-", "-w", "\n%{http_code}", url, check=False)
    body, _, status = result.stdout.decode().rpartition("\n")
    return int(status or 0), body


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _by_decision(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], decision: str
) -> float:
    """Connections with ``decision``, whatever the reason (a client that closes first after its
    response is ``connection_lost``, one that finished cleanly ``verified``)."""
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "tlsmitm_connections_total" and ("decision", decision) in labels
    )


def _metrics_url(served: Served) -> str:
    line = next(line for line in served.stdout.decode().splitlines() if "/metrics" in line)
    return line.split()[1]


@pytest.mark.parametrize("workers", ["1", "2"], ids=["one-process", "two-workers"])
async def test_metrics_count_real_traffic_and_healthz_follows_shutdown(
    nursery: trio.Nursery, tmp_path: Path, workers: str
) -> None:
    hierarchy = good_hierarchy(HOST)
    port, _ = await start_origin(nursery, tmp_path, hierarchy)
    expired_leaf = make_leaf(
        hierarchy.intermediate, EXPIRED, not_before=NOW - 30 * DAY, not_after=NOW - DAY
    )
    expired_port, _ = await start_origin(nursery, tmp_path, hierarchy, expired_leaf)
    state = tmp_path / "state"
    async with serve(
        state,
        *("--workers", workers, "--metrics", "127.0.0.1:0", "--shutdown-grace", "60"),
        *upstream_args(tmp_path, hierarchy, HOST),
        *("--resolve", f"{EXPIRED}=127.0.0.1", "--resolve", f"{BYPASSED}=127.0.0.1"),
        *("--bypass", BYPASSED),
    ) as served:
        metrics = _metrics_url(served)
        health = metrics.replace("/metrics", "/healthz")
        assert await _get(health) == (200, "ok\n")
        cacert = str(state / "ca" / "root.pem")
        for _ in range(3):
            result = await curl(
                "--http1.1", "--proxy", served.proxy, "--cacert", cacert, f"https://{HOST}:{port}/"
            )
            assert result.stdout == b"hello from origin"
        # Bypassed: the client talks to the origin itself (and trusts its root).
        roots = str(tmp_path / "origin-root.pem")
        result = await curl(
            "--proxy", served.proxy, "--cacert", roots, "--resolve", f"{BYPASSED}:{port}:127.0.0.1",
            "-H", f"Host: {HOST}", "-k", f"https://{BYPASSED}:{port}/",
        )  # fmt: skip
        assert result.stdout == b"hello from origin"
        # Expired upstream: refused (curl sees the error CA's leaf and fails).
        refused = await curl(
            "--proxy", served.proxy, "--cacert", cacert, f"https://{EXPIRED}:{expired_port}/",
            check=False,
        )  # fmt: skip
        assert refused.returncode != 0

        def complete(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> bool:
            return (
                _by_decision(samples, "intercept") >= 4
                and _value(samples, "tlsmitm_connections_total", decision="bypass", reason="rule")
                >= 1
                and _value(
                    samples, "tlsmitm_upstream_verification_failures_total", reason="expired"
                )
                >= 1
            )

        with trio.fail_after(30):
            while True:
                status, text = await _get(metrics)
                assert status == 200
                samples = _samples(text)
                if complete(samples):
                    break
                await trio.sleep(0.2)
        # Three intercepted and relayed, one intercepted whose client refused the error CA's leaf.
        assert _by_decision(samples, "intercept") == 4
        refused_leaf = {"decision": "intercept", "reason": "tls_handshake"}
        assert _value(samples, "tlsmitm_connections_total", **refused_leaf) == 1
        assert _value(samples, "tlsmitm_connections_total", decision="bypass", reason="rule") == 1
        assert (
            _value(samples, "tlsmitm_upstream_verification_failures_total", reason="expired") == 1
        )
        assert _value(samples, "tlsmitm_requests_total", protocol="http/1.1") == 3
        assert _value(samples, "tlsmitm_handshake_seconds_count", side="client") >= 3
        # (a pooled upstream connection needs no new handshake)
        assert _value(samples, "tlsmitm_handshake_seconds_count", side="upstream") >= 2
        assert _value(samples, "tlsmitm_handshake_seconds_bucket", side="client", le="+Inf") >= 3
        assert _value(samples, "tlsmitm_leaves_minted_total") >= 1
        lookups = _value(samples, "tlsmitm_leaf_cache_lookups_total", result="hit") + _value(
            samples, "tlsmitm_leaf_cache_lookups_total", result="miss"
        )
        assert lookups >= 4  # three intercepted connections and the refused one
        assert _value(samples, "tlsmitm_relayed_bytes_total", direction="down") > 3 * len(
            b"hello from origin"
        )
        assert _value(samples, "tlsmitm_relayed_bytes_total", direction="up") > 0
        assert ("tlsmitm_active_connections", frozenset()) in samples
        assert ("tlsmitm_active_tunnels", frozenset()) in samples
        assert ("tlsmitm_state_store_errors_total", frozenset()) in samples

        # An exchange in flight keeps serve in its grace period: /healthz says it is stopping.
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        await stream.send_all(f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some(4096)
        await stream.send_all(b"\x16\x03\x01")  # the start of a ClientHello: not idle
        with trio.fail_after(30):
            while True:
                status, text = await _get(metrics)
                if _value(_samples(text), "tlsmitm_active_connections") >= 1:
                    break
                await trio.sleep(0.2)
        served.process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while True:
                status, text = await _get(health)
                if status == 503:
                    break
                await trio.sleep(0.1)
        assert "shutting down" in text
        served.process.send_signal(signal.SIGTERM)  # the second signal: stop now
        await stream.aclose()
        with trio.fail_after(30):
            assert await served.process.wait() == 0
