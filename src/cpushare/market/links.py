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
import logging
import ssl
import time

from ..order import join_hostport, split_hostport
from ..protocol import (ProtocolError, decode_frame, encode, link_contexts, peer_identity,
                        read_message)
from . import ca
from .conn import Conn
from .state import Busy, BUSY_RETRY

log = logging.getLogger("cpushare.market")

LINK_CN = "@link"
TO_BUYER = frozenset({"lease", "link", "stream", "closed", "error"})  # relayed to a buyer
FROM_BUYER = frozenset({"stream", "close"})  # relayed from a buyer to the lease's holder
LINK_TIMEOUT = 10.0  # s: to connect and say who it is
LINK_BUDGET = 1 << 20  # bytes waiting for a link, or relayed to a buyer, before pausing
PAUSE_POLL = 0.02


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

    # --- listening, opening ------------------------------------------------------

    async def _links_listen(self) -> str:
        """Listen for links: the address the other processes are to use."""
        get = self.store.get_meta
        mine = ca.issue(get("ca_cert"), get("ca_key"), LINK_CN, link=True)
        server_ctx, self._link_client_ctx = link_contexts(get("ca_cert"), mine.cert_pem,
                                                          mine.key_pem)
        host, port = self.link_address
        self._link_server = await asyncio.start_server(self._link_accepted, host, port,
                                                       ssl=server_ctx, backlog=256)
        where = join_hostport(host, self._link_server.sockets[0].getsockname()[1])
        log.info("links from the market's other processes on %s", where)
        return where

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
        peer = join_hostport(*writer.get_extra_info("peername")[:2])
        pc = PeerConn(self, reader, writer, peer)
        try:
            self._check_link_peer(writer)
            m = await asyncio.wait_for(read_message(reader, self.max_payload), LINK_TIMEOUT)
            if m is None or m.type != "peer":
                raise ProtocolError("frame", "a link begins with `peer`")
            pc.server = m["server"]
        except (OSError, ssl.SSLError, ProtocolError, asyncio.TimeoutError) as e:
            log.warning("refused a link from %s: %s", peer, e)
            pc.close()
            return
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
                m = await read_message(pc.reader, self.max_payload, self.payload_budget)
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
                finally:
                    if m.held:
                        self.payload_budget.give(m.held)
                while full is not None and not full.gone and full.buffered > LINK_BUDGET:
                    await full.drained()
                    await asyncio.sleep(0)
        except (ProtocolError, ConnectionError, OSError, ssl.SSLError) as e:
            log.warning("%s ended: %s", pc, e)

    def _on_link(self, pc: PeerConn, m):
        """Handle one frame of a link: the connection it fed, if it is to be
        waited for."""
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
            return s if s is not None else None
        if m.type == "buyer_gone":
            rb = self._remote_buyers.get((pc.server, m["order"]))
            if rb is not None:
                self._remote_buyer_gone(rb)
            return None
        raise ProtocolError("frame", f"{m.type!r} is not a frame of a link")

    # --- the holder's side: leases follow their buyer ------------------------------

    def _lease_home(self, order: int, server: int) -> None:
        """The newest connection of buy order `order` is on process `server` now
        (NOTIFY home): the leases held here tell it from now on."""
        if server == self.server_id:
            return  # (its hello here adopted them: _adopt_leases)
        leases = [t for t in self.leases.values() if t.buy_order_id == order]
        if not leases:
            return
        rb = self._remote_buyers.get((server, order))
        if rb is None or rb.gone:
            rb = self._remote_buyers[server, order] = RemoteBuyer(self, server, order)
        for t in leases:
            self._follow(t, rb)
        self._schedule()

    def _follow(self, t, b) -> None:
        """Lease `t` tells buyer `b` from now on (and at once, how it stands)."""
        if t.buyer is b:
            return
        if t.buyer is not None:
            t.buyer.sessions.pop(t.id, None)
        t.buyer = b
        t.buyer_away_since = None
        b.sessions[t.id] = t
        self._tell(t, t.lease_state, t.ending or None)

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
        got[0].write(encode("from_buyer", encode(m.type, m.payload, **m.fields),
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

    def _forget_remote(self, sid: int) -> None:
        got = self.remote_sessions.pop(sid, None)
        if got is not None:
            of = self._remote_of.get(got[1])
            if of is not None:
                of.discard(sid)
                if not of:
                    del self._remote_of[got[1]]
