"""The market's state: accounts, certificates, orders, tasks and the ledger.

`Store` lists what the market needs from its state; `SQLiteStore` keeps it
in one SQLite file (WAL).  The market logic (server.py) speaks only to
`Store`, so a PostgreSQL store can follow without touching it.

Transactions.  All writes happen between `begin()` and `commit()`; the
market groups the writes of many messages into one SQLite transaction
(group commit) and sends the answers that depend on them only after the
commit.  `op()` gives a savepoint to callers that want one; the market
instead stops (and recovers at its restart) if an operation fails half-way.

The ledger is double-entry, in integer milli-CPUCoins: a transaction is a
row of `transactions` and two or more rows of `entries` whose amounts sum
to zero, written inside one SQLite transaction with the balances they
change (the entries and balances of a group are written together just
before its COMMIT).

Inputs and outputs over BIG bytes are files in PATH.d/ (their column then
holds IN_FILE): written before the commit that refers to them, removed
after the commit that drops them; `collect_garbage()` removes what a crash
left between the two.  Money enters only from the system account `@mint` (so its balance
is minus what was minted) and what buyers hold for running tasks sits in
`@escrow`.  `check()` verifies every invariant.
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

MINT = "@mint"
ESCROW = "@escrow"
SCHEMA_VERSION = 4
BIG = 64 << 10  # inputs and outputs larger than this live in files beside the database
IN_FILE = "file"  # what their column holds then
BACKGROUND_WRITE = 1 << 20  # files this big are written by a thread (see SQLiteStore._put)


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


class Store(abc.ABC):
    """What the market needs from its state."""

    # transactions
    @abc.abstractmethod
    def begin(self) -> None: ...
    @abc.abstractmethod
    def commit(self) -> None: ...
    @abc.abstractmethod
    def rollback(self) -> None: ...
    @property
    @abc.abstractmethod
    def in_transaction(self) -> bool: ...
    @abc.abstractmethod
    def op(self) -> contextlib.AbstractContextManager: ...
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
    def undelivered_refs(self) -> list[tuple[int, str, int, int]]: ...
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
    def finish_task(self, task_id: int, state: str, *,  # also releases its escrow field exit_status: int | None = None,
                    signal: int | None = None, reason: str = "", cpu_ms: int = 0,
                    cost_milli: int = 0, attempts: int = 0, output: bytes = b"",
                    fail_code: str | None = None, fail_message: str | None = None) -> None: ...
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
    def mark_delivered(self, task_ids: Iterable[int]) -> None: ...
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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    system INTEGER NOT NULL DEFAULT 0,
    balance INTEGER NOT NULL DEFAULT 0,          -- milli-CPUCoins; == SUM(entries)
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sell_orders (
    id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL REFERENCES accounts(id),
    price_milli INTEGER NOT NULL, model TEXT NOT NULL, cpu_seconds INTEGER NOT NULL,
    wall_seconds INTEGER NOT NULL, memory INTEGER NOT NULL, output INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS buy_orders (
    id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL REFERENCES accounts(id),
    price_milli INTEGER NOT NULL, redundancy INTEGER NOT NULL,
    max_cpu_seconds INTEGER NOT NULL, created REAL NOT NULL,
    model TEXT NOT NULL DEFAULT 'seccomp', memory INTEGER NOT NULL DEFAULT 0,
    max_nodes INTEGER NOT NULL DEFAULT 0, accel TEXT NOT NULL DEFAULT 'any',
    boot_seconds INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS certs (
    fingerprint TEXT PRIMARY KEY, account_id INTEGER NOT NULL REFERENCES accounts(id),
    role TEXT NOT NULL CHECK (role IN ('seller', 'buyer')), order_id INTEGER NOT NULL,
    not_after REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, common_name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (digest TEXT PRIMARY KEY, data BLOB NOT NULL,
    created REAL NOT NULL, account_id INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0, used REAL NOT NULL DEFAULT 0);
-- What a buyer owes a seller below one milli-CPUCoin, in milli x ms per
-- CPU-hour (0 .. 3 599 999): carried into their next settlement.
CREATE TABLE IF NOT EXISTS carries (buyer_account_id INTEGER NOT NULL,
    seller_account_id INTEGER NOT NULL, rest INTEGER NOT NULL,
    PRIMARY KEY (buyer_account_id, seller_account_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, buy_order_id INTEGER NOT NULL, buyer_account_id INTEGER NOT NULL,
    ref TEXT NOT NULL, image TEXT NOT NULL, input BLOB,
    redundancy INTEGER NOT NULL, cpu_ms INTEGER NOT NULL, bid_milli INTEGER NOT NULL,
    escrow_milli INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'done', 'failed')),
    exit_status INTEGER, signal INTEGER, reason TEXT, used_cpu_ms INTEGER,
    cost_milli INTEGER, attempts INTEGER, output BLOB, fail_code TEXT, fail_message TEXT,
    session INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    model TEXT NOT NULL DEFAULT 'seccomp');
CREATE INDEX IF NOT EXISTS tasks_pending ON tasks (buy_order_id, delivered, ref);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks(id),
    sell_order_id INTEGER NOT NULL, seller_account_id INTEGER NOT NULL,
    ask_milli INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'running',
    cpu_ms INTEGER, output_sha256 TEXT, exit_status INTEGER, signal INTEGER, reason TEXT,
    output BLOB, paid_milli INTEGER NOT NULL DEFAULT 0, started REAL NOT NULL);
CREATE INDEX IF NOT EXISTS attempts_task ON attempts (task_id);
CREATE TABLE IF NOT EXISTS disputes (
    id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL, attempt_id INTEGER NOT NULL,
    seller_account_id INTEGER NOT NULL, output_sha256 TEXT, majority_sha256 TEXT,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS transactions (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, task_id INTEGER, memo TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, txn_id INTEGER NOT NULL REFERENCES transactions(id),
    account_id INTEGER NOT NULL REFERENCES accounts(id), amount INTEGER NOT NULL);
-- No more indexes than the market's queries need while it serves: every
-- index is pages more in each commit.  The checks scan.
"""


