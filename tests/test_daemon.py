"""cpushared as systemd runs it: a real NOTIFY_SOCKET bound by the test, a
private dbus-daemon as the system bus, the real seller core pointed at a port
that refuses connections, and the refusals made real (a bad order file, a
kernel that answers as one without CONFIG_SECCOMP, a sandbox that does not
hold) with seccomp filters the daemon's process inherits."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import textwrap

import pytest
from dbus_fixtures import (PYTHON, SRC, NotifySocket, credentials, daemon_env,  # noqa: F401
                           dead_port, silent_port, start_daemon, stop_daemon, system_bus,
                           wait_for, write_order)

from test_e2e_support import BuyerThread, job, market  # noqa: F401

from cpushare import daemon, dbus
from cpushare.order import load_sell


@pytest.fixture
def order_file(tmp_path, credentials, dead_port):  # noqa: F811
    return write_order(tmp_path / "cpu0.cpu", credentials, dead_port)


@pytest.fixture
def notify_socket(tmp_path):
    s = NotifySocket(tmp_path)
    yield s
    s.close()


def ctl(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "cpushare.ctl", *args], env=env or daemon_env(),
                          capture_output=True, text=True, timeout=60)


def run_daemon(args, *, env, rules: str | None = None, timeout=60) -> subprocess.CompletedProcess:
    """cpushared to completion, under a seccomp filter made of `rules` if given
    (python3-seccomp; the filter survives execve into the daemon)."""
    if rules is None:
        cmd = [PYTHON, "-m", "cpushare.daemon", *args]
    else:
        code = ("import errno, os, sys, seccomp\n"
                "f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)\n"
                + textwrap.dedent(rules) + "f.load()\n"
                + "os.execv(sys.argv[1], sys.argv[1:])\n")
        cmd = [PYTHON, "-c", code, PYTHON, "-m", "cpushare.daemon", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# --- the normal life: READY, STATUS, D-Bus, ctl, SIGHUP, SIGTERM --------------------

def test_ready_status_dbus_reload_and_clean_stop(system_bus, order_file, notify_socket,  # noqa: F811
                                                 tmp_path, credentials, dead_port):
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path,
                     DBUS_SYSTEM_BUS_ADDRESS=system_bus.address,
                     CACHE_DIRECTORY=str(tmp_path / "cache"))
    proc = start_daemon([str(order_file)], env=env)
    try:
        ready = notify_socket.wait("READY", "1")
        assert ready["MAINPID"] == str(proc.pid)
        # It sells idle time only, also where no unit set the priority.
        assert sched_of(proc.pid) == (os.SCHED_IDLE, 19)
        assert ready["STATUS"].startswith(f"Selling cpu0 on 127.0.0.1:{dead_port}: ")
        # The name was claimed before READY=1.
        assert dbus.list_instances(dbus.connect("system")) == {"cpu0": "org.cpushare.Seller1.cpu0"}
        assert (tmp_path / "cache").is_dir()

        # The refused connection shows in STATUS= and on the bus.
        notify_socket.wait("STATUS", contains="; last error: 127.0.0.1")
        r = ctl("status", "cpu0")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].endswith("cpu0 - CPUShare seller (org.cpushare.Seller1.cpu0)")
        fields = dict(line.strip().split(": ", 1) for line in lines[1:])
        assert fields["State"] in ("connecting", "error")
        assert fields["Order"] == "cpu0 (seccomp)"
        assert fields["Server"] == f"127.0.0.1:{dead_port}"
        assert fields["Current task"] == "-" and fields["Tasks done"] == "0"
        assert fields["Earned"] == "0.000 CPUCoins" and fields["Connected since"] == "-"
        assert "Connect" in fields["Last error"] and str(dead_port) in fields["Last error"]
        js = json.loads(ctl("status", "--json").stdout)
        assert [x["instance"] for x in js] == ["cpu0"] and js[0]["coins_earned_milli"] == 0

        # Pause and resume over the bus, through cpusharectl (their effect on
        # the state: test_pause_and_resume_show_in_status_and_on_the_bus).
        assert ctl("pause", "cpu0").returncode == 0
        assert ctl("resume", "--all").returncode == 0

        # SIGHUP with a broken file keeps the old order and says why.
        order_file.write_text(order_file.read_text().replace("model = seccomp", "model = vax"))
        seen = len(notify_socket.messages)
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait("RELOADING", "1", after=seen)
        notify_socket.wait("READY", "1", after=seen)
        # A good file is taken.
        write_order(order_file, credentials, dead_port, price_milli=20)
        seen = len(notify_socket.messages)
        proc.send_signal(signal.SIGHUP)
        notify_socket.wait("READY", "1", after=seen)
        assert ctl("status").returncode == 0

        seen = len(notify_socket.messages)
        code, out, err = stop_daemon(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, err
    notify_socket.wait("STOPPING", "1", after=seen, timeout=1)
    assert f"{order_file}:" in err and "keeping the old order" in err and "model" in err
    assert "order re-read" in err
    assert "SIGTERM: stopping, handing back the running task" in err
    assert err.index("Pause() over D-Bus") < err.index("INFO: paused") \
        < err.index("Resume() over D-Bus") < err.index("INFO: resumed")
    # The name is gone with the daemon.
    r = ctl("status")
    assert r.returncode == daemon_ctl_exit("NOT_RUNNING"), r.stderr
    assert "no cpushared instance runs on the system bus" in r.stderr


def sched_of(pid: int) -> tuple[int, int]:
    """(policy, nice) of a process, from /proc/PID/stat (fields 41 and 19)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[38]), int(fields[16])


