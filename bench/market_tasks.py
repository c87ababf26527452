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
market process each; then a third row, two `serve` processes on one
PostgreSQL database (market/fleet.py), each on its own port: the buyer
and one seller on process A, the other seller on process B, so the tasks
B's seller runs cross processes (offered by A to the shared queue, claimed
by B, the result back to A by NOTIFY); how many did is counted from the
database (the tasks B held).  The CPU per task of PostgreSQL's own
processes (the postmaster and its backends) is counted beside the
market's (every market process of the row); a row's ratio is its CPU per
task (market + database) to SQLite's.

Goals of several processes on PostgreSQL, printed beside every row:
>= 2,000 tasks/s in total on this machine, and CPU per task (market +
database) no worse than 1.5x SQLite's.

    /usr/bin/python3 bench/market_tasks.py [--quick]
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
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
FLEET_GOAL_RATE = 2000.0  # tasks/s in total, several processes on PostgreSQL
FLEET_GOAL_CPU = 1.5  # CPU per task (market + database) to SQLite's, at most


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


def _last_task(url: str) -> int:
    import psycopg
    with psycopg.connect(url, autocommit=True) as c:
        return c.execute("SELECT COALESCE(MAX(id), 0) FROM tasks").fetchone()[0]


def _crossed(url: str, after: int, pids: dict[str, int]) -> dict:
    """Of the tasks after id `after`: how many each market process held at
    the end (it ran them on its sellers), and each seller account ran."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as c:
        servers = {pid: sid for sid, pid in c.execute("SELECT id, pid FROM servers")}
        owners = dict(c.execute("SELECT owner, COUNT(*) FROM tasks WHERE id > %s "
                                "GROUP BY owner", (after,)).fetchall())
        sellers = dict(c.execute(
            "SELECT a.name, COUNT(DISTINCT t.task_id) FROM attempts t JOIN accounts a "
            "ON a.id = t.seller_account_id WHERE t.task_id > %s GROUP BY a.name",
            (after,)).fetchall())
    held = {name: owners.pop(servers.get(pid), 0) for name, pid in pids.items()}
    if owners:  # (held by none of them: a server the bench did not start)
        held["other"] = sum(owners.values())
    return {"held": held, "run_by": sellers}


def _postmaster(pg) -> int:
    with open(os.path.join(pg.data, "postmaster.pid")) as f:
        return int(f.readline())


def _serve_at(m, port: int, name: str):
    """Another `serve` process of LocalMarket `m`'s database, on 127.0.0.1:port,
    stopped by m.close()."""
    from test_e2e_support import PYTHON, Proc, wait_for
    p = Proc([PYTHON, "-m", "cpushare.market", "--db", str(m.db), "serve", "--listen",
              f"127.0.0.1:{port}"], m.root / f"server-{name}.log", "server")
    m.procs.append(p)

    def listening():
        if not p.alive():
            raise AssertionError(f"market process {name} exited:\n{p.text()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False
    wait_for(listening, 30, f"market process {name} to listen on {port}")
    return p


def _point_at(path: Path, port: int) -> None:
    """The sell order file `path`, its server's port changed to `port`."""
    from cpushare.order import load_sell
    text, k = re.subn(r"(?m)^server = (.*):(\d+)$", lambda mo: f"server = {mo[1]}:{port}",
                      path.read_text(), count=1)
    if k != 1:
        raise RuntimeError(f"bench.market_tasks: no `server = host:port` line in {path}")
    path.write_text(text)
    if load_sell(path).port != port:
        raise RuntimeError(f"bench.market_tasks: {path} does not name port {port}")


def _log_lines(paths, pattern: str) -> list[str]:
    """The lines of the market processes' logs that match `pattern`."""
    out = []
    for path in paths:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        out += [f"{Path(path).name}: {line}" for line in text.splitlines()
                if re.search(pattern, line)]
    return out


def run(quick: bool = False) -> dict:
    n = 600 if quick else 4000
    load = [os.getloadavg()]
    try:
        return _run_all(n, load)
    finally:
        load.append(os.getloadavg())


