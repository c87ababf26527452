"""The market's TLS layer (cpushare.market.tls) against asyncio's own TLS
client: one receive buffer for every connection, the reader's budget
(reading stops while it is full, and the sender waits), the end of stream
after all the plaintext before it, close_notify both ways, and a handshake
that fails with the alert that says why."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from cpushare import protocol
from cpushare.market import ca, tls

from test_market import run

TIMEOUT = 10.0
LIMIT = 1024  # the test reader's limit: it pauses its transport past twice this


@pytest.fixture(scope="module")
def creds():
    root = ca.make_ca("test CA")
    server = ca.issue(root.cert_pem, root.key_pem, "market", server_names=("127.0.0.1",))
    client = ca.issue(root.cert_pem, root.key_pem, "peer")
    other = ca.make_ca("another CA")
    stranger = ca.issue(other.cert_pem, other.key_pem, "stranger")
    return {
        "server": protocol.server_context(root.cert_pem, server.cert_pem, server.key_pem),
        "client": protocol.client_context(root.cert_pem, client.cert_pem, client.key_pem),
        "stranger": protocol.client_context(root.cert_pem, stranger.cert_pem,
                                            stranger.key_pem),
    }


class Served:
    """A tls.Server on a loopback port; every connection's reader and link."""

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.links: list = []  # (link, reader, writer)
        self.came = asyncio.Event()

    def accepted(self, link: tls.Link) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=LIMIT, loop=loop)
        proto = asyncio.StreamReaderProtocol(reader, loop=loop)
        link.start(proto)
        self.links.append((link, reader, asyncio.StreamWriter(link, proto, reader, loop)))
        self.came.set()

    async def start(self) -> int:
        self.server = tls.Server(self.ctx, self.accepted)
        self.listening = await asyncio.get_running_loop().create_server(
            self.server, "127.0.0.1", 0)
        return self.listening.sockets[0].getsockname()[1]

    async def one(self):
        await asyncio.wait_for(self.came.wait(), TIMEOUT)
        link, reader, writer = self.links[0]
        await asyncio.wait_for(link.handshake(), TIMEOUT)
        return link, reader, writer

    async def close(self) -> None:
        for link, _, _ in self.links:
            link.abort()
        self.listening.close()
        await self.listening.wait_closed()


async def _client(port: int, ctx: ssl.SSLContext):
    return await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"), TIMEOUT)


def test_a_full_reader_stops_the_sender_and_gets_everything_then_the_end(creds):
    """The peer writes 32 MiB and closes while the market's reader is not read:
    the link stops reading the socket past the reader's limit (the peer's
    writes back up: it waits), and once the reader is read it gets every byte
    and then the end of stream, not the end first."""
    data = bytes(range(256)) * (128 << 10)  # 32 MiB: more than the kernel buffers

    async def main():
        s = Served(creds["server"])
        port = await s.start()
        r, w = await _client(port, creds["client"])
        link, reader, writer = await s.one()
        w.write(data)
        await asyncio.sleep(0.5)
        # paused: what the reader holds stays near its limit, what waits in
        # the link's incoming BIO within one receive, and the rest waits in the
        # kernel's buffers and the sender's
        assert not link.is_reading() and not link._tcp.is_reading()
        assert len(reader._buffer) <= 2 * LIMIT + tls.PIECE
        assert link._in.pending <= tls.RECV
        w.close()
        got = bytearray()
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), TIMEOUT)
            if not chunk:
                break
            got += chunk
        assert got == data
        writer.close()  # (the peer waits for the answer to its close_notify)
        await asyncio.wait_for(w.wait_closed(), TIMEOUT)
        await s.close()
    run(main())


def test_close_notify_both_ways(creds):
    """A peer's close (close_notify) is the end of stream for the market, and
    the market's close answers it: the peer's wait_closed returns at once
    (asyncio waits for the answer up to its shutdown timeout, 30 s)."""

    async def main():
        s = Served(creds["server"])
        port = await s.start()
        r, w = await _client(port, creds["client"])
        link, reader, writer = await s.one()
        writer.write(b"hello")
        assert await asyncio.wait_for(r.readexactly(5), TIMEOUT) == b"hello"
        w.write(b"bye")
        w.close()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"bye"
        writer.close()
        await asyncio.wait_for(w.wait_closed(), 5)
        await asyncio.wait_for(writer.wait_closed(), 5)
        await s.close()
    run(main())


def test_the_market_closing_first_is_an_end_of_stream_for_the_peer(creds):
    async def main():
        s = Served(creds["server"])
        port = await s.start()
        r, w = await _client(port, creds["client"])
        link, reader, writer = await s.one()
        writer.write(b"last words")
        writer.close()
        assert await asyncio.wait_for(r.read(), TIMEOUT) == b"last words"
        w.close()
        await s.close()
    run(main())


def test_a_failed_handshake_says_why_to_both_ends(creds):
    """A client certificate of another CA: the link's handshake fails with the
    verification error, and the peer gets the alert (an SSL error, not a hang)."""

    async def main():
        s = Served(creds["server"])
        port = await s.start()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            r, w = await _client(port, creds["stranger"])
            # (TLS 1.3: the client learns of the alert at its first read)
            await asyncio.wait_for(r.read(), TIMEOUT)
        await asyncio.wait_for(s.came.wait(), TIMEOUT)
        link = s.links[0][0]
        with pytest.raises(ssl.SSLError) as e:
            await asyncio.wait_for(link.handshake(), TIMEOUT)
        assert "certificate" in str(e.value).lower()
        await s.close()
    run(main())


def test_every_connection_reads_into_one_buffer(creds):
    """Many connections, one receive buffer: the links share their Server's,
    and each one's bytes reach its own reader."""

    async def main():
        s = Served(creds["server"])
        port = await s.start()
        clients = [await _client(port, creds["client"]) for _ in range(20)]
        for _ in range(100):
            if len(s.links) == 20:
                break
            await asyncio.sleep(0.02)
        assert len(s.links) == 20
        for link, _, _ in s.links:
            await asyncio.wait_for(link.handshake(), TIMEOUT)
            assert link.get_buffer(-1) is s.server.recv
        # (the server's links are in the order the clients connected)
        for i, (_, w) in enumerate(clients):
            w.write(b"%04d" % i * 100)
        for i, (_, reader, _) in enumerate(s.links):
            assert await asyncio.wait_for(reader.readexactly(400), TIMEOUT) == b"%04d" % i * 100
        for _, w in clients:
            w.close()
        await s.close()
    run(main())
