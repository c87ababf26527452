"""Memory a kvm node costs a seller beyond its guest's RAM.

A market server process and one kvm seller (`python -m cpushare.seller`,
TCG, a sell order of 512 MiB) on loopback; the buyer SDK in this process
leases one node of 256 MiB of the test ISO (not held by the seller: the
first node of an ISO, its fetch included) and waits for the marker on its
console, then SETTLE seconds more (the guest idles, printing its uptime).
Then, from /proc:

  qemu      the seller's qemu process (its argv names the seller's cache),
            /proc/PID/smaps.  The guest's RAM is the private anonymous
            mapping whose size is the guest's memory (256 MiB); qemu's
            overhead is its resident memory less that mapping's Rss (the
            guest's pages it touched are the guest's, whatever their number).
            Resident memory is the sum of the mappings' Rss with the pages of
            one shared file mapped twice counted once: with split-wx, TCG's
            code buffer is one memfd mapped rw and rx, which the kernel's Rss
            counts twice and its memory cgroup (MemoryMax=) once.  Printed
            beside it: the overhead by the plain Rss sum, and by Pss (which
            also splits library pages with the other processes mapping them).
  seller    the seller process's VmRSS with the node running, less its
            VmRSS idle (connected, after its self-test, before the lease),
            measured just before the lease.

The row is qemu's overhead + the seller's growth, in MiB, against
QEMU_OVERHEAD in cpushare/models/kvm.py (192 MiB), what the unit's
MemoryMax= adds to the guest's memory for one node.

Under TCG, qemu's code buffer grows with the guest code it has translated,
up to the size of its mapping (qemu 7.2's default tb-size: 1 GiB on a
64-bit host), and stays: the figure measured is that of this small guest
after its boot.  Also printed: the figure with the code buffer grown to its
mapping, the bound under TCG while the seller's argv sets no tb-size.

    /usr/bin/python3 -m bench.kvm_overhead [--quick]
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "src", ROOT / "tests", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

MIB = 1 << 20
MEMORY = 256 * MIB  # the guest's
SETTLE = 3.0  # seconds after the marker before memory is read
_HEAD = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def goal_mib() -> float:
    from cpushare.models.kvm import QEMU_OVERHEAD
    return QEMU_OVERHEAD / MIB


def smaps(pid: int) -> list[dict]:
    """The mappings of /proc/PID/smaps: head line, path, and sizes in KiB."""
    out: list[dict] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _HEAD.match(line)
            if m and not line.split(None, 1)[0].endswith(":"):
                out.append({"head": line.strip(), "path": m.group(1)})
            elif out:
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[-1][key] = int(parts[0])
    return out


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"bench.kvm_overhead: no {field} in /proc/{pid}/status")


def _once_key(m: dict, i: int):
    """Mappings of the same shared file pages (one memfd mapped rw and rx)
    share a key; every other mapping has its own."""
    f = m["head"].split()
    if len(f) >= 5 and f[1].endswith("s") and f[4] != "0":
        return (f[3], f[4], f[2])
    return i


def qemu_memory(pid: int, memory: int) -> dict:
    """qemu's Rss (as the kernel sums it, and counting shared pages mapped
    twice once) and Pss, the guest RAM mapping's, and TCG's code buffer's,
    in KiB."""
    maps = smaps(pid)
    guest = [m for m in maps if m.get("Size") == memory // 1024 and not m["path"]
             and " rw-p " in f" {m['head']} "]
    if len(guest) != 1:
        sizes = sorted((m.get("Size", 0) for m in maps), reverse=True)[:5]
        raise RuntimeError(f"bench.kvm_overhead: {len(guest)} anonymous mappings of "
                           f"{memory // 1024} KiB in qemu {pid} (largest: {sizes} KiB)")
    g = guest[0]
    once: dict = {}
    for i, m in enumerate(maps):
        k = _once_key(m, i)
        once[k] = max(once.get(k, 0), m.get("Rss", 0))
    jit = [m for m in maps if "tcg-jit" in m["path"]]
    return {"rss_kib": sum(m.get("Rss", 0) for m in maps),
            "rss_once_kib": sum(once.values()),
            "pss_kib": sum(m.get("Pss", 0) for m in maps),
            "guest_rss_kib": g.get("Rss", 0), "guest_pss_kib": g.get("Pss", 0),
            "guest_mapping": g["head"],
            "jit_rss_kib": max((m.get("Rss", 0) for m in jit), default=0),
            "jit_size_kib": max((m.get("Size", 0) for m in jit), default=0),
            "jit_mappings": len(jit),
            "largest": [(m["head"], m.get("Rss", 0), m.get("Pss", 0))
                        for m in sorted(maps, key=lambda m: -m.get("Rss", 0))[:6]],
            "mappings": len(maps)}


async def _node(order, iso: Path, root: Path, seller_pid: int) -> dict:
    from bench.kvm_boot import BOOT, MARKER, qemus
    from cpushare.buyer import Market
    async with Market(order) as m:
        await asyncio.sleep(SETTLE)
        idle = status_kib(seller_pid, "VmRSS")
        c = await m.cluster(iso, nodes=1, name="overhead")
        node = c.nodes[0]
        try:
            await node.wait_for(MARKER, BOOT)
            await asyncio.sleep(SETTLE)
            pids = qemus(root)
            if len(pids) != 1:
                raise RuntimeError(f"bench.kvm_overhead: {len(pids)} qemu processes of the "
                                   f"seller, not 1")
            q = qemu_memory(pids[0], MEMORY)
            argv = open(f"/proc/{pids[0]}/cmdline", "rb").read().split(b"\0")
            running = status_kib(seller_pid, "VmRSS")
            seller_hwm = status_kib(seller_pid, "VmHWM")
        finally:
            await c.down()
    return {"seller_idle_kib": idle, "seller_running_kib": running,
            "seller_hwm_kib": seller_hwm, "qemu": q,
            "qemu_m": argv[argv.index(b"-m") + 1].decode()}


def run(quick: bool = False) -> dict:
    import guestiso
    from bench.kvm_boot import close_market, kvm_market, need_qemu
    need_qemu()
    iso = guestiso.iso_path("marker")
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-") as tmp:
        m, order, _ = kvm_market(Path(tmp))
        try:
            r = asyncio.run(_node(order, iso, m.root, m.sellers["a0"].pid))
        finally:
            close_market(m)
    q = r["qemu"]
    qemu_once = (q["rss_once_kib"] - q["guest_rss_kib"]) / 1024
    qemu_rss = (q["rss_kib"] - q["guest_rss_kib"]) / 1024
    qemu_pss = (q["pss_kib"] - q["guest_pss_kib"]) / 1024
    growth = (r["seller_running_kib"] - r["seller_idle_kib"]) / 1024
    goal = goal_mib()
    return {"measured": qemu_once + growth, "goal": goal,
            "qemu_overhead_mib": qemu_once,
            "qemu_overhead_rss_mib": qemu_rss, "qemu_overhead_pss_mib": qemu_pss,
            "seller_growth_mib": growth,
            "tcg_jit_mib": q["jit_rss_kib"] / 1024,
            "tcg_jit_mapping_mib": q["jit_size_kib"] / 1024,
            "tcg_jit_mappings": q["jit_mappings"],
            "worst_tcg_mib": qemu_once - q["jit_rss_kib"] / 1024 + q["jit_size_kib"] / 1024
            + growth,
            "qemu_rss_mib": q["rss_kib"] / 1024, "qemu_pss_mib": q["pss_kib"] / 1024,
            "guest_rss_mib": q["guest_rss_kib"] / 1024, "guest_mapping": q["guest_mapping"],
            "qemu_largest_mappings_kib": q["largest"],
            "guest_memory_mib": MEMORY // MIB, "qemu_m": r["qemu_m"],
            "seller_idle_mib": r["seller_idle_kib"] / 1024,
            "seller_running_mib": r["seller_running_kib"] / 1024,
            "seller_hwm_mib": r["seller_hwm_kib"] / 1024,
            "settle_seconds": SETTLE, "measured_at": time.strftime("%H:%M:%S")}


def main(argv: list[str]) -> int:
    r = run(quick="--quick" in argv)
    print(f"kvm_overhead: one node of {r['guest_memory_mib']} MiB (qemu -m {r['qemu_m']}), "
          f"TCG, {r['settle_seconds']:g} s after its marker")
    print(f"  qemu: Rss {r['qemu_rss_mib']:.1f} MiB, of which the guest's RAM "
          f"{r['guest_rss_mib']:.1f} MiB: overhead {r['qemu_overhead_mib']:.1f} MiB "
          f"(the JIT's memfd counted once; as the kernel sums Rss "
          f"{r['qemu_overhead_rss_mib']:.1f}, by Pss {r['qemu_overhead_pss_mib']:.1f})")
    if r["tcg_jit_mappings"]:
        print(f"  TCG's code buffer: {r['tcg_jit_mib']:.1f} MiB resident of "
              f"{r['tcg_jit_mapping_mib']:.0f} MiB mapped; grown to that, a node would "
              f"cost {r['worst_tcg_mib']:.0f} MiB")
    print(f"  seller: {r['seller_idle_mib']:.1f} MiB idle, {r['seller_running_mib']:.1f} MiB "
          f"with the node: +{r['seller_growth_mib']:.1f} MiB (peak {r['seller_hwm_mib']:.1f})")
    print(f"  per node: {r['measured']:.1f} MiB (goal <= {r['goal']:g}, QEMU_OVERHEAD)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
