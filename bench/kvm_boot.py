"""Boot latency of a kvm node through the market vs plain qemu.

What is timed, through the market: a market server process, one kvm
seller (`python -m cpushare.seller`, TCG, a sell order of 512 MiB) and
the buyer SDK in this process, its connection made before the clock
starts.  The clock starts when ``await m.cluster(iso, nodes=1)`` is called
and stops when the node's console (`Node.wait_for`) has shown the test
ISO's marker ``CPUSHARE-GUEST-READY``.  On the way: the SDK hashes the ISO
and offers it (the market holds it: `image_ok`, no byte sent), `open`, the
market's matching and its commit, the seller's `task`, its cache (it holds
the ISO: only the model's ISO check), qemu's start and QMP handshake,
`meter booting`, the boot itself, and the console relayed seller ->
market -> buyer.  ``down()`` (power-off, settlement) is outside the clock.
One warm-up cluster first, so the market and the seller hold the ISO (in
quick mode it is powered off as soon as its qemu starts).

What is timed, plain: from Popen to the marker on qemu's stdout, of

    qemu-system-x86_64 -nodefaults -no-user-config -display none -machine pc
        -accel tcg -m 256M -cdrom ISO -serial stdio

(the same guest memory (the buy order's 256M) and TCG as the seller's
guest, one vCPU like the sell order's); qemu is then killed.  Also timed
the same way: the seller's exact argv, `cpushare.models.qemu.command()`
(``-accel tcg,split-wx=on``, ``-sandbox on,...``, the ISO as an IDE
CD-ROM drive, QMP on a socket, an empty environment), run in a private
directory.  plain -> seller argv is what qemu's flags cost; seller argv ->
market is what the market costs.

Rounds alternate (plain, seller argv, market; again ...), 3 in full mode,
1 in quick mode.  The row is best market / best plain (the best round of
each: a TCG boot is CPU-bound and slowed by anything else on the machine,
never sped up), goal <= 1.05; the medians are printed beside it.

    /usr/bin/python3 -m bench.kvm_boot [--quick]
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "src", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

GOAL = 1.05  # market seconds / plain qemu seconds, request to console marker
MIB = 1 << 20
MEMORY = 256 * MIB  # the guest's (the buy order's)
MARKER = b"CPUSHARE-GUEST-READY"
BOOT = 300.0  # seconds a TCG boot may take here, loaded (about 12 s alone)
ASK, BID = "36.000", "72.000"  # CPUCoins per CPU-hour
COINS = 100_000


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# --- a kvm market (shared with bench/kvm_image.py and bench/kvm_overhead.py) -----

def need_qemu() -> None:
    import guestiso
    why = guestiso.missing_qemu()
    if why is not None:
        raise RuntimeError(why)


def kvm_market(root: Path, *, seller_memory: str = "512M", memory: str = "256M",
               seller_args: tuple[str, ...] = ("--powerdown-grace", "5")):
    """A served LocalMarket in `root` with one kvm seller "a0" (account
    alice, TCG) connected, and a kvm buy order of `memory` a node:
    (market, buy order, the seller's ISO cache directory)."""
    from cpushare.order import load_buy
    from test_e2e_support import LocalMarket
    m = LocalMarket(root)
    try:
        m.account("buyer", COINS)
        m.account("alice")
        m.serve()
        sell = m.sell_order("alice", "a0", price=ASK, model="kvm", memory=seller_memory,
                            accel="tcg")
        m.seller(sell, *seller_args)
        path = m.root / "buyer.buy"
        m.cli("buy-order", "add", "buyer", "--price", BID, "--model", "kvm", "--memory", memory,
              "--max-cpu-seconds", "3600", "--output", str(path))
    except BaseException:
        close_market(m)
        raise
    return m, load_buy(path), m.root / "cache-a0"


def qemus(root: Path) -> list[int]:
    """PIDs of the qemu processes booting an ISO of a seller cache under `root`."""
    from test_e2e_support import qemu_processes
    return qemu_processes(root)


def close_market(m) -> None:
    m.close()
    for pid in qemus(m.root):  # (a seller stopped by SIGTERM powers its guest off; in case)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- plain qemu ------------------------------------------------------------------

def plain_argv(iso: Path) -> list[str]:
    return ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-machine", "pc", "-accel", "tcg", "-m", f"{MEMORY // MIB}M", "-cdrom", str(iso),
            "-serial", "stdio"]


def seller_argv(iso: Path) -> list[str]:
    from cpushare.models import qemu
    return qemu.command(iso, memory=MEMORY, cpus=1, accel="tcg",
                        qemu=shutil.which(qemu.QEMU) or qemu.QEMU)


def boot_plain(argv: list[str], *, env: dict | None = None) -> float:
    """Seconds from Popen of `argv` to MARKER on its stdout (then it is killed)."""
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-qemu-") as wd:
        err = open(Path(wd) / "stderr", "wb")
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                             cwd=wd, env=env, close_fds=True)
        try:
            seen = b""
            fd = p.stdout.fileno()
            while MARKER not in seen:
                left = BOOT - (time.perf_counter() - t0)
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise RuntimeError(f"bench.kvm_boot: no marker within {BOOT:g} s from "
                                       f"{' '.join(argv)}")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    err.flush()
                    raise RuntimeError(f"bench.kvm_boot: qemu exited before the marker: "
                                       f"{(Path(wd) / 'stderr').read_text()[-500:]}")
                seen = seen[-len(MARKER):] + chunk
            seconds = time.perf_counter() - t0
        finally:
            p.kill()
            p.wait()
            p.stdin.close()
            p.stdout.close()
            err.close()
    return seconds


