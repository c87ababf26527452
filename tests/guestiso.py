"""The test guest ISO for the kvm computation model, built once and cached.

``iso_path(kind)`` gives the ISO that ``tests/guest/build-iso`` makes from
Debian's packages (the kernel of linux-image-amd64, busybox-static, GRUB),
kept under ``$CPUSHARE_CACHE_DIR/guest/`` (the Makefile's CACHE_DIR,
/var/cache/cpushare-dev by default) as ``<kind>-<key>.iso``.  The key is a
digest of build-iso, the guest's init, the kernel package's name and
version and the build's arguments, so a change to any of them makes a new
ISO.  ISOs of other keys go once unused for a day (``KEEP_UNUSED``; each
use sets an ISO's access time): checkouts of other versions of the scripts
share the cache and must not lose their ISO while they use it.  The kernel
.deb is kept in
``guest/debs/``: a rebuild for the same kernel downloads nothing.  Two test
processes take turns on ``guest/.lock`` (fcntl.flock): one builds, the other
then finds the ISO.

Kinds:

- ``"marker"``: prints MARKER on its first serial port when it is up, then
  ``cpushare-guest: uptime <seconds>`` about every second; a line
  ``echo X`` read there is answered with ``X``, ``run CMD`` runs a shell
  command (its output, then ``cpushare-guest: exit N``).
- ``"silent"``: never prints anything on its console.

Both power off on the ACPI power button (QMP ``system_powerdown``) once
they are up; a press before that (firmware, GRUB, kernel start) is lost, as
on real hardware.

With a NIC (virtio-net, e1000 or e1000e) both bring up eth0 after the
marker and run udhcpc on it for good; the marker guest prints
``cpushare-guest: ip ADDR`` (IP_PREFIX) once it has a lease and its ssh
server (dropbear, port 22, root) listens.  The server takes the test key
pair of ``ssh_key_path()`` (made once with ssh-keygen, kept beside the
ISOs, baked into them: a new key makes new ISOs); ``ssh_argv(ip)`` is the
ssh command line for it.  ``mount -t nfs SERVER:/PATH DIR`` works in the
guest (NFSv4, or v3 with nolock).  See tests/guest/README.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

MARKER = "CPUSHARE-GUEST-READY"
UPTIME_PREFIX = "cpushare-guest: uptime "
IP_PREFIX = "cpushare-guest: ip "
EXIT_PREFIX = "cpushare-guest: exit "
KINDS = ("marker", "silent")

GUEST_DIR = Path(__file__).resolve().parent / "guest"
BUILD_SCRIPT = GUEST_DIR / "build-iso"
INIT_SCRIPT = GUEST_DIR / "init"
QEMU = "qemu-system-x86_64"
# What build-iso runs, and the package that brings it on Debian.
BUILD_TOOLS = {
    "bash": "bash",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "tar": "tar",
    "grub-mkrescue": "grub-common",
    "xorriso": "xorriso",
    "mformat": "mtools",
    "cpio": "cpio",
    "gzip": "gzip",
    "ldd": "libc-bin",
    "dropbearkey": "dropbear-bin",
    "ssh-keygen": "openssh-client",
}
BUILD_FILES = {
    "/usr/lib/grub/i386-pc": "grub-pc-bin",
    "/bin/busybox": "busybox-static",
    "/usr/sbin/dropbear": "dropbear-bin",
}
BUILD_TIMEOUT = 900  # s; a download of about 70 MB and a few seconds of work
KEEP_UNUSED = 24 * 3600  # s an ISO of another key is kept after its last use


class GuestIsoError(RuntimeError):
    """The guest ISO cannot be built or found; the message says why."""


def cache_dir() -> Path:
    """Where the guest ISOs and the kernel .deb are kept."""
    return Path(os.environ.get("CPUSHARE_CACHE_DIR") or "/var/cache/cpushare-dev") / "guest"


def missing_build_tools() -> str | None:
    """Why this machine cannot build the ISO, or None."""
    missing = [f"{tool} ({pkg})" for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    missing += [f"{path} ({pkg})" for path, pkg in BUILD_FILES.items() if not os.path.exists(path)]
    if missing:
        return ("building the guest ISO needs " + ", ".join(missing)
                + (", which are" if len(missing) > 1 else ", which is") + " not installed")
    return None


def missing_qemu() -> str | None:
    """Why this machine cannot boot the ISO, or None."""
    if shutil.which(QEMU) is None:
        return f"booting the guest ISO needs {QEMU} (qemu-system-x86), which is not installed"
    return None


def _build_args(kind: str) -> list[str]:
    """build-iso's arguments for a kind (the ssh key apart)."""
    if kind == "marker":
        return ["--marker", MARKER]
    if kind == "silent":
        return ["--silent"]
    raise ValueError(f"unknown guest ISO kind {kind!r}: one of {', '.join(KINDS)}")


class _Locked:
    """The cache directory, held (flock on .lock) for the with-block: one
    process builds, the others then find what it built."""

    def __enter__(self) -> Path:
        base = cache_dir()
        try:
            base.mkdir(parents=True, exist_ok=True)
            self._lock = open(base / ".lock", "a")
        except OSError as e:
            raise GuestIsoError(f"cannot use the cache directory {base} ({e}); "
                                "set CPUSHARE_CACHE_DIR to a writable directory") from None
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        return base

    def __exit__(self, *exc) -> None:
        self._lock.close()


