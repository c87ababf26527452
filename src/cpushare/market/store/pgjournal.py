"""The PostgreSQL store's write journal: a group commit's writes to tasks,
attempts, disputes and carries go to the database as one statement.

On PostgreSQL a statement costs a round trip, and with psycopg's Python
binding 60 .. 180 us of our CPU on top of the server's (docs/scale.md); a
tiny task wrote seven.  Here they are journaled instead: the ids of new
rows come from blocks of their sequences (as the ledger's transactions
do, pgledger.py), each write is a row appended to the journal in memory,
and the journal goes to the server as one call of `cpushare_apply` (big
inputs and outputs beside it, as bytea, not inside its JSON), a
function of the schema that replays it run by run: all the rows of one
kind of write, passed as one JSON array and written by one INSERT or
UPDATE over `jsonb_to_recordset` (see Journal for the order).

Reads see every write before them, exactly as before: a statement that
names a journaled table sends the journal first (`PgDb.execute`); one
that names none of them (accounts, orders, certificates, advisory locks,
sequences) runs without.  The ledger's rows and the notifications go in
at the commit, as runs after the journal's in the same call (_TAIL_CASES):
a commit is BEGIN, one call and COMMIT, in one pipeline, one round trip.

A run never holds two writes of one row (a second starts a new layer):
an UPDATE ... FROM joins each row once.
"""

from __future__ import annotations

import json
import re
import time

from .pgfleet import FLEET_LOCK, SCHEMA_LOCK
from .rows import Account, StoreError

# the tables whose writes are journaled: a statement naming one of them sends the journal first
JOURNALED = re.compile(r"\b(tasks|attempts|disputes|carries)\b")
# ids taken from a sequence at a time, per table: its increment (one nextval
# is a block; a block per row was 3 us of the server's CPU an id, and as much
# of ours to read it back)
ID_BLOCKS = {"tasks": 128, "attempts": 128, "transactions": 1024}
CARRY_CACHE = 65536  # (buyer, seller) pairs whose carry is kept in memory, at most
APPLY = "SELECT cpushare_apply(%s::jsonb, %b::bytea[])"  # (the journal's call)
INLINE = 4096  # bytes: a bigger input or output goes beside the JSON, as a bytea of its own

