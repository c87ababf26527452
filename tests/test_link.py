"""The encrypted link's datagram layer (cpushare.vpn.datagram, cpushare._link).

Sealing and opening one datagram at a time, then the Pump for real: unix
datagram socketpairs standing for qemu's ``-netdev dgram`` sockets, UDP
sockets on loopback between the two ends, and (as root) a TAP device in a
network namespace of its own.
"""

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from cpushare.vpn import datagram as dg
from cpushare.vpn.datagram import (
    MAX_FRAME, MIN_FRAME, OVERHEAD, TYPE_DATA, TYPE_KEEPALIVE, WINDOW, KeyExhausted, LinkKeys,
    Opener, Pump, PumpThread, Sealer,
)

LINK = 0x01020304


def frame(n: int = 100, fill: bytes | None = None) -> bytes:
    """An Ethernet frame of n bytes: locally administered MACs, type IPv4."""
    body = fill * (n - 14) if fill is not None else os.urandom(n - 14)
    return b"\x02" + os.urandom(5) + b"\x02" + os.urandom(5) + b"\x08\x00" + body[:n - 14]


@pytest.fixture
def keys():
    return LinkKeys.generate(LINK)


# ---- one datagram at a time ----

def test_round_trip_and_format(keys):
    seller, buyer = keys.seller(), keys.buyer()
    f = frame(1514)
    d = seller.sealer.seal(TYPE_DATA, LINK, f)
    assert len(d) == len(f) + OVERHEAD == 1544
    assert d[:14] == struct.pack("!BBIQ", 1, TYPE_DATA, LINK, 1)
    assert dg.parse_header(d) == dg.Header(1, TYPE_DATA, LINK, 1)
    assert f not in d and f[:14] not in d          # the MAC addresses are not in clear
    assert buyer.opener.open(d) == dg.Opened(TYPE_DATA, LINK, 1, f)
    k = seller.sealer.seal(TYPE_KEEPALIVE, LINK)
    assert len(k) == OVERHEAD
    assert buyer.opener.open(k) == dg.Opened(TYPE_KEEPALIVE, LINK, 2, b"")
    back = buyer.sealer.seal(TYPE_DATA, LINK, f)
    assert seller.opener.open(back).payload == f
    assert buyer.opener.counts() == {"opened": 2, "malformed": 0, "forged": 0,
                                     "replayed": 0, "too_old": 0}


def test_frame_sizes(keys):
    s = keys.seller().sealer
    o = keys.buyer().opener
    for n in (MIN_FRAME, 60, 1514, 1518, MAX_FRAME):
        assert o.open(s.seal(TYPE_DATA, LINK, frame(n))).payload.__len__() == n
    for n in (0, MIN_FRAME - 1, MAX_FRAME + 1):
        with pytest.raises(ValueError):
            s.seal(TYPE_DATA, LINK, bytes(n))
    with pytest.raises(ValueError):
        s.seal(TYPE_KEEPALIVE, LINK, b"x")
    with pytest.raises(ValueError):
        s.seal(2, LINK, frame())
    with pytest.raises(ValueError):
        s.seal(TYPE_DATA, 2**32, frame())


def test_every_flipped_bit_is_dropped(keys):
    s, o = keys.seller().sealer, keys.buyer().opener
    d = s.seal(TYPE_DATA, LINK, frame(64))
    n = 0
    for i in range(len(d)):
        for bit in range(8):
            bad = bytearray(d)
            bad[i] ^= 1 << bit
            assert o.open(bytes(bad)) is None, (i, bit)
            n += 1
    c = o.counts()
    assert c["opened"] == 0 and c["malformed"] + c["forged"] == n
    assert c["malformed"] >= 16             # the version and type bytes
    assert o.open(d) is not None            # nothing refused has moved the window


def test_garbage_and_truncation(keys):
    s, o = keys.seller().sealer, keys.buyer().opener
    d = s.seal(TYPE_DATA, LINK, frame(100))
    for bad in (b"", b"\x01", d[:OVERHEAD - 1], d[:-1], d + b"\0", os.urandom(200),
                b"\x02" + d[1:], d[:1] + b"\x07" + d[2:], bytes(3000),
                d[:6] + bytes(8) + d[14:]):                 # counter 0 is never sent
        assert o.open(bad) is None
    assert o.opened == 0 and o.malformed + o.forged == 10


