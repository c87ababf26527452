"""The state directory of a cluster of ``cpushare cluster``.

    $XDG_STATE_HOME/cpushare/clusters/NAME/     (mode 0700; default
                                                 ~/.local/state/...)
        pid            the agent's pid; the agent holds an flock on it
                       while it lives (no lock: the agent is gone)
        status.json    the cluster as the agent last saw it, written
                       whole (a temporary file and a rename) on each change
        NODE.console   what the node printed, appended as it comes; past
        NODE.console.1 CONSOLE_ROTATE bytes NODE.console becomes
                       NODE.console.1 (the older one is dropped)
        control        the agent's unix socket (0600): JSON lines, one
                       answer line per request
        agent.log      a detached agent's output

Control requests:

    {"command": "down"}             -> {"ok": true, "status": STATUS} once
                                       every node ended (the agent exits)
    {"command": "input", "node": "node0", "input": TEXT}
    {"command": "input", "node": "node0", "input_base64": B64}
                                    -> {"ok": true}: typed on its console
    anything else                   -> {"error": TEXT}

The agent (clusteragent) writes it; the other subcommands (clustercli)
read it and send requests.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from ..fileutil import atomic_write
from ..order import format_coins
from .base import MarketError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
CONSOLE_ROTATE = 8 << 20  # NODE.console past this becomes NODE.console.1: 16 MiB a node
MAX_REQUEST = 1 << 20  # bytes of one control request line
MAX_INPUT = 64 << 10  # bytes of console input in one request
CLUSTER_STATES = ("starting", "image", "leasing", "up", "ending", "ended", "failed")
FINAL_STATES = ("ended", "failed")


_NODE = (("node", str), ("state", str), ("cpu_ms", int), ("cost_milli", int))


class ClusterError(Exception):
    """A refusal of a cluster command: its message and exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.message = message
        self.status = status


def clusters_dir() -> Path:
    """$XDG_STATE_HOME/cpushare/clusters (an XDG_STATE_HOME that is not an
    absolute path is ignored, as the XDG specification says)."""
    base = os.environ.get("XDG_STATE_HOME") or ""
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "cpushare" / "clusters"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ClusterError(f"{name!r} is not a cluster name (1 to 64 of A-Z a-z 0-9 _ . + -, "
                           f"not starting with a punctuation mark)", 2)
    return name


def market_status(e: MarketError) -> int:
    """The exit status for the market's refusal `e` (as `cpushare buy`)."""
    return 1 if e.code == "funds" else 2 if e.code in ("auth", "version", "order", "image") \
        else 1