def _run_all(n: int, load: list) -> dict:
    out = _run_one(n, None)
    out["load_average"] = load
    out["goals"] = {"tasks_per_second": FLEET_GOAL_RATE, "cpu_vs_sqlite": FLEET_GOAL_CPU,
                    "cpus": os.cpu_count()}
    sqlite_cpu = out["cpu_us_per_task"]["server"]
    rows = [_row("SQLite, 1 process", out, sqlite_cpu)]
    out["rows"] = rows
    try:
        import pgcluster
    except ImportError:
        pgcluster = None
    why = pgcluster.missing() if pgcluster else "tests/pgcluster.py is missing"
    if why:
        out["postgresql"] = out["postgresql_2_processes"] = f"skipped: {why}"
        return out
    pg = pgcluster.PgCluster.start()
    try:
        p = _run_one(n, pg)
        p2 = _run_one(n, pg, processes=2)
    finally:
        pg.stop()
    keys = ("tasks_per_second", "cpu_us_per_task", "seconds", "per_task", "log_errors",
            "log_warnings", "loop_waits")
    out["postgresql"] = {k: p[k] for k in keys}
    out["postgresql_2_processes"] = {k: p2[k] for k in keys + ("cpu_us_per_process",
                                                               "crossed")}
    rows.append(_row("PostgreSQL, 1 process", p, sqlite_cpu))
    rows.append(_row("PostgreSQL, 2 processes", p2, sqlite_cpu))
    out["pg_vs_sqlite_rate"] = p["tasks_per_second"] / out["tasks_per_second"]
    out["pg_vs_sqlite_cpu_per_task"] = rows[1]["cpu_vs_sqlite"]
    out["pg2_vs_sqlite_rate"] = p2["tasks_per_second"] / out["tasks_per_second"]
    out["pg2_vs_sqlite_cpu_per_task"] = rows[2]["cpu_vs_sqlite"]
    return out


def _row(label: str, r: dict, sqlite_cpu: float) -> dict:
    """A row of the side by side table: rate, CPU per task, against the goals."""
    cpu = r["cpu_us_per_task"]
    total = cpu["server"] + cpu.get("postgresql", 0.0)
    ratio = total / sqlite_cpu
    return {"row": label, "tasks_per_second": r["tasks_per_second"],
            "market_us": cpu["server"], "postgresql_us": cpu.get("postgresql"),
            "total_us": total, "cpu_vs_sqlite": ratio,
            "meets_rate": r["tasks_per_second"] >= FLEET_GOAL_RATE,
            "meets_cpu": ratio <= FLEET_GOAL_CPU}


