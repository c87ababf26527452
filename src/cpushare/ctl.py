"""`cpusharectl`: the seller's control command.

Each subcommand is a function ``cmd_NAME(args) -> int`` registered in
COMMANDS with its help text and a function that adds its arguments.
`check` asks only the kernel; the commands that talk to a running daemon
(status, pause, resume) speak D-Bus and never import the seller core.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import __version__, kernel


def cmd_check(args: argparse.Namespace) -> int:
    """Print what this machine can sell; 1 when seccomp is missing."""
    report = kernel.probe()
    for line in report.lines():
        print(line)
    try:
        kernel.require_seccomp(report)
    except kernel.KernelError as e:
        print(f"cpusharectl check: {e}", file=sys.stderr)
        return 1
    return 0


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


# name -> (function, help, configure(parser))
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str,
                          Callable[[argparse.ArgumentParser], None]]] = {
    "check": (cmd_check, "show what this machine can sell (seccomp, KVM); "
                         "exit 1 if the kernel lacks CONFIG_SECCOMP", _no_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpusharectl", description="Control the CPUShare seller.")
    parser.add_argument("--version", action="version", version=f"cpusharectl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (func, help_, configure) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_func=func)
        configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args._func(args)


if __name__ == "__main__":
    sys.exit(main())
