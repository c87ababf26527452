"""The Floyd-Steinberg study's image pool: up to 10,000 grayscale images.

``pool(n)`` yields ``PoolImage(name, width, height, pixels)`` tuples, 8-bit
gray, row after row, every side between 1 and 1024.  The pool starts with
the photographs and measured images that Debian packages ship (found at
run time; a package that is not installed is skipped, see ``REAL``), then
continues with generated images: gradients, noise, textures, shapes,
checkerboards, rings, gratings, flat grays, and crops of the photographs.
Image ``i`` of the generated part depends only on ``i`` (and on the
photographs, for the crops): random numbers come from a counter-based hash
(SplitMix64) computed with numpy integer arithmetic, not from a stateful
generator, so ``pool(n)`` is a prefix of ``pool(m)`` for n < m and the pool
is the same on every machine with the same packages.

    python3 pool.py [--count N] [--list] [--save DIR]
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import importlib.util
import pickle
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

MAX_IMAGES = 10_000
MAX_SIDE = 1024
MPL_SAMPLE = Path("/usr/share/matplotlib/mpl-data/sample_data")


class PoolImage(NamedTuple):
    name: str
    width: int
    height: int
    pixels: bytes


# -- photographs and measured images shipped by Debian packages --------------

def _scipy_misc(name: str) -> Path | None:
    spec = importlib.util.find_spec("scipy")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0], "misc", name)
    return path if path.is_file() else None


def _to_u8(a: np.ndarray) -> np.ndarray:
    """Scale any numeric 2-D array to 0..255 by its own range."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.floor((a - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)


def _gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an 8-bit RGB array, in integers."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def _grace_hopper() -> np.ndarray | None:       # python3-matplotlib (-data)
    path = MPL_SAMPLE / "grace_hopper.jpg"
    if not path.is_file():
        return None
    from PIL import Image
    with Image.open(path) as im:
        return _gray(np.asarray(im.convert("RGB")))


def _ascent() -> np.ndarray | None:             # python3-scipy
    path = _scipy_misc("ascent.dat")
    if path is None:
        return None
    with open(path, "rb") as f:
        return np.array(pickle.load(f), dtype=np.uint8)


def _face() -> np.ndarray | None:               # python3-scipy
    path = _scipy_misc("face.dat")
    if path is None:
        return None
    raw = np.frombuffer(bz2.decompress(path.read_bytes()), np.uint8)
    return _gray(raw.reshape(768, 1024, 3))


def _mri() -> np.ndarray | None:                # python3-matplotlib (-data)
    path = MPL_SAMPLE / "s1045.ima.gz"
    if not path.is_file():
        return None
    with gzip.open(path) as f:
        return _to_u8(np.frombuffer(f.read(), ">u2").reshape(256, 256))


def _relief() -> np.ndarray | None:             # python3-matplotlib (-data)
    path = MPL_SAMPLE / "jacksboro_fault_dem.npz"
    if not path.is_file():
        return None
    with np.load(path) as d:
        return _to_u8(d["elevation"])


def _topobathy() -> np.ndarray | None:          # python3-matplotlib (-data)
    path = MPL_SAMPLE / "topobathy.npz"
    if not path.is_file():
        return None
    with np.load(path) as d:
        return _to_u8(d["topo"])


# name -> loader; photographs first (the crops are taken from these three)
REAL: dict[str, Callable[[], np.ndarray | None]] = {
    "photo-grace-hopper": _grace_hopper,
    "photo-ascent": _ascent,
    "photo-face": _face,
    "mri-head": _mri,
    "relief-jacksboro": _relief,
    "relief-topobathy": _topobathy,
}
PHOTOS = ("photo-grace-hopper", "photo-ascent", "photo-face")


@lru_cache(maxsize=None)
def real_images() -> tuple[tuple[str, np.ndarray], ...]:
    """The shipped images that this machine has, each at most 1024 a side."""
    out = []
    for name, load in REAL.items():
        a = load()
        if a is not None:
            out.append((name, np.ascontiguousarray(a[:MAX_SIDE, :MAX_SIDE])))
    return tuple(out)


# -- counter-based random numbers ----------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


class Rand:
    """Deterministic numbers for one image: ``Rand(i)`` is the same everywhere."""

    def __init__(self, *key: int):
        h = np.uint64(0x5EED_F5)
        for k in key:
            h = _mix(np.array([h ^ np.uint64(k)], np.uint64))[0]
        self.key = h
        self.counter = 0

    def bits(self, shape) -> np.ndarray:
        """uint64 array of the given shape, fresh on each call."""
        n = int(np.prod(shape))
        idx = np.arange(self.counter, self.counter + n, dtype=np.uint64)
        self.counter += n
        return _mix(idx ^ _mix(np.full(n, self.key, np.uint64))).reshape(shape)

    def uniform(self, shape=()) -> np.ndarray:
        return (self.bits(shape or (1,)) >> np.uint64(11)).astype(np.float64) / float(1 << 53) \
            if shape else float((self.bits((1,))[0] >> np.uint64(11))) / float(1 << 53)

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        return lo + int(self.bits((1,))[0] % np.uint64(hi - lo + 1))

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]


