"""Health: is an offloader, or a store, well? For probes (`healthz`) and cron (`offload
health`), one verdict with one line per problem.

A store is asked whether it answers, how many dead letters it holds and, if durable, how
long its earliest due task that nobody holds has waited (`next_due`: SQLite knows; SQS
says only "now" while messages are visible, so its wait reads 0: CloudWatch's
ApproximateAgeOfOldestMessage is the figure to watch there). An offloader adds what its
own process knows (`HeadWatch`): whether a worker thread is alive, and how long its
oldest due task has waited: a retry past its due time, or the task at the head of the
ready queue since the first look that saw it there. Tasks carry no enqueue time (that
would cost every enqueue), so a probe that asks every few seconds sees the wait of a
stuck queue grow. Tasks behind a closed gate or a pace wait by design and do not count.
A queue with tasks and no worker thread alive to perform them is always a problem.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, TextIO, cast

from .config import check_number
from .records import Task
from .status import Health
from .stores.base import DurableStore, Store

if TYPE_CHECKING:
    from .offloader import Offloader

__all__ = [
    "HeadWatch",
    "StoreLook",
    "check_command",
    "check_limits",
    "judge",
    "look_at_store",
    "store_health",
    "summary",
]


class StoreLook:
    """What one look at a store found: whether it answered, its wait and dead letters."""

    __slots__ = ("dead_letters", "ok", "problem", "waiting")

    def __init__(
        self, ok: bool, waiting: float | None, dead_letters: int | None, problem: str | None
    ) -> None:
        self.ok = ok
        self.waiting = waiting
        self.dead_letters = dead_letters
        self.problem = problem


def look_at_store(store: Store, now: float) -> StoreLook:
    """Ask `store` how it is, at epoch time `now`; never raises."""
    try:
        if not store.durable:
            return StoreLook(True, None, len(store), None)
        durable = cast("DurableStore", store)
        letters = durable.counts().dead_letters
        due = durable.next_due()
    except Exception as exc:  # whatever a store raises, the probe's answer is "not well"
        text = " ".join(str(exc).split()) or type(exc).__name__
        return StoreLook(False, None, None, f"store unreachable: {text}")
    waiting = None if due is None or due > now else max(0.0, now - due)
    return StoreLook(True, waiting, letters, None)


def check_limits(max_age: float | None, max_dead_letters: int | None) -> None:
    """TypeError or ValueError naming a bad threshold."""
    if max_age is not None:
        check_number("max_age", max_age, minimum=0)
    if max_dead_letters is not None:
        check_number("max_dead_letters", max_dead_letters, minimum=0, integer=True)


def judge(
    look: StoreLook,
    *,
    worker_running: bool | None,
    waiting: float | None,
    max_age: float | None,
    max_dead_letters: int | None,
    problems: tuple[str, ...] = (),
) -> Health:
    """The verdict: `problems` found elsewhere, the store's, and the thresholds crossed."""
    found = list(problems)
    if look.problem is not None:
        found.append(look.problem)
    if max_age is not None and waiting is not None and waiting > max_age:
        found.append(f"the oldest due task has waited {_seconds(waiting)} (max {max_age:g}s)")
    letters = look.dead_letters
    if max_dead_letters is not None and letters is not None and letters > max_dead_letters:
        found.append(f"{letters:,} dead letter(s) held (max {max_dead_letters:,})")
    return Health(
        ok=not found,
        worker_running=worker_running,
        store_ok=look.ok,
        oldest_waiting_s=None if waiting is None else round(waiting, 3),
        dead_letters=letters,
        problems=tuple(found),
    )


class HeadWatch:
    """An offloader's health: what its store says, and what its own process knows."""

    def __init__(self) -> None:
        self._seen: tuple[Task, float] | None = None  # the head, when first seen there

    def health(
        self, offloader: Offloader, max_age: float | None, max_dead_letters: int | None
    ) -> Health:
        """`offloader`'s health (see the module docstring)."""
        check_limits(max_age, max_dead_letters)
        store, core, pool = offloader.store, offloader._core, offloader._pool
        clock, consume = offloader._clock, offloader.consume
        look = look_at_store(store, clock.time())
        now = clock.monotonic()
        with core.lock:
            sched = core.sched
            running = bool(pool.threads)
            ready = len(sched.ready)
            head = sched.ready[0] if ready else None
            delayed = sched.delayed
            overdue = now - delayed[0][0] if delayed and delayed[0][0] <= now else None
        seen = self._seen
        if head is None:
            self._seen, head_wait = None, None
        elif seen is not None and seen[0] is head:
            head_wait = now - seen[1]
        else:
            self._seen, head_wait = (head, now), 0.0
        waits = [w for w in (look.waiting, head_wait, overdue) if w is not None]
        stuck = (ready or overdue is not None) and not running and consume
        return judge(
            look,
            worker_running=running,
            waiting=max(waits) if waits else None,
            max_age=max_age,
            max_dead_letters=max_dead_letters,
            problems=(f"{ready or 1} task(s) due but no worker thread is running",)
            if stuck
            else (),
        )


def store_health(
    store: Store,
    now: float | None = None,
    *,
    max_age: float | None = None,
    max_dead_letters: int | None = None,
) -> Health:
    """The health of a store alone at epoch time `now` (the time now if None), as a
    process that runs no offloader over it sees it (`offload health`, the console over a
    store URL): `worker_running` is None."""
    check_limits(max_age, max_dead_letters)
    look = look_at_store(store, time.time() if now is None else now)
    return judge(
        look,
        worker_running=None,
        waiting=look.waiting,
        max_age=max_age,
        max_dead_letters=max_dead_letters,
    )


def check_command(
    store: Store, max_age: float | None, max_dead_letters: int | None, out: TextIO
) -> int:
    """`offload health`: one line on `out`; exit status 0 when healthy, 1 when not."""
    health = store_health(store, max_age=max_age, max_dead_letters=max_dead_letters)
    out.write(summary(health) + "\n")
    return 0 if health.ok else 1


def summary(health: Health) -> str:
    """One line for people and cron mail: `healthy: ...` or `unhealthy: <problems>`."""
    if not health.ok:
        return "unhealthy: " + "; ".join(health.problems)
    parts = []
    if health.oldest_waiting_s is not None:
        parts.append(f"oldest due task waiting {_seconds(health.oldest_waiting_s)}")
    else:
        parts.append("no task waiting")
    if health.dead_letters is not None:
        parts.append(f"{health.dead_letters:,} dead letter(s)")
    if health.worker_running is not None:
        parts.append("worker running" if health.worker_running else "no worker running here")
    return "healthy: " + ", ".join(parts)


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 10 else f"{math.floor(value):,}s"
