"""Hostile peers against the market, over real TLS on loopback.

Each test plays one attack for real and checks three things: the attack
is contained (the hostile connection gets the documented error, is closed
or refused, or what the market queues for it stays within its budget, and
no traceback or internal error is logged); an honest buyer's tasks run
through an honest seller while the attacker is at it; and the ledger
holds (`ledger check`) afterwards.

The honest side: the account "buyer" bids BID, the seller "alice" asks
36 CPUCoins per CPU-hour.  The attacker's accounts are "mallory" (a buyer)
and "eve" (a seller).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback

import pytest

from cpushare import protocol
from cpushare.market.listener import CONN_BUDGET, MAX_BUYER_CONNS, STREAM_BUDGET

from test_market_peers import LoopbackMarket, Peer, ScriptedSeller, TIMEOUT, image_digest, \
    tiny_image

BID = 360_000  # milli per CPU-hour: 100 milli per CPU-second
ASK = 36_000  # the honest seller's
LOW = 1_000  # a bid below every ask of the sellers here but eve's cheap one
CHEAP = 1  # eve's ask: below every bid, so eve's seller takes the first task
COINS = 1_000_000
MiB = 1 << 20


class LoopBlocked(BaseException):
    """Raised by the watchdog inside the code that has held the event loop too long."""


class Watchdog:
    """Turns a market that stops turning its event loop (a busy loop: no timeout
    inside the loop can fire then) into a test failure that says where it was,
    instead of a test that hangs."""

    LIMIT = 8.0  # seconds without a turn of the loop

    def __init__(self):
        self.stack: str | None = None
        self.beat = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._old = None

    def start(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task) -> None:
        self.loop, self.task = loop, task

        def tick() -> None:
            self.beat = time.monotonic()
            self._tick = loop.call_later(0.1, tick)
        tick()
        self._old = signal.signal(signal.SIGUSR1, self._raise)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @staticmethod
    def _raise(signum, frame):
        raise LoopBlocked(f"the event loop was blocked for over {Watchdog.LIMIT:g} s")

    def _watch(self) -> None:
        main = threading.main_thread().ident
        while not self._done.wait(0.2):
            if self.stack is None and time.monotonic() - self.beat > self.LIMIT:
                frames = traceback.extract_stack(sys._current_frames()[main])
                # from the callback the loop was running
                start = max((i for i, f in enumerate(frames)
                             if f.filename.endswith("asyncio/events.py")), default=-1) + 1
                self.stack = "".join(traceback.format_list(frames[start:]))
                signal.pthread_kill(main, signal.SIGUSR1)  # out of the busy code ...
                self.loop.call_soon_threadsafe(self.task.cancel)  # ... and out of the test

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            signal.signal(signal.SIGUSR1, self._old)


def run(coro, lm: LoopbackMarket, timeout: float = 60):
    """Run a test's coroutine under the watchdog; if it fails, stop the market still
    (a market that stopped itself raises its fatal error there, which is then
    dropped: the test's own failure says what happened)."""
    dog = Watchdog()

    async def main():
        dog.start(asyncio.get_running_loop(), asyncio.current_task())
        try:
            return await asyncio.wait_for(coro, timeout)
        except BaseException:
            if lm.market is not None:
                try:
                    await lm.stop()
                except BaseException:  # noqa: BLE001
                    pass
            raise
        finally:
            dog._tick.cancel()
    try:
        return asyncio.run(main())
    except BaseException:
        # Tasks of the peers that died with the market: their exceptions are logged
        # now, not from a collection inside pytest's report (where Python 3.11.2's
        # traceback, parsing the source, trips over the report's own parsing).
        gc.collect()
        if dog.stack is not None:
            raise AssertionError(f"the market's event loop was blocked for over "
                                 f"{Watchdog.LIMIT:g} s (a busy loop); it was at:\n"
                                 f"{dog.stack}") from None
        raise
    finally:
        dog.stop()


@pytest.fixture
def lm(tmp_path, market_db):
    m = LoopbackMarket(tmp_path, market_db)
    for name in ("buyer", "mallory"):
        m.account(name, COINS)
    for name in ("alice", "eve"):
        m.account(name)
    yield m
    m.close()


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger="cpushare.market")
    return caplog