# -- generated images ----------------------------------------------------------

def _grid(w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w]
    return x.astype(np.float64), y.astype(np.float64)


def _quantize(f: np.ndarray) -> np.ndarray:
    """0..1 floats -> 0..255 bytes, clipped."""
    return np.clip(np.floor(f * 255.0 + 0.5), 0, 255).astype(np.uint8)


def gen_gradient(r: Rand, w: int, h: int) -> np.ndarray:
    x, y = _grid(w, h)
    angle = r.uniform() * 2 * np.pi
    t = x * np.cos(angle) + y * np.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    lo, hi = sorted((r.uniform(), r.uniform()))
    return _quantize(lo + (hi - lo) * t ** r.choice((0.5, 1.0, 1.0, 2.2)))


def gen_radial(r: Rand, w: int, h: int) -> np.ndarray:
    x, y = _grid(w, h)
    cx, cy = r.uniform() * w, r.uniform() * h
    d = np.hypot(x - cx, y - cy)
    return _quantize(1.0 - d / max(d.max(), 1e-9) * r.choice((0.5, 1.0)))


def gen_noise(r: Rand, w: int, h: int) -> np.ndarray:
    base = r.uniform() * 0.6 + 0.2
    amp = r.choice((0.05, 0.15, 0.5))
    return _quantize(base + amp * (r.uniform((h, w)) - 0.5) * 2)


def _value_noise(r: Rand, w: int, h: int, cell: int) -> np.ndarray:
    """Smoothstep-interpolated random values on a grid of `cell` pixels
    (separable: along x for every grid row, then along y)."""
    gh, gw = h // cell + 2, w // cell + 2
    g = r.uniform((gh, gw))
    fx, fy = np.arange(w) / cell, np.arange(h) / cell
    ix, iy = fx.astype(int), fy.astype(int)
    tx, ty = fx - ix, fy - iy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
    gx = g[:, ix] * (1 - tx) + g[:, ix + 1] * tx
    return gx[iy] * (1 - ty)[:, None] + gx[iy + 1] * ty[:, None]


