"""The market's connections: one peer each, on the one protocol.FrameWriter.

Frames that announce a stored state wait in the connection's outbox until
the group commit (Market._send_outboxes); a `task` goes out at once
(write_now).  `buffered` counts both, and the bytes the transport still
holds: it is what the connection's memory budget is charged with.
"""

from __future__ import annotations

import hashlib
import time

from ..protocol import FrameWriter


class Conn:
    """One peer.  Frames go to an outbox, written whole at the end of a flush
    or commit.  A frame is bytes, or a list of buffers (protocol.frame: the
    head and a big payload, written from where it lies, never copied)."""
    role = ""

    def __init__(self, market, reader, writer, peer: str):
        self.market = market
        self.reader = reader
        self.writer = writer
        self.out_frames = FrameWriter(writer, auto_flush=False)
        self.peer = peer
        self.out: list = []
        self.out_bytes = 0
        self.account_id = 0
        self.account = ""
        self.order_id = 0
        self.last_seen = time.monotonic()
        self.beat = -1  # its slot of the heartbeat wheel (listener._sweep)
        self.closed = False
        self.gone = False
        self.paused = False  # not read until the peer it feeds catches up
        self.fingerprint = ""
        self.instance = ""

    def write(self, frame: bytes | list) -> None:
        """Queue `frame` for the end of this flush or commit."""
        if self.closed:
            return
        if not self.out:
            self.market.dirty(self)
        if type(frame) is list:
            self.out.extend(frame)
            self.out_bytes += sum(len(b) for b in frame)
        else:
            self.out.append(frame)
            self.out_bytes += len(frame)

    def send_out(self) -> None:
        if self.out:
            out, self.out = self.out, []
            self.out_bytes = 0
            self.write_now(out)

    def write_now(self, data: bytes | list) -> None:
        """Write at once (behind what is already being written).  The peer may
        have gone since the frames were queued: then they are dropped, and the
        read side ends the connection."""
        if not self.closed and self.out_frames.queue(data):
            self.out_frames.flush()

    async def drained(self) -> None:
        """Until what is queued to this peer is written (its outbox too: a
        drain alone may return at once), or the peer is gone."""
        try:
            self.send_out()
            await self.out_frames.drain()
        except (ConnectionError, OSError, RuntimeError, AttributeError):
            pass  # (its own read loop ends it)

    @property
    def buffered(self) -> int:
        """Bytes on their way to this peer and not yet in the kernel."""
        return self.out_bytes + self.out_frames.buffered

    def close(self) -> None:
        if not self.closed:
            self.send_out()
            self.closed = True
            self.out_frames.close()

    def __str__(self) -> str:
        inst = f"[{self.instance}]" if self.instance else ""
        return f"{self.role} {self.account}/{self.order_id}{inst} at {self.peer}"


class Streamed:
    """An attempt's output as it comes in `output` frames: the pieces (joined
    once, at the result), their length and SHA-256 so far, and the buyer
    connection they also went to, cut through (None: not, or not all of them)."""

    __slots__ = ("pieces", "n", "sha256", "buyer")

    def __init__(self, buyer, hashed: bool = True):
        self.pieces: list = []
        self.n = 0
        self.sha256 = hashlib.sha256() if hashed else None
        self.buyer = buyer


class SellerConn(Conn):
    role = "seller"

    def __init__(self, *a):
        super().__init__(*a)
        self.order = None  # SellOrderRow
        # attempts sent to it, in the order it runs them: id -> (task, wall_ms).  The
        # first runs; the others wait on the seller (prefetched) and have no deadline
        # until they come first.
        self.attempts: dict[int, tuple] = {}
        self.credit = 0  # tasks it asked for (`ready`) and has not been sent
        self.deadline = 0.0  # of its first attempt
        self.head_since = 0.0  # when its first attempt started (about)
        self.ready_seq = 0
        self.stale: set[int] = set()  # attempts taken from it; late results get paid 0
        self.returned: set[int] = set()  # attempts it returned, until settled
        self.revoking: set[int] = set()  # held attempts it was asked to give back
        self.outputs: dict[int, Streamed] = {}  # attempt -> its output so far
        self.image_sends: dict[str, object] = {}  # image -> the task sending it in chunks
        self.accel = ""  # kvm: the accelerator it measured (hello), kvm | tcg
        self.cache = 0  # kvm: bytes of images its cache may hold (hello)
        self.links = False  # kvm: it joins its guests to the buyer's link (hello)

    def running_task(self):
        """The task of the attempt it runs (the first it holds), or None."""
        return next(iter(self.attempts.values()))[0] if self.attempts else None


class BuyerConn(Conn):
    role = "buyer"

    def __init__(self, *a):
        super().__init__(*a)
        self.order = None  # BuyOrderRow
        self.unacked: set[int] = set()  # results sent on this connection, not acked yet
        self.owed: dict[int, None] = {}  # results to send from the store, as it reads
        self.feeder = None  # the task sending them
        self.sessions: dict[int, object] = {}  # its open sessions: id -> TaskState
        self.output_frames = False  # it takes a result's output ahead in `output` frames
        self.acks = False  # it acks results (hello's acks); else delivered once sent
        self.disk = None  # the write of its last image chunk (imagefiles.py), a Future