# kind: (the statement's columns and their types, the statement over the recordset `x`)
_KINDS = {
    "task": ("id bigint, buy_order_id bigint, buyer_account_id bigint, ref text, image text, "
             "input bytea, input_b int, redundancy bigint, cpu_ms bigint, bid_milli bigint, "
             "escrow_milli bigint, session bigint, created float8, model text",
             "INSERT INTO tasks (id, buy_order_id, buyer_account_id, ref, image, input, "
             "redundancy, cpu_ms, bid_milli, escrow_milli, session, created, model) "
             "SELECT x.id, x.buy_order_id, x.buyer_account_id, x.ref, x.image, "
             "COALESCE(x.input, blobs[x.input_b]), x.redundancy, x.cpu_ms, x.bid_milli, "
             "x.escrow_milli, x.session, x.created, x.model FROM x"),
    "attempt": ("id bigint, task_id bigint, sell_order_id bigint, seller_account_id bigint, "
                "ask_milli bigint, started float8",
                "INSERT INTO attempts (id, task_id, sell_order_id, seller_account_id, "
                "ask_milli, started) SELECT x.* FROM x"),
    "returned": ("id bigint, cpu_ms bigint, output_sha256 text, exit_status bigint, "
                 "signal bigint, reason text, output bytea, output_b int",
                 "UPDATE attempts a SET state = 'returned', cpu_ms = x.cpu_ms, "
                 "output_sha256 = x.output_sha256, exit_status = x.exit_status, "
                 "signal = x.signal, reason = x.reason, "
                 "output = COALESCE(x.output, blobs[x.output_b]) FROM x "
                 "WHERE a.id = x.id"),
    "metered": ("id bigint, cpu_ms bigint, paid_milli bigint",
                "UPDATE attempts a SET cpu_ms = x.cpu_ms, paid_milli = x.paid_milli "
                "FROM x WHERE a.id = x.id"),
    "settled": ("id bigint, state text, paid_milli bigint",
                "UPDATE attempts a SET state = x.state, paid_milli = x.paid_milli, "
                "output = NULL FROM x WHERE a.id = x.id"),
    "settled_result": ("id bigint, state text, paid_milli bigint, cpu_ms bigint, "
                       "output_sha256 text, exit_status bigint, signal bigint, reason text",
                       "UPDATE attempts a SET state = x.state, paid_milli = x.paid_milli, "
                       "output = NULL, cpu_ms = x.cpu_ms, output_sha256 = x.output_sha256, "
                       "exit_status = x.exit_status, signal = x.signal, reason = x.reason "
                       "FROM x WHERE a.id = x.id"),
    "finished": ("id bigint, state text, exit_status bigint, signal bigint, reason text, "
                 "used_cpu_ms bigint, cost_milli bigint, attempts bigint, output bytea, "
                 "output_b int, fail_code text, fail_message text",
                 "UPDATE tasks t SET state = x.state, exit_status = x.exit_status, "
                 "signal = x.signal, reason = x.reason, used_cpu_ms = x.used_cpu_ms, "
                 "cost_milli = x.cost_milli, attempts = x.attempts, "
                 "output = COALESCE(x.output, blobs[x.output_b]), "
                 "fail_code = x.fail_code, fail_message = x.fail_message, input = NULL, "
                 "escrow_milli = 0 FROM x WHERE t.id = x.id"),
    "delivered": ("id bigint",
                  "UPDATE tasks t SET delivered = 1, output = NULL FROM x WHERE t.id = x.id"),
    "dispute": ("task_id bigint, attempt_id bigint, seller_account_id bigint, "
                "output_sha256 text, majority_sha256 text, created float8",
                "INSERT INTO disputes (task_id, attempt_id, seller_account_id, output_sha256, "
                "majority_sha256, created) SELECT x.* FROM x"),
    "carry": ("buyer_account_id bigint, seller_account_id bigint, server bigint, rest bigint",
              "INSERT INTO carries (buyer_account_id, seller_account_id, server, rest) "
              "SELECT x.buyer_account_id, x.seller_account_id, x.server, x.rest FROM x "
              "ON CONFLICT (buyer_account_id, seller_account_id, server) "
              "DO UPDATE SET rest = excluded.rest"),
}


# the table of each kind's rows (a row's key is its table's)
_TABLE = {"task": "tasks", "finished": "tasks", "delivered": "tasks", "attempt": "attempts",
          "returned": "attempts", "metered": "attempts", "settled": "attempts",
          "settled_result": "attempts", "dispute": "disputes", "carry": "carries"}
_ORDER = {kind: i for i, kind in enumerate(_KINDS)}  # the order of the kinds in a layer
_INSERTS = {"task", "attempt", "dispute"}  # (the others update, or upsert, a row)


