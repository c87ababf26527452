"""The market server over real TLS on loopback, with scripted sellers and buyers.

Prices are chosen so that costs are round: a bid of 360 CPUCoins per
CPU-hour is 100 milli-CPUCoins per CPU-second.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl

import pytest

from cpushare import protocol
from cpushare.market import ca
from cpushare.protocol import cost_milli

from test_market_peers import (LoopbackMarket, Peer, ScriptedSeller, TIMEOUT, image_digest,
                               tiny_image)

BID = 360_000  # milli per CPU-hour: 100 milli per CPU-second
COINS = 1_000_000  # the buyer's 1000 CPUCoins


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def lm(tmp_path, market_db):
    m = LoopbackMarket(tmp_path, market_db)
    m.account("buyer", COINS)
    for name in ("alice", "bob", "carol", "dave"):
        m.account(name)
    yield m
    m.close()


@pytest.fixture
def sqlite_lm(tmp_path):
    """For what only the SQLite store does: large values in files beside it."""
    m = LoopbackMarket(tmp_path)
    m.account("buyer", COINS)
    for name in ("alice", "bob", "carol", "dave"):
        m.account(name)
    yield m
    m.close()


async def buyer(lm, *, redundancy=1, max_cpu_seconds=10, price=BID, account="buyer"):
    o = lm.buy(account, price, redundancy=redundancy, max_cpu_seconds=max_cpu_seconds)
    b = await Peer.open(o, "buyer")
    assert b.welcome.type == "welcome", b.welcome
    img = tiny_image()
    d = image_digest(img)
    await b.send("image", img, image=d)
    await b.expect("image_ok")
    return b, d


def paid(cpu_ms: int, ask_milli: int, carry: int = 0) -> int:
    """What a seller is paid for `cpu_ms` at its ask, with the buyer's carry
    to its account (0 at their first settlement): exact, rounded down."""
    return (cpu_ms * ask_milli + carry) // 3_600_000


def assert_ledger_ok(lm):
    assert lm.check() == []


# --- one task ---------------------------------------------------------------

def test_task_escrow_settle_refund(lm):
    async def main():
        await lm.start()
        s = await ScriptedSeller.connect(lm.sell("alice", 36_000), cpu_ms=1500)
        b, d = await buyer(lm)
        await b.send("submit", b"hello", ref="r1", image=d)
        acc = await b.expect("accepted")
        # escrow: 1 x 10 s at the bid, 100 milli per second
        assert acc["escrow_milli"] == cost_milli(10_000, BID) == 1000
        done = await b.expect("done")
        assert done.payload == b"olleh"
        assert (done["ref"], done["task"], done["exit_status"]) == ("r1", acc["task"], 0)
        assert done["cpu_ms"] == 1500
        assert done["cost_milli"] == cost_milli(1500, 36_000) == 15
        await asyncio.wait_for(s.got_settled.wait(), TIMEOUT)
        assert s.settled[0]["paid_milli"] == 15 and s.settled[0]["accepted"] is True
        assert s.tasks[0]["cpu_ms"] == 10_000 and s.tasks[0]["buyer_order"] is not None
        await s.stop()
        await b.close()
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice") == {"buyer": COINS - 15, "alice": 15}
    assert lm.admin.ledger_summary()["escrow"] == 0
    assert_ledger_ok(lm)


def test_measured_cpu_is_capped_at_the_buy_orders_maximum(lm):
    async def main():
        await lm.start()
        s = await ScriptedSeller.connect(lm.sell("alice", BID), cpu_ms=99_999)
        b, d = await buyer(lm, max_cpu_seconds=2)
        await b.send("submit", b"x", ref="r", image=d)
        assert (await b.expect("accepted"))["escrow_milli"] == 200
        done = await b.expect("done")
        assert done["cost_milli"] == 200 and done["cpu_ms"] == 2000
        await s.stop()
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice") == {"buyer": COINS - 200, "alice": 200}
    assert_ledger_ok(lm)


# --- matching ---------------------------------------------------------------

def test_cheapest_ask_first_and_the_ask_is_paid(lm):
    async def main():
        await lm.start()
        dear = await ScriptedSeller.connect(lm.sell("alice", 72_000))
        cheap = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        b, d = await buyer(lm)
        await b.send("submit", b"a", ref="1", image=d)
        await b.expect("accepted")
        await b.expect("done")
        assert len(cheap.tasks) == 1 and dear.tasks == []
        # the cheap one is busy no more; a second task again goes to it
        await b.send("submit", b"b", ref="2", image=d)
        await b.expect("accepted")
        assert (await b.expect("done"))["cost_milli"] == cost_milli(1000, 36_000)
        assert len(cheap.tasks) == 2 and dear.tasks == []
        for x in (dear, cheap):
            await x.stop()
        await lm.stop()
    run(main())
    assert lm.balance("bob") == 2 * cost_milli(1000, 36_000)
    assert lm.balance("alice") == 0
    assert_ledger_ok(lm)


def test_an_ask_above_the_bid_is_never_matched(lm):
    async def main():
        await lm.start()
        dear = await ScriptedSeller.connect(lm.sell("alice", BID + 1))
        b, d = await buyer(lm)
        await b.send("submit", b"a", ref="1", image=d)
        await b.expect("accepted")
        await dear.peer.send("ping", t=-1)  # round trip through the market
        dear.is_ready.clear()
        await asyncio.wait_for(dear.is_ready.wait(), TIMEOUT)
        assert dear.tasks == []
        fair = await ScriptedSeller.connect(lm.sell("bob", BID))
        await b.expect("done")
        assert len(fair.tasks) == 1 and dear.tasks == []
        for x in (dear, fair):
            await x.stop()
        await lm.stop()
    run(main())
    assert lm.balance("alice") == 0 and lm.balance("bob") == 100
    assert_ledger_ok(lm)


def test_a_seller_never_gets_its_own_accounts_task(lm):
    async def main():
        await lm.start()
        own = await ScriptedSeller.connect(lm.sell("buyer", 1))
        b, d = await buyer(lm)
        await b.send("submit", b"a", ref="1", image=d)
        await b.expect("accepted")
        other = await ScriptedSeller.connect(lm.sell("bob", BID))
        await b.expect("done")
        assert own.tasks == [] and len(other.tasks) == 1
        for x in (own, other):
            await x.stop()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


# --- redundancy -------------------------------------------------------------

def test_redundancy_disagreeing_seller_is_not_paid_and_recorded(lm):
    async def main():
        await lm.start()
        a = await ScriptedSeller.connect(lm.sell("alice", 36_000))
        liar = await ScriptedSeller.connect(lm.sell("bob", 36_001), answer=lambda x: b"lie")
        c = await ScriptedSeller.connect(lm.sell("carol", 36_002))
        b, d = await buyer(lm, redundancy=2)
        await b.send("submit", b"truth", ref="r", image=d)
        acc = await b.expect("accepted")
        assert acc["escrow_milli"] == 2 * 1000
        done = await b.expect("done")
        assert done.payload == b"hturt"
        assert done["attempts"] == 3
        assert done["cost_milli"] == paid(1000, 36_000) + paid(1000, 36_002)
        for x in (a, liar, c):
            await asyncio.wait_for(x.got_settled.wait(), TIMEOUT)
        assert liar.settled[0]["paid_milli"] == 0 and liar.settled[0]["accepted"] is False
        assert a.settled[0]["accepted"] and c.settled[0]["accepted"]
        for x in (a, liar, c):
            await x.stop()
        await lm.stop()
        return acc["task"]
    task = run(main())
    assert lm.balance("bob") == 0
    assert lm.balance("alice") == 10 and lm.balance("carol") == 10  # (10.0005: 0.0005 carried)
    assert lm.balance("buyer") == COINS - 20
    disputes = lm.admin.disputes(task)
    assert [(x[2], x[3]) for x in disputes] == [("bob", protocol.digest(b"lie"))]
    assert disputes[0][4] == protocol.digest(b"hturt")
    assert_ledger_ok(lm)


def test_redundancy_without_agreement_fails_and_refunds(lm):
    async def main():
        await lm.start()
        sellers = [await ScriptedSeller.connect(lm.sell(n, 36_000),
                                                answer=lambda x, n=n: n.encode())
                   for n in ("alice", "bob", "carol", "dave")]
        b, d = await buyer(lm, redundancy=2)
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        f = await b.expect("failed")
        assert f["code"] == "dispute" and "agreed" in f["message"]
        for x in sellers:
            await asyncio.wait_for(x.got_settled.wait(), TIMEOUT)
            assert x.settled[0]["paid_milli"] == 0
            await x.stop()
        await lm.stop()
        return f["task"]
    task = run(main())
    assert lm.balance("buyer") == COINS
    assert len(lm.admin.disputes(task)) == 4
    assert_ledger_ok(lm)


# --- funds --------------------------------------------------------------------

def test_insufficient_funds_moves_nothing(lm):
    lm.account("poor", 999)

    async def main():
        await lm.start()
        s = await ScriptedSeller.connect(lm.sell("alice", 1))
        b, d = await buyer(lm, account="poor")
        await b.send("submit", b"x", ref="r", image=d)  # needs 1000 in escrow
        f = await b.expect("failed")
        assert f["code"] == "funds" and "999" in f["message"] and "1000" in f["message"]
        assert f["ref"] == "r" and f["task"] is None
        # a cheaper task fits
        await b.send("submit", b"x", ref="r2", image=d, cpu_ms=9000)
        assert (await b.expect("accepted"))["escrow_milli"] == 900
        await b.expect("done")
        await s.stop()
        await lm.stop()
    run(main())
    assert lm.balance("poor") + lm.balance("alice") == 999
    assert_ledger_ok(lm)


def test_bad_requests_fail_that_task_only(lm):
    async def main():
        await lm.start()
        b, d = await buyer(lm, max_cpu_seconds=5)
        await b.send("submit", b"x", ref="a", image="0" * 64)
        assert (await b.expect("failed"))["code"] == "image"
        await b.send("submit", b"x", ref="b", image=d, cpu_ms=5001)
        f = await b.expect("failed")
        assert f["code"] == "order" and "5000" in f["message"]
        await b.send("submit", b"x", ref="c", image=d, redundancy=17)
        assert (await b.expect("failed"))["code"] == "order"
        bad = bytearray(tiny_image())
        bad[200:201] = b"\x00"
        bad = bytes(bad) + b"junk"
        await b.send("image", bad, image="ab" * 32)
        e = await b.expect("error")
        assert e["code"] == "image"
        other = tiny_image(5)
        await b.send("image", other, image="cd" * 32)  # a valid image under another name
        e = await b.expect("error")
        assert e["code"] == "image" and "digest" in e["message"]
        assert await b.sync() == []  # the connection is still open
        await lm.stop()
    run(main())
    assert lm.balance("buyer") == COINS
    assert_ledger_ok(lm)


# --- losses ---------------------------------------------------------------------

def test_seller_disconnect_mid_task_requeues_and_buyer_pays_once(lm):
    async def main():
        await lm.start()
        quitter = await ScriptedSeller.connect(lm.sell("alice", 1), hold=True)
        b, d = await buyer(lm)
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        await asyncio.wait_for(quitter.got_task.wait(), TIMEOUT)
        await quitter.stop()  # gone with the task
        s = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        done = await b.expect("done")
        assert done["attempts"] == 2 and done["cost_milli"] == 10
        await s.stop()
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice", "bob") == {"buyer": COINS - 10, "alice": 0, "bob": 10}
    assert_ledger_ok(lm)


def test_deadline_overrun_requeues_and_a_late_result_is_paid_nothing(lm):
    async def main():
        await lm.start(grace_ms=0)
        slow = await ScriptedSeller.connect(lm.sell("alice", 1, wall_seconds=1), hold=True)
        b, d = await buyer(lm)
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        await asyncio.wait_for(slow.got_task.wait(), TIMEOUT)
        s = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        done = await b.expect("done")  # after alice's 1 s deadline
        assert done["attempts"] == 2
        late = slow.tasks[0]
        await slow.peer.send("result", b"x", attempt=late["attempt"], exit_status=0, signal=None,
                             reason="", cpu_ms=5, output_sha256=protocol.digest(b"x"))
        await asyncio.wait_for(slow.got_settled.wait(), TIMEOUT)
        st = slow.settled[0]
        assert st["attempt"] == late["attempt"]
        assert st["paid_milli"] == 0 and st["accepted"] is False
        await s.stop()
        await slow.stop()
        await lm.stop()
    run(main())
    assert lm.balances("alice", "bob") == {"alice": 0, "bob": 10}
    assert_ledger_ok(lm)


def test_handback_requeues(lm):
    async def main():
        await lm.start()
        h = await ScriptedSeller.connect(lm.sell("alice", 1), hold=True)
        b, d = await buyer(lm)
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        await asyncio.wait_for(h.got_task.wait(), TIMEOUT)
        await h.peer.send("handback", attempt=h.tasks[0]["attempt"], reason="pausing")
        s = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        assert (await b.expect("done"))["cost_milli"] == 10
        for x in (h, s):
            await x.stop()
        await lm.stop()
    run(main())
    assert lm.balance("alice") == 0
    assert_ledger_ok(lm)


# --- prefetch: a seller holding a task behind the one it runs ------------------

async def _prefetching_seller(lm, account):
    """A raw seller that asks for two tasks (one to run, one to hold) and answers none."""
    p = await Peer.open(lm.sell(account, 1), "seller")
    assert p.welcome["prefetch"] == 1, p.welcome
    await p.send("ready", slots=2)
    return p


async def _holding_two(lm, refs=("1", "2")):
    """A buyer submits `refs`; a prefetching raw seller of alice gets the first
    two (one to run, one to hold): (holder, buyer, task 1, task 2)."""
    await lm.start()
    holder = await _prefetching_seller(lm, "alice")
    b, d = await buyer(lm)
    for ref in refs:
        await b.send("submit", ref.encode(), ref=ref, image=d)
        await b.expect("accepted")
    t1, t2 = await holder.expect("task"), await holder.expect("task")
    return holder, b, t1, t2


def test_a_prefetching_seller_gets_a_second_task_and_its_disconnect_requeues_both(lm):
    async def main():
        holder, b, t1, t2 = await _holding_two(lm, ("1", "2", "3"))
        assert [t1.payload, t2.payload] == [b"1", b"2"]
        assert await holder.sync() == []  # two, and no third
        await holder.close()  # gone with the one it ran and the one it held
        s = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        done = {}
        for _ in range(3):
            m = await b.expect("done")
            done[m["ref"]] = m
        # the running one was lost (a second attempt); the held one never started
        assert (done["1"]["attempts"], done["2"]["attempts"], done["3"]["attempts"]) == (2, 1, 1)
        assert all(m["cost_milli"] == 10 for m in done.values())
        await s.stop()
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice", "bob") == {"buyer": COINS - 30, "alice": 0, "bob": 30}
    assert_ledger_ok(lm)


def test_a_held_task_handed_back_unstarted_is_requeued_without_counting_as_lost(lm):
    async def main():
        holder, b, t1, t2 = await _holding_two(lm)
        await holder.send("handback", attempt=t2["attempt"], reason="stopping", unstarted=True)
        # the handback also cancels what it asked for: it gets nothing more
        assert await holder.sync() == []
        s = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        m = await b.expect("done")
        assert (m["ref"], m["attempts"]) == ("2", 1), m
        await holder.send("result", b"1", attempt=t1["attempt"], exit_status=0, signal=None,
                          reason="", cpu_ms=5, output_sha256=protocol.digest(b"1"))
        m = await b.expect("done")
        assert (m["ref"], m["attempts"], m["cost_milli"]) == ("1", 1, paid(5, 36_000)), m
        assert (await holder.expect("settled"))["accepted"] is True
        await s.stop()
        await holder.close()
        await lm.stop()
    run(main())
    # alice's 5-ms task is worth 0.05 milli: carried to her next settlement
    assert lm.balances("alice", "bob") == {"alice": paid(5, 36_000), "bob": 10}
    assert_ledger_ok(lm)


def test_an_idle_seller_is_preferred_to_holding_a_task_behind_another(lm):
    async def main():
        await lm.start()
        cheap = await _prefetching_seller(lm, "alice")  # ask 1, but busy after one task
        dear = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        b, d = await buyer(lm)
        await b.send("submit", b"1", ref="1", image=d)
        await b.expect("accepted")
        await cheap.expect("task")
        await b.send("submit", b"2", ref="2", image=d)
        await b.expect("accepted")
        assert (await b.expect("done"))["cost_milli"] == 10  # ran on the idle, dearer one
        assert await cheap.sync() == []
        await dear.stop()
        await cheap.close()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_a_held_task_is_taken_back_for_a_seller_that_becomes_idle(lm):
    """Work stealing: a task held behind a running one is revoked when another
    seller is idle and may run it, and runs there; the holder is paid for the
    task it ran, the idle seller for the one it took."""
    async def main():
        holder, b, t1, t2 = await _holding_two(lm)
        assert await holder.sync() == []  # nobody idle: nothing taken back
        idle = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        m = await holder.expect("revoke")
        assert m["attempt"] == t2["attempt"], m  # the held one, never the running one
        await holder.send("handback", attempt=t2["attempt"], reason="revoked", unstarted=True)
        m = await b.expect("done")
        assert (m["ref"], m["attempts"], m["cost_milli"]) == ("2", 1, 10), m
        await holder.send("result", b"1", attempt=t1["attempt"], exit_status=0, signal=None,
                          reason="", cpu_ms=5, output_sha256=protocol.digest(b"1"))
        m = await b.expect("done")
        assert (m["ref"], m["attempts"], m["cost_milli"]) == ("1", 1, paid(5, 36_000)), m
        assert (await holder.expect("settled"))["accepted"] is True
        assert await holder.sync() == [], "one revoke only"
        await idle.stop()
        await holder.close()
        await lm.stop()
    run(main())
    # alice's 5-ms task is worth 0.05 milli: carried to her next settlement
    assert lm.balances("alice", "bob") == {"alice": paid(5, 36_000), "bob": 10}
    assert_ledger_ok(lm)


def test_a_held_task_is_taken_back_though_others_wait_that_the_idle_seller_may_not_run(lm):
    async def main():
        holder, b, t1, t2 = await _holding_two(lm)
        low, d = await buyer(lm, price=1000)  # below the idle seller's ask: it stays queued
        await low.send("submit", b"low", ref="low", image=d)
        await low.expect("accepted")
        idle = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        assert (await holder.expect("revoke"))["attempt"] == t2["attempt"]
        await holder.send("handback", attempt=t2["attempt"], reason="revoked", unstarted=True)
        m = await b.expect("done")
        assert (m["ref"], m["attempts"], m["cost_milli"]) == ("2", 1, 10), m
        await idle.stop()
        await holder.close()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_a_revoked_task_that_started_meanwhile_is_settled_as_usual(lm):
    """The holder may have started the held task before the `revoke` came: it
    answers with results, and the task is paid once, to it."""
    async def main():
        holder, b, t1, t2 = await _holding_two(lm)
        idle = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        assert (await holder.expect("revoke"))["attempt"] == t2["attempt"]
        for t in (t1, t2):  # the revoke ignored: both run here
            await holder.send("result", t.payload, attempt=t["attempt"], exit_status=0,
                              signal=None, reason="", cpu_ms=5,
                              output_sha256=protocol.digest(t.payload))
        got = {}
        for _ in range(2):
            m = await b.expect("done")
            got[m["ref"]] = (m["attempts"], m["cost_milli"], m.payload)
        cost = paid(5, 36_000)  # (0: carried to their next settlement)
        assert got == {"1": (1, cost, b"1"), "2": (1, cost, b"2")}, got
        await idle.stop()
        await holder.close()
        await lm.stop()
    run(main())
    assert lm.balances("alice", "bob") == {"alice": 2 * paid(5, 36_000), "bob": 0}
    assert_ledger_ok(lm)


def test_no_task_is_taken_back_for_a_seller_that_may_not_run_it(lm):
    """An idle seller asking more than the bid gets nothing revoked for it."""
    async def main():
        holder, b, _, _ = await _holding_two(lm)
        dear = await ScriptedSeller.connect(lm.sell("bob", BID + 1))
        await asyncio.sleep(0.1)  # ten times the age at which a held task may move
        assert await holder.sync() == []
        await dear.stop()
        await holder.close()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_a_cancelled_task_is_refunded_and_its_sellers_told_to_stop(lm):
    async def main():
        holder, b, t1, t2 = await _holding_two(lm, ("1", "2", "3"))
        await b.send("cancel", ref="1")  # running
        await b.send("cancel", ref="2")  # held behind it
        await b.send("cancel", ref="nothing")  # unknown: no answer
        for ref in ("1", "2"):
            m = await b.expect("failed")
            assert (m["ref"], m["code"]) == (ref, "cancelled"), m
        got = [await holder.expect("stop"), await holder.expect("stop")]
        assert sorted(m["attempt"] for m in got) == sorted([t1["attempt"], t2["attempt"]])
        # the holder answers as a seller does; its late result is paid nothing
        await holder.send("handback", attempt=t2["attempt"], reason="closed", unstarted=True)
        await holder.send("result", b"1", attempt=t1["attempt"], exit_status=0, signal=None,
                          reason="", cpu_ms=5, output_sha256=protocol.digest(b"1"))
        m = await holder.expect("settled")
        assert (m["attempt"], m["paid_milli"], m["accepted"]) == (t1["attempt"], 0, False), m
        await holder.send("ready", slots=2)
        t3 = await holder.expect("task")
        assert t3.payload == b"3"
        await b.send("cancel", ref="1")  # again: it is closed, nothing happens
        assert await b.sync() == []
        await holder.close()
        await lm.stop()
    run(main())
    held = cost_milli(10_000, BID)  # the escrow of the one task still queued
    assert lm.balances("buyer", "alice") == {"buyer": COINS - held, "alice": 0}
    assert_ledger_ok(lm)


def test_max_wait_fails_and_refunds_what_no_seller_takes_but_not_what_runs(lm):
    async def main():
        await lm.start(max_wait=0.5)
        holder = await ScriptedSeller.connect(lm.sell("alice", 1), hold=True)
        b, d = await buyer(lm)
        await b.send("submit", b"runs", ref="runs", image=d)
        await b.expect("accepted")
        await asyncio.wait_for(holder.got_task.wait(), TIMEOUT)  # it runs, held for ever
        low, d2 = await buyer(lm, price=1)  # under every ask: no seller may take it
        await low.send("submit", b"waits", ref="waits", image=d2)
        await low.expect("accepted")
        t0 = asyncio.get_running_loop().time()
        m = await low.expect("failed")
        waited = asyncio.get_running_loop().time() - t0
        assert (m["ref"], m["code"]) == ("waits", "expired"), m
        assert "0.5 s" in m["message"], m
        assert 0.4 <= waited < 5, waited
        await asyncio.sleep(0.6)
        assert await b.sync() == []  # the running one did not expire
        await holder.stop()
        await lm.stop()
    run(main())
    # the expired task's escrow came back; the running one's is still held
    assert lm.balances("buyer") == {"buyer": COINS - cost_milli(10_000, BID)}
    assert_ledger_ok(lm)


@pytest.mark.parametrize("slots", [0, -1, 17])
def test_ready_with_slots_out_of_range_closes_only_that_connection(lm, slots):
    async def main():
        await lm.start()
        good = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        bad = await Peer.open(lm.sell("alice", 1), "seller")
        await bad.send("ready", slots=slots)
        m = await bad.expect("error")
        assert m["code"] == "frame" and "slots" in m["message"], m
        assert await bad.recv() is None
        b, d = await buyer(lm)
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        assert (await b.expect("done"))["cost_milli"] == 10
        await good.stop()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


# --- buyer away, server restart -----------------------------------------------

def test_results_wait_for_the_buyer_to_come_back(lm):
    async def main():
        await lm.start()
        o = lm.buy("buyer", BID)
        b = await Peer.open(o, "buyer")
        img = tiny_image()
        d = image_digest(img)
        await b.send("image", img, image=d)
        await b.expect("image_ok")
        for i in range(3):
            await b.send("submit", b"in%d" % i, ref=f"r{i}", image=d)
            await b.expect("accepted")
        await b.close()
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        while len(s.settled) < 3:
            s.got_settled.clear()
            await asyncio.wait_for(s.got_settled.wait(), TIMEOUT)
        b = await Peer.open(o, "buyer")
        got = {}
        for _ in range(3):
            m = await b.expect("done")
            got[m["ref"]] = m.payload
        assert got == {"r0": b"0ni", "r1": b"1ni", "r2": b"2ni"}
        assert await b.sync() == []
        await b.close()
        b = await Peer.open(o, "buyer")  # delivered: not again
        assert await b.sync() == []
        await s.stop()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_resubmitting_a_ref_is_the_same_task(lm):
    async def main():
        await lm.start()
        b, d = await buyer(lm)
        await b.send("submit", b"x", ref="same", image=d)
        first = await b.expect("accepted")
        await b.send("submit", b"x", ref="same", image=d)
        again = await b.expect("accepted")
        assert again["task"] == first["task"]
        await lm.stop()
    run(main())
    assert lm.balance("buyer") == COINS - 1000
    assert_ledger_ok(lm)


def test_restart_requeues_tasks_in_flight_with_their_escrow(lm):
    async def main():
        await lm.start()
        o = lm.buy("buyer", BID)
        b = await Peer.open(o, "buyer")
        img = tiny_image()
        d = image_digest(img)
        await b.send("image", img, image=d)
        await b.expect("image_ok")
        await b.send("submit", b"abc", ref="r", image=d)
        await b.expect("accepted")
        holder = await ScriptedSeller.connect(lm.sell("alice", 1), hold=True)
        await asyncio.wait_for(holder.got_task.wait(), TIMEOUT)
        await lm.stop()  # the attempt was running
        assert lm.admin.ledger_summary()["escrow"] == cost_milli(60_000, BID)  # still held
        assert lm.check() == []
        await holder.stop()
        await b.close()
        await lm.start()
        s = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        b = await Peer.open(o, "buyer")
        done = await b.expect("done")
        assert done.payload == b"cba" and done["cost_milli"] == 10 and done["attempts"] == 2
        await s.stop()
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice", "bob") == {"buyer": COINS - 10, "alice": 0, "bob": 10}
    assert_ledger_ok(lm)


# --- sessions -------------------------------------------------------------------

def test_interactive_session_relays_streams_and_settles(lm):
    async def main():
        await lm.start()
        sp = await Peer.open(lm.sell("alice", 36_000), "seller")
        await sp.send("ready")
        b, d = await buyer(lm)
        await b.send("open", ref="s", image=d, cpu_ms=5000)
        opened = await b.expect("opened")
        sid = opened["session"]
        await b.send("stream", b"ping?", session=sid, eof=False)
        task = await sp.expect("task")
        assert task["session"] == sid and task.payload == b""
        got = await sp.expect("stream")  # typed before the seller had the job: kept for it
        assert got.payload == b"ping?"
        await sp.send("need_image", image=d)
        await sp.expect("image")
        await sp.send("stream", b"pong!", session=sid, eof=False)
        assert (await b.expect("stream")).payload == b"pong!"
        await b.send("stream", session=sid, eof=True)
        assert (await sp.expect("stream"))["eof"] is True
        await sp.send("result", attempt=task["attempt"], exit_status=0, signal=None, reason="",
                      cpu_ms=2000, output_sha256=protocol.digest(b"pong!"))
        closed = await b.expect("closed")
        assert closed["session"] == sid and closed["exit_status"] == 0
        assert closed["cost_milli"] == 20 and closed["cpu_ms"] == 2000
        assert (await sp.expect("settled"))["paid_milli"] == 20
        await sp.close()
        await b.close()
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice") == {"buyer": COINS - 20, "alice": 20}
    assert_ledger_ok(lm)


# --- authentication and framing ----------------------------------------------------

def test_handshake_version_mismatch(lm):
    async def main():
        await lm.start()
        p = await Peer.open(lm.buy("buyer", BID), "buyer", version=2)
        assert p.welcome.type == "error" and p.welcome["code"] == "version"
        assert await p.recv() is None
        await lm.stop()
    run(main())


def test_role_must_match_the_certificate(lm):
    async def main():
        await lm.start()
        p = await Peer.open(lm.buy("buyer", BID), "seller")
        assert p.welcome.type == "error" and p.welcome["code"] == "auth"
        await lm.stop()
    run(main())


def _foreign(o, **kw):
    """A client context with a certificate the market never issued."""
    other = ca.make_ca()
    leaf = ca.issue(other.cert_pem, other.key_pem, "mallory", **kw)
    return protocol.client_context(o.ca_pem, leaf.cert_pem, leaf.key_pem)


async def _refused(o, ctx) -> str:
    """The error a peer meets: a TLS failure or an `error` frame."""
    try:
        p = await Peer.open(o, "buyer", ctx=ctx)
    except (ssl.SSLError, ConnectionError) as e:
        return f"tls: {e}"
    m = p.welcome
    if m is None:
        return "closed"
    assert m.type == "error", m
    return f"{m['code']}: {m['message']}"


def test_bad_credentials_are_refused_and_the_market_carries_on(lm, caplog):
    caplog.set_level(logging.INFO, logger="cpushare.market")

    async def main():
        await lm.start()
        o = lm.buy("buyer", BID)
        ca_cert, ca_key = lm.admin.get_meta("ca_cert"), lm.admin.get_meta("ca_key")
        # another CA's certificate: refused during the TLS handshake
        assert (await _refused(o, _foreign(o))).startswith(("tls", "closed"))
        # the market's CA but expired
        old = ca.issue(ca_cert, ca_key, "old", days=1,
                       not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
        ctx = protocol.client_context(o.ca_pem, old.cert_pem, old.key_pem)
        assert (await _refused(o, ctx)).startswith(("tls", "closed"))
        # the market's CA, valid, but never registered: an order of no one
        stray = ca.issue(ca_cert, ca_key, "stray")
        ctx = protocol.client_context(o.ca_pem, stray.cert_pem, stray.key_pem)
        why = await _refused(o, ctx)
        assert why.startswith("auth:") and "not issued" in why
        # revoked
        lm._quiesce()
        with lm.admin.transaction():
            assert lm.admin.revoke(protocol.fingerprint_pem(o.cert_pem))
        why = await _refused(o, None)
        assert why.startswith("auth:") and "revoked" in why
        # a server the client does not trust: the seller refuses the market
        bad_ca = ca.make_ca()
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx = protocol.client_context(bad_ca.cert_pem, o.cert_pem, o.key_pem)
            await Peer.open(o, "buyer", ctx=ctx)
        # and the market still serves the honest
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        b, d = await buyer(lm)
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        await b.expect("done")
        await s.stop()
        await lm.stop()
    run(main())
    text = caplog.text
    assert "refused TLS connection" in text
    assert "expired" in text
    assert "revoked" in text
    assert_ledger_ok(lm)


def frame(header: bytes, payload: bytes = b"") -> bytes:
    return len(header).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + header + payload


MALFORMED = {
    "zero header length": b"\0\0\0\0\0\0\0\0",
    "oversized header": (protocol.MAX_HEADER + 1).to_bytes(4, "big") + b"\0\0\0\0",
    "oversized payload": b"\0\0\0\x02" + (protocol.DEFAULT_MAX_PAYLOAD + 1).to_bytes(4, "big"),
    "not JSON": frame(b"{x}"),
    "not UTF-8": frame(b'{"type":"\xff"}'),
    "not an object": frame(b"[]"),
    "no type": frame(b'{"image":"x"}'),
    "unknown type": frame(b'{"type":"bogus"}'),
    "wrong field type": frame(b'{"type":"need_image","image":123}'),
    "missing field": frame(b'{"type":"result","attempt":1}'),
    "bool for int": frame(b'{"type":"handback","attempt":true}'),
    "not a digest": frame(b'{"type":"need_image","image":"../../etc/passwd"}'),
    "a NUL in a string": frame(b'{"type":"result","attempt":1,"exit_status":0,"signal":null,'
                               b'"reason":"\\u0000","cpu_ms":1,"output_sha256":"' + b"0" * 64
                               + b'"}'),
    "a buyer's message": frame(b'{"type":"submit","ref":"r","image":"' + b"a" * 64 + b'"}'),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frame_closes_only_that_connection(lm, caplog, name):
    caplog.set_level(logging.INFO, logger="cpushare.market")

    async def main():
        await lm.start()
        good = await ScriptedSeller.connect(lm.sell("alice", BID))
        bad = await Peer.open(lm.sell("bob", BID), "seller")
        bad.writer.write(MALFORMED[name])
        err = await bad.recv()
        assert err is not None and err.type == "error" and err["code"] == "frame", err
        assert await bad.recv() is None  # closed
        good.is_ready.clear()
        await good.peer.send("ping", t=-1)
        await asyncio.wait_for(good.is_ready.wait(), TIMEOUT)  # still served
        b, d = await buyer(lm)
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        await b.expect("done")
        await good.stop()
        await lm.stop()
    run(main())
    assert "closing seller bob" in caplog.text and "frame:" in caplog.text


def test_silent_peer_is_dropped(lm, caplog):
    caplog.set_level(logging.INFO, logger="cpushare.market")

    async def main():
        await lm.start(heartbeat=1)
        p = await Peer.open(lm.buy("buyer", BID), "buyer")
        while True:  # read without answering pings
            m = await asyncio.wait_for(protocol.read_message(p.reader), TIMEOUT)
            if m is None:
                break
            assert m.type == "ping"
        await lm.stop()
    run(main())
    assert "silent for" in caplog.text


def test_large_inputs_and_outputs_live_beside_the_store_until_delivered(sqlite_lm):
    lm = sqlite_lm  # (PostgreSQL keeps them in the database)
    big = bytes(range(256)) * 1024  # 256 KiB: kept in a file, not in SQLite
    blobs = lm.db + ".d"

    async def main():
        await lm.start()
        o = lm.buy("buyer", BID, max_cpu_seconds=10)
        b = await Peer.open(o, "buyer")
        img = tiny_image()
        d = image_digest(img)
        await b.send("image", img, image=d)
        await b.expect("image_ok")
        await b.send("submit", big, ref="big", image=d)
        await b.expect("accepted")
        await b.close()
        assert os.listdir(blobs) == [f"t{1}.in"]
        await lm.stop()  # a restart: the input is still there
        with open(os.path.join(blobs, "t999.out"), "wb") as f:  # left by a crash
            f.write(b"stale")
        await lm.start()
        assert os.listdir(blobs) == ["t1.in"]
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        while not s.settled:
            s.got_settled.clear()
            await asyncio.wait_for(s.got_settled.wait(), TIMEOUT)
        assert s.tasks[0].payload == big
        assert os.listdir(blobs) == ["t1.out"]  # the buyer is away: kept for it
        b = await Peer.open(o, "buyer")
        done = await b.expect("done")
        assert done.payload == big[::-1]
        await b.sync()
        assert os.listdir(blobs) == ["t1.out"]  # sent, not acknowledged: kept
        await b.send("ack", task=done["task"])
        await b.sync()
        await s.stop()
        await lm.stop()
    run(main())
    assert os.listdir(blobs) == []
    assert_ledger_ok(lm)


def test_big_files_are_written_in_the_background_and_on_disk_before_the_commit(sqlite_lm):
    lm = sqlite_lm  # (PostgreSQL keeps them in the database)
    from cpushare.market import store as store_mod
    big = os.urandom(3 * store_mod.BACKGROUND_WRITE)
    st = lm.admin
    buyer_id = st.account("buyer").id
    lm.buy("buyer", BID)  # buy order 1
    st.begin()
    tid = st.add_task(1, buyer_id, "r", "a" * 64, big, 1, 1000, BID)
    assert st.task_input(tid) == big  # a read waits for the write
    st.add_task(1, buyer_id, "r2", "a" * 64, big[::-1], 1, 1000, BID)
    st.commit()  # waits for every file it refers to
    assert not st.files_pending()
    with open(os.path.join(lm.db + ".d", f"t{tid + 1}.in"), "rb") as f:
        assert f.read() == big[::-1]


def test_a_big_input_and_output_go_through_the_market_whole(lm):
    big = os.urandom(5 << 20)  # read in pieces, written to disk by the store's thread

    async def main():
        await lm.start()
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        b, d = await buyer(lm)
        await b.send("submit", big, ref="big", image=d)
        await b.expect("accepted")
        done = await b.expect("done")
        assert done.payload == big[::-1] and s.tasks[0].payload == big
        await s.stop()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_a_seller_that_disconnects_in_the_middle_of_a_big_result_loses_only_its_attempt(lm):
    big = os.urandom(4 << 20)

    async def main():
        await lm.start()
        quitter = await Peer.open(lm.sell("alice", 1), "seller")
        await quitter.send("ready")
        b, d = await buyer(lm)
        await b.send("submit", big, ref="big", image=d)
        await b.expect("accepted")
        task = await quitter.expect("task")
        assert task.payload == big
        out = big[::-1]
        head, body = protocol.frame("result", out, attempt=task["attempt"], exit_status=0,
                                    signal=None, reason="", cpu_ms=5,
                                    output_sha256=protocol.digest(out))
        quitter.writer.write(head + body[:len(body) // 3])  # and gone in mid-payload
        await quitter.writer.drain()
        await quitter.close()
        s = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        done = await b.expect("done")
        assert done.payload == out and done["attempts"] == 2 and done["cost_milli"] == 10
        await s.stop()
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice", "bob") == {"buyer": COINS - 10, "alice": 0, "bob": 10}
    assert_ledger_ok(lm)


def test_a_resubmission_of_a_ref_whose_result_this_connection_got_is_not_a_new_task(lm):
    # (a buyer that reconnects is sent the results kept for it and resubmits what it
    # has not read yet: some of those refs have their result ahead of the submit)
    async def main():
        await lm.start()
        s = await ScriptedSeller.connect(lm.sell("alice", 36_000))
        b, d = await buyer(lm)
        await b.send("submit", b"once", ref="r", image=d)
        acc = await b.expect("accepted")
        await b.expect("done")
        await b.send("submit", b"once", ref="r", image=d)
        again = await b.expect("accepted")
        assert (again["task"], again["escrow_milli"]) == (acc["task"], 0)
        assert await b.sync() == [] and len(s.tasks) == 1
        # on another connection a ref already delivered is a new task, as before
        b2 = await Peer.open(lm.buy("buyer", BID), "buyer")
        await b2.send("submit", b"twice", ref="r", image=d)
        got = {}
        while len(got) < 2:  # (a task done within the commit after hello: done comes first)
            m = await b2.recv()
            got[m.type] = m
        assert got["accepted"]["task"] == got["done"]["task"] != acc["task"]
        assert got["done"].payload == b"eciwt"
        await s.stop()
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice") == {"buyer": COINS - 20, "alice": 20}
    assert_ledger_ok(lm)


def test_a_result_for_an_attempt_the_seller_is_not_running_is_paid_nothing(lm):
    async def main():
        await lm.start()
        p = await Peer.open(lm.sell("alice", BID), "seller")
        await p.send("result", b"x", attempt=12345, exit_status=0, signal=None, reason="",
                     cpu_ms=10, output_sha256=protocol.digest(b"x"))
        st = await p.expect("settled")
        assert (st["attempt"], st["paid_milli"], st["accepted"]) == (12345, 0, False)
        await p.close()
        await lm.stop()
    run(main())
    assert lm.balance("alice") == 0
    assert_ledger_ok(lm)


def test_revoking_a_certificate_closes_its_live_connection(lm, caplog):
    caplog.set_level(logging.INFO, logger="cpushare.market")

    async def main():
        await lm.start(heartbeat=1)
        o = lm.sell("alice", BID)
        p = await Peer.open(o, "seller")
        lm._quiesce()
        with lm.admin.transaction():
            lm.admin.revoke(protocol.fingerprint_pem(o.cert_pem))
        e = await p.recv()
        assert e.type == "error" and e["code"] == "auth" and "revoked" in e["message"]
        assert await p.recv() is None
        await lm.stop()
    run(main())
    assert "was revoked" in caplog.text


def test_the_market_uses_only_the_store_interface():
    """What the market asks of its store is declared by `Store`, so another store can serve."""
    import pathlib
    import re
    from cpushare.market import server
    from cpushare.market.store import Store
    text = "".join(p.read_text(encoding="utf-8")
                   for p in pathlib.Path(server.__file__).parent.glob("*.py")
                   if p.name not in ("admin.py", "__main__.py", "ca.py", "migrate.py"))
    used = set(re.findall(r"(?<![\w.])(?:self\.store|store|self\._tx\(\))\.([a-z_]+)\b",
                          text))
    declared = set(dir(Store)) | set(Store.__annotations__)
    conn = set(dir(server.SellerConn)) | {"attempt", "order", "order_id", "account_id",
                                         "account", "deadline", "ready_seq", "stale",
                                         "returned", "peer", "out", "market", "reader",
                                         "writer", "closed", "gone", "fingerprint",
                                         "last_seen"}
    missing = sorted(n for n in used - declared - conn)
    assert len(used & declared) > 20
    assert missing == [], f"the market calls store methods Store does not declare: {missing}"
    assert "sqlite" not in text.lower()


def test_an_attempt_still_running_when_its_task_closes_is_void(lm):
    """k = 2; one seller holds its attempt while the other slot is lost five
    times: the task fails and is refunded, and the holder's late result and
    its disconnection change nothing more."""
    async def main():
        await lm.start()
        holder = await ScriptedSeller.connect(lm.sell("alice", 1), hold=True)
        b, d = await buyer(lm, redundancy=2)
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        await asyncio.wait_for(holder.got_task.wait(), TIMEOUT)
        order = lm.sell("bob", 2)
        for _ in range(5):
            quitter = await ScriptedSeller.connect(order, hold=True)
            await asyncio.wait_for(quitter.got_task.wait(), TIMEOUT)
            await quitter.stop()
        f = await b.expect("failed")
        assert f["code"] == "task" and "5 attempts were lost" in f["message"]
        late = holder.tasks[0]
        await holder.peer.send("result", b"x", attempt=late["attempt"], exit_status=0,
                               signal=None, reason="", cpu_ms=5,
                               output_sha256=protocol.digest(b"x"))
        await asyncio.wait_for(holder.got_settled.wait(), TIMEOUT)
        assert holder.settled[0]["paid_milli"] == 0
        await holder.stop()
        assert await b.sync() == []  # no second failed, no done
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice", "bob") == {"buyer": COINS, "alice": 0, "bob": 0}
    states = lm.admin.db.execute("SELECT state FROM tasks").fetchall()
    assert states == [("failed",)]
    assert_ledger_ok(lm)
