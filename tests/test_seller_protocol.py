"""The seller core against a scripted market peer over real TLS.

What a well-behaved market server never sends (an image that is not what
its digest says, a malformed frame) can only be tested with a peer that
sends it; this one is a few lines of asyncio speaking `cpushare.protocol`
with certificates of a real market CA.
"""

from __future__ import annotations

import asyncio
import struct

import pytest

from cpushare import protocol
from cpushare.market import ca
from cpushare.order import load_sell, write_sell
from cpushare.seller import Seller

from test_e2e_support import job, spin_count_for, spin_input

TIMEOUT = 20


class Peer:
    """A scripted market: accepts sellers, hands their streams to the test."""

    def __init__(self):
        self.authority = ca.make_ca()
        self.server_cert = ca.issue(self.authority.cert_pem, self.authority.key_pem, "127.0.0.1",
                                    server_names=["127.0.0.1"])
        self.client_cert = ca.issue(self.authority.cert_pem, self.authority.key_pem, "seller")
        self.conns: asyncio.Queue = asyncio.Queue()

    async def start(self) -> int:
        ctx = protocol.server_context(self.authority.cert_pem, self.server_cert.cert_pem,
                                      self.server_cert.key_pem)

        async def handle(reader, writer):
            await self.conns.put((reader, writer))
        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx, limit=8 << 20)
        return self.server.sockets[0].getsockname()[1]

    def order(self, tmp_path, port: int):
        path = tmp_path / "cpu0.cpu"
        write_sell(path, host="127.0.0.1", port=port, price_milli=10,
                   ca_pem=self.authority.cert_pem, cert_pem=self.client_cert.cert_pem,
                   key_pem=self.client_cert.key_pem, cpu_seconds=5, wall_seconds=10)
        return load_sell(path)

    async def accept(self, **welcome):
        reader, writer = await asyncio.wait_for(self.conns.get(), TIMEOUT)
        hello = await read(reader)
        assert hello.type == "hello" and hello["role"] == "seller", hello
        await protocol.send(writer, "welcome", version=1, account="alice", order=1,
                            max_payload=protocol.DEFAULT_MAX_PAYLOAD, heartbeat=15, **welcome)
        return reader, writer


async def read(reader, skip=("ready", "pong")) -> protocol.Message:
    while True:
        m = await asyncio.wait_for(protocol.read_message(reader), TIMEOUT)
        assert m is not None, "the seller closed the connection"
        if m.type not in skip:
            return m


def task_fields(n: int, digest: str) -> dict:
    return dict(task=n, attempt=n, image=digest, cpu_ms=5000, wall_ms=10000,
                memory=64 << 20, output_limit=1 << 20)


@pytest.fixture
def run(tmp_path):
    """Run the scenario coroutine `fn(peer, seller)` with a seller connected to a peer."""
    def go(fn):
        async def main():
            peer = Peer()
            port = await peer.start()
            seller = Seller(peer.order(tmp_path, port), cache_dir=tmp_path / "cache")
            seller.BACKOFF_CAP = 0.5
            runner = asyncio.create_task(seller.run())
            try:
                await fn(peer, seller)
            finally:
                seller.stop()
                await asyncio.wait_for(runner, TIMEOUT)
                peer.server.close()
        asyncio.run(main())
    return go


def test_image_not_matching_its_digest_fails_the_task_and_is_not_cached(run, tmp_path):
    echo, other = job("echo"), job("spin")

    async def scenario(peer, seller):
        reader, writer = await peer.accept()
        await protocol.send(writer, "task", b"in", **task_fields(1, echo.digest))
        m = await read(reader)
        assert m.type == "need_image" and m["image"] == echo.digest
        await protocol.send(writer, "image", other.pack(), image=echo.digest)
        m = await read(reader)
        assert m.type == "result" and m["attempt"] == 1 and m["exit_status"] is None, m
        assert m["reason"].startswith("bad image:") and other.digest in m["reason"], m
        assert not list((tmp_path / "cache").glob("*.bin"))
        # garbage under the right name
        await protocol.send(writer, "task", b"in", **task_fields(2, echo.digest))
        assert (await read(reader)).type == "need_image"
        await protocol.send(writer, "image", b"\0" * 300, image=echo.digest)
        m = await read(reader)
        assert m.type == "result" and "bad magic" in m["reason"], m
        assert not list((tmp_path / "cache").glob("*.bin"))
        # and the seller still works: the right image runs and is cached
        await protocol.send(writer, "task", b"still fine", **task_fields(3, echo.digest))
        assert (await read(reader)).type == "need_image"
        await protocol.send(writer, "image", echo.pack(), image=echo.digest)
        m = await read(reader)
        assert m.type == "result" and m["exit_status"] == 0 and m.payload == b"still fine", m
        assert m["output_sha256"] == protocol.digest(b"still fine")
        assert (tmp_path / "cache" / f"{echo.digest}.bin").read_bytes() == echo.pack()
        assert seller.status().tasks_done == 1
    run(scenario)


