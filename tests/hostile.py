"""Hostile (and a few friendly) bytecode images, written as x86-64 machine
code bytes so the tests need no compiler.  Each builder returns an Image
whose text starts at TEXT and whose entry is its first byte.

`Asm` is a tiny assembler: raw bytes plus labels with rel32 jumps.
"""

from __future__ import annotations

import struct

from cpushare.bytecode import DEFAULT_TEXT_ADDRESS, Image

TEXT = DEFAULT_TEXT_ADDRESS
DATA = 0x10000000

SYS_READ, SYS_WRITE, SYS_RT_SIGRETURN, SYS_EXIT, SYS_EXIT_GROUP = 0, 1, 15, 60, 231
ALLOWED = {SYS_READ, SYS_WRITE, SYS_RT_SIGRETURN, SYS_EXIT}
X32_BIT = 0x40000000

_JCC = {"e": 0x84, "ne": 0x85, "l": 0x8C, "ge": 0x8D, "le": 0x8E, "g": 0x8F, "b": 0x82}


def i32(n: int) -> bytes:
    return struct.pack("<i", n) if n < 0 else struct.pack("<I", n)


def i64(n: int) -> bytes:
    return struct.pack("<Q", n & 0xFFFFFFFFFFFFFFFF)


class Asm:
    def __init__(self):
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def __call__(self, *chunks: bytes | str) -> "Asm":
        for c in chunks:
            self.code += bytes.fromhex(c) if isinstance(c, str) else c
        return self

    def label(self, name: str) -> "Asm":
        self.labels[name] = len(self.code)
        return self

    def _rel(self, name: str) -> None:
        self.fixups.append((len(self.code), name))
        self.code += b"\0\0\0\0"

    def jmp(self, name: str) -> "Asm":
        self.code += b"\xe9"
        self._rel(name)
        return self

    def jcc(self, cc: str, name: str) -> "Asm":
        self.code += bytes([0x0F, _JCC[cc]])
        self._rel(name)
        return self

    def call(self, name: str) -> "Asm":
        self.code += b"\xe8"
        self._rel(name)
        return self

    # -- common sequences --------------------------------------------------
    def mov_rax(self, n: int) -> "Asm":
        return self("48b8", i64(n))

    def mov_rdi(self, n: int) -> "Asm":
        return self("48bf", i64(n))

    def mov_rsi(self, n: int) -> "Asm":
        return self("48be", i64(n))

    def mov_edx(self, n: int) -> "Asm":
        return self("ba", i32(n))

    def syscall(self) -> "Asm":
        return self("0f05")

    def sys(self, nr: int, rdi: int = 0, rsi: int = 0, rdx: int = 0) -> "Asm":
        return self.mov_rax(nr).mov_rdi(rdi).mov_rsi(rsi).mov_edx(rdx).syscall()

    def exit(self, status: int) -> "Asm":
        return self.mov_rax(SYS_EXIT).mov_rdi(status).syscall()("0f0b")  # ud2 if it returns

    def write_rax(self) -> "Asm":
        """write(1, &rax, 8) (through the stack)."""
        return self("50", "b801000000", "bf01000000", "4889e6", "ba08000000", "0f05", "58")

    def bytes(self) -> bytes:
        out = bytearray(self.code)
        for at, name in self.fixups:
            out[at:at + 4] = struct.pack("<i", self.labels[name] - (at + 4))
        return bytes(out)

    def image(self, **kw) -> Image:
        return Image(text=self.bytes(), entry=TEXT, text_address=TEXT, **kw)


# -- friendly ------------------------------------------------------------------

def exit_with(status: int) -> Image:
    return Asm().exit(status).image()


def echo(**kw) -> Image:
    """Copy stdin to stdout in 64 KiB reads until EOF, then exit 0
    (exit 3 when a write fails)."""
    a = Asm()
    a("4881ec00000100")                 # sub rsp, 0x10000
    a.label("top")
    a("31ff", "4889e6", "ba00000100", "31c0", "0f05")  # read(0, rsp, 0x10000)
    a("4885c0").jcc("le", "done")       # test rax, rax; jle done
    a("4989c4", "4989e5")               # mov r12, rax; mov r13, rsp
    a.label("w")
    a("b801000000", "bf01000000", "4c89ee", "4c89e2", "0f05")  # write(1, r13, r12)
    a("4885c0").jcc("le", "fail")
    a("4901c5", "4929c4").jcc("ne", "w")  # add r13, rax; sub r12, rax; jnz w
    a.jmp("top")
    a.label("done").exit(0)
    a.label("fail").exit(3)
    return a.image(**kw)


