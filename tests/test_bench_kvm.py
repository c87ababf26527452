"""The kvm model's benchmarks (bench/kvm_*.py) in quick mode, for real (a
market process, a kvm seller, qemu under TCG): each gives the row its
number and its note every figure.  About a minute and a half here; the
ratios themselves are the benchmark's to judge, not these tests'."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import guestiso

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench.__main__ as agg  # noqa: E402

pytestmark = pytest.mark.skipif(guestiso.missing_qemu() is not None,
                                reason=str(guestiso.missing_qemu()))


def quick_row(module: str) -> dict:
    row = next(r for r in agg.ROWS if r.module == module)
    out = agg.run_row(row, quick=True)
    assert out["status"] in ("pass", "FAIL"), out.get("traceback") or out
    assert isinstance(out["measured"], float) and out["measured"] > 0, out
    assert "?" not in out["note"], out["note"]  # every figure the note names is there
    return out["result"]


def test_kvm_boot_times_market_plain_and_the_sellers_argv():
    r = quick_row("kvm_boot")
    assert r["plain_seconds"] > 0 and r["seller_argv_seconds"] > 0 and r["market_seconds"] > 0
    assert "split-wx=on" in " ".join(r["seller_argv"])


def test_kvm_image_second_send_moves_no_byte():
    r = quick_row("kvm_image")
    assert r["second_send_buyer_bytes"] == 0 and r["second_send_seller_bytes"] == 0


def test_kvm_overhead_finds_the_guest_ram_mapping():
    r = quick_row("kvm_overhead")
    assert r["qemu_m"] == "256M" and r["guest_memory_mib"] == 256
    assert 0 < r["qemu_overhead_mib"] <= r["qemu_overhead_rss_mib"]
