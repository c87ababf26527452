"""`cpushare`: the buyer's and the tinkerer's command.

Each subcommand lives in its own module, which provides
``configure(parser)`` and ``main(args) -> int``; they are imported only
when used so that ``cpushare cc`` starts fast and needs no network code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS = {
    "cc": ("cpushare.toolchain.cli", "build a bytecode image from C sources"),
    "run": ("cpushare.runjob", "run a bytecode image locally in the seller's sandbox"),
    "buy": ("cpushare.buyer.cli", "buy CPU time: run one task per input file on the market"),
    "cluster": ("cpushare.buyer.clustercli", "lease nodes that boot an ISO (kvm) and steer them"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpushare", description="Buy CPU time on the CPUShare market and build jobs for it.")
    parser.add_argument("--version", action="version", version=f"cpushare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=modname)
        importlib.import_module(modname).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).main(args)


if __name__ == "__main__":
    sys.exit(main())
