"""Which accelerator this host really has: KVM measured, not trusted.

That /dev/kvm opens and answers KVM_GET_API_VERSION proves nothing: on a
nested paravirtual host qemu takes ``-accel kvm`` and then runs guest code
hundreds of times slower than TCG, or never gets through its firmware.  So
the probe boots a guest under each accelerator, with the launcher's own
hardening (`models.qemu.start`), and times it.

The guest is one boot sector (real-mode code, assembled here from the
table below): it prints a start marker on COM1, counts down 16 times 2^20,
printing a dot after each 2^20, prints an end marker and halts.  The time
from the start marker to the end marker is the measurement; the dots let a
guest that runs out of time say how far it got.  Under TCG it takes about a
tenth of a second; under working KVM a few milliseconds.

KVM is taken (`choose("auto")`) when /dev/kvm opens read-write, the guest
reaches its end marker within KVM_TIMEOUT of qemu's start, and its loop is
not slower than under TCG.
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import kernel
from . import qemu as _qemu

__all__ = ["AccelError", "Measurement", "Choice", "boot_sector", "measure", "choose",
           "describe", "decide", "kvm_device_state"]

START = b"CPUSHARE-PROBE-START"
END = b"CPUSHARE-PROBE-END"
STEPS = 16  # dots printed
INNER = 1 << 20  # iterations of the inner loop per dot
KVM_TIMEOUT = 2.0  # seconds from qemu's start to the end marker
TCG_TIMEOUT = 10.0
MEMORY = 16 << 20
ORG = 0x7C00  # where the BIOS loads a boot sector

_FIXUP_SIZE = {"abs16": 2, "rel8": 1, "rel16": 2}


def _program(steps: int) -> tuple:
    """The probe guest, one instruction a row: (label, bytes, fixup, what it
    is); a fixup ("abs16" | "rel8" | "rel16", label) follows the bytes."""
    return (
        ("start", b"\xfa", None, "cli"),
        (None, b"\x31\xc0", None, "xor ax, ax"),
        (None, b"\x8e\xd8", None, "mov ds, ax"),
        (None, b"\x8e\xd0", None, "mov ss, ax"),
        (None, b"\xbc\x00\x7c", None, "mov sp, 0x7c00"),
        (None, b"\xfc", None, "cld"),
        (None, b"\xbe", ("abs16", "hello"), "mov si, hello"),
        (None, b"\xe8", ("rel16", "print"), "call print"),
        (None, b"\xbb" + struct.pack("<H", steps), None, "mov bx, steps"),
        ("outer", b"\x66\xb9" + struct.pack("<I", INNER), None, "mov ecx, INNER"),
        ("inner", b"\x66\x49", None, "dec ecx"),
        (None, b"\x75", ("rel8", "inner"), "jnz inner"),
        (None, b"\xb0\x2e", None, "mov al, '.'"),
        (None, b"\xe8", ("rel16", "putc"), "call putc"),
        (None, b"\x4b", None, "dec bx"),
        (None, b"\x75", ("rel8", "outer"), "jnz outer"),
        (None, b"\xbe", ("abs16", "bye"), "mov si, bye"),
        (None, b"\xe8", ("rel16", "print"), "call print"),
        ("halt", b"\xfa", None, "cli"),
        (None, b"\xf4", None, "hlt"),
        (None, b"\xeb", ("rel8", "halt"), "jmp halt"),
        # print: the NUL-terminated string at ds:si
        ("print", b"\xac", None, "lodsb"),
        (None, b"\x84\xc0", None, "test al, al"),
        (None, b"\x74", ("rel8", "done"), "jz done"),
        (None, b"\xe8", ("rel16", "putc"), "call putc"),
        (None, b"\xeb", ("rel8", "print"), "jmp print"),
        ("done", b"\xc3", None, "ret"),
        # putc: al to COM1, once its transmitter holding register is empty
        ("putc", b"\x88\xc4", None, "mov ah, al"),
        (None, b"\xba\xfd\x03", None, "mov dx, 0x3fd (line status)"),
        ("wait", b"\xec", None, "in al, dx"),
        (None, b"\xa8\x20", None, "test al, 0x20 (THR empty)"),
        (None, b"\x74", ("rel8", "wait"), "jz wait"),
        (None, b"\x88\xe0", None, "mov al, ah"),
        (None, b"\xba\xf8\x03", None, "mov dx, 0x3f8 (transmit)"),
        (None, b"\xee", None, "out dx, al"),
        (None, b"\xc3", None, "ret"),
        ("hello", START + b"\r\n\0", None, "data"),
        ("bye", b"\r\n" + END + b"\r\n\0", None, "data"),
    )


def assemble(program, org: int = ORG) -> bytes:
    """A boot sector from rows like _program()'s: the code at `org`, padded to
    510 bytes, then the boot signature 55 AA."""
    labels, addr = {}, org
    for label, code, fixup, _ in program:
        if label:
            labels[label] = addr
        addr += len(code) + (_FIXUP_SIZE[fixup[0]] if fixup else 0)
    out, addr = bytearray(), org
    for _, code, fixup, what in program:
        out += code
        addr += len(code)
        if fixup:
            kind, target = fixup
            end = addr + _FIXUP_SIZE[kind]
            if kind == "abs16":
                out += struct.pack("<H", labels[target])
            elif kind == "rel16":
                out += struct.pack("<h", labels[target] - end)
            elif -128 <= labels[target] - end <= 127:
                out += struct.pack("<b", labels[target] - end)
            else:
                raise ValueError(f"{what}: {target} is out of reach of a short jump")
            addr = end
    if len(out) > 510:
        raise ValueError(f"the boot sector's code takes {len(out)} bytes, over 510")
    return bytes(out).ljust(510, b"\0") + b"\x55\xaa"


def boot_sector(steps: int = STEPS) -> bytes:
    """The probe guest, counting `steps` times 2^20 (1 to 65535)."""
    if not 1 <= steps <= 0xFFFF:
        raise ValueError(f"steps must be 1 to 65535, not {steps!r}")
    return assemble(_program(steps))


class AccelError(RuntimeError):
    """The accelerator asked for cannot be used here; the message says why.
    `kvm` and `tcg` are the measurements (None: not made)."""

    def __init__(self, message: str, kvm: Measurement | None = None,
                 tcg: Measurement | None = None):
        super().__init__(message)
        self.kvm = kvm
        self.tcg = tcg


@dataclass(frozen=True)
class Measurement:
    works: bool  # the guest reached its end marker in time
    seconds: float | None  # start marker to end marker
    reason: str  # what happened, for people
    estimate: float | None = None  # when it ran out of time: the loop's projected seconds


@dataclass(frozen=True)
class Choice:
    accel: str  # "kvm" | "tcg"
    report: str  # why, in one line
    kvm: Measurement | None = None
    tcg: Measurement | None = None


def measure(accel: str, timeout: float, *, qemu: str = _qemu.QEMU,
            steps: int = STEPS) -> Measurement:
    """Boot the probe guest (counting `steps` times 2^20) under `accel` and
    time its loop; `timeout` counts from qemu's start."""
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="cpushare-probe-") as tmp:
        image = Path(tmp) / "probe.img"
        image.write_bytes(boot_sector(steps))
        try:
            run = _qemu.start(image, memory=MEMORY, cpus=1, accel=accel, workdir=Path(tmp),
                              qemu=qemu, media="floppy", console_budget=4096,
                              start_timeout=timeout)
        except _qemu.LaunchError as e:
            return Measurement(False, None, str(e))
        try:
            return _watch(run, deadline, timeout, steps)
        finally:
            run.kill()
            run.wait()