def test_a_task_of_another_model_is_refused_not_run(run):
    """The market matches by model; a task of another model anyway is the
    seller's refusal (a `seller error` result the market never accepts)."""
    echo = job("echo")

    async def scenario(peer, seller):
        reader, writer = await peer.accept()
        await protocol.send(writer, "task", b"in", model="kvm", **task_fields(1, echo.digest))
        m = await read(reader)
        assert m.type == "result" and m["exit_status"] is None and m["signal"] is None, m
        assert m["reason"].startswith("seller error: a task of model kvm"), m
        await protocol.send(writer, "task", b"ok", model="seccomp", **task_fields(2, echo.digest))
        assert (await read(reader)).type == "need_image"
        await protocol.send(writer, "image", echo.pack(), image=echo.digest)
        m = await read(reader)
        assert m.type == "result" and m["exit_status"] == 0 and m.payload == b"ok", m
    run(scenario)


def test_ping_is_answered_and_a_malformed_frame_means_reconnect(run):
    async def scenario(peer, seller):
        reader, writer = await peer.accept()
        await protocol.send(writer, "ping", t=42)
        m = await read(reader, skip=("ready",))
        assert m.type == "pong" and m["t"] == 42
        writer.write(struct.pack(">II", 5, 0) + b"[1,2]")  # a header that is not an object
        await writer.drain()
        m = await read(reader)
        assert m.type == "error" and m["code"] == "frame", m
        assert "not a JSON object" in m["message"]
        # the seller comes back on a new connection and says why it left
        await peer.accept()
        assert "not a JSON object" in seller.status().last_error or seller.status().state == "idle"
    run(scenario)


def test_a_message_a_seller_does_not_expect_closes_only_that_connection(run):
    async def scenario(peer, seller):
        reader, writer = await peer.accept()
        await protocol.send(writer, "done", ref="x", task=1, exit_status=0, signal=None,
                            reason="", cpu_ms=1, cost_milli=1, attempts=1)
        m = await read(reader)
        assert m.type == "error" and m["code"] == "frame" and "'done'" in m["message"], m
        reader2, writer2 = await peer.accept()
        await protocol.send(writer2, "ping", t=7)
        assert (await read(reader2, skip=("ready",)))["t"] == 7
    run(scenario)


def test_stop_while_waiting_for_an_image_hands_the_task_back_at_once(run):
    echo = job("echo")

    async def scenario(peer, seller):
        reader, writer = await peer.accept()
        await protocol.send(writer, "task", b"in", **task_fields(9, echo.digest))
        assert (await read(reader)).type == "need_image"
        seller.stop()  # the image never comes
        m = await read(reader)
        assert m.type == "handback" and m["attempt"] == 9 and "stopping" in m["reason"], m
        assert await asyncio.wait_for(protocol.read_message(reader), TIMEOUT) is None
    run(scenario)


# --- prefetch: one task held while another runs ---------------------------------

async def _running_and_held(peer, seller):
    """A seller running a long spin job (attempt 1) and holding an echo task (2)."""
    spin, echo = job("spin"), job("echo")
    reader, writer = await peer.accept(prefetch=1)
    m = await read(reader, skip=("pong",))
    assert m.type == "ready" and m["slots"] == 2, m  # idle: one to run, one to hold
    await protocol.send(writer, "task", spin_input(spin_count_for(20.0)),
                        **task_fields(1, spin.digest))
    assert (await read(reader)).type == "need_image"
    await protocol.send(writer, "image", spin.pack(), image=spin.digest)
    await protocol.send(writer, "task", b"held", **task_fields(2, echo.digest))
    for _ in range(200):
        if seller.status().state == "running" and seller._queued is not None:
            break
        await asyncio.sleep(0.01)
    assert seller._queued is not None and seller._queued["attempt"] == 2
    return reader, writer


def test_without_prefetch_in_welcome_a_seller_asks_for_one_task_when_idle(run):
    async def scenario(peer, seller):
        reader, writer = await peer.accept()
        m = await read(reader, skip=("pong",))
        assert m.type == "ready" and "slots" not in m.fields, m
    run(scenario)


def test_a_held_task_runs_when_the_running_one_ends(run):
    echo = job("echo")

    async def scenario(peer, seller):
        reader, writer = await peer.accept(prefetch=1)
        assert (await read(reader, skip=("pong",)))["slots"] == 2
        # both at once: the second is held while the first waits for its image
        writer.write(protocol.encode("task", b"one", **task_fields(1, echo.digest))
                     + protocol.encode("task", b"two", **task_fields(2, echo.digest)))
        assert (await read(reader)).type == "need_image"
        await protocol.send(writer, "image", echo.pack(), image=echo.digest)
        m = await read(reader)
        assert (m.type, m["attempt"], m.payload) == ("result", 1, b"one"), m
        m = await read(reader, skip=("pong",))
        assert m.type == "ready" and m["slots"] == 1, m  # it runs two and may hold one more
        m = await read(reader)
        assert (m.type, m["attempt"], m.payload) == ("result", 2, b"two"), m
        assert seller.status().tasks_done == 2
    run(scenario)