def test_replays_and_window(keys):
    s, o = keys.seller().sealer, keys.buyer().opener
    ds = [s.seal(TYPE_DATA, LINK, frame(60)) for _ in range(3000)]
    assert o.open(ds[0]).counter == 1
    assert o.open(ds[0]) is None and o.replayed == 1
    assert o.open(ds[2999]).counter == 3000
    assert o.open(ds[2999]) is None and o.replayed == 2
    # Within the window, out of order, each once.
    inside = list(range(3000 - WINDOW, 2999))
    random.shuffle(inside)
    for i in inside:
        assert o.open(ds[i - 1]) is not None, i
    assert o.open(ds[3000 - WINDOW - 2]) is None and o.too_old == 1   # counter 2039
    assert o.open(ds[100]) is None and o.too_old == 2
    for i in inside[:50]:
        assert o.open(ds[i - 1]) is None
    assert o.replayed == 52 and o.opened == 2 + len(inside)


def test_window_after_a_jump(keys):
    s, o = keys.seller().sealer, keys.buyer().opener
    ds = [s.seal(TYPE_DATA, LINK, frame(60)) for _ in range(5000)]
    assert o.open(ds[4999]) is not None      # 4999 lost, then the newest
    assert o.open(ds[4999 - WINDOW]) is not None
    assert o.open(ds[4999 - WINDOW - 1]) is None and o.too_old == 1
    assert o.open(ds[4998]) is not None and o.top == 5000


def test_counter_never_repeats_and_the_limit():
    s = Sealer(os.urandom(32), dg.SELLER_TO_BUYER, limit=1000)
    counters = [dg.parse_header(s.seal(TYPE_DATA, 1, frame(60))).counter for _ in range(999)]
    counters.append(dg.parse_header(s.seal(TYPE_KEEPALIVE, 1)).counter)
    assert counters == list(range(1, 1001))
    assert s.counter == 1000 and s.remaining == 0
    for _ in range(2):
        with pytest.raises(KeyExhausted):
            s.seal(TYPE_DATA, 1, frame(60))
    assert s.counter == 1000
    assert Sealer(os.urandom(32), 0).limit == dg.REKEY_AFTER
    with pytest.raises(ValueError):
        Sealer(os.urandom(32), 0, limit=2**64)
    with pytest.raises(ValueError):
        Sealer(os.urandom(32), 0, limit=0)


def test_wrong_key_direction_or_reflection(keys):
    seller, buyer = keys.seller(), keys.buyer()
    d = seller.sealer.seal(TYPE_DATA, LINK, frame())
    assert Opener(os.urandom(32), dg.SELLER_TO_BUYER).open(d) is None
    assert Opener(keys.seller_to_buyer, dg.BUYER_TO_SELLER).open(d) is None   # other salt
    assert seller.opener.open(d) is None      # reflected back to its sender
    other = LinkKeys.generate(LINK).buyer().opener
    assert other.open(d) is None and other.forged == 1
    assert buyer.opener.open(d) is not None


def test_keys():
    a, b = LinkKeys.generate(7), LinkKeys.generate(7)
    assert len({a.seller_to_buyer, a.buyer_to_seller, b.seller_to_buyer, b.buyer_to_seller}) == 4
    assert a.seller_to_buyer.hex() not in repr(a)
    with pytest.raises(ValueError):
        LinkKeys(7, bytes(32), bytes(32))
    with pytest.raises(ValueError):
        LinkKeys(2**32, os.urandom(32), os.urandom(32))
    with pytest.raises(ValueError):
        LinkKeys(1, os.urandom(16), os.urandom(32))
    with pytest.raises(ValueError):
        Sealer(os.urandom(31), 0)
    with pytest.raises(ValueError):
        Opener(os.urandom(32), -1)


# ---- the pump ----

