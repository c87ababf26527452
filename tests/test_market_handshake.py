"""Unauthenticated connections: capped in all and per source address.

The attacker's sockets come from 127.0.0.2 (all of 127/8 is loopback), the
honest peers from 127.0.0.1, over real TLS to the in-process market.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket

import pytest

from cpushare.market import listener

from test_market import BID, COINS, assert_ledger_ok, buyer, run
from test_market_peers import LoopbackMarket, ScriptedSeller, TIMEOUT

IDLE = 4000


@pytest.fixture
def lm(tmp_path, market_db):
    m = LoopbackMarket(tmp_path, market_db)
    m.account("buyer", COINS)
    m.account("alice")
    yield m
    m.close()


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 3 * IDLE:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {3 * IDLE}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def idle_socket(port: int) -> socket.socket | None:
    s = socket.socket()
    s.setblocking(False)
    s.bind(("127.0.0.2", 0))
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    return s


def test_idle_sockets_from_one_address_do_not_keep_peers_out(lm, many_fds, caplog):
    """4,000 sockets from one address open and send nothing: at most
    MAX_UNAUTHENTICATED_PER_ADDRESS of them wait in the handshake, the rest
    are closed at once (one log line, not 4,000), and a seller and a buyer
    from another address connect and run tasks meanwhile."""
    caplog.set_level(logging.INFO, logger="cpushare.market")

    async def main():
        m = await lm.start()
        socks = []
        for _ in range(IDLE):
            socks.append(idle_socket(lm.port))
            if len(socks) % 500 == 0:
                await asyncio.sleep(0.05)  # (let the market accept them)
        for _ in range(200):
            if m._refused_early or m._refusals_logged > 0:
                break
            await asyncio.sleep(0.05)
        assert m._unauthenticated_from["127.0.0.2"] <= listener.MAX_UNAUTHENTICATED_PER_ADDRESS
        assert m._unauthenticated <= listener.MAX_UNAUTHENTICATED
        s = await ScriptedSeller.connect(lm.sell("alice", BID))
        b, d = await buyer(lm)
        for i in range(5):
            await b.send("submit", b"x%d" % i, ref=f"r{i}", image=d)
        got = 0
        while got < 5:
            msg = await b.recv(TIMEOUT)
            assert msg is not None
            if msg.type == "done":
                got += 1
                await b.send("ack", task=msg["task"])
        await b.sync()
        for x in socks:
            x.close()
        await s.stop()
        await b.close()
        await lm.stop()
    run(main())
    refusals = [r for r in caplog.records if "unauthenticated in all" in r.getMessage()]
    assert 1 <= len(refusals) <= 3, len(refusals)
    assert "Traceback" not in caplog.text
    assert_ledger_ok(lm)


def test_the_handshake_has_a_deadline(lm, monkeypatch):
    """A socket that never speaks TLS is closed after HANDSHAKE_TIMEOUT, and
    its slot is free again."""
    monkeypatch.setattr(listener, "HANDSHAKE_TIMEOUT", 0.3)

    async def main():
        m = await lm.start()
        r, w = await asyncio.open_connection("127.0.0.1", lm.port)
        for _ in range(100):
            if m._unauthenticated == 1:
                break
            await asyncio.sleep(0.01)
        assert m._unauthenticated == 1
        assert await asyncio.wait_for(r.read(), TIMEOUT) == b""  # closed by the market
        for _ in range(100):
            if m._unauthenticated == 0:
                break
            await asyncio.sleep(0.01)
        assert m._unauthenticated == 0 and not m._unauthenticated_from
        w.close()
        await lm.stop()
    run(main())
