"""The CPUShare bytecode image format: pack, parse, validate.

A bytecode image is a flat x86-64 program for the seccomp computation model:
a fixed 128-byte header followed by the text bytes and the data bytes.
Everything is little-endian.  See cpushare-bytecode(5).

    offset size field
    0      8    magic         b"CPUSHBC\\0"
    8      2    version       1
    10     2    header_size   128
    12     4    flags         0 (reserved, must be 0)
    16     8    text_address  where text is mapped (page aligned)
    24     8    text_size     bytes of text that follow the header (> 0)
    32     8    data_address  where data+bss are mapped (page aligned; 0 when
                              data_size and bss_size are both 0)
    40     8    data_size     bytes of data that follow the text
    48     8    bss_size      zero bytes that follow the data in memory
    56     8    stack_size    bytes of stack (page multiple, >= 1 page)
    64     8    entry         first instruction (inside text)
    72     32   sha256        SHA-256 of the header with this field zeroed,
                              then text, then data
    104    24   reserved      zero

The stack is not placed by the image: it ends at STACK_TOP, a fixed
address of the format, so every image sees the same layout; one unmapped
guard page lies below it.  Every region lies inside [USER_MIN, USER_MAX):
the buyer's code is linked for gcc's small code model (the whole program
in the low 2 GiB) and nothing below 64 KiB can be mapped.

This module does no I/O and imports nothing OS-level.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

MAGIC = b"CPUSHBC\0"
VERSION = 1
HEADER_SIZE = 128
PAGE = 4096

USER_MIN = 0x10000  # vm.mmap_min_addr
USER_MAX = 0x80000000  # small code model: everything below 2 GiB
STACK_TOP = 0x7FFF0000  # the stack is [STACK_TOP - stack_size, STACK_TOP)
DEFAULT_TEXT_ADDRESS = 0x400000
DEFAULT_STACK_SIZE = 1 << 20

# Bounds that keep a hostile image from asking for absurd work before any
# limit of the seller applies; a run's memory limit is usually lower.
MAX_REGION = 1 << 30
MAX_STACK = 256 << 20

_HEADER = struct.Struct("<8sHHI7Q32s24s")
assert _HEADER.size == HEADER_SIZE
_SHA_OFFSET = 72


class BytecodeError(ValueError):
    """An image is malformed; the message says what and where."""


def page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True)
class Region:
    name: str
    start: int
    size: int  # mapped bytes, page multiple

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Image:
    text: bytes
    entry: int
    text_address: int = DEFAULT_TEXT_ADDRESS
    data: bytes = b""
    data_address: int = 0
    bss_size: int = 0
    stack_size: int = DEFAULT_STACK_SIZE

    # -- layout -----------------------------------------------------------
    @property
    def stack_address(self) -> int:
        return STACK_TOP - self.stack_size

    def regions(self) -> list[Region]:
        """The mapped regions, in address order (text, data+bss, stack)."""
        out = [Region("text", self.text_address, page_up(len(self.text)))]
        rw = len(self.data) + self.bss_size
        if rw:
            out.append(Region("data", self.data_address, page_up(rw)))
        out.append(Region("stack", self.stack_address, self.stack_size))
        return sorted(out, key=lambda r: r.start)

    @property
    def memory_size(self) -> int:
        """Bytes of memory a run of this image uses: exactly its regions."""
        return sum(r.size for r in self.regions())

    # -- identity ---------------------------------------------------------
    def _header(self, sha: bytes) -> bytes:
        return _HEADER.pack(
            MAGIC, VERSION, HEADER_SIZE, 0,
            self.text_address, len(self.text),
            self.data_address, len(self.data), self.bss_size,
            self.stack_size, self.entry, sha, b"\0" * 24,
        )

    @property
    def sha256(self) -> bytes:
        h = hashlib.sha256(self._header(b"\0" * 32))
        h.update(self.text)
        h.update(self.data)
        return h.digest()

    @property
    def digest(self) -> str:
        """Hex SHA-256: the image's name on the market and in caches."""
        return self.sha256.hex()

    def pack(self) -> bytes:
        self.validate()
        return self._header(self.sha256) + self.text + self.data

    # -- checks -----------------------------------------------------------
    def validate(self) -> "Image":
        """Raise BytecodeError unless the layout is one a seller can map."""
        if not self.text:
            raise BytecodeError("text is empty: an image needs code")
        for name, value in (("text_address", self.text_address),
                            ("data_address", self.data_address),
                            ("stack_size", self.stack_size)):
            if value % PAGE:
                raise BytecodeError(f"{name} {value:#x} is not a multiple of the page size ({PAGE})")
        if len(self.text) > MAX_REGION:
            raise BytecodeError(f"text_size {len(self.text)} exceeds the maximum {MAX_REGION}")
        if len(self.data) + self.bss_size > MAX_REGION:
            raise BytecodeError(
                f"data_size + bss_size {len(self.data) + self.bss_size} exceeds the maximum {MAX_REGION}")
        if not PAGE <= self.stack_size <= MAX_STACK:
            raise BytecodeError(f"stack_size {self.stack_size} is outside [{PAGE}, {MAX_STACK}]")
        if self.bss_size < 0:
            raise BytecodeError("bss_size is negative")
        if not (self.data or self.bss_size) and self.data_address:
            raise BytecodeError(
                f"data_address {self.data_address:#x} is set but there is no data and no bss")
        if (self.data or self.bss_size) and not self.data_address:
            raise BytecodeError("data or bss present but data_address is 0")
        regions = self.regions()
        for r in regions:
            if r.start < USER_MIN or r.end > USER_MAX:
                raise BytecodeError(
                    f"{r.name} region [{r.start:#x}, {r.end:#x}) lies outside the user range "
                    f"[{USER_MIN:#x}, {USER_MAX:#x})")
        # the stack's guard page must stay unmapped
        stack = next(r for r in regions if r.name == "stack")
        guarded = Region("stack", stack.start - PAGE, stack.size + PAGE)
        others = [r for r in regions if r.name != "stack"] + [guarded]
        others.sort(key=lambda r: r.start)
        for a, b in zip(others, others[1:]):
            if a.end > b.start:
                if "stack" not in (a.name, b.name):
                    raise BytecodeError(
                        f"{a.name} region [{a.start:#x}, {a.end:#x}) overlaps "
                        f"{b.name} region [{b.start:#x}, {b.end:#x})")
                r = a if b.name == "stack" else b
                if r.start < stack.end and stack.start < r.end:
                    raise BytecodeError(
                        f"{r.name} region [{r.start:#x}, {r.end:#x}) overlaps "
                        f"stack region [{stack.start:#x}, {stack.end:#x})")
                raise BytecodeError(
                    f"{r.name} region [{r.start:#x}, {r.end:#x}) overlaps the stack's guard page "
                    f"[{guarded.start:#x}, {stack.start:#x}), which must stay unmapped")
        if not self.text_address <= self.entry < self.text_address + len(self.text):
            raise BytecodeError(
                f"entry {self.entry:#x} is outside text [{self.text_address:#x}, "
                f"{self.text_address + len(self.text):#x})")
        return self


