"""The buyer SDK: buy CPU time on the CPUShare market from Python.

    from cpushare.order import load_buy
    from cpushare.buyer import Market

    async with Market(load_buy("me.buy")) as m:
        async for r in m.map(image, [b"input 1", b"input 2"]):
            print(r.ref, r.exit_status, r.output)

`map` submits one task per input and yields each `TaskResult` as it
completes (not in input order; `TaskResult.index` says which input it
was).  A connection lost at any moment, also before the market's
`welcome` (a market restarting, or its listener too busy), is tried
again with exponential backoff and full jitter for up to `RECONNECT_FOR`
seconds.  A refusal stops at once: the market's `error` of code `auth` or
`version`, or a connection dropped in the handshake when the buyer's own
certificate is one the market drops there (expired, or not of the
order's CA: see certificate_problem).  After a reconnection the image is
uploaded again and every task without a result is submitted again under
its old `ref`, so the market can tell a resubmission from new work.

A market whose `welcome` says `acks: true` keeps each result until the
buyer sends `ack {task}`, and sends every result not acked yet again to a
buyer that reconnects.  `map` acks a result once the caller has taken it
(when it asks for the next one, or closes the iteration); with
`map(..., ack=False)` the caller acks with `Market.ack(result)` once it
has stored the result itself.  A result that comes again (after a
reconnection) is acked again, never yielded twice.

Leaving `map` early (a `break` and then closing the generator, an
exception, a cancellation, a timeout) cancels the tasks that have no result
yet: the market fails them ("cancelled") and refunds their escrow;
`await m.cancelled()` waits for it to say so.  Results of such tasks that
come anyway are acked and dropped.

`run_tasks(order, image, inputs)` is the synchronous convenience: it
returns the results in input order.

An interactive session streams bytes both ways with one running job:

    async with m.session(image) as s:
        await s.write(b"question\\n")
        answer = await s.read()
        await s.close_input()
    print(s.result.exit_status)
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from typing import Iterable

from .. import __version__, bytecode, protocol
from ..order import BuyOrder
from ..protocol import Message, ProtocolError
from .base import (REFUSALS, Backoff, Clock, MarketError, TaskResult, _describe,
                   _Unreachable, certificate_problem)
from .cluster import Cluster, LeaseClient, Node, NodeEvent
from .session import Session
from .tasks import _LOST, TaskClient

log = logging.getLogger("cpushare.buyer")

__all__ = ["Backoff", "Clock", "Cluster", "Market", "MarketError", "Node", "NodeEvent",
           "Session", "TaskResult", "certificate_problem", "run_tasks"]

class Market(TaskClient, LeaseClient):
    """One buyer connection to the market of a buy order.

    `clock` and `backoff` set how reconnecting waits (see Clock, Backoff)."""

    WINDOW = 512  # tasks submitted and not yet answered, per map()
    WINDOW_BYTES = 256 << 20  # and their inputs' bytes (at least one task is always out)
    CONNECT_TIMEOUT = 20.0  # each of: TCP connect, TLS handshake, waiting for `welcome`
    RECONNECT_FOR = 300.0  # give up (re)connecting after this long without a connection

    def __init__(self, order: BuyOrder, *, reconnect: bool = True, clock: Clock | None = None,
                 backoff: Backoff | None = None):
        self.order = order
        self.reconnect = reconnect
        self.clock = clock or Clock()
        self.backoff = backoff or Backoff()
        self.account: str | None = None
        self.resubmitted = 0  # tasks submitted again after a reconnection
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._max_payload = protocol.DEFAULT_MAX_PAYLOAD
        self._acks = False  # this connection's market keeps results until acked
        self._uploads: dict[str, asyncio.Future] = {}
        self._uploaded: set[str] = set()
        self._sinks: dict[str, asyncio.Queue] = {}  # ref -> the queue of its map()
        # ref -> task of the results received and not acked yet (a copy of one
        # of them, sent again after a reconnection, is dropped)
        self._unacked: dict[str, int] = {}
        # ref -> the output of its task so far, sent ahead of `done` in `output` frames
        self._ahead: dict[str, bytearray] = {}
        self._queues: set[asyncio.Queue] = set()
        self._opens: dict[str, asyncio.Future] = {}
        self._sessions: dict[int, "Session"] = {}
        self._conn_lock = asyncio.Lock()
        self._generation = 0  # counts connections
        self._closed = False
        self._prefix = secrets.token_hex(6)
        self._seq = 0
        self._out: protocol.FrameWriter | None = None  # frames out, while _writer is set
        # refs cancelled (map() left early) -> their answer, `failed` (cancelled) or `done`
        self._cancelling: dict[str, asyncio.Future] = {}
        self._init_leases()

    # --- connection ----------------------------------------------------------

    async def __aenter__(self) -> "Market":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        """Connect and authenticate.

        Once the TCP connection is made, a connection lost on the way (closed
        or reset in the TLS handshake or before `welcome`, no `welcome` in
        time, an `error` other than a refusal) is tried again with backoff
        for up to RECONNECT_FOR seconds (unless `reconnect` is off).  Raises
        MarketError: code `auth` or `version` when refused, `connect` when
        no TCP connection can be made or it gives up."""
        async with self._conn_lock:
            await self._connect_retrying(first=True)

    async def _connect_retrying(self, first: bool) -> None:
        """Connect, trying again after a lost connection with backoff (full
        jitter) until RECONNECT_FOR seconds have passed.  A `first`
        connection tries at once, and gives up at once if that first try
        makes no TCP connection; a reconnection waits before it tries, so
        that the buyers of a market that restarts do not all come back in
        the same instant."""
        clock = self.clock
        deadline = clock.time() + self.RECONNECT_FOR
        attempt = 0
        while True:
            if attempt or not first:
                n = attempt - 1 if first else attempt
                await clock.sleep(min(self.backoff.delay(n), max(0.0, deadline - clock.time())))
            try:
                await self._connect_once()
                return
            except MarketError as e:
                if (e.code in REFUSALS or not self.reconnect or self._closed
                        or (first and attempt == 0 and isinstance(e, _Unreachable))):
                    raise
                if clock.time() >= deadline:
                    raise MarketError("connect", f"{e.message}; gave up after trying for "
                                                 f"{self.RECONNECT_FOR:g} s") from None
                (log.warning if attempt == 0 else log.info)(
                    "%s; trying again (for up to %g s)", e.message, self.RECONNECT_FOR)
            attempt += 1

    async def _connect_once(self) -> None:
        """One attempt: TCP, TLS, hello, welcome."""
        o = self.order
        try:
            ctx = protocol.client_context(o.ca_pem, o.cert_pem, o.key_pem)
        except ValueError as e:
            raise MarketError("auth", f"{o.path}: {e}") from None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(o.host, o.port, limit=1 << 20), self.CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            raise _Unreachable(f"{o.server}: cannot connect: {_describe(e)}") from None
        try:
            await asyncio.wait_for(writer.start_tls(ctx, server_hostname=o.host),
                                   self.CONNECT_TIMEOUT)
        except ssl.SSLCertVerificationError as e:
            writer.transport.abort()
            raise MarketError("auth", f"{o.server}: the market's certificate does not verify "
                                      f"against the CA in {o.path}: {e.verify_message}") from None
        except (OSError, asyncio.TimeoutError) as e:  # (ssl.SSLError is an OSError)
            writer.transport.abort()
            raise self._dropped(f"{o.server}: the connection was lost in the TLS handshake: "
                                f"{_describe(e)}") from None
        try:
            await protocol.send(writer, "hello", version=protocol.VERSION, role="buyer",
                                software=f"cpushare/{__version__}", output_frames=True,
                                acks=True)
            msg = await asyncio.wait_for(protocol.read_message(reader), self.CONNECT_TIMEOUT)
        except (OSError, ProtocolError, asyncio.TimeoutError) as e:
            writer.transport.abort()
            raise self._dropped(f"{o.server}: the connection was lost before the market's "
                                f"welcome: {_describe(e)}") from None
        if msg is None or msg.type != "welcome":
            writer.close()
            if msg is None:
                raise self._dropped(f"{o.server}: the market closed the connection before "
                                    f"its welcome")
            if msg.type == "error" and msg["code"] in REFUSALS:
                raise MarketError(msg["code"], f"{o.server}: the market refused us: "
                                               f"{msg['message']}")
            if msg.type == "error":
                raise MarketError("connect", f"{o.server}: the market answered hello with "
                                             f"{msg['code']}: {msg['message']}")
            raise MarketError("connect", f"{o.server}: expected welcome, got {msg.type}")
        self.account = msg["account"]
        self._max_payload = msg["max_payload"]
        self._acks = msg.get("acks") is True
        self._out = protocol.FrameWriter(writer)
        self._reader, self._writer = reader, writer
        self._generation += 1
        self._uploaded.clear()
        self._read_task = asyncio.create_task(self._read_loop(reader, writer))

    def _dropped(self, text: str) -> MarketError:
        """The error for a connection lost in the TLS handshake or before
        `welcome`: a lost connection (`text`), unless our certificate is
        one that the market drops there without a word (see
        certificate_problem)."""
        o = self.order
        problem = certificate_problem(o.ca_pem, o.cert_pem, o.key_pem)
        if problem is not None:
            return MarketError("auth", f"{o.server}: the market refused us: the certificate in "
                                       f"{o.path} does not verify against its CA: {problem}")
        return MarketError("connect", text)

    async def close(self) -> None:
        self._closed = True
        if self._lease_reconnect is not None:
            self._lease_reconnect.cancel()
        w = self._writer
        self._writer = None
        if self._read_task is not None:
            self._read_task.cancel()
            try:
                await self._read_task
            except (asyncio.CancelledError, Exception):
                pass
        if w is not None:
            w.close()
            try:
                await asyncio.wait_for(w.wait_closed(), 2)
            except Exception:
                pass

    async def _reconnect(self, generation: int) -> None:
        """Reconnect unless another caller already did (same `generation` seen)."""
        async with self._conn_lock:
            if self._generation != generation and self.connected:
                return
            if not self.reconnect or self._closed:
                raise MarketError("connect", f"{self.order.server}: connection lost")
            await self._connect_retrying(first=False)
            log.info("reconnected to %s", self.order.server)

    def _send(self, type_: str, payload: bytes = b"", **fields) -> None:
        """Queue a frame (see protocol.FrameWriter)."""
        if self._writer is None or not self._out.send(type_, payload, **fields):
            raise ConnectionResetError("not connected to the market")

    async def _send_async(self, type_: str, payload: bytes = b"", **fields) -> None:
        """Like _send, but a big payload goes out in pieces paced by drain()."""
        if self._writer is None or not await self._out.send_big(type_, payload, **fields):
            raise ConnectionResetError("the connection to the market closed")

    async def _drain(self) -> None:
        if self._writer is not None:
            await self._out.drain()

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why = "the market closed the connection"
        try:
            while True:
                msg = await protocol.read_message(reader, self._max_payload)
                if msg is None:
                    break
                self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except ProtocolError as e:
            why = f"protocol error: {e}"
            try:
                writer.write(protocol.encode("error", code=e.code, message=e.message))
            except Exception:
                pass
        except (OSError, ssl.SSLError, EOFError) as e:
            why = f"{type(e).__name__}: {e}"
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
        log.warning("%s: %s", self.order.server, why)
        err = MarketError("connect", f"{self.order.server}: {why}")
        for fut in [*self._uploads.values(), *self._opens.values()]:
            if not fut.done():
                fut.set_exception(err)
        self._uploads.clear()
        self._opens.clear()
        self._ahead.clear()
        for q in self._queues:
            q.put_nowait(_LOST)
        for s in list(self._sessions.values()):
            s._lost(why)
        self._sessions.clear()
        self._leases_lost(why)

    def _dispatch(self, msg: Message) -> None:
        t = msg.type
        if self._on_lease_frame(msg):
            return
        if t == "ping":
            self._send("pong", **({"t": msg["t"]} if "t" in msg.fields else {}))
        elif t == "image_ok":
            fut = self._uploads.pop(msg["image"], None)
            self._uploaded.add(msg["image"])
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif t == "output":
            self._output(msg)
        elif t in ("done", "failed"):
            ahead = self._ahead.pop(msg["ref"], None)
            if t == "done" and "streamed" in msg.fields:
                if ahead is None or len(ahead) != msg["streamed"]:
                    raise ProtocolError("frame", f"done for {msg['ref']}: "
                                                 f"{msg['streamed']} bytes sent ahead, "
                                                 f"{0 if ahead is None else len(ahead)} came")
                ahead += msg.payload
                msg.payload = ahead
            self._on_result(msg)
        elif t == "accepted":
            pass
        elif t == "opened":
            fut = self._opens.pop(msg["ref"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg["session"])
        elif t == "stream":
            s = self._sessions.get(msg["session"])
            if s is not None:
                s._stream(msg.payload, bool(msg.get("eof")))
        elif t == "closed":
            s = self._sessions.pop(msg["session"], None)
            if s is not None:
                s._closed(msg)
        elif t == "error":
            self._error(msg)
        elif t == "pong":
            pass
        else:
            raise ProtocolError("frame", f"a buyer does not expect {t!r} messages")

    def _error(self, msg: Message) -> None:
        ref = msg.get("ref")
        code, text = msg["code"], msg["message"]
        if ref is not None:
            q = self._sinks.pop(ref, None)
            if q is not None:
                q.put_nowait(Message("failed", {"ref": ref, "task": None, "code": code,
                                                "message": text}))
                return
            fut = self._opens.pop(ref, None)
            if fut is not None and not fut.done():
                fut.set_exception(MarketError(code, text))
                return
            fut = self._uploads.pop(ref, None)
            if fut is not None and not fut.done():
                fut.set_exception(MarketError(code, text))
                return
        if code == "image" and self._image_error(text):
            return
        if code == "image" and self._uploads:
            # an image error without a ref: it answers the oldest upload
            digest = next(iter(self._uploads))
            fut = self._uploads.pop(digest)
            if not fut.done():
                fut.set_exception(MarketError(code, text))
            return
        log.warning("%s: market error %s: %s", self.order.server, code, text)

    # --- images and tasks ------------------------------------------------------

    def session(self, image: bytecode.Image | bytes, *, cpu_ms: int | None = None) -> "Session":
        """An interactive job: ``async with m.session(image) as s: ...``."""
        return Session(self, image, cpu_ms)


def run_tasks(order: BuyOrder, image: bytecode.Image | bytes, inputs: Iterable[bytes], *,
              redundancy: int | None = None, cpu_ms: int | None = None) -> list[TaskResult]:
    """Run one task per input and return the results in input order."""
    async def go() -> list[TaskResult]:
        out: dict[int, TaskResult] = {}
        async with Market(order) as m:
            async for r in m.map(image, inputs, redundancy=redundancy, cpu_ms=cpu_ms):
                out[r.index] = r
        return [out[i] for i in sorted(out)]
    return asyncio.run(go())
