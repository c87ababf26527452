"""What the buyer's cluster network runs beside the endpoint, from Debian's
packages: its TAP's address (iproute2), DHCP for the nodes (dnsmasq) and an
NFS export of a directory of the buyer's (nfs-ganesha).

Each server is a child process in the foreground, its files in a directory
of the cluster's, stopped with SIGTERM (SIGKILL after STOP_GRACE).  A
server that cannot start is a ServiceError whose message ends with the
last lines it logged.  `launch` (subprocess.Popen by default) is how its
argv is run; the tests run the same servers inside network namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from typing import Callable

STOP_GRACE = 5.0
DEFAULT_SUBNET = "10.213.0.0/24"
DHCP_LEASE = "1h"
NFS_PORT = 2049
NFS_PSEUDO = "/export"  # the path the nodes mount: SERVER:/export

Launch = Callable[..., subprocess.Popen]


class ServiceError(RuntimeError):
    """A part of the cluster's network that could not be set up; says which and why."""


def _tail(path: str, lines: int = 6) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()[-4000:]
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- the subnet and the TAP's address ---------------------------------------------

class Subnet:
    """The cluster's subnet: the buyer's TAP takes its first address, DHCP
    hands out the rest from the tenth."""

    def __init__(self, text: str):
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise ValueError(f"{text!r} is not a subnet (like {DEFAULT_SUBNET}): {e}") from None
        if net.version != 4:
            raise ValueError(f"{text}: an IPv4 subnet, please (DHCP here is DHCPv4)")
        if not net.is_private:
            raise ValueError(f"{text} is not a private subnet (RFC 1918)")
        if not 16 <= net.prefixlen <= 28:
            raise ValueError(f"{text}: a subnet of /16 to /28")
        self.network = net
        hosts = net.hosts()
        self.address = next(hosts)  # the buyer's
        first = net.network_address + 10
        self.range = (first, net.broadcast_address - 1)

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.network.prefixlen}"

    @property
    def size(self) -> int:
        """Addresses DHCP can hand out."""
        return int(self.range[1]) - int(self.range[0]) + 1

    def __str__(self) -> str:
        return str(self.network)


