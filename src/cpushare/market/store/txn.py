"""What both stores do alike over their connections' SQL: savepoints,
transactions of their own, and the settings' table."""

from __future__ import annotations

import contextlib
from typing import Iterator


class TxnMixin:
    """Needs `self.db` (execute), begin(), commit() and rollback()."""

    _sp: int

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    @contextlib.contextmanager
    def op(self) -> Iterator[None]:
        """One logical operation inside the open transaction (a savepoint)."""
        self._sp += 1
        name = f"op{self._sp}"
        self.db.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.db.execute(f"ROLLBACK TO SAVEPOINT {name}")
            self.db.execute(f"RELEASE SAVEPOINT {name}")
            raise
        else:
            self.db.execute(f"RELEASE SAVEPOINT {name}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction of its own (for the admin commands)."""
        self.begin()
        try:
            yield
        except BaseException:
            self.rollback()
            raise
        else:
            self.commit()

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                        "DO UPDATE SET value = excluded.value", (key, value))