def test_idle_priority_sets_cpu_and_io_classes():
    code = ("import ctypes, os\n"
            "from cpushare import daemon\n"
            "daemon.idle_priority()\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0),\n"
            "      libc.syscall(252, 1, 0) >> 13)\n")  # ioprio_get: the class
    out = subprocess.run([PYTHON, "-c", code], env=daemon_env(), capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert [int(x) for x in out] == [os.SCHED_IDLE, 19, 3]


def daemon_ctl_exit(name: str) -> int:
    from cpushare import ctl as ctl_module
    return getattr(ctl_module, f"EXIT_{name}")


def test_pause_and_resume_show_in_status_and_on_the_bus(system_bus, tmp_path, credentials,  # noqa: F811
                                                       silent_port, notify_socket):
    order_file = write_order(tmp_path / "cpu0.cpu", credentials, silent_port)
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path,
                     DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    proc = start_daemon(["--cache-dir", str(tmp_path / "c"), str(order_file)], env=env)
    try:
        notify_socket.wait("STATUS", contains=": connecting, 0 tasks done")
        seen = len(notify_socket.messages)
        assert ctl("pause", "cpu0").returncode == 0
        notify_socket.wait("STATUS", contains=": paused, 0 tasks done", after=seen)
        r = ctl("status", "--json")
        assert json.loads(r.stdout)[0]["state"] == "paused"
        assert ctl("pause", "cpu0").returncode == 0  # idempotent
        seen = len(notify_socket.messages)
        assert ctl("resume", "cpu0").returncode == 0
        notify_socket.wait("STATUS", contains=": connecting, 0 tasks done", after=seen)
        assert json.loads(ctl("status", "--json").stdout)[0]["state"] == "connecting"
    finally:
        code, _, err = stop_daemon(proc)
    assert code == 0, err


# --- refusals, each with its documented exit status -------------------------------

def test_a_bad_order_is_refused_naming_file_line_and_key(tmp_path, order_file, notify_socket):
    text = order_file.read_text().replace("price = 0.010", "price = lots")
    order_file.write_text(text)
    line = text.splitlines().index(next(x for x in text.splitlines() if x.startswith("price"))) + 1
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path)
    r = run_daemon(["--no-dbus", "--cache-dir", str(tmp_path / "c"), str(order_file)], env=env)
    assert r.returncode == daemon.EXIT_CONFIG == 78
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert f"{order_file}:{line}" in err[0] and "price" in err[0]
    status = notify_socket.wait("STATUS")["STATUS"]
    assert status.startswith("Refusing to start: ") and f"{order_file}:{line}" in status
    assert not any("READY" in m for m in notify_socket.messages)