class End:
    """One end of a link for the tests: "qemu"'s socket, the pump's UDP socket, its pump."""

    def __init__(self, ends, link_id=LINK, peer=None, **kw):
        self.qemu, local = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.local = local
        self.udp = dg.udp_socket(("127.0.0.1", 0))
        self.addr = self.udp.getsockname()
        self.pump = Pump(self.udp, **kw)
        self.pump.add(link_id, local, ends.sealer, ends.opener, peer)
        self.thread = PumpThread(self.pump).start()

    def close(self):
        self.thread.stop()
        for s in (self.qemu, self.local, self.udp):
            s.close()


def recv_frames(sock, n, timeout=10.0):
    sock.settimeout(timeout)
    return [sock.recv(4096) for _ in range(n)]


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


@pytest.fixture
def pair(keys):
    """A seller's end that knows the buyer's address, and a buyer's that learns the seller's."""
    buyer = End(keys.buyer())
    seller = End(keys.seller(), peer=buyer.addr)
    yield seller, buyer
    seller.close()
    buyer.close()


def test_pump_moves_frames_both_ways_in_order(pair):
    seller, buyer = pair
    # The buyer knows no peer until the seller has sent: its frames are dropped.
    buyer.qemu.send(frame(80))
    wait_for(lambda: buyer.pump.stats()["links"][LINK]["no_peer"] == 1)
    sent = [frame(random.randint(MIN_FRAME, 1514)) for _ in range(2000)]
    got = []
    for i in range(0, len(sent), 50):           # bursts of 50, read as they come
        for f in sent[i:i + 50]:
            seller.qemu.send(f)
        got += recv_frames(buyer.qemu, 50)
    assert got == sent
    assert buyer.pump.peer(LINK) == seller.addr
    back = [frame(random.randint(MIN_FRAME, 1514)) for _ in range(2000)]
    got = []
    for i in range(0, len(back), 50):
        for f in back[i:i + 50]:
            buyer.qemu.send(f)
        got += recv_frames(seller.qemu, 50)
    assert got == back
    s = seller.pump.stats()["links"][LINK]
    b = buyer.pump.stats()["links"][LINK]
    assert s["frames_out"] == b["frames_in"] == 2000 == b["opened"]
    assert b["frames_out"] == s["frames_in"] == 2000
    assert s["bytes_out"] == sum(map(len, sent)) and b["bytes_out"] == sum(map(len, back))
    assert s["sealed"] == 2000 and b["sealed"] == 2000
    assert s["local"] == "socket" and not s["dead"] and b["peer_changes"] == 1
    for d in (s, b):
        assert d["forged"] == d["replayed"] == d["malformed"] == d["send_errors"] == 0


def test_pump_full_frames_in_gso_sends_and_gro_receives(pair):
    """Bursts of full frames (what bulk TCP makes): one UDP GSO message per run
    of equal datagrams, taken apart again at the far end, order kept."""
    seller, buyer = pair
    seller.qemu.send(frame(60))
    recv_frames(buyer.qemu, 1)
    for a, b in ((seller, buyer), (buyer, seller)):
        sent = [frame(1514) for _ in range(600)] + [frame(70)]
        got = []
        for i in range(0, len(sent), 60):
            for f in sent[i:i + 60]:
                a.qemu.send(f)
            got += recv_frames(b.qemu, len(sent[i:i + 60]))
        assert got == sent
    for end in (seller, buyer):
        st = end.pump.stats()
        assert st["malformed"] == 0 and st["links"][LINK]["forged"] == 0
        if st["gso"]:
            assert st["gso_sends"] > 0
        if st["gro"]:
            assert st["gro_receives"] > 0


