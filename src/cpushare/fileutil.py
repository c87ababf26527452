"""Files written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int = 0o644,
                 fsync: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same directory
    and a rename, so a reader sees the old file or the new one, never a part.

    The temporary file has `mode` from its first byte (mkstemp creates it
    0600; it is widened only after the content is written), and with `fsync`
    the content is on disk before the rename makes it visible."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
