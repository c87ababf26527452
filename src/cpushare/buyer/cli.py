"""``cpushare buy``: run one task per input file on the market."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import sys
import time
from contextlib import aclosing
from pathlib import Path
from typing import Iterable

from .. import bytecode
from ..fileutil import atomic_write
from ..order import MAX_SECONDS, RANGES, OrderError, format_coins, load_buy
from . import Market, MarketError, TaskResult

EPILOG = """\
Each INPUT file is the standard input of one task.  The output of the task
for INPUT is written to DIR/<basename of INPUT>.out (so input names must be
distinct).  On a terminal a progress bar is shown; otherwise one line per
finished task.

An output is on disk (written to a temporary file, synced and renamed)
before the market is told it may drop its copy.  A connection lost at any
moment (the market restarting, or too busy to take it) is made again with
backoff for up to 5 minutes, and the tasks without a result are sent
again; a result that comes twice is written once.  Only the market's
refusal (the certificate or the protocol version) stops at once.

With --timeout, or on an interrupt (Ctrl-C), the tasks without a result
are cancelled: the market refunds their escrow, and the summary counts
them.  Outputs of the tasks that finished are written all the same.

Exit status: 0 if every task succeeded (exit status 0), 1 if some failed
or were cancelled (each is named on standard error), 2 for a usage error or
an unusable file, 130 after an interrupt.
"""


def _redundancy(text: str) -> int:
    """--redundancy K: in the range of a buy order's redundancy."""
    r = RANGES["redundancy"]
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value not in r:
        raise argparse.ArgumentTypeError(f"must be {r}, not {text}")
    return value


