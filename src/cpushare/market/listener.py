"""The listener: TLS (tls.py), the hello and who the peer is, each
connection's read loop, the sweeper (deadlines, heartbeats, revoked
certificates)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time

from .. import __version__
from ..protocol import (VERSION, ProtocolError, encode, peer_identity,
                        read_message)
from . import tls
from .conn import BuyerConn, Conn, SellerConn
from .sellers import OUTPUT_CHUNK, PREFETCH
from .state import BUSY_RETRY, Busy

log = logging.getLogger("cpushare.market")

HELLO_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 5.0
MAX_UNAUTHENTICATED = 2048  # connections in the TLS handshake or before hello, in all
MAX_UNAUTHENTICATED_PER_ADDRESS = 64  # ... from one source address
REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about refused or failed accepts
# Copies of one sell order file connect as instances of the order (cpushared
# sends its file's name); a bound keeps one certificate from opening without end.
INSTANCE_RE = re.compile(r"[A-Za-z0-9_.@:-]{0,64}")
MAX_INSTANCES = 256
MAX_BUYER_CONNS = 16  # connections of one buy order at once
# Bytes queued to one peer (part-sent frames included) past which the market
# stops reading what makes it send more: from that peer, or from the peer
# feeding it.  A session's input waits in the market up to STREAM_BUDGET
# before a seller takes the session.
CONN_BUDGET = 1 << 20
STREAM_BUDGET = 1 << 20
# Bytes a connection's reader holds before the market stops reading the socket
# (asyncio pauses at twice this): part of each connection's memory budget.
READ_BUFFER = 1 << 20
# Payloads of more than 1 MiB being read, from all peers at once; past it a
# peer with a big frame waits (is not read) until others are handled.
PAYLOAD_BUDGET = 512 << 20
FAIR_TURN = 32  # frames of one connection handled before the loop turns (fairness)
COLLECT_EVERY = 3600.0  # seconds between collections of unused images
# The heartbeat wheel (_sweep): a heartbeat is cut into slots of TICK seconds
# (fewer, longer ones for a heartbeat of more than MAX_SLOTS ticks), each
# connection has one, and the sweeper handles one slot per tick.
TICK = 0.1
MAX_SLOTS = 600
PAUSE_POLL = 0.02
# Frames whose handling may read the store: on a store that commits in its
# own thread, they wait (the connection, not the loop) for a commit on its way.
READS_STORE = frozenset({"submit", "open", "cancel", "close", "image", "image_offer",
                         "need_image"})
READ_AHEAD = frozenset({"submit", "open"})  # ... and what they ask, read first (pgahead)  # seconds between looks at a peer that another one waits for


class Listener:
    """Mixed into Market."""

    def _accepted(self, link: tls.Link) -> None:
        """A new TCP connection (tls.Server calls it): refused at once past the
        caps on unauthenticated connections (TLS handshake, then hello), in
        all and per source address; else its handshake starts and a task
        serves it."""
        peername = link.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        addr = peername[0] if peername else "?"
        if (self._unauthenticated >= MAX_UNAUTHENTICATED
                or self._unauthenticated_from[addr] >= MAX_UNAUTHENTICATED_PER_ADDRESS):
            self._refused_early += 1
            self._log_refusals()
            link.abort()
            return
        self._unauthenticated += 1
        self._unauthenticated_from[addr] += 1
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_BUFFER, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        link.start(protocol)
        writer = asyncio.StreamWriter(link, protocol, reader, loop)
        task = loop.create_task(self.handle(reader, writer, peer, addr))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def handle(self, reader, writer, peer: str, addr: str) -> None:
        admitted = [True]

        def authenticated() -> None:
            if admitted[0]:
                admitted[0] = False
                self._unauthenticated -= 1
                self._unauthenticated_from[addr] -= 1
                if not self._unauthenticated_from[addr]:
                    del self._unauthenticated_from[addr]
        try:
            await self._serve_peer(reader, writer, peer, authenticated)
        finally:
            authenticated()

    def _log_refusals(self) -> None:
        """One line per interval for connections refused at the caps, not one each."""
        now = time.monotonic()
        if now - self._refusals_logged >= REFUSAL_LOG_INTERVAL:
            log.warning("refused %d connections: more than %d unauthenticated in all or %d "
                        "from one address", self._refused_early, MAX_UNAUTHENTICATED,
                        MAX_UNAUTHENTICATED_PER_ADDRESS)
            self._refusals_logged = now
            self._refused_early = 0

    async def _serve_peer(self, reader, writer, peer: str, authenticated) -> None:
        try:
            await asyncio.wait_for(writer.transport.handshake(), HANDSHAKE_TIMEOUT)
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
            authenticated()
            if conn is None:
                return
            self._conns.add(conn)
            self._join_wheel(conn)
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
        await self._commit_done()  # (nothing yields from here to the welcome)
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
            conn.acks = m.get("acks") is True
        if role == "seller":
            conn.order = self.store.sell_order(cert.order_id)
            conn.instance = instance
            if conn.order.model == "kvm":
                conn.accel = m.get("accel") or ""
                if conn.accel not in ("kvm", "tcg"):
                    raise ProtocolError("frame", "hello: a seller of the kvm model must say the "
                                                 "accelerator it measured (accel: kvm or tcg)")
                conn.cache = m.get("cache") or 0
                conn.links = m.get("links") is True
            key = (cert.order_id, instance)
            old = self.sellers.get(key)
            if old is not None:  # the same copy reconnecting: its old link is dead
                log.info("%s replaces its older connection from %s", conn, old.peer)
                self._gone(old)
                old.close()
            elif self.instances[cert.order_id] >= MAX_INSTANCES:
                raise ProtocolError("order", f"sell order {cert.order_id} already has "
                                             f"{MAX_INSTANCES} connections")
            self.sellers[key] = conn
            self.instances[cert.order_id] += 1
        else:
            conns = self.buyers.setdefault(cert.order_id, [])
            if len(conns) >= MAX_BUYER_CONNS:
                raise ProtocolError("order", f"buy order {cert.order_id} already has "
                                             f"{MAX_BUYER_CONNS} connections")
            conn.order = self.store.buy_order(cert.order_id)
            conns.append(conn)
            self._adopt_leases(conn)
            self._fleet_buyer(conn)
            if self.fleet:
                self._buyer_back(conn.order_id)  # (links.py)
        extra = {"output_chunks": OUTPUT_CHUNK} if role == "seller" else {"acks": True}
        conn.write(encode("welcome", version=VERSION, account=cert.account,
                          order=cert.order_id, max_payload=self.max_payload,
                          heartbeat=self.heartbeat, prefetch=PREFETCH, **extra))
        log.info("%s connected (%s)", conn, m.get("software") or "unknown software")
        if role == "seller" and m.get("lease_attempt") is not None:
            self._reclaim_lease(conn, m["lease_attempt"], m.get("lease_cpu_ms") or 0)
        if role == "buyer":  # what finished while it was away and is not acked, as committed
            self._after_commit(lambda: self._owe_all(conn))
        return conn

    async def _serve_conn(self, conn: Conn) -> None:
        on = self._on_seller if conn.role == "seller" else self._on_buyer
        n = 0
        while not conn.closed:
            m = await read_message(conn.reader, self.max_payload, self.payload_budget)
            if m is None:
                log.info("%s disconnected", conn)
                return
            conn.last_seen = time.monotonic()
            try:
                if m.type == "ping":
                    conn.write(encode("pong", t=m.get("t", 0)))
                elif m.type in ("pong", "error"):
                    if m.type == "error":
                        log.warning("%s reports: %s: %s", conn, m["code"], m["message"])
                else:
                    self._frames += 1  # (the group commit gathers while they come)
                    await self._store_ready(conn, m)
                    while True:
                        try:
                            on(conn, m)
                            break
                        except Busy:  # (another process's commit comes within ms)
                            await asyncio.sleep(BUSY_RETRY)
                            await self._store_ready(conn, m)
            finally:
                if m.held:  # (what it keeps of the payload is counted elsewhere)
                    self.payload_budget.give(m.held)
            await self._backpressure(conn)
            n += 1
            if n % FAIR_TURN == 0:  # frames already buffered are read without a pause:
                await asyncio.sleep(0)  # the other connections and timers get a turn

    async def _store_ready(self, conn: Conn, m) -> None:
        """Before `m` is handled: the commit on its way, if it reads the store,
        and what it will ask, read ahead (pgahead).  Its connection waits (it
        is paused: not read, so not silent), the loop goes on."""
        ahead = m.type in READ_AHEAD and self.store.reads_ahead and conn.role == "buyer"
        if not ahead and not (m.type in READS_STORE and self._store_busy()):
            return
        conn.paused = True
        try:
            if ahead:
                await self._read_ahead(conn, m)
            else:
                await self._commit_done()
        finally:
            conn.paused = False
            conn.last_seen = time.monotonic()

    async def _backpressure(self, conn: Conn) -> None:
        """Stop reading from `conn` while what it made the market send waits:
        its own frames (pongs, images, results it asked for) past CONN_BUDGET,
        a session's input past STREAM_BUDGET before a seller takes it, or
        frames past CONN_BUDGET to the peer it feeds (a session's seller or
        buyer).  A paused peer is not silent: it is not read."""
        disk = getattr(conn, "disk", None)
        if disk is not None:  # its last image chunk is still being written: one at a time
            conn.disk = None
            if not disk.done():
                await asyncio.wrap_future(disk)
        while not conn.closed and not conn.gone:
            # (a seller running a session: what is queued to it is the buyer's
            # input, paused at CONN_BUDGET on the buyer's side; the seller is
            # still read, for the output that lets its job take more input)
            own = CONN_BUDGET if not self._runs_session(conn) else 4 * CONN_BUDGET
            if conn.buffered > own:
                wait = conn.drained()
            else:
                full = self._full_peer(conn)
                if full is None:
                    return
                wait = full.drained() if full is not conn else asyncio.sleep(PAUSE_POLL)
            conn.paused = True
            try:
                await wait
                await asyncio.sleep(0)  # (a drain with nothing to wait for does not yield)
            finally:
                conn.paused = False
                conn.last_seen = time.monotonic()

    @staticmethod
    def _runs_session(conn: Conn) -> bool:
        t = conn.running_task() if isinstance(conn, SellerConn) else None
        return t is not None and t.session

    def _full_peer(self, conn: Conn) -> Conn | None:
        """The peer `conn` feeds whose queue is over budget (`conn` itself: its
        session's input waits for a seller), or None."""
        if isinstance(conn, BuyerConn):
            for t in conn.sessions.values():
                if t.streamed_bytes > STREAM_BUDGET:
                    return conn
                s = t.session_seller()
                if s is not None and not s.gone and s.buffered > CONN_BUDGET:
                    return s
            return self._remote_full(conn)
        t = conn.running_task()
        if t is not None:
            b = t.buyer if t.session else None
            if b is None:
                got = conn.outputs.get(next(iter(conn.attempts)))
                b = got.buyer if got is not None else None
            if b is not None and not b.gone and b.buffered > CONN_BUDGET:
                return b
        return None

    def _gone(self, conn: Conn) -> None:
        """Forget a connection (idempotent); its running attempt is lost."""
        if conn.gone or self._stopping:
            return
        conn.gone = True
        self._conns.discard(conn)
        if conn.beat >= 0:
            self._wheel[conn.beat].discard(conn)
        if isinstance(conn, SellerConn):
            self.matcher.seller_gone(conn)
            if self.sellers.get((conn.order_id, conn.instance)) is conn:
                del self.sellers[conn.order_id, conn.instance]
                self.instances[conn.order_id] -= 1
            for task in conn.image_sends.values():
                task.cancel()
            self._lose_all(conn, "the seller disconnected")
        else:
            now = time.monotonic()
            for t in conn.sessions.values():
                if t.lease:  # it runs on, for a while, for a buyer that comes back
                    t.buyer_away_since = now
            lst = self.buyers.get(conn.order_id, [])
            if conn in lst:
                lst.remove(conn)
            if not lst:
                self.buyers.pop(conn.order_id, None)
                self._buyer_left(conn.order_id)  # (its sessions held elsewhere: links.py)
        self._schedule()

    def _join_wheel(self, conn: Conn) -> None:
        """Give `conn` its slot of the heartbeat wheel: the next one, round the
        wheel, so that connections that came together (a market's restart)
        are pinged a slot apart, not together."""
        slot = self._next_beat
        self._next_beat = (slot + 1) % len(self._wheel)
        conn.beat = slot
        self._wheel[slot].add(conn)

    def _heartbeat(self, conns: set, now: float, ping: bytes) -> None:
        """The heartbeat of the connections of one slot: a revoked certificate
        closes its connection (looked up here on a store one process serves;
        on PostgreSQL no statement: revocations are pushed, fleet.py), a peer
        silent for 3 heartbeats (and not paused by the market) is cut, the
        others are pinged."""
        for c in list(conns):
            if not self.fleet:
                cert = self.store.cert(c.fingerprint)
                if cert is None or cert.revoked:
                    self._close_revoked(c)
                    continue
            if not c.paused and now - c.last_seen > 3 * self.heartbeat:
                log.warning("closing %s: silent for %.0f s", c, now - c.last_seen)
                self._gone(c)
                c.writer.transport.abort()
            else:
                c.write(ping)

    def _close_revoked(self, c: Conn) -> None:
        log.warning("closing %s: its certificate %s was revoked", c, c.fingerprint[:16])
        c.write(encode("error", code="auth", ref=None,
                       message=f"certificate {c.fingerprint[:16]} was revoked"))
        self._gone(c)
        c.close()

    async def _sweep(self) -> None:
        """Deadlines every second; every connection's heartbeat (ping, silence,
        revoked certificate) once per heartbeat, in its slot of the wheel: the
        wheel turns one slot every heartbeat / slots seconds, so the pings of
        many connections are spread over the heartbeat, never sent at once."""
        slots = len(self._wheel)
        tick = self.heartbeat / slots
        start = last_second = last_collect = time.monotonic()
        n = 0
        while True:
            n += 1
            # (on the clock, not after the last turn: a late turn is made up)
            await asyncio.sleep(max(0.0, start + n * tick - time.monotonic()))
            now = time.monotonic()
            if self._wheel[n % slots]:
                self._heartbeat(self._wheel[n % slots], now, encode("ping", t=int(time.time())))
            if now - last_second < min(1.0, self.heartbeat):
                continue
            last_second = now
            for s in [s for s in self.busy if now > s.deadline]:  # (only sellers with work)
                if s.attempts:
                    self._lose(s, "deadline passed")
            if self.max_wait > 0:
                self._expire(now)
            if self.leases:
                self._check_leases(now)
            if self.fleet and not self._committing():  # (else at the next second)
                try:
                    self._fleet_look()
                    self._recheck_certs(now)
                except Exception as e:  # the database is gone: as a failed commit
                    self._die("looking for the market's other processes or revoked "
                              "certificates failed", e)
            if now - last_collect >= COLLECT_EVERY:
                last_collect = now
                self.collect()

    # --- running ------------------------------------------------------------

    def _loop_exception(self, loop, context: dict) -> None:
        """asyncio reports a failed accept (EMFILE: out of descriptors) on every
        try; the market logs it once per interval, with the count."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and "accept" in context.get("message", ""):
            self._accept_errors += 1
            now = time.monotonic()
            if now - self._accept_errors_logged >= REFUSAL_LOG_INTERVAL:
                log.error("accepting connections failed %d times: %s (raise LimitNOFILE= "
                          "or lower the connections)", self._accept_errors, exc)
                self._accept_errors_logged = now
                self._accept_errors = 0
            return
        loop.default_exception_handler(context)

    def stop(self) -> None:
        self._stop.set()

    async def serve(self, host: str, port: int, ssl_ctx: ssl.SSLContext,
                    started: asyncio.Future | None = None) -> None:
        if not self._recovered:
            if self.fleet:  # (its address goes in its row of the servers: links.py)
                self._link_where = await self._links_listen()
            self.recover()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        # (several processes of one PostgreSQL market may share the address)
        server = await loop.create_server(tls.Server(ssl_ctx, self._accepted), host, port,
                                          backlog=4096, reuse_port=self.fleet or None)
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
            self._fleet_leave()
            self._links_close()
            server.close()
            for c in list(self._conns):
                c.close()
            for t in list(self._handlers):
                t.cancel()
            await asyncio.gather(*self._handlers, sweeper, return_exceptions=True)
            n, s = self.store.loop_waits()
            if n:
                log.info("the event loop waited for a commit on its way %d times, %.0f ms "
                         "in all", n, s * 1000)
            log.info("market stopped")
        if self.fatal is not None:
            raise self.fatal
