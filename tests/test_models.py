"""The computation models behind one interface."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cpushare import models
from cpushare.bytecode import Image, DEFAULT_TEXT_ADDRESS

SRC = Path(models.__file__).parent


def test_seccomp_parses_checks_and_runs_its_images():
    m = models.get("seccomp")
    assert m.name == "seccomp" and models.get("seccomp") is m
    img = Image(text=b"\x31\xff\xb8\x3c\x00\x00\x00\x0f\x05", entry=DEFAULT_TEXT_ADDRESS)
    parsed = m.parse(img.pack(), where="test")
    info = m.info(parsed)
    assert info.digest == img.digest and info.memory == img.memory_size
    assert "seccomp: yes" in m.check_host()
    assert m.self_test()


def test_a_bad_image_is_an_image_error_naming_where():
    with pytest.raises(models.ImageError, match="upload.bin"):
        models.get("seccomp").parse(b"not an image", where="upload.bin")


def test_unknown_models_and_accelerators_are_refused():
    assert models.get("kvm").name == "kvm" and models.get("kvm", "tcg") is models.get("kvm", "tcg")
    with pytest.raises(models.ModelError, match="unknown computation model 'vax'"):
        models.get("vax")
    with pytest.raises(models.ModelError, match="accel 'hvf'"):
        models.get("kvm", "hvf")


def _descriptor(kind: int, body: bytes = b"") -> bytes:
    return (bytes([kind]) + b"CD001\x01" + body).ljust(2048, b"\0")


def _iso(*descriptors: bytes) -> bytes:
    return b"\0" * 16 * 2048 + b"".join(descriptors) + b"\0" * 2048


BOOT = _descriptor(0, b"EL TORITO SPECIFICATION")


@pytest.mark.parametrize("blob, error", [
    (b"x" * 100, "too small for an ISO 9660 image"),
    (b"\0" * 40000, "not an ISO 9660 image (no CD001 volume descriptor at byte 32768)"),
    (_iso(_descriptor(1), _descriptor(255)), "not bootable (no El Torito boot record)"),
    (_iso(BOOT, _descriptor(255)), "without a primary volume descriptor"),
    (_iso(_descriptor(1), BOOT, b"\0" * 2048), "volume descriptor 2 is not ISO 9660"),
])
def test_kvm_images_are_bootable_iso9660_files(tmp_path, blob, error):
    from cpushare.models.kvm import check_iso
    path = tmp_path / "upload.iso"
    path.write_bytes(blob)
    with pytest.raises(models.ImageError) as e:
        check_iso(path, str(path))
    assert str(e.value).startswith(f"{path}: ") and error in str(e.value)


def test_kvm_parses_a_bootable_iso_by_file_and_by_blob(tmp_path):
    from cpushare.protocol import digest
    blob = _iso(_descriptor(1), BOOT, _descriptor(255))
    path = tmp_path / "ok.iso"
    path.write_bytes(blob)
    m = models.get("kvm")
    img = m.parse_file(path, digest(blob), "ok.iso")
    assert (img.size, m.info(img).digest, m.info(img).memory) == (len(blob), digest(blob), 0)
    assert m.info(m.parse(blob)).digest == digest(blob)


def test_models_import_neither_dbus_nor_the_market():
    for path in SRC.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "")] + [a.name for a in node.names]
            for n in names:
                assert "dbus" not in n and "market" not in n and "systemd" not in n, (path, n)


def test_seccomp_limits_are_the_tasks_within_the_orders_and_refusals_are_typed():
    from types import SimpleNamespace
    m = models.get("seccomp")
    order = SimpleNamespace(cpu_seconds=10, wall_seconds=20, memory=64 << 20, output=1 << 20,
                            allow_cpuid=False)
    lim = m.limits(order, cpu_ms=2500, wall_ms=0, memory=1 << 40, output=-1)
    assert (lim.cpu_seconds, lim.wall_seconds, lim.memory, lim.output) == \
        (2.5, 20, 64 << 20, 1 << 20)
    big = Image(text=b"\x90", entry=DEFAULT_TEXT_ADDRESS, stack_size=128 << 20)
    with pytest.raises(models.RunRefused, match="more than the limit") as e:
        m.start(big, lim)
    assert e.value.reason == "memory-limit"
