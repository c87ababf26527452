"""Matching: which idle seller takes which queued task, and work stealing.

Plain code over plain state: the queue of tasks that may need attempts,
the sellers that asked for work, the sellers holding a task behind the one
they run.  No store, no connection, no event loop: the market passes a
`dispatch` callback and acts on the revokes `steal` returns, and tests
drive it with plain objects and a clock of their own.

A seller here is anything with `order` (price_milli, model, cpu_seconds),
`account_id`, `attempts` (attempt id -> (task, wall_ms), in the order it
runs them), `head_since`, `revoking` and `ready_seq`.
"""

from __future__ import annotations

import time
from typing import Callable

PUMP_SCAN = 10_000  # queued tasks examined per matching round
# A task held by a seller behind the one it runs is taken back (`revoke`) for an
# idle seller that may run it, once the task ahead of it has run this long.
STEAL_AFTER = 0.01
STEAL_SCAN = 64  # holders examined per look (the others in later looks, in turn)


def fits(s, t, freed: int = 0) -> bool:
    """Whether seller `s` may run task `t` (`freed`: an account about to leave
    the task's, that of a seller giving it back)."""
    o = s.order
    return (o.price_milli <= t.bid_milli and s.account_id != t.buyer_account_id
            and (s.account_id == freed or s.account_id not in t.used_accounts)
            and o.model == "seccomp" and o.cpu_seconds * 1000 >= t.cpu_ms)


class Matcher:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.tasks: dict = {}  # the market's open tasks: id -> TaskState
        self.queue: dict[int, None] = {}  # tasks that may need attempts, oldest first
        self.ready: dict = {}  # sellers that asked for work: SellerConn -> None
        self.holders: dict = {}  # sellers holding a task behind another
        self.steal_due = False  # something changed that may allow a steal
        self.retry_in: float | None = None  # (see steal)
        self._seq = 0

    # --- what changes -------------------------------------------------------

    def enqueue(self, t) -> None:
        self.queue[t.id] = None

    def dequeue(self, tid: int) -> None:
        self.queue.pop(tid, None)

    def seller_ready(self, s) -> bool:
        """`s` asked for work; True if it was not waiting already."""
        if s in self.ready:
            return False
        self._seq += 1
        s.ready_seq = self._seq
        self.ready[s] = None
        self.steal_due = True
        return True

    def seller_busy(self, s) -> None:
        """`s` wants nothing more (its credit is spent, it handed back, it went)."""
        self.ready.pop(s, None)

    def seller_gone(self, s) -> None:
        self.ready.pop(s, None)
        self.holders.pop(s, None)

    def holds(self, s, n_attempts: int) -> None:
        """Seller `s` now has `n_attempts`: it holds a task behind another from 2."""
        if n_attempts >= 2:
            if s not in self.holders:
                self.holders[s] = None
                self.steal_due = True
        else:
            self.holders.pop(s, None)

    # --- matching -------------------------------------------------------------

    def choose(self, t):
        """The idle seller of the cheapest ask that may take `t`; failing one, the
        cheapest busy one with a free prefetch slot.  Sessions queue behind nothing
        and nothing queues behind a session."""
        best = None
        best_key = None
        for s in self.ready:
            if fits(s, t):
                if s.attempts and (t.session or next(iter(s.attempts.values()))[0].session):
                    continue
                key = (len(s.attempts), s.order.price_milli, s.ready_seq)
                if best is None or key < best_key:
                    best, best_key = s, key
        return best

    def pump(self, dispatch: Callable) -> list:
        """Give queued tasks to ready sellers (`dispatch(task, seller)`), then
        the revokes of work stealing: [(holder, attempt id)]."""
        self.retry_in = None
        if not self.ready:
            return []
        if not self.queue:
            return self.steal()
        self.steal_due = True  # (sellers may be given tasks now)
        scanned = 0
        served = []
        for tid in self.queue:
            t = self.tasks.get(tid)
            if t is not None:
                while t.need() > 0 and self.ready:
                    s = self.choose(t)
                    if s is None:
                        break
                    dispatch(t, s)
            if t is None or t.need() <= 0:
                served.append(tid)
            scanned += 1
            if not self.ready or scanned >= PUMP_SCAN:
                break
        for tid in served:
            del self.queue[tid]
        if self.ready:  # sellers left idle, with nothing queued they may take
            return self.steal()
        return []

    # --- work stealing ----------------------------------------------------------

    def steal(self) -> list:
        """Idle sellers and nothing queued they may take: take back tasks held
        behind running ones (prefetched) for them.  The holder answers a
        `revoke` with a `handback` (unstarted), and the task is requeued, to
        go to the idle seller; or, if it has started it meanwhile, with its
        result.  Only held tasks whose predecessor has run STEAL_AFTER are
        taken: a task of a few milliseconds ends sooner than a task moves.

        Returns [(holder, attempt id)] to revoke; `self.retry_in` is set to
        the seconds after which a look may find more (None: not before a
        change)."""
        self.retry_in = None
        if not self.steal_due:
            return []
        self.steal_due = False
        idle = [s for s in self.ready if not s.attempts]
        if not idle or not self.holders:
            return []
        now = self.clock()
        looked = list(self.holders)[:STEAL_SCAN]
        if len(looked) < len(self.holders):  # the others come first next time
            for h in looked:
                del self.holders[h]
                self.holders[h] = None
            self.steal_due = True
        revokes = []
        for h in looked:
            age = now - h.head_since
            for aid, (t, _) in list(h.attempts.items())[1:]:
                if aid in h.revoking or t.session or self.tasks.get(t.id) is not t:
                    continue
                if age < STEAL_AFTER:
                    self.retry_in = min(self.retry_in or STEAL_AFTER, STEAL_AFTER - age)
                    continue
                taker = next((s for s in idle if s is not h and fits(s, t, h.account_id)),
                             None)
                if taker is None:
                    continue
                idle.remove(taker)
                h.revoking.add(aid)
                revokes.append((h, aid))
                if not idle:
                    return revokes
        return revokes