def assert_contained(caplog) -> None:
    """Nothing the attack did reached the market's own error paths."""
    assert "Traceback" not in caplog.text, caplog.text[-4000:]
    bad = [f"{r.levelname}: {r.getMessage()}" for r in caplog.records
           if "internal error" in r.getMessage() or r.levelno >= logging.CRITICAL]
    assert bad == []


def assert_serving(lm) -> None:
    assert lm.market.fatal is None, f"the market stopped: {lm.market.fatal!r}"


# --- frames the protocol module would not write ----------------------------------

def raw_frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(header), len(payload)) + header + payload


def ascii_frame(type_: str, payload: bytes = b"", **fields) -> bytes:
    """A frame whose header is JSON with \\u escapes (so a lone surrogate goes out
    as the escape "\\ud800", which protocol.encode cannot write)."""
    fields["type"] = type_
    return raw_frame(json.dumps(fields, separators=(",", ":")).encode("ascii"), payload)


# A header of 30,000 nested arrays in an otherwise valid ping: 60 KB, under the
# 64 KiB header limit; without the nesting it would be answered with a pong.
NESTED = b'{"type":"ping","t":1,"x":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
assert len(NESTED) <= protocol.MAX_HEADER


# --- peers ------------------------------------------------------------------------

async def open_peer(o, role: str, *, rcvbuf: int | None = None) -> Peer:
    """Peer.open, on a socket whose receive buffer may be fixed small (so that the
    kernel holds little of what a peer that does not read is sent)."""
    ctx = protocol.client_context(o.ca_pem, o.cert_pem, o.key_pem)
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (o.host, o.port)),
                           TIMEOUT)
    r, w = await asyncio.wait_for(asyncio.open_connection(
        sock=sock, ssl=ctx, server_hostname=o.host), TIMEOUT)
    p = Peer(r, w, role)
    await p.send("hello", version=protocol.VERSION, role=role, software="test-attacker",
                 **({"acks": True} if role == "buyer" else {}))
    p.welcome = await p.recv()
    return p


async def buyer_peer(o, img: bytes | None = None, **kw) -> tuple[Peer, str]:
    """A buyer connection of order `o` that has sent its image."""
    b = await (open_peer(o, "buyer", **kw) if kw else Peer.open(o, "buyer"))
    assert b.welcome.type == "welcome", b.welcome
    img = img or tiny_image()
    d = image_digest(img)
    await b.send("image", img, image=d)
    await b.expect("image_ok")
    return b, d


async def ready_seller(o) -> Peer:
    """A raw seller connection that has asked for one task (and the market has seen it)."""
    p = await Peer.open(o, "seller")
    assert p.welcome.type == "welcome", p.welcome
    await p.send("ready")
    assert await p.sync() == []
    return p


class Honest:
    """An honest buyer: rounds of tasks, each checked and acknowledged."""

    def __init__(self, lm):
        self.lm = lm
        self.n = 0
        self.done = 0
        self.peer: Peer | None = None

    @classmethod
    async def connect(cls, lm) -> "Honest":
        h = cls(lm)
        h.order = lm.buy("buyer", BID, max_cpu_seconds=10)
        h.peer, h.digest = await buyer_peer(h.order)
        return h

    async def round(self, n: int = 3) -> None:
        """Submit n tasks and wait until each is done with its answer."""
        want = {}
        for _ in range(n):
            self.n += 1
            ref, data = f"h{self.n}", b"honest %d" % self.n
            await self.peer.send("submit", data, ref=ref, image=self.digest)
            want[ref] = data[::-1]
        while want:
            m = await self.peer.recv()
            assert m is not None, "the honest buyer's connection closed"
            if m.type == "accepted":
                continue
            assert m.type == "done", (m.type, m.fields)
            assert m.payload == want.pop(m["ref"])
            await self.peer.send("ack", task=m["task"])
            self.done += 1

    async def close(self) -> None:
        await self.peer.close()


async def honest_market(lm, **kw) -> tuple[ScriptedSeller, Honest]:
    """The market, an honest seller and an honest buyer."""
    await lm.start(**kw)
    good = await ScriptedSeller.connect(lm.sell("alice", ASK))
    return good, await Honest.connect(lm)


