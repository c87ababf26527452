"""The heartbeat wheel: every connection is pinged once per heartbeat, in its
own slot, so that the pings of many connections are spread over the
heartbeat instead of going out together."""

from __future__ import annotations

import asyncio
import time

import pytest

from cpushare.market import listener

from test_market import run
from test_market_peers import LoopbackMarket, Peer

N = 10


@pytest.fixture
def lm(tmp_path):
    m = LoopbackMarket(tmp_path)
    m.account("alice")
    yield m
    m.close()


def test_pings_are_spread_over_the_heartbeat(lm):
    """Ten sellers that connect together are pinged a slot (0.1 s) apart, each
    once a heartbeat; one that leaves leaves its slot."""

    async def main():
        m = await lm.start(heartbeat=1)
        assert len(m._wheel) == round(1 / listener.TICK)
        peers = [await Peer.open(lm.sell("alice", 10), "seller") for _ in range(N)]
        times: list[list[float]] = [[] for _ in peers]

        tasks = [asyncio.create_task(p.answer_pings(lambda m, t=t: t.append(time.monotonic())))
                 for p, t in zip(peers, times)]
        await asyncio.sleep(3.2)
        slots = [len(s) for s in m._wheel]
        assert sum(slots) == N and max(slots) == 1  # one each: round the wheel
        for t in times:
            assert len(t) >= 3
            gaps = [b - a for a, b in zip(t, t[1:])]
            # once a heartbeat, on the clock: the k-th ping before the last is k
            # heartbeats before it, give or take a tick made late by a busy loop
            # (less than half a heartbeat; the next one is on time again)
            before = [t[-1] - x for x in t]
            assert [round(b) for b in before] == list(range(len(t) - 1, -1, -1)), gaps
            assert 0.9 < sorted(gaps)[len(gaps) // 2] < 1.1, gaps  # (the median: on time)
        # the phases (within the heartbeat) of the connections' pings: apart
        phases = sorted(t[-1] % 1.0 for t in times)
        spread = [b - a for a, b in zip(phases, phases[1:])] + [1 + phases[0] - phases[-1]]
        assert max(spread) < 0.35, phases  # (all at once: one gap of about 1 s)
        assert len({round(p / listener.TICK) % 10 for p in phases}) >= 7, phases
        gone = peers[0]
        gone.writer.close()
        for _ in range(100):
            if sum(len(s) for s in m._wheel) == N - 1:
                break
            await asyncio.sleep(0.02)
        assert sum(len(s) for s in m._wheel) == N - 1
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in peers[1:]:
            p.writer.close()
        await lm.stop()
    run(main())