# The runs a commit adds after the journal's (Journal.take's `tail`): its
# ledger (pgledger.py: the balances' rows locked in the order of their ids,
# then changed; its transactions; their entries) and its notifications
# (pgfleet.py), each a run of its own, so that a commit is BEGIN, one call
# and COMMIT: psycopg's Python binding costs more CPU a statement, and
# more again an element of an array parameter, than a JSON value does.
_TAIL_CASES = """\
    WHEN 'ledger' THEN
      PERFORM 1 FROM accounts WHERE id = ANY(ARRAY(SELECT (d->>0)::bigint FROM
        jsonb_array_elements(r->1->'l') d)) ORDER BY id FOR NO KEY UPDATE;
      UPDATE accounts a SET balance = a.balance + (d->>1)::bigint
        FROM jsonb_array_elements(r->1->'l') d WHERE a.id = (d->>0)::bigint;
      INSERT INTO transactions (id, kind, task_id, memo, created)
        SELECT (d->>0)::bigint, d->>1, (d->>2)::bigint, d->>3, (d->>4)::float8
        FROM jsonb_array_elements(r->1->'t') d;
      INSERT INTO entries (txn_id, account_id, amount)
        SELECT (d->>0)::bigint, (d->>1)::bigint, (d->>2)::bigint
        FROM jsonb_array_elements(r->1->'e') d;
      IF (SELECT COUNT(*) FROM accounts WHERE id = ANY(ARRAY(SELECT a::bigint FROM
          jsonb_array_elements_text(r->1->'a') a))) <> jsonb_array_length(r->1->'a') THEN
        RAISE EXCEPTION 'cpushare_apply: a ledger entry names no account';
      END IF;
    WHEN 'notify' THEN
      PERFORM pg_notify(r->1->>0, p) FROM jsonb_array_elements_text(r->1->1) p;
    WHEN 'results' THEN
      PERFORM pg_notify((r->1->>0) || h.server, 'result ' || x.o || ' ' || x.t)
        FROM jsonb_to_recordset(r->1->1) AS x(o bigint, t bigint)
        JOIN buyer_homes h ON h.buy_order_id = x.o AND h.server <> (r->1->>2)::bigint;"""


def _function() -> str:
    cases = "\n".join(
        f"    WHEN '{kind}' THEN\n      WITH x AS (SELECT * FROM jsonb_to_recordset(r->1) "
        f"AS y({cols}))\n      {sql};" for kind, (cols, sql) in _KINDS.items())
    # (each run joins a few rows to their tables by primary key: the planner,
    # which guesses 100 rows for a recordset, would hash a whole table instead)
    return f"""
CREATE OR REPLACE FUNCTION cpushare_apply(runs jsonb, blobs bytea[]) RETURNS void
LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off AS $f$
DECLARE r jsonb;
BEGIN
  FOR r IN SELECT jsonb_array_elements(runs) LOOP
    CASE r->>0
{cases}
{_TAIL_CASES}
    END CASE;
  END LOOP;
END $f$;
"""


PG_JOURNAL_SCHEMA = _function()
JOURNAL_BODY = PG_JOURNAL_SCHEMA.split("$f$")[1]  # (pg_proc.prosrc)
# cpushare_apply's version, in meta (journal_version): 2 has the tail runs.  A
# store replaces an older one, never a newer (which knows every run of ours).
JOURNAL_VERSION = 2
# s an upgrade's step waits for a table's lock, each time: below PostgreSQL's
# deadlock_timeout (1 s), so that in a lock cycle with a serving process it is
# the upgrade that gives up (and tries again), never the process
UPGRADE_LOCK_WAIT = 0.5
UPGRADE_TRIES = 20


