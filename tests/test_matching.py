"""Matching as plain code: no store, no TLS, no event loop."""

from __future__ import annotations

from types import SimpleNamespace

from cpushare.market.matching import CLASS_SCAN, Matcher, bucket
from cpushare.market.state import TaskState

MiB = 1 << 20


class Seller(SimpleNamespace):
    __hash__ = object.__hash__  # (identity, as the market's connections)
    __eq__ = object.__eq__


def seller(account: int, price: int, *, cpu_seconds: int = 3600, memory: int = 256 * MiB,
           model: str = "seccomp"):
    order = SimpleNamespace(price_milli=price, cpu_seconds=cpu_seconds, memory=memory,
                            model=model)
    return Seller(order=order, account_id=account, attempts={}, head_since=0.0,
                           revoking=set(), ready_seq=0, credit=1)


class World:
    """A matcher and a dispatch that records (task id, seller) as the market would."""

    def __init__(self):
        self.m = Matcher(clock=lambda: 100.0)
        self.next_id = 1
        self.given: list[tuple[int, object]] = []

    def task(self, *, buyer: int = 1, bid: int = 1000, cpu_ms: int = 1000, memory: int = MiB,
             redundancy: int = 1, session: bool = False) -> TaskState:
        t = TaskState(self.next_id, 1, buyer, f"r{self.next_id}", "0" * 64, redundancy,
                      cpu_ms, bid, 0, memory=memory, session=session)
        self.next_id += 1
        self.m.tasks[t.id] = t
        self.m.enqueue(t)
        return t

    def dispatch(self, t, s) -> None:
        aid = 1000 + len(self.given)
        t.running[aid] = s
        t.used_accounts.add(s.account_id)
        s.attempts[aid] = (t, 1000)
        s.credit -= 1
        if s.credit <= 0:
            self.m.seller_busy(s)
        self.given.append((t.id, s))

    def ready(self, s) -> None:
        self.m.seller_ready(s)

    def pump(self):
        return self.m.pump(self.dispatch)


def test_bucket():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 1024, 1025)] == [0, 0, 1, 2, 2, 3, 10, 11]


def test_work_no_seller_can_take_never_delays_work_one_can():
    """10,000 tasks bid below every ask, and 10,000 asking more CPU time and
    more memory than any seller sells, are queued ahead of one honest task:
    the idle seller gets the honest task, and the lookup looks at a handful
    of entries, not the queue."""
    w = World()
    for _ in range(10_000):
        w.task(buyer=9, bid=1)
    for i in range(10_000):
        w.task(buyer=9, bid=10**6, cpu_ms=7200_000 + i)
    for i in range(10_000):
        w.task(buyer=9, bid=10**6, memory=(1 << 30) + i)
    honest = w.task(buyer=2, bid=1000)
    w.pump()  # (no seller yet)
    s = seller(5, 500)
    w.ready(s)
    w.m.looked = 0
    w.pump()
    assert w.given == [(honest.id, s)]
    assert w.m.looked < 10, w.m.looked


def test_a_task_that_arrives_finds_its_seller_past_unfit_ones():
    """Sellers the task cannot use (asks above its bid, too little CPU time
    or memory) do not delay it: it finds the fitting seller among them."""
    w = World()
    for i in range(5000):
        w.ready(seller(100 + i, 10**6))  # too dear
    for i in range(5000):
        w.ready(seller(20000 + i, 10, cpu_seconds=1))  # too little CPU time
    fit = seller(7, 900)
    w.ready(fit)
    w.pump()
    t = w.task(bid=1000, cpu_ms=60_000)
    w.m.looked = 0
    w.pump()
    assert w.given == [(t.id, fit)]
    assert w.m.looked < 10, w.m.looked


def test_memory_the_image_needs_is_matched_against_the_sellers_limit():
    w = World()
    small = seller(5, 100, memory=16 * MiB)
    big = seller(6, 200, memory=1024 * MiB)
    w.ready(small)
    w.ready(big)
    w.pump()
    t = w.task(memory=64 * MiB)
    w.pump()
    assert w.given == [(t.id, big)]  # not the cheaper seller: its limit is too small


def test_the_cheapest_idle_seller_then_a_free_prefetch_slot():
    w = World()
    dear, cheap = seller(5, 800), seller(6, 100)
    for s in (dear, cheap):
        w.ready(s)
    w.pump()
    t1 = w.task()
    w.pump()
    assert w.given[-1] == (t1.id, cheap)
    cheap.credit = 1
    w.ready(cheap)  # it asks for one more behind the running one
    t2 = w.task()
    w.pump()
    assert w.given[-1] == (t2.id, dear)  # an idle seller first
    t3 = w.task()
    w.pump()
    assert w.given[-1] == (t3.id, cheap)  # then the busy one's free slot
    s4 = w.task(session=True)
    w.pump()
    assert s4.id not in [tid for tid, _ in w.given]  # a session queues behind nothing


def test_a_seller_takes_the_highest_bid_then_the_oldest():
    w = World()
    low1 = w.task(bid=100)
    high1 = w.task(bid=900, cpu_ms=10)  # another CPU-time class
    high2 = w.task(bid=900)
    w.task(bid=100)
    w.pump()
    got = []
    for i in range(3):
        s = seller(10 + i, 50)
        w.ready(s)
        w.pump()
        got.append(w.given[-1][0])
    assert got == [high1.id, high2.id, low1.id]


def test_redundancy_needs_sellers_of_other_accounts():
    w = World()
    t = w.task(redundancy=2)
    a1, a2, b = seller(5, 100), seller(5, 100), seller(6, 100)
    w.ready(a1)
    w.pump()
    assert w.given == [(t.id, a1)]
    w.ready(a2)  # the same account: may not take the second attempt
    w.pump()
    assert len(w.given) == 1
    w.ready(b)
    w.pump()
    assert w.given[-1] == (t.id, b) and t.id not in w.m.queue  # served: out of the queue


def test_own_tasks_and_accounts_already_used_are_passed_within_the_scan():
    """A seller whose account already ran the tasks at the head of a class
    (redundancy 2) passes at most CLASS_SCAN of them; a seller of another
    account takes the oldest."""
    w = World()
    mine = seller(5, 100)
    tasks = [w.task(redundancy=2) for _ in range(CLASS_SCAN * 3)]
    for t in tasks:
        t.used_accounts.add(5)
    w.pump()  # (no seller yet)
    w.ready(mine)
    w.m.looked = 0
    w.pump()
    assert w.given == [] and w.m.looked <= CLASS_SCAN + 1
    other = seller(6, 100)
    w.ready(other)
    w.pump()
    assert w.given == [(tasks[0].id, other)]


def test_dequeue_removes_every_trace():
    w = World()
    ts = [w.task(bid=b) for b in (100, 200, 100)]
    for t in ts:
        w.m.dequeue(t.id)
    assert w.m.queue == {} and w.m._where == {}
    assert list(w.m._tasks["seccomp"].levels()) == [] and w.m._tasks["seccomp"].classes == {}
    s = seller(5, 1)
    w.ready(s)
    w.m.seller_gone(s)
    assert w.m.ready == {}
    assert list(w.m._sellers["seccomp"].levels()) == [] and w.m._sellers["seccomp"].classes == {}
