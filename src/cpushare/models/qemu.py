"""Start and drive one qemu guest: the kvm model's runs.

A run is one `qemu-system-x86_64` process with nothing but what the guest
needs: no defaults, no user config, no display, no NIC, no USB, no disk; the
image is a read-only CD-ROM of format raw (never probed, so never a qcow2
naming a backing file of the seller's); ``-sandbox on`` with every option
denied; TCG with ``split-wx=on`` (MemoryDenyWriteExecute) and a bounded code
buffer (``tb-size``); ``-no-reboot`` (a
guest that reboots ends its run like one that powers off); a clean
environment, no descriptor but 0, 1 and 2, and a private working directory
(mode 0700) holding only its QMP socket and its stderr.  (No RLIMIT_FSIZE
bounds that stderr: TCG's split-wx code buffer is a memfd past any small one.)

The serial console is qemu's stdio (``-chardev stdio``) on two pipes: the
guest's output reaches read() in order and ends with EOF when qemu is gone;
a reader that does not read holds the guest's UART, never the seller's
memory, and QMP still answers.  Control is QMP on the unix socket: stop and
cont (the vCPUs stop; qemu then uses next to no CPU), system_powerdown.
The metering is qemu's own CPU time, from /proc/PID/stat while it runs and
from wait4() at its end.

A QemuRun is used like a `cpushare.sandbox.Job` running a session: read()
and write() block and may run in threads of their own (one reader, one
writer); the other methods may be called from any thread.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ..sandbox import Result
from .qmp import Qmp as _Qmp, QmpError

__all__ = ["QEMU", "LaunchError", "QmpError", "QemuRun", "command", "start"]

QEMU = "qemu-system-x86_64"
ACCELS = ("kvm", "tcg")
MEDIA = ("cdrom", "floppy")  # floppy: the probe's boot sector (an IDE disk cannot be read-only)
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
MIN_MEMORY = 16 << 20
MAX_MEMORY = 1 << 40
MAX_CPUS = 255  # the pc machine's limit
# TCG's code buffer, MiB (qemu 7.2 maps 1 GiB by default: a guest running much
# varied code would fill it, past the unit's MemoryMax=); kvm.QEMU_OVERHEAD counts it
TB_SIZE_MIB = 128
START_TIMEOUT = 30.0
NIC_FD = 3  # qemu's end of the guest NIC's socketpair (after stdin, stdout, stderr)  # seconds for qemu to answer on QMP
QMP_TIMEOUT = 10.0  # seconds for one QMP command's answer
_CHUNK = 1 << 16
_MiB = 1 << 20


class LaunchError(RuntimeError):
    """qemu did not start; the message ends with the last lines of its stderr."""


def _opt(path: Path) -> str:
    """A path as one value of a qemu option (commas doubled)."""
    return str(path).replace(",", ",,")


def command(image: Path, *, memory: int, cpus: int, accel: str, qemu: str = QEMU,
            media: str = "cdrom", qmp: str = "qmp.sock", mac: str | None = None,
            nic_fd: int = 3) -> list[str]:
    """qemu's command line for a run (`qmp`: the socket's path, relative to
    qemu's working directory).  `mac`: the guest gets one virtio NIC of that
    address whose frames go, one a datagram, to qemu's descriptor `nic_fd`:
    one end of a unix datagram socketpair whose other end is the seller's link
    agent (docs/vpn.md; a socketpair is not held to net.unix.max_dgram_qlen,
    which is 10 here); no other network, never qemu's user-mode one."""
    if accel not in ACCELS:
        raise ValueError(f"accel must be one of {', '.join(ACCELS)}, not {accel!r}")
    if media not in MEDIA:
        raise ValueError(f"media must be one of {', '.join(MEDIA)}, not {media!r}")
    if not (isinstance(memory, int) and MIN_MEMORY <= memory <= MAX_MEMORY):
        raise ValueError(f"memory must be {MIN_MEMORY} to {MAX_MEMORY} bytes, not {memory!r}")
    if not (isinstance(cpus, int) and 1 <= cpus <= MAX_CPUS):
        raise ValueError(f"cpus must be 1 to {MAX_CPUS}, not {cpus!r}")
    if mac is not None and not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac):
        raise ValueError(f"mac {mac!r} is not six hex bytes")
    if media == "cdrom":
        drive, boot = f"file={_opt(image)},format=raw,media=cdrom,readonly=on,if=ide,index=0", "d"
    else:
        drive, boot = f"file={_opt(image)},format=raw,readonly=on,if=floppy,index=0", "a"
    return [
        qemu, "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "pc,usb=off",
        "-accel", "kvm" if accel == "kvm" else f"tcg,split-wx=on,tb-size={TB_SIZE_MIB}",
        "-m", f"{-(-memory // _MiB)}M", "-smp", str(cpus),
        "-drive", drive, "-boot", f"order={boot},menu=off",
        *(["-nic", "none"] if mac is None else [
            "-netdev", f"dgram,id=link,local.type=fd,local.str={nic_fd}",
            "-device", f"virtio-net-pci,netdev=link,mac={mac},romfile="]),
        "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
        "-qmp", f"unix:{_opt(Path(qmp))},server=on,wait=off",
        "-no-reboot",
        "-sandbox", SANDBOX,
    ]


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _readable(fd: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))