def test_a_kvm_order_that_asks_for_kvm_where_it_does_not_work_is_refused(tmp_path, order_file,
                                                                       notify_socket):
    """accel = kvm: cpushared measures KVM (a probe guest) and refuses in one
    line, naming why, where it does not run guests at speed (as on these
    machines: a nested paravirtual KVM); where it works, it starts."""
    from cpushare.models import probe
    text = order_file.read_text().replace("model = seccomp", "model = kvm\naccel = kvm")
    order_file.write_text(text)
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path)
    try:
        probe.choose("kvm")
    except probe.AccelError as e:
        why = str(e)
    else:
        pytest.skip("KVM works on this machine: there is nothing to refuse")
    r = run_daemon(["--no-dbus", "--cache-dir", str(tmp_path / "c"), str(order_file)], env=env)
    assert r.returncode == daemon.EXIT_NO_ACCEL == 81, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and why.split(":")[0] in err[0], (r.stderr, why)
    assert not any("READY" in m for m in notify_socket.messages)


def test_a_seccomp_order_may_not_set_kvm_settings(tmp_path, order_file):
    order_file.write_text(order_file.read_text().replace("model = seccomp",
                                                         "model = seccomp\naccel = tcg"))
    r = run_daemon(["--no-dbus", "--cache-dir", str(tmp_path / "c"), str(order_file)],
                   env=daemon_env())
    assert r.returncode == daemon.EXIT_CONFIG
    assert "accel: only an order of model = kvm may set it" in r.stderr, r.stderr


def test_a_missing_instance_is_refused_naming_its_file(tmp_path):
    r = run_daemon(["--no-dbus", "no-such-instance"], env=daemon_env())
    assert r.returncode == daemon.EXIT_CONFIG
    assert "/etc/cpushare/no-such-instance.cpu" in r.stderr


NO_CONFIG_SECCOMP = """
f.add_rule(seccomp.ERRNO(errno.EINVAL), "prctl", seccomp.Arg(0, seccomp.EQ, 21))
f.add_rule(seccomp.ERRNO(errno.EINVAL), "prctl", seccomp.Arg(0, seccomp.EQ, 22))
f.add_rule(seccomp.ERRNO(errno.ENOSYS), "seccomp")
"""

# prctl(PR_SET_SECCOMP) and seccomp(SET_MODE_STRICT/FILTER) "succeed" without
# doing anything: the loader believes the child is contained and it is not.
SECCOMP_THAT_LIES = """
f.add_rule(seccomp.ERRNO(0), "prctl", seccomp.Arg(0, seccomp.EQ, 22))
f.add_rule(seccomp.ERRNO(0), "seccomp", seccomp.Arg(0, seccomp.EQ, 0))
f.add_rule(seccomp.ERRNO(0), "seccomp", seccomp.Arg(0, seccomp.EQ, 1))
"""


def test_no_config_seccomp_is_refused_in_one_line(tmp_path, order_file, notify_socket):
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path)
    r = run_daemon(["--no-dbus", "--cache-dir", str(tmp_path / "c"), str(order_file)],
                   env=env, rules=NO_CONFIG_SECCOMP)
    assert r.returncode == daemon.EXIT_NO_SECCOMP == 79, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "CONFIG_SECCOMP" in err[0], r.stderr
    status = notify_socket.wait("STATUS")["STATUS"]
    assert status.startswith("Refusing to start: ") and "CONFIG_SECCOMP" in status
    assert not any("READY" in m for m in notify_socket.messages)


