"""Several processes serving one market on one PostgreSQL database
(docs/scale.md, "Several processes"; the store's side is store/pgfleet.py).

Each process keeps in memory the tasks it holds (`tasks.owner`) and runs
them on its own sellers, exactly as a lone process does.  A process whose
sellers are idle claims from the shared queue (FOR UPDATE SKIP LOCKED,
woken by NOTIFY queue), and, finding too little there, says so (NOTIFY
idle); then the others offer it what they could not start within
SHARE_AFTER.  A result reaches its buyer's process by NOTIFY
too.  Once a second every process looks for dead ones, and takes over
their tasks: their running attempts are lost and their tasks requeued,
as after a restart.

What stays with the buyer's process: sessions and leases, which run on
its sellers.  A lease follows its buyer when the buyer connects to
another process: its frames go there over a link (links.py).

Certificates: a heartbeat looks nothing up here (on a store one process
serves, it reads the certificate's row: a function call).  The hello
reads the certificate from the store, and the connection keeps what it
read; `cert revoke` sends `NOTIFY revoke FINGERPRINT` in its
transaction, and every process closes that certificate's connections
when it hears it (one whose listener's session fails stops).  A
notification is heard only by a session listening when it commits, and
the listener's session listens from before the market accepts its first
connection: a certificate revoked after a hello's read is heard after
that connection is served (the hello does not yield to the loop between
its read and then), and one revoked before is read revoked.  Against a
notification missed all the same (a listener's session lost unnoticed),
every CERT_RECHECK seconds the certificates of this process's
connections are read again in one statement.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from .buyers import INPUT_BUDGET, SMALL_INPUT
from .leases import LEASE_MODELS
from .state import ResultKey, Returned, TaskState

log = logging.getLogger("cpushare.market")

SHARE_AFTER = 0.02  # s: a task no seller here took in this time is offered to the others
BATCH = 256  # tasks offered or claimed in one statement
CLAIM_AHEAD = 32  # tasks claimed per task the idle sellers may take now (8: 14% of a
# claiming process's loop was its claims; what it cannot start soon is offered back)
YIELD_FOR = 0.01  # s: a key another process asked for is left to it this long
# A process whose sellers found no work says so (NOTIFY idle) at most every
# IDLE_EVERY; the others offer what waits for IDLE_HEARD after hearing it.
# So the database carries no sharing while every process has work enough.
IDLE_EVERY = 0.1
IDLE_HEARD = 0.25
# A revocation is heard at once (NOTIFY revoke); one missed is found within this.
CERT_RECHECK = 60.0


class Fleet:
    """Mixed into Market."""

    def _init_fleet(self) -> None:
        self.fleet = bool(getattr(self.store, "shared", False))
        self.server_id: int | None = None
        self.peers: list[int] = []  # the other live servers
        self._pool_hint = True  # the shared queue may hold work for our sellers
        self._remote_results: list[tuple[int, int]] = []  # (buy order, task) to announce
        self._heard: list[str] = []  # notifications heard during a commit on its way
        self._claiming = False  # a claim is on its way in the store's writer thread
        self._share_due = False  # an offer waits for the commit on its way
        # buy orders with connections here whose newest is on another process
        self.away: dict[int, int] = {}
        self._idle_said = 0.0  # when we last said our sellers wait for work
        self._idle_peers_until = 0.0  # another process's sellers wait, until then
        self._yielding: dict[tuple, float] = {}  # key -> until when it is left to others
        self._asked: dict[tuple, float] = {}  # key -> until when not to ask again
        self._share_timer: asyncio.TimerHandle | None = None
        self._listen = None  # the listener's session (store.listener()), and its descriptor
        self._listen_fd = -1
        self._certs_checked = time.monotonic()

    # --- joining, leaving --------------------------------------------------------

    def _fleet_join(self) -> None:
        """In recover(): register, listen, and take over the dead (our predecessor too)."""
        self.server_id = self.store.join(socket.gethostname(), os.getpid(), self._link_where)
        self._listen = self.store.listener()
        # (its descriptor kept: a session that is lost has none to ask for)
        self._listen_fd = self._listen.fileno()
        asyncio.get_running_loop().add_reader(self._listen_fd, self._on_notifies)
        log.info("serving as market process %d of this database", self.server_id)
        self._fleet_look()

    def _fleet_leave(self) -> None:
        if self._listen is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._listen_fd)
            except (ValueError, OSError):
                pass
            self._listen.close()
            self._listen = None
        if self._share_timer is not None:
            self._share_timer.cancel()
            self._share_timer = None

    def _fleet_look(self) -> None:
        """Once a second: who else serves; take over the tasks of the dead."""
        store = self._tx()
        self.peer_links, dead = store.servers()
        self.peers = list(self.peer_links)
        for sid in dead:
            pc = self._links_out.get(sid)
            if pc is not None:
                pc.close()
            self._link_lost(sid)
        self._pool_hint = True
        self._schedule()  # (idle sellers look into the shared queue again)
        cancelled = store.claim_cancelled()
        if cancelled:
            self._load_tasks(cancelled, "")
        if not dead:
            return
        rows, lost = store.take_over(dead, LEASE_MODELS)
        store.forget_homes(self._listen, dead)
        self._listened()
        store.notify_all("queue")  # (what the dead had offered is claimable again)
        self._load_tasks(rows, "the market process serving it stopped")
        log.info("took over %d queued tasks of market process(es) %s, which stopped; %d "
                 "of their running attempts were lost and are requeued", len(rows),
                 ", ".join(map(str, dead)), lost)
        self._expire_orphans_later()

    # --- tasks into memory ------------------------------------------------------

    def _load_tasks(self, rows, why: str, attempts: dict | None = None) -> None:
        """Tasks read from the store (recovered, taken over, claimed) into memory:
        rows of (TaskRow, input or None, whether its buyer cancelled it), and
        their attempts if read with them."""
        store = self.store
        if attempts is None:
            attempts = (store.attempts_of([r[0].id for r in rows]) if self.fleet
                        else {r[0].id: store.attempts(r[0].id) for r in rows})
        for row, input_, cancelled in rows:
            t = TaskState(row.id, row.buy_order_id, row.buyer_account_id, row.ref, row.image,
                          row.redundancy, row.cpu_ms, row.bid_milli, row.escrow_milli,
                          session=row.session, model=row.model,
                          memory=self._image_memory(row.image, row.model) or 0)
            # (as a submitted task's: small ones, within the market's budget)
            if (input_ is not None and len(input_) <= SMALL_INPUT
                    and self._input_bytes + len(input_) <= INPUT_BUDGET):
                t.input, t.input_in_memory = input_, len(input_)
                self._input_bytes += len(input_)
            mine = attempts.get(row.id, [])
            for a in mine:
                t.started += 1
                if a.state == "returned":
                    t.results[a.id] = Returned(
                        ResultKey(a.output_sha256, a.exit_status, a.signal),
                        a.seller_account_id, a.cpu_ms, a.ask_milli, a.reason)
                    t.used_accounts.add(a.seller_account_id)
                elif a.state == "lost":
                    t.lost += 1
            self.tasks[t.id] = t
            if cancelled and not t.session:
                self._fail(t, "cancelled", "cancelled by the buyer")
            elif t.session and row.model in LEASE_MODELS:
                self.open_tasks[t.buyer_account_id, True] += 1
                self._recover_lease(t, mine)
            elif t.session:
                self.open_tasks[t.buyer_account_id, True] += 1
                self._fail(t, "task", why + " during the session")
            else:
                self.matcher.enqueue(t)

    def _expire_orphans_later(self) -> None:
        if self.orphans:
            log.info("%d leases wait %g s for their sellers to come back", len(self.orphans),
                     self.lease_grace)
            asyncio.get_running_loop().call_later(self.lease_grace, self._orphans_expire)

    # --- the shared queue -------------------------------------------------------

    def _fleet_after_pump(self) -> None:
        """After each matching round: claim work for idle sellers; offer what waits."""
        if self._stopping:
            return
        if self._pool_hint and self.matcher.ready and not self._store_busy():
            self._claim()  # (else after that commit: _committed schedules a round)
        self._share_later()

    def _share_later(self) -> None:
        """Offer waiting work in SHARE_AFTER, if another process said it has idle sellers."""
        if (self.peers and self.matcher.queue and self._share_timer is None
                and self._idle_peers_until > time.monotonic() and not self._stopping):
            self._share_timer = asyncio.get_running_loop().call_later(SHARE_AFTER, self._share)

    def _claim(self) -> None:
        """Claim from the shared queue for the idle sellers, in the store's writer
        thread (store.claim_apart): the loop goes on, and loads what came when
        it comes (_claimed); the group's commit waits for it (as for a read
        ahead), so the tasks it took are committed as this process's."""
        if self._claiming:
            return
        ready = list(self.matcher.ready)
        # (more than the sellers take at once: a claim per task crossing
        # processes would cost more than the task; what is left over waits
        # here, and is offered again if another process goes idle)
        n = min(BATCH, CLAIM_AHEAD * sum(max(1, s.credit) for s in ready))
        f = self._tx().claim_apart(n, sorted({s.order.model for s in ready}),
                                   min(s.order.price_milli for s in ready),
                                   max(s.order.cpu_seconds for s in ready) * 1000)
        self._claiming = True
        self._apart(f, "claiming from the shared queue", lambda r: self._claimed(r, n))

    def _apart(self, f, what: str, then=None) -> None:
        """A store call on its way in the writer thread (a claim, an offer, a read
        of results): the group's commit waits a little for it, as for a read
        ahead; when it is done, what was heard meanwhile is heard, and
        `then(its result)` runs, unless the market stops.  Its failure stops
        the market, as a failed statement of the loop's would."""
        self._reading += 1

        def done(f) -> None:
            self._reading -= 1
            self._heard_later()
            if self._stopping or self.fatal is not None or f.cancelled():
                return
            if f.exception() is not None:  # (its transaction failed)
                self._die(f"{what} failed", f.exception())
            elif then is not None:
                then(f.result())
        asyncio.wrap_future(f).add_done_callback(done)

    def _claimed(self, result, n: int) -> None:
        self._claiming = False  # (before what was heard meanwhile: it may name these)
        rows, attempts = result
        if len(rows) < n:
            self._pool_hint = False
            now = time.monotonic()
            if self.peers and now >= self._idle_said + IDLE_EVERY and self._listen is not None:
                # sellers here wait for work: the others offer theirs (_share)
                self._idle_said = now
                self.store.notify_idle(self._listen)
                self._listened()
        if rows:
            self._load_tasks(rows, "", attempts)
        self._schedule()

    def _share(self) -> None:
        """Offer the others the tasks that waited SHARE_AFTER here with no attempt
        running: they leave this process's memory (their buyers' refs stay)."""
        self._share_timer = None
        if (self._stopping or self.fatal is not None or not self.peers
                or self._idle_peers_until <= time.monotonic()):
            return
        if self._store_busy():  # (its statement would wait for that commit: right after it)
            self._share_due = True
            return
        now = time.monotonic()
        out = []
        for tid in self.matcher.queue:
            t = self.tasks.get(tid)
            if (t is None or t.session or t.lease or t.running
                    or now - t.waiting_since < SHARE_AFTER):
                continue
            out.append(t)
            if len(out) >= BATCH:
                break
        if out:
            self._apart(self._tx().release_apart([t.id for t in out]),
                        "offering tasks to the shared queue")
            for t in out:
                self.tasks.pop(t.id, None)
                self.matcher.dequeue(t.id)
                self._input_bytes -= t.input_in_memory
                t.input_in_memory, t.input = 0, None
        self._share_later()

    # --- notifications ----------------------------------------------------------

    def _on_notifies(self) -> None:
        if self._listen is None:
            return
        try:
            payloads = self._listen.poll()
        except Exception as e:  # the database connection is gone: as a failed commit
            self._fleet_leave()
            self._die("the database's notifications failed", e)
            return
        if self._store_busy() or self._claiming:
            # (what they ask reads the store, or names a task a claim on its way
            # may be taking: after it; a yield reads nothing, and is heard now)
            for p in payloads:
                if p.startswith("yield "):
                    self._on_yield(p[6:])
                else:
                    self._heard.append(p)
            return
        payloads, self._heard = self._heard + payloads, []
        revoked: set[str] = set()
        results: list[tuple[int, int]] = []
        for p in payloads:
            kind, _, rest = p.partition(" ")
            try:
                args = [int(x) for x in rest.split()]
            except ValueError:
                args = None
            if kind == "queue":
                self._pool_hint = True
            elif kind == "idle" and args and len(args) == 1:
                if args[0] != self.server_id:
                    self._idle_peers_until = time.monotonic() + IDLE_HEARD
                    self._share_later()
            elif kind == "yield":
                self._on_yield(rest)
            elif kind == "home" and args and len(args) == 2:
                if args[1] == self.server_id:
                    self.away.pop(args[0], None)
                elif args[0] in self.buyers:  # (our connections of it are older)
                    self.away[args[0]] = args[1]
                self._lease_home(args[0], args[1])  # (its leases here follow it: links.py)
            elif kind == "result" and args and len(args) == 2:
                results.append((args[0], args[1]))
            elif kind == "cancel" and args and len(args) == 1:
                t = self.tasks.get(args[0])
                if t is not None and not t.session:
                    self._fail(t, "cancelled", "cancelled by the buyer")
            elif kind == "revoke" and 0 < len(rest) <= 128:
                revoked.add(rest)
            else:
                log.warning("ignored a notification of the database: %r", p[:80])
        if results:
            self._results_heard(results)
        if revoked:
            self._close_certs(revoked)
        self._schedule()

    def _results_heard(self, results: list[tuple[int, int]]) -> None:
        """`result ORDER TASK` notifications heard together: the results whose
        buyer is connected here are read together, in the store's writer
        thread (a statement a buy order, within its connection's budget: the
        rest are owed, and read as it drains), and sent when they come
        (_results_read).  A notification comes twice (by the commit, then
        after it: the buyer may have moved meanwhile); one of a result sent
        or owed already, or acked lately, reads nothing."""
        by_order: dict[int, set[int]] = {}
        for order, tid in results:
            if self.buyers.get(order) and tid not in self.acked_lately:
                by_order.setdefault(order, set()).add(tid)
        for order, tids in by_order.items():
            conn = self.buyers[order][-1]
            # (unknown: submitted through another process since the buyer connected here)
            unknown = sorted(t for t in tids if t not in self.pending_tasks)
            want = sorted(t for t in tids if t in self.pending_tasks
                          and t not in conn.unacked and t not in conn.owed)
            if not unknown and not want:
                continue
            room = (0 if conn.owed or conn.buffered >= self.result_budget
                    else self.result_budget - conn.buffered)
            self._apart(self.store.results_apart(order, unknown, want, room),
                        "reading results from the store",
                        lambda r, order=order: self._results_read(r, order))

    def _results_read(self, result, order: int) -> None:
        rows, got, past = result
        for row in rows:
            if row[2] not in self.pending_tasks:
                self._remember_pending(*row)
        conns = self.buyers.get(order)
        if not conns:  # (gone meanwhile: they wait for it, as every result does)
            return
        conn = conns[-1]
        for r in got:
            if r.task_id in self.pending_tasks:
                self._deliver(conn, r.task_id, self._result_frame(r))
        owed = [t for t in past if t in self.pending_tasks and t not in conn.unacked]
        for t in owed:  # (read as the connection drains)
            conn.owed[t] = None
        if owed:
            self._feed(conn)

    # --- certificates --------------------------------------------------------------

    def _close_certs(self, fingerprints: set[str]) -> None:
        """These certificates are revoked: their connections here are closed."""
        if self._stopping:
            return
        for c in [c for c in self._conns if c.fingerprint in fingerprints]:
            self._close_revoked(c)

    def _recheck_certs(self, now: float) -> None:
        """Every CERT_RECHECK (the sweeper's second): the certificates of this
        process's connections, read again in one statement, for a revocation
        whose notification was missed."""
        if now - self._certs_checked < CERT_RECHECK:
            return
        self._certs_checked = now
        fingerprints = sorted({c.fingerprint for c in self._conns})
        if fingerprints:
            gone = self.store.revoked_among(fingerprints)
            if gone:
                log.warning("%d revoked certificates found by their recheck (their "
                            "notification was not heard)", len(gone))
                self._close_certs(gone)

    def _on_yield(self, rest: str) -> None:
        """`yield SERVER KIND KEY`: another process waits for a key we may hold."""
        parts = rest.split(" ", 2)
        if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) == self.server_id:
            return
        kind, key = parts[1], parts[2]
        if kind == "account" and key.isdigit():
            k = (kind, int(key))
        elif kind == "image" and 0 < len(key) <= 128:
            k = (kind, key)
        else:
            return
        now = time.monotonic()
        self._yielding[k] = now + YIELD_FOR
        held = k in self._held
        self._held.discard(k)  # (used no more in this group either: it is theirs next)
        if held and self.store.in_transaction:  # (its lock goes with the commit: now)
            self._commit_soon()
        log.debug("%s %s left to market process %s for %g s", kind, key, parts[0], YIELD_FOR)
        self._forget_expired(now)

    def _forget_expired(self, now: float) -> None:
        """The turns of keys (bounded: past 4096, the expired go)."""
        if len(self._yielding) > 4096:
            self._yielding = {x: u for x, u in self._yielding.items() if u > now}
        if len(self._asked) > 4096:
            self._asked = {x: u for x, u in self._asked.items() if u > now}

    def _cancel_elsewhere(self, tid: int) -> None:
        """A cancel for a task this process does not hold: from the shared queue,
        or by its holder."""
        store = self._tx()
        store.cancel_task(tid)  # (read by whoever loads it next: never lost)
        got = store.claim_task(tid)
        if got is not None:
            self._load_tasks([got[:2] + (True,)], "")

    def _tell_home(self, t: TaskState) -> None:
        """Task `t`'s result is written in this group, and its buyer is not
        connected here: its process is told by the commit itself (so a kill
        after the commit loses nothing), and again after it (_announce_elsewhere)."""
        if self.fleet and not t.session and self._buyer_not_here(t.buy_order_id):
            self._tx().notify_result(t.buy_order_id, t.id)

    def _buyer_not_here(self, buy_order_id: int) -> bool:
        """No connection of the buy order here, or its newest is on another process."""
        return not self.buyers.get(buy_order_id) or buy_order_id in self.away

    def _announce_elsewhere(self, t: TaskState) -> None:
        """A committed result whose buyer is not connected here: its process is
        told, at the end of this commit's announcements (one statement on the
        listener; a process that has the result already ignores it)."""
        if self.fleet:
            self._remote_results.append((t.buy_order_id, t.id))

    def _heard_later(self) -> None:
        """Notifications held back while the store was busy: heard at the next turn."""
        if self._heard:
            asyncio.get_running_loop().call_soon(self._on_notifies)

    def _fleet_after_commit(self) -> None:
        self._heard_later()
        if self._share_due:
            self._share_due = False
            self._share()
        if self._remote_results and self._listen is not None:
            results, self._remote_results = self._remote_results, []
            self.store.announce_results(self._listen, results)
            self._listened()

    def _listened(self) -> None:
        """A statement ran on the listener's connection: what it heard meanwhile
        waits in its `pending`, and the socket may never be readable for it."""
        if self._listen is not None and self._listen.pending:
            asyncio.get_running_loop().call_soon(self._on_notifies)

    # --- locks against the other processes ------------------------------------------

    def _lock(self, kind: str, key) -> bool:
        """Lock `key` (an account's balance, an image) against the other processes
        until the group commit; False if one of them holds it now (then the
        caller tries again after BUSY_RETRY: nothing ever waits for a lock, so
        no two processes can deadlock).

        Turns: a process refused asks the holder to yield (NOTIFY `yield`); the
        holder, when it hears that, uses the key no more in its open group and
        refuses it to itself for YIELD_FOR, so that a buyer flooding one
        process does not starve its other connections."""
        k = (kind, key)
        if not self.fleet or k in self._held:
            return True
        now = time.monotonic()
        if self._yielding.get(k, 0.0) > now:
            return False
        if not self._tx().try_lock(kind, key):
            if self._asked.get(k, 0.0) <= now and self._listen is not None:
                self._asked[k] = now + YIELD_FOR / 2
                self._forget_expired(now)
                self.store.ask_yield(self._listen, kind, key)
                log.debug("%s %s is held by another market process: asked for it", kind, key)
                self._listened()
            return False
        self._held.add(k)
        return True

    # --- buyers -----------------------------------------------------------------

    def _fleet_buyer(self, b) -> None:
        """A buyer connected here: its results come here, and the refs of its buy
        order waiting for an ack are known here (they may come from any process)."""
        if not self.fleet:
            return
        self.away.pop(b.order_id, None)
        self._tx().buyer_home(self._listen, b.order_id)
        self._listened()
        self._reload_pending(b.order_id)

    def _reload_pending(self, order_id: int) -> None:
        """The refs of buy order `order_id` waiting for an ack, as the store has them."""
        rows = self._tx().undelivered_refs(order_id)
        known = set(self.pending_of.get(order_id, ()))
        now = {tid for _, _, tid, _ in rows}
        for tid in known - now:  # acknowledged through another process
            if tid not in self.tasks:
                self._forget_pending(tid)
        for row in rows:
            if row[2] not in self.pending_tasks:
                self._remember_pending(*row)
