"""The buyer's Ethernet switch: the nodes' links and the buyer's own TAP as
ports of one learning switch (docs/vpn.md).

Each port is a local datagram end that carries one Ethernet frame per
datagram or read: a node's port is one end of a unix datagram socketpair
whose other end is that node's link in the buyer's Pump (the C code that
seals and opens its datagrams); the buyer's port is its TAP device.  The
switch learns which port each source MAC address is behind, sends a frame
to its destination's port when it knows it, and floods it (to every port
but the one it came from) when it does not, or when it is a broadcast or
multicast.  A port that goes (a lost node) is forgotten with every address
learned behind it.  Frames shorter than an Ethernet header are dropped and
counted.  The table is bounded (MAX_MACS): past it the oldest entries go.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

MAX_MACS = 4096  # learned addresses kept (a hostile node cannot grow it past this)
ETH_HEADER = 14
MAX_FRAME = 1522


@dataclass
class Port:
    name: str
    fd: int
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0  # frames it could not take (its queue full)
    last_heard: float | None = None
    macs: set = field(default_factory=set)


class Switch:
    """A learning switch over file descriptors, run by one thread (run())."""

    def __init__(self) -> None:
        self.ports: dict[int, Port] = {}  # fd -> port
        self.table: OrderedDict[bytes, int] = OrderedDict()  # MAC -> fd
        self.runts = 0  # frames too short to switch
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False

    # --- ports (any thread) -------------------------------------------------

    def add(self, name: str, fd: int) -> Port:
        os.set_blocking(fd, False)
        with self._lock:
            port = self.ports[fd] = Port(name, fd)
        self._wake()
        return port

    def remove(self, fd: int) -> Port | None:
        with self._lock:
            port = self.ports.pop(fd, None)
            if port is not None:
                for mac in port.macs:
                    if self.table.get(mac) == fd:
                        del self.table[mac]
        self._wake()
        return port

    def stats(self) -> dict:
        with self._lock:
            return {"runts": self.runts, "macs": len(self.table),
                    "ports": {p.name: dict(frames_in=p.frames_in, frames_out=p.frames_out,
                                           bytes_in=p.bytes_in, bytes_out=p.bytes_out,
                                           dropped=p.dropped, last_heard=p.last_heard,
                                           macs=sorted(m.hex(":") for m in p.macs))
                              for p in self.ports.values()}}

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # --- switching (the switch's thread) ----------------------------------------

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        registered: set[int] = set()
        try:
            while not self._stopping:
                with self._lock:
                    fds = set(self.ports)
                for fd in registered - fds:
                    poller.unregister(fd)
                for fd in fds - registered:
                    poller.register(fd, select.POLLIN)
                registered = fds
                for fd, ev in poller.poll(1000):
                    if fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        self.remove(fd)
                        continue
                    self._drain(fd)
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _drain(self, fd: int) -> None:
        for _ in range(64):  # a batch, then the other ports get their turn
            try:
                frame = os.read(fd, MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:
                self.remove(fd)
                return
            if not frame:
                return
            self.forward(fd, frame)

    def forward(self, src: int, frame: bytes) -> None:
        """Switch one frame that came in on port `src`."""
        with self._lock:
            port = self.ports.get(src)
            if port is None:
                return
            port.frames_in += 1
            port.bytes_in += len(frame)
            port.last_heard = time.time()
            if len(frame) < ETH_HEADER:
                self.runts += 1
                return
            dst, mac = frame[:6], frame[6:12]
            if not mac[0] & 1:  # learn unicast sources only
                old = self.table.pop(mac, None)
                if old is not None and old != src and old in self.ports:
                    self.ports[old].macs.discard(mac)
                self.table[mac] = src
                port.macs.add(mac)
                while len(self.table) > MAX_MACS:
                    gone, where = self.table.popitem(last=False)
                    if where in self.ports:
                        self.ports[where].macs.discard(gone)
            out = self.table.get(dst) if not dst[0] & 1 else None
            targets = [out] if out is not None and out != src else \
                [fd for fd in self.ports if fd != src] if out is None else []
            for fd in targets:
                p = self.ports[fd]
                try:
                    os.write(fd, frame)
                    p.frames_out += 1
                    p.bytes_out += len(frame)
                except BlockingIOError:
                    p.dropped += 1  # (a full queue: Ethernet drops, TCP sends again)
                except OSError:
                    p.dropped += 1


def node_port() -> tuple[socket.socket, socket.socket]:
    """A node's two local ends: (the switch's, the Pump's), a unix datagram
    socketpair (one frame a datagram, as the Pump expects)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return a, b
