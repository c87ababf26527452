"""Large inputs and outputs of the SQLite store, one file each beside the database.

A value over BIG bytes is a file in PATH.d/ and its column holds IN_FILE:
the file is written before the commit that refers to it and removed after
the commit that drops it; `collect_garbage()` removes what a crash left
between the two.
"""

from __future__ import annotations

import concurrent.futures
import os
import sqlite3

from .rows import StoreError

BIG = 64 << 10  # inputs and outputs larger than this live in files beside the database
IN_FILE = "file"  # what their column holds then
BACKGROUND_WRITE = 1 << 20  # files this big are written by a thread (see SQLiteStore._put)


class FilesMixin:
    """The large values of SQLiteStore (sqlite.py), which sets up what they use."""

    db: sqlite3.Connection
    blob_dir: str
    synchronous: str
    _unlink: list[str]
    _files: bool
    _pending: dict[str, concurrent.futures.Future]
    _file_writer: concurrent.futures.ThreadPoolExecutor | None

    def _put(self, name: str, data: bytes | None):
        """The column value for `data`: the bytes, or IN_FILE once they are in a file."""
        if data is None or len(data) <= BIG:
            return data
        path = os.path.join(self.blob_dir, name)
        self._wait_files(name)  # (a name is written once; to be sure)
        self._files = True
        if len(data) >= BACKGROUND_WRITE:
            if self._file_writer is None:
                self._file_writer = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="cpushare-store-files")
            self._pending[name] = self._file_writer.submit(self._write_file, path, data)
        else:
            self._write_file(path, data)
        if name in self._unlink:
            self._unlink.remove(name)
        return IN_FILE

    def _write_file(self, path: str, data: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(self.blob_dir, mode=0o700, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.synchronous == "full":
                os.fsync(fd)
        finally:
            os.close(fd)

    def _wait_files(self, name: str | None = None) -> None:
        """Wait for the background write of `name` (default: of every file)."""
        if name is not None:
            fut = self._pending.pop(name, None)
            if fut is not None:
                fut.result()
            return
        pending, self._pending = self._pending, {}
        concurrent.futures.wait(pending.values())
        for fut in pending.values():
            fut.result()  # the first write's OSError, if any, once all are done

    def files_pending(self) -> bool:
        return any(not f.done() for f in self._pending.values())

    def _get(self, name: str, value) -> bytes:
        if value == IN_FILE:
            self._wait_files(name)
            path = os.path.join(self.blob_dir, name)
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise StoreError(f"{path}: {e.strerror}") from None
        return value or b""

    def collect_garbage(self) -> int:
        try:
            names = set(os.listdir(self.blob_dir))
        except FileNotFoundError:
            return 0
        q = self.db.execute
        needed = {f"t{i}.in" for i, in q("SELECT id FROM tasks WHERE state = 'queued' "
                                         "AND input = ?", (IN_FILE,))}
        needed |= {f"t{i}.out" for i, in q("SELECT id FROM tasks WHERE delivered = 0 "
                                           "AND output = ?", (IN_FILE,))}
        needed |= {f"a{i}.out" for i, in q("SELECT id FROM attempts WHERE output = ?",
                                           (IN_FILE,))}
        stale = names - needed
        for name in stale:
            try:
                os.unlink(os.path.join(self.blob_dir, name))
            except FileNotFoundError:
                pass
        return len(stale)
