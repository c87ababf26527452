#!/usr/bin/python3
"""The Floyd-Steinberg study: raster vs serpentine error diffusion over a pool
of images, bought on the CPUShare market.

    study.py --order ME.buy [--images 1000] [--redundancy 2] [--per-task 4] [--out DIR]
    study.py --local        [--images 100]  [--jobs 2]        [--per-task 4] [--out DIR]

The images of the pool (pool.py) go to the job dither.c, a few to a task
(--per-task; the job processes one image after the other, and one task per
image would spend more on the market's cost per task), run on the market
with redundancy 2 by default (a result counts only when two sellers of
different accounts agree on it) or, with --local, in this machine's own
sandbox.  The study writes to DIR (default study-out/):

    results.csv    one row per image: size, mean gray, and for each blur
                   width the MSE of the raster and of the serpentine result
    summary.txt    the aggregate table (also printed)
    summary.json   the same, with the run's figures (wall time, images/s,
                   CPU seconds, CPUCoins spent, the native check)
    study.png      the picture: raster vs serpentine MSE per blur width,
                   and how the difference is distributed

and then runs a sample of the images again with the very same kernel
compiled natively (native.c), and checks that every measure is bit-identical.
Exit status: 0 when every image has a result and the sample agrees.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import queue
import statistics
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if str(HERE.parent.parent / "src") not in sys.path:
    sys.path.insert(1, str(HERE.parent.parent / "src"))

import fsjob  # noqa: E402
import pool as imagepool  # noqa: E402

# Groups of image kinds, for the colours of the plot
GROUPS = {
    "photographs": ("photo", "crop", "mri", "relief"),
    "textures, noise": ("texture", "noise", "mixed"),
    "smooth, flat": ("gradient", "radial", "flat"),
    "patterns, shapes": ("checker", "rings", "grating", "shapes"),
}
GROUP_COLOURS = {"photographs": "#d62728", "textures, noise": "#2ca02c",
                 "smooth, flat": "#1f77b4", "patterns, shapes": "#ff7f0e"}


def kind_of(name: str) -> str:
    return name.split("-", 1)[0]


def group_of(name: str) -> str:
    k = kind_of(name)
    for g, kinds in GROUPS.items():
        if k in kinds:
            return g
    return "patterns, shapes"


def sigma_label(sigma16: int) -> str:
    return f"{sigma16 / 16:g}"


@dataclass
class Outcome:
    """One image's result, whatever ran it."""
    index: int
    name: str
    width: int
    height: int
    ok: bool
    error: str = ""
    measures: fsjob.Measures | None = None
    output: bytes = b""
    cpu_ms: int = 0
    cost_milli: int = 0
    attempts: int = 1


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_seconds: float = 0.0
    mode: str = ""
    redundancy: int = 1
    per_task: int = 1
    samples: dict[int, bytes] = field(default_factory=dict)   # index -> input, for the check


# -- feeding the pool ------------------------------------------------------------

