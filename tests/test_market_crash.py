"""kill -9 of the market server at any moment: nothing minted or lost.

A real `cpushare-server serve` process is killed repeatedly while a
scripted buyer streams tasks to two scripted sellers that reconnect; after
every kill the ledger's invariants are checked on the database it left
behind, and at the end every task has its result and the buyer's spending
is exactly the sellers' earnings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time

from cpushare import protocol

from test_market_peers import LoopbackMarket, Peer, ScriptedSeller, image_digest, tiny_image

PYTHON = "/usr/bin/python3"
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
TASKS = 300
KILLS = 6
# tasks the buyer keeps submitted without a result: a restart delivers at most
# this many at once, so the kills fall while work remains
WINDOW = 32
BID = 360_000


def start_server(lm: LoopbackMarket, log) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC)
    sync = [] if lm.pg else ["--synchronous", "normal"]
    p = subprocess.Popen([PYTHON, "-m", "cpushare.market", "--db", lm.db, "serve", *sync],
                         env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while True:
        assert p.poll() is None, f"the server exited with {p.returncode}"
        try:
            socket.create_connection(("127.0.0.1", lm.port), 0.2).close()
            return p
        except OSError:
            assert time.monotonic() < deadline, "the server did not listen"
            time.sleep(0.02)


LOST = (OSError, ssl.SSLError, asyncio.IncompleteReadError, protocol.ProtocolError,
        asyncio.TimeoutError, AssertionError)


def connect_any(ports: list[int]) -> int | None:
    """The first of these loopback ports that accepts a connection, or None."""
    for port in ports:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return port
        except OSError:
            continue
    return None


async def seller_forever(o, stop: asyncio.Event, ports: list[int] | None = None,
                         pause: float = 0.0) -> None:
    """A seller that reconnects (to the first of `ports` that listens) until `stop`;
    each task takes it `pause` s."""
    while not stop.is_set():
        port = connect_any(ports or [o.port])
        if port is None:
            await asyncio.sleep(0.05)
            continue
        try:
            s = await ScriptedSeller.connect(dataclasses.replace(o, port=port),
                                             cpu_ms=random.randint(1, 3000), pause=pause)
        except LOST:
            await asyncio.sleep(0.02)
            continue
        done = asyncio.ensure_future(stop.wait())
        await asyncio.wait([s._run, done], return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        try:
            await s.stop()  # (raises what ended its loop: a frame cut by the kill, say)
        except LOST:
            s.peer.writer.transport.abort()


async def buyer_forever(o, results: dict[str, bytes], all_done: asyncio.Event,
                        ports: list[int] | None = None, tasks: int = TASKS,
                        where: list[int] | None = None) -> None:
    """A buyer of `tasks` tasks, WINDOW at a time, that reconnects (to the first
    of `ports` that listens: each port it got is appended to `where`) and
    resubmits what has no result, until every task has its result."""
    img = tiny_image()
    d = image_digest(img)
    while True:
        port = connect_any(ports or [o.port])
        if port is None:
            await asyncio.sleep(0.05)
            continue
        try:
            p = await Peer.open(dataclasses.replace(o, port=port), "buyer")
        except LOST:
            await asyncio.sleep(0.02)
            continue
        try:
            if where is not None:
                where.append(port)
            await p.send("image", img, image=d)
            await p.expect("image_ok")
            inflight: set[str] = set()
            nxt = 0

            async def fill() -> None:  # in order; what has a result is skipped
                nonlocal nxt
                while len(inflight) < WINDOW and nxt < tasks:
                    ref, nxt = f"r{nxt}", nxt + 1
                    if ref not in results:
                        inflight.add(ref)
                        await p.send("submit", b"input %s" % ref[1:].encode(), ref=ref,
                                     image=d)
            await fill()
            while True:
                m = await p.recv(timeout=None)
                if m is None:
                    break
                if m.type == "done":
                    if m.payload != (b"input " + m["ref"][1:].encode())[::-1]:
                        raise RuntimeError(f"a wrong result: {m}")
                    results[m["ref"]] = m.payload
                    inflight.discard(m["ref"])
                    await p.send("ack", task=m["task"])
                    await fill()
                elif m.type == "failed":
                    raise RuntimeError(f"task {m['ref']} failed: {m['message']}")
                if len(results) == tasks:
                    all_done.set()
                    await p.close()
                    return
        except LOST:  # the server was killed: reconnect, resubmit what has no result
            p.writer.transport.abort()
            await asyncio.sleep(0.02)


def test_kill9_during_a_stream_of_work_keeps_the_ledger_whole(tmp_path, market_db):
    lm = LoopbackMarket(tmp_path, market_db)
    lm.account("buyer", 10_000_000)
    lm.account("alice")
    lm.account("bob")
    sells = [lm.sell("alice", 36_000), lm.sell("bob", 72_000)]
    buy = lm.buy("buyer", BID, max_cpu_seconds=2)
    lm.close()
    log = open(tmp_path / "server.log", "ab")
    results: dict[str, bytes] = {}
    rng = random.Random(os.getpid())
    checks = []

    async def main():
        stop, all_done = asyncio.Event(), asyncio.Event()
        server = start_server(lm, log)
        tasks = [asyncio.create_task(seller_forever(o, stop)) for o in sells]
        tasks.append(asyncio.create_task(buyer_forever(buy, results, all_done)))
        try:
            for k in range(KILLS):
                # kill at spread points of the work, a random moment after each
                while len(results) < (k + 1) * TASKS // (KILLS + 3):
                    assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
                    await asyncio.sleep(0.002)
                await asyncio.sleep(rng.uniform(0, 0.02))
                server.send_signal(signal.SIGKILL)
                server.wait()
                store = lm.open_store()  # what the killed server left behind
                checks.append((len(results), store.check(), store.ledger_summary()))
                store.close()
                server = start_server(lm, log)
            await asyncio.wait_for(asyncio.shield(tasks[-1]), 60)  # the buyer has everything
            assert all_done.is_set()
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            server.send_signal(signal.SIGTERM)
            server.wait(10)

    asyncio.run(main())
    for n, problems, summary in checks:
        assert problems == [], f"after a kill with {n} results in: {problems}"
    assert len(checks) == KILLS
    # the kills fell in the middle of the work, not after it
    assert all(n < TASKS for n, _, _ in checks), [n for n, _, _ in checks]
    assert results == {f"r{i}": (b"input %d" % i)[::-1] for i in range(TASKS)}
    store = lm.open_store()
    try:
        assert store.check() == []
        assert store.ledger_summary()["escrow"] == 0
        spent = 10_000_000 - store.account("buyer").balance_milli
        earned = store.account("alice").balance_milli + store.account("bob").balance_milli
        assert spent == earned > 0
        q = store.db.execute
        assert q("SELECT COUNT(*) FROM tasks WHERE state = 'queued'").fetchone()[0] == 0
        assert q("SELECT COUNT(*) FROM tasks WHERE delivered = 0").fetchone()[0] == 0
    finally:
        store.close()
    print(open(tmp_path / "server.log").read()[-2000:], file=sys.stderr)
