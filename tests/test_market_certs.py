"""Certificates of open connections, and their revocation.

On SQLite every heartbeat looks the connection's certificate up again (a
function call; another process revokes and nothing tells the server).  On
PostgreSQL a heartbeat runs no statement: the hello reads the certificate,
`cert revoke` sends `NOTIFY revoke FP` in its transaction, and every
serving process closes that certificate's connections when it hears it;
once every CERT_RECHECK seconds each process also rechecks the
certificates of its connections in one statement (a notification missed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import urllib.parse

import pytest

from cpushare import protocol
from cpushare.market import fleet

from test_market_crash import PYTHON, SRC
from test_market_fleet import Proc
from test_market_peers import LoopbackMarket, Peer, free_port

INSTANCES = 10  # connections per sell order (copies of its file: one certificate)
ROUNDS = 5  # heartbeats of every connection, called directly


def _market(tmp_path, db) -> LoopbackMarket:
    lm = LoopbackMarket(tmp_path, db)
    for name in ("alice", "bob", "carol"):
        lm.account(name)
    lm.account("buyer", 1000)
    return lm


def _db_statements(lm: LoopbackMarket) -> int:
    """Statements run so far in the market's database (pg_stat_statements),
    counted from a session on another database (whose statements are not)."""
    import psycopg
    q = urllib.parse.urlsplit(lm.db)
    other = urllib.parse.urlunsplit(q._replace(path="/postgres"))
    with psycopg.connect(other, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return int(c.execute("SELECT COALESCE(SUM(s.calls), 0) FROM pg_stat_statements s "
                             "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
                             (q.path.lstrip("/"),)).fetchone()[0])


async def _revoke_by_cli(db: str, fingerprint: str) -> str:
    """`cpushare-server --db DB cert revoke FP`, a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "cpushare.market", "--db", db, "cert", "revoke", fingerprint[:20],
        env=dict(os.environ, PYTHONPATH=SRC), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out, err)
    assert out.decode().startswith(f"revoked {fingerprint}"), out
    return out.decode()


async def _closed_with_auth(p: Peer, timeout: float) -> None:
    """`p` gets the `auth` error, and then its connection ends.  (Pings are
    not answered here: a pong may find the connection closed already.)"""
    async def frame():
        m = await asyncio.wait_for(protocol.read_message(p.reader), timeout)
        while m is not None and m.type == "ping":
            m = await asyncio.wait_for(protocol.read_message(p.reader), timeout)
        return m
    e = await frame()
    assert e is not None and e.type == "error", e
    assert e["code"] == "auth" and "revoked" in e["message"], e.fields
    try:
        assert await frame() is None
    except ConnectionResetError:  # (our close_notify came after the market's close)
        pass



def _run(lm, coro, timeout: float = 60) -> None:
    """Run a test's main coroutine; the market's store is closed after, however it ends."""
    try:
        asyncio.run(asyncio.wait_for(coro, timeout))
    finally:
        lm.close()

def test_a_heartbeat_runs_no_statement_on_postgresql(tmp_path, market_db):
    """30 connections of 3 certificates: on PostgreSQL their heartbeats run
    no statement at all (pg_stat_statements, around heartbeats called
    directly and around 2.5 s of the sweeper's at a heartbeat of 1 s); on
    SQLite each heartbeat still looks its certificate up."""
    lm = _market(tmp_path, market_db)

    async def main():
        m = await lm.start(heartbeat=1)
        orders = [lm.sell(a, 10) for a in ("alice", "bob", "carol")]
        pings: list = []
        peers = [await Peer.open(o, "seller", instance=f"cpu{i}")
                 for o in orders for i in range(INSTANCES)]
        tasks = [asyncio.create_task(p.answer_pings(pings.append)) for p in peers]
        n = len(peers)
        await asyncio.sleep(0.2)
        m.commit_now()
        conns = set(m._conns)
        assert len(conns) == n
        looked_up = []
        if not lm.pg:
            cert = m.store.cert
            m.store.cert = lambda fp: looked_up.append(fp) or cert(fp)

        # heartbeats called directly: nothing else runs meanwhile
        before = _db_statements(lm) if lm.pg else 0
        ping = protocol.encode("ping", t=0)
        for _ in range(ROUNDS):
            m._heartbeat(conns, time.monotonic(), ping)
        if lm.pg:
            assert _db_statements(lm) - before == 0, "statements run by heartbeats"
        else:  # (SQLite: as it always was, one lookup a heartbeat)
            assert len(looked_up) == ROUNDS * n
        assert set(m._conns) == conns  # none closed

        # the sweeper's heartbeats, at 1 s, with what else runs (once a second)
        beats = []
        heartbeat = m._heartbeat
        m._heartbeat = lambda cs, now, p: beats.append(len(cs)) or heartbeat(cs, now, p)
        before, pinged = (_db_statements(lm) if lm.pg else 0), len(pings)
        await asyncio.sleep(2.5)
        total = sum(beats)
        assert total >= 2 * n and len(pings) - pinged >= 2 * n - 2, (total, len(pings))
        if lm.pg:
            ran = _db_statements(lm) - before
            # (what runs once a second: who else serves, cancels to claim, and
            # their transaction; none of it per connection)
            assert ran < total / 4, f"{ran} statements for {total} heartbeats"
            print(f"{ran} statements in 2.5 s of {total} heartbeats")
        assert set(m._conns) == conns
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in peers:
            await p.close()
        await lm.stop()
    _run(lm, main())


