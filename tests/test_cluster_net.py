"""The buyer's cluster network end to end (issue: every node on the buyer's
own encrypted Ethernet, through NAT, with DHCP, ssh and NFS), for real.

Six network namespaces: `wan` routes between the market, the buyer, seller
A, and `nat`, a home router doing MASQUERADE for seller B's LAN (B reaches
the buyer only through it, from an address the buyer never sees).  The
market server runs in `market`, each seller (`python -m cpushare.seller`,
qemu TCG) in its own, and `cpushare cluster up --listen --nfs --detach` in
`buyer`: its TAP, its endpoint process, dnsmasq and nfs-ganesha are all
there.  The tests run in file order on the one cluster the module brings
up, and the last brings it down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import guestiso
import netns
from cpushare.vpn.datagram import KEY_SIZE, SELLER_TO_BUYER, Sealer, parse_header
from test_e2e_support import PYTHON, LocalMarket, env, qemu_processes, wait_for

BOOT = 240  # s: two TCG boots at once on two loaded cores
ASK, BID = "36.000", "72.000"
PORT = 5555  # the buyer's link endpoint
BUYER_WAN = "10.77.2.2"
SUBNET, BUYER_LAN = "10.213.0.0/24", "10.213.0.1"
SELLER_A = "10.77.3.2"
SELLER_B = "192.168.77.2"
SECRET = "cpushare-plaintext-canary-5f3a9c"


def _missing() -> str | None:
    for why in (netns.missing(), netns.missing_iptables(), guestiso.missing_qemu()):
        if why:
            return why
    for tool, pkg in (("dnsmasq", "dnsmasq-base"), ("ganesha.nfsd", "nfs-ganesha"),
                      ("tcpdump", "tcpdump"), ("ssh", "openssh-client")):
        if not any(os.access(os.path.join(d, tool), os.X_OK)
                   for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/usr/bin"]):
            return f"{tool} is not installed ({pkg})"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


class World:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.net = netns.Network()
        n = self.net
        self.wan, self.mkt, self.buyer, self.sa, self.nat, self.sb = (
            n.namespace(x) for x in ("wan", "market", "buyer", "sa", "nat", "sb"))
        n.veth(self.wan, self.mkt, "10.77.1.1/24", "10.77.1.2/24")
        self.wan_to_buyer, _ = n.veth(self.wan, self.buyer, "10.77.2.1/24", f"{BUYER_WAN}/24")
        n.veth(self.wan, self.sa, "10.77.3.1/24", f"{SELLER_A}/24")
        _, nat_out = n.veth(self.wan, self.nat, "10.77.4.1/24", "10.77.4.2/24")
        n.veth(self.nat, self.sb, "192.168.77.1/24", f"{SELLER_B}/24")
        for ns, gw in ((self.mkt, "10.77.1.1"), (self.buyer, "10.77.2.1"),
                       (self.sa, "10.77.3.1"), (self.nat, "10.77.4.1"), (self.sb, "192.168.77.1")):
            ns.route("default", via=gw)
        self.wan.forwarding(True)
        self.nat.masquerade(nat_out)
        self.state = tmp / "state"
        self.export = tmp / "export"
        self.export.mkdir()
        self.market = LocalMarket(tmp / "market", host="10.77.1.2",
                                  wrap=self.mkt.argv([]))
        m = self.market
        m.account("buyer", 100_000)
        m.serve()
        for account, name, ns in (("alice", "sa", self.sa), ("bob", "sb", self.sb)):
            m.account(account)
            order = m.sell_order(account, name, price=ASK, model="kvm", memory="512M",
                                 accel="tcg")
            m.seller(order, "--meter-interval", "1", wrap=ns.argv([]))
        self.order = m.root / "buyer.buy"
        m.cli("buy-order", "add", "buyer", "--price", BID, "--model", "kvm", "--memory", "256M",
              "--max-nodes", "2", "--max-cpu-seconds", "3600", "--output", str(self.order))

    def cluster(self, *args: str, timeout: float = 120, check: bool = True):
        r = subprocess.run(self.buyer.argv([PYTHON, "-m", "cpushare", "cluster", *args]),
                           env=dict(env(), XDG_STATE_HOME=str(self.state)),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert r.returncode == 0, f"cluster {' '.join(args)}: {r.returncode}\n" \
                                      f"{r.stdout}{r.stderr}\n{self.agent_log()}"
        return r

    def status(self) -> dict:
        return json.loads(self.cluster("status", "c", "--json").stdout)

    def agent_log(self) -> str:
        try:
            return (self.state / "cpushare" / "clusters" / "c" / "agent.log").read_text()[-6000:]
        except OSError:
            return ""

    def ssh(self, ip: str, command: str, check: bool = True, timeout: float = 90):
        r = self.buyer.run(guestiso.ssh_argv(ip, command, timeout=30), timeout=timeout,
                           check=False)
        if check:
            assert r.returncode == 0, f"ssh {ip} {command!r}: {r.returncode}\n{r.stdout}{r.stderr}"
        return r

    def close(self) -> None:
        try:
            self.cluster("down", "c", check=False, timeout=300)
        finally:
            self.market.close()
            for pid in qemu_processes(self.market.root):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.net.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    iso = guestiso.iso_path("marker")
    w = World(tmp_path_factory.mktemp("clusternet"))
    try:
        w.cluster("up", "--order", str(w.order), "--iso", str(iso), "--nodes", "2",
                  "--name", "c", "--detach", "--timeout", str(BOOT),
                  "--listen", f"{BUYER_WAN}:{PORT}", "--subnet", SUBNET,
                  "--nfs", str(w.export), timeout=BOOT + 120)

        def leased():
            nodes = w.status()["network"]["nodes"]
            ips = {name: n["ip"] for name, n in nodes.items()}
            return ips if len(ips) == 2 and all(ips.values()) else None
        w.ips = wait_for(leased, 120, "both nodes' DHCP leases", interval=1)
        yield w
    finally:
        w.close()


def test_both_nodes_lease_from_the_buyers_dhcp_answer_ssh_and_see_each_other(world):
    st = world.status()
    net = st["network"]
    assert net["subnet"] == SUBNET and net["address"] == BUYER_LAN
    seen = {}
    for name, ip in world.ips.items():
        assert ip.startswith("10.213.0."), ip
        node = net["nodes"][name]
        # its MAC is the one its seller's agent gave the guest (52:54 + link id)
        assert node["mac"] == "52:54:" + ":".join(
            f"{b:02x}" for b in node["link_id"].to_bytes(4, "big"))
        assert 0 <= time.time() - node["last_heard"] < 2 * 25 + 5  # (keepalives every 25 s)
        out = world.ssh(ip, "cat /sys/class/net/eth0/address; ip -4 addr show eth0").stdout
        assert node["mac"] in out and ip in out
        seen[name] = node["seller_address"]
    # seller B is seen from the NAT router's address, never its own
    sellers = sorted(a.split(":")[0] for a in seen.values())
    assert sellers == sorted([SELLER_A, "10.77.4.2"]), seen
    a, b = world.ips["node0"], world.ips["node1"]
    assert "0% packet loss" in world.ssh(a, f"ping -c 3 -W 5 {b}").stdout
    assert "0% packet loss" in world.ssh(b, f"ping -c 2 -W 5 {BUYER_LAN}").stdout
    # cluster status, as the buyer reads it
    text = world.cluster("status", "c").stdout
    for ip in world.ips.values():
        assert ip in text
    assert f"mount -t nfs {BUYER_LAN}:/export /mnt" in text


def test_each_node_writes_onto_the_buyers_nfs_export(world):
    for name, ip in world.ips.items():
        world.ssh(ip, f"mount -t nfs {BUYER_LAN}:/export /mnt && echo written-by-{name} "
                      f"> /mnt/{name}.txt && sync && umount /mnt")
        assert (world.export / f"{name}.txt").read_text() == f"written-by-{name}\n"


def test_the_wire_carries_no_plaintext_and_the_tap_does(world):
    tmp = world.tmp
    wire, tap = tmp / "wire.pcap", tmp / "tap.pcap"
    dumps = [world.wan.popen(["tcpdump", "-i", world.wan_to_buyer, "-U", "-s", "0", "-w",
                              str(wire), "udp", "port", str(PORT)], stderr=subprocess.DEVNULL),
             world.buyer.popen(["tcpdump", "-i", world.status()["network"]["tap"], "-U", "-s",
                                "0", "-w", str(tap)], stderr=subprocess.DEVNULL)]
    try:
        wait_for(lambda: wire.exists() and tap.exists(), 20, "tcpdump to start")
        time.sleep(1)
        listener = world.buyer.popen(["/bin/busybox", "nc", "-l", "-p", "7777"],
                                     stdout=subprocess.PIPE)
        time.sleep(0.5)
        for ip in world.ips.values():
            world.ssh(ip, f"echo {SECRET} | nc -w 3 {BUYER_LAN} 7777", check=False)
            break
        got = listener.communicate(timeout=30)[0].decode()
        assert SECRET in got
        time.sleep(1)
    finally:
        for d in dumps:
            d.terminate()
            d.wait(10)
    wire_bytes, tap_bytes = wire.read_bytes(), tap.read_bytes()
    assert SECRET.encode() in tap_bytes
    assert len(wire_bytes) > 2000  # (the ssh session and the nc went through it)
    assert SECRET.encode() not in wire_bytes
    # nor any node's MAC address in clear
    for n in world.status()["network"]["nodes"].values():
        assert bytes.fromhex(n["mac"].replace(":", "")) not in wire_bytes
    world.wire = wire_bytes


def test_a_node_reaches_neither_its_seller_nor_outside_hosts(world):
    ip = world.ips["node0"]
    for target in (SELLER_A, SELLER_B, "10.77.1.2", "10.77.2.1"):
        r = world.ssh(ip, f"ping -c 1 -W 2 {target}", check=False)
        assert r.returncode != 0, f"node0 reached {target}:\n{r.stdout}"
    # and the guest has no route past the cluster's subnet
    routes = world.ssh(ip, "ip route").stdout
    assert "default" not in routes, routes


def _udp_from_wan(world, datagrams: list[bytes]) -> None:
    script = ("import socket,sys,binascii\n"
              "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
              "for h in sys.stdin.read().split():\n"
              f"    s.sendto(binascii.unhexlify(h),({BUYER_WAN!r},{PORT}))\n")
    subprocess.run(world.wan.argv([PYTHON, "-c", script]), check=True, timeout=60, text=True,
                   input="\n".join(d.hex() for d in datagrams))


def _pcap_udp_payloads(pcap: bytes) -> list[bytes]:
    """The UDP payloads of an Ethernet pcap (tcpdump -w), IPv4 only."""
    import struct
    out, off = [], 24
    while off + 16 <= len(pcap):
        incl = struct.unpack_from("<I", pcap, off + 8)[0]
        pkt = pcap[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(pkt) > 42 and pkt[12:14] == b"\x08\x00" and pkt[23] == 17:
            ihl = (pkt[14] & 15) * 4
            out.append(pkt[14 + ihl + 8:])
    return out


def test_garbage_forged_and_replayed_datagrams_are_dropped_counted_and_harmless(world):
    before = world.status()["network"]["dropped"]
    node = world.status()["network"]["nodes"]["node0"]
    sealed = [d for d in _pcap_udp_payloads(getattr(world, "wire", b""))
              if (h := parse_header(d)) and h.link_id == node["link_id"]]
    assert sealed, "no datagram of node0's link on the wire capture"
    # (counters far ahead of the link's: were they believed, the window
    # would move past every honest datagram)
    forger = Sealer(os.urandom(KEY_SIZE), SELLER_TO_BUYER, 2**41, 2**40)
    forged = [forger.seal(0, node["link_id"], b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + b"x" * 50)
              for _ in range(20)]
    garbage = [os.urandom(n) for n in (0, 1, 13, 29, 30, 200, 1600)] * 3
    unknown = [Sealer(os.urandom(KEY_SIZE), SELLER_TO_BUYER).seal(0, 0xDEAD, b"y" * 60)]
    _udp_from_wan(world, sealed[:30] + forged + garbage + unknown)

    seen = {}

    def counted():
        d = seen["d"] = world.status()["network"]["dropped"]
        return d if (d["replayed"] + d["too_old"] > before["replayed"] + before["too_old"]
                     and d["forged"] >= before["forged"] + 20
                     and d["malformed"] > before["malformed"]
                     and d["unknown_link"] > before["unknown_link"]) else None
    try:
        wait_for(counted, 30, "the drops to be counted", interval=1)
    except AssertionError as e:
        raise AssertionError(f"{e}: before {before}, now {seen.get('d')}") from None
    # the link is unaffected: its peer is still the seller, ssh still works
    after = world.status()["network"]["nodes"]["node0"]
    assert after["seller_address"] == node["seller_address"]
    assert world.ssh(world.ips["node0"], "echo alive").stdout.strip() == "alive"
    assert world.cluster("status", "c").stdout.count("forged") == 1


def test_the_endpoint_restarts_and_the_guests_go_on(world):
    st = world.status()
    pid = st["network"]["endpoint_pid"]
    ip = world.ips["node1"]
    up_before = float(world.ssh(ip, "cat /proc/uptime").stdout.split()[0])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: world.status()["network"]["endpoint_restarts"] == 1, 30,
             "the endpoint to be started again", interval=0.5)
    assert world.status()["network"]["endpoint_pid"] != pid
    up_after = float(world.ssh(ip, "cat /proc/uptime").stdout.split()[0])
    assert up_after > up_before  # the same boot: the guest was not restarted
    assert all(n["state"] == "running" for n in world.status()["nodes"])
    assert "link endpoint exited" in world.agent_log()


def test_a_vanished_node_leaves_the_switch_and_down_frees_the_rest(world):
    """Seller B killed -9 (its qemu dies with it): node1 is lost, its switch
    port freed and the buyer told; node0 goes on until `down`."""
    seller = world.market.sellers["sb"]
    seller.kill9()
    wait_for(lambda: re.search(r"node1: left the network, its switch port freed \(lost",
                               world.agent_log()), 120, "node1 to leave the network", interval=1)
    st = world.status()
    assert not st["network"]["nodes"]["node1"]["on_switch"]
    assert st["network"]["nodes"]["node0"]["on_switch"]
    assert world.ssh(world.ips["node0"], "echo still").stdout.strip() == "still"
    assert "(gone)" in world.cluster("status", "c").stdout
    r = world.cluster("down", "c", timeout=300, check=False)
    assert "node0" in r.stdout and "lost" in r.stdout, r.stdout + r.stderr
    log = world.agent_log()
    assert re.search(r"node0: left the network, its switch port freed", log), log
    st = world.status()
    assert not any(n["on_switch"] for n in st["network"]["nodes"].values())
    check = world.market.ledger_check()
    assert check.returncode == 0, check.stdout + check.stderr
    # the TAP went with the agent
    assert st["network"]["tap"] not in world.buyer.ip("-br", "link")
