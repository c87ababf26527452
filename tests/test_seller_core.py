"""The seller core's API (what cpushared wraps), against a real market server.

The Seller runs in-process on its own asyncio loop in a thread, as under
the daemon; control calls come from the test's thread, as from D-Bus.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from configobj import ConfigObj

from cpushare.buyer import run_tasks
from cpushare.order import load_buy, load_sell
from cpushare.seller import Seller, Status

from test_e2e_support import (BuyerThread, LocalMarket, free_port, job, market,  # noqa: F401
                              spin_count_for, spin_input, wait_for)


class SellerThread:
    def __init__(self, order, cache_dir, **attrs):
        self.statuses: list[Status] = []
        self.seller = Seller(order, cache_dir=cache_dir, on_change=self.statuses.append)
        for k, v in attrs.items():  # tunables such as BACKOFF_CAP
            setattr(self.seller, k, v)
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        try:
            asyncio.run(self.seller.run())
        except BaseException as e:
            self.error = e

    def states(self) -> list[str]:
        out = []
        for s in self.statuses:
            if not out or out[-1] != s.state:
                out.append(s.state)
        return out

    def wait_state(self, state: str, timeout: float = 30) -> Status:
        return wait_for(lambda: self.seller.status().state == state and self.seller.status(),
                        timeout, f"seller state {state!r} (now {self.seller.status().state!r}, "
                                  f"last error {self.seller.status().last_error!r})")

    def stop(self, hand_back=True, timeout: float = 30) -> None:
        self.seller.stop(hand_back=hand_back)
        self.t.join(timeout)
        assert not self.t.is_alive(), "run() did not return after stop()"
        if self.error:
            raise self.error


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_status_lifecycle_counters_and_stop_from_another_thread(market, tmp_path):
    m = market
    records = Records()
    logger = logging.getLogger("cpushare.seller")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(records)
    # 3600 CPUCoins per CPU-hour: 1 milli-CPUCoin per CPU-millisecond, so even
    # these tiny tasks earn whole milli-CPUCoins (payments are exact)
    order = load_sell(m.sell_order("alice", "alice-cpu0", price="3600.000"))
    st = SellerThread(order, tmp_path / "cache")
    s = st.wait_state("idle")
    assert (s.order, s.model, s.server) == ("alice-cpu0", "seccomp", f"127.0.0.1:{m.port}")
    assert s.connected_since is not None and s.current_task is None and s.last_error == ""
    results = run_tasks(load_buy(m.buy_order("buyer", price="7200.000")), job("echo"),
                        [b"a", b"bb", b"ccc"])
    assert [r.output for r in results] == [b"a", b"bb", b"ccc"]
    wait_for(lambda: st.seller.status().coins_earned_milli == sum(r.cost_milli for r in results),
             10, "the seller to see every settlement")
    s = st.seller.status()
    assert s.tasks_done == 3 and s.cpu_seconds_sold >= 0
    assert s.coins_earned_milli == m.balance_milli("alice") > 0
    # the image was fetched once and cached by digest
    assert (tmp_path / "cache" / f"{job('echo').digest}.bin").exists()
    st.stop()
    assert st.seller.status().state == "stopped"
    assert st.states()[:2] == ["connecting", "idle"]
    assert "running" in st.states() and st.states()[-2:] == ["stopping", "stopped"]
    assert any(x.current_task and x.buyer_order for x in st.statuses if x.state == "running")
    # one record per task with the structured fields journald gets
    logger.removeHandler(records)
    logger.setLevel(level)
    done = [r for r in records.records if getattr(r, "OUTCOME", None) == "ok"]
    assert len(done) == 3, [r.getMessage() for r in records.records]
    for r in done:
        assert r.ORDER == "alice-cpu0" and r.TASK.count("/") == 1 and r.BUYER_ORDER
        assert isinstance(r.CPU_MS, int) and r.CPU_MS >= 1


def test_stop_hands_back_the_running_task_which_finishes_elsewhere(market, tmp_path):
    m = market
    count = spin_count_for(2.0)
    # the cheaper ask gets the task first
    cheap = load_sell(m.sell_order("alice", "alice-cpu0", price="0.001"))
    st = SellerThread(cheap, tmp_path / "cache")
    st.wait_state("idle")
    m.seller(m.sell_order("bob", "bob-cpu0", price="0.010"))
    payload = spin_input(count, b"handed back")
    b = BuyerThread(m.buy_order("buyer", max_cpu_seconds=30), job("spin"), [payload])
    st.wait_state("running")
    t0 = time.monotonic()
    st.stop(hand_back=True)
    stop_took = time.monotonic() - t0
    [r] = b.join(120)
    assert r.ok and r.output == payload and r.attempts == 2, r
    assert st.seller.status().tasks_done == 0
    assert m.balance_milli("alice") == 0 and m.balance_milli("bob") == r.cost_milli
    # it stopped without running the job to its end: far less than the job's own time
    assert stop_took < r.cpu_ms / 1000 / 2, (stop_took, r.cpu_ms)


def test_stop_without_hand_back_finishes_the_task(market, tmp_path):
    m = market
    count = spin_count_for(0.5)
    st = SellerThread(load_sell(m.sell_order("alice", "alice-cpu0")), tmp_path / "cache")
    st.wait_state("idle")
    payload = spin_input(count, b"finished")
    b = BuyerThread(m.buy_order("buyer", max_cpu_seconds=30), job("spin"), [payload])
    st.wait_state("running")
    st.stop(hand_back=False)
    assert st.seller.status().tasks_done == 1
    [r] = b.join(60)
    assert r.ok and r.attempts == 1 and r.output == payload


def test_pause_takes_no_work_until_resume(market, tmp_path):
    m = market
    st = SellerThread(load_sell(m.sell_order("alice", "alice-cpu0")), tmp_path / "cache")
    st.wait_state("idle")
    st.seller.pause()
    st.wait_state("paused")
    b = BuyerThread(m.buy_order("buyer"), job("echo"), [b"waited"])
    time.sleep(1.0)
    assert b.results == [] and st.seller.status().tasks_done == 0
    st.seller.resume()
    [r] = b.join(30)
    # the seller's `ready` may already have been out when it paused: then the task
    # came and was handed back (the protocol has no "unready"), one attempt more
    assert r.ok and r.output == b"waited" and r.attempts <= 2
    assert st.seller.status().tasks_done == 1
    st.stop()


def test_reload_applies_new_limits_at_the_next_task(market, tmp_path):
    m = market
    path = m.sell_order("alice", "alice-cpu0")
    st = SellerThread(load_sell(path), tmp_path / "cache")
    st.wait_state("idle")
    buy = load_buy(m.buy_order("buyer", max_cpu_seconds=30))
    payload = spin_input(spin_count_for(2.5))
    conf = ConfigObj(str(path), interpolation=False)
    conf["limits"]["cpu_seconds"] = "1"
    conf.filename = str(tmp_path / "alice-cpu0.cpu")
    conf.write()
    st.seller.reload(load_sell(tmp_path / "alice-cpu0.cpu"))
    [r] = run_tasks(buy, job("spin"), [payload])
    assert not r.ok and r.reason.startswith("cpu-limit") or "cpu-limit" in r.reason, r
    st.stop()


def test_reconnects_with_backoff_and_reports_why(tmp_path):
    m = LocalMarket(tmp_path / "market")
    try:
        m.account("alice")
        order = load_sell(m.sell_order("alice", "alice-cpu0"))
        # no server yet: the seller retries, says where it failed, ends in 'error'
        st = SellerThread(order, tmp_path / "cache", BACKOFF_CAP=0.5)
        s = st.wait_state("error", timeout=20)
        assert f"127.0.0.1:{m.port}" in s.last_error and "refused" in s.last_error.lower(), s
        m.serve()
        s = st.wait_state("idle", timeout=20)
        assert s.last_error == "" and s.connected_since is not None
        # the server dies: the seller notices and comes back when it returns
        m.server.kill9()
        wait_for(lambda: st.seller.status().state in ("connecting", "error"), 20,
                 "the seller to notice the lost server")
        m.serve()
        st.wait_state("idle", timeout=20)
        st.stop()
    finally:
        m.close()


def test_wrong_port_is_not_a_hang(tmp_path):
    """stop() while connecting returns promptly."""
    m = LocalMarket(tmp_path / "market")
    try:
        m.account("alice")
        order = load_sell(m.sell_order("alice", "alice-cpu0"))
        order = type(order)(**{**order.__dict__, "port": free_port()})
        st = SellerThread(order, tmp_path / "cache")
        wait_for(lambda: st.seller.status().last_error, 20, "a connection failure")
        st.stop(timeout=5)
    finally:
        m.close()


def test_a_task_paused_too_long_is_handed_back_and_finishes_elsewhere(market, tmp_path):
    m = market
    count = spin_count_for(2.0)
    cheap = load_sell(m.sell_order("alice", "alice-cpu0", price="0.001"))
    st = SellerThread(cheap, tmp_path / "cache", PAUSE_HANDBACK_SECONDS=1.0)
    st.wait_state("idle")
    m.seller(m.sell_order("bob", "bob-cpu0", price="0.010"))
    payload = spin_input(count, b"too long paused")
    b = BuyerThread(m.buy_order("buyer", max_cpu_seconds=30), job("spin"), [payload])
    st.wait_state("running")
    st.seller.pause()
    [r] = b.join(120)
    assert r.ok and r.output == payload and r.attempts == 2, r
    s = st.seller.status()
    assert s.state == "paused" and s.tasks_done == 0 and s.current_task is None, s
    assert m.balance_milli("alice") == 0 and m.balance_milli("bob") == r.cost_milli
    st.seller.resume()
    st.wait_state("idle")
    st.stop()


def test_a_seller_paused_while_disconnected_stays_paused(tmp_path, caplog):
    """Reconnect attempts must not overwrite the state the seller asked for."""
    m = LocalMarket(tmp_path / "market")
    m.account("alice")
    order = load_sell(m.sell_order("alice", "alice-cpu0"))  # the market never serves
    st = SellerThread(order, tmp_path / "cache", BACKOFF_BASE=0.05, BACKOFF_CAP=0.1)
    wait_for(lambda: st.seller.status().last_error, 30, "a failed connection")
    st.seller.pause()
    st.wait_state("paused")
    seen = len(st.statuses)
    retries = lambda: sum("retrying in" in r.getMessage() for r in caplog.records)  # noqa: E731
    before = retries()
    wait_for(lambda: retries() > before + 3, 30, "more failed connections")
    assert {s.state for s in st.statuses[seen - 1:]} == {"paused"}
    st.seller.resume()
    wait_for(lambda: st.seller.status().state in ("connecting", "error"), 30,
             "the state after resume")
    st.stop()


def test_stop_at_any_moment_of_the_handshake_ends_run(market, tmp_path):
    """stop() right after run() starts, at spread moments of connect/TLS/hello."""
    order = load_sell(market.sell_order("alice", "alice-cpu0"))
    for i in range(20):
        st = SellerThread(order, tmp_path / f"cache{i}")
        time.sleep(0.002 * i)
        st.stop(timeout=15)
        assert st.seller.status().state == "stopped"


def test_copies_of_one_order_file_sell_one_cpu_each(market, tmp_path):
    """cp cpu0.cpu cpu1.cpu: two instances of one sell order, both connected, both sold."""
    import shutil
    path = market.sell_order("alice", "cpu0")
    shutil.copy(path, tmp_path / "cpu1.cpu")
    sts = [SellerThread(load_sell(p), tmp_path / f"cache-{p.stem}")
           for p in (path, tmp_path / "cpu1.cpu")]
    since = [st.wait_state("idle").connected_since for st in sts]
    time.sleep(1.0)  # neither copy pushes the other off the market
    assert [st.seller.status().connected_since for st in sts] == since
    buy = load_buy(market.buy_order("buyer", max_cpu_seconds=30))
    results = run_tasks(buy, job("spin"), [spin_input(spin_count_for(0.3))] * 6)
    assert all(r.ok for r in results), results
    done = [st.seller.status().tasks_done for st in sts]
    assert sum(done) == 6 and min(done) >= 1, done
    for st in sts:
        st.stop()


def test_the_orders_allow_cpuid_reaches_the_sandbox(market, tmp_path):  # noqa: F811
    """allow_cpuid in the sell order is carried to every task's limits."""
    from cpushare.protocol import Message
    path = market.sell_order("alice", "alice-cpu0")
    conf = ConfigObj(str(path))
    task = Message("task", {"cpu_ms": 1000, "wall_ms": 5000, "memory": 1 << 20,
                            "output_limit": -1})
    assert Seller(load_sell(path), cache_dir=tmp_path)._limits(task).allow_cpuid is False
    conf["limits"]["allow_cpuid"] = "true"
    conf.write()
    assert Seller(load_sell(path), cache_dir=tmp_path)._limits(task).allow_cpuid is True
