"""`cpushare cc`: build a bytecode image from C sources."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..bytecode import DEFAULT_STACK_SIZE
from . import ToolchainError, build, parse_size

# gcc options passed through as they are written: -O2, -DNAME=1, -Iinc,
# -Wall, -fno-strict-aliasing, -march=native, -g, -std=c11.
_PASS = {
    "-D": "define a macro (-DNAME or -DNAME=VALUE)",
    "-U": "undefine a macro",
    "-I": "add an include directory",
    "-W": "warning option (-Wall, -Werror, ...)",
    "-f": "code generation option (-funroll-loops, ...)",
    "-m": "machine option (-march=native, ...)",
}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [-o JOB.bin] [-O2 ...] [--stack-size N] FILE.c..."
    parser.epilog = ("Compiles freestanding C (int main(void); #include <cpushare.h>) with the "
                     "system gcc and writes a bytecode image.  See cpushare-bytecode(5).")
    parser.add_argument("sources", nargs="+", metavar="FILE.c", help="C sources of the job")
    parser.add_argument("-o", dest="output", metavar="JOB.bin",
                        help="image to write (default: the first source's name with .bin)")
    parser.add_argument("--stack-size", type=_size, default=DEFAULT_STACK_SIZE, metavar="N",
                        help=f"stack bytes, K/M suffix allowed, rounded up to a page "
                             f"(default {DEFAULT_STACK_SIZE >> 20}M)")
    parser.add_argument("--save-elf", metavar="FILE", help="also keep the linked ELF (for objdump)")
    parser.add_argument("-O", dest="cflags", action="append", nargs="?", const="-O",
                        type=lambda v: "-O" + v if v != "-O" else v, metavar="LEVEL",
                        help="optimisation level (default -O2)")
    parser.add_argument("-g", dest="cflags", action="append_const", const="-g",
                        help="debugging information (kept in --save-elf only)")
    parser.add_argument("-std", dest="cflags", action="append", type=lambda v: "-std=" + v.lstrip("="),
                        metavar="STD", help="language standard (-std=c11)")
    for flag, help_ in _PASS.items():
        parser.add_argument(flag, dest="cflags", action="append",
                            type=lambda v, flag=flag: flag + v, metavar="OPT", help=help_)
    parser.set_defaults(cflags=None)


def main(args: argparse.Namespace) -> int:
    sources = [Path(s) for s in args.sources]
    output = Path(args.output) if args.output else Path(sources[0].stem + ".bin")
    try:
        image = build(sources, output, cflags=args.cflags or (), stack_size=args.stack_size,
                      elf_output=args.save_elf, diagnostics=sys.stderr)
    except ToolchainError as e:
        if e.output:  # what gcc or ld said, passed through as it is
            sys.stderr.write(e.output if e.output.endswith("\n") else e.output + "\n")
        print(f"cpushare cc: error: {e.args[0]}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cpushare cc: error: {output}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"{output}: text {len(image.text)}, data {len(image.data)}, bss {image.bss_size}, "
          f"stack {image.stack_size} bytes; sha256 {image.digest}", file=sys.stderr)
    return 0
