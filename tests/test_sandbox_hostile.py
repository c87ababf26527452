"""Hostile images against cpushare.sandbox, each asserting how it died.

The same file runs in strict mode (this process) and, from
test_sandbox.py, in a child pytest under a permissive seccomp filter where
the loader must stack its own filter (expected_mode says which).
"""

import ctypes
import errno
import faulthandler
import os
import signal
import struct
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import hostile  # noqa: E402
from cpushare import sandbox  # noqa: E402
from cpushare.bytecode import STACK_TOP  # noqa: E402

QUICK = sandbox.Limits(cpu_seconds=5, wall_seconds=10)


def run(image, input=b"", limits=QUICK):
    return sandbox.run(image, input, limits)


def forbidden_signal(mode):
    # Strict mode kills with SIGKILL; a filter's SECCOMP_RET_KILL_PROCESS
    # ends the process as if by SIGSYS.
    return signal.SIGKILL if mode == "strict" else signal.SIGSYS


def assert_forbidden(result, mode):
    assert result.mode == mode
    assert result.exit_status is None, result
    assert result.signal == forbidden_signal(mode), result
    assert result.reason == "forbidden-syscall", result
    assert result.describe().startswith("killed: forbidden system call")


def assert_fault(result, sig=signal.SIGSEGV):
    assert result.exit_status is None, result
    assert result.signal == sig, result
    assert result.reason == "fault", result


# -- every system call but the four ---------------------------------------------

SYSCALLS = [n for n in range(0, 470) if n not in hostile.ALLOWED]
# The kernel takes the number from eax: (1 << 32) | 39 is getpid.
ODD_NUMBERS = [512, 1000, 0x3FFFFFFF, 0xFFFFFFFF, -1, (1 << 32) | 39]


def reference_survives(nr: int, mode: str) -> bool:
    """Does a plain forked process under seccomp (strict mode, or in filter
    mode a kill-by-default filter of python3-seccomp), no loader involved,
    survive system call nr?  Some kernels handle a number before seccomp
    sees it; that is the kernel's, not the sandbox's, to answer for."""
    libc = ctypes.CDLL(None)
    sc = libc.syscall
    sc.restype = ctypes.c_long
    sc.argtypes = [ctypes.c_long] * 7
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    flt = None
    if mode == "filter":
        import seccomp
        flt = seccomp.SyscallFilter(seccomp.KILL_PROCESS)
        for name in ("exit", "exit_group", "read", "write", "brk", "mmap", "munmap",
                     "rt_sigreturn", "rt_sigprocmask", "futex"):
            flt.add_rule(seccomp.ALLOW, name)
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()  # its handlers would make calls strict mode kills
        if flt is not None:
            flt.load()
        else:
            prctl(22, 1, 0, 0, 0)
        sc(nr, 0, 0, 0, 0, 0, 0)
        sc(60, 0, 0, 0, 0, 0, 0)
    _, status = os.waitpid(pid, 0)
    return not os.WIFSIGNALED(status) or os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSYS)


@pytest.mark.parametrize("nr", SYSCALLS + ODD_NUMBERS)
def test_syscall_is_killed(nr, expected_mode):
    result = run(hostile.syscall_nr(nr))
    if result.reason != "forbidden-syscall" and reference_survives(nr, expected_mode):
        pytest.skip(f"this kernel handles system call {nr} before seccomp: a plain process in "
                    f"{expected_mode} mode, without the loader, survives it too ({result.describe()})")
    assert_forbidden(result, expected_mode)


@pytest.mark.parametrize("nr", [hostile.X32_BIT | n for n in (0, 1, 15, 60, 39, 57, 59, 512, 513)])
def test_x32_syscall_is_killed(nr, expected_mode):
    assert_forbidden(run(hostile.syscall_nr(nr)), expected_mode)


def test_exit_group_is_killed(expected_mode):
    assert_forbidden(run(hostile.syscall_nr(hostile.SYS_EXIT_GROUP)), expected_mode)


# 32-bit system calls through int 0x80 (i386 numbers): fork, open, execve,
# getpid, kill, mmap, clone, mmap2, exit_group, rt_sigreturn, socketcall.
@pytest.mark.parametrize("nr", [2, 5, 11, 20, 37, 90, 102, 120, 173, 192, 252, 1000])
def test_int80_is_killed(nr, expected_mode):
    assert_forbidden(run(hostile.int80(nr)), expected_mode)