async def until(cond, what: str, timeout: float = TIMEOUT) -> None:
    """Poll the in-process market until `cond()` holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.002)


class Peak:
    """The largest value of `probe()` seen, sampled while the test runs."""

    def __init__(self, probe):
        self.probe = probe
        self.max = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.max = max(self.max, self.probe())
            await asyncio.sleep(0.001)

    def stop(self) -> int:
        self.max = max(self.max, self.probe())
        self._task.cancel()
        return self.max


async def expect_closed_with(p: Peer, code: str) -> protocol.Message:
    """The `error` that closes `p`'s connection, and its end."""
    m = await p.recv()
    assert m is not None and m.type == "error", m and (m.type, m.fields)
    assert m["code"] == code, m.fields
    assert await p.recv() is None  # closed
    return m


def bait_task(lm):
    """A buy order of mallory's (its tasks are the bait the cheap hostile seller takes)."""
    return lm.buy("mallory", BID, max_cpu_seconds=10)


# --- 1. integers out of range in a seller's result ---------------------------------

@pytest.mark.parametrize("bad", [{"cpu_ms": 2**63}, {"exit_status": -1}, {"attempt": 0}],
                         ids=lambda b: next(iter(b)))
def test_a_result_with_an_integer_out_of_range_closes_that_seller(lm, log, bad):
    async def main():
        await lm.start()
        evil = await ready_seller(lm.sell("eve", CHEAP))
        good = await ScriptedSeller.connect(lm.sell("alice", ASK))
        honest = await Honest.connect(lm)
        mal, md = await buyer_peer(bait_task(lm))
        await mal.send("submit", b"bait", ref="bait", image=md)
        await mal.expect("accepted")
        task = await evil.expect("task")  # the cheapest ask takes it
        rounds = asyncio.create_task(honest.round(5))
        fields = dict(attempt=task["attempt"], exit_status=0, signal=None, reason="",
                      cpu_ms=10, output_sha256=protocol.digest(b"tiab"))
        fields.update(bad)
        await evil.send("result", b"tiab", **fields)
        err = await expect_closed_with(evil, "frame")
        assert f"'{next(iter(bad))}'" in err["message"], err.fields
        await rounds
        done = await mal.expect("done")  # lost on eve, requeued on alice
        assert done.payload == b"tiab" and done["attempts"] == 2
        await honest.round(2)
        assert_serving(lm)
        await good.stop()
        await lm.stop()
    run(main(), lm)
    assert_contained(log)
    assert lm.balance("eve") == 0
    assert lm.check() == []


# --- 2. a header nested too deeply --------------------------------------------------

@pytest.mark.parametrize("who", ["seller", "buyer", "hello"])
def test_a_header_of_30000_nested_arrays_is_a_frame_error(lm, log, who):
    async def main():
        good, honest = await honest_market(lm)
        if who == "seller":
            evil = await ready_seller(lm.sell("eve", ASK))
        elif who == "buyer":
            evil, _ = await buyer_peer(bait_task(lm))
        else:  # instead of its hello
            evil = await Peer.open(bait_task(lm), "buyer", hello=False)
        rounds = asyncio.create_task(honest.round(5))
        evil.writer.write(raw_frame(NESTED))
        err = await expect_closed_with(evil, "frame")
        assert "nested" in err["message"], err.fields
        await rounds
        assert_serving(lm)
        await good.stop()
        await lm.stop()
    run(main(), lm)
    assert_contained(log)
    assert "nested too deeply" in log.text
    assert lm.check() == []


# --- 3. lone surrogates -------------------------------------------------------------

@pytest.mark.parametrize("where", ["seller result reason", "buyer submit ref",
                                   "buyer open ref"])
def test_a_lone_surrogate_in_a_string_does_not_stop_the_market(lm, log, where):
    async def main():
        good, honest = await honest_market(lm)
        if where == "seller result reason":
            evil = await ready_seller(lm.sell("eve", CHEAP))
            mal, md = await buyer_peer(bait_task(lm))
            await mal.send("submit", b"bait", ref="bait", image=md)
            await mal.expect("accepted")
            task = await evil.expect("task")
            evil.writer.write(ascii_frame(
                "result", b"tiab", attempt=task["attempt"], exit_status=0, signal=None,
                reason="\ud800", cpu_ms=10, output_sha256=protocol.digest(b"tiab")))
        else:
            evil, md = await buyer_peer(bait_task(lm))
            if where == "buyer submit ref":
                evil.writer.write(ascii_frame("submit", b"x", ref="\ud800", image=md))
            else:
                evil.writer.write(ascii_frame("open", ref="\ud800", image=md, cpu_ms=1000))
        # whatever the market answers (or whether it closes the connection) ...
        try:
            answer = await evil.recv(timeout=2)
        except asyncio.TimeoutError:
            answer = "nothing within 2 s"
        # ... it goes on serving
        try:
            await honest.round(3)
        finally:
            assert_serving(lm)
        await good.stop()
        await lm.stop()
        return answer
    answer = run(main(), lm)
    print(f"{where}: the market answered",
          answer if not isinstance(answer, protocol.Message) else (answer.type, answer.fields))
    assert_contained(log)
    assert lm.check() == []


