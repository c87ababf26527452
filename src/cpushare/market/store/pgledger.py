"""The PostgreSQL store's ledger writes: a group commit's transactions,
entries and balance changes (and the accounts' row locks, taken in the
order of their ids) as one run of the commit's cpushare_apply call
(pgjournal.py), not three statements a transfer.

On SQLite a statement is a function call; on PostgreSQL it is a round trip
and a parse and plan on the server (about 35 us of its CPU and as much of
ours, measured by bench/market_tasks.py).  So `transfer` here writes
nothing: it takes the transaction's id from a block of the identity
sequence (one statement per ID_BLOCKS['transactions'] transfers), and the group's
transactions, entries and balance deltas go in at commit, as JSON arrays
in that call (psycopg's Python binding dumps an array parameter an element
at a time, in Python).  Reads of balances add what is pending,
as on SQLite; `check()` and `ledger_summary()` write what is pending
first.  Ids taken and not used (a rollback) leave gaps, which nothing
reads as meaning.
"""

from __future__ import annotations

import time

from .rows import StoreError


class PgLedgerMixin:
    _txns: list[tuple]

    def _txn_id(self) -> int:
        return self._new_id("transactions")  # (PgJournalMixin's)

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

    def _ledger_run(self) -> list | None:
        """What _write_ledger writes, as a run of cpushare_apply's (pgjournal's
        _TAIL_CASES: the same statements, in the same order), taken."""
        if not self._txns and not self._entries:
            return None
        txns = {t[0] for t in self._txns}
        if not all(e[0] in txns for e in self._entries):  # (what a foreign key checked)
            raise StoreError("the ledger's entries name a transaction it does not write")
        run = ["ledger", {"l": sorted((a, m) for a, m in self._deltas.items() if m),
                          "t": self._txns, "e": self._entries,
                          "a": sorted(self._deltas)}]  # (the accounts named: all must be)
        self._txns, self._entries, self._deltas = [], [], {}
        return run

    def _write_ledger(self) -> None:
        """What is pending, now (with the journal before it, in one call)."""
        run = self._ledger_run()
        if run is not None:
            self.db.send_journal(self.db.journal.take([run]))
