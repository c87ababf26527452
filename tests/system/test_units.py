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
SERVER_TEMPLATE = ROOT / "systemd" / "cpushare-server@.service"
INIT = ROOT / "debian" / "cpushare.init"
EXPOSURE_BOUND = 2.0
KVM_EXPOSURE_BOUND = 2.5  # a kvm instance: the unit plus the generator's drop-in

# What the daemon and its sandbox call (DESIGN.md, sandbox.py): the unit's
# filter must let them through, or the daemon dies of SIGSYS/EPERM.
SANDBOX_SYSCALLS = ("seccomp", "prctl", "memfd_create", "mmap", "munmap", "clone", "clone3",
                    "fork", "vfork", "close_range", "setrlimit", "prlimit64", "wait4",
                    "waitid", "kill", "execve", "socket", "connect", "sendmsg", "recvmsg")
# What qemu-system-x86_64 7.2 calls for the kvm model (strace -f of the probe
# guest under TCG and under KVM, and of the test ISO's boot under TCG with
# -smp 2), and accept4 for its QMP socket: the same filter must let it through.
QEMU_SYSCALLS = (
    "access", "accept4", "arch_prctl", "bind", "brk", "clock_nanosleep", "clone", "clone3",
    "close", "eventfd2", "execve", "exit", "exit_group", "fchdir", "fcntl", "ftruncate",
    "futex", "get_mempolicy", "getdents64", "getpeername", "getpid", "getrandom",
    "getsockname", "gettid", "io_uring_setup", "ioctl", "listen", "lseek", "madvise",
    "memfd_create", "mmap", "mprotect", "munmap", "newfstatat", "openat", "poll", "ppoll",
    "prctl", "pread64", "prlimit64", "read", "readlink", "readv", "restart_syscall", "rseq",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sched_getaffinity", "seccomp",
    "set_mempolicy", "set_robust_list", "set_tid_address", "signalfd4", "socket", "statfs",
    "sysinfo", "tgkill", "uname", "unlink", "write", "writev")


