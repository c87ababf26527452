"""`cpushared`: one seller daemon per sell order, adapted to systemd and D-Bus.

The seller core (`cpushare.seller`) knows nothing of systemd or D-Bus; this
module wires it to them:

* start-up, in this order, each step refusing to go on with its own exit
  status (see EXIT_* and cpushared(8)): load the order, check the kernel for
  seccomp, run the sandbox self-test, claim the D-Bus name, then READY=1;
  where there is no bus at all (a container, an init-script machine) it
  says so once and sells without D-Bus;
* STATUS= lines a person can read in `systemctl status`;
* watchdog pings from the asyncio loop (a stuck loop stops them);
* journald with structured fields (ORDER, TASK, BUYER_ORDER, OUTCOME, CPU_MS)
  when stderr is the journal, plain stderr otherwise;
* SIGTERM/SIGINT: stop taking work, hand back the running task, exit 0;
  SIGHUP: re-read the order file (a bad file keeps the old order).

Threads.  asyncio runs in the main thread: the seller core, the signal
handlers and the watchdog all live on that loop.  A second thread runs a
GLib MainLoop on GLib's global default context, which is where GDBus
dispatches the method calls and property reads of the object we register
(registration happens in the main thread before that thread starts, with no
thread-default context pushed, so dispatch goes to the global default one).
The two loops never block on each other except in one direction: a D-Bus
Pause()/Resume() in the GLib thread hands the call to the asyncio loop with
call_soon_threadsafe() and waits (bounded) for its outcome, so the caller's
reply says whether it worked.  The asyncio side only ever emits signals,
which GDBus allows from any thread without waiting for the GLib loop.  The
watchdog pings only while both loops turn: the GLib thread bumps a
heartbeat counter, the asyncio watchdog checks it moved.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .order import OrderError, SellOrder, format_coins, load_sell

log = logging.getLogger("cpushare.daemon")

# Exit statuses (documented in cpushared(8); keep them in step).
EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error; the journal has the traceback
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the D-Bus name could not be claimed (the bus is up)
EXIT_CANTCREAT = 73  # EX_CANTCREAT: the cache directory is unusable
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: --daemon and the pidfile is locked by a running daemon
EXIT_CONFIG = 78  # EX_CONFIG: the order file is missing or invalid
EXIT_NO_SECCOMP = 79  # the kernel cannot run seccomp jobs (CONFIG_SECCOMP)
EXIT_SANDBOX = 80  # the sandbox self-test failed: the sandbox does not contain jobs
EXIT_NO_ACCEL = 81  # kvm: qemu is missing, or accel = kvm and KVM does not work here

ORDER_DIR = Path("/etc/cpushare")
CACHE_ROOT = Path("/var/cache/cpushare")
PAUSE_TIMEOUT = 10.0  # seconds a D-Bus Pause()/Resume() waits for the loop
# Status changes reach D-Bus and STATUS= at most this often: a seller doing a
# thousand tiny tasks a second must not emit a thousand signals a second.
STATUS_COALESCE = 0.1


class StartupError(Exception):
    """A start-up step refused: `status` is the exit status, str() the one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# --- systemd ---------------------------------------------------------------

def notify(**fields: Any) -> None:
    """sd_notify(3) to $NOTIFY_SOCKET, if set: notify(READY=1, STATUS='...')."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon as sd

    text = "\n".join(f"{k}={v}" for k, v in fields.items())
    if not sd.notify(text):
        log.debug("sd_notify(%r) was not delivered", text)


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2 / 1_000_000 if value > 0 else None


def describe(status) -> str:
    """The STATUS= line: 'Selling cpu0 on market:7300: idle, 12 tasks done, 0.042 CPUCoins earned'."""
    state = status.state
    if status.state == "running" and status.current_task:
        state = f"running task {status.current_task}"
    text = (f"Selling {status.order} on {status.server}: {state}, "
            f"{status.tasks_done} task{'s' if status.tasks_done != 1 else ''} done, "
            f"{format_coins(status.coins_earned_milli)} CPUCoins earned")
    if status.state in ("connecting", "error") and status.last_error:
        text += f"; last error: {status.last_error}"
    return text.replace("\n", " ")


# --- logging ---------------------------------------------------------------

def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd connected (JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Keep the fields a journal entry should carry: the handler's own and
    every upper-case `extra=` field; drop the rest of LogRecord's attributes
    (msg, args, levelname, ...), which JournalHandler would otherwise send."""
    return {k: v for k, v in fields.items()
            if k.isupper() and v is not None and k not in ("EXCEPTION_INFO",)}