# --- 4. fair matching under a flood; the cap on open tasks ---------------------------

async def flood(p: Peer, digest: str, n: int, first: int = 0) -> dict[str, int]:
    """Submit n tasks as fast as the connection takes them; ref -> task id."""
    accepted: dict[str, int] = {}

    async def read():
        while len(accepted) < n:
            m = await p.recv()
            assert m is not None and m.type == "accepted", m and (m.type, m.fields)
            accepted[m["ref"]] = m["task"]

    reader = asyncio.create_task(read())
    for i in range(first, first + n, 500):
        p.writer.write(b"".join(protocol.encode("submit", b"f%d" % j, ref=f"f{j}", image=digest)
                                for j in range(i, min(i + 500, first + n))))
        await p.writer.drain()
    await asyncio.wait_for(reader, 60)
    return accepted


def test_ten_thousand_tasks_bid_below_every_ask_do_not_hold_up_an_honest_buyer(lm, log):
    async def main():
        good, honest = await honest_market(lm)
        mal, md = await buyer_peer(lm.buy("mallory", LOW, max_cpu_seconds=1))
        t0 = time.monotonic()
        accepted = await flood(mal, md, 10_000)
        t1 = time.monotonic()
        assert len(set(accepted.values())) == 10_000
        assert len(lm.market.matcher.queue) >= 10_000  # all waiting: no seller asks so little
        await honest.round(5)
        t2 = time.monotonic()
        print(f"10,000 submits in {t1 - t0:.2f} s; then 5 honest tasks in {t2 - t1:.3f} s")
        # the account is at the default cap of unacknowledged tasks
        assert lm.market.max_open_tasks == 10_000
        await mal.send("submit", b"one more", ref="f10000", image=md)
        m = await mal.expect("failed")
        assert (m["code"], m["task"], m["ref"]) == ("limit", None, "f10000"), m.fields
        await honest.round(2)
        honest_order = honest.peer.welcome["order"]
        assert good.tasks and all(t["buyer_order"] == honest_order for t in good.tasks)
        assert_serving(lm)
        await good.stop()
        await lm.stop()
    run(main(), lm, timeout=90)
    assert_contained(log)
    assert lm.balance("mallory") == COINS - 10_000  # 1 milli held for each queued task
    assert lm.check() == []


def test_a_submit_past_the_cap_of_open_tasks_is_refused_with_limit(lm, log):
    async def main():
        good, honest = await honest_market(lm, max_open_tasks=20)
        mal, md = await buyer_peer(lm.buy("mallory", LOW, max_cpu_seconds=1))
        accepted = await flood(mal, md, 20)
        for i in range(20, 23):
            await mal.send("submit", b"more", ref=f"f{i}", image=md)
            m = await mal.expect("failed")
            assert (m["code"], m["task"]) == ("limit", None), m.fields
        await honest.round(3)  # another account: under its own cap
        # the cap counts unacknowledged tasks: a cancelled one, once acked, frees a place
        await mal.send("cancel", ref="f0")
        m = await mal.expect("failed")
        assert (m["code"], m["task"]) == ("cancelled", accepted["f0"]), m.fields
        await mal.send("submit", b"more", ref="f23", image=md)
        assert (await mal.expect("failed"))["code"] == "limit"  # not acked yet
        await mal.send("ack", task=accepted["f0"])
        await mal.send("submit", b"more", ref="f24", image=md)
        assert (await mal.expect("accepted"))["ref"] == "f24"
        await honest.round(2)
        assert_serving(lm)
        await good.stop()
        await lm.stop()
    run(main(), lm)
    assert_contained(log)
    assert lm.balance("mallory") == COINS - 20
    assert lm.check() == []


