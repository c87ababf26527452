"""Settlement: paying the agreeing results of a task, refunding a failed one,
and telling the sellers and the buyer once it is committed.

Money.  At `submit` the buyer's maximum cost, redundancy x
cost_milli(cpu_ms, bid) (rounded up), moves to escrow.  When k results
agree, each of the k sellers is paid the agreed CPU time at its ask, and
the buyer gets the rest back, in one transaction; a task that fails is
refunded whole.

Rounding never sets the price: a payment is exact in milli x ms per
CPU-hour, and what falls below one milli-CPUCoin is carried, per buyer
and seller account, into their next settlement (store.carry).  So a
buyer of a million 1-ms tasks pays what they cost, within one
milli-CPUCoin per seller, not a milli-CPUCoin a task.  A payment is at most
the attempt's escrow (ceil(x / M) bounds floor((x + carry) / M) for
carry < M), and the ask never exceeds the bid, so escrow always covers it.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from ..protocol import MS_PER_HOUR, encode, frame
from .state import Final, ResultKey, TaskState

log = logging.getLogger("cpushare.market")


class Payment(NamedTuple):
    attempt_id: int
    seller_account_id: int
    amount_milli: int


def agreed_cpu_ms(t: TaskState, key: ResultKey) -> int:
    """The CPU time paid for: the lowest claim of the k agreeing results, so
    that an inflated claim earns nothing (capped at the task's maximum)."""
    winners = [r for r in t.results.values() if r.key == key][:t.redundancy]
    return min(min(r.cpu_ms for r in winners), t.cpu_ms)


def payments(t: TaskState, key: ResultKey, carry) -> tuple[list[Payment], dict[int, int]]:
    """What each of the first k attempts that returned `key` is paid: the
    agreed CPU time at its own ask, with what the buyer owed that seller's
    account below one milli (`carry(seller account)`).  Also the new carries:
    seller account -> rest."""
    winners = [aid for aid, r in t.results.items() if r.key == key][:t.redundancy]
    cpu_ms = agreed_cpu_ms(t, key)
    pays = []
    rests = {}
    for aid in winners:
        r = t.results[aid]
        owed = cpu_ms * r.ask_milli + carry(r.seller_account_id)
        pays.append(Payment(aid, r.seller_account_id, owed // MS_PER_HOUR))
        rests[r.seller_account_id] = owed % MS_PER_HOUR
    total = sum(p.amount_milli for p in pays)
    if total > t.escrow_milli:  # cannot happen while ask <= bid; refuse rather than overdraw
        raise AssertionError(f"task {t.id}: payments {total} exceed escrow {t.escrow_milli}")
    return pays, rests


class Settlement:
    """Mixed into Market."""

    def _settle(self, t: TaskState, key: ResultKey, output: bytes, last: int,
                ahead: tuple | None = None) -> None:
        """Pay the k agreeing results (`last` is the attempt that completed them).

        `ahead`: (buyer connection, n) when the first n bytes of the output already
        went to that connection in `output` frames."""
        pays, rests = payments(t, key,
                               lambda acct: self.store.carry(t.buyer_account_id, acct))
        total = sum(p.amount_milli for p in pays)
        refund = t.escrow_milli - total
        first = t.results[pays[0].attempt_id]
        with self._op() as store:
            store.transfer("settle", [(store.escrow_id, -t.escrow_milli),
                                      *[(p.seller_account_id, p.amount_milli) for p in pays],
                                      (t.buyer_account_id, refund)], task_id=t.id)
            for acct, rest in rests.items():
                store.set_carry(t.buyer_account_id, acct, rest)
            paid = {p.attempt_id: p.amount_milli for p in pays}
            for aid, r in t.results.items():
                got = ((r.cpu_ms, r.key.output_sha256, r.exit_status, r.signal, r.reason)
                       if aid == last else None)
                if aid in paid:
                    store.set_attempt_state(aid, "accepted", paid[aid], got)
                elif r.key != key:
                    store.set_attempt_state(aid, "rejected", 0, got)
                    store.add_dispute(t.id, aid, r.seller_account_id, r.key.output_sha256,
                                      key.output_sha256)
                else:
                    store.set_attempt_state(aid, "void", 0, got)
            for aid in t.running:
                store.set_attempt_state(aid, "void")
            fields = dict(exit_status=first.exit_status, signal=first.signal,
                          reason=first.reason or "", cpu_ms=agreed_cpu_ms(t, key),
                          cost_milli=total, attempts=t.started)
            store.finish_task(t.id, "done", output=output, **fields)
            if t.session:  # a session's end is told once, to the connection that opened it
                store.mark_delivered([t.id])
        t.escrow_milli = 0
        self._close_task(t, paid, Final("done", fields, output, ahead))
        log.debug("task %d done: paid %d, refunded %d", t.id, total, refund)

    def _fail(self, t: TaskState, code: str, message: str) -> None:
        with self._op() as store:
            store.transfer("refund", [(store.escrow_id, -t.escrow_milli),
                                      (t.buyer_account_id, t.escrow_milli)], task_id=t.id)
            for aid, r in t.results.items():
                store.set_attempt_state(aid, "rejected")
                if code == "dispute":
                    store.add_dispute(t.id, aid, r.seller_account_id, r.key.output_sha256,
                                      None)
            for aid in t.running:  # (a lease keeps what its reports were paid)
                store.set_attempt_state(aid, "void", t.paid_milli)
            store.finish_task(t.id, "failed", attempts=t.started, fail_code=code,
                              fail_message=message, cpu_ms=t.metered_ms,
                              cost_milli=t.paid_milli)
            if t.session:
                store.mark_delivered([t.id])
        t.escrow_milli = 0
        log.info("task %d failed: %s: %s", t.id, code, message)
        self._close_task(t, {}, Final("failed", dict(code=code, message=message), b""))

    def _close_task(self, t: TaskState, paid: dict[int, int], final: Final) -> None:
        """After settle/fail: forget the task, tell sellers and the buyer after commit."""
        self.tasks.pop(t.id, None)
        self.matcher.dequeue(t.id)
        if t.session:
            self.open_tasks[t.buyer_account_id, True] -= 1
            if t.buyer is not None:
                t.buyer.sessions.pop(t.id, None)
        if t.lease and self.leases.pop(t.id, None) is not None:
            self.open_leases[t.buy_order_id] -= 1
        self._input_bytes -= t.input_in_memory
        t.input_in_memory = 0
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
        self._tell_home(t)
        self._after_commit(lambda: self._announce(t, notes, final))

    def _seller_of(self, aid: int, t: TaskState):
        acct = t.results[aid].seller_account_id
        for s in self.sellers.values():
            if s.account_id == acct and aid in s.returned:
                s.returned.discard(aid)
                return s
        return None

    def _announce(self, t: TaskState, notes, final: Final) -> None:
        for s, note in notes:
            s.write(note)
        state, fields, output, ahead = final
        if t.session:
            if t.buyer is not None and not t.buyer.gone:
                if state == "done":
                    f = {k: fields[k] for k in ("exit_status", "signal", "reason", "cpu_ms",
                                                "cost_milli")}
                else:  # (a lease paid its reports before it was lost)
                    f = dict(exit_status=None, signal=None, cpu_ms=t.metered_ms,
                             cost_milli=t.paid_milli,
                             reason=f"{fields['code']}: {fields['message']}")
                t.buyer.write(encode("closed", session=t.id, **f))
            return
        if self._buyer_not_here(t.buy_order_id):
            # kept in the store until the buyer comes back; or its newest
            # connection is on another market process, which is told
            self._announce_elsewhere(t)
            return
        b = self.buyers[t.buy_order_id][-1]
        if ahead is not None and ahead[0] is b and ahead[1]:
            # the connection has the first n bytes already: `done` carries the rest
            n = ahead[1]
            f = frame(state, memoryview(output)[n:], ref=t.ref, task=t.id, streamed=n,
                      **fields)
        else:
            f = frame(state, output, ref=t.ref, task=t.id, **fields)
        self._deliver(b, t.id, f)