def journal_sender(send: Callable[..., Any] | None = None) -> Callable[..., Any]:
    if send is None:
        from systemd import journal
        send = journal.send

    def sender(message: str, /, **fields: Any) -> Any:  # records carry a "message" attribute too
        return send(message, **journal_fields(fields))
    return sender


def setup_logging(*, journal: bool | None = None, debug: bool = False) -> None:
    if journal is None:
        # stderr is the journal, or systemd runs us with stderr elsewhere
        journal = stderr_is_journal() or bool(
            os.environ.get("INVOCATION_ID") and os.path.exists("/run/systemd/journal/socket"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if journal:
        from systemd.journal import JournalHandler
        handler = JournalHandler(sender_function=journal_sender(),
                                 SYSLOG_IDENTIFIER="cpushared")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("cpushared: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


# --- start-up steps ----------------------------------------------------------

def order_path(arg: str) -> Path:
    """FILE.cpu as given, or an instance NAME -> /etc/cpushare/NAME.cpu."""
    if "/" in arg or arg.endswith(".cpu"):
        return Path(arg)
    return ORDER_DIR / f"{arg}.cpu"


def load_order(arg: str) -> SellOrder:
    path = order_path(arg)
    try:
        return load_sell(path)
    except OrderError as e:
        raise StartupError(EXIT_CONFIG, str(e)) from e
    except OSError as e:
        raise StartupError(EXIT_CONFIG, f"{path}: cannot read the order: {e.strerror}") from e


def model_of(order):
    """The computation model the order sells; refused when this version has none."""
    from . import models

    try:
        return models.get(order.model, order.accel)
    except models.ModelError as e:
        raise StartupError(EXIT_CONFIG, f"{order.path}: model = {order.model}: {e}") from e


def check_kernel(model) -> None:
    """This machine can run the model (every model: CONFIG_SECCOMP; kvm: qemu
    and the accelerator the order asks for, measured)."""
    from . import kernel, models

    try:
        kernel.require_seccomp()  # every model: qemu's -sandbox is seccomp too
    except kernel.KernelError as e:
        raise StartupError(EXIT_NO_SECCOMP, str(e)) from e
    try:
        log.info("%s", model.check_host())  # (kvm: which accelerator, and why)
    except models.HostError as e:
        raise StartupError(EXIT_NO_SECCOMP if model.name == "seccomp" else EXIT_NO_ACCEL,
                           str(e)) from e


# ioprio_set(2): no libc wrapper; the idle class has no levels.
_SYS_IOPRIO_SET = 251  # x86-64
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_IDLE = 3
_IOPRIO_CLASS_SHIFT = 13


def idle_priority() -> None:
    """Sell only idle time: SCHED_IDLE, nice 19 and the idle I/O class.

    The unit already asks for the same (Nice=, CPUSchedulingPolicy=,
    IOSchedulingClass=); this covers /etc/init.d/cpushare and a daemon
    started by hand.  Called before the sandbox starts its zygote, so the
    zygote and every job inherit it.  Lowering one's own priority needs no
    privilege; a refusal is logged, never fatal."""
    import ctypes

    steps = (
        ("sched_setscheduler(SCHED_IDLE)",
         lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))),
        ("setpriority(19)", lambda: os.setpriority(os.PRIO_PROCESS, 0, 19)),
    )
    for what, step in steps:
        try:
            step()
        except OSError as e:
            log.warning("%s: %s", what, e.strerror)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, 0,
                    _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT) != 0:
        log.warning("ioprio_set(IOPRIO_CLASS_IDLE): %s", os.strerror(ctypes.get_errno()))


def check_sandbox(model) -> str:
    from . import models

    try:
        return model.self_test()
    except models.HostError as e:
        raise StartupError(EXIT_SANDBOX, str(e)) from e


