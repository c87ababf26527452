"""Reads ahead on the PostgreSQL store (store/pgahead.py): what a submit will
ask (its ref's result acknowledged already, the buyer account's lock, its
balance) is read in the store's writer thread, and answers the statements
of that transaction without sending them, as long as it holds; then the
statement is sent as before.  And through the market: a submit sends no
statement from the event loop's thread."""

from __future__ import annotations

import asyncio

import psycopg

from test_market import BID, COINS, buyer, run
from test_market_peers import LoopbackMarket, ScriptedSeller
from test_pg_journal import _setup

IMAGE = "ab" * 32


def _store(tmp_path, url):
    from cpushare.market.store.pg import PostgresStore
    return PostgresStore(url, image_dir=str(tmp_path / "images"), create=True)


def _task(s, bo, buyer_id, ref) -> int:
    return s.add_task(bo, buyer_id, ref, IMAGE, b"in", 1, 1000, 20, 0, False, "seccomp")


def _record(db) -> list[str]:
    """The statements `db` (a PgDb) is given from here on: the loop thread's
    (its writer thread uses the connection itself)."""
    seen: list[str] = []
    execute = db.execute

    def recorded(sql, *a, **k):
        seen.append(sql)
        return execute(sql, *a, **k)
    db.execute = recorded
    return seen


def _ahead(s, bo, refs, account=None) -> None:
    s.took_ahead(s.read_ahead(bo, refs, account).result(10))


def test_answers_read_ahead_are_used_while_they_hold_and_only_then(tmp_path, pg_cluster):
    url = pg_cluster.database()
    s = _store(tmp_path, url)
    other = psycopg.connect(url, autocommit=True)
    try:
        buyer_id, _, _, bo = _setup(s)
        with s.transaction():
            s.transfer("mint", [(s.mint_id, -5000), (buyer_id, 5000)])
            acked = _task(s, bo, buyer_id, "acked")
            later = _task(s, bo, buyer_id, "later")
            s.mark_delivered([acked], [(bo, "acked")])

        # read ahead: the answers, and nothing sent for them
        s.begin()
        _ahead(s, bo, ["acked", "fresh", "later"], buyer_id)
        sent = s.db.sent
        assert s.delivered_task(bo, "acked") == acked
        assert s.delivered_task(bo, "fresh") is None
        assert s.try_lock("account", buyer_id) is True
        assert s.account_by_id(buyer_id).balance_milli == 5000
        assert s.db.sent == sent, "a statement was sent for an answer read ahead"
        # the lock is this transaction's: another session cannot take it
        assert other.execute("SELECT pg_try_advisory_lock(%s::int, %s::int)",
                             (0x43505553 + 1, buyer_id)).fetchone()[0] is False

        # a delivery journaled without its ref, since: asked again
        s.mark_delivered([later])
        assert s.delivered_task(bo, "later") == later
        assert s.db.sent == sent + 1

        # a journal sent since the read: asked again (its acks are not in memory now)
        _ahead(s, bo, ["x"])
        x = _task(s, bo, buyer_id, "x")
        s.mark_delivered([x], [(bo, "x")])
        s.db.send_journal()
        n = s.db.sent
        assert s.delivered_task(bo, "x") == x
        assert s.db.sent == n + 1
        s.commit()

        # another transaction: what was read in the last holds no more
        s.begin()
        sent = s.db.sent
        assert s.delivered_task(bo, "fresh") is None
        assert s.db.sent == sent + 1
        # ... nor does an answer read in one transaction and taken in the next
        f = s.read_ahead(bo, ["fresh2"], None)
        answer = f.result(10)
        s.commit()
        s.begin()
        s.took_ahead(answer)
        sent = s.db.sent
        assert s.delivered_task(bo, "fresh2") is None
        assert s.db.sent == sent + 1
        s.commit()
        assert s.check() == []
    finally:
        other.close()
        s.close()