def _watch(run: _qemu.QemuRun, deadline: float, timeout: float, steps: int) -> Measurement:
    seen = b""
    began = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not run.poll_output(remaining):
            break
        chunk = run.read(4096)
        now = time.monotonic()
        if not chunk:
            result = run.wait()
            said = f"; qemu said: {run.stderr}" if run.stderr else ""
            return Measurement(False, None, f"qemu ended before the probe guest finished: "
                                            f"{result.describe()}{said}")
        seen += chunk
        if began is None and START in seen:
            began = now
            seen = seen[seen.index(START) + len(START):]
        if began is not None and END in seen:
            seconds = now - began
            return Measurement(True, seconds, f"probe {seconds * 1000:.0f} ms")
    if began is None:
        return Measurement(False, None, f"the probe guest printed nothing within {timeout:g} s "
                                        f"(the firmware did not get to its boot sector)")
    done, ran = seen.count(b"."), time.monotonic() - began
    estimate = ran * steps / done if done else None
    about = f", about {estimate:.1f} s for all of it" if estimate else ""
    return Measurement(False, None, f"the probe guest ran {done}/{steps} of its loop in "
                                    f"{ran:.2f} s{about} (timed out after {timeout:g} s)",
                       estimate)


def kvm_device_state(device: str = kernel.KVM_DEVICE) -> tuple[str, str]:
    """("absent" | "unusable" | "present", why) for the KVM device."""
    if not os.path.exists(device):
        return "absent", f"no {device}"
    ok, why = kernel._probe_kvm(device)
    return ("present" if ok else "unusable"), why


