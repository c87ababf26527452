"""The buyer SDK's plain pieces: errors, the reconnection clock and
backoff, a task's result, and the certificate check a dropped handshake
needs."""

from __future__ import annotations

import asyncio
import random
import ssl
from dataclasses import dataclass, field

from .. import protocol
from ..protocol import Message


class MarketError(Exception):
    """The market refused a request or the connection failed for good."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _Unreachable(MarketError):
    """No TCP connection to the market at all (nothing listens, no route,
    no such host, no answer): the first try of a first connection gives up
    at once, any other tries again."""

    def __init__(self, message: str):
        super().__init__("connect", message)


# Only these answers of the market stop the connecting; anything else that
# ends a connection before or after `welcome` is a lost connection.
REFUSALS = ("auth", "version")


class Clock:
    """The time and the sleeps of reconnecting: the event loop's.  Tests
    pass a clock of their own, so that backoff runs without real waits."""

    def time(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass
class Backoff:
    """Exponential backoff with full jitter: the wait before retry n
    (from 0) is uniform in [0, min(cap, base x 2^n)]."""

    base: float = 0.1
    cap: float = 10.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, n: int) -> float:
        return self.rng.uniform(0.0, min(self.cap, self.base * 2.0 ** min(n, 64)))


def certificate_problem(ca_pem: str, cert_pem: str, key_pem: str) -> str | None:
    """Why a market of this CA would refuse this certificate in the TLS
    handshake (it has expired, is not yet valid, or is not of this CA), or
    None.  Found by a handshake in memory in which our own certificate is
    checked the way the market checks it: the market drops such a
    connection without a word, which a client cannot tell from a market
    that restarts."""
    server = protocol.server_context(ca_pem, cert_pem, key_pem)
    client = protocol.client_context(ca_pem, cert_pem, key_pem)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # the other end is ourselves
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(4):  # TLS 1.3 takes two turns
        for end, out, into in ((c, c_out, s_in), (s, s_out, c_in)):
            try:
                end.do_handshake()
                if end is s:
                    return None
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as e:
                return e.verify_message or str(e)
            into.write(out.read())
    raise RuntimeError("certificate_problem: the handshake in memory did not end")


@dataclass(frozen=True)
class TaskResult:
    ref: str
    task: int | None
    exit_status: int | None
    signal: int | None
    reason: str
    cpu_ms: int
    cost_milli: int
    attempts: int
    output: bytes
    code: str | None = None  # set when the market failed the task (`failed`)
    index: int = -1  # position of the task's input in what was passed to map()

    @property
    def ok(self) -> bool:
        """The market accepted a result and the job exited with status 0."""
        return self.code is None and self.exit_status == 0 and self.signal is None


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and not isinstance(e, ssl.SSLError):
        return e.strerror
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


def _result(msg: Message, index: int) -> TaskResult:
    if msg.type == "done":
        return TaskResult(ref=msg["ref"], task=msg["task"], exit_status=msg["exit_status"],
                          signal=msg["signal"], reason=msg["reason"], cpu_ms=msg["cpu_ms"],
                          cost_milli=msg["cost_milli"], attempts=msg["attempts"],
                          output=msg.payload, index=index)
    return TaskResult(ref=msg["ref"], task=msg.get("task"), exit_status=None, signal=None,
                      reason=f"{msg['code']}: {msg['message']}", cpu_ms=0, cost_milli=0,
                      attempts=0, output=b"", code=msg["code"], index=index)
