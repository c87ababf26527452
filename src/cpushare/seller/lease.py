"""The seller's side of a lease (the kvm model): fetch the ISO in chunks,
boot it, relay its serial console, meter it, power it off.

Mixed into `Seller` (core.py).  A lease is a session whose job is a qemu
run (`models.qemu.QemuRun`): its console is the session's stream both
ways; every METER_INTERVAL the guest's CPU time so far goes to the market
(`meter`), which pays it as it runs.  `stop` from the market, the daemon's
SIGTERM and the wall-clock limit power the guest off (ACPI, then a kill
after POWERDOWN_GRACE); the `result` then carries the final CPU time.
Pause stops the guest's vCPUs (QMP stop): its CPU time does not grow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import time

from .. import models
from ..protocol import Message
from .cache import CacheError

log = logging.getLogger("cpushare.seller")

METER_INTERVAL = 10.0  # seconds between `meter` reports of a running lease
# A lease whose market connection is lost runs on this long (the market may be
# restarting: it takes the lease back when we reconnect); then it is powered off.
LEASE_GRACE = 120.0
POWERDOWN_GRACE = 30.0  # seconds a guest has to power off before it is killed


def _links_built() -> bool:
    """Whether this build can join guests to a buyer's link (the C extension)."""
    try:
        import cpushare._link  # noqa: F401
    except ImportError:
        return False
    return True


