"""A result's output in `output` frames: seller -> market ahead of `result`, and
market -> buyer ahead of `done` (cut through, redundancy 1), over real TLS."""

from __future__ import annotations

import asyncio
import os

import pytest

from cpushare import protocol
from cpushare.buyer import Market as BuyerMarket
from cpushare.protocol import cost_milli

from test_market import BID, COINS, assert_ledger_ok, buyer, run
from test_market_peers import LoopbackMarket, Peer, ScriptedSeller, tiny_image, image_digest

MIB = 1 << 20


@pytest.fixture
def lm(tmp_path, market_db):
    m = LoopbackMarket(tmp_path, market_db)
    m.account("buyer", COINS)
    for name in ("alice", "bob", "carol"):
        m.account(name)
    yield m
    m.close()


async def streaming_buyer(lm, o=None):
    """A buyer connection that takes `output` frames (as the SDK does)."""
    o = o or lm.buy("buyer", BID)
    b = await Peer.open(o, "buyer", hello=False)
    await b.send("hello", version=protocol.VERSION, role="buyer", software="test-peer",
                 output_frames=True)
    b.welcome = await b.expect("welcome")
    assert b.welcome["max_payload"] > 0
    return b, o


async def upload(b):
    img = tiny_image()
    d = image_digest(img)
    await b.send("image", img, image=d)
    await b.expect("image_ok")
    return d


async def stream_result(seller: Peer, task, out: bytes, chunk: int = MIB, *,
                        sha: str | None = None) -> None:
    """Send `out` as `output` frames of `chunk` bytes and a `result` with the rest."""
    cut = len(out) - len(out) % chunk
    for i in range(0, cut, chunk):
        await seller.send("output", out[i:i + chunk], attempt=task["attempt"])
    await seller.send("result", out[cut:], attempt=task["attempt"], exit_status=0, signal=None,
                      reason="", cpu_ms=1000, output_sha256=sha or protocol.digest(out))


async def streaming_seller(lm, account, price):
    s = await Peer.open(lm.sell(account, price, output=4 * MIB), "seller")
    assert s.welcome["output_chunks"] >= MIB
    await s.send("ready")
    return s


async def take(s: Peer):
    """The next task; the image when asked for (ScriptedSeller does the same)."""
    task = await s.expect("task")
    await s.send("need_image", image=task["image"])
    await s.expect("image")
    return task


def test_output_frames_are_cut_through_to_the_buyer_and_done_carries_the_rest(lm):
    data = os.urandom(3 * MIB + 12345)

    async def main():
        await lm.start()
        s = await streaming_seller(lm, "alice", 36_000)
        b, _ = await streaming_buyer(lm)
        d = await upload(b)
        await b.send("submit", b"in", ref="r", image=d)
        await b.expect("accepted")
        task = await take(s)
        await stream_result(s, task, data)
        got = bytearray()
        for i in range(3):
            m = await b.expect("output")
            assert (m["ref"], m["offset"]) == ("r", i * MIB)
            got += m.payload
        done = await b.expect("done")
        assert done["streamed"] == 3 * MIB
        assert bytes(got) + done.payload == data
        assert (await s.expect("settled"))["accepted"] is True
        await s.close()
        await b.close()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_chunked_output_over_the_limit_is_refused_and_only_that_attempt_is_lost(lm):
    """The order's output limit is 4 MiB: the fifth MiB closes that seller's
    connection; its task goes to another seller and is paid once; a task of
    another seller running beside it is untouched."""
    async def main():
        await lm.start()
        over = await streaming_seller(lm, "alice", 1)
        b, _ = await streaming_buyer(lm)
        d = await upload(b)
        await b.send("submit", b"one", ref="one", image=d)
        await b.expect("accepted")
        task = await take(over)
        other = await ScriptedSeller.connect(lm.sell("carol", 36_000))
        await b.send("submit", b"two", ref="two", image=d)
        await b.expect("accepted")
        for i in range(5):
            try:
                await over.send("output", bytes(MIB), attempt=task["attempt"])
            except (ConnectionError, OSError):
                break
        err = await over.recv()
        assert err is not None and err.type == "error" and err["code"] == "task"
        assert "over the limit" in err["message"]
        s = await ScriptedSeller.connect(lm.sell("bob", 36_000))
        got = {}
        while len(got) < 2:
            m = await b.recv()
            assert m is not None
            if m.type == "done":
                got[m["ref"]] = m
        assert got["one"].payload == b"eno" and got["one"]["attempts"] == 2
        assert got["two"].payload == b"owt" and got["two"]["attempts"] == 1
        assert "streamed" not in got["one"].fields
        await s.stop()
        await other.stop()
        await b.close()
        await lm.stop()
    run(main())
    got = lm.balances("buyer", "alice", "bob", "carol")
    assert got["buyer"] == COINS - 20 and got["alice"] == 0  # (bob or carol ran `one`)
    assert got["bob"] + got["carol"] == 20
    assert_ledger_ok(lm)


