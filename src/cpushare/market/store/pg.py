"""`PostgresStore`: the market's state in a PostgreSQL database (psycopg 3).

The same mixins as the SQLite store run on it: their SQL is the common
dialect of both engines (RETURNING, ON CONFLICT, COALESCE), written with
`?` placeholders, which the connection below turns into psycopg's `%s`.
Integer sums come back as Python ints (PostgreSQL's SUM of a bigint is a
numeric), byte strings as bytes.

What differs from SQLite:
- large inputs and outputs stay in their BYTEA columns (there is no
  directory beside a database other machines share);
- chunked images (ISOs) are files in `image_dir`, a directory of this
  machine given at open (`--images`);
- transactions are explicit (the connection is in autocommit and the store
  says BEGIN and COMMIT), at READ COMMITTED, one connection per store (and,
  in a serving process, a second that listens: pgfleet.Listener).

Several `serve` processes may serve one database, on one machine or many:
pgfleet.py (the store's side) and market/fleet.py (the market's).
"""

from __future__ import annotations

import contextlib
import time
from concurrent import futures
from decimal import Decimal

from .accounts import AccountsMixin
from .api import Store
from .images import ImagesMixin
from .ledger import LedgerMixin
from .pgfleet import PG_FLEET_SCHEMA, PgFleetMixin
from .pgahead import PgAheadMixin
from .pgjournal import APPLY, JOURNALED, Journal, PgJournalMixin
from .pgledger import PgLedgerMixin
from .pgschema import PG_SCHEMA
from .rows import ESCROW, MINT, StoreError
from .schema import SCHEMA_VERSION
from .tasks import TasksMixin
from .txn import TxnMixin


PIPELINED = 32768  # bytes: a bigger journal is sent before the commit's pipeline, on its own


def is_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise StoreError("a postgresql:// database needs psycopg 3 (Debian: python3-psycopg), "
                         "which is not installed") from None
    return psycopg


def _redact(url: str) -> str:
    """The URL without its password (for messages)."""
    head, sep, rest = url.partition("://")
    if "@" in rest:
        cred, _, host = rest.rpartition("@")
        user = cred.split(":", 1)[0]
        return f"{head}{sep}{user}@{host}"
    return url


