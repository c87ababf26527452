"""The Floyd-Steinberg job from the buyer's side: build it, talk to it.

``encode()`` makes the job's input message, ``decode()`` reads its output
(see the format at the top of dither.c), ``build_job()`` compiles dither.c
into a bytecode image with ``cpushare cc``, ``build_native()`` compiles the
same kernel into an ordinary program (native.c), and ``run_native()`` /
``run_native_batch()`` run it, for checking results and for timing.
"""

from __future__ import annotations

import os
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

HERE = Path(__file__).resolve().parent
DITHER_C = HERE / "dither.c"
NATIVE_C = HERE / "native.c"

MAX_SIDE = 1024
MAX_SIGMAS = 6
MAX_SIGMA16 = 256
# Blur widths (Gaussian sigma) in 1/16 pixel: none, 1, 2 and 4 pixels.
DEFAULT_SIGMAS16 = (0, 16, 32, 64)
WANT_IMAGES = 1

_IN = struct.Struct("<4sHHBBH6H")           # 24 bytes
_OUT = struct.Struct("<4sHHBBHIQQQQ")       # 48 bytes
_BLUR = struct.Struct("<HHIQQ")             # 24 bytes per blur width

# Exit statuses of the job (dither.c)
STATUS_BAD_INPUT = 2
STATUS_TOO_BIG = 3


class JobError(Exception):
    """The job refused its input or its output is not what dither.c writes."""


def encode(width: int, height: int, pixels: bytes, *, sigmas16: Sequence[int] = DEFAULT_SIGMAS16,
           images: bool = False, check: bool = True) -> bytes:
    """The job's input: one length-prefixed FSD1 message.

    ``check=False`` lets tests build inputs the job must refuse."""
    if check:
        if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise ValueError(f"image size {width}x{height} is outside 1x1..{MAX_SIDE}x{MAX_SIDE}")
        if len(pixels) != width * height:
            raise ValueError(f"{len(pixels)} pixel bytes for a {width}x{height} image")
        if len(sigmas16) > MAX_SIGMAS or any(not 0 <= s <= MAX_SIGMA16 for s in sigmas16):
            raise ValueError(f"blur widths {list(sigmas16)}: at most {MAX_SIGMAS}, each 0..{MAX_SIGMA16}")
    slots = list(sigmas16) + [0] * (MAX_SIGMAS - len(sigmas16))
    body = _IN.pack(b"FSD1", width, height, WANT_IMAGES if images else 0, len(sigmas16), 0,
                    *slots) + bytes(pixels)
    return struct.pack("<I", len(body)) + body


@dataclass(frozen=True)
class Blur:
    sigma16: int
    radius: int
    sse_raster: int
    sse_serpentine: int


@dataclass(frozen=True)
class Measures:
    """What the job computed for one image (exact integers, see dither.c)."""
    width: int
    height: int
    pixels: int
    sum: int
    white_raster: int
    white_serpentine: int
    differ: int
    blurs: tuple[Blur, ...]
    raster: bytes | None = None
    serpentine: bytes | None = None

    @property
    def mean(self) -> float:
        return self.sum / self.pixels

    @property
    def mean_raster(self) -> float:
        return 255.0 * self.white_raster / self.pixels

    @property
    def mean_serpentine(self) -> float:
        return 255.0 * self.white_serpentine / self.pixels

    def mse(self, i: int) -> tuple[float, float]:
        """(raster, serpentine) mean squared error after blur i, in gray levels squared."""
        b = self.blurs[i]
        scale = 65536.0 * self.pixels
        return b.sse_raster / scale, b.sse_serpentine / scale