def test_a_sandbox_that_does_not_hold_is_refused(tmp_path, order_file, notify_socket):
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path)
    r = run_daemon(["--no-dbus", "--cache-dir", str(tmp_path / "c"), str(order_file)],
                   env=env, rules=SECCOMP_THAT_LIES)
    assert r.returncode == daemon.EXIT_SANDBOX == 80, r.stderr
    assert "sandbox self-test failed" in r.stderr and "getpid" in r.stderr
    assert notify_socket.wait("STATUS")["STATUS"].startswith("Refusing to start: sandbox")
    assert not any("READY" in m for m in notify_socket.messages)


def test_an_unusable_cache_directory_is_refused(tmp_path, order_file):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_daemon(["--no-dbus", "--cache-dir", str(blocker / "cache"), str(order_file)],
                   env=daemon_env())
    assert r.returncode == daemon.EXIT_CANTCREAT
    assert f"cache directory {blocker / 'cache'}" in r.stderr


def test_without_a_bus_it_sells_and_says_so_once(market, tmp_path, notify_socket):  # noqa: F811
    # A container or an init-script machine: no system bus at all.  The
    # daemon sells all the same, and says once that D-Bus status is missing.
    order = market.sell_order("alice", "cpu0")
    address = f"unix:path={tmp_path}/no-bus"
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path, DBUS_SYSTEM_BUS_ADDRESS=address)
    proc = start_daemon(["--foreground", "--cache-dir", str(tmp_path / "c"), str(order)], env=env)
    try:
        notify_socket.wait("READY", "1")
        notify_socket.wait("STATUS", contains=": idle, 0 tasks done")  # on the market
        buyer = BuyerThread(market.buy_order("buyer"), job("echo"), [b"sold", b"anyway"])
        results = buyer.join(60)
        assert sorted(r.output for r in results) == [b"anyway", b"sold"]
        assert all(r.ok for r in results)
        notify_socket.wait("STATUS", contains=": idle, 2 tasks done")
        assert proc.poll() is None
    finally:
        code, _, err = stop_daemon(proc)
    assert code == 0, err
    assert err.count("status over D-Bus is unavailable") == 1, err
    assert f"cannot connect to the system bus at {address}" in err


