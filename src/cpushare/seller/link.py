"""The seller's end of a lease's link (docs/vpn.md): the guest's NIC to the
buyer's endpoint, encrypted, over UDP.

The market hands the lease's keys in its `task` (link_id, link_peer,
link_tx, link_rx).  qemu's virtio NIC sends each frame as one datagram to
the run's unix socket (`QemuRun.nic`); a `cpushare._link.Pump`, in C with
the GIL released, seals each with the lease's key and sends it to the
buyer, and opens what the buyer sends back.  The seller sends first (a
keepalive at once, then every KEEPALIVE_SECONDS), so a seller behind NAT
works; the guest reaches nothing but the buyer's network: its NIC has no
other end.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

log = logging.getLogger("cpushare.seller")


class LinkError(ValueError):
    """A task's link fields that cannot be used; the message says which."""


@dataclass(frozen=True)
class LinkSpec:
    link_id: int
    peer: tuple[str, int]  # the buyer's endpoint, resolved
    tx: bytes  # the key this end seals with
    rx: bytes  # ... and opens with

    @property
    def mac(self) -> str:
        """The guest's MAC address: locally administered, from the link id."""
        b = self.link_id.to_bytes(4, "big")
        return "52:54:" + ":".join(f"{x:02x}" for x in b)


def spec_of(msg) -> LinkSpec | None:
    """The link a `task` asks for (None: none); LinkError if it is unusable."""
    if msg.get("link_id") is None:
        return None
    from ..order import split_hostport
    try:
        tx, rx = bytes.fromhex(msg.get("link_tx") or ""), bytes.fromhex(msg.get("link_rx") or "")
    except ValueError:
        raise LinkError("link: the keys are not hex") from None
    if len(tx) != 32 or len(rx) != 32 or tx == rx:
        raise LinkError("link: two different 32-byte keys are needed")
    try:
        host, port = split_hostport(msg.get("link_peer") or "", default_port=0)
    except ValueError as e:
        raise LinkError(f"link_peer: {e}") from None
    if not 1 <= port <= 65535:
        raise LinkError(f"link_peer {msg.get('link_peer')!r:.80}: no port")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except (socket.gaierror, IndexError) as e:
        raise LinkError(f"link_peer {host}: {e}") from None
    return LinkSpec(msg["link_id"], info[4][:2], tx, rx)


class Agent:
    """The pump between one guest's NIC and the buyer, in a thread."""

    def __init__(self, spec: LinkSpec, nic: socket.socket):
        from ..vpn.datagram import (BUYER_TO_SELLER, KEEPALIVE_SECONDS, SELLER_TO_BUYER,
                                    Opener, Pump, PumpThread, Sealer, udp_socket)
        self.spec = spec
        family_v6 = ":" in spec.peer[0]
        self.udp = udp_socket(("::", 0) if family_v6 else ("0.0.0.0", 0))
        self.pump = Pump(self.udp, keepalive=KEEPALIVE_SECONDS)
        self.pump.add(spec.link_id, nic, Sealer(spec.tx, SELLER_TO_BUYER),
                      Opener(spec.rx, BUYER_TO_SELLER), peer=spec.peer)
        self.thread = PumpThread(self.pump, name=f"link-{spec.link_id}")

    def start(self) -> "Agent":
        self.thread.start()
        log.info("link %d: the guest's NIC goes to %s:%d, encrypted", self.spec.link_id,
                 *self.spec.peer)
        return self

    def stats(self) -> dict:
        return self.pump.stats()["links"].get(self.spec.link_id, {})

    def stop(self) -> None:
        try:
            self.thread.stop()
        except Exception as e:  # (its UDP socket failed: the run is ending anyway)
            log.warning("link %d: %s", self.spec.link_id, e)
        st = self.stats()
        log.info("link %d closed: %s frames out, %s in, %s dropped", self.spec.link_id,
                 st.get("frames_out"), st.get("frames_in"),
                 sum(st.get(k, 0) or 0 for k in ("forged", "replayed", "too_old", "malformed")))
        self.udp.close()
