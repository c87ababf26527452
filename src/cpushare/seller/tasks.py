"""The seller's tasks: take one, fetch its image, run it through the
model (a whole job, or a session streamed both ways), report its result.

Mixed into `Seller` (core.py); a lease of the kvm model runs in lease.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time

from .. import models, protocol
from ..protocol import Message
from .cache import CacheError
from .running import SESSION_INPUT_BUDGET, _Aborted, _OutputSink, _Running

log = logging.getLogger("cpushare.seller")


class TaskRuns:
    """Mixed into Seller."""

    def _send_ready(self) -> None:
        """Ask for as many tasks as we may hold and have not asked for: one when
        idle, and (when the market allows prefetch) one more to hold while a task
        runs, so that the next starts as soon as the last ends.  The market takes a
        held task back (`revoke`) when another seller is idle and may run it."""
        if self._writer is None or self._paused or self._stopping:
            return
        r = self._running
        room = 1 + (self._prefetch if r is None or r.session is None else 0)
        held = (self._running is not None) + (self._queued is not None) + self._asked
        if held >= room:
            return
        self._asked += room - held
        if self._prefetch:
            self._send("ready", slots=room - held)
        else:
            self._send("ready")

    def _give_back_queued(self, why: str) -> None:
        msg, self._queued = self._queued, None
        if msg is not None:
            log.info("task %s/%s handed back unstarted: %s", msg["task"], msg["attempt"], why,
                     extra={"ORDER": self._order.name})
            self._handback(msg["attempt"], why, unstarted=True)

    def _give_back_held(self, attempt: int, why: str) -> bool:
        """Hand back the held task if it is attempt `attempt`, and ask for
        another to hold; whether it was."""
        if self._queued is None or self._queued["attempt"] != attempt:
            return False
        self._give_back_queued(why)
        self._send_ready()
        return True

    def _handback(self, attempt: int, why: str, unstarted: bool = False) -> None:
        """Give an attempt back; the market then forgets what we asked for."""
        self._asked = 0
        self._send("handback", attempt=attempt, reason=why,
                   **({"unstarted": True} if unstarted else {}))

    def _take(self, msg: Message) -> None:
        if self._asked > 0:
            self._asked -= 1
        attempt = msg["attempt"]
        if self._paused or self._stopping:
            why = "the seller is paused" if self._paused else "the seller is stopping"
            self._handback(attempt, why, unstarted=True)
            return
        if self._running is not None:
            r = self._running
            if (self._prefetch and self._queued is None
                    and msg.get("session") is None and r.session is None):
                self._queued = msg  # started when the running one ends
                return
            self._handback(attempt, "busy with another task", unstarted=True)
            self._send_ready()
            return
        self._start(msg)

    def _start(self, msg: Message) -> None:
        attempt = msg["attempt"]
        bo = msg.get("buyer_order")
        r = _Running(task=msg["task"], attempt=attempt,
                     buyer_order=None if bo is None else str(bo), session=msg.get("session"))
        if r.session is not None:
            r.stream_in = asyncio.Queue()
        self._running = r
        log.debug("task %s/%s: received, %d bytes of input", r.task, r.attempt,
                  len(msg.payload), extra={"ORDER": self._order.name})
        self._set(state="running", current_task=f"{r.task}/{r.attempt}",
                  buyer_order=r.buyer_order)
        self._task_coro = asyncio.create_task(self._run_task(r, msg))

    def _limits(self, msg: Message):
        """The run's limits: the task's within the order's (the model's own kind)."""
        return self._model.limits(self._order.limits, cpu_ms=msg["cpu_ms"],
                                  wall_ms=msg["wall_ms"], memory=msg["memory"],
                                  output=msg["output_limit"])

    async def _image(self, digest: str):
        if self._model.chunked:
            return await self._fetch_iso(digest)
        image = self._cache.get(digest)
        if image is not None:
            return image
        fut = self._loop.create_future()
        self._image_waiters[digest] = fut
        self._send("need_image", image=digest)
        try:
            blob = await asyncio.wait_for(fut, self.IMAGE_TIMEOUT)
        finally:
            if self._image_waiters.get(digest) is fut:
                del self._image_waiters[digest]
        return self._cache.put(digest, blob)

    def _refuse(self, r: _Running, reason: str) -> None:
        """Answer the task with no result: the seller could not run it (`reason`
        starts with the refusal's code, which the market never takes as a result)."""
        self._send("result", attempt=r.attempt, exit_status=None, signal=None, reason=reason,
                   cpu_ms=0, output_sha256=protocol.digest(b""))

    async def _run_task(self, r: _Running, msg: Message) -> None:
        name = self._order.name
        tag = f"{r.task}/{r.attempt}"
        fields = {"ORDER": name, "TASK": tag, "BUYER_ORDER": r.buyer_order or ""}
        outcome = "ok"
        try:
            model = msg.get("model") or self._model.name
            if model != self._model.name:  # (the market matches by model: a bug if so)
                outcome = "wrong-model"
                log.warning("task %s: of model %s; this order sells %s", tag, model,
                            self._model.name, extra={**fields, "OUTCOME": outcome})
                self._refuse(r, f"seller error: a task of model {model:.20}, this order "
                                f"sells {self._model.name}")
                return
            try:
                image = await self._image(msg["image"])
            except CacheError as e:
                outcome = "bad-image"
                log.warning("task %s: bad image: %s", tag, e, extra={**fields, "OUTCOME": outcome})
                self._refuse(r, f"bad image: {e}")
                return
            except asyncio.TimeoutError:
                outcome = "handback"
                self._handback(r.attempt,
                           f"image {msg['image'][:16]} did not arrive within "
                                  f"{self.IMAGE_TIMEOUT:.0f} s")
                return
            except _Aborted:
                pass  # handed back just below
            if r.aborted:
                outcome = "handback"
                self._handback(r.attempt, r.aborted)
                return
            limits = self._limits(msg)
            sink = None
            if (r.session is None and self._output_chunks
                    and type(self)._output_for_result is TaskRuns._output_for_result):
                sink = _OutputSink(self, r, self._output_chunks)
            if r.session is None:
                result = await self._execute(r, image, limits, msg.payload, sink)
            elif self._model.leases:
                result, streamed = await self._run_lease(r, image, limits, msg)
            else:
                result, streamed = await self._execute_session(r, image, limits)
            if r.aborted:
                outcome = "handback"
                log.info("task %s handed back: %s", tag, r.aborted,
                         extra={**fields, "OUTCOME": outcome})
                self._handback(r.attempt, r.aborted)
                return
            # whole milliseconds, rounded up: a job that ran was never free
            cpu_ms = -(-round(result.cpu_seconds * 1_000_000) // 1000)
            if sink is not None:  # the output went ahead in `output` frames but for the rest
                payload, out_sha, out_len = sink.buf, sink.sha256.hexdigest(), sink.n
            elif r.session is None:
                payload = self._output_for_result(result.output)
                out_sha, out_len = protocol.digest(payload), len(payload)
            else:  # the output went to the buyer as `stream` frames
                payload, out_sha, out_len = b"", streamed.hexdigest(), -1
            res = dict(attempt=r.attempt, exit_status=result.exit_status,
                       signal=result.signal, reason=result.reason or "", cpu_ms=cpu_ms,
                       output_sha256=out_sha)
            if r.detached_at is not None and self._writer is None:
                self._unsent_result = (payload, res)  # sent when the market is back
            else:
                await self._send_async("result", payload, **res)
            outcome = "ok" if result.exit_status == 0 else "failed"
            st = self._status
            self._set(tasks_done=st.tasks_done + 1,
                      cpu_seconds_sold=st.cpu_seconds_sold + cpu_ms / 1000)
            log.info("task %s: %s (exit %s, signal %s, %s); %d ms CPU, %d bytes out", tag,
                     outcome, result.exit_status, result.signal, result.reason or "-", cpu_ms,
                     out_len, extra={**fields, "OUTCOME": outcome, "CPU_MS": cpu_ms})
        except asyncio.CancelledError:
            outcome = "lost"
            raise
        except models.RunRefused as e:  # this job cannot run here
            outcome = "refused"
            why = e.reason
            log.warning("task %s: %s: %s", tag, why, e, extra={**fields, "OUTCOME": outcome})
            self._refuse(r, f"{why}: {e}")
        except Exception as e:  # a bad job fails that task only
            outcome = "error"
            log.exception("task %s failed in the seller", tag, extra={**fields, "OUTCOME": outcome})
            self._refuse(r, f"seller error: {type(e).__name__}: {e}")
        finally:
            if self._running is r:
                self._running = None
                self._task_coro = None
                nxt, self._queued = self._queued, None
                if self._writer is not None and not self._stopping:
                    if nxt is not None and not self._paused:
                        self._start(nxt)
                    else:
                        if nxt is not None:  # (pause hands it back first; to be sure)
                            self._handback(nxt["attempt"], "the seller is paused",
                                           unstarted=True)
                        self._set(state="paused" if self._paused else "idle",
                                  current_task=None, buyer_order=None)
                    self._send_ready()
            if self._stopping and outcome != "lost":
                await self._drain()
                if self._session_task is not None:
                    self._session_task.cancel()

    def _output_for_result(self, output: bytes) -> bytes:
        """The output reported to the market (a seam for test runners)."""
        return output

    async def _execute(self, r: _Running, image, limits, data: bytes, sink=None):
        """Run one job to the end (its output to `sink` if given), in the loop.

        The start (a request to the sandbox's zygote, which answers when the
        job is set up) takes a fraction of a millisecond and blocks the loop
        that long; the job's pipes and its end are then watched by the loop,
        so no thread is handed each task."""
        job = self._model.start(image, limits)
        r.job = job
        if r.aborted:
            job.kill()
        elif self._paused:
            job.pause()
        return await job.feed_async(data, sink)

    def _send_output(self, r: _Running, piece: bytearray) -> None:
        if self._running is r and not r.aborted:
            self._queue(protocol.encode("output", piece, attempt=r.attempt))

    async def _execute_session(self, r: _Running, image, limits):
        """Run an interactive job: relay `stream` frames both ways.

        The job's output goes to the buyer as it comes, so this side
        enforces the output and wall-clock limits itself.
        """
        loop = self._loop
        job = await loop.run_in_executor(None, self._model.start, image, limits)
        r.job = job
        if r.aborted:
            job.kill()
        elif self._paused:
            job.pause()
        digest = hashlib.sha256()
        produced = 0
        killed_for = ""

        def pump_out() -> None:
            nonlocal produced, killed_for
            while True:
                try:
                    chunk = job.read()
                except (OSError, ValueError):
                    chunk = b""
                if not chunk:
                    return
                room = limits.output - produced
                if len(chunk) > room:
                    chunk = chunk[:max(room, 0)]
                    killed_for = killed_for or "output-limit"
                    job.kill()
                if chunk:
                    produced += len(chunk)
                    self._forward(r, chunk, digest)
                if killed_for:
                    return

        async def pump_in() -> None:
            while True:
                chunk = await r.stream_in.get()
                if chunk is None:
                    break
                r.took_input(len(chunk))
                try:
                    await loop.run_in_executor(None, job.write, chunk)
                except (OSError, ValueError):
                    break
            try:
                job.close_input()
            except OSError:
                pass

        async def wall_clock() -> None:
            nonlocal killed_for
            used = 0.0  # seconds not paused
            while True:
                await asyncio.sleep(0.5)
                used += 0 if self._paused else 0.5
                if used > limits.wall_seconds:
                    killed_for = killed_for or "wall-limit"
                    job.kill()
                    return

        result = await self._relay(r, job, pump_out, pump_in(), wall_clock())
        if killed_for and not r.aborted:
            result = dataclasses.replace(result, reason=killed_for)
        return result, digest

    def _forward(self, r: _Running, chunk: bytes, digest) -> None:
        """(In the output thread) send a piece of a session's output on, hashed;
        the job's output then waits (in its pipe, or the guest's UART) while
        the market is not taking it: the daemon holds at most about
        SESSION_INPUT_BUDGET of it."""
        digest.update(chunk)
        self._loop.call_soon_threadsafe(self._send_stream, r.session, chunk)
        while (not r.aborted and self._running is r and self._out is not None
               and self._out.buffered > SESSION_INPUT_BUDGET):
            time.sleep(0.005)

    async def _relay(self, r: _Running, job, pump_out, *beside):
        """Run `pump_out` (the job's output to the market, in a thread) and the
        coroutines `beside` it until the job has ended; its result.  The
        session's stream then ends (eof)."""
        loop = self._loop
        tasks = [asyncio.create_task(c) for c in beside]
        try:
            await loop.run_in_executor(None, pump_out)
            result = await loop.run_in_executor(None, job.wait)
        finally:
            for t in tasks:
                t.cancel()
        self._send("stream", session=r.session, eof=True)
        return result

    def _send_stream(self, session: int, chunk: bytes) -> None:
        self._send("stream", chunk, session=session, eof=False)
