"""The SQLite store's tasks, their attempts, results and disputes."""

from __future__ import annotations

import sqlite3
import time
from typing import Iterable

from .rows import AttemptRow, Result, StoreError, TaskRow


class TasksMixin:
    """Tasks and attempts of SQLiteStore (sqlite.py); their large inputs and
    outputs go through its files (files.py)."""

    db: sqlite3.Connection
    _unlink: list[str]

    _TASK = ("SELECT id, buy_order_id, buyer_account_id, ref, image, redundancy, cpu_ms, "
             "bid_milli, escrow_milli, state, session, model FROM tasks ")

    def add_task(self, buy_order_id, buyer_account_id, ref, image, input_, redundancy,
                 cpu_ms, bid_milli, escrow_milli=0, session=False, model="seccomp") -> int:
        """A queued task; `escrow_milli` must be moved to escrow in the same transaction."""
        big = len(input_) > self.big
        tid = self.db.execute(
            "INSERT INTO tasks (buy_order_id, buyer_account_id, ref, image, input, redundancy,"
            " cpu_ms, bid_milli, escrow_milli, session, created, model) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (buy_order_id, buyer_account_id, ref, image, self.in_file if big else input_,
             redundancy, cpu_ms, bid_milli, escrow_milli, int(session), time.time(),
             model)).fetchone()[0]
        if big:
            self._put(f"t{tid}.in", input_)
        return tid

    def undelivered_refs(self, buy_order_id: int | None = None) -> list[tuple[int, str, int, int]]:
        """(buy order, ref, task, buyer account) of every task (of one buy order)
        whose result the buyer has not acknowledged."""
        sql = ("SELECT buy_order_id, ref, id, buyer_account_id FROM tasks "
               "WHERE delivered = 0 AND session = 0")
        if buy_order_id is None:
            return list(self.db.execute(sql))
        return list(self.db.execute(sql + " AND buy_order_id = ?", (buy_order_id,)))

    def pending_task(self, buy_order_id: int, ref: str) -> TaskRow | None:
        row = self.db.execute(self._TASK + "WHERE buy_order_id = ? AND delivered = 0 AND ref = ? "
                              "AND session = 0",
                              (buy_order_id, ref)).fetchone()
        return TaskRow(*row) if row else None

    def task(self, task_id: int) -> TaskRow:
        row = self.db.execute(self._TASK + "WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise StoreError(f"no task {task_id}")
        return TaskRow(*row)

    def task_input(self, task_id: int) -> bytes:
        row = self.db.execute("SELECT input FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return self._get(f"t{task_id}.in", row[0])

    def queued_tasks(self) -> list[TaskRow]:
        return [TaskRow(*r) for r in self.db.execute(
            self._TASK + "WHERE state = 'queued' ORDER BY id")]

    def add_attempt(self, task_id, sell_order_id, seller_account_id, ask_milli) -> int:
        return self.db.execute(
            "INSERT INTO attempts (task_id, sell_order_id, seller_account_id, ask_milli, started)"
            " VALUES (?, ?, ?, ?, ?) RETURNING id",
            (task_id, sell_order_id, seller_account_id, ask_milli, time.time())).fetchone()[0]

    def attempts(self, task_id: int) -> list[AttemptRow]:
        return [AttemptRow(*r) for r in self.db.execute(
            "SELECT id, task_id, sell_order_id, seller_account_id, state, ask_milli, cpu_ms, "
            "output_sha256, exit_status, signal, reason, paid_milli FROM attempts WHERE task_id = ? "
            "ORDER BY id", (task_id,))]

    def attempt_returned(self, attempt_id, cpu_ms, output_sha256, exit_status, signal, reason,
                         output) -> None:
        self.db.execute(
            "UPDATE attempts SET state = 'returned', cpu_ms = ?, output_sha256 = ?, "
            "exit_status = ?, signal = ?, reason = ?, output = ? WHERE id = ?",
            (cpu_ms, output_sha256, exit_status, signal, reason,
             self._put(f"a{attempt_id}.out", output), attempt_id))

    def set_attempt_state(self, attempt_id: int, state: str, paid_milli: int = 0,
                          result: tuple | None = None) -> None:
        """End an attempt; `result` = (cpu_ms, output_sha256, exit_status, signal, reason)
        records what it returned in the same statement."""
        # Outputs of settled attempts are not kept: the task holds the accepted one.
        self._unlink.append(f"a{attempt_id}.out")
        if result is None:
            self.db.execute("UPDATE attempts SET state = ?, paid_milli = ?, output = NULL "
                            "WHERE id = ?", (state, paid_milli, attempt_id))
        else:
            self.db.execute("UPDATE attempts SET state = ?, paid_milli = ?, output = NULL, "
                            "cpu_ms = ?, output_sha256 = ?, exit_status = ?, signal = ?, "
                            "reason = ? WHERE id = ?",
                            (state, paid_milli, *result, attempt_id))

    def metered(self, attempt_id: int, cpu_ms: int, paid_milli: int) -> None:
        self.db.execute("UPDATE attempts SET cpu_ms = ?, paid_milli = ? WHERE id = ?",
                        (cpu_ms, paid_milli, attempt_id))

    def attempt_output(self, attempt_id: int) -> bytes:
        row = self.db.execute("SELECT output FROM attempts WHERE id = ?", (attempt_id,)).fetchone()
        return self._get(f"a{attempt_id}.out", row[0] if row else None)

    def lose_running_attempts(self, keep_models: tuple[str, ...] = ()) -> int:
        marks = ", ".join("?" * len(keep_models)) or "NULL"
        return self.db.execute(
            f"UPDATE attempts SET state = 'lost' WHERE state = 'running' AND task_id NOT IN "
            f"(SELECT id FROM tasks WHERE state = 'queued' AND session = 1 AND model IN "
            f"({marks}))", keep_models).rowcount

    def finish_task(self, task_id, state, *, exit_status=None, signal=None, reason="",
                    cpu_ms=0, cost_milli=0, attempts=0, output=b"", fail_code=None,
                    fail_message=None) -> None:
        self.db.execute(
            "UPDATE tasks SET state = ?, exit_status = ?, signal = ?, reason = ?, "
            "used_cpu_ms = ?, cost_milli = ?, attempts = ?, output = ?, fail_code = ?, "
            "fail_message = ?, input = NULL, escrow_milli = 0 WHERE id = ?",
            (state, exit_status, signal, reason, cpu_ms, cost_milli, attempts,
             self._put(f"t{task_id}.out", output), fail_code, fail_message, task_id))
        self._unlink.append(f"t{task_id}.in")

    _RESULT = ("SELECT id, ref, state, exit_status, signal, reason, used_cpu_ms, cost_milli, "
               "attempts, output, fail_code, fail_message FROM tasks ")

    def _result(self, r) -> Result:
        return Result(r[0], r[1], r[2], r[3], r[4], r[5] or "", r[6] or 0, r[7] or 0,
                      r[8] or 0, self._get(f"t{r[0]}.out", r[9]), r[10], r[11])

    def undelivered(self, buy_order_id: int) -> list[Result]:
        return [self._result(r) for r in self.db.execute(
            self._RESULT + "WHERE buy_order_id = ? AND delivered = 0 AND state != 'queued' "
            "AND session = 0 ORDER BY id", (buy_order_id,))]

    def undelivered_ids(self, buy_order_id: int) -> list[int]:
        """The tasks of a buy order whose result waits for the buyer's ack, oldest first."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM tasks WHERE buy_order_id = ? AND delivered = 0 "
            "AND state != 'queued' AND session = 0 ORDER BY id", (buy_order_id,))]

    def stale_results(self, before: float) -> list[int]:
        """Tasks created before `before` whose result is still not acknowledged."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM tasks WHERE delivered = 0 AND state != 'queued' AND session = 0 "
            "AND created < ?", (before,))]

    def delivered_task(self, buy_order_id: int, ref: str) -> int | None:
        """The task of a buy order under `ref` whose result the buyer acknowledged."""
        row = self.db.execute("SELECT id FROM tasks WHERE buy_order_id = ? AND delivered = 1 "
                              "AND ref = ? AND session = 0", (buy_order_id, ref)).fetchone()
        return row[0] if row else None

    def result(self, task_id: int) -> Result:
        row = self.db.execute(self._RESULT + "WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise StoreError(f"no task {task_id}")
        return self._result(row)

    def mark_delivered(self, task_ids: Iterable[int], refs=None) -> None:
        task_ids = list(task_ids)
        self.db.executemany("UPDATE tasks SET delivered = 1, output = NULL WHERE id = ?",
                            [(t,) for t in task_ids])
        self._unlink.extend(f"t{t}.out" for t in task_ids)

    def add_dispute(self, task_id, attempt_id, seller_account_id, output_sha256,
                    majority_sha256) -> None:
        self.db.execute(
            "INSERT INTO disputes (task_id, attempt_id, seller_account_id, output_sha256, "
            "majority_sha256, created) VALUES (?, ?, ?, ?, ?, ?)",
            (task_id, attempt_id, seller_account_id, output_sha256, majority_sha256,
             time.time()))

    def disputes(self, task_id: int | None = None) -> list[tuple]:
        sql = ("SELECT d.task_id, d.attempt_id, a.name, d.output_sha256, d.majority_sha256 "
               "FROM disputes d JOIN accounts a ON a.id = d.seller_account_id")
        if task_id is None:
            return list(self.db.execute(sql + " ORDER BY d.id"))
        return list(self.db.execute(sql + " WHERE d.task_id = ? ORDER BY d.id", (task_id,)))

