"""The seller's image cache: by digest, verified, atomic, bounded (LRU)."""

from __future__ import annotations

import os

import pytest

from cpushare import bytecode
from cpushare.seller import CacheError, ImageCache


def image(n: int) -> bytecode.Image:
    # distinct images: the text differs in its last bytes
    return bytecode.Image(text=b"\x90" * 4000 + n.to_bytes(4, "little") + b"\xc3",
                          entry=bytecode.DEFAULT_TEXT_ADDRESS)


def test_put_get_roundtrip_survives_a_new_instance(tmp_path):
    img = image(1)
    c = ImageCache(tmp_path)
    got = c.put(img.digest, img.pack())
    assert got.digest == img.digest
    assert (tmp_path / f"{img.digest}.bin").read_bytes() == img.pack()
    assert img.digest in c
    fresh = ImageCache(tmp_path)
    assert fresh.get(img.digest) == img
    assert fresh.get(image(2).digest) is None


def test_digest_mismatch_is_refused_and_not_cached(tmp_path):
    c = ImageCache(tmp_path)
    a, b = image(1), image(2)
    with pytest.raises(CacheError, match=f"digest {b.digest}.*not the {a.digest}"):
        c.put(a.digest, b.pack())
    assert list(tmp_path.iterdir()) == []


def test_unparsable_image_is_refused_and_not_cached(tmp_path):
    c = ImageCache(tmp_path)
    with pytest.raises(CacheError, match="bad magic"):
        c.put("ab" * 32, b"not an image at all" * 10)
    blob = bytearray(image(1).pack())
    blob[-1] ^= 1  # corrupt the text: the embedded SHA-256 no longer matches
    with pytest.raises(CacheError, match="SHA-256 mismatch"):
        c.put(image(1).digest, bytes(blob))
    assert list(tmp_path.iterdir()) == []


def test_not_a_digest_is_refused(tmp_path):
    c = ImageCache(tmp_path)
    with pytest.raises(CacheError, match="not a SHA-256 hex digest"):
        c.put("../../etc/passwd", image(1).pack())


def test_file_altered_on_disk_is_dropped_not_run(tmp_path):
    img = image(1)
    ImageCache(tmp_path).put(img.digest, img.pack())
    path = tmp_path / f"{img.digest}.bin"
    path.write_bytes(image(2).pack())  # a valid image, filed under the wrong name
    assert ImageCache(tmp_path).get(img.digest) is None
    assert not path.exists()


def test_size_bound_evicts_least_recently_used(tmp_path):
    imgs = [image(i) for i in range(4)]
    size = len(imgs[0].pack())
    c = ImageCache(tmp_path, max_bytes=3 * size)
    for i, img in enumerate(imgs[:3]):
        c.put(img.digest, img.pack())
        os.utime(tmp_path / f"{img.digest}.bin", (1000 + i, 1000 + i))
    # use image 0: it becomes the most recent; image 1 is now the oldest
    c2 = ImageCache(tmp_path, max_bytes=3 * size)
    assert c2.get(imgs[0].digest) is not None
    c2.put(imgs[3].digest, imgs[3].pack())
    names = {p.stem for p in tmp_path.glob("*.bin")}
    assert names == {imgs[0].digest, imgs[2].digest, imgs[3].digest}
    assert c2.size() <= 3 * size
    assert c2.get(imgs[1].digest) is None


def test_no_temporary_file_is_left_behind(tmp_path):
    c = ImageCache(tmp_path)
    for i in range(3):
        img = image(i)
        c.put(img.digest, img.pack())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{image(i).digest}.bin" for i in range(3))
