"""The buyer's side of a cluster's network (``cpushare cluster up --listen``).

The agent holds what must outlive the endpoint process (vpn/endpoint.py):
the UDP socket the sellers send to, the TAP device that puts the buyer's
host on the cluster's subnet, and each node's link keys.  It starts the
endpoint with the two descriptors, adds each node's link as its keys come
from the market, grants each link's sealer its counters a step at a time,
starts dnsmasq (DHCP) and nfs-ganesha (--nfs) on the TAP, and once a
second reads the counters, frees the switch port of a node that ended, and
starts the endpoint again if it died, with every link and each past the
counters its last one was granted (a nonce is never used twice).

Needs root or CAP_NET_ADMIN for the TAP (and root for dnsmasq and
ganesha's ports); without, `open` says so and nothing is leased.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..vpn.datagram import GUEST_MTU, REKEY_AFTER, TapError, open_tap, udp_socket
from ..vpn.services import Dnsmasq, Ganesha, ServiceError, Subnet, check_free, configure_tap

log = logging.getLogger("cpushare.cluster")

GRANT = 1 << 22  # datagrams a link's sealer may seal ahead of the agent's grant
TAP_NAME = "cpushare%d"  # the kernel picks the number
CONTROL_TIMEOUT = 5.0
DROP_COUNTERS = ("malformed", "forged", "replayed", "too_old")


class NetError(Exception):
    """The cluster's network could not be set up; the message says why."""


@dataclass
class Link:
    node: str
    link_id: int
    tx: bytes
    rx: bytes
    granted: int  # the highest counter any endpoint was allowed to seal
    peer: tuple[str, int] | None = None
    ended: bool = False
    base: dict | None = None  # counters of the endpoints that came before


def node_mac(link_id: int) -> str:
    """A node's MAC address: the seller's agent makes it from the link id."""
    return "52:54:" + ":".join(f"{b:02x}" for b in link_id.to_bytes(4, "big"))


