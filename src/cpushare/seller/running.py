"""The seller's plain state: its status, the task in progress, the errors
that end a connection, and where a job's output goes as it comes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from dataclasses import dataclass

STATES = ("starting", "connecting", "idle", "running", "paused", "stopping", "stopped", "error")


@dataclass(frozen=True)
class Status:
    state: str  # one of STATES
    order: str  # order name (file stem)
    model: str
    server: str  # host:port
    current_task: str | None
    buyer_order: str | None
    tasks_done: int
    cpu_seconds_sold: float
    coins_earned_milli: int
    connected_since: float | None  # epoch seconds
    last_error: str


class AuthError(Exception):
    """The market refused us, or we refused the market (TLS verification)."""


class _Lost(Exception):
    """The connection is gone; reconnect."""


class _Aborted(Exception):
    """The seller gave up the running task itself (stop, pause timeout)."""


@dataclass
class _Running:
    """The task in progress on this connection."""
    task: int
    attempt: int
    buyer_order: str | None
    session: int | None = None
    job: object | None = None  # the model's run once started
    aborted: str = ""  # why we killed it ourselves ('' if we did not)
    stream_in: asyncio.Queue | None = None  # session input chunks (None = EOF)
    stream_bytes: int = 0  # ... and their bytes, at most about SESSION_INPUT_BUDGET
    _room: asyncio.Event | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    ending: str = ""  # a lease: why its guest is being powered off
    detached_at: float | None = None  # a lease: since when the market is away
    metered: float = 0.0  # a lease: when its last `meter` went


    def took_input(self, n: int) -> None:
        """The job took `n` bytes of its queued input."""
        self.stream_bytes -= n
        if self._room is not None and self.stream_bytes <= SESSION_INPUT_BUDGET:
            self._room.set()

    async def input_room(self, running, alive) -> None:
        """Until the queued input is back within its budget, or the job is no
        longer the one `running()` names (it ended, or was aborted).
        `alive()` is called every quarter second meanwhile (not reading is
        not silence: the caller keeps the link alive)."""
        while self.stream_bytes > SESSION_INPUT_BUDGET and running() is self:
            self._room = asyncio.Event()
            try:
                await asyncio.wait_for(self._room.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
            alive()


# Session input queued for a job that has not read it yet; past it the seller
# stops reading from the market.
SESSION_INPUT_BUDGET = 1 << 20


class _OutputSink:
    """Where a job's output goes as it comes (called in the loop).

    It is hashed as it passes, once; whole chunks go ahead to the market in
    `output` frames (sent from the loop); what is left at the end, less than a
    chunk, is `buf` and goes in the `result`, so a small output costs no more
    frames than before.  The sandbox enforces the output limit upstream.
    """

    def __init__(self, seller: "Seller", r: _Running, chunk: int):
        self._seller, self._r, self._chunk = seller, r, chunk
        self.sha256 = hashlib.sha256()
        self.buf = bytearray()
        self.n = 0

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.n += len(data)
        self.buf += data
        while len(self.buf) >= self._chunk:  # (a read may bring several)
            if len(self.buf) == self._chunk:  # (the usual case: pipe reads divide it)
                piece, self.buf = self.buf, bytearray()
            else:
                piece, self.buf = self.buf[:self._chunk], self.buf[self._chunk:]
            self._seller._send_output(self._r, piece)

    def flush(self) -> None:
        pass
