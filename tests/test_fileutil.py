import os
import stat

import pytest

from cpushare.fileutil import atomic_write


def test_writes_whole_file_with_its_mode(tmp_path):
    p = tmp_path / "order.cpu"
    atomic_write(p, b"secret", mode=0o600)
    assert p.read_bytes() == b"secret"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    atomic_write(p, b"public", mode=0o644, fsync=False)
    assert p.read_bytes() == b"public"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["order.cpu"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "job.bin"
    p.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(p, "not bytes")  # type: ignore[arg-type]
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["job.bin"]
