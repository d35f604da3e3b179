"""What a durable enqueue costs: offload over SQLite beside queue.Queue.put and Huey's SqliteHuey.

    python benchmarks/bench_durable_enqueue.py            # prints the table (about a minute)
    python benchmarks/run.py --only durable_enqueue       # the same, into RESULTS.md

Every contender stores the same task (a module-level function and a dict of three keyword
arguments, built per call as a handler would) and nothing consumes it while it is measured:

- `offload sqlite` is `Offloader(store="sqlite:///…")` in a web process that also performs
  the calls (the default, `consume=True`): the task is appended to the process's journal
  (one write(), no fsync: durable against a killed process, as a WAL commit with
  `synchronous=NORMAL` is) and leased to this process; the lines reach the database later,
  in batches (see docs/DESIGN.md). Its worker is kept busy on a blocking call, so only the
  enqueue path is measured.
- `offload sqlite, consume=False` is a web process that only enqueues.
- `offload sqlite, synchronous=full` INSERTs and fsyncs every task (durable against power
  loss).
- `sqlite3 INSERT + commit` is what an enqueue cost before the journal: one prepared
  INSERT of a ready-made row into offload's tasks table, committed (WAL, NORMAL).
- Huey's `SqliteHuey(fsync=False)` (journal in WAL mode, `synchronous=OFF`) and
  `SqliteHuey(fsync=True)` (`synchronous=FULL`), no consumer; Huey pickles the task.

p50 is the median of the means of batches of calls, p99 the 99th percentile of single
calls; the timing loop's own cost (the same loop around `pass`) is taken off both. The
contenders take turns, round by round, in a rotating order, so the machine's load falls on
all of them alike; every ratio is against a figure from the same run. The files live in a
temporary directory on the same filesystem.

The target (issue 3): the durable enqueue at least 3 times as fast as SqliteHuey(fsync=False).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _harness import (  # noqa: E402
    TIMES,
    Row,
    Samples,
    Scale,
    at_least,
    gc_collected,
    percentile,
    standalone,
    timers,
)

import offload  # noqa: E402

_release = threading.Event()
_started = threading.Event()


def send_welcome(user_id: int, email: str, plan: str) -> None:
    """The task every contender stores (never run while measured)."""


def block() -> None:
    """Keeps a consuming offloader's worker busy while the enqueue path is measured."""
    _started.set()
    _release.wait()


@contextmanager
def _queue(directory: Path) -> Iterator[dict[str, Any]]:
    q: queue.Queue[Any] = queue.Queue()
    yield {"put": q.put}


@contextmanager
def _offload(directory: Path, *, consume: bool = True, options: str = "") -> Iterator[Any]:
    name = f"offload-{consume}-{options.replace('=', '-') or 'normal'}.db"
    url = f"sqlite:///{directory / name}" + (f"?{options}" if options else "")
    off = offload.Offloader(
        store=url, consume=consume, max_queue=10**8, idle_timeout=600, lease_timeout=3600
    )
    try:
        if consume:
            _release.clear()
            _started.clear()
            off.enqueue_task(block)
            if not _started.wait(30):
                raise RuntimeError("the worker did not start the blocking call")
        yield {"enqueue": off.enqueue_task}
    finally:
        _release.set()
        logger = logging.getLogger("offload")
        level = logger.level
        logger.setLevel(logging.ERROR)  # the tasks handed back at shutdown are expected
        try:
            off.shutdown(timeout=0)
        finally:
            logger.setLevel(level)


