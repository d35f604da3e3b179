"""The SQLite store's dead letters: the dead_letters table, on a connection the store
hands over (its lock held).

A dead letter keeps its task's call and retry policy as the tasks table stored them, so
that `replay_letter` moves the task back in one transaction without loading it: a process
that cannot import the task's function (the `offload` command, say) replays it for the
workers that can.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ...codec.task import TaskRecord, Unreadable
from ...codec.trust import TRUST_ANY, Trust
from ...errors import StoreError, UnknownDeadLetter
from ...records import DeadLetter, Task
from .._shared import epoch, letter_of
from .dedup import let_key_go, take_key
from .schema import LETTER_COLUMNS, PUT_UNIQUE, transaction

__all__ = [
    "bury_task",
    "count_letters",
    "discard_letter",
    "purge_letters",
    "read_letter",
    "read_letters",
    "replay_letter",
    "revive_letter",
]

_INSERT = (
    "INSERT INTO dead_letters (id, task_id, idempotency_key, description, key, "
    "attempts, error, status, reason, first_attempt_at, last_attempt_at, buried_at, "
    "call, retry, dedup_key, dedup_window) "
)


def bury_task(conn: sqlite3.Connection, task: Task, letter: DeadLetter, now: float) -> None:
    """Keep `letter` with the task's stored call, and delete the task, in one transaction."""
    values = (
        letter.id,
        letter.task_id,
        task.idempotency_key,
        letter.description,
        letter.key,
        letter.attempts,
        letter.error,
        letter.status,
        letter.reason,
        epoch(letter.first_attempt_at),
        epoch(letter.last_attempt_at),
        now,
    )
    with transaction(conn):
        copied = conn.execute(
            _INSERT + "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, call, retry, dedup_key, "
            "dedup_window FROM tasks WHERE id = ? LIMIT 1",
            (*values, task.id),
        ).rowcount
        if not copied:  # the row is gone (a lease lost): store the call from memory
            record = TaskRecord.of(task)
            conn.execute(
                _INSERT + "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*values, record.call, record.retry, record.dedup_key, record.dedup_window),
            )
        conn.execute("DELETE FROM tasks WHERE id = ?", (task.id,))
        let_key_go(conn, task, now)


def read_letters(conn: sqlite3.Connection) -> list[DeadLetter]:
    """Every dead letter, oldest first."""
    rows = conn.execute(f"SELECT {LETTER_COLUMNS} FROM dead_letters ORDER BY seq").fetchall()
    return [letter_of(row) for row in rows]


def read_letter(conn: sqlite3.Connection, dead_letter_id: str) -> DeadLetter:
    """One dead letter by id; UnknownDeadLetter if none has it."""
    row = conn.execute(
        f"SELECT {LETTER_COLUMNS} FROM dead_letters WHERE id = ?", (dead_letter_id,)
    ).fetchone()
    if row is None:
        raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
    return letter_of(row)


def count_letters(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])


def revive_letter(conn: sqlite3.Connection, dead_letter_id: str, trust: Trust = TRUST_ANY) -> Task:
    """Remove a dead letter and return its task, in one transaction; StoreError, and the
    dead letter kept, when its task cannot be loaded in this process."""
    with transaction(conn):
        task_id, idempotency_key, key, call, retry, dedup_key, window = _stored_letter(
            conn, dead_letter_id
        )
        task = TaskRecord(
            task_id, idempotency_key, key, call, retry, dedup_key=dedup_key, dedup_window=window
        ).load(trust)
        if isinstance(task.call, Unreadable):
            raise StoreError(
                f"dead letter {dead_letter_id} cannot be revived here: {task.call.error}"
            )
        conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
    return task


def replay_letter(
    conn: sqlite3.Connection, dead_letter_id: str, now: float, trust: Trust = TRUST_ANY
) -> Task:
    """Move a dead letter's task back to the queue, due `now`, with a fresh attempt budget
    (same id and idempotency key), in one transaction; return the task (only a handle:
    this process may not even be able to import it)."""
    with transaction(conn):
        stored = _stored_letter(conn, dead_letter_id)
        task_id, idempotency_key, key, call, retry, dedup_key, window = stored
        conn.execute(
            PUT_UNIQUE,
            (
                task_id,
                None if idempotency_key == task_id else idempotency_key,
                key,
                call,
                retry,
                now,
                None,
                None,
                dedup_key,
                window,
            ),
        )
        record = TaskRecord(
            task_id, idempotency_key, key, call, retry, dedup_key=dedup_key, dedup_window=window
        )
        if dedup_key is not None:
            take_key(conn, record)  # its key again, unless a live task holds it
        conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
    return record.load(trust)


def discard_letter(conn: sqlite3.Connection, dead_letter_id: str) -> None:
    """Delete one dead letter; UnknownDeadLetter if none has that id."""
    deleted = conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,)).rowcount
    if not deleted:
        raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")


def purge_letters(conn: sqlite3.Connection) -> int:
    """Delete every dead letter; returns how many there were."""
    return int(conn.execute("DELETE FROM dead_letters").rowcount)


def _stored_letter(conn: sqlite3.Connection, dead_letter_id: str) -> tuple[Any, ...]:
    """(task id, idempotency key, key, call, retry, dedup key, dedup window) as a dead
    letter keeps its task; UnknownDeadLetter if none has that id."""
    row = conn.execute(
        "SELECT task_id, idempotency_key, key, call, retry, dedup_key, dedup_window "
        "FROM dead_letters WHERE id = ?",
        (dead_letter_id,),
    ).fetchone()
    if row is None:
        raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
    return tuple(row)
