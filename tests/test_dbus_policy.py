"""The system bus policy, dbus/org.cpushare.Seller1.conf, enforced by a real
dbus-daemon configured like Debian's system bus: the daemon runs as the
service user, and cpusharectl runs as other users.

Needs root (it creates the users it runs as, and removes those it created).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from dbus_fixtures import (PYTHON, credentials, daemon_env, dead_port, policy_bus,  # noqa: F401
                           start_daemon, stop_daemon, wait_for, write_order)

from cpushare import ctl as ctl_module
from cpushare import daemon, dbus

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: creates users and runs processes as them")

ADMIN_USER = "cpushare-test-admin"  # a member of cpushare-admin
OTHER_USER = "nobody"


def _exists(kind: str, name: str) -> bool:
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def users():
    created: list[tuple[str, str]] = []

    def run(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    if not _exists("group", dbus.ADMIN_GROUP):
        run("groupadd", "--system", dbus.ADMIN_GROUP)
        created.append(("group", dbus.ADMIN_GROUP))
    if not _exists("user", dbus.SERVICE_USER):
        run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
            "/nonexistent", "--shell", "/usr/sbin/nologin", dbus.SERVICE_USER)
        created.append(("user", dbus.SERVICE_USER))
    if not _exists("user", ADMIN_USER):
        run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
            "/nonexistent", "--shell", "/usr/sbin/nologin", "--groups", dbus.ADMIN_GROUP,
            ADMIN_USER)
        created.append(("user", ADMIN_USER))
    assert ADMIN_USER in grp.getgrnam(dbus.ADMIN_GROUP).gr_mem
    assert _exists("user", OTHER_USER)
    yield
    for kind, name in reversed(created):
        subprocess.run(["userdel" if kind == "user" else "groupdel", name], capture_output=True)


def as_user(user: str) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
            "--init-groups", "--"]


def ctl(user: str | None, *args: str, env) -> subprocess.CompletedProcess:
    cmd = (as_user(user) if user else []) + [PYTHON, "-B", "-m", "cpushare.ctl", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd="/")


@pytest.fixture
def service_dir(users, credentials, dead_port):  # noqa: F811
    """An order file and cache the service user can use (not under pytest's
    0700 tmp_path)."""
    d = Path(tempfile.mkdtemp(prefix="cpushare-policy-"))
    d.chmod(0o755)
    for user in (dbus.SERVICE_USER, OTHER_USER):  # each its own copy of order cpu0
        (d / user / "cache").mkdir(parents=True)
        order = write_order(d / user / "cpu0.cpu", credentials, dead_port)
        ids = pwd.getpwnam(user)
        for p in (order, d / user / "cache"):
            os.chown(p, ids.pw_uid, ids.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def daemon_args(service_dir: Path, user: str) -> list[str]:
    return ["--cache-dir", str(service_dir / user / "cache"), str(service_dir / user / "cpu0.cpu")]


def test_only_the_service_user_owns_the_names(policy_bus, service_dir):  # noqa: F811
    env = daemon_env(DBUS_SYSTEM_BUS_ADDRESS=policy_bus.address)
    for user in (OTHER_USER, None):  # None: root, which the policy does not let own it either
        args = daemon_args(service_dir, user or dbus.SERVICE_USER)
        cmd = (as_user(user) if user else []) + [PYTHON, "-B", "-m", "cpushare.daemon", *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == daemon.EXIT_UNAVAILABLE, (user, r.stderr)
        assert "cannot own org.cpushare.Seller1.cpu0 on the system bus" in r.stderr
        assert "not allowed to own" in r.stderr

    proc = start_daemon(daemon_args(service_dir, dbus.SERVICE_USER), env=env,
                        preexec=as_user(dbus.SERVICE_USER), cwd="/")
    try:
        wait_for(lambda: ctl(None, "status", env=env).returncode == 0 or proc.poll() is not None,
                 what="the service user's daemon on the bus")
        assert proc.poll() is None, proc.communicate()[1]
    finally:
        code, _, err = stop_daemon(proc)
    assert code == 0, err


def test_anyone_reads_only_admins_pause(policy_bus, service_dir):  # noqa: F811
    env = daemon_env(DBUS_SYSTEM_BUS_ADDRESS=policy_bus.address)
    proc = start_daemon(daemon_args(service_dir, dbus.SERVICE_USER), env=env,
                        preexec=as_user(dbus.SERVICE_USER), cwd="/")
    try:
        wait_for(lambda: ctl(None, "status", env=env).returncode == 0 or proc.poll() is not None,
                 what="the daemon on the bus")
        assert proc.poll() is None

        # Anyone local reads the status.
        r = ctl(OTHER_USER, "status", "cpu0", env=env)
        assert r.returncode == 0, r.stderr
        assert "Order: cpu0 (seccomp)" in r.stdout

        # ...but may not pause or resume.
        for verb in ("pause", "resume"):
            r = ctl(OTHER_USER, verb, "cpu0", env=env)
            assert r.returncode == ctl_module.EXIT_DENIED == 77, r.stderr
            assert f"permission denied: {verb.capitalize()} on instance cpu0" in r.stderr
            assert dbus.ADMIN_GROUP in r.stderr

        # The admin group and root may.
        r = ctl(ADMIN_USER, "pause", "cpu0", env=env)
        assert r.returncode == 0, r.stderr
        r = ctl(None, "resume", "--all", env=env)
        assert r.returncode == 0, r.stderr
    finally:
        code, _, err = stop_daemon(proc)
    assert code == 0, err
    # Exactly the allowed calls reached the daemon.
    assert err.count("Pause() over D-Bus") == 1, err
    assert err.count("Resume() over D-Bus") == 1, err
