"""The market server's resident memory under hostile peers.

A market server runs as its own process (SQLite store, one seller daemon
selling the echo job).  One attack at a time, from this process over TLS:

  unread-results   a buyer submits 48 tasks of 1 MiB and never reads its
                   socket: their results must wait in the store, not in the
                   server's memory (4 MiB queued to it at most), and the
                   market stops reading it
  session-input    a buyer opens a session no seller can take and streams
                   64 MiB into it: the server holds 1 MiB and stops reading
  idle-sockets     2,000 sockets from one address that never speak TLS

During each the server's VmRSS is sampled every 20 ms; the row is the
largest growth over the RSS before the attack, in MiB, against the budget
docs/protocol.md gives for one attacking connection (goal <= 64 MiB:
a frame up to max_payload in reading is not counted, none is sent here).
An honest buyer's task runs after each attack: it must complete.

    /usr/bin/python3 -m bench.attack_rss [--quick]
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "src", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

GOAL_MIB = 64.0
MIB = 1 << 20


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sampler:
    """The peak VmRSS of a process while it runs, sampled every 20 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._task = None

    async def __aenter__(self):
        self.base = _rss_kib(self.pid)

        async def sample():
            while True:
                self.peak = max(self.peak, _rss_kib(self.pid))
                await asyncio.sleep(0.02)
        self._task = asyncio.create_task(sample())
        return self

    async def __aexit__(self, *exc):
        self._task.cancel()
        self.peak = max(self.peak, _rss_kib(self.pid))

    @property
    def growth_mib(self) -> float:
        return max(0, self.peak - self.base) / 1024


async def _buyer(order):
    from test_e2e_support import job
    from test_market_peers import Peer
    b = await Peer.open(order, "buyer")
    img = job("echo").pack()
    d = job("echo").digest
    await b.send("image", img, image=d)
    await b.expect("image_ok", 30)
    return b, d


async def _unread_results(order, n: int) -> None:
    b, d = await _buyer(order)
    data = os.urandom(MIB)

    async def submit():
        for i in range(n):
            await b.send("submit", data, ref=f"u{i}", image=d)
    try:  # the market stops reading us once our results wait: our sends then wait too
        await asyncio.wait_for(submit(), 6)
    except asyncio.TimeoutError:
        pass
    b.writer.transport.abort()


async def _session_input(order, size: int) -> None:
    from cpushare import protocol
    b, d = await _buyer(order)
    await b.send("open", ref="s", image=d, cpu_ms=1000)
    session = (await b.expect("opened", 30))["session"]
    frame = protocol.encode("stream", os.urandom(MIB), session=session, eof=False)

    async def flood():
        for _ in range(size // MIB):
            b.writer.write(frame)
            await b.writer.drain()
    try:
        await asyncio.wait_for(flood(), 4)
    except asyncio.TimeoutError:
        pass  # the market stopped reading us: the point
    b.writer.transport.abort()


async def _idle_sockets(port: int, n: int) -> None:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.bind(("127.0.0.2", 0))
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
        if len(socks) % 250 == 0:
            await asyncio.sleep(0.02)
    await asyncio.sleep(2)
    for s in socks:
        s.close()


def _honest(order) -> bool:
    from cpushare.buyer import run_tasks
    from test_e2e_support import job
    r = run_tasks(order, job("echo"), [b"still served"])
    return r[0].ok and r[0].output == b"still served"


def run(quick: bool = False) -> dict:
    import resource
    from cpushare.order import load_buy
    from test_e2e_support import LocalMarket
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = {}
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-") as tmp:
        m = LocalMarket(Path(tmp))
        try:
            m.account("buyer", 1_000_000)
            m.account("mallory", 1_000_000)
            m.account("alice")
            m.serve()
            m.seller(m.sell_order("alice", "alice-cpu0", price="1.000"))
            honest = load_buy(m.buy_order("buyer", "buyer"))
            greedy = load_buy(m.buy_order("mallory", "mallory"))
            cheap = load_buy(m.buy_order("mallory", "mallory-low", price="0.001"))
            assert _honest(honest), "the honest buyer's task failed before any attack"
            pid = m.server.pid
            attacks = (
                ("unread-results", lambda: _unread_results(greedy, 16 if quick else 48)),
                ("session-input", lambda: _session_input(cheap, (16 if quick else 64) * MIB)),
                ("idle-sockets", lambda: _idle_sockets(m.port, 500 if quick else 2000)),
            )
            for name, attack in attacks:
                async def measured():
                    async with Sampler(pid) as s:
                        await attack()
                    return s
                s = asyncio.run(measured())
                results[name] = {"rss_growth_mib": s.growth_mib, "rss_before_mib": s.base / 1024,
                                 "honest_served_after": _honest(honest)}
            ledger = m.ledger_check()
        finally:
            m.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if ledger.returncode != 0:
        raise RuntimeError(f"bench.attack_rss: ledger check failed:\n{ledger.stdout}")
    worst = max(results, key=lambda k: results[k]["rss_growth_mib"])
    return {"measured": results[worst]["rss_growth_mib"], "worst": worst, "goal": GOAL_MIB,
            "attacks": results,
            "honest_served": all(r["honest_served_after"] for r in results.values())}


def main(argv: list[str]) -> int:
    t0 = time.time()
    r = run(quick="--quick" in argv)
    print("market server RSS under attack (growth over the RSS before it):")
    for name, a in r["attacks"].items():
        print(f"  {name:15} +{a['rss_growth_mib']:.1f} MiB (from {a['rss_before_mib']:.0f} MiB); "
              f"an honest task after it: {'served' if a['honest_served_after'] else 'FAILED'}")
    print(f"  worst: {r['worst']}, +{r['measured']:.1f} MiB (goal <= {GOAL_MIB:g}); "
          f"{time.time() - t0:.0f} s")
    return 0 if r["honest_served"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
