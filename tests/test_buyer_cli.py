"""`cpushare buy`: usage, files, progress, summary and exit statuses."""

from __future__ import annotations

import os
import pty
import subprocess

import pytest

from cpushare.order import format_coins

from test_e2e_support import PYTHON, LocalMarket, env, job


def buy(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "cpushare", "buy", *map(str, args)],
                          capture_output=True, text=True, env=env(), timeout=120, **kw)


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    m = LocalMarket(tmp_path_factory.mktemp("market"))
    m.account("buyer", 100)
    m.account("alice")
    m.serve()
    m.seller(m.sell_order("alice", "alice-cpu0"))
    yield m
    m.close()


@pytest.fixture
def files(tmp_path):
    echo = tmp_path / "echo.bin"
    echo.write_bytes(job("echo").pack())
    bad = tmp_path / "bad.bin"
    bad.write_bytes(job("bad").pack())
    ins = []
    for i in range(3):
        p = tmp_path / f"part{i}.dat"
        p.write_bytes(b"data %d\n" % i)
        ins.append(p)
    return echo, bad, ins


def test_help_says_where_outputs_go():
    p = buy("--help")
    assert p.returncode == 0
    assert "DIR/<basename of INPUT>.out" in p.stdout
    assert "Exit status" in p.stdout


HUGE = "1" + "0" * 30  # 10**30


@pytest.mark.parametrize("option, value, says", [
    ("--redundancy", "0", "must be 1..16, not 0"),
    ("--redundancy", "17", "must be 1..16, not 17"),
    ("--redundancy", HUGE, f"must be 1..16, not {HUGE}"),
    ("--redundancy", "two", "'two' is not an integer"),
    ("--timeout", "0", "must be more than 0 and at most 31536000 seconds, not 0"),
    ("--timeout", "-1", "not -1"),
    ("--timeout", "31536001", "not 31536001"),
    ("--timeout", HUGE, f"not {HUGE}"),
    ("--timeout", "inf", "not inf"),
    ("--timeout", "nan", "not nan"),
])
def test_numbers_out_of_range_are_usage_errors(tmp_path, option, value, says):
    # Checked before anything is read or made: no order file is needed and
    # no output directory appears.
    out = tmp_path / "out"
    p = buy("--order", tmp_path / "none.buy", option, value, tmp_path / "job.bin",
            tmp_path / "in", "--output-dir", out)
    assert p.returncode == 2, p
    assert f"argument {option}: " in p.stderr and says in p.stderr, p.stderr
    assert not out.exists() and "Traceback" not in p.stderr


def test_usage_errors_exit_2(tmp_path, files, market):
    echo, _, ins = files
    order = market.buy_order("buyer")
    out = tmp_path / "out"
    # argparse: missing --output-dir
    assert buy("--order", order, echo, ins[0]).returncode == 2
    # a missing order file, named
    p = buy("--order", tmp_path / "nope.buy", echo, ins[0], "--output-dir", out)
    assert p.returncode == 2 and "nope.buy" in p.stderr and "cannot read" in p.stderr, p.stderr
    # a job that is not an image, named with what is wrong
    notimg = tmp_path / "job.bin"
    notimg.write_bytes(b"#!/bin/sh\necho hi\n" + b"\0" * 200)
    p = buy("--order", order, notimg, ins[0], "--output-dir", out)
    assert p.returncode == 2 and "job.bin" in p.stderr and "bad magic" in p.stderr, p.stderr
    # a missing input
    p = buy("--order", order, echo, tmp_path / "missing.dat", "--output-dir", out)
    assert p.returncode == 2 and "missing.dat" in p.stderr, p.stderr
    # two inputs that would write the same output
    other = tmp_path / "sub"
    other.mkdir()
    (other / ins[0].name).write_bytes(b"x")
    p = buy("--order", order, echo, ins[0], other / ins[0].name, "--output-dir", out)
    assert p.returncode == 2 and f"{ins[0].name}.out" in p.stderr, p.stderr
    # a bad redundancy
    p = buy("--order", order, "--redundancy", "0", echo, ins[0], "--output-dir", out)
    assert p.returncode == 2 and "--redundancy" in p.stderr, p.stderr
    # a broken order file: file, line and key
    broken = tmp_path / "broken.buy"
    broken.write_text(order.read_text().replace("redundancy = 1", "redundancy = lots"))
    p = buy("--order", broken, echo, ins[0], "--output-dir", out)
    assert p.returncode == 2 and "broken.buy:" in p.stderr and "redundancy" in p.stderr, p.stderr
    assert not out.exists() or not any(out.iterdir())


