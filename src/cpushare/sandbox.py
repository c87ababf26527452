"""Run a bytecode image in the seccomp sandbox: the public face of _seccomp.

A job is a forked child that runs no Python: it keeps only fds 0 (input)
and 1 (output), gets rlimits (CPU, no core, no files, no processes), loses
every mapping of this process (so it cannot read the seller's memory),
maps exactly its image's regions (text read+execute from a sealed memfd,
data+bss and stack read+write), cannot read the time-stamp counter or run
CPUID unless allowed (CPUID only where the CPU can make it fault), and
enters SECCOMP_MODE_STRICT, or, where this process already runs under a
seccomp filter and the kernel refuses strict mode, a filter that allows
exactly what strict mode allows.  Of the loader's own set-up only its code
page and the entry and stack top stay readable: nothing of the host (no
PID); what a job can still see is listed in cpushare.cpu(5).

Jobs are forked by a zygote: a small process forked once from this one,
which keeps nothing of it but the extension's own code, so a start costs
little more than a bare fork (bench/sandbox_start.py).  The zygote reaps
each job with wait4 and passes on its wait status and CPU time (what the
buyer pays for); where no zygote can start, or CPUSHARE_SANDBOX_SPAWN=fork,
jobs are forked from this process directly.  Either way the job's set-up
reports on a status pipe, so a failure of the sandbox (SandboxError, naming
the failing call) is never mistaken for the job's own end.

This side enforces the wall-clock and output limits and says why the job
ended.  run() and Job.communicate() may be called from several threads at
once; nothing a job does can reach the calling process.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import math
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass

from .bytecode import STACK_TOP, Image

__all__ = ["SandboxError", "MemoryLimitError", "Limits", "Result", "Job",
           "mode", "run", "start", "self_test"]

REASONS = ("exit", "forbidden-syscall", "cpu-limit", "wall-limit", "output-limit",
           "fault", "killed")

_CHUNK = 1 << 20


class SandboxError(Exception):
    """The sandbox could not be set up; the message names the failing call."""


class MemoryLimitError(ValueError):
    """The image needs more memory than the run's limit allows."""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: float = 60.0    # RLIMIT_CPU, rounded up to whole seconds
    wall_seconds: float = 300.0  # time not paused
    memory: int = 256 << 20      # refuse images whose memory_size exceeds it
    output: int = 64 << 20       # bytes of output before the job is killed
    allow_tsc: bool = False      # rdtsc works (the job then runs under the filter)
    allow_cpuid: bool = False    # cpuid works (else it faults, where the CPU can make it)

    def __post_init__(self):
        for name in ("cpu_seconds", "wall_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Limits.{name} must be a positive number of seconds, not {value!r}")
        for name in ("memory", "output"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"Limits.{name} must be a number of bytes >= 0, not {value!r}")

    @property
    def cpu_rlimit(self) -> tuple[int, int]:
        """(soft, hard) RLIMIT_CPU: SIGXCPU at soft, SIGKILL one second later."""
        soft = max(1, math.ceil(self.cpu_seconds))
        return soft, soft + 1


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


@dataclass(frozen=True)
class Result:
    exit_status: int | None      # the job's exit code when it exited
    signal: int | None           # the signal that killed it otherwise
    reason: str                  # one of REASONS
    cpu_seconds: float           # user+sys from rusage
    wall_seconds: float          # not counting pauses
    output: bytes                # b"" when the output was streamed elsewhere
    mode: str                    # 'strict' | 'filter'

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def shell_status(self) -> int:
        if self.exit_status is not None:
            return self.exit_status
        return 128 + (self.signal or 0)

    def describe(self) -> str:
        sig = f" ({_signame(self.signal)})" if self.signal is not None else ""
        if self.reason == "exit":
            return f"exited with status {self.exit_status}"
        if self.reason == "forbidden-syscall":
            return f"killed: forbidden system call{sig}"
        if self.reason == "cpu-limit":
            return f"killed: CPU time limit reached after {self.cpu_seconds:.2f} s of CPU{sig}"
        if self.reason == "wall-limit":
            return f"killed: wall-clock limit reached after {self.wall_seconds:.2f} s{sig}"
        if self.reason == "output-limit":
            return f"killed: output limit reached{sig}"
        if self.reason == "killed":
            return f"killed by its caller{sig}"
        return f"killed: fault{sig}"


