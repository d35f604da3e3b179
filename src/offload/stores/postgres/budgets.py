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
"""

from __future__ import annotations

from typing import Any

__all__ = ["STEP_BACK", "budget_statement", "take_tokens"]

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
