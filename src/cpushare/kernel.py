"""What this machine's kernel lets it sell: seccomp (strict, filter) and KVM.

Each probe asks the kernel the way the sandbox will use it, and the sources
are weighed so that a machine behaves here exactly as it will at run time:

- ``prctl(PR_GET_SECCOMP)`` is authoritative.  It fails with EINVAL where the
  kernel was built without CONFIG_SECCOMP; then nothing else matters, since
  the loader could not enter seccomp either.  (Anything that makes prctl
  answer so, a seccomp filter for one, is treated the same way, and the
  other sources that disagree are reported as notes.)
- The ``Seccomp:`` and ``Seccomp_filters:`` lines of /proc/self/status (absent
  without CONFIG_SECCOMP) say whether this process already runs under a
  filter, as under systemd's SystemCallFilter= or in a container.  The kernel
  then refuses strict mode, and the loader uses an equivalent filter.
- ``seccomp(SECCOMP_GET_ACTION_AVAIL)`` (Linux >= 4.14) says whether filters
  can be installed, with ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, NULL)``
  (EFAULT where filters exist, EINVAL where not) as the fallback.
- The kernel config (/proc/config.gz, /boot/config-RELEASE), where readable,
  explains a refusal; it never overrides what the kernel answers.
- KVM: /dev/kvm exists, opens read-write, and KVM_GET_API_VERSION answers 12.
  That the ioctl answers does not prove a guest boots (nested KVM may hang);
  the KVM launcher checks that with a real boot.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gzip
import os
from dataclasses import dataclass, field

PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
SECCOMP_MODE_STRICT = 1
SECCOMP_MODE_FILTER = 2
SYS_seccomp = 317  # x86-64
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ALLOW = 0x7FFF0000

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_API_VERSION = 12


class KernelError(RuntimeError):
    """This kernel cannot run what was asked of it; the message says why."""


@dataclass(frozen=True)
class Report:
    seccomp_strict: bool  # this process can enter SECCOMP_MODE_STRICT
    seccomp_filter: bool  # this process can install seccomp filters
    seccomp_reason: str
    kvm: bool
    kvm_reason: str
    in_filter: bool  # this process already runs under a seccomp filter
    notes: tuple[str, ...] = field(default=())

    @property
    def seccomp(self) -> bool:
        """Whether the seccomp computation model can run here (either mode)."""
        return self.seccomp_strict or self.seccomp_filter

    def lines(self) -> list[str]:
        out = [f"seccomp: {'yes' if self.seccomp else 'no'} ({self.seccomp_reason})",
               f"kvm: {'yes' if self.kvm else 'no'} ({self.kvm_reason})"]
        out += [f"note: {n}" for n in self.notes]
        return out


# -- the system calls ----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_L = ctypes.c_ulong


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> tuple[int, int]:
    """prctl(option, arg2, arg3, 0, 0) -> (result, errno)."""
    ctypes.set_errno(0)
    r = _libc.prctl(ctypes.c_int(option), _L(arg2), _L(arg3), _L(0), _L(0))
    return r, (ctypes.get_errno() if r < 0 else 0)


def _action_avail(action: int) -> int:
    """seccomp(SECCOMP_GET_ACTION_AVAIL, 0, &action) -> errno (0: available)."""
    value = ctypes.c_uint32(action)
    ctypes.set_errno(0)
    r = _libc.syscall(ctypes.c_long(SYS_seccomp), ctypes.c_long(SECCOMP_GET_ACTION_AVAIL),
                      ctypes.c_long(0), ctypes.byref(value))
    return ctypes.get_errno() if r < 0 else 0


def _err(e: int) -> str:
    return errno.errorcode.get(e, str(e))


# -- the other sources ---------------------------------------------------------

def status_seccomp(path: str = "/proc/self/status") -> tuple[int | None, int | None]:
    """(Seccomp:, Seccomp_filters:) of /proc/self/status; None where absent."""
    mode = filters = None
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "Seccomp":
                    mode = int(value)
                elif key == "Seccomp_filters":
                    filters = int(value)
    except (OSError, ValueError):
        pass
    return mode, filters


def kernel_config(release: str | None = None) -> tuple[dict[str, str], str | None]:
    """The kernel's build options and where they were read, or ({}, None)."""
    release = release or os.uname().release
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{release}", open)):
        try:
            with opener(path, "rt") as f:
                text = f.read()
        except (OSError, EOFError, ValueError):
            continue
        config = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_"):
                key, _, value = line.partition("=")
                config[key] = value
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                config[line[2:-len(" is not set")]] = "n"
        return config, path
    return {}, None


