"""The SQLite store's double-entry ledger, the carries of settlement, and `check()`.

A transaction is a row of `transactions` and two or more rows of `entries`
whose amounts sum to zero, in integer milli-CPUCoins.  The entries of a
group commit and the balances they change are written together just before
its COMMIT; until then balances are read with what is pending added.
"""

from __future__ import annotations

import sqlite3
import time

from .rows import ESCROW, MINT, StoreError


class LedgerMixin:
    """Transfers, carries and the invariants of SQLiteStore (sqlite.py)."""

    db: sqlite3.Connection
    mint_id: int
    escrow_id: int
    _entries: list[tuple[int, int, int]]
    _deltas: dict[int, int]

    # --- carries (what settlement leaves below one milli) -----------------

    def carry(self, buyer_account_id: int, seller_account_id: int) -> int:
        row = self.db.execute("SELECT rest FROM carries WHERE buyer_account_id = ? AND "
                              "seller_account_id = ?",
                              (buyer_account_id, seller_account_id)).fetchone()
        return row[0] if row else 0

    def set_carry(self, buyer_account_id: int, seller_account_id: int, rest: int) -> None:
        self.db.execute("INSERT INTO carries (buyer_account_id, seller_account_id, rest) "
                        "VALUES (?, ?, ?) ON CONFLICT (buyer_account_id, seller_account_id) "
                        "DO UPDATE SET rest = excluded.rest",
                        (buyer_account_id, seller_account_id, rest))

    # --- the ledger -------------------------------------------------------

    def _checked(self, kind: str, entries: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """A transfer's entries without zeros; StoreError unless they balance in
        integers, inside a transaction."""
        if not self.db.in_transaction:
            raise StoreError("transfer outside a transaction")
        entries = [(a, m) for a, m in entries if m != 0]
        if sum(m for _, m in entries) != 0:
            raise StoreError(f"{kind} transaction does not balance: {entries}")
        if any(type(m) is not int for _, m in entries):
            raise StoreError(f"{kind} transaction has a non-integer amount: {entries}")
        return entries

    def transfer(self, kind: str, entries: list[tuple[int, int]], *,
                 task_id: int | None = None, memo: str = "") -> int:
        """One double-entry transaction: (account_id, amount) pairs summing to zero.

        Zero amounts are left out; a transaction with nothing left is not
        written (returns 0).  Must run inside a transaction.
        """
        entries = self._checked(kind, entries)
        if not entries:
            return 0
        txn = self.db.execute("INSERT INTO transactions (kind, task_id, memo, created) "
                              "VALUES (?, ?, ?, ?) RETURNING id",
                              (kind, task_id, memo, time.time())).fetchone()[0]
        self._pend(txn, entries)
        return txn

    def _pend(self, txn: int, entries: list[tuple[int, int]]) -> None:
        """The entries and the balances they change are written once per group
        commit (_write_ledger), in the same transaction: one statement each for
        many transfers.  Reads of balances add what is pending."""
        pending, deltas = self._entries, self._deltas
        for a, m in entries:
            pending.append((txn, a, m))
            deltas[a] = deltas.get(a, 0) + m

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
            q(self.snapshot_begin)  # a read transaction: one snapshot for every query below
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
            for n, in q("SELECT COUNT(*) FROM entries WHERE account_id NOT IN "
                        "(SELECT id FROM accounts)"):
                if n:
                    problems.append(f"{n} entries name no account")
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