def test_a_submit_sends_no_statement_from_the_event_loop(tmp_path, pg_cluster):
    """100 submits, each with a fresh ref: their ref checks, the account's
    lock and its balance go in the store's writer thread (a few statements
    of the market's own, its once-a-second look, may come meanwhile)."""
    lm = LoopbackMarket(tmp_path, pg_cluster.database())
    lm.account("buyer", COINS)
    lm.account("alice")
    n = 100

    async def main():
        m = await lm.start()
        b, d = await buyer(lm)
        await b.sync()
        sent = m.store.db.sent
        for i in range(n):
            await b.send("submit", b"x%d" % i, ref=f"r{i}", image=d)
        accepted = set()
        while len(accepted) < n:
            msg = await b.recv()
            assert msg is not None and msg.type == "accepted", msg
            accepted.add(msg["ref"])
        from_loop = m.store.db.sent - sent
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        done = 0
        while done < n:
            msg = await b.recv()
            if msg.type == "done":
                done += 1
                await b.send("ack", task=msg["task"])
        await b.sync()
        await s.stop()
        await b.close()
        await lm.stop()
        return from_loop
    from_loop = run(main())
    assert from_loop < 10, f"{from_loop} statements from the loop for {n} submits"
    assert lm.check() == []
    lm.close()


def test_a_buyer_resubmitting_an_acked_ref_is_refused_with_reads_ahead(tmp_path, pg_cluster):
    """The ref check read ahead still refuses a second paid task under a ref
    whose result was acknowledged, in the same group and after it."""
    lm = LoopbackMarket(tmp_path, pg_cluster.database())
    lm.account("buyer", COINS)
    lm.account("alice")

    async def main():
        await lm.start()
        b, d = await buyer(lm)
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        await b.send("submit", b"abc", ref="once", image=d)
        assert (await b.expect("accepted"))["ref"] == "once"
        done = await b.expect("done")
        await b.send("ack", task=done["task"])
        await b.send("submit", b"abc", ref="once", image=d)  # (likely in the ack's group)
        again = await b.expect("failed")
        await asyncio.sleep(0.1)
        await b.send("submit", b"abc", ref="once", image=d)  # (a later group)
        later = await b.expect("failed")
        await s.stop()
        await b.close()
        await lm.stop()
        return again, later
    again, later = run(main())
    for m in (again, later):
        assert m["code"] == "order" and "acknowledged" in m["message"], m
    assert lm.check() == []
    lm.close()


def test_a_lock_refused_ahead_leaves_the_balance_to_be_read_under_the_lock(tmp_path,
                                                                          pg_cluster):
    url = pg_cluster.database()
    s = _store(tmp_path, url)
    other = psycopg.connect(url)  # (in a transaction: its lock is held until it ends)
    try:
        buyer_id, _, _, bo = _setup(s)
        other.execute("SELECT pg_advisory_xact_lock(%s::int, %s::int)",
                      (0x43505553 + 1, buyer_id))
        s.begin()
        _ahead(s, bo, [], buyer_id)
        sent = s.db.sent
        assert s.try_lock("account", buyer_id) is False  # (the answer read ahead)
        assert s.db.sent == sent
        s.account_by_id(buyer_id)  # (read now: nothing was kept of a refused lock)
        assert s.db.sent == sent + 1
        s.rollback()
    finally:
        other.close()
        s.close()


def _plan_rows(node) -> tuple[int, int]:
    """(rows a plan's scans of `tasks` returned, rows they removed by a filter),
    over every loop of every node of an EXPLAIN (ANALYZE, FORMAT JSON) plan."""
    got = removed = 0
    if node.get("Relation Name") == "tasks":
        loops = node.get("Actual Loops", 1)
        got += node["Actual Rows"] * loops
        removed += node.get("Rows Removed by Filter", 0) * loops
    for child in node.get("Plans", ()):
        g, r = _plan_rows(child)
        got, removed = got + g, removed + r
    return got, removed


