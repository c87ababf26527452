"""Matching honours every limit of the sell order, and pays honestly under
redundancy: over real TLS on loopback, with scripted sellers."""

from __future__ import annotations

import asyncio
import logging

import pytest

from cpushare import protocol
from cpushare.protocol import cost_milli

from test_market import BID, COINS, assert_ledger_ok, buyer, run
from test_market_peers import LoopbackMarket, ScriptedSeller, TIMEOUT
from cpushare.market import images


class RefusingSeller(ScriptedSeller):
    """Answers every task with the refusal a seller sends when its limits
    cannot hold the job (no exit status, no signal, reason memory-limit)."""

    async def _on(self, m: protocol.Message) -> None:
        if m.type != "task":
            return await super()._on(m)
        self.tasks.append(m)
        self.got_task.set()
        await self.peer.send("result", attempt=m["attempt"], exit_status=None, signal=None,
                             reason="memory-limit: image needs 9 bytes, more than 1",
                             cpu_ms=0, output_sha256=protocol.digest(b""))
        await self.peer.send("ready")


@pytest.fixture
def lm(tmp_path, market_db):
    m = LoopbackMarket(tmp_path, market_db)
    m.account("buyer", COINS)
    for name in ("alice", "bob", "carol", "dave", "erin", "frank"):
        m.account(name)
    yield m
    m.close()


def test_a_sellers_refusal_is_never_the_tasks_result(lm):
    """The refusing seller is cheaper, so it is offered the task first; its
    refusal is paid nothing and the task goes to the other seller."""
    async def main():
        await lm.start()
        refuser = await RefusingSeller.connect(lm.sell("alice", 1000))
        b, d = await buyer(lm)
        await b.send("submit", b"abc", ref="r", image=d)
        await b.expect("accepted")
        await asyncio.wait_for(refuser.got_task.wait(), TIMEOUT)
        assert [m.type for m in await b.sync()] == []  # no result: it waits
        honest = await ScriptedSeller.connect(lm.sell("bob", 2000))
        done = await b.expect("done")
        assert done.payload == b"cba" and done["exit_status"] == 0
        assert len(honest.tasks) == 1 and len(refuser.tasks) == 1
        await b.send("ack", task=done["task"])
        await b.sync()
        for s in (refuser, honest):
            await s.stop()
        await lm.stop()
    run(main())
    assert lm.balances("alice", "bob")["alice"] == 0
    assert lm.balances("alice", "bob")["bob"] == 1000 * 2000 // 3_600_000
    assert_ledger_ok(lm)


def test_a_task_no_seller_can_run_fails_with_code_limit(lm, caplog):
    caplog.set_level(logging.INFO, logger="cpushare.market")

    async def main():
        await lm.start()
        sellers = [await RefusingSeller.connect(lm.sell(n, 1000))
                   for n in ("alice", "bob", "carol", "dave", "erin")]
        b, d = await buyer(lm)
        await b.send("submit", b"abc", ref="r", image=d)
        await b.expect("accepted")
        f = await b.expect("failed")
        assert f["code"] == "limit" and "could not run it" in f["message"]
        for s in sellers:
            await s.stop()
        await lm.stop()
    run(main())
    assert lm.balance("buyer") == COINS  # refunded whole
    assert "Traceback" not in caplog.text
    assert_ledger_ok(lm)


def test_under_redundancy_the_lowest_agreeing_claim_is_paid(lm):
    """Two sellers agree on the output; one claims 99 times the CPU time of
    the other: both are paid for the lower claim, and `done` reports it."""
    async def main():
        await lm.start()
        honest = await ScriptedSeller.connect(lm.sell("alice", BID), cpu_ms=1000)
        greedy = await ScriptedSeller.connect(lm.sell("bob", BID), cpu_ms=99_000)
        b, d = await buyer(lm, redundancy=2, max_cpu_seconds=100)
        await b.send("submit", b"abc", ref="r", image=d)
        await b.expect("accepted")
        done = await b.expect("done")
        assert done["cpu_ms"] == 1000
        assert done["cost_milli"] == 2 * cost_milli(1000, BID)
        for s in (honest, greedy):
            await s.stop()
        await lm.stop()
    run(main())
    bal = lm.balances("buyer", "alice", "bob")
    assert bal["alice"] == bal["bob"] == cost_milli(1000, BID)
    assert bal["buyer"] == COINS - 2 * cost_milli(1000, BID)
    assert_ledger_ok(lm)


def test_the_output_limit_holds_for_a_plain_result(lm):
    """A seller whose order allows 1 KiB of output returns 4 KiB in one
    `result`: that is its error (code task), never a paid result; the task
    goes to another seller."""
    async def main():
        await lm.start()
        liar = await ScriptedSeller.connect(lm.sell("alice", 1000, output=1024),
                                            answer=lambda data: b"x" * 4096)
        b, d = await buyer(lm)
        await b.send("submit", b"abc", ref="r", image=d)
        await b.expect("accepted")
        await asyncio.wait_for(liar.got_task.wait(), TIMEOUT)
        honest = await ScriptedSeller.connect(lm.sell("bob", 2000))
        done = await b.expect("done")
        assert done.payload == b"cba"
        await honest.stop()
        await liar.stop()
        await lm.stop()
    run(main())
    assert lm.balance("alice") == 0
    assert_ledger_ok(lm)


