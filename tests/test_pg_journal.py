"""The PostgreSQL store's write journal (store/pgjournal.py): the order it
replays writes in, and, against a real cluster, that any interleaving of
journaled writes and reads gives the same answers and the same rows as
the SQLite store, where every write is a statement at once."""

from __future__ import annotations

import json
import random

import pytest

from cpushare.market.store import SQLiteStore
from cpushare.market.store.pgjournal import Journal


def _runs(j: Journal) -> list[tuple[str, list]]:
    return [(kind, [r["id"] for r in rows]) for kind, rows in json.loads(j.take()[0])]


def test_a_layer_replays_each_rows_writes_in_the_order_they_were_made():
    j = Journal()
    j.add("finished", 1, {"id": 1})
    j.add("task", 2, {"id": 2})  # another row: an earlier kind joins the layer
    j.add("finished", 2, {"id": 2})
    j.add("delivered", 1, {"id": 1})
    assert _runs(j) == [("task", [2]), ("finished", [1, 2]), ("delivered", [1])]


def test_a_row_written_again_by_an_earlier_kind_opens_a_layer():
    j = Journal()
    j.add("settled", 7, {"id": 7})
    j.add("metered", 7, {"id": 7})  # (metered comes before settled in a layer)
    j.add("metered", 8, {"id": 8})
    assert _runs(j) == [("settled", [7]), ("metered", [7, 8])]


def test_a_second_update_by_the_same_kind_replaces_the_first_but_an_insert_never_does():
    j = Journal()
    j.add("carry", (1, 2), {"id": 0, "rest": 5})
    j.add("carry", (1, 3), {"id": 1, "rest": 6})
    j.add("carry", (1, 2), {"id": 0, "rest": 9})
    assert [(k, [r["rest"] for r in rows]) for k, rows in json.loads(j.take()[0])] == \
        [("carry", [9, 6])]
    j.add("dispute", (1, 1), {"id": 1})
    j.add("dispute", (1, 1), {"id": 1})
    assert _runs(j) == [("dispute", [1]), ("dispute", [1])]


def test_the_same_kind_on_another_table_is_another_row():
    j = Journal()
    j.add("finished", 3, {"id": 3})  # task 3
    j.add("settled", 3, {"id": 3})  # attempt 3: an earlier kind, another table
    assert _runs(j) == [("settled", [3]), ("finished", [3])]


def _stores(tmp_path, url):
    from cpushare.market.store.pg import PostgresStore
    lite = SQLiteStore(str(tmp_path / "m.db"), create=True)
    pg = PostgresStore(url, image_dir=str(tmp_path / "images"), create=True)
    return lite, pg


def _setup(s) -> tuple:
    with s.transaction():
        buyer, seller = s.add_account("buyer"), s.add_account("seller")
        so = s.add_sell_order(seller, 10, "seccomp", 60, 120, 64 << 20, 1 << 20)
        bo = s.add_buy_order(buyer, 20, 1, 60)
    return buyer, seller, so, bo


_TASK_COLS = ("id, buy_order_id, ref, input, state, exit_status, signal, reason, used_cpu_ms, "
              "cost_milli, attempts, output, fail_code, fail_message, delivered, escrow_milli")
_ATTEMPT_COLS = ("id, task_id, state, cpu_ms, output_sha256, exit_status, signal, reason, "
                 "output, paid_milli")


def _rows(s) -> dict:
    """The journaled tables, their ids as ranks (PostgreSQL takes ids from
    blocks, SQLite one more than the last: only their order is the same)."""
    def norm(rows):
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]
    tasks = norm(s.db.execute(f"SELECT {_TASK_COLS} FROM tasks ORDER BY id"))
    attempts = norm(s.db.execute(f"SELECT {_ATTEMPT_COLS} FROM attempts ORDER BY id"))
    t_rank = {r[0]: i for i, r in enumerate(tasks)}
    a_rank = {r[0]: i for i, r in enumerate(attempts)}
    disputes = norm(s.db.execute("SELECT task_id, attempt_id, output_sha256 FROM disputes"))
    return {
        "tasks": [(t_rank[r[0]], *r[1:]) for r in tasks],
        "attempts": [(a_rank[r[0]], t_rank[r[1]], *r[2:]) for r in attempts],
        "disputes": sorted((t_rank[t], a_rank[a], h) for t, a, h in disputes),
        "carries": norm(s.db.execute("SELECT buyer_account_id, seller_account_id, rest "
                                     "FROM carries ORDER BY 1, 2")),
    }


