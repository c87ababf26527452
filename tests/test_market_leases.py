"""Leases of the kvm model in the market, over real TLS with scripted peers:
ISOs in chunks (resumable, sent once per seller), matching by memory,
cache and accelerator, paying as the guest runs, and every way a lease ends.
The seller is scripted here (its qemu side is tested in test_kvm_e2e.py)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from cpushare import protocol
from cpushare.market.leases import LEASE_AHEAD_MS
from cpushare.protocol import MS_PER_HOUR, cost_milli

from test_market import COINS, assert_ledger_ok, run
from test_market_peers import LoopbackMarket, Peer

ASK, BID = 36_000, 72_000  # milli per CPU-hour: 10 and 20 milli a CPU-second


def fake_iso(n: int = 3 << 20, seed: bytes = b"") -> bytes:
    """A bootable ISO 9660 file as far as the model checks (never booted here)."""
    def d(kind, body=b""):
        return (bytes([kind]) + b"CD001\x01" + body).ljust(2048, b"\0")
    head = b"\0" * 16 * 2048 + d(1) + d(0, b"EL TORITO SPECIFICATION") + d(255)
    return head + hashlib.sha256(seed).digest() * ((n - len(head)) // 32)


@pytest.fixture
def lm(tmp_path, market_db):
    m = LoopbackMarket(tmp_path, market_db)
    m.account("buyer", COINS)
    for name in ("alice", "bob"):
        m.account(name)
    yield m
    m.close()


async def kvm_buyer(lm, **kw):
    kw.setdefault("memory", 512 << 20)
    o = lm.buy("buyer", BID, model="kvm", max_cpu_seconds=kw.pop("max_cpu_seconds", 3600), **kw)
    return await Peer.open(o, "buyer")


async def kvm_seller(lm, account="alice", accel="tcg", cache=1 << 30, memory=1 << 30):
    o = lm.sell(account, ASK, model="kvm", memory=memory)
    s = await Peer.open(o, "seller", accel=accel, cache=cache)
    assert s.welcome.type == "welcome", s.welcome
    await s.send("ready")
    return s


async def upload(b: Peer, iso: bytes, chunk: int = 1 << 20, stop_after: int | None = None):
    d = protocol.digest(iso)
    await b.send("image_offer", image=d, size=len(iso))
    m = await b.recv()
    if m.type == "image_ok":
        return d, 0
    assert m.type == "image_want", m
    off, sent = m["offset"], 0
    while off < len(iso):
        if stop_after is not None and sent >= stop_after:
            return d, sent
        piece = iso[off:off + chunk]
        await b.send("image", piece, image=d, offset=off, size=len(iso))
        off += len(piece)
        sent += len(piece)
    ok = await b.expect("image_ok")
    assert ok["image"] == d
    return d, sent


async def fetch_image(s: Peer, d: str, have: bytes = b"") -> bytes:
    """As a seller: ask for image `d` from len(have), collect the chunks."""
    await s.send("need_image", image=d, offset=len(have))
    got = bytearray(have)
    while True:
        m = await s.recv()
        assert m is not None and m.type == "image", m
        assert m["offset"] == len(got)
        got += m.payload
        if len(got) == m["size"]:
            return bytes(got)


async def until(peer: Peer, type_: str, **match):
    """Messages until one of `type_` whose fields match; it is returned."""
    while True:
        m = await peer.recv()
        assert m is not None, f"closed while waiting for {type_} {match}"
        if m.type == type_ and all(m.get(k) == v for k, v in match.items()):
            return m


async def leased(lm, b: Peer, iso: bytes, ref: str = "n"):
    """Upload `iso`, connect a kvm seller, open a lease on it: the seller has
    its task and its image.  (seller, session, task)."""
    d, _ = await upload(b, iso)
    s = await kvm_seller(lm)
    await b.send("open", ref=ref, image=d)
    sid = (await b.expect("opened"))["session"]
    task = await s.expect("task")
    await fetch_image(s, d)
    return s, sid, task


def test_an_iso_goes_in_chunks_resumes_after_a_lost_connection_and_is_checked(lm):
    iso = fake_iso()

    async def main():
        await lm.start()
        b = await kvm_buyer(lm)
        d, sent = await upload(b, iso, stop_after=1 << 20)
        assert sent == 1 << 20
        b.writer.close()  # lost mid-upload
        b = await kvm_buyer(lm)
        await b.send("image_offer", image=d, size=len(iso))
        want = await b.expect("image_want")
        assert want["offset"] == 1 << 20  # what the first connection sent is kept
        # a chunk at another offset is answered with the offset the market holds
        await b.send("image", iso[:1000], image=d, offset=0, size=len(iso))
        assert (await b.expect("image_want"))["offset"] == 1 << 20
        _, sent = await upload(b, iso)
        assert sent == len(iso) - (1 << 20)
        _, again = await upload(b, iso)
        assert again == 0  # held: no byte is sent twice
        # a lie about the digest, and a file that is not ISO 9660
        bad = fake_iso(seed=b"other")
        await b.send("image_offer", image="0" * 64, size=len(bad))
        await b.expect("image_want")
        await b.send("image", bad, image="0" * 64, offset=0, size=len(bad))
        e = await b.expect("error")
        assert e["code"] == "image" and "have digest" in e["message"]
        junk = b"\0" * 50_000
        dj = protocol.digest(junk)
        await b.send("image_offer", image=dj, size=len(junk))
        await b.expect("image_want")
        await b.send("image", junk, image=dj, offset=0, size=len(junk))
        e = await b.expect("error")
        assert e["code"] == "image" and "not an ISO 9660 image" in e["message"], e
        await b.close()
        await lm.stop()
    run(main())
    from cpushare.market.imagefiles import ImageFiles
    files = ImageFiles(lm.admin.image_dir)
    assert files.path(protocol.digest(iso)).read_bytes() == iso
    assert not files.has("0" * 64) and not files.has(protocol.digest(b"\0" * 50_000))
    assert_ledger_ok(lm)


def test_a_lease_is_paid_as_it_runs_and_settled_once_when_closed(lm):
    iso = fake_iso()

    async def main():
        await lm.start()
        b = await kvm_buyer(lm)
        d, _ = await upload(b, iso)
        s = await kvm_seller(lm)
        await b.send("open", ref="node-1", image=d)
        sid = (await b.expect("opened"))["session"]
        task = await s.expect("task")
        assert (task["model"], task["session"], task["memory"]) == ("kvm", sid, 512 << 20)
        got = await fetch_image(s, d, have=iso[:12345])  # it held a part already
        assert got == iso
        assert (await until(b, "lease", state="image"))["seller"] == "alice"
        aid = task["attempt"]
        escrow0 = cost_milli(LEASE_AHEAD_MS, BID)
        assert lm.market.tasks[sid].escrow_milli == escrow0
        await s.send("meter", attempt=aid, cpu_ms=0, state="booting")
        await until(b, "lease", state="booting")
        await s.send("stream", b"CPUSHARE-GUEST-READY\n", session=sid)
        await until(b, "lease", state="running")
        assert (await until(b, "stream", session=sid)).payload.startswith(b"CPUSHARE")
        await b.send("stream", b"echo hi\n", session=sid)  # console input reaches the seller
        assert (await until(s, "stream", session=sid)).payload == b"echo hi\n"
        await s.send("meter", attempt=aid, cpu_ms=30_000, state="running")
        m = await until(b, "lease", cpu_ms=30_000)
        assert m["cost_milli"] == 30_000 * ASK // MS_PER_HOUR == 300
        assert lm.balance("alice") == 300
        # a report that goes back counts as the last one
        await s.send("meter", attempt=aid, cpu_ms=10_000, state="running")
        await b.send("close", session=sid)
        assert (await until(b, "lease", state="ending"))["message"] == "closed by the buyer"
        await until(s, "stop", attempt=aid)
        await s.send("result", attempt=aid, exit_status=0, signal=None, reason="",
                     cpu_ms=45_500, output_sha256=protocol.digest(b""))
        closed = await until(b, "closed", session=sid)
        assert closed["cost_milli"] == 455 and closed["cpu_ms"] == 45_500
        settled = await until(s, "settled", attempt=aid)
        assert settled["paid_milli"] == 455 and settled["accepted"]
        assert lm.market.image_bytes_sent == len(iso) - 12345
        await b.close()
        await s.close()
        await lm.stop()
    run(main())
    assert lm.balance("alice") == 455
    assert lm.balance("buyer") == COINS - 455
    assert_ledger_ok(lm)


def test_leases_wait_for_a_seller_that_fits_and_say_why(lm):
    iso = fake_iso()

    async def main():
        await lm.start()
        small = await kvm_seller(lm, "bob", memory=256 << 20, cache=1 << 30)
        tiny_cache = await kvm_seller(lm, "bob", cache=1 << 20)
        b = await kvm_buyer(lm, accel="kvm")
        d, _ = await upload(b, iso)
        await b.send("open", ref="n", image=d)
        sid = (await b.expect("opened"))["session"]
        w = await until(b, "lease", state="waiting")
        assert "512 MiB of memory" in w["message"] and "cache of" in w["message"]
        assert "working KVM" in w["message"], w["message"]
        tcg = await kvm_seller(lm, "alice", accel="tcg")
        kvm = await kvm_seller(lm, "alice", accel="kvm")
        task = await kvm.expect("task")  # the only one that fits
        assert task["session"] == sid
        for other in (small, tiny_cache, tcg):
            assert not [m for m in await other.sync() if m.type == "task"]
        await b.send("close", session=sid)
        await until(kvm, "stop")
        await kvm.send("result", attempt=task["attempt"], exit_status=0, signal=None,
                       reason="", cpu_ms=0, output_sha256=protocol.digest(b""))
        await until(b, "closed", session=sid)
        for p in (b, small, tiny_cache, tcg, kvm):
            await p.close()
        await lm.stop()
    run(main())
    assert lm.balance("buyer") == COINS
    assert_ledger_ok(lm)


def test_a_lost_seller_ends_its_lease_paid_up_to_its_last_report(lm):
    iso = fake_iso()

    async def main():
        await lm.start()
        b = await kvm_buyer(lm)
        s, sid, task = await leased(lm, b, iso, ref="n")
        await s.send("meter", attempt=task["attempt"], cpu_ms=12_000, state="running")
        await until(b, "lease", cpu_ms=12_000)
        s.writer.transport.abort()  # kill -9 of the seller
        closed = await until(b, "closed", session=sid)
        assert "the seller running the lease was lost" in closed["reason"]
        assert closed["cost_milli"] == 120
        await b.close()
        await lm.stop()
    run(main())
    assert lm.balance("alice") == 120 and lm.balance("buyer") == COINS - 120
    assert_ledger_ok(lm)


def test_a_lease_ends_when_the_buyer_cannot_pay_the_next_interval(lm):
    iso = fake_iso()
    lm.account("poor", cost_milli(LEASE_AHEAD_MS, BID) + 100)

    async def main():
        await lm.start()
        o = lm.buy("poor", BID, model="kvm", memory=512 << 20, max_cpu_seconds=3600)
        b = await Peer.open(o, "buyer")
        s, sid, task = await leased(lm, b, iso, ref="n")
        await s.send("meter", attempt=task["attempt"], cpu_ms=50_000, state="running")
        ending = await until(b, "lease", state="ending")
        assert "the next 60 s of CPU time cost" in ending["message"]
        await until(s, "stop")
        await s.send("result", attempt=task["attempt"], exit_status=0, signal=None, reason="",
                     cpu_ms=55_000, output_sha256=protocol.digest(b""))
        closed = await until(b, "closed", session=sid)
        assert closed["cost_milli"] == 550
        await b.close()
        await s.close()
        await lm.stop()
    run(main())
    assert lm.balance("alice") == 550
    assert lm.balance("poor") == cost_milli(LEASE_AHEAD_MS, BID) + 100 - 550
    assert_ledger_ok(lm)


def test_a_node_silent_past_boot_seconds_ends_as_not_booting(lm):
    iso = fake_iso()

    async def main():
        await lm.start()
        b = await kvm_buyer(lm, boot_seconds=1)
        s, sid, task = await leased(lm, b, iso, ref="n")
        await s.send("meter", attempt=task["attempt"], cpu_ms=100, state="booting")
        ending = await until(b, "lease", state="ending")
        assert "not booting: the node printed nothing on its console within 1 s" \
            == ending["message"]
        await until(s, "stop")
        await s.send("result", attempt=task["attempt"], exit_status=0, signal=None, reason="",
                     cpu_ms=2000, output_sha256=protocol.digest(b""))
        closed = await until(b, "closed", session=sid)
        assert closed["reason"].startswith("not booting")
        await b.close()
        await s.close()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_a_buyer_that_reconnects_takes_its_running_leases_back(lm):
    iso = fake_iso()

    async def main():
        await lm.start()
        o = lm.buy("buyer", BID, model="kvm", memory=512 << 20, max_cpu_seconds=3600)
        b = await Peer.open(o, "buyer")
        s, sid, task = await leased(lm, b, iso, ref="node-7")
        await s.send("meter", attempt=task["attempt"], cpu_ms=1000, state="running")
        await s.send("stream", b"hello\n", session=sid)
        await until(b, "lease", state="running")
        b.writer.transport.abort()
        await asyncio.sleep(0.1)
        b2 = await Peer.open(o, "buyer")
        back = await until(b2, "lease", session=sid)
        assert (back["ref"], back["state"]) == ("node-7", "running")
        await s.send("stream", b"more\n", session=sid)
        assert (await until(b2, "stream", session=sid)).payload == b"more\n"
        await b2.send("close", session=sid)
        await until(s, "stop")
        await s.send("result", attempt=task["attempt"], exit_status=0, signal=None, reason="",
                     cpu_ms=1000, output_sha256=protocol.digest(b""))
        await until(b2, "closed", session=sid)
        await b2.close()
        await s.close()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_a_buyer_cannot_fill_the_markets_disk_with_unfinished_uploads(lm):
    """Uploads in progress count in the account's quota, and at most a few
    run at once per account; an honest buyer uploads meanwhile."""
    from cpushare.market import images

    async def main():
        await lm.start()
        lm.account("mallory", COINS)
        o = lm.buy("mallory", BID, model="kvm", memory=512 << 20)
        evil = await Peer.open(o, "buyer")
        for i in range(images.MAX_UPLOADS_PER_ACCOUNT):
            await evil.send("image_offer", image=f"{i:064x}", size=1 << 30)
            assert (await evil.expect("image_want"))["offset"] == 0
        await evil.send("image_offer", image="f" * 64, size=1 << 30)
        e = await evil.expect("error")
        assert e["code"] == "limit" and "takes 4 at once" in e["message"], e
        honest = await kvm_buyer(lm)
        _, sent = await upload(honest, fake_iso())
        assert sent > 0
        # a quota past its bytes: 64 GiB at most, the unfinished ones included
        await evil.send("image_offer", image="e" * 64, size=images.FILE_QUOTA)
        assert (await evil.expect("error"))["code"] == "limit"
        for p in (evil, honest):
            await p.close()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)


def test_meter_reports_faster_than_the_floor_are_not_paid_each(lm):
    """A seller that floods `meter` costs the market one ledger write per
    METER_MIN_INTERVAL, not one per frame; the lease's pay stays exact."""
    from cpushare.market import leases
    iso = fake_iso()

    async def main():
        await lm.start()
        b = await kvm_buyer(lm)
        s, sid, task = await leased(lm, b, iso, ref="n")
        before = lm.market.store.ledger_summary()["transactions"]
        for i in range(1, 2001):
            await s.send("meter", attempt=task["attempt"], cpu_ms=i, state="running")
        await s.sync()
        lm.market.commit_now()
        writes = lm.market.store.ledger_summary()["transactions"] - before
        assert writes <= 3, writes  # the first report, and at most a couple after the floor
        await b.send("close", session=sid)
        await until(s, "stop")
        await s.send("result", attempt=task["attempt"], exit_status=0, signal=None, reason="",
                     cpu_ms=2000, output_sha256=protocol.digest(b""))
        closed = await until(b, "closed", session=sid)
        assert closed["cpu_ms"] == 2000 and closed["cost_milli"] == 2000 * ASK // MS_PER_HOUR
        await b.close()
        await s.close()
        await lm.stop()
    assert leases.METER_MIN_INTERVAL > 0
    run(main())
    assert_ledger_ok(lm)