class PgDb:
    """What the mixins need of a connection (sqlite3's face) over psycopg,
    and the journal of writes not yet sent (pgjournal.py)."""

    def __init__(self, conn):
        self.conn = conn
        self.journal = Journal()
        self.in_transaction = False  # (kept here: asking libpq costs a call through ctypes)
        self._begin = False  # BEGIN is owed: it goes with the first statement (begin_later)
        self.inflight: futures.Future | None = None  # a commit on its way, in another thread
        # a statement of the open transaction failed: it cannot commit (and the
        # journal it took with it is lost), only roll back
        self.failed: BaseException | None = None
        self._sql: dict[str, tuple[str, bool, int]] = {}
        # how often, and how long in all (s), a statement waited for a commit on its way
        self.waits, self.waited = 0, 0.0
        self.sent = 0  # statements sent from the loop's thread (the writer's are not)

    def _q(self, sql: str) -> tuple[str, bool, int]:
        """(psycopg's form of `sql`, whether it must follow the journal (it names
        a journaled table, or is a savepoint's), 1 if it begins a transaction,
        -1 if it ends one, 2 if it rolls back to a savepoint, else 0)."""
        q = self._sql.get(sql)
        if q is None:
            w0, w1 = [w.upper() for w in sql.split(None, 2)[:2] + [""]][:2]
            tx = (1 if w0 in ("BEGIN", "START") else
                  -1 if w0 in ("COMMIT", "END", "ABORT") or (w0 == "ROLLBACK" and w1 != "TO")
                  else 2 if w0 == "ROLLBACK" else 0)
            follows = (JOURNALED.search(sql) is not None or tx == 2
                       or w0 in ("SAVEPOINT", "RELEASE"))
            q = self._sql[sql] = (sql.replace("%", "%%").replace("?", "%s"), follows, tx)
        return q

    def _sent(self, fn, *args):
        """fn(*args) on the connection: a failure inside a transaction marks it failed."""
        try:
            return fn(*args)
        except BaseException as e:
            if self.in_transaction:
                self.failed = e
            raise

    def execute(self, sql: str, params=(), *, journal: bool = True):
        """`sql`, after the journal if it names a journaled table (and `journal`:
        False where the caller knows the journal holds nothing it reads)."""
        self.wait()
        self.sent += 1
        q, journaled, tx = self._q(sql)
        if journaled and journal and self.journal.layers:
            self.send_journal()
        if tx == 1:
            self._begin = False
        elif tx < 0:  # (over, whether it succeeds or not)
            self.in_transaction = False
            if self._begin:  # (nothing was sent: nothing to end)
                self._begin = False
                return self.conn.cursor()
        else:
            self.begun()
        cur = self.conn.cursor()
        self._sent(cur.execute, q, tuple(params) if params else None)
        if tx == 1:
            self.in_transaction = True
        elif tx < 0 or tx == 2:  # (whatever failed is undone)
            self.failed = None
        return cur

    def executemany(self, sql: str, seq):
        self.wait()
        q, journaled, _ = self._q(sql)
        if journaled and self.journal.layers:
            self.send_journal()
        self.begun()
        cur = self.conn.cursor()
        self._sent(cur.executemany, q, [tuple(p) for p in seq])
        return cur

    def begin_later(self) -> None:
        """A transaction, whose BEGIN goes out with its first statement: a group
        commit that only journals sends it with its COMMIT, in one round trip."""
        self._begin = self.in_transaction = True

    def wait(self) -> None:
        """Until the commit on its way (PostgresStore.commit_apart) is done: no
        statement of the next transaction goes before it."""
        f = self.inflight
        if f is not None:
            if not f.done():
                t0 = time.perf_counter()
                futures.wait([f])
                self.waits += 1
                self.waited += time.perf_counter() - t0
            self.inflight = None

    def begun(self) -> None:
        """The BEGIN owed, now (before a statement of the transaction)."""
        self.wait()
        if self._begin:
            self._begin = False
            self._sent(self.conn.execute, "BEGIN")

    def raw(self, sql: str) -> None:
        """`sql` as it is (no placeholders), in the transaction."""
        self.begun()
        self._sent(self.conn.execute, sql)

    @property
    def idle(self) -> bool:
        """Nothing of the open transaction was sent yet."""
        return self._begin

    def send_journal(self, runs: tuple | None = None) -> None:
        runs = self.journal.take() if runs is None else runs
        if runs is not None:
            self.begun()
            self._sent(self.conn.execute, APPLY, runs[:2])

    def take_commit(self) -> bool:
        """The open transaction ends here: whether its BEGIN is still owed.
        StoreError if a statement of it failed (then only a rollback ends it)."""
        self.wait()
        if self.failed is not None:
            raise StoreError(f"a statement of the transaction failed, it cannot commit: "
                             f"{self.failed!r}")
        begin, self._begin, self.in_transaction = self._begin, False, False
        return begin

    def send_commit(self, begin: bool, runs: tuple | None) -> None:
        """A transaction's end in one pipeline (BEGIN, if owed, the journal with
        its ledger and notifications, then COMMIT): in any thread, while no
        other uses the connection.  StoreError unless the server says COMMIT
        (a transaction that failed on the way is rolled back by its COMMIT)."""
        try:
            self._send_commit(begin, runs)
        except BaseException as e:
            self.failed = e  # (rollback() ends what is left of it)
            raise

    def _send_commit(self, begin: bool, runs: tuple | None) -> None:
        conn = self.conn
        one_by_one = runs is not None and runs[2] > PIPELINED
        # (psycopg 3.1's pipeline can hang on a big query: then one at a time)
        with contextlib.nullcontext() if one_by_one else conn.pipeline():
            if begin:
                conn.execute("BEGIN")
            if runs is not None:
                conn.execute(APPLY, runs[:2])
            end = conn.execute("COMMIT")
        if end.statusmessage != "COMMIT":
            raise StoreError(f"the transaction did not commit (the server says "
                             f"{end.statusmessage}): a statement of it failed")

    def close(self) -> None:
        self.conn.close()


class PgFilesMixin:
    """Large values stay in their columns; nothing to write, wait for or collect."""

    def _put(self, name: str, data: bytes | None):
        return data

    def _get(self, name: str, value) -> bytes:
        return bytes(value) if value else b""

    def _wait_files(self, name: str | None = None) -> None:
        pass

    def files_pending(self) -> bool:
        return False

    def collect_garbage(self) -> int:
        return 0


