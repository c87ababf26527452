"""The seccomp model: raw x86-64 bytecode under seccomp strict mode.

Images are `cpushare.bytecode` images; a run is a `cpushare.sandbox` job;
the host needs CONFIG_SECCOMP (`cpushare.kernel`) and the sandbox's
self-test (a forbidden call must kill the child) must pass.
"""

from __future__ import annotations

from .. import bytecode
from . import HostError, ImageError, ImageInfo, Model, RunRefused


def _min_nonzero(*values: int) -> int:
    vals = [v for v in values if v and v > 0]
    return min(vals) if vals else 0


class SeccompModel(Model):
    name = "seccomp"

    def parse(self, blob: bytes, where: str = "image") -> bytecode.Image:
        try:
            return bytecode.parse(blob, where=where)
        except bytecode.BytecodeError as e:
            raise ImageError(str(e)) from None

    def info(self, image: bytecode.Image) -> ImageInfo:
        return ImageInfo(image.digest, image.memory_size)

    def check_host(self) -> str:
        from .. import kernel
        try:
            report = kernel.require_seccomp()
        except kernel.KernelError as e:
            raise HostError(str(e)) from None
        return report.lines()[0]

    def self_test(self) -> str:
        from .. import sandbox
        try:
            return sandbox.self_test()
        except sandbox.SandboxError as e:
            raise HostError(f"sandbox self-test failed, refusing to sell: {e}") from None

    def limits(self, order_limits, *, cpu_ms: int, wall_ms: int, memory: int, output: int):
        from .. import sandbox
        lim = order_limits
        cpu_ms = _min_nonzero(lim.cpu_seconds * 1000, cpu_ms)
        wall_ms = _min_nonzero(lim.wall_seconds * 1000, wall_ms)
        return sandbox.Limits(
            cpu_seconds=cpu_ms / 1000, wall_seconds=wall_ms / 1000,
            memory=_min_nonzero(lim.memory, memory),
            output=min(lim.output, output) if output >= 0 else lim.output,
            allow_cpuid=lim.allow_cpuid)

    def start(self, image: bytecode.Image, limits):
        from .. import sandbox
        try:
            return sandbox.start(image, limits)
        except sandbox.MemoryLimitError as e:
            raise RunRefused("memory-limit", str(e)) from None
        except sandbox.SandboxError as e:
            raise RunRefused("sandbox", str(e)) from None