def test_a_taken_name_is_refused(system_bus, tmp_path, order_file):  # noqa: F811
    env = daemon_env(DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    first = start_daemon(["--cache-dir", str(tmp_path / "c"), str(order_file)], env=env)
    try:
        con = dbus.connect("system")
        wait_for(lambda: dbus.list_instances(con), what="the first daemon's name")
        r = run_daemon(["--cache-dir", str(tmp_path / "c2"), str(order_file)], env=env)
        assert r.returncode == daemon.EXIT_UNAVAILABLE
        assert "cannot own org.cpushare.Seller1.cpu0 on the system bus" in r.stderr
        assert "already owned" in r.stderr
    finally:
        assert stop_daemon(first)[0] == 0


def test_session_bus_and_instance_names(tmp_path, order_file, system_bus, monkeypatch):  # noqa: F811
    assert daemon.order_path("cpu0") == daemon.ORDER_DIR / "cpu0.cpu"
    assert str(daemon.order_path("./x.cpu")) == "x.cpu"
    assert str(daemon.order_path("/srv/o/cpu1.cpu")) == "/srv/o/cpu1.cpu"
    # --bus session goes where DBUS_SESSION_BUS_ADDRESS says.
    env = daemon_env(DBUS_SESSION_BUS_ADDRESS=system_bus.address,
                     DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/none")
    proc = start_daemon(["--bus", "session", "--cache-dir", str(tmp_path / "c"),
                         str(order_file)], env=env)
    try:
        wait_for(lambda: ctl("--bus", "session", "status", env=env).returncode == 0,
                 what="the instance on the session bus")
        r = ctl("status", env=env)
        assert r.returncode == daemon_ctl_exit("NO_BUS") and "system bus" in r.stderr
    finally:
        assert stop_daemon(proc)[0] == 0


def test_losing_the_bus_stops_the_daemon_for_a_restart(system_bus, tmp_path, order_file):  # noqa: F811
    env = daemon_env(DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    proc = start_daemon(["--cache-dir", str(tmp_path / "c"), str(order_file)], env=env)
    try:
        con = dbus.connect("system")
        wait_for(lambda: dbus.list_instances(con), what="the daemon's name")
        system_bus.close()  # the bus goes away under the daemon
        code, _, err = stop_daemon(proc, sig=0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == daemon.EXIT_FAILURE, err
    assert "lost the system bus" in err
    assert "SIGTERM" not in err


# What systemd's MemoryDenyWriteExecute=yes installs (src/shared/seccomp-util.c):
# no mapping both writable and executable, no making memory executable later.
MEMORY_DENY_WRITE_EXECUTE = """
W, X = 0x2, 0x4  # PROT_WRITE, PROT_EXEC
f.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, W | X, W | X))
f.add_rule(seccomp.ERRNO(errno.EPERM), "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
f.add_rule(seccomp.ERRNO(errno.EPERM), "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, X))
f.add_rule(seccomp.ERRNO(errno.EPERM), "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, 0o100000, 0o100000))
"""


def test_dbus_side_works_under_memory_deny_write_execute(system_bus, tmp_path,  # noqa: F811
                                                         order_file, notify_socket):
    # GLib calls back into Python (method calls, the 'closed' signal) through
    # libffi closures, which must not need W+X memory.
    code = ("import errno, os, sys, seccomp\n"
            "f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)\n"
            + MEMORY_DENY_WRITE_EXECUTE + "f.load()\n"
            + "os.execv(sys.argv[1], sys.argv[1:])\n")
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path,
                     DBUS_SYSTEM_BUS_ADDRESS=system_bus.address)
    proc = subprocess.Popen([PYTHON, "-c", code, PYTHON, "-m", "cpushare.daemon", "--cache-dir",
                             str(tmp_path / "c"), str(order_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        notify_socket.wait("READY", "1")
        assert ctl("pause", "cpu0").returncode == 0
        assert ctl("status", "cpu0").returncode == 0
        assert ctl("resume", "cpu0").returncode == 0
    finally:
        code, _, err = stop_daemon(proc)
    assert code == 0, err
    assert "Pause() over D-Bus" in err and "Resume() over D-Bus" in err


# --- watchdog ----------------------------------------------------------------------

def test_watchdog_pings_at_half_the_interval(tmp_path, order_file, notify_socket):
    env = daemon_env(NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="200000")
    proc = start_daemon(["--no-dbus", "--cache-dir", str(tmp_path / "c"), str(order_file)],
                        env=env)
    try:
        notify_socket.wait("READY", "1")
        for _ in range(3):  # pings keep coming (a 100 ms period)
            notify_socket.wait("WATCHDOG", "1", after=len(notify_socket.messages), timeout=5)
    finally:
        assert stop_daemon(proc)[0] == 0


def test_watchdog_is_for_its_own_pid_only(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert daemon.watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert daemon.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert daemon.watchdog_interval() is None


def test_a_stuck_dbus_thread_stops_the_watchdog(system_bus, tmp_path, order_file,  # noqa: F811
                                                notify_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    d = daemon.Daemon(load_sell(order_file), cache_dir=tmp_path / "c", bus="system")

    async def watch(seconds):
        task = asyncio.create_task(d._watchdog(0.05))
        await asyncio.sleep(seconds)
        task.cancel()

    try:
        # The GLib thread never turns: one ping, then none.
        asyncio.run(watch(0.5))
        while notify_socket.read(0.05):
            pass
        pings = [m for m in notify_socket.messages if m.get("WATCHDOG") == "1"]
        assert len(pings) == 1
        # Once it turns, pings flow.
        d.glib.start(0.01)
        seen = len(notify_socket.messages)
        asyncio.run(watch(0.5))
        while notify_socket.read(0.05):
            pass
        assert len([m for m in notify_socket.messages[seen:] if m.get("WATCHDOG") == "1"]) >= 3
    finally:
        d.close()


# --- logging -----------------------------------------------------------------------

def test_journal_entries_carry_the_upper_case_fields_only():
    from systemd.journal import JournalHandler

    sent = []
    handler = JournalHandler(sender_function=daemon.journal_sender(
        lambda message, /, **fields: sent.append((message, fields))), SYSLOG_IDENTIFIER="cpushared")
    logger = logging.getLogger("cpushare.test-journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("task %s: %s", "t1", "ok",
                       extra={"ORDER": "cpu0", "TASK": "t1", "OUTCOME": "ok", "CPU_MS": 12})
    finally:
        logger.removeHandler(handler)
    (message, fields), = sent
    assert message == "task t1: ok"
    assert fields["ORDER"] == "cpu0" and fields["TASK"] == "t1" and fields["CPU_MS"] == 12
    assert fields["OUTCOME"] == "ok" and fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "cpushared"
    assert all(k.isupper() for k in fields), sorted(fields)


def test_stderr_is_the_journal_only_when_journal_stream_names_it(monkeypatch):
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert daemon.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert not daemon.stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not daemon.stderr_is_journal()


def test_status_line_reads_like_a_sentence(order_file):
    from cpushare.seller import Status

    s = Status(state="idle", order="cpu0", model="seccomp", server="market:7300",
               current_task=None, buyer_order=None, tasks_done=12, cpu_seconds_sold=3.5,
               coins_earned_milli=42, connected_since=None, last_error="")
    assert daemon.describe(s) == "Selling cpu0 on market:7300: idle, 12 tasks done, 0.042 CPUCoins earned"
    s = Status(state="running", order="cpu0", model="seccomp", server="market:7300",
               current_task="77", buyer_order="b1", tasks_done=1, cpu_seconds_sold=3.5,
               coins_earned_milli=1500, connected_since=1.0, last_error="")
    assert daemon.describe(s) == ("Selling cpu0 on market:7300: running task 77, 1 task done, "
                                  "1.500 CPUCoins earned")


# --- --daemon (sysvinit) -------------------------------------------------------------

def test_daemon_mode_detaches_with_a_locked_pidfile(tmp_path, order_file):
    pidfile = tmp_path / "cpu0.pid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")  # stale: its process is gone
    args = ["--daemon", "--pidfile", str(pidfile), "--no-dbus", "--cache-dir",
            str(tmp_path / "c"), str(order_file)]
    r = run_daemon(args, env=daemon_env())
    assert r.returncode == 0, r.stderr
    assert f"{pidfile}: removed a stale pidfile" in r.stderr
    pid = wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != str(dead.pid)
                   and pidfile.read_text().strip(), what="the pidfile")
    pid = int(pid)
    try:
        assert os.getsid(pid) != os.getsid(0)  # a session of its own: detached
        again = run_daemon(args, env=daemon_env())
        assert again.returncode == daemon.EXIT_TEMPFAIL
        assert f"{pidfile}: cpushared is already running as pid {pid}" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pidfile.exists(), what="the pidfile's removal at exit")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
             open(f"/proc/{pid}/stat").read().split()[2] == "Z", what=f"pid {pid} to exit")


def test_daemon_mode_needs_a_pidfile(order_file):
    r = run_daemon(["--daemon", str(order_file)], env=daemon_env())
    assert r.returncode == 2 and "--daemon needs --pidfile PATH" in r.stderr
