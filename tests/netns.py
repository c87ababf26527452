"""Network namespaces for tests: a small harness over iproute2 and iptables.

A ``Network`` is a set of namespaces that live as long as it does::

    with netns.Network() as net:
        lan = net.namespace("lan")
        wan = net.namespace("wan")
        net.veth(lan, wan, "10.1.0.1/24", "10.1.0.2/24")
        lan.route("default", via="10.1.0.2")
        wan.masquerade("eth0")
        proc = lan.popen(["dnsmasq", ...])
        print(lan.run(["ip", "addr"]).stdout)

Every namespace it makes is named ``cpst<pid>x<n>-<label>``, unique to this
test process and this ``Network``: two runs, or two networks of one run,
never share one.  Links are made inside the namespaces (``ip -n A link add
... peer ... netns B``), never in the host's, so their names need only be
unique within a namespace.  ``close()`` (the end of the ``with``, an
exception in it, or the interpreter's exit) stops the processes started
with ``popen``, kills any other process still in the namespaces, and
deletes them, which deletes their links too; a failure of one step does not
stop the others.  A test process killed before it could clean up leaves
namespaces whose pid is dead: the next ``Network`` deletes them.

Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN), ``ip`` (iproute2) and, for
``masquerade``, ``iptables``.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
import weakref

from cpushare.vpn import services

PREFIX = "cpst"
NETNS_DIR = "/run/netns"
STOP_GRACE = 5.0  # s between SIGTERM and SIGKILL
_NAME_RX = re.compile(rf"^{PREFIX}(\d+)x(\d+)-")
_LABEL_RX = re.compile(r"^[a-z0-9][a-z0-9_]{0,19}$")
_networks = itertools.count(1)
_open: "weakref.WeakSet[Network]" = weakref.WeakSet()


class NetnsError(RuntimeError):
    """A command of the harness failed; the message has its stderr."""


def _run(argv: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(argv)} took over {timeout} s") from None
    except OSError as e:
        raise NetnsError(f"{argv[0]}: {e}") from None
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed (exit {r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()}")
    return r


def missing() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "network namespaces need ip (iproute2), which is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"{PREFIX}{os.getpid()}x0-probe"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add fails here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return None


def missing_iptables() -> str | None:
    if shutil.which("iptables") is None:
        return "masquerading needs iptables, which is not installed"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _kill_pids_in(name: str) -> None:
    """Kill what still runs in the namespace `name` (processes a test
    started there), by pid."""
    for _ in range(2):
        r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        pids = [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.05)


def _delete(name: str) -> str | None:
    _kill_pids_in(name)
    r = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
    if r.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, name)):
        return f"ip netns delete {name}: {r.stderr.strip()}"
    return None


def sweep_stale() -> list[str]:
    """Delete this harness's namespaces whose test process is gone; the
    names deleted."""
    gone = []
    for name in _names():
        m = _NAME_RX.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if _delete(name) is None:
                gone.append(name)
    return gone


class Namespace:
    """One network namespace of a Network."""

    def __init__(self, net: "Network", label: str, name: str) -> None:
        self.net = net
        self.label = label
        self.name = name
        self._links = set(["lo"])

    def __repr__(self) -> str:
        return f"<Namespace {self.name}>"

    # -- commands --------------------------------------------------------
    def argv(self, argv: list[str]) -> list[str]:
        """`argv` as run in this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], timeout: float = 60, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        """Run a command here to its end; its output as text.  A failure
        (with check) raises NetnsError with its stderr."""
        return _run(self.argv(argv), timeout=timeout, check=check, **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start a command here; the Network stops it when it closes."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(argv), **kw)
        self.net._procs.append(proc)
        return proc

    def ip(self, *args: str) -> str:
        return _run(["ip", "-n", self.name, *args]).stdout

    def pids(self) -> list[int]:
        r = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    # -- links and addresses --------------------------------------------
    def _link_name(self, wanted: str | None, default: str) -> str:
        name = wanted or default[:15]
        if wanted is None:
            n = 1
            while name in self._links:
                n += 1
                name = f"{default[:13]}{n}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", name):
            raise ValueError(f"bad interface name {name!r} (1-15 characters)")
        if name in self._links:
            raise ValueError(f"{self.name} has a link {name} already")
        self._links.add(name)
        return name

    def addr(self, dev: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", dev)

    def up(self, dev: str) -> None:
        self.ip("link", "set", "dev", dev, "up")

    def route(self, dest: str, via: str | None = None, dev: str | None = None) -> None:
        """A route here: `dest` ("default" or a CIDR) via a gateway and/or
        out of a device."""
        args = ["route", "replace", dest]
        if via:
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        self.ip(*args)

    def bridge(self, name: str | None = None, cidr: str | None = None) -> str:
        """A bridge here, up, with an address if given; no STP, no
        forwarding delay."""
        name = self._link_name(name, "br0")
        self.ip("link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        if cidr:
            self.addr(name, cidr)
        self.up(name)
        return name

    def tap(self, name: str | None = None, bridge: str | None = None) -> str:
        """A TAP device here (for qemu -netdev tap,ifname=NAME run in this
        namespace), up, on a bridge if given."""
        name = self._link_name(name, "tap0")
        self.ip("tuntap", "add", "dev", name, "mode", "tap")
        if bridge:
            self.ip("link", "set", "dev", name, "master", bridge)
        self.up(name)
        return name

    # -- routing ---------------------------------------------------------
    def forwarding(self, on: bool = True) -> None:
        self.run(["sh", "-c", f"echo {int(on)} > /proc/sys/net/ipv4/ip_forward"])

    def masquerade(self, out_dev: str) -> None:
        """Forward IPv4 and masquerade what leaves by `out_dev` (a NAT
        router, as a home router does for its LAN)."""
        why = missing_iptables()
        if why:
            raise NetnsError(why)
        self.forwarding(True)
        self.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", out_dev, "-j", "MASQUERADE"])


class Network:
    """A set of namespaces, cleaned up as a whole (see the module's doc)."""

    def __init__(self) -> None:
        self.id = f"{PREFIX}{os.getpid()}x{next(_networks)}"
        self.namespaces: dict[str, Namespace] = {}
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        sweep_stale()
        _open.add(self)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def namespace(self, label: str) -> Namespace:
        """A new namespace, its loopback up."""
        if self._closed:
            raise NetnsError("this Network is closed")
        if not _LABEL_RX.match(label):
            raise ValueError(f"bad namespace label {label!r}: [a-z0-9_], up to 20")
        if label in self.namespaces:
            raise ValueError(f"namespace {label} exists already")
        name = f"{self.id}-{label}"
        _run(["ip", "netns", "add", name])
        ns = Namespace(self, label, name)
        self.namespaces[label] = ns
        ns.up("lo")
        return ns

    def veth(self, a: Namespace, b: Namespace, a_cidr: str | None = None,
             b_cidr: str | None = None, a_name: str | None = None,
             b_name: str | None = None, mtu: int | None = None) -> tuple[str, str]:
        """A veth pair between two namespaces, both ends up, with addresses
        if given.  The ends are named after the other side by default
        ("to-<label>").  Returns (a's end, b's end)."""
        a_dev = a._link_name(a_name, f"to-{b.label}")
        b_dev = b._link_name(b_name, f"to-{a.label}")
        args = ["link", "add", a_dev]
        if mtu:
            args += ["mtu", str(mtu)]
        args += ["type", "veth", "peer", "name", b_dev, "netns", b.name]
        if mtu:
            args += ["mtu", str(mtu)]
        a.ip(*args)
        for ns, dev, cidr in ((a, a_dev, a_cidr), (b, b_dev, b_cidr)):
            if cidr:
                ns.addr(dev, cidr)
            ns.up(dev)
        return a_dev, b_dev

    def close(self) -> None:
        """Stop what runs in the namespaces and delete them.  Raises
        NetnsError at the end if a namespace could not be deleted."""
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    proc.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        errors = []
        for ns in self.namespaces.values():
            why = _delete(ns.name)
            if why:
                errors.append(why)
        if errors:
            raise NetnsError("; ".join(errors))


@atexit.register
def _close_all() -> None:
    for net in list(_open):
        try:
            net.close()
        except NetnsError:
            pass


def wait_for_file(path: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Until `path` exists (a pid or lease file of a server), or the
    timeout, or `proc` ended.  Whether it exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            return False
        time.sleep(0.05)
    return True


def wait_for_port(ns: Namespace, port: int, timeout: float, proto: str = "tcp",
                  proc: subprocess.Popen | None = None) -> bool:
    """Until something listens on `port` in the namespace (ss from
    iproute2), or the timeout, or `proc` ended."""
    flag = "-lnt" if proto == "tcp" else "-lnu"
    deadline = time.monotonic() + timeout
    while True:
        r = ns.run(["ss", "-H", flag, f"sport = :{port}"], check=False)
        if r.returncode == 0 and r.stdout.strip():
            return True
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            return False
        time.sleep(0.1)


# -- servers the tests run in a namespace ---------------------------------

class Dnsmasq(services.Dnsmasq):
    """The product's DHCP server (cpushare.vpn.services.Dnsmasq) on one
    interface of a namespace, for the subnet of `cidr` (the interface's own
    address, the subnet's first), offering that address as the router as
    dnsmasq does by default.  `range` is (first, last) address handed out;
    `leases()` a list of (MAC, IP).  Stopped with the Network."""

    def __init__(self, ns: Namespace, interface: str, cidr: str, workdir: str,
                 mtu: int | None = 1420, lease: str = "2m") -> None:
        subnet = services.Subnet(str(ipaddress.ip_interface(cidr).network))
        try:
            super().__init__(interface, subnet, workdir, mtu=mtu, lease=lease, router=True,
                             launch=ns.popen)
        except services.ServiceError as e:
            raise NetnsError(str(e)) from None
        self.network = subnet.network
        self.range = subnet.range

    def leases(self) -> list[tuple[str, str]]:  # type: ignore[override]
        return list(super().leases().items())


class Ganesha(services.Ganesha):
    """The product's NFS server (cpushare.vpn.services.Ganesha) in a
    namespace: `export_dir` over NFSv4 at `address`:2049 as `pseudo`, to
    any client.  Stopped with the Network."""

    PORT = services.NFS_PORT

    def __init__(self, ns: Namespace, address: str, export_dir: str, workdir: str,
                 pseudo: str = "/export", timeout: float = 30) -> None:
        try:
            super().__init__(address, export_dir, workdir, clients="*", pseudo=pseudo,
                             launch=ns.popen, timeout=timeout,
                             ready=lambda: wait_for_port(ns, self.PORT, 0))
        except services.ServiceError as e:
            raise NetnsError(str(e)) from None


__all__ = ["Network", "Namespace", "NetnsError", "Dnsmasq", "Ganesha", "missing",
           "missing_iptables", "sweep_stale", "wait_for_file", "wait_for_port"]
