"""What buyers send: image, submit, open, cancel, stream, ack; and the
delivery of results to them.

Delivery.  A result leaves the store only when the buyer acknowledges it
(`ack`), never when its frame is queued: a buyer that reconnects gets
every result it has not acknowledged.  Results go to the buyer's newest
connection while what is queued to it stays under RESULT_BUDGET bytes;
past that they wait in the store (owed), and a feeder sends them as the
buyer reads.  A buyer that does not read costs the market its budget and
one integer per result.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .. import models
from ..protocol import Message, ProtocolError, cost_milli, encode, frame, peek_headers
from .conn import BuyerConn
from .state import MAX_REDUNDANCY, Busy, Pending, Rejection, TaskState
from .store import Result

log = logging.getLogger("cpushare.market")

SMALL_INPUT = 64 << 10  # inputs up to this size are kept in memory too
# Per buyer account: tasks not yet acknowledged (queued, running, or with a
# result the buyer has not acked), and open sessions.  Past them a submit or
# open is refused with code `limit`.
MAX_OPEN_TASKS = 10_000
MAX_SESSIONS = 16
RESULT_BUDGET = 4 << 20  # bytes queued to a buyer before its results wait in the store
INPUT_BUDGET = 16 << 20  # small inputs of queued tasks kept in memory, in all
# A result no connection of its buy order acknowledged is dropped this long
# after its task was submitted (refs of a process that is gone would otherwise
# hold the account's MAX_OPEN_TASKS for ever).
RESULT_TTL = 30 * 86400
AHEAD_BATCH = 64  # submits whose refs one read ahead asks about (store/pgahead.py)
AHEAD_PEEK = 64 << 10  # ... found in at most these bytes of the connection's buffer
ACKED_LATELY = 8192  # tasks acked here whose result notifications are ignored (fleet.py)


class BuyerHandlers:
    """Mixed into Market."""

    def _on_buyer(self, b: BuyerConn, m: Message) -> None:
        if m.type == "submit":
            self._on_submit(b, m)
        elif m.type == "image":
            self._on_image(b, m)
        elif m.type == "image_offer":
            self._on_image_offer(b, m)
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
            elif t is None and tid is not None and self.fleet and tid in self.pending_tasks:
                self._cancel_elsewhere(tid)
        elif m.type == "ack":
            self._on_ack(b, m["task"])
        elif m.type == "close":
            if m["session"] in b.sessions or not self._to_holder(b, m):
                self._on_close(b, m["session"])
        elif m.type == "stream":
            t = self.tasks.get(m["session"])
            if t is None or not t.session or t.buyer is not b:
                if self._to_holder(b, m):  # (a lease another process holds: links.py)
                    return
                b.write(encode("error", code="task", ref=None,
                               message=f"no open session {m['session']} on this connection"))
                return
            f = encode("stream", m.payload, session=t.id, eof=bool(m.get("eof")))
            s = t.session_seller()
            if s is not None and not s.gone:
                s.write(f)
            else:  # (bounded: the buyer is not read past STREAM_BUDGET of them)
                t.streams.append(f)
                t.streamed_bytes += len(f)
        else:
            raise ProtocolError("frame", f"a buyer may not send {m.type!r}")

    async def _read_ahead(self, b: BuyerConn, m: Message) -> None:
        """What this submit or open will ask the store (its ref's result acked
        already; the account's lock, then its balance), read in the store's
        thread while the loop goes on (store/pgahead.py)."""
        for _ in range(2):  # (a commit cut meanwhile voids the answers: once more)
            store = self._tx()
            refs = []
            ref = m["ref"]
            if (m.type == "submit" and (b.order_id, ref) not in self.pending_refs
                    and store.asks_ref(b.order_id, ref)):
                refs.append(ref)
                # (and those of the submits already in its buffer, read next: asked once)
                # (a copy: a view would keep the reader from resizing its buffer)
                more = peek_headers(bytes(getattr(b.reader, "_buffer", b"")[:AHEAD_PEEK]),
                                    AHEAD_BATCH)
                for r in [f["ref"] for t, f in more if t == "submit"]:
                    if ((b.order_id, r) not in self.pending_refs and r not in refs
                            and store.asks_ref(b.order_id, r)):
                        refs.append(r)
            account = b.account_id
            k = ("account", account)
            if (k in self._held or not store.asks_lock(*k)
                    or self._yielding.get(k, 0.0) > time.monotonic()):  # (Fleet._lock's turns)
                account = None
            if not refs and account is None:
                return
            self._reading += 1  # (the group's commit waits a little for it)
            try:
                f = store.read_ahead(b.order_id, refs, account)
                await asyncio.wait([asyncio.wrap_future(f)])
                await self._commit_done(reads=False)  # (told before what this frame makes)
                if f.exception() is not None:  # (the transaction failed: its commit says so)
                    return
                if store.took_ahead(f.result()):
                    return
            finally:
                self._reading -= 1
                if self.fleet:
                    self._heard_later()  # (fleet.py: what was held back meanwhile)

    def _check_request(self, b: BuyerConn, m: Message, k: int) -> int:
        """The CPU time of a valid submit/open; raises Rejection."""
        o = b.order
        if not 1 <= k <= MAX_REDUNDANCY:
            raise Rejection("order", f"redundancy {k} is outside 1..{MAX_REDUNDANCY}")
        max_ms = o.max_cpu_seconds * 1000
        cpu_ms = m.get("cpu_ms") or max_ms
        if not 1 <= cpu_ms <= max_ms:
            raise Rejection("order", f"cpu_ms {cpu_ms} is outside 1..{max_ms} (the buy "
                                     f"order's max_cpu_seconds)")
        model = self._model_of(b)
        if model.leases and m.type == "submit":
            raise Rejection("order", f"buy order {o.id} is of model {model.name}: it opens "
                                     f"leases on nodes (open), it does not submit tasks")
        if self._image_memory(m["image"], o.model) is None:
            raise Rejection("image", f"image {m['image']} is unknown: send it first")
        return cpu_ms

    @staticmethod
    def _model_of(b: BuyerConn) -> models.Model:
        """The computation model of a buyer's work: its buy order's; Rejection
        ('order') when this market cannot serve it."""
        try:
            return models.get(b.order.model)
        except models.ModelError as e:
            raise Rejection("order", f"buy order {b.order_id}: {e}") from None

    def _escrow(self, b: BuyerConn, k: int, cpu_ms: int) -> int:
        """The escrow a task needs; raises Rejection('funds') if the account lacks it."""
        o = b.order
        escrow = k * cost_milli(cpu_ms, o.price_milli)
        if not self._lock("account", b.account_id):
            raise Busy(f"account {b.account_id}")
        balance = self._tx().account_by_id(b.account_id).balance_milli
        if balance < escrow:
            raise Rejection("funds", f"account {b.account} holds {balance} milli-CPUCoins; "
                                     f"the task needs {escrow} in escrow ({k} x {cpu_ms} ms "
                                     f"at {o.price_milli} milli per CPU-hour)")
        return escrow

    def _new_task(self, b: BuyerConn, ref: str, image: str, payload: bytes, k: int,
                  cpu_ms: int, escrow: int, session: bool) -> TaskState:
        o = b.order
        with self._op() as store:
            tid = store.add_task(o.id, b.account_id, ref, image, payload, k, cpu_ms,
                                 o.price_milli, escrow, session, o.model)
            store.transfer("escrow", [(b.account_id, -escrow), (store.escrow_id, escrow)],
                           task_id=tid)
        self.images_used.add(image)
        t = TaskState(tid, o.id, b.account_id, ref, image, k, cpu_ms, o.price_milli, escrow,
                      model=o.model, memory=self.images[image], session=session,
                      buyer=b if session else None, input=payload)
        if len(payload) > SMALL_INPUT or self._input_bytes + len(payload) > INPUT_BUDGET:
            # kept in memory only for the matching round that follows (a seller
            # may take it at once: no reading back what was just written)
            self._big_inputs.append(t)
        else:
            t.input_in_memory = len(payload)
            self._input_bytes += len(payload)
        if session:
            b.sessions[tid] = t
        if session:
            self.open_tasks[b.account_id, True] += 1
        else:
            self._remember_pending(o.id, ref, tid, b.account_id)
        self.tasks[tid] = t
        self.matcher.enqueue(t)
        return t

    def _on_open(self, b: BuyerConn, m: Message) -> None:
        ref = m["ref"]
        if b.order.model == "kvm":  # (models whose work is leases: leases.py)
            self._open_lease(b, m)
            return
        try:
            cpu_ms = self._check_request(b, m, 1)
            self._check_open(b, True)
            escrow = self._escrow(b, 1, cpu_ms)
        except Rejection as e:
            b.write(encode("error", code=e.code, ref=ref, message=e.message))
            return
        t = self._new_task(b, ref, m["image"], b"", 1, cpu_ms, escrow, True)
        self._after_commit(lambda: b.write(encode("opened", ref=ref, session=t.id)))

    def _on_submit(self, b: BuyerConn, m: Message) -> None:
        ref = m["ref"]
        k = m.get("redundancy") or b.order.redundancy
        try:
            cpu_ms = self._check_request(b, m, k)
            old = None
            if (b.order.id, ref) in self.pending_refs:
                old = self._tx().pending_task(b.order.id, ref)
            if old is not None:  # a resubmission after a reconnect: the same task
                self._after_commit(lambda: b.write(encode(
                    "accepted", ref=ref, task=old.id, escrow_milli=old.escrow_milli)))
                return
            acked = self.store.delivered_task(b.order.id, ref)
            if acked is not None:  # never a second paid task under one ref
                raise Rejection("order", f"ref {ref!r} names task {acked}, whose result "
                                         f"this buy order acknowledged")
            self._check_open(b, False)
            escrow = self._escrow(b, k, cpu_ms)
        except Rejection as e:
            b.write(encode("failed", ref=ref, task=None, code=e.code, message=e.message))
            return
        t = self._new_task(b, ref, m["image"], m.payload, k, cpu_ms, escrow, False)
        self._after_commit(lambda: b.write(encode("accepted", ref=ref, task=t.id,
                                                  escrow_milli=escrow)))

    def collect(self) -> tuple[int, int]:
        """Hourly: drop results no one acknowledged for RESULT_TTL, then images
        no task uses and none used for IMAGE_TTL.  (results, images) removed."""
        stale = self.store.stale_results(time.time() - self.result_ttl)
        for tid in stale:
            self._forget_pending(tid)
        if stale:
            self._tx().mark_delivered(stale)
            log.warning("dropped %d results their buyers did not acknowledge within %g s",
                        len(stale), self.result_ttl)
        return len(stale), self.collect_images()

    def _check_open(self, b: BuyerConn, session: bool) -> None:
        n = self.open_tasks[b.account_id, session]
        cap = self.max_sessions if session else self.max_open_tasks
        if n >= cap:
            what = "open sessions" if session else ("tasks not yet acknowledged (queued, "
                                                    "running or with a result to ack)")
            raise Rejection("limit", f"account {b.account} has {n} {what}; the market "
                                     f"takes at most {cap}")

    # --- delivery -------------------------------------------------------------

    def _deliver(self, b: BuyerConn, tid: int, frame_=None) -> None:
        """Send the result of task `tid` to `b` now (`frame_`, or read from the
        store), or owe it while the connection's budget is spent."""
        if tid in b.unacked:
            return
        if b.owed or b.buffered >= self.result_budget:
            b.owed[tid] = None
            self._feed(b)
            return
        self._hand(b, tid, frame_ or self._result_frame(self.store.result(tid)), b.write)

    def _hand(self, b: BuyerConn, tid: int, frame_, write) -> None:
        """Send a result on `b` with `write` (b.write: after the commit; b.write_now)."""
        b.unacked.add(tid)
        write(frame_)
        if not b.acks:  # a buyer that does not ack: delivered once sent, as before acks
            self._on_ack(b, tid)

    @staticmethod
    def _result_frame(r: Result):
        if r.state == "done":
            return frame("done", r.output, ref=r.ref, task=r.task_id,
                         exit_status=r.exit_status, signal=r.signal, reason=r.reason,
                         cpu_ms=r.cpu_ms, cost_milli=r.cost_milli, attempts=r.attempts)
        return encode("failed", ref=r.ref, task=r.task_id, code=r.fail_code or "task",
                      message=r.fail_message or "")

    def _feed(self, b: BuyerConn) -> None:
        if b.feeder is None and not b.gone:
            b.feeder = asyncio.get_running_loop().create_task(self._feed_owed(b))

    async def _feed_owed(self, b: BuyerConn) -> None:
        """Send what is owed to `b` from the store, as it reads."""
        try:
            while b.owed and not b.gone and not self._stopping:
                if b.buffered >= self.result_budget // 2:
                    await b.drained()
                    await asyncio.sleep(0)
                    continue
                await self._commit_done()
                if not b.owed or b.gone:
                    break
                tid = next(iter(b.owed))
                del b.owed[tid]
                if tid in self.pending_tasks and tid not in b.unacked:
                    self._hand(b, tid, self._result_frame(self.store.result(tid)),
                               b.write_now)
        except (ConnectionError, OSError, RuntimeError) as e:
            log.info("%s: sending owed results ended: %r", b, e)
        finally:
            b.feeder = None

    def _owe_all(self, b: BuyerConn) -> None:
        """Every result this buy order has not acknowledged, to a buyer that connected."""
        if b.gone:
            return
        for tid in self.store.undelivered_ids(b.order_id):
            b.owed[tid] = None
        self._feed(b)

    def _on_ack(self, b: BuyerConn, tid: int) -> None:
        """The buyer has the result of task `tid`: it leaves the store."""
        b.unacked.discard(tid)
        b.owed.pop(tid, None)
        where = self.pending_tasks.get(tid)
        if where is None or where.buy_order_id != b.order_id or tid in self.tasks:
            return  # not a result of this buy order waiting for its ack: nothing to do
        self._forget_pending(tid)
        self.acked_lately[tid] = None  # (a late notification of its result: fleet.py)
        if len(self.acked_lately) > ACKED_LATELY:
            self.acked_lately.popitem(last=False)
        # written now, in the group transaction: a resubmission of its ref in the
        # same group must see it (store.delivered_task)
        self._tx().mark_delivered([tid], [where.key])

    def _remember_pending(self, buy_order_id: int, ref: str, tid: int,
                          buyer_account_id: int) -> None:
        """Task `tid`'s result will wait for its buyer's ack (see _forget_pending)."""
        self.pending_refs[buy_order_id, ref] = tid
        self.pending_tasks[tid] = Pending(buy_order_id, ref, buyer_account_id)
        self.pending_of.setdefault(buy_order_id, set()).add(tid)
        self.open_tasks[buyer_account_id, False] += 1

    def _forget_pending(self, tid: int) -> None:
        """Task `tid`'s result is no longer waiting for its ack (acked, or dropped)."""
        where = self.pending_tasks.pop(tid, None)
        if where is not None:
            self.pending_refs.pop(where.key, None)
            of = self.pending_of[where.buy_order_id]
            of.discard(tid)
            if not of:
                del self.pending_of[where.buy_order_id]
            self.open_tasks[where.buyer_account_id, False] -= 1