def test_a_seller_gone_mid_stream_requeues_and_the_sdk_buyer_gets_one_whole_output(lm):
    """The first seller streams 2 MiB to the buyer and vanishes; the second
    streams the whole output again from offset 0: the SDK's result is that
    output, whole and once."""
    data = os.urandom(3 * MIB + 7)

    async def main():
        await lm.start()
        quitter = await streaming_seller(lm, "alice", 1)
        o = lm.buy("buyer", BID)
        async with BuyerMarket(o) as m:
            results = []

            async def collect():
                async for r in m.map(tiny_image(), [b"in"]):
                    results.append(r)
            job = asyncio.create_task(collect())
            task = await take(quitter)
            for i in range(2):
                await quitter.send("output", data[i * MIB:(i + 1) * MIB],
                                   attempt=task["attempt"])
            await quitter.sync()  # the market has them (and forwarded them)
            await quitter.close()
            s = await streaming_seller(lm, "bob", 36_000)
            task2 = await take(s)
            assert task2["task"] == task["task"] and task2["attempt"] != task["attempt"]
            await stream_result(s, task2, data)
            await asyncio.wait_for(job, 30)
            assert (await s.expect("settled"))["accepted"] is True
            await s.close()
        assert len(results) == 1
        r = results[0]
        assert r.ok and r.output == data and r.attempts == 2
        assert r.cost_milli == cost_milli(1000, 36_000)
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice", "bob") == {"buyer": COINS - 10, "alice": 0, "bob": 10}
    assert_ledger_ok(lm)


def test_a_buyer_gone_mid_stream_gets_the_whole_result_on_reconnect(lm):
    data = os.urandom(2 * MIB + 99)

    async def main():
        await lm.start()
        s = await streaming_seller(lm, "alice", 36_000)
        b, o = await streaming_buyer(lm)
        d = await upload(b)
        await b.send("submit", b"in", ref="r", image=d)
        await b.expect("accepted")
        task = await take(s)
        await s.send("output", data[:MIB], attempt=task["attempt"])
        m = await b.expect("output")
        assert m["offset"] == 0 and m.payload == data[:MIB]
        await b.close()  # gone in the middle of the output
        await s.send("result", data[MIB:], attempt=task["attempt"], exit_status=0,
                     signal=None, reason="", cpu_ms=1000, output_sha256=protocol.digest(data))
        assert (await s.expect("settled"))["accepted"] is True
        b, _ = await streaming_buyer(lm, o)
        done = await b.expect("done")
        assert "streamed" not in done.fields and done.payload == data
        assert await b.sync() == []
        await s.close()
        await b.close()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_streamed_outputs_are_compared_by_digest_under_redundancy_2(lm):
    """Three sellers stream their outputs; one differs in its last byte: it is
    not paid, the two that agree are, and the buyer gets nothing ahead of the
    agreement (no `output` frames), then the whole output in `done`."""
    data = os.urandom(2 * MIB + 5)
    lie = data[:-1] + bytes([data[-1] ^ 1])

    async def main():
        await lm.start()
        a = await streaming_seller(lm, "alice", 36_000)
        liar = await streaming_seller(lm, "bob", 36_001)
        b, _ = await streaming_buyer(lm, lm.buy("buyer", BID, redundancy=2))
        d = await upload(b)
        await b.send("submit", b"in", ref="r", image=d)
        await b.expect("accepted")
        ta, tl = await take(a), await take(liar)
        await stream_result(liar, tl, lie)
        await stream_result(a, ta, data)
        c = await streaming_seller(lm, "carol", 36_002)
        await stream_result(c, await take(c), data)
        done = await b.expect("done")
        assert "streamed" not in done.fields and done.payload == data
        assert done["attempts"] == 3
        for x, ok in ((a, True), (liar, False), (c, True)):
            assert (await x.expect("settled"))["accepted"] is ok
            await x.close()
        await b.close()
        await lm.stop()
        return done["task"]
    task = run(main())
    assert lm.balance("bob") == 0
    assert lm.balance("alice") == 10 and lm.balance("carol") == 10  # (36_002: 10.0005)
    disputes = lm.admin.disputes(task)
    assert [(x[2], x[3]) for x in disputes] == [("bob", protocol.digest(lie))]
    assert_ledger_ok(lm)


def test_an_output_frame_whose_digest_does_not_match_loses_only_that_attempt(lm):
    """Under redundancy 2 (where results are compared by digest) a seller whose
    output_sha256 is not that of its `output` frames loses that attempt; two
    honest sellers then agree.  (Under redundancy 1 nothing is compared, and
    the market does not hash the output.)"""
    data = os.urandom(MIB + 1)

    async def main():
        await lm.start()
        bad = await streaming_seller(lm, "alice", 1)
        b, _ = await streaming_buyer(lm, lm.buy("buyer", BID, redundancy=2))
        d = await upload(b)
        await b.send("submit", b"in", ref="r", image=d)
        await b.expect("accepted")
        await stream_result(bad, await take(bad), data, sha=protocol.digest(b"other"))
        err = await bad.recv()
        assert err is not None and err.type == "error" and "output_sha256" in err["message"]
        for name in ("bob", "carol"):
            s = await streaming_seller(lm, name, 36_000)
            await stream_result(s, await take(s), data)
            await s.close()
        m = await b.expect("done")
        assert m.payload == data and m["attempts"] == 3 and "streamed" not in m.fields
        await b.close()
        await lm.stop()
    run(main())
    assert lm.balances("buyer", "alice", "bob", "carol") == {
        "buyer": COINS - 20, "alice": 0, "bob": 10, "carol": 10}
    assert_ledger_ok(lm)