class ClusterNet:
    def __init__(self, workdir: Path, listen: tuple[str, int], subnet: Subnet,
                 dhcp: bool = True, nfs: Path | None = None):
        self.dir = workdir
        self.listen = listen
        self.subnet = subnet
        self.dhcp = dhcp
        self.nfs = nfs
        self.udp: socket.socket | None = None
        self.tap_fd: int | None = None
        self.tap: str | None = None
        self.links: dict[int, Link] = {}  # link id -> the link
        self.by_node: dict[str, int] = {}  # node -> its current link id
        self.proc: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.restarts = 0
        self.dnsmasq: Dnsmasq | None = None
        self.ganesha: Ganesha | None = None
        self.last: dict = {}  # the endpoint's latest counters
        self.events: list[str] = []  # what to tell the buyer (taken by the agent)

    # --- set up, tear down ----------------------------------------------------------

    def open(self) -> None:
        """The TAP, the UDP port, the endpoint, DHCP and NFS; NetError if any fails
        (what was set up is taken down)."""
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        try:
            check_free(self.subnet)
            self.tap_fd, self.tap = open_tap(TAP_NAME)
        except TapError as e:
            raise NetError(f"the buyer's end of the cluster's network is a TAP device: "
                           f"{e.strerror}") from None
        except ServiceError as e:
            raise NetError(str(e)) from None
        try:
            configure_tap(self.tap, self.subnet, GUEST_MTU)
        except ServiceError as e:
            raise NetError(f"{self.tap}: {e}") from None
        try:
            self.udp = udp_socket(self.listen)
        except OSError as e:
            raise NetError(f"--listen {self.listen[0]}:{self.listen[1]}: cannot bind the UDP "
                           f"port: {e.strerror}") from None
        self._start_endpoint()
        try:
            if self.dhcp:
                self.dnsmasq = Dnsmasq(self.tap, self.subnet, str(self.dir), mtu=GUEST_MTU)
            if self.nfs is not None:
                self.ganesha = Ganesha(str(self.subnet.address), str(self.nfs), str(self.dir),
                                       clients=str(self.subnet))
        except ServiceError as e:
            raise NetError(str(e)) from None

    def close(self) -> None:
        for server in (self.ganesha, self.dnsmasq):
            if server is not None:
                server.stop()
        self._stop_endpoint()
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        if self.tap_fd is not None:
            os.close(self.tap_fd)  # (the TAP goes with its last descriptor)
            self.tap_fd = None

    # --- the endpoint process ---------------------------------------------------------

    def _start_endpoint(self) -> None:
        import cpushare
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "cpushare.vpn.endpoint", "--udp-fd", str(self.udp.fileno()),
                "--control-fd", str(theirs.fileno()), "--tap-fd", str(self.tap_fd)]
        env = dict(os.environ)
        root = str(Path(cpushare.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            with open(self.dir / "endpoint.log", "ab") as logf:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                    pass_fds=(self.udp.fileno(), theirs.fileno(), self.tap_fd))
        except OSError as e:
            ours.close()
            raise NetError(f"cannot start the link endpoint: {e.strerror}") from None
        finally:
            theirs.close()
        ours.settimeout(CONTROL_TIMEOUT)
        self.control = ours
        for link in self.links.values():
            if not link.ended:
                self._add(link)

    def _stop_endpoint(self) -> None:
        if self.control is not None:
            self.control.close()  # (it ends when its control socket closes)
            self.control = None
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _request(self, **req) -> dict:
        try:
            self.control.send(json.dumps(req).encode())
            answer = json.loads(self.control.recv(1 << 20) or b"null")
        except (OSError, ValueError, AttributeError) as e:
            return {"error": f"the endpoint does not answer: {e}"}
        if not isinstance(answer, dict):
            return {"error": "the endpoint closed its control socket"}
        return answer

    def _add(self, link: Link) -> None:
        start = link.granted  # every counter up to it may have been used
        link.granted = min(start + GRANT, REKEY_AFTER)
        answer = self._request(op="add", link_id=link.link_id, node=link.node,
                               tx=link.tx.hex(), rx=link.rx.hex(), start=start,
                               limit=link.granted, peer=list(link.peer) if link.peer else None)
        if "error" in answer:
            log.error("%s: link %d: %s", link.node, link.link_id, answer["error"])

    # --- the nodes ------------------------------------------------------------------

    def add_node(self, node: str, link_id: int, tx: bytes, rx: bytes) -> None:
        """A node's link keys came (a seller took it, or another took it over)."""
        old = self.by_node.get(node)
        if old is not None and old != link_id:
            self._end(self.links[old], "its lease moved to another seller")
        if link_id in self.links:
            return
        link = self.links[link_id] = Link(node, link_id, tx, rx, granted=0)
        self.by_node[node] = link_id
        self._add(link)

    def node_ended(self, node: str, why: str) -> None:
        link_id = self.by_node.get(node)
        if link_id is not None and not self.links[link_id].ended:
            self._end(self.links[link_id], why)

    def _end(self, link: Link, why: str) -> None:
        link.ended = True
        self._request(op="remove", link_id=link.link_id)
        self.events.append(f"{link.node}: left the network, its switch port freed ({why})")

    # --- once a second --------------------------------------------------------------

    def tick(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self._keep_counters()
            self.restarts += 1
            self.events.append(f"the link endpoint exited ({code}); started again, with "
                               f"{sum(not lk.ended for lk in self.links.values())} links")
            self._stop_endpoint()
            self._start_endpoint()
        answer = self._request(op="stats")
        if "stats" not in answer:
            return
        self.last = answer["stats"]
        for key, st in self.last.get("links", {}).items():
            link = self.links.get(int(key))
            if link is None or link.ended:
                continue
            if st.get("peer"):
                link.peer = tuple(st["peer"])
            sealed = st.get("sealed", 0)
            if link.granted - sealed < GRANT * 3 // 4 and link.granted < REKEY_AFTER:
                link.granted = min(sealed + GRANT, REKEY_AFTER)
                self._request(op="grant", link_id=link.link_id, limit=link.granted)

    def _keep_counters(self) -> None:
        """The counters of an endpoint that died, added to each link's base."""
        for key, st in self.last.get("links", {}).items():
            link = self.links.get(int(key))
            if link is not None:
                base = link.base or {}
                for k in ("frames_in", "frames_out", "bytes_in", "bytes_out") + DROP_COUNTERS:
                    base[k] = base.get(k, 0) + (st.get(k) or 0)
                link.base = base
        self.last = {}

    # --- what cluster status shows --------------------------------------------------

    def status(self) -> dict:
        leases = self.dnsmasq.leases() if self.dnsmasq else {}
        live = self.last.get("links", {})
        nodes = {}
        for link in self.links.values():
            st = live.get(str(link.link_id), {}) if not link.ended else {}
            base = link.base or {}
            mac = node_mac(link.link_id)
            heard = st.get("last_heard")  # (the pump's clock: CLOCK_MONOTONIC, as ours)
            d = {"link_id": link.link_id, "mac": mac, "ip": leases.get(mac),
                 "seller_address": f"{link.peer[0]}:{link.peer[1]}" if link.peer else None,
                 "last_heard": None if not heard else time.time() - (time.monotonic() - heard),
                 "on_switch": not link.ended}
            for k in ("frames_in", "frames_out", "bytes_in", "bytes_out") + DROP_COUNTERS:
                d[k] = base.get(k, 0) + (st.get(k) or 0)
            if not link.ended or link.link_id == self.by_node.get(link.node):
                nodes[link.node] = d
        dropped = {k: sum(n[k] for n in nodes.values()) for k in DROP_COUNTERS}
        dropped["unknown_link"] = self.last.get("unknown_link", 0)
        dropped["malformed"] += self.last.get("malformed", 0)
        dropped["runts"] = self.last.get("runts", 0)
        return {"listen": f"{self.listen[0]}:{self.listen[1]}", "tap": self.tap,
                "subnet": str(self.subnet), "address": str(self.subnet.address),
                "dhcp": "dnsmasq" if self.dnsmasq else "off (--no-dhcp)",
                "nfs": str(self.nfs) if self.nfs else None,
                "mount": self.ganesha.mount if self.ganesha else None,
                "endpoint_pid": self.proc.pid if self.proc else None,
                "endpoint_restarts": self.restarts, "dropped": dropped, "nodes": nodes,
                "updated": time.time()}


def network_lines(net: dict, now: float | None = None) -> list[str]:
    """`cluster status`'s lines of a cluster's network."""
    now = time.time() if now is None else now
    out = [f"  network {net['subnet']} on {net['tap']} (this host {net['address']}), "
           f"link endpoint udp {net['listen']}, DHCP {net['dhcp']}"]
    if net.get("mount"):
        out.append(f"  NFS export {net['nfs']}: on a node, {net['mount']}")
    rows = [("NODE", "MAC", "IP", "SELLER-ADDRESS", "BYTES-IN", "BYTES-OUT", "LAST-HEARD")]
    for name, n in sorted(net["nodes"].items()):
        heard = "-" if not n.get("last_heard") else f"{max(0, now - n['last_heard']):.0f} s ago"
        rows.append((name + ("" if n["on_switch"] else " (gone)"), n["mac"], n.get("ip") or "-",
                     n.get("seller_address") or "-", str(n["bytes_in"]), str(n["bytes_out"]),
                     heard))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    d = net["dropped"]
    out.append("  dropped: " + ", ".join(f"{k.replace('_', ' ')} {d[k]}" for k in
                                         ("forged", "replayed", "too_old", "malformed",
                                          "unknown_link", "runts"))
               + f"; endpoint restarts {net['endpoint_restarts']}")
    return out
