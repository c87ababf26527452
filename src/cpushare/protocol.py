"""The CPUShare wire protocol, version 1: frames, messages, TLS contexts.

Shared by the market server, the seller and the buyer; docs/protocol.md is
the reference.  A frame is

    header_length  u32 big-endian, 1 .. MAX_HEADER
    payload_length u32 big-endian, 0 .. max_payload
    header         UTF-8 JSON object with a string "type"
    payload        raw bytes

Every received header is checked against SCHEMA (the fields each message
type must or may carry, and their JSON types); anything else raises
ProtocolError, and the caller closes that one connection.

This module imports neither sqlite nor D-Bus.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
MAX_HEADER = 65536
DEFAULT_MAX_PAYLOAD = 64 << 20
DEFAULT_HEARTBEAT = 15  # seconds between server pings

# Error codes of `error` and `failed` frames.
ERROR_CODES = frozenset(
    {"version", "auth", "frame", "funds", "order", "image", "task", "internal", "dispute",
     "limit", "expired", "cancelled"})

_LENGTHS = struct.Struct(">II")


class CodedError(Exception):
    """An error with one of ERROR_CODES and a message, as sent to a peer."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ProtocolError(CodedError):
    """A peer broke the protocol; `code` is the error code sent back, and
    the connection ends."""


# --- message schema ---------------------------------------------------------
# Type tags for field checks.  bool is a subclass of int in Python, so the
# integer tags refuse it explicitly.  Every integer a peer sends has a range:
# a value outside it is a `frame` error for that connection, before any
# code (or the store) sees it.

STR, BOOL, OPT_STR, ANY = "str", "bool", "str|null", "any"


@dataclass(frozen=True)
class Int:
    """An integer field in lo..hi; `null`: it may also be JSON null."""
    lo: int
    hi: int
    null: bool = False

    def __str__(self) -> str:
        return f"an integer in {self.lo}..{self.hi}" + (" or null" if self.null else "")


# The ranges the protocol allows (the market checks tighter limits of the
# orders on top of these).
MAX_ID = 2**62  # tasks, attempts, sessions, orders: store row ids
MAX_MS = 366 * 86_400_000  # CPU and wall time: a year, in ms
MAX_BYTES = 1 << 40  # sizes, offsets, memory
MAX_MONEY = 2**62  # amounts of money, in the ledger's unit
ID, OPT_ID = Int(1, MAX_ID), Int(1, MAX_ID, True)
MS, OPT_MS = Int(0, MAX_MS), Int(0, MAX_MS, True)
BYTES = Int(0, MAX_BYTES)
MONEY = Int(0, MAX_MONEY)
EXIT, SIGNAL = Int(0, 255, True), Int(1, 64, True)
TIME = Int(-2**53, 2**53)  # a ping's t: echoed in its pong, opaque
INT = Int(-2**63, 2**63 - 1)  # (only for fields with no narrower meaning)


def _check(tag, value: Any) -> bool:
    if type(tag) is Int:
        if value is None:
            return tag.null
        return type(value) is int and tag.lo <= value <= tag.hi
    if tag == STR:
        return type(value) is str
    if tag == BOOL:
        return type(value) is bool
    if tag == OPT_STR:
        return value is None or type(value) is str
    return True


