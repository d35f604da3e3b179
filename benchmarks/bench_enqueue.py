"""What a web handler pays for one enqueue, with the worker busy so the queue only grows.

Every contender gets the same payload (a module-level function and a dict of three
keyword arguments, built per call as a handler would) and the same treatment: a fresh
queue per run, the heap collected before it starts, GC left on (as in a real handler).
p50 is the median of the means of batches of 1,000 calls (a perf_counter_ns pair costs
about as much as a queue.Queue.put, so single calls cannot give a fair median); p99 is
the 99th percentile of single calls. The same loops with an empty statement are timed
too and taken off both. The worker (or consumer) is kept busy on a blocking call, so only
the enqueue path is measured.

The Redis peers (Celery `task.delay`, RQ `Queue.enqueue`, Dramatiq `actor.send` with its
RedisBroker) are measured when redis-server and their packages are installed:

    apt-get install redis-server      # the binary only; no service needs to run
    pip install -e '.[bench]'         # celery, rq, dramatiq[redis], redis

This benchmark then starts its own redis-server on 127.0.0.1 (a free port, a temporary
dir, no persistence) and stops it at the end. Each peer publishes to it with no worker
running and no result backend, in the same rounds as the others, with the same payload; a
peer call costs hundreds of times a queue.Queue.put, so its batches are 50 calls and its
chunks of single calls a tenth of the others' (the run stays under a minute longer).
Without redis-server or a package, the row says which is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import queue
import statistics
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

from _harness import (
    RedisServer,
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


# -- the Redis peers: each publishes to the benchmark's own redis-server, no worker running --


@contextmanager
def _celery(url: str) -> Iterator[dict[str, Any]]:
    from celery import Celery

    app = Celery("bench", broker=url, set_as_current=False)  # no result backend
    try:
        task = app.task(send_welcome)
        task.delay(user_id=0, email="warm@example.com", plan="up")  # connect before timing
        yield {"delay": task.delay}
    finally:
        app.close()


@contextmanager
def _rq(url: str) -> Iterator[dict[str, Any]]:
    from redis import Redis
    from rq import Queue

    connection = Redis.from_url(url)
    try:
        q = Queue("bench", connection=connection)
        q.enqueue(send_welcome, user_id=0, email="warm@example.com", plan="up")
        yield {"enqueue": q.enqueue}
    finally:
        connection.close()


@contextmanager
def _dramatiq(url: str) -> Iterator[dict[str, Any]]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url)
    try:
        actor = dramatiq.actor(send_welcome, broker=broker)
        actor.send(user_id=0, email="warm@example.com", plan="up")
        yield {"send": actor.send}
    finally:
        broker.close()


# name -> (statement timed, context given the server's URL, packages it needs)
REDIS_PEERS: dict[str, tuple[str, Callable[[str], Any], tuple[str, ...]]] = {
    "celery task.delay (Redis)": (f"delay({_KW})", _celery, ("celery", "redis")),
    "rq Queue.enqueue (Redis)": (f"enqueue(fn, {_KW})", _rq, ("rq", "redis")),
    "dramatiq actor.send (Redis)": (f"send({_KW})", _dramatiq, ("dramatiq", "redis")),
}
SLOW_BATCH = 50  # a Redis peer's batch: at ~0.5 ms a call, the timer's cost is nothing
HOW = "apt-get install redis-server; pip install -e '.[bench]'"


def _missing(packages: tuple[str, ...]) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


def _huey_installed() -> bool:
    try:
        import huey  # noqa: F401
    except ImportError:
        return False
    return True


def run(scale: Scale) -> list[Row]:
    with ExitStack() as outer:
        skipped: list[Row] = []
        server = _redis_server(outer, skipped)
        return _run(scale, server) + skipped


def _redis_server(stack: ExitStack, skipped: list[Row]) -> RedisServer | None:
    """The benchmark's own redis-server when a Redis peer can be measured, else None, with
    a row saying why in `skipped`."""
    peers = "Celery / RQ / Dramatiq enqueue (Redis)"
    if not redis_available():
        missing = sorted({p for *_, needs in REDIS_PEERS.values() for p in _missing(needs)})
        also = f"; nor {', '.join(missing)}" if missing else ""
        note = f"skipped: redis-server is not installed{also} ({HOW})"
        skipped.append(Row("enqueue", peers, None, "µs", note=note))
        return None
    for name, (*_, needs) in REDIS_PEERS.items():
        if missing := _missing(needs):
            note = f"skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')"
            skipped.append(Row("enqueue", name, None, "µs", note=note))
    if len(skipped) == len(REDIS_PEERS):
        return None
    try:
        return stack.enter_context(RedisServer())
    except RuntimeError as exc:
        skipped[:] = [Row("enqueue", peers, None, "µs", note=f"skipped: {exc}")]
        return None


def _run(scale: Scale, server: RedisServer | None) -> list[Row]:
    contenders = {
        name: (stmt, context)
        for name, (stmt, context) in CONTENDERS.items()
        if _huey_installed() or not name.startswith("huey")
    }
    if server is not None:
        for name, (stmt, context, needs) in REDIS_PEERS.items():
            if not _missing(needs):
                contenders[name] = (stmt, functools.partial(context, server.url))
    names = list(contenders)
    rounds, chunk = scale.n(20, 2), scale.n(1_000, 10)  # per run: batches, singles per round
    # Per call, a Redis peer costs some 300 queue.Queue.puts: fewer calls give it as many
    # milliseconds; its p99 is still over hundreds of single calls per run.
    sizes = {
        name: (SLOW_BATCH, scale.n(100, 2)) if name in REDIS_PEERS else (BATCH, chunk)
        for name in ["", *names]
    }
    p50, p99 = Samples(), Samples()
    empty_batches, empty_singles = timers("pass", {})
    for run_index in range(scale.repeats):
        if server is not None:
            server.flush()  # each run starts from empty Redis queues, as from a fresh Queue
        with ExitStack() as stack:
            timed = {}
            for name in names:
                stmt, context = contenders[name]
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
                        means[name] += batch_fn(1, sizes[name][0])
                    for name in order:
                        singles_fn = timed[name][1] if name else empty_singles
                        single[name] += singles_fn(sizes[name][1])
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
    return rows
