"""TCP through the encrypted link, against a veth and an unencrypted vde_plug link.

Two network namespaces, A and B, joined four ways side by side in one run:

  veth   a veth pair (the kernel alone: the ceiling)
  link   a TAP device in each namespace, each read and written by a pump
         process of its own (cpushare.vpn.datagram.Pump: the link's C code,
         AES-256-GCM, recvmmsg/sendmmsg batches); the two pumps exchange
         datagrams over UDP on the host's loopback.  A is the seller's end,
         B the buyer's.
  endpoint  the link as the product runs the buyer's end: A's end is the
         same pump on a TAP, B's is a process running the buyer's endpoint
         (cpushare.vpn.endpoint.Endpoint: a Pump with follow, and B's TAP
         as a port of the learning switch of cpushare.vpn.switch, in Python,
         joined to the node's link by a unix datagram socketpair), with one
         link added as a cluster's agent adds a node's.
  vde    the same with `vde_plug tap://TAP udp://PORT->127.0.0.1:PORT` at
         each end (vde2: the same plumbing in C, no encryption)

Each way: iperf3 (one TCP stream, A to B) for SECONDS, the best of ROUNDS
rounds (the ways in turns each round); the CPU time of each end's process
(pump, endpoint with its threads, or vde_plug) over the transfer, per GB
received, seller's end (A) first; then the round-trip time of a UDP
ping-pong (one byte, a Python echo in B) across each, the median of PINGS,
a way's added RTT being its median less the veth's (Python's own time is
in both).  MTU 1500 everywhere; MB is 10**6 bytes.

The row: the link's MB/s, goal >= 100 ("about 3x what similar markets'
VPNs reach"), and printed beside it the ratio to vde_plug (goal >= 1.0)
and the endpoint's MB/s as a ratio to the link's (endpoint_vs_link, no
goal: what the buyer's switch costs).  The ends' counters (drops, the
switch's ports) are read when they end: pump_drops_after,
endpoint_counters_after.

Needs root (namespaces, TAP devices), iperf3 and vde_plug (Debian's
iperf3 and vde2; without vde_plug that column is skipped).

    /usr/bin/python3 -m bench.link [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "src", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

LINK_ID = 0xC0FFEE
SUBNETS = {"veth": "10.231.1", "link": "10.231.2", "vde": "10.231.3",
           "endpoint": "10.231.4"}
_TICK = os.sysconf("SC_CLK_TCK")


def _run(*argv: str, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
    if ns:
        argv = ("ip", "netns", "exec", ns) + argv
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _wait_link(name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(f"/sys/class/net/{name}"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"interface {name} did not appear")
        time.sleep(0.02)


def _into(name: str, ns: str, addr: str) -> None:
    _run("ip", "link", "set", name, "netns", ns)
    _run("ip", "link", "set", name, "mtu", "1500", "up", ns=ns)
    _run("ip", "addr", "add", f"{addr}/24", "dev", name, ns=ns)


def _end(role: str, dev: str, port: int, peer: int, keys) -> subprocess.Popen:
    """A link's end in a process of its own (this file's `pump` or `endpoint`),
    handed the keys on stdin; once it says ready its TAP `dev` is there."""
    p = subprocess.Popen(
        [sys.executable, __file__, *role.split(), dev, str(port), str(peer)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    p.stdin.write(json.dumps([keys.seller_to_buyer.hex(), keys.buyer_to_seller.hex()]))
    p.stdin.close()
    if p.stdout.readline().strip() != "ready":
        p.kill()
        p.wait()
        raise RuntimeError(f"{role} ({dev}) did not start")
    return p


class Net:
    """Namespaces A and B with the ways between them; the end processes."""

    def __init__(self, with_vde: bool):
        tag = os.getpid()
        self.a, self.b = f"cpsbA{tag}", f"cpsbB{tag}"
        self.procs: dict[str, subprocess.Popen] = {}
        for ns in (self.a, self.b):
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "set", "lo", "up", ns=ns)
        # veth
        _run("ip", "link", "add", "cpsva", "netns", self.a, "type", "veth",
             "peer", "name", "cpsvb", "netns", self.b)
        for ns, dev, host in ((self.a, "cpsva", 1), (self.b, "cpsvb", 2)):
            _run("ip", "link", "set", dev, "mtu", "1500", "up", ns=ns)
            _run("ip", "addr", "add", f"{SUBNETS['veth']}.{host}/24", "dev", dev, ns=ns)
        # the link: two pumps on loopback ports of the host
        from cpushare.vpn.datagram import LinkKeys
        keys = LinkKeys.generate(LINK_ID)
        ports = _free_ports(6)
        for side, ns, dev, host, port, peer in (("seller", self.a, "cpsla", 1, ports[0], ports[1]),
                                                ("buyer", self.b, "cpslb", 2, ports[1], ports[0])):
            self.procs[f"link_{side}"] = _end(f"pump {side}", dev, port, peer, keys)
            _into(dev, ns, f"{SUBNETS['link']}.{host}")
        # the buyer's endpoint (pump, switch, TAP) against the same seller's pump
        keys = LinkKeys.generate(LINK_ID)  # a link of its own, its own keys
        for side, role, ns, dev, host, port, peer in (
                ("seller", "pump seller", self.a, "cpsea", 1, ports[4], ports[5]),
                ("buyer", "endpoint", self.b, "cpseb", 2, ports[5], ports[4])):
            self.procs[f"endpoint_{side}"] = _end(role, dev, port, peer, keys)
            _into(dev, ns, f"{SUBNETS['endpoint']}.{host}")
        # vde_plug, the same plumbing without encryption
        if with_vde:
            for side, ns, dev, host, port, peer in (("a", self.a, "cpsda", 1, ports[2], ports[3]),
                                                    ("b", self.b, "cpsdb", 2, ports[3], ports[2])):
                p = subprocess.Popen(["vde_plug", f"tap://{dev}", f"udp://{port}->127.0.0.1:{peer}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                self.procs[f"vde_{side}"] = p
                _wait_link(dev)
                _into(dev, ns, f"{SUBNETS['vde']}.{host}")

    def ends(self, way: str) -> list[subprocess.Popen]:
        prefix = {"link": "link_", "endpoint": "endpoint_", "vde": "vde_"}.get(way)
        return [p for k, p in self.procs.items() if prefix and k.startswith(prefix)]

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _iperf(net: Net, way: str, seconds: float, port: int) -> dict:
    server = subprocess.Popen(["ip", "netns", "exec", net.b, "iperf3", "-s", "-1", "-p", str(port),
                               "-B", f"{SUBNETS[way]}.2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        ends = net.ends(way)
        cpu0 = [_cpu_seconds(p.pid) for p in ends]
        out = _run("iperf3", "-c", f"{SUBNETS[way]}.2", "-p", str(port), "-t", str(seconds), "-J",
                   ns=net.a, timeout=seconds + 30).stdout
        cpu = [_cpu_seconds(p.pid) - c for p, c in zip(ends, cpu0)]
    finally:
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    r = json.loads(out)["end"]
    got = r["sum_received"]
    gb = got["bytes"] / 1e9
    return {"mb_per_s": got["bytes"] / got["seconds"] / 1e6,
            "bytes": got["bytes"], "retransmits": r["sum_sent"].get("retransmits"),
            "cpu_s_per_gb": [c / gb for c in cpu] if cpu else None,
            "iperf_cpu_percent": {k: round(v, 1) for k, v in r["cpu_utilization_percent"].items()
                                  if k in ("host_total", "remote_total")}}


_ECHO = ("import socket, sys\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         "s.bind((sys.argv[1], 7))\n"
         "print('up', flush=True)\n"
         "while True:\n"
         "    d, a = s.recvfrom(64)\n"
         "    if d == b'q':\n"
         "        break\n"
         "    s.sendto(d, a)\n")

_PING = ("import socket, sys, time, json\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
         "s.settimeout(2)\n"
         "peer, n = (sys.argv[1], 7), int(sys.argv[2])\n"
         "for _ in range(20):\n"
         "    s.sendto(b'x', peer); s.recv(64)\n"
         "rtt = []\n"
         "for _ in range(n):\n"
         "    t = time.perf_counter(); s.sendto(b'x', peer); s.recv(64)\n"
         "    rtt.append((time.perf_counter() - t) * 1e6)\n"
         "s.sendto(b'q', peer)\n"
         "print(json.dumps(rtt))\n")


def _ping(net: Net, way: str, n: int) -> dict:
    addr = f"{SUBNETS[way]}.2"
    echo = subprocess.Popen(["ip", "netns", "exec", net.b, sys.executable, "-c", _ECHO, addr],
                            stdout=subprocess.PIPE, text=True)
    try:
        if echo.stdout.readline().strip() != "up":
            raise RuntimeError("the echo server did not start")
        rtt = sorted(json.loads(_run(sys.executable, "-c", _PING, addr, str(n), ns=net.a,
                                     timeout=60).stdout))
    finally:
        try:
            echo.wait(5)
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait()
    return {"median_us": statistics.median(rtt), "p99_us": rtt[int(len(rtt) * 0.99) - 1]}


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    for tool in ("ip", "iperf3"):
        if not shutil.which(tool):
            return f"{tool} is not installed (make deps)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


def run(quick: bool = False) -> dict:
    why = _missing()
    if why:
        raise RuntimeError(why)
    with_vde = shutil.which("vde_plug") is not None
    seconds, rounds, pings = (2, 1, 300) if quick else (5, 3, 2000)
    ways = ["veth", "link", "endpoint"] + (["vde"] if with_vde else [])
    net = Net(with_vde)
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    try:
        port = 15201
        for _ in range(rounds):
            for w in ways:
                runs[w].append(_iperf(net, w, seconds, port))
                port += 1
        rtt = {w: _ping(net, w, pings) for w in ways}
        drops, ep_counters = _counters(net, "link"), _counters(net, "endpoint")
    finally:
        net.close()
    best = {w: max(rs, key=lambda r: r["mb_per_s"]) for w, rs in runs.items()}
    link = best["link"]["mb_per_s"]
    out = {"measured": link, "unit": "MB/s", "seconds": seconds, "rounds": rounds,
           "link_mb_per_s": link, "veth_mb_per_s": best["veth"]["mb_per_s"],
           "link_vs_veth": link / best["veth"]["mb_per_s"],
           "link_cpu_s_per_gb": best["link"]["cpu_s_per_gb"],
           "rtt_us": {w: round(r["median_us"], 1) for w, r in rtt.items()},
           "rtt_p99_us": {w: round(r["p99_us"], 1) for w, r in rtt.items()},
           "link_added_rtt_us": rtt["link"]["median_us"] - rtt["veth"]["median_us"],
           "endpoint_mb_per_s": best["endpoint"]["mb_per_s"],
           "endpoint_vs_link": best["endpoint"]["mb_per_s"] / link,
           "endpoint_cpu_s_per_gb": best["endpoint"]["cpu_s_per_gb"],
           "endpoint_added_rtt_us": rtt["endpoint"]["median_us"] - rtt["veth"]["median_us"],
           "all_rounds": runs, "best": best, "pump_drops_after": drops,
           "endpoint_counters_after": ep_counters}
    if with_vde:
        out.update(vde_mb_per_s=best["vde"]["mb_per_s"],
                   link_vs_vde=link / best["vde"]["mb_per_s"],
                   vde_cpu_s_per_gb=best["vde"]["cpu_s_per_gb"],
                   vde_added_rtt_us=rtt["vde"]["median_us"] - rtt["veth"]["median_us"])
    return out


def _counters(net: Net, way: str) -> dict:
    """Each end of `way` prints its counters when it ends: a SIGTERM now, read them."""
    out = {}
    for side in ("seller", "buyer"):
        p = net.procs[f"{way}_{side}"]
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(5)
            out[side] = json.loads(p.stdout.read())
        except (subprocess.TimeoutExpired, ValueError):
            out[side] = None
    return out


def _endpoint(dev: str, port: int, peer: int) -> None:
    """The buyer's end as the product runs it: cpushare.vpn.endpoint.Endpoint
    over a UDP socket and a TAP, one node's link added as the agent adds it."""
    from cpushare.vpn.datagram import LinkKeys, open_tap, udp_socket
    from cpushare.vpn.endpoint import Endpoint
    s2b, b2s = json.loads(sys.stdin.read())
    keys = LinkKeys(LINK_ID, bytes.fromhex(s2b), bytes.fromhex(b2s))
    # SIGTERM is waited for, not handled: blocked before the threads start
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    fd, _ = open_tap(dev)
    ep = Endpoint(udp_socket(("127.0.0.1", port)), fd).start()
    ep.add(LINK_ID, "node0", keys.buyer_to_seller, keys.seller_to_buyer, start=0,
           limit=2**32, peer=("127.0.0.1", peer))
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM})
    st = ep.stats()
    ep.stop()
    print(json.dumps(st, default=str), flush=True)


