"""The market's plain state: tasks, their returned results, refusals.

No I/O here: matching and settlement work on these, and tests make them
without a store or a connection.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..protocol import CodedError

MAX_REDUNDANCY = 16
MAX_LOST = 5  # attempts lost (disconnect, deadline) before a task fails


class Busy(Exception):
    """Another market process holds what this request must lock (an account's
    balance, an image) in its open group transaction: the request is
    handled again shortly, after that commit (fleet.py).  Raised before the
    handler has changed anything."""


BUSY_RETRY = 0.003  # seconds before a busy request is tried again


class Rejection(CodedError):
    """A request the market refuses: `code` is the protocol's error code
    (docs/protocol.md), `message` says why.  The handler answers it with an
    `error` or `failed` frame; the connection stays."""


class ResultKey(NamedTuple):
    """What must agree between the results of a task's attempts."""
    output_sha256: str
    exit_status: int | None
    signal: int | None


class Returned(NamedTuple):
    """A result an attempt returned, until its task is settled."""
    key: ResultKey
    seller_account_id: int
    cpu_ms: int  # as the seller measured it
    ask_milli: int
    reason: str

    @property
    def exit_status(self) -> int | None:
        return self.key.exit_status

    @property
    def signal(self) -> int | None:
        return self.key.signal


class Pending(NamedTuple):
    """A task whose result its buyer has not acknowledged yet."""
    buy_order_id: int
    ref: str
    buyer_account_id: int

    @property
    def key(self) -> tuple[int, str]:
        """Its key in Market.pending_refs."""
        return self.buy_order_id, self.ref


class Final(NamedTuple):
    """How a task closed, for the announcement after the commit."""
    state: str  # "done" or "failed"
    fields: dict[str, Any]  # of the `done` or `failed` frame
    output: bytes
    ahead: Any = None  # (buyer connection, n): n bytes of output went there already


@dataclass(eq=False)
class TaskState:
    id: int
    buy_order_id: int
    buyer_account_id: int
    ref: str
    image: str
    redundancy: int
    cpu_ms: int
    bid_milli: int
    escrow_milli: int
    model: str = "seccomp"
    memory: int = 0  # bytes a run of its image needs
    running: dict = field(default_factory=dict)  # attempt id -> SellerConn | None
    results: dict[int, Returned] = field(default_factory=dict)  # attempt id -> result
    used_accounts: set = field(default_factory=set)
    lost: int = 0
    refused: int = 0  # attempts whose seller could not run it (its limits)
    started: int = 0
    session: bool = False
    input: bytes | None = None  # small inputs stay in memory; None: read from the store
    input_in_memory: int = 0  # its bytes counted in the market's INPUT_BUDGET
    buyer: Any = None  # sessions: the BuyerConn that opened it
    streams: list = field(default_factory=list)  # sessions: stdin frames before a seller
    streamed_bytes: int = 0  # ... and their bytes
    # since when it has waited for a seller (accepted, or its last attempt lost)
    waiting_since: float = field(default_factory=time.monotonic)
    # leases (market/leases.py): a session of a model of leased nodes (kvm)
    lease: bool = False
    accel: str = "any"  # any | kvm: the sellers it may go to
    image_size: int = 0  # bytes the seller's cache must hold
    boot_seconds: int = 0  # its console must print within this of the guest's start
    metered_ms: int = 0  # CPU time paid for so far
    paid_milli: int = 0  # ... and what it cost
    lease_state: str = "waiting"
    started_at: float | None = None  # (monotonic) when its guest started
    metered_at: float = 0.0  # (monotonic) its last report paid
    meter_due: int = 0  # a report that came sooner, paid when the floor has passed
    meter_timer: bool = False
    console_seen: bool = False
    ending: str = ""  # why it is being powered off
    buyer_away_since: float | None = None  # (monotonic) its buyer's connection went
    link: str | None = None  # the buyer's link endpoint HOST:PORT (docs/vpn.md), if any
    orphan: tuple | None = None  # after a restart: (attempt, sell order) awaiting its seller

    def best(self) -> tuple[ResultKey | None, int]:
        """The result most attempts agree on, and how many."""
        if not self.results:
            return None, 0
        key, n = Counter(r.key for r in self.results.values()).most_common(1)[0]
        return key, n

    def session_seller(self):
        """A session's seller (the SellerConn running it), or None."""
        return next((s for s in self.running.values() if s is not None), None)

    def need(self) -> int:
        """Attempts to start now so that k results may agree."""
        return self.redundancy - self.best()[1] - len(self.running)


def wall_ms_for(cpu_ms: int, seller_wall_ms: int) -> int:
    """The wall-clock budget of an attempt: generous for the CPU time it may use."""
    return min(seller_wall_ms, 4 * cpu_ms + 10_000)