class LeaseRuns:
    """Mixed into Seller."""

    METER_INTERVAL = METER_INTERVAL
    POWERDOWN_GRACE = POWERDOWN_GRACE
    LEASE_GRACE = LEASE_GRACE

    # --- a lost connection ------------------------------------------------------

    def _lease_detaches(self, r) -> bool:
        """The connection is lost while `r` runs: a lease's guest runs on
        (for LEASE_GRACE) unless we are stopping; whether it does."""
        if not (self._model.leases and r.session is not None) or self._stopping or r.aborted:
            return False
        if r.detached_at is None:
            r.detached_at = time.monotonic()
            log.warning("lease %s/%s: the market connection is lost; the guest runs on for "
                        "up to %g s", r.task, r.attempt, self.LEASE_GRACE,
                        extra={"ORDER": self._order.name})
        return True

    def _lease_reattached(self) -> None:
        """After `welcome`: the lease (or its result) is ours again."""
        r = self._running
        if r is not None and r.detached_at is not None:
            r.detached_at = None
            self._set(state="paused" if self._paused else "running",
                      current_task=f"{r.task}/{r.attempt}")
        if self._unsent_result is not None:
            payload, fields = self._unsent_result
            self._unsent_result = None
            self._send("result", payload, **fields)

    def _lease_hello(self) -> dict:
        r = self._running
        if self._unsent_result is not None:
            return {"lease_attempt": self._unsent_result[1]["attempt"],
                    "lease_cpu_ms": self._unsent_result[1]["cpu_ms"]}
        if r is None or r.session is None or r.job is None:
            return {}
        try:
            cpu = r.job.cpu_seconds()
        except OSError:
            cpu = 0.0
        return {"lease_attempt": r.attempt, "lease_cpu_ms": -(-round(cpu * 1e6) // 1000)}

    # --- the image, in chunks -----------------------------------------------

    async def _fetch_iso(self, digest: str):
        """The image `digest` from the cache, or fetched from the market in
        chunks from what is held of it.  CacheError for a bad one;
        asyncio.TimeoutError when no chunk came for IMAGE_TIMEOUT."""
        image = self._cache.get(digest)
        if image is not None:
            return image
        writer = self._image_writer()
        # (a part of an earlier connection is hashed again, once, in the writer)
        await self._loop.run_in_executor(writer, self._cache.abandon)
        held = await self._loop.run_in_executor(writer, self._cache.held, digest)
        fut = self._loop.create_future()
        self._image_waiters[digest] = fut
        self._image_progress[digest] = time.monotonic()
        self._send("need_image", image=digest, offset=held)
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), 5)
                except asyncio.TimeoutError:
                    if time.monotonic() - self._image_progress[digest] > self.IMAGE_TIMEOUT:
                        raise
        finally:
            if self._image_waiters.get(digest) is fut:
                del self._image_waiters[digest]
            if not fut.done():
                fut.cancel()

    def _image_writer(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread that appends and hashes image chunks (and finishes the
        image), in order, while the loop decrypts the next chunk."""
        w = getattr(self, "_writer_thread", None)
        if w is None:
            w = self._writer_thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="cpushare-image-writer")
        return w

    def _on_image_chunk(self, msg: Message) -> None:
        d = msg["image"]
        waiter = self._image_waiters.get(d)
        if waiter is None or waiter.done():
            log.warning("unrequested image chunk %s ignored", d[:16],
                        extra={"ORDER": self._order.name})
            return
        self._image_progress[d] = time.monotonic()
        w = self._image_writer().submit(self._cache.write, d, msg["offset"],
                                        msg.get("size") or 0, msg.payload)
        # the connection reads the chunk after next once this one is written
        self._disk_wait, self._disk_last = getattr(self, "_disk_last", None), w
        asyncio.wrap_future(w, loop=self._loop).add_done_callback(
            lambda f: self._chunk_written(d, waiter, f))

    def _chunk_written(self, d: str, waiter: asyncio.Future, f: asyncio.Future) -> None:
        if waiter.done():
            return
        e = f.exception()
        if e is not None:
            waiter.set_exception(CacheError(str(e)))
            return
        if not f.result():
            return
        done = asyncio.wrap_future(self._image_writer().submit(self._cache.finish, d),
                                   loop=self._loop)

        def finished(g: asyncio.Future) -> None:
            if waiter.done():
                return
            if g.exception() is not None:
                waiter.set_exception(CacheError(str(g.exception())))
            else:
                waiter.set_result(g.result())
        done.add_done_callback(finished)

    async def _image_backpressure(self) -> None:
        """(The read loop, after each message) until the image chunk before the
        last one is written: at most two chunks are in memory."""
        w = getattr(self, "_disk_wait", None)
        if w is not None:
            self._disk_wait = None
            if not w.done():
                try:
                    await asyncio.wrap_future(w, loop=self._loop)
                except Exception:
                    pass  # (its error goes to the image's waiter)

    # --- the run --------------------------------------------------------------

    def _stop_lease(self, r, why: str) -> None:
        """Power the guest off; its run ends and the result settles the lease."""
        if r.ending:
            return
        r.ending = why
        job = r.job
        log.info("lease %s/%s: powering off: %s", r.task, r.attempt, why,
                 extra={"ORDER": self._order.name})
        if job is None:  # not started yet (its image is on its way): it never starts
            self._abort(r, why)
            return
        try:
            job.powerdown(self.POWERDOWN_GRACE)
        except Exception as e:  # (QMP gone: the guest is ending anyway)
            log.warning("power-down of lease %s failed (%s); killing it", r.task, e)
            job.kill()

    async def _run_lease(self, r, image, limits, msg):
        """Boot `image`, relay its console, meter it until it is off; its NIC
        on the buyer's link when the task has one (seller/link.py)."""
        from .link import Agent, LinkError, spec_of
        loop = self._loop
        try:
            spec = spec_of(msg)
        except LinkError as e:
            raise models.RunRefused("seller error", str(e)) from None
        if spec is not None:
            limits = dataclasses.replace(limits, mac=spec.mac)
        job = await loop.run_in_executor(None, self._model.start, image, limits)
        r.job = job
        agent = Agent(spec, job.nic).start() if spec is not None else None
        try:
            return await self._run_guest(r, job, limits)
        finally:
            if agent is not None:
                agent.stop()

    async def _run_guest(self, r, job, limits):
        loop = self._loop
        if r.aborted:
            job.kill()
        elif r.ending:
            job.powerdown(self.POWERDOWN_GRACE)
        elif self._paused:
            job.pause()
        digest = hashlib.sha256()

        def meter(state: str | None = None) -> None:
            try:
                cpu = job.cpu_seconds()
            except OSError:
                return  # (it has just ended: the result says the rest)
            state = state or ("paused" if job.paused else "running")
            self._send("meter", attempt=r.attempt, cpu_ms=-(-round(cpu * 1e6) // 1000),
                       state=state)

        def pump_out() -> None:
            while True:
                try:
                    chunk = job.read()
                except (OSError, ValueError):
                    chunk = b""
                if not chunk:
                    return
                self._forward(r, chunk, digest)

        async def pump_in() -> None:
            while True:
                chunk = await r.stream_in.get()
                if chunk is None:
                    return  # (the console stays: a guest needs no EOF)
                r.took_input(len(chunk))
                try:
                    await loop.run_in_executor(None, job.write, chunk)
                except (OSError, ValueError):
                    return

        async def clock() -> None:
            used = 0.0  # seconds not paused
            last = time.monotonic()
            while True:
                await asyncio.sleep(min(1.0, self.METER_INTERVAL))
                now = time.monotonic()
                if not job.paused:
                    used += now - last
                last = now
                if limits.wall_seconds and used > limits.wall_seconds and not r.ending:
                    self._stop_lease(r, f"wall-clock limit of {limits.wall_seconds:g} s")
                if (r.detached_at is not None and not r.ending
                        and now - r.detached_at > self.LEASE_GRACE):
                    self._stop_lease(r, f"the market did not come back within "
                                        f"{self.LEASE_GRACE:g} s")
                if now - r.metered >= self.METER_INTERVAL:
                    r.metered = now
                    meter()

        meter("booting")
        r.metered = time.monotonic()
        result = await self._relay(r, job, pump_out, pump_in(), clock())
        why = r.ending or ("the guest powered off" if result.reason == "exit"
                           else f"the guest was {result.reason}")
        log.info("lease %s/%s: the guest is off (%s, %.1f s of CPU)", r.task, r.attempt, why,
                 result.cpu_seconds, extra={"ORDER": self._order.name})
        return dataclasses.replace(result, reason=why), digest

    def _hello_fields(self) -> dict:
        """What a kvm seller says in `hello`: its accelerator and its cache."""
        if not self._model.chunked:
            return {}
        return {"accel": self._model.accel(), "cache": self._cache.max_bytes,
                "links": _links_built(), **self._lease_hello()}

