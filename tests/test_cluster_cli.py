"""`cpushare cluster`, for real: a market server process, two kvm sellers
booting the test ISO under qemu (TCG), and the command run as the buyer
runs it (`python -m cpushare cluster ...`, its state under a private
XDG_STATE_HOME).  One market and its sellers serve the whole module.
The state directory's pieces (lock, console files) are tested alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import guestiso
from cpushare.buyer.clusterstate import ClusterError, ConsoleLog, ConsoleReader, StateDir
from test_e2e_support import PYTHON, LocalMarket, env, qemu_processes, wait_for

needs_qemu = pytest.mark.skipif(guestiso.missing_qemu() is not None,
                                reason=str(guestiso.missing_qemu()))

MARKER = guestiso.MARKER
BOOT = 180  # seconds a TCG boot may take here, loaded (about 15 s alone)
ASK, BID = "36.000", "72.000"  # CPUCoins per CPU-hour
COINS = 100_000


@pytest.fixture(scope="module")
def iso() -> Path:
    return guestiso.iso_path("marker")


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    m = LocalMarket(tmp_path_factory.mktemp("market"))
    m.account("buyer", COINS)
    m.serve()
    for account, name in (("alice", "a0"), ("bob", "b0")):
        m.account(account)
        order = m.sell_order(account, name, price=ASK, model="kvm", memory="512M", accel="tcg")
        m.seller(order, "--meter-interval", "1")
    m.order = m.root / "buyer.buy"
    m.cli("buy-order", "add", "buyer", "--price", BID, "--model", "kvm", "--memory", "256M",
          "--max-nodes", "4", "--max-cpu-seconds", "3600", "--output", str(m.order))
    yield m
    m.close()
    for pid in _qemus(m):  # (a seller that did not stop leaves its qemu)
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


def _env(state: Path) -> dict:
    return dict(env(), XDG_STATE_HOME=str(state))


def cluster(state: Path, *args: str, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "cpushare", "cluster", *args], env=_env(state),
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def _qemus(m: LocalMarket) -> set[int]:
    """The qemu processes of the market's sellers (their ISO is in their cache)."""
    return set(qemu_processes(m.root))


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie does not: the agent's parent exited,
    and who adopts it may not reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _balances(m: LocalMarket) -> dict[str, int]:
    return {a: m.balance_milli(a) for a in ("buyer", "alice", "bob")}


def _paid(m: LocalMarket, before: dict[str, int]) -> tuple[int, int]:
    """(what the buyer spent, what the sellers earned) since `before`."""
    now = _balances(m)
    return (before["buyer"] - now["buyer"],
            now["alice"] - before["alice"] + now["bob"] - before["bob"])


def _request(state: Path, name: str, raw: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(state / "cpushare" / "clusters" / name / "control"))
        s.sendall(raw)
        answer = b""
        while not answer.endswith(b"\n"):
            piece = s.recv(65536)
            assert piece, f"no answer to {raw!r}"
            answer += piece
    return json.loads(answer)