def _timeout(text: str) -> float:
    """--timeout SECONDS: more than 0, at most a year."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_SECONDS} seconds, not {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--order", required=True, metavar="FILE.buy", type=Path,
                        help="buyer credentials and buy order (from cpushare-server buy-order add)")
    parser.add_argument("--redundancy", type=_redundancy, metavar="K",
                        help="run each task on K sellers of different accounts and accept "
                             f"agreeing outputs ({RANGES['redundancy']}; default: the "
                             "buy order's)")
    parser.add_argument("--output-dir", required=True, metavar="DIR", type=Path,
                        help="where to write INPUT's output as DIR/<basename of INPUT>.out")
    parser.add_argument("--timeout", type=_timeout, metavar="SECONDS",
                        help="cancel the tasks that have no result after this long "
                             "(their escrow is refunded)")
    parser.add_argument("job", metavar="JOB.bin", type=Path, help="the bytecode image to run")
    parser.add_argument("inputs", metavar="INPUT", type=Path, nargs="+",
                        help="one input file per task")


def _err(text: str) -> None:
    print(f"cpushare buy: {text}", file=sys.stderr)


class _Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.done = 0
        self.failed = 0
        self._last = 0.0

    def update(self, name: str, r: TaskResult) -> None:
        self.done += 1
        self.failed += not r.ok
        if not self.tty:
            state = "ok" if r.ok else f"FAILED ({_why(r)})"
            print(f"[{self.done}/{self.total}] {name}: {state}", file=self.stream, flush=True)
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done != self.total:
            return
        self._last = now
        width = 30
        filled = width * self.done // max(1, self.total)
        bar = "#" * filled + "-" * (width - filled)
        fail = f", {self.failed} failed" if self.failed else ""
        self.stream.write(f"\r[{bar}] {self.done}/{self.total}{fail}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _why(r: TaskResult) -> str:
    if r.code is not None:
        return r.reason
    if r.signal is not None:
        return f"killed by signal {r.signal}" + (f": {r.reason}" if r.reason else "")
    return f"exit status {r.exit_status}" + (f": {r.reason}" if r.reason else "")


def main(args: argparse.Namespace) -> int:
    for option, check, value in (("--redundancy", _redundancy, args.redundancy),
                                 ("--timeout", _timeout, args.timeout)):
        try:  # a namespace made without the parser
            if value is not None:
                check(str(value))
        except argparse.ArgumentTypeError as e:
            _err(f"argument {option}: {e}")
            return 2
    try:
        order = load_buy(args.order)
    except OrderError as e:
        _err(str(e))
        return 2
    try:
        image = bytecode.load(args.job)
    except OSError as e:
        _err(f"{args.job}: cannot read the job: {e.strerror}")
        return 2
    except bytecode.BytecodeError as e:
        _err(str(e))
        return 2
    names: dict[str, Path] = {}
    for p in args.inputs:
        if p.name in names:
            _err(f"{p} and {names[p.name]} would both write {args.output_dir / (p.name + '.out')}")
            return 2
        names[p.name] = p
    for p in args.inputs:  # checked now, read as the tasks are submitted
        try:
            with open(p, "rb"):
                pass
        except OSError as e:
            _err(f"{p}: cannot read the input: {e.strerror}")
            return 2
        if not p.is_file():
            _err(f"{p}: not a regular file")
            return 2
    datas = (p.read_bytes() for p in args.inputs)
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _err(f"{args.output_dir}: cannot create the output directory: {e.strerror}")
        return 2
    try:
        return asyncio.run(_buy(order, image, args.inputs, datas, args.output_dir,
                                args.redundancy, args.timeout))
    except MarketError as e:
        _err(e.message if e.message.startswith(order.server) else f"{order.server}: {e}")
        return 1 if e.code == "funds" else 2 if e.code in ("auth", "version", "order", "image") \
            else 1
    except KeyboardInterrupt:
        return 130


async def _buy(order, image, paths: list[Path], datas: Iterable[bytes], out_dir: Path,
               redundancy: int | None, timeout: float | None = None) -> int:
    progress = _Progress(len(paths))
    failed: list[tuple[Path, TaskResult]] = []
    k = redundancy or order.redundancy
    stopped = ""
    cancelled = (0, 0, 0)
    cpu_ms = cost = retries = 0

    async def collect(m: Market) -> None:
        nonlocal cpu_ms, cost, retries
        async with aclosing(m.map(image, datas, redundancy=redundancy, ack=False)) as results:
            async for r in results:
                path = paths[r.index]
                stored = True
                if r.code is None:
                    target = out_dir / (path.name + ".out")
                    try:
                        atomic_write(target, r.output)
                        _sync_dir(out_dir)
                    except OSError as e:
                        stored = False  # the market keeps it
                        r = dataclasses.replace(r, code="output",
                                                reason=f"cannot write {target}: {e.strerror}")
                if stored:
                    m.ack(r)
                cpu_ms += r.cpu_ms
                cost += r.cost_milli
                retries += max(0, r.attempts - k)
                if not r.ok:
                    failed.append((path, r))
                progress.update(path.name, r)

    m = Market(order)
    try:
        try:
            async with asyncio.timeout(timeout):
                await m.connect()
                await collect(m)
        except TimeoutError:
            stopped = f"not finished within {timeout:g} s"
        except asyncio.CancelledError:  # Ctrl-C
            stopped = "interrupted"
        if stopped:
            if progress.tty:
                sys.stderr.write("\n")
            cancelled = await m.cancelled()
        retries += m.resubmitted
    finally:
        await m.close()
    for path, r in failed:
        _err(f"{path}: task {r.task if r.task is not None else '-'} failed: {_why(r)}")
    unfinished = len(paths) - progress.done
    if stopped:
        n, finished, unanswered = cancelled
        _err(f"{stopped}: {unfinished} tasks without a result cancelled ({n} refunded"
             + (f", {finished} finished meanwhile" if finished else "")
             + (f", {unanswered} not confirmed by the market" if unanswered else "") + ")")
    print(f"{len(paths)} tasks, {len(failed)} failed, "
          + (f"{unfinished} cancelled, " if stopped else "")
          + f"{cpu_ms / 1000:.3f} CPU seconds, {format_coins(cost)} CPUCoins spent, "
          f"{retries} retries")
    if stopped == "interrupted":
        raise KeyboardInterrupt
    return 1 if failed or stopped else 0


def _sync_dir(path: Path) -> None:
    """Put the directory's entries (a rename into it) on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