class Feeder:
    """Encodes the pool in a background thread, a bounded distance ahead of
    the tasks, so generating images overlaps running them."""

    def __init__(self, n: int, sigmas16, sample: set[int], ahead: int = 64):
        self.n = n
        self.sigmas16 = tuple(sigmas16)
        self.sample = sample
        self.meta: dict[int, tuple[str, int, int]] = {}
        self.samples: dict[int, bytes] = {}
        self._q: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="pool-feeder", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for i, im in enumerate(imagepool.pool(self.n)):
                msg = fsjob.encode(im.width, im.height, im.pixels, sigmas16=self.sigmas16)
                self.meta[i] = (im.name, im.width, im.height)
                if i in self.sample:
                    self.samples[i] = msg
                while not self._stop.is_set():
                    try:
                        self._q.put(msg, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:       # handed to the consumer
            self._q.put(e)
            return
        self._q.put(None)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self._q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()


def sample_indices(n: int, k: int) -> set[int]:
    """k indices spread evenly over 0..n-1 (always the first and the last)."""
    if n <= 0 or k <= 0:
        return set()
    if k >= n:
        return set(range(n))
    return {round(j * (n - 1) / (k - 1)) for j in range(k)} if k > 1 else {0}


# -- progress --------------------------------------------------------------------

class Progress:
    def __init__(self, total: int, stream=sys.stderr, quiet: bool = False):
        self.total, self.stream, self.quiet = total, stream, quiet
        self.tty = stream.isatty()
        self.done = self.failed = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._next_pct = 10

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if self.quiet:
            return
        now = time.monotonic()
        pct = 100 * self.done // max(self.total, 1)
        if self.tty and (now - self._last > 0.2 or self.done == self.total):
            self._last = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif not self.tty and (pct >= self._next_pct or self.done == self.total):
            self._next_pct = pct - pct % 10 + 10
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        el = max(now - self.start, 1e-9)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        filled = width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        fail = f"  {self.failed} failed" if self.failed else ""
        return (f"[{bar}] {self.done}/{self.total} images  {rate:6.1f}/s  "
                f"eta {eta:5.0f} s{fail}")


# -- running the tasks -------------------------------------------------------------

def _outcome(index: int, meta, output: bytes, exit_status, error: str = "", **kw) -> Outcome:
    name, w, h = meta
    if error:
        return Outcome(index, name, w, h, False, error, output=output, **kw)
    try:
        m = fsjob.decode(output, where=f"image {index} ({name})")
    except fsjob.JobError as e:
        return Outcome(index, name, w, h, False, f"{e} (exit status {exit_status})", output=output, **kw)
    if exit_status != 0:
        return Outcome(index, name, w, h, False, f"exit status {exit_status}", output=output, **kw)
    return Outcome(index, name, w, h, True, measures=m, output=output, **kw)


def _task_outcomes(first: int, count: int, meta, output: bytes, exit_status, error: str = "",
                   cpu_ms: int = 0, cost_milli: int = 0, attempts: int = 1) -> list[Outcome]:
    """The images first..first+count-1 that one task ran, from its output."""
    def share(total: int, j: int) -> int:     # the task's total split without loss
        return total // count + (1 if j < total % count else 0)

    def per_image(j: int) -> dict:
        return {"cpu_ms": share(cpu_ms, j), "cost_milli": share(cost_milli, j),
                "attempts": attempts}

    if error:
        return [_outcome(first + j, meta[first + j], b"", exit_status, error, **per_image(j))
                for j in range(count)]
    parts, rest = fsjob.split_outputs(output)
    outs = []
    for j in range(count):
        i = first + j
        per = per_image(j)
        if j < len(parts):
            outs.append(_outcome(i, meta[i], parts[j], 0, **per))
        elif j == len(parts):
            outs.append(_outcome(i, meta[i], rest, exit_status, **per))
        else:
            outs.append(_outcome(i, meta[i], b"", exit_status,
                                 "not run: an earlier image of its task failed", **per))
    if exit_status != 0 and len(parts) == count:
        outs = [_outcome(o.index, meta[o.index], o.output, exit_status,
                         f"exit status {exit_status} after a complete output", **per_image(j))
                for j, o in enumerate(outs)]
    return outs


def _batches(messages, per_task: int):
    """Concatenate every per_task consecutive messages: one task's input."""
    batch = []
    for m in messages:
        batch.append(m)
        if len(batch) == per_task:
            yield b"".join(batch)
            batch = []
    if batch:
        yield b"".join(batch)


def run_market(order_path: str, n: int, *, redundancy: int = 2, per_task: int = 1,
               sigmas16=fsjob.DEFAULT_SIGMAS16, check: int = 20, build_dir: Path,
               quiet: bool = False) -> Run:
    """Send the first n images of the pool through the market, per_task
    images in each task (the job processes one message after the other)."""
    from cpushare import bytecode
    from cpushare.buyer import Market
    from cpushare.order import load_buy

    order = load_buy(order_path)
    image = bytecode.load(fsjob.build_job(build_dir))
    feeder = Feeder(n, sigmas16, sample_indices(n, check))
    run = Run(mode="market", redundancy=redundancy, per_task=per_task)
    progress = Progress(n, quiet=quiet)

    async def go() -> None:
        async with Market(order) as market:
            async for r in market.map(image, _batches(feeder, per_task), redundancy=redundancy):
                first = r.index * per_task
                count = min(per_task, n - first)
                error = ""
                if r.code is not None:
                    error = f"the market failed the task: {r.code}: {r.reason}"
                elif r.signal is not None:
                    error = f"killed by signal {r.signal} ({r.reason})"
                for o in _task_outcomes(first, count, feeder.meta, r.output, r.exit_status, error,
                                        cpu_ms=r.cpu_ms, cost_milli=r.cost_milli,
                                        attempts=r.attempts):
                    run.outcomes.append(o)
                    progress.update(o.ok)

    start = time.monotonic()
    try:
        asyncio.run(go())
    finally:
        feeder.close()
    run.wall_seconds = time.monotonic() - start
    run.samples = feeder.samples
    return run


def run_local(n: int, *, jobs: int = 0, per_task: int = 1, sigmas16=fsjob.DEFAULT_SIGMAS16,
              check: int = 20, build_dir: Path, quiet: bool = False) -> Run:
    """Run the first n images in this machine's sandbox, `jobs` tasks at a time."""
    from cpushare import bytecode, sandbox

    image = bytecode.load(fsjob.build_job(build_dir))
    limits = sandbox.Limits(cpu_seconds=10 * per_task, wall_seconds=60 * per_task)
    feeder = Feeder(n, sigmas16, sample_indices(n, check))
    run = Run(mode="local", redundancy=1, per_task=per_task)
    progress = Progress(n, quiet=quiet)
    jobs = jobs or os.cpu_count() or 1

    def one(task: int, data: bytes) -> list[Outcome]:
        r = sandbox.run(image, data, limits)
        error = "" if r.signal is None else f"killed by signal {r.signal} ({r.reason})"
        first = task * per_task
        return _task_outcomes(first, min(per_task, n - first), feeder.meta, r.output,
                              r.exit_status, error, cpu_ms=round(r.cpu_seconds * 1000))

    start = time.monotonic()
    try:
        with ThreadPoolExecutor(jobs) as ex:
            pending: set = set()
            for t, data in enumerate(_batches(feeder, per_task)):
                pending.add(ex.submit(one, t, data))
                if len(pending) >= 2 * jobs:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    _collect(done, run, progress)
            _collect(pending, run, progress)
    finally:
        feeder.close()
    run.wall_seconds = time.monotonic() - start
    run.samples = feeder.samples
    return run


def _collect(futures, run: Run, progress: Progress) -> None:
    for f in futures:
        for o in f.result():
            run.outcomes.append(o)
            progress.update(o.ok)


# -- the check against a native run ------------------------------------------------

def check_native(run: Run, build_dir: Path) -> dict:
    """Run the sampled inputs with the native kernel; compare output bytes."""
    native = fsjob.build_native(build_dir)
    by_index = {o.index: o for o in run.outcomes}
    indices = sorted(i for i in run.samples if i in by_index and by_index[i].ok)
    results = fsjob.run_native_batch(native, [run.samples[i] for i in indices])
    mismatches = [by_index[i].name for i, (status, out) in zip(indices, results)
                  if status != 0 or out != by_index[i].output]
    return {"checked": len(indices), "identical": len(indices) - len(mismatches),
            "mismatches": mismatches}


# -- the results ----------------------------------------------------------------------

def rows(run: Run) -> list[dict]:
    out = []
    for o in sorted(run.outcomes, key=lambda o: o.index):
        row = {"index": o.index, "name": o.name, "kind": kind_of(o.name), "width": o.width,
               "height": o.height, "ok": int(o.ok), "error": o.error}
        m = o.measures
        if m is not None:
            row.update(mean=f"{m.mean:.4f}", mean_raster=f"{m.mean_raster:.4f}",
                       mean_serpentine=f"{m.mean_serpentine:.4f}",
                       differ_fraction=f"{m.differ / m.pixels:.6f}")
            for i, b in enumerate(m.blurs):
                r, s = m.mse(i)
                lab = sigma_label(b.sigma16)
                row[f"mse_raster_s{lab}"] = f"{r:.6f}"
                row[f"mse_serpentine_s{lab}"] = f"{s:.6f}"
        row.update(cpu_ms=o.cpu_ms, cost_milli=o.cost_milli, attempts=o.attempts)
        out.append(row)
    return out


def write_csv(run: Run, path: Path) -> None:
    data = rows(run)
    fields: list[str] = []
    for r in data:
        fields.extend(k for k in r if k not in fields)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(data)


def aggregate(outcomes: list[Outcome]) -> list[dict]:
    """Per blur width: mean/median MSE of each scan and how often serpentine wins."""
    good = [o.measures for o in outcomes if o.ok and o.measures is not None]
    if not good:
        return []
    table = []
    for i, b in enumerate(good[0].blurs):
        pairs = [m.mse(i) for m in good]
        r = [p[0] for p in pairs]
        s = [p[1] for p in pairs]
        ratios = [b_ / a for a, b_ in pairs if a > 0]
        table.append({
            "sigma": b.sigma16 / 16,
            "images": len(pairs),
            "mean_raster": statistics.fmean(r),
            "mean_serpentine": statistics.fmean(s),
            "median_raster": statistics.median(r),
            "median_serpentine": statistics.median(s),
            "serpentine_better": sum(1 for a, b_ in pairs if b_ < a),
            "raster_better": sum(1 for a, b_ in pairs if a < b_),
            "ties": sum(1 for a, b_ in pairs if a == b_),
            "median_ratio": statistics.median(ratios) if ratios else float("nan"),
        })
    return table


def format_table(table: list[dict]) -> str:
    head = (f"{'blur sigma':>10}  {'images':>6}  {'mean MSE raster':>15}  {'serpentine':>10}  "
            f"{'median raster':>13}  {'serpentine':>10}  {'serp/raster':>11}  {'serpentine better':>17}")
    lines = [head, "-" * len(head)]
    for t in table:
        sigma = "none" if t["sigma"] == 0 else f"{t['sigma']:g} px"
        wins = f"{t['serpentine_better']} ({100 * t['serpentine_better'] / t['images']:.0f}%)"
        lines.append(f"{sigma:>10}  {t['images']:>6}  {t['mean_raster']:>15.3f}  "
                     f"{t['mean_serpentine']:>10.3f}  {t['median_raster']:>13.3f}  "
                     f"{t['median_serpentine']:>10.3f}  {t['median_ratio']:>11.3f}  {wins:>17}")
    lines.append("(MSE in gray levels squared, after a Gaussian blur of the given sigma; "
                 "serp/raster: median ratio of the two MSEs per image)")
    return "\n".join(lines)


def plot(outcomes: list[Outcome], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    good = [o for o in outcomes if o.ok and o.measures is not None]
    if not good:
        return
    blurs = good[0].measures.blurs
    cols = len(blurs)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 8.4), squeeze=False,
                             gridspec_kw={"height_ratios": [1.25, 1]})
    groups = np.array([group_of(o.name) for o in good])
    size, alpha = (10, 0.6) if len(good) <= 1500 else (4, 0.35)
    for i, b in enumerate(blurs):
        pairs = np.array([o.measures.mse(i) for o in good])
        r, s = pairs[:, 0], pairs[:, 1]
        # Axes over the bulk of the images; the few beyond (flat images that
        # dither exactly have MSE 0) are drawn on the frame.
        positive = pairs[pairs > 0]
        if positive.size:
            lo, hi = np.percentile(positive, 0.2) / 1.5, np.percentile(positive, 99.8) * 1.5
        else:
            lo, hi = 1e-3, 1.0
        rc, sc = np.clip(r, lo, hi), np.clip(s, lo, hi)
        ax = axes[0][i]
        # the biggest group first, so the smaller ones stay visible on top
        for g in sorted(GROUP_COLOURS, key=lambda g: -int((groups == g).sum())):
            sel = groups == g
            if sel.any():
                ax.scatter(rc[sel], sc[sel], s=size, alpha=alpha, color=GROUP_COLOURS[g],
                           label=f"{g} ({int(sel.sum())})", linewidths=0)
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("raster scan MSE")
        if i == 0:
            ax.set_ylabel("serpentine scan MSE")
        wins = int((s < r).sum())
        sig = "no blur" if b.sigma16 == 0 else f"blur \u03c3 = {b.sigma16 / 16:g} px"
        ax.set_title(f"{sig}\nserpentine better on {100 * wins / len(good):.0f}% of images",
                     fontsize=11)
        ax.text(0.04, 0.96, "serpentine worse", transform=ax.transAxes, va="top", fontsize=8,
                color="0.35")
        ax.text(0.96, 0.04, "serpentine better", transform=ax.transAxes, ha="right", fontsize=8,
                color="0.35")
        ax.grid(True, which="major", alpha=0.3)

        ax = axes[1][i]
        ok = (r > 0) & (s > 0)
        change = 100 * (s[ok] / r[ok] - 1)
        lim = max(5.0, float(np.percentile(np.abs(change), 98))) if change.size else 5.0
        bins = np.linspace(-lim, lim, 41)
        ax.hist(np.clip(change, -lim, lim), bins=bins, color="#555555", alpha=0.85)
        ax.axvline(0, color="black", lw=1)
        if change.size:
            med = float(np.median(change))
            ax.axvline(med, color="#d62728", lw=2)
            ax.text(med, ax.get_ylim()[1] * 0.95, f" median {med:+.1f}% ", color="#d62728",
                    va="top", ha="right" if med < 0 else "left", fontsize=9)
        ax.set_xlabel("serpentine MSE vs raster, % (left: serpentine better)")
        if i == 0:
            ax.set_ylabel("images")
    leg = axes[0][0].legend(loc="lower right", bbox_to_anchor=(1.0, 0.12), fontsize=8,
                            framealpha=0.9)
    for h in getattr(leg, "legend_handles", None) or getattr(leg, "legendHandles", []):
        h.set_alpha(1.0)
        h.set_sizes([25])
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.96), h_pad=2.5)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main -------------------------------------------------------------------------

