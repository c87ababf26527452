"""`cpushare run JOB.bin`: run an image locally in exactly the seller's sandbox.

Standard input goes to the job, its output to standard output.  The exit
status is the job's, or 128+signal when it was killed; when the job did not
exit with status 0 one line on standard error says why.
"""

from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'256M' -> 268435456; plain numbers are bytes; K/M/G/T are powers of 1024."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (expected bytes, or a number with K, M, G or T)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"seconds must be positive, not {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    from .sandbox import Limits  # light: no extension import at parse time

    d = Limits()
    parser.add_argument("image", metavar="JOB.bin", help="the bytecode image to run")
    parser.add_argument("--cpu-seconds", type=_seconds, default=d.cpu_seconds,
                        help=f"CPU time limit (default {d.cpu_seconds:g}; whole seconds, rounded up)")
    parser.add_argument("--wall-seconds", type=_seconds, default=d.wall_seconds,
                        help=f"wall-clock limit (default {d.wall_seconds:g})")
    parser.add_argument("--memory", type=parse_size, default=d.memory, metavar="BYTES",
                        help="refuse an image that needs more memory than this (default 256M)")
    parser.add_argument("--output-limit", type=parse_size, default=d.output, metavar="BYTES",
                        help="kill the job when it writes more than this (default 64M)")
    parser.add_argument("--allow-tsc", action="store_true",
                        help="let the job read the time-stamp counter (rdtsc)")


def main(args: argparse.Namespace) -> int:
    from . import bytecode, sandbox

    prog = "cpushare run"
    try:
        image = bytecode.load(args.image)
    except bytecode.BytecodeError as e:  # already starts with the path
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{prog}: {args.image}: {e.strerror or e}", file=sys.stderr)
        return 2
    limits = sandbox.Limits(cpu_seconds=args.cpu_seconds, wall_seconds=args.wall_seconds,
                            memory=args.memory, output=args.output_limit,
                            allow_tsc=args.allow_tsc)
    try:
        job = sandbox.start(image, limits)
    except sandbox.MemoryLimitError as e:
        print(f"{prog}: {args.image}: {e}", file=sys.stderr)
        return 2
    except sandbox.SandboxError as e:
        print(f"{prog}: sandbox set-up failed: {e}", file=sys.stderr)
        return 3
    try:
        result = job.stream(sys.stdin.buffer, sys.stdout.buffer)
    except (BrokenPipeError, KeyboardInterrupt) as e:
        job.kill()
        job.wait()
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "output closed"
        print(f"{prog}: {args.image}: {what}: job killed", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 141
    if not result.ok:
        print(f"{prog}: {args.image}: {result.describe()}", file=sys.stderr)
    return result.shell_status