@needs_qemu
def test_a_detached_cluster_runs_answers_and_comes_down(market, state, iso):
    before = _balances(market)
    t0 = time.monotonic()
    r = cluster(state, "up", "--order", str(market.order), "--iso", str(iso), "--nodes", "2",
                "--name", "t", "--detach", "--timeout", str(BOOT), timeout=BOOT + 60)
    up_seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every node runs" in r.stdout, r.stdout
    for node in ("node0", "node1"):
        assert f"{node}  running  " in r.stdout, r.stdout
    d = state / "cpushare" / "clusters" / "t"
    assert d.stat().st_mode & 0o777 == 0o700

    r = cluster(state, "status", "t", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["name"] == "t" and st["state"] == "up" and st["agent_alive"] is True
    assert [n["node"] for n in st["nodes"]] == ["node0", "node1"]
    assert all(n["state"] == "running" for n in st["nodes"]), st
    assert {n["seller"] for n in st["nodes"]} == {"alice", "bob"}
    assert st["image"] and st["nodes_wanted"] == 2
    agent = st["pid"]
    assert _alive(agent) and int((d / "pid").read_text()) == agent
    table = cluster(state, "status")
    assert table.returncode == 0 and "cluster t: up" in table.stdout, table.stdout
    assert "alice" in table.stdout and "total" in table.stdout, table.stdout

    # one live cluster of a name
    r = cluster(state, "up", "--order", str(market.order), "--iso", str(iso), "--nodes", "1",
                "--name", "t", "--detach")
    assert r.returncode == 1 and "cluster t is up already" in r.stderr, r.stderr

    for node in ("node0", "node1"):
        r = cluster(state, "console", "t", node, "--until", MARKER, "--timeout", str(BOOT),
                    timeout=BOOT + 30)
        assert r.returncode == 0, r.stderr
        assert MARKER in r.stdout
    boot_seconds = time.monotonic() - t0

    # console input (once the guest reads it): it answers `echo X` with X
    r = cluster(state, "console", "t", "node1", "--until", "\nreply-7", "--timeout", "60",
                input="echo reply-7\n", timeout=90)
    assert r.returncode == 0, r.stderr
    assert "reply-7" in [line.rstrip("\r") for line in r.stdout.splitlines()], r.stdout
    assert "reply-7" in (d / "node1.console").read_text(errors="replace")

    # bad requests on the control socket: an answer each, and the agent serves on
    for raw, says in ((b"not json\n", "JSON"), (b'{"command": "reboot"}\n', "unknown command"),
                      (b'{"command": "input", "node": "node9", "input": "x"}\n', "no node"),
                      (b'{"command": "input", "node": "node0", "input": 3}\n', "a string"),
                      (b'{"command": "input", "node": "node0", "input_base64": "!!"}\n',
                       "console input")):
        answer = _request(state, "t", raw)
        assert says in answer.get("error", ""), (raw, answer)
    assert _request(state, "t", b'{"command": "input", "node": "node0", '
                                b'"input_base64": "ZWNobyBiNjQK"}\n') == {"ok": True}
    r = cluster(state, "console", "t", "node0", "--until", "\nb64", "--timeout", "60",
                timeout=90)
    assert r.returncode == 0, r.stderr

    t1 = time.monotonic()
    r = cluster(state, "down", "t", timeout=300)
    down_seconds = time.monotonic() - t1
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("node0") and "ended" in line for line in lines), r.stdout
    assert any(line.startswith("node1") and "ended" in line for line in lines), r.stdout
    assert not _alive(agent)
    assert not (d / "control").exists()
    st = json.loads(cluster(state, "status", "t", "--json").stdout)
    assert st["state"] == "ended" and st["agent_alive"] is False
    assert all(n["state"] == "ended" for n in st["nodes"]), st
    spent, earned = _paid(market, before)
    assert st["cost_milli"] > 0 and st["cost_milli"] == spent == earned, (st, spent, earned)
    assert market.ledger_check().returncode == 0, market.ledger_check().stdout
    r = cluster(state, "down", "t")  # down again: it is
    assert r.returncode == 0 and "down already" in r.stdout, r.stdout + r.stderr
    print(f"up --detach to every node running: {up_seconds:.1f} s; to the marker: "
          f"{boot_seconds:.1f} s; down: {down_seconds:.1f} s")


@needs_qemu
def test_a_foreground_cluster_comes_down_on_sigint(market, state, iso):
    before = _balances(market)
    qemus_before = _qemus(market)
    log = state / "fg.out"
    with open(log, "wb") as out:
        p = subprocess.Popen([PYTHON, "-m", "cpushare", "cluster", "up", "--order",
                              str(market.order), "--iso", str(iso), "--nodes", "2"],
                             env=_env(state), stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT)
    try:
        name = iso.name[:-4]  # (the default name: the ISO's stem)
        wait_for(lambda: p.poll() is None and "every node runs" in log.read_text()
                 or p.poll() is not None, BOOT, "every node to run")
        assert p.poll() is None, log.read_text()
        r = cluster(state, "console", name, "node0", "--until", MARKER, "--timeout", str(BOOT),
                    timeout=BOOT + 30)
        assert r.returncode == 0, r.stderr
        r = cluster(state, "console", name, "node1", "--until", MARKER, "--timeout", str(BOOT),
                    timeout=BOOT + 30)
        assert r.returncode == 0, r.stderr
        ours = _qemus(market) - qemus_before
        assert len(ours) == 2, ours
        p.send_signal(signal.SIGINT)
        assert p.wait(120) == 130, log.read_text()
    finally:
        if p.poll() is None:
            p.kill()
    text = log.read_text()
    assert "node0  ended" in text and "node1  ended" in text, text
    wait_for(lambda: not (ours & _qemus(market)), 30, "the sellers' qemu processes to exit")
    st = json.loads(cluster(state, "status", name, "--json").stdout)
    assert st["state"] == "ended" and all(n["state"] == "ended" for n in st["nodes"]), st
    spent, earned = _paid(market, before)
    assert st["cost_milli"] == spent == earned, (st, spent, earned)
    assert market.ledger_check().returncode == 0, market.ledger_check().stdout


