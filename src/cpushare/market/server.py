"""The market: an asyncio process, made of the pieces beside this module
(on PostgreSQL, one of several that may serve one database: fleet.py).

Every connection is a seller (one sell order, one CPU) or a buyer (one buy
order); who it is comes from its client certificate, looked up in the
store.  The market keeps the queued tasks, the idle sellers and the
running attempts in memory and every change of state in the store; on
start it rebuilds memory from the store, and the attempts that were
running when it stopped are lost and requeued (their escrow stays held).

    listener.py    hello, each connection's read loop, the sweeper (heartbeats)
    tls.py         TLS on the TCP sockets, one receive buffer for all
    conn.py        the connections, on the one protocol.FrameWriter
    commit.py      the group commit and the announcements that wait for it
    matching.py    which seller takes which task; work stealing (no I/O)
    settlement.py  paying agreeing results, refunding failed tasks
    sellers.py     seller messages          buyers.py   buyer messages
    images.py      images: whole, or in chunks from files (imagefiles.py)
    leases.py      kvm nodes: sessions paid as they run
    state.py       TaskState, the named shapes, Rejection
    fleet.py       several processes on one PostgreSQL database
    links.py       ... and the links between them: leases follow their buyer
    server.py      this: the attempts of tasks on sellers, recovery

Group commit (commit.py).  Soon after every event the matcher runs and
each seller it picks gets its `task` at once; the frames that announce
what was written wait for the commit.  (A `task` sent before its commit
costs nothing if the market dies: the task is still queued, and a result
for an attempt the market does not know is paid nothing.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict

from ..protocol import DEFAULT_HEARTBEAT, DEFAULT_MAX_PAYLOAD, ByteBudget, encode, frame
from .buyers import MAX_OPEN_TASKS, MAX_SESSIONS, RESULT_BUDGET, RESULT_TTL, BuyerHandlers
from .commit import COMMIT_DELAY, GroupCommit
from .conn import BuyerConn, Conn, SellerConn
from .fleet import Fleet
from .imagefiles import ImageFiles
from .images import IMAGE_TTL, ImageHandlers
from .leases import BUYER_GRACE, LEASE_GRACE, LEASE_MODELS, Leases
from .links import Links
from .listener import MAX_SLOTS, PAYLOAD_BUDGET, TICK, Listener
from .matching import Matcher
from .sellers import SellerHandlers
from .settlement import Settlement
from .state import MAX_LOST, Pending, TaskState, wall_ms_for
from .store import Store

__all__ = ["Market", "Conn", "SellerConn", "BuyerConn", "TaskState"]

log = logging.getLogger("cpushare.market")

GRACE_MS = 5000  # a seller's deadline is wall_ms + this


class Market(Listener, SellerHandlers, BuyerHandlers, ImageHandlers, Leases, Settlement,
             Fleet, Links, GroupCommit):
    def __init__(self, store: Store, *, heartbeat: int = DEFAULT_HEARTBEAT,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, grace_ms: int = GRACE_MS,
                 commit_delay: float = COMMIT_DELAY, max_wait: float = 0.0,
                 max_open_tasks: int = MAX_OPEN_TASKS, max_sessions: int = MAX_SESSIONS,
                 result_budget: int = RESULT_BUDGET, image_ttl: float = IMAGE_TTL,
                 result_ttl: float = RESULT_TTL, lease_grace: float = LEASE_GRACE,
                 buyer_grace: float = BUYER_GRACE, link: tuple[str, int] = ("127.0.0.1", 0)):
        self._init_commit(store, commit_delay)
        self._init_fleet()
        self._init_links(link)  # (several processes: links.py)
        self.heartbeat = heartbeat
        self.max_wait = max_wait  # seconds a task may wait for a seller (0: for ever)
        self.max_payload = max_payload
        self.grace_ms = grace_ms
        self.matcher = Matcher()
        self.tasks: dict[int, TaskState] = self.matcher.tasks
        self._steal_timer: asyncio.TimerHandle | None = None
        # (sell order id, instance) -> connection: copies of one order file
        # (instances cpu0, cpu1, ...) each sell one CPU under the same order
        self.sellers: dict[tuple[int, str], SellerConn] = {}
        self.busy: dict[SellerConn, None] = {}  # sellers with attempts (the sweeper's)
        self.buyers: dict[int, list[BuyerConn]] = {}  # buy order id -> connections
        self.images: dict[str, int] = {}  # image digest -> the memory a run needs
        self.images_used: set[str] = set()  # used by tasks since the last collection
        self.image_files = ImageFiles(store.image_dir)  # images of chunked models (ISOs)
        self.image_bytes_sent = 0  # ... sent to sellers, in all
        self.leases: dict[int, TaskState] = {}  # open leases (leases.py), by task id
        self.open_leases: Counter = Counter()  # buy order -> its open leases
        self.orphans: dict[int, TaskState] = {}  # attempt -> lease awaiting its seller
        self.lease_grace = lease_grace
        self.buyer_grace = buyer_grace
        self.image_ttl = image_ttl
        self.result_ttl = result_ttl
        self._input_bytes = 0  # of small inputs kept in memory (buyers.INPUT_BUDGET)
        self._big_inputs: list[TaskState] = []  # tasks whose big input is still in memory
        self.instances: Counter = Counter()  # sell order id -> its connections
        # tasks whose result the buyer has not acknowledged (queued ones too):
        # (buy order, ref) -> task, and task -> Pending
        self.pending_refs: dict[tuple[int, str], int] = {}
        self.pending_tasks: dict[int, Pending] = {}
        self.pending_of: dict[int, set[int]] = {}  # buy order: its tasks in pending_tasks
        self.acked_lately: OrderedDict[int, None] = OrderedDict()  # last acked here, oldest first
        self.open_tasks: Counter = Counter()  # (buyer account, session) -> unacked tasks
        self.max_open_tasks = max_open_tasks
        self.max_sessions = max_sessions
        self.result_budget = result_budget
        self._stop = asyncio.Event()
        self._conns: set[Conn] = set()
        # the heartbeat wheel (listener._sweep): its slots, of connections
        self._wheel: list[set[Conn]] = [set() for _ in range(
            max(1, min(MAX_SLOTS, round(heartbeat / TICK))))]
        self._next_beat = 0
        self._recovered = False
        self._handlers: set[asyncio.Task] = set()
        self.payload_budget = ByteBudget(PAYLOAD_BUDGET)
        self._unauthenticated = 0  # connections in the TLS handshake or before hello
        self._unauthenticated_from: Counter = Counter()  # ... per source address
        self._refused_early = 0  # refused at those caps since the last log line
        self._refusals_logged = -1e9
        self._accept_errors = 0  # failed accepts (EMFILE) since the last log line
        self._accept_errors_logged = -1e9

    # --- state ------------------------------------------------------------

    def recover(self) -> None:
        """Rebuild memory from the store; attempts that were running are lost.

        Runs in the event loop, before the market listens.  Interactive
        sessions cannot resume (their streams are gone): they fail and are
        refunded.  Leases wait LEASE_GRACE for their sellers, whose guests
        run on (leases.py).
        """
        self._recovered = True
        store = self.store
        if self.fleet:  # the tasks of processes that stopped, ours among them (fleet.py)
            self._collect_at_start()
            self._fleet_join()
            return
        with store.transaction():
            n = store.lose_running_attempts(keep_models=LEASE_MODELS)
        self._collect_at_start()
        for ref_row in store.undelivered_refs():
            self._remember_pending(*ref_row)
        self._load_tasks([(row, None, False) for row in store.queued_tasks()],
                         "the market restarted")
        if n or self.tasks:
            log.info("recovered %d queued tasks; %d attempts running at the last stop "
                     "were lost and are requeued", len(self.tasks), n)
        self._expire_orphans_later()

    def _collect_at_start(self) -> None:
        store = self.store
        with store.transaction():
            images = store.collect_images(self.image_ttl)
        if images:
            log.info("removed %d images no task used for %g s", images, self.image_ttl)
        stale = store.collect_garbage()
        if stale:
            log.info("removed %d files of inputs and outputs no task needs", stale)

    # --- hooks of the group commit ------------------------------------------

    def _pump(self) -> None:
        m = self.matcher
        for h, aid in m.pump(self._dispatch):
            h.write(encode("revoke", attempt=aid))
        if m.retry_in is not None and self._steal_timer is None:
            def again() -> None:
                self._steal_timer = None
                m.steal_due = True
                self._schedule()
            self._steal_timer = asyncio.get_running_loop().call_later(m.retry_in, again)

    def _after_pump(self) -> None:
        if self._big_inputs:  # matched or not, big inputs are read from the store from now on
            for t in self._big_inputs:
                t.input = None
            self._big_inputs = []
        if self.fleet:
            try:
                self._fleet_after_pump()
            except BaseException as e:
                self._die("sharing work with the market's other processes failed", e)

    # --- attempts -----------------------------------------------------------

    def _dispatch(self, t: TaskState, s: SellerConn) -> None:
        store = self._tx()
        aid = store.add_attempt(t.id, s.order_id, s.account_id, s.order.price_milli)
        payload = t.input if t.input is not None else store.task_input(t.id)
        t.running[aid] = s
        t.used_accounts.add(s.account_id)
        t.started += 1
        s.credit -= 1
        if s.credit <= 0:
            self.matcher.seller_busy(s)
        wall_ms = wall_ms_for(t.cpu_ms, s.order.wall_seconds * 1000)
        if not s.attempts:
            s.head_since = time.monotonic()
            s.deadline = s.head_since + (wall_ms + self.grace_ms) / 1000
        s.attempts[aid] = (t, wall_ms)
        self.busy[s] = None
        self.matcher.holds(s, len(s.attempts))
        link = self._link_keys(t, s, aid) if t.link else {}
        task = frame("task", payload, task=t.id, attempt=aid, model=t.model, image=t.image,
                     cpu_ms=t.cpu_ms,
                     wall_ms=wall_ms, memory=t.memory if t.lease else s.order.memory,
                     output_limit=s.order.output,
                     buyer_order=t.buy_order_id, session=t.id if t.session else None, **link)
        if t.session:
            def start() -> None:
                s.write(task)
                for f in t.streams:  # what the buyer typed before a seller had the job
                    s.write(f)
                t.streams = []
                t.streamed_bytes = 0
            self._after_commit(start)
        else:
            # Sent before the commit, unlike every frame that announces a state:
            # the seller is idle until it has it, and a crash before the commit
            # costs no money (the task is still queued, the result of an attempt
            # the market does not know is paid nothing).
            s.write_now(task)

    def _pop_attempt(self, s: SellerConn, aid: int) -> tuple[TaskState, bool] | None:
        """Forget attempt `aid` of seller `s`: (its task, whether it had started)."""
        s.outputs.pop(aid, None)
        s.revoking.discard(aid)
        if aid not in s.attempts:
            return None
        self.matcher.changed(s)  # (it may be idle now)
        started = next(iter(s.attempts)) == aid
        t, _ = s.attempts.pop(aid)
        if not s.attempts:
            self.busy.pop(s, None)
        self.matcher.holds(s, len(s.attempts))
        if started and s.attempts:  # the next one starts now on the seller
            _, wall_ms = next(iter(s.attempts.values()))
            s.head_since = time.monotonic()
            s.deadline = s.head_since + (wall_ms + self.grace_ms) / 1000
        return t, started

    def _lose_all(self, s: SellerConn, why: str) -> None:
        """Take every attempt from seller `s` (the prefetched ones first)."""
        for aid in reversed(list(s.attempts)):
            self._lose(s, why, aid)

    def _lose(self, s: SellerConn, why: str, aid: int | None = None,
              unstarted: bool = False) -> None:
        """Take attempt `aid` (default: the running one) from seller `s`; requeue its task.

        An attempt that had not started (prefetched, waiting on the seller) is
        void and does not count as lost."""
        if not s.attempts:
            return
        if aid is None:
            aid = next(iter(s.attempts))
        popped = self._pop_attempt(s, aid)
        if popped is None:
            return
        t, started = popped
        started = started and not unstarted
        s.stale.add(aid)
        if self.tasks.get(t.id) is not t:  # the task closed meanwhile: nothing to requeue
            return
        log.info("attempt %d of task %d %s by %s: %s", aid, t.id,
                 "lost" if started else "given back unstarted", s, why)
        self._tx().set_attempt_state(aid, "lost" if started else "void", t.paid_milli)
        t.running.pop(aid, None)
        if started:
            t.lost += 1
        else:
            t.started -= 1
        t.used_accounts.discard(s.account_id)  # another of its CPUs may take it again
        if t.lease and t.ending and not started:
            self._fail(t, "cancelled", t.ending)
        elif t.session:
            what = "lease" if t.lease else "session"
            self._fail(t, "task", f"the seller running the {what} was lost: {why}")
        elif t.lost >= MAX_LOST:
            self._fail(t, "task", f"{t.lost} attempts were lost (sellers disconnected or "
                                  f"overran their deadline); last: {why}")
        else:
            t.waiting_since = time.monotonic()
            self.matcher.enqueue(t)

    def _expire(self, now: float) -> None:
        """Fail the tasks that have waited `max_wait` for a seller: none runs
        them, none has returned a result (those wait on: their sellers are owed
        a settlement), and they are not sessions (whose buyer is there)."""
        for tid in list(self.matcher.queue):
            t = self.tasks.get(tid)
            if (t is not None and not t.session and not t.running and not t.results
                    and now - t.waiting_since >= self.max_wait):
                self._fail(t, "expired", f"no seller took it within {self.max_wait:g} s "
                                         f"(the market's --max-wait)")
