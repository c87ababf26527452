"""What a job can learn about the seller's machine from inside the sandbox.

A job in strict mode can read nothing but its own memory, so whatever the
loader leaves mapped must say nothing about the host: no PID, no set-up
parameters.  A scanner job reads every readable mapping it has (the test
tells it which, from /proc/PID/maps) for its own PID as a 4-byte and an
8-byte integer and as decimal text, keeping the PID only in registers.
CPUID faults where the CPU can make it fault, unless the order allows it.

Like test_sandbox_hostile.py, this file also runs under a permissive
seccomp filter and with the fork spawn method (from test_sandbox.py).
"""

import ctypes
import errno
import os
import signal
import struct
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import hostile  # noqa: E402
from cpushare import sandbox  # noqa: E402
from cpushare.bytecode import PAGE, STACK_TOP, page_up  # noqa: E402

QUICK = sandbox.Limits(cpu_seconds=5, wall_seconds=20)
DATA = hostile.DATA
HIT_KINDS = {8: "8-byte integer", 4: "4-byte integer", 10: "decimal text"}
MAX_REPORTED = 64
MAX_RANGES = 200


# -- the jobs ----------------------------------------------------------------------

def _report(a: hostile.Asm, kind: int, out: int, tag: str) -> None:
    """One hit at r14: count it in r9; write (kind, address) while fewer
    than MAX_REPORTED were.  Clobbers rax, rcx, rdx, rsi, rdi, r11 only."""
    a("49ffc1", "4983f9", bytes([MAX_REPORTED]))          # inc r9; cmp r9, 64
    a.jcc("g", f"skip{tag}")
    a.mov_rsi(out)("48c706", hostile.i32(kind), "4c897608")  # [rsi] = kind; [rsi+8] = r14
    a("b801000000", "bf01000000", "ba10000000", "0f05")    # write(1, rsi, 16)
    a.label(f"skip{tag}")


def pid_scanner(data: bytes = b"") -> tuple:
    """(image, work address).  The job reads from its input, at the work
    address in its bss: the key K, then pid, decimal digits (packed, little
    end first), their number, the number of ranges and the ranges (lo, hi),
    each qword XORed with K, so that its memory never holds the needles.
    For every byte of every range it reports (kind, address) where the
    8-byte pid, the 4-byte pid or the digits start; then (0, hits); exit 0.
    It never touches its stack.  Signed comparisons (addresses below 2**63,
    or a range inside [vsyscall])."""
    work = DATA + page_up(len(data))
    out = work + PAGE
    a = hostile.Asm()
    a.mov_rsi(work)("31ff", "ba00100000", "31c0", "0f05")  # read(0, work, 4096)
    a("4883f828").jcc("l", "fail")                         # cmp rax, 40; jl fail
    a("48bd", hostile.i64(work))                           # mov rbp, work
    a("4c8b4500")                                          # r8 = K
    a("488b5d08", "4c31c3")                                # rbx = pid
    a("4c8b6510", "4d31c4")                                # r12 = digits
    a("4c8b6d18", "4d31c5")                                # r13 = number of digits
    a("4c8b5520", "4d31c2")                                # r10 = number of ranges
    a("4883c528", "4531c9")                                # rbp += 40; r9 = 0
    a.label("range")
    a("4d85d2").jcc("e", "done")                           # test r10, r10; je done
    a("4c8b7500", "4d31c6", "4c8b7d08", "4d31c7")          # r14 = lo, r15 = hi
    a("4883c510", "49ffca")                                # rbp += 16; dec r10
    a.label("byte")
    a("4d39fe").jcc("ge", "range")                         # cmp r14, r15; jge range
    a("498d4608", "4c39f8").jcc("g", "no8")                # r14 + 8 > r15: no 8-byte
    a("49391e").jcc("ne", "no8")                           # cmp [r14], rbx
    _report(a, 8, out, "8")
    a.label("no8")
    a("498d4604", "4c39f8").jcc("g", "no4")
    a("41391e").jcc("ne", "no4")                           # cmp [r14], ebx
    _report(a, 4, out, "4")
    a.label("no4")
    a("4b8d042e", "4c39f8").jcc("g", "next")               # r14 + r13 > r15: no text
    a("31c9", "4c89e2")                                    # rcx = 0; rdx = digits
    a.label("digit")
    a("4c39e9").jcc("ge", "text")                          # cmp rcx, r13; jge text
    a("410fb6040e", "38d0").jcc("ne", "next")              # movzx eax, [r14+rcx]; cmp al, dl
    a("48c1ea08", "48ffc1").jmp("digit")                   # rdx >>= 8; inc rcx
    a.label("text")
    _report(a, 10, out, "10")
    a.label("next")
    a("49ffc6").jmp("byte")                                # inc r14
    a.label("done")
    a.mov_rsi(out)("48c70600000000", "4c894e08")           # [rsi] = 0; [rsi+8] = r9
    a("b801000000", "bf01000000", "ba10000000", "0f05")
    a.exit(0)
    a.label("fail").exit(3)
    image = a.image(data=data, data_address=DATA, bss_size=2 * PAGE)
    return image, work


