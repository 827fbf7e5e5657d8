"""``python -m benchmarks._cpuprofile OUT -m MODULE ARGS...``: run a module under cProfile, timed
by the process's CPU clock instead of the wall clock.

On a shared 2-core machine a wall-clock profile charges a process for the time it sat preempted
inside a system call (a loopback ``send`` that woke the peer); CPU time does not.
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    """Profile ``-m MODULE`` with ``sys.argv`` shifted as ``python -m MODULE`` would see it."""
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: python -m benchmarks._cpuprofile OUT -m MODULE [ARGS...]")
    out, module = sys.argv[1], sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
