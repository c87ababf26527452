"""The buyer SDK: buy CPU time on the CPUShare market from Python.

    from cpushare.order import load_buy
    from cpushare.buyer import Market

    async with Market(load_buy("me.buy")) as m:
        async for r in m.map(image, [b"input 1", b"input 2"]):
            print(r.ref, r.exit_status, r.output)

`map` submits one task per input and yields each `TaskResult` as it
completes (not in input order; `TaskResult.index` says which input it
was).  A lost connection is re-established with backoff, the image is
uploaded again and every task without a result is submitted again under
its old `ref`, so the market can tell a resubmission from new work.

Leaving `map` early (a `break` and then closing the generator, an
exception, a cancellation, a timeout) cancels the tasks that have no result
yet: the market fails them ("cancelled") and refunds their escrow;
`await m.cancelled()` waits for it to say so.

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
import random
import secrets
import ssl
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

from .. import __version__, bytecode, protocol
from ..order import BuyOrder
from ..protocol import Message, ProtocolError

log = logging.getLogger("cpushare.buyer")

__all__ = ["Market", "MarketError", "Session", "TaskResult", "run_tasks"]


class MarketError(Exception):
    """The market refused a request or the connection failed for good."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TaskResult:
    ref: str
    task: int | None
    exit_status: int | None
    signal: int | None
    reason: str
    cpu_ms: int
    cost_milli: int
    attempts: int
    output: bytes
    code: str | None = None  # set when the market failed the task (`failed`)
    index: int = -1  # position of the task's input in what was passed to map()

    @property
    def ok(self) -> bool:
        """The market accepted a result and the job exited with status 0."""
        return self.code is None and self.exit_status == 0 and self.signal is None


def _pack(image: bytecode.Image | bytes | bytearray | memoryview) -> tuple[str, bytes]:
    """(digest, packed image) for an Image or an already packed one."""
    if isinstance(image, bytecode.Image):
        return image.digest, image.pack()
    blob = bytes(image)
    return bytecode.parse(blob, where="image to upload").digest, blob


_LOST = object()  # put in result queues when the connection drops


