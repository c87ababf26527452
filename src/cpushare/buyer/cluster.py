"""Clusters of the kvm model: a buyer's ISO booted on N sellers' nodes.

    from cpushare.buyer import Market
    async with Market(load_buy("kvm.buy")) as m:
        cluster = await m.cluster("study.iso", nodes=2)
        async for ev in cluster.events():        # each node's state as it changes
            print(ev.node.name, ev.state, ev.message or "")
            if cluster.all_running():
                break
        print(await cluster.nodes[0].read_console())
        await cluster.down()                     # power every node off; settled

The ISO goes once, in chunks from the file (`upload_iso`: resumable; a
market that holds it already takes no byte).  Each node is a lease
(docs/protocol.md, Leases): its console is a stream both ways, its CPU time
is paid as it runs, and the market says what it is doing in `lease` frames:
waiting, image, booting, running, paused, ending, and at its end `ended`
(or `lost`, when its seller was lost).  A lost connection to the market
does not end the nodes: the SDK reconnects and the market gives the
leases back to the new connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..protocol import Message, ProtocolError
from .base import MarketError

CHUNK = 1 << 20  # bytes of one image chunk
STATES = ("waiting", "image", "booting", "running", "paused", "ending", "ended", "lost")
END_STATES = ("ended", "lost")


def file_digest(path: Path) -> tuple[str, int]:
    """(SHA-256 hex, size) of the file at `path` (read in pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
        size = f.tell()
    return h.hexdigest(), size


@dataclass(frozen=True)
class NodeEvent:
    node: "Node"
    state: str
    message: str | None


class Node:
    """One leased node: its state as the market last told it, its console."""

    def __init__(self, cluster: "Cluster", index: int, ref: str):
        self.cluster = cluster
        self.index = index
        self.name = f"node{index}"
        self.ref = ref
        self.session: int | None = None
        self.state = "waiting"
        self.seller: str | None = None
        self.cpu_ms = 0
        self.cost_milli = 0
        self.message: str | None = None
        self.reason: str | None = None  # how it ended
        # its link's keys (docs/vpn.md), from the market when a seller takes it:
        # (link id, key to seal with, key to open with)
        self.link: tuple[int, bytes, bytes] | None = None
        self.console = bytearray()  # everything it printed (bounded: CONSOLE_KEEP)
        self._console_event = asyncio.Event()
        self._read = 0

    CONSOLE_KEEP = 4 << 20

    def _set(self, state: str, message: str | None = None) -> None:
        if state == self.state and message == self.message:
            return
        self.state, self.message = state, message
        self.cluster._events.put_nowait(NodeEvent(self, state, message))
        self.cluster._changed.set()

    def _lease(self, msg: Message) -> None:
        self.session = msg["session"]
        self.cpu_ms, self.cost_milli = msg["cpu_ms"], msg["cost_milli"]
        if msg.get("seller"):
            self.seller = msg["seller"]
        if self.state not in END_STATES:
            self._set(msg["state"], msg.get("message"))

    def _link(self, msg: Message) -> None:
        try:
            tx, rx = bytes.fromhex(msg["tx"]), bytes.fromhex(msg["rx"])
        except ValueError:
            raise ProtocolError("frame", "link: tx and rx must be hex") from None
        if len(tx) != 32 or len(rx) != 32:
            raise ProtocolError("frame", "link: tx and rx must be 32 bytes each")
        self.link = (msg["link_id"], tx, rx)
        self.seller = msg.get("seller") or self.seller
        self.cluster._changed.set()
        if self.cluster.on_link is not None:
            self.cluster.on_link(self)

    def _output(self, data: bytes) -> None:
        self.console += data
        if len(self.console) > self.CONSOLE_KEEP:
            cut = len(self.console) - self.CONSOLE_KEEP
            del self.console[:cut]
            self._read = max(0, self._read - cut)
        self._console_event.set()

    def _closed(self, msg: Message) -> None:
        self.cpu_ms = msg.get("cpu_ms") or self.cpu_ms
        self.cost_milli = msg.get("cost_milli") or self.cost_milli
        self.reason = msg.get("reason") or ""
        lost = "was lost" in self.reason
        self._set("lost" if lost else "ended", self.reason)
        self._console_event.set()

    async def read_console(self, timeout: float | None = None) -> bytes:
        """Console output not read yet (waits for some); b"" once the node ended."""
        while self._read >= len(self.console):
            if self.state in END_STATES:
                return b""
            self._console_event.clear()
            await asyncio.wait_for(self._console_event.wait(), timeout)
        out = bytes(self.console[self._read:])
        self._read = len(self.console)
        return out

    async def wait_for(self, text: bytes, timeout: float) -> None:
        """Until the console has printed `text` (TimeoutError otherwise)."""
        async def seen() -> None:
            while text not in self.console:
                if self.state in END_STATES:
                    raise MarketError("task", f"{self.name} ended ({self.reason}) before "
                                              f"printing {text!r}")
                self._console_event.clear()
                await self._console_event.wait()
        await asyncio.wait_for(seen(), timeout)

    async def write_console(self, data: bytes) -> None:
        """Type `data` on the node's serial console."""
        if self.session is None:
            raise MarketError("task", f"{self.name} has not started")
        m = self.cluster.market
        try:
            m._send("stream", bytes(data), session=self.session, eof=False)
            await m._drain()
        except (ConnectionError, OSError) as e:
            raise MarketError("connect", f"{self.name}: console input not sent: {e}") from None

    def as_dict(self) -> dict:
        return {"node": self.name, "ref": self.ref, "session": self.session,
                "state": self.state, "seller": self.seller, "cpu_ms": self.cpu_ms,
                "cost_milli": self.cost_milli, "message": self.message}


class Cluster:
    def __init__(self, market, digest: str, n: int, name: str, link: str | None = None):
        self.market = market
        self.link = link  # the endpoint HOST:PORT the sellers send the nodes' frames to
        self.on_link = None  # called with a Node when its link's keys come
        self.digest = digest
        self.name = name
        self._events: asyncio.Queue = asyncio.Queue()  # for events()
        self._changed = asyncio.Event()  # any node changed (for down(), beside events())
        self.nodes = [Node(self, i, f"{name}-{market._prefix}-{i}") for i in range(n)]

    async def _open(self, cpu_ms: int | None) -> None:
        m = self.market
        futs = []
        try:
            for node in self.nodes:
                m._node_refs[node.ref] = node
                fut = asyncio.get_running_loop().create_future()
                m._opens[node.ref] = fut
                futs.append(fut)
                fields = {"ref": node.ref, "image": self.digest}
                if cpu_ms is not None:
                    fields["cpu_ms"] = cpu_ms
                if self.link is not None:
                    fields["link"] = self.link
                m._send("open", **fields)
            await m._drain()
            for node, fut in zip(self.nodes, futs):
                node.session = await fut
                m._nodes[node.session] = node
        except BaseException:
            # (a refusal, a lost connection, a cancellation): the nodes opened
            # so far are powered off, not left running and paid
            for node, fut in zip(self.nodes, futs):
                if node.session is None and fut.done() and not fut.cancelled() \
                        and fut.exception() is None:
                    node.session = fut.result()
                    m._nodes[node.session] = node
                if node.session is not None:
                    try:
                        m._send("close", session=node.session)
                    except ConnectionError:
                        pass  # (the market ends them with the connection's leases)
            raise

    async def events(self):
        """Each node's state changes, as they come, until every node ended."""
        while not self.all_ended() or not self._events.empty():
            yield await self._events.get()

    def all_running(self) -> bool:
        return all(n.state == "running" for n in self.nodes)

    def all_ended(self) -> bool:
        return all(n.state in END_STATES for n in self.nodes)

    async def down(self, timeout: float = 120.0) -> None:
        """Power every node off and wait until each lease is settled (the close
        is said again after a reconnection).  TimeoutError after `timeout`."""
        m = self.market
        closed_on = None  # the connection the closes went on

        async def ended() -> None:
            nonlocal closed_on
            while not self.all_ended():
                if closed_on != m._generation and m.connected:
                    closed_on = m._generation
                    for node in self.nodes:
                        if node.session is not None and node.state not in END_STATES:
                            try:
                                m._send("close", session=node.session)
                            except ConnectionError:
                                closed_on = None
                    try:
                        await m._drain()
                    except (ConnectionError, OSError):
                        closed_on = None
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
        await asyncio.wait_for(ended(), timeout)

    def cpu_ms(self) -> int:
        return sum(n.cpu_ms for n in self.nodes)

    def cost_milli(self) -> int:
        return sum(n.cost_milli for n in self.nodes)


class LeaseClient:
    """Mixed into buyer.Market: ISOs in chunks, and clusters of leases."""

    image_bytes_sent = 0  # ISO bytes this buyer sent (a second upload sends none)

    def _init_leases(self) -> None:
        self._wants: dict[str, asyncio.Queue] = {}  # chunked uploads: their answers
        self._nodes: dict[int, Node] = {}  # session -> node
        self._node_refs: dict[str, Node] = {}  # ref -> node
        self._lease_reconnect: asyncio.Task | None = None
        self._digests: dict[tuple, tuple[str, int]] = {}  # (path, inode, size, mtime) -> ...

    async def upload_iso(self, path: str | os.PathLike) -> str:
        """Send the ISO at `path` to the market in chunks from what it holds
        of it already (nothing if all); its digest."""
        path = Path(path)
        loop = asyncio.get_running_loop()
        # (hashed once per version of the file: `cluster up` uploads, then leases)
        st = path.stat()
        key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
        known = self._digests.get(key)
        if known is None:
            known = self._digests[key] = await loop.run_in_executor(None, file_digest, path)
        digest, size = known
        answers: asyncio.Queue = self._wants.setdefault(digest, asyncio.Queue())
        try:
            self._send("image_offer", image=digest, size=size)
            await self._drain()
            with open(path, "rb") as f:
                while True:
                    m = await answers.get()
                    if isinstance(m, MarketError):
                        raise m
                    if m.type == "image_ok":
                        return digest
                    offset = m["offset"]  # image_want: send from there
                    if offset > size:
                        raise MarketError("frame", f"{path}: the market wants the image from "
                                                   f"byte {offset}, past its {size} bytes")
                    f.seek(offset)
                    while offset < size:
                        data = f.read(CHUNK)
                        await self._send_async("image", data, image=digest, offset=offset,
                                               size=size)
                        offset += len(data)
                        self.image_bytes_sent += len(data)
                        if answers.qsize():  # the market answered meanwhile (an error)
                            break
                    await self._drain()
        except ConnectionError as e:
            raise MarketError("connect", f"{path}: upload interrupted: {e}") from None
        finally:
            if self._wants.get(digest) is answers:
                del self._wants[digest]

    async def cluster(self, iso: str | os.PathLike, nodes: int, *, name: str = "cluster",
                      cpu_ms: int | None = None, link: str | None = None,
                      on_link=None) -> Cluster:
        """Send the ISO (once) and lease `nodes` nodes of it (`link`: the
        HOST:PORT of this buyer's link endpoint, to join them to its network;
        `on_link(node)` is called each time a node's link keys come: when a
        seller takes it, and again when another seller takes it over)."""
        if not 1 <= nodes <= 4096:
            raise ValueError(f"nodes = {nodes}: must be 1..4096")
        digest = await self.upload_iso(iso)
        c = Cluster(self, digest, nodes, name, link)
        c.on_link = on_link
        await c._open(cpu_ms)
        return c

    # called by Market._dispatch
    def _on_lease_frame(self, msg: Message) -> bool:
        """Handle a frame of the chunked uploads or of the nodes; False if it
        is not one of theirs."""
        t = msg.type
        if t == "image_want" or (t == "image_ok" and msg["image"] in self._wants):
            q = self._wants.get(msg["image"])
            if q is not None:
                q.put_nowait(msg)
            return True
        if t == "lease":
            node = self._nodes.get(msg["session"]) or self._node_refs.get(msg.get("ref") or "")
            if node is not None:
                self._nodes[msg["session"]] = node
                node._lease(msg)
            return True
        if t == "link":
            node = self._nodes.get(msg["session"])
            if node is not None:
                node._link(msg)
            return True
        if t == "stream" and msg["session"] in self._nodes:
            self._nodes[msg["session"]]._output(msg.payload)
            return True
        if t == "closed" and msg["session"] in self._nodes:
            self._nodes.pop(msg["session"])._closed(msg)
            return True
        return False

    def _image_error(self, text: str) -> bool:
        """An `image` error while a chunked upload waits: it is its answer."""
        if not self._wants:
            return False
        q = next(iter(self._wants.values()))
        q.put_nowait(MarketError("image", text))
        return True

    def _leases_lost(self, why: str) -> None:
        """The connection dropped: uploads fail (the caller offers again);
        the nodes run on, the market gives them back on reconnection."""
        for q in self._wants.values():
            q.put_nowait(MarketError("connect", f"upload interrupted: {why}"))
        live = [n for n in self._nodes.values() if n.state not in END_STATES]
        if live and self.reconnect and not self._closed and self._lease_reconnect is None:
            # nothing else may need the connection soon: the nodes do
            self._lease_reconnect = asyncio.get_running_loop().create_task(
                self._reconnect(self._generation))
            self._lease_reconnect.add_done_callback(self._reconnected)

    def _reconnected(self, task: asyncio.Task) -> None:
        self._lease_reconnect = None
        if task.cancelled():
            return
        e = task.exception()
        if e is not None:  # the nodes cannot be followed any more: say so on each
            for n in list(self._nodes.values()):
                n.reason = f"the connection to the market is lost: {e}"
                n._set("lost", n.reason)
