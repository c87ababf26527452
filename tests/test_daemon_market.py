"""cpushared selling on a real market (loopback, real TLS, the market's own
CA), watched and controlled with cpusharectl over a private system bus."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from dbus_fixtures import (PYTHON, NotifySocket, daemon_env, start_daemon, stop_daemon,  # noqa: F401
                           system_bus)
from test_e2e_market import jobs_of, proc_state
from test_e2e_support import (BuyerThread, job, market,  # noqa: F401
                              spin_count_for, spin_input, wait_for)


@pytest.fixture
def notify_socket(tmp_path):
    s = NotifySocket(tmp_path)
    yield s
    s.close()


def status(env, *, running: bool = True) -> dict | None:
    """cpusharectl status cpu0 --json; None if not (yet) on the bus and not `running`."""
    r = subprocess.run([PYTHON, "-m", "cpushare.ctl", "status", "cpu0", "--json"], env=env,
                       capture_output=True, text=True, timeout=60)
    if r.returncode == 3 and not running:
        return None
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(r.stdout)
    return rec


def ctl(env, *args) -> None:
    r = subprocess.run([PYTHON, "-m", "cpushare.ctl", *args], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_sells_pauses_resumes_and_reports_earnings(market, system_bus, tmp_path,  # noqa: F811
                                                   notify_socket):
    m = market
    order = m.sell_order("alice", "cpu0", price="36.000")  # 10 milli-CPUCoins a CPU-second
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path, DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    proc = start_daemon(["--cache-dir", str(tmp_path / "cache"), str(order)], env=env)
    try:
        notify_socket.wait("STATUS", contains=": idle, 0 tasks done")
        rec = status(env)
        assert rec["state"] == "idle" and rec["connected_since"] is not None
        assert abs(rec["connected_since"] - time.time()) < 600

        payload = spin_input(spin_count_for(1.5), b"kept")
        buyer = BuyerThread(m.buy_order("buyer", price="72.000", max_cpu_seconds=30),
                            job("spin"), [payload])
        [kid] = wait_for(lambda: jobs_of(proc.pid), 30, "the job to start under cpushared")
        running = wait_for(lambda: (lambda r: r if r["state"] == "running" else None)(status(env)),
                           10, "State=running")
        assert running["current_task"] and running["buyer_order"]

        wait_for(lambda: proc_state(kid)[1] > 10, 30, "the job to use some CPU")
        ctl(env, "pause", "cpu0")
        wait_for(lambda: proc_state(kid)[0] == "T", 10, "the job to stop (SIGSTOP)")
        paused = wait_for(lambda: (lambda r: r if r["state"] == "paused" else None)(status(env)),
                          10, "State=paused")
        assert paused["current_task"] == running["current_task"]
        ticks = proc_state(kid)[1]
        time.sleep(0.5)
        assert proc_state(kid) == ("T", ticks), "a paused job kept running"
        ctl(env, "resume", "cpu0")

        [r] = buyer.join(120)
        assert r.ok and r.output == payload, r
        assert r.attempts == 1, "the task was restarted instead of resumed"
        notify_socket.wait("STATUS", contains=": idle, 1 task done")
        # the settlement (`settled`) comes after the result, once the market
        # has committed it: the seller may hear of it a little after the buyer
        rec = wait_for(lambda: (lambda r: r if r["coins_earned_milli"] > 0 else None)(
            status(env)), 30, "the settlement to reach the seller")
        assert rec["tasks_done"] == 1 and rec["current_task"] is None
        assert rec["cpu_seconds_sold"] > 0
        notify_socket.wait("STATUS", contains=f": idle, 1 task done, {rec['coins_earned']} "
                                              f"CPUCoins earned")
        # What the seller reports earned is what the market paid alice.
        assert rec["coins_earned_milli"] == m.balance_milli("alice")
    finally:
        code, _, err = stop_daemon(proc)
    assert code == 0, err


def test_sigterm_hands_the_running_task_back(market, system_bus, tmp_path):  # noqa: F811
    m = market
    order = m.sell_order("alice", "cpu0")
    env = daemon_env(DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    proc = start_daemon(["--cache-dir", str(tmp_path / "cache"), str(order)], env=env)
    try:
        wait_for(lambda: (status(env, running=False) or {}).get("state") == "idle", 30,
                 "cpushared to be idle")
        payload = spin_input(spin_count_for(2.0), b"again")
        buyer = BuyerThread(m.buy_order("buyer", max_cpu_seconds=30), job("spin"), [payload])
        [kid] = wait_for(lambda: jobs_of(proc.pid), 30, "the job to start under cpushared")
    finally:
        code, _, err = stop_daemon(proc, signal.SIGTERM)
    assert code == 0, err
    assert "handed back" in err
    # Another seller finishes it; the buyer pays once.
    m.seller(m.sell_order("bob", "bob-cpu0"))
    [r] = buyer.join(120)
    assert r.ok and r.output == payload and r.attempts == 2, r
    assert m.balance_milli("alice") == 0
    assert m.ledger_check().returncode == 0


def test_daemon_mode_sells_after_detaching(market, tmp_path):
    """The sysvinit path: checks run before detaching (the sandbox's zygote
    among them), and the detached daemon still runs jobs."""
    import os

    m = market
    order = m.sell_order("alice", "cpu0")
    pidfile = tmp_path / "cpu0.pid"
    r = subprocess.run([PYTHON, "-m", "cpushare.daemon", "--daemon", "--pidfile", str(pidfile),
                        "--no-dbus", "--cache-dir", str(tmp_path / "cache"), str(order)],
                       env=daemon_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "the pidfile"))
    try:
        buyer = BuyerThread(m.buy_order("buyer"), job("echo"), [b"one", b"two"])
        results = buyer.join(60)
        assert sorted(x.output for x in results) == [b"one", b"two"]
        assert all(x.ok for x in results)
        assert m.ledger_check().returncode == 0
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pidfile.exists(), 30, "the daemon to exit and remove its pidfile")
