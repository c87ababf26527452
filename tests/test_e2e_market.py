"""End to end on loopback: server, sellers and buyer as real processes, real TLS.

Each test builds its own market (admin CLI, `serve`, `python -m
cpushare.seller` processes) in tmp_path and checks the ledger after.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cpushare.buyer import Market, run_tasks
from cpushare.order import format_coins, load_buy

from test_e2e_support import (PYTHON, BuyerThread, LocalMarket, env, job, spin_count_for,
                              spin_input, wait_for)

BUYER_COINS = 1000


@pytest.fixture
def market(tmp_path, market_db):
    m = LocalMarket(tmp_path / "market", db=market_db)
    m.account("buyer", BUYER_COINS)
    for name in ("alice", "bob", "carol"):
        m.account(name)
    m.serve()
    yield m
    m.close()


def balances(m: LocalMarket, names=("buyer", "alice", "bob", "carol")) -> dict[str, int]:
    return {n: m.balance_milli(n) for n in names}


def assert_ledger_ok(m: LocalMarket) -> None:
    p = m.ledger_check()
    assert p.returncode == 0, f"ledger check failed:\n{p.stdout}{p.stderr}"


def assert_conserved(m: LocalMarket, before: dict[str, int], after: dict[str, int]) -> int:
    """Nothing minted or lost among these accounts: the buyer's spending is the sellers' pay."""
    spent = before["buyer"] - after["buyer"]
    earned = sum(after[n] - before[n] for n in before if n != "buyer")
    assert spent == earned, f"buyer spent {spent} milli but sellers earned {earned}: {after}"
    return spent


def _children(pid: int) -> list[int]:
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def jobs_of(pid: int) -> list[int]:
    """The sandboxed jobs among the descendants of `pid` (processes in seccomp)."""
    out, todo = [], _children(pid)
    while todo:
        p = todo.pop()
        todo += _children(p)
        try:
            with open(f"/proc/{p}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except FileNotFoundError:
            continue
        if status.get("Seccomp", "0").strip() != "0":
            out.append(p)
    return out


def proc_state(pid: int) -> tuple[str, int]:
    """(state letter, utime+stime in ticks) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[11]) + int(fields[12])


# --- the market works ---------------------------------------------------------

