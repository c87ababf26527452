"""Relay throughput: large inputs and outputs through the market.

What is timed, for the market: a buyer (this process) submits one task with
SIZE (32 MiB) of random input to the echo job, and the clock stops when its
`done` has arrived with SIZE bytes of output, checked equal to the input.
On the way: buyer -> server (which stores the input, fsync, before it
answers `accepted`) -> seller -> the job in the sandbox (through pipes) ->
seller (hashes the output as it comes and sends it on in 1 MiB `output`
frames while the job runs) -> server (hashes the pieces as they come and,
redundancy being 1, forwards each to the buyer at once; at the `result`
it checks the digest, stores the output and settles, one fsync'd commit)
-> buyer (`done`, with the last piece).  The image is cached on
the seller beforehand (a warm-up task), connections are made before the
clock starts.

What is timed, for the plain copy: the same SIZE random bytes sent by a
TLS client (the same asyncio + OpenSSL stack, the market's certificates,
1 MiB writes paced by drain) to a TLS echo server in another process over
loopback, and read back until SIZE bytes have returned.  Both directions
run at once (the echo server writes back what it reads), so this is the
cost of one TLS hop each way for the same bytes in and out, with no store,
hashing or job.

Both are run in turns (plain, market, plain, market, ...) in one run; the
best round of each is kept.

The row's measure is the market server's CPU per relayed byte against the
echo server's (the plain copy's one TLS hop each way): every byte crosses
two TLS hops each way in the market, so 2.0 is the floor; goal <= 2.5.
Also printed: the market server's peak RSS during the relay (VmHWM), and
the throughput ratio plain seconds / market seconds, which two TLS hops on
two cores cap below 0.5 whatever the market does (see the ceiling below).

Printed beside the ratio: the CPU seconds each side used per round (the
plain copy: this process and the echo server; the market: this process,
the server and the seller, without the job and the sandbox's zygote).
Their quotient says how much of the gap is work and how much is waiting:
the input still travels store-and-forward (buyer -> server -> seller), the
output is cut through (seller -> server -> buyer, in pieces while the job
runs).

Also printed: the ceiling this machine puts on the ratio.  Every byte
crosses two TLS hops each way through the market and one through the plain
copy, so the market's TLS work alone is twice the plain copy's CPU; spread
over every core with nothing else to do, it takes at least
2 x plain CPU / cores, and the ratio is at most
plain seconds x cores / (2 x plain CPU).  When the plain copy already keeps
the cores busy (it does on 2 cores) that is about 0.5 before the market
hashes, stores or runs anything.

    /usr/bin/python3 bench/relay.py [--quick]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "src", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

GOAL = 2.5  # market server CPU per byte / plain copy's (2.0: two TLS hops)
MIB = 1 << 20


def _hwm_kib(pid: int) -> int:
    """Peak resident memory of a process so far (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far (its own, not its children's)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the plain TLS copy ---------------------------------------------------------

def _echo_server(port: int, ca: str, cert: str, key: str) -> None:
    """Run in a child process: a TLS echo server on 127.0.0.1:port."""
    from cpushare import protocol

    async def handle(reader, writer):
        while chunk := await reader.read(1 << 20):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def main():
        ctx = protocol.server_context(ca, cert, key)
        server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=ctx)
        print("listening", flush=True)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


async def _tls_copy(port: int, order, data: bytes) -> float:
    from cpushare import protocol
    ctx = protocol.client_context(order.ca_pem, order.cert_pem, order.key_pem)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="127.0.0.1")
    t0 = time.perf_counter()

    async def send():
        view = memoryview(data)
        for i in range(0, len(data), 1 << 20):
            writer.write(view[i:i + (1 << 20)])
            await writer.drain()
    sender = asyncio.create_task(send())
    got = 0
    while got < len(data):
        chunk = await reader.read(1 << 20)
        if not chunk:
            raise RuntimeError(f"bench.relay: the TLS echo server closed after {got} bytes")
        got += len(chunk)
    await sender
    seconds = time.perf_counter() - t0
    writer.close()
    return seconds


# --- through the market --------------------------------------------------------

async def _market_copy(order, data: bytes) -> float:
    from cpushare.buyer import Market
    from test_e2e_support import job
    async with Market(order) as m:
        await m.upload(job("echo"))
        t0 = time.perf_counter()
        async for r in m.map(job("echo"), [data]):
            seconds = time.perf_counter() - t0
            if not r.ok or r.output != data:
                raise RuntimeError(f"bench.relay: the echo task failed or changed the data: "
                                   f"{r.reason} ({len(r.output)} bytes back)")
        return seconds