class _Twin:
    """One random script played on both stores, in group transactions; every
    read's answer compared as it is made."""

    def __init__(self, stores, rng):
        self.stores, self.rng = stores, rng
        self.tasks: list[tuple[int, str]] = []  # (id, ref), as both stores gave them
        self.attempts: list[int] = []
        self.n = 0

    def both(self, fn):
        answers = [fn(s, i) for i, s in enumerate(self.stores)]
        assert answers[0] == answers[1], answers
        return answers[0]

    def step(self, bo, buyer, seller, so):
        r, rng = self.rng.random(), self.rng
        if r < 0.2 or not self.tasks:
            self.n += 1
            ref = f"r{self.n}"
            data = rng.randbytes(rng.choice((0, 3, 40, 5000)))  # (past INLINE: a blob)
            ids = [s.add_task(bo, buyer, ref, "img", data, 1, 100, 20, 7) for s in self.stores]
            self.tasks.append((ids, ref))
        elif r < 0.35:
            ids, _ = rng.choice(self.tasks)
            aids = [s.add_attempt(t, so, seller, 10) for s, t in zip(self.stores, ids)]
            self.attempts.append(aids)
        elif r < 0.45 and self.attempts:
            aids = rng.choice(self.attempts)
            out = rng.randbytes(rng.choice((5, 9000)))
            for s, a in zip(self.stores, aids):
                s.attempt_returned(a, 5, "ab" * 32, 0, None, "", out)
        elif r < 0.55 and self.attempts:
            aids, state = rng.choice(self.attempts), rng.choice(("accepted", "void", "lost"))
            res = rng.choice((None, (9, "cd" * 32, 1, 9, "why")))
            for s, a in zip(self.stores, aids):
                s.set_attempt_state(a, state, 3, res)
        elif r < 0.6 and self.attempts:
            aids, cpu = rng.choice(self.attempts), rng.randrange(1000)
            for s, a in zip(self.stores, aids):
                s.metered(a, cpu, cpu // 10)
        elif r < 0.7:
            ids, _ = rng.choice(self.tasks)
            state = rng.choice(("done", "failed"))
            out = rng.randbytes(rng.choice((4, 6000)))
            for s, t in zip(self.stores, ids):
                s.finish_task(t, state, exit_status=0, cpu_ms=5, cost_milli=2, attempts=1,
                              output=out, fail_code=None if state == "done" else "x")
        elif r < 0.8:
            ids, ref = rng.choice(self.tasks)
            give = rng.random() < 0.5
            for s, t in zip(self.stores, ids):
                s.mark_delivered([t], [(bo, ref)] if give else None)
        elif r < 0.85 and self.attempts:
            ids, _ = rng.choice(self.tasks)
            aids = rng.choice(self.attempts)
            for s, t, a in zip(self.stores, ids, aids):
                s.add_dispute(t, a, seller, "ef" * 32, "ab" * 32)
        elif r < 0.9:
            rest = rng.randrange(3_600_000)
            for s in self.stores:
                s.set_carry(buyer, seller, rest)
            self.both(lambda s, i: s.carry(buyer, seller))
        else:  # the reads a market makes while its group is open
            ids, ref = rng.choice(self.tasks)
            self.both(lambda s, i: s.delivered_task(bo, ref) is None)
            self.both(lambda s, i: s.delivered_task(bo, ref + "-new"))
            self.both(lambda s, i: s.pending_task(bo, ref) is None)
            self.both(lambda s, i: s.task(ids[i]).state)
            self.both(lambda s, i: [a.state for a in s.attempts(ids[i])])
            self.both(lambda s, i: s.carry(buyer, seller))


@pytest.mark.parametrize("seed", range(6))
def test_any_interleaving_of_writes_and_reads_is_what_sqlite_makes(tmp_path, pg_cluster, seed):
    lite, pg = _stores(tmp_path, pg_cluster.database())
    try:
        pg.server_id = 1  # (a serving process: carries kept in memory, its own rows)
        buyer, seller, so, bo = _setup(lite)
        assert _setup(pg) == (buyer, seller, so, bo)
        twin = _Twin((lite, pg), random.Random(seed))
        for group in range(30):
            for s in twin.stores:
                s.begin()
            for _ in range(twin.rng.randrange(1, 25)):
                twin.step(bo, buyer, seller, so)
            if twin.rng.random() < 0.1:  # a group rolled back: on both, nothing of it stays
                for s in twin.stores:
                    s.rollback()
                twin.tasks = [t for t in twin.tasks if lite.db.execute(
                    "SELECT 1 FROM tasks WHERE id = ?", (t[0][0],)).fetchone()]
                twin.attempts = [a for a in twin.attempts if lite.db.execute(
                    "SELECT 1 FROM attempts WHERE id = ?", (a[0],)).fetchone()]
                continue
            for s in twin.stores:
                s.commit()
        want = _rows(lite)
        assert _rows(pg) == want
        assert sum(len(v) for v in want.values()) > 30  # (the script wrote something)
    finally:
        lite.close()
        pg.close()


@pytest.mark.parametrize("read_first", [False, True], ids=["at the commit", "at a read"])
def test_a_write_the_server_refuses_fails_the_commit_and_nothing_of_its_group_stays(
        tmp_path, pg_cluster, read_first):
    """A journaled write PostgreSQL refuses (a NUL in a text: the protocol
    refuses it from peers, the store must not count on that) fails the
    commit, whether the journal went out at a read or at the commit itself;
    the group is lost whole, and the store serves the next one."""
    import psycopg
    from cpushare.market.store import StoreError
    _, pg = _stores(tmp_path, pg_cluster.database())
    try:
        buyer, seller, so, bo = _setup(pg)
        pg.begin()
        pg.add_task(bo, buyer, "fine", "img", b"x", 1, 100, 20, 7)
        pg.add_task(bo, buyer, "bad\x00ref", "img", b"x", 1, 100, 20, 7)
        if read_first:
            with pytest.raises(Exception):
                pg.task(1)  # (the read sends the journal, which fails)
        with pytest.raises((StoreError, psycopg.Error)):
            pg.commit()  # (never as if it had committed)
        pg.rollback()
        assert pg.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 0
        with pg.transaction():
            pg.add_task(bo, buyer, "next", "img", b"y", 1, 100, 20, 7)
        assert [r[0] for r in pg.db.execute("SELECT ref FROM tasks")] == ["next"]
    finally:
        pg.close()


def test_a_savepoint_rolled_back_takes_its_journaled_writes_with_it(tmp_path, pg_cluster):
    """Writes journaled inside a savepoint that is rolled back are gone, those
    before it stay (the savepoint's statements send the journal first)."""
    lite, pg = _stores(tmp_path, pg_cluster.database())
    try:
        for s in (lite, pg):
            buyer, seller, so, bo = _setup(s)
            s.begin()
            s.add_task(bo, buyer, "kept", "img", b"a", 1, 100, 20, 7)
            with pytest.raises(ZeroDivisionError):
                with s.op():
                    s.add_task(bo, buyer, "undone", "img", b"b", 1, 100, 20, 7)
                    1 / 0
            s.add_task(bo, buyer, "after", "img", b"c", 1, 100, 20, 7)
            s.commit()
        assert [r[0] for r in pg.db.execute("SELECT ref FROM tasks ORDER BY id")] == \
            [r[0] for r in lite.db.execute("SELECT ref FROM tasks ORDER BY id")] == \
            ["kept", "after"]
    finally:
        lite.close()
        pg.close()


def test_a_store_upgrades_an_older_apply_function_and_id_sequences_and_commits_in_one_call(
        tmp_path, pg_cluster):
    """A database whose cpushare_apply is of an older version (no ledger runs:
    its commits sent the ledger as statements of their own) gets this
    version's when a store opens it; a commit is then BEGIN, one call and
    COMMIT, and writes the same ledger, balances and notifications."""
    import psycopg
    from cpushare.market.store.pg import PostgresStore
    from cpushare.market.store.pgfleet import CHANNEL
    from cpushare.market.store.pgjournal import ID_BLOCKS, JOURNAL_BODY
    url = pg_cluster.database()
    _, pg = _stores(tmp_path, url)
    pg.close()
    old = JOURNAL_BODY.split("    WHEN 'ledger' THEN")[0] + "    END CASE;\n  END LOOP;\nEND "
    increments = ("SELECT seqincrement FROM pg_sequence WHERE seqrelid = "
                  "pg_get_serial_sequence(%s, 'id')::regclass")
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE OR REPLACE FUNCTION cpushare_apply(runs jsonb, blobs bytea[]) "
                  "RETURNS void LANGUAGE plpgsql AS $f$" + old + "$f$")
        c.execute("DELETE FROM meta WHERE key = 'journal_version'")  # (made before versions)
        for t in ID_BLOCKS:  # (an older version's sequences: an id a nextval)
            seq = c.execute("SELECT pg_get_serial_sequence(%s, 'id')", (t,)).fetchone()[0]
            c.execute(f"ALTER SEQUENCE {seq} INCREMENT BY 1")
        c.execute("SELECT nextval(pg_get_serial_sequence('tasks', 'id'))")  # (one taken)
        c.execute("ALTER TABLE entries ADD FOREIGN KEY (txn_id) REFERENCES transactions(id), "
                  "ADD FOREIGN KEY (account_id) REFERENCES accounts(id)")  # (an older schema's)
    pg = PostgresStore(url, image_dir=str(tmp_path / "images"))
    other = PostgresStore(url, image_dir=str(tmp_path / "images"))
    listener = psycopg.connect(url, autocommit=True)
    try:
        assert pg.db.execute("SELECT prosrc FROM pg_proc WHERE proname = 'cpushare_apply'"
                             ).fetchone()[0] == JOURNAL_BODY
        for t, n in ID_BLOCKS.items():
            assert listener.execute(increments, (t,)).fetchone()[0] == n
        assert listener.execute("SELECT COUNT(*) FROM pg_constraint WHERE contype = 'f' AND "
                                "conrelid = 'entries'::regclass").fetchone()[0] == 0
        # two stores' blocks, taken in turn: never an id twice, each a whole block
        taken = [pg._id_block(pg.db.execute, "tasks"), other._id_block(other.db.execute, "tasks"),
                 pg._id_block(pg.db.execute, "tasks")]
        assert all(len(b) == ID_BLOCKS["tasks"] for b in taken)
        assert len(set().union(*taken)) == 3 * ID_BLOCKS["tasks"]
        heard = []
        listener.add_notify_handler(lambda n: heard.append(n.payload))
        listener.execute(f"LISTEN {CHANNEL}")
        buyer, seller, so, bo = _setup(pg)
        pg.begin()
        pg.transfer("mint", [(pg.mint_id, -5000), (buyer, 5000)], memo="it's \"quoted\"")
        pg.transfer("mint", [(pg.mint_id, -700), (seller, 700)], task_id=None)
        pg.notify_all("hello there")
        sent = pg.db.sent
        pg.commit_apart().result(10)
        assert pg.db.sent == sent, "the commit sent a statement of the loop's"
        assert pg.account_by_id(buyer).balance_milli == 5000
        assert pg.account_by_id(seller).balance_milli == 700
        rows = pg.db.execute("SELECT t.kind, t.memo, e.account_id, e.amount FROM entries e "
                             "JOIN transactions t ON t.id = e.txn_id ORDER BY e.id").fetchall()
        assert rows == [("mint", "it's \"quoted\"", pg.mint_id, -5000),
                        ("mint", "it's \"quoted\"", buyer, 5000),
                        ("mint", "", pg.mint_id, -700), ("mint", "", seller, 700)]
        listener.execute("SELECT 1")  # (its notifications are taken in on the way)
        assert heard == ["hello there"]
        assert pg.check() == []
        # a newer version's function (it knows our runs) is left as it is, and
        # an increment above ours is never lowered
        seq = listener.execute("SELECT pg_get_serial_sequence('tasks', 'id')").fetchone()[0]
        listener.execute(f"ALTER SEQUENCE {seq} INCREMENT BY 4096")
        listener.execute("UPDATE meta SET value = '3' WHERE key = 'journal_version'")
        listener.execute("CREATE OR REPLACE FUNCTION cpushare_apply(runs jsonb, blobs bytea[]) "
                         "RETURNS void LANGUAGE plpgsql AS $f$" + JOURNAL_BODY.replace(
                             "DECLARE r jsonb;", "DECLARE r jsonb; -- newer") + "$f$")
        PostgresStore(url, image_dir=str(tmp_path / "images")).close()
        assert "-- newer" in listener.execute(
            "SELECT prosrc FROM pg_proc WHERE proname = 'cpushare_apply'").fetchone()[0]
        assert listener.execute(increments, ("tasks",)).fetchone()[0] == 4096
        assert len(pg._id_block(pg.db.execute, "tasks")) == 4096
    finally:
        listener.close()
        other.close()
        pg.close()


