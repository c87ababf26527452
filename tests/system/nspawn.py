"""A Debian bookworm booted with systemd-nspawn, for the system tests.

The root is made once by mmdebstrap and kept under $CPUSHARE_CACHE_DIR
(the Makefile's CACHE_DIR, /var/cache/cpushare-dev by default) as
``nspawn/bookworm-<key>``, where the key is a digest of the package list:
systemd, systemd-sysv and dbus, plus every package the Depends: and
Recommends: of debian/control name (so that installing our .deb files needs
no download: the container is offline; qemu-system-x86, which the kvm model
needs, is a Recommends:).
A change to that list makes a new root and removes the old one.

The container has a network namespace of its own (``--private-network``,
loopback only): the market it runs cannot collide with a port of the host,
and nothing in it reaches the network.  Every boot runs on ``--volatile=overlay``: the cached root is the read-only
lower layer and all writes go to a tmpfs that disappears with the container,
so the cache stays clean and no copy is made.

Commands run inside with ``nsenter -t PID -a`` into all namespaces of the
container's PID 1 (found as the child of the systemd-nspawn process): this
needs no machined, no machinectl and no registration (``--register=no``), and
the host here does not run systemd.  Files go in and out through
``/proc/PID/root``, the container's root as the host sees it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus")
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


def missing_requirements() -> str | None:
    """Why this machine cannot boot the test container, or None."""
    if os.geteuid() != 0:
        return "the system test needs root (systemd-nspawn, mmdebstrap, nsenter)"
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter", "dpkg-buildpackage"):
        if shutil.which(tool) is None:
            return f"the system test needs {tool}, which is not installed"
    return None


def control_dependencies(control: Path) -> list[str]:
    """The first alternative of every Pre-Depends:, Depends: and Recommends:
    entry of the binary packages in debian/control, without substitution
    variables and our own packages."""
    deps: set[str] = set()
    for para in re.split(r"\n\s*\n", control.read_text()):
        fields = dict(re.findall(r"^([\w-]+):(.*(?:\n[ \t].*)*)", para, re.M))
        if "Package" not in fields:
            continue
        for field in ("Pre-Depends", "Depends", "Recommends"):
            for entry in fields.get(field, "").split(","):
                first = entry.split("|")[0].strip()
                name = re.sub(r"[\s(\[<].*", "", first, flags=re.S)
                if name and "$" not in name and not name.startswith("cpushare"):
                    deps.add(name)
    return sorted(deps)


def root_packages(control: Path) -> list[str]:
    return sorted(set(BASE_PACKAGES) | {"python3"} | set(control_dependencies(control)))


def cache_dir() -> Path:
    return Path(os.environ.get("CPUSHARE_CACHE_DIR") or "/var/cache/cpushare-dev")


def cached_root(packages: list[str], log=print) -> Path:
    """The mmdebstrap root for these packages: reused, or built once."""
    key = hashlib.sha256(f"{SUITE} apt {' '.join(packages)}".encode()).hexdigest()[:16]
    base = cache_dir() / "nspawn"
    root = base / f"{SUITE}-{key}"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it
        if (root / ".complete").exists():
            return root
        tmp = base / f".{SUITE}-{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"building the {SUITE} root {root} (mmdebstrap, {len(packages)} packages)")
        started = time.monotonic()
        # No mirror named here: mmdebstrap takes the host's apt sources.
        subprocess.run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(packages),
                        SUITE, str(tmp)], check=True, stdin=subprocess.DEVNULL)
        (tmp / ".complete").write_text(" ".join(packages) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        log(f"built {root} in {time.monotonic() - started:.0f} s")
        for old in base.glob(f"{SUITE}-*"):
            if old != root:
                shutil.rmtree(old, ignore_errors=True)
        return root


class CommandFailed(AssertionError):
    pass


class Container:
    """One boot of `root`; use as a context manager."""

    def __init__(self, root: Path, name: str, console_log: Path) -> None:
        self.root = root
        self.name = name
        self.console_log = console_log
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # the container's PID 1, as the host sees it

    # --- life ------------------------------------------------------------

    def boot(self, timeout: float = 120) -> str:
        """Boot and wait until systemd says the boot is over; its state."""
        out = open(self.console_log, "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--register=no", "--keep-unit",
             "--directory", str(self.root), "--volatile=overlay",
             f"--machine={self.name}", "--console=read-only", "--private-network"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while self.pid is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}:\n"
                                   + self.console())
            if time.monotonic() > deadline:
                raise RuntimeError("the container's init did not appear\n" + self.console())
            self.pid = self._init_pid()
            if self.pid is None:
                time.sleep(0.1)
        # --wait returns when the boot job queue is empty: "running" or
        # "degraded" (some unit failed; the tests look at ours).
        state = ""
        while time.monotonic() < deadline:
            r = self.run("systemctl is-system-running --wait", check=False,
                         timeout=max(1.0, deadline - time.monotonic()))
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.2)
        raise RuntimeError(f"the container did not finish booting ({state!r})\n" + self.console())

    def _init_pid(self) -> int | None:
        assert self.proc is not None
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in children:
                try:
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                except OSError:
                    continue
                if comm == "systemd":
                    return int(child)
        return None

    def shutdown(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM to systemd-nspawn asks the container's init to power off.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "Container":
        try:
            self.boot()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def console(self) -> str:
        with contextlib.suppress(OSError):
            return self.console_log.read_text(errors="replace")[-4000:]
        return ""

    # --- use -------------------------------------------------------------

    def run(self, command: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        """`command` by /bin/sh inside the container, as root, clean env."""
        assert self.pid is not None
        argv = ["nsenter", "-t", str(self.pid), "-a", "--", "/usr/bin/env", "-i",
                *(f"{k}={v}" for k, v in ENV.items()), "/bin/sh", "-c", command]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise CommandFailed(f"in the container: {command}\nexit status {r.returncode}\n"
                                f"--- stdout\n{r.stdout}--- stderr\n{r.stderr}")
        return r

    def out(self, command: str, **kw) -> str:
        return self.run(command, **kw).stdout

    def path(self, inside: str) -> Path:
        """The host's path of a file inside the container."""
        assert self.pid is not None and inside.startswith("/")
        return Path(f"/proc/{self.pid}/root{inside}")

    def put(self, src: Path, inside_dir: str) -> str:
        dest = self.path(inside_dir)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest / src.name)
        return f"{inside_dir.rstrip('/')}/{src.name}"

    def wait_for(self, command: str, timeout: float = 60, interval: float = 0.5) -> str:
        """Run `command` until it succeeds; its output."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.run(command, check=False)
            if r.returncode == 0:
                return r.stdout
            if time.monotonic() > deadline:
                raise CommandFailed(f"in the container, never succeeded within {timeout} s: "
                                    f"{command}\n--- stdout\n{r.stdout}--- stderr\n{r.stderr}")
            time.sleep(interval)

    def journal(self, unit: str, lines: int = 60) -> str:
        return self.out(f"journalctl --no-pager -o cat -n {lines} -u {shlex.quote(unit)}",
                        check=False)