def memory_dump() -> tuple:
    """(image, work address): reads (address, size) into its bss, writes
    that memory to its output, exits 0."""
    work = DATA
    a = hostile.Asm()
    a.mov_rsi(work)("31ff", "ba10000000", "31c0", "0f05")  # read(0, work, 16)
    a("488b5608", "488b36")                                # rdx = [rsi+8]; rsi = [rsi]
    a("b801000000", "bf01000000", "0f05")                  # write(1, rsi, rdx)
    a.exit(0)
    return a.image(data_address=DATA, bss_size=PAGE), work


def cpuid() -> hostile.Image:
    """cpuid (leaf 0: eax is zero at entry); exit 0."""
    return hostile.Asm()("31c0", "0fa2").exit(0).image()


# -- running them ------------------------------------------------------------------

def _mappings(pid: int) -> list:
    """[(lo, hi, perms, name)] of a job, once it is in seccomp (the
    mappings are final then)."""
    deadline = time.monotonic() + 5
    while True:
        with open(f"/proc/{pid}/status") as f:
            seccomp = next(line.split()[1] for line in f if line.startswith("Seccomp:"))
        if seccomp != "0":
            break
        assert time.monotonic() < deadline, "the job never entered seccomp"
        time.sleep(0.001)
    spans = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi, fields[1], " ".join(fields[5:])))
    return spans


def _needles(pid: int) -> dict:
    return {8: struct.pack("<Q", pid), 4: struct.pack("<I", pid), 10: str(pid).encode()}


def find(buf: bytes, base: int, pid: int) -> set:
    """What the scanner must report for `buf` at `base`: {(kind, address)}."""
    hits = set()
    for kind, needle in _needles(pid).items():
        at = buf.find(needle)
        while at >= 0:
            hits.add((kind, base + at))
            at = buf.find(needle, at + 1)
    return hits


def _scan_input(pid: int, ranges: list) -> bytes:
    """The scanner's input, under a key that puts no needle in it."""
    digits = str(pid).encode()
    assert len(digits) <= 8 and len(ranges) <= MAX_RANGES
    for key in (0xA5C3_96E1_5A3C_691E, 0x5A3C_691E_A5C3_96E1, 0x0F1E_2D3C_4B5A_6978):
        words = [pid, int.from_bytes(digits, "little"), len(digits), len(ranges)]
        for lo, hi in ranges:
            words += [lo, hi]
        blob = struct.pack(f"<{1 + len(words)}Q", key, *(w ^ key for w in words))
        if not find(blob, 0, pid):
            return blob
    raise AssertionError(f"no key hides pid {pid} in the scanner's input")


