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

Slots. A declared `Limit(concurrency=N)` holds for every process on the file too: a call
of the key starts only once its process holds one of the key's N rows in `slots`, taken
in one write transaction (lapsed rows of the key dropped, live ones counted, new ones
inserted) and deleted when the call settles. A row lapses `lapse` seconds (the store's
lease timeout) after it was taken or last renewed (the lease keeper renews it with the
process's task leases), so that a process that died holding one holds it no longer.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from ...clock import Clock
from .schema import transaction

__all__ = [
    "STEP_BACK",
    "SharedBudgets",
    "release_slots",
    "renew_slots",
    "take_slots",
    "take_tokens",
]

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


def take_slots(
    conn: sqlite3.Connection,
    key: str,
    slots: int,
    want: int,
    lapse: float,
    now: Callable[[], float],
) -> tuple[list[str], float]:
    """Take up to `want` of `key`'s `slots` slots for calls in flight, each held until
    `lapse` seconds from now unless renewed: (their ids, 0.0), or ([], the seconds until
    the earliest live one lapses). One write transaction drops the key's lapsed slots,
    counts the live ones and inserts the new."""
    with transaction(conn):
        wall = now()
        conn.execute("DELETE FROM slots WHERE key = ? AND until <= ?", (key, wall))
        live, first = conn.execute(
            "SELECT count(*), min(until) FROM slots WHERE key = ?", (key,)
        ).fetchone()
        room = min(want, slots - int(live))
        if room <= 0:
            return [], max(0.0, float(first) - wall)
        ids = [secrets.token_hex(8) for _ in range(room)]
        conn.executemany(
            "INSERT INTO slots (id, key, until) VALUES (?, ?, ?)",
            [(slot, key, wall + lapse) for slot in ids],
        )
    return ids, 0.0


def release_slots(conn: sqlite3.Connection, ids: Sequence[str]) -> None:
    """Give back the slots `ids` (those lapsed and taken by others meanwhile are gone)."""
    with transaction(conn):
        conn.executemany("DELETE FROM slots WHERE id = ?", [(slot,) for slot in ids])


def renew_slots(
    conn: sqlite3.Connection, ids: Sequence[str], lapse: float, now: Callable[[], float]
) -> None:
    """Hold the slots `ids` for `lapse` seconds more."""
    with transaction(conn):
        until = now() + lapse
        conn.executemany("UPDATE slots SET until = ? WHERE id = ?", [(until, s) for s in ids])


class SharedBudgets:
    """The SQLite store's rate budgets and concurrency slots (SQLiteStore's methods), each
    on the store's connection under its lock."""

    lease_timeout: float
    _clock: Clock

    def _use(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def take_tokens(self, key: str, rate: float, burst: float, want: int = 1) -> tuple[int, float]:
        """Up to `want` tokens of `key`'s rate budget, for every process on the file."""
        with self._use("taking tokens of a rate budget") as conn:
            return take_tokens(conn, key, rate, burst, want, self._clock.time)

    def take_slots(self, key: str, slots: int, want: int = 1) -> tuple[list[str], float]:
        """Up to `want` of `key`'s `slots` concurrency slots, for every process on the file."""
        with self._use("taking concurrency slots") as conn:
            return take_slots(conn, key, slots, want, self.lease_timeout, self._clock.time)

    def release_slots(self, ids: Sequence[str]) -> None:
        """Give back concurrency slots taken by `take_slots`."""
        with self._use("releasing concurrency slots") as conn:
            release_slots(conn, ids)

    def renew_slots(self, ids: Sequence[str]) -> None:
        """Hold concurrency slots for another lease timeout."""
        with self._use("renewing concurrency slots") as conn:
            renew_slots(conn, ids, self.lease_timeout, self._clock.time)
