"""The buyer SDK against a scripted market over real TLS on loopback: acks,
results that come twice, and which ends of a connection are retried.

The market here is a script per connection (`ScriptedMarket`), so that a
test can say exactly what the market sends and check what the buyer sends
back; reconnection waits go through a clock of the test's own, so backoff
costs no real time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import socket
import ssl
import struct

import pytest

from cpushare import protocol
from cpushare.buyer import Backoff, Market, MarketError, certificate_problem
from cpushare.market import ca
from cpushare.order import BuyOrder

from test_e2e_support import job

TIMEOUT = 10


class FakeClock:
    """Time that passes only when the buyer sleeps; the sleeps it asked for."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Top(random.Random):
    """A random source whose uniform(a, b) is always b: the backoff's caps."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Conn:
    """The market's end of one connection, after the TLS handshake."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.hello: protocol.Message | None = None

    async def send(self, type_: str, payload: bytes = b"", **fields) -> None:
        await protocol.send(self.writer, type_, payload, **fields)

    async def recv(self, timeout: float = TIMEOUT) -> protocol.Message | None:
        return await asyncio.wait_for(protocol.read_message(self.reader), timeout)

    async def expect(self, type_: str) -> protocol.Message:
        m = await self.recv()
        assert m is not None and m.type == type_, f"expected {type_}, got {m}"
        return m

    async def quiet(self, seconds: float = 0.3) -> list[protocol.Message]:
        """What the buyer sends within `seconds` (pongs aside)."""
        got = []
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            try:
                m = await asyncio.wait_for(protocol.read_message(self.reader), left)
            except asyncio.TimeoutError:
                break
            if m is None:
                break
            got.append(m)
        return got

    async def welcome(self, *, acks: bool | None = True) -> None:
        self.hello = await self.expect("hello")
        await self.send("welcome", version=protocol.VERSION, account="buyer", order=1,
                        max_payload=protocol.DEFAULT_MAX_PAYLOAD, heartbeat=15,
                        **({} if acks is None else {"acks": acks}))

    async def take_image(self) -> None:
        m = await self.expect("image")
        await self.send("image_ok", image=m["image"])

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


class ScriptedMarket:
    """A TLS listener of a CA of its own; `script(conn, n)` plays connection n
    (from 0).  `tls(n)` False: connection n is reset before the handshake."""

    def __init__(self, script, *, tls=lambda n: True) -> None:
        self.ca = ca.make_ca()
        server = ca.issue(self.ca.cert_pem, self.ca.key_pem, "market", server_names=["127.0.0.1"])
        self.ctx = protocol.server_context(self.ca.cert_pem, server.cert_pem, server.key_pem)
        self.script, self.tls = script, tls
        self.connections = 0
        self.errors: list[BaseException] = []
        self._server: asyncio.AbstractServer | None = None

    def order(self, cert: ca.Issued | None = None) -> BuyOrder:
        cert = cert or ca.issue(self.ca.cert_pem, self.ca.key_pem, "buyer")
        return BuyOrder(name="buyer", path="/test/buyer.buy", host="127.0.0.1", port=self.port,
                        price_milli=1000, redundancy=1, max_cpu_seconds=10,
                        ca_pem=self.ca.cert_pem, cert_pem=cert.cert_pem, key_pem=cert.key_pem)

    async def __aenter__(self) -> "ScriptedMarket":
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        if self.errors:
            raise self.errors[0]

    async def _conn(self, reader, writer) -> None:
        n = self.connections
        self.connections += 1
        conn = Conn(reader, writer)
        try:
            if not self.tls(n):
                conn.reset()
                return
            await writer.start_tls(self.ctx)
            await self.script(conn, n)
        except (ConnectionError, ssl.SSLError):
            pass
        except BaseException as e:  # an assertion of the script: the test reports it
            self.errors.append(e)
            try:  # and the buyer stops at once instead of reconnecting
                await conn.send("error", code="auth", message=f"the script failed: {e!r}")
            except Exception:
                pass
        finally:
            writer.close()


