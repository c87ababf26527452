"""The SQLite store's accounts, certificates and orders."""

from __future__ import annotations

import sqlite3
import time

from .rows import Account, BuyOrderRow, Cert, SellOrderRow, StoreError


class AccountsMixin:
    """Accounts, certificates and orders of SQLiteStore (sqlite.py).

    A balance read adds the ledger's entries not yet written (ledger.py).
    """

    db: sqlite3.Connection
    _deltas: dict[int, int]

    def add_account(self, name: str) -> int:
        try:
            with self.op():  # (PostgreSQL: the transaction goes on after the refusal)
                return self.db.execute("INSERT INTO accounts (name, created) VALUES (?, ?) "
                                       "RETURNING id", (name, time.time())).fetchone()[0]
        except self.IntegrityError:
            raise StoreError(f"account {name!r} exists already") from None

    def account(self, name: str) -> Account | None:
        row = self.db.execute("SELECT id, name, balance FROM accounts WHERE name = ?",
                              (name,)).fetchone()
        return Account(row[0], row[1], row[2] + self._deltas.get(row[0], 0)) if row else None

    def _id(self, name: str) -> int:
        """The id of system account `name`."""
        row = self.db.execute("SELECT id FROM accounts WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: system account {name} missing")
        return row[0]

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
            " memory, output, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (account_id, price_milli, model, cpu_seconds, wall_seconds, memory, output,
             time.time())).fetchone()[0]

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
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (account_id, price_milli, redundancy, max_cpu_seconds, time.time(),
             model, memory, max_nodes, accel, boot_seconds)).fetchone()[0]

    def buy_order(self, order_id: int) -> BuyOrderRow:
        row = self.db.execute("SELECT id, account_id, price_milli, redundancy, max_cpu_seconds, "
                              "model, memory, max_nodes, accel, boot_seconds FROM buy_orders "
                              "WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise StoreError(f"no buy order {order_id}")
        return BuyOrderRow(*row)