def _run_one(n: int, pg, processes: int = 1) -> dict:
    from cpushare.order import load_buy
    from test_e2e_support import LocalMarket, free_port
    with tempfile.TemporaryDirectory(prefix="cpushare-bench-") as tmp:
        m = LocalMarket(Path(tmp), db=pg.database() if pg else None)
        try:
            m.account("buyer", 1_000_000)
            m.account("alice")
            m.account("bob")
            servers = {"A": m.serve("--listen", f"127.0.0.1:{m.port}")}
            if processes == 2:
                port_b = free_port()
                servers["B"] = _serve_at(m, port_b, "B")
            for name in ("alice", "bob"):
                path = m.sell_order(name, f"{name}-cpu0")
                if processes == 2 and name == "bob":
                    _point_at(path, port_b)
                m.seller(path)
            # the buyer on process A
            order = dataclasses.replace(load_buy(m.buy_order("buyer")), port=m.port)
            asyncio.run(_buy(order, 50))  # warm up: images cached, connections made
            pids = {**{f"server {k}": p.pid for k, p in servers.items()},
                    **{k: p.pid for k, p in m.sellers.items()}}
            before = {k: _cpu(pid) for k, pid in pids.items()}
            pg0 = _pg_cpu(_postmaster(pg)) if pg else 0.0
            db0 = _db_counts(m.db) if pg else None
            task0 = _last_task(m.db) if processes > 1 else 0
            buyer0 = time.process_time()
            seconds, bad = asyncio.run(_buy(order, n))
            each = {k: (_cpu(pid) - before[k]) / n * 1e6 for k, pid in pids.items()}
            cpu_us = {"server": sum(v for k, v in each.items() if k.startswith("server "))}
            cpu_us.update((k, v) for k, v in each.items() if not k.startswith("server "))
            cpu_us["buyer"] = (time.process_time() - buyer0) / n * 1e6
            if pg:
                cpu_us["postgresql"] = (_pg_cpu(_postmaster(pg)) - pg0) / n * 1e6
                db = {k: (v - db0[k]) / n for k, v in _db_counts(m.db).items()}
            if processes > 1:
                crossed = _crossed(m.db, task0, {k: p.pid for k, p in servers.items()})
            ledger = m.ledger_check()
        finally:
            m.close()
        logs = [p.log for p in m.procs if p.name == "server"]
        errors = _log_lines(logs, r"\b(ERROR|CRITICAL|Traceback)\b")
        waits = [re.search(r"on its way (\d+) times, (\d+) ms", line)
                 for line in _log_lines(logs, r"waited for a commit on its way")]
        loop_waits = {"times": sum(int(w[1]) for w in waits if w),
                      "ms": sum(int(w[2]) for w in waits if w)}
        warnings = _log_lines(logs, r"\bWARNING\b")
    if bad:
        raise RuntimeError(f"bench.market_tasks: {bad} of {n} tasks failed")
    if ledger.returncode != 0:
        raise RuntimeError(f"bench.market_tasks: ledger check failed after the run:\n"
                           f"{ledger.stdout}{ledger.stderr}")
    rate = n / seconds
    if pg:
        r = {"tasks_per_second": rate, "cpu_us_per_task": cpu_us, "seconds": seconds,
             "per_task": db, "log_errors": errors, "log_warnings": warnings,
             "loop_waits": loop_waits}
        if processes > 1:
            r["cpu_us_per_process"] = {k: v for k, v in each.items() if k.startswith("server ")}
            r["crossed"] = crossed
        return r
    ceiling = 2 * _sandbox_rate(n // 4)
    return {"measured": rate, "tasks": n, "seconds": seconds, "tasks_per_second": rate,
            "cpu_us_per_task": cpu_us, "log_errors": errors, "log_warnings": warnings,
            "sandbox_ceiling_per_second": ceiling, "ratio_to_ceiling": rate / ceiling,
            "ratio_to_goal": rate / GOAL, "ratio_to_boinc": rate / BOINC,
            "ratio_to_condor": rate / CONDOR}


def _cpu_line(cpu: dict) -> str:
    return ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items())


