"""The group commit: handlers write inside one open transaction; soon after
every event the matcher runs; at most `commit_delay` later (sooner, the
fewer frames come meanwhile: COMMIT_DELAY_MIN) the transaction is
committed, and only then go out the frames that announce what it wrote.

So a peer never hears of a state the store may lose, the commits of many
tasks share their cost, and a seller never waits for a commit.

A store with a writer thread (PostgreSQL: store.commit_apart) commits
there: the loop goes on meanwhile with the next group, whose writes are
journaled and whose first statement waits for that commit; its
announcements go out when it is done.  Commits stay in order: a group
due while the one before is on its way follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent import futures
from typing import Iterator

from .store import Store

log = logging.getLogger("cpushare.market")

# A group commit gathers while frames keep coming: it is committed
# COMMIT_DELAY_MIN after it began, unless frames came meanwhile (the market
# is busy), then again COMMIT_DELAY_MIN later, and so on, for at most the
# market's commit_delay (COMMIT_DELAY unless given); and never sooner than
# COMMIT_SPACING after the commit before it.  So a process pays a commit's
# own cost (a round trip and a transaction on PostgreSQL, a WAL flush on a
# disk: on a shared primary, every process's commits add up) at most 200
# times a second, 50 once frames come faster than every 2 ms; a lone
# request is answered within 2 ms, and a buyer waiting for each answer
# before its next request within 5 ms, as before this rule.  A group
# another process waits for (a key it asked to be left, fleet.py) is
# committed at once (_commit_soon).
COMMIT_DELAY = 0.02  # seconds, at most
COMMIT_DELAY_MIN = 0.002  # seconds: a group with no frame after its first
COMMIT_SPACING = 0.005  # seconds between the starts of two commits, at least
FILES_POLL = 0.002  # seconds: a commit waiting for big files looks again after this
FILES_WAIT_MAX = 0.25  # ... for at most this long; then it waits for them, blocking
READ_WAIT_MAX = 0.02  # s a commit waits for reads ahead of the group (store.read_ahead)


class GroupCommit:
    """Mixed into Market: the open transaction, the announcements that wait
    for it, and the connections with frames to send."""

    fleet = False  # one of several processes on one database (fleet.py)
    _yielding: dict = {}  # (fleet.py's)

    def _init_commit(self, store: Store, commit_delay: float) -> None:
        self.store = store
        self.commit_delay = commit_delay
        self.fatal: BaseException | None = None
        self._stopping = False
        self._after: list = []
        self._dirty: list = []  # connections with frames in their outbox
        self._scheduled = False
        self._commit_timer: asyncio.Handle | None = None
        self._frames = 0  # frames handled (listener.py), but pings
        self._frames_at = 0  # ... when the open group began, or was last looked at
        self._group_began = 0.0  # (loop time)
        self._due = False  # the open group is committed at once, no more gathering
        self._last_commit = float("-inf")  # when the last commit began (_now())
        self._files_since = 0.0  # when the commit first waited for big files
        self._held: set = set()  # keys locked against other processes until the commit
        self._inflight: tuple | None = None  # (future, announcements) of a commit on its way
        self._commit_again = False  # a group waits for the commit on its way
        self._reading = 0  # reads ahead on their way (Market._read_ahead)
        self._read_since = 0.0  # when the commit first waited for them

    def dirty(self, conn) -> None:
        """`conn` has frames in its outbox: send them at the end of this turn."""
        self._dirty.append(conn)
        self._schedule()

    def _tx(self) -> Store:
        """The store, inside the open group transaction."""
        if self.fatal is not None:
            raise RuntimeError(f"the market is stopping after an error: {self.fatal!r}")
        if not self.store.in_transaction:
            self.store.begin()
            self._schedule_commit()
        self._schedule()
        return self.store

    @contextlib.contextmanager
    def _op(self) -> Iterator[Store]:
        """Writes that belong together, in the group transaction.

        They are written without a savepoint (the hot path would pay for it
        on every task); instead, if one fails half-way, the whole group is
        rolled back and the market stops: memory may already hold part of
        it.  A restart recovers from the last commit, as after kill -9.
        (Values from peers are checked before they get here: a store error
        is the market's, never a peer's.)
        """
        store = self._tx()
        try:
            yield store
        except BaseException as e:
            self._die("internal error inside a store operation (the uncommitted group "
                      "is rolled back)", e)
            raise

    def _after_commit(self, fn) -> None:
        """Run `fn` (which announces something written) once it is committed."""
        self._after.append(fn)
        self._schedule_commit()

    def _schedule(self) -> None:
        if not self._scheduled and not self._stopping:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _schedule_commit(self) -> None:
        if self._commit_timer is None and not self._stopping:
            self._frames_at, self._group_began = self._frames, self._now()
            self._commit_timer = asyncio.get_running_loop().call_later(
                min(self.commit_delay, COMMIT_DELAY_MIN), self._commit)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _commit_soon(self) -> None:
        """The open group is due: committed at the next turn, gathering no more."""
        self._due = True
        if self._commit_timer is not None:
            self._commit_timer.cancel()
        if not self._stopping:
            self._commit_timer = asyncio.get_running_loop().call_soon(self._commit)

    def _gathers(self) -> bool:
        """Whether the open group gathers more: COMMIT_DELAY_MIN more if frames
        came since it began or was last looked at (within commit_delay), or
        until COMMIT_SPACING after the last commit began."""
        if self._due:
            return False
        now, later = self._now(), 0.0
        if (self._frames != self._frames_at
                and now - self._group_began + COMMIT_DELAY_MIN <= self.commit_delay):
            later = COMMIT_DELAY_MIN
        spaced = self._last_commit + min(COMMIT_SPACING, self.commit_delay) - now
        later = max(later, spaced)
        if later <= 0:
            return False
        self._frames_at = self._frames
        self._commit_timer = asyncio.get_running_loop().call_later(later, self._commit)
        return True

    def _flush(self) -> None:
        """Soon after every event: match tasks to sellers, send what needs no commit."""
        self._scheduled = False
        if self.fatal is not None:
            return
        try:
            self._pump()
        except BaseException as e:
            self._die("matching failed", e)
            return
        self._after_pump()
        self._send_outboxes()

    def _commit(self, wait: bool = False) -> None:
        """The group commit (when _gathers says it is time): then what it made true is told.

        While big inputs or outputs of the group are still being written to disk
        (by the store's own thread), it comes back a little later rather than
        block the loop: meanwhile a big input goes out to its seller."""
        self._commit_timer = None
        if self.fatal is not None:
            return
        if not wait and not self._stopping and self._gathers():
            return
        if not wait and not self._stopping and self.store.files_pending():
            now = time.monotonic()
            if not self._files_since:
                self._files_since = now
            if now - self._files_since < FILES_WAIT_MAX:  # (then it blocks: no starving)
                self._commit_timer = asyncio.get_running_loop().call_later(
                    FILES_POLL, self._commit)
                return
        self._files_since = 0.0
        if self._reading and not wait and not self._stopping and not self._yields():
            # (their answers are of this transaction: a commit now would void them)
            now = time.monotonic()
            if not self._read_since:
                self._read_since = now
            if now - self._read_since < READ_WAIT_MAX:
                self._commit_timer = asyncio.get_running_loop().call_later(
                    FILES_POLL, self._commit)
                return
        self._read_since = 0.0
        if self._inflight is not None:  # the group before is still being committed
            if not wait:
                self._commit_again = True  # (this one follows it)
                return
            futures.wait([self._inflight[0]])
            self._committed(self._inflight[0])
            if self.fatal is not None:
                return
        try:
            f = None
            if self.store.in_transaction:
                f = self.store.commit_apart() if not wait else self.store.commit()
        except BaseException as e:  # the store is unusable: stop, restart recovers
            self._die("store commit failed", e)
            return
        self._held.clear()
        after, self._after = self._after, []
        self._due = False
        self._last_commit = self._now()
        if f is None:
            self._tell_committed(after)
            return
        # on its way in the store's thread: the loop goes on with the next group
        self._inflight = (f, after)
        loop = asyncio.get_running_loop()
        f.add_done_callback(lambda f: loop.call_soon_threadsafe(self._committed, f))

    def _committing(self) -> bool:
        """A commit is on its way: a statement now would wait for it.  (Reads ahead
        may be too, after it: they are short, and each is some frame's.)"""
        return self._inflight is not None and not self._inflight[0].done()

    def _yields(self) -> bool:
        """A key is being left to another process: the commit that frees it
        waits for nothing (fleet.Fleet._on_yield)."""
        if not self._yielding:
            return False
        now = time.monotonic()
        return any(until > now for until in self._yielding.values())

    def _store_busy(self) -> bool:
        """A commit or a read ahead is on its way: a statement now would wait."""
        return self._committing() or self.store.pending() is not None

    async def _commit_done(self, reads: bool = True) -> None:
        """Until no commit is on its way, its announcements made, nor (`reads`)
        a read ahead: a statement after this (before the caller yields to the
        loop) waits for none."""
        while True:
            if self._inflight is not None:
                f = self._inflight[0]
                if not f.done():
                    await asyncio.wait([asyncio.wrap_future(f)])
                self._committed(f)
                continue
            f = self.store.pending() if reads else None
            if f is None:
                return
            await asyncio.wait([asyncio.wrap_future(f)])

    def _committed(self, f) -> None:
        """The commit on its way is done: what it made true is told."""
        if self._inflight is None or self._inflight[0] is not f:
            return  # (told already: commit_now waited for it)
        after, self._inflight = self._inflight[1], None
        if self.fatal is not None:
            return
        e = f.exception()
        if e is not None:
            self._die("store commit failed", e)
            return
        self._tell_committed(after)
        self._schedule()  # (what waited for it: claims, notifications)
        if self._commit_again:  # (it was due already: it gathers no more)
            self._commit_again = False
            self._commit_soon()

    def _tell_committed(self, after: list) -> None:
        for fn in after:
            try:
                fn()
            except Exception:  # a bug: the other announcements still go out
                log.exception("internal error announcing a committed change")
        if self.fleet:
            try:
                self._fleet_after_commit()
            except Exception as e:  # the database is gone: as a failed commit
                self._die("telling the market's other processes failed", e)
                return
        self._send_outboxes()

    def commit_now(self) -> None:
        """The group commit, now (before the store is shared within this thread)."""
        if self._commit_timer is not None:
            self._commit_timer.cancel()
        self._commit(wait=True)

    def _send_outboxes(self) -> None:
        dirty, self._dirty = self._dirty, []
        for c in dirty:
            c.send_out()

    def _die(self, what: str, e: BaseException) -> None:
        log.critical("%s, stopping the market: %r", what, e)
        self.fatal = e
        self._stopping = True
        self._after = []
        self._dirty = []
        self._held.clear()
        self.store.rollback()
        self.stop()

    # hooks of the market
    def _pump(self) -> None: ...

    def _fleet_after_commit(self) -> None: ...

    def _after_pump(self) -> None: ...

    def stop(self) -> None: ...
