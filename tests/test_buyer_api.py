"""The buyer SDK (`cpushare.buyer.Market`) against a real market."""

from __future__ import annotations

import asyncio

import pytest

from cpushare import bytecode
from cpushare.buyer import Market, MarketError
from cpushare.order import load_buy

from test_e2e_support import LocalMarket, job, spin_count_for, spin_input


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    m = LocalMarket(tmp_path_factory.mktemp("market"))
    m.account("buyer", 100)
    m.account("alice")
    m.account("bob")
    m.serve()
    m.seller(m.sell_order("alice", "alice-cpu0"))
    m.seller(m.sell_order("bob", "bob-cpu0"))
    yield m
    m.close()


def arun(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_results_come_as_they_complete_not_in_input_order(market):
    order = load_buy(market.buy_order("buyer", max_cpu_seconds=30))
    slow = spin_input(spin_count_for(1.0), b"slow")
    fast = [spin_input(0, b"fast %d" % i) for i in range(5)]

    async def go():
        async with Market(order) as m:
            return [r async for r in m.map(job("spin"), [slow, *fast])]
    results = arun(go())
    assert [r.index for r in results][-1] == 0, [r.index for r in results]
    assert sorted(r.index for r in results) == list(range(6))
    assert all(r.ok and r.output == ([slow, *fast][r.index]) for r in results)


def test_market_refusals_are_results_not_exceptions(market):
    order = load_buy(market.buy_order("buyer", max_cpu_seconds=5))

    async def go():
        async with Market(order) as m:
            too_long = [r async for r in m.map(job("echo"), [b"x"], cpu_ms=60_000)]
            ok = [r async for r in m.map(job("echo"), [b"y"])]
            return too_long, ok
    [too_long], [ok] = arun(go())
    assert not too_long.ok and too_long.code == "order" and "cpu_ms" in too_long.reason
    assert ok.ok and ok.output == b"y"


def test_a_small_window_still_runs_everything(market):
    order = load_buy(market.buy_order("buyer"))
    inputs = [bytes([i]) * 1000 for i in range(40)]

    async def go():
        async with Market(order) as m:
            m.WINDOW = 3
            m.WINDOW_BYTES = 1500  # at most two inputs in flight
            return [r async for r in m.map(job("echo"), inputs)]
    results = arun(go())
    assert sorted((r.index, r.output) for r in results) == list(enumerate(inputs))


def test_an_invalid_image_is_refused_before_anything_is_sent(market):
    order = load_buy(market.buy_order("buyer"))

    async def go():
        async with Market(order) as m:
            with pytest.raises(bytecode.BytecodeError, match="image to upload: .*bad magic"):
                await m.upload(b"\x7fELF" + b"\0" * 200)
            # the connection is still good
            return [r async for r in m.map(job("echo"), [b"after"])]
    [r] = arun(go())
    assert r.ok and r.output == b"after"


def test_connect_refused_raises_market_error(tmp_path, market):
    moved = tmp_path / "moved.buy"
    moved.write_text(market.buy_order("buyer").read_text().replace(f":{market.port}", ":1"))
    order = load_buy(moved)

    async def go():
        async with Market(order):
            pass
    with pytest.raises(MarketError) as e:
        arun(go())
    assert e.value.code == "connect" and "127.0.0.1:1" in e.value.message


def test_leaving_map_early_cancels_what_has_no_result_and_stops_its_jobs(market):
    """A timeout around map(): the tasks without a result are cancelled, the
    escrow comes back, and the sellers running them stop at once (they are
    free for the next task, long before the 20 s their jobs would take)."""
    order = load_buy(market.buy_order("buyer", max_cpu_seconds=60))
    slow = [spin_input(spin_count_for(20.0), b"slow %d" % i) for i in range(2)]
    before = market.balance_milli("buyer")

    async def go():
        async with Market(order) as m:
            await m.upload(job("spin"))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    async for r in m.map(job("spin"), slow):
                        raise AssertionError(f"a 20 s task finished: {r}")
            counts = await m.cancelled()
            t0 = asyncio.get_running_loop().time()
            quick = [r async for r in m.map(job("echo"), [b"a", b"b"])]
            return counts, quick, asyncio.get_running_loop().time() - t0
    counts, quick, took = arun(go())
    assert counts == (2, 0, 0), counts
    assert all(r.ok for r in quick) and took < 10, (quick, took)
    assert market.balance_milli("buyer") == before - sum(r.cost_milli for r in quick)
    assert market.ledger_check().returncode == 0
