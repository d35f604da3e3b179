"""The PostgreSQL store's dedup keys: the `dedup` table, shared by every process on the
database, as the SQLite store's is on its file.

A task with a dedup key is written by one statement that takes its key (`INSERT ... ON
CONFLICT DO NOTHING` on the table's primary key) and inserts the task only if it did: two
processes racing for a key meet at that index, and one of them wins. The other reads the
holder and gets it back; a key whose window has passed is deleted and taken again. While
a task lives (queued, delayed, leased, retrying) its key is held (`until` NULL); settling
it lets the key go in the transaction that deletes its row: at once, or after its window
(`until`). The sweep deletes the keys whose window has passed.

Through the application's connection (`put_in`) the same statements run in its open
transaction: the key is taken if and only if that transaction commits, and an enqueue
of the same key elsewhere waits for that commit (or rollback) at the index. On the
store's own connection (`put_alone`) that wait must not hold the store's lock, which its
renewals, claims and counts share: each try waits at the index a moment only (a
`lock_timeout` local to its statement), then lets the lock go before the next, for up
to a lease timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ...codec.task import TaskRecord
from ...errors import StoreError
from ...records import Task
from .._shared import holder_handle
from .schema import Sql

__all__ = ["free_keys", "let_key_go", "put_alone", "put_unique"]

_TRIES = 5  # takes of a key that keeps changing hands before giving up
_LOCK_NOT_AVAILABLE = "55P03"  # the SQLSTATE of a lock_timeout that ran out


def put_unique(
    conn: Any,
    sql: Sql,
    task: Task,
    record: TaskRecord,
    row: tuple[Any, ...],
    now: float,
    *,
    notify: bool,
    alone: bool = False,
) -> Task | None:
    """Take `record`'s key and write its task (`row`: tasks.task_row's values), or return a
    handle on the task holding the key; None when the key changed hands every time it was
    tried. `conn` is a cursor or a connection (the application's); `notify`: the task waits
    (not leased), so the listening workers hear of it; `alone`: on the store's connection,
    waiting at the key's index a moment only (put_alone)."""
    key = record.dedup_key
    assert key is not None
    take = (key, record.id, record.idempotency_key, *row, key, record.dedup_window)
    statement = sql.put_unique[alone, notify]
    params = (*take, sql.channel) if notify else take
    for _ in range(_TRIES):
        if conn.execute(statement, params).fetchone() is not None:
            return task
        # Held: by a task committed before this statement, or by one whose transaction
        # this statement waited for at the index (read now, by a statement of its own).
        found = conn.execute(sql.key_holder, (now, key)).fetchone()
        if found is None:
            continue  # it just went
        holder, idempotency_key, holds, version = found
        if holds:
            return holder_handle(task, (str(holder), str(idempotency_key)))
        conn.execute(sql.free_key[alone], (key, version, now))  # its window has passed
    return None


def put_alone(
    use: Callable[[str], AbstractContextManager[Any]],
    sql: Sql,
    task: Task,
    record: TaskRecord,
    row: tuple[Any, ...],
    clock: Callable[[], float],
    *,
    notify: bool,
    patience: float,
    shown: str,
) -> Task | None:
    """put_unique on the store's own connection (`use`: the store's lock and cursor), by
    statements that wait at the key's index a moment each, with the lock let go between
    them, while another transaction that took the key is open; StoreError after
    `patience` seconds of that."""
    deadline = time.monotonic() + patience
    pause = 0.005
    while True:
        with use("enqueue") as cur:
            try:
                return put_unique(cur, sql, task, record, row, clock(), notify=notify, alone=True)
            except Exception as exc:
                if getattr(exc, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                    raise
        left = deadline - time.monotonic()
        if left <= 0:
            raise StoreError(
                f"{shown}: enqueue failed: dedup key {record.dedup_key!r} is held by a "
                f"transaction not yet committed (waited {patience:g} s; keep transactions "
                "that enqueue short)"
            )
        time.sleep(min(pause, left))  # the other transaction's commit, which nothing announces
        pause = min(pause * 2, 0.1)


def let_key_go(cur: Any, sql: Sql, task: Task, now: float) -> None:
    """`task` ended (delivered or dead-lettered): its key is free, after its window (in the
    caller's transaction)."""
    key = task.dedup_key
    if key is None:
        return
    if task.dedup_window > 0:
        cur.execute(sql.let_key_go_later, (now + task.dedup_window, key, task.id))
    else:
        cur.execute(sql.let_key_go, (key, task.id))


def free_keys(cur: Any, sql: Sql, now: float) -> None:
    """Delete the keys whose window has passed by `now` (the sweep's)."""
    cur.execute(sql.free_keys, (now,))
