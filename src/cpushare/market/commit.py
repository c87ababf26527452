"""The group commit: handlers write inside one open transaction; soon after
every event the matcher runs; at most `commit_delay` later the transaction
is committed, and only then go out the frames that announce what it wrote.

So a peer never hears of a state the store may lose, the commits of many
tasks share their cost, and a seller never waits for a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Iterator

from .store import Store

log = logging.getLogger("cpushare.market")

COMMIT_DELAY = 0.005  # seconds: a group commit gathers what happened in this time
FILES_POLL = 0.002  # seconds: a commit waiting for big files looks again after this
FILES_WAIT_MAX = 0.25  # ... for at most this long; then it waits for them, blocking


class GroupCommit:
    """Mixed into Market: the open transaction, the announcements that wait
    for it, and the connections with frames to send."""

    fleet = False  # one of several processes on one database (fleet.py)

    def _init_commit(self, store: Store, commit_delay: float) -> None:
        self.store = store
        self.commit_delay = commit_delay
        self.fatal: BaseException | None = None
        self._stopping = False
        self._after: list = []
        self._dirty: list = []  # connections with frames in their outbox
        self._scheduled = False
        self._commit_timer: asyncio.TimerHandle | None = None
        self._files_since = 0.0  # when the commit first waited for big files
        self._held: set = set()  # keys locked against other processes until the commit

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
            self._commit_timer = asyncio.get_running_loop().call_later(
                self.commit_delay, self._commit)

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
        """The group commit, at most every `commit_delay`: then what it made true is told.

        While big inputs or outputs of the group are still being written to disk
        (by the store's own thread), it comes back a little later rather than
        block the loop: meanwhile a big input goes out to its seller."""
        self._commit_timer = None
        if self.fatal is not None:
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
        try:
            if self.store.in_transaction:
                self.store.commit()
        except BaseException as e:  # the store is unusable: stop, restart recovers
            self._die("store commit failed", e)
            return
        self._held.clear()
        after, self._after = self._after, []
        for fn in after:
            try:
                fn()
            except Exception:  # a bug: the other announcements still go out
                log.exception("internal error announcing a committed change")
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

    def _after_pump(self) -> None: ...

    def stop(self) -> None: ...