def test_the_sdk_powers_off_what_it_opened_when_an_open_is_refused(lm):
    """Market.cluster asks for more nodes than the buy order's max_nodes: the
    open past it is refused (code limit), and the nodes opened before it are
    closed, not left running and paid; down() beside an events() reader
    returns as soon as every node ended."""
    from cpushare.buyer import Market, MarketError
    from cpushare.order import load_buy
    iso = fake_iso()

    async def main():
        await lm.start()
        o = lm.buy("buyer", BID, model="kvm", memory=512 << 20, max_cpu_seconds=3600,
                   max_nodes=2)
        path = lm.root / "x.iso"
        path.write_bytes(iso)
        async with Market(o) as m:
            with pytest.raises(MarketError) as e:
                await m.cluster(path, nodes=3)
            assert e.value.code == "limit" and "max_nodes is 2" in str(e.value)
            for _ in range(100):
                if not lm.market.leases:
                    break
                await asyncio.sleep(0.02)
            assert not lm.market.leases  # the two opened ones were closed
            c = await m.cluster(path, nodes=1)
            seen = []

            async def watch():
                async for ev in c.events():
                    seen.append(ev.state)
            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.1)
            await asyncio.wait_for(c.down(), 10)
            assert c.all_ended()
            await asyncio.wait_for(watcher, 5)
            assert seen[-1] == "ended"
        await lm.stop()
    run(main())
    assert lm.balance("buyer") == COINS
    assert_ledger_ok(lm)


