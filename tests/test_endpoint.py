"""The buyer's endpoint (cpushare.vpn.endpoint) over real sockets on
loopback, its control requests, the seal counters it may use, and the
checks of `cluster up`'s network options."""

from __future__ import annotations

import json
import socket
import subprocess
from types import SimpleNamespace

import pytest

import netns
from cpushare.buyer.clusternetargs import net_spec
from cpushare.vpn.datagram import (BUYER_TO_SELLER, SELLER_TO_BUYER, LinkKeys, Opener, Sealer,
                                   parse_header, udp_socket)
from cpushare.vpn.endpoint import TAP_PORT, Endpoint, handle, serve
from cpushare.vpn.services import Subnet
from test_e2e_support import PYTHON, LocalMarket, env, wait_for

BROADCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, body: bytes = b"x" * 46) -> bytes:
    return dst + src + b"\x08\x00" + body


class Seller:
    """A seller's end of one link, by hand: a UDP socket, its sealer and opener."""

    def __init__(self, keys: LinkKeys):
        self.keys = keys
        self.ends = keys.seller()
        self.udp = udp_socket(("127.0.0.1", 0))
        self.udp.settimeout(5)

    def hello(self, to) -> None:
        """A keepalive, as a seller's agent sends first: the endpoint learns its address."""
        self.udp.sendto(self.ends.sealer.seal(1, self.keys.link_id), to)

    def send(self, to, payload: bytes) -> None:
        self.udp.sendto(self.ends.sealer.seal(0, self.keys.link_id, payload), to)

    def recv(self, timeout: float = 5) -> tuple[bytes, int]:
        """(the frame, its counter)"""
        self.udp.settimeout(timeout)
        d, _ = self.udp.recvfrom(4096)
        opened = self.ends.opener.open(d)
        assert opened is not None, "a datagram that does not open"
        return opened.payload, parse_header(d).counter

    def nothing(self, timeout: float = 0.5) -> bool:
        self.udp.settimeout(timeout)
        try:
            self.udp.recvfrom(4096)
        except socket.timeout:
            return True
        return False


@pytest.fixture
def endpoint():
    udp = udp_socket(("127.0.0.1", 0))
    ep = Endpoint(udp, None).start()
    yield ep
    ep.stop()
    udp.close()


def _join(ep: Endpoint, link_id: int, node: str, **kw) -> Seller:
    s = Seller(LinkKeys.generate(link_id))
    ep.add(link_id, node, s.keys.buyer_to_seller, s.keys.seller_to_buyer,
           kw.get("start", 0), kw.get("limit", 2**32), None)
    return s


def test_nodes_behind_two_links_are_switched_to_each_other(endpoint):
    a, b = _join(endpoint, 1, "node0"), _join(endpoint, 2, "node1")
    to = endpoint.udp.getsockname()
    b.nothing(0.1)
    assert endpoint.stats()["links"]["2"]["peer"] is None
    for s in (a, b):
        s.hello(to)
    wait_for(lambda: all(endpoint.stats()["links"][k]["peer"] for k in ("1", "2")), 5,
             "both peers learned")
    mac_a, mac_b = b"\x52\x54\0\0\0\x01", b"\x52\x54\0\0\0\x02"
    a.send(to, frame(BROADCAST, mac_a))  # flooded: b hears it
    got, _ = b.recv()
    assert got == frame(BROADCAST, mac_a)
    b.send(to, frame(mac_a, mac_b, b"reply" * 10))  # learned: to a only
    got, _ = a.recv()
    assert got == frame(mac_a, mac_b, b"reply" * 10)
    assert b.nothing()
    st = endpoint.stats()
    assert st["links"]["1"]["switch"]["macs"] == ["52:54:00:00:00:01"]
    assert st["links"]["2"]["peer"] == b.udp.getsockname()  # learned from its datagram