def scan(image, work: int, limits=QUICK, pid=None, known=None):
    """Run the scanner over every readable mapping of the job, for the
    job's own pid (or `pid`).  Returns (hits, expected, maps): the hits
    reported, those the known contents of the mappings explain (`known`
    gives bytes for a (lo, hi, perms, name) mapping, or None), and the
    job's mappings."""
    job = sandbox.start(image, limits)
    try:
        maps = _mappings(job.pid)
    except BaseException:
        job.kill()
        job.wait()
        raise
    needle = job.pid if pid is None else pid
    readable = [m for m in maps if m[2].startswith("r")]
    blob = _scan_input(needle, [(lo, hi) for lo, hi, _, _ in readable])
    expected = set()
    for m in readable:
        content = known(m, blob) if known else None
        if content is not None:
            expected |= find(content, m[0], needle)
    result = job.communicate(blob)
    assert result.ok, (result, maps)
    records = struct.unpack(f"<{len(result.output) // 8}Q", result.output)
    pairs = list(zip(records[0::2], records[1::2]))
    assert pairs and pairs[-1][0] == 0, result.output
    count = pairs[-1][1]
    hits = set(pairs[:-1])
    assert len(hits) == min(count, MAX_REPORTED), (count, pairs)
    return hits, expected, maps


def _trampoline_code() -> bytes:
    fd = sandbox._ext().trampoline_memfd()
    return os.pread(fd, PAGE, 0)


def _describe(hits, maps) -> str:
    lines = []
    for kind, address in sorted(hits, key=lambda h: h[1]):
        where = next((f"{lo:#x}-{hi:#x} {perms} {name}" for lo, hi, perms, name in maps
                      if lo <= address < hi), "?")
        lines.append(f"{HIT_KINDS.get(kind, kind)} at {address:#x} in {where}")
    return "\n".join(lines)


def _keep_area(maps, image) -> tuple:
    """The two mappings of the keep area: the trampoline's code page and the
    parameter block, the only ones besides the image's and [vsyscall]."""
    own = {(r.start, r.end) for r in image.regions()}
    rest = sorted(m for m in maps if (m[0], m[1]) not in own and m[3] != "[vsyscall]")
    assert len(rest) == 2, maps
    return rest[0], rest[1]


def _expected_params(image) -> bytes:
    """What the parameter block may still hold once the job runs: the
    entry and the stack top (the job's own), zeros elsewhere."""
    block = bytearray(5 * PAGE)
    block[8:24] = struct.pack("<QQ", image.entry, STACK_TOP)
    return bytes(block)


def _known_contents(image, work: int, data: bytes = b""):
    """The contents of the scanner's mappings as the test knows them."""
    regions = {(r.start, r.end): r for r in image.regions()}

    def known(m, blob):
        lo, hi, perms, name = m
        region = regions.get((lo, hi))
        if region is not None and region.name == "text":
            return image.text.ljust(hi - lo, b"\0")
        if region is not None and region.name == "data":
            content = bytearray(data.ljust(hi - lo, b"\0"))
            content[work - lo:work - lo + len(blob)] = blob
            return bytes(content)
        if region is not None and region.name == "stack":
            # the trampoline's popfq leaves rflags just below the top
            return bytes(hi - lo - 8) + struct.pack("<Q", 0x202)
        if "cpushare-trampoline" in name:
            return _trampoline_code().ljust(hi - lo, b"\0")
        if perms.startswith("rw") and name == "" and hi - lo == 5 * PAGE:
            return _expected_params(image)
        return None
    return known


# -- the PID -----------------------------------------------------------------------

def test_the_scanner_finds_a_planted_pid():
    # The scanner is not blind: a value planted in its data, in each form,
    # at odd offsets, is found exactly where it is.
    fake = 4_123_457
    data = (b"\x11" * 5 + struct.pack("<I", fake) + b"\xff" * 7 + struct.pack("<Q", fake)
            + b"x" * 3 + str(fake).encode() + b"y")
    image, work = pid_scanner(data)
    hits, expected, maps = scan(image, work, pid=fake, known=_known_contents(image, work, data))
    assert expected == {(4, DATA + 5), (8, DATA + 16), (4, DATA + 16), (10, DATA + 27)}
    assert hits == expected, _describe(hits ^ expected, maps)


