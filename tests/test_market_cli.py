"""`cpushare-server` admin commands: output shapes, exit statuses, errors."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess

import pytest

from cpushare import order, protocol

PYTHON = "/usr/bin/python3"
PROG = "cpushare-server"
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def cli(db, *args, check=True):
    p = subprocess.run([PYTHON, "-m", "cpushare.market", "--db", str(db), *args],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=SRC))
    if check:
        assert p.returncode == 0, f"{args}: {p.returncode}\n{p.stdout}{p.stderr}"
    return p


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "sub" / "market.db"
    p = cli(d, "init", "--listen", "127.0.0.1:7399")
    assert p.stdout == f"initialised {d}\n"
    return d


def test_init_makes_a_private_store_and_refuses_to_overwrite(db):
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(db.parent).st_mode) == 0o700
    p = cli(db, "init", check=False)
    assert p.returncode == 1 and "exists already" in p.stderr and str(db) in p.stderr


def test_init_refuses_a_bad_listen_address(tmp_path):
    p = cli(tmp_path / "m.db", "init", "--listen", "localhost:http", check=False)
    assert p.returncode == 1 and "--listen" in p.stderr and "'http'" in p.stderr
    assert not (tmp_path / "m.db").exists()


def test_accounts_minting_and_balance(db):
    assert cli(db, "account", "add", "alice", "--coins", "1000").stdout == "alice 1000.000\n"
    assert cli(db, "account", "add", "bob").stdout == "bob 0.000\n"
    assert cli(db, "account", "mint", "bob", "--coins", "0.05").stdout == "bob 0.050\n"
    assert cli(db, "balance", "alice").stdout == "alice 1000.000\n"
    listing = cli(db, "account", "list").stdout.splitlines()
    assert "alice 1000.000" in listing and "bob 0.050" in listing
    assert "@mint -1000.050" in listing and "@escrow 0.000" in listing
    out = cli(db, "ledger", "check").stdout
    assert re.fullmatch(r"ledger ok: \d+ transactions, \d+ accounts, minted \d+\.\d{3}, "
                        r"in escrow 0\.000\n", out), out


@pytest.mark.parametrize("args, err", [
    (("account", "add", "alice"), "account 'alice' exists already"),
    (("account", "add", "@mint"), "account name '@mint'"),
    (("account", "add", "x y"), "account name 'x y'"),
    (("account", "mint", "nobody", "--coins", "1"), "no account 'nobody'"),
    (("balance", "nobody"), "no account 'nobody'"),
    (("balance", "@mint"), "no account '@mint'"),
])
def test_admin_errors(db, args, err):
    cli(db, "account", "add", "alice", "--coins", "1000", check=False)
    p = cli(db, *args, check=False)
    assert p.returncode == 1 and err in p.stderr and p.stderr.startswith("cpushare-server: ")


@pytest.mark.parametrize("args, err", [
    (("account", "add", "z", "--coins", "-1"), "negative"),
    (("account", "add", "z", "--coins", "1.0001"), "more than 3 decimals"),
    (("sell-order", "add", "alice", "--price", "x", "--output", "/tmp/x"), "not a number"),
    (("sell-order", "add", "alice", "--price", "1", "--memory", "lots", "--output", "/x"),
     "not a size"),
    (("serve", "--max-wait", "-1"), "--max-wait -1"),
    (("serve", "--max-wait", "soon"), "invalid float value"),
    (("serve", "--link", "127.0.0.1"), "--link is for several processes on a postgresql://"),
])
def test_bad_arguments_are_usage_errors(db, args, err):
    p = cli(db, *args, check=False)
    assert p.returncode == 2 and err in p.stderr


def test_orders_are_written_whole_and_load(db, tmp_path):
    cli(db, "account", "add", "carol", "--coins", "5")
    p = cli(db, "sell-order", "add", "carol", "--price", "0.010", "--cpu-seconds", "30",
            "--memory", "64M", "--output", str(tmp_path / "c.cpu"))
    assert re.fullmatch(r"sell-order \d+ for carol written to .*/c\.cpu\n", p.stdout)
    assert stat.S_IMODE(os.stat(tmp_path / "c.cpu").st_mode) == 0o600
    o = order.load_sell(tmp_path / "c.cpu")
    assert (o.host, o.port, o.price_milli, o.model) == ("127.0.0.1", 7399, 10, "seccomp")
    assert o.limits.cpu_seconds == 30 and o.limits.memory == 64 << 20
    assert o.limits.allow_cpuid is False
    cli(db, "sell-order", "add", "carol", "--price", "0.010", "--allow-cpuid",
        "--output", str(tmp_path / "d.cpu"))
    assert order.load_sell(tmp_path / "d.cpu").limits.allow_cpuid is True
    cli(db, "buy-order", "add", "carol", "--price", "0.5", "--redundancy", "2",
        "--max-cpu-seconds", "9", "--output", str(tmp_path / "c.buy"))
    b = order.load_buy(tmp_path / "c.buy")
    assert (b.price_milli, b.redundancy, b.max_cpu_seconds) == (500, 2, 9)
    certs = cli(db, "cert", "list").stdout.splitlines()
    fp = protocol.fingerprint_pem(b.cert_pem)
    assert any(line.startswith(f"{fp} carol buyer ") and line.endswith(" valid")
               for line in certs), certs
    p = cli(db, "cert", "revoke", fp[:20])
    assert p.stdout.startswith(f"revoked {fp}")
    assert f"{fp} carol buyer" in cli(db, "cert", "list").stdout
    assert any(line.startswith(fp) and line.endswith("revoked")
               for line in cli(db, "cert", "list").stdout.splitlines())
    p = cli(db, "buy-order", "add", "carol", "--price", "1", "--redundancy", "17",
            "--output", str(tmp_path / "x.buy"), check=False)
    assert p.returncode == 2 and "--redundancy: must be 1..16, not 17" in p.stderr
    assert not (tmp_path / "x.buy").exists()


def test_ledger_check_reports_what_broke(tmp_path):
    d = tmp_path / "m.db"
    cli(d, "init", "--listen", "127.0.0.1:7398")
    cli(d, "account", "add", "alice", "--coins", "10")
    with sqlite3.connect(d) as db:  # coins out of nowhere, outside the ledger
        db.execute("UPDATE accounts SET balance = balance + 5 WHERE name = 'alice'")
    p = cli(d, "ledger", "check", check=False)
    assert p.returncode == 1
    assert "account alice: balance 10005 but its entries sum to 10000" in p.stdout
    assert "sum to 5, not 0" in p.stdout
    assert p.stdout.rstrip().endswith("ledger check FAILED: 2 problem(s)")
    with sqlite3.connect(d) as db:  # an unbalanced transaction
        db.execute("UPDATE accounts SET balance = balance - 5 WHERE name = 'alice'")
        db.execute("INSERT INTO transactions (kind, created) VALUES ('settle', 0)")
        tid = db.execute("SELECT MAX(id) FROM transactions").fetchone()[0]
        db.execute("INSERT INTO entries (txn_id, account_id, amount) VALUES "
                   "(?, (SELECT id FROM accounts WHERE name = 'alice'), -20000)", (tid,))
        db.execute("UPDATE accounts SET balance = balance - 20000 WHERE name = 'alice'")
    p = cli(d, "ledger", "check", check=False)
    assert p.returncode == 1
    assert f"transaction {tid} (settle) entries sum to -20000" in p.stdout
    assert "account alice is negative: -10000" in p.stdout


def test_missing_database_is_named(tmp_path):
    p = cli(tmp_path / "none.db", "balance", "x", check=False)
    assert p.returncode == 1 and "none.db" in p.stderr and "init" in p.stderr


# --- ranges: what the commands take is what the order files may hold -----------------

HUGE = "1" + "0" * 30  # 10**30
SELL = ("--cpu-seconds", "--wall-seconds", "--memory", "--output-limit", "--days")
BUY = ("--redundancy", "--max-cpu-seconds", "--days")


def out_of_range(option):
    """[(value, a bound the message must name)]: too small, too large, huge."""
    from cpushare.market import admin
    r = admin.OPTIONS[option]
    fmt = order.format_size if r.size else str
    small = (str(r.low - 1), fmt(r.low)) if r.low > 0 else ("-1", None)
    return [small, (str(r.high + 1), fmt(r.high)), (HUGE, fmt(r.high))]


CASES = ([("sell-order", o, v, b) for o in SELL for v, b in out_of_range(o)]
         + [("buy-order", o, v, b) for o in BUY for v, b in out_of_range(o)]
         + [(kind, "--price", v, None) for kind in ("sell-order", "buy-order")
            for v in ("-1", HUGE)])


@pytest.mark.parametrize("kind, option, value, bound", CASES,
                         ids=[f"{k}{o}={v[:12]}" for k, o, v, _ in CASES])
def test_out_of_range_values_write_no_file(db, tmp_path, kind, option, value, bound):
    cli(db, "account", "add", "alice", "--coins", "1000", check=False)
    target = tmp_path / ("o.cpu" if kind == "sell-order" else "o.buy")
    p = cli(db, kind, "add", "alice", "--price", "1", option, value, "--output", str(target),
            check=False)
    assert p.returncode == 2, p  # a usage error, never a crash
    assert p.stderr.startswith(f"{PROG}: ") or p.stderr.startswith("usage: "), p.stderr
    assert "Traceback" not in p.stderr and option in p.stderr, p.stderr
    if bound is not None:
        assert bound in p.stderr, p.stderr
    assert not target.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, err", [
    (("account", "add", "z", "--coins", HUGE), "too large"),
    (("account", "mint", "alice", "--coins", HUGE), "too large"),
    (("account", "mint", "alice", "--coins", "0"), "--coins must be more than 0"),
])
def test_coins_out_of_range_are_refused(db, args, err):
    cli(db, "account", "add", "alice", "--coins", "1000", check=False)
    before = cli(db, "balance", "alice").stdout
    p = cli(db, *args, check=False)
    assert p.returncode in (1, 2) and err in p.stderr and "Traceback" not in p.stderr, p
    assert cli(db, "balance", "alice").stdout == before


@pytest.mark.parametrize("option", sorted(set(SELL + BUY)))
def test_option_types_make_out_of_range_values_usage_errors(option, capsys):
    # What the admin parser gets from admin.option_type: exit status 2 and
    # "argument OPTION: must be LOW..HIGH, not VALUE".
    import argparse

    from cpushare.market import admin
    r = admin.OPTIONS[option]
    parser = argparse.ArgumentParser(prog=PROG)
    parser.add_argument(option, type=admin.option_type(option))
    dest = option.lstrip("-").replace("-", "_")
    for value, _ in out_of_range(option):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([option, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}: " in err and (str(r) in err or "not a size" in err), err
    fmt = order.format_size if r.size else str
    for good in (r.low, r.high):
        assert getattr(parser.parse_args([option, fmt(good)]), dest) == good


def test_every_file_written_at_the_bounds_loads(db, tmp_path):
    from cpushare.market import admin
    cli(db, "account", "add", "alice", "--coins", "1000", check=False)
    for end in ("low", "high"):
        def value(o):
            r = admin.OPTIONS[o]
            v = getattr(r, end)
            return order.format_size(v) if r.size else str(v)
        sell, buy = tmp_path / f"{end}.cpu", tmp_path / f"{end}.buy"
        cli(db, "sell-order", "add", "alice", "--price", "0", "--output", str(sell),
            *[a for o in SELL for a in (o, value(o))])
        cli(db, "buy-order", "add", "alice", "--price", "1000000000000", "--output", str(buy),
            *[a for o in BUY for a in (o, value(o))])
        s, b = order.load_sell(sell), order.load_buy(buy)
        lim = order.RANGES
        assert s.limits == order.Limits(*(getattr(lim[k], end) for k in (
            "cpu_seconds", "wall_seconds", "memory", "output")))
        assert (b.redundancy, b.max_cpu_seconds) == (getattr(lim["redundancy"], end),
                                                     getattr(lim["max_cpu_seconds"], end))
        assert (s.price_milli, b.price_milli) == (0, order.MAX_PRICE_MILLI)


def test_a_sqlite_market_is_served_by_one_process(tmp_path):
    from test_market_peers import free_port
    d = tmp_path / "one.db"
    cli(d, "init", "--listen", f"127.0.0.1:{free_port()}")
    env = dict(os.environ, PYTHONPATH=SRC)
    first = subprocess.Popen([PYTHON, "-m", "cpushare.market", "--db", str(d), "serve"],
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in first.stderr:  # (until it listens)
            if "listening on" in line:
                break
        p = cli(d, "serve", check=False)
        assert p.returncode == 1, p
        assert "another cpushare-server serves this database" in p.stderr
        assert "Traceback" not in p.stderr
        assert first.poll() is None  # the first serves on
    finally:
        first.terminate()
        first.wait(15)
    # once it has stopped, another may serve
    again = subprocess.Popen([PYTHON, "-m", "cpushare.market", "--db", str(d), "serve"],
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in again.stderr:
            if "listening on" in line:
                break
        assert again.poll() is None
    finally:
        again.terminate()
        again.wait(15)