def cache_dir_for(order: SellOrder, arg: str | None) -> Path:
    if arg:
        path = Path(arg)
    elif os.environ.get("CACHE_DIRECTORY"):
        # systemd: CacheDirectory=cpushare/%i gives one path (the first if several)
        path = Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    else:
        path = CACHE_ROOT / order.name
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        raise StartupError(EXIT_CANTCREAT, f"cache directory {path}: {e.strerror or e}") from e
    return path


# --- the running daemon ------------------------------------------------------

class GLibThread:
    """The GLib main loop in its own thread (see the module docstring)."""

    def __init__(self) -> None:
        from gi.repository import GLib

        self._glib = GLib
        self.loop = GLib.MainLoop()
        self.beats = 0
        self.thread = threading.Thread(target=self._run, name="glib", daemon=True)

    def _beat(self) -> bool:
        self.beats += 1
        return True  # keep the timeout source

    def start(self, beat_seconds: float) -> None:
        self._glib.timeout_add(max(1, int(beat_seconds * 1000)), self._beat)
        self.thread.start()

    def _run(self) -> None:
        self.loop.run()

    def stop(self) -> None:
        self.loop.quit()
        self.thread.join(timeout=5)


class Daemon:
    """One instance: the seller core plus systemd and D-Bus around it."""

    def __init__(self, order: SellOrder, *, cache_dir: Path, bus: str | None,
                 seller_factory: Callable[..., Any] | None = None) -> None:
        if seller_factory is None:
            from .seller import Seller as seller_factory
        self.order = order
        self.loop: asyncio.AbstractEventLoop | None = None
        self.service = None
        self.publication = None
        self.glib: GLibThread | None = None
        self.bus_lost = False
        self._last_status_line = ""
        self._latest = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self.seller = seller_factory(order, cache_dir=cache_dir, on_change=self._on_change)
        if bus is not None:
            self._publish(bus)

    # The D-Bus name is claimed before READY=1: a client that sees the unit
    # active finds the name.  No bus to connect to is no reason not to sell;
    # a bus that refuses the name (another daemon has it) is.
    def _publish(self, bus: str) -> None:
        from gi.repository import GLib

        from . import dbus

        try:
            connection = dbus.connect(bus)
        except GLib.Error as e:
            log.warning("status over D-Bus is unavailable: cannot connect to the %s bus at %s: "
                        "%s; selling without it (cpusharectl cannot see or pause this instance)",
                        bus, dbus.bus_address(bus), e.message, extra={"ORDER": self.order.name})
            return
        self.service = dbus.SellerService(self.seller.status(), pause=self._dbus_pause,
                                          resume=self._dbus_resume)
        try:
            self.publication = dbus.Publication(connection, self.order.name, self.service)
        except (GLib.Error, dbus.NameTaken) as e:
            text = dbus.error_message(e) if isinstance(e, GLib.Error) else str(e)
            raise StartupError(EXIT_UNAVAILABLE,
                               f"cannot own {dbus.bus_name(self.order.name)} on the {bus} bus: "
                               f"{text}") from e
        self.glib = GLibThread()
        self.bus = bus
        self.bus_lost = False
        # GDBus emits 'closed' in the thread of the default main context
        # (ours: the GLib thread); the reaction runs on the asyncio loop.
        connection.con.connect("closed", self._on_bus_closed)

    def _on_bus_closed(self, _connection, remote_peer_vanished: bool, error) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            why = error.message if error is not None else "closed"
            loop.call_soon_threadsafe(self._bus_closed, why)

    def _bus_closed(self, why: str) -> None:
        if self.bus_lost:
            return
        self.bus_lost = True
        log.error("lost the %s bus (%s): stopping, so that the service manager restarts "
                  "the daemon and it claims its name again", self.bus, why,
                  extra={"ORDER": self.order.name})
        notify(STATUS=f"Lost the {self.bus} bus: stopping")
        self.seller.stop(hand_back=True)

    # -- status -----------------------------------------------------------

    def _on_change(self, status) -> None:
        """The core's observer.  In the loop's thread the update is coalesced
        (at most one per STATUS_COALESCE); from anywhere else it goes out at once."""
        self._latest = status
        loop = self.loop
        in_loop = False
        if loop is not None and loop.is_running():
            try:
                in_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                in_loop = False
        if not in_loop:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(STATUS_COALESCE, self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        status = self._latest
        if status is None:
            return
        if self.service is not None:
            self.service.update(status)
        line = describe(status)
        if line != self._last_status_line:
            self._last_status_line = line
            notify(STATUS=line)

    # -- D-Bus methods, called in the GLib thread ------------------------

    def _in_loop(self, fn: Callable[[], Any], what: str) -> Any:
        loop = self.loop
        if loop is None or loop.is_closed():
            raise RuntimeError(f"{what}: the daemon is not running")
        done: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:  # handed to the waiting thread
                done.set_exception(e)
        loop.call_soon_threadsafe(call)
        try:
            return done.result(timeout=PAUSE_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise RuntimeError(f"{what}: the daemon's event loop did not answer in "
                               f"{PAUSE_TIMEOUT:g} s") from None

    def _dbus_pause(self) -> None:
        log.info("Pause() over D-Bus", extra={"ORDER": self.order.name})
        self._in_loop(self.seller.pause, "Pause")

    def _dbus_resume(self) -> None:
        log.info("Resume() over D-Bus", extra={"ORDER": self.order.name})
        self._in_loop(self.seller.resume, "Resume")

    # -- signals ---------------------------------------------------------

    def _terminate(self, signame: str) -> None:
        log.info("%s: stopping, handing back the running task", signame,
                 extra={"ORDER": self.order.name})
        notify(STOPPING=1, STATUS=f"Stopping {self.order.name} ({signame})")
        self.seller.stop(hand_back=True)

    def _reload(self) -> None:
        notify(RELOADING=1, STATUS=f"Reloading {self.order.path}")
        try:
            new = load_sell(self.order.path)
        except (OrderError, OSError) as e:
            reason = str(e) if isinstance(e, OrderError) else f"{self.order.path}: {e.strerror}"
            log.error("SIGHUP: keeping the old order: %s", reason, extra={"ORDER": self.order.name})
        else:
            self.order = new
            self.seller.reload(new)
            log.info("SIGHUP: order re-read from %s", new.path, extra={"ORDER": new.name})
        self._last_status_line = describe(self.seller.status())
        notify(READY=1, STATUS=self._last_status_line)

    # -- watchdog -----------------------------------------------------------

    async def _watchdog(self, interval: float) -> None:
        last_beats = -1
        while True:
            # Only ping while the GLib thread also turns (when there is one).
            if self.glib is None or self.glib.beats != last_beats:
                notify(WATCHDOG=1)
            else:
                log.warning("the D-Bus thread is stuck: no watchdog ping")
            if self.glib is not None:
                last_beats = self.glib.beats
            await asyncio.sleep(interval)

    # -- main -------------------------------------------------------------

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        for signum, handler in ((signal.SIGTERM, lambda: self._terminate("SIGTERM")),
                                (signal.SIGINT, lambda: self._terminate("SIGINT")),
                                (signal.SIGHUP, self._reload)):
            self.loop.add_signal_handler(signum, handler)
        interval = watchdog_interval()
        if self.glib is not None:
            self.glib.start(min(interval / 2, 1.0) if interval else 1.0)
        watchdog = asyncio.create_task(self._watchdog(interval)) if interval else None
        self._last_status_line = describe(self.seller.status())
        notify(READY=1, MAINPID=os.getpid(), STATUS=self._last_status_line)
        log.info("selling %s on %s (model %s)%s", self.order.name, self.order.server,
                 self.order.model,
                 f", D-Bus name {self.publication.name}" if self.publication else "",
                 extra={"ORDER": self.order.name})
        try:
            await self.seller.run()
        finally:
            self._flush()  # the last state ('stopped') before the name goes
            if watchdog is not None:
                watchdog.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.loop.remove_signal_handler(signum)

    def close(self) -> None:
        if self.publication is not None and not self.publication.bus.con.is_closed():
            self.publication.close()
            try:
                self.publication.bus.con.flush_sync(None)
            except Exception:  # closed meanwhile: nothing left to flush
                pass
        if self.glib is not None and self.glib.thread.is_alive():
            self.glib.stop()


# --- command line ------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpushared",
        description="Sell one CPU on the CPUShare market under one sell order.")
    p.add_argument("order", metavar="FILE.cpu|NAME",
                   help="the sell order; a bare NAME means /etc/cpushare/NAME.cpu")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--foreground", action="store_true",
                      help="stay in the foreground (the default; what systemd runs)")
    mode.add_argument("--daemon", action="store_true",
                      help="detach and write --pidfile (for /etc/init.d/cpushare)")
    p.add_argument("--pidfile", metavar="PATH", help="with --daemon: the pidfile, locked while running")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="image cache (default: $CACHE_DIRECTORY, else /var/cache/cpushare/NAME)")
    p.add_argument("--no-dbus", action="store_true", help="do not publish status on D-Bus")
    p.add_argument("--bus", choices=("system", "session"), default="system",
                   help="the bus to publish on (default: system)")
    p.add_argument("--debug", action="store_true", help="log debug messages too")
    p.add_argument("--version", action="version", version=f"cpushared {__version__}")
    return p


