"""The rows the store hands out, its error and the names of its system accounts."""

from __future__ import annotations

from dataclasses import dataclass

MINT = "@mint"
ESCROW = "@escrow"


class StoreError(Exception):
    """A store request that cannot be met (unknown account, ...)."""


@dataclass
class Account:
    id: int
    name: str
    balance_milli: int


@dataclass
class Cert:
    fingerprint: str
    account_id: int
    account: str
    role: str  # 'seller' | 'buyer'
    order_id: int
    not_after: float  # Unix time
    revoked: bool
    common_name: str


@dataclass
class SellOrderRow:
    id: int
    account_id: int
    price_milli: int
    model: str
    cpu_seconds: int
    wall_seconds: int
    memory: int
    output: int


@dataclass
class BuyOrderRow:
    id: int
    account_id: int
    price_milli: int
    redundancy: int
    max_cpu_seconds: int
    model: str = "seccomp"
    memory: int = 0  # kvm: RAM per node
    max_nodes: int = 0  # kvm: nodes at once
    accel: str = "any"  # kvm: any | kvm
    boot_seconds: int = 0  # kvm: the console must print within this


@dataclass
class TaskRow:
    id: int
    buy_order_id: int
    buyer_account_id: int
    ref: str
    image: str
    redundancy: int
    cpu_ms: int  # the most CPU time one attempt may use (and be paid for)
    bid_milli: int
    escrow_milli: int  # still held for this task
    state: str  # 'queued' | 'done' | 'failed'
    session: bool = False  # an interactive session (never requeued, never redundant)
    model: str = "seccomp"


@dataclass
class AttemptRow:
    id: int
    task_id: int
    sell_order_id: int
    seller_account_id: int
    state: str  # 'running' | 'returned' | 'lost' | 'accepted' | 'rejected' | 'void'
    ask_milli: int
    cpu_ms: int | None
    output_sha256: str | None
    exit_status: int | None
    signal: int | None
    reason: str | None
    paid_milli: int = 0  # (a lease's attempt is paid as it runs)


@dataclass
class Result:
    """A finished task, kept until its buyer has received it."""
    task_id: int
    ref: str
    state: str  # 'done' | 'failed'
    exit_status: int | None
    signal: int | None
    reason: str
    cpu_ms: int
    cost_milli: int
    attempts: int
    output: bytes
    fail_code: str | None
    fail_message: str | None
