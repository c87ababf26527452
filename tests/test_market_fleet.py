"""Several `cpushare-server serve` processes on one PostgreSQL database.

Real processes on loopback, a real PostgreSQL cluster (tests/pgcluster.py):
the buyer is connected to one process and every seller to the others, so
each result crossed processes (the shared queue, NOTIFY).  Then processes
are killed with -9 in the middle of the work: their sellers and buyers
reconnect to the others, a surviving process takes over their tasks (the
test waits for it before it starts a successor, as systemd's Restart=
would), and at the end every task has its result, none was paid twice,
the buyer's spending is exactly the sellers' earnings and `ledger check`
holds, after every kill too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from test_market_crash import PYTHON, SRC, buyer_forever, seller_forever
from test_market_peers import LoopbackMarket, free_port

# Enough that the survivors cannot finish the work while the test waits for
# a takeover (about a second): every kill is mid-run.  Each seller takes
# PAUSE a task, so the work's rate is bounded by the sellers (3 at most 250
# tasks/s each), not by how fast the market is (1,000 tasks/s and more).
TASKS = 2000
PAUSE = 0.004
BID = 360_000


class Proc:
    """One serve process of the market, on `port`."""

    def __init__(self, lm: LoopbackMarket, port: int, log):
        self.lm, self.port, self.log = lm, port, log
        self.p: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=SRC)
        self.p = subprocess.Popen(
            [PYTHON, "-m", "cpushare.market", "--db", self.lm.db, "serve", "--listen",
             f"127.0.0.1:{self.port}", "--log-level", "debug"],
            env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while True:
            assert self.p.poll() is None, f"the server exited with {self.p.returncode}"
            if _listening(self.p.pid, self.port):
                return
            assert time.monotonic() < deadline, "the server did not listen"
            time.sleep(0.02)

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            self.p.wait(15)


def _listening(pid: int, port: int) -> bool:
    """Whether process `pid` has a socket listening on `port` (several may
    share it: SO_REUSEPORT)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                         text=True).stdout
    return f"pid={pid}," in out


def _state(lm: LoopbackMarket) -> str:
    """The shared state, for a failure's message."""
    store = lm.open_store()
    try:
        q = store.db.execute
        return (f"servers {q('SELECT id FROM servers ORDER BY id').fetchall()}, homes "
                f"{q('SELECT * FROM buyer_homes').fetchall()}, tasks by state, owner, "
                f"delivered: {q('SELECT state, owner, delivered, COUNT(*) FROM tasks GROUP BY 1, 2, 3 ORDER BY 1, 2, 3').fetchall()}")
    finally:
        store.close()


def _servers(lm: LoopbackMarket) -> int:
    store = lm.open_store()
    try:
        return store.db.execute("SELECT COUNT(*) FROM servers").fetchone()[0]
    finally:
        store.close()


@pytest.mark.parametrize("n", [2, 3])
def test_processes_share_the_work_and_take_over_after_kill9(tmp_path, pg_cluster, n):
    lm = LoopbackMarket(tmp_path, pg_cluster.database())
    lm.account("buyer", 10_000_000)
    for name in ("alice", "bob", "carol"):
        lm.account(name)
    sells = [lm.sell("alice", 36_000), lm.sell("bob", 72_000), lm.sell("carol", 54_000)]
    buy = lm.buy("buyer", BID, max_cpu_seconds=2)
    lm.close()
    log = open(tmp_path / "server.log", "ab")
    # process 0 is the buyer's; the others share one address (SO_REUSEPORT)
    # and have every seller
    home, shared = free_port(), free_port()
    procs = [Proc(lm, home, log)] + [Proc(lm, shared, log) for _ in range(n - 1)]
    # (which to kill, after how many results); each is succeeded once taken over
    kills = [(1, TASKS // 5), (0, 2 * TASKS // 5)]
    if n == 3:
        kills.append((2, 3 * TASKS // 5))
    results: dict[str, bytes] = {}
    where: list[int] = []
    checks = []

    async def main():
        stop, all_done = asyncio.Event(), asyncio.Event()
        for p in procs:
            p.start()
        seller_ports = [shared, home]  # (home only once no process has the shared address)
        tasks = [asyncio.create_task(seller_forever(o, stop, seller_ports, PAUSE))
                 for o in sells]
        tasks.append(asyncio.create_task(
            buyer_forever(buy, results, all_done, [home, shared], TASKS, where)))
        try:
            for victim, after in kills:
                deadline = time.monotonic() + 60
                while len(results) < after:
                    assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
                    assert time.monotonic() < deadline, f"{len(results)} results only: {_state(lm)}"
                    await asyncio.sleep(0.002)
                if victim == 1:  # up to here the buyer's process had no seller
                    assert where == [home]
                procs[victim].kill()
                store = lm.open_store()
                checks.append((len(results), store.check()))
                store.close()
                # a survivor takes its tasks over (its row leaves `servers`)
                deadline = time.monotonic() + 20
                while _servers(lm) != n - 1:
                    assert time.monotonic() < deadline, "no process took over the dead one's"
                    await asyncio.sleep(0.05)
                procs[victim].start()
            try:
                await asyncio.wait_for(asyncio.shield(tasks[-1]), 90)
            except asyncio.TimeoutError:
                raise AssertionError(f"{len(results)} results only: {_state(lm)}") from None
            assert all_done.is_set()
        finally:
            stop.set()
            tasks[-1].cancel()  # (the buyer, if it is still waiting)
            await asyncio.gather(*tasks, return_exceptions=True)
            for p in procs:
                p.stop()

    try:
        asyncio.run(main())
    finally:
        log.close()
        text = open(tmp_path / "server.log").read()
        print(text[-4000:], file=sys.stderr)
    for k, problems in checks:
        assert problems == [], f"after a kill with {k} results in: {problems}"
    assert all(k < TASKS for k, _ in checks)
    assert results == {f"r{i}": (b"input %d" % i)[::-1] for i in range(TASKS)}
    assert "took over" in text
    assert "Traceback" not in text
    store = lm.open_store()
    try:
        assert store.check() == []
        assert store.ledger_summary()["escrow"] == 0
        spent = 10_000_000 - store.account("buyer").balance_milli
        earned = sum(store.account(a).balance_milli for a in ("alice", "bob", "carol"))
        assert spent == earned > 0
        q = store.db.execute
        assert q("SELECT COUNT(*) FROM tasks WHERE state = 'queued'").fetchone()[0] == 0
        settled = q("SELECT task_id, COUNT(*) FROM transactions WHERE kind = 'settle' "
                    "GROUP BY task_id").fetchall()
        assert len(settled) == q("SELECT COUNT(*) FROM tasks").fetchone()[0] >= TASKS
        assert all(c == 1 for _, c in settled), "a task was paid twice"
        assert q("SELECT COUNT(*) FROM tasks WHERE delivered = 0").fetchone()[0] == 0
    finally:
        store.close()
