"""Matching: which idle seller takes which queued task, and work stealing.

Plain code over plain state: the queue of tasks that may need attempts,
the sellers that asked for work, the sellers holding a task behind the one
they run.  No store, no connection, no event loop: the market passes a
`dispatch` callback and acts on the revokes `steal` returns, and tests
drive it with plain objects and a clock of their own.

A seller here is anything with `order` (price_milli, model, cpu_seconds, memory),
`account_id`, `attempts` (attempt id -> (task, wall_ms), in the order it
runs them), `head_since`, `revoking` and `ready_seq`.
"""

from __future__ import annotations

import bisect
import time
from typing import Callable

# A task held by a seller behind the one it runs is taken back (`revoke`) for an
# idle seller that may run it, once the task ahead of it has run this long.
STEAL_AFTER = 0.01
STEAL_SCAN = 64  # holders examined per look (the others in later looks, in turn)
# Within one class of the index, the tasks (or sellers) looked at past ones that
# do not fit, per lookup.  Only the limits at a class's edge and the accounts
# of redundancy make a member of a fitting class unfit.
CLASS_SCAN = 64


def bucket(n: int) -> int:
    """The power-of-two class of a CPU time or a memory size: b holds
    (2**(b-1), 2**b], 0 holds 0 and 1."""
    return max(0, n - 1).bit_length()


def fits(s, t, freed: int = 0) -> bool:
    """Whether seller `s` may run task `t` (`freed`: an account about to leave
    the task's, that of a seller giving it back)."""
    o = s.order
    return (o.price_milli <= t.bid_milli and s.account_id != t.buyer_account_id
            and (s.account_id == freed or s.account_id not in t.used_accounts)
            and o.model == t.model and o.cpu_seconds * 1000 >= t.cpu_ms
            and (o.memory <= 0 or o.memory >= t.memory) and not (t.session and s.attempts)
            and (not t.image_size or s.cache >= t.image_size)
            and (t.accel != "kvm" or s.accel == "kvm") and (not t.link or s.links))


def _task_key(t) -> tuple:
    return (t.session, t.buyer_account_id, bucket(t.cpu_ms), bucket(t.memory))


def _seller_key(s) -> tuple:
    o = s.order
    return (bucket(o.cpu_seconds * 1000), _memory_bucket(o.memory))


def _memory_bucket(memory: int) -> int:
    return bucket(memory) if memory > 0 else 1 << 30  # (0: no limit)


class _Levels:
    """Members in classes under ordered levels (bids highest first, or asks
    cheapest first): level -> class key -> {member: None}, and the levels in
    order, kept sorted as levels come and go."""

    def __init__(self, highest_first: bool):
        self.classes: dict[int, dict[tuple, dict]] = {}
        self._sign = -1 if highest_first else 1
        self._order: list[int] = []  # sign x level, ascending

    def add(self, level: int, key: tuple, member) -> None:
        if level not in self.classes:
            self.classes[level] = {}
            bisect.insort(self._order, self._sign * level)
        self.classes[level].setdefault(key, {})[member] = None

    def remove(self, level: int, key: tuple, member) -> None:
        classes = self.classes.get(level)
        cls = classes.get(key) if classes is not None else None
        if cls is None or member not in cls:
            return
        del cls[member]
        if not cls:
            del classes[key]
            if not classes:
                del self.classes[level]
                self._order.pop(bisect.bisect_left(self._order, self._sign * level))

    def levels(self):
        """The levels in order."""
        return (self._sign * x for x in self._order)