def test_an_entry_naming_no_account_fails_its_commit_and_ledger_check_finds_one(
        tmp_path, pg_cluster):
    """The entries have no foreign keys on PostgreSQL (pgschema._ENTRY_KEYS): the
    commit's ledger run refuses an entry that names no account, and the group
    is lost whole; an entry written past it (by hand) is found by `ledger
    check`, as on SQLite."""
    import contextlib
    import psycopg
    from cpushare.market.store import StoreError
    url = pg_cluster.database()
    lite, pg = _stores(tmp_path, url)
    try:
        buyer, seller, so, bo = _setup(pg)
        pg.begin()
        pg.add_task(bo, buyer, "in the group", "img", b"x", 1, 100, 20, 7)
        pg.transfer("mint", [(pg.mint_id, -10), (99999, 10)])
        with pytest.raises((StoreError, psycopg.Error), match="names no account"):
            pg.commit_apart().result(10)
        pg.rollback()
        assert pg.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 0
        assert pg.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 0
        assert pg.check() == []
        import sqlite3
        by_hand = {lite: lambda: sqlite3.connect(str(tmp_path / "m.db")),  # (keys off)
                   pg: lambda: psycopg.connect(url)}
        for s, someone in ((lite, _setup(lite)[0]), (pg, buyer)):
            with s.transaction():
                s.transfer("mint", [(s.mint_id, -10), (someone, 10)])
            txn = s.db.execute("SELECT MAX(id) FROM transactions").fetchone()[0]
            with contextlib.closing(by_hand[s]()) as c:
                c.execute("INSERT INTO entries (txn_id, account_id, amount) VALUES "
                          f"({int(txn)}, 99999, 0)")
                c.commit()
            assert "1 entries name no account" in s.check()
    finally:
        lite.close()
        pg.close()


