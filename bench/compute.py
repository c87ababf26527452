"""Sandbox compute overhead: the Floyd-Steinberg kernel as a bytecode image
under cpushare.sandbox vs the same kernel compiled natively, same input.

Both run in one process each over the same input (several 1024x1024 images,
four blur widths), alternately, in the same run.  The ratio is the median
over the rounds of sandboxed / native CPU time (user + system from rusage:
for the sandbox what the seller measures and the buyer pays for).  CPU time
rather than wall time because these machines are shared: another process
taking a core for a moment changes one wall time by tens of per cent, and
CPU time much less.  The wall-time ratios (fastest vs fastest, and the
median of the rounds) are in the detail.  Goal: <= 1.02.

    /usr/bin/python3 -m bench.compute [--quick]
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FS_DIR = ROOT / "examples" / "floyd-steinberg"
for p in (str(ROOT / "src"), str(FS_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

GOAL = 1.02


def _input(images: int) -> bytes:
    import numpy as np

    import fsjob
    import pool

    # A photograph where the pool has one, else a texture, at 1024x1024.
    real = dict(pool.real_images())
    a = real.get("photo-face")
    if a is None:
        a = pool.gen_texture(pool.Rand(1), 1024, 1024)
    a = np.ascontiguousarray(np.pad(a, ((0, 1024 - a.shape[0]), (0, 1024 - a.shape[1])),
                                    mode="reflect")[:1024, :1024])
    msg = fsjob.encode(1024, 1024, a.tobytes())
    return msg * images


def run(quick: bool = False) -> dict:
    import fsjob
    from cpushare import bytecode, sandbox

    rounds, images = (4, 3) if quick else (9, 6)
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-compute-") as tmp:
        image = bytecode.load(fsjob.build_job(tmp))
        native = fsjob.build_native(tmp)
        data = _input(images)
        limits = sandbox.Limits(cpu_seconds=120, wall_seconds=300)
        # one untimed run of each: page cache, CPU frequency
        warm = sandbox.run(image, data, limits)
        ref = subprocess.run([str(native)], input=data, capture_output=True)
        if warm.exit_status != 0 or ref.returncode != 0 or warm.output != ref.stdout:
            raise RuntimeError(f"bench.compute: the sandboxed run ({warm.describe()}) and the native "
                               f"run (exit status {ref.returncode}) do not agree")
        ratios, t_sandbox, t_native, cpu_sandbox, cpu_native = [], [], [], [], []
        for i in range(rounds):
            order = ("sandbox", "native") if i % 2 == 0 else ("native", "sandbox")
            took = {}
            for which in order:
                if which == "sandbox":
                    t0 = time.perf_counter()
                    r = sandbox.run(image, data, limits)
                    took[which] = time.perf_counter() - t0
                    cpu_sandbox.append(r.cpu_seconds)
                else:
                    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    t0 = time.perf_counter()
                    subprocess.run([str(native)], input=data, capture_output=True, check=True)
                    took[which] = time.perf_counter() - t0
                    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu_native.append((c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime))
            t_sandbox.append(took["sandbox"])
            t_native.append(took["native"])
            ratios.append(took["sandbox"] / took["native"])
    cpu_ratios = [a / b for a, b in zip(cpu_sandbox, cpu_native) if b > 0]
    ratio = statistics.median(cpu_ratios)
    return {
        "name": "sandbox compute overhead vs native (FS kernel, CPU time)",
        "measured": ratio,
        "unit": "x",
        "goal": f"<= {GOAL}",
        "pass": ratio <= GOAL,
        "detail": {
            "rounds": rounds, "images_per_run": images, "image": "1024x1024, blur 0/1/2/4 px",
            "sandbox_wall_median_s": statistics.median(t_sandbox),
            "native_wall_median_s": statistics.median(t_native),
            "cpu_ratios": cpu_ratios,
            "wall_ratio_fastest": min(t_sandbox) / min(t_native),
            "wall_ratio_median_round": statistics.median(ratios),
            "wall_ratios": ratios, "mode": sandbox.mode(),
        },
    }


if __name__ == "__main__":
    import json
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
