"""The SQLite store's images: their bytes or IN_FILE, who stored them, size and last use."""

from __future__ import annotations

import sqlite3
import time
from typing import Iterable


class ImagesMixin:
    """Images of SQLiteStore (sqlite.py); those of chunked models are files that
    market.imagefiles keeps, and their row holds IN_FILE."""

    db: sqlite3.Connection

    def put_image(self, digest: str, data: bytes, account_id: int = 0) -> None:
        now = time.time()
        self.db.execute("INSERT INTO images (digest, data, created, account_id, size, used) "
                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (digest, data, now, account_id, len(data), now))

    def image_usage(self, account_id: int) -> tuple[int, int]:
        return self.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM images "
                               "WHERE account_id = ?", (account_id,)).fetchone()

    def touch_images(self, digests: Iterable[str]) -> None:
        self.db.executemany("UPDATE images SET used = ? WHERE digest = ?",
                            [(time.time(), d) for d in digests])

    def collect_images(self, unused_for: float) -> int:
        """Drop the images no open or unacknowledged task refers to and none
        has used for `unused_for` seconds; how many."""
        return self.db.execute(
            "DELETE FROM images WHERE used < ? AND digest NOT IN (SELECT image FROM tasks "
            "WHERE state = 'queued' OR (delivered = 0 AND session = 0))",
            (time.time() - unused_for,)).rowcount

    def has_image(self, digest: str) -> bool:
        return self.db.execute("SELECT 1 FROM images WHERE digest = ?",
                               (digest,)).fetchone() is not None

    def image(self, digest: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM images WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row and row[0] != self.in_file else None

    def put_image_file(self, digest: str, size: int, account_id: int) -> None:
        now = time.time()
        self.db.execute("INSERT INTO images (digest, data, created, account_id, size, used) "
                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (digest, self.in_file, now, account_id, size, now))

    def image_size(self, digest: str) -> int | None:
        row = self.db.execute("SELECT size FROM images WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row else None

    def image_file_digests(self) -> set[str]:
        return {d for d, in self.db.execute("SELECT digest FROM images WHERE data = ?",
                                            (self.in_file,))}
