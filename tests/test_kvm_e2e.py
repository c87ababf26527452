"""The kvm model end to end, for real: a market server process, kvm sellers
(`python -m cpushare.seller` processes booting the test ISO under qemu,
TCG), and the buyer SDK's clusters.  Each node prints its marker on its
serial console, answers on it, is paid as it runs and is powered off."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

import guestiso
from cpushare.buyer import Market
from cpushare.order import load_buy

from test_e2e_support import LocalMarket, qemu_processes as _qemus, wait_for

pytestmark = pytest.mark.skipif(guestiso.missing_qemu() is not None,
                                reason=str(guestiso.missing_qemu()))

MARKER = guestiso.MARKER.encode()
BOOT = 180  # seconds a TCG boot may take here, loaded (about 15 s alone)
ASK, BID = "36.000", "72.000"  # CPUCoins per CPU-hour: 10 and 20 milli a CPU-second
COINS = 100_000


@pytest.fixture(scope="module")
def iso() -> Path:
    return guestiso.iso_path("marker")


@pytest.fixture
def market(tmp_path, market_db):
    m = LocalMarket(tmp_path / "market", db=market_db)
    m.account("buyer", COINS)
    for name in ("alice", "bob"):
        m.account(name)
    m.serve()
    yield m
    m.close()
    for pid in _qemus(m.root):  # a seller killed with -9 leaves its qemu (a unit's cgroup would not)
        _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kvm_seller(m: LocalMarket, account: str, name: str, memory: str = "512M"):
    path = m.sell_order(account, name, price=ASK, model="kvm", memory=memory, accel="tcg")
    return m.seller(path, "--meter-interval", "1")


def kvm_buy_order(m: LocalMarket, name: str = "buyer", **kw) -> Path:
    path = m.root / f"{name}.buy"
    args = ["buy-order", "add", "buyer", "--price", BID, "--model", "kvm", "--memory", "256M",
            "--max-cpu-seconds", "3600", "--output", str(path)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    m.cli(*args)
    return path


def image_bytes_sent(m: LocalMarket) -> int:
    n = 0
    for line in m.server.text().splitlines():
        if "bytes sent to seller" in line:
            n += int(line.split(": ")[-1].split(" bytes")[0])
    return n


def test_a_cluster_of_two_boots_answers_is_paid_and_powers_off(market, iso):
    kvm_seller(market, "alice", "a0")
    kvm_seller(market, "bob", "b0")
    order = load_buy(kvm_buy_order(market))

    async def main():
        async with Market(order) as m:
            c = await m.cluster(iso, nodes=2, name="t")
            assert m.image_bytes_sent == iso.stat().st_size
            await asyncio.gather(*(n.wait_for(MARKER, BOOT) for n in c.nodes))
            assert {n.seller for n in c.nodes} == {"alice", "bob"}
            assert c.all_running()
            node = c.nodes[0]
            await node.write_console(b"echo hello-42\n")
            await node.wait_for(b"\nhello-42", 60)
            # paid as it runs: reports come every second
            t0 = time.monotonic()
            while not all(n.cost_milli > 0 for n in c.nodes):
                assert time.monotonic() - t0 < 60, [n.as_dict() for n in c.nodes]
                await asyncio.sleep(0.2)
            await c.down()
            assert all(n.state == "ended" for n in c.nodes), [n.as_dict() for n in c.nodes]
            spent = c.cost_milli()
            # the same ISO again: the market and the sellers hold it, no byte moves
            sent = image_bytes_sent(market)
            before = m.image_bytes_sent
            c2 = await m.cluster(iso, nodes=1, name="again")
            assert m.image_bytes_sent == before
            await c2.nodes[0].wait_for(MARKER, BOOT)
            await c2.down()
            return spent + c2.cost_milli(), sent
    spent, sent = asyncio.run(main())
    assert sent == 2 * iso.stat().st_size  # once to each seller
    assert image_bytes_sent(market) == sent  # and not again
    earned = market.balance_milli("alice") + market.balance_milli("bob")
    assert spent > 0 and earned == spent == COINS * 1000 - market.balance_milli("buyer")
    assert market.ledger_check().returncode == 0, market.ledger_check().stdout


def test_kill_9_of_a_seller_mid_lease_tells_the_buyer_and_settles_once(market, iso):
    p = kvm_seller(market, "alice", "a0")
    order = load_buy(kvm_buy_order(market))

    async def main():
        async with Market(order) as m:
            c = await m.cluster(iso, nodes=1, name="k")
            node = c.nodes[0]
            await node.wait_for(MARKER, BOOT)
            t0 = time.monotonic()
            while node.cost_milli == 0:
                assert time.monotonic() - t0 < 60, node.as_dict()
                await asyncio.sleep(0.2)
            qemus = _qemus(market.root)
            assert len(qemus) == 1
            p.kill9()
            wait_for(lambda: not _qemus(market.root), 10, "its qemu to die with it")
            async for ev in c.events():
                if ev.node is node and ev.state in ("lost", "ended"):
                    break
            assert node.state == "lost" and "seller running the lease was lost" in node.reason
            return node.cost_milli
    paid = asyncio.run(main())
    assert paid > 0
    assert market.balance_milli("alice") == paid  # paid up to its last report, once
    assert market.balance_milli("buyer") == COINS * 1000 - paid
    assert market.ledger_check().returncode == 0, market.ledger_check().stdout


def test_kill_9_of_the_market_mid_lease_keeps_the_guest_and_takes_the_lease_back(market, iso):
    kvm_seller(market, "alice", "a0")
    order = load_buy(kvm_buy_order(market))

    async def main():
        async with Market(order) as m:
            c = await m.cluster(iso, nodes=1, name="r")
            node = c.nodes[0]
            await node.wait_for(MARKER, BOOT)
            qemus = _qemus(market.root)
            assert len(qemus) == 1
            market.server.kill9()
            assert market.ledger_check().returncode == 0  # also at this moment
            market.serve()
            market.wait_connected("a0", count=2, timeout=60)  # the seller is back
            # the buyer's SDK reconnects by itself; the market gives the lease back
            t0 = time.monotonic()
            while True:
                try:
                    # (an echo typed before the lease is back is lost: again
                    # soon; a late answer to an earlier one counts as well)
                    await node.write_console(b"echo after-restart\n")
                    await node.wait_for(b"\nafter-restart", 2)
                    break
                except (ConnectionError, asyncio.TimeoutError):
                    assert time.monotonic() - t0 < 120, node.as_dict()
                    await asyncio.sleep(1)
            assert _qemus(market.root) == qemus  # the same guest, never restarted
            assert node.state == "running", node.as_dict()
            await c.down()
            assert node.state == "ended", node.as_dict()
            return node.cost_milli
    paid = asyncio.run(main())
    assert paid > 0 and market.balance_milli("alice") == paid
    assert market.balance_milli("buyer") == COINS * 1000 - paid
    assert market.ledger_check().returncode == 0, market.ledger_check().stdout


def test_bad_clusters_are_told_clearly_and_the_market_serves_on(market, iso, tmp_path):
    """Each bad request gets a clear answer naming what and where; an honest
    cluster of the same buyer boots meanwhile, and the ledger holds."""
    kvm_seller(market, "alice", "a0")  # 512 MiB of memory, a 20 GiB cache, TCG
    order = load_buy(kvm_buy_order(market))
    big = load_buy(kvm_buy_order(market, "big", memory="4G"))
    fast = load_buy(kvm_buy_order(market, "fast", accel="kvm"))
    not_iso = tmp_path / "notes.iso"
    not_iso.write_bytes(b"not an ISO\n" * 10_000)

    async def main():
        async with Market(order) as m, Market(big) as mb, Market(fast) as mf:
            with pytest.raises(Exception) as e:
                await m.cluster(not_iso, nodes=1)
            assert getattr(e.value, "code", None) == "image", e.value
            assert "not an ISO 9660 image" in str(e.value)
            # more memory than any seller offers: it waits, and says why
            cb = await mb.cluster(iso, nodes=1, name="big")
            ev = await cb._events.get()
            assert ev.state == "waiting" and "4096 MiB of memory" in ev.message, ev
            # accel = kvm where no seller's KVM works (TCG here): it waits, saying so
            cf = await mf.cluster(iso, nodes=1, name="fast")
            ev = await cf._events.get()
            assert ev.state == "waiting" and "working KVM" in ev.message, ev
            c = await m.cluster(iso, nodes=1, name="honest")  # served all the same
            await c.nodes[0].wait_for(MARKER, BOOT)
            await c.down()
            await cb.down()
            await cf.down()
            assert cb.nodes[0].state == cf.nodes[0].state == "ended"
            assert cb.cost_milli() == cf.cost_milli() == 0
    asyncio.run(main())
    assert market.ledger_check().returncode == 0, market.ledger_check().stdout


def test_an_iso_larger_than_every_sellers_cache_waits_saying_so(market, iso):
    path = market.sell_order("alice", "tiny", price=ASK, model="kvm", memory="512M",
                             accel="tcg", cache="1M")
    market.seller(path, "--meter-interval", "1")
    order = load_buy(kvm_buy_order(market))

    async def main():
        async with Market(order) as m:
            c = await m.cluster(iso, nodes=1)
            ev = await c._events.get()
            assert ev.state == "waiting" and "a cache of" in ev.message, ev
            await c.down()
    asyncio.run(main())
    assert market.ledger_check().returncode == 0


def test_an_iso_that_never_prints_ends_as_not_booting(market):
    silent = guestiso.iso_path("silent")
    path = market.sell_order("alice", "a0", price=ASK, model="kvm", memory="512M", accel="tcg")
    market.seller(path, "--meter-interval", "1", "--powerdown-grace", "2")
    # (the guest never prints: a wait as long as a real boot proves nothing more)
    order = load_buy(kvm_buy_order(market, boot_seconds=8))

    async def main():
        async with Market(order) as m:
            c = await m.cluster(silent, nodes=1)
            node = c.nodes[0]
            async for ev in c.events():
                if ev.state == "ended":
                    break
            assert node.reason.startswith("not booting: the node printed nothing on its "
                                          "console within 8 s"), node.reason
            assert node.console == b""
            return node.cost_milli
    paid = asyncio.run(main())
    assert market.balance_milli("alice") == paid > 0  # its CPU time was used all the same
    assert market.ledger_check().returncode == 0


def test_pause_stops_the_guests_cpu_and_sigterm_powers_it_off_settled(market, iso):
    p = kvm_seller(market, "alice", "a0")
    order = load_buy(kvm_buy_order(market))

    async def main():
        async with Market(order) as m:
            c = await m.cluster(iso, nodes=1, name="p")
            node = c.nodes[0]
            await node.wait_for(MARKER, BOOT)
            p.signal(signal.SIGUSR1)  # cpusharectl pause: QMP stop
            async for ev in c.events():
                if ev.state == "paused":
                    break
            await asyncio.sleep(1.5)  # (a report or more while paused)
            cpu = node.cpu_ms
            await asyncio.sleep(3)
            assert node.state == "paused" and node.cpu_ms - cpu < 300, node.as_dict()
            p.signal(signal.SIGUSR2)  # resume
            async for ev in c.events():
                if ev.state == "running":
                    break
            await node.write_console(b"echo resumed\n")
            await node.wait_for(b"\nresumed", 60)
            p.signal(signal.SIGTERM)  # the daemon stops: ACPI power-down, the lease settled
            async for ev in c.events():
                if ev.state in ("ended", "lost"):
                    break
            assert node.state == "ended" and node.reason == "the seller is stopping", \
                node.as_dict()
            return node.cost_milli
    paid = asyncio.run(main())
    assert p.p.wait(60) == 0
    assert market.balance_milli("alice") == paid > 0
    assert market.ledger_check().returncode == 0


def test_a_node_on_the_buyers_link_sends_its_frames_sealed_to_the_buyer(market, iso):
    """A lease with a link: the seller's guest gets a NIC whose frames reach the
    buyer's endpoint sealed with the lease's key (the guest's DHCP request
    opens with the buyer's key, and its text is nowhere in the datagrams),
    and a frame the buyer seals reaches the guest's NIC."""
    import socket
    from cpushare.vpn.datagram import BUYER_TO_SELLER, SELLER_TO_BUYER, Opener, Sealer
    kvm_seller(market, "alice", "a0")
    order = load_buy(kvm_buy_order(market))
    endpoint = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    endpoint.bind(("127.0.0.1", 0))
    endpoint.setblocking(False)
    port = endpoint.getsockname()[1]

    async def main():
        loop = asyncio.get_running_loop()
        async with Market(order) as m:
            c = await m.cluster(iso, nodes=1, name="l", link=f"127.0.0.1:{port}")
            node = c.nodes[0]
            t0 = time.monotonic()
            while node.link is None:
                assert time.monotonic() - t0 < 60, node.as_dict()
                await asyncio.sleep(0.1)
            link_id, tx, rx = node.link
            opener = Opener(rx, SELLER_TO_BUYER)
            raw, frames = [], []
            while not any(f[12:14] == b"\x08\x00" and b"udhcp" in f for f in frames):
                assert time.monotonic() - t0 < BOOT, (node.as_dict(), len(raw))
                try:
                    d, src = await asyncio.wait_for(loop.sock_recvfrom(endpoint, 2048), 5)
                except asyncio.TimeoutError:
                    continue
                raw.append(d)
                got = opener.open(d)
                if got is not None and got.payload:
                    assert got.link_id == link_id
                    frames.append(bytes(got.payload))
            dhcp = next(f for f in frames if b"udhcp" in f)
            assert dhcp[:6] == b"\xff" * 6  # a broadcast from the guest's MAC
            assert dhcp[6:8] == b"\x52\x54" and int.from_bytes(dhcp[8:12], "big") == link_id
            assert not any(b"udhcp" in d for d in raw)  # never in clear on the wire
            # the buyer's way back: a sealed broadcast ARP request reaches the guest
            arp = (b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x06" + b"\x00\x01\x08\x00"
                   b"\x06\x04\x00\x01" + b"\x02\x00\x00\x00\x00\x01" + bytes([10, 9, 0, 1])
                   + b"\x00" * 6 + bytes([10, 9, 0, 2])).ljust(60, b"\0")
            sealer = Sealer(tx, BUYER_TO_SELLER)
            for _ in range(3):
                endpoint.sendto(sealer.seal(0, link_id, arp), src)
            await c.down()
    asyncio.run(main())
    endpoint.close()
    log = market.sellers["a0"].text()
    closed = [line for line in log.splitlines() if "closed:" in line and "link" in line]
    assert closed and " 0 in" not in closed[-1], closed
