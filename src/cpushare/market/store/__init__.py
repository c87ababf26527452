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

The package: rows.py (the rows, StoreError, the system accounts' names),
api.py (`Store`), and the SQLite store: schema.py (its tables and their
migrations), sqlite.py (`SQLiteStore`: the connection, transactions,
checkpoints) and the mixins it is made of, files.py (large values),
accounts.py, images.py, tasks.py and ledger.py.
"""

from .api import Store
from .files import BACKGROUND_WRITE, BIG, IN_FILE
from .rows import (ESCROW, MINT, Account, AttemptRow, BuyOrderRow, Cert, Result, SellOrderRow,
                   StoreError, TaskRow)
from .schema import SCHEMA_VERSION
from .sqlite import SQLiteStore

__all__ = ["Account", "AttemptRow", "BACKGROUND_WRITE", "BIG", "BuyOrderRow", "Cert", "ESCROW",
           "IN_FILE", "MINT", "Result", "SCHEMA_VERSION", "SQLiteStore", "SellOrderRow", "Store",
           "StoreError", "TaskRow"]
