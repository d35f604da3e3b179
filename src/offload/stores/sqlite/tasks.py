"""The SQLite store's tasks table: claiming, leases renewed and taken back, tasks settled
and counted, on a connection the store hands over (its lock held, the journal lines it
needs copied first).

A leased row has an `owner` ('host:pid:token', see stores._shared) and a `lease_until`;
a waiting row has neither, and is due at `due`. Claiming a row sets both, in a write
transaction that reads the rows it leases, so two processes never lease one row.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from ...codec.task import TaskRecord, attempt_state
from ...codec.trust import TRUST_ANY, Trust
from ...records import Task
from .._shared import json_list, owner_dead, tally_tasks, this_host
from .dedup import free_keys
from .schema import TASK_COLUMNS, transaction

__all__ = [
    "claim_due",
    "count_tasks",
    "delete_task",
    "earliest_due",
    "release_task",
    "renew_leases",
    "sweep",
    "take_back",
]

log = logging.getLogger("offload")


def claim_due(
    conn: sqlite3.Connection,
    *,
    owner: str,
    now: float,
    until: float,
    limit: int,
    exclude_keys: Mapping[str, float],
    trust: Trust = TRUST_ANY,
) -> list[Task]:
    """Lease up to `limit` tasks due at `now` to `owner` until `until`, oldest due first,
    none of the keys in `exclude_keys`."""
    # A read first: polling an empty store must not take the write lock.
    if (
        conn.execute(
            "SELECT 1 FROM tasks WHERE owner IS NULL AND due <= ? LIMIT 1", (now,)
        ).fetchone()
        is None
    ):
        return []
    select = f"SELECT {TASK_COLUMNS} FROM tasks WHERE owner IS NULL AND due <= ?"
    params: list[Any] = [now]
    if exclude_keys:
        select += " AND (key IS NULL OR key NOT IN (SELECT value FROM json_each(?)))"
        params.append(json_list(exclude_keys))
    select += " ORDER BY due, seq LIMIT ?"
    params.append(limit)
    with transaction(conn):
        rows = conn.execute(select, params).fetchall()
        if rows:
            conn.execute(
                "UPDATE tasks SET owner = ?, lease_until = ? "
                "WHERE seq IN (SELECT value FROM json_each(?))",
                (owner, until, json_list(r[0] for r in rows)),
            )
    return [_task_from_row(row, trust) for row in rows]


def take_back(conn: sqlite3.Connection, *, owner: str, now: float) -> None:
    """Take back the leases that expired by `now`, and at once every lease of a process of
    this host that is gone (never `owner`'s, the caller's own)."""
    host = this_host()
    expired: list[str] = []
    dead: list[str] = []
    for other, until in conn.execute(
        "SELECT owner, MIN(lease_until) FROM tasks WHERE owner IS NOT NULL GROUP BY owner"
    ).fetchall():
        if other != owner and owner_dead(other, host):
            dead.append(other)
        elif until is None or until <= now:
            expired.append(other)
    if not (dead or expired):
        return
    taken = 0
    with transaction(conn):
        for other in dead:
            taken += conn.execute(
                "UPDATE tasks SET owner = NULL, lease_until = NULL WHERE owner = ?", (other,)
            ).rowcount
        for other in expired:
            taken += conn.execute(
                "UPDATE tasks SET owner = NULL, lease_until = NULL "
                "WHERE owner = ? AND (lease_until IS NULL OR lease_until <= ?)",
                (other, now),
            ).rowcount
    if taken:
        log.info(
            "offload: took back %d task(s) from %s",
            taken,
            ", ".join(
                [f"{o} (process gone)" for o in dead] + [f"{o} (lease expired)" for o in expired]
            ),
        )


def sweep(conn: sqlite3.Connection, *, owner: str, now: float) -> None:
    """The sweep's work in the tables: take back leases (see take_back), and delete the
    dedup keys whose window passed by `now`, which nothing else ever deletes."""
    take_back(conn, owner=owner, now=now)
    free_keys(conn, now)


def renew_leases(
    conn: sqlite3.Connection, tasks: Sequence[Task], *, owner: str, until: float
) -> int:
    """Extend `owner`'s leases of `tasks` to `until` (one UPDATE); returns how many were
    lost: still there, but no longer `owner`'s. (One settled meanwhile is simply gone.)"""
    ids = json_list(t.id for t in tasks)
    renewed = conn.execute(
        "UPDATE tasks SET lease_until = ? "
        "WHERE owner = ? AND id IN (SELECT value FROM json_each(?))",
        (until, owner, ids),
    ).rowcount
    if renewed >= len(tasks):
        return 0
    return int(
        conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE id IN (SELECT value FROM json_each(?)) "
            "AND (owner IS NULL OR owner != ?)",
            (ids, owner),
        ).fetchone()[0]
    )


def release_task(conn: sqlite3.Connection, task: Task, *, owner: str, due: float) -> None:
    """Hand `owner`'s lease of `task` back, due at `due`, with its attempt state."""
    conn.execute(
        "UPDATE tasks SET owner = NULL, lease_until = NULL, due = ?, attempts = ?, "
        "failures = ?, first_attempt_at = ?, last_attempt_at = ? "
        "WHERE id = ? AND owner = ?",
        (due, *attempt_state(task), task.id, owner),
    )


def delete_task(conn: sqlite3.Connection, task_id: str) -> None:
    conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))


def earliest_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest task not leased is due; None if there is none."""
    due = conn.execute("SELECT MIN(due) FROM tasks WHERE owner IS NULL").fetchone()[0]
    return None if due is None else float(due)


# One statement, so one snapshot of the file: the waiting rows through their index, the
# leased ones by owner and by whether the lease still runs.
_COUNT = (
    "SELECT NULL, 0, SUM(due <= :now), COUNT(*) FROM tasks WHERE owner IS NULL "
    "UNION ALL SELECT owner, lease_until > :now, SUM(due <= :now), COUNT(*) FROM tasks "
    "WHERE owner IS NOT NULL GROUP BY owner, lease_until > :now"
)


def count_tasks(conn: sqlite3.Connection, *, owner: str, now: float) -> tuple[int, int, int]:
    """(ready, delayed, leased) at `now`. A task under a lease that expired, or of a
    process of this host that is gone, counts as ready or delayed, and is taken back
    here (as the next claim would): it is no one's to finish, and flush() must start a
    worker for it rather than wait for nobody."""
    ready, delayed, leased, lapsed = tally_tasks(
        conn.execute(_COUNT, {"now": now}).fetchall(), owner
    )
    if lapsed:
        with contextlib.suppress(sqlite3.Error):  # busy: the next claim's sweep does it
            take_back(conn, owner=owner, now=now)
    return ready, delayed, leased


def _task_from_row(row: tuple[Any, ...], trust: Trust) -> Task:
    (
        _,
        task_id,
        idempotency_key,
        key,
        call,
        retry,
        attempts,
        failures,
        first,
        last,
        dkey,
        window,
    ) = row
    return TaskRecord(
        task_id,
        task_id if idempotency_key is None else idempotency_key,
        key,
        call,
        retry,
        attempts,
        failures,
        first,
        last,
        dkey,
        window,
    ).load(trust)