def test_a_lease_whose_buyer_stays_away_is_powered_off_and_settled(lm):
    """The buyer's connection goes and does not come back: after the grace
    the node is powered off, paid for what it ran, the escrow refunded."""
    iso = fake_iso()

    async def main():
        await lm.start(buyer_grace=1.0)
        b = await kvm_buyer(lm)
        s, sid, task = await leased(lm, b, iso)
        await s.send("meter", attempt=task["attempt"], cpu_ms=3000, state="running")
        await s.sync()
        b.writer.transport.abort()
        stop = await until(s, "stop")
        assert stop["attempt"] == task["attempt"]
        await s.send("result", attempt=task["attempt"], exit_status=0, signal=None,
                     reason="", cpu_ms=3500, output_sha256=protocol.digest(b""))
        await until(s, "settled")
        assert not lm.market.leases
        await s.close()
        await lm.stop()
    run(main())
    assert lm.balance("alice") == 35 and lm.balance("buyer") == COINS - 35
    assert_ledger_ok(lm)


async def sdk_link_check(lm, d, iso):
    """The buyer SDK: a node learns its link's keys from the `link` frame."""
    from cpushare.buyer import Market
    from cpushare.order import load_buy
    o = lm.buy("buyer", BID, model="kvm", memory=512 << 20, max_cpu_seconds=3600)
    path = lm.root / "l.iso"
    path.write_bytes(iso)
    so = lm.sell("bob", ASK, model="kvm", memory=1 << 30)
    s = await Peer.open(so, "seller", accel="tcg", cache=1 << 30, links=True)
    await s.send("ready")
    async with Market(o) as m:
        c = await m.cluster(path, nodes=1, link="[2001:db8::1]:4000")
        task = await s.expect("task")
        assert task["link_peer"] == "[2001:db8::1]:4000"
        node = c.nodes[0]
        for _ in range(100):
            if node.link is not None:
                break
            await asyncio.sleep(0.02)
        assert node.link == (task["link_id"], bytes.fromhex(task["link_rx"]),
                             bytes.fromhex(task["link_tx"]))
        await m._send_async("close", session=node.session)
        await until(s, "stop")
        await s.send("result", attempt=task["attempt"], exit_status=0, signal=None, reason="",
                     cpu_ms=0, output_sha256=protocol.digest(b""))
        await asyncio.wait_for(c.down(), 10)
    await s.close()