def test_a_revocation_by_the_cli_closes_its_connections_at_once_on_postgresql(
        tmp_path, pg_cluster):
    """One PostgreSQL process (it listens too): `cert revoke` in another
    process closes both connections of that certificate with `auth` long
    before their heartbeat (60 s); another seller and a buyer stay served,
    and the certificate is refused from then on."""
    lm = _market(tmp_path, pg_cluster.database())

    async def main():
        m = await lm.start(heartbeat=60)
        victim, other = lm.sell("alice", 10), lm.sell("bob", 10)
        buy = lm.buy("buyer", 10)
        v = [await Peer.open(victim, "seller", instance=f"cpu{i}") for i in range(2)]
        o = await Peer.open(other, "seller")
        b = await Peer.open(buy, "buyer")
        assert all(p.welcome.type == "welcome" for p in (*v, o, b))
        t0 = time.monotonic()
        await _revoke_by_cli(lm.db, protocol.fingerprint_pem(victim.cert_pem))
        await asyncio.gather(*(_closed_with_auth(p, 10) for p in v))
        assert time.monotonic() - t0 < 10 < m.heartbeat
        assert await o.sync() == [] and await b.sync() == []  # still served
        assert len(m._conns) == 2
        again = await Peer.open(victim, "seller")
        assert again.welcome.type == "error" and again.welcome["code"] == "auth"
        for p in (o, b, again):
            await p.close()
        await lm.stop()
    _run(lm, main())


def test_every_process_closes_the_revoked_certificates_connections(tmp_path, pg_cluster):
    """Two serve processes, a copy of one sell order connected to each: a
    revocation by the CLI closes both within seconds (their heartbeat is
    15 s); the other seller, on the first, stays."""
    lm = _market(tmp_path, pg_cluster.database())
    victim, other = lm.sell("alice", 10), lm.sell("bob", 10)
    lm.close()
    log = open(tmp_path / "server.log", "ab")
    procs = [Proc(lm, free_port(), log), Proc(lm, free_port(), log)]

    async def main():
        for p in procs:
            p.start()
        try:
            v = [await Peer.open(dataclasses.replace(victim, port=p.port), "seller",
                                 instance=f"cpu{i}") for i, p in enumerate(procs)]
            o = await Peer.open(dataclasses.replace(other, port=procs[0].port), "seller")
            assert all(p.welcome.type == "welcome" for p in (*v, o))
            t0 = time.monotonic()
            await _revoke_by_cli(lm.db, protocol.fingerprint_pem(victim.cert_pem))
            await asyncio.gather(*(_closed_with_auth(p, 10) for p in v))
            assert time.monotonic() - t0 < 10
            assert await o.sync() == []
            await o.close()
        finally:
            for p in procs:
                p.stop()
    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        log.close()
    text = open(tmp_path / "server.log").read()
    assert text.count("its certificate") == 2 and "was revoked" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_a_missed_notification_is_made_up_by_the_recheck(tmp_path, pg_cluster, monkeypatch):
    """A revocation no process heard (written without its NOTIFY, as if the
    listener's session had been lost) closes the connection at the next
    recheck of the certificates (every CERT_RECHECK, 1 s here), not never."""
    monkeypatch.setattr(fleet, "CERT_RECHECK", 1.0)
    lm = _market(tmp_path, pg_cluster.database())

    async def main():
        m = await lm.start(heartbeat=60)
        victim, other = lm.sell("alice", 10), lm.sell("bob", 10)
        v = await Peer.open(victim, "seller")
        o = await Peer.open(other, "seller")
        fp = protocol.fingerprint_pem(victim.cert_pem)
        lm._quiesce()
        assert lm.admin.db.execute("UPDATE certs SET revoked = 1 WHERE fingerprint = ?",
                                   (fp,)).rowcount == 1  # (autocommit, no NOTIFY)
        t0 = time.monotonic()
        await _closed_with_auth(v, 10)
        assert time.monotonic() - t0 < 5
        assert await o.sync() == [] and len(m._conns) == 1
        await o.close()
        await lm.stop()
    _run(lm, main())


def test_a_revocation_just_after_the_hellos_lookup_is_not_missed(tmp_path, pg_cluster):
    """The certificate is revoked (and NOTIFY sent) right after the hello read
    it as valid, before the connection is served: the notification comes
    after, and closes it."""
    lm = _market(tmp_path, pg_cluster.database())

    async def main():
        m = await lm.start(heartbeat=60)
        victim = lm.sell("alice", 10)
        fp = protocol.fingerprint_pem(victim.cert_pem)
        lookup = m.store.cert

        def cert(f):
            row = lookup(f)
            if f == fp and not row.revoked:
                with lm.admin.transaction():
                    assert lm.admin.revoke(fp)
            return row
        m.store.cert = cert
        v = await Peer.open(victim, "seller")
        assert v.welcome.type == "welcome"  # (it read the certificate as valid)
        await _closed_with_auth(v, 10)
        assert not m._conns
        await lm.stop()
    _run(lm, main())


def test_a_process_whose_listener_is_lost_stops(tmp_path, pg_cluster, caplog):
    """The listener's session ends (here: terminated by the server): the
    process stops, as after a failed commit, rather than serve on deaf to
    revocations (its peers reconnect, to a process that listens)."""
    import psycopg
    caplog.set_level(logging.INFO, logger="cpushare.market")
    lm = _market(tmp_path, pg_cluster.database())

    async def main():
        m = await lm.start(heartbeat=60)
        p = await Peer.open(lm.sell("alice", 10), "seller")
        with psycopg.connect(lm.db, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(%s)", (m._listen.conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(lm._task, 10)
        assert isinstance(m.fatal, psycopg.OperationalError)
        try:
            assert await asyncio.wait_for(protocol.read_message(p.reader), 10) is None
        except ConnectionResetError:
            pass
        m.store.close()
        lm.market = None
    _run(lm, main())
    assert "the database's notifications failed, stopping the market" in caplog.text
