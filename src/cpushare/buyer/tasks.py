"""Tasks from the buyer's side: upload an image, submit one task per input
(`map`), take the results as they come, ack them, cancel what is left.

Mixed into buyer.Market (see its docstring for the whole story).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Iterable

from .. import bytecode
from ..protocol import Message, ProtocolError
from .base import MarketError, TaskResult, _describe, _result

log = logging.getLogger("cpushare.buyer")


def _pack(image: bytecode.Image | bytes | bytearray | memoryview) -> tuple[str, bytes]:
    """(digest, packed image) for an Image or an already packed one."""
    if isinstance(image, bytecode.Image):
        return image.digest, image.pack()
    blob = bytes(image)
    return bytecode.parse(blob, where="image to upload").digest, blob


_LOST = object()  # put in result queues when the connection drops


class TaskClient:
    """Mixed into Market."""

    def _on_result(self, msg: Message) -> None:
        """A `done` or `failed`: to the map() waiting for it, or acked."""
        ref, task = msg["ref"], msg.get("task")
        if ref in self._unacked:
            return  # a copy (sent again after a reconnection) of one we hold
        q = self._sinks.pop(ref, None)
        fut = self._cancelling.get(ref)
        if q is not None:
            if task is not None:
                self._unacked[ref] = task
            q.put_nowait(msg)
        elif fut is not None:  # (a map() left early): the market's answer to its cancel
            if not fut.done():
                fut.set_result(msg)
            self._ack(ref, task)
        elif ref.startswith(self._prefix + "-"):
            self._ack(ref, task)  # ours and handed over already: a copy
        else:
            log.debug("result for unknown ref %s ignored", ref)

    def _ack(self, ref: str, task: int | None) -> None:
        self._unacked.pop(ref, None)
        if task is None or not self._acks:
            return
        try:
            self._send("ack", task=task)
        except ConnectionError:
            pass  # the market sends the result again after a reconnection: acked then

    def ack(self, result: TaskResult) -> None:
        """Tell the market that `result` (of map(..., ack=False)) is stored
        and that it may drop its copy."""
        self._ack(result.ref, result.task)

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
                  redundancy: int | None = None, cpu_ms: int | None = None,
                  ack: bool = True) -> AsyncIterator[TaskResult]:
        """Run one task per input; yield each TaskResult as it completes.

        A result is acked to the market once the caller has taken it: when
        it asks for the next one or closes the iteration.  With ack=False
        the caller acks each result itself (Market.ack) once it has stored
        it; the market sends the results not acked again after a
        reconnection (they are not yielded again)."""
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
                self._sinks.pop(ref, None)  # (set again if it was resubmitted meanwhile)
                entry = pending.pop(ref, None)
                if entry is None:  # yielded already
                    self._ack(ref, item.get("task"))
                    continue
                pending_bytes -= len(entry[1])
                r = _result(item, entry[0])
                try:
                    yield r
                finally:
                    if ack:
                        self._ack(r.ref, r.task)
        finally:
            self._queues.discard(q)
            while not q.empty():  # results in that the caller did not take: finished anyway
                item = q.get_nowait()
                if item is not _LOST and pending.pop(item["ref"], None) is not None:
                    self._finished_anyway(item)
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

    def _finished_anyway(self, msg: Message) -> None:
        """The result of a task of a map() left early, not yielded: counted
        by cancelled() and acked, like a result that crossed its cancel."""
        try:
            fut = asyncio.get_running_loop().create_future()
        except RuntimeError:  # (a generator finalized after its loop ended)
            return
        fut.set_result(msg)
        self._cancelling[msg["ref"]] = fut
        self._ack(msg["ref"], msg.get("task"))

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