def test_a_lease_with_a_link_hands_fresh_keys_to_both_ends_only_to_sellers_that_link(lm):
    """`open {link}`: the market makes two random keys for the lease and
    hands them to the seller (in `task`) and the buyer (`link`), each its own
    direction; it keeps none; a seller that does not link is not offered it."""
    iso = fake_iso()

    async def main():
        await lm.start()
        b = await kvm_buyer(lm)
        d, _ = await upload(b, iso)
        await b.send("open", ref="bad", image=d, link="no port here")
        e = await b.expect("error")
        assert e["code"] == "order" and e["ref"] == "bad" and "link" in e["message"], e
        old = await kvm_seller(lm)  # says nothing of links
        await b.send("open", ref="n1", image=d, link="192.0.2.7:5555")
        sid = (await b.expect("opened"))["session"]
        w = await until(b, "lease", state="waiting")
        assert "encrypted link" in w["message"], w
        assert not [m for m in await old.sync() if m.type == "task"]
        o = lm.sell("bob", ASK, model="kvm", memory=1 << 30)
        s = await Peer.open(o, "seller", accel="tcg", cache=1 << 30, links=True)
        await s.send("ready")
        task = await s.expect("task")
        link = await until(b, "link", session=sid)
        assert task["link_peer"] == "192.0.2.7:5555" and task["link_id"] == link["link_id"]
        assert (task["link_tx"], task["link_rx"]) == (link["rx"], link["tx"])
        assert len(bytes.fromhex(link["tx"])) == len(bytes.fromhex(link["rx"])) == 32
        assert link["tx"] != link["rx"] and link["seller"] == "bob"
        await b.send("close", session=sid)
        await until(s, "stop")
        await s.send("result", attempt=task["attempt"], exit_status=0, signal=None, reason="",
                     cpu_ms=0, output_sha256=protocol.digest(b""))
        await until(b, "closed", session=sid)
        keys = {link["tx"], link["rx"]}
        await sdk_link_check(lm, d, iso)
        if lm.pg:  # every row of every table, as text (bytea as hex)
            lm._quiesce()
            tables = [t for t, in lm.admin.db.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            db = "".join(str(r) for t in tables
                         for r in lm.admin.db.execute(f"SELECT x::text FROM {t} x")).encode()
            assert len(tables) >= 10 and b"escrow" in db
        else:
            db = open(lm.db, "rb").read() + b"".join(
                p.read_bytes() for p in lm.root.glob("market.db-*") if p.is_file())
        assert not any(k.encode() in db or bytes.fromhex(k) in db for k in keys)
        for p in (b, old, s):
            await p.close()
        await lm.stop()
    run(main())
    assert_ledger_ok(lm)
