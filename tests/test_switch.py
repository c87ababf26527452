"""The buyer's learning switch over real datagram sockets, run in its thread."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from cpushare.vpn import switch as sw
from cpushare.vpn.switch import Switch, node_port

BCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, body: bytes = b"x") -> bytes:
    return dst + src + b"\x08\x00" + body.ljust(46, b"\0")


def recv(s: socket.socket, timeout: float = 2.0) -> bytes | None:
    s.settimeout(timeout)
    try:
        return s.recv(2048)
    except socket.timeout:
        return None


@pytest.fixture
def three():
    s = Switch()
    ends = {}
    for name in ("a", "b", "c"):
        mine, theirs = node_port()
        s.add(name, mine.fileno())
        ends[name] = (mine, theirs)
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    yield s, {n: e[1] for n, e in ends.items()}, {n: e[0] for n, e in ends.items()}
    s.stop()
    t.join(5)
    for mine, theirs in ends.values():
        mine.close()
        theirs.close()


def test_it_floods_broadcasts_learns_and_then_sends_to_one_port(three):
    s, ends, _ = three
    ends["a"].send(frame(BCAST, mac(1), b"who"))
    assert recv(ends["b"])[12:] == recv(ends["c"])[12:]
    assert recv(ends["a"], 0.2) is None  # never back where it came from
    ends["b"].send(frame(mac(1), mac(2), b"me"))  # a is learned: to a only
    assert recv(ends["a"])[6:12] == mac(2)
    assert recv(ends["c"], 0.2) is None
    ends["c"].send(frame(mac(9), mac(3)))  # unknown: flooded
    assert recv(ends["a"]) and recv(ends["b"])
    st = s.stats()
    assert st["macs"] == 3 and st["ports"]["a"]["macs"] == [mac(1).hex(":")]


def test_a_port_that_goes_is_forgotten_and_runts_are_counted(three):
    s, ends, mine = three
    ends["a"].send(frame(BCAST, mac(1)))
    recv(ends["b"]), recv(ends["c"])
    s.remove(mine["a"].fileno())
    time.sleep(0.05)
    ends["b"].send(frame(mac(1), mac(2)))  # a's address is gone: flooded to c
    assert recv(ends["c"])[6:12] == mac(2)
    ends["b"].send(b"short")
    for _ in range(50):
        if s.stats()["runts"]:
            break
        time.sleep(0.02)
    assert s.stats()["runts"] == 1 and "a" not in s.stats()["ports"]


def test_the_table_is_bounded_against_a_node_that_forges_sources(three, monkeypatch):
    s, ends, _ = three
    monkeypatch.setattr(sw, "MAX_MACS", 16)
    for i in range(200):
        ends["c"].send(frame(mac(1), bytes([2, 1, 0, 0, i >> 8, i & 255])))
    deadline = time.monotonic() + 5
    while s.stats()["ports"]["c"]["frames_in"] < 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert s.stats()["macs"] <= 16