def run(quick: bool = False) -> dict:
    from cpushare.order import load_buy
    from test_e2e_support import LocalMarket, env, free_port
    size = (8 if quick else 32) * MIB
    rounds = 2 if quick else 5  # (CPU per byte varies from round to round: the median)
    data = os.urandom(size)
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-") as tmp:
        m = LocalMarket(Path(tmp))
        echo = None
        try:
            m.account("buyer", 1_000_000)
            m.account("alice")
            m.serve()
            m.seller(m.sell_order("alice", "alice-cpu0"))
            order = load_buy(m.buy_order("buyer"))
            ca_cert, _ = m.ca_credentials()
            import sqlite3
            db = sqlite3.connect(f"file:{m.db}?mode=ro", uri=True)
            meta = dict(db.execute("SELECT key, value FROM meta"))
            db.close()
            port = free_port()
            echo = subprocess.Popen(
                [sys.executable, __file__, "--tls-echo-server", str(port)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env(), text=True)
            echo.stdin.write("\0".join((ca_cert, meta["server_cert"], meta["server_key"])))
            echo.stdin.close()
            if echo.stdout.readline().strip() != "listening":
                raise RuntimeError("bench.relay: the TLS echo server did not start")
            asyncio.run(_market_copy(order, data[:MIB]))  # warm up: image cached
            plain, market = [], []
            plain_cpu, market_cpu = [], []
            echo_cpu, server_cpu = [], []  # the one process that relays, each side
            sides = {"plain": [echo.pid], "market": [m.server.pid,
                                                     *(p.pid for p in m.sellers.values())]}
            for _ in range(rounds):  # interleaved, so both see the same machine
                for name, copy, times, cpus in (
                        ("plain", lambda: _tls_copy(port, order, data), plain, plain_cpu),
                        ("market", lambda: _market_copy(order, data), market, market_cpu)):
                    relay_pid = sides[name][0]
                    before = time.process_time() + sum(_cpu(p) for p in sides[name])
                    relay_before = _cpu(relay_pid)
                    times.append(asyncio.run(copy()))
                    cpus.append(time.process_time() + sum(_cpu(p) for p in sides[name])
                                - before)
                    (echo_cpu if name == "plain" else server_cpu).append(
                        _cpu(relay_pid) - relay_before)
            server_hwm_kib = _hwm_kib(m.server.pid)
            ledger = m.ledger_check()
        finally:
            if echo is not None:
                echo.kill()
                echo.wait()
            m.close()
    if ledger.returncode != 0:
        raise RuntimeError(f"bench.relay: ledger check failed:\n{ledger.stdout}{ledger.stderr}")
    t_plain, t_market = min(plain), min(market)
    c_plain = sorted(plain_cpu)[len(plain_cpu) // 2]
    c_market = sorted(market_cpu)[len(market_cpu) // 2]
    ceiling = t_plain * (os.cpu_count() or 1) / (2 * c_plain)
    c_echo = sorted(echo_cpu)[len(echo_cpu) // 2]
    c_server = sorted(server_cpu)[len(server_cpu) // 2]
    return {"measured": c_server / c_echo, "cpu_per_byte_ratio": c_server / c_echo,
            "goal": GOAL, "ratio": t_plain / t_market,
            "echo_cpu_seconds": c_echo, "server_cpu_seconds": c_server,
            "server_hwm_mib": server_hwm_kib / 1024,
            "ceiling_tls_only": ceiling,
            "bytes": size, "plain_seconds": t_plain, "market_seconds": t_market,
            "plain_cpu_seconds": c_plain, "market_cpu_seconds": c_market,
            "cpu_ratio": c_plain / c_market,
            "tls_mib_per_s": 2 * size / MIB / t_plain,
            "relay_mib_per_s": 2 * size / MIB / t_market}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--tls-echo-server"]:
        ca, cert, key = sys.stdin.read().split("\0")
        _echo_server(int(argv[1]), ca, cert, key)
        return 0
    r = run(quick="--quick" in argv)
    size = r["bytes"] // MIB
    print(f"relay: {size} MiB in and {size} MiB out of one task, best of the rounds")
    print(f"  plain TLS copy over loopback: {r['tls_mib_per_s']:.0f} MiB/s")
    print(f"  through the market (buyer -> server -> seller -> sandbox and back): "
          f"{r['relay_mib_per_s']:.0f} MiB/s")
    print(f"  market server CPU per byte / echo server's: {r['cpu_per_byte_ratio']:.2f} "
          f"(goal <= {GOAL}; two TLS hops: 2.0) -- {r['server_cpu_seconds']:.2f} s vs "
          f"{r['echo_cpu_seconds']:.2f} s a round")
    print(f"  market server peak RSS: {r['server_hwm_mib']:.0f} MiB")
    print(f"  throughput ratio market/plain: {r['ratio']:.2f}")
    print(f"  CPU per round (median): plain {r['plain_cpu_seconds']:.2f} s, market "
          f"{r['market_cpu_seconds']:.2f} s (ratio {r['cpu_ratio']:.2f}); "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"  ceiling on this machine ({os.cpu_count()} cores) for a relay doing nothing but "
          f"its TLS: {r['ceiling_tls_only']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