def test_a_held_task_is_handed_back_unstarted_on_stop(run):
    async def scenario(peer, seller):
        reader, writer = await _running_and_held(peer, seller)
        seller.stop()
        got = {}
        while len(got) < 2:
            m = await read(reader)
            assert m.type == "handback", m
            got[m["attempt"]] = m
        assert got[2]["unstarted"] is True and "stopping" in got[2]["reason"], got
        assert "unstarted" not in got[1].fields and "stopping" in got[1]["reason"], got
        assert await asyncio.wait_for(protocol.read_message(reader), TIMEOUT) is None
    run(scenario)


def test_a_held_task_is_handed_back_unstarted_on_pause(run):
    async def scenario(peer, seller):
        reader, writer = await _running_and_held(peer, seller)
        seller.pause()
        m = await read(reader)
        assert m.type == "handback" and m["attempt"] == 2 and m["unstarted"] is True, m
        assert "paused" in m["reason"]
        assert seller.status().state == "paused" and seller._queued is None
        seller.resume()
    run(scenario)


def test_a_held_task_is_kept_until_the_market_revokes_it(run):
    async def scenario(peer, seller):
        reader, writer = await _running_and_held(peer, seller)
        await asyncio.sleep(0.3)  # however long the running one takes, it holds on
        await protocol.send(writer, "ping", t=5)
        assert (await read(reader, skip=())).type == "pong"
        await protocol.send(writer, "revoke", attempt=1)  # running: not given back
        await protocol.send(writer, "revoke", attempt=77)  # unknown: ignored
        await protocol.send(writer, "ping", t=6)
        m = await read(reader, skip=())
        assert (m.type, m["t"]) == ("pong", 6), m
        await protocol.send(writer, "revoke", attempt=2)
        m = await read(reader)
        assert m.type == "handback" and m["attempt"] == 2 and m["unstarted"] is True, m
        assert "idle CPU" in m["reason"]
        # and it asks for another to hold behind the one it runs
        m = await read(reader, skip=("pong",))
        assert m.type == "ready" and m["slots"] == 1, m
        assert seller._queued is None and seller.status().state == "running"
    run(scenario)


def test_output_goes_ahead_in_output_frames_when_the_market_offers_them(run):
    """With `output_chunks` in the welcome, the job's output goes out in frames
    of that size while it runs; the `result` carries the rest and the digest of
    the whole.  The sandbox's output limit bounds what goes out."""
    echo = job("echo")
    data = bytes(range(256)) * 1200  # 307,200 bytes

    async def scenario(peer, seller):
        reader, writer = await peer.accept(output_chunks=65536)

        async def output_of(n: int, limit: int, served: bool):
            fields = dict(task_fields(n, echo.digest), output_limit=limit)
            await protocol.send(writer, "task", data, **fields)
            if not served:
                m = await read(reader)
                assert m.type == "need_image"
                await protocol.send(writer, "image", echo.pack(), image=echo.digest)
            pieces = []
            while True:
                m = await read(reader)
                if m.type != "output":
                    break
                assert m["attempt"] == n and len(m.payload) == 65536
                pieces.append(m.payload)
            assert m.type == "result" and m["attempt"] == n, m
            assert len(m.payload) < 65536
            return b"".join(pieces) + m.payload, m

        out, m = await output_of(1, 1 << 20, False)
        assert out == data and m["exit_status"] == 0
        assert m["output_sha256"] == protocol.digest(data)
        out, m = await output_of(2, 200_000, True)
        assert out == data[:200_000] and m["reason"] == "output-limit", m
        assert m["output_sha256"] == protocol.digest(data[:200_000])
    run(scenario)


def test_stop_kills_the_running_job_and_drops_the_held_one(run):
    async def scenario(peer, seller):
        reader, writer = await _running_and_held(peer, seller)
        await protocol.send(writer, "stop", attempt=2)  # held: given back unstarted
        m = await read(reader)
        assert (m.type, m["attempt"], m["unstarted"]) == ("handback", 2, True), m
        assert "closed" in m["reason"]
        await protocol.send(writer, "stop", attempt=1)  # running: killed, handed back
        m = await read(reader)
        assert m.type == "handback" and m["attempt"] == 1 and "closed" in m["reason"], m
        assert "unstarted" not in m.fields
        for _ in range(200):
            if seller.status().state == "idle":
                break
            await asyncio.sleep(0.01)
        assert seller.status().state == "idle" and seller.status().tasks_done == 0
    run(scenario)