def gen_texture(r: Rand, w: int, h: int) -> np.ndarray:
    cell = r.choice((4, 8, 16, 32, 64))
    f = np.zeros((h, w))
    amp, total = 1.0, 0.0
    for _octave in range(r.int(1, 4)):
        f += amp * _value_noise(r, w, h, cell)
        total += amp
        amp *= 0.5
        cell = max(cell // 2, 1)
    return _quantize(f / total)


def gen_checker(r: Rand, w: int, h: int) -> np.ndarray:
    x, y = _grid(w, h)
    cell = r.choice((1, 2, 3, 4, 8, 16, 32))
    a, b = r.uniform(), r.uniform()
    on = ((x // cell + y // cell) % 2).astype(bool)
    return _quantize(np.where(on, a, b))


def gen_rings(r: Rand, w: int, h: int) -> np.ndarray:
    x, y = _grid(w, h)
    cx, cy = w / 2 + (r.uniform() - 0.5) * w / 2, h / 2 + (r.uniform() - 0.5) * h / 2
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    if r.int(0, 1):     # zone plate: frequency grows with the radius
        k = np.pi / max(w, h) * r.choice((0.5, 1.0, 2.0))
        return _quantize(0.5 + 0.5 * np.cos(k * d2))
    period = r.choice((4.0, 8.0, 16.0, 33.0))
    return _quantize(0.5 + 0.5 * np.cos(2 * np.pi * np.sqrt(d2) / period))


def gen_grating(r: Rand, w: int, h: int) -> np.ndarray:
    x, y = _grid(w, h)
    angle = r.uniform() * np.pi
    period = r.choice((2.5, 3.0, 5.0, 7.0, 12.0, 40.0))
    t = x * np.cos(angle) + y * np.sin(angle)
    mean, amp = 0.3 + 0.4 * r.uniform(), 0.05 + 0.25 * r.uniform()
    return _quantize(mean + amp * np.sin(2 * np.pi * t / period))


def gen_flat(r: Rand, w: int, h: int) -> np.ndarray:
    # Flat grays are where error diffusion shows its worms and patterns;
    # favour the classic troublesome levels (1/2, 1/3, 1/4, near black/white).
    level = r.choice((128, 85, 170, 64, 192, 1, 254, 8, 247, r.int(0, 255), r.int(0, 255)))
    return np.full((h, w), level, np.uint8)


def gen_shapes(r: Rand, w: int, h: int) -> np.ndarray:
    x, y = _grid(w, h)
    img = np.full((h, w), r.uniform())
    for _ in range(r.int(3, 25)):
        kind, level = r.int(0, 2), r.uniform()
        cx, cy = r.uniform() * w, r.uniform() * h
        size = (0.03 + 0.3 * r.uniform()) * min(w, h)
        if kind == 0:
            mask = (abs(x - cx) < size) & (abs(y - cy) < size * (0.3 + r.uniform()))
        elif kind == 1:
            mask = (x - cx) ** 2 + (y - cy) ** 2 < size * size
        else:   # triangle: three half-planes
            a = r.uniform() * 2 * np.pi
            mask = np.ones((h, w), bool)
            for j in range(3):
                t = a + j * 2 * np.pi / 3
                mask &= (x - cx) * np.cos(t) + (y - cy) * np.sin(t) < size / 2
        img[mask] = level
    return _quantize(img)


def gen_mixed(r: Rand, w: int, h: int) -> np.ndarray:
    a = gen_gradient(r, w, h).astype(np.float64)
    b = gen_texture(r, w, h).astype(np.float64)
    t = r.uniform()
    return _quantize((t * a + (1 - t) * b) / 255.0)


def _downscale(a: np.ndarray, k: int) -> np.ndarray:
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    a = a[:h, :w].astype(np.uint32).reshape(h // k, k, w // k, k)
    return ((a.sum(axis=(1, 3)) + k * k // 2) // (k * k)).astype(np.uint8)


@lru_cache(maxsize=None)
def _photo(which: int, k: int) -> np.ndarray:
    photos = [a for name, a in real_images() if name in PHOTOS]
    return photos[which] if k == 1 else _downscale(photos[which], k)


def gen_crop(r: Rand, w: int, h: int) -> np.ndarray | None:
    photos = [a for name, a in real_images() if name in PHOTOS]
    if not photos:
        return None
    which = r.int(0, len(photos) - 1)
    k = r.choice((1, 1, 2))
    src = _photo(which, k)
    w, h = min(w, src.shape[1]), min(h, src.shape[0])
    x0, y0 = r.int(0, src.shape[1] - w), r.int(0, src.shape[0] - h)
    out = src[y0:y0 + h, x0:x0 + w]
    if r.int(0, 3) == 0:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


# kind -> generator, with weights: how many of every 20 generated images
GENERATORS: tuple[tuple[str, Callable, int], ...] = (
    ("crop", gen_crop, 5),
    ("gradient", gen_gradient, 2),
    ("radial", gen_radial, 1),
    ("noise", gen_noise, 1),
    ("texture", gen_texture, 3),
    ("checker", gen_checker, 1),
    ("rings", gen_rings, 1),
    ("grating", gen_grating, 1),
    ("flat", gen_flat, 1),
    ("shapes", gen_shapes, 2),
    ("mixed", gen_mixed, 2),
)
_SCHEDULE = tuple(kind for kind, _gen, weight in GENERATORS for _ in range(weight))
_BY_KIND = {kind: gen for kind, gen, _w in GENERATORS}
SIDES = (128, 192, 256, 256, 320, 384, 384, 448, 512, 512, 640)


def generated(i: int) -> PoolImage:
    """Generated image number i (0-based), the same on every machine."""
    r = Rand(i)
    kind = _SCHEDULE[(i + r.int(0, len(_SCHEDULE) - 1)) % len(_SCHEDULE)]
    w, h = r.choice(SIDES), r.choice(SIDES)
    a = _BY_KIND[kind](r, w, h)
    if a is None:       # no photographs on this machine: a texture instead
        kind, a = "texture", gen_texture(r, w, h)
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return PoolImage(f"{kind}-{i:05d}", a.shape[1], a.shape[0], a.tobytes())


def pool(n: int = MAX_IMAGES) -> Iterator[PoolImage]:
    """The first n images of the pool (n <= 10,000)."""
    if not 0 <= n <= MAX_IMAGES:
        raise ValueError(f"pool size {n} is outside 0..{MAX_IMAGES}")
    real = real_images()
    for name, a in real[:n]:
        yield PoolImage(name, a.shape[1], a.shape[0], a.tobytes())
    for i in range(n - min(n, len(real))):
        yield generated(i)


def digest(images) -> str:
    """SHA-256 over names, sizes and pixels: to compare pools."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.name} {im.width} {im.height}\n".encode())
        h.update(im.pixels)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="List or save the Floyd-Steinberg study's image pool.")
    p.add_argument("--count", type=int, default=40, help="how many images (default 40)")
    p.add_argument("--list", action="store_true", help="print name and size of each image")
    p.add_argument("--save", metavar="DIR", help="write each image as DIR/NAME.pgm")
    args = p.parse_args(argv)
    images = list(pool(args.count))
    for im in images:
        if args.list:
            print(f"{im.name:24} {im.width:5}x{im.height:<5}")
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            Path(args.save, im.name + ".pgm").write_bytes(
                f"P5\n{im.width} {im.height}\n255\n".encode() + im.pixels)
    print(f"{len(images)} images, {sum(i.width * i.height for i in images)} pixels, "
          f"sha256 {digest(images)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
