"""Big images (ISOs) as files beside the market's database, sent in chunks.

An image of a chunked model (`models.Model.chunked`) is never whole in the
market's memory.  The buyer offers it (`image_offer {image, size}`); the
market answers with the offset it holds (`image_want`), and the buyer
sends `image {image, offset, size}` chunks from there.  Chunks are appended
to ``DIR/.part/DIGEST``, hashed as they come; at the last byte the digest
is compared, the model checks the file, and it is renamed to ``DIR/DIGEST``
(read-only) before the store's row refers to it.  A lost connection loses
nothing: the partial file and its running hash stay, and the next offer is
answered with its length.  (After a market restart the hash of a partial
file is computed again from its bytes, once, when it is offered again.)

Appending and hashing a chunk happen in one writer thread of their own
(hashlib and the file write release the GIL): the event loop decrypts the
next chunk meanwhile.  `write` checks a chunk and queues its write; the
future it returns is what the connection waits for before it reads the
chunk after the next (so at most two chunks of an upload are in memory);
`finish` runs in the same thread, after the writes.

To a seller an image goes the same way, from the file, in CHUNK pieces
paced by the connection's budget: `need_image {image, offset}` starts it
at the seller's offset (what its cache holds of it already).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("cpushare.market")

CHUNK = 1 << 20  # bytes of one `image` chunk frame, either way
MAX_UPLOADS = 64  # partial images in progress (their hashes are in memory)
PART_TTL = 7 * 86400  # a partial image nobody continued this long is removed


class ImageFileError(ValueError):
    """A chunk or an image that cannot be taken; the message says why."""


@dataclass
class Upload:
    digest: str
    size: int
    account_id: int
    path: Path
    offset: int = 0  # bytes taken (queued to the writer or written)
    sha256: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    touched: float = field(default_factory=time.monotonic)
    fd: int | None = None  # the part file, open for appending while chunks come
    error: str = ""  # a write that failed (the disk is full): the upload fails at its end


class ImageFiles:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.parts = self.dir / ".part"
        self.uploads: dict[str, Upload] = {}
        self._writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="cpushare-image-writer")

    def path(self, digest: str) -> Path:
        return self.dir / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def offer(self, digest: str, size: int, account_id: int) -> int:
        """The offset from which the buyer should send `digest` (`size` bytes)."""
        up = self.uploads.get(digest)
        if up is not None:
            if up.size != size:
                raise ImageFileError(f"image {digest[:16]}: offered as {size} bytes, but "
                                     f"{up.size} bytes of it are being received")
            up.touched = time.monotonic()
            return up.offset
        if len(self.uploads) >= MAX_UPLOADS:
            self._drop_oldest()
        self.parts.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.parts / digest
        up = Upload(digest, size, account_id, path)
        try:
            with open(path, "rb") as f:  # a partial file of before a restart
                while piece := f.read(CHUNK):
                    up.sha256.update(piece)
                    up.offset += len(piece)
        except FileNotFoundError:
            pass
        if up.offset > size:
            path.unlink(missing_ok=True)
            up = Upload(digest, size, account_id, path)
        self.uploads[digest] = up
        return up.offset

    def _drop_oldest(self) -> None:
        oldest = min(self.uploads.values(), key=lambda u: u.touched)
        del self.uploads[oldest.digest]  # (its file stays: an offer picks it up again)
        self._writer.submit(self._close, oldest)

    def write(self, digest: str, offset: int, size: int, data: bytes
              ) -> tuple[concurrent.futures.Future, bool]:
        """Check a chunk and queue its write: (the write's future, whether the
        image is complete with it; then `finish`).  ImageFileError for a
        chunk that does not continue the upload."""
        up = self.uploads.get(digest)
        if up is None:
            raise ImageFileError(f"image {digest[:16]}: a chunk at {offset} with no "
                                 f"image_offer before it")
        if size != up.size:
            raise ImageFileError(f"image {digest[:16]}: a chunk says size {size}, the offer "
                                 f"said {up.size}")
        if offset != up.offset:
            raise ImageFileError(f"image {digest[:16]}: a chunk at {offset}, but the market "
                                 f"holds {up.offset} bytes of it")
        if offset + len(data) > size:
            raise ImageFileError(f"image {digest[:16]}: a chunk ends at {offset + len(data)}, "
                                 f"past its size {size}")
        if not data and offset < size:
            raise ImageFileError(f"image {digest[:16]}: an empty chunk at {offset}")
        up.offset += len(data)
        up.touched = time.monotonic()
        return self._writer.submit(self._append, up, data), up.offset == size

    @staticmethod
    def _append(up: Upload, data: bytes) -> None:
        if up.error:
            return
        try:
            if up.fd is None:
                up.fd = os.open(up.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(up.fd, view):]
        except OSError as e:
            up.error = e.strerror or str(e)
            return
        up.sha256.update(data)

    @staticmethod
    def _close(up: Upload) -> None:
        if up.fd is not None:
            os.close(up.fd)
            up.fd = None

    def finish(self, digest: str) -> concurrent.futures.Future:
        """The complete upload, after its writes: its digest checked, synced,
        renamed into place (read-only).  A future of its path; its exception
        is ImageFileError (and the partial file removed) if it is not `digest`."""
        up = self.uploads.pop(digest)
        return self._writer.submit(self._finish, up)

    def _finish(self, up: Upload) -> Path:
        got = up.sha256.hexdigest()
        try:
            if up.fd is not None and not up.error:
                os.fsync(up.fd)
        except OSError as e:
            up.error = e.strerror or str(e)
        self._close(up)
        if up.error:
            up.path.unlink(missing_ok=True)
            raise ImageFileError(f"image {up.digest[:16]}: the market could not store it "
                                 f"({up.error}); send it again later")
        if got != up.digest:
            up.path.unlink(missing_ok=True)
            raise ImageFileError(f"image {up.digest[:16]}: the {up.size} bytes received have "
                                 f"digest {got[:16]}")
        os.chmod(up.path, 0o444)
        final = self.path(up.digest)
        os.replace(up.path, final)
        return final

    def discard(self, digest: str) -> None:
        up = self.uploads.pop(digest, None)
        if up is not None:
            self._writer.submit(self._close, up)
        (self.parts / digest).unlink(missing_ok=True)

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def names(self) -> set[str]:
        """Digests of the complete image files."""
        try:
            return {p.name for p in self.dir.iterdir() if p.is_file()}
        except FileNotFoundError:
            return set()

    def collect(self, keep: set[str]) -> int:
        """Remove image files the store does not list (`keep`) and partial files
        untouched for PART_TTL; how many."""
        n = 0
        now = time.time()
        for name in self.names() - keep:
            try:  # (one renamed into place moments ago waits for its commit)
                if now - self.path(name).stat().st_mtime > 3600:
                    self.remove(name)
                    n += 1
            except FileNotFoundError:
                pass
        try:
            parts = list(self.parts.iterdir())
        except FileNotFoundError:
            parts = []
        for p in parts:
            try:
                if p.name not in self.uploads and now - p.stat().st_mtime > PART_TTL:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n
