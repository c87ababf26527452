"""On PostgreSQL the group commit runs in a thread of its own: the event
loop never waits for it.  A commit that waits for a row lock (another
process's commit on the same balance, here a session of the test holding
it) does not stop the connections: pings are answered meanwhile, and the
group's answers go out once it is committed."""

from __future__ import annotations

import asyncio
import threading
import time

from test_market_peers import LoopbackMarket, Peer, ScriptedSeller
from test_market import BID, COINS, assert_ledger_ok, buyer, run

HELD_AT_MOST = 6.0  # s: a loop that waits for the commit would be freed only by this


def _market_and_holder(tmp_path, pg_cluster):
    """A market with a buyer and alice, and another session of its database
    (to hold a row), with release() to end that session's transaction once."""
    import psycopg
    url = pg_cluster.database()
    lm = LoopbackMarket(tmp_path, url)
    lm.account("buyer", COINS)
    lm.account("alice")
    other = psycopg.connect(url, autocommit=True)
    released = threading.Event()

    def release():
        if not released.is_set():
            released.set()
            other.execute("ROLLBACK")
    return lm, other, released, release


def _close(lm, other) -> None:
    other.close()
    lm.close()


def test_a_commit_waiting_for_a_lock_does_not_stop_the_event_loop(tmp_path, pg_cluster):
    lm, other, released, release = _market_and_holder(tmp_path, pg_cluster)

    try:
        async def main():
            await lm.start()
            b, d = await buyer(lm)
            watcher = await Peer.open(lm.sell("alice", BID), "seller")
            # another session holds the row of the escrow account, as another
            # market process's commit would: this group's commit must wait for it
            other.execute("BEGIN")
            other.execute("SELECT 1 FROM accounts WHERE name = '@escrow' FOR UPDATE")
            timer = threading.Timer(HELD_AT_MOST, release)
            timer.start()
            try:
                await b.send("submit", b"abc", ref="r1", image=d)
                await asyncio.sleep(0.3)  # (the group commit is on its way, and waits)
                t0 = time.monotonic()
                await watcher.send("ping", t=-1)  # (the peer keeps the pongs of t=-1)
                await watcher.expect("pong", timeout=HELD_AT_MOST + 5)
                answered_while_held = not released.is_set()
                waited = time.monotonic() - t0
                release()
                assert answered_while_held, f"the ping waited {waited:.1f} s, for the commit"
                accepted = await b.expect("accepted")
                s = await ScriptedSeller.connect(lm.sell("alice", BID))
                done = await b.expect("done")
                assert done["task"] == accepted["task"] and done.payload == b"cba"
            finally:
                timer.cancel()
                release()
            await watcher.close()
            await s.stop()
            await lm.stop()
        run(main())
        assert_ledger_ok(lm)
    finally:
        _close(lm, other)


def test_frames_that_read_the_store_wait_for_a_held_commit_and_the_loop_goes_on(
        tmp_path, pg_cluster):
    """While the commit waits, a submit (its ref check, its balance) and a
    hello (the certificate) arrive: they wait for the commit, the loop does
    not, and the statements the loop ran while a commit was on its way
    waited for none (the store counts them)."""
    lm, other, released, release = _market_and_holder(tmp_path, pg_cluster)

    try:
        async def main():
            m = await lm.start()
            b, d = await buyer(lm)
            watcher = await Peer.open(lm.sell("alice", BID), "seller")
            waits0 = m.store.db.waits
            late_order = lm.sell("alice", BID)  # (before the lock: the test's loop is the market's)
            other.execute("BEGIN")
            other.execute("SELECT 1 FROM accounts WHERE name = '@escrow' FOR UPDATE")
            timer = threading.Timer(HELD_AT_MOST, release)
            timer.start()
            try:
                await b.send("submit", b"abc", ref="r1", image=d)
                await asyncio.sleep(0.3)  # (its commit is on its way, and waits)
                await b.send("submit", b"def", ref="r2", image=d)
                late = asyncio.ensure_future(Peer.open(late_order, "seller"))
                await asyncio.sleep(0.3)
                await watcher.send("ping", t=-1)
                await watcher.expect("pong", timeout=HELD_AT_MOST + 5)
                answered_while_held = not released.is_set()
                release()
                assert answered_while_held, "the loop waited for the commit"
                got = {(await b.expect("accepted"))["ref"] for _ in range(2)}
                assert got == {"r1", "r2"}
                seller = await late
                assert seller.welcome.type == "welcome", seller.welcome
                assert m.store.db.waits == waits0, "a statement waited for the commit"
                await seller.close()
                s = await ScriptedSeller.connect(lm.sell("alice", BID))
                outputs = {(await b.expect("done")).payload for _ in range(2)}
                assert outputs == {b"cba", b"fed"}
            finally:
                timer.cancel()
                release()
            await watcher.close()
            await s.stop()
            await lm.stop()
        run(main())
        assert_ledger_ok(lm)
    finally:
        _close(lm, other)