# type -> {field: (tag, required)}.  Optional fields may be absent.
R, O = True, False
SCHEMA: dict[str, dict[str, tuple[Any, bool]]] = {
    "hello": {"version": (Int(0, 2**31), R), "role": (STR, R), "software": (STR, O),
              "instance": (STR, O), "output_frames": (BOOL, O), "acks": (BOOL, O),
              "accel": (STR, O), "cache": (BYTES, O), "links": (BOOL, O), "lease_attempt": (ID, O),
              "lease_cpu_ms": (MS, O)},
    "welcome": {"version": (Int(0, 2**31), R), "account": (STR, R), "order": (OPT_ID, O),
                "max_payload": (Int(1, 1 << 32), R), "heartbeat": (Int(1, 86_400), R),
                "prefetch": (Int(0, 16), O), "output_chunks": (Int(1, 1 << 32), O),
                "acks": (BOOL, O)},
    "error": {"code": (STR, R), "message": (STR, R), "ref": (OPT_STR, O)},
    "ping": {"t": (TIME, O)},
    "pong": {"t": (TIME, O)},
    # seller
    "ready": {"slots": (Int(1, 16), O)},
    "task": {"task": (ID, R), "attempt": (ID, R), "model": (STR, O), "image": (STR, R),
             "cpu_ms": (MS, R),
             "wall_ms": (MS, R), "memory": (BYTES, R), "output_limit": (Int(-1, MAX_BYTES), R),
             "session": (OPT_ID, O), "buyer_order": (OPT_ID, O),
             "link_id": (Int(1, 2**32 - 1), O), "link_peer": (STR, O), "link_tx": (STR, O),
             "link_rx": (STR, O)},
    # images: whole in one `image` frame, or (with `size`) in chunks at `offset`
    "need_image": {"image": (STR, R), "offset": (BYTES, O)},
    "image": {"image": (STR, R), "offset": (BYTES, O), "size": (Int(1, MAX_BYTES), O)},
    "image_offer": {"image": (STR, R), "size": (Int(1, MAX_BYTES), R)},
    "image_want": {"image": (STR, R), "offset": (BYTES, R)},
    "result": {"attempt": (ID, R), "exit_status": (EXIT, R), "signal": (SIGNAL, R),
               "reason": (STR, R), "cpu_ms": (MS, R), "output_sha256": (STR, R)},
    # seller -> market: {attempt}; market -> buyer: {ref, task, offset}
    "output": {"attempt": (ID, O), "ref": (STR, O), "task": (ID, O), "offset": (BYTES, O)},
    "settled": {"attempt": (ID, R), "paid_milli": (MONEY, R), "accepted": (BOOL, R)},
    "handback": {"attempt": (ID, R), "reason": (STR, O), "unstarted": (BOOL, O)},
    "revoke": {"attempt": (ID, R)},
    "stop": {"attempt": (ID, R)},
    # a lease (a session of the kvm model) is paid as it runs: the seller
    # reports the CPU time used so far, the market settles it and tells the buyer
    "meter": {"attempt": (ID, R), "cpu_ms": (MS, R), "state": (STR, O)},
    "lease": {"session": (ID, R), "ref": (STR, O), "state": (STR, R), "cpu_ms": (MS, R),
              "cost_milli": (MONEY, R), "seller": (OPT_STR, O), "message": (OPT_STR, O)},
    "cancel": {"ref": (STR, R)},
    # buyer
    "image_ok": {"image": (STR, R)},
    "submit": {"ref": (STR, R), "image": (STR, R), "redundancy": (Int(0, 1 << 20, True), O),
               "cpu_ms": (OPT_MS, O)},
    "accepted": {"ref": (STR, R), "task": (ID, R), "escrow_milli": (MONEY, R)},
    "done": {"ref": (STR, R), "task": (ID, R), "exit_status": (EXIT, R),
             "signal": (SIGNAL, R), "reason": (STR, R), "cpu_ms": (MS, R),
             "cost_milli": (MONEY, R), "attempts": (Int(0, 1 << 20), R),
             "streamed": (BYTES, O)},
    "failed": {"ref": (STR, R), "task": (OPT_ID, O), "code": (STR, R), "message": (STR, R)},
    "ack": {"task": (ID, R)},
    # interactive sessions
    "open": {"ref": (STR, R), "image": (STR, R), "cpu_ms": (OPT_MS, O),
             "link": (STR, O)},
    "close": {"session": (ID, R)},
    # a lease's encrypted link (docs/vpn.md): its keys, from the market to both ends
    "link": {"session": (ID, R), "link_id": (Int(1, 2**32 - 1), R), "tx": (STR, R),
             "rx": (STR, R), "seller": (OPT_STR, O)},
    "opened": {"ref": (STR, R), "session": (ID, R)},
    "stream": {"session": (ID, R), "eof": (BOOL, O)},
    "closed": {"session": (ID, R), "exit_status": (EXIT, O), "signal": (SIGNAL, O),
               "reason": (STR, O), "cpu_ms": (MS, O), "cost_milli": (MONEY, O)},
    # between the market's own processes (market/links.py): the payload of
    # to_buyer and from_buyer is one whole frame, relayed
    "peer": {"server": (ID, R)},
    "to_buyer": {"order": (ID, R)},
    "from_buyer": {"order": (ID, R)},
    "buyer_gone": {"order": (ID, R)},
    "buyer_back": {"order": (ID, R)},
    # a lease's seller came back to another process than its holder's
    "lease_wanted": {"attempt": (ID, R)},
    "lease_given": {"attempt": (ID, R), "task": (ID, R)},
    "lease_kept": {"attempt": (ID, R)},
}
# The length of refs and digests is bounded so that a peer cannot make the
# server store big keys.
MAX_REF = 128
DIGEST_LEN = 64


