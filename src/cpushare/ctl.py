"""`cpusharectl`: the seller's control command.

Each subcommand is a function ``cmd_NAME(args) -> int`` registered in
COMMANDS with its help text and a function that adds its arguments.
`check` asks the kernel, and for the kvm model looks for qemu and boots the
probe guest under each accelerator (`cpushare.models.probe`); the commands
that talk to a running daemon (status, pause, resume) speak D-Bus and never
import the seller core.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any, Callable

from . import __version__, kernel

# Exit statuses of the commands that talk to daemons (cpusharectl(1)).
EXIT_OK = 0
EXIT_FAILURE = 1  # a daemon answered with an error
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_NOT_RUNNING = 3  # no such instance runs (like LSB's "program is not running")
EXIT_NO_BUS = 69  # EX_UNAVAILABLE: the bus is unreachable
EXIT_DENIED = 77  # EX_NOPERM: the bus policy refused the call


def _qemu_version(binary: str) -> str | None:
    """The first line of `qemu --version`, or None."""
    import subprocess

    try:
        r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                           env={}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = r.stdout.splitlines()
    return lines[0].strip() if r.returncode == 0 and lines else None


def kvm_model_lines() -> list[str]:
    """The kvm model's lines of `check`: whether qemu is installed, then what
    each accelerator does here, measured by booting the probe guest as the
    user running the command (a second or two)."""
    import shutil

    from .models import probe, qemu

    binary = shutil.which(qemu.QEMU)
    if binary is None:
        return [f"qemu: no ({qemu.QEMU} is not installed; the kvm model needs the Debian "
                f"package qemu-system-x86)"]
    version = _qemu_version(binary)
    lines = [f"qemu: yes ({binary}{', ' + version if version else ''})"]
    return lines + [f"accel {line}" for line in probe.describe()]


def cmd_check(args: argparse.Namespace) -> int:
    """Print what this machine can sell; 1 when seccomp is missing."""
    report = kernel.probe()
    for line in report.lines():
        print(line)
    for line in kvm_model_lines():
        print(line, flush=True)
    try:
        kernel.require_seccomp(report)
    except kernel.KernelError as e:
        print(f"cpusharectl check: {e}", file=sys.stderr)
        return 1
    return 0


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


# --- status, pause, resume: D-Bus only ------------------------------------------

class CtlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _connect(bus: str):
    from gi.repository import GLib

    from . import dbus

    try:
        return dbus.connect(bus)
    except GLib.Error as e:
        raise CtlError(EXIT_NO_BUS, f"cannot connect to the {bus} bus at "
                                    f"{dbus.bus_address(bus)}: {e.message}") from None


def _bus_error(e, bus: str, what: str, instance: str) -> CtlError:
    from . import dbus

    name = dbus.remote_error(e)
    text = dbus.error_message(e)
    if name == dbus.ACCESS_DENIED:
        return CtlError(EXIT_DENIED, f"permission denied: {what} on instance {instance}: "
                                     f"{text} (pause and resume need root or the group "
                                     f"{dbus.ADMIN_GROUP})")
    if name in (dbus.SERVICE_UNKNOWN, dbus.NAME_HAS_NO_OWNER):
        return CtlError(EXIT_NOT_RUNNING, f"no instance {instance} runs on the {bus} bus")
    return CtlError(EXIT_FAILURE, f"{what} on instance {instance} failed: {text}")


def _targets(conn, args: argparse.Namespace, bus: str) -> dict[str, str]:
    """{instance: bus name} for NAME (or every instance with --all / no NAME)."""
    from gi.repository import GLib

    from . import dbus

    try:
        found = dbus.list_instances(conn)
    except GLib.Error as e:
        raise CtlError(EXIT_NO_BUS, f"cannot list names on the {bus} bus: "
                                    f"{dbus.error_message(e)}") from None
    name = getattr(args, "name", None)
    if name:
        if name not in found:
            raise CtlError(EXIT_NOT_RUNNING,
                           f"no instance {name} runs: {dbus.bus_name(name)} is not on the "
                           f"{bus} bus (is cpushare@{name}.service started?)")
        return {name: found[name]}
    if not found:
        raise CtlError(EXIT_NOT_RUNNING, f"no cpushared instance runs on the {bus} bus "
                                         f"(no name starts with {dbus.BUS_NAME_PREFIX}.)")
    return found


def _get_all(conn, bus_name: str) -> dict[str, Any]:
    from gi.repository import Gio, GLib

    from . import dbus

    (props,) = conn.con.call_sync(
        bus_name, dbus.OBJECT_PATH, dbus.PROPERTIES_INTERFACE, "GetAll",
        GLib.Variant("(s)", (dbus.INTERFACE,)), GLib.VariantType("(a{sv})"),
        Gio.DBusCallFlags.NONE, 10_000, None).unpack()
    return props


_GOOD = ("idle", "running")
_WARN = ("starting", "connecting", "paused", "stopping")


def _bullet(state: str, color: bool) -> str:
    dot = "\u25cf" if (sys.stdout.encoding or "").lower().replace("-", "") == "utf8" else "*"
    if not color:
        return dot
    code = "32" if state in _GOOD else "33" if state in _WARN else "31"
    return f"\x1b[{code}m{dot}\x1b[0m"


def _since(usec: int, now: float) -> str:
    if not usec:
        return "-"
    t = usec / 1_000_000
    stamp = dt.datetime.fromtimestamp(t).astimezone().strftime("%a %Y-%m-%d %H:%M:%S %Z")
    ago = max(0, int(now - t))
    if ago < 60:
        rel = f"{ago}s ago"
    elif ago < 3600:
        rel = f"{ago // 60}min {ago % 60}s ago"
    elif ago < 86400:
        rel = f"{ago // 3600}h {ago % 3600 // 60}min ago"
    else:
        rel = f"{ago // 86400}d {ago % 86400 // 3600}h ago"
    return f"{stamp}; {rel}"


def format_status(instance: str, bus_name: str, p: dict[str, Any], *, color: bool = False,
                  now: float | None = None) -> str:
    """One instance, laid out like `systemctl status`."""
    now = time.time() if now is None else now
    task = p["CurrentTask"] or "-"
    if p["CurrentTask"] and p["BuyerOrder"]:
        task += f" (buy order {p['BuyerOrder']})"
    rows = [
        ("State", p["State"]),
        ("Order", f"{p['Order']} ({p['Model']})"),
        ("Server", p["Server"]),
        ("Current task", task),
        ("Tasks done", str(p["TasksDone"])),
        ("CPU sold", f"{p['CpuSecondsSold']:.3f} s"),
        ("Earned", f"{p['CoinsEarned']} CPUCoins"),
        ("Connected since", _since(p["ConnectedSince"], now)),
        ("Last error", p["LastError"] or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{_bullet(p['State'], color)} {instance} - CPUShare seller ({bus_name})"]
    lines += [f"  {k:>{width}}: {v}" for k, v in rows]
    return "\n".join(lines)


def _json_record(instance: str, bus_name: str, p: dict[str, Any]) -> dict[str, Any]:
    coins = p["CoinsEarned"]
    whole, _, frac = coins.lstrip("-").partition(".")
    milli = int(whole) * 1000 + int((frac + "000")[:3])
    return {
        "instance": instance, "bus_name": bus_name, "state": p["State"], "order": p["Order"],
        "model": p["Model"], "server": p["Server"], "current_task": p["CurrentTask"] or None,
        "buyer_order": p["BuyerOrder"] or None, "tasks_done": p["TasksDone"],
        "cpu_seconds_sold": p["CpuSecondsSold"], "coins_earned": coins,
        "coins_earned_milli": -milli if coins.startswith("-") else milli,
        "connected_since": p["ConnectedSince"] / 1_000_000 if p["ConnectedSince"] else None,
        "last_error": p["LastError"] or None,
    }


def _fail(e: CtlError) -> int:
    print(f"cpusharectl: {e}", file=sys.stderr)
    return e.status


def cmd_status(args: argparse.Namespace) -> int:
    """Show every running instance (or NAME) as systemctl status would."""
    from gi.repository import GLib

    try:
        conn = _connect(args.bus)
        records = []
        for instance, bus_name in _targets(conn, args, args.bus).items():
            try:
                records.append((instance, bus_name, _get_all(conn, bus_name)))
            except GLib.Error as e:
                err = _bus_error(e, args.bus, "reading the status", instance)
                if err.status == EXIT_NOT_RUNNING and not args.name:
                    continue  # it stopped since we listed it
                raise err from None
        if not records:
            raise CtlError(EXIT_NOT_RUNNING, f"no cpushared instance runs on the {args.bus} bus")
    except CtlError as e:
        if args.json and e.status == EXIT_NOT_RUNNING and not args.name:
            print("[]")
        return _fail(e)
    if args.json:
        print(json.dumps([_json_record(*r) for r in records], indent=2))
    else:
        color = sys.stdout.isatty()
        print("\n\n".join(format_status(*r, color=color) for r in records))
    return EXIT_OK


def _call_each(args: argparse.Namespace, method: str) -> int:
    from gi.repository import Gio, GLib

    from . import dbus

    try:
        conn = _connect(args.bus)
        targets = _targets(conn, args, args.bus)
    except CtlError as e:
        return _fail(e)
    status = EXIT_OK
    for instance, bus_name in targets.items():
        try:
            conn.con.call_sync(bus_name, dbus.OBJECT_PATH, dbus.INTERFACE, method, None, None,
                               Gio.DBusCallFlags.NONE, 30_000, None)
        except GLib.Error as e:
            err = _bus_error(e, args.bus, method, instance)
            _fail(err)
            status = status or err.status  # the first failure decides
    return status


def cmd_pause(args: argparse.Namespace) -> int:
    """Stop the running job (SIGSTOP, its work kept) and take no new task."""
    return _call_each(args, "Pause")


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue the paused job and take tasks again."""
    return _call_each(args, "Resume")


def _configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help="the instance (order file stem); all instances if omitted")
    parser.add_argument("--json", action="store_true", help="print a JSON list of instances")


def _configure_target(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", metavar="NAME", help="the instance (order file stem)")
    which.add_argument("--all", action="store_true", help="every running instance")


# name -> (function, help, configure(parser))
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str,
                          Callable[[argparse.ArgumentParser], None]]] = {
    "check": (cmd_check, "show what this machine can sell (seccomp; qemu, KVM and TCG "
                         "for the kvm model); exit 1 if the kernel lacks CONFIG_SECCOMP",
              _no_arguments),
    "status": (cmd_status, "show the running seller instances", _configure_status),
    "pause": (cmd_pause, "pause an instance: stop its job (SIGSTOP), take no new task",
              _configure_target),
    "resume": (cmd_resume, "resume a paused instance", _configure_target),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpusharectl", description="Control the CPUShare seller.")
    parser.add_argument("--version", action="version", version=f"cpusharectl {__version__}")
    parser.add_argument("--bus", choices=("system", "session"), default="system",
                        help="the bus the daemons are on (default: system)")
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