# -- the probes ----------------------------------------------------------------

def _probe_seccomp() -> tuple[bool, bool, str, bool, list[str]]:
    notes: list[str] = []
    mode, filters = status_seccomp()
    config, config_path = kernel_config()
    mode_now, e = _prctl(PR_GET_SECCOMP)
    if mode_now < 0:
        what = ("this kernel was built without CONFIG_SECCOMP" if e == errno.EINVAL
                else "seccomp is unusable here (CONFIG_SECCOMP)")
        reason = f"prctl(PR_GET_SECCOMP) failed with {_err(e)}: {what}"
        in_filter = mode == SECCOMP_MODE_FILTER
        if mode is not None:
            notes.append(f"/proc/self/status nevertheless has 'Seccomp: {mode}'"
                         + (f" and 'Seccomp_filters: {filters}'" if filters is not None else "")
                         + ": seccomp may be hidden from this process (by a seccomp filter?)")
        if config.get("CONFIG_SECCOMP") == "y":
            notes.append(f"{config_path} says CONFIG_SECCOMP=y, but the kernel's answer is what counts")
        return False, False, reason, in_filter, notes

    in_filter = mode_now == SECCOMP_MODE_FILTER or mode == SECCOMP_MODE_FILTER
    # Filter support: ask for the actions the sandbox's filter uses.
    e_allow = _action_avail(SECCOMP_RET_ALLOW)
    if e_allow == 0:
        filter_ok = True
        e_kill = _action_avail(SECCOMP_RET_KILL_PROCESS)
        filter_how = "filter mode available"
        if e_kill:
            filter_how += " (but not SECCOMP_RET_KILL_PROCESS: Linux < 4.14?)"
    else:
        # No seccomp(2) or no GET_ACTION_AVAIL: the classic probe.  A NULL
        # program makes the kernel fail with EFAULT where filters exist,
        # before anything is installed.
        r, e = _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, 0)
        filter_ok = r < 0 and e in (errno.EFAULT, errno.EACCES)
        filter_how = ("filter mode available" if filter_ok else
                      f"no filter mode: seccomp(SECCOMP_GET_ACTION_AVAIL) failed with {_err(e_allow)}, "
                      f"prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER) with {_err(e) if r < 0 else 'success'}"
                      + (" (CONFIG_SECCOMP_FILTER is not set)"
                         if config.get("CONFIG_SECCOMP_FILTER") == "n" else ""))
    if in_filter:
        n = f"{filters} " if filters is not None else ""
        strict_ok = False
        reason = (f"{'filter mode' if filter_ok else 'no usable mode'}; strict mode refused: this "
                  f"process already runs under {n}seccomp filter{'s' if filters != 1 else ''}, "
                  "so jobs run under an equivalent filter")
    else:
        strict_ok = True
        reason = f"strict mode; {filter_how}"
    if mode is None:
        notes.append("/proc/self/status has no Seccomp: line although prctl(PR_GET_SECCOMP) answers")
    return strict_ok, filter_ok, reason, in_filter, notes


def _probe_kvm(device: str = KVM_DEVICE) -> tuple[bool, str]:
    if not os.path.exists(device):
        return False, f"{device} does not exist (no KVM module, or no hardware virtualisation)"
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        hint = " (add this user to group kvm)" if e.errno == errno.EACCES else ""
        return False, f"cannot open {device} read-write: {e.strerror}{hint}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return False, f"ioctl(KVM_GET_API_VERSION) on {device} failed: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"{device} answers API version {version}, not {KVM_API_VERSION}"
    return True, f"{device}, API version {version}"


def probe(*, kvm_device: str = KVM_DEVICE) -> Report:
    """Ask the kernel what this process can use."""
    strict, filter_, reason, in_filter, notes = _probe_seccomp()
    kvm, kvm_reason = _probe_kvm(kvm_device)
    return Report(seccomp_strict=strict, seccomp_filter=filter_, seccomp_reason=reason,
                  kvm=kvm, kvm_reason=kvm_reason, in_filter=in_filter, notes=tuple(notes))


def require_seccomp(report: Report | None = None) -> Report:
    """Return the report, or raise KernelError when seccomp cannot be used."""
    report = report or probe()
    if not report.seccomp:
        raise KernelError(
            f"no seccomp: {report.seccomp_reason}; selling CPU needs a kernel built with "
            "CONFIG_SECCOMP=y (and CONFIG_SECCOMP_FILTER=y where the seller runs under a "
            "seccomp filter: systemd hardening, containers)")
    return report
