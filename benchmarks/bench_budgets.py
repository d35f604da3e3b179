"""What a rate budget shared by every process on a SQLite file costs a limited call.

Over SQLite a key with a declared rate takes each call's token from the budgets table:
one write transaction per call start, run by a worker with the offloader's lock let go.
Two figures, same run:

- `SQLiteStore.take_token` alone: microseconds per token (one process, one file, WAL,
  synchronous=normal), against a `SELECT 1` on the same connection.
- Delivery of no-op task functions over a SQLite file with 4 workers: a key with
  `Limit(rate=1_000_000)` (every start takes a token from the file, none ever waits)
  against the same calls on a key without a limit (which never touch the budget), from
  the first `enqueue_task` to `flush()` returning. The ratio is what the shared budget
  costs delivery when the calls themselves cost nothing; a real API call's milliseconds
  make it smaller still.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from _harness import Row, Samples, Scale, at_least, standalone

import offload
from offload.stores.sqlite import SQLiteStore


def nothing(i: int) -> None:
    """The call: free, so that what is measured is offload's own work."""


def token_cost(n: int) -> tuple[float, float]:
    """(µs per take_token, µs per SELECT 1) on one store object's connection."""
    with tempfile.TemporaryDirectory(prefix="offload-budgets-") as directory:
        store = SQLiteStore(Path(directory) / "b.db")
        try:
            store.take_token("warm", 1e9, 1e9)
            t0 = time.perf_counter()
            for _ in range(n):
                store.take_token("api", 1e9, 1e9)
            take = (time.perf_counter() - t0) / n * 1e6
            with store._use("benchmark") as conn:
                t0 = time.perf_counter()
                for _ in range(n):
                    conn.execute("SELECT 1").fetchone()
                select = (time.perf_counter() - t0) / n * 1e6
            return take, select
        finally:
            store.close()


def drain(n: int, limited: bool) -> float:
    """Calls per second delivered over a new SQLite file, 4 workers, one key."""
    key = "https://api.example.com" if limited else "https://other.example.com"
    limits = {"https://api.example.com": offload.Limit(rate=1_000_000)}
    with tempfile.TemporaryDirectory(prefix="offload-budgets-") as directory:
        off = offload.Offloader(
            store=f"sqlite:///{Path(directory) / 'd.db'}",
            workers=4,
            limits=limits,
            idle_timeout=30,
            max_queue=n + 1,
        )
        try:
            tasks = [offload.Task(nothing, (i,), key=key) for i in range(n)]
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
    n = scale.n(4_000, 20)
    samples = Samples()
    for run_index in range(scale.repeats):
        take, select = token_cost(scale.n(5_000, 20))
        samples.add("take", take)
        samples.add("select", select)
        order = [("unlimited", False), ("limited", True)]
        if run_index % 2:
            order.reverse()
        for name, limited in order:
            samples.add(name, drain(n, limited))
    ratio = samples.ratio("limited", "unlimited")
    return [
        Row(
            "budgets",
            "SQLiteStore.take_token, one token",
            samples.median("take"),
            "µs",
            baseline="SELECT 1 on the same connection",
            ratio=samples.ratio("take", "select"),
            note=samples.spread("take", "select"),
            runs=samples.count("take"),
        ),
        Row(
            "budgets",
            f"SQLite, 4 workers, {n:,} no-op calls, no limit",
            samples.median("unlimited"),
            "calls/s",
            runs=samples.count("unlimited"),
        ),
        Row(
            "budgets",
            f"SQLite, 4 workers, {n:,} no-op calls, Limit(rate=1e6): a token each",
            samples.median("limited"),
            "calls/s",
            baseline="the same calls with no limit",
            ratio=ratio,
            target=at_least(0.8),
            met=ratio >= 0.8,
            note=samples.spread("limited", "unlimited"),
            runs=samples.count("limited"),
        ),
    ]


if __name__ == "__main__":
    import bench_budgets  # the task function by a name the store can write, not __main__'s

    sys.exit(standalone(bench_budgets.run, "What a SQLite file's shared rate budget costs a call."))
