"""A whole market on loopback for the seller, buyer and end-to-end tests.

No tests here: the helpers the test modules share (and bench/ reuses).
Everything is real: `cpushare.market` is run through its admin CLI and as
a server process, sellers are `python -m cpushare.seller` processes, TLS is
the market's own CA.

The jobs are tiny machine-code images (one text, three entry points), so
the tests do not depend on a compiler:

    echo   copy stdin to stdout, exit 0
    spin   read a u64 count n, spin n times, write the count back, echo the rest
    bad    make a forbidden system call (getpid): the sandbox kills it
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cpushare import bytecode

PYTHON = "/usr/bin/python3"
SRC = str(Path(__file__).resolve().parent.parent / "src")

# as(1) of the .S in the module docstring of tests/test_e2e_support.py; see
# JOB_SOURCE below for the source.
_TEXT = bytes.fromhex(
    "4989e44981ec00000100eb364989e44981ec0000010031c031ff4c89e6ba080000000f054883f8"
    "0875574d8b2c244d85ed740549ffcd75fbba080000004c89e6eb1b31c031ff4c89e6ba00000100"
    "0f054885c07423782a4889c24c89e6b801000000bf010000000f054885c07e134801c64829c275"
    "e7ebcab83c00000031ff0f05b83c000000bf030000000f05b8270000000f05ebe2")
_ENTRIES = {"echo": 0x00, "spin": 0x0C, "bad": 0x8D}

JOB_SOURCE = """
_start:    mov r12, rsp; sub r12, 65536; jmp rd          # echo
spin_entry:mov r12, rsp; sub r12, 65536
           read(0, r12, 8); cmp rax, 8; jne fail
           mov r13, [r12]; test r13, r13; jz spun
spin:      dec r13; jnz spin
spun:      mov edx, 8; mov rsi, r12; jmp wl            # write the count back
rd:        read(0, r12, 65536); jz done; js fail
           mov rdx, rax; mov rsi, r12
wl:        write(1, rsi, rdx) until all written; jmp rd
done:      exit(0)
fail:      exit(3)
bad_entry: getpid(); jmp done
"""


def job(name: str) -> bytecode.Image:
    """The test image `name` ('echo', 'spin' or 'bad')."""
    return bytecode.Image(text=_TEXT, entry=bytecode.DEFAULT_TEXT_ADDRESS + _ENTRIES[name],
                          stack_size=1 << 20).validate()


def spin_input(count: int, rest: bytes = b"") -> bytes:
    return struct.pack("<Q", count) + rest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + (":" + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("CPUSHARE_TEST_CORRUPT", None)
    return e


def wait_for(predicate, timeout: float = 20, what: str = "condition", interval: float = 0.05):
    """The predicate's first true value, polled until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process whose stderr goes to a file we can search."""

    def __init__(self, argv: list[str], log: Path, name: str):
        self.name = name
        self.argv = argv
        self.log = log
        self._f = open(log, "ab")
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._f,
                                  stderr=subprocess.STDOUT, env=env())

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        self.p.send_signal(sig)

    def kill9(self) -> None:
        self.p.kill()
        self.p.wait(10)

    def stop(self, timeout: float = 10) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self._f.close()
        return self.p.returncode


