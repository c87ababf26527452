"""Links between the processes of one market (several on one PostgreSQL
database, fleet.py): a lease follows its buyer.

A lease runs on a seller of the process that holds it, and what it tells
its buyer (`lease`, `link`, `stream`, `closed`, `error`) goes to the
buyer's newest connection, which may be on another process.  The holder
hears where that is (NOTIFY `home ORDER SERVER`) and relays the frames
there over a link: a TLS connection the holder opens to that process,
one per pair and direction.  The buyer's `stream` and `close` for the
lease come back on the same link, and `buyer_gone ORDER` when the buy
order has no connection there any more (the lease's BUYER_GRACE starts).
A lost link is a lost buyer connection: the buyer comes back somewhere,
and its leases follow it again.

A link is paced like a connection: the holder stops reading the seller
while more than CONN_BUDGET waits for the link; the buyer's process stops
reading the link while more than CONN_BUDGET waits for the buyer, and
stops reading the buyer while its input waits for the link.  (One slow
buyer holds back the other relayed frames of its link meanwhile: they are
consoles, paced by their readers anyway.)

Each process listens for links on its own address (`serve --link`, in its
`servers` row).  Both ends show a certificate of the market's CA whose
common name is LINK_CN, which each process issues itself at its start and
never stores; no order's certificate can bear that name (account names
begin with a letter or a digit).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import ssl
import time

from ..order import join_hostport, split_hostport
from ..protocol import (MAX_HEADER, ProtocolError, decode_frame, encode, link_contexts,
                        peer_identity, read_message)
from . import ca
from .conn import Conn
from .state import BUSY_RETRY, Busy

STREAM_BUDGET = 1 << 20  # (listener.STREAM_BUDGET: a lease's input before a seller has it)

log = logging.getLogger("cpushare.market")

LINK_CN = "@link"
TO_BUYER = frozenset({"lease", "link", "stream", "closed", "error"})  # relayed to a buyer
FROM_BUYER = frozenset({"stream", "close"})  # relayed from a buyer to the lease's holder
LINK_TIMEOUT = 10.0  # s: to connect and say who it is
LINK_BUDGET = 1 << 20  # bytes waiting for a link, or relayed to a buyer, before pausing
PAUSE_POLL = 0.02
MAX_HANDSHAKES = 64  # links not yet past their `peer` frame, at once
LINK_PORTS = range(20000, 30000)  # where --link without a port listens
# A link's TCP: a peer that vanishes is found within about half a minute
KEEPALIVE = ((socket.TCP_KEEPIDLE, 10), (socket.TCP_KEEPINTVL, 5), (socket.TCP_KEEPCNT, 3))
USER_TIMEOUT_MS = 30_000  # TCP_USER_TIMEOUT: data unacknowledged this long ends it
GONE_KEPT = 10_000  # buy orders whose buyer_gone was sent, remembered for buyer_back


class PeerConn(Conn):
    """A link to or from another process of the market (`server`, its id)."""
    role = "link"

    def __init__(self, *a):
        super().__init__(*a)
        self.server = 0

    def __str__(self) -> str:
        return f"link with market process {self.server} at {self.peer}"


class RemoteBuyer:
    """The buyer of buy order `order_id`, whose newest connection is on
    process `server`: what the lease code writes to it goes over the link."""
    role = "buyer"
    remote = True

    def __init__(self, market, server: int, order_id: int):
        self.market, self.server, self.order_id = market, server, order_id
        self.gone = False
        self.closed = False
        self.sessions: dict[int, object] = {}

    def write(self, frame_) -> None:
        if not self.gone:
            data = b"".join(frame_) if type(frame_) is list else frame_
            self.market._link_write(self.server, encode("to_buyer", data, order=self.order_id))

    @property
    def buffered(self) -> int:
        return self.market._link_buffered(self.server)

    async def drained(self) -> None:
        await self.market._link_drained(self.server)

    def __str__(self) -> str:
        return f"buyer of buy order {self.order_id} on market process {self.server}"


def _keepalive(writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in KEEPALIVE:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


class Links:
    """Mixed into Market."""

    def _init_links(self, link: tuple[str, int]) -> None:
        self.link_address = link  # where to listen for links (host, port 0: any)
        self._link_where: str | None = None  # ... and where the others reach them
        self._link_server: asyncio.AbstractServer | None = None
        self._link_client_ctx: ssl.SSLContext | None = None
        self.peer_links: dict[int, str] = {}  # the other live processes' link addresses
        self._links_out: dict[int, PeerConn] = {}  # links this process opened, by server
        self._links_in: set[PeerConn] = set()
        self._link_waiting: dict[int, list[bytes]] = {}  # for a link being opened
        self._remote_buyers: dict[tuple[int, int], RemoteBuyer] = {}  # (server, order)
        # sessions another process holds whose buyer is connected here
        self.remote_sessions: dict[int, tuple[PeerConn, int]] = {}  # -> (link, order)
        self._remote_of: dict[int, set[int]] = {}  # order -> those sessions
        self._told_gone: dict[int, set[PeerConn]] = {}  # order -> links told buyer_gone
        self._handshakes = 0  # links accepted and not yet past their `peer`
        self._reclaim_looked = 0.0  # when a seller's hello last made us look (leases.py)
        self._wanted: dict[int, tuple] = {}  # lease attempt -> (seller, cpu_ms) asked of its holder

    # --- listening, opening ------------------------------------------------------

    async def _links_listen(self) -> str:
        """Listen for links: the address the other processes are to use."""
        get = self.store.get_meta
        mine = ca.issue(get("ca_cert"), get("ca_key"), LINK_CN, link=True)
        server_ctx, self._link_client_ctx = link_contexts(get("ca_cert"), mine.cert_pem,
                                                          mine.key_pem)
        host, port = self.link_address
        try:
            self._link_server = await self._link_listen(server_ctx, host, port)
        except OSError as e:  # (said as the link's, not the market's address)
            raise OSError(e.errno, f"{e.strerror} (the --link address "
                                   f"{join_hostport(host, port)})") from None
        where = join_hostport(host, self._link_server.sockets[0].getsockname()[1])
        log.info("links from the market's other processes on %s", where)
        return where

    async def _link_listen(self, server_ctx, host: str, port: int):
        if port == 0:  # (a free one of LINK_PORTS: not the kernel's ephemeral ports,
            for p in random.sample(LINK_PORTS, 64):  # which others take and free)
                try:
                    return await self._link_listen(server_ctx, host, p)
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise
            raise OSError(errno.EADDRINUSE, f"no free port of {LINK_PORTS.start}.."
                                            f"{LINK_PORTS.stop - 1} in 64 tries")
        return await asyncio.start_server(
            self._link_accepted, host, port, ssl=server_ctx, backlog=256,
            ssl_handshake_timeout=LINK_TIMEOUT)

    def _links_close(self) -> None:
        if self._link_server is not None:
            self._link_server.close()
            self._link_server = None
        for pc in list(self._links_out.values()) + list(self._links_in):
            pc.close()

    def _link_write(self, server: int, data: bytes) -> None:
        pc = self._links_out.get(server)
        if pc is not None:
            pc.write(data)
            return
        waiting = self._link_waiting.get(server)
        if waiting is None:
            if self._stopping:
                return
            waiting = self._link_waiting[server] = []
            self._spawn(self._link_open(server))
        waiting.append(data)

    def _link_buffered(self, server: int) -> int:
        pc = self._links_out.get(server)
        if pc is not None:
            return pc.buffered
        return sum(len(d) for d in self._link_waiting.get(server, ()))

    async def _link_drained(self, server: int) -> None:
        pc = self._links_out.get(server)
        if pc is not None:
            await pc.drained()
        else:
            await asyncio.sleep(PAUSE_POLL)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _link_open(self, server: int) -> None:
        address = self.peer_links.get(server)
        if address is None:  # (it started since the last look: fleet._fleet_look)
            await self._commit_done()
            address = self.peer_links[server] = self.store.server_link(server)
        try:
            if address is None:
                raise OSError("it is not among the processes of this database")
            host, port = split_hostport(address)
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                host, port, ssl=self._link_client_ctx), LINK_TIMEOUT)
            self._check_link_peer(writer)
            _keepalive(writer)
        except (OSError, ssl.SSLError, ProtocolError, ValueError, asyncio.TimeoutError) as e:
            self._link_waiting.pop(server, None)
            log.error("cannot open a link to market process %d at %s: %s (its buyers do not "
                      "hear the leases held here until it can be reached; every process "
                      "needs a --link address the others reach)", server, address, e)
            self._link_lost(server)
            return
        pc = PeerConn(self, reader, writer, address)
        pc.server = server
        self._links_out[server] = pc
        pc.write(encode("peer", server=self.server_id))
        for d in self._link_waiting.pop(server, []):
            pc.write(d)
        log.info("%s opened", pc)
        try:
            await self._serve_link(pc)
        finally:
            pc.close()
            if self._links_out.get(server) is pc:
                del self._links_out[server]
            self._link_lost(server)

    async def _link_accepted(self, reader, writer) -> None:
        peer = join_hostport(*(writer.get_extra_info("peername") or ("?", 0))[:2])
        pc = PeerConn(self, reader, writer, peer)
        if self._handshakes >= MAX_HANDSHAKES:
            log.warning("refused a link from %s: %d others are being opened", peer,
                        self._handshakes)
            pc.close()
            return
        self._handshakes += 1
        try:
            self._check_link_peer(writer)
            _keepalive(writer)
            m = await asyncio.wait_for(read_message(reader, 4096), LINK_TIMEOUT)
            if m is None or m.type != "peer":
                raise ProtocolError("frame", "a link begins with `peer`")
            pc.server = m["server"]
        except (OSError, ssl.SSLError, ProtocolError, asyncio.TimeoutError) as e:
            log.warning("refused a link from %s: %s", peer, e)
            pc.close()
            return
        finally:
            self._handshakes -= 1
        self._links_in.add(pc)
        try:
            await self._serve_link(pc)
        finally:
            pc.close()
            self._links_in.discard(pc)
            for sid, (link, order) in list(self.remote_sessions.items()):
                if link is pc:
                    self._forget_remote(sid)

    @staticmethod
    def _check_link_peer(writer) -> None:
        _, cn = peer_identity(writer.get_extra_info("ssl_object"))
        if cn != LINK_CN:
            writer.close()
            raise ProtocolError("auth", f"its certificate (CN={cn[:80]}) is not a market "
                                        f"process's")

    # --- what comes over a link --------------------------------------------------

    async def _serve_link(self, pc: PeerConn) -> None:
        try:
            while not pc.closed and not self._stopping:
                # (a relayed frame is a payload: its lengths and header besides)
                m = await read_message(pc.reader, self.max_payload + 8 + MAX_HEADER,
                                       self.payload_budget)
                if m is None:
                    log.info("%s closed", pc)
                    return
                try:
                    while True:
                        try:
                            full = self._on_link(pc, m)
                            break
                        except Busy:
                            await asyncio.sleep(BUSY_RETRY)
                        except ProtocolError as e:  # (one relayed frame: the link goes on)
                            log.warning("%s: dropped a relayed frame: %s", pc, e)
                            full = None
                            break
                finally:
                    if m.held:
                        self.payload_budget.give(m.held)
                await self._link_paced(full)
        except (ProtocolError, ConnectionError, OSError, ssl.SSLError) as e:
            log.warning("%s ended: %s", pc, e)

    async def _link_paced(self, full) -> None:
        """Until what a link's frame fed has room: a connection (its queue), or
        a lease no seller runs yet (its input waiting for one)."""
        if isinstance(full, Conn):
            while not full.gone and not full.closed and full.buffered > LINK_BUDGET:
                await full.drained()
                await asyncio.sleep(0)
        elif full is not None:
            while (self.tasks.get(full.id) is full and full.session_seller() is None
                   and full.streamed_bytes > STREAM_BUDGET):
                await asyncio.sleep(PAUSE_POLL)

    def _on_link(self, pc: PeerConn, m):
        """Handle one frame of a link: what it fed, to be waited for (_link_paced)."""
        if m.type == "to_buyer":  # (we have the buyer; pc's process holds the lease)
            inner = decode_frame(m.payload)
            if inner.type not in TO_BUYER:
                raise ProtocolError("frame", f"to_buyer: {inner.type!r} is not relayed")
            order, sid = m["order"], inner.get("session")
            conns = self.buyers.get(order)
            if not conns:
                pc.write(encode("buyer_gone", order=order))
                return None
            if sid is not None:
                if inner.type == "closed":
                    self._forget_remote(sid)
                else:
                    self.remote_sessions[sid] = (pc, order)
                    self._remote_of.setdefault(order, set()).add(sid)
            b = conns[-1]
            b.write(m.payload)
            return b
        if m.type == "from_buyer":  # (we hold the lease)
            inner = decode_frame(m.payload)
            if inner.type not in FROM_BUYER:
                raise ProtocolError("frame", f"from_buyer: {inner.type!r} is not relayed")
            t = self.tasks.get(inner["session"])
            b = t.buyer if t is not None else None
            if (b is None or not getattr(b, "remote", False) or b.gone or b.server != pc.server
                    or b.order_id != m["order"]):
                log.debug("%s: dropped a %s for session %d, whose buyer is not there",
                          pc, inner.type, inner["session"])
                return None
            self._on_buyer(b, inner)
            s = t.session_seller()
            return s if s is not None and not s.gone else t
        if m.type == "buyer_gone":
            rb = self._remote_buyers.get((pc.server, m["order"]))
            if rb is not None:
                self._remote_buyer_gone(rb)
            return None
        if m.type == "buyer_back":  # (after its buyer_gone, on this link: in order)
            self._lease_home(m["order"], pc.server, again=True)
            return None
        if m.type == "lease_wanted":  # (we hold it: its seller came back there)
            self._give_lease(pc, m["attempt"])
            return None
        if m.type in ("lease_given", "lease_kept"):
            self._lease_answer(m["attempt"], m.get("task"))
            return None
        raise ProtocolError("frame", f"{m.type!r} is not a frame of a link")

    # --- the holder's side: leases follow their buyer ------------------------------

    def _lease_home(self, order: int, server: int, again: bool = False) -> None:
        """The newest connection of buy order `order` is on process `server` now
        (NOTIFY home; or `again`: its buyer came back there, buyer_back): the
        leases held here tell it from now on, and how each stands."""
        leases = [t for t in self.leases.values() if t.buy_order_id == order]
        if not leases:
            return
        if server == self.server_id:  # (a hello here adopted them; unless a home of before
            conns = self.buyers.get(order)  # moved them away since)
            if conns:
                for t in leases:
                    if getattr(t.buyer, "remote", False):
                        self._follow(t, conns[-1])
            return
        rb = self._remote_buyers.get((server, order))
        if rb is None or rb.gone:
            rb = self._remote_buyers[server, order] = RemoteBuyer(self, server, order)
        for t in leases:
            self._follow(t, rb, again=True)  # (a connection there may be new: tell it)
        self._schedule()

    def _follow(self, t, b, again: bool = False) -> None:
        """Lease `t` tells buyer `b` from now on (and, once committed, how it
        stands; `again`: even if it told `b` already)."""
        if t.buyer is b and not again:
            return
        if t.buyer is not None and t.buyer is not b:
            t.buyer.sessions.pop(t.id, None)
        t.buyer = b
        t.buyer_away_since = None
        b.sessions[t.id] = t
        self._after_commit(lambda: self._tell(t, t.lease_state, t.ending or None))

    def _remote_buyer_gone(self, rb: RemoteBuyer) -> None:
        """The buyer on another process is gone: its leases here tell a connection
        of it here, if one is left, or wait for it (BUYER_GRACE)."""
        rb.gone = True
        if self._remote_buyers.get((rb.server, rb.order_id)) is rb:
            del self._remote_buyers[rb.server, rb.order_id]
        now = time.monotonic()
        here = self.buyers.get(rb.order_id)
        for t in list(rb.sessions.values()):
            if t.buyer is rb and here:
                self._follow(t, here[-1])
            elif t.buyer is rb:
                t.buyer_away_since = now
        self._schedule()

    def _link_lost(self, server: int) -> None:
        """The link to `server` is gone: so are its buyers, for the leases here."""
        for key, rb in list(self._remote_buyers.items()):
            if key[0] == server:
                self._remote_buyer_gone(rb)

    # --- the buyer's side ------------------------------------------------------------

    def _to_holder(self, b, m) -> bool:
        """A buyer's `stream` or `close` for a session another process holds:
        relayed there (False if no process here knows it)."""
        got = self.remote_sessions.get(m["session"])
        if got is None or got[1] != b.order_id or got[0].closed:
            return False
        fields = {"session": m["session"]}  # (no other field: a peer's extras stay here)
        if m.type == "stream" and m.get("eof") is not None:
            fields["eof"] = m["eof"]
        got[0].write(encode("from_buyer", encode(m.type, m.payload, **fields),
                            order=b.order_id))
        return True

    def _remote_full(self, b) -> Conn | None:
        """The link that buyer `b`'s input to a remote session waits for, if full."""
        for sid in self._remote_of.get(b.order_id, ()):
            pc = self.remote_sessions[sid][0]
            if pc.buffered > LINK_BUDGET:
                return pc
        return None

    def _buyer_left(self, order: int) -> None:
        """Buy order `order` has no connection here any more: the holders of its
        remote sessions hear it."""
        links = {self.remote_sessions[sid][0] for sid in self._remote_of.get(order, ())}
        for sid in list(self._remote_of.get(order, ())):
            self._forget_remote(sid)
        for pc in links:
            pc.write(encode("buyer_gone", order=order))
        if links:
            self._told_gone[order] = links
            while len(self._told_gone) > GONE_KEPT:
                del self._told_gone[next(iter(self._told_gone))]

    def _buyer_back(self, order: int) -> None:
        """A connection of buy order `order` here again, after a buyer_gone: its
        holders hear it behind that (a NOTIFY home may reach them before it)."""
        for pc in self._told_gone.pop(order, ()):
            if not pc.closed:
                pc.write(encode("buyer_back", order=order))

    def _forget_remote(self, sid: int) -> None:
        got = self.remote_sessions.pop(sid, None)
        if got is not None:
            of = self._remote_of.get(got[1])
            if of is not None:
                of.discard(sid)
                if not of:
                    del self._remote_of[got[1]]