def arun(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def results(m: Market, inputs, **kw) -> list:
    return [r async for r in m.map(job("echo"), inputs, **kw)]


def done(ref: str, task: int) -> dict:
    """The fields of a `done` (its payload is the output)."""
    return dict(ref=ref, task=task, exit_status=0, signal=None, reason="", cpu_ms=1,
                cost_milli=1, attempts=1)


# --- acks ---------------------------------------------------------------------

def test_a_result_is_acked_once_taken_and_a_copy_after_a_reconnection_is_not_yielded():
    """The market keeps results until acked and sends them again after a
    reconnection: the buyer acks a result only once the caller has taken
    it, acks a copy of one it handed over already, and yields each once."""
    taken = asyncio.Event()
    seen: dict[int, list] = {0: [], 1: []}

    async def script(c: Conn, n: int) -> None:
        await c.welcome()
        assert c.hello["acks"] is True
        await c.take_image()
        if n == 0:
            subs = [await c.expect("submit") for _ in range(3)]
            refs = [s["ref"] for s in subs]
            script.refs = refs
            await c.send("done", b"in0", **done(refs[0], 100))
            # the caller holds the result: no ack yet
            seen[0] += await c.quiet(0.3)
            assert not [m for m in seen[0] if m.type == "ack"], seen[0]
            taken.set()
            assert (await c.expect("ack"))["task"] == 100
            # the result of task 101, then the market is gone before its ack
            await c.send("done", b"in1", **done(refs[1], 101))
            c.close()
            return
        refs = script.refs
        # after the reconnection: what was not acked comes again (101), twice
        # even, and the last result, also twice
        await c.send("done", b"in1", **done(refs[1], 101))
        await c.send("done", b"in1", **done(refs[1], 101))
        while (m := await c.recv()).type != "submit":
            seen[1].append(m)  # (acks of the copies)
        assert m["ref"] == refs[2]  # only the task without a result is sent again
        await c.send("done", b"in2", **done(refs[2], 102))
        await c.send("done", b"in2", **done(refs[2], 102))
        seen[1] += await c.quiet(0.5)

    async def main():
        async with ScriptedMarket(script) as sm:
            clock = FakeClock()
            async with Market(sm.order(), clock=clock) as m:
                got = []
                async for r in m.map(job("echo"), [b"in0", b"in1", b"in2"]):
                    got.append(r)
                    if len(got) == 1:
                        await taken.wait()
                await asyncio.sleep(0.6)  # the market reads the last acks
            return got, sm.connections
    got, connections = arun(main())
    assert sorted((r.index, r.task, r.output) for r in got) == [
        (0, 100, b"in0"), (1, 101, b"in1"), (2, 102, b"in2")]
    assert connections == 2
    acks = sorted(m["task"] for m in seen[1] if m.type == "ack")
    # 101: its ack on the first connection was lost, and its two copies are
    # acked; 102: taken once, acked when the caller came back, its copy acked
    assert acks.count(101) >= 1 and acks.count(102) >= 1 and set(acks) == {101, 102}, acks


def test_with_ack_false_the_caller_acks_and_a_copy_of_what_it_holds_is_dropped():
    """The caller keeps the first result without acking it while the
    connection is lost and made again: the market's copy of it is neither
    yielded again nor acked; the ack goes when the caller says so."""
    may_ack = asyncio.Event()
    seen: dict[int, list] = {0: [], 1: []}

    async def script(c: Conn, n: int) -> None:
        await c.welcome()
        await c.take_image()
        if n == 0:
            script.refs = [(await c.expect("submit"))["ref"] for _ in range(2)]
            await c.send("done", b"x", **done(script.refs[0], 7))
            seen[0] += await c.quiet(0.3)
            c.close()
            return
        x, y = script.refs
        assert (await c.expect("submit"))["ref"] == y
        await c.send("done", b"x", **done(x, 7))  # a copy of what the caller holds
        seen[1] += await c.quiet(0.3)
        seen[1].append("caller acks")
        may_ack.set()
        seen[1].append(await c.expect("ack"))
        await c.send("done", b"y", **done(y, 8))
        seen[1] += await c.quiet(0.3)

    async def main():
        async with ScriptedMarket(script) as sm:
            async with Market(sm.order(), clock=FakeClock()) as m:
                got, later = [], None

                async def ack_later(r):
                    await may_ack.wait()
                    m.ack(r)
                async for r in m.map(job("echo"), [b"x", b"y"], ack=False):
                    got.append(r)
                    if r.task == 7:  # kept, to be acked later
                        later = asyncio.create_task(ack_later(r))
                    else:
                        m.ack(r)
                await later
                await asyncio.sleep(0.4)
            return got
    got = arun(main())
    assert [(r.task, r.output) for r in got] == [(7, b"x"), (8, b"y")]
    assert [m for m in seen[0] if m.type == "ack"] == []
    after = [x if isinstance(x, str) else (x.type, x["task"]) for x in seen[1]]
    assert after == ["caller acks", ("ack", 7), ("ack", 8)], after


def test_a_market_without_acks_gets_none_and_a_result_twice_is_yielded_once():
    got_frames: list = []

    async def script(c: Conn, n: int) -> None:
        await c.welcome(acks=None)
        await c.take_image()
        refs = [(await c.expect("submit"))["ref"] for _ in range(2)]
        for i, ref in enumerate(refs):  # (after a crash of the market a result may come twice)
            await c.send("done", b"%d" % i, **done(ref, 10 + i))
            await c.send("done", b"%d" % i, **done(ref, 10 + i))
        got_frames.extend(await c.quiet(0.5))

    async def main():
        async with ScriptedMarket(script) as sm:
            async with Market(sm.order()) as m:
                out = await results(m, [b"0", b"1"])
                await asyncio.sleep(0.6)
            return out
    out = arun(main())
    assert sorted(r.output for r in out) == [b"0", b"1"]
    assert [m.type for m in got_frames] == [], got_frames


def test_a_failed_result_is_acked_and_a_refused_submit_is_not():
    seen: list = []

    async def script(c: Conn, n: int) -> None:
        await c.welcome()
        await c.take_image()
        a, b = [(await c.expect("submit"))["ref"] for _ in range(2)]
        await c.send("failed", ref=a, task=5, code="dispute", message="no agreement")
        await c.send("failed", ref=b, task=None, code="funds", message="too poor")
        seen.extend(await c.quiet(0.5))

    async def main():
        async with ScriptedMarket(script) as sm:
            async with Market(sm.order()) as m:
                out = await results(m, [b"a", b"b"])
                await asyncio.sleep(0.6)
            return out
    out = arun(main())
    assert sorted(r.code for r in out) == ["dispute", "funds"]
    assert [(m.type, m["task"]) for m in seen] == [("ack", 5)]


# --- connecting: what is retried, what stops -----------------------------------

def test_backoff_is_exponential_with_full_jitter():
    top = Backoff(base=0.1, cap=10.0, rng=Top())
    assert [round(top.delay(n), 6) for n in range(10)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
    assert top.delay(10_000) == 10.0  # no overflow
    b = Backoff(rng=random.Random(1))
    waits = [b.delay(n) for n in range(2000)]
    assert all(0 <= w <= min(10.0, 0.1 * 2 ** min(n, 10)) for n, w in enumerate(waits))
    assert min(waits[20:]) < 1.0 < max(waits[20:])  # uniform in [0, cap], not near the cap


def test_connections_closed_or_reset_before_welcome_are_retried_on_the_backoff_schedule():
    """Reset before TLS, closed right after the handshake, reset after hello,
    an `error` that is not a refusal: each is a lost connection, tried again
    after the backoff's wait, until the market welcomes the buyer."""
    async def script(c: Conn, n: int) -> None:
        if n == 1:
            c.close()  # right after the TLS handshake
        elif n == 2:
            await c.expect("hello")
            c.reset()
        elif n == 3:
            await c.expect("hello")
            await c.send("error", code="internal", message="the market is busy", ref=None)
        else:
            await c.welcome()
            await c.quiet(0.2)

    async def main():
        async with ScriptedMarket(script, tls=lambda n: n != 0) as sm:
            clock = FakeClock()
            m = Market(sm.order(), clock=clock, backoff=Backoff(rng=Top()))
            await m.connect()
            connected = m.connected
            await m.close()
            return sm.connections, clock.sleeps, connected
    connections, sleeps, connected = arun(main())
    assert connected and connections == 5
    assert [round(s, 6) for s in sleeps] == [0.1, 0.2, 0.4, 0.8]


def test_retrying_stops_after_reconnect_for_and_says_why():
    async def script(c: Conn, n: int) -> None:
        c.close()

    async def main():
        async with ScriptedMarket(script) as sm:
            clock = FakeClock()
            m = Market(sm.order(), clock=clock)
            m.RECONNECT_FOR = 30.0
            t0 = clock.time()
            with pytest.raises(MarketError) as e:
                await m.connect()
            return e.value, clock.time() - t0, len(clock.sleeps), sm.connections
    e, waited, sleeps, connections = arun(main())
    assert e.code == "connect", e
    assert "closed the connection before its welcome" in e.message and "gave up" in e.message
    assert waited == pytest.approx(30.0)
    assert connections == sleeps + 1 > 5


@pytest.mark.parametrize("code", ["auth", "version"])
def test_an_auth_or_version_error_stops_at_once(code):
    async def script(c: Conn, n: int) -> None:
        await c.expect("hello")
        await c.send("error", code=code, message=f"no ({code})", ref=None)

    async def main():
        async with ScriptedMarket(script) as sm:
            clock = FakeClock()
            with pytest.raises(MarketError) as e:
                await Market(sm.order(), clock=clock).connect()
            return e.value, clock.sleeps, sm.connections
    e, sleeps, connections = arun(main())
    assert e.code == code and f"the market refused us: no ({code})" in e.message
    assert sleeps == [] and connections == 1


def test_a_certificate_the_market_drops_without_a_word_is_a_refusal():
    """The market drops an expired certificate, or one of another CA, in the
    TLS handshake without a word, which looks like a restart: when it does,
    the buyer checks its own certificate, and stops."""
    async def script(c: Conn, n: int) -> None:
        raise AssertionError("the handshake passed")

    async def main(which):
        async with ScriptedMarket(script) as sm:
            if which == "expired":
                cert = ca.issue(sm.ca.cert_pem, sm.ca.key_pem, "old", days=1, not_before=(
                    dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)))
            else:
                other = ca.make_ca()
                cert = ca.issue(other.cert_pem, other.key_pem, "stranger")
            clock = FakeClock()
            with pytest.raises(MarketError) as e:
                await Market(sm.order(cert), clock=clock).connect()
            return e.value, sm.connections, clock.sleeps
    for which, why in [("expired", "certificate has expired"),
                       ("foreign", "unable to get local issuer certificate")]:
        e, connections, sleeps = arun(main(which))
        assert e.code == "auth" and e.message.startswith("127.0.0.1:") and why in e.message
        assert "the market refused us: the certificate in /test/buyer.buy" in e.message
        assert connections == 1 and sleeps == []


def test_certificate_problem_passes_a_good_certificate():
    authority = ca.make_ca()
    good = ca.issue(authority.cert_pem, authority.key_pem, "buyer")
    assert certificate_problem(authority.cert_pem, good.cert_pem, good.key_pem) is None


def test_a_first_connection_to_a_port_nobody_listens_on_fails_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused

        async def main():
            async with ScriptedMarket(lambda c, n: None) as sm:
                clock = FakeClock()
                order = dataclasses.replace(sm.order(), port=port)
                with pytest.raises(MarketError) as e:
                    await Market(order, clock=clock).connect()
                return e.value, clock.sleeps
        e, sleeps = arun(main())
    assert e.code == "connect" and "cannot connect" in e.message and sleeps == []


def test_a_reconnection_rides_through_a_market_that_is_down_for_a_while():
    """After the market welcomed the buyer once, even refused TCP
    connections are retried (the market is restarting), each after a wait."""
    async def script(c: Conn, n: int) -> None:
        await c.welcome()
        await c.take_image()
        ref = (await c.expect("submit"))["ref"]
        if n == 0:  # the market goes away: nothing listens for a while
            sm._server.close()
            c.reset()
            return
        await c.send("done", b"z", **done(ref, 1))
        await c.quiet(0.2)

    clock = FakeClock()
    fake_sleep = clock.sleep

    async def sleep(seconds):  # the market is back after the third wait
        await fake_sleep(seconds)
        if len(clock.sleeps) == 3:
            sm._server = await asyncio.start_server(sm._conn, "127.0.0.1", sm.port)
    clock.sleep = sleep

    async def main():
        nonlocal sm
        async with ScriptedMarket(script) as sm:
            async with Market(sm.order(), clock=clock) as m:
                out = await results(m, [b"z"])
            return out, sm.connections
    sm = None
    out, connections = arun(main())
    assert [r.output for r in out] == [b"z"] and connections == 2 and len(clock.sleeps) == 3
