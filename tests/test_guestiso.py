"""The test guest ISO (tests/guestiso.py, tests/guest/): it is an ISO 9660
image, it is built once, and under plain qemu (TCG: the nested /dev/kvm of
a test machine may hang) the marker guest comes up, answers its console
and powers off on system_powerdown, while the silent one prints nothing.
With a NIC on a bridge of a network namespace (tests/netns.py) that runs
dnsmasq and nfs-ganesha, the guest gets a lease and its MTU, takes the
test key over ssh, and writes onto the NFS export."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guestiso  # noqa: E402
import netns  # noqa: E402

BOOT_TIMEOUT = 90  # s to the marker; about 12 s under TCG here
SILENT_WATCH = 20  # s the silent guest is watched for output
POWERDOWN_TIMEOUT = 15  # s from system_powerdown to qemu's exit
MAX_ISO_SIZE = 15 * 1000 * 1000
LEASE_TIMEOUT = 60  # s from the marker to the ip line; about 1 s here
LAN = "10.205.0.1/24"  # the bridge's address in the namespace
MTU = 1420

# The ISO is there to be booted: without qemu nothing here is of use.  With
# qemu, a missing build tool is an error (GuestIsoError), not a skip.
pytestmark = pytest.mark.skipif(guestiso.missing_qemu() is not None,
                                reason=guestiso.missing_qemu() or "")


def _report(msg: str) -> None:
    print(msg, file=sys.stderr)


@pytest.fixture(scope="module")
def marker_iso() -> Path:
    return guestiso.iso_path("marker", log=_report)


@pytest.fixture(scope="module")
def silent_iso() -> Path:
    return guestiso.iso_path("silent", log=_report)


class Qemu:
    """One plain qemu boot of an ISO: its first serial port on stdin and
    stdout, QMP on a unix socket."""

    def __init__(self, iso: Path, nic: list[str] | None = None,
                 ns: "netns.Namespace | None" = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cpushare-qemu-", dir="/tmp")
        self.qmp_path = os.path.join(self._dir.name, "qmp.sock")
        self.stderr_path = os.path.join(self._dir.name, "stderr")
        self.output = b""
        self._cond = threading.Condition()
        self._eof = False
        self.started = time.monotonic()
        argv = [guestiso.QEMU, "-nodefaults", "-no-user-config", "-machine", "q35",
                "-accel", "tcg", "-m", "256M", "-display", "none", "-no-reboot",
                "-cdrom", str(iso), "-serial", "stdio",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *(nic or [])]
        if ns is not None:
            argv = ns.argv(argv)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._qmp: socket.socket | None = None
        self._qmp_file = None

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            with self._cond:
                if not data:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self.output += data
                self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return self.output.decode(errors="replace").replace("\r", "")

    def wait_for(self, pattern: str, timeout: float) -> float | None:
        """Seconds since the start until a line of the console matches the
        regular expression `pattern` (re.M), or None at the timeout."""
        return None if self.search(pattern, timeout) is None else time.monotonic() - self.started

    def search(self, pattern: str, timeout: float) -> "re.Match[str] | None":
        """The first match of `pattern` (re.M) on the console, waiting up to
        `timeout` for it."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cond:
            while (m := rx.search(self.output.replace(b"\r", b"").decode(errors="replace"))) is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(min(left, 1.0))
            return m

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def qmp(self, command: str) -> dict:
        if self._qmp is None:
            self._qmp = socket.socket(socket.AF_UNIX)
            self._qmp.settimeout(10)
            self._qmp.connect(self.qmp_path)
            self._qmp_file = self._qmp.makefile("rwb")
            json.loads(self._qmp_file.readline())  # the greeting
            self.qmp("qmp_capabilities")
        self._qmp_file.write(json.dumps({"execute": command}).encode() + b"\n")
        self._qmp_file.flush()
        while True:  # events may come before the answer
            msg = json.loads(self._qmp_file.readline())
            if "return" in msg or "error" in msg:
                return msg

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp_file.close()
            self._qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self._reader.join(5)
        self.proc.stdout.close()
        self._dir.cleanup()

    def __enter__(self) -> "Qemu":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_build_tools_present():
    """A machine that can boot the guest must be able to build it: a
    missing build tool is an error, not a skip."""
    assert guestiso.missing_build_tools() is None, guestiso.missing_build_tools()