_extension = None


def _ext():
    global _extension
    if _extension is None:
        try:
            from . import _seccomp
        except ImportError as e:
            raise SandboxError(
                f"the extension cpushare._seccomp is not built ({e}); run `make build`") from None
        _extension = _seccomp
    return _extension


class _MemfdCache:
    """Sealed memfds of recently run images (text, data), so that running
    the same image again costs a dup instead of a copy.  They are never
    written after sealing and the job maps them privately, so concurrent
    jobs may share them."""

    SIZE = 16

    def __init__(self):
        self.lock = threading.Lock()
        self.fds: dict[Image, tuple[int, int]] = {}

    def get(self, image: Image, regions: dict) -> tuple[int, int]:
        """(text_fd, data_fd or -1): fresh duplicates the caller closes."""
        with self.lock:
            fds = self.fds.pop(image, None)
            if fds is not None:
                self.fds[image] = fds  # most recent last
                return self._dup(fds)
        ext = _ext()
        text = ext.sealed_memfd("cpushare-text", image.text, regions["text"].size, True)
        data = -1
        try:
            if "data" in regions:
                data = ext.sealed_memfd("cpushare-data", image.data, regions["data"].size, False)
        except BaseException:
            _close(text)
            raise
        with self.lock:
            # duplicates are made under the lock: no other thread can close
            # a cached descriptor (and see its number reused) meanwhile
            evicted = [self.fds.pop(image)] if image in self.fds else []
            self.fds[image] = (text, data)
            while len(self.fds) > self.SIZE:
                evicted.append(self.fds.pop(next(iter(self.fds))))
            out = self._dup((text, data))
        for pair in evicted:
            _close(*pair)
        return out

    @staticmethod
    def _dup(fds: tuple[int, int]) -> tuple[int, int]:
        text = fcntl.fcntl(fds[0], fcntl.F_DUPFD_CLOEXEC, 3)
        try:
            data = fcntl.fcntl(fds[1], fcntl.F_DUPFD_CLOEXEC, 3) if fds[1] >= 0 else -1
        except BaseException:
            _close(text)
            raise
        return text, data


_memfds = _MemfdCache()


def _mode_number() -> int:
    ext = _ext()
    try:
        current = ext.seccomp_mode()
    except OSError as e:
        raise SandboxError(f"this kernel has no seccomp (CONFIG_SECCOMP): {e}") from None
    return ext.MODE_STRICT if current == 0 else ext.MODE_FILTER


def mode() -> str:
    """'strict' if this thread may enter strict mode, else 'filter'."""
    return "strict" if _mode_number() == _ext().MODE_STRICT else "filter"