class LocalMarket:
    """One market server on 127.0.0.1 with its store in `root`.

    `host` and `wrap` put it elsewhere: the server listens on `host`, and
    its argv and each seller's start with `wrap` (`ip netns exec NS`; see
    tests/netns.py); `wrap_seller` gives a seller its own."""

    def __init__(self, root: Path, *, price: str = "0.010", host: str = "127.0.0.1",
                 wrap: list[str] | None = None, db: str | None = None):
        self.host = host
        self.wrap = list(wrap or [])
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = db or self.root / "market.db"  # (a path, or a postgresql:// URL)
        self.port = free_port()
        self.server: Proc | None = None
        self.sellers: dict[str, Proc] = {}
        self.procs: list[Proc] = []
        images = ["--images", str(self.root / "images")] if db else []
        self.cli(*images, "init", "--listen", f"{host}:{self.port}")

    # --- admin CLI ----------------------------------------------------------
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([PYTHON, "-m", "cpushare.market", "--db", str(self.db), *args],
                           capture_output=True, text=True, env=env(), timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"cpushare.market {' '.join(args)} exited {p.returncode}:\n"
                                 f"{p.stdout}{p.stderr}")
        return p

    def account(self, name: str, coins: int | str = 0) -> None:
        self.cli("account", "add", name, "--coins", str(coins))

    def sell_order(self, account: str, name: str, price: str = "0.010", **kw) -> Path:
        path = self.root / f"{name}.cpu"
        self.cli("sell-order", "add", account, "--price", price, "--output", str(path),
                 *[a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))])
        return path

    def buy_order(self, account: str, name: str = "buyer", price: str = "1.000",
                  redundancy: int = 1, max_cpu_seconds: int = 10) -> Path:
        path = self.root / f"{name}.buy"
        self.cli("buy-order", "add", account, "--price", price, "--redundancy", str(redundancy),
                 "--max-cpu-seconds", str(max_cpu_seconds), "--output", str(path))
        return path

    def balance_milli(self, account: str) -> int:
        out = self.cli("balance", account).stdout.strip()
        m = re.fullmatch(rf"{re.escape(account)}\s+(-?)(\d+)\.(\d{{3}})", out)
        assert m, f"balance {account}: unexpected output {out!r}"
        milli = int(m.group(2)) * 1000 + int(m.group(3))
        return -milli if m.group(1) else milli

    def ca_credentials(self) -> tuple[str, str]:
        """(CA certificate, CA key) PEMs of this market, to forge test certificates."""
        if isinstance(self.db, str):  # postgresql://
            from cpushare.market.store.pg import PostgresStore
            store = PostgresStore(self.db)
            try:
                return store.get_meta("ca_cert"), store.get_meta("ca_key")
            finally:
                store.close()
        import sqlite3
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('ca_cert', 'ca_key')"))
        finally:
            db.close()
        return meta["ca_cert"], meta["ca_key"]

    def ledger_check(self) -> subprocess.CompletedProcess:
        return self.cli("ledger", "check", check=False)

    # --- processes ------------------------------------------------------------
    def serve(self, *extra: str) -> Proc:
        n = sum(1 for p in self.procs if p.name == "server")
        self.server = Proc([*self.wrap, PYTHON, "-m", "cpushare.market", "--db", str(self.db),
                            "serve", *extra], self.root / f"server{n}.log", "server")
        self.procs.append(self.server)

        def listening():
            if not self.server.alive():
                raise AssertionError(f"the server exited:\n{self.server.text()}")
            if self.wrap:
                probe = (f"import socket; socket.create_connection(({self.host!r}, "
                         f"{self.port}), 0.5).close()")
                return subprocess.run([*self.wrap, PYTHON, "-c", probe],
                                      capture_output=True).returncode == 0
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
                return True
            except OSError:
                return False
        wait_for(listening, 30, f"the server to listen on {self.port}")
        return self.server

    def seller(self, order: Path, *extra: str, wait: bool = True,
               wrap: list[str] | None = None) -> Proc:
        name = order.stem
        log = self.root / f"seller-{name}.log"
        p = Proc([*(self.wrap if wrap is None else wrap), PYTHON, "-m", "cpushare.seller", str(order), "--cache-dir",
                  str(self.root / f"cache-{name}"), *extra], log, name)
        self.sellers[name] = p
        self.procs.append(p)
        if wait:
            self.wait_connected(name)
        return p

    def wait_connected(self, name: str, count: int = 1, timeout: float = 30) -> None:
        p = self.sellers[name]

        def connected():
            if not p.alive():
                raise AssertionError(f"seller {name} exited:\n{p.text()}")
            return p.text().count("connected to") >= count
        wait_for(connected, timeout, f"seller {name} to connect ({count})")

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def spin_count_for(seconds: float) -> int:
    """A spin count that takes roughly `seconds` of CPU on this machine
    (calibrated with the spin job itself in the local sandbox)."""
    from cpushare import sandbox
    n = 20_000_000
    limits = sandbox.Limits(cpu_seconds=30, wall_seconds=60, memory=64 << 20, output=1 << 20)
    r = sandbox.run(job("spin"), spin_input(n), limits)
    assert r.exit_status == 0, r
    return int(seconds * n / max(r.cpu_seconds, 1e-4))


class BuyerThread:
    """Run Market.map in a background thread; results collected as they come."""

    def __init__(self, order_path: Path, image, inputs, **kw):
        from cpushare.order import load_buy
        self.order = load_buy(order_path)
        self.results = []
        self.error: BaseException | None = None
        self.market: Market | None = None
        self._t = threading.Thread(target=self._run, args=(image, list(inputs), kw), daemon=True)
        self._t.start()

    def _run(self, image, inputs, kw):
        from cpushare.buyer import Market

        async def go():
            async with Market(self.order) as m:
                self.market = m
                async for r in m.map(image, inputs, **kw):
                    self.results.append(r)
        try:
            asyncio.run(go())
        except BaseException as e:  # reported by join()
            self.error = e

    def join(self, timeout: float):
        self._t.join(timeout)
        assert not self._t.is_alive(), f"the buyer did not finish within {timeout} s " \
                                       f"({len(self.results)} results)"
        if self.error:
            raise self.error
        return self.results




@pytest.fixture
def market(tmp_path):
    """A served loopback market: buyer (1000 CPUCoins), alice and bob."""
    m = LocalMarket(tmp_path / "market")
    m.account("buyer", 1000)
    m.account("alice")
    m.account("bob")
    m.serve()
    yield m
    m.close()


def qemu_processes(root) -> list[int]:
    """PIDs of the qemu processes booting an ISO from a seller cache under
    `root` (a test's market: the ISO's path is on qemu's command line)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if (cmd and cmd[0].endswith(b"qemu-system-x86_64")
                    and os.fsencode(root) in b" ".join(cmd)):
                out.append(int(d))
    return out
