"""The buyer's link endpoint (docs/vpn.md): one UDP port for every node of a
cluster, the nodes' links and the buyer's TAP joined by a learning switch.

It runs as a process of its own, started by the cluster's agent
(clusternet), which holds what must outlive it: the UDP socket, the TAP
device, and the links' keys.  The agent hands the two descriptors over at
start and each link on the control socket, so a new endpoint started after
a crash serves the same port and the same TAP, and the sellers' agents,
which keep sending, are heard again; the guests never notice more than a
few lost frames.

The control socket is a SOCK_SEQPACKET socketpair: one JSON object per
message, each answered by one.

    {"op": "add", "link_id": N, "node": "node0", "tx": HEX, "rx": HEX,
     "start": C, "limit": L, "peer": [HOST, PORT] | null}
    {"op": "grant", "link_id": N, "limit": L}      raise the seal limit
    {"op": "remove", "link_id": N}
    {"op": "stats"}                                 the pump's and switch's counters

A sealer may seal only up to the limit the agent granted (start + a step,
raised step by step as it is used), so a new endpoint that starts each
link past its last grant can never reuse a nonce.  The endpoint ends when
the control socket closes (the agent is gone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading

from .datagram import BUYER_TO_SELLER, SELLER_TO_BUYER, Opener, Pump, PumpThread, Sealer
from .switch import Switch, node_port

log = logging.getLogger("cpushare.endpoint")

MAX_MESSAGE = 1 << 20  # bytes of one control message (a stats answer of 4096 nodes fits)
TAP_PORT = "buyer"  # the switch port of the buyer's TAP


class Endpoint:
    """The pump and the switch over the agent's UDP socket and TAP."""

    def __init__(self, udp: socket.socket, tap_fd: int | None):
        self.udp = udp
        self.pump = Pump(udp, follow=True)
        self.switch = Switch()
        if tap_fd is not None:
            self.switch.add(TAP_PORT, tap_fd)
        # link id -> (node, the switch's end, the pump's end, the sealer)
        self.nodes: dict[int, tuple[str, socket.socket, socket.socket, Sealer]] = {}
        self._pump = PumpThread(self.pump, name="endpoint-pump")
        self._switch = threading.Thread(target=self.switch.run, name="endpoint-switch",
                                        daemon=True)

    def start(self) -> "Endpoint":
        self._pump.start()
        self._switch.start()
        return self

    def stop(self) -> None:
        self.switch.stop()
        self._switch.join(5)
        self._pump.stop()

    def add(self, link_id: int, node: str, tx: bytes, rx: bytes, start: int, limit: int,
            peer: tuple[str, int] | None) -> None:
        if link_id in self.nodes:
            raise ValueError(f"link {link_id} is already on this endpoint")
        sealer = Sealer(tx, BUYER_TO_SELLER, limit, start)
        theirs, mine = node_port()
        try:
            self.pump.add(link_id, mine, sealer, Opener(rx, SELLER_TO_BUYER), peer=peer)
        except BaseException:
            theirs.close()
            mine.close()
            raise
        self.switch.add(node, theirs.fileno())
        self.nodes[link_id] = (node, theirs, mine, sealer)

    def grant(self, link_id: int, limit: int) -> None:
        self.nodes[link_id][3].grant(limit)

    def remove(self, link_id: int) -> None:
        node, theirs, mine, _ = self.nodes.pop(link_id)
        self.switch.remove(theirs.fileno())
        self.pump.remove(link_id)
        theirs.close()
        mine.close()

    def stats(self) -> dict:
        p = self.pump.stats()
        sw = self.switch.stats()
        links = {}
        for link_id, (node, *_) in self.nodes.items():
            d = dict(p["links"].get(link_id, {}))
            d["switch"] = sw["ports"].get(node, {})
            links[str(link_id)] = d
        return {"malformed": p["malformed"], "unknown_link": p["unknown_link"],
                "udp_errors": p["udp_errors"], "runts": sw["runts"], "macs": sw["macs"],
                "tap": sw["ports"].get(TAP_PORT), "links": links}


def _key(value, name: str) -> bytes:
    try:
        key = bytes.fromhex(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is not hex") from None
    return key


def _u64(req: dict, name: str) -> int:
    v = req.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64:
        raise ValueError(f"{name} is not an unsigned 64-bit integer")
    return v


def handle(ep: Endpoint, req) -> dict:
    """One control request's answer."""
    if not isinstance(req, dict):
        return {"error": "a request is a JSON object"}
    op = req.get("op")
    try:
        if op == "stats":
            return {"ok": True, "stats": ep.stats()}
        link_id = _u64(req, "link_id")
        if op == "add":
            peer = req.get("peer")
            if peer is not None:
                if not (isinstance(peer, list) and len(peer) == 2 and isinstance(peer[0], str)
                        and isinstance(peer[1], int)):
                    raise ValueError("peer is [HOST, PORT] or null")
                peer = (peer[0], peer[1])
            node = req.get("node")
            if not isinstance(node, str) or not node or len(node) > 64 or node == TAP_PORT:
                raise ValueError("node is a name of 1 to 64 characters")
            ep.add(link_id, node, _key(req.get("tx"), "tx"), _key(req.get("rx"), "rx"),
                   _u64(req, "start"), _u64(req, "limit"), peer)
        elif op == "grant":
            ep.grant(link_id, _u64(req, "limit"))
        elif op == "remove":
            ep.remove(link_id)
        else:
            return {"error": f"unknown op {str(op)[:40]!r}"}
    except KeyError:
        return {"error": f"no link {req.get('link_id')} on this endpoint"}
    except (ValueError, OSError) as e:
        return {"error": str(e)}
    return {"ok": True}


def serve(ep: Endpoint, control: socket.socket) -> None:
    """Answers the agent until it closes the control socket."""
    while True:
        try:
            data = control.recv(MAX_MESSAGE)
        except InterruptedError:
            continue
        if not data:
            return
        try:
            req = json.loads(data)
        except (ValueError, RecursionError):
            answer = {"error": "a request is one JSON object"}
        else:
            answer = handle(ep, req)
        control.send(json.dumps(answer).encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpushare.vpn.endpoint",
                                description="The buyer's link endpoint of one cluster "
                                            "(started by cpushare cluster up).")
    p.add_argument("--udp-fd", type=int, required=True)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--tap-fd", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s endpoint %(levelname)s: %(message)s")
    udp = socket.socket(fileno=args.udp_fd)
    control = socket.socket(fileno=args.control_fd)
    for fd in (args.udp_fd, args.control_fd, args.tap_fd):
        if fd is not None:
            os.set_inheritable(fd, False)
    ep = Endpoint(udp, args.tap_fd).start()
    log.info("serving %s:%d", *udp.getsockname()[:2])
    try:
        serve(ep, control)
    except KeyboardInterrupt:
        pass
    finally:
        ep.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
