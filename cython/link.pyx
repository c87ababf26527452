# cython: language_level=3
"""cpushare._link: the encrypted link's datagram layer (private).

The public face is cpushare.vpn.datagram; the format is docs/vpn.md.  The
per-datagram work is C (linkcore.c): AES-256-GCM through OpenSSL's EVP with
one context per key, the replay window, and the Pump, which moves frames
between local ends and a UDP socket in batches with the GIL released.
System failures raise OSError(errno, "call(...): strerror").
"""

import os
import socket
import struct
from collections import namedtuple

from libc.errno cimport errno, EEXIST, EINTR
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct sockaddr_storage:
        pass

cdef extern from "linkcore.h" nogil:
    int LK_VERSION, LK_TYPE_DATA, LK_TYPE_KEEPALIVE, LK_HEADER, LK_TAG, LK_OVERHEAD, LK_KEY
    int LK_MIN_FRAME, LK_MAX_FRAME, LK_MAX_DATAGRAM, LK_WINDOW_BITS, LK_WINDOW, LK_MAX_BATCH
    enum: LK_SLOT
    int LK_E_EXHAUSTED, LK_E_CRYPTO

    ctypedef struct lk_sealer:
        uint64_t counter, limit
        int attached
    ctypedef struct lk_opener:
        uint64_t top, opened, malformed, forged, replayed, too_old
        int attached
    ctypedef struct lk_header:
        uint8_t type
        uint32_t link_id
        uint64_t counter
    ctypedef struct lk_link:
        uint32_t link_id
        int fd, is_sock, dead
        sockaddr_storage peer
        socklen_t peer_len
        uint64_t frames_out, bytes_out, frames_in, bytes_in
        uint64_t keepalives_out, keepalives_in, peer_changes
        uint64_t no_peer, exhausted, bad_frames, local_errors, send_errors
        double last_heard, last_sent
    ctypedef struct lk_pump_counters:
        uint64_t malformed, unknown_link, udp_errors, rounds, gso_sends, gro_receives
    ctypedef struct lk_pump:
        const char *err_call
        int gso, gro
        size_t gso_max

    uint64_t lk_load(const uint64_t *x)
    int lk_sealer_init(lk_sealer *s, const uint8_t *key, uint32_t salt, uint64_t limit)
    void lk_sealer_grant(lk_sealer *s, uint64_t limit)
    void lk_sealer_free(lk_sealer *s)
    int lk_opener_init(lk_opener *o, const uint8_t *key, uint32_t salt)
    void lk_opener_free(lk_opener *o)
    long lk_seal(lk_sealer *s, int type, uint32_t link_id, uint8_t *buf, size_t len)
    long lk_open(lk_opener *o, uint8_t *buf, size_t len, lk_header *h)
    lk_pump *lk_pump_new(int udp_fd, int batch, int follow, double keepalive)
    void lk_pump_free(lk_pump *p)
    int lk_pump_add(lk_pump *p, uint32_t link_id, int fd, lk_sealer *s, lk_opener *o,
                    const sockaddr *peer, socklen_t peer_len)
    int lk_pump_remove(lk_pump *p, uint32_t link_id)
    int lk_pump_rekey(lk_pump *p, uint32_t link_id, lk_sealer *s, lk_opener *o,
                      lk_sealer **old_s, lk_opener **old_o)
    int lk_pump_set_peer(lk_pump *p, uint32_t link_id, const sockaddr *peer, socklen_t len)
    size_t lk_pump_snapshot(lk_pump *p, lk_link *out, size_t max, lk_pump_counters *c)
    size_t lk_pump_count(lk_pump *p)
    int lk_pump_run(lk_pump *p)
    int lk_pump_stop(lk_pump *p)


VERSION = LK_VERSION
TYPE_DATA = LK_TYPE_DATA
TYPE_KEEPALIVE = LK_TYPE_KEEPALIVE
HEADER_SIZE = LK_HEADER
TAG_SIZE = LK_TAG
OVERHEAD = LK_OVERHEAD
KEY_SIZE = LK_KEY
MIN_FRAME = LK_MIN_FRAME
MAX_FRAME = LK_MAX_FRAME
MAX_DATAGRAM = LK_MAX_DATAGRAM
WINDOW = LK_WINDOW
MAX_BATCH = LK_MAX_BATCH
COUNTER_MAX = 2**64 - 1