def test_one_ms_tasks_pay_their_price_not_a_milli_each(lm):
    """250 tasks of 1 ms at an ask of 36 CPUCoins per CPU-hour are worth 2.5
    milli-CPUCoins: the buyer pays 2 (half a milli is carried to the next
    settlement with that seller), where rounding each up once made it 250."""
    async def main():
        await lm.start()
        s = await ScriptedSeller.connect(lm.sell("alice", 36_000), cpu_ms=1)
        b, d = await buyer(lm)
        n = 250
        for i in range(n):
            await b.send("submit", b"x", ref=f"r{i}", image=d)
        costs = []
        while len(costs) < n:
            m = await b.recv(TIMEOUT)
            assert m is not None
            if m.type == "done":
                costs.append(m["cost_milli"])
                await b.send("ack", task=m["task"])
        await b.sync()
        await s.stop()
        await lm.stop()
        return costs
    costs = run(main())
    assert sum(costs) == 2
    assert lm.balances("buyer", "alice") == {"buyer": COINS - 2, "alice": 2}
    assert lm.admin.carry(lm.admin.account("buyer").id, lm.admin.account("alice").id) \
        == 250 * 36_000 - 2 * 3_600_000
    assert_ledger_ok(lm)


def test_stored_images_have_a_quota_and_unused_ones_are_collected(lm, monkeypatch):
    from cpushare.market import buyers
    from test_market_peers import image_digest, tiny_image
    monkeypatch.setattr(images, "MAX_IMAGES", 3)

    async def main():
        m = await lm.start(image_ttl=0.0)
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        b, d = await buyer(lm)  # its first image
        for n in (1, 2):
            img = tiny_image(n)
            await b.send("image", img, image=image_digest(img))
            await b.expect("image_ok")
        img = tiny_image(3)
        await b.send("image", img, image=image_digest(img))
        e = await b.expect("error")
        assert e["code"] == "limit" and "at most 3" in e["message"]
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        done = await b.expect("done")
        # the image of a result not acknowledged yet stays; the others go
        assert m.collect_images() == 2
        await b.send("ack", task=done["task"])
        await b.sync()
        assert m.collect_images() == 1
        m.commit_now()
        assert lm.admin.image_usage(lm.admin.account("buyer").id) == (0, 0)
        await b.send("image", img, image=image_digest(img))  # room again
        await b.expect("image_ok")
        await s.stop()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_results_never_acknowledged_are_dropped_after_their_ttl(lm):
    """A result no one acks (its buyer process is gone) stops counting
    against the account's cap once RESULT_TTL has passed: dropped, logged,
    and the ledger untouched."""
    async def main():
        m = await lm.start(result_ttl=0.0, max_open_tasks=1)
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        b, d = await buyer(lm)
        await b.send("submit", b"x", ref="r1", image=d)
        await b.expect("accepted")
        await b.expect("done")  # never acked
        await b.send("submit", b"y", ref="r2", image=d)
        assert (await b.expect("failed"))["code"] == "limit"
        assert m.collect() == (1, 0)
        await b.send("submit", b"y", ref="r3", image=d)
        await b.expect("accepted")
        assert (await b.expect("done")).payload == b"y"
        await s.stop()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_a_kvm_buy_order_sends_isos_in_chunks_and_opens_leases_only(lm):
    """A buy order of model kvm: an image sent whole, and a task submitted,
    are refused naming why; nothing moves."""
    from test_market_peers import Peer, image_digest, tiny_image

    async def main():
        await lm.start()
        o = lm.buy("buyer", BID, model="kvm")
        assert o.model == "kvm"
        b = await Peer.open(o, "buyer")
        img = tiny_image()
        await b.send("image", img, image=image_digest(img))
        e = await b.expect("error")
        assert e["code"] == "image" and "are offered (image_offer) and sent in chunks" \
            in e["message"], e
        await b.send("submit", b"x", ref="r", image=image_digest(img))
        f = await b.expect("failed")
        assert f["code"] == "order" and "opens leases" in f["message"] and f["task"] is None
        await b.close()
        await lm.stop()
    run(main())
    assert lm.balance("buyer") == COINS
    assert lm.admin.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 0
    assert_ledger_ok(lm)


def test_tasks_carry_their_model_to_the_seller_and_the_store(lm):
    async def main():
        await lm.start()
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        b, d = await buyer(lm)
        await b.send("submit", b"x", ref="r", image=d)
        await b.expect("accepted")
        await b.expect("done")
        assert s.tasks[0]["model"] == "seccomp"
        await s.stop()
        await lm.stop()
    run(main())
    assert lm.admin.db.execute("SELECT model FROM tasks").fetchall() == [("seccomp",)]


def test_an_ack_for_another_buy_orders_task_changes_nothing(lm):
    """Mallory acks alice's task id: ignored; alice's result stays in the store
    and comes again when she reconnects."""
    from test_market_peers import Peer, image_digest, tiny_image

    async def main():
        await lm.start()
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        o = lm.buy("buyer", BID)
        b = await Peer.open(o, "buyer")
        img = tiny_image()
        await b.send("image", img, image=image_digest(img))
        await b.expect("image_ok")
        await b.send("submit", b"x", ref="r", image=image_digest(img))
        await b.expect("accepted")
        done = await b.expect("done")
        await b.close()
        lm.account("mallory", COINS)
        mal, _ = await buyer(lm, account="mallory")
        await mal.send("ack", task=done["task"])
        assert await mal.sync() == []
        b = await Peer.open(o, "buyer")
        again = await b.expect("done")
        assert again["task"] == done["task"] and again.payload == done.payload
        await b.close()
        await mal.close()
        await s.stop()
        await lm.stop()
    run(main())
    assert lm.admin.db.execute("SELECT delivered FROM tasks").fetchall() == [(0,)]
    assert_ledger_ok(lm)