def test_all_good_exit_0_outputs_and_summary(tmp_path, files, market):
    echo, _, ins = files
    before = market.balance_milli("buyer")
    p = buy("--order", market.buy_order("buyer"), echo, *ins, "--output-dir", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    for src in ins:
        assert (tmp_path / "out" / f"{src.name}.out").read_bytes() == src.read_bytes()
    spent = before - market.balance_milli("buyer")
    assert p.stdout.strip() == (f"3 tasks, 0 failed, {p.stdout.split(', ')[2]}, "
                                f"{format_coins(spent)} CPUCoins spent, 0 retries"), p.stdout
    assert p.stdout.split(", ")[2].endswith(" CPU seconds")
    # not a terminal: one plain line per task
    assert [line.split("] ")[0] for line in p.stderr.splitlines()] == ["[1/3", "[2/3", "[3/3"]


def test_failed_tasks_exit_1_and_are_named(tmp_path, files, market):
    _, bad, ins = files
    p = buy("--order", market.buy_order("buyer"), bad, *ins[:2], "--output-dir", tmp_path / "out")
    assert p.returncode == 1, p.stdout + p.stderr
    for src in ins[:2]:
        assert f"{src}: task " in p.stderr and "forbidden-syscall" in p.stderr, p.stderr
    assert p.stdout.startswith("2 tasks, 2 failed, ")


def test_progress_bar_on_a_terminal(tmp_path, files, market):
    echo, _, ins = files
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([PYTHON, "-m", "cpushare", "buy", "--order",
                              str(market.buy_order("buyer")), str(echo), *map(str, ins),
                              "--output-dir", str(tmp_path / "out")],
                             stdout=subprocess.PIPE, stderr=slave, env=env())
        os.close(slave)
        slave = -1
        out, _ = p.communicate(timeout=120)
        tty = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            tty += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert p.returncode == 0, tty
    assert b"\r[" in tty and b"] 3/3" in tty and b"#" * 30 in tty, tty
    assert b"[1/3] " not in tty  # no plain lines on a terminal
    assert out.startswith(b"3 tasks, 0 failed, ")


def test_connection_refused_is_clear(tmp_path, files, market):
    echo, _, ins = files
    order = market.buy_order("buyer")
    moved = tmp_path / "moved.buy"
    moved.write_text(order.read_text().replace(f":{market.port}", ":1"))
    p = buy("--order", moved, echo, ins[0], "--output-dir", tmp_path / "out")
    assert p.returncode == 1 and "127.0.0.1:1" in p.stderr and "connect" in p.stderr, p.stderr


def test_timeout_cancels_what_did_not_run_and_refunds_it(tmp_path, files, market):
    echo, _, ins = files
    before = market.balance_milli("buyer")
    cheap = market.buy_order("buyer", name="cheap", price="0.001")  # below every ask
    p = buy("--order", cheap, "--timeout", "1", echo, *ins, "--output-dir", tmp_path / "out")
    assert p.returncode == 1, p.stdout + p.stderr
    assert ("not finished within 1 s: 3 tasks without a result cancelled (3 refunded)"
            in p.stderr), p.stderr
    assert p.stdout.startswith("3 tasks, 0 failed, 3 cancelled, 0.000 CPU seconds, "
                               "0.000 CPUCoins spent"), p.stdout
    assert market.balance_milli("buyer") == before
    assert not any((tmp_path / "out").iterdir())
    assert market.ledger_check().returncode == 0
    p = buy("--order", cheap, "--timeout", "0", echo, *ins, "--output-dir", tmp_path / "out")
    assert p.returncode == 2 and "--timeout" in p.stderr, p.stderr


def test_interrupt_cancels_and_exits_130(tmp_path, files, market):
    import signal
    import sqlite3
    import time
    echo, _, ins = files
    before = market.balance_milli("buyer")
    cheap = market.buy_order("buyer", name="cheap2", price="0.001")
    proc = subprocess.Popen([PYTHON, "-m", "cpushare", "buy", "--order", str(cheap), str(echo),
                             *map(str, ins), "--output-dir", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())

    def held() -> int:  # escrow taken for the tasks: they are accepted
        db = sqlite3.connect(f"file:{market.db}?mode=ro", uri=True)
        try:
            return db.execute("SELECT COUNT(*) FROM tasks WHERE state = 'queued'").fetchone()[0]
        finally:
            db.close()
    deadline = time.monotonic() + 30
    while held() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held() == 3
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted: 3 tasks without a result cancelled (3 refunded)" in err, err
    assert market.balance_milli("buyer") == before
    assert held() == 0
