"""The systemd files and the init script, checked on the host without booting.

The generator runs here as systemd would run it (three output directories),
on a temporary order directory; the units' hardening is rated offline by
systemd-analyze and the seller's system call filter is expanded against what
the sandbox needs; the market server speaks sd_notify(3) to a real
NOTIFY_SOCKET.  The booted container (test_system.py) does the rest.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "systemd" / "cpushare-generator"
UNIT = ROOT / "systemd" / "cpushare@.service"
SERVER_UNIT = ROOT / "systemd" / "cpushare-server.service"
INIT = ROOT / "debian" / "cpushare.init"
EXPOSURE_BOUND = 2.0

# What the daemon and its sandbox call (DESIGN.md, sandbox.py): the unit's
# filter must let them through, or the daemon dies of SIGSYS/EPERM.
SANDBOX_SYSCALLS = ("seccomp", "prctl", "memfd_create", "mmap", "munmap", "clone", "clone3",
                    "fork", "vfork", "close_range", "setrlimit", "prlimit64", "wait4",
                    "waitid", "kill", "execve", "socket", "connect", "sendmsg", "recvmsg")


def run_generator(config: Path, out: Path, *extra_env: tuple[str, str]):
    dirs = [out / "normal", out / "early", out / "late"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CPUSHARE_CONFIG_DIR": str(config),
           **dict(extra_env)}
    r = subprocess.run(["/bin/sh", str(GENERATOR), *map(str, dirs)], env=env,
                       capture_output=True, text=True, check=True)
    return r, dirs


def wants(normal: Path) -> dict[str, str]:
    d = normal / "cpushare.target.wants"
    return {p.name: os.readlink(p) for p in d.iterdir()} if d.exists() else {}


def test_generator_wants_one_instance_per_order(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("cpu0", "cpu1", "big-box.2", "a:b_c"):
        (etc / f"{name}.cpu").write_text("# order\n")
    (etc / "README").write_text("not an order\n")
    (etc / "cpu0.cpu.dpkg-old").write_text("")
    r, (normal, early, late) = run_generator(etc, tmp_path / "out")
    assert wants(normal) == {
        f"cpushare@{n}.service": "/lib/systemd/system/cpushare@.service"
        for n in ("cpu0", "cpu1", "big-box.2", "a:b_c")}
    assert not any(early.iterdir()) and not any(late.iterdir())
    assert r.stderr == ""
    # Run again (every daemon-reload does): the same links, no complaint.
    r, (normal, _, _) = run_generator(etc, tmp_path / "out")
    assert len(wants(normal)) == 4 and r.stderr == ""


def test_generator_skips_what_is_no_plain_order_and_says_why(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "bad name.cpu").write_text("")
    (etc / "-dash.cpu").write_text("")
    (etc / "dir.cpu").mkdir()
    (etc / "dangling.cpu").symlink_to(tmp_path / "nowhere")
    (etc / "ok.cpu").write_text("")
    r, (normal, _, _) = run_generator(etc, tmp_path / "out")
    assert list(wants(normal)) == ["cpushare@ok.service"]
    for bad in ("bad name.cpu", "-dash.cpu", "dir.cpu", "dangling.cpu"):
        assert bad in r.stderr, r.stderr


def test_generator_without_order_directory_writes_nothing(tmp_path):
    r, (normal, early, late) = run_generator(tmp_path / "absent", tmp_path / "out")
    assert not any(normal.iterdir()) and r.stdout == r.stderr == ""


def test_generator_unit_dir_can_be_moved(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "cpu0.cpu").write_text("")
    _, (normal, _, _) = run_generator(etc, tmp_path / "out", ("CPUSHARE_UNIT_DIR", "/usr/lib/systemd/system"))
    assert wants(normal) == {"cpushare@cpu0.service": "/usr/lib/systemd/system/cpushare@.service"}


def unit_values(key: str, unit: Path = UNIT) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", unit.read_text(), re.M)


def test_restart_is_prevented_for_the_daemons_permanent_refusals():
    from cpushare import daemon

    prevented = {int(v) for line in unit_values("RestartPreventExitStatus") for v in line.split()}
    assert prevented == {daemon.EXIT_CONFIG, daemon.EXIT_NO_SECCOMP, daemon.EXIT_SANDBOX}


def test_unit_names_its_documentation_and_its_target():
    assert unit_values("Documentation") == ["man:cpushared(8) man:cpushare.cpu(5)"]
    assert unit_values("ExecStart") == ["/usr/bin/cpushared --foreground %i"]
    assert unit_values("ConditionPathExists") == ["/etc/cpushare/%i.cpu"]
    assert unit_values("PartOf") == ["cpushare.target"]
    assert unit_values("WantedBy") == ["cpushare.target"]
    assert unit_values("User") == ["cpushare"]
    assert unit_values("Type") == ["notify"]
    assert unit_values("MemoryDenyWriteExecute") == ["yes"]


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    return exe


def _group_syscalls(analyze: str) -> dict[str, set[str]]:
    out = subprocess.run([analyze, "syscall-filter", "--no-pager"], capture_output=True,
                         text=True, check=True).stdout
    groups: dict[str, set[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), set())
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.add(line.strip())
    return groups


def _expand(item: str, groups: dict[str, set[str]]) -> set[str]:
    if not item.startswith("@"):
        return {item}
    out: set[str] = set()
    for member in groups[item]:
        out |= _expand(member, groups)
    return out


def test_syscall_filter_lets_the_sandbox_work():
    """Evaluate the unit's SystemCallFilter= lines the way systemd does: the
    first (an allow list) sets the list, "~" lines take away, others add."""
    groups = _group_syscalls(_analyze())
    allowed: set[str] = set()
    for line in unit_values("SystemCallFilter"):
        deny = line.startswith("~")
        items: set[str] = set()
        for item in line.lstrip("~").split():
            items |= _expand(item, groups)
        allowed = allowed - items if deny else allowed | items
    missing = [s for s in SANDBOX_SYSCALLS if s not in allowed]
    assert not missing, f"cpushare@.service's SystemCallFilter= refuses {missing}"


@pytest.mark.parametrize("unit, instance", [(UNIT, "cpushare@x.service"),
                                            (SERVER_UNIT, "cpushare-server.service")],
                         ids=["cpushare@", "cpushare-server"])
def test_offline_security_exposure_is_within_the_bound(tmp_path, unit, instance):
    analyze = _analyze()
    shutil.copy(unit, tmp_path / unit.name)
    r = subprocess.run([analyze, "security", "--offline=true", "--no-pager",
                        str(tmp_path / instance)],
                       capture_output=True, text=True, cwd=tmp_path)
    m = re.search(rf"Overall exposure level for {re.escape(instance)}:\s+([\d.]+)", r.stdout)
    if m is None:
        pytest.skip(f"systemd-analyze security --offline does not work here: {r.stderr.strip()}")
    assert float(m.group(1)) <= EXPOSURE_BOUND, r.stdout


def test_seller_memory_backstop_leaves_room_for_the_largest_job():
    """MemoryMax= is a backstop for the whole instance (daemon, zygote, job,
    image cache), never the per-task limit: it must hold the largest address
    space a job can have (everything below bytecode.USER_MAX) with room to spare."""
    from cpushare import bytecode
    from cpushare.order import parse_size

    (value,) = unit_values("MemoryMax")
    assert parse_size(value) >= bytecode.USER_MAX + (1 << 30), value


# --- the market's unit ------------------------------------------------------

def test_server_unit_serves_the_default_database_as_its_own_user():
    """The unit, cpushare-server's defaults and the package agree on where the
    market lives and who runs it."""
    from cpushare.market import admin

    db = Path(admin.DEFAULT_DB)
    assert unit_values("ConditionPathExists", SERVER_UNIT) == [str(db)]
    assert db.parent.parent == Path("/var/lib")
    assert unit_values("StateDirectory", SERVER_UNIT) == [db.parent.name]
    sysusers = (ROOT / "debian" / "cpushare-server.sysusers").read_text()
    (user,) = unit_values("User", SERVER_UNIT)
    assert re.search(rf"^u {re.escape(user)} - .* {db.parent}$", sysusers, re.M), sysusers
    assert unit_values("Group", SERVER_UNIT) == [user]
    assert unit_values("Documentation", SERVER_UNIT) == ["man:cpushare-server(8)"]
    assert unit_values("Type", SERVER_UNIT) == ["notify"]
    assert unit_values("EnvironmentFile", SERVER_UNIT) == ["-/etc/default/cpushare-server"]
    assert unit_values("ExecStart", SERVER_UNIT) == [
        "/usr/bin/cpushare-server serve $CPUSHARE_SERVER_OPTS"]
    default = (ROOT / "debian" / "cpushare-server.default").read_text()
    assert re.search(r'^CPUSHARE_SERVER_OPTS=""$', default, re.M), default
    assert int(unit_values("LimitNOFILE", SERVER_UNIT)[0]) >= 1 << 20
    assert unit_values("CapabilityBoundingSet", SERVER_UNIT) == [""]
    assert "systemd/cpushare-server.service lib/systemd/system/" in (
        ROOT / "debian" / "cpushare-server.install").read_text().splitlines()


def test_server_default_port_needs_no_capability():
    from cpushare.market import admin
    from cpushare.order import split_hostport

    assert split_hostport(admin.DEFAULT_LISTEN)[1] >= 1024


def test_server_tells_systemd_ready_watchdog_and_stopping(tmp_path):
    """cpushare-server serve under Type=notify: READY=1 once it listens (with
    the address in STATUS=), WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1
    on SIGTERM, and exit status 0."""
    from dbus_fixtures import PYTHON, SRC, NotifySocket

    env = dict(os.environ, PYTHONPATH=str(SRC))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "market.db"
    subprocess.run([PYTHON, "-m", "cpushare.market", "--db", str(db), "init", "--listen",
                    f"127.0.0.1:{port}"], env=env, check=True, capture_output=True, timeout=60)
    notify = NotifySocket(tmp_path)
    proc = subprocess.Popen([PYTHON, "-m", "cpushare.market", "--db", str(db), "serve"],
                            env=dict(env, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready = notify.wait("READY", "1")
        assert ready["STATUS"] == f"Serving the market on 127.0.0.1:{port}", ready
        assert ready["MAINPID"] == str(proc.pid), ready
        socket.create_connection(("127.0.0.1", port), 5).close()  # it listens
        seen = len(notify.messages)
        notify.wait("WATCHDOG", "1", after=seen)
        notify.wait("WATCHDOG", "1", after=len(notify.messages))
        proc.send_signal(signal.SIGTERM)
        assert notify.wait("STOPPING", "1")["STATUS"] == "Stopping (SIGTERM)"
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_init_script_is_posix_and_lsb():
    subprocess.run(["/bin/sh", "-n", str(INIT)], check=True)
    if shutil.which("checkbashisms"):
        subprocess.run(["checkbashisms", str(INIT), str(GENERATOR)], check=True)
    text = INIT.read_text()
    header = text.split("### BEGIN INIT INFO", 1)[1].split("### END INIT INFO", 1)[0]
    assert re.search(r"^# Provides:\s+cpushare$", header, re.M)
    assert ". /lib/lsb/init-functions" in text
    cases = set()
    for pattern in re.findall(r"^\s{4}([\w|-]+)\)$", text, re.M):
        cases |= set(pattern.split("|"))
    assert {"start", "stop", "status", "restart", "force-reload"} <= cases, cases


def test_sysv_generator_finds_a_native_cpushare_service():
    """/etc/init.d/cpushare would become cpushare.service under systemd: the
    package masks that name so only the native units manage the daemons."""
    links = (ROOT / "debian" / "cpushare.links").read_text().split("\n")
    assert "dev/null lib/systemd/system/cpushare.service" in links


def test_package_version_is_the_python_version():
    """debian/changelog gives the package its version; the code says the same."""
    import cpushare

    if shutil.which("dpkg-parsechangelog") is None:
        pytest.skip("dpkg-parsechangelog (dpkg-dev) is not installed")
    version = subprocess.run(["dpkg-parsechangelog", "-l", str(ROOT / "debian" / "changelog"),
                              "-S", "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert version.split("-")[0].split("+")[0] == cpushare.__version__