class Market:
    """One buyer connection to the market of a buy order."""

    WINDOW = 512  # tasks submitted and not yet answered, per map()
    WINDOW_BYTES = 256 << 20  # and their inputs' bytes (at least one task is always out)
    CONNECT_TIMEOUT = 20.0
    RECONNECT_FOR = 300.0  # give up reconnecting after this long
    BACKOFF_BASE = 0.25
    BACKOFF_CAP = 10.0

    def __init__(self, order: BuyOrder, *, reconnect: bool = True):
        self.order = order
        self.reconnect = reconnect
        self.account: str | None = None
        self.resubmitted = 0  # tasks submitted again after a reconnection
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._max_payload = protocol.DEFAULT_MAX_PAYLOAD
        self._uploads: dict[str, asyncio.Future] = {}
        self._uploaded: set[str] = set()
        self._sinks: dict[str, asyncio.Queue] = {}  # ref -> the queue of its map()
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
        """Connect and authenticate; raise MarketError if refused."""
        o = self.order
        try:
            ctx = protocol.client_context(o.ca_pem, o.cert_pem, o.key_pem)
        except ValueError as e:
            raise MarketError("auth", f"{o.path}: {e}") from None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(o.host, o.port, ssl=ctx, server_hostname=o.host,
                                        limit=1 << 20), self.CONNECT_TIMEOUT)
        except ssl.SSLCertVerificationError as e:
            raise MarketError("auth", f"{o.server}: the market's certificate does not verify "
                                      f"against the CA in {o.path}: {e.verify_message}") from None
        except (OSError, asyncio.TimeoutError) as e:
            raise MarketError("connect", f"{o.server}: cannot connect: "
                                         f"{e.strerror if isinstance(e, OSError) and e.strerror else e!r}") from None
        try:
            await protocol.send(writer, "hello", version=protocol.VERSION, role="buyer",
                                software=f"cpushare/{__version__}", output_frames=True)
            msg = await asyncio.wait_for(protocol.read_message(reader), self.CONNECT_TIMEOUT)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
            writer.close()
            raise MarketError("auth", f"{o.server}: the market refused us during the TLS "
                                      f"handshake ({e}); is the certificate in {o.path} issued "
                                      f"by this market and still valid?") from None
        except (ProtocolError, asyncio.TimeoutError, OSError) as e:
            writer.close()
            raise MarketError("connect", f"{o.server}: handshake failed: {e!r}") from None
        if msg is None or msg.type != "welcome":
            writer.close()
            if msg is not None and msg.type == "error":
                raise MarketError(msg["code"], f"{o.server}: the market refused us: {msg['message']}")
            if msg is None:  # TLS 1.3: a refused client certificate ends the stream here
                raise MarketError("auth", f"{o.server}: the market refused us: it closed the "
                                          f"connection during the handshake; is the certificate "
                                          f"in {o.path} issued by this market and still valid?")
            raise MarketError("connect", f"{o.server}: expected welcome, got {msg.type}")
        self.account = msg["account"]
        self._max_payload = msg["max_payload"]
        self._out = protocol.FrameWriter(writer)
        self._reader, self._writer = reader, writer
        self._generation += 1
        self._uploaded.clear()
        self._read_task = asyncio.create_task(self._read_loop(reader, writer))

    async def close(self) -> None:
        self._closed = True
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
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.RECONNECT_FOR
            n = 0
            while True:
                delay = min(self.BACKOFF_CAP, self.BACKOFF_BASE * 2 ** n) * random.uniform(0.5, 1)
                await asyncio.sleep(delay)
                try:
                    await self.connect()
                    log.info("reconnected to %s", self.order.server)
                    return
                except MarketError as e:
                    if e.code not in ("connect",) or loop.time() > deadline:
                        raise
                    log.info("reconnecting to %s: %s", self.order.server, e.message)
                n += 1

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

    def _dispatch(self, msg: Message) -> None:
        t = msg.type
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
            q = self._sinks.pop(msg["ref"], None)
            fut = self._cancelling.get(msg["ref"])
            if q is not None:
                q.put_nowait(msg)
            elif fut is not None:
                if not fut.done():
                    fut.set_result(msg)
            else:
                log.debug("result for unknown ref %s ignored", msg["ref"])
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
        if code == "image" and self._uploads:
            # an image error without a ref: it answers the oldest upload
            digest = next(iter(self._uploads))
            fut = self._uploads.pop(digest)
            if not fut.done():
                fut.set_exception(MarketError(code, text))
            return
        log.warning("%s: market error %s: %s", self.order.server, code, text)

    # --- images and tasks ------------------------------------------------------

    async def upload(self, image: bytecode.Image | bytes) -> str:
        """Send an image to the market (once per connection); its digest."""
        digest, blob = _pack(image)
        if digest in self._uploaded and self.connected:
            return digest
        fut = self._uploads.get(digest)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._uploads[digest] = fut
            try:
                await self._send_async("image", blob, image=digest)
                await self._drain()
            except (ConnectionError, OSError) as e:
                self._uploads.pop(digest, None)
                raise MarketError("connect", f"{self.order.server}: upload failed: {e}") from None
        await asyncio.shield(fut)
        return digest

    def _new_ref(self) -> str:
        self._seq += 1
        return f"{self._prefix}-{self._seq}"

    async def map(self, image: bytecode.Image | bytes, inputs: Iterable[bytes], *,
                  redundancy: int | None = None,
                  cpu_ms: int | None = None) -> AsyncIterator[TaskResult]:
        """Run one task per input; yield each TaskResult as it completes."""
        digest, blob = _pack(image)
        q: asyncio.Queue = asyncio.Queue()
        self._queues.add(q)
        pending: dict[str, tuple[int, bytes]] = {}
        pending_bytes = 0
        source = iter(enumerate(inputs))
        exhausted = False
        fields = {"image": digest}
        if redundancy is not None:
            fields["redundancy"] = redundancy
        if cpu_ms is not None:
            fields["cpu_ms"] = cpu_ms

        async def submit(ref: str, data: bytes) -> None:
            self._sinks[ref] = q
            await self._send_async("submit", data, ref=ref, **fields)

        try:
            generation = await self._upload_through_losses(blob, self._generation)
            while True:
                # top up the window
                try:
                    while not exhausted and len(pending) < self.WINDOW and (
                            not pending or pending_bytes < self.WINDOW_BYTES):
                        try:
                            index, data = next(source)
                        except StopIteration:
                            exhausted = True
                            break
                        ref = self._new_ref()
                        pending[ref] = (index, bytes(data))
                        pending_bytes += len(pending[ref][1])
                        await submit(ref, pending[ref][1])
                    await self._drain()
                except (ConnectionError, OSError):
                    pass  # the read loop notices and puts _LOST in q
                if exhausted and not pending:
                    return
                item = await q.get()
                if item is _LOST:
                    # (results that came before the loss are ahead of _LOST in q)
                    await self._reconnect(generation)
                    generation = await self._upload_through_losses(blob, self._generation)
                    try:
                        for ref, (index, data) in list(pending.items()):
                            await submit(ref, data)
                            self.resubmitted += 1
                    except (ConnectionError, OSError):
                        pass  # the read loop notices and puts _LOST in q
                    continue
                ref = item["ref"]
                entry = pending.pop(ref, None)
                if entry is None:
                    continue
                pending_bytes -= len(entry[1])
                yield _result(item, entry[0])
        finally:
            self._queues.discard(q)
            for ref in pending:
                self._sinks.pop(ref, None)
            self._cancel(list(pending))

    async def _upload_through_losses(self, blob: bytes, generation: int) -> int:
        """Upload `blob`, reconnecting for as long as it is the connection that
        fails; the generation of the connection it went out on."""
        while True:
            try:
                await self.upload(blob)
                return generation
            except MarketError as e:
                if e.code != "connect":
                    raise
                await self._reconnect(generation)
                generation = self._generation

    def _cancel(self, refs: list[str]) -> None:
        """Ask the market to cancel these tasks (see cancelled())."""
        if not refs:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (a generator finalized after its loop ended)
            return
        for ref in refs:
            if ref not in self._cancelling:
                self._cancelling[ref] = loop.create_future()
            try:
                self._send("cancel", ref=ref)
            except ConnectionError:
                break  # the market keeps them for us; a new connection may cancel them

    async def cancelled(self, timeout: float = 30.0) -> tuple[int, int, int]:
        """Wait for the market's answers to the cancellations so far (tasks of
        map() calls left early): (cancelled, finished anyway, unanswered).
        A task whose result was already on its way is `finished anyway`, and
        paid for; `unanswered` ones (the connection went, or the timeout
        passed) may still run, their results kept by the market for this
        buy order."""
        futs = dict(self._cancelling)
        if self.connected and futs:
            try:
                await self._drain()
            except (ConnectionError, OSError):
                pass
            await asyncio.wait(futs.values(), timeout=timeout)
        counts = [0, 0, 0]
        for ref, fut in futs.items():
            if fut.done() and not fut.cancelled():
                m = fut.result()
                counts[0 if m.type == "failed" and m["code"] == "cancelled" else 1] += 1
                self._cancelling.pop(ref, None)
            else:
                counts[2] += 1
        return counts[0], counts[1], counts[2]

    def _output(self, msg: Message) -> None:
        """A piece of a task's output ahead of its `done` (not final until then)."""
        ref, offset = msg.get("ref"), msg.get("offset")
        if type(ref) is not str or type(offset) is not int:
            raise ProtocolError("frame", "output: ref and offset are required")
        if offset == 0:  # (a new attempt's output replaces what a lost one sent)
            self._ahead[ref] = bytearray()
        buf = self._ahead.get(ref)
        if buf is None or len(buf) != offset:
            raise ProtocolError("frame", f"output for {ref} at offset {offset}, after "
                                         f"{0 if buf is None else len(buf)} bytes")
        buf += msg.payload

    # --- sessions ----------------------------------------------------------

    def session(self, image: bytecode.Image | bytes, *, cpu_ms: int | None = None) -> "Session":
        """An interactive job: ``async with m.session(image) as s: ...``."""
        return Session(self, image, cpu_ms)


