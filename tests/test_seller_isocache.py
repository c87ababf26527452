"""The seller's cache of ISOs: chunks appended, verified at the end, moved in
read-only; resumable; bounded by the order's cache size, least recently used
first."""

from __future__ import annotations

import os
import stat

import pytest

from cpushare import models, protocol
from cpushare.seller.cache import CacheError
from cpushare.seller.isocache import IsoCache

from test_market_leases import fake_iso


@pytest.fixture
def cache(tmp_path):
    return IsoCache(tmp_path / "c", 10 << 20, model=models.get("kvm", "tcg"))


def put(cache, iso, chunk=1 << 20, start=0):
    d = protocol.digest(iso)
    for off in range(start, len(iso), chunk):
        done = cache.write(d, off, len(iso), iso[off:off + chunk])
    assert done
    return cache.finish(d)


def test_chunks_resume_from_what_is_held_and_the_image_lands_read_only(cache):
    iso = fake_iso(3 << 20)
    d = protocol.digest(iso)
    assert cache.held(d) == 0 and cache.get(d) is None
    cache.write(d, 0, len(iso), iso[:1 << 20])
    assert cache.held(d) == 1 << 20  # (a lost connection: the next need_image says so)
    with pytest.raises(CacheError, match="but 1048576 of 3145728 bytes are held"):
        cache.write(d, 0, len(iso), iso[:10])
    cache.abandon()  # (the connection is lost; a restarted seller finds the part too)
    cache = IsoCache(cache.directory, cache.max_bytes, model=cache.model)
    assert cache.held(d) == 1 << 20
    img = put(cache, iso, start=1 << 20)
    assert img.digest == d and img.path.read_bytes() == iso
    assert stat.S_IMODE(os.stat(img.path).st_mode) == 0o444
    assert cache.get(d).path == img.path and d in cache
    assert cache.received == len(iso) - (1 << 20) and cache.held(d) == 0


def test_a_wrong_or_unbootable_image_is_dropped_not_cached(cache):
    iso = fake_iso(2 << 20)
    wrong = "0" * 64
    for off in range(0, len(iso), 1 << 20):
        cache.write(wrong, off, len(iso), iso[off:off + (1 << 20)])
    with pytest.raises(CacheError, match="the bytes received have digest"):
        cache.finish(wrong)
    assert cache.held(wrong) == 0 and wrong not in cache
    junk = b"\0" * 40_000
    dj = protocol.digest(junk)
    cache.write(dj, 0, len(junk), junk)
    with pytest.raises(CacheError, match="not an ISO 9660 image"):
        cache.finish(dj)
    assert dj not in cache


def test_the_size_is_bounded_least_recently_used_first(cache):
    a, b, c = (fake_iso(4 << 20, seed=s) for s in (b"a", b"b", b"c"))
    ia = put(cache, a)
    ib = put(cache, b)
    os.utime(ib.path, (1, 1))  # b is the oldest used now
    cache.get(ia.digest)
    put(cache, c)
    assert ia.digest in cache and ib.digest not in cache and cache.size() <= 10 << 20
    with pytest.raises(CacheError, match="exceeds the cache size"):
        cache.write("1" * 64, 0, 11 << 20, b"x")