def test_iso_is_iso9660_and_small(marker_iso, silent_iso):
    for iso in (marker_iso, silent_iso):
        with open(iso, "rb") as f:
            f.seek(0x8001)
            assert f.read(5) == b"CD001", f"{iso} has no ISO 9660 volume descriptor"
        size = iso.stat().st_size
        _report(f"{iso.name}: {size} bytes")
        assert size <= MAX_ISO_SIZE, f"{iso} is {size} bytes"
    assert marker_iso != silent_iso


def test_iso_is_cached(marker_iso):
    """A second call finds the same file and builds nothing."""
    before = marker_iso.stat()
    started = time.monotonic()
    again = guestiso.iso_path("marker")
    assert again == marker_iso
    assert again.stat().st_mtime_ns == before.st_mtime_ns
    assert again.stat().st_ino == before.st_ino
    assert time.monotonic() - started < 30
    assert list(marker_iso.parent.glob("debs/linux-image-*.deb")), "the kernel .deb is not kept"


def test_isos_of_other_keys_go_only_when_unused(marker_iso):
    """Another checkout's ISO in the shared cache stays while it is used."""
    stale = marker_iso.parent / "marker-0000000000000000.iso"
    recent = marker_iso.parent / "marker-1111111111111111.iso"
    try:
        for f in (stale, recent):
            f.write_bytes(b"not an ISO")
        old = time.time() - guestiso.KEEP_UNUSED - 60
        os.utime(stale, (old, old))
        assert guestiso.iso_path("marker") == marker_iso
        assert not stale.exists()
        assert recent.exists() and marker_iso.exists()
    finally:
        stale.unlink(missing_ok=True)
        recent.unlink(missing_ok=True)


def test_key_follows_inputs(marker_iso):
    kernel = guestiso.kernel_package()
    key = guestiso.iso_key("marker", kernel)
    assert marker_iso.name == f"marker-{key}.iso"
    assert guestiso.iso_key("silent", kernel) != key
    assert guestiso.iso_key("marker", (kernel[0], kernel[1] + "+1")) != key
    assert guestiso.iso_key("marker", kernel, b"ssh-ed25519 AAAA other\n") != key
    with pytest.raises(ValueError):
        guestiso.iso_path("no-such-kind")


def test_ssh_key_is_made_once_and_kept(marker_iso):
    key = guestiso.ssh_key_path()
    assert key.parent == marker_iso.parent
    assert guestiso.ssh_key_path() == key
    pub = Path(f"{key}.pub").read_text()
    assert pub.startswith("ssh-ed25519 ") and pub.count("\n") == 1
    assert key.stat().st_mode & 0o077 == 0, "ssh refuses a private key others can read"
    argv = guestiso.ssh_argv("10.0.0.9", "uname", "-a")
    assert argv[0] == "ssh" and argv[-3:] == ["root@10.0.0.9", "uname", "-a"]
    assert str(key) in argv