Opened = namedtuple("Opened", "type link_id counter payload")
Opened.__doc__ = "An authenticated datagram: its type, link id, counter and plaintext."


class KeyExhausted(RuntimeError):
    """The sealer's counter reached its limit: the link needs a new key."""


cdef _oserror(int err, str call):
    return OSError(err, f"{call}: {os.strerror(err)}")


cdef _crypto_error(str what):
    return RuntimeError(f"OpenSSL: {what} failed (AES-256-GCM)")


cdef uint32_t _u32(value, str name) except? 0:
    v = int(value)
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"{name} {v} is not a 32-bit unsigned integer")
    return v


cdef bytes _key(key):
    k = bytes(key)
    if len(k) != LK_KEY:
        raise ValueError(f"a key is {LK_KEY} bytes, not {len(k)}")
    return k


cdef int _fileno(obj) except -1:
    fd = obj if isinstance(obj, int) else obj.fileno()
    if fd < 0:
        raise ValueError(f"descriptor {fd} is closed")
    return fd


cdef bytes _sockaddr(peer):
    """(host, port) with a numeric IPv4 or IPv6 host, as a struct sockaddr."""
    host, port = peer[0], int(peer[1])
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    if ":" in host:
        flow = int(peer[2]) if len(peer) > 2 else 0
        scope = int(peer[3]) if len(peer) > 3 else 0
        return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, flow)
                + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", scope))
    return (struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
            + socket.inet_pton(socket.AF_INET, host) + bytes(8))


cdef object _peer_tuple(const uint8_t *sa, socklen_t n):
    if n == 0:
        return None
    raw = (<const char *>sa)[:n]
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET6:
        port, flow = struct.unpack_from("!HI", raw, 2)
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow,
                struct.unpack_from("=I", raw, 24)[0])
    if family == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0])
    return None


cdef class Sealer:
    """Seals datagrams of one direction of one link: Sealer(key, salt, limit, start).

    key: 32 random bytes, used for nothing else; salt: the direction's
    32-bit nonce prefix; limit: the highest counter this key may seal;
    start: the last counter this key may have sealed before (0: none; a
    new end of a link that went on under the same key starts past every
    counter the old one was allowed: grant() raised its limit step by
    step).  Past the limit seal() raises KeyExhausted, and a pump counts
    the frame `exhausted` and drops it."""
    cdef lk_sealer s
    cdef bint ready

    def __cinit__(self, key, salt, limit=2**32, start=0):
        cdef bytes k = _key(key)
        cdef uint32_t sl = _u32(salt, "salt")
        lim, first = int(limit), int(start)
        if not 1 <= lim <= COUNTER_MAX:
            raise ValueError(f"limit {lim} is not in 1..2**64-1")
        if not 0 <= first <= lim:
            raise ValueError(f"start {first} is not in 0..limit ({lim})")
        if lk_sealer_init(&self.s, <const uint8_t *><const char *>k, sl, lim) < 0:
            raise _crypto_error("EVP_EncryptInit_ex")
        self.s.counter = first
        self.ready = True

    def grant(self, limit):
        """Raises the limit to `limit` (a lower one changes nothing); safe
        while a pump seals with it."""
        lim = int(limit)
        if not 1 <= lim <= COUNTER_MAX:
            raise ValueError(f"limit {lim} is not in 1..2**64-1")
        lk_sealer_grant(&self.s, lim)

    def __dealloc__(self):
        if self.ready:
            lk_sealer_free(&self.s)

    @property
    def counter(self):
        """The last counter sealed (0: none yet)."""
        return lk_load(&self.s.counter)

    @property
    def limit(self):
        return lk_load(&self.s.limit)

    @property
    def remaining(self):
        """How many more datagrams this key may seal."""
        return lk_load(&self.s.limit) - lk_load(&self.s.counter)

    def seal(self, int type, link_id, payload=b""):
        """The datagram carrying payload (one Ethernet frame, or b"" for a keepalive)."""
        cdef const uint8_t[::1] pl = bytes(payload)
        cdef Py_ssize_t n = pl.shape[0]
        cdef uint8_t buf[LK_SLOT]
        cdef uint32_t lid = _u32(link_id, "link id")
        cdef long r
        if self.s.attached:
            raise RuntimeError("this sealer belongs to a running pump")
        if type == LK_TYPE_DATA:
            if not LK_MIN_FRAME <= n <= LK_MAX_FRAME:
                raise ValueError(f"a frame is {LK_MIN_FRAME}..{LK_MAX_FRAME} bytes, not {n}")
        elif type == LK_TYPE_KEEPALIVE:
            if n:
                raise ValueError("a keepalive carries nothing")
        else:
            raise ValueError(f"unknown datagram type {type}")
        if n:
            memcpy(buf + LK_HEADER, &pl[0], n)
        r = lk_seal(&self.s, type, lid, buf, n)
        if r == LK_E_EXHAUSTED:
            raise KeyExhausted(f"the key has sealed its {lk_load(&self.s.limit)} datagrams: "
                               "the link needs a new key")
        if r < 0:
            raise _crypto_error("EVP_EncryptUpdate")
        return PyBytes_FromStringAndSize(<const char *>buf, r)