class PostgresStore(PgFilesMixin, PgAheadMixin, PgJournalMixin, PgFleetMixin, PgLedgerMixin,
                    AccountsMixin,
                    ImagesMixin, TasksMixin, LedgerMixin, TxnMixin, Store):
    big = float("inf")  # every input and output stays in its column
    in_file = b"file"  # the data of an image whose bytes are a file in image_dir
    snapshot_begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    def __init__(self, url: str, *, image_dir: str | None = None, create: bool = False):
        psycopg = _psycopg()
        self.path = _redact(url)
        self.IntegrityError = psycopg.errors.IntegrityError
        try:
            conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as e:
            raise StoreError(f"{self.path}: cannot connect to the market database: "
                             f"{str(e).strip()}") from None
        _int_sums(conn, psycopg)
        self.db = PgDb(conn)
        self._url, self._psycopg = url, psycopg
        self._init_fleet()
        self._sp = 0
        self._entries: list[tuple[int, int, int]] = []
        self._deltas: dict[int, int] = {}
        self._txns: list[tuple] = []  # ledger transactions not yet written (pgledger)
        self._unlink: list[str] = []
        self._id_blocks: dict[str, list[int]] = {}
        self._ids_wanted: dict[str, bool] = {}  # tables whose next block the writer takes
        self._ids_ahead: dict[str, list[int]] = {}  # ... taken (by the writer thread)
        self._carries: dict[tuple[int, int], int] = {}
        self._balances: dict[int, tuple[str, int]] = {}
        self._writer: futures.ThreadPoolExecutor | None = None  # commit_apart's thread
        self._init_ahead()
        if create and self.get_meta("ca_cert") is None:
            # (a database that holds a market keeps its schema: init and migrate
            # refuse it, and its tables' locks are not taken from the processes
            # serving it)
            with self.transaction():
                self.db.raw(PG_SCHEMA)
                self.db.raw(PG_FLEET_SCHEMA)  # (the journal's function: _upgrade_journal)
                if self.get_meta("schema_version") is None:
                    self.set_meta("schema_version", str(SCHEMA_VERSION))
                for name in (MINT, ESCROW):
                    self.db.execute("INSERT INTO accounts (name, system, created) "
                                    "VALUES (?, 1, ?) ON CONFLICT DO NOTHING", (name, time.time()))
        version = self.get_meta("schema_version")
        if version != str(SCHEMA_VERSION):
            self.db.close()
            raise StoreError(f"{self.path}: not a CPUShare market database of schema "
                             f"{SCHEMA_VERSION} (found {version!r}; run init first?)")
        self._upgrade_journal()  # (PgJournalMixin's)
        image_dir = image_dir or self.get_meta("image_dir")
        if not image_dir:
            self.db.close()
            raise StoreError(f"{self.path}: no directory for chunked images: give --images DIR")
        self.image_dir = image_dir
        self.mint_id = self._id(MINT)
        self.escrow_id = self._id(ESCROW)

    # --- transactions ---------------------------------------------------

    def begin(self) -> None:
        self._balances.clear()
        self._ahead_begin()
        self.db.begin_later()

    def commit(self) -> None:
        """The journal, the ledger, the notifications and COMMIT (and BEGIN, if
        nothing was sent before): one round trip."""
        self._end_transaction()()

    def pending(self) -> futures.Future | None:
        f = self.db.inflight
        return f if f is not None and not f.done() else None

    def loop_waits(self) -> tuple[int, float]:
        """(how many statements of the loop's thread waited for a commit on its
        way, how long in all, s)."""
        return self.db.waits, self.db.waited

    def commit_apart(self) -> futures.Future:
        """As commit(), in the store's writer thread: the caller goes on (with
        the next transaction: what it writes is journaled, and its first
        statement waits for this commit).  The future says how it went."""
        send = self._end_transaction()
        wanted, self._ids_wanted = self._ids_wanted, {}
        if wanted:
            def send(send=send):
                send()
                def q(sql, params):  # (after the COMMIT, no transaction open)
                    return self.db.conn.execute(self.db._q(sql)[0], params)
                for table in wanted:
                    try:
                        self._ids_ahead[table] = self._id_block(q, table)
                    except Exception:  # noqa: BLE001 (committed: _new_id takes one itself)
                        return
        return self._writer_submit(send)

    def _writer_submit(self, fn) -> futures.Future:
        """`fn` in the store's writer thread, after what was given it before; the
        loop's next statement waits for it."""
        if self._writer is None:
            self._writer = futures.ThreadPoolExecutor(1, thread_name_prefix="cpushare-commit")
        f = self.db.inflight = self._writer.submit(fn)
        return f

    def _end_transaction(self):
        """What the open transaction wrote, taken (and the store ready for the
        next): the call that sends it and commits."""
        db = self.db
        if db.idle and not (db.journal.layers or self._txns or self._entries
                            or self._notes_pending()):
            db.execute("COMMIT")  # (sends nothing)
            self._journal_committed()
            return _nothing
        ledger = self._ledger_run()
        runs = db.journal.take(([ledger] if ledger else []) + self._notes_runs())
        begin = db.take_commit()
        self._journal_committed()
        return lambda: db.send_commit(begin, runs)

    def rollback(self) -> None:
        self._entries, self._deltas, self._txns = [], {}, []
        self._drop_notes()
        self._journal_dropped()
        if self.db.in_transaction or self.db.failed is not None:
            self.db.execute("ROLLBACK")

    def close(self) -> None:
        try:
            self.rollback()
        except Exception:
            pass
        if self._writer is not None:
            self._writer.shutdown()
        self.db.close()

    def checkpoint_in_background(self, *args, **kw) -> None:
        """(PostgreSQL checkpoints by itself.)"""

    # --- settings -------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except _psycopg().errors.UndefinedTable:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            return None
        return row[0] if row else None



def _nothing() -> None:
    pass


def _int_sums(conn, psycopg) -> None:
    """numeric results (SUM of bigints) as ints when whole."""
    from psycopg.types.numeric import NumericLoader

    class IntNumericLoader(NumericLoader):
        def load(self, data):
            v = super().load(data)
            return int(v) if isinstance(v, Decimal) and v == v.to_integral_value() else v

    conn.adapters.register_loader("numeric", IntNumericLoader)
