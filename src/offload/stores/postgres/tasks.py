"""The PostgreSQL store's tasks table: claims, leases renewed and taken back, tasks settled
and counted, on a connection the store hands over (its lock held, autocommit: each
statement is its own transaction).

A claim is one statement: it picks due, unleased rows in due order `FOR UPDATE SKIP
LOCKED` (rows another claim is taking are passed over, never waited for) and leases them,
so two processes never lease one row and never block each other. A leased row has an
`owner` ('host:pid:token', see stores._shared) and a `lease_until`. Every statement that
makes a row due for others (a put without a lease, a release, a take-back, a replay)
NOTIFYs the store's channel in the same transaction, so listening workers hear of it
when it commits, and not before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ...codec.task import TaskRecord, attempt_state
from ...codec.trust import TRUST_ANY, Trust
from ...records import Task
from .._shared import owner_dead, tally_tasks, this_host
from .schema import Sql

__all__ = [
    "NO_PRIVILEGE",
    "claim_due",
    "count_tasks",
    "earliest_due",
    "release_task",
    "renew_leases",
    "take_back",
    "task_row",
]

log = logging.getLogger("offload")

NO_PRIVILEGE = "42501"  # insufficient_privilege: a role that may not UPDATE the tasks


def task_row(
    record: TaskRecord, due: float, owner: str | None, until: float | None
) -> tuple[Any, ...]:
    """The values of an INSERT of `record` (Sql.put_leased's order)."""
    stored_key = None if record.idempotency_key == record.id else record.idempotency_key
    return (record.id, stored_key, record.key, record.call, record.retry, due, owner, until)


def claim_due(
    cur: Any,
    sql: Sql,
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
    if exclude_keys:
        cur.execute(sql.claim_some, (now, list(exclude_keys), limit, owner, until))
    else:
        cur.execute(sql.claim_all, (now, limit, owner, until))
    rows = cur.fetchall()
    rows.sort(key=lambda row: (row[1], row[0]))  # RETURNING keeps no order: due, then seq
    return [_task(row, trust) for row in rows]


def take_back(cur: Any, sql: Sql, *, owner: str, now: float) -> int:
    """Take back the leases that expired by `now`, and at once every lease of a process of
    this host that is gone (never `owner`'s own live ones); returns how many."""
    host = this_host()
    dead: list[str] = []
    expired = False
    for other, until in cur.execute(sql.owners).fetchall():
        if other != owner and owner_dead(other, host):
            dead.append(other)
        elif until is None or until <= now:
            expired = True
    if not (dead or expired):
        return 0
    rows = cur.execute(sql.take_back, (dead, now, sql.channel)).fetchall()
    taken = sum(count for _, count, _ in rows)
    if taken:
        gone = set(dead)
        log.info(
            "offload: took back %d task(s) from %s",
            taken,
            ", ".join(
                f"{other} ({'process gone' if other in gone else 'lease expired'})"
                for other, _, _ in rows
            ),
        )
    return int(taken)


def renew_leases(cur: Any, sql: Sql, tasks: Sequence[Task], *, owner: str, until: float) -> int:
    """Extend `owner`'s leases of `tasks` to `until` (one UPDATE); returns how many were
    lost: still there, but no longer `owner`'s. (One settled meanwhile is simply gone.)"""
    ids = [task.id for task in tasks]
    renewed = cur.execute(sql.renew, (until, owner, ids)).rowcount
    if renewed >= len(ids):
        return 0
    return int(cur.execute(sql.lost, (ids, owner)).fetchone()[0])


def release_task(cur: Any, sql: Sql, task: Task, *, owner: str, due: float) -> None:
    """Hand `owner`'s lease of `task` back, due at `due`, with its attempt state."""
    cur.execute(sql.release, (due, *attempt_state(task), task.id, owner, sql.channel))


def earliest_due(cur: Any, sql: Sql) -> float | None:
    """When the earliest task not leased is due; None if there is none."""
    due = cur.execute(sql.next_due).fetchone()[0]
    return None if due is None else float(due)


def count_tasks(cur: Any, sql: Sql, *, owner: str, now: float) -> tuple[int, int, int, int]:
    """(ready, delayed, leased, dead letters) at `now`. A task under a lease that expired,
    or of a process of this host that is gone, counts as ready or delayed, and is taken
    back here (as the next claim would): it is no one's to finish, and flush() must start
    a worker for it rather than wait for nobody. A role that may only read (a console's)
    counts all the same: the take-back is left to the next claim."""
    rows = cur.execute(sql.counts, {"now": now}).fetchall()
    ready, delayed, leased, lapsed = tally_tasks((row[:4] for row in rows), owner)
    if lapsed:
        try:
            take_back(cur, sql, owner=owner, now=now)
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != NO_PRIVILEGE:
                raise
            log.debug("offload: counted without taking leases back: %s", exc)
    return ready, delayed, leased, sum(int(row[4]) for row in rows)


def _task(row: tuple[Any, ...], trust: Trust) -> Task:
    _, _, task_id, idempotency_key, key, call, retry, attempts, failures, first, last, *dedup = row
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
        *dedup,
    ).load(trust)
