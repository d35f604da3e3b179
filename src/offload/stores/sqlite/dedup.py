"""The SQLite store's dedup keys: one table, shared by every process on the file.

A task with a dedup key is written by an INSERT in a write transaction (not through the
journal) that first reads the key's row: while a task holds the key (`until` NULL), or
until its window has passed, the enqueue adds nothing and gets that task back. Settling a
task lets its key go in the transaction that deletes its row: at once, or after its window.
The key is the table's primary key, so two processes racing for it cannot both win.
"""

from __future__ import annotations

import sqlite3

from ...codec.task import TaskRecord
from ...records import Task

__all__ = ["holder", "let_go", "take"]


def holder(conn: sqlite3.Connection, key: str, now: float) -> tuple[str, str] | None:
    """(task id, idempotency key) of the task holding `key` at `now`, or None."""
    row = conn.execute(
        "SELECT task_id, idempotency_key FROM dedup WHERE key = ? AND (until IS NULL OR until > ?)",
        (key, now),
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def take(conn: sqlite3.Connection, record: TaskRecord) -> None:
    """`record`'s task holds its key from now on (in the caller's transaction)."""
    conn.execute(
        "INSERT OR REPLACE INTO dedup (key, task_id, idempotency_key, until) "
        "VALUES (?, ?, ?, NULL)",
        (record.dedup_key, record.id, record.idempotency_key),
    )


def let_go(conn: sqlite3.Connection, task: Task, now: float) -> None:
    """`task` ended (delivered or dead-lettered): its key is free, after its window."""
    key = task.dedup_key
    if key is None:
        return
    if task.dedup_window > 0:
        conn.execute(
            "UPDATE dedup SET until = ? WHERE key = ? AND task_id = ?",
            (now + task.dedup_window, key, task.id),
        )
    else:
        conn.execute("DELETE FROM dedup WHERE key = ? AND task_id = ?", (key, task.id))


def handle(task: Task, held_by: tuple[str, str]) -> Task:
    """A handle on the task holding the key: its ids, this enqueue's call."""
    task_id, idempotency_key = held_by
    return Task._restore(
        task.call,
        task.args,
        dict(task.kwargs),
        task_id=task_id,
        idempotency_key=idempotency_key,
        key=task.key,
        retry=task.retry,
        progress=None,
        dedup_key=task.dedup_key,
        dedup_window=task.dedup_window,
    )
