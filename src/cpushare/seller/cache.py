"""The seller's image cache: bytecode images by digest, bounded in size.

A directory of ``DIGEST.bin`` files, DIGEST being `bytecode.Image.digest`
(the image's name on the market).  A file is written to a temporary
name and renamed into place, so a crash never leaves a half image under a
digest's name; every load parses the image again and checks that its
digest is the one it is filed under, so a file changed on disk is dropped
rather than run.  The total size is bounded: the least recently used
images are evicted first (use is recorded in the file's mtime, so the
order survives a restart).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .. import bytecode, models
from ..fileutil import atomic_write
from ..protocol import is_digest

log = logging.getLogger("cpushare.seller")

DEFAULT_MAX_BYTES = 1 << 30


class CacheError(ValueError):
    """An image could not be cached; the message says which and why."""


class BoundedDir:
    """Files of a cache directory, bounded in total size: the least recently
    used (oldest mtime) go first.  Subclasses say which files (PATTERN),
    which leftovers of an interrupted write to clean (LEFTOVERS, older than
    LEFTOVER_TTL) and how one is dropped (_drop)."""

    PATTERN = "*"
    LEFTOVERS = ".tmp-*"
    LEFTOVER_TTL = 3600.0
    directory: Path
    max_bytes: int

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every cached file, oldest first."""
        out = []
        for p in self.directory.glob(self.PATTERN):
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        out.sort()
        return out

    def size(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def _evict(self, need: int) -> None:
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total + need <= self.max_bytes:
                break
            log.info("image cache: evicting %s (%d bytes, least recently used)", path.name, size)
            self._drop(path)
            total -= size
        # leftovers of a crash mid-write (old enough not to be a write in progress)
        now = time.time()
        for p in self.directory.glob(self.LEFTOVERS):
            try:
                if now - p.stat().st_mtime > self.LEFTOVER_TTL:
                    p.unlink(missing_ok=True)
            except FileNotFoundError:
                pass


class ImageCache(BoundedDir):
    PATTERN = "*.bin"

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_MAX_BYTES, *, model=None):
        self.model = model or models.get("seccomp")  # parses and checks what is cached
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Parsed images of this process, so a hot image is not re-read and
        # re-hashed for every tiny task.  Keyed by digest, checked at put().
        self._parsed: dict[str, bytecode.Image] = {}
        self._touched: dict[str, float] = {}

    def _path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise CacheError(f"image cache: {digest!r:.80} is not a SHA-256 hex digest")
        return self.directory / f"{digest}.bin"

    def __contains__(self, digest: str) -> bool:
        return digest in self._parsed or (is_digest(digest) and self._path(digest).exists())

    def get(self, digest: str) -> bytecode.Image | None:
        """The image filed under `digest`, verified; None if absent or bad."""
        path = self._path(digest)
        image = self._parsed.get(digest)
        if image is not None:
            self._touch(path)
            return image
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            image = self.model.parse(blob, where=str(path))
            if self.model.info(image).digest != digest:
                raise models.ImageError(
                    f"{path}: content has digest {self.model.info(image).digest}, not the "
                    f"{digest} it is filed under")
        except models.ImageError as e:
            log.warning("image cache: dropping a bad file: %s", e)
            path.unlink(missing_ok=True)
            return None
        self._touch(path)
        self._remember(digest, image)
        return image

    def put(self, digest: str, blob: bytes) -> bytecode.Image:
        """Verify `blob` against `digest`, store it, return the parsed image.

        Raises CacheError (nothing is stored) when the blob does not parse or
        its digest differs.
        """
        path = self._path(digest)
        try:
            image = self.model.parse(blob, where=f"image {digest[:16]}")
        except models.ImageError as e:
            raise CacheError(str(e)) from None
        got = self.model.info(image).digest
        if got != digest:
            raise CacheError(
                f"image {digest[:16]}: the received image has digest {got}, "
                f"not the {digest} it was sent as")
        if len(blob) > self.max_bytes:
            raise CacheError(
                f"image {digest[:16]}: {len(blob)} bytes exceeds the cache size {self.max_bytes}")
        self._evict(need=len(blob))
        atomic_write(path, blob)
        self._remember(digest, image)
        return image

    def _remember(self, digest: str, image: bytecode.Image) -> None:
        self._parsed[digest] = image
        while len(self._parsed) > 64:
            self._parsed.pop(next(iter(self._parsed)))

    def _touch(self, path: Path) -> None:
        """Record a use (the mtime orders eviction); at most once a minute per image."""
        now = time.monotonic()
        if now - self._touched.get(path.name, -120.0) < 60:
            return
        self._touched[path.name] = now
        try:
            os.utime(path)
        except FileNotFoundError:
            pass

    def _drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._parsed.pop(path.stem, None)
