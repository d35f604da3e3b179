"""What a rate budget shared by every process on a SQLite file costs a limited call.

Over SQLite a key with a declared rate takes each call's token from the budgets table:
one write transaction per call start, run by a worker with the offloader's lock let go.
Two figures, same run:

- `SQLiteStore.take_tokens` alone: microseconds per token (one process, one file, WAL,
  synchronous=normal), against a `SELECT 1` on the same connection.
- `PostgresStore.take_tokens` alone, on the run's own PostgreSQL server (as
  bench_postgres.py starts it; a row saying why when none can start here): one round
  trip, against a `SELECT 1` on the same connection.
- A declared concurrency's slot, over each store: `take_slots` then `release_slots`
  (what a call of a key with `Limit(concurrency=N)` adds: one transaction before it
  starts, one as it settles), microseconds per pair.
- Delivery over a SQLite file with 4 workers: a key with `Limit(rate=1_000_000)` (every
  start takes a token from the file, none ever waits) against the same calls on a key
  without a limit (which never touch the budget), from the first `enqueue_task` to
  `flush()` returning; of no-op task functions (the worst case: the token is most of the
  work), and of HTTP calls to the local API of benchmarks/_server.py (answering at once,
  in its own process): what it costs a real call.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import LocalAPI, Row, Samples, Scale, at_least, standalone

import offload
from offload.stores.sqlite import SQLiteStore


def nothing(i: int) -> None:
    """The call: free, so that what is measured is offload's own work."""


def slot_cost(store: Any, n: int) -> float:
    """µs per take_slots + release_slots of one slot (never short of one)."""
    store.release_slots(store.take_slots("warm", 1)[0])
    t0 = time.perf_counter()
    for _ in range(n):
        store.release_slots(store.take_slots("api", 1)[0])
    return (time.perf_counter() - t0) / n * 1e6


def token_cost(n: int) -> tuple[float, float, float]:
    """(µs per take_tokens, µs per SELECT 1, µs per slot taken and given back) on one
    store object's connection."""
    with tempfile.TemporaryDirectory(prefix="offload-budgets-") as directory:
        store = SQLiteStore(Path(directory) / "b.db")
        try:
            store.take_tokens("warm", 1e9, 1e9)
            t0 = time.perf_counter()
            for _ in range(n):
                store.take_tokens("api", 1e9, 1e9)
            take = (time.perf_counter() - t0) / n * 1e6
            with store._use("benchmark") as conn:
                t0 = time.perf_counter()
                for _ in range(n):
                    conn.execute("SELECT 1").fetchone()
                select = (time.perf_counter() - t0) / n * 1e6
            return take, select, slot_cost(store, n)
        finally:
            store.close()


def postgres_cost(n: int, repeats: int) -> list[tuple[float, float, float]] | str:
    """Per run, (µs per take_tokens, µs per SELECT 1, µs per slot taken and given back) on
    a PostgresStore's connection, on one server for every run; or why there is none."""
    from bench_postgres import postgres_server

    from offload.stores.postgres import PostgresStore

    try:
        with postgres_server() as server:
            store = PostgresStore(server.url(query="schema=budgets"))
            try:
                store.take_tokens("warm", 1e9, 1e9)
                runs = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for _ in range(n):
                        store.take_tokens("api", 1e9, 1e9)
                    take = (time.perf_counter() - t0) / n * 1e6
                    with store._use("benchmark") as cur:
                        t0 = time.perf_counter()
                        for _ in range(n):
                            cur.execute("SELECT 1").fetchone()
                        select = (time.perf_counter() - t0) / n * 1e6
                    runs.append((take, select, slot_cost(store, n)))
                return runs
            finally:
                store.close()
    except Exception as exc:  # no server here: the row says so
        return f"no PostgreSQL server: {type(exc).__name__}: {exc}"[:120]


def drain(n: int, limited: bool, url: str | None = None) -> float:
    """Calls per second delivered over a new SQLite file, 4 workers, one key: no-op task
    functions, or POSTs to `url`."""
    key = "https://api.example.com" if limited else "https://other.example.com"
    limits = {"https://api.example.com": offload.Limit(rate=1_000_000)}
    if url is not None:  # the API's own key, limited or not
        limits = {url: offload.Limit(rate=1_000_000)} if limited else {}
    with tempfile.TemporaryDirectory(prefix="offload-budgets-") as directory:
        off = offload.Offloader(
            store=f"sqlite:///{Path(directory) / 'd.db'}",
            workers=4,
            limits=limits,
            idle_timeout=30,
            max_queue=n + 1,
        )
        try:
            tasks = [
                offload.Task(nothing, (i,), key=key)
                if url is None
                else offload.Task(offload.http("POST", url + "/events", json={"i": i}))
                for i in range(n)
            ]
            off.stats()  # the file made and opened before the clock starts
            t0 = time.perf_counter()
            for task in tasks:
                off.enqueue_task(task)
            if not off.flush(timeout=600):
                raise RuntimeError("offload did not drain in time")
            rate = n / (time.perf_counter() - t0)
            if off.stats().succeeded != n:
                raise RuntimeError(f"offload delivered {off.stats().succeeded} of {n}")
            return rate
        finally:
            off.shutdown(timeout=10)


