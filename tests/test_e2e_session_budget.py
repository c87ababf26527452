"""Session input to a job that does not read it: bounded in the seller
daemon and in the market, the buyer paused, nothing lost (real processes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cpushare.buyer import Market
from cpushare.order import load_buy

import pytest

from test_e2e_support import LocalMarket, job, spin_count_for, spin_input

MIB = 1 << 20
SIZE = 96 * MIB  # (loopback's socket buffers hold some 20 MiB of it in the kernel)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture
def market(tmp_path):
    """A market pinging every second: a seller that waits for its job must
    still not look silent (3 heartbeats), nor find the market silent."""
    m = LocalMarket(tmp_path / "market")
    m.account("buyer", 1000)
    m.account("alice")
    m.serve("--heartbeat", "1")
    yield m
    m.close()


def test_input_a_spinning_job_does_not_read_waits_for_it(market):
    """The spin job reads its count, then spins for about 8 s without reading
    while the buyer streams 96 MiB: the seller daemon's memory grows by a
    fraction of that, the buyer's writes wait, and once the job reads again
    every byte comes back through it, in order."""
    m = market
    seller = m.seller(m.sell_order("alice", "alice-cpu0", output_limit="128M"))
    order = load_buy(m.buy_order("buyer", max_cpu_seconds=120))
    count = spin_count_for(8.0)  # (CPU seconds: on a busy machine longer, never shorter)
    data = bytes(range(256)) * (SIZE // 256)

    async def go():
        async with Market(order) as mk:
            async with mk.session(job("spin"), cpu_ms=120_000) as s:
                await s.write(spin_input(count))
                await asyncio.sleep(0.5)  # the job runs: what the session costs is counted
                base = rss_kib(seller.pid)
                peak = base
                written = 0

                async def feed():
                    nonlocal written
                    for i in range(0, SIZE, MIB):
                        await s.write(data[i:i + MIB])
                        written += MIB
                    await s.close_input()
                feeder = asyncio.create_task(feed())
                for _ in range(60):  # about 3 s, while the job spins
                    await asyncio.sleep(0.05)
                    peak = max(peak, rss_kib(seller.pid))
                stalled_at = written
                out = b""
                while len(out) < 8 + SIZE:
                    chunk = await s.read()
                    if not chunk:
                        break
                    out += chunk
                    peak = max(peak, rss_kib(seller.pid))
                await feeder
            return base, peak, stalled_at, out, s.result
    base, peak, stalled_at, out, result = asyncio.run(asyncio.wait_for(go(), 120))
    assert result.exit_status == 0, result
    assert out[8:] == data  # nothing lost, in order
    assert stalled_at < SIZE // 2, stalled_at  # the buyer waited while the job spun
    growth_mib = (peak - base) / 1024
    # (13.6 .. 17.2 MiB measured on these machines, before and after the market's
    # changes of its group commit; a seller that held what it was sent would
    # grow by the 70 MiB and more loopback's socket buffers do not hold)
    assert growth_mib < 24, f"the seller daemon grew by {growth_mib:.1f} MiB"
