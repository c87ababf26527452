"""Reads ahead, of PostgresStore (pg.py): what a submit or an open asks the
database (is this ref's result acknowledged already; the buyer account's
lock against the other processes, then its balance), read in the store's
writer thread, in the open transaction, while the event loop goes on.

The market asks before it handles the frame (Market._read_ahead), and the
answers wait here for the statements that would have asked them, in the
same transaction: delivered_task, try_lock, account_by_id answer from
them and send nothing.  An answer holds only while nothing it depends on
changed: the transaction it was read in (`_epoch`, one more at every
begin), and, for a ref, the journal's deliveries (a journal sent, or a
delivery journaled without its ref, since the read): otherwise the
statement is sent as before.  The order of statements on the connection
is the writer thread's: a read ahead goes after the commit on its way,
and the loop's own statements wait for it (PgDb.inflight).
"""

from __future__ import annotations

import contextlib
from concurrent import futures

from .pgfleet import (_ATTEMPTS_OF, _CLAIM, _RELEASE, _RESULTS_WITHIN, _UNDELIVERED_AMONG,
                      FLEET_LOCK, FRAME_EACH, LOCKS, _attempts, _loaded)
from .pgjournal import APPLY

# (of many refs at once: each ref and each id a lookup of its own, in a lateral
# subquery kept apart by OFFSET 0.  While the planner's statistics think an
# order's tasks are few (a new market, before autovacuum's first ANALYZE), an
# ANY() over the index's last column, or a join it may flatten, was planned as
# a scan of every task of the order, each time: 0.6 ms at 4,000 tasks, growing)
_REFS = ("SELECT r.ref, t.id FROM unnest(%s::text[]) AS r(ref) CROSS JOIN LATERAL "
         "(SELECT id FROM tasks WHERE buy_order_id = %s::bigint AND delivered = 1 AND "
         "ref = r.ref AND session = 0 OFFSET 0) t UNION ALL SELECT t.ref, t.id FROM "
         "unnest(%s::bigint[]) AS d(id) CROSS JOIN LATERAL (SELECT ref, id FROM tasks "
         "WHERE id = d.id AND buy_order_id = %s::bigint AND session = 0 OFFSET 0) t "
         "WHERE t.ref = ANY(%s::text[])")
_LOCK = "SELECT pg_try_advisory_xact_lock(%s::int, %s::int)"
_BALANCE = "SELECT name, balance FROM accounts WHERE id = %s"


