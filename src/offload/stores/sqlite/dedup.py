"""The SQLite store's dedup keys: one table, shared by every process on the file.

A task with a dedup key is written by an INSERT in a write transaction (not through the
journal) that first reads the key's row: while a task holds the key (`until` NULL), or
until its window has passed, the enqueue adds nothing and gets that task back. Settling a
task lets its key go in the transaction that deletes its row: at once, or after its window.
The key is the table's primary key, so two processes racing for it cannot both win. The
sweep deletes keys whose window has passed (`free_keys`), through an index of the rows
with an `until`: never reading the keys of live tasks.
"""

from __future__ import annotations

import sqlite3

from ...codec.task import TaskRecord
from ...records import Task
from .._shared import holder_handle
from .schema import PUT_UNIQUE, transaction

__all__ = [
    "ANY_PASSED",
    "FREE_KEYS",
    "free_keys",
    "holder_handle",
    "key_holder",
    "let_key_go",
    "put_unique",
    "take_key",
]

# The keys whose window passed, through the index dedup_until (schema.py, format 6).
_PASSED = "FROM dedup WHERE until <= ?"
ANY_PASSED = f"SELECT 1 {_PASSED} LIMIT 1"
# A batch at a time, each its own write (autocommit): a pile of them (a file a format-5
# offload used for months) never holds the file's write lock for long.
_BATCH = 1_000
_BATCHES = 10  # per sweep: 5,000 keys a second at most, at a sweep every 2 s
FREE_KEYS = f"DELETE FROM dedup WHERE rowid IN (SELECT rowid {_PASSED} LIMIT ?)"


def key_holder(conn: sqlite3.Connection, key: str, now: float) -> tuple[str, str] | None:
    """(task id, idempotency key) of the task holding `key` at `now`, or None."""
    row = conn.execute(
        "SELECT task_id, idempotency_key FROM dedup WHERE key = ? AND (until IS NULL OR until > ?)",
        (key, now),
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def take_key(conn: sqlite3.Connection, record: TaskRecord) -> None:
    """`record`'s task holds its key from now on (in the caller's transaction), unless a
    live task holds it: a put takes a key it found free (or its window passed); a replayed
    dead letter's task takes its key again, but not from a task enqueued after the dead
    letter let it go (a third enqueue would get in), and may end a window still running."""
    conn.execute(
        "INSERT INTO dedup (key, task_id, idempotency_key, until) VALUES (?, ?, ?, NULL) "
        "ON CONFLICT (key) DO UPDATE SET task_id = excluded.task_id, "
        "idempotency_key = excluded.idempotency_key, until = NULL "
        "WHERE dedup.until IS NOT NULL "
        "OR NOT EXISTS (SELECT 1 FROM tasks WHERE tasks.id = dedup.task_id)",
        (record.dedup_key, record.id, record.idempotency_key),
    )


def let_key_go(conn: sqlite3.Connection, task: Task, now: float) -> None:
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


def free_keys(conn: sqlite3.Connection, now: float) -> None:
    """Delete the keys whose window has passed by `now` (the sweep's), in batches (see
    _BATCH); the rest at the next sweep. A read first: a DELETE takes the write lock even
    when it deletes nothing."""
    if conn.execute(ANY_PASSED, (now,)).fetchone():
        for _ in range(_BATCHES):
            if conn.execute(FREE_KEYS, (now, _BATCH)).rowcount < _BATCH:
                return


def put_unique(
    conn: sqlite3.Connection,
    task: Task,
    record: TaskRecord,
    due: float,
    owner: str | None,
    until: float | None,
    now: float,
) -> Task:
    """One transaction that finds `record`'s key held (and returns a handle on the task
    holding it) or takes it and inserts the task: the key is seen by every process at
    once, which a journal line would not be."""
    assert record.dedup_key is not None
    stored_key = None if record.idempotency_key == record.id else record.idempotency_key
    row = (
        record.id,
        stored_key,
        record.key,
        record.call,
        record.retry,
        due,
        owner,
        until,
        record.dedup_key,
        record.dedup_window,
    )
    with transaction(conn):
        held = key_holder(conn, record.dedup_key, now)
        if held is not None:
            return holder_handle(task, held)
        take_key(conn, record)
        conn.execute(PUT_UNIQUE, row)
    return task