def validate(type_: str, fields: dict) -> None:
    """Raise ProtocolError('frame') unless `fields` fit the schema of `type_`."""
    schema = SCHEMA.get(type_)
    if schema is None:
        raise ProtocolError("frame", f"unknown message type {type_!r}")
    for name, (tag, required) in schema.items():
        if name not in fields:
            if required:
                raise ProtocolError("frame", f"{type_}: missing field {name!r}")
            continue
        if not _check(tag, fields[name]):
            raise ProtocolError(
                "frame", f"{type_}: field {name!r} must be {tag}, not {fields[name]!r:.40}")
        v = fields[name]
        if type(v) is str and "\x00" in v:  # (no database's text holds one)
            raise ProtocolError("frame", f"{type_}: field {name!r} holds a NUL character")
        if type(v) is str and not v.isascii():
            try:  # JSON may escape a lone surrogate, which is not UTF-8
                v.encode()
            except UnicodeEncodeError:
                raise ProtocolError("frame", f"{type_}: field {name!r} is not valid "
                                             f"Unicode (a lone surrogate)") from None
    ref = fields.get("ref")
    if isinstance(ref, str) and len(ref) > MAX_REF:
        raise ProtocolError("frame", f"{type_}: ref longer than {MAX_REF} characters")
    for name in ("image", "output_sha256"):
        v = fields.get(name)
        if name in schema and isinstance(v, str) and not is_digest(v):
            raise ProtocolError("frame", f"{type_}: {name} is not a SHA-256 hex digest")


def is_digest(text: str) -> bool:
    return len(text) == DIGEST_LEN and all(c in "0123456789abcdef" for c in text)