def addresses_in_use(run=subprocess.run) -> list[tuple[str, ipaddress.IPv4Interface]]:
    """(interface, address/prefix) of every IPv4 address on this host."""
    import json
    r = run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=10)
    out = []
    for link in json.loads(r.stdout or "[]"):
        for a in link.get("addr_info", []):
            out.append((link.get("ifname", "?"),
                        ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")))
    return out


def check_free(subnet: Subnet) -> None:
    """ServiceError if the subnet overlaps one this host has an address on."""
    for ifname, iface in addresses_in_use():
        if iface.network.overlaps(subnet.network) and not iface.ip.is_loopback:
            raise ServiceError(f"subnet {subnet} overlaps {iface.network} of {ifname} on this "
                               f"host: give another with --subnet")


def configure_tap(name: str, subnet: Subnet, mtu: int) -> None:
    """The TAP's address on the cluster's subnet, its MTU (the nodes'), up."""
    for argv in (["ip", "addr", "add", subnet.cidr, "dev", name],
                 ["ip", "link", "set", "dev", name, "mtu", str(mtu), "up"]):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ServiceError(f"{' '.join(argv)}: {e}") from None
        if r.returncode:
            raise ServiceError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")


class _Server:
    """A server child process: its files in `dir` named after `name`."""

    name = ""
    dir = ""
    proc: subprocess.Popen

    def _start(self, argv: list[str], launch: Launch) -> str:
        """Start argv, its output to DIR/NAME.stderr; that file's path."""
        errpath = os.path.join(self.dir, f"{self.name}.stderr")
        with open(errpath, "wb") as err:
            try:
                self.proc = launch(argv, stdin=subprocess.DEVNULL, stdout=err,
                                   stderr=subprocess.STDOUT)
            except OSError as e:
                raise ServiceError(f"{argv[0]}: {e.strerror}") from None
        return errpath

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        _stop(self.proc)

    def log(self) -> str:
        return "\n".join(_read(os.path.join(self.dir, f"{self.name}.{n}"))
                         for n in ("stderr", "log"))


# --- DHCP ---------------------------------------------------------------------------

class Dnsmasq(_Server):
    """dnsmasq as a DHCP server only (no DNS: --port=0) on one interface:

        dnsmasq --keep-in-foreground --conf-file=/dev/null --port=0
            --interface=IF --bind-interfaces --except-interface=lo
            --dhcp-range=FIRST,LAST,NETMASK,LEASE --dhcp-option=option:mtu,MTU
            --dhcp-option=option:router --no-ping --dhcp-authoritative
            --dhcp-leasefile=DIR/dnsmasq.leases --pid-file=DIR/dnsmasq.pid
            --log-dhcp --log-facility=DIR/dnsmasq.log --user=USER

    No router is offered (an empty option 3): a node reaches its cluster's
    subnet and nothing past it, whatever the buyer's host forwards.
    (--no-ping: dnsmasq's check that an address is free costs about 3 s an
    offer.  The MTU option is written option:mtu: a bare "mtu," is taken as
    a tag and nothing is sent.)"""

    name = "dnsmasq"

    def __init__(self, interface: str, subnet: Subnet, workdir: str, *, mtu: int | None,
                 lease: str = DHCP_LEASE, router: bool = False, launch: Launch = subprocess.Popen,
                 timeout: float = 10):
        if shutil.which("dnsmasq") is None:
            raise ServiceError("DHCP needs dnsmasq (Debian: dnsmasq-base), which is not "
                               "installed; or use --no-dhcp and a DHCP server of your own")
        lo, hi = subnet.range
        self.dir = workdir
        self.leasefile = os.path.join(workdir, "dnsmasq.leases")
        self.logfile = os.path.join(workdir, "dnsmasq.log")
        self.pidfile = os.path.join(workdir, "dnsmasq.pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pidfile)
        user = "root" if os.geteuid() == 0 else None
        self.argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                     f"--interface={interface}", "--bind-interfaces", "--except-interface=lo",
                     f"--dhcp-range={lo},{hi},{subnet.network.netmask},{lease}",
                     "--no-ping", "--dhcp-authoritative",
                     f"--dhcp-leasefile={self.leasefile}", f"--pid-file={self.pidfile}",
                     "--log-dhcp", f"--log-facility={self.logfile}"]
        if user:
            self.argv.append(f"--user={user}")
        if mtu:
            self.argv.append(f"--dhcp-option=option:mtu,{mtu}")
        if not router:
            self.argv.append("--dhcp-option=option:router")
        errpath = self._start(self.argv, launch)
        if not _wait(lambda: os.path.exists(self.pidfile), self.proc, timeout):
            self.stop()
            raise ServiceError(f"dnsmasq did not start on {interface}: "
                               f"{_tail(errpath) or _tail(self.logfile)}")

    def leases(self) -> dict[str, str]:
        """MAC -> IP of each lease given."""
        return read_leases(self.leasefile)


def read_leases(path: str) -> dict[str, str]:
    """A dnsmasq lease file's MAC -> IP (lines: EXPIRY MAC IP HOSTNAME CLIENT-ID)."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                w = line.split()
                if len(w) >= 3:
                    out[w[1].lower()] = w[2]
    except OSError:
        pass
    return out


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# --- NFS ----------------------------------------------------------------------------

class Ganesha(_Server):
    """nfs-ganesha (userspace; it needs no nfsd in the kernel) exporting one
    directory over NFSv4 (4.0 to 4.2) on TCP at ADDRESS:2049, as /export,
    read-write, to `clients` (a subnet) only, root not squashed (the nodes
    are the buyer's own machines), numeric owners:

        ganesha.nfsd -F -f DIR/ganesha.conf -L DIR/ganesha.log -p DIR/ganesha.pid

    NFSv4 needs no rpcbind (ganesha logs that it cannot register and serves
    all the same); v3 is off.  Graceless: no 90 s grace period before the
    first open.  Its D-Bus and Kerberos complaints in the log are harmless."""

    name = "ganesha"

    def __init__(self, address: str, export_dir: str, workdir: str, *, clients: str,
                 pseudo: str = NFS_PSEUDO, launch: Launch = subprocess.Popen,
                 ready: Callable[[], bool] | None = None, timeout: float = 30):
        if shutil.which("ganesha.nfsd") is None:
            raise ServiceError("--nfs needs ganesha.nfsd (Debian: nfs-ganesha and "
                               "nfs-ganesha-vfs), which is not installed")
        if not os.path.isdir(export_dir):
            raise ServiceError(f"--nfs {export_dir}: not a directory")
        self.dir = workdir
        self.address = address
        self.pseudo = pseudo
        self.conf = os.path.join(workdir, "ganesha.conf")
        self.logfile = os.path.join(workdir, "ganesha.log")
        self.pidfile = os.path.join(workdir, "ganesha.pid")
        recovery = os.path.join(workdir, "ganesha-recovery")
        os.makedirs(recovery, exist_ok=True)
        for bad in ('"', "\n", "\\"):
            if bad in export_dir:
                raise ServiceError(f"--nfs {export_dir!r}: the path holds a {bad!r}")
        with open(self.conf, "w") as f:
            f.write(f"""NFS_CORE_PARAM {{
    Protocols = 4;
    Bind_addr = {address};
    NFS_Port = {NFS_PORT};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSV4 {{
    Graceless = true;
    Only_Numeric_Owners = true;
    RecoveryBackend = fs;
    RecoveryRoot = "{recovery}";
}}
EXPORT {{
    Export_Id = 1;
    Path = "{export_dir}";
    Pseudo = "{pseudo}";
    Access_Type = None;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 4;
    Transports = TCP;
    CLIENT {{ Clients = {clients}; Access_Type = RW; }}
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
""")
        self.argv = ["ganesha.nfsd", "-F", "-f", self.conf, "-L", self.logfile,
                     "-p", self.pidfile]
        errpath = self._start(self.argv, launch)
        if not _wait(ready or (lambda: listening(address, NFS_PORT)), self.proc, timeout):
            self.stop()
            raise ServiceError(f"nfs-ganesha does not listen on {address}:{NFS_PORT}: "
                               f"{_tail(self.logfile) or _tail(errpath)}")

    @property
    def mount(self) -> str:
        """The command that mounts the export on a node."""
        return f"mount -t nfs {self.address}:{self.pseudo} /mnt"



def listening(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), 0.5).close()
        return True
    except OSError:
        return False