def test_marker_guest_boots_answers_and_powers_off(marker_iso):
    with Qemu(marker_iso) as vm:
        at = vm.wait_for(rf"^{re.escape(guestiso.MARKER)}$", BOOT_TIMEOUT)
        assert at is not None, (f"no {guestiso.MARKER} in {BOOT_TIMEOUT} s:\n{vm.text()[-3000:]}"
                                f"\n{vm.stderr()}")
        _report(f"marker guest: {guestiso.MARKER} {at:.1f} s after qemu started (TCG)")

        # The console's input reaches the guest: the answer is the line
        # "hello-42" alone (an echo of the input would be "echo hello-42").
        vm.send("echo hello-42")
        assert vm.wait_for(r"^hello-42$", 20) is not None, vm.text()[-3000:]
        assert vm.wait_for(r"^cpushare-guest: uptime [0-9.]+$", 10) is not None, vm.text()[-3000:]
        # A shell command, its output, its exit status.
        vm.send("run echo run-$((6 * 7)); false")
        assert vm.wait_for(r"^run-42\ncpushare-guest: exit 1$", 20) is not None, vm.text()[-3000:]
        # No NIC: no network, no waiting for one.
        vm.send("run ls /sys/class/net; cat /run/udhcpc.log")
        assert vm.wait_for(r"^lo\n(.*\n)?cpushare-guest: exit 1$", 20) is not None, vm.text()[-3000:]
        assert guestiso.IP_PREFIX not in vm.text()

        assert "return" in vm.qmp("system_powerdown")
        asked = time.monotonic()
        try:
            rc = vm.proc.wait(POWERDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"qemu still runs {POWERDOWN_TIMEOUT} s after system_powerdown:\n"
                        + vm.text()[-3000:])
        _report(f"marker guest: powered off {time.monotonic() - asked:.1f} s after system_powerdown")
        assert rc == 0, vm.stderr()
        assert "reboot: Power down" in vm.text()


def test_silent_guest_prints_nothing(silent_iso):
    with Qemu(silent_iso) as vm:
        time.sleep(SILENT_WATCH)
        assert vm.proc.poll() is None, vm.stderr()
        assert vm.output == b"", f"the silent guest printed {vm.output[:500]!r}"
        # It is up by now (about 12 s under TCG) and its acpid powers it off;
        # a press still during its boot is lost, so press again until then.
        deadline = time.monotonic() + BOOT_TIMEOUT
        while vm.proc.poll() is None and time.monotonic() < deadline:
            vm.qmp("system_powerdown")
            try:
                vm.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        assert vm.proc.poll() == 0, f"qemu still runs after system_powerdown: {vm.stderr()}"
        assert vm.output == b""


# -- with a NIC --------------------------------------------------------------

@pytest.fixture(scope="module")
def lan(tmp_path_factory):
    """A network namespace with a bridge (LAN) and nfs-ganesha exporting a
    temporary directory as /export; each test puts its guest's tap and its
    dnsmasq there."""
    why = netns.missing()
    if why is not None:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("lan")
    export = work / "export"
    export.mkdir()
    with netns.Network() as net:
        ns = net.namespace("lan")
        bridge = ns.bridge(cidr=LAN)
        (work / "nfs").mkdir()
        nfs = netns.Ganesha(ns, LAN.split("/")[0], str(export), str(work / "nfs"))
        yield {"ns": ns, "bridge": bridge, "work": work, "export": export, "nfs": nfs}


def _dnsmasq(lan, name: str) -> netns.Dnsmasq:
    d = lan["work"] / name
    d.mkdir()
    return netns.Dnsmasq(lan["ns"], lan["bridge"], LAN, str(d), mtu=MTU)


def _wait_ip(vm: Qemu, timeout: float) -> tuple[str, float] | None:
    # The line's end, not the console's: "$" also matches after a line still
    # arriving ("cpushare-guest: ip 1" of 10.205.0.x).
    m = vm.search(rf"^{re.escape(guestiso.IP_PREFIX)}([0-9.]+)\n", timeout)
    return None if m is None else (m.group(1), time.monotonic() - vm.started)


