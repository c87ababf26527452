"""Job start latency: an empty job (exit 0), spawn to exit, from the Python
API (cpushare.sandbox.run), beside a C fork+mmap+seccomp+exit baseline
(bench/baseline_start.c, built here with gcc) measured in the same run,
interleaved in batches so both see the same machine.

Goals: p50 <= 1 ms from the Python API; a pre-forked zygote reaching
<= 2x the C baseline (the ratio is printed either way).

    /usr/bin/python3 bench/sandbox_start.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

GOAL_P50_US = 1000.0
GOAL_RATIO = 2.0


def _percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def _build_baseline(tmp: str) -> str:
    exe = os.path.join(tmp, "baseline_start")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, str(ROOT / "bench" / "baseline_start.c")],
                   check=True)
    return exe


def _baseline(exe: str, n: int) -> list[float]:
    out = subprocess.run([exe, str(n)], check=True, capture_output=True, text=True).stdout
    return [float(x) for x in out.split()]


def _python(n: int) -> list[float]:
    from cpushare import sandbox
    from cpushare.bytecode import Image

    empty = Image(text=bytes.fromhex("b83c00000031ff0f05"), entry=0x400000)  # exit(0)
    limits = sandbox.Limits(cpu_seconds=5, wall_seconds=10)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = sandbox.run(empty, b"", limits)
        samples.append((time.perf_counter() - t0) * 1e6)
        if not r.ok:
            raise RuntimeError(f"bench.sandbox_start: the empty job did not exit 0: {r.describe()}")
    return samples


def run(quick: bool = False) -> dict:
    from cpushare import sandbox

    batches, per_batch = (4, 100) if quick else (10, 200)
    py: list[float] = []
    c: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-start-") as tmp:
        exe = _build_baseline(tmp)
        _python(20)                     # warm: extension loaded, memfds, caches
        _baseline(exe, 20)
        for i in range(batches):        # interleaved, alternating who goes first
            if i % 2:
                c += _baseline(exe, per_batch)
                py += _python(per_batch)
            else:
                py += _python(per_batch)
                c += _baseline(exe, per_batch)
    p50, p99 = _percentile(py, 0.50), _percentile(py, 0.99)
    c50, c99 = _percentile(c, 0.50), _percentile(c, 0.99)
    ratio = p50 / c50
    return {
        "name": "sandbox job start latency (empty job, spawn to exit, Python API)",
        "measured": p50,
        "unit": "us p50",
        "goal": f"p50 <= {GOAL_P50_US:.0f} us; zygote <= {GOAL_RATIO:g}x the C baseline",
        "pass": p50 <= GOAL_P50_US,
        "detail": {
            "python_p50_us": p50, "python_p99_us": p99,
            "python_mean_us": statistics.mean(py),
            "c_baseline_p50_us": c50, "c_baseline_p99_us": c99,
            "ratio_p50": ratio, "ratio_p99": p99 / c99,
            "ratio_goal_met": ratio <= GOAL_RATIO,
            "samples_each": len(py), "mode": sandbox.mode(),
            "spawn": getattr(sandbox, "spawn_method", lambda: "fork")(),
        },
    }


def main() -> int:
    quick = "--quick" in sys.argv
    r = run(quick=quick)
    d = r["detail"]
    print(f"empty job, spawn to exit, {d['samples_each']} runs each, mode {d['mode']}, "
          f"spawn by {d['spawn']}")
    print(f"  python API   p50 {d['python_p50_us']:8.1f} us   p99 {d['python_p99_us']:8.1f} us")
    print(f"  C baseline   p50 {d['c_baseline_p50_us']:8.1f} us   p99 {d['c_baseline_p99_us']:8.1f} us")
    print(f"  ratio        p50 {d['ratio_p50']:8.2f} x    p99 {d['ratio_p99']:8.2f} x")
    print(f"  goal p50 <= {GOAL_P50_US:.0f} us: {'met' if r['pass'] else 'NOT met'}; "
          f"goal <= {GOAL_RATIO:g}x baseline: {'met' if d['ratio_goal_met'] else 'not met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
