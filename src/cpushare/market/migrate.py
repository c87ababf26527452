"""`cpushare-server migrate --from PATH --to postgresql://... --images DIR`:
a SQLite market's whole state moved into an empty PostgreSQL database.

Every table is copied row by row with its ids (the certificates the
sellers and buyers hold, the order ids in their files, the ledger's
transactions stay what they were), inside one PostgreSQL transaction read
from one SQLite snapshot: the copy is all or nothing.  Large values kept
in files beside the SQLite database go into their BYTEA columns; images of
chunked models are copied into DIR.  The identity sequences are set past
the copied ids.  `ledger check` must hold on the source before and on the
copy after, with the same totals, or nothing is committed.

Stop the market server first: rows it wrote after the snapshot would not
be copied.
"""

from __future__ import annotations

import os
import shutil

from .admin import AdminError, create_pg
from .store import IN_FILE, SQLiteStore, StoreError

# Each table, its columns in order, and which hold bytes.
TABLES = [
    ("meta", ["key", "value"], ()),
    ("accounts", ["id", "name", "system", "balance", "created"], ()),
    ("sell_orders", ["id", "account_id", "price_milli", "model", "cpu_seconds",
                     "wall_seconds", "memory", "output", "created"], ()),
    ("buy_orders", ["id", "account_id", "price_milli", "redundancy", "max_cpu_seconds",
                    "created", "model", "memory", "max_nodes", "accel", "boot_seconds"], ()),
    ("certs", ["fingerprint", "account_id", "role", "order_id", "not_after", "revoked",
               "common_name"], ()),
    ("images", ["digest", "data", "created", "account_id", "size", "used"], ("data",)),
    ("carries", ["buyer_account_id", "seller_account_id", "rest"], ()),
    ("tasks", ["id", "buy_order_id", "buyer_account_id", "ref", "image", "input",
               "redundancy", "cpu_ms", "bid_milli", "escrow_milli", "state", "exit_status",
               "signal", "reason", "used_cpu_ms", "cost_milli", "attempts", "output",
               "fail_code", "fail_message", "session", "delivered", "created", "model"],
     ("input", "output")),
    ("attempts", ["id", "task_id", "sell_order_id", "seller_account_id", "ask_milli", "state",
                  "cpu_ms", "output_sha256", "exit_status", "signal", "reason", "output",
                  "paid_milli", "started"], ("output",)),
    ("disputes", ["id", "task_id", "attempt_id", "seller_account_id", "output_sha256",
                  "majority_sha256", "created"], ()),
    ("transactions", ["id", "kind", "task_id", "memo", "created"], ()),
    ("entries", ["id", "txn_id", "account_id", "amount"], ()),
]
BATCH = 1000


def _file_name(table: str, column: str, row_id: int) -> str:
    return {("tasks", "input"): f"t{row_id}.in", ("tasks", "output"): f"t{row_id}.out",
            ("attempts", "output"): f"a{row_id}.out"}[(table, column)]


def migrate(src_path: str, url: str, images: str | None, out=print) -> dict:
    """Copy, check and commit; returns the copy's ledger summary.  AdminError
    says what stopped it (and then nothing is committed)."""
    if not images:
        raise AdminError("--images DIR: the directory of this machine the PostgreSQL market "
                         "keeps its chunked images in")
    try:
        src = SQLiteStore(src_path)
    except StoreError as e:
        raise AdminError(str(e)) from None
    try:
        problems = src.check()
        if problems:
            raise AdminError(f"{src_path}: ledger check fails; fix it before moving it: "
                             + "; ".join(problems[:3]))
        before = src.ledger_summary()
        dst, images = create_pg(url, images)
        try:
            if dst.db.execute("SELECT COUNT(*) FROM accounts WHERE system = 0").fetchone()[0] \
                    or dst.get_meta("ca_cert") is not None:
                raise AdminError(f"{dst.path}: holds a market already: moving into it would "
                                 f"mix two ledgers")
            counts = _copy(src, dst, images)
            after = dst.ledger_summary()
            problems = dst.check()
            if problems or after != before:
                raise AdminError(f"the copy does not check ({problems[:3]}; totals {after} "
                                 f"against {before}): nothing was committed")
            dst.commit()
        except BaseException:
            dst.rollback()
            dst.close()
            raise
        dst.close()
    finally:
        src.close()
    for table, n in counts.items():
        out(f"{table}: {n} rows")
    return after


def _copy(src: SQLiteStore, dst, images: str) -> dict:
    q = src.db.execute
    q("BEGIN")  # one snapshot of the source
    counts = {}
    try:
        dst.begin()
        # (the system accounts made by create are replaced by the source's own rows)
        dst.db.execute("DELETE FROM accounts")
        dst.db.execute("DELETE FROM meta WHERE key <> 'journal_version'")  # (the store's)
        for table, cols, blobs in TABLES:
            rows = q(f"SELECT {', '.join(cols)} FROM {table}")
            n = 0
            sql = (f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                   f"({', '.join('?' * len(cols))})")
            while batch := rows.fetchmany(BATCH):
                fixed = [_row(src, images, table, cols, blobs, r) for r in batch]
                dst.db.executemany(sql, fixed)
                n += len(fixed)
            counts[table] = n
            if "id" in cols:
                dst.db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                               f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)")
        dst.set_meta("image_dir", images)
    finally:
        q("COMMIT")
    return counts


def _row(src: SQLiteStore, images: str, table: str, cols: list[str], blobs, row) -> tuple:
    row = list(row)
    for col in blobs:
        i = cols.index(col)
        v = row[i]
        if v == IN_FILE:
            if table == "images":
                digest = row[cols.index("digest")]
                shutil.copyfile(os.path.join(src.image_dir, digest),
                                os.path.join(images, digest))
                os.chmod(os.path.join(images, digest), 0o444)
                row[i] = b"file"
            else:
                row[i] = src._get(_file_name(table, col, row[0]), v)
        elif isinstance(v, str):
            row[i] = v.encode()
    return tuple(row)
