"""`SQLiteStore`: the market's state in one SQLite file (WAL).

This module holds the connection, its transactions and checkpoints and the
settings (meta); the mixins beside it hold the queries of each part of the
state, and share the attributes `__init__` sets up.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import sqlite3
import threading
import time

from .accounts import AccountsMixin
from .api import Store
from .files import BIG, IN_FILE, FilesMixin
from .images import ImagesMixin
from .ledger import LedgerMixin
from .rows import ESCROW, MINT, StoreError
from .schema import SCHEMA, SCHEMA_VERSION, migrate
from .tasks import TasksMixin
from .txn import TxnMixin


class SQLiteStore(FilesMixin, AccountsMixin, ImagesMixin, TasksMixin, LedgerMixin, TxnMixin,
                  Store):
    """The state in one SQLite file in WAL mode.

    synchronous: 'full' makes every commit durable (an fsync of the WAL
    per group commit); 'normal' keeps every commit atomic and survives a
    kill of the server (the WAL is in the page cache), but a power loss
    may undo the last commits, all of a commit or nothing of it.
    """

    IntegrityError = sqlite3.IntegrityError  # (the mixins' SQL is the same on PostgreSQL)
    big = BIG  # inputs larger than this are files (files.py) ...
    in_file = IN_FILE  # ... and their column holds this
    snapshot_begin = "BEGIN"  # (a read transaction is one snapshot)

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
            self.db.executescript(SCHEMA)
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
            migrate(self.db, version)
            self.set_meta("schema_version", str(SCHEMA_VERSION))

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

    def lock_serving(self) -> None:
        """StoreError unless this is the only process serving the database: a
        SQLite market is served by one (several need PostgreSQL).  The lock
        is on a file beside it (never on the database's own file, whose
        POSIX locks are SQLite's), held until this process ends."""
        path = self.path + ".serving"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path}: another cpushare-server serves this database (a "
                             f"SQLite market is served by one process; several serve one on "
                             f"PostgreSQL: cpushare-server migrate)") from None
        self._serving_fd = fd

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