def _slower(kvm: Measurement, tcg: Measurement | None) -> float | None:
    """How many times slower than TCG KVM ran the loop (None: no comparison)."""
    if tcg is None or not tcg.works or not tcg.seconds:
        return None
    kvm_seconds = kvm.seconds if kvm.works else kvm.estimate
    return kvm_seconds / tcg.seconds if kvm_seconds else None


def _kvm_unusable(device: tuple[str, str], kvm: Measurement | None,
                  tcg: Measurement | None) -> str | None:
    """Why KVM cannot be used, or None when it can."""
    state, why = device
    if state == "absent":
        return f"absent ({why})"
    if state != "present":
        return f"present but unusable: {why}"
    if kvm is None:
        return "present but not measured"
    ratio = _slower(kvm, tcg)
    if not kvm.works:
        slower = f"; about {ratio:.0f} times slower than TCG" if ratio else ""
        return f"present but unusable: {kvm.reason}{slower}"
    if ratio is not None and ratio > 1:
        return (f"present but unusable: it ran the probe guest {ratio:.1f} times slower than "
                f"TCG ({kvm.seconds * 1000:.0f} ms against {tcg.seconds * 1000:.0f} ms)")
    return None


def decide(setting: str, device: tuple[str, str], kvm: Measurement | None,
           tcg: Measurement | None) -> Choice:
    """The choice for `setting` given the device's state and the measurements;
    AccelError when the setting is "kvm" and KVM is unusable."""
    if setting == "tcg":
        return Choice("tcg", "tcg, as set", kvm, tcg)
    if setting not in ("auto", "kvm"):
        raise ValueError(f"accel setting must be auto, kvm or tcg, not {setting!r}")
    unusable = _kvm_unusable(device, kvm, tcg)
    if unusable is None:
        against = f" against TCG's {tcg.seconds * 1000:.0f} ms" if tcg and tcg.works else ""
        return Choice("kvm", f"kvm: probe {kvm.seconds * 1000:.0f} ms{against}", kvm, tcg)
    if setting == "kvm":
        raise AccelError(f"accel = kvm, but KVM is {unusable}", kvm, tcg)
    return Choice("tcg", f"tcg, since KVM is {unusable}", kvm, tcg)


def _measure_all(kvm_device: str, qemu: str) -> tuple[tuple[str, str], Measurement | None,
                                                      Measurement]:
    device = kvm_device_state(kvm_device)
    tcg = measure("tcg", TCG_TIMEOUT, qemu=qemu)
    kvm = measure("kvm", KVM_TIMEOUT, qemu=qemu) if device[0] == "present" else None
    return device, kvm, tcg


def choose(setting: str, kvm_device: str = kernel.KVM_DEVICE, *,
           qemu: str = _qemu.QEMU) -> Choice:
    """The accelerator for an order's setting ("auto" | "kvm" | "tcg"),
    measured here (a few seconds at most); AccelError when "kvm" cannot be
    met."""
    if setting == "tcg":
        return decide(setting, ("absent", "not looked at"), None, None)
    return decide(setting, *_measure_all(kvm_device, qemu))


def describe(kvm_device: str = kernel.KVM_DEVICE, *, qemu: str = _qemu.QEMU) -> list[str]:
    """Lines for `cpusharectl check`: what each accelerator does here."""
    device, kvm, tcg = _measure_all(kvm_device, qemu)
    unusable = _kvm_unusable(device, kvm, tcg)
    kvm_line = f"kvm: works ({kvm.reason})" if unusable is None else f"kvm: {unusable}"
    tcg_line = f"tcg: works ({tcg.reason})" if tcg.works else f"tcg: unusable: {tcg.reason}"
    return [kvm_line, tcg_line]