def test_hundreds_of_tasks_redundancy_2_via_cli_and_balances_add_up(market, tmp_path):
    m = market
    for name in ("alice", "bob", "carol"):  # (10 milli per CPU-second: each earns some)
        m.seller(m.sell_order(name, f"{name}-cpu0", price="36.000"))
    buy = m.buy_order("buyer", redundancy=2, price="72.000")
    before = balances(m)
    jobfile = tmp_path / "echo.bin"
    jobfile.write_bytes(job("echo").pack())
    indir = tmp_path / "in"
    indir.mkdir()
    inputs = []
    for i in range(300):
        p = indir / f"task{i:03d}.txt"
        p.write_bytes(f"input number {i}\n".encode() * (1 + i % 7))
        inputs.append(p)
    out = tmp_path / "out"
    p = subprocess.run([PYTHON, "-m", "cpushare", "buy", "--order", str(buy), "--redundancy", "2",
                        str(jobfile), *map(str, inputs), "--output-dir", str(out)],
                       capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    for src in inputs:
        assert (out / (src.name + ".out")).read_bytes() == src.read_bytes(), src
    # plain lines, not a progress bar, when stderr is not a terminal
    assert "[300/300] " in p.stderr
    summary = p.stdout.strip().splitlines()[-1]
    assert summary.startswith("300 tasks, 0 failed, "), summary
    after = balances(m)
    spent = assert_conserved(m, before, after)
    assert f"{format_coins(spent)} CPUCoins spent" in summary, (summary, spent)
    # every task ran on two sellers of different accounts, and each was paid
    earned = [after[n] - before[n] for n in ("alice", "bob", "carol")]
    assert sum(1 for e in earned if e > 0) >= 2, earned
    assert spent > 0
    assert_ledger_ok(m)


def test_python_api_map_and_run_tasks(market):
    m = market
    m.seller(m.sell_order("alice", "alice-cpu0"))
    m.seller(m.sell_order("bob", "bob-cpu0"))
    buy = m.buy_order("buyer")
    inputs = [f"{i}".encode() * i for i in range(50)]
    results = run_tasks(load_buy(buy), job("echo"), inputs)
    assert [r.output for r in results] == inputs
    assert all(r.ok and r.attempts == 1 for r in results)
    assert_ledger_ok(m)


def test_interactive_session_streams_both_ways(market):
    m = market
    m.seller(m.sell_order("alice", "alice-cpu0"))
    order = load_buy(m.buy_order("buyer"))

    async def go():
        async with Market(order) as mk:
            async with mk.session(job("echo")) as s:
                await s.write(b"hello ")
                got = b""
                while len(got) < 6:
                    got += await s.read()
                assert got == b"hello "
                await s.write(b"world")
                await s.close_input()
                rest = await s.read_all()
            assert got + rest == b"hello world"
            return s.result
    result = asyncio.run(asyncio.wait_for(go(), 60))
    assert result.exit_status == 0, result
    assert_ledger_ok(m)


# --- failures stay local ------------------------------------------------------------

def test_bad_job_fails_that_task_only(market):
    m = market
    m.seller(m.sell_order("alice", "alice-cpu0"))
    order = load_buy(m.buy_order("buyer"))
    bad = run_tasks(order, job("bad"), [b"x"])
    assert not bad[0].ok and bad[0].code is None
    assert bad[0].signal == signal.SIGKILL or bad[0].exit_status != 0, bad[0]
    good = run_tasks(order, job("echo"), [b"after the bad one"])
    assert good[0].ok and good[0].output == b"after the bad one"
    assert m.sellers["alice-cpu0"].alive()
    assert_ledger_ok(m)


def test_kill9_seller_mid_task_finishes_elsewhere_paid_once(market):
    m = market
    count = spin_count_for(3.0)
    sellers = {n: m.seller(m.sell_order(n, f"{n}-cpu0")) for n in ("alice", "bob")}
    buy = m.buy_order("buyer", max_cpu_seconds=30)
    before = balances(m)
    payload = spin_input(count, b"the slow task")
    b = BuyerThread(buy, job("spin"), [payload])

    def busy():
        for name, p in sellers.items():
            kids = jobs_of(p.pid)
            if kids:
                return name, kids
        return None
    name, kids = wait_for(busy, 30, "a seller to start the job")
    victim = sellers[name]
    victim.kill9()
    for k in kids:  # the orphaned job, if the sandbox did not take it down itself
        try:
            os.kill(k, signal.SIGKILL)
        except ProcessLookupError:
            pass
    [r] = b.join(120)
    assert r.ok and r.output == payload, r
    assert r.attempts == 2, r
    after = balances(m)
    spent = assert_conserved(m, before, after)
    assert spent == r.cost_milli
    victim_account = name.split("-")[0]
    assert after[victim_account] == before[victim_account], "the killed seller was paid"
    assert_ledger_ok(m)


def test_kill9_and_restart_server_mid_run_buyer_gets_everything(market):
    m = market
    count = spin_count_for(0.02)
    for n in ("alice", "bob"):
        m.seller(m.sell_order(n, f"{n}-cpu0"))
    buy = m.buy_order("buyer")
    before = balances(m)
    inputs = [spin_input(count, f"task {i}".encode()) for i in range(200)]
    b = BuyerThread(buy, job("spin"), inputs)
    wait_for(lambda: len(b.results) >= 40, 60, "40 results")
    m.server.kill9()
    m.serve()
    results = b.join(180)
    assert sorted(r.output for r in results) == sorted(inputs)
    assert all(r.ok for r in results)
    assert len({r.ref for r in results}) == 200
    after = balances(m)
    assert_conserved(m, before, after)
    assert_ledger_ok(m)
    for n in ("alice-cpu0", "bob-cpu0"):
        assert m.sellers[n].alive()


def test_dishonest_seller_under_redundancy_is_outvoted_and_unpaid(market):
    m = market
    m.seller(m.sell_order("alice", "alice-cpu0"))
    m.seller(m.sell_order("bob", "bob-cpu0"), "--test-corrupt-outputs")
    m.seller(m.sell_order("carol", "carol-cpu0"))
    buy = m.buy_order("buyer", redundancy=2)
    before = balances(m)
    inputs = [f"honest work {i}".encode() for i in range(30)]
    results = run_tasks(load_buy(buy), job("echo"), inputs, redundancy=2)
    for r, want in zip(results, inputs):
        # a task is never accepted with the corrupted output
        assert r.output == want or not r.ok, r
        assert r.ok or r.code == "dispute", r
    assert sum(r.ok for r in results) >= 20
    assert "task " in m.sellers["bob-cpu0"].text(), "the dishonest seller got no task at all"
    after = balances(m)
    assert after["bob"] == before["bob"], "the dishonest seller was paid"
    assert_conserved(m, before, after)
    assert_ledger_ok(m)
    assert m.sellers["bob-cpu0"].alive()


def test_pause_and_resume_mid_task_keeps_the_work(market):
    m = market
    count = spin_count_for(1.5)
    seller = m.seller(m.sell_order("alice", "alice-cpu0"))
    payload = spin_input(count, b"paused")
    b = BuyerThread(m.buy_order("buyer", max_cpu_seconds=30), job("spin"), [payload])
    [kid] = wait_for(lambda: jobs_of(seller.pid), 30, "the job to start")
    wait_for(lambda: proc_state(kid)[1] > 10, 30, "the job to use some CPU")
    seller.signal(signal.SIGUSR1)  # pause
    wait_for(lambda: proc_state(kid)[0] == "T", 10, "the job to stop")
    ticks = proc_state(kid)[1]
    time.sleep(1.0)
    assert proc_state(kid) == ("T", ticks), "a paused job kept running"
    seller.signal(signal.SIGUSR2)  # resume
    [r] = b.join(120)
    assert r.ok and r.output == payload, r
    assert r.attempts == 1, "the task was restarted instead of resumed"
    assert "paused" in seller.text() and "resumed" in seller.text()
    assert_ledger_ok(m)


# --- refusals: a clear error, and the market carries on ----------------------------

def _buy_cli(order: Path, tmp_path: Path, *inputs: bytes) -> subprocess.CompletedProcess:
    jobfile = tmp_path / "echo.bin"
    jobfile.write_bytes(job("echo").pack())
    paths = []
    for i, data in enumerate(inputs):
        p = tmp_path / f"in{i}"
        p.write_bytes(data)
        paths.append(str(p))
    return subprocess.run([PYTHON, "-m", "cpushare", "buy", "--order", str(order), str(jobfile),
                           *paths, "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env(), timeout=120)


def _replace_credentials(src: Path, dst: Path, **pems: str) -> Path:
    """Copy an order file with some of its PEM blocks replaced."""
    from configobj import ConfigObj
    conf = ConfigObj(str(src), interpolation=False)
    for key, pem in pems.items():
        conf["credentials"][key] = pem
    conf.filename = str(dst)
    conf.write()
    return dst


def test_refusals_are_clear_and_the_market_carries_on(market, tmp_path):
    from cpushare.market import ca
    m = market
    m.seller(m.sell_order("alice", "alice-cpu0"))
    good = m.buy_order("buyer")
    other_ca = ca.make_ca("some other CA")
    stranger = ca.issue(other_ca.cert_pem, other_ca.key_pem, "stranger")

    # a certificate the market did not issue
    bad_cred = _replace_credentials(good, tmp_path / "stranger.buy", certificate=stranger.cert_pem,
                                    key=stranger.key_pem)
    p = _buy_cli(bad_cred, tmp_path, b"x")
    assert p.returncode == 2, p.stderr
    assert "refused" in p.stderr and str(m.port) in p.stderr, p.stderr

    # an order file whose CA is not the market's: the buyer refuses the server
    wrong_ca = _replace_credentials(good, tmp_path / "wrongca.buy", ca=other_ca.cert_pem)
    p = _buy_cli(wrong_ca, tmp_path, b"x")
    assert p.returncode == 2, p.stderr
    assert "does not verify against the CA in" in p.stderr and "wrongca.buy" in p.stderr, p.stderr

    # the same for a seller: it keeps retrying and says why in its log
    sell = m.sell_order("bob", "bob-cpu0")
    _replace_credentials(sell, tmp_path / "bob-wrongca.cpu", ca=other_ca.cert_pem)
    m.seller(tmp_path / "bob-wrongca.cpu", wait=False)
    wait_for(lambda: "does not verify against the CA" in m.sellers["bob-wrongca"].text(), 30,
             "the seller to report the wrong CA")

    # insufficient funds: each task fails with code funds, named on stderr
    m.account("pauper", 0)
    poor = m.buy_order("pauper", name="pauper")
    p = _buy_cli(poor, tmp_path, b"a", b"b")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "funds" in p.stderr and "in0" in p.stderr and "in1" in p.stderr, p.stderr

    # and the good buyer is served all along
    p = _buy_cli(good, tmp_path, b"still working")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "out" / "in0.out").read_bytes() == b"still working"
    assert_ledger_ok(m)


def test_expired_certificate_is_refused(market, tmp_path):
    import datetime as dt

    from cpushare.market import ca
    m = market
    m.seller(m.sell_order("alice", "alice-cpu0"))
    good = m.buy_order("buyer")
    ca_cert, ca_key = m.ca_credentials()
    old = ca.issue(ca_cert, ca_key, "buyer", days=1,
                   not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10))
    expired = _replace_credentials(good, tmp_path / "expired.buy", certificate=old.cert_pem,
                                   key=old.key_pem)
    p = _buy_cli(expired, tmp_path, b"x")
    assert p.returncode == 2, p.stderr
    assert "refused" in p.stderr, p.stderr
    p = _buy_cli(good, tmp_path, b"ok")
    assert p.returncode == 0, p.stdout + p.stderr


def test_malformed_frame_closes_only_that_connection(market):
    import ssl
    import socket
    import struct
    from cpushare import protocol
    m = market
    m.seller(m.sell_order("alice", "alice-cpu0"))
    order = load_buy(m.buy_order("buyer"))
    ctx = protocol.client_context(order.ca_pem, order.cert_pem, order.key_pem)
    with socket.create_connection(("127.0.0.1", m.port), 10) as raw:
        with ctx.wrap_socket(raw, server_hostname=order.host) as s:
            s.sendall(protocol.encode("hello", version=1, role="buyer"))
            s.sendall(struct.pack(">II", 9, 0) + b"not json!")
            data = b""
            s.settimeout(10)
            while True:
                try:
                    chunk = s.recv(65536)
                except (ssl.SSLError, ConnectionResetError):
                    break
                if not chunk:
                    break
                data += chunk
    assert b'"error"' in data and b"frame" in data, data
    r = run_tasks(order, job("echo"), [b"fine"])
    assert r[0].ok and r[0].output == b"fine"
