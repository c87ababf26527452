"""The seller core: sell one CPU to the market under one sell order.

`Seller.run()` connects to the market over TLS, authenticates with the
order's client certificate, says `ready`, takes one `task` at a time, runs
it through its computation model (`cpushare.models`: for seccomp, a
sandbox job the event loop watches), and sends back the `result`.  A lost connection is
retried with exponential backoff and jitter.

    core.py      this: the lifecycle (run, stop, pause, reload), the connection,
                 what the market sends
    tasks.py     one task: its image, its run (whole or a session), its result
    lease.py     a lease of the kvm model: the ISO in chunks, the guest, metering
    running.py   the plain state: Status, the task in progress, output sinks  The object has no D-Bus and
no systemd in it: `cpushare.daemon` adapts it, `python -m cpushare.seller`
runs it in the foreground.

Threading: `run()` owns an asyncio loop.  `stop`, `pause`, `resume` and
`reload` may be called from that loop (signal handlers) or from any other
thread (a D-Bus main loop); they hand their work to the loop.  `status()`
returns an immutable snapshot and is safe from anywhere.  `on_change` is
called in the loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
import time
from pathlib import Path
from typing import Callable

from .. import __version__, models, protocol
from ..order import SellOrder
from ..protocol import Message, ProtocolError
from .cache import ImageCache
from .isocache import IsoCache
from .lease import LeaseRuns
from .running import (SESSION_INPUT_BUDGET, STATES, AuthError, Status, _Aborted, _Lost,
                      _Running)
from .tasks import TaskRuns

__all__ = ["Seller", "Status", "STATES", "AuthError", "SESSION_INPUT_BUDGET"]

log = logging.getLogger("cpushare.seller")


class Seller(TaskRuns, LeaseRuns):
    BACKOFF_BASE = 0.25  # seconds before the first reconnection attempt
    BACKOFF_CAP = 30.0  # the longest wait between attempts
    CONNECT_TIMEOUT = 20.0
    PAUSE_HANDBACK_SECONDS = 600.0  # a task paused this long is handed back
    IMAGE_TIMEOUT = 300.0  # waiting for an `image` after `need_image`

    def __init__(self, order: SellOrder, *, cache_dir: Path,
                 on_change: Callable[[Status], None] | None = None):
        self._order = order
        self._model = models.get(order.model, order.accel)  # ModelError: not one it runs
        if self._model.chunked:
            self._cache = IsoCache(Path(cache_dir), order.cache, model=self._model)
        else:
            self._cache = ImageCache(Path(cache_dir), model=self._model)
        self._on_change = on_change
        self._status = Status(
            state="starting", order=order.name, model=order.model, server=order.server,
            current_task=None, buyer_order=None, tasks_done=0, cpu_seconds_sold=0.0,
            coins_earned_milli=0, connected_since=None, last_error="")
        self._status_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._hand_back = True
        self._paused = False
        self._paused_at = 0.0
        self._stop_event: asyncio.Event | None = None
        self._session_task: asyncio.Task | None = None
        self._running: _Running | None = None
        self._task_coro: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._asked = 0  # tasks asked for (`ready`) and not received yet
        self._prefetch = 0  # tasks the market lets us hold behind the running one
        # the size of the `output` frames a big output goes ahead in (0: the market
        # takes the whole output in `result`)
        self._output_chunks = 0
        self._queued: Message | None = None  # the task held, prefetched
        self._image_waiters: dict[str, asyncio.Future] = {}
        self._image_progress: dict[str, float] = {}  # chunked images: last chunk's time
        self._unsent_result: tuple | None = None  # a lease's, ended while the market was away
        self._last_rx = 0.0
        self._last_keepalive = 0.0  # (see _keep_alive)
        self._welcomed = False
        self._out: protocol.FrameWriter | None = None  # frames out, while _writer is set

    # --- public API --------------------------------------------------------

    def status(self) -> Status:
        with self._status_lock:
            return self._status

    async def run(self) -> None:
        """Sell until stop(); reconnect with backoff after every failure."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._stopping:  # stop() came before run()
            self._set(state="stopped")
            return
        failures = 0
        try:
            try:
                self._model.check_host()  # (kvm: measures the accelerator once)
            except models.HostError as e:
                log.error("cannot sell: %s", e, extra={"ORDER": self._order.name})
                self._set(state="error", last_error=str(e))
                return
            while not self._stopping:
                self._set(state="paused" if self._paused else "connecting")
                self._session_task = asyncio.create_task(self._session())
                self._welcomed = False
                refused = False
                try:
                    await self._session_task
                    error = ""
                except asyncio.CancelledError:
                    if not self._stopping:
                        raise
                    break
                except AuthError as e:
                    error, refused = str(e), True
                except (_Lost, ProtocolError) as e:
                    error = f"{self._order.server}: {e}"
                except (OSError, EOFError, asyncio.TimeoutError, ssl.SSLError) as e:
                    error = f"{self._order.server}: {type(e).__name__}: {e}"
                except Exception as e:  # a bug must not end selling: log it, reconnect
                    log.exception("internal error on the connection to %s", self._order.server,
                                  extra={"ORDER": self._order.name})
                    error = f"{self._order.server}: internal error: {type(e).__name__}: {e}"
                finally:
                    self._session_task = None
                    self._set(connected_since=None, current_task=None, buyer_order=None)
                if self._stopping:
                    break
                failures = 0 if self._welcomed else failures + 1
                delay = min(self.BACKOFF_CAP, self.BACKOFF_BASE * (2 ** min(failures, 16)))
                delay *= random.uniform(0.5, 1.0)  # jitter: sellers do not return in step
                if error:
                    log.warning("%s; retrying in %.1f s", error, delay,
                                extra={"ORDER": self._order.name})
                    self._set(last_error=error,
                              state="paused" if self._paused else
                              "error" if refused or failures >= 3 else "connecting")
                try:
                    await asyncio.wait_for(self._stop_event.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._set(state="stopped", connected_since=None, current_task=None)
            log.info("seller stopped", extra={"ORDER": self._order.name})

    def stop(self, hand_back: bool = True) -> None:
        """Stop taking work; hand back (default) or finish the running task."""
        self._call(self._stop, hand_back)

    def pause(self) -> None:
        """SIGSTOP the running job, keeping its work; take no new task."""
        self._call(self._pause)

    def resume(self) -> None:
        self._call(self._resume)

    def reload(self, order: SellOrder) -> None:
        """Use `order` from the next task (limits) and connection (server, credentials)."""
        self._call(self._reload, order)

    # --- thread plumbing ---------------------------------------------------

    def _call(self, fn, *args) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            fn(*args)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _set(self, **changes) -> None:
        with self._status_lock:
            old = self._status
            if all(getattr(old, k) == v for k, v in changes.items()):
                return
            # (dataclasses.replace() costs several times this, and it runs
            # a few times per task)
            new = self._status = Status(**{**old.__dict__, **changes})
        if self._on_change is not None:
            try:
                self._on_change(new)
            except Exception:  # a broken observer must not break selling
                log.exception("on_change callback failed")

    # --- control (in the loop's thread) ------------------------------------

    def _stop(self, hand_back: bool) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._hand_back = hand_back
        self._set(state="stopping")
        log.info("stopping (%s the running task)", "hand back" if hand_back else "finish",
                 extra={"ORDER": self._order.name})
        if self._stop_event is not None:
            self._stop_event.set()
        self._give_back_queued("the seller is stopping")
        r = self._running
        if r is None:
            if self._session_task is not None:
                self._session_task.cancel()
            return
        if self._model.leases and r.session is not None:
            if self._paused:
                self._paused = False
            self._stop_lease(r, "the seller is stopping")  # the lease ends, settled
        elif hand_back:
            self._abort(r, "the seller is stopping")
        elif self._paused:
            self._paused = False
            self._signal_job(r, "resume")
        # the task's coroutine sends its result or handback and then ends the session

    def _pause(self) -> None:
        if self._paused:
            return
        self._paused = True
        self._paused_at = time.monotonic()
        self._give_back_queued("the seller is paused")
        r = self._running
        if r is not None:
            self._signal_job(r, "pause")
        if not self._stopping:
            self._set(state="paused")
        log.info("paused", extra={"ORDER": self._order.name,
                                  "TASK": self._status.current_task or ""})
        if self._loop is not None and r is not None:
            self._loop.call_later(self.PAUSE_HANDBACK_SECONDS, self._pause_timeout, r)

    def _pause_timeout(self, r: _Running) -> None:
        if self._paused and self._running is r and \
                time.monotonic() - self._paused_at >= self.PAUSE_HANDBACK_SECONDS - 1:
            why = f"paused for more than {self.PAUSE_HANDBACK_SECONDS:.0f} s"
            if self._model.leases and r.session is not None:
                self._stop_lease(r, why)  # (a guest cannot move: its lease ends, settled)
            else:
                self._abort(r, why)

    def _resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        r = self._running
        if r is not None:
            self._signal_job(r, "resume")
        if not self._stopping:
            self._set(state="running" if r is not None else
                      ("idle" if self._writer is not None else "connecting"))
        log.info("resumed", extra={"ORDER": self._order.name})
        self._send_ready()

    def _reload(self, order: SellOrder) -> None:
        self._order = order
        self._set(order=order.name, model=order.model, server=order.server)
        log.info("order reloaded from %s", order.path, extra={"ORDER": order.name})

    def _signal_job(self, r: _Running, what: str) -> None:
        job = r.job
        if job is None:
            return
        try:
            getattr(job, what)()
        except ProcessLookupError:
            pass
        except OSError as e:
            log.warning("%s of job %s failed: %s", what, r.task, e)

    def _abort(self, r: _Running, why: str) -> None:
        """Kill the running job ourselves; its coroutine sends `handback`."""
        if r.aborted:
            return
        r.aborted = why
        if r.stream_in is not None:
            r.stream_in.put_nowait(None)
        for fut in self._image_waiters.values():  # still waiting for its image
            if not fut.done():
                fut.set_exception(_Aborted(why))
        job = r.job
        if job is not None:
            try:
                job.kill()
            except (ProcessLookupError, OSError):
                pass

    # --- one connection ----------------------------------------------------

    async def _session(self) -> None:
        """Run one connection until it fails (it always ends by raising)."""
        order = self._order
        try:
            ctx = protocol.client_context(order.ca_pem, order.cert_pem, order.key_pem)
        except ValueError as e:
            raise AuthError(f"{order.path}: {e}") from None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(order.host, order.port, ssl=ctx,
                                        server_hostname=order.host, limit=1 << 20),
                self.CONNECT_TIMEOUT)
        except ssl.SSLCertVerificationError as e:
            raise AuthError(f"{order.server}: the market's certificate does not verify "
                            f"against the CA in {order.path}: {e.verify_message}") from None
        try:
            self._check_stop()  # the writer is closed by the finally below
            await protocol.send(writer, "hello", version=protocol.VERSION, role="seller",
                                instance=order.name,
                                software=f"cpushare/{__version__}", **self._hello_fields())
            try:
                msg = await asyncio.wait_for(protocol.read_message(reader), self.CONNECT_TIMEOUT)
            except (ssl.SSLError, ConnectionResetError) as e:
                # TLS 1.3: a refused client certificate shows up at the first read
                raise AuthError(f"{order.server}: the market refused us during the TLS "
                                f"handshake ({e}); is the certificate in {order.path} "
                                f"issued by this market and still valid?") from None
            self._check_stop()
            if msg is None:  # TLS 1.3: a refused client certificate ends the stream here
                raise AuthError(f"{order.server}: the market refused us: it closed the "
                                f"connection during the handshake; is the certificate in "
                                f"{order.path} issued by this market and still valid?")
            if msg.type == "error":
                if msg.get("code") in ("auth", "version", "order"):
                    raise AuthError(f"{order.server}: the market refused us: "
                                    f"{msg['code']}: {msg['message']}")
                raise _Lost(f"handshake: {msg['code']}: {msg['message']}")
            if msg.type != "welcome":
                raise ProtocolError("frame", f"expected welcome, got {msg.type}")
            self._welcomed = True
            max_payload = msg["max_payload"]
            heartbeat = max(1, msg["heartbeat"])
            self._out = protocol.FrameWriter(writer)
            self._writer = writer
            self._asked = 0
            self._queued = None
            self._prefetch = min(1, max(0, msg.get("prefetch") or 0))
            self._output_chunks = max(0, msg.get("output_chunks") or 0)
            self._last_rx = time.monotonic()
            self._set(state="paused" if self._paused else "idle", connected_since=time.time(),
                      last_error="")
            log.info("connected to %s as account %s (order %s)", order.server, msg["account"],
                     msg.get("order"), extra={"ORDER": order.name})
            watchdog = asyncio.create_task(self._watchdog(writer, heartbeat))
            try:
                self._lease_reattached()
                self._send_ready()
                while True:
                    msg = await protocol.read_message(reader, max_payload)
                    if msg is None:
                        raise _Lost("the market closed the connection")
                    self._last_rx = time.monotonic()
                    self._dispatch(msg)
                    if msg.type == "image":
                        await self._image_backpressure()
                    r = self._running
                    if r is not None and r.stream_bytes > SESSION_INPUT_BUDGET:
                        # the job does not read its input: neither do we, so the
                        # market (and the buyer behind it) waits
                        await r.input_room(lambda: self._running,
                                           lambda: self._keep_alive(heartbeat))
                        self._last_rx = time.monotonic()
            finally:
                watchdog.cancel()
        except ProtocolError as e:
            log.warning("protocol error from %s: %s", order.server, e,
                        extra={"ORDER": order.name})
            try:
                await protocol.send(writer, "error", code=e.code, message=e.message)
            except Exception:
                pass
            raise
        finally:
            self._writer = None
            self._queued = None  # the market requeues it
            r = self._running
            if r is not None and self._lease_detaches(r):
                pass  # the guest runs on; the next connection says so (lease.py)
            else:
                if r is not None:
                    self._abort(r, "the connection to the market was lost")
                if self._task_coro is not None:
                    self._task_coro.cancel()
                    self._task_coro = None
            for fut in self._image_waiters.values():
                if not fut.done():
                    fut.cancel()
            self._image_waiters.clear()
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except Exception:
                pass

    def _check_stop(self) -> None:
        """End the session if stop() came during an await that may have
        swallowed its cancellation: on Python 3.11, asyncio.wait_for() loses
        a cancel that arrives as the awaited thing completes."""
        if self._stopping:
            raise asyncio.CancelledError()

    def _keep_alive(self, heartbeat: int) -> None:
        """While the seller chooses not to read (a session's job does not take
        its input): the market is not silent, and it must not find us silent
        either: a ping every heartbeat (its pong waits unread)."""
        now = time.monotonic()
        self._last_rx = now
        if now - self._last_keepalive >= heartbeat:
            self._last_keepalive = now
            self._send("ping", t=int(time.time()))

    async def _watchdog(self, writer: asyncio.StreamWriter, heartbeat: int) -> None:
        """Drop a connection on which the market has been silent too long."""
        while True:
            await asyncio.sleep(heartbeat)
            if time.monotonic() - self._last_rx > 3 * heartbeat + 5:
                log.warning("the market has been silent for %d s; reconnecting",
                            3 * heartbeat + 5, extra={"ORDER": self._order.name})
                writer.transport.abort()
                return

    def _send(self, type_: str, payload: bytes = b"", **fields) -> None:
        """Queue a frame (see protocol.FrameWriter); dropped when not connected."""
        if self._writer is not None:
            self._out.send(type_, payload, **fields)

    def _queue(self, frame: bytes) -> None:
        if self._writer is not None:
            self._out.queue(frame)

    async def _send_async(self, type_: str, payload: bytes = b"", **fields) -> None:
        """Like _send, but a big payload goes out in pieces paced by drain()."""
        if self._writer is None:
            return
        try:
            await self._out.send_big(type_, payload, **fields)
        except (ConnectionError, OSError):
            pass

    async def _drain(self) -> None:
        if self._writer is None:
            return
        try:
            await self._out.drain()
        except (ConnectionError, OSError):
            pass

    def _dispatch(self, msg: Message) -> None:
        t = msg.type
        if t == "ping":
            self._send("pong", **({"t": msg["t"]} if "t" in msg.fields else {}))
        elif t == "pong":
            pass
        elif t == "task":
            self._take(msg)
        elif t == "stop":
            # the attempt's task closed (the others agreed, it failed, the buyer
            # cancelled it): nobody pays for it any more
            r = self._running
            if (not self._give_back_held(msg["attempt"], "its task is closed")
                    and r is not None and r.attempt == msg["attempt"]):
                if self._model.leases and r.session is not None:
                    self._stop_lease(r, "the market ended the lease")
                else:
                    self._abort(r, "its task is closed")
        elif t == "revoke":
            # the market has an idle CPU for the task we hold; one that has
            # started meanwhile (or is unknown) runs on, its result answers
            self._give_back_held(msg["attempt"], "taken back by the market for an idle CPU")
        elif t == "image" and msg.get("offset") is not None:
            self._on_image_chunk(msg)
        elif t == "image":
            fut = self._image_waiters.pop(msg["image"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg.payload)
            else:
                log.warning("unrequested image %s ignored", msg["image"][:16],
                            extra={"ORDER": self._order.name})
        elif t == "stream":
            r = self._running
            if r is None or r.session is None or r.session != msg["session"]:
                log.warning("stream for unknown session %s ignored", msg["session"],
                            extra={"ORDER": self._order.name})
                return
            if r.stream_in is not None:
                if msg.payload:
                    r.stream_in.put_nowait(msg.payload)
                    r.stream_bytes += len(msg.payload)
                if msg.get("eof"):
                    r.stream_in.put_nowait(None)
        elif t == "settled":
            paid = msg["paid_milli"]
            st = self._status
            self._set(coins_earned_milli=st.coins_earned_milli + max(0, paid))
            log.debug("attempt %s settled: paid %d milli, accepted %s", msg["attempt"], paid,
                      msg["accepted"], extra={"ORDER": self._order.name})
        elif t == "error":
            log.warning("market error: %s: %s", msg["code"], msg["message"],
                        extra={"ORDER": self._order.name})
        else:
            raise ProtocolError("frame", f"a seller does not expect {t!r} messages")

    # --- one task ------------------------------------------------------------