def test_the_reads_of_refs_look_each_up_and_scan_no_order(tmp_path, pg_cluster):
    """A new market's statistics say an order has few tasks (no ANALYZE has run
    yet): the refs' statements still look each ref and each id up by its
    key, in a plan of the same shape the next time (prepared), and do not
    read the order's other tasks (which made each read cost as much as the
    order's tasks, 2 to 3 ms at 4,000)."""
    from cpushare.market.store import pgahead
    url = pg_cluster.database()
    s = _store(tmp_path, url)
    try:
        buyer_id, _, _, bo = _setup(s)
        with s.transaction():
            s.transfer("mint", [(s.mint_id, -5000), (buyer_id, 5000)])
        with s.transaction():
            ids = [_task(s, bo, buyer_id, f"r{i}") for i in range(3000)]
            s.mark_delivered(ids, [(bo, f"r{i}") for i in range(3000)])
        refs = [f"r{i}" for i in range(0, 3000, 47)] + ["none"]
        journaled = ids[5:15]
        conn = psycopg.connect(url, autocommit=True)
        try:
            single, args = s._delivered_sql(bo, "r7", journaled)
            single = s.db._q(single)[0]
            for sql, params in ((pgahead._REFS, (refs, bo, journaled, bo, refs)),
                                (single, args)):
                for mode in ("force_custom_plan", "force_generic_plan"):
                    conn.execute(f"SET plan_cache_mode = {mode}")
                    plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params,
                                        prepare=True).fetchone()[0][0]["Plan"]
                    got, removed = _plan_rows(plan)
                    looked_up = len(refs) + len(journaled)
                    assert got <= looked_up and removed <= looked_up, (mode, sql, plan)
            found = dict(conn.execute(pgahead._REFS, (refs, bo, journaled, bo, refs)))
        finally:
            conn.close()
        assert found == {f"r{i}": ids[i] for i in range(0, 3000, 47)}
    finally:
        s.close()


def test_a_claim_from_the_shared_queue_sends_no_statement_from_the_event_loop(tmp_path,
                                                                               pg_cluster):
    """Two market processes' Markets on one database (in this test's loop):
    the buyer on A, the only seller on B, so every task crosses through the
    shared queue.  B's claims (and the attempts of what they take) go in its
    store's writer thread, and so do A's offers and its reads of the
    results B tells it of: neither loop sends a statement for them, where
    B's sent two a claim and A's one an offer and one a batch of results; every task is done once and
    `ledger check` holds."""
    import dataclasses
    from cpushare.market import admin
    from cpushare.market.server import Market
    from test_market_peers import free_port
    lm = LoopbackMarket(tmp_path, pg_cluster.database())
    lm.account("buyer", COINS)
    lm.account("alice")
    n = 480

    async def main():
        await lm.start()
        store_b, port_b = lm.open_store(), free_port()
        b_market = Market(store_b)
        started = asyncio.get_running_loop().create_future()
        serving = asyncio.create_task(b_market.serve("127.0.0.1", port_b,
                                                     admin.tls_context(store_b),
                                                     started=started))
        await asyncio.wait_for(started, 20)
        try:
            b, d = await buyer(lm)
            await b.sync()
            s = await ScriptedSeller.connect(dataclasses.replace(lm.sell("alice", BID),
                                                                 port=port_b))
            sent, sent_a = store_b.db.sent, lm.market.store.db.sent
            loop_sql = {"A": _record(lm.market.store.db), "B": _record(store_b.db)}
            for i in range(n):
                await b.send("submit", b"x%d" % i, ref=f"r{i}", image=d)
            done: dict[str, int] = {}
            while len(done) < n:
                msg = await b.recv()
                assert msg is not None and msg.type != "failed", msg
                if msg.type == "done":
                    done[msg["ref"]] = done.get(msg["ref"], 0) + 1
                    await b.send("ack", task=msg["task"])
            from_loop = store_b.db.sent - sent
            from_a = lm.market.store.db.sent - sent_a
            claimed = store_b.db.execute("SELECT COUNT(*) FROM tasks WHERE owner = ?",
                                         (b_market.server_id,)).fetchone()[0]
            await b.sync()
            await s.stop()
            await b.close()
            return from_loop, from_a, claimed, done, loop_sql
        finally:
            b_market.stop()
            await asyncio.wait_for(serving, 20)
            store_b.close()
            await lm.stop()

    from_loop, from_a, claimed, done, loop_sql = run(main())
    assert claimed == n, f"B ran {claimed} of {n}: not every task crossed"
    assert done == {f"r{i}": 1 for i in range(n)}
    # (what remains is each first use: an id block, the image, a carry; and B's
    # once-a-second look at the other processes, two statements a second: 7 in
    # all here, against 43 when each claim was two of the loop's)
    assert from_loop < 20, f"{from_loop} statements from B's loop for {n} claimed tasks"
    # A reads the results B's commits told it of, and offers its tasks to the
    # shared queue, in its writer thread too: what its loop sends is its first
    # uses and its once-a-second look (6 or 7 here; 24 when each offer and each
    # batch of results was the loop's)
    assert from_a < 20, f"{from_a} statements from A's loop for {n} results from B"
    for who, marks in (("B", ("AND bid_milli >= ?", "FROM attempts WHERE task_id = ANY")),
                       ("A", ("SET owner = NULL", "octet_length(output)",
                              "buy_order_id, ref, id, buyer_account_id"))):
        for sql in loop_sql[who]:
            assert not any(m in sql for m in marks), f"{who}'s loop sent {sql[:80]!r}"
    assert lm.check() == []
    lm.close()


