"""What sellers send: ready, need_image, output, result, handback, stream."""

from __future__ import annotations

import logging

from ..protocol import Message, ProtocolError, digest, encode, frame
from .conn import SellerConn, Streamed
from .state import MAX_LOST, ResultKey, Returned

log = logging.getLogger("cpushare.market")

PREFETCH = 1  # tasks a seller may hold queued behind the one it runs (announced in welcome)
MAX_SLOTS = 16  # the most a `ready` may offer
# Sellers may send a big output in `output` frames of up to this many bytes while
# the job runs, ahead of its `result` (announced in welcome as output_chunks).
OUTPUT_CHUNK = 1 << 20
# A `result` with no exit status and no signal whose reason starts so is the
# seller's refusal to run the task, never the task's result.
REFUSALS = ("memory-limit", "sandbox", "seller error", "bad image")


class SellerHandlers:
    """Mixed into Market."""

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
            if s.credit and self.matcher.seller_ready(s):
                if self.fleet and self.peers:  # (fleet.py: work may wait in the shared queue)
                    self._pool_hint = True
                self._schedule()
        elif m.type == "need_image":
            self._on_need_image(s, m)
        elif m.type == "output":
            self._on_output(s, m)
        elif m.type == "meter":
            self._on_meter(s, m)
        elif m.type == "result":
            self._on_result(s, m)
        elif m.type == "handback":
            # it cancels what the seller asked for: it says `ready` again when it can
            s.credit = 0
            self.matcher.seller_busy(s)
            if m["attempt"] in s.attempts:
                self._lose(s, f"handed back: {m.get('reason') or 'no reason given'}",
                           m["attempt"], unstarted=m.get("unstarted") is True)
                s.stale.discard(m["attempt"])  # (no result follows a handback)
        elif m.type == "stream":
            t = s.running_task()
            if t is None or not t.session or t.id != m["session"]:
                raise ProtocolError("task", f"stream for session {m['session']}, which this "
                                            f"seller is not running")
            if t.lease and m.payload:
                self._lease_console(t)
            if t.buyer is not None and not t.buyer.gone:
                t.buyer.write(encode("stream", m.payload, session=t.id,
                                     eof=bool(m.get("eof"))))
        else:
            raise ProtocolError("frame", f"a seller may not send {m.type!r}")

    def _check_output(self, s: SellerConn, aid: int, n: int) -> None:
        """An attempt's whole output (`output` frames and `result`) is `n` bytes:
        within the seller's order, or that seller's error."""
        limit = s.order.output if s.order.output >= 0 else self.max_payload
        if n > limit:
            raise ProtocolError("task", f"attempt {aid}: output of {n} bytes over the limit "
                                        f"of {limit} bytes")

    @staticmethod
    def _paid_nothing(s: SellerConn, aid: int) -> None:
        s.write(encode("settled", attempt=aid, paid_milli=0, accepted=False))

    def _on_output(self, s: SellerConn, m: Message) -> None:
        """A piece of an attempt's output, ahead of its `result` (which carries the rest)."""
        aid = m.get("attempt")
        if aid is None:
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
            got = s.outputs[aid] = Streamed(b, hashed=t.redundancy > 1)
        elif got.buyer is not b:
            got.buyer = None  # it missed a piece: it gets the whole output with `done`
        self._check_output(s, aid, got.n + len(m.payload))
        if got.buyer is not None:
            got.buyer.write(frame("output", m.payload, ref=t.ref, task=t.id,
                                  offset=got.n))
        got.pieces.append(m.payload)
        got.n += len(m.payload)
        if got.sha256 is not None:
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
            self._paid_nothing(s, aid)
            return
        t = entry[0]
        if t.lease and self.tasks.get(t.id) is t:
            self._lease_result(s, aid, t, m)
            return
        if self.tasks.get(t.id) is not t:
            # Its task closed while this attempt ran (the others agreed, or it
            # failed): the attempt is void and paid nothing.
            self._pop_attempt(s, aid)
            self._paid_nothing(s, aid)
            return
        if (m["exit_status"] is None and m["signal"] is None
                and m["reason"].startswith(REFUSALS) and not t.session):
            # Not a result of the job: the seller could not run it (its limits,
            # its sandbox).  The task goes to another seller (not of this
            # account), and fails when MAX_LOST could not.
            self._pop_attempt(s, aid)
            t.running.pop(aid, None)
            t.refused += 1
            self._tx().set_attempt_state(aid, "void")
            self._paid_nothing(s, aid)
            log.info("%s could not run attempt %d of task %d: %s", s, aid, t.id,
                     m["reason"][:200])
            if t.refused >= MAX_LOST:
                self._fail(t, "limit", f"{t.refused} sellers could not run it; last: "
                                       f"{m['reason'][:200]}")
            else:
                self.matcher.enqueue(t)
            return
        # (a session's output went to the buyer as a stream; the result carries none)
        output = m.payload
        streamed = s.outputs.pop(aid, None)
        self._check_output(s, aid, (streamed.n if streamed is not None else 0) + len(output))
        if streamed is not None:  # the output came in `output` frames; the result has the rest
            h = streamed.sha256
            streamed.pieces.append(m.payload)
            output = b"".join(streamed.pieces)
            streamed.pieces = []
            if h is not None:
                h.update(m.payload)
            sha = h.hexdigest() if h is not None else None
        else:
            # Digests are what the results of k >= 2 sellers are compared by;
            # under redundancy 1 nothing is compared, and the output is not hashed.
            sha = None if t.session or t.redundancy == 1 else digest(output)
        if sha is not None and sha != m["output_sha256"]:
            raise ProtocolError("task", f"attempt {aid}: output_sha256 does not match the output")
        self._pop_attempt(s, aid)
        t.running.pop(aid, None)
        key = ResultKey(m["output_sha256"], m["exit_status"], m["signal"])
        t.results[aid] = Returned(key, s.account_id, m["cpu_ms"], s.order.price_milli,
                                  m["reason"])
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
            self.matcher.enqueue(t)
