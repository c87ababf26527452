"""The seccomp model: raw x86-64 bytecode under seccomp strict mode.

Images are `cpushare.bytecode` images; a run is a `cpushare.sandbox` job;
the host needs CONFIG_SECCOMP (`cpushare.kernel`) and the sandbox's
self-test (a forbidden call must kill the child) must pass.
"""

from __future__ import annotations

from .. import bytecode
from . import HostError, ImageError, ImageInfo, Model


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

    def start(self, image: bytecode.Image, limits):
        from .. import sandbox
        return sandbox.start(image, limits)
