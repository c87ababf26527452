"""The seller's cache of big images (the kvm model's ISOs), bounded in size.

``DIR/DIGEST.iso`` files, read-only, each verified against its digest
before it was moved there; ``DIR/.part-DIGEST`` is an image on its way, in
chunks from the market, kept across lost connections (the next
`need_image` asks from its length).  When the last byte is written the
whole file is hashed (in a thread: gigabytes), checked by the model
(ISO 9660, bootable), and renamed into place; the least recently used
images are evicted first to make room (use is the file's mtime, so the
order survives restarts).  An image bigger than the whole cache is refused
before a byte of it is fetched.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from .. import models
from ..protocol import is_digest
from .cache import BoundedDir, CacheError

log = logging.getLogger("cpushare.seller")

PART_TTL = 7 * 86400  # a partial image untouched this long is removed


class IsoCache(BoundedDir):
    PATTERN = "*.iso"
    LEFTOVERS = ".part-*"  # (kept across lost connections: resumed, unless this old)
    LEFTOVER_TTL = PART_TTL

    def __init__(self, directory: Path, max_bytes: int, *, model):
        self.model = model
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.received = 0  # image bytes written, in all (what `need_image` cost)
        self._writing: dict[str, list] = {}  # digest -> [fd, sha256, bytes held] of a part

    def _path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise CacheError(f"image cache: {digest!r:.80} is not a SHA-256 hex digest")
        return self.directory / f"{digest}.iso"

    def _part(self, digest: str) -> Path:
        self._path(digest)
        return self.directory / f".part-{digest}"

    def __contains__(self, digest: str) -> bool:
        return is_digest(digest) and self._path(digest).exists()

    def get(self, digest: str):
        """The cached image, or None."""
        path = self._path(digest)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        try:
            return self.model.parse_file(path, digest, where=str(path))
        except models.ImageError as e:
            log.warning("image cache: dropping a bad file: %s", e)
            self._drop(path)
            return None

    def held(self, digest: str) -> int:
        """Bytes of `digest` received so far (0: none)."""
        w = self._writing.get(digest)
        if w is not None:
            return w[2]
        try:
            return self._part(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def write(self, digest: str, offset: int, size: int, data: bytes) -> bool:
        """Append a chunk at `offset` of an image of `size` bytes (hashed as it
        comes); True when it is complete (then `finish`).  CacheError for a
        chunk that does not continue what is held, or an image the cache
        cannot hold."""
        if size > self.max_bytes:
            raise CacheError(f"image {digest[:16]}: {size} bytes exceeds the cache size "
                             f"{self.max_bytes} (the sell order's cache)")
        part = self._part(digest)
        w = self._writing.get(digest)
        if w is None:  # the first chunk of this process: a part kept before is hashed once
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            h = hashlib.sha256()
            held = 0
            while piece := os.pread(fd, 1 << 20, held):
                h.update(piece)
                held += len(piece)
            w = self._writing[digest] = [fd, h, held]
        fd, h, held = w
        if offset != held or offset + len(data) > size:
            raise CacheError(f"image {digest[:16]}: a chunk of {len(data)} bytes at {offset}, "
                             f"but {held} of {size} bytes are held")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        h.update(data)
        w[2] = held + len(data)
        self.received += len(data)
        return w[2] == size

    def finish(self, digest: str):
        """Verify the complete part file and move it into the cache (blocking:
        run it in a thread).  CacheError (and the part removed) if it is not
        the image `digest` names."""
        part = self._part(digest)
        fd, h, size = self._writing.pop(digest)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if h.hexdigest() != digest:
            part.unlink(missing_ok=True)
            raise CacheError(f"image {digest[:16]}: the bytes received have digest "
                             f"{h.hexdigest()[:16]}")
        try:
            self.model.parse_file(part, digest, where=f"image {digest[:16]}")
        except models.ImageError as e:
            part.unlink(missing_ok=True)
            raise CacheError(str(e)) from None
        self._evict(need=size)
        os.chmod(part, 0o444)
        path = self._path(digest)
        os.replace(part, path)
        return self.model.parse_file(path, digest, where=str(path))

    def abandon(self) -> None:
        """Close the part files being written (a lost connection: they are
        hashed again when their image is asked for next)."""
        for fd, _, _ in self._writing.values():
            os.close(fd)
        self._writing.clear()

    def _drop(self, path: Path) -> None:
        try:
            os.chmod(path, 0o600)
            path.unlink()
        except FileNotFoundError:
            pass
