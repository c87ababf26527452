"""The market's TLS: every connection an ssl.SSLObject on the TCP socket, and
one receive buffer for all of them.

asyncio's own TLS transport (sslproto.SSLProtocol) gives every connection a
receive buffer of 256 KiB, zero-filled when it is made: at 10,000 sellers
that only answer heartbeats, 2.5 GiB of buffers that hold a few dozen bytes
now and then (bench/connections.py measured 256 of the ~300 KiB the market
spent per connection there).  Here a connection is a Link: an asyncio
BufferedProtocol on the TCP transport, with an SSLObject between two
MemoryBIOs, and itself the transport of the connection's StreamReaderProtocol.
The socket is read into the one buffer of the Server (get_buffer and
buffer_updated come back to back, so it is free again as soon as its bytes are
in the connection's incoming BIO) and decrypted at once, a record at a time,
into the connection's StreamReader through one shared plaintext buffer.

Budgets stay as they were: the StreamReader pauses this transport past its
limit (listener.READ_BUFFER), and then the socket is not read (what is already
in the incoming BIO, at most one receive, waits there, undecrypted, until the
reader resumes); what is written goes to the TCP transport, whose buffer
`get_write_buffer_size` reports and whose flow control reaches the writer's
drain().  Ciphertext moves in and out of the BIOs a record's worth at a time,
so a BIO's buffer (which OpenSSL keeps at its largest) stays near one record
whatever size the frames are.  OpenSSL's own record buffers are released
while idle (SSL_MODE_RELEASE_BUFFERS, set by Python's ssl on every context).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Callable

RECV = 256 << 10  # bytes one read of a socket takes (shared by every connection)
PIECE = 16 << 10  # ciphertext or plaintext moved at a time: one TLS record
CLOSE_TIMEOUT = 30.0  # seconds a closed connection may take to hand over what it has left
# ... and with nothing left to hand over, how long it lingers for the peer's
# end: a socket closed with unread input sends a reset, which may make the
# peer's kernel drop what it had not read yet (the last `error` frame)
LINGER = 2.0


class Server:
    """What every Link of one listening socket shares: the TLS context, the
    buffers, and `accepted(link)`, called for every new TCP connection, which
    either aborts it or calls link.start(protocol)."""

    def __init__(self, ctx: ssl.SSLContext, accepted: Callable[["Link"], None]):
        self.ctx = ctx
        self.accepted = accepted
        self.loop = asyncio.get_running_loop()
        self.recv = memoryview(bytearray(RECV))
        self.plain = memoryview(bytearray(PIECE))

    def __call__(self) -> "Link":  # the protocol factory of loop.create_server
        return Link(self)


class Link(asyncio.Transport, asyncio.BufferedProtocol):
    """One TLS connection: the protocol of its TCP transport, and the transport
    of its app protocol (a StreamReaderProtocol)."""

    __slots__ = ("_server", "_tcp", "_app", "_sslobj", "_in", "_out", "_handshake", "_up",
                 "_closing", "_paused", "_tcp_eof", "_eof", "_lost", "_timer")

    def __init__(self, server: Server):
        super().__init__()
        self._server = server
        self._tcp: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._sslobj: ssl.SSLObject | None = None
        self._in = self._out = None  # MemoryBIOs: ciphertext from and to the peer
        self._handshake: asyncio.Future | None = None
        self._up = False  # the handshake succeeded
        self._closing = False
        self._paused = False  # reading paused by the app (its reader is full)
        self._tcp_eof = False  # the peer's end of the TCP stream came
        self._eof = False  # the app was told the stream ended
        self._lost = False
        self._timer: asyncio.TimerHandle | None = None

    # --- the TCP side ------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._tcp = transport
        self._server.accepted(self)

    def start(self, app: asyncio.Protocol) -> None:
        """Begin the handshake; `app` gets the plaintext (handshake() says when)."""
        self._app = app
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._sslobj = self._server.ctx.wrap_bio(self._in, self._out, server_side=True)
        self._handshake = self._server.loop.create_future()
        # (its failure is the handler's to report, and not reported twice when
        # the handler is gone: a market stopping)
        self._handshake.add_done_callback(_retrieve)
        app.connection_made(self)

    def handshake(self) -> asyncio.Future:
        """Done when the TLS handshake is; its exception when it failed."""
        return self._handshake

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._server.recv

    def buffer_updated(self, nbytes: int) -> None:
        if self._sslobj is None or self._closing:
            return  # (closing: what still comes is read and dropped)
        data = self._server.recv
        for i in range(0, nbytes, PIECE):
            self._in.write(data[i:min(nbytes, i + PIECE)])
            if not self._handshake.done():
                self._do_handshake()
            elif self._up and not self._paused:
                self._decrypt()
            if self._sslobj is None:
                return

    def eof_received(self) -> bool:
        """The peer's end of stream (with or without close_notify): the app
        hears it after the plaintext before it.  The TCP transport stays open
        while some of that waits for a paused reader."""
        self._tcp_eof = True
        if self._closing:
            return False  # (the end a lingering close waited for)
        if self._sslobj is not None and not self._handshake.done():
            self._handshake.set_exception(
                ConnectionResetError("the peer closed the connection during the TLS handshake"))
        if self._up and self._sslobj is not None:
            if self._paused:
                return True  # (resume_reading delivers the rest, then the end)
            self._decrypt()
        self._tell_eof()
        return False  # (the TCP transport closes)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(
                exc or ConnectionResetError("the connection closed during the TLS handshake"))
        app, self._app = self._app, None
        self._sslobj = self._in = self._out = None  # (their memory goes now)
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # --- TLS ---------------------------------------------------------------

    def _do_handshake(self) -> None:
        if self._handshake.done():  # cancelled (its deadline passed): nothing more
            return
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as e:
            self._flush()  # (the alert that says why)
            self._handshake.set_exception(e)
            return
        self._flush()
        self._up = True
        self._handshake.set_result(None)
        self._decrypt()  # (the peer's first frames may have come with its Finished)

    def _decrypt(self) -> None:
        """Plaintext from the incoming BIO to the app, while it reads."""
        plain = self._server.plain
        while not self._paused and not self._eof:
            try:
                n = self._sslobj.read(PIECE, plain)
            except ssl.SSLWantReadError:
                if self._tcp_eof:  # all there will be (a part record left is dropped)
                    self._tell_eof()
                break
            except ssl.SSLZeroReturnError:
                n = 0
            except (ssl.SSLError, OSError) as e:
                self._fatal(e)
                return
            if not n:  # the peer's close_notify (ssl reads 0 bytes, or raises)
                self._tell_eof()
                break
            self._app.data_received(plain[:n])
            if self._sslobj is None:
                return
        self._flush()  # (post-handshake messages OpenSSL answers)

    def _flush(self) -> None:
        out = self._out
        if out is not None and out.pending and self._tcp is not None:
            self._tcp.write(out.read())

    def _tell_eof(self) -> None:
        if not self._eof and self._app is not None:
            self._eof = True
            self._app.eof_received()

    def _fatal(self, exc: Exception) -> None:
        """A TLS error after the handshake: the app hears it, the socket is cut."""
        app, self._app = self._app, None
        self._sslobj = self._in = self._out = None
        self._closing = True
        if app is not None:
            app.connection_lost(exc)
        self._tcp.abort()

    # --- the app's transport -------------------------------------------------

    def write(self, data) -> None:
        if self._closing or self._sslobj is None or not self._up:
            return
        view = memoryview(data).cast("B")
        try:
            for i in range(0, len(view), PIECE):
                self._sslobj.write(view[i:i + PIECE])
                self._flush()
        except (ssl.SSLError, OSError) as e:
            self._fatal(e)

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def get_write_buffer_size(self) -> int:
        return self._tcp.get_write_buffer_size() if self._tcp is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tcp.get_write_buffer_limits()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._tcp.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._paused = True
        if self._tcp is not None and not self._lost:
            self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._sslobj is not None and self._up:
            self._decrypt()  # (what waited in the incoming BIO, and the end after it)
        if not self._paused and self._tcp is not None and not self._lost and not self._tcp_eof:
            self._tcp.resume_reading()

    def is_reading(self) -> bool:
        return not self._paused and self._tcp is not None and self._tcp.is_reading()

    def close(self) -> None:
        """Send close_notify, then end the stream once what is queued is
        written, and close when the peer ends its own (reading and dropping
        what it still sends): after CLOSE_TIMEOUT at most, for a peer that no
        longer reads, or LINGER when nothing was left to send."""
        if self._closing or self._tcp is None:
            return
        self._closing = True
        if self._sslobj is not None and self._up:
            try:
                self._sslobj.unwrap()
            except (ssl.SSLError, OSError):
                pass  # (its answer is not waited for)
            self._flush()
        if self._lost:
            return
        left = self._tcp.get_write_buffer_size()
        if self._tcp_eof or not self._tcp.can_write_eof():
            self._tcp.close()
        else:
            self._tcp.write_eof()
            if self._paused:
                self._tcp.resume_reading()
        self._timer = self._server.loop.call_later(CLOSE_TIMEOUT if left else LINGER,
                                                   self._tcp.abort)

    def abort(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._closing or self._tcp is None or self._tcp.is_closing()

    def get_extra_info(self, name: str, default=None):
        if name == "ssl_object":
            return self._sslobj
        if name == "sslcontext":
            return self._server.ctx
        if name == "peercert":
            return self._sslobj.getpeercert() if self._sslobj is not None else default
        if name == "cipher":
            return self._sslobj.cipher() if self._sslobj is not None else default
        return self._tcp.get_extra_info(name, default) if self._tcp is not None else default

    def set_protocol(self, protocol) -> None:
        self._app = protocol

    def get_protocol(self):
        return self._app


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