cdef class Opener:
    """Opens datagrams of one direction of one link: Opener(key, salt).

    open() returns None for anything it refuses, and counts why: malformed,
    forged (authentication failed: also a wrong key), replayed, too_old
    (behind the replay window)."""
    cdef lk_opener o
    cdef bint ready

    def __cinit__(self, key, salt):
        cdef bytes k = _key(key)
        if lk_opener_init(&self.o, <const uint8_t *><const char *>k, _u32(salt, "salt")) < 0:
            raise _crypto_error("EVP_DecryptInit_ex")
        self.ready = True

    def __dealloc__(self):
        if self.ready:
            lk_opener_free(&self.o)

    def open(self, datagram):
        """Opened(type, link_id, counter, payload), or None."""
        cdef const uint8_t[::1] d = bytes(datagram)
        cdef Py_ssize_t n = d.shape[0]
        cdef uint8_t buf[LK_SLOT]
        cdef lk_header h
        cdef long r
        if self.o.attached:
            raise RuntimeError("this opener belongs to a running pump")
        if n < LK_OVERHEAD or n > LK_MAX_DATAGRAM:
            self.o.malformed += 1
            return None
        memcpy(buf, &d[0], n)
        r = lk_open(&self.o, buf, n, &h)
        if r < 0:
            return None
        return Opened(h.type, h.link_id, h.counter,
                      PyBytes_FromStringAndSize(<const char *>buf + LK_HEADER, r))

    @property
    def top(self):
        """The highest counter authenticated so far."""
        return lk_load(&self.o.top)

    @property
    def opened(self):
        return lk_load(&self.o.opened)

    @property
    def malformed(self):
        return lk_load(&self.o.malformed)

    @property
    def forged(self):
        return lk_load(&self.o.forged)

    @property
    def replayed(self):
        return lk_load(&self.o.replayed)

    @property
    def too_old(self):
        return lk_load(&self.o.too_old)

    def counts(self):
        return {"opened": self.opened, "malformed": self.malformed, "forged": self.forged,
                "replayed": self.replayed, "too_old": self.too_old}


_LINK_FIELDS = ("frames_out", "bytes_out", "frames_in", "bytes_in", "keepalives_out",
                "keepalives_in", "peer_changes", "no_peer", "exhausted", "bad_frames",
                "local_errors", "send_errors")


