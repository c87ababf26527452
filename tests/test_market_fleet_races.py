"""Two serve processes on one PostgreSQL database, made to race.

- One account's two buy orders, connected to different processes, spend
  its balance at once: the processes never accept together more than it
  holds (each locks the account against the other until its commit), and
  both upload the same image at the same moment (one row, no deadlock).
- A buyer cancels tasks that another process holds or that wait in the
  shared queue: each is refunded once, and its seller is told to stop.
"""

from __future__ import annotations

import asyncio
import dataclasses

from cpushare import protocol

from test_market_fleet import Proc
from test_market_peers import (LoopbackMarket, Peer, ScriptedSeller, free_port, image_digest,
                               tiny_image)

BID = 360_000
CPU_MS = 1000
TASK_COST = protocol.cost_milli(CPU_MS, BID)
AFFORDABLE = 100  # tasks the account can pay for
EACH = 150  # tasks each buy order asks for


def _market(tmp_path, pg_cluster, coins: int):
    lm = LoopbackMarket(tmp_path, pg_cluster.database())
    lm.account("buyer", coins)
    return lm


def _buyer_and_seller(tmp_path, pg_cluster, coins: int):
    """A market with a buyer holding `coins` and a seller, and two processes
    for it (not started): (market, buy order, sell order, log, processes)."""
    lm = _market(tmp_path, pg_cluster, coins)
    lm.account("seller")
    buy = lm.buy("buyer", BID, max_cpu_seconds=1)
    sell = lm.sell("seller", 36_000)
    lm.close()
    log = open(tmp_path / "server.log", "ab")
    return lm, buy, sell, log, [Proc(lm, free_port(), log), Proc(lm, free_port(), log)]


async def _replies(p: Peer, n: int) -> dict[str, protocol.Message]:
    """The `accepted` or `failed` of `n` submits, by ref."""
    out: dict[str, protocol.Message] = {}
    while len(out) < n:
        m = await p.recv(timeout=30)
        assert m is not None, "the market closed the connection"
        if m.type in ("accepted", "failed"):
            out[m["ref"]] = m
    return out


def test_two_processes_never_spend_one_balance_twice(tmp_path, pg_cluster):
    lm = _market(tmp_path, pg_cluster, AFFORDABLE * TASK_COST)
    orders = [lm.buy("buyer", BID, max_cpu_seconds=1), lm.buy("buyer", BID, max_cpu_seconds=1)]
    lm.close()
    log = open(tmp_path / "server.log", "ab")
    procs = [Proc(lm, free_port(), log), Proc(lm, free_port(), log)]
    img = tiny_image(7)
    d = image_digest(img)

    async def buyer(o, port, ready: asyncio.Barrier):
        p = await Peer.open(dataclasses.replace(o, port=port), "buyer")
        await ready.wait()
        await p.send("image", img, image=d)  # both at once: one row, and both told ok
        await p.expect("image_ok")
        await ready.wait()  # and the submits of both at once
        for i in range(EACH):  # (in bursts, as a buyer's window opens: a process
            # takes a burst in one read ahead, so bursts 10 ms apart, for both to race)
            await p.send("submit", b"x", ref=f"o{o.name}-{i}", image=d, cpu_ms=CPU_MS)
            if i % 10 == 9:
                await asyncio.sleep(0.01)
        replies = await _replies(p, EACH)
        await p.close()
        return replies

    async def main():
        for p in procs:
            p.start()
        try:
            ready = asyncio.Barrier(2)
            return await asyncio.gather(*(buyer(o, p.port, ready)
                                          for o, p in zip(orders, procs)))
        finally:
            for p in procs:
                p.stop()

    try:
        both = asyncio.run(main())
    finally:
        log.close()
    accepted = [m for r in both for m in r.values() if m.type == "accepted"]
    failed = [m for r in both for m in r.values() if m.type == "failed"]
    # every process accepted some: they did race
    per = [sum(m.type == "accepted" for m in r.values()) for r in both]
    assert all(per), per
    assert len(accepted) == AFFORDABLE, (len(accepted), len(failed))
    assert {m["code"] for m in failed} == {"funds"}
    assert len(failed) == 2 * EACH - AFFORDABLE
    store = lm.open_store()
    try:
        assert store.check() == []
        assert store.account("buyer").balance_milli == 0
        assert store.ledger_summary()["escrow"] == AFFORDABLE * TASK_COST
        assert store.db.execute("SELECT COUNT(*) FROM images WHERE digest = ?",
                                (d,)).fetchone()[0] == 1
    finally:
        store.close()
    text = open(tmp_path / "server.log").read()
    assert "Traceback" not in text and "stopping the market" not in text, text[-3000:]