def test_pump_counts_garbage_and_keeps_working(pair, keys):
    seller, buyer = pair
    seller.qemu.send(frame(60))
    recv_frames(buyer.qemu, 1)
    capture = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    capture.bind(("127.0.0.1", 0))
    try:
        # What an attacker can send to the buyer's port, from elsewhere.
        honest = Sealer(keys.seller_to_buyer, dg.SELLER_TO_BUYER)      # the same key again
        stranger = LinkKeys.generate(LINK).seller().sealer
        forged = [stranger.seal(TYPE_DATA, LINK, frame()) for _ in range(5)][-1]
        attacks = [os.urandom(100), b"", b"\x01" * 20, os.urandom(1600),
                   b"\x01\x00" + struct.pack("!I", 99) + os.urandom(60),      # unknown link
                   forged,                                 # another key, a new counter
                   honest.seal(TYPE_DATA, LINK, frame())]  # counter 1 again: a replay
        for a in attacks:
            capture.sendto(a, buyer.addr)
        wait_for(lambda: sum(buyer.pump.stats()["links"][LINK][k] for k in
                             ("forged", "replayed", "malformed", "too_old")) + sum(
            buyer.pump.stats()[k] for k in ("malformed", "unknown_link")) >= len(attacks))
        st = buyer.pump.stats()
        assert st["unknown_link"] == 1
        assert st["links"][LINK]["replayed"] == 1 and st["links"][LINK]["forged"] == 1
        assert st["links"][LINK]["frames_in"] == 1
        # No forged or replayed datagram moved the buyer's idea of the seller.
        assert buyer.pump.peer(LINK) == seller.addr
        f = frame(300)
        seller.qemu.send(f)
        assert recv_frames(buyer.qemu, 1) == [f]
        buyer.qemu.send(f)
        assert recv_frames(seller.qemu, 1) == [f]
    finally:
        capture.close()


def test_peer_follows_authenticated_datagrams_only(keys):
    buyer = End(keys.buyer())
    try:
        seller = keys.seller().sealer
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
        a.sendto(seller.seal(TYPE_KEEPALIVE, LINK), buyer.addr)
        wait_for(lambda: buyer.pump.peer(LINK) == a.getsockname())
        forged = bytearray(seller.seal(TYPE_DATA, LINK, frame()))
        forged[-1] ^= 1
        b.sendto(bytes(forged), buyer.addr)
        wait_for(lambda: buyer.pump.stats()["links"][LINK]["forged"] == 1)
        assert buyer.pump.peer(LINK) == a.getsockname()
        # The seller's NAT moved it: its next datagram comes from b.
        b.sendto(seller.seal(TYPE_DATA, LINK, frame()), buyer.addr)
        wait_for(lambda: buyer.pump.peer(LINK) == b.getsockname())
        recv_frames(buyer.qemu, 1)
        f = frame(200)
        buyer.qemu.send(f)
        b.settimeout(5)
        assert keys.seller().opener.open(b.recv(4096)).payload == f
        st = buyer.pump.stats()["links"][LINK]
        assert st["peer_changes"] == 2 and st["keepalives_in"] == 1
        a.close()
        b.close()
    finally:
        buyer.close()


def test_no_plaintext_on_the_wire_and_keepalives(keys):
    """A capture of the UDP socket the seller sends to: no frame in clear, and
    each datagram opens to the frame sent (the capture is the real traffic)."""
    wire = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wire.bind(("127.0.0.1", 0))
    seller = End(keys.seller(), peer=wire.getsockname(), keepalive=0.2)
    try:
        wire.settimeout(5)
        first = wire.recv(4096)              # a keepalive at once, for the NAT
        marker = b"CPUSHARE-PLAINTEXT-MARKER-"
        frames = [frame(1000, marker) for _ in range(20)]
        for f in frames:
            seller.qemu.send(f)
        captured = []
        while len([d for d in captured if len(d) > OVERHEAD]) < 20:
            captured.append(wire.recv(4096))
        deadline = time.monotonic() + 0.6       # idle: keepalives every 0.2 s
        while time.monotonic() < deadline:
            captured.append(wire.recv(4096))
        assert all(marker not in d and marker[:8] not in d for d in captured)
        opener = keys.buyer().opener
        opened = [opener.open(d) for d in [first] + captured]
        assert all(o is not None for o in opened)
        assert [o.payload for o in opened if o.type == TYPE_DATA] == frames
        assert opened[0].type == TYPE_KEEPALIVE and opened[0].counter == 1
        assert sum(o.type == TYPE_KEEPALIVE for o in opened) >= 2   # one more after 0.2 s idle
        assert [o.counter for o in opened] == list(range(1, len(opened) + 1))
    finally:
        seller.close()
        wire.close()


