"""The market's store on both engines: the same calls on a SQLite file and
on a PostgreSQL database (a throwaway cluster, tests/pgcluster.py), the
same answers, the same ledger invariants."""

from __future__ import annotations

import pytest

from cpushare.market.store import BIG, SQLiteStore, StoreError


@pytest.fixture
def pg(pg_cluster):
    return pg_cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SQLiteStore(str(tmp_path / "m.db"), create=True)
    else:
        from cpushare.market.store.pg import PostgresStore
        url = request.getfixturevalue("pg").database()
        s = PostgresStore(url, image_dir=str(tmp_path / "images"), create=True)
    yield s
    s.close()


def _market(s):
    with s.transaction():
        buyer, seller = s.add_account("buyer"), s.add_account("seller")
        s.transfer("mint", [(s.mint_id, -10_000), (buyer, 10_000)])
        so = s.add_sell_order(seller, 10, "seccomp", 60, 120, 64 << 20, 1 << 20)
        bo = s.add_buy_order(buyer, 20, 1, 60)
    return buyer, seller, so, bo


def test_accounts_orders_and_the_ledger(store):
    buyer, seller, so, bo = _market(store)
    assert store.account("buyer").balance_milli == 10_000
    with store.transaction():
        with pytest.raises(StoreError, match="exists already"):
            store.add_account("buyer")
        store.add_account("carol")  # (the transaction goes on after the refusal)
    assert store.account("carol") is not None
    with store.transaction():
        with pytest.raises(StoreError, match="does not balance"):
            store.transfer("x", [(buyer, -5), (seller, 4)])
        with pytest.raises(StoreError, match="non-integer"):
            store.transfer("x", [(buyer, -0.5), (seller, 0.5)])
        store.transfer("escrow", [(buyer, -300), (store.escrow_id, 300)])
        store.transfer("pay", [(store.escrow_id, -300), (seller, 300)])
    assert (store.account("buyer").balance_milli, store.account("seller").balance_milli) == \
        (9_700, 300)
    assert store.sell_order(so).price_milli == 10 and store.buy_order(bo).redundancy == 1
    summary = store.ledger_summary()
    assert summary["minted"] == 10_000 and summary["escrow"] == 0
    assert isinstance(summary["transactions"], int)
    assert store.check() == []


def test_a_rollback_leaves_nothing(store):
    buyer, seller, *_ = _market(store)
    store.begin()
    store.transfer("pay", [(buyer, -1), (seller, 1)])
    store.add_account("ghost")
    store.rollback()
    assert store.account("ghost") is None
    assert store.account("seller").balance_milli == 0
    assert store.check() == []


def test_check_finds_a_balance_that_is_not_its_entries(store):
    buyer, *_ = _market(store)
    with store.transaction():
        store.db.execute("UPDATE accounts SET balance = balance + 1 WHERE id = ?", (buyer,))
    problems = store.check()
    assert any("buyer" in p for p in problems), problems


def test_tasks_big_inputs_outputs_and_results(store):
    buyer, seller, so, bo = _market(store)
    big = bytes(range(256)) * (BIG // 256 + 10)
    with store.transaction():
        t = store.add_task(bo, buyer, "r1", "img", big, 1, 1000, 20, escrow_milli=20)
        store.transfer("escrow", [(buyer, -20), (store.escrow_id, 20)], task_id=t)
        a = store.add_attempt(t, so, seller, 10)
    assert store.task_input(t) == big
    assert [q.id for q in store.queued_tasks()] == [t]
    with store.transaction():
        store.set_attempt_state(a, "accepted", 10, (500, "ab" * 32, 0, None, ""))
        store.transfer("pay", [(store.escrow_id, -10), (seller, 10)], task_id=t)
        store.transfer("refund", [(store.escrow_id, -10), (buyer, 10)], task_id=t)
        store.finish_task(t, "done", exit_status=0, cpu_ms=500, cost_milli=10, attempts=1,
                          output=big[::-1])
    r = store.result(t)
    assert (r.state, r.cpu_ms, r.cost_milli, r.output) == ("done", 500, 10, big[::-1])
    assert store.queued_tasks() == []
    assert store.check() == []


def test_images_meta_and_carries(store):
    buyer, seller, *_ = _market(store)
    with store.transaction():
        store.put_image("d1", b"\x7fELF" + b"\0" * 100, buyer)
        store.put_image("d1", b"other", buyer)  # (stored once)
        store.put_image_file("d2", 5 << 20, buyer)
        store.set_meta("k", "v1")
        store.set_meta("k", "v2")
        store.set_carry(buyer, seller, 123)
        store.set_carry(buyer, seller, 456)
    assert store.image("d1") == b"\x7fELF" + b"\0" * 100
    assert store.image("d2") is None and store.image_size("d2") == 5 << 20
    assert store.image_file_digests() == {"d2"}
    assert store.image_usage(buyer) == (2, 104 + (5 << 20))
    assert store.get_meta("k") == "v2" and store.get_meta("nope") is None
    assert store.carry(buyer, seller) == 456 and store.carry(seller, buyer) == 0


def test_a_postgresql_url_that_does_not_answer_is_a_clear_error(pg, tmp_path):
    from cpushare.market.store.pg import PostgresStore
    bad = pg.url("nosuchdb").replace("password", "")
    with pytest.raises(StoreError, match="cannot connect") as e:
        PostgresStore(bad, image_dir=str(tmp_path))
    assert "nosuchdb" in str(e.value)
    with pytest.raises(StoreError, match="run init first"):
        PostgresStore(pg.database(), image_dir=str(tmp_path))