class PgAheadMixin:
    """Of PostgresStore."""

    reads_ahead = True

    def _init_ahead(self) -> None:
        self._epoch = 0  # one more at every begin(): the answers are of one transaction
        self._refs_ahead: dict[tuple[int, str], tuple[tuple[int, int], int | None]] = {}
        self._locks_ahead: dict[tuple[str, int], bool] = {}

    def _ahead_begin(self) -> None:
        self._epoch += 1
        self._refs_ahead.clear()
        self._locks_ahead.clear()

    def _journal_mark(self) -> tuple[int, int]:
        """What a ref's answer depends on in the journal: its sends, its deliveries
        without a ref."""
        j = self.db.journal
        return j.taken, len(j.delivered)

    # --- asking ------------------------------------------------------------------

    def asks_ref(self, buy_order_id: int, ref: str) -> bool:
        """Whether delivered_task(buy_order_id, ref) would send a statement now."""
        j = self.db.journal
        k = (buy_order_id, ref)
        if k in j.acked or j.refs.get(k, -1) in j.delivered:
            return False  # (answered by the journal; or, acked in this group, asked at once)
        got = self._refs_ahead.get(k)
        return got is None or got[0] != self._journal_mark()

    def asks_lock(self, kind: str, key: int) -> bool:
        return (kind, key) not in self._locks_ahead

    def read_ahead(self, buy_order_id: int, refs: list[str],
                   account: int | None) -> futures.Future:
        """In the writer thread, in the open transaction: which of `refs` name a
        task of the buy order whose result is acknowledged, and `account`'s lock,
        then its balance (unless read in this transaction).  took_ahead() keeps
        the answers."""
        db = self.db
        epoch, mark = self._epoch, self._journal_mark()
        delivered = list(db.journal.delivered)
        balance = account is not None and account not in self._balances

        def read():
            conn = db.conn
            if db._begin:  # (the BEGIN owed: the transaction's first statement is this)
                db._begin = False
                db._sent(conn.execute, "BEGIN")
            found, locked, row = {}, None, None
            one = len(refs) + (account is not None) + balance == 1
            with contextlib.nullcontext() if one else conn.pipeline():  # (one: no pipeline)
                c_refs = []
                if len(refs) == 1:  # (delivered_task's own statement)
                    sql, args = self._delivered_sql(buy_order_id, refs[0], delivered)
                    c_refs.append(conn.execute(db._q(sql)[0], args))
                elif refs:
                    c_refs.append(conn.execute(_REFS, (refs, buy_order_id, delivered,
                                                       buy_order_id, refs)))
                c_lock = (conn.execute(_LOCK, (FLEET_LOCK + LOCKS["account"], account))
                          if account is not None else None)
                # (after the lock, in a statement of its own: its snapshot sees the
                # commit of whoever held the lock before)
                c_bal = conn.execute(_BALANCE, (account,)) if balance else None
            if len(refs) == 1:
                r = c_refs[0].fetchone()
                found[refs[0]] = r[0] if r else None
            elif refs:
                found = dict(c_refs[0].fetchall())
            if c_lock is not None:
                locked = c_lock.fetchone()[0]
            if c_bal is not None:
                row = c_bal.fetchone()
            return epoch, mark, buy_order_id, refs, found, account, locked, row

        return self._writer_submit(lambda: db._sent(read))

    def claim_apart(self, n: int, models: list[str], min_bid: int,
                    max_cpu_ms: int) -> futures.Future:
        """As claim(), then attempts_of() the tasks it took, in the writer thread
        and the open transaction (the journal sent before them, as a statement
        on the loop's thread would): the loop goes on.  Its result:
        ([(TaskRow, input, cancelled)], {task: [AttemptRow]})."""
        db = self.db
        runs = db.journal.take()
        claim, attempts_of = db._q(_CLAIM)[0], db._q(_ATTEMPTS_OF)[0]
        args = (self.server_id, min_bid, models, max_cpu_ms, n)

        def run():
            conn = db.conn
            if db._begin:  # (the BEGIN owed: the transaction's first statement is this)
                db._begin = False
                conn.execute("BEGIN")
            if runs is not None:
                conn.execute(APPLY, runs[:2])
            rows = [_loaded(r, True) for r in sorted(conn.execute(claim, args).fetchall())]
            ids = [r[0].id for r in rows]
            return rows, (_attempts(conn.execute(attempts_of, (ids,))) if ids else {})

        return self._writer_submit(lambda: db._sent(run))

    def release_apart(self, task_ids: list[int]) -> futures.Future:
        """As release(), in the writer thread and the open transaction (the
        journal sent first: a task submitted in this group is inserted before
        it is offered)."""
        db = self.db
        runs = db.journal.take()
        sql, args = db._q(_RELEASE)[0], (sorted(task_ids), self.server_id)
        self.notify_all("queue")

        def run():
            conn = db.conn
            if db._begin:
                db._begin = False
                conn.execute("BEGIN")
            if runs is not None:
                conn.execute(APPLY, runs[:2])
            conn.execute(sql, args)

        return self._writer_submit(lambda: db._sent(run))

    def results_apart(self, buy_order_id: int, unknown: list[int], want: list[int],
                      room: int) -> futures.Future:
        """In the writer thread (the journal sent first, in the open transaction
        if one is): undelivered_among(buy_order_id, unknown), then
        results_within() of those and `want` (none read if `room` <= 0: all
        are past it).  Its result: (undelivered rows, results, tasks past)."""
        db = self.db
        runs = db.journal.take()
        among, within = db._q(_UNDELIVERED_AMONG)[0], db._q(_RESULTS_WITHIN)[0]

        def run():
            conn = db.conn
            if db._begin:
                db._begin = False
                conn.execute("BEGIN")
            if runs is not None:
                conn.execute(APPLY, runs[:2])
            rows = (list(conn.execute(among, (sorted(unknown), buy_order_id)))
                    if unknown else [])
            ids = sorted(set(want) | {r[2] for r in rows})
            if room <= 0 or not ids:
                return rows, [], ids
            return (rows, *self._within(conn.execute(within, (FRAME_EACH, room, ids))))

        return self._writer_submit(lambda: db._sent(run))

    def took_ahead(self, answer) -> bool:
        """Keep the answers of a read ahead, for this transaction's statements,
        if it was read in this transaction (else False)."""
        epoch, mark, order, refs, found, account, locked, row = answer
        if epoch != self._epoch or not self.db.in_transaction:
            return False  # (a commit came between: asked again)
        for ref in refs:
            self._refs_ahead[order, ref] = (mark, found.get(ref))
        if locked is not None:
            self._locks_ahead["account", account] = locked
            if locked and row is not None:
                self._balances[account] = (row[0], row[1])
        return True

    # --- answering -----------------------------------------------------------------

    def _ref_ahead(self, buy_order_id: int, ref: str):
        """(True, the answer) if one read ahead holds; else (False, None)."""
        got = self._refs_ahead.get((buy_order_id, ref))
        if got is not None and got[0] == self._journal_mark():
            return True, got[1]
        return False, None

    def _lock_ahead(self, kind: str, key) -> bool | None:
        return self._locks_ahead.pop((kind, key), None)
