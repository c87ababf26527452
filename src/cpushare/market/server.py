"""The market: TLS listener, matching, relay and settlement.

One asyncio process.  Every connection is a seller (one sell order, one
CPU) or a buyer (one buy order); who it is comes from its client
certificate, looked up in the store.  The market keeps the queued tasks,
the idle sellers and the running attempts in memory and every change of
state in the store; on start it rebuilds memory from the store, and the
attempts that were running when it stopped are lost and requeued (their
escrow stays held).

Group commit.  Handlers write to the store inside one open transaction.
Soon after every event (call_soon) the matcher runs and each seller it
picks gets its `task` at once; at most COMMIT_DELAY later the transaction
is committed and only then go out the frames that announce what it wrote
(`accepted`, `settled`, `done`, `image_ok`, ...).  So a peer never hears of
a state the store may lose, the commits of many tasks share their cost,
and a seller never waits for a commit.  (A `task` sent before its commit
costs nothing if the market dies: the task is still queued, and a result
for an attempt the market does not know is paid nothing.)

Money.  At `submit` the buyer's maximum cost, redundancy x
cost_milli(cpu_ms, bid), moves to escrow.  When k results agree, each of
the k sellers gets cost_milli(min(measured, cpu_ms), its ask) and the
buyer gets the rest back, in one transaction; a task that fails is
refunded whole.  The ask never exceeds the bid, so escrow always covers
the payments.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from .. import __version__, bytecode
from ..protocol import (DEFAULT_HEARTBEAT, DEFAULT_MAX_PAYLOAD, VERSION, Message,
                        ProtocolError, cost_milli, digest, encode, frame, peer_identity,
                        read_message)
from .store import Result, Store

log = logging.getLogger("cpushare.market")

GRACE_MS = 5000  # a seller's deadline is wall_ms + this
HELLO_TIMEOUT = 10.0
# Copies of one sell order file connect as instances of the order (cpushared
# sends its file's name); a bound keeps one certificate from opening without end.
INSTANCE_RE = re.compile(r"[A-Za-z0-9_.@:-]{0,64}")
MAX_INSTANCES = 256
HANDSHAKE_TIMEOUT = 10.0
MAX_REDUNDANCY = 16
MAX_LOST = 5  # attempts lost (disconnect, deadline) before a task fails
PUMP_SCAN = 10_000  # queued tasks examined per matching round
SMALL_INPUT = 64 << 10  # inputs up to this size are kept in memory too
COMMIT_DELAY = 0.005  # seconds: a group commit gathers what happened in this time
FILES_POLL = 0.002  # seconds: a commit waiting for big files looks again after this
FILES_WAIT_MAX = 0.25  # ... for at most this long; then it waits for them, blocking
PREFETCH = 1  # tasks a seller may hold queued behind the one it runs (announced in welcome)
# A task held by a seller behind the one it runs is taken back (`revoke`) for an
# idle seller that may run it, once the task ahead of it has run this long.
STEAL_AFTER = 0.01
STEAL_SCAN = 64  # holders examined per look (the others in later looks, in turn)
MAX_SLOTS = 16  # the most a `ready` may offer
# Sellers may send a big output in `output` frames of up to this many bytes while
# the job runs, ahead of its `result` (announced in welcome as output_chunks).
OUTPUT_CHUNK = 1 << 20
SENT_REFS = 1 << 16  # refs remembered per buyer connection (see BuyerConn.sent_refs)


def wall_ms_for(cpu_ms: int, seller_wall_ms: int) -> int:
    """The wall-clock budget of an attempt: generous for the CPU time it may use."""
    return min(seller_wall_ms, 4 * cpu_ms + 10_000)


@dataclass
class TaskState:
    id: int
    buy_order_id: int
    buyer_account_id: int
    ref: str
    image: str
    redundancy: int
    cpu_ms: int
    bid_milli: int
    escrow_milli: int
    running: dict = field(default_factory=dict)  # attempt id -> SellerConn | None
    # returned results: attempt id -> (key, seller account id, cpu_ms, ask, exit, signal, reason)
    results: dict = field(default_factory=dict)
    used_accounts: set = field(default_factory=set)
    lost: int = 0
    started: int = 0
    session: bool = False
    input: bytes | None = None  # small inputs stay in memory; None: read from the store
    buyer: "BuyerConn | None" = None  # sessions: the buyer that opened it
    streams: list = field(default_factory=list)  # sessions: stdin frames before a seller
    # since when it has waited for a seller (accepted, or its last attempt lost)
    waiting_since: float = field(default_factory=time.monotonic)

    def best(self) -> tuple[tuple | None, int]:
        if not self.results:
            return None, 0
        key, n = Counter(r[0] for r in self.results.values()).most_common(1)[0]
        return key, n

    def need(self) -> int:
        """Attempts to start now so that k results may agree."""
        return self.redundancy - self.best()[1] - len(self.running)


_PIECE = 256 << 10  # big frames are written in pieces of this size


class Conn:
    """One peer.  Frames go to an outbox, written whole at the end of a flush or commit.

    A frame is bytes, or a list of buffers (protocol.frame: the head and a
    big payload, which is written from where it lies, never copied)."""
    role = ""

    def __init__(self, market: "Market", reader, writer, peer: str):
        self.market = market
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.out: list[bytes] = []
        self.account_id = 0
        self.account = ""
        self.order_id = 0
        self.last_seen = time.monotonic()
        self.closed = False
        self.gone = False
        self.fingerprint = ""
        self._pieces: list[bytes] = []  # big writes in progress (see write_now)
        self._piece_writer: asyncio.Task | None = None

    def write(self, frame: bytes | list) -> None:
        if not self.closed:
            if not self.out:
                self.market._dirty.append(self)
                self.market._schedule()
            if type(frame) is list:
                self.out.extend(frame)
            else:
                self.out.append(frame)

    def send_out(self) -> None:
        if self.out:
            out, self.out = self.out, []
            self.write_now(out)

    def write_now(self, data: bytes | list) -> None:
        """Write at once.  The peer may have gone since the frames were queued (an
        SSL transport raises AttributeError on a write after its close): then
        they are dropped, and the read side ends the connection."""
        if self.closed or self.writer.is_closing():
            return
        bufs = data if type(data) is list else [data]
        if self._pieces or any(len(b) > _PIECE for b in bufs):
            # big payloads (inputs, outputs) go out in pieces paced by drain():
            # asyncio's SSL transport is several times slower at one write of
            # tens of MiB.  Later frames queue behind them, in order.
            self._pieces.extend(bufs)
            if self._piece_writer is None:
                self._piece_writer = asyncio.get_running_loop().create_task(
                    self._write_pieces())
            return
        try:
            self.writer.write(bufs[0] if len(bufs) == 1 else b"".join(bufs))
        except (AttributeError, OSError, RuntimeError) as e:
            log.info("%s: write failed, the connection is going: %r", self, e)

    async def _write_pieces(self) -> None:
        try:
            while self._pieces:
                view = memoryview(self._pieces.pop(0))
                for i in range(0, len(view), _PIECE):
                    if self.writer.is_closing():
                        return
                    self.writer.write(view[i:i + _PIECE])
                    await self.writer.drain()
        except (AttributeError, OSError, RuntimeError, ConnectionError) as e:
            log.info("%s: write failed, the connection is going: %r", self, e)
        finally:
            self._pieces = []
            self._piece_writer = None
            if self.closed:
                self.writer.close()

    def close(self) -> None:
        if not self.closed:
            self.send_out()
            self.closed = True
            if self._piece_writer is None:  # else it closes when its pieces are out
                self.writer.close()

    def __str__(self) -> str:
        inst = f"[{self.instance}]" if getattr(self, "instance", "") else ""
        return f"{self.role} {self.account}/{self.order_id}{inst} at {self.peer}"


class _Streamed:
    """An attempt's output as it comes in `output` frames: the pieces (joined
    once, at the result), their length and SHA-256 so far, and the buyer
    connection they also went to, cut through (None: not, or not all of them)."""

    __slots__ = ("pieces", "n", "sha256", "buyer")

    def __init__(self, buyer):
        self.pieces: list = []
        self.n = 0
        self.sha256 = hashlib.sha256()
        self.buyer = buyer


class SellerConn(Conn):
    role = "seller"

    def __init__(self, *a):
        super().__init__(*a)
        self.order = None  # SellOrderRow
        self.instance = ""  # the seller's name for this copy of its order file
        # attempts sent to it, in the order it runs them: id -> (task, wall_ms).  The
        # first runs; the others wait on the seller (prefetched) and have no deadline
        # until they come first.
        self.attempts: dict[int, tuple[TaskState, int]] = {}
        self.credit = 0  # tasks it asked for (`ready`) and has not been sent
        self.deadline = 0.0  # of its first attempt
        self.head_since = 0.0  # when its first attempt started (about)
        self.ready_seq = 0
        self.stale: set[int] = set()  # attempts taken from it; late results get paid 0
        self.returned: set[int] = set()  # attempts it returned, until settled
        self.revoking: set[int] = set()  # held attempts it was asked to give back
        # attempt -> its output so far from `output` frames
        self.outputs: dict[int, _Streamed] = {}


class BuyerConn(Conn):
    role = "buyer"

    def __init__(self, *a):
        super().__init__(*a)
        self.order = None  # BuyOrderRow
        # refs whose result went out on this connection (the latest SENT_REFS): a
        # resubmission of one is not a new task (the result is ahead of it)
        self.sent_refs: dict[str, int] = {}
        self.output_frames = False  # it takes a result's output ahead in `output` frames


class Market:
    def __init__(self, store: Store, *, heartbeat: int = DEFAULT_HEARTBEAT,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, grace_ms: int = GRACE_MS,
                 commit_delay: float = COMMIT_DELAY, max_wait: float = 0.0):
        self.store = store
        self.heartbeat = heartbeat
        self.max_wait = max_wait  # seconds a task may wait for a seller (0: for ever)
        self.max_payload = max_payload
        self.grace_ms = grace_ms
        self.tasks: dict[int, TaskState] = {}
        self.queue: dict[int, None] = {}  # tasks that may need attempts, oldest first
        self.ready: dict[SellerConn, None] = {}
        self.holders: dict[SellerConn, None] = {}  # sellers holding a task behind another
        self._steal_timer: asyncio.TimerHandle | None = None
        self._steal_due = False  # something changed that may allow a steal
        # (sell order id, instance) -> connection: copies of one order file
        # (instances cpu0, cpu1, ...) each sell one CPU under the same order
        self.sellers: dict[tuple[int, str], SellerConn] = {}
        self.buyers: dict[int, list[BuyerConn]] = {}  # buy order id -> connections
        self.images: set[str] = set()
        self._after: list = []
        self._dirty: list[Conn] = []  # connections with frames in their outbox
        self._big_inputs: list[TaskState] = []  # tasks whose big input is still in memory
        self._delivered: list[int] = []  # results sent, to mark delivered
        self._sending: set[int] = set()  # ... and not yet marked
        self.pending_refs: dict[tuple[int, str], int] = {}  # undelivered (order, ref) -> task
        self._scheduled = False
        self._seq = 0
        self._stop = asyncio.Event()
        self._conns: set[Conn] = set()
        self.fatal: BaseException | None = None
        self._recovered = False
        self._stopping = False
        self._handlers: set[asyncio.Task] = set()
        self._commit_timer: asyncio.TimerHandle | None = None
        self._files_since = 0.0  # when the commit first waited for big files
        self.commit_delay = commit_delay

    # --- state ------------------------------------------------------------

    def recover(self) -> None:
        """Rebuild memory from the store; attempts that were running are lost.

        Runs in the event loop, before the market listens.  Interactive
        sessions cannot resume (their streams are gone): they fail and are
        refunded.
        """
        self._recovered = True
        store = self.store
        store.begin()
        try:
            n = store.lose_running_attempts()
            store.commit()
        except BaseException:
            store.rollback()
            raise
        stale = store.collect_garbage()
        if stale:
            log.info("removed %d files of inputs and outputs no task needs", stale)
        for order_id, ref, tid in store.undelivered_refs():
            self.pending_refs[order_id, ref] = tid
        for row in store.queued_tasks():
            t = TaskState(row.id, row.buy_order_id, row.buyer_account_id, row.ref, row.image,
                          row.redundancy, row.cpu_ms, row.bid_milli, row.escrow_milli,
                          session=row.session)
            for a in store.attempts(row.id):
                t.started += 1
                if a.state == "returned":
                    t.results[a.id] = ((a.output_sha256, a.exit_status, a.signal),
                                       a.seller_account_id, a.cpu_ms, a.ask_milli,
                                       a.exit_status, a.signal, a.reason)
                    t.used_accounts.add(a.seller_account_id)
                elif a.state == "lost":
                    t.lost += 1
            self.tasks[t.id] = t
            if t.session:
                self._fail(t, "task", "the market restarted during the session")
            else:
                self.queue[t.id] = None
        if n or self.tasks:
            log.info("recovered %d queued tasks; %d attempts running at the last stop "
                     "were lost and are requeued", len(self.tasks), n)

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
        if self._big_inputs:  # matched or not, big inputs are read from the store from now on
            for t in self._big_inputs:
                t.input = None
            self._big_inputs = []
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
            delivered = self._delivered
            if delivered:
                if not self.store.in_transaction:
                    self.store.begin()
                self.store.mark_delivered(delivered)
                self._delivered = []
            if self.store.in_transaction:
                self.store.commit()
        except BaseException as e:  # the store is unusable: stop, restart recovers
            self._die("store commit failed", e)
            return
        for tid in delivered:
            self._sending.discard(tid)
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
        self.store.rollback()
        self.stop()

    # --- matching ---------------------------------------------------------

    def _choose(self, t: TaskState) -> SellerConn | None:
        """The idle seller of the cheapest ask that may take `t`; failing one, the
        cheapest busy one with a free prefetch slot.  Sessions queue behind nothing
        and nothing queues behind a session."""
        best = None
        best_key = None
        for s in self.ready:
            if self._fits(s, t):
                if s.attempts and (t.session or next(iter(s.attempts.values()))[0].session):
                    continue
                key = (len(s.attempts), s.order.price_milli, s.ready_seq)
                if best is None or key < best_key:
                    best, best_key = s, key
        return best

    @staticmethod
    def _fits(s: SellerConn, t: TaskState, freed: int = 0) -> bool:
        """Whether seller `s` may run task `t` (`freed`: an account about to leave
        the task's, that of a seller giving it back)."""
        o = s.order
        return (o.price_milli <= t.bid_milli and s.account_id != t.buyer_account_id
                and (s.account_id == freed or s.account_id not in t.used_accounts)
                and o.model == "seccomp" and o.cpu_seconds * 1000 >= t.cpu_ms)

    def _steal(self) -> None:
        """Idle sellers and nothing queued they may take: take back tasks held
        behind running ones (prefetched) for them.  The holder answers a
        `revoke` with a `handback` (unstarted), and the task is requeued, to
        go to the idle seller; or, if it has started it meanwhile, with its
        result.  Only held tasks whose predecessor has run STEAL_AFTER are
        taken: a task of a few milliseconds ends sooner than a task moves."""
        if not self._steal_due:
            return
        self._steal_due = False
        idle = [s for s in self.ready if not s.attempts]
        if not idle or not self.holders:
            return
        now = time.monotonic()
        soonest = None
        looked = list(self.holders)[:STEAL_SCAN]
        if len(looked) < len(self.holders):  # the others come first next time
            for h in looked:
                del self.holders[h]
                self.holders[h] = None
            self._steal_due = True
        for h in looked:
            age = now - h.head_since
            for aid, (t, _) in list(h.attempts.items())[1:]:
                if aid in h.revoking or t.session or self.tasks.get(t.id) is not t:
                    continue
                if age < STEAL_AFTER:
                    soonest = min(soonest or STEAL_AFTER, STEAL_AFTER - age)
                    continue
                taker = next((s for s in idle if s is not h
                              and self._fits(s, t, h.account_id)), None)
                if taker is None:
                    continue
                idle.remove(taker)
                h.revoking.add(aid)
                h.write(encode("revoke", attempt=aid))
                if not idle:
                    return
        if soonest is not None and self._steal_timer is None:
            def again() -> None:
                self._steal_timer = None
                self._steal_due = True
                self._schedule()
            self._steal_timer = asyncio.get_running_loop().call_later(soonest, again)

    def _pump(self) -> None:
        if not self.ready:
            return
        if not self.queue:
            self._steal()
            return
        self._steal_due = True  # (sellers may be given tasks now)
        scanned = 0
        served = []
        for tid in self.queue:
            t = self.tasks.get(tid)
            if t is not None:
                while t.need() > 0 and self.ready:
                    s = self._choose(t)
                    if s is None:
                        break
                    self._dispatch(t, s)
            if t is None or t.need() <= 0:
                served.append(tid)
            scanned += 1
            if not self.ready or scanned >= PUMP_SCAN:
                break
        for tid in served:
            del self.queue[tid]
        if self.ready:  # sellers left idle, with nothing queued they may take
            self._steal()

    def _dispatch(self, t: TaskState, s: SellerConn) -> None:
        store = self._tx()
        aid = store.add_attempt(t.id, s.order_id, s.account_id, s.order.price_milli)
        payload = t.input if t.input is not None else store.task_input(t.id)
        t.running[aid] = s
        t.used_accounts.add(s.account_id)
        t.started += 1
        s.credit -= 1
        if s.credit <= 0:
            del self.ready[s]
        wall_ms = wall_ms_for(t.cpu_ms, s.order.wall_seconds * 1000)
        if not s.attempts:
            s.head_since = time.monotonic()
            s.deadline = s.head_since + (wall_ms + self.grace_ms) / 1000
        s.attempts[aid] = (t, wall_ms)
        if len(s.attempts) == 2:
            self.holders[s] = None
            self._steal_due = True
        task = frame("task", payload, task=t.id, attempt=aid, image=t.image, cpu_ms=t.cpu_ms,
                     wall_ms=wall_ms, memory=s.order.memory, output_limit=s.order.output,
                     buyer_order=t.buy_order_id, session=t.id if t.session else None)
        if t.session:
            def start() -> None:
                s.write(task)
                for f in t.streams:  # what the buyer typed before a seller had the job
                    s.write(f)
                t.streams = []
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
        self._steal_due = True  # (a seller may be idle now)
        started = next(iter(s.attempts)) == aid
        t, _ = s.attempts.pop(aid)
        if len(s.attempts) < 2:
            self.holders.pop(s, None)
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
        self._tx().set_attempt_state(aid, "lost" if started else "void")
        t.running.pop(aid, None)
        if started:
            t.lost += 1
        else:
            t.started -= 1
        t.used_accounts.discard(s.account_id)  # another of its CPUs may take it again
        if t.session:
            self._fail(t, "task", f"the seller running the session was lost: {why}")
        elif t.lost >= MAX_LOST:
            self._fail(t, "task", f"{t.lost} attempts were lost (sellers disconnected or "
                                  f"overran their deadline); last: {why}")
        else:
            t.waiting_since = time.monotonic()
            self.queue[t.id] = None

    def _expire(self, now: float) -> None:
        """Fail the tasks that have waited `max_wait` for a seller: none runs
        them, none has returned a result (those wait on: their sellers are owed
        a settlement), and they are not sessions (whose buyer is there)."""
        for tid in list(self.queue):
            t = self.tasks.get(tid)
            if (t is not None and not t.session and not t.running and not t.results
                    and now - t.waiting_since >= self.max_wait):
                self._fail(t, "expired", f"no seller took it within {self.max_wait:g} s "
                                         f"(the market's --max-wait)")

    # --- settlement -------------------------------------------------------

    def _settle(self, t: TaskState, key: tuple, output: bytes, last: int,
                ahead: tuple | None = None) -> None:
        """Pay the k agreeing results (`last` is the attempt that completed them).

        `ahead`: (buyer connection, n) when the first n bytes of the output already
        went to that connection in `output` frames."""
        winners = [aid for aid, r in t.results.items() if r[0] == key][:t.redundancy]
        pays = []
        for aid in winners:
            _, acct, cpu, ask, *_ = t.results[aid]
            pays.append((aid, acct, cost_milli(min(cpu, t.cpu_ms), ask)))
        total = sum(p for _, _, p in pays)
        refund = t.escrow_milli - total
        if refund < 0:  # cannot happen while ask <= bid; refuse rather than overdraw
            raise AssertionError(f"task {t.id}: payments {total} exceed escrow {t.escrow_milli}")
        first = t.results[winners[0]]
        with self._op() as store:
            store.transfer("settle", [(store.escrow_id, -t.escrow_milli),
                                      *[(acct, p) for _, acct, p in pays],
                                      (t.buyer_account_id, refund)], task_id=t.id)
            paid = {aid: p for aid, _, p in pays}
            for aid, r in t.results.items():
                got = (r[2], r[0][0], r[4], r[5], r[6]) if aid == last else None
                if aid in paid:
                    store.set_attempt_state(aid, "accepted", paid[aid], got)
                elif r[0] != key:
                    store.set_attempt_state(aid, "rejected", 0, got)
                    store.add_dispute(t.id, aid, r[1], r[0][0], key[0])
                else:
                    store.set_attempt_state(aid, "void", 0, got)
            for aid in t.running:
                store.set_attempt_state(aid, "void")
            fields = dict(exit_status=first[4], signal=first[5], reason=first[6] or "",
                          cpu_ms=min(first[2], t.cpu_ms), cost_milli=total,
                          attempts=t.started)
            store.finish_task(t.id, "done", output=output, **fields)
            if t.session:  # a session's end is told once, to the connection that opened it
                store.mark_delivered([t.id])
        t.escrow_milli = 0
        self._close_task(t, paid, ("done", fields, output, ahead))
        log.debug("task %d done: paid %d, refunded %d", t.id, total, refund)

    def _fail(self, t: TaskState, code: str, message: str) -> None:
        with self._op() as store:
            store.transfer("refund", [(store.escrow_id, -t.escrow_milli),
                                      (t.buyer_account_id, t.escrow_milli)], task_id=t.id)
            for aid, r in t.results.items():
                store.set_attempt_state(aid, "rejected")
                if code == "dispute":
                    store.add_dispute(t.id, aid, r[1], r[0][0], None)
            for aid in t.running:
                store.set_attempt_state(aid, "void")
            store.finish_task(t.id, "failed", attempts=t.started, fail_code=code,
                              fail_message=message)
            if t.session:
                store.mark_delivered([t.id])
        t.escrow_milli = 0
        log.info("task %d failed: %s: %s", t.id, code, message)
        self._close_task(t, {}, ("failed", dict(code=code, message=message), b"", None))

    def _close_task(self, t: TaskState, paid: dict[int, int], final: tuple) -> None:
        """After settle/fail: forget the task, tell sellers and the buyer after commit."""
        self.tasks.pop(t.id, None)
        self.queue.pop(t.id, None)
        t.input = None
        notes = []
        for aid in t.results:
            s = self._seller_of(aid, t)
            if s is not None:
                notes.append((s, encode("settled", attempt=aid, paid_milli=paid.get(aid, 0),
                                        accepted=aid in paid)))
        for aid, s in t.running.items():
            if s is not None and aid in s.attempts:
                s.stale.add(aid)  # its result, when it comes, is paid nothing
                if not s.gone:  # and it may stop now (or not start)
                    s.write(encode("stop", attempt=aid))
        self._after_commit(lambda: self._announce(t, notes, final))

    def _seller_of(self, aid: int, t: TaskState) -> SellerConn | None:
        acct = t.results[aid][1]
        for s in self.sellers.values():
            if s.account_id == acct and aid in s.returned:
                s.returned.discard(aid)
                return s
        return None

    def _announce(self, t: TaskState, notes, final: tuple) -> None:
        for s, note in notes:
            s.write(note)
        state, fields, output, ahead = final
        if t.session:
            if t.buyer is not None and not t.buyer.gone:
                if state == "done":
                    f = {k: fields[k] for k in ("exit_status", "signal", "reason", "cpu_ms",
                                                "cost_milli")}
                else:
                    f = dict(exit_status=None, signal=None, cpu_ms=0, cost_milli=0,
                             reason=f"{fields['code']}: {fields['message']}")
                t.buyer.write(encode("closed", session=t.id, **f))
            return
        conns = self.buyers.get(t.buy_order_id)
        if not conns or t.id in self._sending:
            return  # kept in the store until the buyer comes back
        b = conns[-1]
        if ahead is not None and ahead[0] is b and ahead[1]:
            # the connection has the first n bytes already: `done` carries the rest
            n = ahead[1]
            b.write(frame(state, memoryview(output)[n:], ref=t.ref, task=t.id, streamed=n,
                          **fields))
        else:
            b.write(frame(state, output, ref=t.ref, task=t.id, **fields))
        self._sent(b, t.id, t.buy_order_id, t.ref)

    def _sent(self, b: BuyerConn, task_id: int, buy_order_id: int, ref: str) -> None:
        b.sent_refs[ref] = task_id
        if len(b.sent_refs) > SENT_REFS:
            del b.sent_refs[next(iter(b.sent_refs))]
        self._delivered.append(task_id)
        self._sending.add(task_id)
        self.pending_refs.pop((buy_order_id, ref), None)
        self._schedule()

    def _send_result(self, b: BuyerConn, r: Result) -> None:
        """A result kept in the store, to a buyer that (re)connected."""
        if r.task_id in self._sending:
            return
        if r.state == "done":
            b.write(frame("done", r.output, ref=r.ref, task=r.task_id,
                           exit_status=r.exit_status, signal=r.signal, reason=r.reason,
                           cpu_ms=r.cpu_ms, cost_milli=r.cost_milli, attempts=r.attempts))
        else:
            b.write(encode("failed", ref=r.ref, task=r.task_id, code=r.fail_code or "task",
                           message=r.fail_message or ""))
        self._sent(b, r.task_id, b.order_id, r.ref)

    # --- seller messages ----------------------------------------------------

    def _on_seller(self, s: SellerConn, m: Message) -> None:
        if m.type == "ready":
            slots = m.get("slots")
            if slots is None:  # one task, and only when idle (sellers that do not prefetch)
                if s.attempts or s.credit:
                    return
                slots = 1
            elif not 1 <= slots <= MAX_SLOTS:
                raise ProtocolError("frame", f"ready: slots {slots} outside 1..{MAX_SLOTS}")
            # never more than the running task and PREFETCH waiting behind it
            s.credit = max(0, min(s.credit + slots, 1 + PREFETCH - len(s.attempts)))
            if s.credit and s not in self.ready:
                self._seq += 1
                s.ready_seq = self._seq
                self.ready[s] = None
                self._steal_due = True
                self._schedule()
        elif m.type == "need_image":
            if not any(t.image == m["image"] for t, _ in s.attempts.values()):
                raise ProtocolError("image", f"image {m['image']} is not that of an attempt "
                                             f"the seller holds")
            data = self.store.image(m["image"])
            if data is None:
                raise ProtocolError("internal", f"image {m['image']} missing from the store")
            s.write(frame("image", data, image=m["image"]))
        elif m.type == "output":
            self._on_output(s, m)
        elif m.type == "result":
            self._on_result(s, m)
        elif m.type == "handback":
            # it cancels what the seller asked for: it says `ready` again when it can
            s.credit = 0
            self.ready.pop(s, None)
            if m["attempt"] in s.attempts:
                self._lose(s, f"handed back: {m.get('reason') or 'no reason given'}",
                           m["attempt"], unstarted=m.get("unstarted") is True)
                s.stale.discard(m["attempt"])  # (no result follows a handback)
        elif m.type == "stream":
            t = next(iter(s.attempts.values()))[0] if s.attempts else None
            if t is None or not t.session or t.id != m["session"]:
                raise ProtocolError("task", f"stream for session {m['session']}, which this "
                                            f"seller is not running")
            if t.buyer is not None and not t.buyer.gone:
                t.buyer.write(encode("stream", m.payload, session=t.id,
                                     eof=bool(m.get("eof"))))
        else:
            raise ProtocolError("frame", f"a seller may not send {m.type!r}")

    def _on_output(self, s: SellerConn, m: Message) -> None:
        """A piece of an attempt's output, ahead of its `result` (which carries the rest)."""
        aid = m.get("attempt")
        if type(aid) is not int:
            raise ProtocolError("frame", "output: attempt is required")
        entry = s.attempts.get(aid)
        if entry is None or self.tasks.get(entry[0].id) is not entry[0] or entry[0].session:
            return  # void or too late: its `result` is answered as such
        if next(iter(s.attempts)) != aid:
            raise ProtocolError("task", f"output for attempt {aid}, which is not the one "
                                        f"the seller runs")
        t = entry[0]
        got = s.outputs.get(aid)
        conns = self.buyers.get(t.buy_order_id)
        b = conns[-1] if conns else None
        if b is not None and (b.gone or not b.output_frames or t.redundancy != 1):
            b = None  # (under redundancy, only the output the sellers agree on goes out)
        if got is None:
            got = s.outputs[aid] = _Streamed(b)
        elif got.buyer is not b:
            got.buyer = None  # it missed a piece: it gets the whole output with `done`
        limit = s.order.output if s.order.output >= 0 else self.max_payload
        if got.n + len(m.payload) > limit:
            raise ProtocolError("task", f"attempt {aid}: output over the limit of "
                                        f"{limit} bytes")
        if got.buyer is not None:
            got.buyer.write(frame("output", m.payload, ref=t.ref, task=t.id,
                                  offset=got.n))
        got.pieces.append(m.payload)
        got.n += len(m.payload)
        got.sha256.update(m.payload)

    def _on_result(self, s: SellerConn, m: Message) -> None:
        aid = m["attempt"]
        entry = s.attempts.get(aid)
        if entry is None:
            # Too late (the attempt went elsewhere, or its task is closed), or an
            # attempt of an earlier connection or of the market before a restart:
            # it is paid nothing, and the seller hears so.
            if aid in s.stale:
                s.stale.discard(aid)
            else:
                log.info("%s returned attempt %d, which it is not running: paid nothing",
                         s, aid)
            s.write(encode("settled", attempt=aid, paid_milli=0, accepted=False))
            return
        t = entry[0]
        if self.tasks.get(t.id) is not t:
            # Its task closed while this attempt ran (the others agreed, or it
            # failed): the attempt is void and paid nothing.
            self._pop_attempt(s, aid)
            s.write(encode("settled", attempt=aid, paid_milli=0, accepted=False))
            return
        # (a session's output went to the buyer as a stream; the result carries none)
        output = m.payload
        streamed = s.outputs.pop(aid, None)
        if streamed is not None:  # the output came in `output` frames; the result has the rest
            h = streamed.sha256
            limit = s.order.output if s.order.output >= 0 else self.max_payload
            if streamed.n + len(m.payload) > limit:
                raise ProtocolError("task", f"attempt {aid}: output over the limit of "
                                            f"{limit} bytes")
            streamed.pieces.append(m.payload)
            output = b"".join(streamed.pieces)
            streamed.pieces = []
            h.update(m.payload)
            sha = h.hexdigest()
        else:
            sha = None if t.session else digest(output)
        if sha is not None and sha != m["output_sha256"]:
            raise ProtocolError("task", f"attempt {aid}: output_sha256 does not match the output")
        if m["cpu_ms"] < 0:
            raise ProtocolError("task", f"attempt {aid}: negative cpu_ms")
        self._pop_attempt(s, aid)
        t.running.pop(aid, None)
        key = (m["output_sha256"], m["exit_status"], m["signal"])
        t.results[aid] = (key, s.account_id, m["cpu_ms"], s.order.price_milli,
                          m["exit_status"], m["signal"], m["reason"])
        s.returned.add(aid)
        best, n = t.best()
        store = self._tx()
        if n >= t.redundancy:
            # The group reached k with this result, so it holds this output.
            ahead = None
            if streamed is not None and streamed.buyer is not None:
                ahead = (streamed.buyer, len(output) - len(m.payload))
            self._settle(t, best, output, aid, ahead)
            return
        store.attempt_returned(aid, m["cpu_ms"], m["output_sha256"], m["exit_status"],
                               m["signal"], m["reason"], output)
        if not t.running and len(t.results) >= 2 * t.redundancy:
            self._fail(t, "dispute", f"{len(t.results)} sellers returned results, at most "
                                     f"{n} agreed, {t.redundancy} must")
        else:
            self.queue[t.id] = None

    # --- buyer messages -----------------------------------------------------

    def _on_buyer(self, b: BuyerConn, m: Message) -> None:
        if m.type == "submit":
            self._on_submit(b, m)
        elif m.type == "image":
            self._on_image(b, m)
        elif m.type == "open":
            self._on_open(b, m)
        elif m.type == "cancel":
            # A task still pending under that ref fails now ("cancelled"): its
            # escrow is refunded, its sellers are told to stop.  Otherwise its
            # result is on its way or delivered, and the cancel changes nothing.
            tid = self.pending_refs.get((b.order_id, m["ref"]))
            t = self.tasks.get(tid) if tid is not None else None
            if t is not None and not t.session:
                self._fail(t, "cancelled", "cancelled by the buyer")
        elif m.type == "stream":
            t = self.tasks.get(m["session"])
            if t is None or not t.session or t.buyer is not b:
                b.write(encode("error", code="task", ref=None,
                               message=f"no open session {m['session']} on this connection"))
                return
            f = encode("stream", m.payload, session=t.id, eof=bool(m.get("eof")))
            s = next((x for x in t.running.values() if x is not None), None)
            if s is not None and not s.gone:
                s.write(f)
            else:
                t.streams.append(f)
        else:
            raise ProtocolError("frame", f"a buyer may not send {m.type!r}")

    def _on_image(self, b: BuyerConn, m: Message) -> None:
        d = m["image"]
        if d not in self.images and not self.store.has_image(d):
            try:
                image = bytecode.parse(m.payload, where=f"image {d[:16]}")
            except bytecode.BytecodeError as e:
                b.write(encode("error", code="image", ref=None, message=str(e)))
                return
            if image.digest != d:
                b.write(encode("error", code="image", ref=None,
                               message=f"image {d[:16]}: the image sent has digest "
                                       f"{image.digest[:16]}"))
                return
            self._tx().put_image(d, m.payload)
        self.images.add(d)
        self._after_commit(lambda: b.write(encode("image_ok", image=d)))

    def _check_request(self, b: BuyerConn, m: Message, k: int) -> tuple[int, str | None]:
        """(cpu_ms, None) for a valid submit/open, or (0, why) with the error code."""
        o = b.order
        if not 1 <= k <= MAX_REDUNDANCY:
            return 0, f"order:redundancy {k} is outside 1..{MAX_REDUNDANCY}"
        max_ms = o.max_cpu_seconds * 1000
        cpu_ms = m.get("cpu_ms") or max_ms
        if not 1 <= cpu_ms <= max_ms:
            return 0, (f"order:cpu_ms {cpu_ms} is outside 1..{max_ms} (the buy order's "
                       f"max_cpu_seconds)")
        image = m["image"]
        if image not in self.images:
            if not self.store.has_image(image):
                return 0, f"image:image {image} is unknown: send it first"
            self.images.add(image)
        return cpu_ms, None

    def _escrow(self, b: BuyerConn, k: int, cpu_ms: int) -> tuple[int, str | None]:
        o = b.order
        escrow = k * cost_milli(cpu_ms, o.price_milli)
        balance = self._tx().account_by_id(b.account_id).balance_milli
        if balance < escrow:
            return escrow, (f"account {b.account} holds {balance} milli-CPUCoins; the task "
                            f"needs {escrow} in escrow ({k} x {cpu_ms} ms at "
                            f"{o.price_milli} milli per CPU-hour)")
        return escrow, None

    def _new_task(self, b: BuyerConn, ref: str, image: str, payload: bytes, k: int,
                  cpu_ms: int, escrow: int, session: bool) -> TaskState:
        o = b.order
        with self._op() as store:
            tid = store.add_task(o.id, b.account_id, ref, image, payload, k, cpu_ms,
                                 o.price_milli, escrow, session)
            store.transfer("escrow", [(b.account_id, -escrow), (store.escrow_id, escrow)],
                           task_id=tid)
        t = TaskState(tid, o.id, b.account_id, ref, image, k, cpu_ms, o.price_milli, escrow,
                      session=session, buyer=b if session else None, input=payload)
        if len(payload) > SMALL_INPUT:
            # kept in memory only for the matching round that follows (a seller
            # may take it at once: no reading back what was just written)
            self._big_inputs.append(t)
        if not session:
            self.pending_refs[o.id, ref] = tid
        self.tasks[tid] = t
        self.queue[tid] = None
        return t

    def _on_open(self, b: BuyerConn, m: Message) -> None:
        ref = m["ref"]
        cpu_ms, why = self._check_request(b, m, 1)
        if why is None:
            escrow, funds = self._escrow(b, 1, cpu_ms)
            if funds is not None:
                why = "funds:" + funds
        if why is not None:
            code, _, message = why.partition(":")
            b.write(encode("error", code=code, ref=ref, message=message))
            return
        t = self._new_task(b, ref, m["image"], b"", 1, cpu_ms, escrow, True)
        self._after_commit(lambda: b.write(encode("opened", ref=ref, session=t.id)))

    def _on_submit(self, b: BuyerConn, m: Message) -> None:
        ref = m["ref"]
        k = m.get("redundancy") or b.order.redundancy
        cpu_ms, why = self._check_request(b, m, k)
        if why is None:
            old = None
            if (b.order.id, ref) in self.pending_refs:
                old = self._tx().pending_task(b.order.id, ref)
            if old is not None:  # a resubmission after a reconnect: the same task
                self._after_commit(lambda: b.write(encode(
                    "accepted", ref=ref, task=old.id, escrow_milli=old.escrow_milli)))
                return
            sent = b.sent_refs.get(ref)
            if sent is not None:
                # Its result went out on this connection already: a buyer that
                # reconnected resubmits what it has not read yet, and the results
                # kept for it are sent as soon as it connects.  Not a new task.
                self._after_commit(lambda: b.write(encode(
                    "accepted", ref=ref, task=sent, escrow_milli=0)))
                return
            escrow, funds = self._escrow(b, k, cpu_ms)
            if funds is not None:
                why = "funds:" + funds
        if why is not None:
            code, _, message = why.partition(":")
            b.write(encode("failed", ref=ref, task=None, code=code, message=message))
            return
        t = self._new_task(b, ref, m["image"], m.payload, k, cpu_ms, escrow, False)
        self._after_commit(lambda: b.write(encode("accepted", ref=ref, task=t.id,
                                                  escrow_milli=escrow)))

    # --- connections --------------------------------------------------------

    async def handle(self, reader, writer, ssl_ctx: ssl.SSLContext) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        try:
            await writer.start_tls(ssl_ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as e:
            why = getattr(e, "verify_message", None) or str(e) or type(e).__name__
            if isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLEOFError):
                log.warning("refused TLS connection from %s: %s", peer, why)
            else:  # a port probe, or a peer that gave up
                log.info("connection from %s ended during the TLS handshake: %s", peer, why)
            writer.transport.abort()
            return
        conn: Conn | None = None
        try:
            conn = await self._hello(reader, writer, peer)
            if conn is None:
                return
            self._conns.add(conn)
            await self._serve_conn(conn)
        except ProtocolError as e:
            log.warning("closing %s: %s", conn or peer, e)
            try:
                if conn is not None:
                    conn.send_out()
                writer.write(encode("error", code=e.code, message=e.message, ref=None))
            except Exception:  # noqa: BLE001 -- the connection may be gone already
                pass
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            log.info("connection %s ended: %s", conn or peer, e or type(e).__name__)
        except Exception:  # a bug: this connection ends, the market carries on
            log.exception("internal error on %s; closing it", conn or peer)
            try:
                writer.write(encode("error", code="internal", ref=None,
                                    message="internal error in the market; see its log"))
            except Exception:  # noqa: BLE001
                pass
        finally:
            if conn is not None:
                self._gone(conn)
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _hello(self, reader, writer, peer: str) -> Conn | None:
        ssl_obj = writer.get_extra_info("ssl_object")
        fingerprint, cn = peer_identity(ssl_obj)
        try:
            m = await asyncio.wait_for(read_message(reader, 4096), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            raise ProtocolError("frame", f"no hello within {HELLO_TIMEOUT:.0f} s") from None
        if m is None:
            return None
        if m.type != "hello":
            raise ProtocolError("frame", f"expected hello, got {m.type!r}")
        if m["version"] != VERSION:
            raise ProtocolError("version", f"this market speaks protocol version {VERSION}, "
                                           f"not {m['version']}")
        role = m["role"]
        if role not in ("seller", "buyer"):
            raise ProtocolError("frame", f"hello: role must be seller or buyer, not {role!r}")
        instance = m.get("instance") or ""
        if not INSTANCE_RE.fullmatch(instance):
            raise ProtocolError("frame", f"hello: instance {instance[:80]!r} is not 0 to 64 "
                                         f"of A-Z a-z 0-9 _ . @ : -")
        cert = self.store.cert(fingerprint)
        if cert is None:
            raise ProtocolError("auth", f"certificate {fingerprint[:16]} (CN={cn}) was not "
                                        f"issued by this market")
        if cert.revoked:
            raise ProtocolError("auth", f"certificate {fingerprint[:16]} (CN={cn}) is revoked")
        if cert.not_after < time.time():
            raise ProtocolError("auth", f"certificate {fingerprint[:16]} (CN={cn}) has expired")
        if cert.role != role:
            raise ProtocolError("auth", f"certificate {fingerprint[:16]} is a {cert.role}'s, "
                                        f"not a {role}'s")
        conn: Conn = SellerConn(self, reader, writer, peer) if role == "seller" else \
            BuyerConn(self, reader, writer, peer)
        conn.account_id, conn.account, conn.order_id = cert.account_id, cert.account, cert.order_id
        conn.fingerprint = fingerprint
        if role == "buyer":
            conn.output_frames = m.get("output_frames") is True
        if role == "seller":
            conn.order = self.store.sell_order(cert.order_id)
            conn.instance = instance
            key = (cert.order_id, instance)
            old = self.sellers.get(key)
            if old is not None:  # the same copy reconnecting: its old link is dead
                log.info("%s replaces its older connection from %s", conn, old.peer)
                self._gone(old)
                old.close()
            elif sum(1 for o, _ in self.sellers if o == cert.order_id) >= MAX_INSTANCES:
                raise ProtocolError("order", f"sell order {cert.order_id} already has "
                                             f"{MAX_INSTANCES} connections")
            self.sellers[key] = conn
        else:
            conn.order = self.store.buy_order(cert.order_id)
            self.buyers.setdefault(cert.order_id, []).append(conn)
        conn.write(encode("welcome", version=VERSION, account=cert.account,
                          order=cert.order_id, max_payload=self.max_payload,
                          heartbeat=self.heartbeat, prefetch=PREFETCH,
                          **({"output_chunks": OUTPUT_CHUNK} if role == "seller" else {})))
        log.info("%s connected (%s)", conn, m.get("software") or "unknown software")
        if role == "buyer":  # what finished while it was away, as committed
            def deliver() -> None:
                if conn.gone:
                    return
                for r in self.store.undelivered(cert.order_id):
                    self._send_result(conn, r)
            self._after_commit(deliver)
        return conn

    async def _serve_conn(self, conn: Conn) -> None:
        on = self._on_seller if conn.role == "seller" else self._on_buyer
        while not conn.closed:
            m = await read_message(conn.reader, self.max_payload)
            if m is None:
                log.info("%s disconnected", conn)
                return
            conn.last_seen = time.monotonic()
            if m.type == "ping":
                conn.write(encode("pong", t=m.get("t", 0)))
            elif m.type in ("pong", "error"):
                if m.type == "error":
                    log.warning("%s reports: %s: %s", conn, m["code"], m["message"])
            else:
                on(conn, m)
            if conn.writer.transport.get_write_buffer_size() > (1 << 20):
                await conn.writer.drain()

    def _gone(self, conn: Conn) -> None:
        """Forget a connection (idempotent); its running attempt is lost."""
        if conn.gone or self._stopping:
            return
        conn.gone = True
        self._conns.discard(conn)
        if isinstance(conn, SellerConn):
            self.ready.pop(conn, None)
            if self.sellers.get((conn.order_id, conn.instance)) is conn:
                del self.sellers[conn.order_id, conn.instance]
            self._lose_all(conn, "the seller disconnected")
        else:
            lst = self.buyers.get(conn.order_id, [])
            if conn in lst:
                lst.remove(conn)
            if not lst:
                self.buyers.pop(conn.order_id, None)
        self._schedule()

    def _recheck_certificates(self) -> None:
        """Close connections whose certificate was revoked since they connected."""
        for c in list(self._conns):
            cert = self.store.cert(c.fingerprint)
            if cert is None or cert.revoked:
                log.warning("closing %s: its certificate %s was revoked", c, c.fingerprint[:16])
                c.write(encode("error", code="auth", ref=None,
                               message=f"certificate {c.fingerprint[:16]} was revoked"))
                self._gone(c)
                c.close()

    async def _sweep(self) -> None:
        """Deadlines every second; pings and silent peers every heartbeat."""
        last_ping = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat))
            now = time.monotonic()
            for s in list(self.sellers.values()):
                if s.attempts and now > s.deadline:
                    self._lose(s, "deadline passed")
            if self.max_wait > 0:
                self._expire(now)
            if now - last_ping >= self.heartbeat:
                last_ping = now
                self._recheck_certificates()
                for c in list(self._conns):
                    if now - c.last_seen > 3 * self.heartbeat:
                        log.warning("closing %s: silent for %.0f s", c, now - c.last_seen)
                        self._gone(c)
                        c.writer.transport.abort()
                    else:
                        c.write(encode("ping", t=int(time.time())))

    # --- running ------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def serve(self, host: str, port: int, ssl_ctx: ssl.SSLContext,
                    started: asyncio.Future | None = None) -> None:
        if not self._recovered:
            self.recover()
        server = await asyncio.start_server(
            lambda r, w: self.handle(r, w, ssl_ctx), host, port, limit=8 << 20)
        addrs = ", ".join(f"{a[0]}:{a[1]}" for a in (s.getsockname() for s in server.sockets))
        log.info("cpushare-server %s (pid %d) listening on %s", __version__, os.getpid(), addrs)
        if started is not None:
            started.set_result(server.sockets[0].getsockname()[1])
        sweeper = asyncio.create_task(self._sweep())
        self._schedule()
        try:
            await self._stop.wait()
        finally:
            # What is written stays; attempts still running are lost at the
            # next start (recover), as after a crash.
            if self.fatal is None:
                self.commit_now()  # and tell what it made true, before closing
            self._stopping = True
            if self._commit_timer is not None:
                self._commit_timer.cancel()
            sweeper.cancel()
            server.close()
            for c in list(self._conns):
                c.close()
            for t in list(self._handlers):
                t.cancel()
            await asyncio.gather(*self._handlers, sweeper, return_exceptions=True)
            log.info("market stopped")
        if self.fatal is not None:
            raise self.fatal