def main(argv: list[str]) -> int:
    r = run(quick="--quick" in argv)
    print(f"market tasks: {r['tasks']} tiny tasks, 2 sellers, redundancy 1: "
          f"{r['tasks_per_second']:.0f} tasks/s dispatched, run and settled")
    print(f"  bare sandbox x 2 sellers, same run: {r['sandbox_ceiling_per_second']:.0f} runs/s "
          f"-> market/sandbox ratio {r['ratio_to_ceiling']:.2f}")
    print("  CPU per task: " + _cpu_line(r["cpu_us_per_task"])
          + " (each seller's share over all tasks; jobs and the sandbox's zygote not included)")
    print(f"  ratio to the goal of {GOAL:.0f}/s: {r['ratio_to_goal']:.2f}; to BOINC's ~{BOINC:.0f}/s: "
          f"{r['ratio_to_boinc']:.1f}x; to an HTCondor schedd's ~{CONDOR:.0f}/s: "
          f"{r['ratio_to_condor']:.1f}x")
    p, p2 = r["postgresql"], r["postgresql_2_processes"]
    if isinstance(p, str):
        print(f"  on PostgreSQL: {p}")
    else:
        print(f"  on PostgreSQL, one market process, same run: {p['tasks_per_second']:.0f} "
              f"tasks/s ({r['pg_vs_sqlite_rate']:.2f}x SQLite's); CPU per task: "
              + _cpu_line(p["cpu_us_per_task"])
              + f"; market + database CPU per task {r['pg_vs_sqlite_cpu_per_task']:.2f}x "
                f"SQLite's (goal <= {FLEET_GOAL_CPU})")
        d = p["per_task"]
        print(f"  per task on PostgreSQL: {d['statements']:.1f} statements, "
              f"{d['rows_written']:.1f} rows written, {d['commits']:.2f} commits")
        for label, x in (("one process", p), ("two processes", p2)):
            w = x["loop_waits"]
            print(f"  the event loop waited for a commit on its way, {label}: {w['times']} "
                  f"times, {w['ms']} ms in all ({w['ms'] / x['seconds'] / 10:.1f}% of the run)")
        each = ", ".join(f"{k} {v:.0f} us" for k, v in p2["cpu_us_per_process"].items())
        print(f"  on PostgreSQL, two market processes on one database (buyer and alice on A, "
              f"bob on B), same run: {p2['tasks_per_second']:.0f} tasks/s "
              f"({r['pg2_vs_sqlite_rate']:.2f}x SQLite's); CPU per task: "
              + _cpu_line(p2["cpu_us_per_task"]) + f" (server: {each})")
        d = p2["per_task"]
        print(f"  per task on PostgreSQL, two processes: {d['statements']:.1f} statements, "
              f"{d['rows_written']:.1f} rows written, {d['commits']:.2f} commits")
        c = p2["crossed"]
        held = c["held"]
        secs = p2["seconds"]
        print(f"  crossed processes: {held.get('B', 0)} of {r['tasks']} tasks were held and "
              f"run by B (offered by A, claimed by B, the result back by NOTIFY), "
              f"{held.get('A', 0)} by A" + (f", {held['other']} by another" if "other" in held
                                            else "")
              + f" ({held.get('A', 0) / secs:.0f} + {held.get('B', 0) / secs:.0f} tasks/s)"
              + "; run by seller: " + ", ".join(f"{k} {v}" for k, v in
                                                  sorted(c["run_by"].items())))
    g = r["goals"]
    # (a row's tasks/s: in total, over all its market processes)
    print(f"  goals of several processes on PostgreSQL: >= {FLEET_GOAL_RATE:,.0f} tasks/s in "
          f"total on this machine ({g['cpus']} CPUs), CPU per task (market + database) "
          f"<= {FLEET_GOAL_CPU}x SQLite's")
    print(f"    {'row':24} {'tasks/s':>8} {'market us':>10} {'PostgreSQL us':>14} "
          f"{'total us':>9} {'x SQLite':>9}  {'>= ' + format(FLEET_GOAL_RATE, ',.0f') + '/s':>10}"
          f"  {'<= ' + str(FLEET_GOAL_CPU) + 'x':>8}")
    for row in r["rows"]:
        pgus = "-" if row["postgresql_us"] is None else f"{row['postgresql_us']:.0f}"
        print(f"    {row['row']:24} {row['tasks_per_second']:8.0f} {row['market_us']:10.0f} "
              f"{pgus:>14} {row['total_us']:9.0f} {row['cpu_vs_sqlite']:9.2f}  "
              f"{'met' if row['meets_rate'] else 'NOT met':>10}  "
              f"{'met' if row['meets_cpu'] else 'NOT met':>8}")
    if isinstance(p2, str):
        print(f"    PostgreSQL, 2 processes: {p2}")
    for kind in ("errors", "warnings"):
        lines = [line for x in (r, p, p2) if isinstance(x, dict) for line in x[f"log_{kind}"]]
        if lines:
            print(f"  the market processes logged {len(lines)} lines of {kind}; the first:")
            for line in lines[:5]:
                print(f"    {line}")
    print(f"  load average before and after (other work on this machine counts in the rates): "
          + " -> ".join(" ".join(f"{x:.2f}" for x in la) for la in r["load_average"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
