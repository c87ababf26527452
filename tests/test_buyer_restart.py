"""`cpushare buy` (the real command, as a process) rides through a market
that restarts, and through a listener that drops it after the TLS
handshake; a refusal of the market stops it at once.

The market is a real `cpushare.market serve` process on loopback with two
real sellers; it is killed with SIGKILL and started again on the same port
while the buy runs.  The listener that drops connections is a TLS server
of the market's own CA in a thread of the test, in front of the market.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cpushare import protocol
from cpushare.market import ca

from test_e2e_support import (PYTHON, LocalMarket, env, job, spin_count_for, spin_input,
                              wait_for)


@pytest.fixture
def market(tmp_path, market_db):
    m = LocalMarket(tmp_path / "market", db=market_db)
    m.account("buyer", 1000)
    m.account("alice")
    m.account("bob")
    m.serve()
    m.seller(m.sell_order("alice", "alice-cpu0"))
    m.seller(m.sell_order("bob", "bob-cpu0"))
    yield m
    m.close()


def inputs(root: Path, n: int, seconds: float) -> tuple[Path, list[Path]]:
    """The spin job and n inputs of about `seconds` of CPU each (the job's
    output is its input)."""
    jobfile = root / "spin.bin"
    jobfile.write_bytes(job("spin").pack())
    count = spin_count_for(seconds)
    paths = []
    for i in range(n):
        p = root / f"in{i:02d}"
        p.write_bytes(spin_input(count, b"task %d" % i))
        paths.append(p)
    return jobfile, paths


def buy(order: Path, jobfile: Path, ins: list[Path], out: Path) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "cpushare", "buy", "--order", str(order), str(jobfile),
                             *map(str, ins), "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def check_outputs(p: subprocess.Popen, out: Path, ins: list[Path], stdout: str, stderr: str):
    """Exit 0, each output right, each reported once (so written once)."""
    assert p.returncode == 0, stdout + stderr
    assert sorted(x.name for x in out.iterdir()) == sorted(f"{i.name}.out" for i in ins)
    for i in ins:
        assert (out / f"{i.name}.out").read_bytes() == i.read_bytes(), i
    lines = [line for line in stderr.splitlines() if line.startswith("[")]
    names = [line.split("] ", 1)[1].split(":")[0] for line in lines]
    assert sorted(names) == sorted(i.name for i in ins), stderr
    assert lines[-1].startswith(f"[{len(ins)}/{len(ins)}] "), stderr
    assert stdout.startswith(f"{len(ins)} tasks, 0 failed, "), stdout
    assert "refused" not in stderr, stderr


def test_buy_rides_through_kill_9_and_restart_of_the_market(tmp_path, market):
    jobfile, ins = inputs(tmp_path, 24, 0.25)
    out = tmp_path / "out"
    p = buy(market.buy_order("buyer", max_cpu_seconds=10), jobfile, ins, out)
    kills = []  # outputs in at each kill
    try:
        for threshold in (3, 10):
            wait_for(lambda: p.poll() is not None or len(list(out.glob("*.out"))) >= threshold,
                     60, f"{threshold} outputs")
            assert p.poll() is None, p.communicate()
            market.server.kill9()
            kills.append(len(list(out.glob("*.out"))))
            time.sleep(0.5)  # the buyer finds nothing listening for a while
            market.serve()
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert len(kills) == 2 and all(k < len(ins) for k in kills), kills
    check_outputs(p, out, ins, stdout, stderr)
    assert "trying again" in stderr, stderr
    assert market.ledger_check().returncode == 0


class Front:
    """A listener in front of the market, in a thread of its own, with a
    server certificate of the market's CA.  Connection n (from 0) is dealt
    with as plan(n) says: "close" (the TLS handshake, then closed), "reset"
    (the handshake, then reset), "auth" (hello answered with
    `error {code: auth}`), or "relay" (its bytes relayed to the market)."""

    def __init__(self, lm: LocalMarket, plan) -> None:
        ca_cert, ca_key = lm.ca_credentials()
        cert = ca.issue(ca_cert, ca_key, "front", server_names=["127.0.0.1"])
        self.ctx = protocol.server_context(ca_cert, cert.cert_pem, cert.key_pem)
        self.plan, self.market_port = plan, lm.port
        self.seen: list[str] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        server.close()

    def order(self, order: Path) -> Path:
        """A copy of the buy order that names this listener."""
        moved = order.with_name("front.buy")
        moved.write_text(order.read_text().replace(f":{self.market_port}", f":{self.port}"))
        moved.chmod(0o600)
        return moved

    async def _conn(self, reader, writer) -> None:
        what = self.plan(len(self.seen))
        self.seen.append(what)
        try:
            if what == "relay":
                r2, w2 = await asyncio.open_connection("127.0.0.1", self.market_port)
                await asyncio.gather(_pipe(reader, w2), _pipe(r2, writer))
                return
            await writer.start_tls(self.ctx)
            if what == "reset":
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            elif what == "auth":
                await protocol.read_message(reader)
                await protocol.send(writer, "error", code="auth", ref=None,
                                    message="certificate 0123456789abcdef (CN=buyer) is revoked")
        except (OSError, ssl.SSLError, protocol.ProtocolError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _pipe(reader, writer) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def test_a_listener_that_drops_the_buyer_after_the_tls_handshake_is_retried(tmp_path, market):
    front = Front(market, lambda n: ("close", "reset", "close")[n] if n < 3 else "relay")
    try:
        jobfile, ins = inputs(tmp_path, 4, 0.01)
        out = tmp_path / "out"
        p = buy(front.order(market.buy_order("buyer")), jobfile, ins, out)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        front.close()
    check_outputs(p, out, ins, stdout, stderr)
    assert front.seen[:4] == ["close", "reset", "close", "relay"], front.seen
    assert "trying again" in stderr, stderr


def test_an_auth_error_from_the_market_stops_the_buyer_at_once(tmp_path, market):
    front = Front(market, lambda n: "auth")
    try:
        jobfile, ins = inputs(tmp_path, 2, 0.01)
        out = tmp_path / "out"
        t0 = time.monotonic()
        p = buy(front.order(market.buy_order("buyer")), jobfile, ins, out)
        stdout, stderr = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        front.close()
    assert p.returncode == 2, stdout + stderr
    assert f"127.0.0.1:{front.port}: the market refused us: certificate 0123456789abcdef " \
           f"(CN=buyer) is revoked" in stderr, stderr
    assert front.seen == ["auth"] and took < 20, (front.seen, took)
    assert not any(out.iterdir())
