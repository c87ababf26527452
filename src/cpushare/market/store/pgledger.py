"""The PostgreSQL store's ledger writes: a group commit's transactions,
entries and balance changes as three statements (and the accounts' row
locks, taken in the order of their ids), not three a transfer.

On SQLite a statement is a function call; on PostgreSQL it is a round trip
and a parse and plan on the server (about 35 us of its CPU and as much of
ours, measured by bench/market_tasks.py).  So `transfer` here writes
nothing: it takes the transaction's id from a block of the identity
sequence (one statement per TXN_BLOCK transfers), and the group's
transactions, entries and balance deltas go in at commit, each as one
statement over arrays (unnest).  Reads of balances add what is pending,
as on SQLite; `check()` and `ledger_summary()` write what is pending
first.  Ids taken and not used (a rollback) leave gaps, which nothing
reads as meaning.
"""

from __future__ import annotations

import time


TXN_BLOCK = 1024


class PgLedgerMixin:
    _txns: list[tuple]

    def _txn_id(self) -> int:
        return self._new_id("transactions", TXN_BLOCK)  # (PgJournalMixin's)

    def transfer(self, kind: str, entries: list[tuple[int, int]], *,
                 task_id: int | None = None, memo: str = "") -> int:
        """As LedgerMixin.transfer; written at the commit."""
        entries = self._checked(kind, entries)  # (LedgerMixin's)
        if not entries:
            return 0
        txn = self._txn_id()
        self._txns.append((txn, kind, task_id, memo, time.time()))
        self._pend(txn, entries)  # (LedgerMixin's)
        return txn

    def _write_ledger(self, q=None) -> None:
        """(`q`: what runs a statement; the connection's at once by default.)"""
        if not self._txns and not self._entries:
            return
        q = q or self.db.execute
        changed = sorted((a, m) for a, m in self._deltas.items() if m)
        if changed:
            # The balances first, their rows locked in one order (their ids) by
            # every process, and with the lock an UPDATE of a balance takes
            # (which the entries' foreign keys do not conflict with): the
            # commits of two processes never wait for each other in a cycle.
            ids = [a for a, _ in changed]
            q("SELECT 1 FROM accounts WHERE id = ANY(?::bigint[]) ORDER BY id "
              "FOR NO KEY UPDATE", (ids,))
            q("UPDATE accounts a SET balance = a.balance + d.delta FROM "
              "unnest(?::bigint[], ?::bigint[]) AS d(id, delta) WHERE a.id = d.id",
              [ids, [m for _, m in changed]])
        if self._txns:
            cols = list(zip(*self._txns))
            q("INSERT INTO transactions (id, kind, task_id, memo, created) SELECT * FROM "
              "unnest(?::bigint[], ?::text[], ?::bigint[], ?::text[], ?::float8[])",
              [list(c) for c in cols])
        if self._entries:
            cols = list(zip(*self._entries))
            q("INSERT INTO entries (txn_id, account_id, amount) SELECT * FROM "
              "unnest(?::bigint[], ?::bigint[], ?::bigint[])", [list(c) for c in cols])
        self._txns, self._entries, self._deltas = [], [], {}
