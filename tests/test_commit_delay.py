"""The group commit gathers while frames keep coming (market/commit.py): a
group that no frame follows is committed COMMIT_DELAY_MIN after it began;
one that frames keep following gathers COMMIT_DELAY_MIN at a time, for at
most the market's commit_delay; none begins sooner than COMMIT_SPACING
after the commit before it; one that is due (another process waits for
a key it holds, or it waited for the commit before it) is committed at the
next turn.  On a real SQLite store, with a clock of the test's own: the
commit timer's firing is the test's call of _commit()."""

from __future__ import annotations

import asyncio

import pytest

from cpushare.market.commit import (COMMIT_DELAY, COMMIT_DELAY_MIN, COMMIT_SPACING,
                                    GroupCommit)
from cpushare.market.store import SQLiteStore


class _Group(GroupCommit):
    """The group commit alone, on the test's clock."""

    t = 0.0

    def _now(self) -> float:
        return self.t


def _fire(g: _Group) -> None:
    """The commit timer fires (the test's clock says when)."""
    assert g._commit_timer is not None, "no commit is scheduled"
    g._commit_timer.cancel()
    g._commit()


@pytest.mark.parametrize("delay", [COMMIT_DELAY, 0.05])
def test_a_group_gathers_while_frames_come_and_commits_soon_when_none_do(tmp_path, delay):
    store = SQLiteStore(str(tmp_path / "m.db"), create=True)
    commits: list[float] = []

    async def main():
        g = _Group()
        g._init_commit(store, delay)
        commit = store.commit
        store.commit = lambda: (commits.append(g.t), commit())
        # a lone request (a buyer waiting for its answer): committed after the minimum
        g._frames += 1
        g._tx().add_account("lone")
        assert g._commit_timer.when() - asyncio.get_running_loop().time() == \
            pytest.approx(COMMIT_DELAY_MIN, abs=5e-4)
        g.t += COMMIT_DELAY_MIN
        _fire(g)
        assert commits == [COMMIT_DELAY_MIN]
        # a stream of frames: the group gathers until commit_delay, then commits
        g.t = began = 1.0
        g._frames += 1
        g._tx().add_account("streamed 0")
        i = 0
        while len(commits) < 2:
            i += 1
            g.t += COMMIT_DELAY_MIN
            g._frames += 1
            with g._op() as s:
                s.add_account(f"streamed {i}")
            _fire(g)
        assert delay - COMMIT_DELAY_MIN <= commits[1] - began <= delay, commits
        # a group that no frame follows after some did: committed then
        g.t = began = 2.0
        g._tx().add_account("then quiet")
        g.t += COMMIT_DELAY_MIN
        g._frames += 1
        _fire(g)  # (a frame came: it gathers)
        assert len(commits) == 2
        g.t += COMMIT_DELAY_MIN
        _fire(g)  # (none did)
        assert commits[2] == pytest.approx(began + 2 * COMMIT_DELAY_MIN)
        # a lone request right after a commit: no sooner than COMMIT_SPACING after it
        g.t += 0.001
        g._frames += 1
        g._tx().add_account("spaced")
        g.t += COMMIT_DELAY_MIN
        _fire(g)  # (no frame came, but the last commit began 3 ms ago)
        assert len(commits) == 3
        assert g._commit_timer.when() - asyncio.get_running_loop().time() == \
            pytest.approx(COMMIT_SPACING - 0.001 - COMMIT_DELAY_MIN, abs=5e-4)
        g.t = commits[2] + COMMIT_SPACING
        _fire(g)
        assert commits[3] == pytest.approx(commits[2] + COMMIT_SPACING)
        # a group that is due: at the next turn, though frames keep coming
        g.t = 3.0
        g._tx().add_account("due")
        g._commit_soon()
        g._frames += 1
        await asyncio.sleep(0)
        assert commits[4:] == [3.0]
        names = {a.name for a in store.accounts()}
        assert {"lone", "streamed 0", f"streamed {i}", "then quiet", "spaced", "due"} <= names

    try:
        asyncio.run(main())
    finally:
        store.close()
