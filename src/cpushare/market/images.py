"""Images: what buyers send (`image`, `image_offer`), what sellers ask for
(`need_image`), and their collection.

A seccomp image is small: it comes whole in one `image` frame and lives in
the store.  An image of a chunked model (an ISO) lives in a file
(imagefiles.py): the buyer offers it, sends the chunks the market lacks,
and a seller gets it in chunks from the offset it names, paced by the
seller connection's budget, never whole in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os

from .. import models
from ..protocol import Message, ProtocolError, encode, frame
from .conn import BuyerConn, SellerConn
from .imagefiles import CHUNK, ImageFileError, ImageFiles
from .state import BUSY_RETRY, Busy, Rejection

log = logging.getLogger("cpushare.market")

# Stored images: per account at most MAX_IMAGES, and IMAGE_QUOTA bytes of
# small ones or FILE_QUOTA bytes of big ones; an image no queued or
# unacknowledged task uses is removed IMAGE_TTL after its last use.
MAX_IMAGES = 256
IMAGE_QUOTA = 1 << 30
FILE_QUOTA = 64 << 30
IMAGE_TTL = 7 * 86400
SEND_BUDGET = 4 << 20  # image bytes queued to one seller before the sender waits
MAX_UPLOADS_PER_ACCOUNT = 4  # big images being received at once, per account


class ImageHandlers:
    """Mixed into Market."""

    image_files: ImageFiles

    def _refuse_image(self, b: BuyerConn, code: str, message: str) -> None:
        b.write(encode("error", code=code, ref=None, message=message))

    def _quota(self, b: BuyerConn, d: str, size: int, quota: int) -> bool:
        n, used = self.store.image_usage(b.account_id)
        if quota == FILE_QUOTA:  # the images on their way count too
            ups = [u for u in self.image_files.uploads.values() if u.account_id == b.account_id]
            if len(ups) >= MAX_UPLOADS_PER_ACCOUNT:
                self._refuse_image(b, "limit", f"image {d[:16]}: account {b.account} is "
                                               f"sending {len(ups)} images already; the market "
                                               f"takes {MAX_UPLOADS_PER_ACCOUNT} at once")
                return False
            n, used = n + len(ups), used + sum(u.size for u in ups)
        if n >= MAX_IMAGES or used + size > quota:
            self._refuse_image(b, "limit", f"image {d[:16]}: account {b.account} stores {n} "
                                           f"images of {used} bytes; the market keeps at most "
                                           f"{MAX_IMAGES} or {quota} bytes an account (images "
                                           f"no task uses go after {IMAGE_TTL // 86400} days)")
            return False
        return True

    def _on_image(self, b: BuyerConn, m: Message) -> None:
        d = m["image"]
        try:
            model = self._model_of(b)
        except Rejection as e:
            self._refuse_image(b, e.code, e.message)
            return
        if model.chunked:
            self._on_image_chunk(b, m, model)
            return
        if m.get("size") is not None:
            self._refuse_image(b, "image", f"image {d[:16]}: images of the {model.name} model "
                                           f"come whole in one frame, not in chunks")
            return
        if d not in self.images and not self.store.has_image(d):
            try:
                info = model.info(model.parse(m.payload, where=f"image {d[:16]}"))
            except models.ImageError as e:
                self._refuse_image(b, "image", str(e))
                return
            if info.digest != d:
                self._refuse_image(b, "image", f"image {d[:16]}: the image sent has digest "
                                               f"{info.digest[:16]}")
                return
            if not (self._lock("account", b.account_id) and self._lock("image", d)):
                raise Busy(f"image {d[:16]}")  # (its quota and its row, against other processes)
            if not self._quota(b, d, len(m.payload), IMAGE_QUOTA):
                return
            self._tx().put_image(d, m.payload, b.account_id)
            self.images[d] = info.memory
        else:
            self._image_memory(d, b.order.model)
        self._after_commit(lambda: b.write(encode("image_ok", image=d)))

    def _on_image_offer(self, b: BuyerConn, m: Message) -> None:
        d, size = m["image"], m["size"]
        try:
            model = self._model_of(b)
        except Rejection as e:
            self._refuse_image(b, e.code, e.message)
            return
        if not model.chunked:
            self._refuse_image(b, "image", f"image {d[:16]}: images of the {model.name} model "
                                           f"come whole in one `image` frame")
            return
        if self.store.image_size(d) is not None and self.image_files.has(d):
            self._after_commit(lambda: b.write(encode("image_ok", image=d)))
            return
        if d not in self.image_files.uploads and not self._quota(b, d, size, FILE_QUOTA):
            return
        try:
            offset = self.image_files.offer(d, size, b.account_id)
        except ImageFileError as e:
            self._refuse_image(b, "image", str(e))
            return
        b.write(encode("image_want", image=d, offset=offset))

    def _on_image_chunk(self, b: BuyerConn, m: Message, model: models.Model) -> None:
        d, offset, size = m["image"], m.get("offset"), m.get("size")
        if offset is None or size is None:
            self._refuse_image(b, "image", f"image {d[:16]}: images of the {model.name} model "
                                           f"are offered (image_offer) and sent in chunks "
                                           f"with offset and size")
            return
        try:
            written, done = self.image_files.write(d, offset, size, m.payload)
        except ImageFileError as e:
            up = self.image_files.uploads.get(d)
            if up is not None and up.size == size and offset != up.offset:
                # (a chunk the market holds already, or one it cannot take yet): say where
                b.write(encode("image_want", image=d, offset=up.offset))
                return
            self._refuse_image(b, "image", str(e))
            return
        b.disk = written  # (its next chunk is read while this one is written)
        if not done:
            return
        fut = asyncio.wrap_future(self.image_files.finish(d))
        fut.add_done_callback(lambda f: self._image_received(b, model, d, size, f))

    def _image_received(self, b: BuyerConn, model: models.Model, d: str, size: int,
                        fut: asyncio.Future) -> None:
        """The last chunk of `d` is written (its digest checked, or not)."""
        e = fut.exception()
        if e is not None:
            self._refuse_image(b, "image", str(e) if isinstance(e, ImageFileError)
                               else f"image {d[:16]}: cannot store it: {e}")
            return
        path = fut.result()
        if not self._lock("image", d):  # another process stores it now: after its commit
            asyncio.get_running_loop().call_later(BUSY_RETRY, self._image_received, b, model,
                                                  d, size, fut)
            return
        try:
            model.parse_file(path, d, where=f"image {d[:16]}")
        except models.ImageError as e:
            self.image_files.remove(d)
            self._refuse_image(b, "image", str(e))
            return
        self._tx().put_image_file(d, size, b.account_id)
        self.images[d] = 0
        log.info("image %s: %d bytes from %s", d[:16], size, b)
        self._after_commit(lambda: b.write(encode("image_ok", image=d)))

    def _image_memory(self, digest: str, model: str) -> int | None:
        """The memory a run of a stored image needs (None: no such image)."""
        memory = self.images.get(digest)
        if memory is None:
            m = models.get(model)
            if m.chunked:
                if self.store.image_size(digest) is None or not self.image_files.has(digest):
                    return None
                memory = self.images[digest] = 0
                return memory
            data = self.store.image(digest)
            if data is None:
                return None
            try:
                memory = self.images[digest] = m.info(m.parse(data)).memory
            except models.ImageError:
                return None  # (an image of another model under that digest)
        return memory

    # --- to sellers -----------------------------------------------------------

    def _on_need_image(self, s: SellerConn, m: Message) -> None:
        d = m["image"]
        t = next((t for t, _ in s.attempts.values() if t.image == d), None)
        if t is None:
            raise ProtocolError("image", f"image {d} is not that of an attempt the seller holds")
        if not models.get(t.model).chunked:
            data = self.store.image(d)
            if data is None:
                raise ProtocolError("internal", f"image {d} missing from the store")
            s.write(frame("image", data, image=d))
            return
        size = self.image_files.size(d)
        if size is None:
            raise ProtocolError("internal", f"image {d} missing from the market's files")
        offset = m.get("offset") or 0
        if offset >= size:
            raise ProtocolError("image", f"need_image: offset {offset} is not below the "
                                         f"image's size {size}")
        if t.lease:
            self._tell(t, "image", seller=s.account)
        old = s.image_sends.pop(d, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(self._send_image(s, d, offset, size))
        s.image_sends[d] = task
        task.add_done_callback(lambda _: s.image_sends.pop(d, None)
                               if s.image_sends.get(d) is task else None)

    async def _send_image(self, s: SellerConn, d: str, offset: int, size: int) -> None:
        """`d` from `offset` to seller `s` in chunks, never more than SEND_BUDGET
        queued to it."""
        sent = 0
        try:
            with open(self.image_files.path(d), "rb") as f:
                while offset < size and not s.closed:
                    data = os.pread(f.fileno(), CHUNK, offset)
                    if not data:
                        raise OSError(f"image file {d[:16]} ends at {offset}, not {size}")
                    s.write_now(frame("image", data, image=d, offset=offset, size=size))
                    offset += len(data)
                    sent += len(data)
                    self.image_bytes_sent += len(data)
                    if s.buffered > SEND_BUDGET:
                        await s.drained()
        except OSError as e:
            log.error("image %s to %s: %s", d[:16], s, e)
            s.close()
        finally:
            if sent:
                log.info("image %s: %d bytes sent to %s", d[:16], sent, s)

    # --- collection -------------------------------------------------------------

    def collect_images(self) -> int:
        """Remove the images no task uses and none used for IMAGE_TTL (their
        files too)."""
        store = self._tx()
        store.touch_images(self.images_used)
        self.images_used = set()
        n = store.collect_images(self.image_ttl)
        if n:
            self.images.clear()  # (the others are read again when used)
            log.info("removed %d images no task used for %g s", n, self.image_ttl)

        def files() -> None:
            removed = self.image_files.collect(self.store.image_file_digests())
            if removed:
                log.info("removed %d image files no stored image names", removed)
        self._after_commit(files)
        return n