def test_an_upgrade_blocked_by_a_table_lock_gives_up_clearly_and_succeeds_later(
        tmp_path, pg_cluster, monkeypatch):
    """An upgrade's step waits a bounded time for a table's lock (an older
    process's open transaction, say), tries again, then refuses to open with
    a clear error; nothing is half done, and the next open upgrades."""
    import psycopg
    from cpushare.market.store import StoreError
    from cpushare.market.store import pgjournal
    from cpushare.market.store.pg import PostgresStore
    url = pg_cluster.database()
    _, pg = _stores(tmp_path, url)
    pg.close()
    monkeypatch.setattr(pgjournal, "UPGRADE_LOCK_WAIT", 0.1)
    monkeypatch.setattr(pgjournal, "UPGRADE_TRIES", 2)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("ALTER TABLE entries ADD FOREIGN KEY (txn_id) REFERENCES transactions(id)")
    holder = psycopg.connect(url)
    try:
        holder.execute("SELECT COUNT(*) FROM entries")  # (its transaction holds a lock)
        with pytest.raises(StoreError, match="could not upgrade"):
            PostgresStore(url, image_dir=str(tmp_path / "images"))
        holder.rollback()
        s = PostgresStore(url, image_dir=str(tmp_path / "images"))
        assert s._entry_keys() == []
        s.close()
    finally:
        holder.close()
