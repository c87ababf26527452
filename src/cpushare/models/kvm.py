"""The kvm model: a buyer's bootable ISO booted under qemu (KVM or TCG).

An image is an ISO 9660 file with an El Torito boot record, named by the
SHA-256 of its bytes.  It is hundreds of MB to several GB, so it is never
held in memory: `parse_file` checks the volume descriptors at the head of
the file, and the digest is the one its chunks were verified against as
they arrived (`ImageCache`, the market's `ImageFiles`).

A run is a qemu process (`models.qemu`) with the ISO as a read-only CD-ROM,
no disk and no NIC; its serial console is the run's output and input.  The
accelerator is measured, not assumed (`models.probe`): a /dev/kvm that opens
proves nothing on a nested paravirtual host.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import HostError, ImageError, ImageInfo, Model, RunRefused

SECTOR = 2048
FIRST_DESCRIPTOR = 16  # the system area (sectors 0..15) comes first
MAX_DESCRIPTORS = 64  # volume descriptors read before giving up on a terminator
MIN_ISO = (FIRST_DESCRIPTOR + 2) * SECTOR
MAX_ISO = 64 << 30
EL_TORITO = b"EL TORITO SPECIFICATION"
# What qemu itself costs beyond the guest's RAM, added to the unit's MemoryMax=:
# bench/kvm_overhead.py measures about 94 MiB after a boot under TCG, 50 of
# them TCG's code buffer, which qemu.TB_SIZE_MIB bounds at 128.
QEMU_OVERHEAD = 192 << 20


@dataclass(frozen=True)
class IsoImage:
    path: Path
    digest: str
    size: int


@dataclass(frozen=True)
class KvmLimits:
    memory: int  # bytes of guest RAM
    cpus: int
    accel: str  # "kvm" | "tcg": what this host measured
    cpu_seconds: float  # the lease's CPU time (0: none but the order's)
    wall_seconds: float
    output: int  # console bytes the run may print
    allow_cpuid: bool = False  # (the seccomp model's; unused here)
    mac: str | None = None  # a NIC on the buyer's link (seller/link.py), or none at all


def check_iso(path: Path, where: str) -> int:
    """The size of the ISO at `path`, after checking that it is ISO 9660 with
    an El Torito boot record; ImageError naming `where` otherwise."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < MIN_ISO:
                raise ImageError(f"{where}: {size} bytes is too small for an ISO 9660 image "
                                 f"(at least {MIN_ISO})")
            if size > MAX_ISO:
                raise ImageError(f"{where}: {size} bytes is over the {MAX_ISO >> 30} GiB an "
                                 f"ISO may have")
            f.seek(FIRST_DESCRIPTOR * SECTOR)
            primary = bootable = False
            for n in range(MAX_DESCRIPTORS):
                d = f.read(SECTOR)
                if len(d) < 7 or d[1:6] != b"CD001":
                    if n == 0:
                        raise ImageError(f"{where}: not an ISO 9660 image (no CD001 volume "
                                         f"descriptor at byte {FIRST_DESCRIPTOR * SECTOR})")
                    raise ImageError(f"{where}: volume descriptor {n} is not ISO 9660")
                kind = d[0]
                if kind == 255:
                    break
                if kind == 1:
                    primary = True
                elif kind == 0 and d[7:7 + len(EL_TORITO)] == EL_TORITO:
                    bootable = True
            else:
                raise ImageError(f"{where}: no volume descriptor terminator in the first "
                                 f"{MAX_DESCRIPTORS} descriptors")
    except OSError as e:
        raise ImageError(f"{where}: {e.strerror or e}") from None
    if not primary:
        raise ImageError(f"{where}: ISO 9660 image without a primary volume descriptor")
    if not bootable:
        raise ImageError(f"{where}: the ISO is not bootable (no El Torito boot record)")
    return size


class KvmModel(Model):
    name = "kvm"
    chunked = True  # images travel in chunks and live in files
    leases = True  # its work is leased nodes (sessions paid as they run), not tasks

    def __init__(self, accel_setting: str = "auto"):
        self.accel_setting = accel_setting
        self._choice = None

    def parse(self, blob: bytes, where: str = "image") -> IsoImage:
        """(For tests and small images: the blob is checked through a file.)"""
        from ..protocol import digest
        with tempfile.NamedTemporaryFile(prefix="cpushare-iso-") as f:
            f.write(blob)
            f.flush()
            check_iso(Path(f.name), where)
        return IsoImage(Path("/nonexistent"), digest(blob), len(blob))

    def parse_file(self, path: Path, digest: str, where: str = "image") -> IsoImage:
        """The ISO at `path`, whose content was verified to have `digest`."""
        return IsoImage(Path(path), digest, check_iso(Path(path), where))

    def info(self, image: IsoImage) -> ImageInfo:
        return ImageInfo(image.digest, 0)  # a node's memory is the lease's, not the image's

    def accel(self) -> str:
        """The accelerator this host uses ("kvm" or "tcg"), measured once;
        HostError when the order's setting cannot be met."""
        if self._choice is None:
            from . import probe
            try:
                self._choice = probe.choose(self.accel_setting)
            except probe.AccelError as e:
                raise HostError(str(e)) from None
        return self._choice.accel

    def check_host(self) -> str:
        import shutil
        from . import qemu
        if shutil.which(qemu.QEMU) is None:
            raise HostError(f"{qemu.QEMU} is not installed (Debian package qemu-system-x86); "
                            f"the kvm model needs it")
        accel = self.accel()
        return f"kvm model: qemu with {accel} ({self._choice.report})"

    def self_test(self) -> str:
        from . import probe
        try:
            m = probe.measure(self.accel(), timeout=10)
        except Exception as e:
            raise HostError(f"kvm self-test: the probe guest did not run: {e}") from None
        if not m.works:
            raise HostError(f"kvm self-test: the probe guest did not run under "
                            f"{self.accel()}: {m.reason}")
        return f"kvm self-test: a probe guest ran under {self.accel()} in {m.seconds:.2f} s"

    def limits(self, order_limits, *, cpu_ms: int, wall_ms: int, memory: int, output: int):
        lim = order_limits
        if memory <= 0:
            memory = lim.memory
        cpu = [v for v in (lim.cpu_seconds * 1000, cpu_ms) if v and v > 0]
        wall = [v for v in (lim.wall_seconds * 1000, wall_ms) if v and v > 0]
        return KvmLimits(
            memory=memory, cpus=lim.cpus, accel=self.accel(),
            cpu_seconds=min(cpu) / 1000 if cpu else 0, wall_seconds=min(wall) / 1000 if wall else 0,
            output=min(lim.output, output) if output >= 0 else lim.output)

    def start(self, image: IsoImage, limits: KvmLimits, workdir: Path | None = None):
        from . import qemu
        if limits.memory < 16 << 20:
            raise RunRefused("memory-limit", f"a guest needs at least 16 MiB, not "
                                             f"{limits.memory} bytes")
        try:
            return qemu.start(image.path, memory=limits.memory, cpus=limits.cpus,
                              accel=limits.accel, workdir=workdir,
                              console_budget=limits.output, mac=limits.mac)
        except qemu.LaunchError as e:
            raise RunRefused("sandbox", f"qemu did not start: {e}") from None