def test_the_job_cannot_find_its_pid(expected_mode):
    # Every readable mapping of the job (text, bss, stack, the keep area,
    # [vsyscall] where it is readable) holds its PID in no form, except
    # where the public bytes (its own text, the trampoline's code) happen
    # to spell it.
    image, work = pid_scanner()
    hits, expected, maps = scan(image, work, known=_known_contents(image, work))
    assert hits == expected, "the job found its PID:\n" + _describe(hits - expected, maps)
    assert {m[3] for m in maps if "cpushare-trampoline" in m[3]}, maps


def test_the_keep_area_holds_nothing_of_the_set_up(expected_mode):
    # The trampoline's code page is the trampoline and nothing else; its
    # parameter block (steps, PID, filter, XSAVE area, ready record) is
    # cleared before the jump but for the entry and the stack top.
    image, work = memory_dump()
    contents = {}
    for which in ("code", "params"):
        job = sandbox.start(image, QUICK)
        try:
            code, params = _keep_area(_mappings(job.pid), image)
        except BaseException:
            job.kill()
            job.wait()
            raise
        lo, hi = (code if which == "code" else params)[:2]
        result = job.communicate(struct.pack("<QQ", lo, hi - lo))
        assert result.ok and result.mode == expected_mode, result
        contents[which] = result.output
    assert contents["code"] == _trampoline_code().ljust(PAGE, b"\0")
    params = contents["params"]
    assert len(params) == 5 * PAGE
    left = {i: b for i, b in enumerate(params) if b and not 8 <= i < 24}
    assert not left, f"the parameter block keeps {len(left)} non-zero bytes: {sorted(left)[:32]}"
    assert params == _expected_params(image)


# -- CPUID -------------------------------------------------------------------------

def _cpuid_faulting() -> bool:
    """Can this CPU make CPUID fault?  arch_prctl(ARCH_SET_CPUID, 1) (CPUID
    on, as it is) says ENODEV where it cannot; the kernel shows the same as
    cpuid_fault in /proc/cpuinfo."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long]
    if libc.syscall(158, 0x1012, 1) == 0:  # __NR_arch_prctl, ARCH_SET_CPUID
        return True
    assert ctypes.get_errno() == errno.ENODEV, os.strerror(ctypes.get_errno())
    with open("/proc/cpuinfo") as f:
        assert not any("cpuid_fault" in line.split() for line in f if line.startswith("flags"))
    return False


FAULTING = _cpuid_faulting()


@pytest.mark.skipif(not FAULTING, reason="this CPU cannot make CPUID fault (no cpuid_fault in "
                    "/proc/cpuinfo): arch_prctl(ARCH_SET_CPUID, 0) says ENODEV, so CPUID "
                    "stays allowed")
def test_cpuid_faults_by_default():
    result = sandbox.run(cpuid(), limits=QUICK)
    assert (result.exit_status, result.signal, result.reason) == (None, signal.SIGSEGV,
                                                                  "fault"), result
    assert result.describe() == "killed: fault (SIGSEGV)"


@pytest.mark.skipif(FAULTING, reason="this CPU can make CPUID fault (cpuid_fault)")
def test_cpuid_runs_where_the_cpu_cannot_fault_it():
    # ENODEV from arch_prctl(ARCH_SET_CPUID) is not a set-up failure: the
    # job runs, and CPUID is among what it can see (cpushare.cpu(5)).
    result = sandbox.run(cpuid(), limits=QUICK)
    assert result.ok, result


def test_cpuid_works_when_allowed(expected_mode):
    result = sandbox.run(cpuid(), limits=sandbox.Limits(cpu_seconds=5, wall_seconds=20,
                                                        allow_cpuid=True))
    assert result.ok, result
    assert result.mode == expected_mode  # unlike the TSC, CPUID needs no filter