def _close(*fds):
    for fd in fds:
        if fd is not None and fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class _Zygote:
    """A small process forked once that forks the jobs: it keeps nothing of
    this process but the extension's code (see trampoline.c), so a job
    start copies and tears down almost nothing.  It reaps the jobs and
    writes their wait status and CPU time to their status pipes."""

    def __init__(self):
        ext = _ext()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = ext.zygote_start(theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        ready = ours.recv(64)
        pid, step, _ = ext.parse_reply(ready) if ready else (-errno.EPIPE, 0, 0)
        if pid != 0:
            ours.close()
            os.waitpid(self.pid, 0)
            raise OSError(-pid, f"zygote set-up at {ext.step_name(step)}: {os.strerror(-pid)}")
        self.owner = os.getpid()
        self.lock = threading.Lock()

    def spawn(self, **kw):
        with self.lock:
            return _ext().zygote_spawn(self.sock.fileno(), **kw)

    def close(self) -> None:
        self.sock.close()
        if self.owner == os.getpid():
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


_zygote_lock = threading.Lock()
_zygote: _Zygote | None = None
_zygote_error: str | None = None


def _forget_zygote_after_fork() -> None:
    # A forked copy of this process must not share the parent's zygote.
    global _zygote, _zygote_lock
    _zygote_lock = threading.Lock()
    if _zygote is not None:
        try:
            _zygote.sock.close()
        except OSError:
            pass
    _zygote = None


os.register_at_fork(after_in_child=_forget_zygote_after_fork)


def spawn_method() -> str:
    """How jobs start: 'zygote' (the default) or 'fork' (from this process
    directly; CPUSHARE_SANDBOX_SPAWN=fork, or when no zygote can start)."""
    if os.environ.get("CPUSHARE_SANDBOX_SPAWN", "zygote") == "fork" or _zygote_error:
        return "fork"
    return "zygote"


def _get_zygote(restart: _Zygote | None = None) -> _Zygote | None:
    global _zygote, _zygote_error
    with _zygote_lock:
        if restart is not None and _zygote is restart:
            restart.close()
            _zygote = None
        if _zygote is None and spawn_method() == "zygote":
            try:
                _zygote = _Zygote()
            except OSError as e:
                _zygote_error = str(e)
        return _zygote


class Job:
    """A running job.  Use communicate() (or run()), or do the I/O yourself
    on fileno_in()/fileno_out() and then wait()."""

    pid: int

    def __init__(self, image: Image, limits: Limits = Limits()):
        image.validate()
        if image.memory_size > limits.memory:
            parts = ", ".join(f"{r.name} {r.size}" for r in image.regions())
            raise MemoryLimitError(
                f"image needs {image.memory_size} bytes of memory ({parts}), "
                f"more than the limit of {limits.memory}")
        ext = _ext()
        self.limits = limits
        modenum = _mode_number()
        if limits.allow_tsc:
            # Entering strict mode also disables the TSC (kernel/seccomp.c);
            # the filter allows exactly the same calls and leaves it alone.
            modenum = ext.MODE_FILTER
        self._lock = threading.Lock()
        self._result: Result | None = None
        self._kill_reason: str | None = None
        self._output = bytearray()
        self._sent = 0
        self._in: int | None = None
        self._out: int | None = None
        self._status: int | None = None
        self._status_buf = bytearray()
        self._exit_record: tuple[int, float] | None = None
        self.pidfd = -1
        regions = {r.name: r for r in image.regions()}
        text_fd = data_fd = -1
        child_ends: list[int] = []
        try:
            text_fd, data_fd = _memfds.get(image, regions)
            data = regions.get("data")
            in_r, self._in = os.pipe2(os.O_CLOEXEC)
            child_ends.append(in_r)
            self._out, out_w = os.pipe2(os.O_CLOEXEC)
            for fd in (self._in, self._out):
                try:  # 1 MiB pipes: a sixteenth of the system calls for big data
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _CHUNK)
                except OSError:  # (over the user's pipe-user-pages-soft: 64 KiB it is)
                    pass
            child_ends.append(out_w)
            self._status, status_w = os.pipe2(os.O_CLOEXEC)
            child_ends.append(status_w)
            soft, hard = limits.cpu_rlimit
            stack = regions["stack"]
            spec = dict(
                stdin_fd=in_r, stdout_fd=out_w, status_fd=status_w,
                text_fd=text_fd, data_fd=data_fd,
                text=(regions["text"].start, regions["text"].size),
                data=None if data is None else (data.start, data.size),
                stack=(stack.start, stack.size), entry=image.entry, stack_top=STACK_TOP,
                cpu_soft=soft, cpu_hard=hard, allow_tsc=limits.allow_tsc,
                allow_cpuid=limits.allow_cpuid, mode=modenum)
            self._spawn(spec, modenum)
            self._start = time.monotonic()
            self._paused_at: float | None = None
            self._paused_total = 0.0
            _close(text_fd, data_fd, *child_ends)
            text_fd = data_fd = -1
            child_ends = []
            self._await_ready()
        except BaseException:
            _close(text_fd, data_fd, *child_ends, self._in, self._out, self._status, self.pidfd)
            self._in = self._out = self._status = None
            self.pidfd = -1
            raise

    def _spawn(self, spec: dict, modenum: int) -> None:
        ext = _ext()
        zygote = _get_zygote()
        if zygote is not None:
            for attempt in (1, 2):
                try:
                    self.pid, self.pidfd, modenum = zygote.spawn(**spec)
                    break
                except OSError as e:
                    if attempt == 2 or e.errno not in (errno.EPIPE, errno.ECONNRESET,
                                                       errno.ENOTCONN):
                        raise SandboxError(f"starting a job through the zygote: {e}") from None
                    zygote = _get_zygote(restart=zygote)  # it died: start another
                    if zygote is None:
                        break
            self.spawned_by = "zygote"
        if zygote is None:
            try:
                self.pid = ext.spawn(**spec)
            except OSError as e:
                raise SandboxError(f"starting a job: {e}") from None
            self.pidfd = os.pidfd_open(self.pid)
            self.spawned_by = "fork"
        self.mode = "strict" if modenum == ext.MODE_STRICT else "filter"

    # -- the status pipe -----------------------------------------------------
    def _read_status(self) -> list[tuple[int, int]]:
        """Read what the status pipe has (blocking until something comes);
        return the complete records [(step, value)]; [(-1, 0)] at EOF."""
        ext = _ext()
        chunk = os.read(self._status, 256)
        if not chunk:
            return [(-1, 0)]
        self._status_buf += chunk
        out = []
        buf = self._status_buf
        while len(buf) >= ext.RECORD_SIZE:
            step = int.from_bytes(buf[0:4], "little", signed=True)
            value = int.from_bytes(buf[4:8], "little", signed=True)
            if step == ext.EXITED:
                if len(buf) < ext.EXIT_RECORD_SIZE:
                    break
                utime = int.from_bytes(buf[8:16], "little")
                stime = int.from_bytes(buf[16:24], "little")
                self._exit_record = (value, (utime + stime) / 1e6)
                del buf[:ext.EXIT_RECORD_SIZE]
            else:
                del buf[:ext.RECORD_SIZE]
            out.append((step, value))
        return out

    def _await_ready(self) -> None:
        ext = _ext()
        failures = []
        ended = False
        while not (failures or ended):
            for step, value in self._read_status():
                if step == 0:
                    return
                if step == -1 or step == ext.EXITED:
                    ended = True
                    break
                failures.append(f"{ext.step_name(step)}: {os.strerror(value)} (errno {value})")
        status = self._reap_failed()
        if failures:
            raise SandboxError("job set-up failed in the child at " + "; ".join(failures))
        raise SandboxError("job set-up failed: the child died before it was ready "
                           f"(wait status {status:#x})")

    def _reap_failed(self) -> int:
        self._signal(signal.SIGKILL)
        if self.spawned_by == "fork":
            return os.wait4(self.pid, 0)[1]
        while self._exit_record is None:  # the zygote reaps it and says so
            if self._read_status() == [(-1, 0)]:
                return -1
        return self._exit_record[0]

    # -- I/O for callers that do their own ---------------------------------
    def fileno_in(self) -> int:
        if self._in is None:
            raise ValueError("the job's input is closed")
        return self._in

    def fileno_out(self) -> int:
        if self._out is None:
            raise ValueError("the job's output is closed")
        return self._out

    def write(self, data: bytes) -> None:
        """Write all of data to the job's input (blocks while the pipe is full)."""
        fd = self.fileno_in()
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def close_input(self) -> None:
        if self._in is not None:
            _close(self._in)
            self._in = None

    def read(self, n: int = _CHUNK) -> bytes:
        """Up to n bytes of the job's output; b"" at end of output."""
        return os.read(self.fileno_out(), n)

    # -- control -----------------------------------------------------------
    def _signal(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass

    def pause(self) -> None:
        """Stop the job (SIGSTOP); its wall clock stops too."""
        with self._lock:
            if self._paused_at is None and self._result is None:
                self._signal(signal.SIGSTOP)
                self._paused_at = time.monotonic()

    def resume(self) -> None:
        with self._lock:
            if self._paused_at is not None:
                self._signal(signal.SIGCONT)
                self._paused_total += time.monotonic() - self._paused_at
                self._paused_at = None

    def _kill(self, reason: str) -> None:
        with self._lock:
            if self._result is None and self._kill_reason is None:
                self._kill_reason = reason
                self._signal(signal.SIGKILL)

    def kill(self) -> None:
        self._kill("killed")

    def _elapsed(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        paused = self._paused_total
        if self._paused_at is not None:
            paused += now - self._paused_at
        return now - self._start - paused

    # -- the end -----------------------------------------------------------
    def communicate(self, input: bytes = b"") -> Result:
        """Feed input, collect output, enforce the limits, reap."""
        return self._pump(memoryview(bytes(input)), None, None)

    def feed(self, input, sink) -> Result:
        """Like communicate(), the output going to `sink` (write(), flush()) as it
        comes instead of into Result.output, which is then empty.  `input` (any
        bytes-like object) is not copied."""
        return self._pump(memoryview(input), None, sink)

    def stream(self, source, sink) -> Result:
        """Like communicate(), from a readable file and to a writable one
        (binary, with fileno()); Result.output is then empty."""
        return self._pump(None, source.fileno(), sink)

    def wait(self) -> Result:
        """Reap the job, after the caller did its own I/O (the wall-clock
        limit still applies).  Output not read yet is collected."""
        self.close_input()
        return self._pump(memoryview(b""), None, None)

    async def feed_async(self, input, sink=None) -> Result:
        """feed() (or communicate(), without a sink) driven by the running
        asyncio loop: the pipes and the end of the job are watched by the
        loop, so no thread is needed and none is woken per job.  The same
        limits apply.  If the awaiting task is cancelled, the job is killed
        and reaped before the cancellation goes on."""
        if self._result is not None:
            return self._result
        loop = asyncio.get_running_loop()
        limit = self.limits.output
        pending = memoryview(input)
        zygote = self.spawned_by == "zygote"
        end_fd = self._status if zygote else self.pidfd
        done = loop.create_future()
        exited = zygote and self._exit_record is not None
        watched_r: list[int] = []
        watched_w: list[int] = []
        timer = None

        def finish() -> None:
            if exited and self._out is None and not done.done():
                done.set_result(None)

        def unwatch(fd: int, writer: bool = False) -> None:
            lst = watched_w if writer else watched_r
            if fd in lst:
                lst.remove(fd)
                (loop.remove_writer if writer else loop.remove_reader)(fd)

        def writable() -> None:
            nonlocal pending
            pending = self._write_input(pending)
            if not pending:  # all written, or the job closed its input
                unwatch(self._in, writer=True)
                self.close_input()

        def readable() -> None:
            fd = self._out
            self._read_output(limit, sink)
            if self._out is None:  # the end of the output (the fd is closed now)
                unwatch(fd)
                finish()

        def ended() -> None:
            nonlocal exited
            if zygote:
                if not (self._read_status() == [(-1, 0)] or self._exit_record is not None):
                    return
            exited = True
            unwatch(end_fd)
            finish()

        def clock() -> None:
            nonlocal timer
            remaining = self.limits.wall_seconds - self._elapsed()
            if remaining <= 0 and not exited:
                self._kill("wall-limit")
                remaining = 0.2  # wait for the kill to land
            timer = loop.call_later(min(max(remaining, 0.001), 1.0), clock)

        try:
            if self._in is not None:
                os.set_blocking(self._in, False)
                if pending:
                    loop.add_writer(self._in, writable)
                    watched_w.append(self._in)
                else:
                    self.close_input()
            if self._out is not None:
                os.set_blocking(self._out, False)
                loop.add_reader(self._out, readable)
                watched_r.append(self._out)
            if not exited:
                loop.add_reader(end_fd, ended)
                watched_r.append(end_fd)
            clock()
            finish()
            await done
        except BaseException as e:
            self._kill("killed")
            gave_up = e
        else:
            gave_up = None
        finally:
            if timer is not None:
                timer.cancel()
            for fd in list(watched_r):
                unwatch(fd)
            for fd in list(watched_w):
                unwatch(fd, writer=True)
        if gave_up is not None:
            try:
                self._reap()  # (killed: its end is near)
            except Exception:
                pass
            raise gave_up
        return self._reap()

    def _pump(self, data, source_fd, sink) -> Result:
        if self._result is not None:
            return self._result
        limit = self.limits.output
        pending = data if data is not None else memoryview(b"")
        source_open = source_fd is not None
        if self._in is not None:
            os.set_blocking(self._in, False)
        if self._out is not None:
            os.set_blocking(self._out, False)
        zygote = self.spawned_by == "zygote"
        exited = zygote and self._exit_record is not None
        while True:
            remaining = self.limits.wall_seconds - self._elapsed()
            if remaining <= 0 and not exited:
                self._kill("wall-limit")
                remaining = 0.2  # wait for the kill to land
            if self._in is not None and not pending and not source_open:
                self.close_input()
            if exited and self._out is None:
                break
            poller = select.poll()
            if self._in is not None and pending:
                poller.register(self._in, select.POLLOUT)
            if source_open and not pending:
                poller.register(source_fd, select.POLLIN)
            if self._out is not None:
                poller.register(self._out, select.POLLIN)
            if not exited:
                # the zygote reports the end on the status pipe; a child of
                # ours ends when its pidfd becomes readable
                poller.register(self._status if zygote else self.pidfd, select.POLLIN)
            timeout = min(remaining, 1.0) if self._paused_at is None else 1.0
            events = poller.poll(max(0, int(timeout * 1000) + 1))
            for fd, ev in events:
                if fd == self.pidfd and not zygote:
                    exited = True
                elif fd == self._status and zygote:
                    if self._read_status() == [(-1, 0)] or self._exit_record is not None:
                        exited = True
                elif fd == self._out:
                    self._read_output(limit, sink)
                elif fd == self._in:
                    pending = self._write_input(pending)
                    if pending is None:
                        pending = memoryview(b"")
                        source_open = False
                        self.close_input()
                elif fd == source_fd:
                    chunk = os.read(source_fd, _CHUNK)
                    if chunk:
                        pending = memoryview(chunk)
                    else:
                        source_open = False
        return self._reap()

    def _write_input(self, pending: memoryview) -> memoryview | None:
        """Write what the input pipe takes of `pending` (non-blocking); what is
        left, or None when the job closed its input or ended (the rest is
        dropped)."""
        try:
            return pending[os.write(self._in, pending[:_CHUNK]):]
        except BlockingIOError:
            return pending
        except BrokenPipeError:
            return None

    def _read_output(self, limit: int, sink) -> None:
        try:
            chunk = os.read(self._out, _CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            _close(self._out)
            self._out = None
            return
        if self._kill_reason == "output-limit":
            return
        room = limit - self._produced()
        if len(chunk) > room:
            chunk = chunk[:max(room, 0)]
            self._kill("output-limit")
        if sink is None:
            self._output += chunk
        else:
            self._sent += len(chunk)
            sink.write(chunk)
            sink.flush()

    def _produced(self) -> int:
        return len(self._output) + self._sent

    def _reap(self) -> Result:
        with self._lock:
            if self._result is not None:
                return self._result
            if self.spawned_by == "fork":
                _, status, rusage = os.wait4(self.pid, 0)
                cpu = rusage.ru_utime + rusage.ru_stime
            else:
                while self._exit_record is None:
                    if self._read_status() == [(-1, 0)]:
                        self._close_all()
                        raise SandboxError(
                            f"the zygote (pid {_zygote.pid if _zygote else '?'}) died before "
                            f"it reported the end of job {self.pid}, which died with it")
                status, cpu = self._exit_record
            wall = self._elapsed()
            self._close_all()
            exit_status = sig = None
            if os.WIFEXITED(status) and self._kill_reason == "output-limit":
                # It wrote past the limit into the pipe and exited before the
                # kill landed: its output was cut all the same, and it ends
                # as one the kill reached would (never as a clean exit).
                sig, reason = signal.SIGKILL, "output-limit"
            elif os.WIFEXITED(status):
                exit_status = os.WEXITSTATUS(status)
                reason = "exit"
            else:
                sig = os.WTERMSIG(status)
                if sig == signal.SIGUSR1 and self._kill_reason is None:
                    raise SandboxError(
                        "job set-up failed in the child at the last step, entering seccomp "
                        "(prctl(PR_SET_SECCOMP) failed; the job did not run)")
                reason = self._reason_for(sig, cpu)
            self._result = Result(exit_status=exit_status, signal=sig, reason=reason,
                                  cpu_seconds=cpu, wall_seconds=wall,
                                  output=bytes(self._output), mode=self.mode)
            return self._result

    def _close_all(self) -> None:
        _close(self.pidfd, self._in, self._out, self._status)
        self.pidfd = -1
        self._in = self._out = self._status = None

    def _reason_for(self, sig: int, cpu: float) -> str:
        if self._kill_reason is not None:
            return self._kill_reason
        soft, _ = self.limits.cpu_rlimit
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= soft):
            return "cpu-limit"
        if sig == signal.SIGSYS or (sig == signal.SIGKILL and self.mode == "strict"):
            return "forbidden-syscall"
        return "fault"

    def __del__(self):
        # A job nobody waits for must not outlive its handle as a zombie.
        if getattr(self, "_result", 1) is None and getattr(self, "pidfd", -1) >= 0:
            try:
                self._kill("killed")
                self._reap()
            except Exception:
                pass


def start(image: Image, limits: Limits = Limits()) -> Job:
    """Start a job; the caller feeds it and collects its end."""
    return Job(image, limits)


def run(image: Image, input: bytes = b"", limits: Limits = Limits()) -> Result:
    """Run an image to its end with `input` on its stdin."""
    return Job(image, limits).communicate(input)


def _self_test_image() -> Image:
    # write(1, "ok", 2); getpid(); exit(0)  -- getpid must kill it.
    code = bytes.fromhex(
        "b801000000"        # mov eax, 1 (write)
        "bf01000000"        # mov edi, 1
        "488d3517000000"    # lea rsi, [rip+0x17] -> "ok"
        "ba02000000"        # mov edx, 2
        "0f05"              # syscall
        "b827000000"        # mov eax, 39 (getpid)
        "0f05"              # syscall
        "b83c000000"        # mov eax, 60 (exit)
        "31ff"              # xor edi, edi
        "0f05"              # syscall
    ) + b"ok"
    return Image(text=code, entry=0x400000)


def self_test() -> str:
    """A sandboxed child that makes a forbidden call must die.  Returns
    the mode in use; raises SandboxError when the sandbox does not hold."""
    result = run(_self_test_image(), limits=Limits(cpu_seconds=5, wall_seconds=10))
    if result.output != b"ok":
        raise SandboxError(f"self-test: the sandboxed child could not write its output "
                           f"(got {result.output!r}; {result.describe()})")
    if result.reason != "forbidden-syscall":
        raise SandboxError(f"self-test: a child that called getpid() was not killed by seccomp: "
                           f"{result.describe()}")
    return result.mode
