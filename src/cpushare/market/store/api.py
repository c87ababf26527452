"""`Store`: what the market needs from its state, whatever keeps it."""

from __future__ import annotations

import abc
import contextlib
from typing import Iterable

from .rows import Account, AttemptRow, BuyOrderRow, Cert, Result, SellOrderRow, TaskRow


class Store(abc.ABC):
    """What the market needs from its state."""

    # transactions
    @abc.abstractmethod
    def begin(self) -> None: ...
    @abc.abstractmethod
    def commit(self) -> None: ...
    @abc.abstractmethod
    def rollback(self) -> None: ...

    def commit_apart(self):
        """As commit(), in a thread of the store's where it has one: then a
        concurrent.futures.Future, and the caller goes on (the store's next
        statement waits for that commit); None when it is committed already."""
        self.commit()
        return None
    @property
    @abc.abstractmethod
    def in_transaction(self) -> bool: ...
    @abc.abstractmethod
    def op(self) -> contextlib.AbstractContextManager: ...
    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager:
        """A transaction of its own, committed at the end (rolled back on error)."""
    @abc.abstractmethod
    def close(self) -> None: ...

    def collect_garbage(self) -> int:
        """At start: drop whatever a crash left behind outside the store's transactions."""
        return 0

    def files_pending(self) -> bool:
        """Whether large values of the open transaction are still being written (and
        synced): commit() would wait for them.  A caller that must not block may
        commit a little later instead."""
        return False

    # settings (CA, server certificate, listen address)
    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None: ...
    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    # accounts and certificates
    @abc.abstractmethod
    def add_account(self, name: str) -> int: ...
    @abc.abstractmethod
    def account(self, name: str) -> Account | None: ...
    @abc.abstractmethod
    def account_by_id(self, account_id: int) -> Account: ...
    @abc.abstractmethod
    def accounts(self) -> list[Account]: ...
    @abc.abstractmethod
    def add_cert(self, fingerprint: str, account_id: int, role: str, order_id: int,
                 not_after: float, common_name: str) -> None: ...
    @abc.abstractmethod
    def cert(self, fingerprint: str) -> Cert | None: ...
    @abc.abstractmethod
    def certs(self) -> list[Cert]: ...
    @abc.abstractmethod
    def revoke(self, fingerprint: str) -> bool: ...

    # orders
    @abc.abstractmethod
    def add_sell_order(self, account_id: int, price_milli: int, model: str, cpu_seconds: int,
                       wall_seconds: int, memory: int, output: int) -> int: ...
    @abc.abstractmethod
    def sell_order(self, order_id: int) -> SellOrderRow: ...
    @abc.abstractmethod
    def add_buy_order(self, account_id: int, price_milli: int, redundancy: int,
                      max_cpu_seconds: int, model: str = "seccomp", memory: int = 0,
                      max_nodes: int = 0, accel: str = "any", boot_seconds: int = 0) -> int: ...
    @abc.abstractmethod
    def buy_order(self, order_id: int) -> BuyOrderRow: ...

    # images
    @abc.abstractmethod
    def put_image(self, digest: str, data: bytes, account_id: int = 0) -> None: ...
    @abc.abstractmethod
    def has_image(self, digest: str) -> bool: ...
    @abc.abstractmethod
    def image(self, digest: str) -> bytes | None:
        """The bytes of an image kept in the store (None for one in a file)."""
    @abc.abstractmethod
    def put_image_file(self, digest: str, size: int, account_id: int) -> None:
        """Record an image whose bytes are the file ImageFiles keeps."""
    @abc.abstractmethod
    def image_size(self, digest: str) -> int | None: ...
    @abc.abstractmethod
    def image_file_digests(self) -> set[str]:
        """The images whose bytes are files."""
    @abc.abstractmethod
    def image_usage(self, account_id: int) -> tuple[int, int]:
        """(images, bytes) an account has stored."""
    @abc.abstractmethod
    def touch_images(self, digests: Iterable[str]) -> None:
        """Mark the images used now (a task of theirs was accepted)."""
    @abc.abstractmethod
    def collect_images(self, unused_for: float) -> int: ...
    @abc.abstractmethod
    def carry(self, buyer_account_id: int, seller_account_id: int) -> int:
        """What the buyer owes the seller below one milli (see settlement)."""
    @abc.abstractmethod
    def set_carry(self, buyer_account_id: int, seller_account_id: int, rest: int) -> None: ...

    # tasks and attempts
    @abc.abstractmethod
    def add_task(self, buy_order_id: int, buyer_account_id: int, ref: str, image: str,
                 input_: bytes, redundancy: int, cpu_ms: int, bid_milli: int,
                 escrow_milli: int = 0, session: bool = False,
                 model: str = "seccomp") -> int: ...
    @abc.abstractmethod
    def undelivered_refs(self, buy_order_id: int | None = None
                         ) -> list[tuple[int, str, int, int]]: ...
    @abc.abstractmethod
    def pending_task(self, buy_order_id: int, ref: str) -> TaskRow | None: ...
    @abc.abstractmethod
    def task(self, task_id: int) -> TaskRow: ...
    @abc.abstractmethod
    def task_input(self, task_id: int) -> bytes: ...
    @abc.abstractmethod
    def queued_tasks(self) -> list[TaskRow]: ...
    @abc.abstractmethod
    def add_attempt(self, task_id: int, sell_order_id: int, seller_account_id: int,
                    ask_milli: int) -> int: ...
    @abc.abstractmethod
    def attempts(self, task_id: int) -> list[AttemptRow]: ...
    @abc.abstractmethod
    def attempt_returned(self, attempt_id: int, cpu_ms: int, output_sha256: str,
                         exit_status: int | None, signal: int | None, reason: str,
                         output: bytes) -> None: ...
    @abc.abstractmethod
    def set_attempt_state(self, attempt_id: int, state: str, paid_milli: int = 0,
                          result: tuple | None = None) -> None: ...
    @abc.abstractmethod
    def attempt_output(self, attempt_id: int) -> bytes: ...
    @abc.abstractmethod
    def metered(self, attempt_id: int, cpu_ms: int, paid_milli: int) -> None:
        """A running lease's attempt: its CPU time and what it was paid so far."""
    @abc.abstractmethod
    def lose_running_attempts(self, keep_models: tuple[str, ...] = ()) -> int:
        """Mark running attempts lost, but those of open sessions of `keep_models`
        (leases, whose guests run on while the market restarts)."""
    @abc.abstractmethod
    def finish_task(self, task_id: int, state: str, *, exit_status: int | None = None,
                    signal: int | None = None, reason: str = "", cpu_ms: int = 0,
                    cost_milli: int = 0, attempts: int = 0, output: bytes = b"",
                    fail_code: str | None = None, fail_message: str | None = None) -> None:
        """Close a task ('done' or 'failed'); also releases its escrow field."""
    @abc.abstractmethod
    def undelivered(self, buy_order_id: int) -> list[Result]: ...
    @abc.abstractmethod
    def undelivered_ids(self, buy_order_id: int) -> list[int]: ...
    @abc.abstractmethod
    def delivered_task(self, buy_order_id: int, ref: str) -> int | None: ...
    @abc.abstractmethod
    def stale_results(self, before: float) -> list[int]: ...
    @abc.abstractmethod
    def result(self, task_id: int) -> Result: ...
    @abc.abstractmethod
    def mark_delivered(self, task_ids: Iterable[int],
                       refs: Iterable[tuple[int, str]] | None = None) -> None:
        """The buyer has these tasks' results.  `refs`, where the caller knows
        them: the (buy order, ref) of each (the PostgreSQL store's journal
        answers delivered_task from them)."""
    @abc.abstractmethod
    def add_dispute(self, task_id: int, attempt_id: int, seller_account_id: int,
                    output_sha256: str | None, majority_sha256: str | None) -> None: ...
    @abc.abstractmethod
    def disputes(self, task_id: int | None = None) -> list[tuple]: ...

    # the ledger
    @abc.abstractmethod
    def transfer(self, kind: str, entries: list[tuple[int, int]], *,
                 task_id: int | None = None, memo: str = "") -> int: ...
    @abc.abstractmethod
    def set_task_escrow(self, task_id: int, escrow_milli: int) -> None: ...
    @abc.abstractmethod
    def check(self) -> list[str]: ...
    @abc.abstractmethod
    def ledger_summary(self) -> dict: ...

    # the system accounts' ids
    mint_id: int
    escrow_id: int
    image_dir: str  # where the images of chunked models are files (market.imagefiles)

    # --- several processes on one database (only where `shared`: store/pgfleet.py)
    shared: bool = False
    # what a submit or an open will ask, read in another thread first (store/pgahead.py)
    reads_ahead: bool = False

    def pending(self):
        """What the store's own thread still does (a concurrent Future), or None:
        a statement now would wait for it.  None here."""
        return None

    def loop_waits(self) -> tuple[int, float]:
        """(statements that waited for a commit on its way, seconds): none here."""
        return 0, 0.0

    def _one_process(self, *_a, **_k):
        raise NotImplementedError(f"{type(self).__name__} is served by one process")

    join = listener = servers = take_over = claim_task = _one_process
    attempts_of = buyer_home = notify_result = announce_results = notify_all = _one_process
    forget_homes = try_lock = cancel_task = claim_cancelled = ask_yield = notify_idle = _one_process
    revoked_among = buyer_home_of = server_link = _one_process
    lease_holder = hand_lease = handed_lease = claim_apart = _one_process
    results_apart = release_apart = _one_process
    # (only where reads_ahead: store/pgahead.py)
    asks_ref = asks_lock = read_ahead = took_ahead = _one_process