def _refuse(e: StartupError) -> int:
    """One line to the journal/stderr and to `systemctl status`, then the status."""
    reason = str(e).replace("\n", " ")
    log.error("%s", reason)
    notify(STATUS=f"Refusing to start: {reason}")
    return e.status


def _daemon_context(pidfile: str):
    import daemon
    import daemon.pidfile

    return daemon.DaemonContext(
        pidfile=daemon.pidfile.TimeoutPIDLockFile(pidfile, acquire_timeout=0),
        working_directory="/",
        umask=0o022,
        # asyncio handles SIGTERM/SIGHUP itself; leave only the tty signals ignored.
        signal_map={signal.SIGTTIN: None, signal.SIGTTOU: None, signal.SIGTSTP: None},
    )


def _pidfile_held(pidfile: str) -> int | None:
    """The pid in a pidfile whose process still runs, else None."""
    try:
        pid = int(Path(pidfile).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.daemon and not args.pidfile:
        parser.error("--daemon needs --pidfile PATH")
    setup_logging(debug=args.debug)

    # The refusals come before detaching, so `/etc/init.d/cpushare start`
    # sees their status and reason on the terminal.
    try:
        order = load_order(args.order)
        model = model_of(order)
        check_kernel(model)
        idle_priority()
        mode = check_sandbox(model)
        log.info("sandbox self-test passed (mode %s)", mode, extra={"ORDER": order.name})
        cache_dir = cache_dir_for(order, args.cache_dir)
    except StartupError as e:
        return _refuse(e)

    if args.daemon:
        pid = _pidfile_held(args.pidfile)
        if pid is not None:
            return _refuse(StartupError(
                EXIT_TEMPFAIL, f"{args.pidfile}: cpushared is already running as pid {pid}"))
        try:  # left by a daemon that died without cleaning up
            os.unlink(args.pidfile)
            log.warning("%s: removed a stale pidfile", args.pidfile)
        except FileNotFoundError:
            pass
        except OSError as e:
            return _refuse(StartupError(EXIT_CANTCREAT, f"{args.pidfile}: {e.strerror}"))
        context = _daemon_context(args.pidfile)
        try:
            with context:
                # stderr is /dev/null now: log where a daemon logs.
                _daemon_logging(args.debug)
                return _serve(order, cache_dir, args)
        except Exception as e:  # lockfile errors: someone got there first
            log.error("--daemon --pidfile %s: %s", args.pidfile, e)
            return EXIT_TEMPFAIL
    return _serve(order, cache_dir, args)


def _daemon_logging(debug: bool) -> None:
    if os.path.exists("/run/systemd/journal/socket"):
        setup_logging(journal=True, debug=debug)
        return
    from logging.handlers import SysLogHandler

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if os.path.exists("/dev/log") and stat.S_ISSOCK(os.stat("/dev/log").st_mode):
        handler: logging.Handler = SysLogHandler("/dev/log", facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("cpushared[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)


def _serve(order: SellOrder, cache_dir: Path, args) -> int:
    try:
        d = Daemon(order, cache_dir=cache_dir, bus=None if args.no_dbus else args.bus)
    except StartupError as e:
        return _refuse(e)
    try:
        asyncio.run(d.run())
    except Exception as e:
        log.exception("cpushared %s failed: %s", order.name, e, extra={"ORDER": order.name})
        notify(STATUS=f"Failed: {type(e).__name__}: {e}")
        return EXIT_FAILURE
    finally:
        d.close()
    if d.bus_lost:
        return EXIT_FAILURE
    log.info("stopped", extra={"ORDER": order.name})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