# --- through the market ------------------------------------------------------------

async def boot_market(m, iso: Path, name: str) -> tuple[float, dict]:
    """Seconds from m.cluster() to MARKER on the node's console, and when
    (seconds from the call) each lease state was first heard; the node is
    then powered off (not timed)."""
    stamps: dict[str, float] = {}
    t0 = time.perf_counter()
    c = await m.cluster(iso, nodes=1, name=name)
    stamps["opened"] = time.perf_counter() - t0
    node = c.nodes[0]

    async def follow():
        async for ev in c.events():
            stamps.setdefault(ev.state, time.perf_counter() - t0)
    follower = asyncio.create_task(follow())
    try:
        await node.wait_for(MARKER, BOOT)
        seconds = time.perf_counter() - t0
    finally:
        follower.cancel()
        await c.down()
    if node.state != "ended":
        raise RuntimeError(f"bench.kvm_boot: the node did not end cleanly: {node.as_dict()}")
    return seconds, stamps


async def warm_up(m, iso: Path) -> None:
    """A node that only starts: once the seller's qemu runs, the market and
    the seller hold the ISO; then it is powered off (killed at the seller's
    power-down grace: the guest does not listen yet)."""
    c = await m.cluster(iso, nodes=1, name="warm-up")
    node = c.nodes[0]
    async for ev in c.events():
        if ev.state in ("booting", "running", "ended", "lost"):
            break
    await c.down()
    if node.state != "ended":
        raise RuntimeError(f"bench.kvm_boot: the warm-up node did not end cleanly: "
                           f"{node.as_dict()}")


async def _rounds(order, iso: Path, rounds: int, quick: bool) -> dict:
    from cpushare.buyer import Market
    loop = asyncio.get_running_loop()
    plain, exact, market, stamps = [], [], [], []
    async with Market(order) as m:
        if quick:
            await warm_up(m, iso)
        else:  # the whole boot path warm as well
            await boot_market(m, iso, "warm-up")
        sent = m.image_bytes_sent
        for i in range(rounds):  # interleaved, so all three see the same machine
            plain.append(await loop.run_in_executor(None, boot_plain, plain_argv(iso)))
            exact.append(await loop.run_in_executor(
                None, lambda: boot_plain(seller_argv(iso), env={})))
            t, s = await boot_market(m, iso, f"boot{i}")
            market.append(t)
            stamps.append(s)
        resent = m.image_bytes_sent - sent
    return {"plain": plain, "seller_argv": exact, "market": market, "stamps": stamps,
            "bytes_resent": resent}


def run(quick: bool = False) -> dict:
    import guestiso
    need_qemu()
    iso = guestiso.iso_path("marker")
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-") as tmp:
        m, order, _ = kvm_market(Path(tmp))
        try:
            r = asyncio.run(_rounds(order, iso, rounds, quick))
            ledger = m.ledger_check()
            server_log = m.server.text()
        finally:
            close_market(m)
    if ledger.returncode != 0:
        raise RuntimeError(f"bench.kvm_boot: ledger check failed:\n{ledger.stdout}")
    to_seller = sum(int(x) for x in re.findall(r"image \w+: (\d+) bytes sent to", server_log))
    if r["bytes_resent"] or to_seller != iso.stat().st_size:
        raise RuntimeError(f"bench.kvm_boot: the ISO moved again after the warm-up "
                           f"(buyer {r['bytes_resent']} bytes; to the seller {to_seller} bytes "
                           f"in all, of {iso.stat().st_size})")
    t_plain, t_exact, t_market = min(r["plain"]), min(r["seller_argv"]), min(r["market"])
    booting = [s["booting"] for s in r["stamps"] if "booting" in s]
    return {"measured": t_market / t_plain, "ratio_best": t_market / t_plain, "goal": GOAL,
            "statistic": "best round of each",
            "ratio_median": _median(r["market"]) / _median(r["plain"]),
            "plain_seconds": t_plain, "seller_argv_seconds": t_exact,
            "market_seconds": t_market,
            "qemu_flags_ratio": t_exact / t_plain, "market_vs_seller_argv": t_market / t_exact,
            "plain_median_s": _median(r["plain"]),
            "seller_argv_median_s": _median(r["seller_argv"]),
            "market_median_s": _median(r["market"]),
            "market_to_booting_median_s": _median(booting) if booting else None,
            "rounds": rounds, "plain_rounds_s": r["plain"],
            "seller_argv_rounds_s": r["seller_argv"], "market_rounds_s": r["market"],
            "market_lease_stamps_s": r["stamps"],
            "plain_argv": plain_argv(iso), "seller_argv": seller_argv(iso),
            "iso_bytes": iso.stat().st_size, "memory_mib": MEMORY // MIB}


def main(argv: list[str]) -> int:
    r = run(quick="--quick" in argv)
    print(f"kvm_boot: request to console marker, {r['memory_mib']} MiB guest, TCG, "
          f"best of {r['rounds']} round(s)")
    print(f"  plain qemu:            {r['plain_seconds']:.2f} s  ({' '.join(r['plain_argv'])})")
    print(f"  the seller's argv:     {r['seller_argv_seconds']:.2f} s  "
          f"(x{r['qemu_flags_ratio']:.3f}: qemu's flags)")
    print(f"  through the market:    {r['market_seconds']:.2f} s  "
          f"(x{r['market_vs_seller_argv']:.3f} of the seller's argv; the seller's qemu "
          f"starts {r['market_to_booting_median_s']:.2f} s after the request)")
    print(f"  market / plain: {r['ratio_best']:.3f} best, {r['ratio_median']:.3f} median "
          f"(goal <= {GOAL}); load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
