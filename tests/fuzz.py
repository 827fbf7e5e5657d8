"""``./run fuzz [SECONDS] [TARGET...]``: coverage-guided fuzzing of the edge parsers (atheris).

Each target of ``tests/fuzz_targets.py`` runs in its own process under atheris (libFuzzer) for an
equal share of ``SECONDS`` (default 300), from a seed corpus of real inputs. A crash -- any
exception the target does not allow -- is saved by libFuzzer as
``tests/data/fuzz/<target>/crash-<sha1>`` (``timeout-``, ``oom-`` likewise), where
``tests/test_fuzz_regressions.py`` replays it on every test run. The summary gives each
target's executions and crashes; the exit status is 1 when anything crashed.

Without atheris (it needs a wheel or clang for this Python), the same targets run under
hypothesis for the same time instead, and the summary says so.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CRASHES = HERE / "data" / "fuzz"

SEEDS: dict[str, list[bytes]] = {
    "clienthello": [(HERE / "data" / "chromium_clienthello.bin").read_bytes()],
    "heads": [
        b"CONNECT www.example.test:443 HTTP/1.1\r\nHost: www.example.test:443\r\n\r\n",
        b"GET http://[::1]:8080/a?b HTTP/1.1\r\nHost: x\r\nVia: 1.1 p\r\n\r\n",
        b"http://user@h:99999/#x",
        b"[2001:db8::1]:443",
    ],
    "sts": [b"max-age=31536000; includeSubDomains; preload", b'max-age="0"', b'max-age=1;;x="y"'],
    "policy": [b"*.bank.example", b"www.bank.example|192.0.2.9|10.1.2.3", b"client:10.0.0.0/8"],
    "error_origin": [
        b"GET\n/error/0707070707070707070707070707070707\nhost: error.invalid\n",
        b"POST\n/override\nhost: error.invalid\norigin: https://error.invalid\n"
        b"content-type: application/x-www-form-urlencoded\nref=00&token=11",
    ],
}


def _run_one(name: str, seconds: int) -> tuple[int, list[Path], str]:
    """Fuzz ``name`` in a child process; returns (executions, new crash files, tail of log)."""
    directory = CRASHES / name
    directory.mkdir(parents=True, exist_ok=True)
    before = set(directory.iterdir())
    with tempfile.TemporaryDirectory(prefix=f"tlsmitm-fuzz-{name}-") as corpus:
        for index, seed in enumerate(SEEDS.get(name, [])):
            Path(corpus, f"seed-{index}").write_bytes(seed)
        command = [
            sys.executable,
            str(Path(__file__)),
            "--child",
            name,
            f"-max_total_time={seconds}",
            f"-artifact_prefix={directory}/",
            "-print_final_stats=1",
            "-timeout=10",
            "-rss_limit_mb=2048",
            corpus,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    log = result.stdout + result.stderr
    executions = sum(int(n) for n in re.findall(r"stat::number_of_executed_units:\s*(\d+)", log))
    crashes = sorted(set(directory.iterdir()) - before)
    if result.returncode != 0 and not crashes:
        crashes = []  # a harness failure, not a finding: shown in the log tail
    return executions, crashes, "\n".join(log.strip().splitlines()[-15:])


def _child(name: str, argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        import fuzz_targets  # noqa: F401 - imported for instrumentation

        import tlsmitm._clienthello
        import tlsmitm._edge
        import tlsmitm._hsts
        import tlsmitm._policy
        import tlsmitm._responder  # noqa: F401
    from fuzz_targets import TARGETS

    atheris.Setup([sys.argv[0], *argv], TARGETS[name])
    atheris.Fuzz()


def _hypothesis_fallback(names: list[str], seconds: int) -> int:
    from fuzz_targets import TARGETS
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    failed = 0
    for name in names:
        deadline = time.monotonic() + seconds
        runs = 0
        while time.monotonic() < deadline:

            @settings(
                max_examples=2000,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(st.binary(max_size=4096))
            def check(data: bytes, target=TARGETS[name]) -> None:  # type: ignore[no-untyped-def]
                target(data)

            try:
                check()
            except Exception as exc:
                failed += 1
                print(f"{name}: crash: {type(exc).__name__}: {exc}")
                break
            runs += 2000
        print(f"{name:14} {runs:>12,} executions (hypothesis)")
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.insert(0, str(HERE))
        _child(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(prog="./run fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("seconds", nargs="?", type=int, default=300, help="total (default 300)")
    parser.add_argument("targets", nargs="*", help="targets (default: all)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from fuzz_targets import TARGETS

    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    share = max(1, args.seconds // len(names))
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed (pip install atheris); fuzzing with hypothesis instead")
        return _hypothesis_fallback(names, share)
    total_crashes = 0
    print(f"fuzzing {len(names)} targets for {share} s each (atheris)", flush=True)
    for name in names:
        executions, crashes, tail = _run_one(name, share)
        total_crashes += len(crashes)
        print(f"{name:14} {executions:>12,} executions  {len(crashes)} crash(es)", flush=True)
        for crash in crashes:
            digest = hashlib.sha1(crash.read_bytes(), usedforsecurity=False).hexdigest()[:12]
            print(f"    saved {crash.relative_to(HERE.parent)} ({digest})")
        if executions == 0:
            print(tail)
            total_crashes += 1
    print(f"crashes: {total_crashes}")
    return 1 if total_crashes else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
