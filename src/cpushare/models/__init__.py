"""Computation models: one module per model behind one interface.

The seller core, the daemon and the market ask a model (never `if model ==`)
what an image is, whether this host can run it, and to start a run:

    model = models.get(order.model)     # ModelError: unknown, or not built yet
    image = model.parse(blob, where)    # ImageError naming what and where
    model.info(image)                   # ImageInfo: digest, memory a run needs
    model.check_host()                  # HostError: this machine cannot sell it
    model.self_test()                   # HostError: its confinement does not hold
    limits = model.limits(order.limits, cpu_ms=, wall_ms=, memory=, output=)
    run = model.start(image, limits)    # the run: pause, resume, kill, meter
                                        # RunRefused: this host cannot run it

`seccomp` runs bytecode under seccomp strict mode; `kvm` boots a bootable
ISO under qemu.  A model whose `chunked` is true has images too big for
memory: they travel in chunks, live in files (`parse_file`), and the market
and the seller stream them.  This package imports neither D-Bus nor the
market.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

__all__ = ["Model", "ModelError", "ImageError", "HostError", "RunRefused", "ImageInfo", "get",
           "NAMES"]

NAMES = ("seccomp", "kvm")  # what an order may name (order.py's configspec)


class ModelError(Exception):
    """No such model, or not one this software can run yet."""


class ImageError(ValueError):
    """An image that is not one of the model's: the message names what and where."""


class HostError(RuntimeError):
    """This machine cannot run the model, or its self-test failed."""


class RunRefused(Exception):
    """The seller cannot run this image under these limits (not the job's
    fault): `reason` is the refusal's code, the prefix of the `result`'s
    reason the market never takes as a result (memory-limit, sandbox)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    digest: str  # the SHA-256 (hex) the protocol names the image by
    memory: int  # bytes of memory a run of it needs


class Model(abc.ABC):
    name: str
    chunked = False  # images travel in chunks and live in files (parse_file)
    leases = False  # its work is leased nodes (`open`, paid as they run), never `submit`

    @abc.abstractmethod
    def parse(self, blob: bytes, where: str = "image"):
        """The image in `blob`, checked; raises ImageError."""

    def parse_file(self, path, digest: str, where: str = "image"):
        """The image in the file at `path`, checked (its content was verified
        to have `digest`); raises ImageError."""
        try:
            blob = open(path, "rb").read()
        except OSError as e:
            raise ImageError(f"{where}: {e.strerror or e}") from None
        return self.parse(blob, where)

    @abc.abstractmethod
    def info(self, image) -> ImageInfo: ...

    @abc.abstractmethod
    def check_host(self) -> str:
        """What this machine offers the model (one line); raises HostError."""

    @abc.abstractmethod
    def self_test(self) -> str:
        """Prove the confinement holds (one line); raises HostError."""

    @abc.abstractmethod
    def limits(self, order_limits, *, cpu_ms: int, wall_ms: int, memory: int, output: int):
        """The limits of one run: the task's (0 or -1: none asked) within the
        sell order's."""

    @abc.abstractmethod
    def start(self, image, limits):
        """Start a run of `image` under `limits`: an object with pause(),
        resume(), kill() and feed_async(data, sink); RunRefused when this host
        cannot run it."""


_BUILT: dict[tuple, Model] = {}


def get(name: str, accel: str = "auto") -> Model:
    """The model called `name` (`accel`: the kvm model's accelerator setting,
    auto | kvm | tcg); ModelError if unknown."""
    key = (name, accel if name == "kvm" else "")
    model = _BUILT.get(key)
    if model is not None:
        return model
    if name == "seccomp":
        from .seccomp import SeccompModel
        model = _BUILT[key] = SeccompModel()
        return model
    if name == "kvm":
        from .kvm import KvmModel
        if accel not in ("auto", "kvm", "tcg"):
            raise ModelError(f"accel {accel!r}: must be auto, kvm or tcg")
        model = _BUILT[key] = KvmModel(accel)
        return model
    raise ModelError(f"unknown computation model {name!r} (known: {', '.join(NAMES)})")
