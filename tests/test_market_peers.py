"""A market on loopback for tests, and minimal scripted peers.

The peers are real: they speak cpushare.protocol over TLS with the
certificates the market issued.  The sellers here run no sandbox: they
answer with a function of the input, which is what the market's rules
(matching, relay, settlement) care about.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from cpushare import bytecode, order as orders, protocol
from cpushare.market import admin
from cpushare.market.server import Market
from cpushare.market.store import SQLiteStore

TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_image(n: int = 0) -> bytes:
    """A valid bytecode image (its code is never run by these tests)."""
    return bytecode.Image(text=b"\x90" * (n + 1) + b"\xc3",
                          entry=bytecode.DEFAULT_TEXT_ADDRESS).pack()


def image_digest(blob: bytes) -> str:
    return bytecode.parse(blob).digest


class LoopbackMarket:
    """A market database in `root` (or the PostgreSQL database `db`), served
    in-process by `start()`."""

    def __init__(self, root: Path, db: str | None = None):
        self.root = Path(root)
        self.db = db or str(self.root / "market.db")
        self.pg = db is not None
        self.port = free_port()
        images = str(self.root / "images") if self.pg else None
        admin.init(self.db, f"127.0.0.1:{self.port}", images=images).close()
        self.admin = self.open_store()  # a connection of its own, like the CLI's
        self.market: Market | None = None
        self._task: asyncio.Task | None = None
        self._n = 0

    # --- administration -------------------------------------------------------
    # The admin connection writes in the thread that runs an in-process market:
    # the market's open group transaction is committed first, or SQLite's lock
    # would wait for a commit that cannot come.
    def _quiesce(self) -> None:
        if self.market is not None:
            self.market.commit_now()

    def account(self, name: str, coins_milli: int = 0) -> None:
        self._quiesce()
        admin.add_account(self.admin, name, coins_milli)

    def sell(self, account: str, price_milli: int, **kw) -> orders.SellOrder:
        self._quiesce()
        self._n += 1
        path = self.root / f"{account}-{self._n}.cpu"
        admin.add_sell_order(self.admin, account, price_milli, str(path), **kw)
        return orders.load_sell(path)

    def buy(self, account: str, price_milli: int, **kw) -> orders.BuyOrder:
        self._quiesce()
        self._n += 1
        path = self.root / f"{account}-{self._n}.buy"
        admin.add_buy_order(self.admin, account, price_milli, str(path), **kw)
        return orders.load_buy(path)

    def balance(self, name: str) -> int:
        return self.admin.account(name).balance_milli

    def balances(self, *names: str) -> dict[str, int]:
        return {n: self.balance(n) for n in names}

    def check(self) -> list[str]:
        return self.admin.check()

    # --- serving ----------------------------------------------------------------
    def open_store(self):
        if self.pg:
            from cpushare.market.store.pg import PostgresStore
            return PostgresStore(self.db)
        return SQLiteStore(self.db)

    async def start(self, **kw) -> Market:
        store = self.open_store()
        self.market = Market(store, **kw)
        started = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self.market.serve(
            "127.0.0.1", self.port, admin.tls_context(store), started=started))
        done, _ = await asyncio.wait([started, self._task], timeout=TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            self._task.result()
        return self.market

    async def stop(self) -> None:
        if self.market is not None:
            self.market.stop()
            await asyncio.wait_for(self._task, TIMEOUT)
            self.market.store.close()
            self.market = None

    def close(self) -> None:
        self.admin.close()


class Peer:
    """One connection to the market: a seller or a buyer."""

    def __init__(self, reader, writer, role: str):
        self.reader = reader
        self.writer = writer
        self.role = role
        self.welcome: protocol.Message | None = None

    @classmethod
    async def open(cls, o, role: str, *, hello: bool = True, version: int = protocol.VERSION,
                   ctx: ssl.SSLContext | None = None, **extra) -> "Peer":
        ctx = ctx or protocol.client_context(o.ca_pem, o.cert_pem, o.key_pem)
        r, w = await asyncio.wait_for(asyncio.open_connection(
            o.host, o.port, ssl=ctx, server_hostname=o.host), TIMEOUT)
        p = cls(r, w, role)
        if hello:
            await p.send("hello", version=version, role=role, software="test-peer",
                         **({"acks": True} if role == "buyer" else {}), **extra)
            p.welcome = await p.recv()
        return p

    async def send(self, type_: str, payload: bytes = b"", **fields) -> None:
        await protocol.send(self.writer, type_, payload, **fields)

    async def recv(self, timeout: float = TIMEOUT) -> protocol.Message | None:
        """The next message that is not a heartbeat (answering pings)."""
        while True:
            m = await asyncio.wait_for(protocol.read_message(self.reader), timeout)
            if m is not None and m.type == "ping":
                await self.send("pong", t=m.get("t", 0))
                continue
            if m is not None and m.type == "pong" and m.get("t") != -1:
                continue
            return m

    async def expect(self, type_: str, timeout: float = TIMEOUT) -> protocol.Message:
        m = await self.recv(timeout)
        assert m is not None, f"{self.role}: connection closed while waiting for {type_}"
        assert m.type == type_, f"{self.role}: expected {type_}, got {m.type} {m.fields}"
        return m

    async def answer_pings(self, seen) -> None:
        """Until the connection ends: answer every ping, each first given to `seen`
        (and drop everything else)."""
        while True:
            m = await protocol.read_message(self.reader)
            if m is None:
                return
            if m.type == "ping":
                seen(m)
                await self.send("pong", t=m.get("t", 0))

    async def sync(self) -> list[protocol.Message]:
        """Round trip: everything the market sent before answering our ping."""
        await self.send("ping", t=-1)
        got = []
        while True:
            m = await self.recv()
            assert m is not None, f"{self.role}: closed during sync"
            if m.type == "pong":
                return got
            got.append(m)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


class ScriptedSeller:
    """A seller that answers every task with `answer(input)`, in a task of its own."""

    def __init__(self, peer: Peer, answer=lambda data: data[::-1], cpu_ms: int = 1000,
                 hold: bool = False, pause: float = 0.0):
        self.peer = peer
        self.answer = answer
        self.cpu_ms = cpu_ms
        self.hold = hold  # keep tasks without answering (to test losses)
        self.pause = pause  # s a task "runs" before its result goes back
        self.tasks: list[protocol.Message] = []
        self.settled: list[protocol.Message] = []
        self.images: dict[str, bytes] = {}
        self.got_task = asyncio.Event()
        self.got_settled = asyncio.Event()
        self.is_ready = asyncio.Event()
        self._run: asyncio.Task | None = None

    @classmethod
    async def connect(cls, o, **kw) -> "ScriptedSeller":
        """Connect, start answering, and wait until the market counts it ready."""
        s = cls(await Peer.open(o, "seller"), **kw)
        s._run = asyncio.create_task(s._loop())
        ready = asyncio.ensure_future(s.is_ready.wait())
        await asyncio.wait([ready, s._run], timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            if s._run.done():
                s._run.result()  # the reason it ended
            raise ConnectionError("the market closed the connection before our ready")
        return s

    async def _loop(self) -> None:
        await self.peer.send("ready")
        await self.peer.send("ping", t=-1)  # its pong: the market has seen our ready
        while True:
            m = await self.peer.recv(timeout=None)
            if m is None:
                return
            await self._on(m)

    async def _on(self, m: protocol.Message) -> None:
        if m.type == "task":
            self.tasks.append(m)
            self.got_task.set()
            if self.hold:
                return
            if m["image"] not in self.images:
                await self.peer.send("need_image", image=m["image"])
                while True:  # other frames may come first
                    img = await self.peer.recv()
                    assert img is not None, "closed while waiting for the image"
                    if img.type == "image":
                        break
                    await self._on(img)
                assert image_digest(img.payload) == m["image"]
                self.images[m["image"]] = img.payload
            out = self.answer(m.payload)
            if self.pause:
                await asyncio.sleep(self.pause)
            await self.peer.send("result", out, attempt=m["attempt"], exit_status=0, signal=None,
                                 reason="", cpu_ms=self.cpu_ms,
                                 output_sha256=protocol.digest(out))
            await self.peer.send("ready")
        elif m.type == "settled":
            self.settled.append(m)
            self.got_settled.set()
        elif m.type == "pong":
            self.is_ready.set()

    async def stop(self) -> None:
        if self._run is not None:
            self._run.cancel()
            try:
                await self._run
            except (asyncio.CancelledError, ConnectionError, ssl.SSLError):
                pass
        await self.peer.close()