def summarize(run: Run, out_dir: Path, check: dict | None, n: int) -> dict:
    table = aggregate(run.outcomes)
    ok = sum(o.ok for o in run.outcomes)
    summary = {
        "mode": run.mode,
        "images": n,
        "results": len(run.outcomes),
        "ok": ok,
        "failed": [f"{o.name}: {o.error}" for o in run.outcomes if not o.ok][:20],
        "redundancy": run.redundancy,
        "images_per_task": run.per_task,
        "tasks": -(-len(run.outcomes) // run.per_task) * run.redundancy,
        "wall_seconds": run.wall_seconds,
        "images_per_second": len(run.outcomes) / run.wall_seconds if run.wall_seconds else 0.0,
        # cpu_ms is one copy's CPU time (the market reports the agreed result's)
        "cpu_seconds_per_copy": sum(o.cpu_ms for o in run.outcomes) / 1000,
        "cost_milli": sum(o.cost_milli for o in run.outcomes),
        "retries": sum(max(o.attempts - run.redundancy, 0) for o in run.outcomes),
        "table": table,
        "native_check": check,
        "csv": str(out_dir / "results.csv"),
        "plot": str(out_dir / "study.png"),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The Floyd-Steinberg study: raster vs serpentine "
                                "error diffusion over the image pool, on the CPUShare market.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--order", metavar="FILE.buy", help="buy order (credentials) to use")
    where.add_argument("--local", action="store_true", help="run in this machine's sandbox")
    p.add_argument("--images", type=int, default=1000, help="pool size (default 1000, max 10000)")
    p.add_argument("--redundancy", type=int, default=2, help="sellers per task (default 2)")
    p.add_argument("--per-task", type=int, default=4, metavar="K",
                   help="images per task (default 4): fewer, longer tasks spread the "
                        "market's cost per task; redundancy applies to whole tasks")
    p.add_argument("--jobs", type=int, default=0, help="--local: tasks at a time (default: cores)")
    p.add_argument("--check", type=int, default=20, help="images to check natively (default 20)")
    p.add_argument("--out", default="study-out", help="output directory (default study-out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 1 <= args.images <= imagepool.MAX_IMAGES:
        p.error(f"--images {args.images}: the pool has 1..{imagepool.MAX_IMAGES} images")
    if args.redundancy < 1:
        p.error(f"--redundancy {args.redundancy}: must be at least 1")
    if not 1 <= args.per_task <= 64:
        p.error(f"--per-task {args.per_task}: must be 1..64")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build = out / "build"

    where = "this machine's sandbox" if args.local else f"the market ({args.order})"
    print(f"study: {args.images} images through {where}"
          + ("" if args.local else f", redundancy {args.redundancy}"), flush=True)
    try:
        if args.local:
            run = run_local(args.images, jobs=args.jobs, per_task=args.per_task,
                            check=args.check, build_dir=build, quiet=args.quiet)
        else:
            run = run_market(args.order, args.images, redundancy=args.redundancy,
                             per_task=args.per_task, check=args.check, build_dir=build,
                             quiet=args.quiet)
    except KeyboardInterrupt:
        print("study: interrupted", file=sys.stderr)
        return 130
    except Exception as e:       # a clear line, not a traceback, for the usual failures
        print(f"study: {type(e).__name__}: {e}", file=sys.stderr)
        return 1

    check = check_native(run, build) if args.check else None
    write_csv(run, out / "results.csv")
    summary = summarize(run, out, check, args.images)
    table = format_table(summary["table"])
    (out / "summary.txt").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    via = "the local sandbox" if args.local else f"CPUShare, redundancy {run.redundancy}"
    plot(run.outcomes, out / "study.png",
         f"Floyd-Steinberg error diffusion, raster vs serpentine scan: "
         f"{summary['ok']} images via {via}")

    print()
    print(table)
    print()
    print(f"images {summary['ok']}/{args.images} ok, {summary['tasks']} tasks, "
          f"wall {run.wall_seconds:.1f} s, {summary['images_per_second']:.1f} images/s, "
          f"CPU {summary['cpu_seconds_per_copy']:.1f} s per copy"
          + ("" if args.local else f", spent {summary['cost_milli'] / 1000:.3f} CPUCoins"
             f", retries {summary['retries']}"))
    if check is not None:
        verdict = "bit-identical" if not check["mismatches"] else \
            f"MISMATCH on {', '.join(check['mismatches'])}"
        print(f"native check: {check['identical']}/{check['checked']} sampled results {verdict}")
    for line in summary["failed"]:
        print(f"failed: {line}")
    print(f"results: {out / 'results.csv'}\nplot: {out / 'study.png'}")
    bad = summary["ok"] != args.images or (check is not None and (
        check["mismatches"] or check["checked"] == 0))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
