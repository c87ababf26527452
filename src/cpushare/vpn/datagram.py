"""The link's datagrams (docs/vpn.md): the public face of cpushare._link.

A datagram is a 14-byte header (version 1, type, link id, counter), then
the AES-256-GCM ciphertext of its payload (one Ethernet frame, or nothing
for a keepalive) and the 16-byte tag; the header is the associated data.
Each direction of a lease has its own random key and its own 4-byte nonce
prefix (the direction), the counter makes the rest of the nonce, starts at
1 and never repeats under a key.

    keys = LinkKeys.generate(link_id)        # the market, once per lease
    seller = keys.seller()                   # Ends(sealer, opener)
    buyer = keys.buyer()
    d = seller.sealer.seal(TYPE_DATA, keys.link_id, frame)
    buyer.opener.open(d)                     # Opened(...), or None

The per-frame path is a Pump (C, batches, the GIL released) run by a
PumpThread; Sealer.seal and Opener.open are the same code one datagram
at a time.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass
from typing import NamedTuple

from cpushare._link import (
    HEADER_SIZE,
    KEY_SIZE,
    MAX_BATCH,
    MAX_DATAGRAM,
    MAX_FRAME,
    MIN_FRAME,
    OVERHEAD,
    TAG_SIZE,
    TYPE_DATA,
    TYPE_KEEPALIVE,
    VERSION,
    WINDOW,
    KeyExhausted,
    Opened,
    Opener,
    Pump,
    Sealer,
)

__all__ = [
    "BUYER_TO_SELLER", "GUEST_MTU", "HEADER_SIZE", "KEEPALIVE_SECONDS", "KEY_SIZE", "MAX_BATCH",
    "MAX_DATAGRAM", "MAX_FRAME", "MIN_FRAME", "OVERHEAD", "REKEY_AFTER", "SELLER_TO_BUYER",
    "TAG_SIZE", "TYPE_DATA", "TYPE_KEEPALIVE", "UDP_BUFFER", "VERSION", "WINDOW", "Ends",
    "Header", "KeyExhausted", "LinkKeys", "Opened", "Opener", "Pump", "PumpThread", "Sealer",
    "TapError", "open_tap", "parse_header", "udp_socket",
]

# The nonce prefix of each direction: even if both directions were handed
# the same key by mistake, their nonces could not meet.
SELLER_TO_BUYER = 0
BUYER_TO_SELLER = 1

# Datagrams one key may seal: 2**32 full frames are about 6.5 TB (18 hours
# at 100 MB/s), and keep AES-GCM's distinguishing bound below 2**-49.
REKEY_AFTER = 2**32

# The guest's MTU the buyer's DHCP should give (option 26): a 1500-byte
# path carries IPv6 (40) + UDP (8) + the link (30) + Ethernet (14) + a
# VLAN tag (4) + 1400 unfragmented; see docs/vpn.md.
GUEST_MTU = 1400

# A seller's keepalive interval: holds a NAT's UDP mapping (WireGuard's 25 s).
KEEPALIVE_SECONDS = 25.0

# Socket buffers asked for a link's UDP socket (the kernel caps them at
# net.core.rmem_max / wmem_max): a burst of a TCP window must not overflow.
UDP_BUFFER = 4 << 20


class Header(NamedTuple):
    version: int
    type: int
    link_id: int
    counter: int


_HEADER = struct.Struct("!BBIQ")


def parse_header(datagram: bytes) -> Header | None:
    """The header of a datagram, unauthenticated (for logs and tests), or None."""
    if len(datagram) < OVERHEAD:
        return None
    return Header(*_HEADER.unpack_from(datagram))


class Ends(NamedTuple):
    """One end of a link: the sealer of what it sends, the opener of what it receives."""
    sealer: Sealer
    opener: Opener


@dataclass(frozen=True)
class LinkKeys:
    """A lease's link: its id (chosen by the market) and a key per direction.

    The keys are random, made for this lease alone (generate); nothing is
    derived from anything used before."""
    link_id: int
    seller_to_buyer: bytes
    buyer_to_seller: bytes

    def __post_init__(self):
        if not isinstance(self.link_id, int) or not 0 <= self.link_id <= 0xFFFFFFFF:
            raise ValueError(f"link id {self.link_id!r} is not a 32-bit unsigned integer")
        for name in ("seller_to_buyer", "buyer_to_seller"):
            key = getattr(self, name)
            if not isinstance(key, bytes) or len(key) != KEY_SIZE:
                raise ValueError(f"{name}: a key is {KEY_SIZE} bytes")
        if self.seller_to_buyer == self.buyer_to_seller:
            raise ValueError("the two directions of a link need two different keys")

    @classmethod
    def generate(cls, link_id: int) -> LinkKeys:
        return cls(link_id, secrets.token_bytes(KEY_SIZE), secrets.token_bytes(KEY_SIZE))

    def __repr__(self) -> str:
        return f"LinkKeys(link_id={self.link_id}, keys hidden)"

    def seller(self, limit: int = REKEY_AFTER) -> Ends:
        return Ends(Sealer(self.seller_to_buyer, SELLER_TO_BUYER, limit),
                    Opener(self.buyer_to_seller, BUYER_TO_SELLER))

    def buyer(self, limit: int = REKEY_AFTER) -> Ends:
        return Ends(Sealer(self.buyer_to_seller, BUYER_TO_SELLER, limit),
                    Opener(self.seller_to_buyer, SELLER_TO_BUYER))


def udp_socket(bind: tuple[str, int] = ("0.0.0.0", 0), buffer: int = UDP_BUFFER) -> socket.socket:
    """A UDP socket for a Pump: bound, with large buffers, close-on-exec."""
    family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, buffer)
        s.bind(bind)
    except BaseException:
        s.close()
        raise
    return s


class TapError(OSError):
    """A TAP device could not be made; says why (root or CAP_NET_ADMIN, /dev/net/tun)."""


_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def open_tap(name: str = "") -> tuple[int, str]:
    """A TAP device's descriptor (frames without a packet header, close-on-exec)
    and its name ("" lets the kernel choose).  Needs CAP_NET_ADMIN."""
    if len(name.encode()) >= 16:
        raise ValueError(f"interface name {name!r} is longer than 15 bytes")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(e.errno, f"open(/dev/net/tun): {e.strerror}") from None
    try:
        ifr = fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        hint = " (needs root or CAP_NET_ADMIN)" if e.errno == 1 else ""
        raise TapError(e.errno, f"ioctl(TUNSETIFF, {name or 'tap%d'}): {e.strerror}{hint}") from None
    return fd, ifr[:16].rstrip(b"\0").decode()


class PumpThread:
    """Runs a Pump in a thread of its own until stop() (or the with block's end).

    An error of the pump (its UDP socket failed) is raised again by stop()."""

    def __init__(self, pump: Pump, name: str = "link-pump"):
        self.pump = pump
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self):
        try:
            self.pump.run()
        except BaseException as e:  # handed to stop()
            self.error = e

    def start(self) -> PumpThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.pump.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name}: the pump did not stop in {timeout} s")
        if self.error is not None:
            raise self.error

    def __enter__(self) -> PumpThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
