"""Settlement as plain code, and the store's carries: rounding never sets the price."""

from __future__ import annotations

import sqlite3

from cpushare.market.settlement import agreed_cpu_ms, payments
from cpushare.market.state import ResultKey, Returned, TaskState
from cpushare.market.store import SQLiteStore
from cpushare.protocol import MS_PER_HOUR, cost_milli

KEY = ResultKey("0" * 64, 0, None)


def task(cpu_ms: int, bid: int, k: int = 1, claims=((7, 1),), ask: int = 10) -> TaskState:
    t = TaskState(1, 1, 99, "r", "0" * 64, k, cpu_ms, bid, k * cost_milli(cpu_ms, bid))
    for aid, (acct, claim) in enumerate(claims, 1):
        t.results[aid] = Returned(KEY, acct, claim, ask, "")
    return t


def test_a_million_one_ms_tasks_cost_what_they_cost():
    """At 0.010 CPUCoins per CPU-hour (10 milli), 1-ms tasks: each once cost
    one milli, 360,000 times its price.  With the carry the buyer pays the
    exact sum, less than one milli."""
    carry = 0
    paid = 0
    n = 720_000
    for _ in range(n):
        pays, rests = payments(task(1, 10), KEY, lambda acct: carry)
        paid += pays[0].amount_milli
        carry = rests[7]
    exact = n * 1 * 10 / MS_PER_HOUR  # = 2 milli
    assert paid == 2 and carry == 0
    assert exact - 1 < paid <= exact


def test_a_payment_never_exceeds_its_escrow():
    for carry in (0, 1, MS_PER_HOUR - 1):
        for cpu_ms, bid in ((1, 1), (999, 7), (3_600_000, 10), (1, 3_600_001)):
            t = task(cpu_ms, bid, claims=((7, cpu_ms),), ask=bid)
            pays, rests = payments(t, KEY, lambda acct: carry)
            assert pays[0].amount_milli <= t.escrow_milli
            assert 0 <= rests[7] < MS_PER_HOUR


def test_redundancy_pays_every_agreeing_seller_the_lowest_claim():
    t = task(10_000, 36_000, k=2, claims=((5, 1000), (6, 9000)), ask=36_000)
    assert agreed_cpu_ms(t, KEY) == 1000
    pays, _ = payments(t, KEY, lambda acct: 0)
    assert [p.amount_milli for p in pays] == [10, 10]


def test_carries_are_stored_checked_and_an_old_store_is_migrated(tmp_path):
    """Schema 1 (no carries, images without owner, no model) is brought to 3."""
    path = str(tmp_path / "m.db")
    st = SQLiteStore(path, create=True)
    with st.transaction():
        st.set_carry(3, 4, 123)
    assert st.carry(3, 4) == 123 and st.carry(4, 3) == 0
    assert st.check() == []
    st.db.execute("UPDATE carries SET rest = ?", (MS_PER_HOUR,))
    assert any("carry of buyer 3 to seller 4" in p for p in st.check())
    st.close()
    db = sqlite3.connect(path)  # back to schema 1: no carries, images without owner
    db.executescript("DROP TABLE carries; ALTER TABLE images DROP COLUMN account_id; "
                     "ALTER TABLE images DROP COLUMN size; ALTER TABLE images DROP COLUMN used; "
                     "ALTER TABLE buy_orders DROP COLUMN model; ALTER TABLE tasks DROP COLUMN "
                     "model; ALTER TABLE buy_orders DROP COLUMN memory; ALTER TABLE buy_orders "
                     "DROP COLUMN max_nodes; ALTER TABLE buy_orders DROP COLUMN accel; "
                     "ALTER TABLE buy_orders DROP COLUMN boot_seconds; "
                     "UPDATE meta SET value = '1' WHERE key = 'schema_version';")
    db.close()
    st = SQLiteStore(path)
    assert st.get_meta("schema_version") == "4" and st.carry(3, 4) == 0
    assert [r[0] for r in st.db.execute("SELECT model FROM buy_orders")] == []
    assert st.image_usage(1) == (0, 0)
    st.close()