class Matcher:
    """The queued tasks and the ready sellers, each indexed by what decides a
    match, so that a lookup never walks past work (or sellers) that cannot
    match: tasks by model and bid (highest first), then in classes of
    (session, buyer account, CPU-time class, memory class), oldest first;
    sellers by model and ask (cheapest first), then in classes of (CPU
    seconds class, memory class), in the order they asked.

    Invariant after pump(): no ready seller has a queued task it fits (up to
    CLASS_SCAN per class).  So a task that arrives (or is requeued) looks for
    a seller (the cheapest ask, idle ones first), and a seller that asks for
    work looks for a task (the highest bid, then the oldest)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.tasks: dict = {}  # the market's open tasks: id -> TaskState
        self.queue: dict[int, None] = {}  # tasks that may need attempts, oldest first
        self.ready: dict = {}  # sellers that asked for work: SellerConn -> None
        self.holders: dict = {}  # sellers holding a task behind another
        self.steal_due = False  # something changed that may allow a steal
        self.retry_in: float | None = None  # (see steal)
        self._seq = 0
        # model -> task ids by bid (highest first) and class
        self._tasks: dict[str, _Levels] = {}
        self._where: dict[int, tuple] = {}  # task id -> (model, bid, key)
        # model -> ready sellers by ask (cheapest first) and class
        self._sellers: dict[str, _Levels] = {}
        self._fresh_tasks: dict[int, None] = {}  # queued since the last pump
        self._fresh_sellers: dict = {}  # ready since the last pump
        self.looked = 0  # index members examined (for the tests)

    # --- what changes -------------------------------------------------------

    def enqueue(self, t) -> None:
        """`t` may need attempts (new, or one of its attempts ended)."""
        self._fresh_tasks[t.id] = None
        if t.id in self._where:
            return
        self.queue[t.id] = None
        model, bid, key = where = (t.model, t.bid_milli, _task_key(t))
        self._where[t.id] = where
        self._tasks.setdefault(model, _Levels(highest_first=True)).add(bid, key, t.id)

    def dequeue(self, tid: int) -> None:
        self.queue.pop(tid, None)
        self._fresh_tasks.pop(tid, None)
        where = self._where.pop(tid, None)
        if where is None:
            return
        model, bid, key = where
        self._tasks[model].remove(bid, key, tid)

    def seller_ready(self, s) -> bool:
        """`s` asked for work; True if it was not waiting already."""
        if s in self.ready:
            return False
        self._seq += 1
        s.ready_seq = self._seq
        self.ready[s] = None
        o = s.order
        self._sellers.setdefault(o.model, _Levels(highest_first=False)).add(
            o.price_milli, _seller_key(s), s)
        self._fresh_sellers[s] = None
        self.steal_due = True
        return True

    def seller_busy(self, s) -> None:
        """`s` wants nothing more (its credit is spent, it handed back, it went)."""
        self.ready.pop(s, None)
        self._fresh_sellers.pop(s, None)
        o = s.order
        asks = self._sellers.get(o.model)
        if asks is not None:
            asks.remove(o.price_milli, _seller_key(s), s)

    def changed(self, s) -> None:
        """A ready seller's attempts changed: it may fit other tasks now."""
        if s in self.ready:
            self._fresh_sellers[s] = None
            self.steal_due = True

    def seller_gone(self, s) -> None:
        self.seller_busy(s)
        self.holders.pop(s, None)

    def holds(self, s, n_attempts: int) -> None:
        """Seller `s` now has `n_attempts`: it holds a task behind another from 2."""
        if n_attempts >= 2:
            if s not in self.holders:
                self.holders[s] = None
                self.steal_due = True
        else:
            self.holders.pop(s, None)

    # --- lookups ----------------------------------------------------------------

    def task_for(self, s):
        """The queued task seller `s` should run: of the highest bid it may
        take, the oldest that fits.  Classes that cannot fit are skipped
        whole; within a class at most CLASS_SCAN unfit tasks are passed."""
        o = s.order
        index = self._tasks.get(o.model)
        if index is None:
            return None
        cpu_b, mem_b = bucket(o.cpu_seconds * 1000), _memory_bucket(o.memory)
        for bid in index.levels():
            if bid < o.price_milli:
                return None  # (every lower bid too)
            best = None
            for (session, acct, tcpu_b, tmem_b), cls in index.classes[bid].items():
                if (tcpu_b > cpu_b or tmem_b > mem_b or acct == s.account_id
                        or (session and s.attempts)):
                    continue
                for n, tid in enumerate(cls):
                    self.looked += 1
                    t = self.tasks.get(tid)
                    if t is not None and t.need() > 0 and fits(s, t):
                        if best is None or tid < best.id:
                            best = t
                        break
                    if n >= CLASS_SCAN:
                        break
            if best is not None:
                return best
        return None

    def seller_for(self, t):
        """The ready seller that should run `t`: an idle one of the cheapest
        ask, failing one the cheapest busy one with a free prefetch slot."""
        index = self._sellers.get(t.model)
        if index is None:
            return None
        cpu_b, mem_b = bucket(t.cpu_ms), bucket(t.memory)
        busy = None
        for ask in index.levels():
            if ask > t.bid_milli:
                break
            for (scpu_b, smem_b), cls in index.classes[ask].items():
                if scpu_b < cpu_b or smem_b < mem_b:
                    continue
                n = 0
                for s in cls:
                    self.looked += 1
                    if fits(s, t):
                        if not s.attempts:
                            return s
                        if busy is None and not next(iter(s.attempts.values()))[0].session:
                            busy = s
                    n += 1
                    if n >= CLASS_SCAN:
                        break
        return busy

    def pump(self, dispatch: Callable) -> list:
        """Give queued tasks to ready sellers (`dispatch(task, seller)`), then
        the revokes of work stealing: [(holder, attempt id)]."""
        self.retry_in = None
        fresh_tasks, self._fresh_tasks = self._fresh_tasks, {}
        fresh_sellers, self._fresh_sellers = self._fresh_sellers, {}
        if not self.ready:
            return []
        if fresh_tasks or fresh_sellers:
            self.steal_due = True  # (sellers may be given tasks now)
        for tid in fresh_tasks:  # oldest first
            t = self.tasks.get(tid)
            while t is not None and t.id in self._where and t.need() > 0 and self.ready:
                s = self.seller_for(t)
                if s is None:
                    break
                dispatch(t, s)
                self._served(t)
        order = sorted((s for s in fresh_sellers if s in self.ready),
                       key=lambda s: (len(s.attempts), s.order.price_milli, s.ready_seq))
        for s in order:
            while s in self.ready:
                t = self.task_for(s)
                if t is None:
                    break
                dispatch(t, s)
                self._served(t)
        if self.ready:  # sellers left idle, with nothing queued they may take
            return self.steal()
        return []

    def _served(self, t) -> None:
        if t.need() <= 0:
            self.dequeue(t.id)

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
