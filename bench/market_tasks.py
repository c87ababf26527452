"""Tiny tasks through the market: tasks per second dispatched, run and settled.

One market server, two local sellers (two accounts), one buyer; every task
is the echo job on a few bytes, so what is measured is the market's own
cost per task: submit, escrow, match, relay, run in the sandbox, result,
settlement, `done`.  Printed beside it, measured in the same run: the rate
of the bare sandbox (the same job, run serially in this process), times
two sellers; that is the ceiling the market could reach on this machine.

Goal: >= 1,000 tasks/s.  For scale: BOINC reports about 100 tasks/s for one
server machine (8.8 M/day), one HTCondor schedd sustains about 55 jobs/s.

The same run is made on each store, side by side: the SQLite file (the
default) and a PostgreSQL database of a throwaway cluster (tests/pgcluster;
skipped, and said so, where the machine has no PostgreSQL server), one
market process each.  The CPU per task of PostgreSQL's own processes (the
postmaster and its backends) is counted beside the market's; the row's
ratio is PostgreSQL's CPU per task (market + database) to SQLite's (goal
of the store's issue: no worse than 1.5x).

    /usr/bin/python3 bench/market_tasks.py [--quick]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "src", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

GOAL = 1000.0
BOINC = 100.0
CONDOR = 55.0


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far (its own, not its children's)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sandbox_rate(n: int) -> float:
    from cpushare import sandbox
    from test_e2e_support import job
    image = job("echo")
    limits = sandbox.Limits(cpu_seconds=5, wall_seconds=10, memory=64 << 20, output=1 << 20)
    t0 = time.perf_counter()
    for i in range(n):
        r = sandbox.run(image, b"task %d" % i, limits)
        if r.exit_status != 0:
            raise RuntimeError(f"bench.market_tasks: the echo job failed locally: {r}")
    return n / (time.perf_counter() - t0)


async def _buy(order, n: int) -> tuple[float, int]:
    from cpushare.buyer import Market
    from test_e2e_support import job
    inputs = [b"task %d" % i for i in range(n)]
    async with Market(order) as m:
        await m.upload(job("echo"))
        bad = 0
        t0 = time.perf_counter()
        async for r in m.map(job("echo"), inputs):
            if not r.ok or r.output != inputs[r.index]:
                bad += 1
        return time.perf_counter() - t0, bad


def _pg_cpu(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL cluster's processes: the postmaster and its children."""
    total = _cpu(postmaster)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == postmaster:
                    total += _cpu(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return total


def _db_counts(url: str) -> dict:
    """The database's commits, rows written and statements run so far."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("SELECT pg_stat_clear_snapshot()")
        commits, ins, upd, dele = c.execute(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
            "WHERE datname = current_database()").fetchone()
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        calls = c.execute("SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements s JOIN "
                          "pg_database d ON d.oid = s.dbid WHERE d.datname = "
                          "current_database()").fetchone()[0]
    return {"commits": commits, "rows_written": ins + upd + dele, "statements": int(calls)}


def _postmaster(pg) -> int:
    with open(os.path.join(pg.data, "postmaster.pid")) as f:
        return int(f.readline())


def run(quick: bool = False) -> dict:
    n = 600 if quick else 4000
    out = _run_one(n, None)
    try:
        import pgcluster
    except ImportError:
        pgcluster = None
    why = pgcluster.missing() if pgcluster else "tests/pgcluster.py is missing"
    if why:
        out["postgresql"] = f"skipped: {why}"
        return out
    pg = pgcluster.PgCluster.start()
    try:
        p = _run_one(n, pg)
    finally:
        pg.stop()
    sqlite_cpu = out["cpu_us_per_task"]["server"]
    pg_cpu = p["cpu_us_per_task"]["server"] + p["cpu_us_per_task"]["postgresql"]
    out["postgresql"] = {k: p[k] for k in ("tasks_per_second", "cpu_us_per_task", "seconds",
                                           "per_task")}
    out["pg_vs_sqlite_rate"] = p["tasks_per_second"] / out["tasks_per_second"]
    out["pg_vs_sqlite_cpu_per_task"] = pg_cpu / sqlite_cpu
    return out


def _run_one(n: int, pg) -> dict:
    from cpushare.order import load_buy
    from test_e2e_support import LocalMarket
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-") as tmp:
        m = LocalMarket(Path(tmp), db=pg.database() if pg else None)
        try:
            m.account("buyer", 1_000_000)
            m.account("alice")
            m.account("bob")
            m.serve()
            for name in ("alice", "bob"):
                m.seller(m.sell_order(name, f"{name}-cpu0"))
            order = load_buy(m.buy_order("buyer"))
            asyncio.run(_buy(order, 50))  # warm up: images cached, connections made
            pids = {"server": m.server.pid, **{k: p.pid for k, p in m.sellers.items()}}
            before = {k: _cpu(pid) for k, pid in pids.items()}
            pg0 = _pg_cpu(_postmaster(pg)) if pg else 0.0
            db0 = _db_counts(m.db) if pg else None
            buyer0 = time.process_time()
            seconds, bad = asyncio.run(_buy(order, n))
            cpu_us = {k: (_cpu(pid) - before[k]) / n * 1e6 for k, pid in pids.items()}
            cpu_us["buyer"] = (time.process_time() - buyer0) / n * 1e6
            if pg:
                cpu_us["postgresql"] = (_pg_cpu(_postmaster(pg)) - pg0) / n * 1e6
                db = {k: (v - db0[k]) / n for k, v in _db_counts(m.db).items()}
            ledger = m.ledger_check()
        finally:
            m.close()
    if bad:
        raise RuntimeError(f"bench.market_tasks: {bad} of {n} tasks failed")
    if ledger.returncode != 0:
        raise RuntimeError(f"bench.market_tasks: ledger check failed after the run:\n"
                           f"{ledger.stdout}{ledger.stderr}")
    rate = n / seconds
    if pg:
        return {"tasks_per_second": rate, "cpu_us_per_task": cpu_us, "seconds": seconds,
                "per_task": db}
    ceiling = 2 * _sandbox_rate(n // 4)
    return {"measured": rate, "tasks": n, "seconds": seconds, "tasks_per_second": rate,
            "cpu_us_per_task": cpu_us,
            "sandbox_ceiling_per_second": ceiling, "ratio_to_ceiling": rate / ceiling,
            "ratio_to_goal": rate / GOAL, "ratio_to_boinc": rate / BOINC,
            "ratio_to_condor": rate / CONDOR}


def main(argv: list[str]) -> int:
    r = run(quick="--quick" in argv)
    print(f"market tasks: {r['tasks']} tiny tasks, 2 sellers, redundancy 1: "
          f"{r['tasks_per_second']:.0f} tasks/s dispatched, run and settled")
    print(f"  bare sandbox x 2 sellers, same run: {r['sandbox_ceiling_per_second']:.0f} runs/s "
          f"-> market/sandbox ratio {r['ratio_to_ceiling']:.2f}")
    print("  CPU per task: " + ", ".join(f"{k} {v:.0f} us" for k, v in r["cpu_us_per_task"].items())
          + " (each seller's share over all tasks; jobs and the sandbox's zygote not included)")
    print(f"  ratio to the goal of {GOAL:.0f}/s: {r['ratio_to_goal']:.2f}; to BOINC's ~{BOINC:.0f}/s: "
          f"{r['ratio_to_boinc']:.1f}x; to an HTCondor schedd's ~{CONDOR:.0f}/s: "
          f"{r['ratio_to_condor']:.1f}x")
    p = r["postgresql"]
    if isinstance(p, str):
        print(f"  on PostgreSQL: {p}")
    else:
        print(f"  on PostgreSQL, one market process, same run: {p['tasks_per_second']:.0f} "
              f"tasks/s ({r['pg_vs_sqlite_rate']:.2f}x SQLite's); CPU per task: "
              + ", ".join(f"{k} {v:.0f} us" for k, v in p["cpu_us_per_task"].items())
              + f"; market + database CPU per task {r['pg_vs_sqlite_cpu_per_task']:.2f}x "
                f"SQLite's (goal <= 1.5)")
        d = p["per_task"]
        print(f"  per task on PostgreSQL: {d['statements']:.1f} statements, "
              f"{d['rows_written']:.1f} rows written, {d['commits']:.2f} commits")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