def digest(data: bytes) -> str:
    """The digest of an image or an output as the protocol names it."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class Message:
    type: str
    fields: dict = field(default_factory=dict)
    payload: bytes = b""
    held: int = 0  # bytes of a ByteBudget its payload holds (see read_message)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


# --- framing ----------------------------------------------------------------

def encode_head(type: str, payload_length: int, **fields: Any) -> bytes:  # noqa: A002
    """The lengths and header of a frame whose payload follows separately."""
    if type not in SCHEMA:
        raise ValueError(f"encode: unknown message type {type!r}")
    fields["type"] = type
    header = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
    if len(header) > MAX_HEADER:
        raise ValueError(f"encode: {type} header is {len(header)} bytes (> {MAX_HEADER})")
    return _LENGTHS.pack(len(header), payload_length) + header


def encode(type: str, payload: bytes = b"", **fields: Any) -> bytes:  # noqa: A002
    """One frame.  The fields are not checked beyond the type being known."""
    head = encode_head(type, len(payload), **fields)
    return head + payload if payload else head


BIG_FRAME = 256 << 10  # frames above this are written in pieces of this size


class FrameWriter:
    """The frames going out on one connection, for all three sides.

    Small frames queued during one turn of the event loop go out in one
    write (or, with auto_flush=False, when the owner calls flush(): the
    market sends only after its group commit).  A big payload goes out in
    pieces paced by drain() (asyncio's SSL transport is several times slower
    at one write of tens of MiB than at the same bytes in pieces of a few
    hundred KiB), from where it lies, not copied into a frame; frames queued
    meanwhile wait, so nothing is interleaved.  `buffered` is every byte
    queued and not yet taken by the kernel: the sender's budget is charged
    with it.  Made inside the connection's event loop."""

    def __init__(self, writer: asyncio.StreamWriter, *, auto_flush: bool = True) -> None:
        self.writer = writer
        self._loop = asyncio.get_running_loop()
        self._auto = auto_flush
        self._queue: list = []  # buffers of whole frames, in order
        self._queued = 0  # their bytes
        self._pieces: list = []  # buffers behind a big one, written by _write_pieces
        self._pieced = 0
        self._piece_task: asyncio.Task | None = None
        self._close_after = False

    @property
    def buffered(self) -> int:
        """Bytes queued here or in the transport, not yet written to the socket."""
        try:
            inner = self.writer.transport.get_write_buffer_size()
        except (AttributeError, RuntimeError):
            inner = 0
        return self._queued + self._pieced + inner

    def queue(self, frame: bytes | list) -> bool:
        """Queue one encoded frame (bytes, or the buffers of frame()); False when
        the connection is closing."""
        if self.writer.is_closing() or self._close_after:
            return False
        if not self._queue and self._auto:
            self._loop.call_soon(self.flush)
        if type(frame) is list:
            self._queue.extend(frame)
            self._queued += sum(len(b) for b in frame)
        else:
            self._queue.append(frame)
            self._queued += len(frame)
        return True

    def send(self, type: str, payload: bytes = b"", **fields: Any) -> bool:  # noqa: A002
        return self.queue(frame(type, payload, **fields))

    async def send_big(self, type: str, payload, **fields: Any) -> bool:  # noqa: A002
        """Like send(), but a big payload is waited for until it is written (in
        pieces, by flush); False when the connection closed before that."""
        if len(payload) <= BIG_FRAME or self.writer.is_closing():
            return self.send(type, payload, **fields)
        if not self.send(type, payload, **fields):
            return False
        self.flush()
        while self._piece_task is not None:
            await asyncio.shield(self._piece_task)
        return not self.writer.is_closing()

    def flush(self) -> None:
        """Hand what is queued to the transport; buffers behind a big one go
        out in pieces, paced by drain()."""
        if not self._queue:
            return
        bufs, self._queue = self._queue, []
        n, self._queued = self._queued, 0
        w = self.writer
        if w.is_closing():
            return
        if self._piece_task is None and not any(len(b) > BIG_FRAME for b in bufs):
            try:
                w.write(bufs[0] if len(bufs) == 1 else b"".join(bufs))
            except (AttributeError, OSError, RuntimeError):
                pass  # (an SSL transport closed under us: the read side ends it)
            return
        self._pieces.extend(bufs)
        self._pieced += n
        if self._piece_task is None:
            self._piece_task = self._loop.create_task(self._write_pieces())

    async def _write_pieces(self) -> None:
        w = self.writer
        try:
            while self._pieces:
                buf = self._pieces.pop(0)
                view = memoryview(buf)
                for i in range(0, len(view), BIG_FRAME):
                    if w.is_closing():
                        return
                    w.write(view[i:i + BIG_FRAME])
                    self._pieced -= min(BIG_FRAME, len(view) - i)
                    await w.drain()
        except (AttributeError, OSError, RuntimeError, ConnectionError):
            pass  # the connection is going: the read side ends it
        finally:
            self._pieces = []
            self._pieced = 0
            self._piece_task = None
            if self._close_after:
                w.close()

    def close(self) -> None:
        """Close once what is queued is written."""
        self.flush()
        self._close_after = True
        if self._piece_task is None:
            self.writer.close()

    async def drain(self) -> None:
        self.flush()
        while self._piece_task is not None:
            await asyncio.shield(self._piece_task)
        await self.writer.drain()


# Payloads above this are not copied into their frame: frame() returns the
# head and the payload as two buffers, written one after the other.
BIG_PAYLOAD = 256 << 10


def frame(type: str, payload: bytes = b"", **fields: Any) -> list:  # noqa: A002
    """One frame as a list of buffers to write in order: [frame] for a small
    payload, [head, payload] for a big one (which is then never copied)."""
    if len(payload) <= BIG_PAYLOAD:
        return [encode(type, payload, **fields)]
    return [encode_head(type, len(payload), **fields), payload]