def decode(output: bytes, *, where: str = "job output") -> Measures:
    """Parse one output message of the job; JobError says what is wrong."""
    if len(output) < 4 + _OUT.size:
        text = output.decode("utf-8", "replace").strip()
        raise JobError(f"{where}: {text!r}" if text.startswith("dither:")
                       else f"{where}: {len(output)} bytes is too short for a result")
    (length,) = struct.unpack_from("<I", output)
    if length != len(output) - 4:
        if output.startswith(b"dither:"):
            raise JobError(f"{where}: {output.decode('utf-8', 'replace').strip()!r}")
        raise JobError(f"{where}: length prefix says {length} bytes, {len(output) - 4} follow")
    magic, w, h, flags, n, _r, npix, total, wr, ws, differ = _OUT.unpack_from(output, 4)
    if magic != b"FSR1":
        raise JobError(f"{where}: bad magic {magic!r}, expected b'FSR1'")
    if npix != w * h or n > MAX_SIGMAS:
        raise JobError(f"{where}: inconsistent header ({w}x{h}, {npix} pixels, {n} blur widths)")
    off = 4 + _OUT.size
    blurs = tuple(Blur(*_BLUR.unpack_from(output, off + i * _BLUR.size)[:2],
                       *_BLUR.unpack_from(output, off + i * _BLUR.size)[3:]) for i in range(n))
    off += n * _BLUR.size
    raster = serpentine = None
    if flags & WANT_IMAGES:
        raster, serpentine = output[off:off + npix], output[off + npix:off + 2 * npix]
        off += 2 * npix
    if off != len(output):
        raise JobError(f"{where}: {len(output)} bytes, expected {off} for {w}x{h} with flags {flags}")
    return Measures(w, h, npix, total, wr, ws, differ, blurs, raster, serpentine)


def split_outputs(output: bytes) -> tuple[list[bytes], bytes]:
    """A run over several input messages -> (one output message per image
    done, each with its length prefix; whatever follows, e.g. the job's
    "dither: ..." line about the image it refused)."""
    parts, off = [], 0
    while off + 4 + _OUT.size <= len(output) and output[off + 4:off + 8] == b"FSR1":
        (length,) = struct.unpack_from("<I", output, off)
        if off + 4 + length > len(output):
            break
        parts.append(output[off:off + 4 + length])
        off += 4 + length
    return parts, output[off:]


# -- building --------------------------------------------------------------------

def _toolchain_dir() -> Path:
    from cpushare import toolchain
    return toolchain.HERE


def _stale(target: Path, sources: Iterable[Path]) -> bool:
    if not target.exists():
        return True
    t = target.stat().st_mtime
    return any(s.stat().st_mtime > t for s in sources)


def build_job(out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Compile dither.c with `cpushare cc` into OUT_DIR/dither.bin (if stale)."""
    from cpushare import toolchain
    out = Path(out_dir, "dither.bin")
    out.parent.mkdir(parents=True, exist_ok=True)
    deps = [DITHER_C, toolchain.HEADER, toolchain.RUNTIME, toolchain.CRT0, toolchain.LINKER_SCRIPT]
    if force or _stale(out, deps):
        toolchain.build([DITHER_C], out, cflags=["-Wall", "-Wextra"])
    return out


def native_cflags() -> list[str]:
    """The job's code generation flags, minus what only a bare image needs,
    so the native kernel is the same machine code as the sandboxed one."""
    from cpushare import toolchain
    skip = {"-nostdlib", "-static"}
    return [f for f in toolchain.BASE_CFLAGS if f not in skip] + list(toolchain.DEFAULT_CFLAGS)


def build_native(out_dir: str | os.PathLike, *, force: bool = False, gcc: str = "gcc") -> Path:
    """Compile native.c (which includes dither.c) into OUT_DIR/dither-native."""
    out = Path(out_dir, "dither-native")
    out.parent.mkdir(parents=True, exist_ok=True)
    inc = _toolchain_dir()
    if force or _stale(out, [DITHER_C, NATIVE_C, inc / "cpushare.h"]):
        cmd = [gcc, *native_cflags(), "-Wall", "-Wextra", "-I", str(inc), "-o", str(out), str(NATIVE_C)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise JobError(f"compiling {NATIVE_C} natively failed (exit status {proc.returncode}):\n"
                           + proc.stderr)
    return out


# -- running natively ------------------------------------------------------------

def run_native(native: str | os.PathLike, message: bytes) -> tuple[int, bytes]:
    """One message through the native kernel: (exit status, output)."""
    proc = subprocess.run([str(native)], input=message, capture_output=True)
    return proc.returncode, proc.stdout


def run_native_batch(native: str | os.PathLike, messages: Iterable[bytes]) -> list[tuple[int, bytes]]:
    """Many messages through one native process: [(exit status, output)]."""
    data = b"".join(messages)
    proc = subprocess.run([str(native), "--batch"], input=data, capture_output=True)
    if proc.returncode != 0:
        raise JobError(f"{native} --batch: exit status {proc.returncode}: "
                       + proc.stderr.decode("utf-8", "replace").strip())
    out, off, results = proc.stdout, 0, []
    while off < len(out):
        status, n = struct.unpack_from("<II", out, off)
        results.append((status, out[off + 8:off + 8 + n]))
        off += 8 + n
    return results