def _pump(side: str, dev: str, port: int, peer: int) -> None:
    """One end of the link, in a process of its own: a TAP, a UDP socket, a Pump."""
    from cpushare.vpn.datagram import LinkKeys, Pump, open_tap, udp_socket
    s2b, b2s = json.loads(sys.stdin.read())
    keys = LinkKeys(LINK_ID, bytes.fromhex(s2b), bytes.fromhex(b2s))
    ends = keys.seller() if side == "seller" else keys.buyer()
    fd, _ = open_tap(dev)
    udp = udp_socket(("127.0.0.1", port))
    pump = Pump(udp)
    pump.add(LINK_ID, fd, ends.sealer, ends.opener, ("127.0.0.1", peer))
    signal.signal(signal.SIGTERM, lambda *_: pump.stop())
    print("ready", flush=True)
    pump.run()
    st = pump.stats()
    link = st["links"][LINK_ID]
    print(json.dumps({k: v for k, v in {**st, **link}.items()
                      if k not in ("links", "peer") and isinstance(v, (int, float))}), flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["pump"]:
        _pump(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    if argv[:1] == ["endpoint"]:
        _endpoint(argv[1], int(argv[2]), int(argv[3]))
        return 0
    r = run(quick="--quick" in argv)
    print(json.dumps({k: v for k, v in r.items() if k not in ("all_rounds",)}, indent=2,
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