def _ssh_key(base: Path) -> Path:
    key = base / "ssh-key"
    pub = base / "ssh-key.pub"
    if key.is_file() and pub.is_file():
        return key
    if shutil.which("ssh-keygen") is None:
        raise GuestIsoError("the guest's ssh key needs ssh-keygen (openssh-client), "
                            "which is not installed")
    tmp = base / f".ssh-key.tmp{os.getpid()}"
    for f in (tmp, Path(f"{tmp}.pub")):
        f.unlink(missing_ok=True)
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cpushare-test-guest",
                        "-f", str(tmp)], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60, check=True)
        # The public key first: a private key alone is never taken as a pair.
        os.rename(f"{tmp}.pub", pub)
        os.rename(tmp, key)
    except subprocess.CalledProcessError as e:
        raise GuestIsoError(f"ssh-keygen failed: {e.stderr.strip()}") from None
    finally:
        for f in (tmp, Path(f"{tmp}.pub")):
            f.unlink(missing_ok=True)
    return key


def ssh_key_path() -> Path:
    """The private key of the test key pair (its public half beside it, as
    ``.pub``) that may log in as root on the guests: made once, kept in the
    cache directory."""
    with _Locked() as base:
        return _ssh_key(base)


def ssh_argv(ip: str, *command: str, timeout: int = 20) -> list[str]:
    """ssh to a guest as root with the test key (no known_hosts: each ISO
    build has its own host key), the command after it."""
    return ["ssh", "-i", str(ssh_key_path()), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={timeout}", f"root@{ip}", *command]


def _run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["bash", str(BUILD_SCRIPT), *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.CalledProcessError as e:
        raise GuestIsoError(f"{BUILD_SCRIPT.name} {' '.join(args)} failed "
                            f"(exit {e.returncode}):\n{e.stderr.strip()}") from None
    except subprocess.TimeoutExpired:
        raise GuestIsoError(f"{BUILD_SCRIPT.name} {' '.join(args)} took over {timeout} s") from None


APT_LISTS = Path("/var/lib/apt/lists")
_kernels: dict[tuple, tuple[str, str]] = {}


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def kernel_package(deb_dir: Path | None = None) -> tuple[str, str]:
    """The kernel package the ISO is built from: (name, version), as
    ``build-iso --print-kernel`` says (apt's candidate of
    linux-image-amd64's versioned dependency, else the kept .deb).  The
    answer is kept in the process while what it comes from (build-iso,
    apt's lists, the folder of kept .debs) is unchanged: apt-cache takes
    over a second, and each iso_path() asks."""
    deb_dir = cache_dir() / "debs" if deb_dir is None else deb_dir
    key = (str(deb_dir), _mtime(deb_dir), _mtime(APT_LISTS), _mtime(BUILD_SCRIPT))
    if key not in _kernels:
        out = _run_script(["--print-kernel", "--deb-dir", str(deb_dir)],
                          timeout=60).stdout.split()
        if len(out) != 2:
            raise GuestIsoError(f"build-iso --print-kernel said {' '.join(out)!r}, "
                                "not NAME VERSION")
        _kernels[key] = (out[0], out[1])
    return _kernels[key]


def iso_key(kind: str, kernel: tuple[str, str], ssh_pub: bytes | None = None) -> str:
    """The cache key of an ISO: its scripts, kernel, arguments and the
    public key it takes (by default that of ssh_key_path())."""
    if ssh_pub is None:
        ssh_pub = Path(f"{ssh_key_path()}.pub").read_bytes()
    h = hashlib.sha256()
    for part in (BUILD_SCRIPT.read_bytes(), INIT_SCRIPT.read_bytes(),
                 " ".join(kernel).encode(), "\0".join(_build_args(kind)).encode(), ssh_pub):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _used(iso: Path) -> None:
    """Mark `iso` used now (its access time; its mtime stays), and remove
    the ISOs of its kind unused for KEEP_UNUSED."""
    now = time.time()
    try:
        os.utime(iso, (now, iso.stat().st_mtime))
    except OSError:
        pass
    kind = iso.name.split("-", 1)[0]
    for old in iso.parent.glob(f"{kind}-*.iso"):
        try:
            if old != iso and old.stat().st_atime < now - KEEP_UNUSED:
                old.unlink()
        except OSError:
            pass


def iso_path(kind: str = "marker", log=None) -> Path:
    """The cached ISO of this kind, built first if it is not there yet.

    Raises GuestIsoError (with the reason) when it cannot be built."""
    args = _build_args(kind)
    why = missing_build_tools()
    if why is not None:
        raise GuestIsoError(why)
    with _Locked() as base:  # another process may be building it
        debs = base / "debs"
        kernel = kernel_package(debs)
        pub = Path(f"{_ssh_key(base)}.pub")
        iso = base / f"{kind}-{iso_key(kind, kernel, pub.read_bytes())}.iso"
        if iso.is_file():
            _used(iso)
            return iso
        if log is not None:
            log(f"building the {kind} guest ISO {iso} ({kernel[0]} {kernel[1]})")
        started = time.monotonic()
        debs.mkdir(exist_ok=True)
        tmp = base / f".{iso.name}.tmp{os.getpid()}"
        try:
            _run_script([str(tmp), *args, "--ssh-key", str(pub), "--deb-dir", str(debs)],
                        timeout=BUILD_TIMEOUT)
            tmp.rename(iso)
        finally:
            tmp.unlink(missing_ok=True)
        _used(iso)
        if log is not None:
            log(f"built {iso} ({iso.stat().st_size} bytes) in {time.monotonic() - started:.0f} s")
        return iso