class QemuRun:
    """One running qemu.  read()/write() are its serial console; pause(),
    resume(), powerdown() go through QMP; wait() reaps it."""

    pid: int
    accel: str
    argv: list[str]

    def __init__(self, image: Path, *, memory: int, cpus: int, accel: str, workdir: Path | None,
                 qemu: str, console_budget: int, media: str, start_timeout: float,
                 mac: str | None = None):
        if not (isinstance(console_budget, int) and console_budget > 0):
            raise ValueError(f"console_budget must be a positive number of bytes, "
                             f"not {console_budget!r}")
        binary = shutil.which(qemu)
        if binary is None:
            raise LaunchError(f"{qemu}: not found (the Debian package is qemu-system-x86)")
        image = Path(image).absolute()
        try:
            with open(image, "rb"):
                pass
        except OSError as e:
            raise LaunchError(f"{image}: {e.strerror}") from None
        if not image.is_file():
            raise LaunchError(f"{image}: not a regular file")
        self.nic: socket.socket | None = None  # the link agent's end of the guest's NIC
        guest_end = None
        if mac is not None:  # a socketpair is not held to net.unix.max_dgram_qlen (10)
            self.nic, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            for end in (self.nic, guest_end):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.nic.setblocking(False)
        argv = command(image, memory=memory, cpus=cpus, accel=accel, qemu=binary, media=media,
                       mac=mac, nic_fd=guest_end.fileno() if guest_end is not None else 3)
        self.accel = accel
        self.argv = argv
        self.stderr = ""  # its last lines, once it has ended
        self._budget = console_budget
        self._produced = 0
        self._lock = threading.Lock()
        self._result: Result | None = None
        self._kill_reason: str | None = None
        self._paused_at: float | None = None
        self._paused_total = 0.0
        self._timer: threading.Timer | None = None
        self._qmp: _Qmp | None = None
        self._in = self._out = self._dirfd = self.pidfd = None
        self._proc = None
        self._own_workdir = workdir is None
        self._cleaned = False
        try:
            base = Path(workdir or tempfile.mkdtemp(prefix="cpushare-qemu-"))
            self.workdir = Path(tempfile.mkdtemp(prefix="qemu-", dir=base))  # mode 0700
        except OSError as e:
            raise LaunchError(f"no working directory for qemu in {workdir}: {e}") from None
        try:
            try:
                self._spawn(argv, guest_end)
            finally:
                if guest_end is not None:
                    guest_end.close()
            self._connect(time.monotonic() + start_timeout)
        except BaseException as e:
            self._fail()
            if isinstance(e, (OSError, QmpError)):
                said = f"; qemu said: {self.stderr}" if self.stderr else ""
                raise LaunchError(f"{qemu} did not start: {e}{said}") from None
            raise

    # -- the start -----------------------------------------------------------
    def _spawn(self, argv: list[str], nic: socket.socket | None = None) -> None:
        in_r, self._in = os.pipe2(os.O_CLOEXEC)
        try:
            self._out, out_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            _close(in_r)
            raise
        err = os.open(self.workdir / "stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                      0o600)
        # A seller killed with -9 must leave no guest running unpaid.  Under a
        # systemd unit (INVOCATION_ID) the unit's cgroup ends qemu with it
        # (KillMode=control-group; there setpriv may not even run: the unit
        # has no capabilities to give up).  Elsewhere (the init.d path, the
        # development runner) qemu dies with the thread that started it:
        # PR_SET_PDEATHSIG, set by util-linux's setpriv before it execs qemu.
        setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
        if setpriv is not None and not os.environ.get("INVOCATION_ID"):
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        try:
            # (qemu's end of the NIC keeps its number: command() named it)
            self._proc = subprocess.Popen(argv, stdin=in_r, stdout=out_w, stderr=err, env={},
                                          cwd=self.workdir, close_fds=True,
                                          pass_fds=(nic.fileno(),) if nic is not None else ())
        finally:
            _close(in_r, out_w, err)
        self.pid = self._proc.pid
        self.pidfd = os.pidfd_open(self.pid)
        self._start = time.monotonic()
        self._dirfd = os.open(self.workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def _connect(self, deadline: float) -> None:
        # The socket's own path may be longer than sun_path allows; the
        # directory's descriptor makes it short.
        path = f"/proc/self/fd/{self._dirfd}/qmp.sock"
        while True:
            if self._exited():
                raise OSError(f"qemu exited at once ({self._reap().describe()})")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if time.monotonic() > deadline:
                raise OSError("no QMP socket within the start timeout")
            _readable(self.pidfd, 0.01)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        self._qmp = _Qmp(sock)
        try:
            self._qmp.handshake()
        except QmpError:
            if self._exited():
                raise OSError(f"qemu exited at once ({self._reap().describe()})") from None
            raise
        sock.settimeout(QMP_TIMEOUT)

    def _fail(self) -> None:
        if self.pidfd is not None and self._result is None:
            self._kill("killed")
            self._reap()
        else:
            self._cleanup()
        _close(self._in, self._out)
        self._in = self._out = None

    def _read_stderr(self, lines: int = 8) -> str:
        try:
            with open(self.workdir / "stderr", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return " / ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    # -- the console -----------------------------------------------------------
    def fileno_out(self) -> int:
        if self._out is None:
            raise ValueError("the console's output is closed")
        return self._out

    def poll_output(self, timeout: float | None) -> bool:
        """Whether console output (or its end) can be read within `timeout` s."""
        return self._out is None or _readable(self._out, timeout)

    def read(self, n: int = _CHUNK) -> bytes:
        """Up to n bytes of console output (blocking); b"" once qemu is gone
        and its output drained, or the console budget is spent (qemu is then
        killed, reason "output-limit").  One reader at a time."""
        if self._out is None:
            return b""
        chunk = os.read(self._out, n)
        room = self._budget - self._produced
        if len(chunk) > room:
            chunk = chunk[:room]
            self._kill("output-limit")
        self._produced += len(chunk)
        if not chunk:
            _close(self._out)
            self._out = None
        return chunk

    def write(self, data: bytes) -> None:
        """Write all of data to the console's input (blocks while the guest
        does not take it); BrokenPipeError once qemu is gone."""
        if self._in is None:
            raise ValueError("the console's input is closed")
        view = memoryview(data)
        while view:
            view = view[os.write(self._in, view):]

    def close_input(self) -> None:
        if self._in is not None:
            _close(self._in)
            self._in = None

    # -- control -------------------------------------------------------------
    def _qmp_quiet(self, name: str) -> bool:
        """Run a QMP command; False (nothing done) when qemu has ended."""
        if self._result is not None or self._qmp is None:
            return False
        try:
            self._qmp.execute(name)
            return True
        except QmpError:
            if self._exited():
                return False
            raise

    def pause(self) -> None:
        """Stop the guest's vCPUs (QMP stop); its wall clock stops too."""
        if self._paused_at is None and self._qmp_quiet("stop"):
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        if self._paused_at is not None and self._qmp_quiet("cont"):
            self._paused_total += time.monotonic() - self._paused_at
            self._paused_at = None

    def powerdown(self, grace: float = 30.0) -> None:
        """Press the guest's power button (QMP system_powerdown; a paused
        guest is resumed first) and return at once; qemu is killed `grace`
        seconds later if it has not exited by then.  wait() sees the end."""
        self.resume()
        if not self._qmp_quiet("system_powerdown"):
            return
        with self._lock:
            if self._result is None and self._timer is None:
                self._timer = threading.Timer(grace, self._kill, ("killed",))
                self._timer.daemon = True
                self._timer.start()
                # A press before the guest listens for it (still in its
                # firmware or booting) is lost: press again, as a person would.
                threading.Thread(target=self._press_until_off, args=(grace,), daemon=True,
                                 name="qemu-powerdown").start()

    PRESS_EVERY = 5.0  # seconds between power-button presses while powering down

    def _press_until_off(self, grace: float) -> None:
        end = time.monotonic() + grace
        while time.monotonic() + self.PRESS_EVERY < end:
            if self._result is not None or _readable(self.pidfd, self.PRESS_EVERY):
                return
            try:
                if not self._qmp_quiet("system_powerdown"):
                    return
            except (QmpError, OSError, ValueError):
                return

    def _kill(self, reason: str) -> None:
        with self._lock:
            if self._result is None and self.pidfd is not None:
                if self._kill_reason is None:
                    self._kill_reason = reason
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        """SIGKILL qemu (again: nothing)."""
        self._kill("killed")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) qemu has used so far."""
        with self._lock:
            if self._result is not None:
                return self._result.cpu_seconds
            # not reaped yet (that is done under the lock): the PID is still ours
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    # -- the end -------------------------------------------------------------
    def _exited(self) -> bool:
        return self._result is not None or _readable(self.pidfd, 0)

    def wait(self) -> Result:
        """Block until qemu has exited; reap it.  Console output not read yet
        stays readable."""
        if self._result is None:
            _readable(self.pidfd, None)
        return self._reap()

    def _reap(self) -> Result:
        with self._lock:
            if self._result is not None:
                return self._result
            _, status, rusage = os.wait4(self.pid, 0)
            self._proc.returncode = status  # (reaped here, not by Popen)
            now = time.monotonic()
            paused = self._paused_total + (now - self._paused_at if self._paused_at else 0)
            exit_status = sig = None
            if os.WIFEXITED(status) and self._kill_reason != "output-limit":
                exit_status, reason = os.WEXITSTATUS(status), "exit"
            else:
                sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else signal.SIGKILL
                reason = self._kill_reason or ("forbidden-syscall" if sig == signal.SIGSYS
                                               else "fault")
            self._result = Result(exit_status=exit_status, signal=sig, reason=reason,
                                  cpu_seconds=rusage.ru_utime + rusage.ru_stime,
                                  wall_seconds=now - self._start - paused, output=b"",
                                  mode=self.accel)
            self._paused_at = None
            if self._timer is not None:
                self._timer.cancel()
            _close(self.pidfd)
            self._cleanup()
            return self._result

    def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self.stderr = self._read_stderr()
        if self._qmp is not None:
            self._qmp.close()
        if self.nic is not None:
            self.nic.close()
        _close(self._dirfd)  # (the console's pipes are the reader's and the writer's to close)
        self._dirfd = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir.parent, ignore_errors=True)

    def __del__(self):
        # A run nobody waits for must not outlive its handle.
        if getattr(self, "_result", 1) is None and getattr(self, "pidfd", None) is not None:
            try:
                self._kill("killed")
                self._reap()
            except Exception:
                pass
        _close(getattr(self, "_in", None), getattr(self, "_out", None))


def start(iso: Path, *, memory: int, cpus: int, accel: str, workdir: Path | None = None,
          qemu: str = QEMU, console_budget: int = 1 << 20, media: str = "cdrom",
          start_timeout: float = START_TIMEOUT, mac: str | None = None) -> QemuRun:
    """Boot `iso` (read-only, format raw) under qemu with `memory` bytes of
    RAM, `cpus` vCPUs and accelerator `accel` ("kvm" or "tcg"); `mac`: with
    one NIC, whose other end is the run's `nic` socket (see command()).  Its files
    live in a fresh private directory under `workdir` (a temporary one when
    None), removed once it is reaped.  The console may print
    `console_budget` bytes.  Returns once qemu answers on QMP; LaunchError
    when it does not (not installed, a missing image, qemu exiting)."""
    return QemuRun(iso, memory=memory, cpus=cpus, accel=accel, workdir=workdir, qemu=qemu,
                   console_budget=console_budget, media=media, start_timeout=start_timeout,
                   mac=mac)
