"""Seller connections one market server process holds, with heartbeats.

A market server (`python -m cpushare.market serve --heartbeat 1`) runs as
its own process; this benchmark opens connections to it as that many
distinct sell orders (each its own client certificate: a second connection
of one order would replace the first), in steps (1,000 first), each doing
the TLS handshake and `hello`, then answering every `ping` with `pong` and
never asking for work.  After several heartbeats it counts the connections
that are still up and have been pinged, and reads the server's resident
memory (VmRSS) before and after: memory per connection.

    /usr/bin/python3 -m bench.connections [--quick]
"""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

PYTHON = "/usr/bin/python3"
GOAL = 1000
HEARTBEAT = 2           # seconds between the server's pings
HOLD = 3                # heartbeats to hold every step for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"bench.connections: no VmRSS in /proc/{pid}/status")


class Seller:
    """One connection as a seller: hello, then pong to every ping."""

    def __init__(self, ctx, host: str, port: int):
        self.ctx, self.host, self.port = ctx, host, port
        self.pings = 0
        self.up = False
        self.error = ""
        self.writer = None

    async def connect(self) -> None:
        from cpushare import protocol
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ctx,
                                                       server_hostname=self.host)
        self.writer = writer
        await protocol.send(writer, "hello", version=1, role="seller",
                            software="cpushare-bench/connections")
        m = await protocol.read_message(reader)
        if m is None or m.type != "welcome":
            raise RuntimeError(f"expected welcome, got {m.type if m else 'end of stream'}"
                               + (f": {m.get('message')}" if m is not None else ""))
        self.up = True
        self.task = asyncio.ensure_future(self._serve(reader, writer))

    async def _serve(self, reader, writer) -> None:
        from cpushare import protocol
        try:
            while True:
                m = await protocol.read_message(reader)
                if m is None:
                    break
                if m.type == "ping":
                    self.pings += 1
                    await protocol.send(writer, "pong", t=m.get("t", 0))
        except Exception as e:      # counted as a dropped connection
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.up = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _orders(db: str, count: int, start: int, out: Path) -> list:
    """`count` sell orders of one account, as ssl contexts."""
    from cpushare import order as orders
    from cpushare import protocol
    from cpushare.market import admin
    store = admin.open_store(db, "normal")
    ctxs = []
    try:
        for i in range(start, start + count):
            path = out / f"s{i}.cpu"
            admin.add_sell_order(store, "sellers", 10, str(path))
            o = orders.load_sell(path)
            ctxs.append((protocol.client_context(o.ca_pem, o.cert_pem, o.key_pem), o.host, o.port))
    finally:
        close = getattr(store, "close", None)
        if close:
            close()
    return ctxs


def run(quick: bool = False) -> dict:
    from cpushare.market import admin

    steps = (1000,) if quick else (1000, 2000, 4000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = steps[-1] + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, soft), hard), hard))
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-conn-") as tmp:
        db = str(Path(tmp, "market.db"))
        port = _free_port()
        admin.init(db, f"127.0.0.1:{port}")
        store = admin.open_store(db, "normal")
        admin.add_account(store, "sellers")
        getattr(store, "close", lambda: None)()
        log = open(Path(tmp, "server.log"), "wb")
        server = subprocess.Popen([PYTHON, "-m", "cpushare.market", "--db", db, "serve",
                                   "--heartbeat", str(HEARTBEAT), "--synchronous", "normal",
                                   "--log-level", "warning"],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
        try:
            deadline = time.monotonic() + 30
            while True:
                if server.poll() is not None:
                    raise RuntimeError("bench.connections: the market server exited:\n"
                                       + Path(tmp, "server.log").read_text(errors="replace"))
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("bench.connections: the server does not listen") from None
                    time.sleep(0.05)
            time.sleep(0.3)
            rss0 = _rss_kib(server.pid)
            result = asyncio.run(_steps(db, steps, Path(tmp), server.pid))
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
    best = max((s for s in result if s["held"] == s["opened"] == s["target"]),
               key=lambda s: s["held"], default=result[0])
    per_conn = (best["rss_kib"] - rss0) / max(best["held"], 1)
    return {
        "name": "seller connections held by one server, heartbeats",
        "measured": best["held"],
        "unit": "connections",
        "goal": f">= {GOAL}",
        "pass": best["held"] >= GOAL,
        "detail": {"heartbeat_s": HEARTBEAT, "held_for_heartbeats": HOLD,
                   "server_rss_idle_kib": rss0, "memory_per_connection_kib": round(per_conn, 1),
                   "steps": result},
    }


async def _steps(db: str, steps, tmp: Path, pid: int) -> list[dict]:
    sellers: list[Seller] = []
    out = []
    sem = asyncio.Semaphore(64)

    async def open_one(s: Seller) -> None:
        async with sem:
            try:
                await s.connect()
            except Exception as e:
                s.error = f"{type(e).__name__}: {e}"

    # every order first: issuing them blocks, and connections that are
    # already up must keep answering pings meanwhile
    ctxs = _orders(db, steps[-1], 0, tmp)
    try:
        for target in steps:
            new = [Seller(*c) for c in ctxs[len(sellers):target]]
            t0 = time.monotonic()
            await asyncio.gather(*(open_one(s) for s in new))
            connect_s = time.monotonic() - t0
            sellers.extend(new)
            opened = sum(s.up for s in sellers)
            pings_before = [s.pings for s in sellers]
            await asyncio.sleep(HOLD * HEARTBEAT + 0.5)
            held = sum(1 for s, p in zip(sellers, pings_before) if s.up and s.pings >= p + 2)
            errors = sorted({s.error for s in sellers if s.error})[:3]
            out.append({"target": target, "opened": opened, "held": held,
                        "connect_seconds": round(connect_s, 2), "rss_kib": _rss_kib(pid),
                        "errors": errors})
            if held < target:
                break
    finally:
        for s in sellers:
            s.close()
        await asyncio.sleep(0.2)
    return out


if __name__ == "__main__":
    import json
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