def _result(msg: Message, index: int) -> TaskResult:
    if msg.type == "done":
        return TaskResult(ref=msg["ref"], task=msg["task"], exit_status=msg["exit_status"],
                          signal=msg["signal"], reason=msg["reason"], cpu_ms=msg["cpu_ms"],
                          cost_milli=msg["cost_milli"], attempts=msg["attempts"],
                          output=msg.payload, index=index)
    return TaskResult(ref=msg["ref"], task=msg.get("task"), exit_status=None, signal=None,
                      reason=f"{msg['code']}: {msg['message']}", cpu_ms=0, cost_milli=0,
                      attempts=0, output=b"", code=msg["code"], index=index)


class Session:
    """One interactive job, its stdin and stdout streamed over the market."""

    def __init__(self, market: Market, image, cpu_ms: int | None):
        self._market = market
        self._image = image
        self._cpu_ms = cpu_ms
        self.id: int | None = None
        self.result: TaskResult | None = None
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._eof = False
        self._done = asyncio.get_event_loop().create_future()
        self._input_closed = False

    async def __aenter__(self) -> "Session":
        m = self._market
        digest = await m.upload(self._image)
        ref = m._new_ref()
        fut = asyncio.get_running_loop().create_future()
        m._opens[ref] = fut
        fields = {"ref": ref, "image": digest}
        if self._cpu_ms is not None:
            fields["cpu_ms"] = self._cpu_ms
        m._send("open", **fields)
        await m._drain()
        self.id = await fut
        m._sessions[self.id] = self
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if self._done.done():
            return
        if not self._input_closed:
            try:
                await self.close_input()
            except (MarketError, ConnectionError, OSError):
                return
        if exc_type is None:
            await self.wait()

    async def write(self, data: bytes) -> None:
        """Send bytes to the job's standard input."""
        if self._input_closed:
            raise MarketError("task", f"session {self.id}: input already closed")
        m = self._market
        try:
            # frames no bigger than the market accepts
            step = max(1, min(m._max_payload, 1 << 20))
            for i in range(0, len(data), step):
                m._send("stream", bytes(data[i:i + step]), session=self.id, eof=False)
                await m._drain()
        except (ConnectionError, OSError) as e:
            raise MarketError("connect", f"session {self.id}: {e}") from None

    async def close_input(self) -> None:
        """End of the job's standard input."""
        if self._input_closed:
            return
        self._input_closed = True
        try:
            self._market._send("stream", session=self.id, eof=True)
            await self._market._drain()
        except (ConnectionError, OSError) as e:
            raise MarketError("connect", f"session {self.id}: {e}") from None

    async def read(self) -> bytes:
        """The next bytes the job wrote to its standard output; b"" at its end."""
        if self._eof and self._chunks.empty():
            return b""
        chunk = await self._chunks.get()
        if isinstance(chunk, MarketError):
            raise chunk
        if chunk == b"":
            self._eof = True
        return chunk

    async def read_all(self) -> bytes:
        out = []
        while chunk := await self.read():
            out.append(chunk)
        return b"".join(out)

    async def wait(self) -> TaskResult:
        """Wait for the job to end; its result (output is not repeated there)."""
        return await asyncio.shield(self._done)

    # called by the Market's read loop
    def _stream(self, payload: bytes, eof: bool) -> None:
        if payload:
            self._chunks.put_nowait(payload)
        if eof and not self._eof:
            self._chunks.put_nowait(b"")

    def _closed(self, msg: Message) -> None:
        self._chunks.put_nowait(b"")
        self.result = TaskResult(
            ref="", task=self.id, exit_status=msg.get("exit_status"), signal=msg.get("signal"),
            reason=msg.get("reason") or "", cpu_ms=msg.get("cpu_ms") or 0,
            cost_milli=msg.get("cost_milli") or 0, attempts=1, output=b"")
        if not self._done.done():
            self._done.set_result(self.result)

    def _lost(self, why: str) -> None:
        err = MarketError("connect", f"session {self.id}: {why}")
        self._chunks.put_nowait(err)
        if not self._done.done():
            self._done.set_exception(err)
            self._done.exception()  # mark retrieved: wait() may never be called


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
