"""The SQLite store's rate budgets: one token bucket per key, shared by every process on
the file.

A declared `Limit(rate=...)` holds for every process that performs calls from the file
together (gunicorn workers, `offload worker`s), not for each: a process takes a token for
a call from the key's row in one short write transaction, which refills the bucket by the
wall time elapsed since the row was last written (times the rate, capped at the burst)
and takes a token if there is one; otherwise it learns how long until there will be, and
takes nothing.

Time. The processes of one file share a host (SQLite's WAL mode needs shared memory), so
they share its wall clock; the time is read inside the transaction, once the write lock
is held, so that the row's times follow each other. A clock set back (the row's time
ahead of now by more than `STEP_BACK` seconds) restarts the row's time at now and
refills nothing for that step; a clock set forward refills at most the burst.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from .schema import transaction

__all__ = ["STEP_BACK", "take_token"]

STEP_BACK = 1.0
"""Seconds the row's time may be ahead of a reading before the clock counts as set back."""


def take_token(
    conn: sqlite3.Connection, key: str, rate: float, burst: float, now: Callable[[], float]
) -> float:
    """Take one token of `key`'s bucket (`rate` tokens a second, `burst` at most; full when
    new): 0.0 when taken, else the seconds until one is there (nothing taken). `now` is
    the wall clock, read once the write lock is held."""
    with transaction(conn):
        wall = now()
        row = conn.execute("SELECT tokens, stamp FROM budgets WHERE key = ?", (key,)).fetchone()
        if row is None:
            tokens, stamp = burst, wall
        else:
            tokens, stamp = float(row[0]), float(row[1])
            tokens = min(burst, tokens + max(0.0, wall - stamp) * rate)
            stamp = wall if wall >= stamp or stamp - wall > STEP_BACK else stamp
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate
        if not wait:
            tokens -= 1.0
        conn.execute(
            "INSERT OR REPLACE INTO budgets (key, tokens, stamp) VALUES (?, ?, ?)",
            (key, tokens, stamp),
        )
    return wait