class Journal:
    """The writes waiting to be sent, of PgDb: in layers, each a run of rows
    per kind, replayed in the order of _KINDS (a lifecycle's: a task's row is
    inserted before it is finished, finished before it is delivered).  A
    write joins the open layer unless its row was already written there by
    a kind of that order or later: then it opens a layer, so that no row is
    ever written out of the order it was written in.  A second update of a
    row by the same kind (a carry, a meter) replaces the first: each sets
    the same columns."""

    def __init__(self):
        self.layers: list[dict[str, list]] = []  # kind: rows
        # row: (the order of its last kind, its place in that run), in the open layer
        self._last: dict[tuple[str, object], tuple[int, int]] = {}
        # what delivered_task asks of the journal without sending it
        self.delivered: set[int] = set()  # tasks marked delivered, of refs not given
        self.acked: set[tuple[int, str]] = set()  # (buy order, ref) of tasks marked delivered
        self.refs: dict[tuple[int, str], int] = {}  # (buy order, ref): task, of tasks added
        self.blobs: list[bytes] = []  # values past INLINE, passed beside the JSON
        self.size = 0  # bytes of the blobs
        self.taken = 0  # times it was sent or dropped (pgahead: answers read before)

    def bytea(self, row: dict, col: str, b: bytes | None) -> None:
        """`b` into `row` as column `col`: bytea's text input (hex) inside the
        JSON, or past INLINE bytes a place in the blobs (`col`_b, from 1)."""
        if b is None or len(b) <= INLINE:
            row[col] = None if b is None else "\\x" + bytes(b).hex()
        else:
            self.blobs.append(bytes(b))
            self.size += len(b)
            row[col] = None
            row[col + "_b"] = len(self.blobs)

    def add(self, kind: str, key, row: dict) -> None:
        order, k = _ORDER[kind], (_TABLE[kind], key)
        last = self._last.get(k)
        if last is not None and last[0] == order and kind not in _INSERTS:
            self.layers[-1][kind][last[1]] = row  # (it sets what the earlier one set)
            return
        if not self.layers or (last is not None and last[0] >= order):
            self.layers.append({})
            self._last = {}
        rows = self.layers[-1].setdefault(kind, [])
        self._last[k] = (order, len(rows))
        rows.append(row)

    def take(self, tail: list | None = None) -> tuple[str, list[bytes] | None, int] | None:
        """The journal as cpushare_apply's arguments, and their size in bytes,
        emptied; None if empty.  `tail`: runs to replay after it (_TAIL_CASES)."""
        if not self.layers and not tail:
            return None
        runs = [[kind, rows] for layer in self.layers
                for kind, rows in sorted(layer.items(), key=lambda kr: _ORDER[kr[0]])]
        if tail:
            runs += tail
        blobs, size = self.blobs or None, self.size
        self.clear()
        text = json.dumps(runs, separators=(",", ":"))
        return text, blobs, size + len(text)

    def clear(self) -> None:
        self.taken += 1
        self.layers, self._last, self.refs = [], {}, {}
        self.delivered, self.acked = set(), set()
        self.blobs, self.size = [], 0