def test_results_heard_together_are_read_within_the_buyers_room(tmp_path, pg_cluster):
    """store.results_apart: done, undelivered results in id order while they
    fit the room with a frame's header each (the first whatever its size);
    the rest are named, their outputs not read; queued or delivered tasks
    neither; and the tasks it is asked of that the buy order waits for.
    (And the store's small input is the market's.)"""
    from cpushare.market import buyers
    from cpushare.market.store import pgfleet
    assert pgfleet.SMALL_INPUT == buyers.SMALL_INPUT
    s = _store(tmp_path, pg_cluster.database())
    try:
        buyer_id, _, _, bo = _setup(s)
        with s.transaction():
            s.transfer("mint", [(s.mint_id, -5000), (buyer_id, 5000)])
            ids = [_task(s, bo, buyer_id, f"r{i}") for i in range(6)]
            for i, tid in enumerate(ids[:5]):
                s.finish_task(tid, "done", exit_status=0, output=b"x" * (1000 * (i + 1)))
            s.mark_delivered([ids[4]], [(bo, "r4")])
        each = pgfleet.FRAME_EACH
        # 1000 and 2000 bytes fit in 3000 + two frames; the third does not
        def within(want, room, unknown=()):
            return s.results_apart(bo, list(unknown), want, room).result(10)
        rows, got, past = within(ids, 3000 + 2 * each)
        assert rows == []
        assert [r.task_id for r in got] == ids[:2] and got[1].output == b"x" * 2000
        assert past == ids[2:4]  # (r4 is delivered, r5 still queued: neither)
        _, got, past = within(ids, 3000 + 2 * each - 1)
        assert [r.task_id for r in got] == ids[:1] and past == ids[1:4]
        _, got, past = within(ids[3:], 10)  # the first, whatever its size
        assert [r.task_id for r in got] == [ids[3]] and past == []
        # asked of tasks it did not know: those the order waits for, and their results
        rows, got, past = within([], 10 ** 6, unknown=[ids[0], ids[4], ids[5]])
        assert [r[2] for r in rows] == [ids[0], ids[5]]  # (r4 is delivered)
        assert [r.task_id for r in got] == [ids[0]] and past == []  # (r5 is queued)
        _, got, past = within(ids[:2], 0)  # (no room: none read)
        assert got == [] and past == ids[:2]
    finally:
        s.close()
