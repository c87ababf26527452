"""The buyer's toolchain: C sources -> a CPUShare bytecode image.

``build()`` compiles C with the system gcc, freestanding and static, links
it with the project's crt0 (``crt0.S``), runtime (``cpushare_rt.c``) and
linker script (``cpushare.ld``), then turns the two loadable segments of
the resulting ELF into an image: the r-x segment becomes the text (code
and read-only data), the rw- segment the data and the bss.  ``cpushare.h``
is the runtime header a buyer includes.  See cpushare-bytecode(5).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, TextIO

from .. import bytecode
from ..fileutil import atomic_write
from ..bytecode import DEFAULT_STACK_SIZE, PAGE, Image

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cpushare.h"
CRT0 = HERE / "crt0.S"
RUNTIME = HERE / "cpushare_rt.c"
LINKER_SCRIPT = HERE / "cpushare.ld"

# Flags that make gcc's output fit the sandbox: no libc, no PIC, everything
# in the low 2 GiB, no stack protector (it reads %fs, which is not set up),
# no CET (endbr64 is harmless but useless), no unwind tables.
BASE_CFLAGS = (
    "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie",
    "-fno-stack-protector", "-fcf-protection=none", "-mcmodel=small",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-fno-exceptions", "-ffunction-sections", "-fdata-sections",
)
DEFAULT_CFLAGS = ("-O2",)
LDFLAGS = (
    "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096", "-Wl,-z,noexecstack",
    "-Wl,--no-dynamic-linker", "-Wl,--gc-sections",
)


class ToolchainError(Exception):
    """A build failed; ``output`` holds what gcc or ld said, if anything."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg}\n{self.output.rstrip()}" if self.output.strip() else msg


# -- a small ELF64 reader ----------------------------------------------------

PT_LOAD, PT_TLS = 1, 7
PF_X, PF_W, PF_R = 1, 2, 4
SHF_ALLOC = 2
SHF_TLS = 0x400
SHT_NOBITS = 8

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")


@dataclass(frozen=True)
class Segment:
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    flags: int
    addr: int
    size: int


@dataclass(frozen=True)
class Elf:
    entry: int
    segments: tuple[Segment, ...]
    sections: tuple[Section, ...]
    data: bytes

    def bytes_of(self, seg: Segment) -> bytes:
        return self.data[seg.offset:seg.offset + seg.filesz]


