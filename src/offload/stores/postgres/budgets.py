"""The PostgreSQL store's rate budgets: one token bucket per key, shared by every process
on the database, as the SQLite store's (stores/sqlite/budgets.py).

One statement takes a process's tokens: an upsert of the key's row that refills the
bucket by the time elapsed since the row was last written (times the rate, capped at the
burst), takes the whole tokens there are (up to what the process wants) and says how
many; the row's lock makes processes take turns.

Time is the database server's (`statement_timestamp()`): the processes sharing it may run
on hosts whose clocks differ, and one clock for every row keeps the bucket exact. A
statement that waited for the row's lock may read a time before the row's: it refills
nothing and leaves the row's time alone; a server clock set back (the row's time ahead by
more than `STEP_BACK` seconds) restarts the row's time at now.

Slots: a declared concurrency's row per call in flight, as the SQLite store's, by the
server's clock; a transaction under an advisory lock on the key takes them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .schema import Sql

__all__ = [
    "STEP_BACK",
    "SharedBudgets",
    "budget_statement",
    "release_slots",
    "renew_slots",
    "take_slots",
    "take_tokens",
]

STEP_BACK = 1.0
"""Seconds the row's time may be ahead of the server's before its clock counts as set back."""


def budget_statement(schema: str) -> str:
    """The upsert that takes tokens from `schema`'s budgets table; parameters `key`,
    `rate`, `burst`, `want`; returns (taken, tokens left)."""
    now = "extract(epoch FROM statement_timestamp())"
    refilled = "LEAST(%(burst)s, b.tokens + GREATEST(0, EXCLUDED.stamp - b.stamp) * %(rate)s)"
    taken = f"LEAST(%(want)s, floor({refilled}))"
    return (
        f"INSERT INTO {schema}.budgets AS b (key, tokens, stamp, taken) "
        f"VALUES (%(key)s, %(burst)s - LEAST(%(want)s, floor(%(burst)s)), {now}, "
        "LEAST(%(want)s, floor(%(burst)s))) "
        f"ON CONFLICT (key) DO UPDATE SET tokens = {refilled} - {taken}, "
        f"taken = {taken}, "
        "stamp = CASE WHEN EXCLUDED.stamp >= b.stamp "
        f"OR b.stamp - EXCLUDED.stamp > {STEP_BACK} THEN EXCLUDED.stamp ELSE b.stamp END "
        "RETURNING taken, tokens"
    )


def take_tokens(
    cur: Any, statement: str, key: str, rate: float, burst: float, want: int
) -> tuple[int, float]:
    """(taken, 0.0), or (0, the seconds until a token is there)."""
    params = {"key": key, "rate": float(rate), "burst": float(burst), "want": int(want)}
    row = cur.execute(statement, params).fetchone()
    taken, tokens = int(row[0]), float(row[1])
    return taken, (0.0 if taken else max(0.0, 1.0 - tokens) / rate)


def take_slots(
    cur: Any, schema: str, key: str, slots: int, want: int, lapse: float
) -> tuple[list[str], float]:
    """Take up to `want` of `key`'s `slots` concurrency slots, held `lapse` seconds unless
    renewed: (their ids, 0.0), or ([], the seconds until the earliest live one lapses).

    One transaction, under a lock on the key (an advisory one: two processes counting at
    once would both see room for one): drop the key's lapsed slots, count the live ones,
    insert the new."""
    now = "extract(epoch FROM statement_timestamp())"
    with cur.connection.transaction():
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"offload-slots:{key}",))
        cur.execute(f"DELETE FROM {schema}.slots WHERE key = %s AND until <= {now}", (key,))
        live, first, wall = cur.execute(
            f"SELECT count(*), min(until), {now} FROM {schema}.slots WHERE key = %s", (key,)
        ).fetchone()
        room = min(int(want), int(slots) - int(live))
        if room <= 0:
            return [], max(0.0, float(first) - float(wall))
        ids = [secrets.token_hex(8) for _ in range(room)]
        cur.execute(
            f"INSERT INTO {schema}.slots (id, key, until) "
            f"SELECT unnest(%s::text[]), %s, {now} + %s",
            (ids, key, float(lapse)),
        )
    return ids, 0.0


def release_slots(cur: Any, schema: str, ids: Sequence[str]) -> None:
    """Give back the slots `ids` (one statement)."""
    cur.execute(f"DELETE FROM {schema}.slots WHERE id = ANY(%s)", (list(ids),))


def renew_slots(cur: Any, schema: str, ids: Sequence[str], lapse: float) -> None:
    """Hold the slots `ids` `lapse` seconds more, by the server's clock (one statement)."""
    cur.execute(
        f"UPDATE {schema}.slots SET until = extract(epoch FROM statement_timestamp()) + %s "
        "WHERE id = ANY(%s)",
        (float(lapse), list(ids)),
    )


class SharedBudgets:
    """The PostgreSQL store's rate budgets and concurrency slots (PostgresStore's
    methods), each on the store's connection under its lock."""

    lease_timeout: float
    _sql: Sql

    def _use(self, what: str) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def take_tokens(self, key: str, rate: float, burst: float, want: int = 1) -> tuple[int, float]:
        """Take up to `want` tokens of `key`'s rate budget, shared by every process on the
        database: (taken, 0.0), or (0, the seconds until one is there)."""
        with self._use("taking tokens of a rate budget") as cur:
            return take_tokens(cur, self._sql.take_tokens, key, rate, burst, want)

    def take_slots(self, key: str, slots: int, want: int = 1) -> tuple[list[str], float]:
        """Up to `want` of `key`'s `slots` concurrency slots, for every process on the
        database."""
        with self._use("taking concurrency slots") as cur:
            return take_slots(cur, self._sql.schema, key, slots, want, self.lease_timeout)

    def release_slots(self, ids: Sequence[str]) -> None:
        """Give back concurrency slots taken by `take_slots`."""
        with self._use("releasing concurrency slots") as cur:
            release_slots(cur, self._sql.schema, ids)

    def renew_slots(self, ids: Sequence[str]) -> None:
        """Hold concurrency slots for another lease timeout."""
        with self._use("renewing concurrency slots") as cur:
            renew_slots(cur, self._sql.schema, ids, self.lease_timeout)
