"""What buyers send: image, submit, open, cancel, stream; and the delivery
of results to them."""

from __future__ import annotations

import logging

from .. import bytecode
from ..protocol import Message, ProtocolError, cost_milli, encode, frame
from .conn import BuyerConn
from .state import MAX_REDUNDANCY, Rejection, TaskState
from .store import Result

log = logging.getLogger("cpushare.market")

SMALL_INPUT = 64 << 10  # inputs up to this size are kept in memory too
SENT_REFS = 1 << 16  # refs remembered per buyer connection (see BuyerConn.sent_refs)


class BuyerHandlers:
    """Mixed into Market."""

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
            self.images[d] = image.memory_size
        else:
            self._image_memory(d)
        self._after_commit(lambda: b.write(encode("image_ok", image=d)))

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
        if self._image_memory(m["image"]) is None:
            raise Rejection("image", f"image {m['image']} is unknown: send it first")
        return cpu_ms

    def _image_memory(self, digest: str) -> int | None:
        """The memory a run of a stored image needs (None: no such image)."""
        memory = self.images.get(digest)
        if memory is None:
            data = self.store.image(digest)
            if data is None:
                return None
            memory = self.images[digest] = bytecode.parse(data).memory_size
        return memory

    def _escrow(self, b: BuyerConn, k: int, cpu_ms: int) -> int:
        """The escrow a task needs; raises Rejection('funds') if the account lacks it."""
        o = b.order
        escrow = k * cost_milli(cpu_ms, o.price_milli)
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
                                 o.price_milli, escrow, session)
            store.transfer("escrow", [(b.account_id, -escrow), (store.escrow_id, escrow)],
                           task_id=tid)
        t = TaskState(tid, o.id, b.account_id, ref, image, k, cpu_ms, o.price_milli, escrow,
                      memory=self.images[image], session=session,
                      buyer=b if session else None, input=payload)
        if len(payload) > SMALL_INPUT:
            # kept in memory only for the matching round that follows (a seller
            # may take it at once: no reading back what was just written)
            self._big_inputs.append(t)
        if not session:
            self.pending_refs[o.id, ref] = tid
        self.tasks[tid] = t
        self.matcher.enqueue(t)
        return t

    def _on_open(self, b: BuyerConn, m: Message) -> None:
        ref = m["ref"]
        try:
            cpu_ms = self._check_request(b, m, 1)
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
            sent = b.sent_refs.get(ref)
            if sent is not None:
                # Its result went out on this connection already: a buyer that
                # reconnected resubmits what it has not read yet, and the results
                # kept for it are sent as soon as it connects.  Not a new task.
                self._after_commit(lambda: b.write(encode(
                    "accepted", ref=ref, task=sent, escrow_milli=0)))
                return
            escrow = self._escrow(b, k, cpu_ms)
        except Rejection as e:
            b.write(encode("failed", ref=ref, task=None, code=e.code, message=e.message))
            return
        t = self._new_task(b, ref, m["image"], m.payload, k, cpu_ms, escrow, False)
        self._after_commit(lambda: b.write(encode("accepted", ref=ref, task=t.id,
                                                  escrow_milli=escrow)))

    # --- delivery -------------------------------------------------------------

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
