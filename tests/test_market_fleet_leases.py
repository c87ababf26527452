"""A lease follows its buyer across the processes of one market
(market/links.py): real `serve` processes on one PostgreSQL database, a
scripted kvm seller and buyer over real TLS.

The lease runs on a seller of process A.  Its buyer moves to process B:
the lease's state, its console and its end reach the buyer there, and the
buyer's input and `close` reach the seller, over the link between the
processes.  Then the processes are killed with -9: the buyer's process
(the lease tells the buyer wherever it comes back), and the holder (its
seller comes back to the survivor, which finds the buyer and tells it).
`ledger check` holds after each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import psycopg

from cpushare import protocol
from cpushare.order import split_hostport

from test_market import COINS
from test_market_fleet import Proc
from test_market_leases import ASK, BID, fake_iso, fetch_image, until, upload
from test_market_peers import LoopbackMarket, Peer, free_port


def _setup(tmp_path, pg_cluster, processes: int = 2):
    lm = LoopbackMarket(tmp_path, pg_cluster.database())
    lm.account("buyer", COINS)
    lm.account("alice")
    buy = lm.buy("buyer", BID, model="kvm", memory=512 << 20, max_cpu_seconds=3600)
    sell = lm.sell("alice", ASK, model="kvm", memory=1 << 30)
    lm.close()
    log = open(tmp_path / "server.log", "ab")
    return lm, buy, sell, log, [Proc(lm, free_port(), log) for _ in range(processes)]


def _serve(procs, log, main):
    """Run `main()` with the processes started, then stopped (and the log closed)."""
    async def run():
        for p in procs:
            p.start()
        try:
            return await main()
        finally:
            for p in procs:
                p.stop()
    try:
        return asyncio.run(run())
    finally:
        log.close()


def at(o, proc: Proc):
    return dataclasses.replace(o, port=proc.port)


async def _buyer(buy, proc: Proc) -> Peer:
    b = await Peer.open(at(buy, proc), "buyer")
    assert b.welcome.type == "welcome", b.welcome
    return b


async def _seller(sell, proc: Proc, **hello) -> Peer:
    s = await Peer.open(at(sell, proc), "seller", accel="tcg", cache=1 << 30, **hello)
    assert s.welcome.type == "welcome", s.welcome
    return s


async def _lease_on(buy, sell, proc: Proc):
    """A lease opened through `proc` on a seller of `proc`, booted and
    metered: (buyer, seller, session, attempt)."""
    b = await _buyer(buy, proc)
    iso = fake_iso()
    d, _ = await upload(b, iso)
    s = await _seller(sell, proc)
    await s.send("ready")
    await b.send("open", ref="node-1", image=d)
    sid = (await b.expect("opened"))["session"]
    task = await s.expect("task")
    await fetch_image(s, d)
    await s.send("meter", attempt=task["attempt"], cpu_ms=1000, state="running")
    await s.send("stream", b"login:\n", session=sid)
    assert (await until(b, "stream", session=sid)).payload == b"login:\n"
    return b, s, sid, task["attempt"]


async def _end(b: Peer, s: Peer, sid: int, aid: int, cpu_ms: int) -> protocol.Message:
    """The buyer closes the lease; the seller powers off and reports: `closed`."""
    await b.send("close", session=sid)
    await until(s, "stop", attempt=aid)
    await s.send("result", attempt=aid, exit_status=0, signal=None, reason="", cpu_ms=cpu_ms,
                 output_sha256=protocol.digest(b""))
    closed = await until(b, "closed", session=sid)
    await until(s, "settled", attempt=aid)
    return closed


def _check(lm) -> tuple[int, int]:
    """`ledger check` holds; (what the buyer spent, what alice earned)."""
    store = lm.open_store()
    try:
        assert store.check() == []
        buyer, alice = (store.account(n).balance_milli for n in ("buyer", "alice"))
    finally:
        store.close()
    return COINS - buyer, alice


def test_a_lease_follows_its_buyer_to_another_process_and_back(tmp_path, pg_cluster):
    lm, buy, sell, log, (a, b_proc) = _setup(tmp_path, pg_cluster)

    async def main():
        b1, s, sid, aid = await _lease_on(buy, sell, a)
        b1.writer.transport.abort()
        b2 = await _buyer(buy, b_proc)  # the lease is held by A, its buyer is on B
        back = await until(b2, "lease", session=sid)
        assert (back["ref"], back["state"], back["seller"]) == ("node-1", "running",
                                                                "alice")
        await s.send("stream", b"more\n", session=sid)
        assert (await until(b2, "stream", session=sid)).payload == b"more\n"
        await b2.send("stream", b"root\n", session=sid)
        assert (await until(s, "stream", session=sid)).payload == b"root\n"
        await s.send("meter", attempt=aid, cpu_ms=5000, state="running")
        paid = await until(b2, "lease", session=sid, cpu_ms=5000)
        assert paid["cost_milli"] == protocol.cost_milli(5000, ASK)
        # ... and back to A: the lease tells that connection, and B no more
        await b2.close()
        b3 = await _buyer(buy, a)
        assert (await until(b3, "lease", session=sid))["state"] == "running"
        await s.send("stream", b"again\n", session=sid)
        assert (await until(b3, "stream", session=sid)).payload == b"again\n"
        # to B once more (A's connection stays), and when it leaves, back to
        # the connection on A, which closes it
        b4 = await _buyer(buy, b_proc)
        await until(b4, "lease", session=sid)
        await s.send("stream", b"to b4\n", session=sid)
        assert (await until(b4, "stream", session=sid)).payload == b"to b4\n"
        await b4.close()
        assert (await until(b3, "lease", session=sid))["state"] == "running"
        closed = await _end(b3, s, sid, aid, 6000)
        assert closed["cpu_ms"] == 6000, closed
        for p in (b3, s):
            await p.close()
    _serve((a, b_proc), log, main)
    spent, earned = _check(lm)
    assert spent == earned == protocol.cost_milli(6000, ASK)


def test_a_stream_to_a_buyer_on_another_process_is_paced_by_that_buyer(tmp_path, pg_cluster):
    """The buyer on B does not read: A stops reading the seller (its frames
    wait in the seller's socket), rather than hold what the seller sends."""
    lm, buy, sell, log, (a, b_proc) = _setup(tmp_path, pg_cluster)
    chunk = b"x" * (256 << 10)

    async def main():
        b1, s, sid, aid = await _lease_on(buy, sell, a)
        await b1.close()
        b2 = await _buyer(buy, b_proc)
        await until(b2, "lease", session=sid)
        sent = 0

        async def flood():
            nonlocal sent
            while True:
                await s.send("stream", chunk, session=sid)
                sent += len(chunk)
        flooding = asyncio.ensure_future(flood())
        await asyncio.sleep(3)  # (b2 reads nothing meanwhile)
        stalled = sent
        await asyncio.sleep(1)
        assert sent == stalled, "the seller was read on while its buyer did not read"
        # the budgets of the two processes and the sockets between, not all of it
        assert sent < 64 << 20, sent
        got = 0
        while got < stalled:
            m = await until(b2, "stream", session=sid)
            got += len(m.payload)
        flooding.cancel()
        assert got >= stalled
    _serve((a, b_proc), log, main)
    _check(lm)


def test_kill9_of_the_buyers_process_and_of_the_leases_holder(tmp_path, pg_cluster):
    lm, buy, sell, log, (a, b_proc) = _setup(tmp_path, pg_cluster)

    async def main():
        b1, s, sid, aid = await _lease_on(buy, sell, a)
        await b1.close()
        b2 = await _buyer(buy, b_proc)
        await until(b2, "lease", session=sid)
        b_proc.kill()  # the buyer's process: it comes back on A, where the lease is
        b3 = await _buyer(buy, a)
        assert (await until(b3, "lease", session=sid))["state"] == "running"
        await s.send("meter", attempt=aid, cpu_ms=2000, state="running")
        await until(b3, "lease", session=sid, cpu_ms=2000)
        b_proc.start()
        await b3.close()
        b4 = await _buyer(buy, b_proc)
        await until(b4, "lease", session=sid)
        a.kill()  # the lease's holder: B takes it over, its seller comes back to B
        await s.close()
        s2 = await _seller(sell, b_proc, lease_attempt=aid, lease_cpu_ms=3000)
        back = await until(b4, "lease", session=sid, cpu_ms=3000)
        assert back["state"] == "running", back
        closed = await _end(b4, s2, sid, aid, 3500)
        assert closed["cpu_ms"] == 3500, closed
        await b4.close()
        await s2.close()
    _serve((a, b_proc), log, main)
    spent, earned = _check(lm)
    assert spent == earned == protocol.cost_milli(3500, ASK)


async def _forge(address: str, ctx: ssl.SSLContext, buy_order: int) -> str:
    """Connect to a link's address with `ctx` and send what a holder would: how
    it ended."""
    host, port = split_hostport(address)
    try:
        r, w = await asyncio.open_connection(host, port, ssl=ctx)
        await protocol.send(w, "peer", server=1)
        forged = protocol.encode("lease", session=1, state="ending", cpu_ms=0, cost_milli=0,
                                 message="forged")
        await protocol.send(w, "to_buyer", forged, order=buy_order)
        m = await asyncio.wait_for(protocol.read_message(r), 10)
    except (ssl.SSLError, ConnectionError, protocol.ProtocolError) as e:
        return f"refused: {e!r}"
    return "closed" if m is None else f"answered {m.type}"


def test_a_link_from_anything_but_a_market_process_is_refused(tmp_path, pg_cluster):
    """A buyer's certificate, or none, at a process's link address: refused, and
    nothing reaches the buyer there; the lease goes on being served."""
    lm, buy, sell, log, (a, b_proc) = _setup(tmp_path, pg_cluster)

    async def main():
        b1, s, sid, aid = await _lease_on(buy, sell, a)
        with psycopg.connect(lm.db) as c:
            links = [r[0] for r in c.execute("SELECT link FROM servers ORDER BY id")]
        assert len(links) == 2 and all(links), links
        b2 = await _buyer(buy, b_proc)  # (B has the buyer now: forged frames would reach it)
        await until(b2, "lease", session=sid)
        as_buyer = protocol.client_context(buy.ca_pem, buy.cert_pem, buy.key_pem)
        as_buyer.check_hostname = False
        anonymous = ssl.create_default_context(cadata=buy.ca_pem)
        anonymous.check_hostname = False
        await b2.sync()  # (what came before the forgeries)
        for address in links:
            for ctx in (as_buyer, anonymous):
                how = await _forge(address, ctx, b1.welcome["order"])
                assert how.startswith(("closed", "refused")), how
        await s.send("stream", b"still here\n", session=sid)
        await asyncio.sleep(0.3)
        got = await b2.sync()  # (everything b2 was sent since)
        assert not [x for x in got if x.get("message") == "forged"], got
        assert [x.payload for x in got if x.type == "stream"] == [b"still here\n"], got
        closed = await _end(b2, s, sid, aid, 2000)
        assert closed["cpu_ms"] == 2000
        for p in (b1, b2, s):
            await p.close()
    _serve((a, b_proc), log, main)
    log_text = (tmp_path / "server.log").read_text()
    assert "refused a link from" in log_text and "Traceback" not in log_text
    spent, earned = _check(lm)
    assert spent == earned == protocol.cost_milli(2000, ASK)


def test_input_for_a_lease_no_seller_runs_yet_is_paced_across_processes(tmp_path, pg_cluster):
    """The lease waits for a seller on A; its buyer, on B, types 48 MiB into
    it: the processes hold at most their budgets of it (the buyer is not read
    on), and once a seller takes the lease the input flows to it."""
    lm, buy, sell, log, (a, b_proc) = _setup(tmp_path, pg_cluster)
    chunk = b"y" * (256 << 10)
    total = 192 * len(chunk)  # 48 MiB: more than the budgets and every socket between

    async def main():
        b1 = await _buyer(buy, a)
        d, _ = await upload(b1, fake_iso())
        await b1.send("open", ref="node-1", image=d)
        sid = (await b1.expect("opened"))["session"]
        await until(b1, "lease", session=sid, state="waiting")
        await b1.close()
        b2 = await _buyer(buy, b_proc)
        await until(b2, "lease", session=sid)

        async def typing():
            for _ in range(total // len(chunk)):
                await b2.send("stream", chunk, session=sid)
        typed = asyncio.ensure_future(typing())
        await asyncio.sleep(3)
        assert not typed.done(), "48 MiB of input were read with no seller to take it"
        s = await _seller(sell, a)
        await s.send("ready")
        got, task = 0, None
        while got < total or task is None:  # (what waited comes with the task)
            m = await s.recv()
            assert m is not None, "the seller's connection closed"
            if m.type == "task":
                task = m
            elif m.type == "stream":
                assert m["session"] == sid
                got += len(m.payload)
        await asyncio.wait_for(typed, 30)
        assert got == total
        closed = await _end(b2, s, sid, task["attempt"], 1000)
        assert closed["cpu_ms"] == 1000
        for p in (b2, s):
            await p.close()
    _serve((a, b_proc), log, main)
    _check(lm)


def _holder(lm, sid: int) -> int:
    """The pid of the process holding lease `sid` (after a takeover: its taker)."""
    with psycopg.connect(lm.db, autocommit=True) as c:
        row = c.execute("SELECT s.pid FROM tasks t JOIN servers s ON s.id = t.owner "
                        "WHERE t.id = %s", (sid,)).fetchone()
    return row[0] if row else 0


def test_kill9_of_the_holder_of_three_the_seller_back_on_the_other_survivor(tmp_path,
                                                                             pg_cluster):
    """Three processes; the lease is held by A, its buyer is on B.  A is killed
    and one survivor takes the lease over; its seller comes back to the other
    one, which asks the taker for the lease over a link: it runs on, paid, and
    its buyer hears it."""
    lm, buy, sell, log, procs = _setup(tmp_path, pg_cluster, processes=3)
    a = procs[0]

    async def main():
        b1, s, sid, aid = await _lease_on(buy, sell, a)
        await b1.close()
        buyer_on = procs[1]
        b2 = await _buyer(buy, buyer_on)
        await until(b2, "lease", session=sid)
        a.kill()
        deadline = asyncio.get_running_loop().time() + 20
        while _holder(lm, sid) in (0, a.p.pid):  # (until a survivor took it over)
            assert asyncio.get_running_loop().time() < deadline, "no takeover"
            await asyncio.sleep(0.1)
        taker = _holder(lm, sid)
        other = next(p for p in procs[1:] if p.p.pid != taker)
        await s.close()
        s2 = await _seller(sell, other, lease_attempt=aid, lease_cpu_ms=4000)
        back = await until(b2, "lease", session=sid, cpu_ms=4000)
        assert back["state"] == "running", back
        assert _holder(lm, sid) == other.p.pid
        closed = await _end(b2, s2, sid, aid, 4500)
        assert closed["cpu_ms"] == 4500, closed
        await b2.close()
        await s2.close()
    _serve(procs, log, main)
    spent, earned = _check(lm)
    assert spent == earned == protocol.cost_milli(4500, ASK)