# --- 5. a buyer that does not read its results ----------------------------------------

N_SLOW = 20  # tasks of 1 MiB: far more than the kernel and the result budget hold


def test_a_buyer_that_does_not_read_costs_the_market_its_result_budget(lm, log):
    inputs = {f"s{i}": (b"%06d|" % i) + os.urandom(MiB - 7) + b"|" for i in range(N_SLOW)}

    async def main():
        await lm.start()
        honest = await Honest.connect(lm)
        o = lm.buy("mallory", BID, max_cpu_seconds=10)
        slow, md = await buyer_peer(o, rcvbuf=256 << 10)
        oid = slow.welcome["order"]
        ids = {}
        for ref, data in inputs.items():  # (no seller yet: the results come all at once)
            await slow.send("submit", data, ref=ref, image=md)
            ids[ref] = (await slow.expect("accepted"))["task"]
        # from here on the slow buyer reads nothing
        conn = lm.market.buyers[oid][0]
        peak = Peak(lambda: max((c.buffered for c in lm.market.buyers.get(oid, ())),
                                default=0))
        good = await ScriptedSeller.connect(lm.sell("alice", ASK))
        await until(lambda: len(good.settled) >= N_SLOW, "every slow task is settled")
        await until(lambda: not any(t.buy_order_id == oid for t in lm.market.tasks.values()),
                    "no slow task is left open")
        assert conn.owed, "the result budget was never reached: make N_SLOW bigger"
        owed = len(conn.owed)
        await honest.round(3)  # served while the slow buyer owes results
        bound = lm.market.result_budget + MiB + 4096  # the budget and one result frame
        assert peak.max <= bound, (peak.max, bound)
        print(f"peak queued to the slow buyer {peak.max} bytes (bound {bound}); "
              f"{owed} of {N_SLOW} results waited in the store")

        # it reads everything: every result, the right one, once each task
        want = {ids[ref]: data[::-1] for ref, data in inputs.items()}
        got: dict[int, int] = {}
        while len(got) < N_SLOW:
            m = await slow.expect("done")
            assert m.payload == want[m["task"]], m["ref"]
            got[m["task"]] = got.get(m["task"], 0) + 1
        assert await slow.sync() == []
        assert set(got) == set(want) and set(got.values()) == {1}, got
        assert peak.stop() <= bound, (peak.max, bound)
        # it acks half; before that ack reached the market, nothing was delivered
        half = sorted(want)[:N_SLOW // 2]
        for tid in half:
            await slow.send("ack", task=tid)
        assert await slow.sync() == []
        await slow.close()
        # a reconnection gets every unacked result again, and only those (it sends
        # no image: the market's image_ok and the results owed would race)
        slow = await Peer.open(o, "buyer")
        again = {}
        while len(again) < N_SLOW - len(half):
            m = await slow.expect("done")
            assert m.payload == want[m["task"]]
            again[m["task"]] = m
        assert await slow.sync() == []
        assert set(again) == set(want) - set(half)
        for tid in again:
            await slow.send("ack", task=tid)
        assert await slow.sync() == []
        await slow.close()
        # acked: a reconnection gets nothing more
        slow = await Peer.open(o, "buyer")
        assert await slow.sync() == []
        await honest.round(2)
        assert_serving(lm)
        await good.stop()
        await lm.stop()
    run(main(), lm)
    assert_contained(log)
    assert lm.check() == []


# --- 6. resubmitting a ref ---------------------------------------------------------------

def test_a_resubmitted_ref_is_the_same_task_and_after_its_ack_refused(lm, log):
    async def main():
        good, honest = await honest_market(lm)
        o = lm.buy("mallory", BID, max_cpu_seconds=10)
        mal, md = await buyer_peer(o)
        await mal.send("submit", b"once", ref="r", image=md)
        acc = await mal.expect("accepted")
        done = await mal.expect("done")
        assert done.payload == b"ecno"
        rounds = asyncio.create_task(honest.round(5))
        # not acked: the same task, nothing more held
        await mal.send("submit", b"once", ref="r", image=md)
        again = await mal.expect("accepted")
        assert (again["task"], again["escrow_milli"]) == (acc["task"], 0), again.fields
        # on a new connection (not acked): the result again, and the same task
        await mal.close()
        # (the unacked result comes again by itself: before or after image_ok,
        # as the new connection's commit and its image's answer race)
        mal = await Peer.open(o, "buyer")
        await mal.send("image", tiny_image(), image=md)
        got = {}
        while "image_ok" not in got:
            m = await mal.recv()
            assert m is not None and m.type in ("image_ok", "done"), m
            got[m.type] = m
        del got["image_ok"]
        await mal.send("submit", b"once", ref="r", image=md)
        while len(got) < 2:
            m = await mal.recv()
            assert m is not None, "closed"
            got[m.type] = m
        assert set(got) == {"accepted", "done"}, got
        assert got["accepted"]["task"] == got["done"]["task"] == acc["task"]
        assert got["accepted"]["escrow_milli"] == 0
        # acked: that ref is done with, on this connection and the next
        await mal.send("ack", task=acc["task"])
        await mal.send("submit", b"once", ref="r", image=md)
        m = await mal.expect("failed")
        assert (m["code"], m["task"], m["ref"]) == ("order", None, "r"), m.fields
        await mal.close()
        mal, _ = await buyer_peer(o)
        await mal.send("submit", b"once", ref="r", image=md)
        assert (await mal.expect("failed"))["code"] == "order"
        assert await mal.sync() == []
        await rounds
        assert_serving(lm)
        await good.stop()
        await lm.stop()
        return acc["task"]
    task = run(main(), lm)
    assert_contained(log)
    db = lm.admin.db
    kinds = [k for k, in db.execute(
        "SELECT t.kind FROM transactions t JOIN entries e ON e.txn_id = t.id "
        "JOIN accounts a ON a.id = e.account_id WHERE a.name = 'mallory' AND t.kind != 'mint' "
        "ORDER BY t.id")]
    assert kinds == ["escrow", "settle"], kinds
    assert db.execute("SELECT COUNT(*) FROM tasks WHERE buyer_account_id = "
                      "(SELECT id FROM accounts WHERE name = 'mallory')").fetchone()[0] == 1
    assert [t for t, in db.execute("SELECT DISTINCT task_id FROM transactions t JOIN entries e "
                                   "ON e.txn_id = t.id JOIN accounts a ON a.id = e.account_id "
                                   "WHERE a.name = 'mallory' AND t.kind != 'mint'")] == [task]
    cost = protocol.cost_milli(1000, ASK)
    assert lm.balance("mallory") == COINS - cost
    assert lm.check() == []


# --- 7. connections per buy order -----------------------------------------------------------

def test_the_seventeenth_connection_of_a_buy_order_is_refused(lm, log):
    async def main():
        good, honest = await honest_market(lm)
        o = lm.buy("mallory", BID)
        conns = []
        for _ in range(MAX_BUYER_CONNS):
            p = await Peer.open(o, "buyer")
            assert p.welcome.type == "welcome", p.welcome
            conns.append(p)
        oid = conns[0].welcome["order"]
        rounds = asyncio.create_task(honest.round(5))
        extra = await Peer.open(o, "buyer")
        assert extra.welcome is not None and extra.welcome.type == "error", extra.welcome
        assert extra.welcome["code"] == "order", extra.welcome.fields
        assert str(MAX_BUYER_CONNS) in extra.welcome["message"]
        assert await extra.recv() is None
        assert len(lm.market.buyers[oid]) == MAX_BUYER_CONNS
        for p in conns:  # the others still work
            assert await p.sync() == []
        await rounds
        # one goes: its place is free again
        await conns.pop().close()
        await until(lambda: len(lm.market.buyers[oid]) < MAX_BUYER_CONNS,
                    "the market forgets the closed connection")
        p = await Peer.open(o, "buyer")
        assert p.welcome.type == "welcome", p.welcome
        assert_serving(lm)
        await good.stop()
        await lm.stop()
    run(main(), lm)
    assert_contained(log)
    assert lm.check() == []


# --- 8. a session's input before a seller takes it --------------------------------------------

SESSION_INPUT = 50 * MiB
STREAM_PIECE = 64 << 10


def test_session_input_before_a_seller_is_bounded_and_arrives_in_order(lm, log):
    data = os.urandom(SESSION_INPUT)

    async def main():
        good, honest = await honest_market(lm)
        # a bid below alice's ask: no seller connected may take the session
        mal, md = await buyer_peer(lm.buy("mallory", LOW, max_cpu_seconds=10))
        await mal.send("open", ref="s", image=md, cpu_ms=10_000)
        sid = (await mal.expect("opened"))["session"]
        t = lm.market.tasks[sid]
        frame_len = len(protocol.encode("stream", data[:STREAM_PIECE], session=sid, eof=False))
        bound = STREAM_BUDGET + frame_len
        peak = Peak(lambda: t.streamed_bytes)
        sent = 0

        async def stream():
            nonlocal sent
            for i in range(0, len(data), STREAM_PIECE):
                mal.writer.write(protocol.encode("stream", data[i:i + STREAM_PIECE],
                                                 session=sid, eof=False))
                await mal.writer.drain()
                sent = i + STREAM_PIECE
            await mal.send("stream", session=sid, eof=True)

        streaming = asyncio.create_task(stream())
        await until(lambda: t.streamed_bytes > STREAM_BUDGET,
                    "the session's queued input passes STREAM_BUDGET")
        await honest.round(3)  # served while the session's input waits
        await honest.round(2)
        bconn = lm.market.buyers[mal.welcome["order"]][0]
        assert bconn.paused  # not read
        print(f"the buyer had written {sent} bytes when the market stopped reading it; "
              f"{len(bconn.reader._buffer)} of them wait unread in the market's reader")
        assert t.streamed_bytes <= bound and peak.max <= bound, (peak.max, bound)
        assert not t.running  # nobody took it
        # a seller that may take it comes: it gets the whole input, in order
        sp = await Peer.open(lm.sell("eve", CHEAP), "seller")
        await sp.send("ready")
        task = await sp.expect("task")
        assert task["session"] == sid and task.payload == b""
        got = bytearray()
        while True:
            m = await sp.expect("stream")
            assert m["session"] == sid
            got += m.payload
            if m["eof"]:
                break
        await streaming
        assert peak.stop() <= bound, (peak.max, bound)
        assert len(got) == len(data) and got == data
        await sp.send("result", attempt=task["attempt"], exit_status=0, signal=None,
                      reason="", cpu_ms=1000, output_sha256=protocol.digest(b""))
        closed = await mal.expect("closed")
        assert closed["session"] == sid and closed["exit_status"] == 0
        assert (await sp.expect("settled"))["accepted"] is True
        print(f"peak queued session input {peak.max} bytes (bound {bound})")
        assert_serving(lm)
        await good.stop()
        await lm.stop()
    run(main(), lm)
    assert_contained(log)
    assert lm.check() == []


# --- 9. need_image, again and again ---------------------------------------------------------

def test_a_seller_asking_for_one_image_200_times_is_not_read_past_its_budget(lm, log):
    img = tiny_image(256 << 10)  # 256 KiB: 50 MiB if every answer were queued at once

    async def main():
        await lm.start()
        evil = await ready_seller(lm.sell("eve", CHEAP))
        good = await ScriptedSeller.connect(lm.sell("alice", ASK))
        honest = await Honest.connect(lm)
        mal, md = await buyer_peer(bait_task(lm), img)
        await mal.send("submit", b"bait", ref="bait", image=md)
        await mal.expect("accepted")
        task = await evil.expect("task")
        assert task["image"] == md
        conn = lm.market.sellers[evil.welcome["order"], ""]
        frame_len = len(img) + 4096
        bound = CONN_BUDGET + frame_len
        peak = Peak(lambda: conn.buffered)
        evil.writer.write(protocol.encode("need_image", image=md) * 200)
        await evil.writer.drain()
        await until(lambda: conn.paused, "the market stops reading the seller")
        await honest.round(3)
        assert conn.paused and peak.max <= bound, (peak.max, bound)
        # it reads: every need_image is answered, once
        n = 0
        while n < 200:
            m = await evil.expect("image")
            assert m["image"] == md and m.payload == img
            n += 1
        assert await evil.sync() == []
        assert peak.stop() <= bound, (peak.max, bound)
        print(f"peak queued to the seller {peak.max} bytes (bound {bound})")
        await evil.close()  # the bait is lost on eve and done by alice
        assert (await mal.expect("done")).payload == b"tiab"
        await honest.round(2)
        assert_serving(lm)
        await good.stop()
        await lm.stop()
    run(main(), lm)
    assert_contained(log)
    assert lm.balance("eve") == 0
    assert lm.check() == []