def _ssh(lan, ip: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return lan["ns"].run(guestiso.ssh_argv(ip, command), timeout=timeout, check=False)


def _power_off(vm: Qemu) -> None:
    assert "return" in vm.qmp("system_powerdown")
    try:
        assert vm.proc.wait(POWERDOWN_TIMEOUT) == 0, vm.stderr()
    except subprocess.TimeoutExpired:
        pytest.fail(f"qemu still runs {POWERDOWN_TIMEOUT} s after system_powerdown:\n"
                    + vm.text()[-3000:])


def test_guest_with_a_nic_dhcp_ssh_nfs(marker_iso, lan):
    """virtio-net on a tap of the LAN's bridge: a lease from dnsmasq (its
    MTU too), ssh with the test key, a file written onto the NFS export."""
    ns = lan["ns"]
    tap = ns.tap("tap-ssh", bridge=lan["bridge"])
    dhcp = _dnsmasq(lan, "dhcp-ssh")
    mac = "52:54:00:c5:00:01"
    nic = ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
           "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
    try:
        with Qemu(marker_iso, nic=nic, ns=ns) as vm:
            at = vm.wait_for(rf"^{re.escape(guestiso.MARKER)}$", BOOT_TIMEOUT)
            assert at is not None, f"no marker:\n{vm.text()[-3000:]}\n{vm.stderr()}"
            got = _wait_ip(vm, LEASE_TIMEOUT)
            assert got is not None, f"no lease:\n{vm.text()[-3000:]}\n{dhcp.log()[-3000:]}"
            ip, lease_at = got
            _report(f"guest with a NIC: {guestiso.MARKER} {at:.1f} s, {guestiso.IP_PREFIX}{ip} "
                    f"{lease_at:.1f} s after qemu started (TCG)")
            lo, hi = dhcp.range
            assert lo <= ipaddress.ip_address(ip) <= hi
            assert (mac, ip) in dhcp.leases()

            started = time.monotonic()
            r = _ssh(lan, ip, "uname -a; cat /sys/class/net/eth0/mtu; ip route")
            _report(f"guest with a NIC: ssh uname -a took {time.monotonic() - started:.1f} s")
            assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{vm.text()[-2000:]}"
            lines = r.stdout.splitlines()
            assert lines[0].startswith("Linux ") and lines[0].endswith(" GNU/Linux"), r.stdout
            assert lines[1] == str(MTU), r.stdout
            assert f"default via {LAN.split('/')[0]} dev eth0" in r.stdout

            # Only the key: no password, no other key.
            other = lan["work"] / "other-key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                           check=True)
            argv = guestiso.ssh_argv(ip, "true")
            argv[argv.index(str(guestiso.ssh_key_path()))] = str(other)
            assert ns.run(argv, timeout=60, check=False).returncode == 255

            server = LAN.split("/")[0]
            (lan["export"] / "from-host").write_text("host\n")
            started = time.monotonic()
            r = _ssh(lan, ip, f"mount -t nfs {server}:/export /mnt && "
                     "echo written-by-the-guest > /mnt/from-guest && "
                     "cat /mnt/from-host && mount | grep ' /mnt ' && umount /mnt",
                     timeout=120)
            _report(f"guest with a NIC: NFS mount, write, umount took {time.monotonic() - started:.1f} s")
            assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{lan['nfs'].log()[-3000:]}"
            assert r.stdout.splitlines()[0] == "host"
            assert " type nfs4 " in r.stdout
            assert (lan["export"] / "from-guest").read_text() == "written-by-the-guest\n"

            # The console protocol is the same with a NIC.
            vm.send("echo still-here")
            assert vm.wait_for(r"^still-here$", 20) is not None, vm.text()[-3000:]
            _power_off(vm)
    finally:
        dhcp.stop()


def test_guest_waits_for_a_late_dhcp_server(marker_iso, lan):
    """e1000e (q35's own NIC), and dnsmasq started only once the guest has
    been asking for a while: the lease comes all the same."""
    ns = lan["ns"]
    tap = ns.tap("tap-late", bridge=lan["bridge"])
    nic = ["-nic", f"tap,ifname={tap},script=no,downscript=no,model=e1000e"]
    dhcp = None
    try:
        with Qemu(marker_iso, nic=nic, ns=ns) as vm:
            at = vm.wait_for(rf"^{re.escape(guestiso.MARKER)}$", BOOT_TIMEOUT)
            assert at is not None, f"no marker:\n{vm.text()[-3000:]}\n{vm.stderr()}"
            assert _wait_ip(vm, 10) is None, "a lease without a DHCP server"
            dhcp = _dnsmasq(lan, "dhcp-late")
            started = time.monotonic()
            got = _wait_ip(vm, LEASE_TIMEOUT)
            assert got is not None, f"no lease:\n{vm.text()[-3000:]}\n{dhcp.log()[-3000:]}"
            _report(f"late DHCP server: lease {time.monotonic() - started:.1f} s after it started")
            _power_off(vm)
    finally:
        if dhcp is not None:
            dhcp.stop()