def test_pump_api(keys):
    udp = dg.udp_socket(("127.0.0.1", 0))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        pump = Pump(udp)
        ends = keys.seller()
        pump.add(LINK, a, ends.sealer, ends.opener, ("127.0.0.1", 9))
        with pytest.raises(RuntimeError):
            ends.sealer.seal(TYPE_DATA, LINK, frame())     # it belongs to the pump now
        with pytest.raises(RuntimeError):
            ends.opener.open(b"x" * 40)
        with pytest.raises(ValueError):
            pump.add(LINK + 1, b, ends.sealer, ends.opener)
        other = LinkKeys.generate(LINK + 1).seller()
        with pytest.raises(ValueError):
            pump.add(LINK, b, other.sealer, other.opener)
        pump.set_peer(LINK, ("::1", 5000))
        assert pump.peer(LINK) == ("::1", 5000, 0, 0)
        new = LinkKeys.generate(LINK).seller()
        pump.rekey(LINK, new.sealer, new.opener)
        assert ends.sealer.seal(TYPE_DATA, LINK, frame())  # free again
        pump.remove(LINK)
        assert new.opener.open(b"x" * 40) is None
        with pytest.raises(KeyError):
            pump.remove(LINK)
        assert pump.stats()["links"] == {}
        pump.stop()                      # a stop before run: run returns at once
        t = time.monotonic()
        pump.run()
        assert time.monotonic() - t < 1
        with pytest.raises(ValueError):
            Pump(udp, batch=0)
        with pytest.raises(OSError):
            pump.add(LINK, a, ends.sealer, ends.opener, ("buyer.example", 5000))
        gone = Pump(udp)
        gone.add(LINK, a, ends.sealer, ends.opener)
        del gone                         # a pump that goes frees its sealers and openers
        assert ends.sealer.seal(TYPE_DATA, LINK, frame())
    finally:
        for s in (udp, a, b):
            s.close()


def test_buyer_pump_demultiplexes_links():
    """Three leases on one UDP port of the buyer, each to its own local end."""
    links = {10 + i: LinkKeys.generate(10 + i) for i in range(3)}
    udp = dg.udp_socket(("127.0.0.1", 0))
    pump = Pump(udp)
    qemus, locals_ = {}, []
    for lid, k in links.items():
        q, l = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        qemus[lid] = q
        locals_.append(l)
        e = k.buyer()
        pump.add(lid, l, e.sealer, e.opener)
    sellers = {lid: End(k.seller(), link_id=lid, peer=udp.getsockname()) for lid, k in links.items()}
    try:
        with PumpThread(pump):
            for lid, s in sellers.items():
                f = frame(100, bytes([lid]))
                s.qemu.send(f)
                assert recv_frames(qemus[lid], 1) == [f]
            for lid, q in qemus.items():
                f = frame(100, bytes([lid + 100]))
                q.send(f)
                assert recv_frames(sellers[lid].qemu, 1) == [f]
            st = pump.stats()["links"]
            assert {lid: (d["frames_in"], d["frames_out"], d["peer"]) for lid, d in st.items()} \
                == {lid: (1, 1, s.addr) for lid, s in sellers.items()}
    finally:
        for s in sellers.values():
            s.close()
        for s in list(qemus.values()) + locals_ + [udp]:
            s.close()