def run(scale: Scale) -> list[Row]:
    n, calls = scale.n(4_000, 20), scale.n(1_000, 20)
    samples = Samples()
    with LocalAPI() as api:
        for run_index in range(scale.repeats):
            take, select, slot = token_cost(scale.n(5_000, 20))
            samples.add("take", take)
            samples.add("select", select)
            samples.add("slot", slot)
            order = [
                ("unlimited", n, False, None),
                ("limited", n, True, None),
                ("http", calls, False, api.url),
                ("http limited", calls, True, api.url),
            ]
            shift = run_index % len(order)
            for name, count, limited, url in order[shift:] + order[:shift]:
                samples.add(name, drain(count, limited, url))
    pg = postgres_cost(scale.n(2_000, 20), scale.repeats)
    for take, select, slot in [] if isinstance(pg, str) else pg:
        samples.add("pg take", take)
        samples.add("pg select", select)
        samples.add("pg slot", slot)
    ratio = samples.ratio("limited", "unlimited")
    http = samples.ratio("http limited", "http")
    if samples.count("pg take"):
        pg_row = Row(
            "budgets",
            "PostgresStore.take_tokens, one token",
            samples.median("pg take"),
            "µs",
            baseline="SELECT 1 on the same connection",
            ratio=samples.ratio("pg take", "pg select"),
            note=samples.spread("pg take", "pg select"),
            runs=samples.count("pg take"),
        )
        pg_slot = Row(
            "budgets",
            "PostgresStore.take_slots + release_slots, one slot",
            samples.median("pg slot"),
            "µs",
            baseline="SELECT 1 on the same connection",
            ratio=samples.ratio("pg slot", "pg select"),
            note=samples.spread("pg slot", "pg select"),
            runs=samples.count("pg slot"),
        )
    else:
        pg_row = Row("budgets", "PostgresStore.take_tokens", None, "µs", note=str(pg))
        pg_slot = Row("budgets", "PostgresStore.take_slots", None, "µs", note=str(pg))
    return [
        Row(
            "budgets",
            "SQLiteStore.take_tokens, one token",
            samples.median("take"),
            "µs",
            baseline="SELECT 1 on the same connection",
            ratio=samples.ratio("take", "select"),
            note=samples.spread("take", "select"),
            runs=samples.count("take"),
        ),
        Row(
            "budgets",
            "SQLiteStore.take_slots + release_slots, one slot",
            samples.median("slot"),
            "µs",
            baseline="SELECT 1 on the same connection",
            ratio=samples.ratio("slot", "select"),
            note=samples.spread("slot", "select"),
            runs=samples.count("slot"),
        ),
        pg_row,
        pg_slot,
        Row(
            "budgets",
            f"SQLite, 4 workers, {n:,} no-op calls, no limit",
            samples.median("unlimited"),
            "calls/s",
            runs=samples.count("unlimited"),
        ),
        Row(
            "budgets",
            f"SQLite, 4 workers, {n:,} no-op calls, Limit(rate=1e6)",
            samples.median("limited"),
            "calls/s",
            baseline="the same calls with no limit",
            ratio=ratio,
            target=at_least(0.5),
            met=ratio >= 0.5,
            note=samples.spread("limited", "unlimited"),
            runs=samples.count("limited"),
        ),
        Row(
            "budgets",
            f"SQLite, 4 workers, {calls:,} HTTP calls to the local API, no limit",
            samples.median("http"),
            "calls/s",
            runs=samples.count("http"),
        ),
        Row(
            "budgets",
            f"SQLite, 4 workers, {calls:,} HTTP calls to the local API, Limit(rate=1e6)",
            samples.median("http limited"),
            "calls/s",
            baseline="the same calls with no limit",
            ratio=http,
            target=at_least(0.9),
            met=http >= 0.9,
            note=samples.spread("http limited", "http"),
            runs=samples.count("http limited"),
        ),
    ]


if __name__ == "__main__":
    import bench_budgets  # the task function by a name the store can write, not __main__'s

    sys.exit(standalone(bench_budgets.run, "What a SQLite file's shared rate budget costs a call."))