class PgJournalMixin:
    """Of PostgresStore (pg.py): the journaled writes of TasksMixin and the
    carries of this process, kept in memory."""

    _id_blocks: dict[str, list[int]]
    _carries: dict[tuple[int, int], int]
    _balances: dict[int, tuple[str, int]]
    _deltas: dict[int, int]
    server_id: int | None

    def _new_id(self, table: str) -> int:
        """A new id of `table`'s rows, from a block taken of its sequence (ID_BLOCKS).
        Half-way through a block the next is asked for: the writer thread takes
        it after its next commit (commit_apart), and the loop waits for none."""
        ids = self._id_blocks.get(table)
        if not ids:
            ids = self._ids_ahead.pop(table, None)  # (the writer thread's, if it came)
            if not ids:
                ids = self._id_block(self.db.execute, table)
            self._id_blocks[table] = ids
        if len(ids) == ID_BLOCKS[table] // 2:
            self._ids_wanted[table] = True
        return ids.pop()

    @staticmethod
    def _id_block(execute, table: str) -> list[int]:
        """New ids of `table`, the smallest last: as many as its sequence's
        increment, read in the same statement (a sequence another version
        left at 1 gives blocks of one: slower, never an id twice)."""
        first, n = execute("SELECT nextval(pg_get_serial_sequence(?, 'id')), seqincrement "
                           "FROM pg_sequence WHERE seqrelid = "
                           "pg_get_serial_sequence(?, 'id')::regclass", (table, table)).fetchone()
        return list(range(first + n - 1, first - 1, -1))

    def _upgrade_journal(self) -> None:
        """A database made before the journal, or by an older version of it:
        this version's cpushare_apply (JOURNAL_VERSION: it knows every run of
        the older ones; a newer one, which knows ours, is left as it is),
        sequences whose increments are at least ID_BLOCKS (never lowered:
        _id_block takes whatever a sequence gives), and entries without
        foreign keys (pgschema._ENTRY_KEYS).  Each change is a transaction of
        its own under an advisory lock (processes starting together make it
        one at a time, each looking again under the lock), which waits at
        most UPGRADE_LOCK_WAIT for a table's lock and is tried again: an older
        process serving meanwhile is held up that long at most, and a lock
        cycle with it ends in the upgrade's retry (it gives up before
        PostgreSQL's deadlock check would pick a victim).  The store's role must
        own these tables, their sequences and the function."""
        if not self._journal_behind():
            return
        for step in (self._drop_entry_keys, self._raise_increments, self._replace_apply):
            self._upgrade_step(step)

    def _journal_behind(self) -> bool:
        version = self._journal_version()
        increments = dict(self.db.execute(
            "SELECT t.name, s.seqincrement FROM unnest(?::text[]) AS t(name) JOIN pg_sequence "
            "s ON s.seqrelid = pg_get_serial_sequence(t.name, 'id')::regclass",
            (sorted(ID_BLOCKS),)).fetchall())
        return (version < JOURNAL_VERSION or self._entry_keys() != []
                or any(increments.get(t, 0) < n for t, n in ID_BLOCKS.items()))

    def _journal_version(self) -> int:
        """Of the database's cpushare_apply: 0 if none (or not this version's
        body though it says so), 1 if made before versions."""
        row = self.db.execute("SELECT prosrc FROM pg_proc WHERE oid = "
                              "to_regprocedure('cpushare_apply(jsonb, bytea[])')").fetchone()
        if row is None:
            return 0
        said = self.get_meta("journal_version") or "1"
        version = int(said) if said.isdigit() else 0
        if version == JOURNAL_VERSION and row[0] != JOURNAL_BODY:
            return 0  # (replaced by a binary that did not say its version: ours again)
        return version

    def _entry_keys(self) -> list[str]:
        return [n for n, in self.db.execute("SELECT conname FROM pg_constraint WHERE contype "
                                            "= 'f' AND conrelid = 'entries'::regclass")]

    def _upgrade_step(self, step) -> None:
        import psycopg
        for _ in range(UPGRADE_TRIES):
            try:
                with self.transaction():
                    self.db.execute("SELECT pg_advisory_xact_lock(?::int, 0)",
                                    (FLEET_LOCK + SCHEMA_LOCK,))
                    self.db.raw(f"SET LOCAL lock_timeout = '{int(UPGRADE_LOCK_WAIT * 1000)}ms'")
                    step()
                return
            except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected):
                time.sleep(UPGRADE_LOCK_WAIT / 4)
        raise StoreError(f"{self.path}: could not upgrade the database's journal: other "
                         f"sessions held its tables' locks {UPGRADE_TRIES} times running "
                         f"(try again when the market is less busy)")

    def _drop_entry_keys(self) -> None:
        for name in self._entry_keys():
            self.db.raw(f'ALTER TABLE entries DROP CONSTRAINT "{name}"')

    def _raise_increments(self) -> None:
        for t, n in sorted(ID_BLOCKS.items()):
            seq, inc = self.db.execute(
                "SELECT s.seqrelid::regclass::text, s.seqincrement FROM pg_sequence s WHERE "
                "s.seqrelid = pg_get_serial_sequence(?, 'id')::regclass", (t,)).fetchone()
            if inc < n:  # (a lock of the sequence only, not of its table)
                self.db.raw(f"ALTER SEQUENCE {seq} INCREMENT BY {n}")

    def _replace_apply(self) -> None:
        if self._journal_version() < JOURNAL_VERSION:
            self.db.raw(PG_JOURNAL_SCHEMA)
            self.set_meta("journal_version", str(JOURNAL_VERSION))

    def _journal(self, kind: str, key, row: dict) -> None:
        self.db.journal.add(kind, key, row)
        if not self.db.in_transaction:  # (an admin's write: at once, as before)
            self.db.send_journal()

    def add_task(self, buy_order_id, buyer_account_id, ref, image, input_, redundancy,
                 cpu_ms, bid_milli, escrow_milli=0, session=False, model="seccomp") -> int:
        tid = self._new_id("tasks")
        row = {"id": tid, "buy_order_id": buy_order_id, "buyer_account_id": buyer_account_id,
               "ref": ref, "image": image, "redundancy": redundancy, "cpu_ms": cpu_ms,
               "bid_milli": bid_milli, "escrow_milli": escrow_milli,
               "session": int(session), "created": time.time(), "model": model}
        self.db.journal.bytea(row, "input", input_)
        self._journal("task", tid, row)
        if not session:
            self.db.journal.refs[buy_order_id, ref] = tid
        return tid

    def add_attempt(self, task_id, sell_order_id, seller_account_id, ask_milli) -> int:
        aid = self._new_id("attempts")
        self._journal("attempt", aid, {
            "id": aid, "task_id": task_id, "sell_order_id": sell_order_id,
            "seller_account_id": seller_account_id, "ask_milli": ask_milli,
            "started": time.time()})
        return aid

    def attempt_returned(self, attempt_id, cpu_ms, output_sha256, exit_status, signal, reason,
                         output) -> None:
        row = {"id": attempt_id, "cpu_ms": cpu_ms, "output_sha256": output_sha256,
               "exit_status": exit_status, "signal": signal, "reason": reason}
        self.db.journal.bytea(row, "output", output)
        self._journal("returned", attempt_id, row)

    def set_attempt_state(self, attempt_id: int, state: str, paid_milli: int = 0,
                          result: tuple | None = None) -> None:
        row = {"id": attempt_id, "state": state, "paid_milli": paid_milli}
        if result is None:
            self._journal("settled", attempt_id, row)
        else:
            cpu_ms, sha, status, sig, reason = result
            row.update(cpu_ms=cpu_ms, output_sha256=sha, exit_status=status, signal=sig,
                       reason=reason)
            self._journal("settled_result", attempt_id, row)

    def metered(self, attempt_id: int, cpu_ms: int, paid_milli: int) -> None:
        self._journal("metered", attempt_id,
                      {"id": attempt_id, "cpu_ms": cpu_ms, "paid_milli": paid_milli})

    def finish_task(self, task_id, state, *, exit_status=None, signal=None, reason="",
                    cpu_ms=0, cost_milli=0, attempts=0, output=b"", fail_code=None,
                    fail_message=None) -> None:
        row = {"id": task_id, "state": state, "exit_status": exit_status, "signal": signal,
               "reason": reason, "used_cpu_ms": cpu_ms, "cost_milli": cost_milli,
               "attempts": attempts, "fail_code": fail_code, "fail_message": fail_message}
        self.db.journal.bytea(row, "output", output)
        self._journal("finished", task_id, row)

    def mark_delivered(self, task_ids, refs=None) -> None:
        j = self.db.journal
        task_ids = list(task_ids)
        if refs is None:
            j.delivered.update(task_ids)
        else:
            j.acked.update(refs)
        for t in task_ids:
            self._journal("delivered", t, {"id": t})

    def delivered_task(self, buy_order_id: int, ref: str) -> int | None:
        """As TasksMixin's, without sending the journal: it answers for what it holds
        (every submit asks this, and the journal would go out a task at a time)."""
        j = self.db.journal
        if (buy_order_id, ref) in j.acked:
            row = self.db.execute("SELECT id FROM tasks WHERE buy_order_id = ? AND ref = ? "
                                  "AND session = 0 AND delivered = 1",
                                  (buy_order_id, ref)).fetchone()  # (sends the journal)
            return row[0] if row else None
        tid = j.refs.get((buy_order_id, ref))
        if tid is not None and tid in j.delivered:
            return tid
        held, answer = self._ref_ahead(buy_order_id, ref)  # (pgahead)
        if held:
            return answer
        row = self.db.execute(*self._delivered_sql(buy_order_id, ref, j.delivered),
                              journal=False).fetchone()
        return row[0] if row else None

    @staticmethod
    def _delivered_sql(buy_order_id: int, ref: str, delivered) -> tuple[str, tuple]:
        """The statement of delivered_task, the tasks the journal marks
        delivered (without their refs) being `delivered`."""
        sql = "SELECT id FROM tasks WHERE buy_order_id = ? AND delivered = 1 AND ref = ? " \
              "AND session = 0"
        args: tuple = (buy_order_id, ref)
        if delivered:  # (or marked so in the journal: by their keys, not a scan)
            sql += (" UNION ALL SELECT t.id FROM unnest(?::bigint[]) AS d(id) CROSS JOIN "
                    "LATERAL (SELECT id FROM tasks WHERE id = d.id AND buy_order_id = ? AND "
                    "ref = ? AND session = 0 OFFSET 0) t")  # (a key lookup each: pgahead._REFS)
            args += (list(delivered), buy_order_id, ref)
        return sql + " LIMIT 1", args

    def add_dispute(self, task_id, attempt_id, seller_account_id, output_sha256,
                    majority_sha256) -> None:
        self._journal("dispute", (task_id, attempt_id), {
            "task_id": task_id, "attempt_id": attempt_id,
            "seller_account_id": seller_account_id, "output_sha256": output_sha256,
            "majority_sha256": majority_sha256, "created": time.time()})

    # --- carries: each serving process writes only its own rows, so it keeps them

    def carry(self, buyer_account_id: int, seller_account_id: int) -> int:
        """This process's carry; outside a serving process (admin), all of them."""
        if self.server_id is None:
            return self.db.execute("SELECT COALESCE(SUM(rest), 0) FROM carries WHERE "
                                   "buyer_account_id = ? AND seller_account_id = ?",
                                   (buyer_account_id, seller_account_id)).fetchone()[0]
        key = (buyer_account_id, seller_account_id)
        rest = self._carries.get(key)
        if rest is None:  # (the journal holds no write of it: it would be in memory)
            row = self.db.execute("SELECT rest FROM carries WHERE buyer_account_id = ? AND "
                                  "seller_account_id = ? AND server = ?",
                                  (*key, self.server_id), journal=False).fetchone()
            rest = self._carries[key] = row[0] if row else 0
        return rest

    def set_carry(self, buyer_account_id: int, seller_account_id: int, rest: int) -> None:
        key = (buyer_account_id, seller_account_id)
        self._journal("carry", key, {
            "buyer_account_id": buyer_account_id,
            "seller_account_id": seller_account_id, "server": self.server_id or 0,
            "rest": rest})
        if self.server_id is not None:
            self._carries[key] = rest

    # --- balances: read once a group

    def account_by_id(self, account_id: int) -> Account:
        """As AccountsMixin's, the balance read once in a transaction: the market
        reads it under the account's lock (Fleet._lock, until the commit), so no
        other process takes from it meanwhile; what they give it counts from
        the next group on."""
        if not self.db.in_transaction:
            return super().account_by_id(account_id)
        got = self._balances.get(account_id)
        if got is None:
            a = super().account_by_id(account_id)  # (its balance with what is pending)
            got = self._balances[account_id] = (
                a.name, a.balance_milli - self._deltas.get(account_id, 0))
        return Account(account_id, got[0], got[1] + self._deltas.get(account_id, 0))

    def _journal_committed(self) -> None:
        self._balances.clear()
        if len(self._carries) > CARRY_CACHE:  # (all written: read again when needed)
            self._carries.clear()

    def _journal_dropped(self) -> None:
        self.db.journal.clear()
        self._balances.clear()
        self._carries.clear()  # (some may be of the writes rolled back)
