"""`cpushare-server migrate`: a SQLite market that has served, with work
still queued (escrowed, one input in a file beside the database), moved
into PostgreSQL; the ledger checks on both sides, the sellers' and buyers'
certificates still work, and the queued work runs on the PostgreSQL market."""

from __future__ import annotations

import re
import subprocess

from test_buyer_restart import buy, check_outputs, inputs
from test_e2e_support import PYTHON, LocalMarket, env, wait_for


def _server(db, *args, check=True):
    r = subprocess.run([PYTHON, "-m", "cpushare.market", "--db", str(db), *args],
                       capture_output=True, text=True, env=env(), timeout=120)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def _escrow(m) -> str:
    out = m.cli("ledger", "check").stdout
    return re.search(r"in escrow (\S+)", out).group(1)


def test_a_served_sqlite_market_moves_to_postgresql_and_serves_on(tmp_path, pg_cluster):
    m = LocalMarket(tmp_path / "sqlite")
    m.account("buyer", 1000)
    m.account("alice")
    m.serve()
    alice = m.sell_order("alice", "alice-cpu0")
    m.seller(alice)
    jobfile, ins = inputs(tmp_path, 4, 0.05)
    p = buy(m.buy_order("buyer"), jobfile, ins, tmp_path / "out1")
    stdout, stderr = p.communicate(timeout=120)
    check_outputs(p, tmp_path / "out1", ins, stdout, stderr)
    # work left queued: no seller, a buyer that goes away; one input is big
    m.sellers["alice-cpu0"].stop()
    big = tmp_path / "big.in"
    big.write_bytes(ins[0].read_bytes() + b"x" * (200 << 10))
    order2 = m.buy_order("buyer", name="buyer2")
    p = buy(order2, jobfile, [big, ins[1]], tmp_path / "out2")
    wait_for(lambda: _escrow(m) != "0.000", 60, "the queued tasks' escrow")
    p.kill()
    p.wait()
    m.server.stop()
    assert (m.db.parent / "market.db.d").is_dir()  # (the big input is a file there)
    before = m.cli("ledger", "check").stdout
    balances = {a: m.balance_milli(a) for a in ("buyer", "alice")}

    url = pg_cluster.database()
    bad = _server(m.db, "migrate", "--from", str(m.db), "--to", url, check=False)
    assert bad.returncode == 1 and "--images" in bad.stderr
    r = _server(m.db, "--images", str(tmp_path / "pgimages"), "migrate", "--from", str(m.db),
                "--to", url)
    assert "moved: ledger ok on both" in r.stdout and "tasks: " in r.stdout
    again = _server(m.db, "--images", str(tmp_path / "pgimages"), "migrate", "--from",
                    str(m.db), "--to", url, check=False)
    assert again.returncode == 1 and "holds a market already" in again.stderr

    # the same market, on PostgreSQL: the same ledger, the same certificates
    pgm = LocalMarket.__new__(LocalMarket)
    pgm.__dict__.update(m.__dict__)
    pgm.db, pgm.procs, pgm.sellers = url, [], {}
    assert pgm.cli("ledger", "check").stdout == before
    assert {a: pgm.balance_milli(a) for a in ("buyer", "alice")} == balances
    pgm.serve()
    try:
        pgm.seller(alice)  # (its .cpu file's certificate, issued by the SQLite market)
        wait_for(lambda: _escrow(pgm) == "0.000", 120, "the queued tasks to run on PostgreSQL")
        import psycopg
        with psycopg.connect(url) as db:
            states = dict(db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state"))
            # (the big input's output, its echo, waits for its buyer in the database)
            ran = db.execute("SELECT COUNT(*) FROM tasks WHERE length(output) > 200000 "
                             "AND delivered = 0").fetchone()
        assert states == {"done": 6}, states  # 4 before, the 2 queued after (the big one too)
        assert ran == (1,)
        check = pgm.ledger_check()
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        pgm.close()


def test_init_and_migrate_into_a_served_market_refuse_without_its_tables_locks(tmp_path,
                                                                               pg_cluster):
    """`init` or `migrate --to` a PostgreSQL database that holds a market (one a
    process may be serving) refuses at once: it takes none of its tables'
    locks (its schema's DDL waited for them, and held up every process
    serving it), here while another session holds one."""
    import psycopg
    url = pg_cluster.database()
    images = str(tmp_path / "pgimages")
    _server(url, "--images", images, "init", "--listen", "127.0.0.1:7398")
    holder = psycopg.connect(url)
    try:
        holder.execute("SELECT COUNT(*) FROM tasks")  # (a serving transaction's lock)
        holder.execute("SELECT COUNT(*) FROM carries")
        again = _server(url, "--images", images, "init", "--listen", "127.0.0.1:7398",
                        check=False)
        assert again.returncode == 1 and "holds a market already" in again.stderr, again
        src = LocalMarket(tmp_path / "sqlite")
        moved = _server(src.db, "--images", images, "migrate", "--from", str(src.db),
                        "--to", url, check=False)
        assert moved.returncode == 1 and "holds a market already" in moved.stderr, moved
    finally:
        holder.close()
