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

        def read(conn):
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

        return self._apart(read, journal=False)  # (the refs' answers say what they hold)

    def _apart(self, body, journal: bool = True) -> futures.Future:
        """body(connection) in the writer thread, in the open transaction: the
        BEGIN owed first (the transaction's first statement is this), and with
        `journal` the journal, taken now, as a statement of the loop's thread
        would send it.  The loop goes on; the future has body's result."""
        db = self.db
        runs = db.journal.take() if journal else None

        def run():
            conn = db.conn
            if db._begin:
                db._begin = False
                conn.execute("BEGIN")
            if runs is not None:
                conn.execute(APPLY, runs[:2])
            return body(conn)

        return self._writer_submit(lambda: db._sent(run))

    def claim_apart(self, n: int, models: list[str], min_bid: int,
                    max_cpu_ms: int) -> futures.Future:
        """At most `n` tasks of the shared queue that sellers of these models,
        asks (from `min_bid`) and CPU time may run, highest bid first, locked
        rows (another's claim) skipped, and the attempts of those it took
        (_apart: the loop goes on).  Its result:
        ([(TaskRow, input or None, cancelled)], {task: [AttemptRow]})."""
        claim, attempts_of = self.db._q(_CLAIM)[0], self.db._q(_ATTEMPTS_OF)[0]
        args = (self.server_id, min_bid, models, max_cpu_ms, n)

        def run(conn):
            rows = [_loaded(r, True) for r in sorted(conn.execute(claim, args).fetchall())]
            ids = [r[0].id for r in rows]
            return rows, (_attempts(conn.execute(attempts_of, (ids,))) if ids else {})

        return self._apart(run)

    def release_apart(self, task_ids: list[int]) -> futures.Future:
        """These queued tasks of this server go to the shared queue (_apart: the
        journal sent first, so a task submitted in this group is inserted
        before it is offered)."""
        sql, args = self.db._q(_RELEASE)[0], (sorted(task_ids), self.server_id)
        self.notify_all("queue")

        def run(conn):
            conn.execute(sql, args)

        return self._apart(run)

    def results_apart(self, buy_order_id: int, unknown: list[int], want: list[int],
                      room: int) -> futures.Future:
        """The tasks of `unknown` that are the buy order's and wait for an ack
        (undelivered_refs' rows); then the results (store.Result) of those and
        of `want` that are done and not yet delivered, in id order, as long as
        they fit in `room` bytes with theirs before them (FRAME_EACH a frame's
        header counted too; the first is read whatever its size, as one
        result alone would be; none if `room` <= 0), and the tasks past that
        room, whose output is not read (owed: read when the buyer's budget has
        room).  One statement for results heard together, and no more output
        in memory than the buyer's budget has room for, but for a first result
        bigger than it (_apart: the loop goes on).  Its result: (rows,
        results, tasks past)."""
        among, within = self.db._q(_UNDELIVERED_AMONG)[0], self.db._q(_RESULTS_WITHIN)[0]

        def run(conn):
            rows = (list(conn.execute(among, (sorted(unknown), buy_order_id)))
                    if unknown else [])
            ids = sorted(set(want) | {r[2] for r in rows})
            if room <= 0 or not ids:
                return rows, [], ids
            return (rows, *self._within(conn.execute(within, (FRAME_EACH, room, ids))))

        return self._apart(run)

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