@contextmanager
def socket_path(path: Path):
    """A name for the socket at `path` that fits sockaddr_un (108 bytes): the
    path itself, or one through /proc/self/fd of its directory."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class StateDir:
    """The directory of the cluster NAME (see the module's docstring)."""

    def __init__(self, name: str, root: Path | None = None):
        self.name = check_name(name)
        self.path = (root or clusters_dir()) / name
        self.pid_path = self.path / "pid"
        self.status_path = self.path / "status.json"
        self.control_path = self.path / "control"
        self.log_path = self.path / "agent.log"

    @classmethod
    def all(cls, root: Path | None = None) -> list["StateDir"]:
        root = root or clusters_dir()
        try:
            names = sorted(p.name for p in root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ClusterError(f"{root}: {e.strerror}") from None
        return [cls(n, root) for n in names if NAME_RE.fullmatch(n)]

    def console_paths(self, node: str) -> tuple[Path, Path]:
        """(the older part, the current part) of a node's console."""
        return self.path / f"{node}.console.1", self.path / f"{node}.console"

    def exists(self) -> bool:
        return self.pid_path.exists() or self.status_path.exists()

    # --- the agent's lock -----------------------------------------------------

    def lock(self) -> int:
        """Create the directory (0700) and take the agent's lock: the locked
        pid file's descriptor.  Refused if an agent holds it.  What an
        earlier cluster of this name left is removed."""
        try:
            self.path.parent.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            for d in (self.path.parent, self.path):
                d.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.path, 0o700)
            fd = os.open(self.pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ClusterError(f"{e.filename or self.path}: cannot create the cluster's "
                               f"state: {e.strerror}") from None
        for attempt in range(5):  # (a `status` may hold a shared lock for an instant)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            os.close(fd)
            raise ClusterError(f"cluster {self.name} is up already (agent pid "
                               f"{self.agent_pid() or '?'}): choose another --name, or "
                               f"cpushare cluster down {self.name}", 1)
        os.ftruncate(fd, 0)  # (the pid of an agent that was)
        for p in self.path.iterdir():
            if p.name.endswith((".console", ".console.1")) or p.name in (
                    "status.json", "control", "agent.log"):
                p.unlink(missing_ok=True)
        return fd

    def agent_alive(self) -> bool:
        """Whether an agent holds the lock."""
        try:
            fd = os.open(self.pid_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def agent_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None

    # --- status ---------------------------------------------------------------

    def read_status(self) -> dict | None:
        """status.json (None: not written yet); ClusterError if unreadable."""
        try:
            data = json.loads(self.status_path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ClusterError(f"{self.status_path}: {e.strerror}") from None
        except ValueError as e:
            raise ClusterError(f"{self.status_path}: not JSON: {e}") from None
        if not (isinstance(data, dict) and isinstance(data.get("state"), str)
                and isinstance(data.get("nodes"), list)
                and all(isinstance(n, dict) and all(isinstance(n.get(k), t) for k, t in _NODE)
                        for n in data["nodes"])
                and all(isinstance(data.get(k), int) for k in ("cpu_ms", "cost_milli"))):
            raise ClusterError(f"{self.status_path}: not the status of a cluster")
        return data

    def write_status(self, status: dict) -> None:
        atomic_write(self.status_path, json.dumps(status, indent=1).encode() + b"\n",
                     mode=0o600, fsync=False)

    # --- the control socket, client side --------------------------------------

    def request(self, req: dict, timeout: float) -> dict:
        """One request to the agent; its answer (ClusterError if it has none)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(10)
            try:
                with socket_path(self.control_path) as where:
                    s.connect(where)
            except OSError as e:
                raise ClusterError(f"cluster {self.name}: no answer on {self.control_path}: "
                                   f"{e.strerror}") from None
            s.settimeout(timeout)
            answer = b""
            try:
                s.sendall(json.dumps(req).encode() + b"\n")
                while not answer.endswith(b"\n"):
                    piece = s.recv(65536)
                    if not piece:
                        break
                    answer += piece
            except socket.timeout:
                raise ClusterError(f"cluster {self.name}: the agent did not answer within "
                                   f"{timeout:g} s") from None
            except OSError as e:
                raise ClusterError(f"cluster {self.name}: {e.strerror}") from None
        finally:
            s.close()
        if not answer:
            raise ClusterError(f"cluster {self.name}: the agent closed the connection "
                               f"without an answer")
        try:
            out = json.loads(answer)
        except ValueError:
            raise ClusterError(f"cluster {self.name}: the agent's answer is not JSON") from None
        if not isinstance(out, dict):
            raise ClusterError(f"cluster {self.name}: the agent's answer is not an object")
        return out


class ConsoleLog:
    """A node's console file: appended, at most 2 x `rotate` bytes."""

    def __init__(self, sd: StateDir, node: str, rotate: int = CONSOLE_ROTATE):
        self.old, self.path = sd.console_paths(node)
        self.rotate = rotate
        self._f = self._open()

    def _open(self):
        f = open(self.path, "ab")
        os.fchmod(f.fileno(), 0o600)
        return f

    def append(self, data: bytes) -> None:
        if self._f.tell() + len(data) > self.rotate and self._f.tell():
            self._f.close()
            os.replace(self.path, self.old)
            self._f = self._open()
        self._f.write(data)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class ConsoleReader:
    """What ConsoleLog wrote: NODE.console.1, then NODE.console, followed as
    it grows and as it is rotated (read() returns what came since)."""

    def __init__(self, sd: StateDir, node: str):
        self.old, self.path = sd.console_paths(node)
        self._f = None
        self._pending_old = True

    def read(self) -> bytes:
        out = b""
        if self._pending_old:
            self._pending_old = False
            try:
                out = self.old.read_bytes()
            except FileNotFoundError:
                pass
        if self._f is None:
            try:
                self._f = open(self.path, "rb")
            except FileNotFoundError:
                return out
        out += self._f.read()
        try:
            rotated = os.stat(self.path).st_ino != os.fstat(self._f.fileno()).st_ino
        except FileNotFoundError:
            rotated = False
        if rotated:  # the rest of the old part, then the new one from its start
            out += self._f.read()
            self._f.close()
            self._f = None
            out += self.read()
        return out


def count_nodes(n: int) -> str:
    """'1 node', '2 nodes'."""
    return f"{n} node" + ("" if n == 1 else "s")


def summary_lines(status: dict) -> list[str]:
    """A table of the nodes (seller, state, CPU seconds, CPUCoins, message)
    and their total."""
    rows = [("NODE", "SELLER", "STATE", "CPU-SECONDS", "CPUCOINS", "MESSAGE")]
    for n in status["nodes"]:
        rows.append((n["node"], n.get("seller") or "-", n["state"], f"{n['cpu_ms'] / 1000:.3f}",
                     format_coins(n["cost_milli"]), n.get("message") or ""))
    rows.append(("total", "", count_nodes(len(status["nodes"])),
                 f"{status['cpu_ms'] / 1000:.3f}", format_coins(status["cost_milli"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return [("  ".join(r[i].rjust(widths[i]) if i in (3, 4) else r[i].ljust(widths[i])
                       for i in range(5)) + "  " + r[5]).rstrip() for r in rows]