_SMALL_MTU = r"""
import os, socket, sys
from cpushare.vpn import datagram as dg
keys = dg.LinkKeys.generate(1)
ends, pumps, threads = [], [], []
udps = [dg.udp_socket(("127.0.0.1", 0)) for _ in range(2)]
for i, e in enumerate((keys.seller(), keys.buyer())):
    q, l = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    p = dg.Pump(udps[i])
    p.add(1, l, e.sealer, e.opener, udps[1 - i].getsockname())
    ends.append((q, l)); pumps.append(p); threads.append(dg.PumpThread(p).start())
q0, q1 = ends[0][0], ends[1][0]
q1.settimeout(10)
for size in (1514, 1000, 1514):
    sent = [os.urandom(size) for _ in range(40)]
    for f in sent:
        q0.send(f)
    assert [q1.recv(4096) for _ in sent] == sent, size
for t in threads:
    t.stop()
st = pumps[0].stats()
print(st["gso"], st["gso_max"], st["gso_sends"], st["links"][1]["send_errors"])
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and ip(8)")
def test_gso_on_a_path_whose_mtu_is_smaller_than_the_datagrams():
    """UDP GSO does not fragment: on a 1500-byte path full datagrams (1544)
    go one by one (IP fragments them), smaller runs still as GSO."""
    ns = f"cpslinkmtu{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "mtu", "1500", "up"],
                       check=True)
        src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _SMALL_MTU],
                             check=True, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": src}).stdout.split()
        gso, gso_max, gso_sends, send_errors = out
        assert gso == "True" and int(gso_max) < 1544 and int(gso_sends) > 0
        assert send_errors == "0"
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


# ---- a TAP device (root) ----

def _can_tap() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun") and shutil.which("ip") is not None


@pytest.mark.skipif(not _can_tap(), reason="needs root, /dev/net/tun and ip(8)")
def test_pump_with_a_tap_in_a_namespace(keys):
    ns = f"cpslinktest{os.getpid()}"
    fd, name = dg.open_tap("")
    wire = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wire.bind(("127.0.0.1", 0))
    udp = dg.udp_socket(("127.0.0.1", 0))
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "set", name, "netns", ns)
        nsrun = lambda *a: run("ip", "netns", "exec", ns, *a)  # noqa: E731
        nsrun("ip", "link", "set", name, "address", "02:00:00:00:00:01", "up")
        nsrun("ip", "addr", "add", "10.213.0.1/24", "dev", name)
        ends = keys.seller()
        pump = Pump(udp)
        pump.add(LINK, fd, ends.sealer, ends.opener, wire.getsockname())
        far = keys.buyer()
        with PumpThread(pump):
            # The namespace sends to a neighbour: an ARP request leaves by the TAP.
            code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                    "s.sendto(b'x', ('10.213.0.2', 9))")
            nsrun(sys.executable, "-c", code)
            wire.settimeout(5)
            while True:
                o = far.opener.open(wire.recv(4096))
                if o.payload[12:14] == b"\x08\x06":
                    break
            assert o.payload[:6] == b"\xff" * 6 and o.payload[6:12] == bytes.fromhex("020000000001")
            # A UDP packet for the namespace arrives through the TAP.
            listener = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-c",
                 "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                 "s.bind(('10.213.0.1', 7777)); print('up', flush=True); "
                 "print(s.recv(100).decode(), flush=True)"],
                stdout=subprocess.PIPE, text=True)
            assert listener.stdout.readline() == "up\n"
            payload = b"through the link"
            udph = struct.pack("!HHHH", 5555, 7777, 8 + len(payload), 0) + payload
            iph = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udph), 1, 0, 64, 17, 0,
                              socket.inet_aton("10.213.0.2"), socket.inet_aton("10.213.0.1"))
            s = sum(struct.unpack("!10H", iph))
            s = (s & 0xFFFF) + (s >> 16)
            iph = iph[:10] + struct.pack("!H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF) + iph[12:]
            eth = bytes.fromhex("020000000001") + bytes.fromhex("020000000002") + b"\x08\x00"
            wire.sendto(far.sealer.seal(TYPE_DATA, LINK, eth + iph + udph), udp.getsockname())
            out, _ = listener.communicate(timeout=10)
            assert out == payload.decode() + "\n"
            st = pump.stats()["links"][LINK]
            assert st["local"] == "tap" and st["frames_in"] == 1 and st["local_errors"] == 0
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        os.close(fd)
        wire.close()
        udp.close()


@pytest.mark.slow
@pytest.mark.skipif(not _can_tap() or not shutil.which("iperf3"), reason="needs root and iperf3")
def test_bench_link_quick():
    """bench/link.py in quick mode, for real: TCP crosses all three ways, and
    the pumps dropped nothing (the goal itself is the bench's to judge)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import link as bench_link
    r = bench_link.run(quick=True)
    assert r["measured"] == r["link_mb_per_s"] > 0 and r["veth_mb_per_s"] > 0
    assert len(r["link_cpu_s_per_gb"]) == 2 and r["rtt_us"]["link"] > 0
    for side in ("seller", "buyer"):
        d = r["pump_drops_after"][side]
        assert d["frames_out"] > 0 and d["frames_in"] > 0
        assert d["forged"] == d["malformed"] == d["replayed"] == d["send_errors"] == 0
