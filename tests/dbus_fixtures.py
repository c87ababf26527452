"""Private D-Bus daemons, sell orders and daemon processes for the daemon, D-Bus and ctl tests.

Each bus is a real `dbus-daemon` with its own configuration in a directory of
its own; nothing touches the machine's buses.  `system_bus` is permissive (any
connection may own any name and call anything) and exported as
DBUS_SYSTEM_BUS_ADDRESS; `policy_bus` is configured like Debian's system bus
(deny by default) with dbus/org.cpushare.Seller1.conf included, for the policy
tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_e2e_support import wait_for  # noqa: F401  (one poller for every test)

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
POLICY = ROOT / "dbus" / "org.cpushare.Seller1.conf"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

_HEAD = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{type}</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
"""

PERMISSIVE = """
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# Debian's /usr/share/dbus-1/system.conf default policy, then our file.
SYSTEM_LIKE = """
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


class Bus:
    """A running private dbus-daemon."""

    def __init__(self, directory: Path, config: str, kind: str) -> None:
        self.directory = directory
        self.socket = directory / "bus"
        conf = directory / "bus.conf"
        conf.write_text(_HEAD.format(type=kind, socket=self.socket) + config)
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--nofork", "--nopidfile",
             "--print-address=1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line:
            self.proc.kill()
            raise RuntimeError(f"dbus-daemon with {conf} did not start: {self.proc.stderr.read()}")
        self.address = line

    def close(self) -> None:
        if self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


def _bus_dir() -> Path:
    # Not under pytest's tmp_path (mode 0700 in /tmp/pytest-of-root): other
    # users must reach the socket in the policy tests.
    d = Path(tempfile.mkdtemp(prefix="cpushare-bus-"))
    d.chmod(0o755)
    return d


@pytest.fixture
def system_bus(monkeypatch):
    """A permissive private bus, exported as the system bus to this process
    and to the children it starts."""
    d = _bus_dir()
    bus = Bus(d, PERMISSIVE, "system")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    yield bus
    bus.close()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def policy_bus(monkeypatch):
    """A bus configured like the system bus, with our policy file included."""
    d = _bus_dir()
    bus = Bus(d, SYSTEM_LIKE.format(policy=POLICY), "system")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    yield bus
    bus.close()
    shutil.rmtree(d, ignore_errors=True)


# --- sell orders that point at nothing ---------------------------------------

@pytest.fixture(scope="session")
def credentials():
    from cpushare.market import ca

    root = ca.make_ca()
    leaf = ca.issue(root.cert_pem, root.key_pem, "order-test")
    return root.cert_pem, leaf.cert_pem, leaf.key_pem


@pytest.fixture
def dead_port():
    """A local TCP port bound but never listening: connecting is refused,
    so a seller using it stays in 'connecting' for real."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def silent_port():
    """A local TCP port that listens but never answers: the seller's TLS
    handshake hangs, so it stays 'connecting' (for 20 s) with no error."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


def write_order(path: Path, credentials, port: int, *, price_milli: int = 10) -> Path:
    from cpushare.order import write_sell

    ca_pem, cert_pem, key_pem = credentials
    write_sell(path, host="127.0.0.1", port=port, price_milli=price_milli, ca_pem=ca_pem,
               cert_pem=cert_pem, key_pem=key_pem)
    return path


# --- cpushared as a child process ------------------------------------------------

def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
                        "CACHE_DIRECTORY", "INVOCATION_ID")}
    env["PYTHONPATH"] = str(SRC)
    env.update(extra)
    return env


def start_daemon(args: list[str], *, env: dict[str, str] | None = None,
                 preexec: list[str] | None = None, **kw) -> subprocess.Popen:
    cmd = (preexec or []) + [PYTHON, "-m", "cpushare.daemon", *args]
    return subprocess.Popen(cmd, env=env or daemon_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def stop_daemon(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20):
    """Send `sig` (none if 0), wait; returns (returncode, stdout, stderr)."""
    if proc.poll() is None and sig:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"cpushared did not exit within {timeout} s of signal {sig}:\n{err}")
    return proc.returncode, out, err


class NotifySocket:
    """A real NOTIFY_SOCKET: a unix datagram socket the test binds and reads,
    as systemd's manager would."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    def read(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.messages.append(fields)
        return fields

    def wait(self, key: str, value: str | None = None, timeout: float = 30,
             after: int = 0, contains: str | None = None) -> dict[str, str]:
        """Read messages until one (from index `after` on) has `key`
        (equal to `value`, or containing `contains`); return it."""
        def match(m):
            return key in m and (value is None or m[key] == value) and \
                (contains is None or contains in m[key])
        for m in self.messages[after:]:
            if match(m):
                return m
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.read(max(0.01, deadline - time.monotonic()))
            if m is not None and match(m):
                return m
        raise AssertionError(f"no {key}={value or contains or '*'} from cpushared in "
                             f"{timeout} s; got {self.messages[after:]}")

    def close(self) -> None:
        self.sock.close()
