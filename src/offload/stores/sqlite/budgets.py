"""The SQLite store's rate budgets: one token bucket per key, shared by every process on
the file.

A declared `Limit(rate=...)` holds for every process that performs calls from the file
together (gunicorn workers, `offload worker`s), not for each: a process takes tokens for
its calls from the key's row in one short write transaction, which refills the bucket by
the wall time elapsed since the row was last written (times the rate, capped at the
burst) and takes the whole tokens there are, up to as many calls as it can start now;
with none there, it learns how long until there is one, and takes nothing.

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

__all__ = ["STEP_BACK", "take_tokens"]

STEP_BACK = 1.0
"""Seconds the row's time may be ahead of a reading before the clock counts as set back."""


def take_tokens(
    conn: sqlite3.Connection,
    key: str,
    rate: float,
    burst: float,
    want: int,
    now: Callable[[], float],
) -> tuple[int, float]:
    """Take up to `want` tokens of `key`'s bucket (`rate` tokens a second, `burst` at most;
    full when new): (taken, 0.0), or (0, the seconds until one is there). `now` is the
    wall clock, read once the write lock is held."""
    with transaction(conn):
        wall = now()
        row = conn.execute("SELECT tokens, stamp FROM budgets WHERE key = ?", (key,)).fetchone()
        if row is None:
            tokens, stamp = burst, wall
        else:
            tokens, stamp = float(row[0]), float(row[1])
            tokens = min(burst, tokens + max(0.0, wall - stamp) * rate)
            stamp = wall if wall >= stamp or stamp - wall > STEP_BACK else stamp
        taken = min(want, int(tokens))
        tokens -= taken
        conn.execute(
            "INSERT OR REPLACE INTO budgets (key, tokens, stamp) VALUES (?, ?, ?)",
            (key, tokens, stamp),
        )
    return taken, (0.0 if taken else (1.0 - tokens) / rate)