class SQLiteStore(Store):
    """The state in one SQLite file in WAL mode.

    synchronous: 'full' makes every commit durable (an fsync of the WAL
    per group commit); 'normal' keeps every commit atomic and survives a
    kill of the server (the WAL is in the page cache), but a power loss
    may undo the last commits, all of a commit or nothing of it.
    """

    def __init__(self, path: str, *, synchronous: str = "full", create: bool = False):
        self.path = path
        if not create:
            try:
                open(path, "rb").close()
            except OSError as e:
                raise StoreError(f"{path}: cannot open the market database: {e.strerror} "
                                 f"(run 'cpushare-server --db {path} init' first?)") from None
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout = 10000")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot open the market database: {e}") from None
        if mode.lower() != "wal":
            raise StoreError(f"{path}: SQLite refused WAL mode (got {mode})")
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self.db.execute("PRAGMA foreign_keys = ON")
        self._sp = 0
        self.synchronous = synchronous
        # Large inputs and outputs: one file each in PATH.d/, written before the
        # commit that refers to them and removed after the commit that drops them.
        self.blob_dir = path + ".d"
        self.image_dir = path + ".images"  # images of chunked models (market.imagefiles)
        self._unlink: list[str] = []
        self._checkpointer: threading.Thread | None = None
        self._entries: list[tuple[int, int, int]] = []  # ledger entries not yet written
        self._deltas: dict[int, int] = {}  # ... and the balance changes they make
        self._files = os.path.isdir(self.blob_dir)  # none yet: nothing to remove
        # Files of at least BACKGROUND_WRITE bytes are written and synced by a thread
        # of their own, so that the caller goes on (a big input goes out to a seller
        # meanwhile); commit() waits for them, and reading one waits for its write.
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._file_writer: concurrent.futures.ThreadPoolExecutor | None = None
        if create:
            # executescript commits what is open first: it runs alone, and its
            # statements are all IF NOT EXISTS.
            self.db.executescript(_SCHEMA)
            with self.transaction():
                if self.get_meta("schema_version") is None:
                    self.set_meta("schema_version", str(SCHEMA_VERSION))
                for name in (MINT, ESCROW):
                    self.db.execute("INSERT OR IGNORE INTO accounts (name, system, created) "
                                    "VALUES (?, 1, ?)", (name, time.time()))
        version = self.get_meta("schema_version")
        if version in ("1", "2", "3"):
            self._migrate(int(version))
            version = str(SCHEMA_VERSION)
        if version != str(SCHEMA_VERSION):
            raise StoreError(f"{path}: not a CPUShare market database of schema "
                             f"{SCHEMA_VERSION} (found {version!r})")
        self.mint_id = self._id(MINT)
        self.escrow_id = self._id(ESCROW)

    def _migrate(self, version: int) -> None:
        """Bring a store of an older schema up to SCHEMA_VERSION, in one transaction."""
        with self.transaction():
            if version < 2:  # carries, and who stored each image
                self.db.execute("CREATE TABLE IF NOT EXISTS carries (buyer_account_id INTEGER "
                                "NOT NULL, seller_account_id INTEGER NOT NULL, rest INTEGER "
                                "NOT NULL, PRIMARY KEY (buyer_account_id, seller_account_id))"
                                " WITHOUT ROWID")
                for col in ("account_id INTEGER NOT NULL DEFAULT 0",
                            "size INTEGER NOT NULL DEFAULT 0", "used REAL NOT NULL DEFAULT 0"):
                    self.db.execute(f"ALTER TABLE images ADD COLUMN {col}")
                self.db.execute("UPDATE images SET size = length(data), used = created")
            if version < 3:  # the computation model of buy orders and tasks
                for table in ("buy_orders", "tasks"):
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN model TEXT NOT NULL "
                                    f"DEFAULT 'seccomp'")
            if version < 4:  # the kvm model's buy order settings
                for col in ("memory INTEGER NOT NULL DEFAULT 0",
                            "max_nodes INTEGER NOT NULL DEFAULT 0",
                            "accel TEXT NOT NULL DEFAULT 'any'",
                            "boot_seconds INTEGER NOT NULL DEFAULT 0"):
                    self.db.execute(f"ALTER TABLE buy_orders ADD COLUMN {col}")
            self.set_meta("schema_version", str(SCHEMA_VERSION))

    def _id(self, name: str) -> int:
        row = self.db.execute("SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: system account {name} missing")
        return row[0]

    # --- transactions ---------------------------------------------------

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._wait_files()  # what the commit refers to is on disk first
        self._write_ledger()
        self.db.execute("COMMIT")
        unlink, self._unlink = self._unlink, []
        if not self._files:
            return
        for name in unlink:
            try:
                os.unlink(os.path.join(self.blob_dir, name))
            except FileNotFoundError:
                pass

    def rollback(self) -> None:
        try:
            self._wait_files()
        except OSError:
            pass  # the file is not referred to now (collect_garbage removes it)
        self._unlink = []
        self._entries = []
        self._deltas = {}
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    # --- large values in files --------------------------------------------

    def _put(self, name: str, data: bytes | None):
        """The column value for `data`: the bytes, or IN_FILE once they are in a file."""
        if data is None or len(data) <= BIG:
            return data
        path = os.path.join(self.blob_dir, name)
        self._wait_files(name)  # (a name is written once; to be sure)
        self._files = True
        if len(data) >= BACKGROUND_WRITE:
            if self._file_writer is None:
                self._file_writer = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="cpushare-store-files")
            self._pending[name] = self._file_writer.submit(self._write_file, path, data)
        else:
            self._write_file(path, data)
        if name in self._unlink:
            self._unlink.remove(name)
        return IN_FILE

    def _write_file(self, path: str, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(self.blob_dir, mode=0o700, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.synchronous == "full":
                os.fsync(fd)
        finally:
            os.close(fd)

    def _wait_files(self, name: str | None = None) -> None:
        """Wait for the background write of `name` (default: of every file)."""
        if name is not None:
            fut = self._pending.pop(name, None)
            if fut is not None:
                fut.result()
            return
        pending, self._pending = self._pending, {}
        concurrent.futures.wait(pending.values())
        for fut in pending.values():
            fut.result()  # the first write's OSError, if any, once all are done

    def files_pending(self) -> bool:
        return any(not f.done() for f in self._pending.values())

    def _get(self, name: str, value) -> bytes:
        if value == IN_FILE:
            self._wait_files(name)
            path = os.path.join(self.blob_dir, name)
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise StoreError(f"{path}: {e.strerror}") from None
        return value or b""

    def collect_garbage(self) -> int:
        try:
            names = set(os.listdir(self.blob_dir))
        except FileNotFoundError:
            return 0
        q = self.db.execute
        needed = {f"t{i}.in" for i, in q("SELECT id FROM tasks WHERE state = 'queued' "
                                         "AND input = ?", (IN_FILE,))}
        needed |= {f"t{i}.out" for i, in q("SELECT id FROM tasks WHERE delivered = 0 "
                                           "AND output = ?", (IN_FILE,))}
        needed |= {f"a{i}.out" for i, in q("SELECT id FROM attempts WHERE output = ?",
                                           (IN_FILE,))}
        stale = names - needed
        for name in stale:
            try:
                os.unlink(os.path.join(self.blob_dir, name))
            except FileNotFoundError:
                pass
        return len(stale)

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    @contextlib.contextmanager
    def op(self) -> Iterator[None]:
        """One logical operation inside the open transaction (a savepoint)."""
        self._sp += 1
        name = f"op{self._sp}"
        self.db.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.db.execute(f"ROLLBACK TO {name}")
            self.db.execute(f"RELEASE {name}")
            raise
        else:
            self.db.execute(f"RELEASE {name}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction of its own (for the admin commands)."""
        self.begin()
        try:
            yield
        except BaseException:
            self.rollback()
            raise
        else:
            self.commit()

    def close(self) -> None:
        if self._checkpointer is not None:
            self._stop_checkpoints.set()
            self._checkpointer.join()
            self._checkpointer = None
        self.rollback()
        if self._file_writer is not None:
            self._file_writer.shutdown()
            self._file_writer = None
        self.db.close()

    def checkpoint_in_background(self, interval: float = 0.25,
                                 restart_at: int = 32 << 20) -> None:
        """Move WAL checkpoints off the caller's thread.

        A checkpoint copies the WAL into the database file and syncs it; done
        by SQLite at a commit, it stalls the market's event loop.  A thread
        with a connection of its own runs passive checkpoints (they never
        block the writer) every `interval` seconds instead.  Under steady
        writes a passive checkpoint never catches up with the end of the WAL,
        which then only grows; past `restart_at` bytes the thread restarts it
        (that checkpoint holds new writers back for as long as it takes).
        """
        self.db.execute("PRAGMA wal_autocheckpoint = 0")
        self._stop_checkpoints = threading.Event()
        wal = self.path + "-wal"

        def run() -> None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA busy_timeout = 10000")
                db.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
                while not self._stop_checkpoints.wait(interval):
                    try:
                        big = os.path.getsize(wal) > restart_at
                    except OSError:
                        big = False
                    try:
                        db.execute("PRAGMA wal_checkpoint(RESTART)" if big
                                   else "PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error:
                        pass  # busy: the next round
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                db.close()
        self._checkpointer = threading.Thread(target=run, name="wal-checkpoint", daemon=True)
        self._checkpointer.start()

    # --- meta -------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return None
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --- accounts, certificates, orders -------------------------------------

    def add_account(self, name: str) -> int:
        try:
            return self.db.execute("INSERT INTO accounts (name, created) VALUES (?, ?)",
                                   (name, time.time())).lastrowid
        except sqlite3.IntegrityError:
            raise StoreError(f"account {name!r} exists already") from None

    def account(self, name: str) -> Account | None:
        row = self.db.execute("SELECT id, name, balance FROM accounts WHERE name = ?",
                              (name,)).fetchone()
        return Account(row[0], row[1], row[2] + self._deltas.get(row[0], 0)) if row else None

    def account_by_id(self, account_id: int) -> Account:
        row = self.db.execute("SELECT id, name, balance FROM accounts WHERE id = ?",
                              (account_id,)).fetchone()
        if row is None:
            raise StoreError(f"no account with id {account_id}")
        return Account(row[0], row[1], row[2] + self._deltas.get(account_id, 0))

    def accounts(self) -> list[Account]:
        self._write_ledger()
        return [Account(*r) for r in self.db.execute(
            "SELECT id, name, balance FROM accounts ORDER BY name")]

    def add_cert(self, fingerprint, account_id, role, order_id, not_after, common_name):
        self.db.execute("INSERT INTO certs (fingerprint, account_id, role, order_id, not_after, "
                        "common_name) VALUES (?, ?, ?, ?, ?, ?)",
                        (fingerprint, account_id, role, order_id, not_after, common_name))

    _CERT = ("SELECT c.fingerprint, c.account_id, a.name, c.role, c.order_id, c.not_after, "
             "c.revoked, c.common_name FROM certs c JOIN accounts a ON a.id = c.account_id ")

    def cert(self, fingerprint: str) -> Cert | None:
        row = self.db.execute(self._CERT + "WHERE c.fingerprint = ?", (fingerprint,)).fetchone()
        return Cert(*row[:6], bool(row[6]), row[7]) if row else None

    def certs(self) -> list[Cert]:
        return [Cert(*r[:6], bool(r[6]), r[7])
                for r in self.db.execute(self._CERT + "ORDER BY a.name, c.role, c.order_id")]

    def revoke(self, fingerprint: str) -> bool:
        return self.db.execute("UPDATE certs SET revoked = 1 WHERE fingerprint = ?",
                               (fingerprint,)).rowcount == 1

    def add_sell_order(self, account_id, price_milli, model, cpu_seconds, wall_seconds,
                       memory, output) -> int:
        return self.db.execute(
            "INSERT INTO sell_orders (account_id, price_milli, model, cpu_seconds, wall_seconds,"
            " memory, output, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (account_id, price_milli, model, cpu_seconds, wall_seconds, memory, output,
             time.time())).lastrowid

    def sell_order(self, order_id: int) -> SellOrderRow:
        row = self.db.execute(
            "SELECT id, account_id, price_milli, model, cpu_seconds, wall_seconds, memory, output"
            " FROM sell_orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise StoreError(f"no sell order {order_id}")
        return SellOrderRow(*row)

    def add_buy_order(self, account_id, price_milli, redundancy, max_cpu_seconds,
                      model="seccomp", memory=0, max_nodes=0, accel="any",
                      boot_seconds=0) -> int:
        return self.db.execute(
            "INSERT INTO buy_orders (account_id, price_milli, redundancy, max_cpu_seconds, "
            "created, model, memory, max_nodes, accel, boot_seconds) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (account_id, price_milli, redundancy, max_cpu_seconds, time.time(),
             model, memory, max_nodes, accel, boot_seconds)).lastrowid

    def buy_order(self, order_id: int) -> BuyOrderRow:
        row = self.db.execute("SELECT id, account_id, price_milli, redundancy, max_cpu_seconds, "
                              "model, memory, max_nodes, accel, boot_seconds FROM buy_orders "
                              "WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise StoreError(f"no buy order {order_id}")
        return BuyOrderRow(*row)

    # --- images -----------------------------------------------------------

    def put_image(self, digest: str, data: bytes, account_id: int = 0) -> None:
        now = time.time()
        self.db.execute("INSERT OR IGNORE INTO images (digest, data, created, account_id, size, "
                        "used) VALUES (?, ?, ?, ?, ?, ?)",
                        (digest, data, now, account_id, len(data), now))

    def image_usage(self, account_id: int) -> tuple[int, int]:
        return self.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM images "
                               "WHERE account_id = ?", (account_id,)).fetchone()

    def touch_images(self, digests: Iterable[str]) -> None:
        self.db.executemany("UPDATE images SET used = ? WHERE digest = ?",
                            [(time.time(), d) for d in digests])

    def collect_images(self, unused_for: float) -> int:
        """Drop the images no open or unacknowledged task refers to and none
        has used for `unused_for` seconds; how many."""
        return self.db.execute(
            "DELETE FROM images WHERE used < ? AND digest NOT IN (SELECT image FROM tasks "
            "WHERE state = 'queued' OR (delivered = 0 AND session = 0))",
            (time.time() - unused_for,)).rowcount

    def carry(self, buyer_account_id: int, seller_account_id: int) -> int:
        row = self.db.execute("SELECT rest FROM carries WHERE buyer_account_id = ? AND "
                              "seller_account_id = ?",
                              (buyer_account_id, seller_account_id)).fetchone()
        return row[0] if row else 0

    def set_carry(self, buyer_account_id: int, seller_account_id: int, rest: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO carries (buyer_account_id, seller_account_id, "
                        "rest) VALUES (?, ?, ?)", (buyer_account_id, seller_account_id, rest))

    def has_image(self, digest: str) -> bool:
        return self.db.execute("SELECT 1 FROM images WHERE digest = ?",
                               (digest,)).fetchone() is not None

    def image(self, digest: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM images WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row and row[0] != IN_FILE else None

    def put_image_file(self, digest: str, size: int, account_id: int) -> None:
        now = time.time()
        self.db.execute("INSERT OR IGNORE INTO images (digest, data, created, account_id, size, "
                        "used) VALUES (?, ?, ?, ?, ?, ?)",
                        (digest, IN_FILE, now, account_id, size, now))

    def image_size(self, digest: str) -> int | None:
        row = self.db.execute("SELECT size FROM images WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row else None

    def image_file_digests(self) -> set[str]:
        return {d for d, in self.db.execute("SELECT digest FROM images WHERE data = ?",
                                            (IN_FILE,))}

    # --- tasks and attempts -----------------------------------------------

    _TASK = ("SELECT id, buy_order_id, buyer_account_id, ref, image, redundancy, cpu_ms, "
             "bid_milli, escrow_milli, state, session, model FROM tasks ")

    def add_task(self, buy_order_id, buyer_account_id, ref, image, input_, redundancy,
                 cpu_ms, bid_milli, escrow_milli=0, session=False, model="seccomp") -> int:
        """A queued task; `escrow_milli` must be moved to escrow in the same transaction."""
        big = len(input_) > BIG
        tid = self.db.execute(
            "INSERT INTO tasks (buy_order_id, buyer_account_id, ref, image, input, redundancy,"
            " cpu_ms, bid_milli, escrow_milli, session, created, model) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (buy_order_id, buyer_account_id, ref, image, IN_FILE if big else input_,
             redundancy, cpu_ms, bid_milli, escrow_milli, int(session), time.time(),
             model)).lastrowid
        if big:
            self._put(f"t{tid}.in", input_)
        return tid

    def undelivered_refs(self) -> list[tuple[int, str, int, int]]:
        """(buy order, ref, task, buyer account) of every task whose result the
        buyer has not acknowledged."""
        return list(self.db.execute("SELECT buy_order_id, ref, id, buyer_account_id FROM tasks "
                                    "WHERE delivered = 0 AND session = 0"))

    def pending_task(self, buy_order_id: int, ref: str) -> TaskRow | None:
        row = self.db.execute(self._TASK + "WHERE buy_order_id = ? AND delivered = 0 AND ref = ? "
                              "AND session = 0",
                              (buy_order_id, ref)).fetchone()
        return TaskRow(*row) if row else None

    def task(self, task_id: int) -> TaskRow:
        row = self.db.execute(self._TASK + "WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise StoreError(f"no task {task_id}")
        return TaskRow(*row)

    def task_input(self, task_id: int) -> bytes:
        row = self.db.execute("SELECT input FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return self._get(f"t{task_id}.in", row[0])

    def queued_tasks(self) -> list[TaskRow]:
        return [TaskRow(*r) for r in self.db.execute(
            self._TASK + "WHERE state = 'queued' ORDER BY id")]

    def add_attempt(self, task_id, sell_order_id, seller_account_id, ask_milli) -> int:
        return self.db.execute(
            "INSERT INTO attempts (task_id, sell_order_id, seller_account_id, ask_milli, started)"
            " VALUES (?, ?, ?, ?, ?)",
            (task_id, sell_order_id, seller_account_id, ask_milli, time.time())).lastrowid

    def attempts(self, task_id: int) -> list[AttemptRow]:
        return [AttemptRow(*r) for r in self.db.execute(
            "SELECT id, task_id, sell_order_id, seller_account_id, state, ask_milli, cpu_ms, "
            "output_sha256, exit_status, signal, reason, paid_milli FROM attempts WHERE task_id = ? "
            "ORDER BY id", (task_id,))]

    def attempt_returned(self, attempt_id, cpu_ms, output_sha256, exit_status, signal, reason,
                         output) -> None:
        self.db.execute(
            "UPDATE attempts SET state = 'returned', cpu_ms = ?, output_sha256 = ?, "
            "exit_status = ?, signal = ?, reason = ?, output = ? WHERE id = ?",
            (cpu_ms, output_sha256, exit_status, signal, reason,
             self._put(f"a{attempt_id}.out", output), attempt_id))

    def set_attempt_state(self, attempt_id: int, state: str, paid_milli: int = 0,
                          result: tuple | None = None) -> None:
        """End an attempt; `result` = (cpu_ms, output_sha256, exit_status, signal, reason)
        records what it returned in the same statement."""
        # Outputs of settled attempts are not kept: the task holds the accepted one.
        self._unlink.append(f"a{attempt_id}.out")
        if result is None:
            self.db.execute("UPDATE attempts SET state = ?, paid_milli = ?, output = NULL "
                            "WHERE id = ?", (state, paid_milli, attempt_id))
        else:
            self.db.execute("UPDATE attempts SET state = ?, paid_milli = ?, output = NULL, "
                            "cpu_ms = ?, output_sha256 = ?, exit_status = ?, signal = ?, "
                            "reason = ? WHERE id = ?",
                            (state, paid_milli, *result, attempt_id))

    def metered(self, attempt_id: int, cpu_ms: int, paid_milli: int) -> None:
        self.db.execute("UPDATE attempts SET cpu_ms = ?, paid_milli = ? WHERE id = ?",
                        (cpu_ms, paid_milli, attempt_id))

    def attempt_output(self, attempt_id: int) -> bytes:
        row = self.db.execute("SELECT output FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        return self._get(f"a{attempt_id}.out", row[0] if row else None)

    def lose_running_attempts(self, keep_models: tuple[str, ...] = ()) -> int:
        marks = ", ".join("?" * len(keep_models)) or "NULL"
        return self.db.execute(
            f"UPDATE attempts SET state = 'lost' WHERE state = 'running' AND task_id NOT IN "
            f"(SELECT id FROM tasks WHERE state = 'queued' AND session = 1 AND model IN "
            f"({marks}))", keep_models).rowcount

    def finish_task(self, task_id, state, *, exit_status=None, signal=None, reason="",
                    cpu_ms=0, cost_milli=0, attempts=0, output=b"", fail_code=None,
                    fail_message=None) -> None:
        self.db.execute(
            "UPDATE tasks SET state = ?, exit_status = ?, signal = ?, reason = ?, "
            "used_cpu_ms = ?, cost_milli = ?, attempts = ?, output = ?, fail_code = ?, "
            "fail_message = ?, input = NULL, escrow_milli = 0 WHERE id = ?",
            (state, exit_status, signal, reason, cpu_ms, cost_milli, attempts,
             self._put(f"t{task_id}.out", output), fail_code, fail_message, task_id))
        self._unlink.append(f"t{task_id}.in")

    _RESULT = ("SELECT id, ref, state, exit_status, signal, reason, used_cpu_ms, cost_milli, "
               "attempts, output, fail_code, fail_message FROM tasks ")

    def _result(self, r) -> Result:
        return Result(r[0], r[1], r[2], r[3], r[4], r[5] or "", r[6] or 0, r[7] or 0,
                      r[8] or 0, self._get(f"t{r[0]}.out", r[9]), r[10], r[11])

    def undelivered(self, buy_order_id: int) -> list[Result]:
        return [self._result(r) for r in self.db.execute(
            self._RESULT + "WHERE buy_order_id = ? AND delivered = 0 AND state != 'queued' "
            "AND session = 0 ORDER BY id", (buy_order_id,))]

    def undelivered_ids(self, buy_order_id: int) -> list[int]:
        """The tasks of a buy order whose result waits for the buyer's ack, oldest first."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM tasks WHERE buy_order_id = ? AND delivered = 0 "
            "AND state != 'queued' AND session = 0 ORDER BY id", (buy_order_id,))]

    def stale_results(self, before: float) -> list[int]:
        """Tasks created before `before` whose result is still not acknowledged."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM tasks WHERE delivered = 0 AND state != 'queued' AND session = 0 "
            "AND created < ?", (before,))]

    def delivered_task(self, buy_order_id: int, ref: str) -> int | None:
        """The task of a buy order under `ref` whose result the buyer acknowledged."""
        row = self.db.execute("SELECT id FROM tasks WHERE buy_order_id = ? AND delivered = 1 "
                              "AND ref = ? AND session = 0", (buy_order_id, ref)).fetchone()
        return row[0] if row else None

    def result(self, task_id: int) -> Result:
        row = self.db.execute(self._RESULT + "WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise StoreError(f"no task {task_id}")
        return self._result(row)

    def mark_delivered(self, task_ids: Iterable[int]) -> None:
        task_ids = list(task_ids)
        self.db.executemany("UPDATE tasks SET delivered = 1, output = NULL WHERE id = ?",
                            [(t,) for t in task_ids])
        self._unlink.extend(f"t{t}.out" for t in task_ids)

    def add_dispute(self, task_id, attempt_id, seller_account_id, output_sha256,
                    majority_sha256) -> None:
        self.db.execute(
            "INSERT INTO disputes (task_id, attempt_id, seller_account_id, output_sha256, "
            "majority_sha256, created) VALUES (?, ?, ?, ?, ?, ?)",
            (task_id, attempt_id, seller_account_id, output_sha256, majority_sha256,
             time.time()))

    def disputes(self, task_id: int | None = None) -> list[tuple]:
        sql = ("SELECT d.task_id, d.attempt_id, a.name, d.output_sha256, d.majority_sha256 "
               "FROM disputes d JOIN accounts a ON a.id = d.seller_account_id")
        if task_id is None:
            return list(self.db.execute(sql + " ORDER BY d.id"))
        return list(self.db.execute(sql + " WHERE d.task_id = ? ORDER BY d.id", (task_id,)))

    # --- the ledger -------------------------------------------------------

    def transfer(self, kind: str, entries: list[tuple[int, int]], *,
                 task_id: int | None = None, memo: str = "") -> int:
        """One double-entry transaction: (account_id, amount) pairs summing to zero.

        Zero amounts are left out; a transaction with nothing left is not
        written (returns 0).  Must run inside a transaction.
        """
        if not self.db.in_transaction:
            raise StoreError("transfer outside a transaction")
        entries = [(a, m) for a, m in entries if m != 0]
        if sum(m for _, m in entries) != 0:
            raise StoreError(f"{kind} transaction does not balance: {entries}")
        if not entries:
            return 0
        if any(type(m) is not int for _, m in entries):
            raise StoreError(f"{kind} transaction has a non-integer amount: {entries}")
        txn = self.db.execute("INSERT INTO transactions (kind, task_id, memo, created) "
                              "VALUES (?, ?, ?, ?)", (kind, task_id, memo, time.time())).lastrowid
        # The entries and the balances they change are written once per group
        # commit (_write_ledger), in the same SQLite transaction: one statement
        # each for many transfers.  Reads of balances add what is pending.
        pending, deltas = self._entries, self._deltas
        for a, m in entries:
            pending.append((txn, a, m))
            deltas[a] = deltas.get(a, 0) + m
        return txn

    def _write_ledger(self) -> None:
        if self._entries:
            self.db.executemany("INSERT INTO entries (txn_id, account_id, amount) "
                                "VALUES (?, ?, ?)", self._entries)
            self.db.executemany("UPDATE accounts SET balance = balance + ? WHERE id = ?",
                                [(m, a) for a, m in self._deltas.items() if m])
            self._entries = []
            self._deltas = {}

    def set_task_escrow(self, task_id: int, escrow_milli: int) -> None:
        self.db.execute("UPDATE tasks SET escrow_milli = ? WHERE id = ?", (escrow_milli, task_id))

    def ledger_summary(self) -> dict:
        self._write_ledger()
        q = self.db.execute
        return {
            "transactions": q("SELECT COUNT(*) FROM transactions").fetchone()[0],
            "minted": -q("SELECT balance FROM accounts WHERE id = ?",
                         (self.mint_id,)).fetchone()[0],
            "escrow": q("SELECT balance FROM accounts WHERE id = ?",
                        (self.escrow_id,)).fetchone()[0],
            "accounts": q("SELECT COUNT(*) FROM accounts WHERE system = 0").fetchone()[0],
        }

    def check(self) -> list[str]:
        """Every ledger invariant; returns what broke (empty: all hold).

        Reads one consistent snapshot, so it may run beside a serving market.
        """
        self._write_ledger()
        q = self.db.execute
        problems: list[str] = []
        own = not self.db.in_transaction
        if own:
            q("BEGIN")  # a read transaction: one snapshot for every query below
        try:
            for txn, kind, total in q(
                    "SELECT t.id, t.kind, COALESCE(s.total, 0) FROM transactions t LEFT JOIN "
                    "(SELECT txn_id, SUM(amount) AS total, COUNT(*) AS n FROM entries "
                    "GROUP BY txn_id) s ON s.txn_id = t.id "
                    "WHERE COALESCE(s.total, 0) != 0 OR COALESCE(s.n, 0) < 2"):
                problems.append(f"transaction {txn} ({kind}) entries sum to {total}, not 0, "
                                f"or it has fewer than two entries")
            for n, in q("SELECT COUNT(*) FROM entries WHERE txn_id NOT IN "
                        "(SELECT id FROM transactions)"):
                if n:
                    problems.append(f"{n} entries belong to no transaction")
            total = q("SELECT COALESCE(SUM(balance), 0) FROM accounts").fetchone()[0]
            if total != 0:
                problems.append(f"the balances of all accounts sum to {total}, not 0")
            for name, bal, summed in q(
                    "SELECT a.name, a.balance, COALESCE(s.total, 0) FROM accounts a LEFT JOIN "
                    "(SELECT account_id, SUM(amount) AS total FROM entries "
                    "GROUP BY account_id) s ON s.account_id = a.id"):
                if bal != summed:
                    problems.append(f"account {name}: balance {bal} but its entries sum "
                                    f"to {summed}")
            minted = q("SELECT COALESCE(SUM(e.amount), 0) FROM entries e JOIN transactions t "
                       "ON t.id = e.txn_id WHERE t.kind = 'mint' AND e.account_id != ?",
                       (self.mint_id,)).fetchone()[0]
            mint_bal = q("SELECT balance FROM accounts WHERE id = ?",
                         (self.mint_id,)).fetchone()[0]
            if mint_bal != -minted:
                problems.append(f"account {MINT}: balance {mint_bal} but {minted} was minted")
            n = q("SELECT COUNT(*) FROM entries e JOIN transactions t ON t.id = e.txn_id "
                  "WHERE e.account_id = ? AND t.kind != 'mint'", (self.mint_id,)).fetchone()[0]
            if n:
                problems.append(f"account {MINT} takes part in {n} entries that are not minting")
            esc_bal = q("SELECT balance FROM accounts WHERE id = ?",
                        (self.escrow_id,)).fetchone()[0]
            held = q("SELECT COALESCE(SUM(escrow_milli), 0) FROM tasks WHERE state = 'queued'"
                     ).fetchone()[0]
            if esc_bal != held:
                problems.append(f"account {ESCROW}: balance {esc_bal} but open tasks hold {held}")
            for tid, state, esc in q("SELECT id, state, escrow_milli FROM tasks WHERE "
                                     "(state != 'queued' AND escrow_milli != 0) OR escrow_milli < 0"):
                problems.append(f"task {tid} ({state}) still holds {esc} in escrow")
            for name, bal in q("SELECT name, balance FROM accounts WHERE system = 0 "
                               "AND balance < 0"):
                problems.append(f"account {name} is negative: {bal}")
            for b, sl, rest in q("SELECT buyer_account_id, seller_account_id, rest FROM carries "
                                 "WHERE rest < 0 OR rest >= 3600000"):
                problems.append(f"carry of buyer {b} to seller {sl} is {rest}, outside "
                                f"0..3599999")
            esc_neg = q("SELECT balance FROM accounts WHERE id = ? AND balance < 0",
                        (self.escrow_id,)).fetchone()
            if esc_neg:
                problems.append(f"account {ESCROW} is negative: {esc_neg[0]}")
        finally:
            if own:
                q("COMMIT")
        return problems