@contextmanager
def _sqlite_insert(directory: Path) -> Iterator[dict[str, Any]]:
    """What an enqueue that writes the database costs at the least: one prepared INSERT of
    a ready-made row into offload's tasks table, committed (WAL, synchronous=NORMAL)."""
    import itertools
    import sqlite3

    from offload.stores.sqlite.schema import PUT, SCHEMA

    conn = sqlite3.connect(directory / "floor.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    for statement in SCHEMA:
        conn.execute(statement)
    cursor = conn.cursor()
    body = json.dumps({"offload": 1, "target": {"type": "function", "path": "m:f"}})
    ids = itertools.count()
    try:
        yield {
            "insert": cursor.execute,
            "row": lambda: (f"{next(ids):024x}", None, None, body, None, 1.0, "h:1:t", 2.0),
            "sql": PUT,
        }
    finally:
        conn.close()


@contextmanager
def _huey(directory: Path, *, fsync: bool) -> Iterator[dict[str, Any]]:
    from huey import SqliteHuey

    huey = SqliteHuey("bench", filename=str(directory / f"huey-{fsync}.db"), fsync=fsync)
    try:
        yield {"task": huey.task()(send_welcome)}
    finally:
        huey.storage.close()


_KW = 'user_id=42, email="user42@example.com", plan="pro"'
FLOOR = "queue.Queue.put"
OURS = "offload sqlite"
HUEY = "huey SqliteHuey(fsync=False)"

# name -> (statement timed, context, calls per batch). fsync'd contenders take ~ms a call.
CONTENDERS: dict[str, tuple[str, Callable[[Path], Any], int]] = {
    FLOOR: (
        'put((fn, {"user_id": 42, "email": "user42@example.com", "plan": "pro"}))',
        _queue,
        1_000,
    ),
    "sqlite3 INSERT + commit": ("insert(sql, row())", _sqlite_insert, 200),
    OURS: (f"enqueue(fn, {_KW})", _offload, 200),
    "offload sqlite, consume=False": (
        f"enqueue(fn, {_KW})",
        lambda d: _offload(d, consume=False),
        200,
    ),
    HUEY: (f"task({_KW})", lambda d: _huey(d, fsync=False), 200),
    "offload sqlite, synchronous=full": (
        f"enqueue(fn, {_KW})",
        lambda d: _offload(d, options="synchronous=full"),
        10,
    ),
    "huey SqliteHuey(fsync=True)": (f"task({_KW})", lambda d: _huey(d, fsync=True), 10),
}


def _huey_installed() -> bool:
    try:
        import huey  # noqa: F401
    except ImportError:
        return False
    return True


def _measure(
    names: list[str], rounds: int, chunk: int, run_index: int
) -> tuple[dict[str, float], dict[str, float]]:
    """One run of `names`, taking turns: (p50, p99) in µs per contender."""
    empty_batches, empty_singles = timers("pass", {})
    directory = Path(tempfile.mkdtemp(prefix="offload-bench-"))
    try:
        with ExitStack() as stack:
            timed = {}
            for name in names:
                stmt, context, _ = CONTENDERS[name]
                namespace = stack.enter_context(context(directory))
                timed[name] = timers(stmt, dict(namespace, fn=send_welcome))
            means: dict[str, list[float]] = {name: [] for name in names}
            single: dict[str, list[float]] = {name: [] for name in names}
            loop50: list[float] = []
            loop99: list[float] = []
            for r in range(rounds):
                shift = (r + run_index) % len(names)
                order = names[shift:] + names[:shift]
                with gc_collected():
                    loop50 += empty_batches(1, 1_000)
                    for name in order:
                        means[name] += timed[name][0](1, CONTENDERS[name][2])
                    loop99 += empty_singles(chunk)
                    for name in order:
                        slow = CONTENDERS[name][2] < 100
                        single[name] += timed[name][1](max(2, chunk // 20) if slow else chunk)
        overhead50, overhead99 = statistics.median(loop50), statistics.median(loop99)
        p50 = {n: max(0.0, statistics.median(means[n]) - overhead50) / 1000 for n in names}
        p99 = {n: max(0.0, percentile(single[n], 99) - overhead99) / 1000 for n in names}
        return p50, p99
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(scale: Scale) -> list[Row]:
    names = [n for n in CONTENDERS if _huey_installed() or not n.startswith("huey")]
    # Contenders that fsync every call run in a phase of their own (with the floor again):
    # their fsyncs make the filesystem commit its journal, which stalls everyone's writes.
    synced = [n for n in names if CONTENDERS[n][2] < 100]
    phases = [[n for n in names if n not in synced], [FLOOR, *synced]]
    rounds, chunk = scale.n(15, 2), scale.n(150, 10)  # per run: batches, singles per round
    p50, p99 = Samples(), Samples()
    for run_index in range(scale.repeats):
        for phase, members in enumerate(phases):
            if len(members) < 2:
                continue
            fifty, ninety_nine = _measure(members, rounds, chunk, run_index)
            for name in members:
                key = f"{name} #{phase}" if name == FLOOR else name
                p50.add(key, fifty[name])
                p99.add(key, ninety_nine[name])

    def floor_of(name: str) -> str:
        return f"{FLOOR} #1" if name in synced else f"{FLOOR} #0"

    rows: list[Row] = []
    for name in names:
        key = f"{FLOOR} #0" if name == FLOOR else name
        for label, samples in (("p50", p50), ("p99", p99)):
            rows.append(
                Row(
                    bench="durable_enqueue",
                    figure=f"{name} {label}",
                    value=samples.median(key),
                    unit="µs",
                    baseline=f"{FLOOR} {label}" if name != FLOOR else "",
                    ratio=samples.ratio(key, floor_of(name)),
                    runs=samples.count(key),
                )
            )
    if HUEY in names:
        for name in [n for n in (OURS, "offload sqlite, consume=False") if n in names]:
            for label, samples in (("p50", p50), ("p99", p99)):
                faster = samples.ratio(HUEY, name)  # how many times faster than Huey
                target = label == "p50"
                rows.append(
                    Row(
                        bench="durable_enqueue",
                        figure=f"{name} {label}: times faster than {HUEY}",
                        value=faster,
                        unit=TIMES,
                        baseline=f"{HUEY} {label}",
                        ratio=1 / faster if faster else None,
                        target=at_least(3) if target else "",
                        met=(faster >= 3) if target else None,
                        note="ratio = ours / Huey's",
                        runs=samples.count(name),
                    )
                )
    else:
        rows.append(
            Row("durable_enqueue", "huey SqliteHuey", None, "µs", note="huey not installed")
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    return standalone(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    os.environ.setdefault("OFFLOAD_SHUTDOWN_TIMEOUT", "0")
    # Run as the importable module, not __main__: a durable store keeps a task's function
    # as a module path, and a script's __main__ cannot be imported by another process.
    import bench_durable_enqueue

    raise SystemExit(bench_durable_enqueue.main())