def test_int80_read_write_exit(expected_mode):
    # Strict mode lets a compat task make the i386 read/write/exit too (the
    # same four calls, through another door); the filter allows the native
    # ABI only and kills them.
    bad_write = run(hostile.int80(4, ebx=99, ecx=0, edx=1))      # write(99, 0, 1)
    bad_read = run(hostile.int80(3, ebx=99, ecx=0, edx=1))       # read(99, 0, 1)
    exit7 = run(hostile.int80(1, ebx=7))                         # exit(7)
    if expected_mode == "strict":
        assert (bad_write.exit_status, bad_read.exit_status, exit7.exit_status) == (0, 0, 7)
    else:
        for r in (bad_write, bad_read, exit7):
            assert_forbidden(r, "filter")


# -- descriptors -----------------------------------------------------------------

def test_fds_2_to_1023_are_closed(expected_mode):
    # read and write are allowed on any fd, so only closed fds stop the job
    # from reaching the seller's sockets and files: each must say EBADF.
    result = run(hostile.fd_probe(2, 1023))
    assert result.ok, result
    assert result.mode == expected_mode
    values = struct.unpack(f"<{len(result.output) // 8}q", result.output)
    assert len(values) == 2 * (1023 - 2 + 1)
    bad = {2 + i // 2: v for i, v in enumerate(values) if v != -errno.EBADF}
    assert not bad, f"fds not closed (fd: read/write result): {bad}"


def test_parent_fds_are_not_inherited():
    # Open descriptors of this process, without close-on-exec, at high numbers.
    fds = [os.open("/dev/null", os.O_RDWR) for _ in range(3)]
    high = os.dup2(fds[0], 900, inheritable=True)
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        result = run(hostile.fd_probe(2, 1023))
        values = struct.unpack(f"<{len(result.output) // 8}q", result.output)
        for fd in fds + [high]:
            assert values[2 * (fd - 2)] == -errno.EBADF, fd
            assert values[2 * (fd - 2) + 1] == -errno.EBADF, fd
    finally:
        for fd in fds + [high]:
            os.close(fd)


# -- memory ----------------------------------------------------------------------

def test_write_into_own_text_faults():
    assert_fault(run(hostile.write_own_text()))


@pytest.mark.parametrize("address", [0x0, 0x10000, 0x12340000, 0x7FFEF000 - 4096, STACK_TOP])
def test_jump_outside_regions_faults(address):
    assert_fault(run(hostile.jump_to(address)))


def test_jump_to_the_vsyscall_page_is_stopped(expected_mode):
    # Depending on vsyscall= the kernel faults or emulates gettimeofday,
    # which seccomp then sees as a forbidden call: either way it dies.
    result = run(hostile.jump_to(0xFFFFFFFFFF600000))
    assert result.exit_status is None, result
    assert result.signal in (signal.SIGSEGV, forbidden_signal(expected_mode)), result


def test_jump_into_data_faults():
    # data is read+write, never executable
    image = hostile.jump_to(hostile.DATA, data=b"\x90" * 16 + b"\xeb\xfe", data_address=hostile.DATA)
    assert_fault(run(image))


def test_stack_overflow_hits_the_guard_page():
    assert_fault(run(hostile.recurse(stack_size=16 << 10)))


def test_parent_secret_is_not_readable():
    secret = ctypes.create_string_buffer(b"seller's TLS private key " * 8)
    address = ctypes.addressof(secret)
    assert ctypes.string_at(address, 6) == b"seller"
    result = run(hostile.load_from(address))
    assert_fault(result)
    assert result.output == b""


def test_parent_code_is_not_reachable():
    libc = ctypes.CDLL(None)
    target = ctypes.cast(libc.write, ctypes.c_void_p).value
    assert_fault(run(hostile.jump_to(target)))


def _parent_mappings():
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if fields[1].startswith("r") and not line.rstrip().endswith("[vsyscall]"):
                yield lo, hi, line.strip()


def test_no_mapping_of_the_parent_is_readable():
    # One job per readable mapping of this process (python itself, libc, the
    # heap, the stack, [vdso], the extension...): loading its first and
    # last byte must fault.  The job's own text at 0x400000 overlaps python's
    # if python is not PIE: skip addresses inside the job's regions.
    own = [(r.start, r.end) for r in hostile.load_from(0).regions()]
    failures = []
    for lo, hi, line in _parent_mappings():
        for address in (lo, hi - 8):
            if any(a <= address < b for a, b in own):
                continue
            result = run(hostile.load_from(address))
            if result.signal != signal.SIGSEGV:
                failures.append(f"{address:#x} ({line}): {result.describe()} {result.output!r}")
    assert not failures, "\n".join(failures)


def _read_proc(pid, name):
    with open(f"/proc/{pid}/{name}") as f:
        return f.read()


def test_only_the_jobs_regions_are_mapped(expected_mode):
    image = hostile.block_on_read()
    job = sandbox.start(image, QUICK)
    try:
        deadline = time.monotonic() + 5
        while True:  # "ready" comes just before seccomp: wait for it to land
            status = _read_proc(job.pid, "status")
            seccomp = next(line.split()[1] for line in status.splitlines()
                           if line.startswith("Seccomp:"))
            if seccomp != "0" or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        maps = _read_proc(job.pid, "maps").splitlines()
    finally:
        job.kill()
        job.wait()
    assert seccomp == ("1" if expected_mode == "strict" else "2")
    spans = []
    for line in maps:
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        spans.append((lo, hi, fields[1], " ".join(fields[5:])))
    want = {(r.start, r.end) for r in image.regions()}
    job_maps = [s for s in spans if (s[0], s[1]) in want]
    assert sorted((s[0], s[1], s[2]) for s in job_maps) == sorted(
        (r.start, r.end, "r-xp" if r.name == "text" else "rw-p") for r in image.regions())
    rest = [s for s in spans if (s[0], s[1]) not in want and s[3] != "[vsyscall]"]
    # the keep area: the trampoline's code page and its parameters, adjacent
    assert len(rest) == 2, maps
    code, params = sorted(rest)
    assert code[2] == "r-xp" and code[1] - code[0] == 4096 and "cpushare-trampoline" in code[3], maps
    assert params[2] == "rw-p" and params[0] == code[1] and params[3] == "", maps
    assert code[0] >= 0x80000000


def test_registers_start_zeroed():
    result = run(hostile.register_dump())
    assert result.ok, result
    regs = hostile.parse_register_dump(result.output)
    assert regs.pop("rsp") == STACK_TOP
    assert regs.pop("rflags") == 0x202
    assert regs == dict.fromkeys(regs, 0)


# -- limits ----------------------------------------------------------------------

def test_endless_loop_hits_the_cpu_limit():
    result = run(hostile.spin(), limits=sandbox.Limits(cpu_seconds=1, wall_seconds=20))
    assert result.reason == "cpu-limit", result
    assert result.signal == signal.SIGXCPU
    # the kernel checks RLIMIT_CPU at tick granularity against its own
    # accounting; rusage reports a little less or more
    assert 0.5 <= result.cpu_seconds <= 2.5


def test_endless_loop_hits_the_wall_limit():
    result = run(hostile.spin(), limits=sandbox.Limits(cpu_seconds=30, wall_seconds=0.3))
    assert result.reason == "wall-limit", result
    assert result.signal == signal.SIGKILL
    assert result.wall_seconds >= 0.3
    assert "wall-clock limit" in result.describe()


def test_endless_output_hits_the_output_limit():
    limit = 100_000
    result = run(hostile.flood(), limits=sandbox.Limits(output=limit, wall_seconds=10))
    assert result.reason == "output-limit", result
    assert result.signal == signal.SIGKILL
    assert len(result.output) == limit


def test_rdtsc_faults_by_default():
    assert_fault(run(hostile.rdtsc()))


def test_rdtsc_works_when_allowed():
    # Entering strict mode disables the TSC (kernel/seccomp.c), so a job
    # that may read it runs under the equivalent filter.
    result = run(hostile.rdtsc(), limits=sandbox.Limits(allow_tsc=True))
    assert result.ok, result
    assert result.mode == "filter"
    assert_forbidden(run(hostile.syscall_nr(39), limits=sandbox.Limits(allow_tsc=True)), "filter")


def test_the_caller_survives(expected_mode):
    # after all of the above, this process is fine and so is the sandbox
    assert sandbox.self_test() == expected_mode
    assert run(hostile.exit_with(5)).exit_status == 5
