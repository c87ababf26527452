"""Leases: nodes of the kvm model, paid as they run.

A lease is a session (`open`) of a model whose work is leased nodes
(`models.Model.leases`): one seller boots the buyer's ISO and relays its
serial console as the session's stream.  Escrow holds the cost at the bid
of the next LEASE_AHEAD_MS of CPU time; each `meter` from the seller pays
the CPU time used since the last one at the seller's ask (exactly: the
per buyer and seller carry of settlement.py) and tops the escrow up again.
When the buyer cannot pay the next interval, the lease's CPU time is
spent, the buyer closes it, or the guest stays silent past the buy order's
boot_seconds, the seller is told to `stop` (it powers the guest off and
sends its `result`, the last report).  A lost seller ends its lease, paid
up to its last report.  The buyer hears each change as `lease` frames.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..protocol import MS_PER_HOUR, Message, ProtocolError, cost_milli, encode
from .conn import BuyerConn, SellerConn
from .state import BUSY_RETRY, Final, Rejection, TaskState, wall_ms_for

log = logging.getLogger("cpushare.market")

LEASE_AHEAD_MS = 60_000  # CPU time held in escrow ahead of a lease's use
# After a restart the market waits this long for the seller of each lease that
# was running (its guest runs on, and it reconnects saying so) before ending it.
LEASE_GRACE = 120.0
LEASE_ASK = 5.0  # s a seller back on another process waits for its lease's holder to answer
LEASE_MODELS = ("kvm",)  # models whose work is leases (models.Model.leases)
# A lease whose buyer has had no connection this long is powered off (a buyer
# that comes back within it takes its leases back).
BUYER_GRACE = 600.0
STATES = ("booting", "running", "paused")  # what a seller's `meter` may say
METER_MIN_INTERVAL = 0.5  # reports closer than this are not paid (each is a ledger write)


class Leases:
    """Mixed into Market."""

    # --- opening --------------------------------------------------------------

    def _open_lease(self, b: BuyerConn, m: Message) -> None:
        o = b.order
        ref = m["ref"]
        try:
            cpu_ms = self._check_request(b, m, 1)
            n = self.open_leases[o.id]
            if n >= o.max_nodes:
                raise Rejection("limit", f"buy order {o.id} has {n} nodes leased or waiting; "
                                         f"its max_nodes is {o.max_nodes}")
            escrow = self._escrow(b, 1, min(cpu_ms, LEASE_AHEAD_MS))
            link = self._check_link(m["link"]) if m.get("link") is not None else None
        except Rejection as e:
            b.write(encode("error", code=e.code, ref=ref, message=e.message))
            return
        t = self._new_task(b, ref, m["image"], b"", 1, cpu_ms, escrow, True)
        t.lease = True
        t.link = link
        t.memory = o.memory
        t.accel = o.accel
        t.image_size = self.store.image_size(t.image) or 0
        t.boot_seconds = o.boot_seconds
        self.open_leases[o.id] += 1
        self.leases[t.id] = t
        why = self._unfit(t)
        log.info("lease %d of %s: %d ms of CPU at most, %d bytes of memory%s", t.id, b, cpu_ms,
                 t.memory, f"; waits: {why}" if why else "")

        def opened() -> None:
            b.write(encode("opened", ref=ref, session=t.id))
            if t.lease_state == "waiting":
                self._tell(t, "waiting", why)
        self._after_commit(opened)

    def _adopt_leases(self, b: BuyerConn) -> None:
        """A buyer connection takes over the leases of its buy order whose
        connection is gone (they ran on meanwhile), or on another process
        (links.py): it hears their state."""
        for t in self.leases.values():
            if t.buy_order_id == b.order_id and (t.buyer is None or t.buyer.gone
                                                 or getattr(t.buyer, "remote", False)):
                if t.buyer is not None:
                    t.buyer.sessions.pop(t.id, None)
                t.buyer = b
                t.buyer_away_since = None
                b.sessions[t.id] = t
                self._after_commit(lambda t=t: self._tell(t, t.lease_state, t.ending or None))

    def _seek_buyer(self, t: TaskState) -> None:
        """Lease `t` came back (its seller reconnected after a restart or a
        takeover): its buyer's newest connection, here or elsewhere, hears it."""
        conns = self.buyers.get(t.buy_order_id)
        if conns:
            self._follow(t, conns[-1])
        elif self.fleet:
            home = self.store.buyer_home_of(t.buy_order_id)
            if home is not None and home in self.peer_links:
                self._lease_home(t.buy_order_id, home)

    # --- a market restart -----------------------------------------------------

    def _recover_lease(self, t: TaskState, attempts) -> None:
        """A lease of before the restart: it waits for its seller (recover())."""
        o = self.store.buy_order(t.buy_order_id)
        t.lease, t.memory, t.accel, t.boot_seconds = True, o.memory, o.accel, o.boot_seconds
        t.image_size = self.store.image_size(t.image) or 0
        t.lease_state, t.console_seen = "running", True
        t.buyer_away_since = time.monotonic()  # (until its buyer connects again)
        self.leases[t.id] = t
        self.open_leases[o.id] += 1
        running = [a for a in attempts if a.state == "running"]
        t.paid_milli = sum(a.paid_milli for a in attempts)
        if not running:  # no seller had it: nothing runs (what it asked for is not kept)
            self._fail(t, "cancelled", "the market restarted before a seller took the lease; "
                                       "open it again")
            return
        a = running[-1]
        t.metered_ms = a.cpu_ms or 0
        t.started += 1
        t.orphan = (a.id, a.sell_order_id)
        self.orphans[a.id] = t

    def _reclaim_lease(self, s: SellerConn, aid: int, cpu_ms: int, ask: bool = True) -> None:
        """Seller `s` reconnected running lease attempt `aid` (hello): it is its
        again, paid for what ran meanwhile; an attempt the market does not
        hold for it is stopped."""
        t = self.orphans.get(aid)
        now = time.monotonic()
        if t is None and self.fleet and now - self._reclaim_looked >= 0.1:
            self._reclaim_looked = now  # (its process may have died a moment ago: now)
            self._fleet_look()
            t = self.orphans.get(aid)
        if (t is None and self.fleet and ask and not s.attempts
                and self._want_lease(s, aid, cpu_ms)):
            return  # (another process holds it: asked for it, the seller waits)
        if t is None or t.orphan[1] != s.order_id or s.attempts:
            log.info("%s runs lease attempt %d, which is not its: stopping it", s, aid)
            s.stale.add(aid)
            s.write(encode("stop", attempt=aid))
            return
        del self.orphans[aid]
        now = time.monotonic()
        wall_ms = wall_ms_for(t.cpu_ms, s.order.wall_seconds * 1000)
        s.attempts[aid] = (t, wall_ms)
        s.head_since, s.deadline = now, now + (wall_ms + self.grace_ms) / 1000
        s.credit = 0
        t.running[aid] = s
        t.used_accounts.add(s.account_id)
        t.started_at = now
        self.busy[s] = None
        self.matcher.holds(s, 1)
        log.info("lease %d is back on %s", t.id, s)
        self._pay_lease(t, s, aid, cpu_ms)
        self._after_commit(lambda: self._tell(t, t.lease_state, seller=s.account))
        if t.buyer is None or t.buyer.gone:
            self._after_commit(lambda: self._seek_buyer(t))

    # --- a lease whose seller came back to another process ------------------------

    def _want_lease(self, s: SellerConn, aid: int, cpu_ms: int) -> bool:
        """Seller `s` came back here running lease attempt `aid`, which another
        live process holds (it took the lease over from its dead holder, and
        waits for the seller): ask it for the lease (lease_wanted, over a link)."""
        got = self.store.lease_holder(aid)
        if got is None or got[1] is None or got[1] == self.server_id or got[1] not in self.peers:
            return False
        self._wanted[aid] = (s, cpu_ms)
        self._link_write(got[1], encode("lease_wanted", attempt=aid))
        asyncio.get_running_loop().call_later(LEASE_ASK, self._lease_answer, aid, None)
        log.info("%s runs lease attempt %d of task %d, held by market process %d: asked "
                 "for it", s, aid, got[0], got[1])
        return True

    def _give_lease(self, pc, aid: int) -> None:
        """Process `pc.server` asks for lease attempt `aid`, whose seller came
        back there: it is its, if it still waits for its seller here."""
        t = self.orphans.get(aid)
        if t is None or self.tasks.get(t.id) is not t or not self._tx().hand_lease(
                t.id, pc.server):
            pc.write(encode("lease_kept", attempt=aid))
            return
        del self.orphans[aid]
        self.tasks.pop(t.id, None)
        self.leases.pop(t.id, None)
        self.open_leases[t.buy_order_id] -= 1
        self.open_tasks[t.buyer_account_id, True] -= 1
        if t.buyer is not None:
            t.buyer.sessions.pop(t.id, None)
        log.info("lease %d goes to market process %d, where its seller came back", t.id,
                 pc.server)
        self._after_commit(lambda: pc.write(encode("lease_given", attempt=aid, task=t.id)))

    def _lease_answer(self, aid: int, task_id: int | None) -> None:
        """The holder's answer to lease_wanted (task_id None: kept, or no answer
        within LEASE_ASK): the seller waiting for it runs it on, or stops."""
        want = self._wanted.pop(aid, None)
        if task_id is not None:
            rows = self._tx().handed_lease(task_id)
            if rows:
                self._load_tasks(rows, "")  # (a lease waiting for its seller: orphans)
                self._expire_orphans_later()
        if want is None:
            return
        s, cpu_ms = want
        if not s.gone and self.sellers.get((s.order_id, s.instance)) is s:
            self._reclaim_lease(s, aid, cpu_ms, ask=False)  # (or it is stopped)
        self._schedule()

    def _orphans_expire(self) -> None:
        """LEASE_GRACE after a restart: the leases whose seller did not come back end."""
        for aid, t in list(self.orphans.items()):
            del self.orphans[aid]
            if self.tasks.get(t.id) is t:
                self._tx().set_attempt_state(aid, "lost", t.paid_milli)
                self._fail(t, "task", f"the seller running the lease was lost: it did not "
                                      f"come back within {self.lease_grace:g} s of the "
                                      f"market's restart")
        self._schedule()

    # --- the link (docs/vpn.md) -------------------------------------------------

    @staticmethod
    def _check_link(text: str) -> str:
        """The buyer's endpoint HOST:PORT, checked; Rejection('order') if not."""
        from ..order import join_hostport, split_hostport
        try:
            host, port = split_hostport(text, default_port=0)
        except ValueError as e:
            raise Rejection("order", f"link: {e}") from None
        if port == 0 or len(text) > 300:
            raise Rejection("order", f"link: {text[:80]!r} is not HOST:PORT")
        return join_hostport(host, port)

    def _link_keys(self, t: TaskState, s: SellerConn, aid: int) -> dict:
        """A new key per direction for this lease's attempt (never kept: the
        market only introduces the two ends); the seller's fields of `task`,
        and the buyer's `link` frame goes after the commit."""
        import secrets
        link_id = t.id % (2**32 - 1) + 1
        to_buyer, to_seller = secrets.token_bytes(32).hex(), secrets.token_bytes(32).hex()
        def tell() -> None:
            if t.buyer is not None and not t.buyer.gone:
                t.buyer.write(encode("link", session=t.id, link_id=link_id, tx=to_seller,
                                     rx=to_buyer, seller=s.account))
        self._after_commit(tell)
        return dict(link_id=link_id, link_peer=t.link, link_tx=to_buyer, link_rx=to_seller)

    def _unfit(self, t: TaskState, cap: int = 10_000) -> str | None:
        """Why no connected seller could ever take lease `t` (None: one could)."""
        checked = 0
        reasons = set()
        for s in self.sellers.values():
            checked += 1
            if checked > cap:
                return None
            o = s.order
            if o.model != t.model:
                continue
            fails = {r for r, bad in (
                ("memory", 0 < o.memory < t.memory), ("cache", t.image_size > s.cache),
                ("accel", t.accel == "kvm" and s.accel != "kvm"),
                ("price", o.price_milli > t.bid_milli),
                ("link", bool(t.link) and not s.links)) if bad}
            if not fails:
                return None
            reasons |= fails
        if not reasons:
            return f"no seller of the {t.model} model is connected"
        said = {"memory": f"{t.memory >> 20} MiB of memory",
                "cache": f"a cache of {t.image_size} bytes (the ISO's size)",
                "accel": "working KVM (the buy order says accel = kvm)",
                "price": f"an ask at most the bid of {t.bid_milli} milli per CPU-hour",
                "link": "the encrypted link to the buyer's network (a newer seller)"}
        return "no connected seller offers " + " or ".join(said[r] for r in sorted(reasons))

    def _tell(self, t: TaskState, state: str, message: str | None = None,
              seller: str | None = None) -> None:
        """A `lease` frame to the buyer of lease `t`, now."""
        t.lease_state = state
        b = t.buyer
        if seller is None:
            s = t.session_seller()
            seller = s.account if s is not None else None
        if b is not None and not b.gone:
            b.write(encode("lease", session=t.id, ref=t.ref, state=state, cpu_ms=t.metered_ms,
                           cost_milli=t.paid_milli, seller=seller, message=message))

    # --- metering -------------------------------------------------------------

    def _on_meter(self, s: SellerConn, m: Message) -> None:
        aid = m["attempt"]
        entry = s.attempts.get(aid)
        if entry is None or self.tasks.get(entry[0].id) is not entry[0]:
            return  # a report of an attempt that ended meanwhile: its result settles it
        t = entry[0]
        if not t.lease:
            raise ProtocolError("task", f"meter for attempt {aid}, which is not a lease")
        state = m.get("state") or "running"
        if state not in STATES:
            raise ProtocolError("frame", f"meter: state {state[:20]!r} is not one of "
                                         f"{', '.join(STATES)}")
        now = time.monotonic()
        if t.started_at is None:
            t.started_at = now
        if now - t.metered_at >= METER_MIN_INTERVAL:
            t.metered_at = now
            self._pay_lease(t, s, aid, m["cpu_ms"])
        else:  # paid once the floor has passed: at most one ledger write per floor
            t.meter_due = max(t.meter_due, min(m["cpu_ms"], t.cpu_ms))
            if not t.meter_timer:
                t.meter_timer = True
                asyncio.get_running_loop().call_later(
                    METER_MIN_INTERVAL - (now - t.metered_at), self._meter_later, t, s, aid)
        if t.ending:
            return
        if state == "running" and not t.console_seen:
            state = "booting"  # (running means: it has printed on its console)
        if state != t.lease_state:
            self._tell(t, state, seller=s.account)
        if t.metered_ms >= t.cpu_ms:
            self._end_lease(t, f"the lease's {t.cpu_ms} ms of CPU time are used")
            return
        # the next interval, held ahead
        o = t.buyer_account_id
        need = cost_milli(min(LEASE_AHEAD_MS, t.cpu_ms - t.metered_ms), t.bid_milli)
        top = need - t.escrow_milli
        if top > 0 and self._lock("account", o):  # (busy: at the next report)
            store = self._tx()
            balance = store.account_by_id(o).balance_milli
            if balance < top:
                self._end_lease(t, f"the account holds {balance} milli-CPUCoins, the next "
                                   f"{LEASE_AHEAD_MS // 1000} s of CPU time cost {top} more")
                return
            store.transfer("escrow", [(o, -top), (store.escrow_id, top)], task_id=t.id)
            t.escrow_milli += top
            store.set_task_escrow(t.id, t.escrow_milli)

    def _meter_later(self, t: TaskState, s: SellerConn, aid: int) -> None:
        t.meter_timer = False
        if self.tasks.get(t.id) is t and aid in s.attempts and t.meter_due > t.metered_ms:
            t.metered_at = time.monotonic()
            self._pay_lease(t, s, aid, t.meter_due)
            self._schedule()

    def _pay_lease(self, t: TaskState, s: SellerConn, aid: int, cpu_ms: int) -> None:
        """Pay seller `s` for lease `t`'s CPU time up to `cpu_ms`, from escrow
        (and, past it, from the buyer's balance, while it lasts)."""
        cpu_ms = min(cpu_ms, t.cpu_ms)
        if cpu_ms <= t.metered_ms:
            return
        store = self._tx()
        owed = ((cpu_ms - t.metered_ms) * s.order.price_milli
                + store.carry(t.buyer_account_id, s.account_id))
        pay, rest = divmod(owed, MS_PER_HOUR)
        from_buyer = 0
        if pay > t.escrow_milli and not self._lock("account", t.buyer_account_id):
            # another process is changing the buyer's balance: paid after its commit
            t.meter_due = max(t.meter_due, cpu_ms)
            if not t.meter_timer:
                t.meter_timer = True
                asyncio.get_running_loop().call_later(BUSY_RETRY, self._meter_later, t, s, aid)
            return
        if pay > t.escrow_milli:  # it ran past what was held (a big guest between reports)
            balance = store.account_by_id(t.buyer_account_id).balance_milli
            from_buyer = min(pay - t.escrow_milli, balance)
            if pay > t.escrow_milli + from_buyer:
                pay, rest = t.escrow_milli + from_buyer, 0  # all there is; the rest is lost
                self._end_lease(t, "the account cannot pay the CPU time used")
        from_escrow = pay - from_buyer
        store.transfer("lease", [(t.buyer_account_id, -from_buyer),
                                 (store.escrow_id, -from_escrow), (s.account_id, pay)],
                       task_id=t.id)
        store.set_carry(t.buyer_account_id, s.account_id, rest)
        t.escrow_milli -= from_escrow
        t.paid_milli += pay
        t.metered_ms = cpu_ms
        store.set_task_escrow(t.id, t.escrow_milli)
        store.metered(aid, cpu_ms, t.paid_milli)
        if not t.ending and t.buyer is not None:
            self._after_commit(lambda: self._tell(t, t.lease_state))

    def _lease_console(self, t: TaskState) -> None:
        """The seller relayed console output: the node has booted."""
        if not t.console_seen:
            t.console_seen = True
            if not t.ending:
                self._tell(t, "running")

    # --- ending ---------------------------------------------------------------

    def _end_lease(self, t: TaskState, why: str) -> None:
        """Power the node off (its seller sends the final report as `result`);
        a lease no seller runs yet ends at once, refunded."""
        if t.ending:
            return
        t.ending = why
        s = t.session_seller()
        if s is None:
            self._fail(t, "cancelled", why)
            return
        log.info("lease %d ends: %s", t.id, why)
        self._tell(t, "ending", why)
        for aid, conn in t.running.items():
            if conn is not None and not conn.gone:
                conn.write(encode("stop", attempt=aid))

    def _on_close(self, b: BuyerConn, sid: int) -> None:
        t = b.sessions.get(sid)
        if t is None or not t.lease:
            b.write(encode("error", code="task", ref=None,
                           message=f"no open lease {sid} on this connection"))
            return
        self._end_lease(t, "closed by the buyer")

    def _lease_result(self, s: SellerConn, aid: int, t: TaskState, m: Message) -> None:
        """The guest is off: the last report, then the lease is closed."""
        self._pay_lease(t, s, aid, m["cpu_ms"])
        self._pop_attempt(s, aid)
        t.running.pop(aid, None)
        paid, cpu = t.paid_milli, t.metered_ms
        refund = t.escrow_milli
        reason = t.ending or m["reason"] or "the guest powered off"
        with self._op() as store:
            store.transfer("refund", [(store.escrow_id, -refund), (t.buyer_account_id, refund)],
                           task_id=t.id)
            store.set_attempt_state(aid, "accepted", paid,
                                    (cpu, m["output_sha256"], m["exit_status"], m["signal"],
                                     m["reason"]))
            fields = dict(exit_status=m["exit_status"], signal=m["signal"], reason=reason,
                          cpu_ms=cpu, cost_milli=paid, attempts=t.started)
            store.finish_task(t.id, "done", **fields)
            store.mark_delivered([t.id])
        t.escrow_milli = 0
        log.info("lease %d on %s ended: %d ms of CPU, paid %d milli (%s)", t.id, s, cpu, paid,
                 reason)
        self._close_task(t, {}, Final("done", fields, b""))
        self._after_commit(lambda: s.write(encode("settled", attempt=aid, paid_milli=paid,
                                                  accepted=True)))

    def _check_leases(self, now: float) -> None:
        """Every second: leases whose guest printed nothing within boot_seconds,
        and those whose buyer has been away for BUYER_GRACE."""
        for t in list(self.leases.values()):
            if (t.buyer_away_since is not None and not t.ending
                    and now - t.buyer_away_since > self.buyer_grace):
                self._end_lease(t, f"its buyer has had no connection for "
                                   f"{self.buyer_grace:g} s")
                continue
            if (not t.console_seen and not t.ending and t.started_at is not None
                    and now - t.started_at > t.boot_seconds):
                self._end_lease(t, f"not booting: the node printed nothing on its console "
                                   f"within {t.boot_seconds} s")