def run_generator(config: Path, out: Path, *extra_env: tuple[str, str]):
    dirs = [out / "normal", out / "early", out / "late"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    groups = out / "group"
    if not groups.exists():
        groups.write_text("root:x:0:\nkvm:x:994:\ncpushare:x:996:\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CPUSHARE_CONFIG_DIR": str(config),
           "CPUSHARE_GROUP_FILE": str(groups), **dict(extra_env)}
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


# --- the kvm model's drop-in -------------------------------------------------

MiB = 1 << 20
DEVICE = {"BindPaths": "-/dev/kvm", "DeviceAllow": "/dev/kvm rw", "SupplementaryGroups": "kvm"}


@pytest.fixture(scope="module")
def pki():
    from cpushare.market import ca

    auth = ca.make_ca()
    return auth, ca.issue(auth.cert_pem, auth.key_pem, "o1")


def write_order(pki, path: Path, **kw) -> Path:
    from cpushare import order

    auth, leaf = pki
    order.write_sell(path, host="market.example.org", port=7300, price_milli=10,
                     ca_pem=auth.cert_pem, cert_pem=leaf.cert_pem, key_pem=leaf.key_pem, **kw)
    return path


def dropins(normal: Path) -> dict[str, str]:
    """{instance: its drop-in's text} for every drop-in the generator wrote."""
    found = {}
    for d in normal.glob("cpushare@*.service.d"):
        assert [f.name for f in d.iterdir()] == ["50-kvm.conf"], list(d.iterdir())
        found[d.name[len("cpushare@"):-len(".service.d")]] = (d / "50-kvm.conf").read_text()
    return found


def settings(text: str) -> dict[str, str]:
    """The drop-in's assignments (all in [Service]), comments left out."""
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "[Service]", text
    return dict(line.split("=", 1) for line in lines[1:])


def daemon_share() -> int:
    """What cpushare@.service's MemoryMax= leaves the daemon beside the
    largest seccomp job: a kvm instance leaves it the same beside the guest."""
    from cpushare import bytecode
    from cpushare.order import parse_size

    (value,) = unit_values("MemoryMax")
    return parse_size(value) - bytecode.USER_MAX


def memory_max(guest_mib: int) -> str:
    from cpushare.models.kvm import QEMU_OVERHEAD

    return f"{(guest_mib * MiB + QEMU_OVERHEAD + daemon_share()) // MiB}M"


@pytest.mark.parametrize("accel, memory", [
    ("auto", 256 * MiB), ("kvm", 512 * MiB), ("tcg", 1 << 30), ("auto", 1_000_000),
    ("kvm", 4096), ("tcg", 1 << 40)])
def test_generator_gives_a_kvm_order_what_qemu_needs(tmp_path, pki, accel, memory):
    """The drop-in agrees with what the daemon reads from the same file:
    MemoryMax= is the guest's memory (in MiB, rounded up as qemu's -m is)
    plus qemu's overhead plus the daemon's share; /dev/kvm only where the
    order may use KVM."""
    from cpushare.order import load_sell

    etc = tmp_path / "etc"
    etc.mkdir()
    path = write_order(pki, etc / "vm0.cpu", model="kvm", accel=accel, memory=memory)
    write_order(pki, etc / "cpu0.cpu")  # seccomp: no drop-in
    sold = load_sell(path)
    r, (normal, _, _) = run_generator(etc, tmp_path / "out")
    assert r.stderr == ""
    assert set(wants(normal)) == {"cpushare@vm0.service", "cpushare@cpu0.service"}
    found = dropins(normal)
    assert list(found) == ["vm0"]
    got = settings(found["vm0"])
    assert got.pop("MemoryMax") == memory_max(-(-sold.limits.memory // MiB)), found
    assert got == (DEVICE if sold.accel in ("auto", "kvm") else {}), found
    assert f"accel = {sold.accel}" in found["vm0"] and str(path) in found["vm0"]


def test_generator_adds_the_kvm_group_only_where_it_exists(tmp_path, pki):
    etc = tmp_path / "etc"
    etc.mkdir()
    write_order(pki, etc / "vm0.cpu", model="kvm")
    out = tmp_path / "out"
    out.mkdir()
    (out / "group").write_text("root:x:0:\nkvmx:x:5:\ncpushare:x:996:kvm\n")
    _, (normal, _, _) = run_generator(etc, out)
    got = settings(dropins(normal)["vm0"])
    assert got["DeviceAllow"] == "/dev/kvm rw" and "SupplementaryGroups" not in got, got


def test_generator_reads_configobj_as_configobj_does(tmp_path):
    """Quotes, comments, blanks, CRLF, a section header with a comment, and
    triple-quoted values whose lines look like keys; only the keys of the
    right section count."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "quoted.cpu").write_text(
        "# model = seccomp\n  'model' =   \"kvm\"   # a comment\n\taccel='tcg'\n"
        'note = """\n[limits]\nmemory = 64G\nmodel = seccomp\n"""\n'
        "[ limits ]   # per task\n memory = 2 GiB \n")
    (etc / "crlf.cpu").write_bytes(b"model = kvm\r\naccel = kvm\r\n[limits]\r\nmemory = 1g\r\n")
    (etc / "oneline.cpu").write_text("model = kvm\nca = '''x'''\n[limits]\nmemory = 08M\n")
    (etc / "section.cpu").write_text("price = 1\n[limits]\nmodel = kvm\n")  # not top level
    (etc / "upper.cpu").write_text("model = KVM\n")  # configobj's option() is exact
    (etc / "list.cpu").write_text("model = kvm, seccomp\n")
    (etc / "later.cpu").write_text("[limits]\nmemory = 1G\n[credentials]\nmemory = 9G\n"
                                   "model = kvm\n")
    r, (normal, _, _) = run_generator(etc, tmp_path / "out")
    assert r.stderr == ""
    got = {name: settings(text) for name, text in dropins(normal).items()}
    assert got == {"quoted": {"MemoryMax": memory_max(2048)},
                   "crlf": {"MemoryMax": memory_max(1024), **DEVICE},
                   "oneline": {"MemoryMax": memory_max(8), **DEVICE}}, got
    assert len(wants(normal)) == 7


def test_a_bad_order_never_breaks_the_generator(tmp_path):
    """Garbage, a memory that is no size, an accel that is no accelerator,
    an unterminated value: every order still gets its instance; a kvm order
    the default memory (256M) and no device it may not need; a message names
    the file."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "garbage.cpu").write_bytes(bytes(range(256)) * 8 + b"\nmodel = kvm")
    (etc / "memory.cpu").write_text("model = kvm\n[limits]\nmemory = lots\n")
    (etc / "huge.cpu").write_text("model = kvm\n[limits]\nmemory = 99999999999999T\n")
    (etc / "tiny.cpu").write_text("model = kvm\n[limits]\nmemory = 4095\n")
    (etc / "accel.cpu").write_text("model = kvm\naccel = fast \\\nDeviceAllow=/dev/sda rw\n")
    (etc / "empty.cpu").write_text("")
    (etc / "unterminated.cpu").write_text('model = kvm\nca = """\n[limits]\nmemory = 1T\n')
    r, (normal, _, _) = run_generator(etc, tmp_path / "out")
    assert len(wants(normal)) == 7
    got = {name: settings(text) for name, text in dropins(normal).items()}
    default = {"MemoryMax": memory_max(256)}
    # (garbage.cpu's last line, unterminated, says model = kvm: read past the garbage)
    assert got == {"garbage": {**default, **DEVICE}, "memory": {**default, **DEVICE},
                   "huge": {**default, **DEVICE}, "tiny": {**default, **DEVICE},
                   "accel": default, "unterminated": {**default, **DEVICE}}, got
    for name in ("memory", "huge", "tiny"):
        assert f"{etc}/{name}.cpu: [limits] memory = " in r.stderr, r.stderr
    assert "sda" not in "".join(dropins(normal).values())


def test_offline_security_exposure_of_a_kvm_instance(tmp_path, pki):
    """The unit with the generator's drop-in for a kvm order of accel = auto
    (the most it gives), rated offline from a root that holds both."""
    analyze = _analyze()
    etc = tmp_path / "etc"
    etc.mkdir()
    write_order(pki, etc / "vm0.cpu", model="kvm", memory=2 << 30)
    _, (normal, _, _) = run_generator(etc, tmp_path / "out")
    units = tmp_path / "root" / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units / UNIT.name)
    shutil.copytree(normal / "cpushare@vm0.service.d", units / "cpushare@vm0.service.d")
    r = subprocess.run([analyze, "security", "--offline=true", "--no-pager",
                        f"--root={tmp_path / 'root'}", "cpushare@vm0.service"],
                       capture_output=True, text=True, cwd=tmp_path)
    m = re.search(r"Overall exposure level for cpushare@vm0\.service:\s+([\d.]+)", r.stdout)
    if m is None:
        pytest.skip(f"systemd-analyze security --offline does not work here: {r.stderr.strip()}")
    assert "/dev/kvm:rw" in r.stdout, r.stdout  # the drop-in was read
    assert float(m.group(1)) <= KVM_EXPOSURE_BOUND, r.stdout
    for must in ("MemoryDenyWriteExecute=", "PrivateDevices=", "SystemCallFilter=~@privileged"):
        line = next(line for line in r.stdout.splitlines() if must in line)
        assert line.lstrip().startswith("✓"), line


def unit_values(key: str, unit: Path = UNIT) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", unit.read_text(), re.M)


def test_restart_is_prevented_for_the_daemons_permanent_refusals():
    from cpushare import daemon

    prevented = {int(v) for line in unit_values("RestartPreventExitStatus") for v in line.split()}
    assert prevented == {daemon.EXIT_CONFIG, daemon.EXIT_NO_SECCOMP, daemon.EXIT_SANDBOX,
                         daemon.EXIT_NO_ACCEL}


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


@pytest.mark.parametrize("needs", [SANDBOX_SYSCALLS, QEMU_SYSCALLS], ids=["sandbox", "qemu"])
def test_syscall_filter_lets_the_sandbox_and_qemu_work(needs):
    """Evaluate the unit's SystemCallFilter= lines the way systemd does: the
    first (an allow list) sets the list, "~" lines take away, others add.
    The kvm drop-in adds no filter: qemu runs under the seccomp model's."""
    groups = _group_syscalls(_analyze())
    allowed: set[str] = set()
    for line in unit_values("SystemCallFilter"):
        deny = line.startswith("~")
        items: set[str] = set()
        for item in line.lstrip("~").split():
            items |= _expand(item, groups)
        allowed = allowed - items if deny else allowed | items
    missing = [s for s in needs if s not in allowed]
    assert not missing, f"cpushare@.service's SystemCallFilter= refuses {missing}"


@pytest.mark.parametrize("unit, instance", [(UNIT, "cpushare@x.service"),
                                            (SERVER_UNIT, "cpushare-server.service"),
                                            (SERVER_TEMPLATE, "cpushare-server@1.service")],
                         ids=["cpushare@", "cpushare-server", "cpushare-server@"])
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


def _directives(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_server_template_is_the_server_unit_but_for_its_name_and_database():
    """cpushare-server@.service (several processes of a PostgreSQL market)
    runs exactly what cpushare-server.service runs, hardened alike; it only
    names its instance and does not wait for the SQLite file."""
    unit, template = _directives(SERVER_UNIT), _directives(SERVER_TEMPLATE)
    differ = ("Description=", "ConditionPathExists=")
    assert [d for d in unit if not d.startswith(differ)] == \
        [d for d in template if not d.startswith(differ)]
    assert unit_values("Description", SERVER_TEMPLATE) == ["CPUShare market server, process %i"]
    assert unit_values("ConditionPathExists", SERVER_TEMPLATE) == []
    assert "systemd/cpushare-server@.service lib/systemd/system/" in (
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