def decode_header(header: bytes) -> tuple[str, dict]:
    try:
        obj = json.loads(header)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("frame", f"header is not UTF-8 JSON: {e}") from None
    except RecursionError:  # (deeply nested arrays or objects)
        raise ProtocolError("frame", "header is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame", "header is not a JSON object")
    type_ = obj.pop("type", None)
    if not isinstance(type_, str):
        raise ProtocolError("frame", "header has no string 'type'")
    validate(type_, obj)
    return type_, obj


def peek_headers(buf, limit: int) -> list[tuple[str, dict]]:
    """The headers of the whole frames at the start of `buf` (a reader's
    buffer, not consumed), checked as read_message checks them, up to
    `limit` of them; the first that is not whole, or not valid, ends it."""
    out: list[tuple[str, dict]] = []
    off = 0
    while len(out) < limit and off + 8 <= len(buf):
        hlen, plen = _LENGTHS.unpack_from(buf, off)
        end = off + 8 + hlen + plen
        if not 1 <= hlen <= MAX_HEADER or end > len(buf):
            break
        try:
            out.append(decode_header(bytes(buf[off + 8:off + 8 + hlen])))
        except ProtocolError:
            break
        off = end
    return out


def decode_frame(data: bytes) -> Message:
    """One whole frame held in memory (a relayed one): its message, checked
    as read_message checks it; ProtocolError('frame') unless `data` is
    exactly one frame."""
    if len(data) < 8:
        raise ProtocolError("frame", f"a frame of {len(data)} bytes, shorter than its lengths")
    hlen, plen = _LENGTHS.unpack_from(data)
    if not 1 <= hlen <= MAX_HEADER or 8 + hlen + plen != len(data):
        raise ProtocolError("frame", f"a frame of {len(data)} bytes whose lengths say "
                                     f"{hlen} + {plen}")
    type_, fields = decode_header(data[8:8 + hlen])
    return Message(type_, fields, bytes(data[8 + hlen:]))


