"""The market server as bench/connections.py runs it, with its probes.

    python -m bench.connections_server --db DB serve ...    (cpushare-server's arguments)

It is `python -m cpushare.market` and nothing else, unless
CPUSHARE_BENCH_PROBE names probes (comma-separated); they live here, in the
bench, not in the market:

    tracemalloc         trace Python allocations (one frame each)
    keep_ssl_buffers    clear OpenSSL's SSL_MODE_RELEASE_BUFFERS on the market's
                        TLS context (what OpenSSL's idle buffers would cost)
    ssl_read=N          asyncio's own SSL transport reads into buffers of N bytes
                        (sslproto.SSLProtocol.max_size; it is 256 KiB)

On SIGUSR1 it writes what it measures to $CPUSHARE_BENCH_STATS (JSON): its
/proc/self/smaps_rollup, glibc's mallinfo2 (the C heap: OpenSSL's part),
the Python objects by type, and with tracemalloc the allocations by line.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import runpy
import signal
import sys
import tracemalloc

PROBES = [p for p in os.environ.get("CPUSHARE_BENCH_PROBE", "").split(",") if p]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def _mallinfo() -> dict:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    # in use: small blocks from the heap (uordblks) and big ones mmapped (hblkhd)
    return {"in_use_kib": (m.uordblks + m.hblkhd) // 1024, "mmapped_kib": m.hblkhd // 1024,
            "heap_kib": m.arena // 1024, "free_in_heap_kib": m.fordblks // 1024}


def _smaps() -> dict:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def _stats(signum, frame) -> None:
    gc.collect()
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    stats = {"smaps_rollup_kib": _smaps(), "malloc": _mallinfo(),
             "objects": dict(types.most_common(40)), "probes": PROBES}
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        total = sum(s.size for s in snap.statistics("filename"))
        stats["tracemalloc_kib"] = total // 1024
        stats["tracemalloc_lines"] = [
            {"where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
             "kib": round(s.size / 1024, 1), "count": s.count}
            for s in snap.statistics("lineno")[:40]]
    path = os.environ["CPUSHARE_BENCH_STATS"]
    with open(path + ".tmp", "w") as f:
        json.dump(stats, f)
    os.replace(path + ".tmp", path)


def _keep_ssl_buffers() -> None:
    from cpushare import protocol
    libssl = ctypes.CDLL("libssl.so.3")
    libssl.SSL_CTX_ctrl.restype = ctypes.c_long
    libssl.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                    ctypes.c_void_p]
    made = protocol.server_context

    def server_context(*a, **kw):
        ctx = made(*a, **kw)
        # PySSLContext: the object's head, then its SSL_CTX *
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        SSL_CTRL_CLEAR_MODE, SSL_MODE_RELEASE_BUFFERS = 78, 0x10
        libssl.SSL_CTX_ctrl(ptr, SSL_CTRL_CLEAR_MODE, SSL_MODE_RELEASE_BUFFERS, None)
        return ctx
    protocol.server_context = server_context
    from cpushare.market import admin
    if hasattr(admin, "server_context"):
        admin.server_context = server_context


def main() -> None:
    if "tracemalloc" in PROBES:
        tracemalloc.start(1)
    if "keep_ssl_buffers" in PROBES:
        _keep_ssl_buffers()
    for p in PROBES:
        if p.startswith("ssl_read="):
            import asyncio.sslproto
            asyncio.sslproto.SSLProtocol.max_size = int(p.split("=", 1)[1])
    if os.environ.get("CPUSHARE_BENCH_STATS"):
        signal.signal(signal.SIGUSR1, _stats)
    sys.argv = ["cpushare.market"] + sys.argv[1:]
    runpy.run_module("cpushare.market", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
