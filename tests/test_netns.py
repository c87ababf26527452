"""The network-namespace harness (tests/netns.py): unique names, links,
routes, a NAT router, DHCP from dnsmasq, and a clean-up that always
happens."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import textwrap
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns  # noqa: E402

pytestmark = pytest.mark.skipif(netns.missing() is not None, reason=netns.missing() or "")

PY = "/usr/bin/python3"
BUSYBOX = "/bin/busybox"  # busybox-static: ping without iputils-ping


def ping(ns: netns.Namespace, addr: str, wait: int = 5, check: bool = True):
    return ns.run([BUSYBOX, "ping", "-c", "1", "-W", str(wait), addr], check=check)


def _exists(name: str) -> bool:
    return name in netns._names()


def _udp_server(ns: netns.Namespace, port: int) -> subprocess.Popen:
    """A one-shot UDP server in `ns`: prints the source address of the
    first datagram (or "timeout")."""
    code = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", {port}))
        print("ready", flush=True)
        s.settimeout(10)
        try:
            data, addr = s.recvfrom(100)
            print(addr[0], data.decode(), flush=True)
        except socket.timeout:
            print("timeout", flush=True)
    """)
    proc = ns.popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _udp_send(ns: netns.Namespace, addr: str, port: int, text: str) -> None:
    ns.run([PY, "-c", "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            f".sendto({text!r}.encode(), ({addr!r}, {port}))"])


def test_names_are_unique_and_close_removes_everything():
    with netns.Network() as one, netns.Network() as two:
        a, b = one.namespace("a"), two.namespace("a")
        assert a.name != b.name
        assert a.name.startswith(f"{netns.PREFIX}{os.getpid()}x")
        assert _exists(a.name) and _exists(b.name)
        sleeper = a.popen(["sleep", "600"])
        # A process started in it some other way is ended too.
        stray = subprocess.Popen(a.argv(["sleep", "600"]))
        time.sleep(0.2)
        assert sleeper.pid in a.pids() and stray.pid in a.pids()
        with pytest.raises(ValueError):
            one.namespace("a")
    assert not _exists(a.name) and not _exists(b.name)
    assert sleeper.poll() is not None
    assert stray.wait(5) is not None
    one.close()  # again: nothing to do


def test_close_after_a_failure_in_the_block():
    with pytest.raises(RuntimeError):
        with netns.Network() as net:
            ns = net.namespace("x")
            proc = ns.popen(["sleep", "600"])
            raise RuntimeError("the test failed here")
    assert not _exists(ns.name)
    assert proc.poll() is not None


def test_a_failing_command_says_why():
    with netns.Network() as net:
        ns = net.namespace("x")
        with pytest.raises(netns.NetnsError, match="no-such-device"):
            ns.ip("link", "set", "dev", "no-such-device", "up")
        r = ns.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        with pytest.raises(ValueError):
            net.namespace("Bad Label")


def test_leftovers_of_a_dead_run_are_swept():
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{netns.PREFIX}{dead.pid}x1-left"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        left = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"])
        time.sleep(0.2)
        with netns.Network():
            assert not _exists(name)
        assert left.wait(5) is not None
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_veth_routes_and_masquerade():
    """client -- router -- server: the server has no route to the
    client's subnet; the router forwards, and with MASQUERADE the server
    sees the router's address, as behind a home router."""
    if netns.missing_iptables():
        pytest.fail(netns.missing_iptables())
    with netns.Network() as net:
        client, router, server = (net.namespace(n) for n in ("client", "router", "server"))
        c_dev, r_in = net.veth(client, router, "10.201.0.2/24", "10.201.0.1/24")
        r_out, s_dev = net.veth(router, server, "10.202.0.1/24", "10.202.0.2/24")
        assert (c_dev, r_in, r_out, s_dev) == ("to-router", "to-client", "to-server", "to-router")
        client.route("default", via="10.201.0.1")
        ping(client, "10.201.0.1")

        # Forwarding alone: the datagram arrives with the client's address.
        router.forwarding(True)
        srv = _udp_server(server, 4000)
        _udp_send(client, "10.202.0.2", 4000, "plain")
        assert srv.communicate(timeout=15)[0].split() == ["10.201.0.2", "plain"]

        # NAT: the server sees the router's outer address, and answers reach
        # the client (ping's reply comes back through the translation).
        router.masquerade(r_out)
        srv = _udp_server(server, 4001)
        _udp_send(client, "10.202.0.2", 4001, "nat")
        assert srv.communicate(timeout=15)[0].split() == ["10.202.0.1", "nat"]
        ping(client, "10.202.0.2")
        # ... and the server cannot reach the client's network.
        assert ping(server, "10.201.0.2", wait=1, check=False).returncode != 0
        assert "MASQUERADE" in router.run(["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout


def test_bridge_tap_and_mtu():
    with netns.Network() as net:
        lan, peer = net.namespace("lan"), net.namespace("peer")
        br = lan.bridge(cidr="10.203.0.1/24")
        tap = lan.tap(bridge=br)
        assert (br, tap) == ("br0", "tap0")
        assert f"master {br}" in lan.ip("link", "show", "dev", tap)
        # A veth end on the bridge: the peer reaches the bridge's address.
        end, p_dev = net.veth(lan, peer, None, "10.203.0.2/24", mtu=1400)
        lan.ip("link", "set", "dev", end, "master", br)
        assert "mtu 1400" in peer.ip("link", "show", "dev", p_dev)
        ping(peer, "10.203.0.1")
        with pytest.raises(ValueError):
            lan.tap("tap0")


def test_dnsmasq_gives_a_lease_with_the_mtu(tmp_path):
    """dnsmasq on one end of a veth, busybox udhcpc on the other (the
    guest's DHCP client, without the guest)."""
    assert os.path.exists(BUSYBOX), "busybox-static is not installed"
    with netns.Network() as net:
        server, client = net.namespace("dhcp"), net.namespace("client")
        s_dev, c_dev = net.veth(server, client, "10.204.0.1/24", None)
        dhcp = netns.Dnsmasq(server, s_dev, "10.204.0.1/24", str(tmp_path), mtu=1420)
        script = tmp_path / "udhcpc.sh"
        out = tmp_path / "lease"
        script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && echo "$ip $mtu $router" > {out}\nexit 0\n')
        script.chmod(0o755)
        r = client.run([BUSYBOX, "udhcpc", "-f", "-q", "-n", "-i", c_dev, "-O", "mtu",
                        "-T", "1", "-t", "5", "-s", str(script)], check=False, timeout=30)
        assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{dhcp.log()}"
        ip, mtu, router = out.read_text().split()
        assert (mtu, router) == ("1420", "10.204.0.1")
        lo, hi = dhcp.range
        assert lo <= ipaddress.ip_address(ip) <= hi
        deadline = time.monotonic() + 5
        while not dhcp.leases() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [lease[1] for lease in dhcp.leases()] == [ip]
        proc = dhcp.proc
    assert proc.poll() is not None  # stopped with the Network
