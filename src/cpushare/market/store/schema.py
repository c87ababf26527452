"""The SQLite store's tables, and the steps that bring an older schema up to date."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    system INTEGER NOT NULL DEFAULT 0,
    balance INTEGER NOT NULL DEFAULT 0,          -- milli-CPUCoins; == SUM(entries)
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sell_orders (
    id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL REFERENCES accounts(id),
    price_milli INTEGER NOT NULL, model TEXT NOT NULL, cpu_seconds INTEGER NOT NULL,
    wall_seconds INTEGER NOT NULL, memory INTEGER NOT NULL, output INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS buy_orders (
    id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL REFERENCES accounts(id),
    price_milli INTEGER NOT NULL, redundancy INTEGER NOT NULL,
    max_cpu_seconds INTEGER NOT NULL, created REAL NOT NULL,
    model TEXT NOT NULL DEFAULT 'seccomp', memory INTEGER NOT NULL DEFAULT 0,
    max_nodes INTEGER NOT NULL DEFAULT 0, accel TEXT NOT NULL DEFAULT 'any',
    boot_seconds INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS certs (
    fingerprint TEXT PRIMARY KEY, account_id INTEGER NOT NULL REFERENCES accounts(id),
    role TEXT NOT NULL CHECK (role IN ('seller', 'buyer')), order_id INTEGER NOT NULL,
    not_after REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, common_name TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (digest TEXT PRIMARY KEY, data BLOB NOT NULL,
    created REAL NOT NULL, account_id INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0, used REAL NOT NULL DEFAULT 0);
-- What a buyer owes a seller below one milli-CPUCoin, in milli x ms per
-- CPU-hour (0 .. 3 599 999): carried into their next settlement.
CREATE TABLE IF NOT EXISTS carries (buyer_account_id INTEGER NOT NULL,
    seller_account_id INTEGER NOT NULL, rest INTEGER NOT NULL,
    PRIMARY KEY (buyer_account_id, seller_account_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, buy_order_id INTEGER NOT NULL, buyer_account_id INTEGER NOT NULL,
    ref TEXT NOT NULL, image TEXT NOT NULL, input BLOB,
    redundancy INTEGER NOT NULL, cpu_ms INTEGER NOT NULL, bid_milli INTEGER NOT NULL,
    escrow_milli INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'done', 'failed')),
    exit_status INTEGER, signal INTEGER, reason TEXT, used_cpu_ms INTEGER,
    cost_milli INTEGER, attempts INTEGER, output BLOB, fail_code TEXT, fail_message TEXT,
    session INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
    model TEXT NOT NULL DEFAULT 'seccomp');
CREATE INDEX IF NOT EXISTS tasks_pending ON tasks (buy_order_id, delivered, ref);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL REFERENCES tasks(id),
    sell_order_id INTEGER NOT NULL, seller_account_id INTEGER NOT NULL,
    ask_milli INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'running',
    cpu_ms INTEGER, output_sha256 TEXT, exit_status INTEGER, signal INTEGER, reason TEXT,
    output BLOB, paid_milli INTEGER NOT NULL DEFAULT 0, started REAL NOT NULL);
CREATE INDEX IF NOT EXISTS attempts_task ON attempts (task_id);
CREATE TABLE IF NOT EXISTS disputes (
    id INTEGER PRIMARY KEY, task_id INTEGER NOT NULL, attempt_id INTEGER NOT NULL,
    seller_account_id INTEGER NOT NULL, output_sha256 TEXT, majority_sha256 TEXT,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS transactions (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, task_id INTEGER, memo TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, txn_id INTEGER NOT NULL REFERENCES transactions(id),
    account_id INTEGER NOT NULL REFERENCES accounts(id), amount INTEGER NOT NULL);
-- No more indexes than the market's queries need while it serves: every
-- index is pages more in each commit.  The checks scan.
"""


def migrate(db: sqlite3.Connection, version: int) -> None:
    """The changes from schema `version` to SCHEMA_VERSION, inside the caller's transaction."""
    if version < 2:  # carries, and who stored each image
        db.execute("CREATE TABLE IF NOT EXISTS carries (buyer_account_id INTEGER "
                   "NOT NULL, seller_account_id INTEGER NOT NULL, rest INTEGER "
                   "NOT NULL, PRIMARY KEY (buyer_account_id, seller_account_id))"
                   " WITHOUT ROWID")
        for col in ("account_id INTEGER NOT NULL DEFAULT 0",
                    "size INTEGER NOT NULL DEFAULT 0", "used REAL NOT NULL DEFAULT 0"):
            db.execute(f"ALTER TABLE images ADD COLUMN {col}")
        db.execute("UPDATE images SET size = length(data), used = created")
    if version < 3:  # the computation model of buy orders and tasks
        for table in ("buy_orders", "tasks"):
            db.execute(f"ALTER TABLE {table} ADD COLUMN model TEXT NOT NULL "
                       f"DEFAULT 'seccomp'")
    if version < 4:  # the kvm model's buy order settings
        for col in ("memory INTEGER NOT NULL DEFAULT 0",
                    "max_nodes INTEGER NOT NULL DEFAULT 0",
                    "accel TEXT NOT NULL DEFAULT 'any'",
                    "boot_seconds INTEGER NOT NULL DEFAULT 0"):
            db.execute(f"ALTER TABLE buy_orders ADD COLUMN {col}")
