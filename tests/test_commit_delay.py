"""The group commit's delay follows the load (market/commit.py): a group that
begins after a quiet spell commits within COMMIT_DELAY_MIN, one that begins
soon after the last commit gathers for the market's commit_delay."""

from __future__ import annotations

import asyncio

import pytest

from cpushare.market.commit import COMMIT_DELAY, COMMIT_DELAY_MIN, GroupCommit
from cpushare.market.store import SQLiteStore


class _Group(GroupCommit):
    """The group commit alone, on a real SQLite store."""


def _waits(g: _Group) -> float:
    """How long the open group will gather (its timer, from now)."""
    return g._commit_timer.when() - asyncio.get_running_loop().time()


@pytest.mark.parametrize("delay", [COMMIT_DELAY, 0.05, 0.001])
def test_a_busy_market_gathers_for_commit_delay_a_quiet_one_commits_soon(tmp_path, delay):
    store = SQLiteStore(str(tmp_path / "m.db"), create=True)

    async def main():
        g = _Group()
        g._init_commit(store, delay)
        quick = min(delay, COMMIT_DELAY_MIN)
        g._tx().add_account("first")  # a group after a quiet spell (none before)
        assert _waits(g) == pytest.approx(quick, abs=1e-3)
        g._commit_timer.cancel()
        g._commit()
        g._tx().add_account("next")  # begun at once after that commit: busy
        assert _waits(g) == pytest.approx(delay, abs=1e-3)
        g._commit_timer.cancel()
        g._commit()
        g._last_commit -= delay + 0.001  # (as if the market had been quiet since)
        g._tx().add_account("after a pause")
        assert _waits(g) == pytest.approx(quick, abs=1e-3)
        g._commit_timer.cancel()
        g._commit()
        assert {a.name for a in store.accounts()} >= {"first", "next", "after a pause"}

    try:
        asyncio.run(main())
    finally:
        store.close()