def test_a_sealer_stops_at_its_grant_and_a_new_endpoint_starts_past_it():
    udp = udp_socket(("127.0.0.1", 0))
    to = udp.getsockname()
    ep = Endpoint(udp, None).start()
    a, b = _join(ep, 1, "node0"), _join(ep, 2, "node1", limit=5)
    mac_a = b"\x52\x54\0\0\0\x01"
    b.hello(to)
    wait_for(lambda: ep.stats()["links"]["2"]["peer"], 5, "b's address learned")
    for i in range(8):
        a.send(to, frame(BROADCAST, mac_a, bytes([i]) * 46))
    counters = [b.recv()[1] for _ in range(5)]
    assert counters == [1, 2, 3, 4, 5]
    assert b.nothing()  # the rest: dropped, never sealed past the grant
    wait_for(lambda: ep.stats()["links"]["2"]["exhausted"] == 3, 5, "3 frames counted exhausted")
    ep.grant(2, 6)
    a.send(to, frame(BROADCAST, mac_a))
    assert b.recv()[1] == 6
    ep.stop()
    # the endpoint dies; its successor is handed the same link past its grant
    ep = Endpoint(udp, None).start()
    try:
        ep.add(1, "node0", a.keys.buyer_to_seller, a.keys.seller_to_buyer, 0, 2**32, None)
        ep.add(2, "node1", b.keys.buyer_to_seller, b.keys.seller_to_buyer, 6, 6 + 100,
               b.udp.getsockname())
        a.send(to, frame(BROADCAST, mac_a))
        _, counter = b.recv()
        assert counter == 7  # no nonce used twice under the key
    finally:
        ep.stop()
        udp.close()


def test_control_requests_are_checked(endpoint):
    k = LinkKeys.generate(9)
    good = {"op": "add", "link_id": 9, "node": "node0", "tx": k.buyer_to_seller.hex(),
            "rx": k.seller_to_buyer.hex(), "start": 0, "limit": 100, "peer": None}
    bad = [
        ([], "a JSON object"),
        ({"op": "nope", "link_id": 1}, "unknown op"),
        (dict(good, link_id=-1), "link_id"), (dict(good, link_id=True), "link_id"),
        (dict(good, link_id=2**64), "link_id"),
        (dict(good, tx="zz"), "tx is not hex"), (dict(good, rx=k.seller_to_buyer.hex()[:10]),
                                                 "key"),
        (dict(good, node=""), "node"), (dict(good, node=TAP_PORT), "node"),
        (dict(good, node="n" * 65), "node"), (dict(good, peer=["h"]), "peer"),
        (dict(good, peer=[1, 2]), "peer"), (dict(good, start=200), "start"),
        ({"op": "remove", "link_id": 77}, "no link 77"),
        ({"op": "grant", "link_id": 77, "limit": 5}, "no link 77"),
    ]
    for req, word in bad:
        answer = handle(endpoint, req)
        assert word in answer.get("error", ""), (req, answer)
    assert handle(endpoint, good) == {"ok": True}
    assert "already" in handle(endpoint, good)["error"]
    assert handle(endpoint, {"op": "grant", "link_id": 9, "limit": 500}) == {"ok": True}
    assert endpoint.stats()["links"]["9"]["remaining"] == 500
    assert handle(endpoint, {"op": "remove", "link_id": 9}) == {"ok": True}
    assert endpoint.stats()["links"] == {}


def test_the_control_socket_survives_garbage_and_ends_with_its_peer(endpoint):
    import threading
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    t = threading.Thread(target=serve, args=(endpoint, theirs), daemon=True)
    t.start()
    ours.settimeout(5)
    for junk in (b"{", b"\xff\xfe", b"[" * 100000, b'"x"'):
        ours.send(junk)
        assert "error" in json.loads(ours.recv(1 << 20))
    ours.send(b'{"op": "stats"}')
    assert json.loads(ours.recv(1 << 20))["ok"] is True
    ours.close()
    t.join(5)
    assert not t.is_alive()


