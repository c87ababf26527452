"""Seller connections one market server process holds, with heartbeats.

A market server (`cpushare-server serve --heartbeat 2`, through
bench/connections_server.py, which adds the bench's probes) runs as its own
process; this benchmark opens connections to it as that many distinct sell
orders (each its own client certificate: a second connection of one order
would replace the first), in steps up to GOAL, from several client
processes (one Python process does not keep up with 10,000 TLS connections),
each from its own loopback address (the market admits at most 64 connections
in the handshake per source address).  Every connection does the TLS
handshake and `hello`, then answers every `ping` with `pong` and never asks
for work.  After several heartbeats it counts the connections that are still
up and have been pinged twice, and reads the server's memory:

  memory per connection  (VmRSS at the step - VmRSS idle) / connections held;
                         the goal is <= 64 KiB at GOAL connections
  breakdown              the server's smaps_rollup (anonymous memory), its C
                         heap in use (glibc mallinfo2: OpenSSL's part), its
                         Python objects by type, per connection; with
                         --probe tracemalloc the Python allocations by line
  pings                  when the clients got them, in bins of 0.1 s over the
                         last heartbeats: `ping_burst` is the busiest bin over
                         the mean (1 when spread evenly, about heartbeat/0.1
                         when every connection is pinged at once)

    /usr/bin/python3 -m bench.connections [--quick: one step, GOAL] [--steps 1000,5000]
        [--probe tracemalloc,keep_ssl_buffers,ssl_read=N] [--workers N]
        [--heartbeat S]

Probes (bench/connections_server.py) change the server only in the bench.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

PYTHON = "/usr/bin/python3"
GOAL = 10_000           # connections held by one server process
GOAL_KIB = 64           # ... at no more than this much server memory each
HEARTBEAT = 2           # seconds between the server's pings
HOLD = 3                # heartbeats to hold every step for
WORKERS = 4             # client processes
CONNECTING = 32         # handshakes at once per client process (the market admits 64)
BIN = 0.1               # seconds: ping arrival histogram


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"bench.connections: no VmRSS in /proc/{pid}/status")


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


# --- the client processes ------------------------------------------------------

class Seller:
    """One connection as a seller: hello, then pong to every ping."""

    __slots__ = ("path", "local", "pings", "mark", "up", "error", "writer", "task", "times")

    def __init__(self, path: str, local: str, times: list):
        self.path, self.local, self.times = path, local, times
        self.pings = self.mark = 0
        self.up = False
        self.error = ""
        self.writer = None
        self.task = None

    async def connect(self) -> None:
        from cpushare import order as orders
        from cpushare import protocol
        o = orders.load_sell(self.path)
        ctx = protocol.client_context(o.ca_pem, o.cert_pem, o.key_pem)
        reader, writer = await asyncio.open_connection(o.host, o.port, ssl=ctx,
                                                       server_hostname=o.host,
                                                       local_addr=(self.local, 0))
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
                    self.times.append(time.time())
                    await protocol.send(writer, "pong", t=m.get("t", 0))
        except Exception as e:      # counted as a dropped connection
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.up = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _worker() -> None:
    """A client process: JSON commands on stdin, one JSON answer each on stdout."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    first = json.loads(await stdin.readline())
    _raise_nofile(len(first["paths"]) + 256)
    times: list[float] = []
    sellers = [Seller(p, first["local"], times) for p in first["paths"]]
    sem = asyncio.Semaphore(CONNECTING)
    opened = 0

    async def open_one(s: Seller) -> None:
        async with sem:
            try:
                await s.connect()
            except Exception as e:
                s.error = f"{type(e).__name__}: {e}"

    def say(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await stdin.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "open":
            new = sellers[opened:cmd["n"]]
            opened = max(opened, cmd["n"])
            t0 = time.monotonic()
            await asyncio.gather(*(open_one(s) for s in new))
            say({"up": sum(s.up for s in sellers), "seconds": time.monotonic() - t0})
        elif cmd["cmd"] == "mark":
            for s in sellers:
                s.mark = s.pings
            times.clear()
            say({})
        elif cmd["cmd"] == "count":
            bins = Counter(int(t / BIN) for t in times if t >= cmd["since"])
            say({"up": sum(s.up for s in sellers),
                 "held": sum(1 for s in sellers if s.up and s.pings >= s.mark + 2),
                 "errors": sorted({s.error for s in sellers if s.error})[:3],
                 "bins": {str(k): v for k, v in bins.items()}})
        elif cmd["cmd"] == "quit":
            break
    for s in sellers:
        s.close()
    await asyncio.sleep(0.2)


class Client:
    """One client process, from its own loopback address."""

    def __init__(self, paths: list[str], local: str, env: dict):
        self.proc = subprocess.Popen([PYTHON, "-m", "bench.connections", "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     cwd=str(ROOT), text=True)
        self.size = len(paths)
        self.tell({"paths": paths, "local": local})

    def tell(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bench.connections: a client process ended")
        return json.loads(line)

    def stop(self) -> None:
        try:
            self.tell({"cmd": "quit"})
            self.proc.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def _ask(clients: list[Client], cmds: list[dict]) -> list[dict]:
    for c, cmd in zip(clients, cmds):
        c.tell(cmd)
    return [c.answer() for c in clients]


# --- the server ------------------------------------------------------------------

def _orders(db: str, count: int, out: Path) -> list[str]:
    """`count` sell orders of one account, as order files."""
    from cpushare.market import admin
    store = admin.open_store(db, "normal")
    paths = []
    try:
        for i in range(count):
            path = out / f"s{i}.cpu"
            admin.add_sell_order(store, "sellers", 10, str(path))
            paths.append(str(path))
    finally:
        getattr(store, "close", lambda: None)()
    return paths


def _server_stats(server: subprocess.Popen, path: Path) -> dict:
    """What bench/connections_server.py measures in the server (SIGUSR1)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    server.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline or server.poll() is not None:
            return {}
        time.sleep(0.1)
    return json.loads(path.read_text())


def _per_conn(stats: dict, idle: dict, n: int) -> dict:
    """The growth of the server's stats from idle, per connection."""
    if not stats or not idle or not n:
        return {}
    sm, sm0 = stats["smaps_rollup_kib"], idle["smaps_rollup_kib"]
    out = {"rss_kib": round((sm["Rss"] - sm0["Rss"]) / n, 1),
           "anonymous_kib": round((sm["Anonymous"] - sm0["Anonymous"]) / n, 1),
           "c_heap_in_use_kib": round((stats["malloc"]["in_use_kib"]
                                       - idle["malloc"]["in_use_kib"]) / n, 1)}
    if "tracemalloc_kib" in stats:
        out["python_traced_kib"] = round((stats["tracemalloc_kib"]
                                          - idle.get("tracemalloc_kib", 0)) / n, 1)
        idle_lines = {x["where"]: x["kib"] for x in idle.get("tracemalloc_lines", [])}
        out["python_by_line_bytes"] = {
            x["where"].replace(str(ROOT) + "/", ""):
                round((x["kib"] - idle_lines.get(x["where"], 0)) * 1024 / n)
            for x in stats["tracemalloc_lines"][:15]}
    objs, objs0 = stats["objects"], idle["objects"]
    out["python_objects"] = {k: round((v - objs0.get(k, 0)) / n, 2)
                             for k, v in objs.items() if (v - objs0.get(k, 0)) >= n / 2}
    return out


def run(quick: bool = False, steps=None, probes=(), workers: int = WORKERS,
        heartbeat: int = HEARTBEAT) -> dict:
    from cpushare.market import admin

    steps = tuple(steps or ((GOAL,) if quick else (1000, 2500, 5000, GOAL)))
    workers = max(1, min(workers, steps[-1]))
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-conn-") as tmp:
        db = str(Path(tmp, "market.db"))
        port = _free_port()
        admin.init(db, f"127.0.0.1:{port}")
        store = admin.open_store(db, "normal")
        admin.add_account(store, "sellers")
        getattr(store, "close", lambda: None)()
        t0 = time.monotonic()
        paths = _orders(db, steps[-1], Path(tmp))
        issue_s = time.monotonic() - t0
        stats_path = Path(tmp, "stats.json")
        env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin",
               "CPUSHARE_BENCH_STATS": str(stats_path),
               "CPUSHARE_BENCH_PROBE": ",".join(probes)}
        log = open(Path(tmp, "server.log"), "wb")
        # (the server raises its own descriptor limit; a soft limit of 1024
        # inherited from here would otherwise cap it)
        server = subprocess.Popen([PYTHON, "-m", "bench.connections_server", "--db", db,
                                   "serve", "--heartbeat", str(heartbeat),
                                   "--synchronous", "normal", "--log-level", "warning"],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  env=env, cwd=str(ROOT))
        clients: list[Client] = []
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
            nofile = int(Path(f"/proc/{server.pid}/limits").read_text().split(
                "Max open files")[1].split()[0])
            rss0 = _rss_kib(server.pid)
            idle = _server_stats(server, stats_path)
            size = math.ceil(len(paths) / workers)
            cenv = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin"}
            clients = [Client(paths[i * size:(i + 1) * size], f"127.0.0.{i + 2}", cenv)
                       for i in range(workers)]
            result = _steps(clients, steps, server, stats_path, idle, rss0, heartbeat)
        finally:
            for c in clients:
                c.stop()
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
    full = [s for s in result if s["held"] == s["opened"] == s["target"]]
    best = max(full, key=lambda s: s["held"], default=result[0])
    per_conn = (best["rss_kib"] - rss0) / max(best["held"], 1)
    return {
        "name": "seller connections held by one server, heartbeats",
        "measured": best["held"],
        "unit": "connections",
        "goal": f">= {GOAL} at <= {GOAL_KIB} KiB each",
        "pass": best["held"] >= GOAL and per_conn <= GOAL_KIB,
        "memory_per_connection_kib": round(per_conn, 1),
        "goal_kib": GOAL_KIB,
        "detail": {"heartbeat_s": heartbeat, "held_for_heartbeats": HOLD,
                   "client_processes": workers, "issue_orders_seconds": round(issue_s, 1),
                   "server_nofile_limit": nofile, "probes": list(probes),
                   "server_rss_idle_kib": rss0, "memory_per_connection_kib": round(per_conn, 1),
                   "steps": result},
    }


def _split(total: int, clients: list[Client]) -> list[int]:
    """`total` connections over the clients, as even as their sizes allow."""
    base, extra = divmod(total, len(clients))
    return [min(c.size, base + (i < extra)) for i, c in enumerate(clients)]


def _steps(clients, steps, server, stats_path: Path, idle: dict, rss0: int,
           heartbeat: int) -> list[dict]:
    out = []
    for target in steps:
        t0 = time.monotonic()
        got = _ask(clients, [{"cmd": "open", "n": n} for n in _split(target, clients)])
        connect_s = time.monotonic() - t0
        opened = sum(g["up"] for g in got)
        _ask(clients, [{"cmd": "mark"}] * len(clients))
        since = time.time() + heartbeat  # (the first heartbeat after the mark: whole ones)
        time.sleep(HOLD * heartbeat + 0.5)
        got = _ask(clients, [{"cmd": "count", "since": since}] * len(clients))
        held = sum(g["held"] for g in got)
        rss = _rss_kib(server.pid)
        bins: Counter = Counter()
        for g in got:
            bins.update({int(k): v for k, v in g["bins"].items()})
        # whole bins between the first heartbeat after the mark and the count
        lo, hi = int(since / BIN) + 1, int(time.time() / BIN) - 1
        counts = [bins.get(b, 0) for b in range(lo, hi)]
        mean = sum(counts) / len(counts) if counts else 0
        stats = _server_stats(server, stats_path)
        step = {"target": target, "opened": opened, "held": held,
                "connect_seconds": round(connect_s, 2), "rss_kib": rss,
                "memory_per_connection_kib": round((rss - rss0) / max(held, 1), 1),
                "ping_burst": round(max(counts) / mean, 1) if mean else None,
                "pings_per_bin": {"mean": round(mean, 1), "max": max(counts, default=0),
                                  "min": min(counts, default=0)},
                "per_connection": _per_conn(stats, idle, held),
                "errors": sorted({e for g in got for e in g["errors"]})[:3]}
        out.append(step)
        print(f"bench.connections: {held} of {target} held, "
              f"{step['memory_per_connection_kib']} KiB per connection (goal <= {GOAL_KIB}), "
              f"ping burst x{step['ping_burst']}", file=sys.stderr)
        if held < target:
            break
    return out


def _arg(name: str, default: str | None = None) -> str | None:
    if name in sys.argv:
        return sys.argv[sys.argv.index(name) + 1]
    return default


if __name__ == "__main__":
    if "--worker" in sys.argv:
        asyncio.run(_worker())
        sys.exit(0)
    steps = _arg("--steps")
    r = run(quick="--quick" in sys.argv,
            steps=[int(x) for x in steps.split(",")] if steps else None,
            probes=[p for p in (_arg("--probe") or "").split(",") if p],
            workers=int(_arg("--workers", str(WORKERS))),
            heartbeat=int(_arg("--heartbeat", str(HEARTBEAT))))
    print(json.dumps(r, indent=2))
    print(f"held {r['measured']} connections at {r['memory_per_connection_kib']} KiB each "
          f"(goal >= {GOAL} at <= {GOAL_KIB} KiB each): "
          f"{'pass' if r['pass'] else 'FAIL'}", file=sys.stderr)