def test_a_cancel_reaches_the_task_wherever_it_is(tmp_path, pg_cluster):
    n = 12
    lm, buy, sell, log, procs = _buyer_and_seller(tmp_path, pg_cluster, 10 * n * TASK_COST)
    img = tiny_image(3)
    d = image_digest(img)

    async def main():
        for p in procs:
            p.start()
        try:
            # the seller holds what it gets, on the other process
            s = await ScriptedSeller.connect(dataclasses.replace(sell, port=procs[1].port),
                                             hold=True)
            b = await Peer.open(dataclasses.replace(buy, port=procs[0].port), "buyer")
            await b.send("image", img, image=d)
            await b.expect("image_ok")
            for i in range(n):
                await b.send("submit", b"y", ref=f"c{i}", image=d, cpu_ms=CPU_MS)
            got = await _replies(b, n)
            assert all(m.type == "accepted" for m in got.values())
            await asyncio.wait_for(s.got_task.wait(), 20)  # (it crossed to the seller's process)
            await asyncio.sleep(0.3)  # the rest waits in the shared queue, or held
            s._run.cancel()  # (from here its frames are read below)
            await asyncio.gather(s._run, return_exceptions=True)
            for i in range(n):
                await b.send("cancel", ref=f"c{i}")
            failed = {}
            while len(failed) < n:
                m = await b.recv(timeout=30)
                assert m is not None
                if m.type == "failed":
                    failed[m["ref"]] = m
            held = {m["attempt"] for m in s.tasks}
            stops = set()
            while held - stops:  # its seller is told to stop each
                m = await s.peer.recv(timeout=30)
                assert m is not None
                if m.type == "stop":
                    stops.add(m["attempt"])
            await s.peer.close()
            await b.close()
            return failed, held
        finally:
            for p in procs:
                p.stop()

    try:
        failed, held = asyncio.run(main())
    finally:
        log.close()
    assert {m["code"] for m in failed.values()} == {"cancelled"}
    assert held
    store = lm.open_store()
    try:
        assert store.check() == []
        assert store.account("buyer").balance_milli == 10 * n * TASK_COST  # all refunded
        q = store.db.execute
        assert q("SELECT COUNT(*) FROM tasks WHERE state = 'failed'").fetchone()[0] == n
        assert q("SELECT COUNT(*) FROM transactions WHERE kind = 'refund'").fetchone()[0] == n
    finally:
        store.close()