@needs_qemu
def test_bad_inputs_are_refused_clearly(market, state, iso, tmp_path):
    up = ["up", "--order", str(market.order), "--nodes", "1"]
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"not an ISO 9660 image\n" * 4096)
    r = cluster(state, *up, "--iso", str(junk))
    assert r.returncode == 2 and str(junk) in r.stderr and "ISO 9660" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (state / "cpushare" / "clusters" / "junk").exists()

    r = cluster(state, *up, "--iso", str(tmp_path / "missing.iso"))
    assert r.returncode == 2 and "missing.iso: cannot read the ISO" in r.stderr, r.stderr

    bad_order = tmp_path / "bad.buy"
    bad_order.write_text("server = nowhere\n")
    r = cluster(state, "up", "--order", str(bad_order), "--iso", str(iso), "--nodes", "1")
    assert r.returncode == 2 and str(bad_order) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr  # (one line per problem of the file)

    r = cluster(state, *up[:-1], "5", "--iso", str(iso))
    assert r.returncode == 2 and "max_nodes" in r.stderr, r.stderr

    # a market that does not answer: nothing listens on the order's port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = market.order.read_text()
    server = next(line for line in text.splitlines() if line.startswith("server"))
    away = tmp_path / "away.buy"
    away.write_text(text.replace(server, f"server = 127.0.0.1:{port}"))
    away.chmod(0o600)
    r = cluster(state, "up", "--order", str(away), "--iso", str(iso), "--nodes", "1",
                "--name", "away")
    assert r.returncode == 1 and "cannot connect" in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    st = json.loads(cluster(state, "status", "away", "--json").stdout)
    assert st["state"] == "failed" and "cannot connect" in st["error"], st

    r = cluster(state, "down", "nosuch")
    assert r.returncode == 1 and "no cluster nosuch" in r.stderr, r.stderr
    r = cluster(state, "status", "nosuch")
    assert r.returncode == 1 and "no cluster nosuch" in r.stderr, r.stderr
    r = cluster(state, "console", "away", "node0")
    assert r.returncode == 1 and "no node node0" in r.stderr, r.stderr
    r = cluster(state, "down", "../etc")
    assert r.returncode == 2 and "not a cluster name" in r.stderr, r.stderr


def test_one_agent_holds_a_name(tmp_path):
    sd = StateDir("c1", tmp_path)
    assert not sd.exists() and not sd.agent_alive()
    fd = sd.lock()
    try:
        assert sd.agent_alive() and sd.path.stat().st_mode & 0o777 == 0o700
        with pytest.raises(ClusterError, match="cluster c1 is up already"):
            StateDir("c1", tmp_path).lock()
    finally:
        os.close(fd)
    assert not sd.agent_alive()
    os.close(StateDir("c1", tmp_path).lock())  # (free again)
    for bad in ("", ".hidden", "a/b", "..", "x" * 65, "sp ace"):
        with pytest.raises(ClusterError, match="not a cluster name"):
            StateDir(bad, tmp_path)


def test_console_files_rotate_and_a_reader_misses_nothing(tmp_path):
    sd = StateDir("c2", tmp_path)
    os.close(sd.lock())
    log = ConsoleLog(sd, "node0", rotate=100)
    reader = ConsoleReader(sd, "node0")
    written, read = b"", b""
    for i in range(60):
        piece = f"line {i}\n".encode()
        log.append(piece)
        written += piece
        if i % 7 == 0:
            read += reader.read()
    read += reader.read()
    log.close()
    assert read == written
    old, cur = sd.console_paths("node0")
    assert old.stat().st_size <= 100 and cur.stat().st_size <= 100
    assert old.stat().st_mode & 0o777 == 0o600
    late = ConsoleReader(sd, "node0").read()  # a reader that comes late: the last part
    assert written.endswith(late) and len(late) > 100