class ByteBudget:
    """Bytes that many readers share: a reader takes what a big payload needs
    before it reads it, and waits (reading nothing) while the budget is
    spent; first come, first served."""

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self._waiters: list[tuple[int, asyncio.Future]] = []

    async def take(self, n: int) -> int:
        n = min(n, self.total)
        if self._waiters or self.free < n:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((n, fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self.give(n)  # (granted as it was cancelled)
                else:
                    self._waiters.remove((n, fut))
                raise
            return n
        self.free -= n
        return n

    def give(self, n: int) -> None:
        self.free += n
        while self._waiters and self._waiters[0][0] <= self.free:
            want, fut = self._waiters.pop(0)
            if not fut.cancelled():
                self.free -= want
                fut.set_result(None)


async def read_message(reader: asyncio.StreamReader,
                       max_payload: int = DEFAULT_MAX_PAYLOAD,
                       budget: ByteBudget | None = None) -> Message | None:
    """The next message, or None at a clean end of stream (between frames).

    Raises ProtocolError('frame') for a truncated, oversized or malformed
    frame.  With `budget`, a payload of more than 1 MiB is read only once its
    bytes are taken from it; the message's `held` says how many, for the
    caller to give back once it has handled the message.
    """
    try:
        head = await reader.readexactly(8)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError("frame", f"truncated frame: {len(e.partial)} of 8 length bytes")
    hlen, plen = _LENGTHS.unpack(head)
    if not 1 <= hlen <= MAX_HEADER:
        raise ProtocolError("frame", f"header length {hlen} outside 1..{MAX_HEADER}")
    if plen > max_payload:
        raise ProtocolError("frame", f"payload length {plen} exceeds the limit {max_payload}")
    held = 0
    try:
        header = await reader.readexactly(hlen)
        if plen > _READ_PIECE:
            if budget is not None:
                held = await budget.take(plen)
            payload = await _read_big(reader, plen)
        else:
            payload = await reader.readexactly(plen) if plen else b""
        type_, fields = decode_header(header)
    except asyncio.IncompleteReadError as e:
        if held:
            budget.give(held)
        raise ProtocolError("frame", f"truncated frame: stream ended after "
                                     f"{len(e.partial)} of {e.expected} bytes") from None
    except BaseException:
        if held:
            budget.give(held)
        raise
    return Message(type_, fields, payload, held)


_READ_PIECE = 1 << 20


async def _read_big(reader: asyncio.StreamReader, n: int) -> bytearray:
    """`n` bytes, read in pieces into one growing buffer.

    StreamReader.readexactly(n) grows its own buffer to `n` bytes and then
    copies them out (twice when more data follows); for payloads of tens of
    MiB every fresh copy costs about as much as the TLS hop.  Here the
    reader's buffer stays small and is reused, and the bytes are copied
    once, into a bytearray that grows in place (realloc, without the
    zero-filling of bytearray(n)).  The payload is that bytearray.
    """
    buf = bytearray()
    while len(buf) < n:
        chunk = await reader.read(min(n - len(buf), _READ_PIECE))
        if not chunk:
            raise ProtocolError("frame", f"truncated frame: stream ended after "
                                         f"{len(buf)} of {n} payload bytes")
        buf += chunk
    return buf


async def send(writer: asyncio.StreamWriter, type: str, payload: bytes = b"",  # noqa: A002
               **fields: Any) -> None:
    writer.write(encode(type, payload, **fields))
    await writer.drain()


# --- pricing ----------------------------------------------------------------

MS_PER_HOUR = 3_600_000


def cost_milli(cpu_ms: int, price_milli_per_hour: int) -> int:
    """What `cpu_ms` of CPU costs at a price per CPU-hour, rounded up.

    The one pricing rule of the market: escrow, settlement and the buyer
    all use it, in integers.
    """
    if cpu_ms < 0 or price_milli_per_hour < 0:
        raise ValueError(f"cost_milli: negative cpu_ms {cpu_ms} or price {price_milli_per_hour}")
    return -(-cpu_ms * price_milli_per_hour // MS_PER_HOUR)


# --- TLS ----------------------------------------------------------------------

def _load_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """Load a certificate and key held in memory into `ctx`.

    The stdlib's SSLContext.load_cert_chain only reads files.  The key of
    an order lives inside its order file (readable by the daemon alone), so
    writing it to a temporary file would leave a copy on disk, readable by
    whoever wins the race for its name.  An anonymous memory file
    (memfd_create) has no name in any file system; OpenSSL opens it
    through /proc/self/fd, and it vanishes when closed.
    """
    fd = os.memfd_create("cpushare-credentials", os.MFD_CLOEXEC)
    try:
        os.write(fd, (cert_pem.strip() + "\n" + key_pem.strip() + "\n").encode())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as e:
        raise ValueError(f"TLS credentials: the certificate or key is unusable: {e}") from None
    finally:
        os.close(fd)


def _base(purpose: int, ca_pem: str, cert_pem: str, key_pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Only the market's CA: never the system store, so that a public CA can
    # neither impersonate the market nor break it when it changes.
    try:
        ctx.load_verify_locations(cadata=ca_pem)
    except ssl.SSLError as e:
        raise ValueError(f"TLS credentials: the CA certificate is unusable: {e}") from None
    _load_chain(ctx, cert_pem, key_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca_pem: str, cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """For sellers and buyers: verify the server against `ca_pem` only.

    The host name is checked: pass server_hostname=order.host to
    asyncio.open_connection.
    """
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, ca_pem, cert_pem, key_pem)
    ctx.check_hostname = True
    return ctx


def server_context(ca_pem: str, cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """For the market: client certificates of the CA are required."""
    return _base(ssl.PROTOCOL_TLS_SERVER, ca_pem, cert_pem, key_pem)


def link_contexts(ca_pem: str, cert_pem: str,
                  key_pem: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for a link between the market's own
    processes: each end shows a certificate of `ca_pem`; no host name is
    checked (the caller checks the peer's common name)."""
    client = _base(ssl.PROTOCOL_TLS_CLIENT, ca_pem, cert_pem, key_pem)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_REQUIRED
    return server_context(ca_pem, cert_pem, key_pem), client


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, str]:
    """(SHA-256 hex fingerprint of the peer's certificate, its subject CN)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise ProtocolError("auth", "the peer presented no certificate")
    cn = ""
    for rdn in ssl_object.getpeercert().get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
    return hashlib.sha256(der).hexdigest(), cn


def fingerprint_pem(cert_pem: str) -> str:
    """The fingerprint peer_identity() gives for a PEM certificate."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_pem.strip())).hexdigest()