def test_sealer_start_and_grant():
    s = Sealer(b"k" * 32, BUYER_TO_SELLER, limit=10, start=7)
    o = Opener(b"k" * 32, BUYER_TO_SELLER)
    assert parse_header(s.seal(0, 1, frame(BROADCAST, b"\x02" * 6))).counter == 8
    assert s.remaining == 2
    s.grant(5)  # lower: nothing changes
    assert s.limit == 10
    s.grant(12)
    assert s.remaining == 4
    assert o.open(s.seal(1, 1)) is not None
    with pytest.raises(ValueError):
        Sealer(b"k" * 32, SELLER_TO_BUYER, limit=10, start=11)


def _args(**kw):
    base = dict(listen=None, advertise=None, subnet=None, no_dhcp=False, nfs=None)
    return SimpleNamespace(**dict(base, **kw))


def test_network_options_are_checked(tmp_path):
    assert net_spec(_args(), 2) is None
    spec = net_spec(_args(listen="192.0.2.7:5555", nfs=tmp_path), 2)
    assert spec.advertise == "192.0.2.7:5555" and str(spec.subnet) == "10.213.0.0/24"
    assert spec.nfs == tmp_path and spec.dhcp
    assert net_spec(_args(listen="0.0.0.0:5555", advertise="buyer.example:5555"),
                    1).advertise == "buyer.example:5555"
    for kw, nodes, words in [
        (dict(nfs=tmp_path), 1, "needs --listen"),
        (dict(no_dhcp=True), 1, "needs --listen"),
        (dict(listen="0.0.0.0:5555"), 1, "--advertise"),
        (dict(listen="buyer.example:5555"), 1, "numeric IP"),
        (dict(listen="192.0.2.7"), 1, "give a port"),
        (dict(listen="192.0.2.7:70000"), 1, "--listen"),
        (dict(listen="192.0.2.7:1", subnet="8.8.8.0/24"), 1, "not a private"),
        (dict(listen="192.0.2.7:1", subnet="10.0.0.1/24"), 1, "not a subnet"),
        (dict(listen="192.0.2.7:1", subnet="10.0.0.0/30"), 1, "/16 to /28"),
        (dict(listen="192.0.2.7:1", subnet="fd00::/64"), 1, "IPv4"),
        (dict(listen="192.0.2.7:1", subnet="10.9.0.0/28"), 5, "larger one"),
        (dict(listen="192.0.2.7:1", nfs=tmp_path / "missing"), 1, "not a directory"),
    ]:
        with pytest.raises(ValueError, match=words):
            net_spec(_args(**kw), nodes)
    assert Subnet("10.9.0.0/28").size == 5


@pytest.mark.skipif(netns.missing() is not None, reason=str(netns.missing()))
def test_without_cap_net_admin_cluster_up_says_so_and_leases_nothing(tmp_path):
    """The TAP needs CAP_NET_ADMIN: `up` run without it (setpriv drops it from
    the bounding set, so root has it no more) says so, and nothing is leased."""
    import guestiso
    m = LocalMarket(tmp_path / "market")
    m.account("buyer", 1000)
    order = m.root / "b.buy"
    m.cli("buy-order", "add", "buyer", "--price", "1.000", "--model", "kvm", "--memory",
          "256M", "--max-cpu-seconds", "60", "--output", str(order))
    iso = guestiso.iso_path("marker")
    with netns.Network() as net:
        ns = net.namespace("buyer")
        r = subprocess.run(ns.argv(["setpriv", "--bounding-set", "-net_admin", PYTHON, "-m",
                                    "cpushare", "cluster", "up", "--order", str(order),
                                    "--iso", str(iso), "--nodes", "1", "--name", "nocap",
                                    "--listen", "127.0.0.1:5555"]),
                           env=dict(env(), XDG_STATE_HOME=str(tmp_path / "state")),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "TAP device" in r.stderr and "CAP_NET_ADMIN" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert "cpushare" not in ns.ip("-br", "link")
    assert m.balance_milli("buyer") == 1_000_000