def read_elf(data: bytes, where: str = "ELF file") -> Elf:
    """Parse the headers of a little-endian x86-64 ELF64 executable."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ToolchainError(f"{where}: {what}")

    need(len(data) >= _EHDR.size, f"{len(data)} bytes is too short for an ELF header")
    (ident, e_type, machine, _version, entry, phoff, shoff, _flags, _ehsize,
     phentsize, phnum, shentsize, shnum, shstrndx) = _EHDR.unpack_from(data)
    need(ident[:4] == b"\x7fELF", "not an ELF file (bad magic)")
    need(ident[4] == 2 and ident[5] == 1, "not a little-endian ELF64 file")
    need(machine == 62, f"e_machine {machine} is not x86-64 (62)")
    need(e_type == 2, f"e_type {e_type} is not ET_EXEC (2): the link was not static and non-PIE")
    need(phentsize == _PHDR.size and phoff + phnum * phentsize <= len(data),
         "program header table is malformed")
    segments = tuple(Segment(*(_PHDR.unpack_from(data, phoff + i * phentsize)[j] for j in (0, 1, 2, 3, 5, 6)))
                     for i in range(phnum))
    for s in segments:
        need(s.type != PT_LOAD or s.offset + s.filesz <= len(data),
             f"segment at {s.vaddr:#x} extends past the end of the file")
    sections: list[Section] = []
    if shoff and shnum:
        need(shentsize == _SHDR.size and shoff + shnum * shentsize <= len(data),
             "section header table is malformed")
        raw = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
        strtab = raw[shstrndx] if shstrndx < shnum else None
        for (name, type_, flags, addr, offset, size, *_rest) in raw:
            label = ""
            if strtab is not None:
                start = strtab[4] + name
                end = data.find(b"\0", start)
                label = data[start:end].decode("ascii", "replace")
            sections.append(Section(label, type_, flags, addr, size))
    return Elf(entry, segments, tuple(sections), data)


def elf_to_image(elf: Elf, *, stack_size: int = DEFAULT_STACK_SIZE,
                 where: str = "ELF file") -> Image:
    """Turn a linked ELF into an image: r-x segment -> text, rw- -> data + bss."""
    if any(s.type == PT_TLS for s in elf.segments) or any(
            sec.flags & SHF_TLS and sec.size for sec in elf.sections):
        raise ToolchainError(f"{where}: uses thread-local storage (_Thread_local, __thread), "
                             "which a bytecode job cannot have")
    for sec in elf.sections:
        if sec.flags & SHF_ALLOC and sec.size and sec.name.startswith((".init_array", ".fini_array",
                                                                      ".ctors", ".dtors")):
            raise ToolchainError(f"{where}: section {sec.name} holds constructors or destructors, "
                                 "which crt0 does not run")
    loads = [s for s in elf.segments if s.type == PT_LOAD and s.memsz]
    text = [s for s in loads if s.flags & PF_X]
    rw = [s for s in loads if not s.flags & PF_X]
    if len(text) != 1 or len(rw) > 1:
        raise ToolchainError(
            f"{where}: expected one r-x and at most one rw- loadable segment, found "
            + ", ".join(f"{_flags(s.flags)} at {s.vaddr:#x}" for s in loads))
    t = text[0]
    if t.flags & PF_W:
        raise ToolchainError(f"{where}: the text segment at {t.vaddr:#x} is writable")
    if t.memsz != t.filesz:
        raise ToolchainError(f"{where}: the text segment at {t.vaddr:#x} has zero-fill bytes")
    data, data_address, bss = b"", 0, 0
    if rw:
        d = rw[0]
        if d.vaddr % PAGE:
            raise ToolchainError(f"{where}: the data segment at {d.vaddr:#x} is not page aligned")
        data, data_address, bss = elf.bytes_of(d), d.vaddr, d.memsz - d.filesz
    # Every allocated section must lie inside one of the two segments.
    for sec in elf.sections:
        if sec.flags & SHF_ALLOC and sec.size:
            if not any(s.vaddr <= sec.addr and sec.addr + sec.size <= s.vaddr + s.memsz for s in loads):
                raise ToolchainError(f"{where}: section {sec.name} at {sec.addr:#x} is outside "
                                     "the text and data segments")
    image = Image(text=elf.bytes_of(t), entry=elf.entry, text_address=t.vaddr,
                  data=data, data_address=data_address, bss_size=bss, stack_size=stack_size)
    try:
        return image.validate()
    except bytecode.BytecodeError as e:
        raise ToolchainError(f"{where}: the linked program does not make a valid image: {e}") from None


def _flags(f: int) -> str:
    return ("r" if f & PF_R else "-") + ("w" if f & PF_W else "-") + ("x" if f & PF_X else "-")


# -- the build -----------------------------------------------------------------

_MISSING_MAIN = re.compile(r"undefined reference to [`']main'")


def parse_size(text: str) -> int:
    """'1048576', '64K', '1M', '1G' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional K, M or G suffix")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def build(sources: Iterable[str | os.PathLike], output: str | os.PathLike | None = None, *,
          cflags: Iterable[str] = (), stack_size: int = DEFAULT_STACK_SIZE,
          gcc: str = "gcc", elf_output: str | os.PathLike | None = None,
          diagnostics: TextIO | None = None) -> Image:
    """Compile and link C sources into an image; write it to ``output`` if given.

    ``cflags`` come after the toolchain's own flags and after the default
    ``-O2``, so ``-O0`` or ``-O3`` there wins.  ``stack_size`` is rounded up
    to a whole page.  gcc's warnings go to ``diagnostics`` when given; on
    failure a ToolchainError carries what gcc said in ``output``.
    """
    sources = [Path(s) for s in sources]
    if not sources:
        raise ToolchainError("no source files given")
    for s in sources:
        if not s.is_file():
            raise ToolchainError(f"{s}: no such source file")
    if not isinstance(stack_size, int) or stack_size <= 0:
        raise ToolchainError(f"stack size {stack_size!r} must be a positive number of bytes")
    stack_size = bytecode.page_up(stack_size)
    if stack_size > bytecode.MAX_STACK:
        raise ToolchainError(f"stack size {stack_size} exceeds the maximum {bytecode.MAX_STACK}")
    if shutil.which(gcc) is None:
        raise ToolchainError(f"{gcc}: compiler not found (install gcc)")
    flags = [*BASE_CFLAGS, *DEFAULT_CFLAGS, *cflags]
    names = " ".join(str(s) for s in sources)
    with tempfile.TemporaryDirectory(prefix="cpushare-cc-") as tmp:
        rt_obj = Path(tmp, "cpushare_rt.o")
        # The runtime: fixed flags, so the buyer's cannot turn its loops
        # into calls to itself.
        _run([gcc, *BASE_CFLAGS, "-O2", "-fno-tree-loop-distribute-patterns", "-fno-builtin",
              "-Wall", "-Wextra", "-I", str(HERE), "-c", str(RUNTIME), "-o", str(rt_obj)],
             "compiling the runtime (cpushare_rt.c)", diagnostics)
        elf_path = Path(tmp, "job.elf")
        cmd = [gcc, *flags, "-I", str(HERE), "-T", str(LINKER_SCRIPT), *LDFLAGS,
               "-o", str(elf_path), str(CRT0), *map(str, sources), str(rt_obj), "-lgcc"]
        try:
            _run(cmd, f"compiling {names}", diagnostics)
        except ToolchainError as e:
            if _MISSING_MAIN.search(e.output):
                raise ToolchainError(
                    f"{names}: no main function: a CPUShare program defines `int main(void)`",
                    e.output) from None
            raise
        blob = elf_path.read_bytes()
        if elf_output is not None:
            shutil.copy(elf_path, elf_output)
    image = elf_to_image(read_elf(blob, where=f"linked {names}"), stack_size=stack_size,
                         where=f"linked {names}")
    if output is not None:
        write_image(image, output)
    return image


def write_image(image: Image, path: str | os.PathLike) -> None:
    """Write a packed image atomically (a temporary file, then rename)."""
    atomic_write(path, image.pack(), mode=0o644, fsync=False)


def _run(cmd: list[str], what: str, diagnostics: TextIO | None) -> None:
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as e:
        raise ToolchainError(f"{what}: cannot run {cmd[0]}: {e.strerror}") from None
    if proc.returncode != 0:
        raise ToolchainError(f"{what}: {Path(cmd[0]).name} failed with exit status {proc.returncode}",
                             proc.stderr + proc.stdout)
    if diagnostics is not None and proc.stderr:
        diagnostics.write(proc.stderr)