def write_region(address: int, size: int, **kw) -> Image:
    """write(1, address, size); exit 0."""
    return Asm().sys(SYS_WRITE, 1, address, size).exit(0).image(**kw)


def block_on_read() -> Image:
    """read(0, stack, 1) then exit 0: sits in read() until its input closes."""
    return Asm()("31ff", "488d7424f0", "ba01000000", "31c0", "0f05").exit(0).image()


def busy(iterations: int) -> Image:
    return Asm().mov_rax(0)("48b9", i64(iterations)).label("l")("48ffc9").jcc("ne", "l").exit(0).image()


def register_dump() -> Image:
    """At entry, writes rax, rcx, rdx, rbx, rbp, rsi, rdi, r8..r15, the
    entry rsp, xmm0, xmm15, rflags, fs base, gs base: 21 qwords."""
    a = Asm()
    a("50", "51", "52", "53", "55", "56", "57")               # rax rcx rdx rbx rbp rsi rdi
    a("4150", "4151", "4152", "4153", "4154", "4155", "4156", "4157")  # r8..r15
    a("488d442478", "50")                                      # lea rax, [rsp+120]; push (entry rsp)
    a("66480f7ec0", "50")                                      # movq rax, xmm0; push
    a("664c0f7ef8", "50")                                      # movq rax, xmm15; push
    a("9c")                                                    # pushfq
    a("f3480faec0", "50")                                      # rdfsbase rax; push
    a("f3480faec8", "50")                                      # rdgsbase rax; push
    a("b801000000", "bf01000000", "4889e6", "baa8000000", "0f05")  # write(1, rsp, 168)
    return a.exit(0).image()


REGISTER_NAMES = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                  "rsp", "xmm0", "xmm15", "rflags", "fsbase", "gsbase")


def parse_register_dump(out: bytes) -> dict[str, int]:
    values = struct.unpack(f"<{len(REGISTER_NAMES)}Q", out)
    return dict(zip(REGISTER_NAMES, reversed(values)))


def fd_probe(first: int = 2, last: int = 1023) -> Image:
    """For every fd in [first, last]: read(fd, buf, 1) then write(fd, buf, 1);
    writes both return values (2 qwords per fd) to stdout, exits 0."""
    a = Asm()
    a("4881ec00000100")                       # sub rsp, 0x10000 (results at rsp, buf at rsp+0xf000)
    a("41bc", i32(first), "4989e5")           # mov r12d, first; mov r13, rsp
    a.label("l")
    a("31c0", "4489e7", "488db42400f00000", "ba01000000", "0f05")        # read
    a("49894500", "4983c508")                 # mov [r13], rax; add r13, 8
    a("b801000000", "4489e7", "488db42400f00000", "ba01000000", "0f05")  # write
    a("49894500", "4983c508")
    a("41ffc4", "4181fc", i32(last + 1)).jcc("l", "l")  # inc r12d; cmp r12d, last+1; jl
    a("4c89ea", "4829e2", "4889e6", "b801000000", "bf01000000", "0f05")  # write(1, rsp, r13-rsp)
    return a.exit(0).image()


# -- hostile -------------------------------------------------------------------

def syscall_nr(nr: int) -> Image:
    """One system call (all arguments zero), then exit 0."""
    return Asm().mov_rax(nr)("31ff", "31f6", "31d2", "4d31d2", "4d31c0", "4d31c9").syscall().exit(0).image()


def int80(nr: int, ebx: int = 0, ecx: int = 0, edx: int = 0) -> Image:
    """A 32-bit system call through int 0x80, then exit 0 (64-bit)."""
    return Asm()("b8", i32(nr), "bb", i32(ebx), "b9", i32(ecx), "ba", i32(edx), "cd80").exit(0).image()


def write_own_text() -> Image:
    return Asm().mov_rax(TEXT)("c60000").exit(0).image()


def jump_to(address: int, **kw) -> Image:
    return Asm().mov_rax(address)("ffe0").image(**kw)


def load_from(address: int) -> Image:
    """mov rax, [address]; write it out; exit 0."""
    return Asm()("48a1", i64(address)).write_rax().exit(0).image()


def recurse(stack_size: int = 16 << 10) -> Image:
    a = Asm().label("f").call("f")
    return a.image(stack_size=stack_size)


def spin() -> Image:
    return Asm()("ebfe").image()


def flood(chunk: int = 4096) -> Image:
    """write(1, stack, chunk) forever."""
    a = Asm()("4881ec", i32(chunk)).label("l")
    a("b801000000", "bf01000000", "4889e6", "ba", i32(chunk), "0f05").jmp("l")
    return a.image()


def rdtsc() -> Image:
    return Asm()("0f31").exit(0).image()