def parse(blob: bytes, *, where: str = "image") -> Image:
    """Parse and validate a packed image; errors start with `where`."""
    try:
        return _parse(bytes(blob))
    except BytecodeError as e:
        raise BytecodeError(f"{where}: {e}") from None


def _parse(blob: bytes) -> Image:
    if len(blob) < HEADER_SIZE:
        raise BytecodeError(f"{len(blob)} bytes is shorter than the {HEADER_SIZE}-byte header")
    (magic, version, header_size, flags, text_address, text_size, data_address,
     data_size, bss_size, stack_size, entry, sha, reserved) = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise BytecodeError(f"bad magic {magic!r} at offset 0 (expected {MAGIC!r}): not a CPUShare bytecode image")
    if version != VERSION:
        raise BytecodeError(f"unsupported version {version} at offset 8 (this reader knows {VERSION})")
    if header_size != HEADER_SIZE:
        raise BytecodeError(f"header_size {header_size} at offset 10 (expected {HEADER_SIZE})")
    if flags:
        raise BytecodeError(f"flags {flags:#x} at offset 12: reserved bits must be 0")
    if reserved.strip(b"\0"):
        raise BytecodeError("reserved bytes at offset 104 are not zero")
    if text_size > MAX_REGION or data_size > MAX_REGION or bss_size > MAX_REGION:
        raise BytecodeError(
            f"text_size {text_size}, data_size {data_size} or bss_size {bss_size} exceeds {MAX_REGION}")
    want = HEADER_SIZE + text_size + data_size
    if len(blob) != want:
        raise BytecodeError(
            f"length {len(blob)} does not match the header: {HEADER_SIZE} + text_size {text_size} "
            f"+ data_size {data_size} = {want}")
    text = blob[HEADER_SIZE:HEADER_SIZE + text_size]
    data = blob[HEADER_SIZE + text_size:]
    image = Image(text=text, entry=entry, text_address=text_address, data=data,
                  data_address=data_address, bss_size=bss_size, stack_size=stack_size)
    if image.sha256 != sha:
        raise BytecodeError(
            f"SHA-256 mismatch at offset {_SHA_OFFSET}: header says {sha.hex()}, content is "
            f"{image.sha256.hex()} (corrupt or altered image)")
    return image.validate()


def load(path) -> Image:
    """Read and parse an image file (the only function here that does I/O)."""
    with open(path, "rb") as f:
        return parse(f.read(MAX_REGION * 2 + HEADER_SIZE + 1), where=str(path))
