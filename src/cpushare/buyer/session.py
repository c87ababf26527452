"""An interactive session: one running job, its stdin and stdout streamed
over the market (`Market.session`)."""

from __future__ import annotations

import asyncio

from ..protocol import Message
from .base import MarketError, TaskResult


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
