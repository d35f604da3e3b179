"""What a web handler pays for one enqueue, with the worker busy so the queue only grows.

Every contender gets the same payload (a module-level function and a dict of three
keyword arguments, built per call as a handler would) and the same treatment: a fresh
queue per run, the heap collected before it starts, GC left on (as in a real handler).
p50 is the median of the means of batches of 1,000 calls (a perf_counter_ns pair costs
about as much as a queue.Queue.put, so single calls cannot give a fair median); p99 is
the 99th percentile of single calls. The same loops with an empty statement are timed
too and taken off both. The worker (or consumer) is kept busy on a blocking call, so only
the enqueue path is measured.
"""

from __future__ import annotations

import logging
import queue
import statistics
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

from _harness import (
    Row,
    Samples,
    Scale,
    at_most,
    busy_worker,
    gc_collected,
    percentile,
    redis_available,
    timers,
)

import offload

BATCH = 1_000
HOOK = "http://127.0.0.1:9/hooks/signup"  # never called: the worker is busy, then stopped


def send_welcome(user_id: int, email: str, plan: str) -> None:
    """The task every contender enqueues (never run while measured)."""


@contextmanager
def _queue() -> Iterator[dict[str, Any]]:
    q: queue.Queue[Any] = queue.Queue()
    yield {"put": q.put}


@contextmanager
def _offload() -> Iterator[dict[str, Any]]:
    off = offload.Offloader(max_queue=10**8, idle_timeout=60)
    try:
        with busy_worker(off.enqueue_task):
            yield {"enqueue": off.enqueue_task}
        off.flush(timeout=300)
    finally:
        off.shutdown(timeout=5)


@contextmanager
def _offload_http() -> Iterator[dict[str, Any]]:
    """As _offload, for HTTP calls; they are never sent (dead-lettered at shutdown)."""
    logger = logging.getLogger("offload")
    level = logger.level
    logger.setLevel(logging.ERROR)  # shutdown's one WARNING about what it dead-letters
    off = offload.Offloader(max_queue=10**8, idle_timeout=60, max_dead_letters=0)
    try:
        with busy_worker(off.enqueue_task):
            yield {
                "enqueue": off.enqueue_task,
                "http": offload.http,
                "call": offload.http("POST", HOOK, json={"user_id": 42, "plan": "pro"}),
            }
            off.shutdown(timeout=0)
    finally:
        off.shutdown(timeout=5)
        logger.setLevel(level)


@contextmanager
def _executor() -> Iterator[dict[str, Any]]:
    with ThreadPoolExecutor(1) as pool, busy_worker(pool.submit):
        yield {"submit": pool.submit}


@contextmanager
def _huey() -> Iterator[dict[str, Any]]:
    from huey import MemoryHuey

    huey = MemoryHuey("bench")  # no consumer: the queue only grows, as for the others
    yield {"task": huey.task()(send_welcome)}


# name -> (statement timed, context giving the statement's namespace)
# The payload is written out in each statement, as a handler would: every contender builds
# the same dict of keyword arguments per call (a reused dict would spare the floor its
# allocation, and its share of garbage collections, but not offload's `**kwargs`).
_KW = 'user_id=42, email="user42@example.com", plan="pro"'
CONTENDERS: dict[str, tuple[str, Callable[[], Any]]] = {
    "queue.Queue.put": (
        'put((fn, {"user_id": 42, "email": "user42@example.com", "plan": "pro"}))',
        _queue,
    ),
    "offload enqueue_task": (f"enqueue(fn, {_KW})", _offload),
    "ThreadPoolExecutor(1).submit": (f"submit(fn, {_KW})", _executor),
    # Informational: the HTTP forms, a call built beforehand, and one built per enqueue
    # (offload.http validates its arguments then, so that a bad call fails in the handler).
    "offload enqueue_task(HttpCall)": ("enqueue(call)", _offload_http),
    "offload enqueue_task(offload.http(...))": (
        'enqueue(http("POST", url, json={"user_id": 42, "plan": "pro"}))',
        _offload_http,
    ),
    "huey MemoryHuey enqueue": (f"task({_KW})", _huey),
}


def _huey_installed() -> bool:
    try:
        import huey  # noqa: F401
    except ImportError:
        return False
    return True


def run(scale: Scale) -> list[Row]:
    names = [n for n in CONTENDERS if _huey_installed() or not n.startswith("huey")]
    rounds, chunk = scale.n(20, 2), scale.n(1_000, 10)  # per run: batches, singles per round
    p50, p99 = Samples(), Samples()
    empty_batches, empty_singles = timers("pass", {})
    for run_index in range(scale.repeats):
        with ExitStack() as stack:
            timed = {}
            for name in names:
                stmt, context = CONTENDERS[name]
                namespace = stack.enter_context(context())
                timed[name] = timers(stmt, dict(namespace, fn=send_welcome, url=HOOK))
            means: dict[str, list[float]] = {name: [] for name in ["", *names]}
            single: dict[str, list[float]] = {name: [] for name in ["", *names]}
            # Round by round, one batch (then one chunk of single calls) of each contender
            # in turn, the order rotating: whatever else the machine does meanwhile falls
            # on every contender alike, not on whichever ran in a busy second.
            for r in range(rounds):
                order = ["", *names]
                order = (
                    order[(r + run_index) % len(order) :] + order[: (r + run_index) % len(order)]
                )
                with gc_collected():
                    for name in order:
                        batch_fn = timed[name][0] if name else empty_batches
                        means[name] += batch_fn(1, BATCH)
                    for name in order:
                        singles_fn = timed[name][1] if name else empty_singles
                        single[name] += singles_fn(chunk)
        overhead50 = statistics.median(means[""])  # the timing loop's own cost
        overhead99 = statistics.median(single[""])
        for name in names:
            p50.add(name, max(0.0, statistics.median(means[name]) - overhead50) / 1000)
            p99.add(name, max(0.0, percentile(single[name], 99) - overhead99) / 1000)

    base = "queue.Queue.put"
    rows: list[Row] = []
    for name in names:
        for label, samples in (("p50", p50), ("p99", p99)):
            ours = name == "offload enqueue_task"
            ratio = samples.ratio(name, base)
            rows.append(
                Row(
                    bench="enqueue",
                    figure=f"{name} {label}",
                    value=samples.median(name),
                    unit="µs",
                    baseline=f"{base} {label}" if name != base else "",
                    ratio=ratio,
                    target=at_most(2.5) if ours else "",
                    met=(ratio <= 2.5) if ours else None,
                    note=samples.spread(name, base) if ours else "",
                    runs=samples.count(name),
                )
            )
    if not _huey_installed():
        rows.append(
            Row("enqueue", "huey MemoryHuey enqueue", None, "µs", note="huey not installed")
        )
    if not redis_available():
        rows.append(
            Row(
                "enqueue",
                "Celery / RQ / Dramatiq enqueue (Redis)",
                None,
                "µs",
                note="skipped: redis-server is not installed",
            )
        )
    return rows