cdef class Pump:
    """Moves frames between local ends and one UDP socket, in C, in batches.

    Pump(udp, batch=64, follow=True, keepalive=0.0): udp is the UDP socket
    (or its descriptor).  Each link (add) has a local end (a connected unix
    datagram socket, or a TAP descriptor, made non-blocking), a Sealer and
    an Opener that belong to the pump until removed (or the pump is gone),
    and a peer address, (numeric host, port), None until an authenticated
    datagram names it.  follow: the peer
    becomes the source of the latest authenticated datagram.  keepalive:
    seconds without sending after which a link sends a keepalive (0: never).
    run() blocks with the GIL released until stop()."""
    cdef lk_pump *p
    cdef dict links
    cdef object udp

    def __cinit__(self, udp, *, int batch=64, bint follow=True, double keepalive=0.0):
        if not 1 <= batch <= LK_MAX_BATCH:
            raise ValueError(f"batch {batch} is not in 1..{LK_MAX_BATCH}")
        if keepalive < 0:
            raise ValueError("keepalive is a number of seconds >= 0")
        self.p = lk_pump_new(_fileno(udp), batch, follow, keepalive)
        if self.p == NULL:
            raise _oserror(errno, "eventfd()")
        self.udp = udp
        self.links = {}

    def __dealloc__(self):
        if self.p != NULL:
            lk_pump_free(self.p)

    def add(self, link_id, local, Sealer sealer not None, Opener opener not None, peer=None):
        cdef uint32_t lid = _u32(link_id, "link id")
        cdef bytes sa = _sockaddr(peer) if peer is not None else b""
        if sealer.s.attached or opener.o.attached:
            raise ValueError("this sealer or opener already belongs to a pump")
        r = lk_pump_add(self.p, lid, _fileno(local), &sealer.s, &opener.o,
                        <const sockaddr *><const char *>sa, len(sa))
        if r == -EEXIST:
            raise ValueError(f"link {lid} is already in this pump")
        if r < 0:
            raise _oserror(-r, f"lk_pump_add(link {lid})")
        self.links[lid] = (local, sealer, opener)

    def remove(self, link_id):
        """Takes a link out; its sealer and opener are free again."""
        cdef uint32_t lid = _u32(link_id, "link id")
        if lk_pump_remove(self.p, lid) < 0:
            raise KeyError(lid)
        del self.links[lid]

    def rekey(self, link_id, Sealer sealer not None, Opener opener not None):
        """New keys for a link, keeping its local end, peer and counters."""
        cdef uint32_t lid = _u32(link_id, "link id")
        cdef lk_sealer *old_s
        cdef lk_opener *old_o
        if sealer.s.attached or opener.o.attached:
            raise ValueError("this sealer or opener already belongs to a pump")
        if lk_pump_rekey(self.p, lid, &sealer.s, &opener.o, &old_s, &old_o) < 0:
            raise KeyError(lid)
        self.links[lid] = (self.links[lid][0], sealer, opener)

    def set_peer(self, link_id, peer):
        cdef uint32_t lid = _u32(link_id, "link id")
        cdef bytes sa = _sockaddr(peer)
        if lk_pump_set_peer(self.p, lid, <const sockaddr *><const char *>sa, len(sa)) < 0:
            raise KeyError(lid)

    def peer(self, link_id):
        """The link's current peer address, or None."""
        return self.stats()["links"][_u32(link_id, "link id")]["peer"]

    def stats(self):
        """The pump's counters and each link's, in one consistent snapshot."""
        cdef size_t n = lk_pump_count(self.p) + 16
        cdef lk_link *buf = <lk_link *>malloc(n * sizeof(lk_link))
        cdef lk_pump_counters c
        cdef lk_link *l
        if buf == NULL:
            raise MemoryError()
        try:
            n = lk_pump_snapshot(self.p, buf, n, &c)
            links = {}
            for i in range(n):
                l = &buf[i]
                d = {name: v for name, v in zip(_LINK_FIELDS, (
                    l.frames_out, l.bytes_out, l.frames_in, l.bytes_in, l.keepalives_out,
                    l.keepalives_in, l.peer_changes, l.no_peer, l.exhausted, l.bad_frames,
                    l.local_errors, l.send_errors))}
                d.update(peer=_peer_tuple(<const uint8_t *>&l.peer, l.peer_len),
                         last_heard=l.last_heard or None, last_sent=l.last_sent or None,
                         dead=bool(l.dead), local="socket" if l.is_sock else "tap")
                entry = self.links.get(l.link_id)
                if entry is not None:
                    d.update(entry[2].counts())
                    d["sealed"] = entry[1].counter
                    d["remaining"] = entry[1].remaining
                links[l.link_id] = d
        finally:
            free(buf)
        return {"malformed": c.malformed, "unknown_link": c.unknown_link,
                "udp_errors": c.udp_errors, "rounds": c.rounds, "gso": bool(self.p.gso),
                "gso_max": self.p.gso_max,
                "gro": bool(self.p.gro), "gso_sends": c.gso_sends,
                "gro_receives": c.gro_receives, "links": links}

    def run(self):
        """Moves frames until stop(); OSError if the UDP socket fails."""
        cdef int r
        while True:
            with nogil:
                r = lk_pump_run(self.p)
            if r == -EINTR:            # Python's signal handlers first
                PyErr_CheckSignals()
                continue
            if r < 0:
                raise _oserror(-r, self.p.err_call.decode())
            return

    def stop(self):
        """Makes run() return (also a run() that has not started yet)."""
        r = lk_pump_stop(self.p)
        if r < 0:
            raise _oserror(-r, "write(eventfd)")