def test_a_result_goes_to_the_newest_connection_on_another_process(tmp_path, pg_cluster):
    """A buy order connected to A, then to B: a task submitted through A (after
    B connected) and run on A's seller is delivered on B, the newest."""
    lm, buy, sell, log, procs = _buyer_and_seller(tmp_path, pg_cluster, 100 * TASK_COST)
    img = tiny_image(5)
    d = image_digest(img)

    async def main():
        for p in procs:
            p.start()
        try:
            s = await ScriptedSeller.connect(dataclasses.replace(sell, port=procs[0].port))
            old = await Peer.open(dataclasses.replace(buy, port=procs[0].port), "buyer")
            await old.send("image", img, image=d)
            await old.expect("image_ok")
            new = await Peer.open(dataclasses.replace(buy, port=procs[1].port), "buyer")
            await asyncio.sleep(0.5)  # (A hears that the newest connection is on B)
            await old.send("submit", b"abc", ref="r", image=d, cpu_ms=CPU_MS)
            await old.expect("accepted")

            async def done():
                m = await new.recv(timeout=20)
                while m is not None and m.type != "done":
                    m = await new.recv(timeout=20)
                return m
            m = await asyncio.wait_for(done(), 20)  # (pings alone never end a recv)
            await new.send("ack", task=m["task"])
            await asyncio.sleep(0.2)
            await s.stop()
            await old.close()
            await new.close()
            return m
        finally:
            for p in procs:
                p.stop()

    try:
        m = asyncio.run(main())
    finally:
        log.close()
    assert m is not None and m.type == "done" and m["ref"] == "r" and m.payload == b"cba", m
    store = lm.open_store()
    try:
        assert store.check() == []
        assert store.db.execute("SELECT delivered FROM tasks").fetchall() == [(1,)]
    finally:
        store.close()


def _calls(store, like: str) -> int:
    """How many times statements like `like` ran (pg_stat_statements)."""
    return store.db.execute("SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements s JOIN "
                            "pg_database d ON d.oid = s.dbid WHERE d.datname = "
                            "current_database() AND query LIKE ?", (like,)).fetchone()[0]


def test_results_from_another_process_reach_the_buyer_once_read_together(tmp_path, pg_cluster):
    """The buyer on A, the only seller on B: every result comes to A by
    notification, twice (by B's commit, then after it).  Each reaches the
    buyer once; results heard together are read in one statement; and a
    notification of a result acked already reads nothing (it read all the
    order's waiting refs again, once per late notification)."""
    n = 60
    lm, buy, sell, log, procs = _buyer_and_seller(tmp_path, pg_cluster, 100 * TASK_COST)
    img = tiny_image(6)
    d = image_digest(img)
    store = lm.open_store()
    store.db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    store.db.execute("SELECT pg_stat_statements_reset()")
    reload = "SELECT buy_order_id, ref, id, buyer_account_id FROM tasks WHERE delivered = % " \
             "AND session = % AND buy_order_id = %"

    async def main():
        for p in procs:
            p.start()
        try:
            b = await Peer.open(dataclasses.replace(buy, port=procs[0].port), "buyer")
            s = await ScriptedSeller.connect(dataclasses.replace(sell, port=procs[1].port))
            await b.send("image", img, image=d)
            await b.expect("image_ok")
            for i in range(n):
                await b.send("submit", b"in %d" % i, ref=f"r{i}", image=d, cpu_ms=CPU_MS)
            done: dict[str, int] = {}
            while sum(done.values()) < n:
                m = await b.recv(timeout=30)
                assert m is not None and m.type != "failed", m
                if m.type == "done":
                    done[m["ref"]] = done.get(m["ref"], 0) + 1
                    await b.send("ack", task=m["task"])
            try:  # (the late notifications are heard meanwhile)
                while (m := await b.recv(timeout=1.0)) is not None:
                    if m.type == "done":
                        done[m["ref"]] = done.get(m["ref"], 0) + 1
            except asyncio.TimeoutError:
                pass
            await s.stop()
            await b.close()
            return done
        finally:
            for p in procs:
                p.stop()

    try:
        done = asyncio.run(main())
        assert done == {f"r{i}": 1 for i in range(n)}
        assert _calls(store, reload) <= 2, "a late notification read the order's refs again"
        reads = _calls(store, "SELECT id, ref, state, exit_status%octet_length(output)%")
        assert 0 < reads <= n, reads
        assert store.check() == []
        assert store.db.execute("SELECT COUNT(*) FROM tasks WHERE delivered = 1"
                                ).fetchone()[0] == n
    finally:
        store.close()
        log.close()
