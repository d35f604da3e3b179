"""The state the pipeline's stages share, under one lock: the scheduler and the ledger.

Every stage (the enqueue path, the worker threads, settling, flush and shutdown) changes
the scheduler and the ledger under `Core.lock`, and a task moves between the ledger's
columns in the same critical section in which it moves in the scheduler, so that
`enqueued == succeeded + dead_lettered + queued + delayed + in_flight` holds for every
reader of `stats()`, not only at rest.

Idle workers wait on Conditions of their own, over the lock, listed in `waiting` until
one is woken (`wake`): a worker woken is at once no longer idle, so that a burst of tasks
wakes as many workers as it needs, and starts the rest, rather than sending every wake-up
to the one worker that has not run yet. `drained` is where flush and shutdown wait: a
wake-up for new work goes to a worker, never to a thread blocked in `flush()`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Literal

from .limits import Limit
from .scheduler import Scheduler
from .status import KeyState, Stats
from .stores import StoreCounts

__all__ = ["AttemptKind", "Core", "Leaving", "Ledger"]


AttemptKind = Literal["success", "throttled", "transient", "permanent"]
"""How an attempt ended, as metrics count it (`offload_attempts_total{outcome}`)."""


class Ledger:
    """The counters of Stats since the offloader was made (this process's, after fork), and
    the finer ones metrics read: attempts per key and outcome, dead letters per reason."""

    __slots__ = (
        "attempts",
        "by_reason",
        "claimed",
        "dead_lettered",
        "deduplicated",
        "enqueued",
        "rejected",
        "released",
        "retried",
        "succeeded",
    )

    def __init__(self) -> None:
        self.enqueued = 0  # tasks accepted
        self.succeeded = 0
        self.retried = 0  # attempts that ended in a retry
        self.dead_lettered = 0
        self.rejected = 0  # QueueFull
        self.deduplicated = 0  # enqueues that returned a task already held
        self.claimed = 0  # durable stores: tasks leased to this process
        self.released = 0  # durable stores: tasks handed back to the store
        # (key, kind) -> attempts; key None for a plain callable without one
        self.attempts: dict[tuple[str | None, AttemptKind], int] = {}
        self.by_reason: dict[str, int] = {}  # dead letters made, per reason

    def attempted(self, key: str | None, kind: AttemptKind) -> None:
        """Count one attempt (the lock held)."""
        attempts = self.attempts
        slot = (key, kind)
        attempts[slot] = attempts.get(slot, 0) + 1


class Leaving:
    """The tasks a memory backlog's shutdown took from the scheduler (at once) and
    dead-letters one by one: still counted as queued and delayed, in the order it goes
    (the queued ones first), each until the step that counts it a dead letter."""

    __slots__ = ("delayed", "queued")

    def __init__(self) -> None:
        self.queued = 0
        self.delayed = 0

    def one_gone(self) -> None:
        """Called with the lock held: one of them is counted a dead letter now."""
        if self.queued:
            self.queued -= 1
        elif self.delayed:
            self.delayed -= 1


class Core:
    """One offloader's runtime state in one process; a forked child makes a new one."""

    def __init__(self, limits: Mapping[str, Limit] | None = None, adaptive: bool = False) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        # An idle worker's own Condition, from when it waits until it is woken (the most
        # recently idle last: woken first, so that the others may reach their idle timeout).
        self.waiting: dict[threading.Condition, None] = {}
        self.drained = threading.Condition(self.lock)
        self.limits: Mapping[str, Limit] = limits if limits is not None else {}
        self.sched = Scheduler(limits, adaptive)
        self.ledger = Ledger()
        self.leaving = Leaving()
        self.closed = False  # no new tasks (shutdown() or configure() called)
        self.stopping = False  # workers exit after their current task

    def forked(self) -> bool:
        """True in a child process that inherited this state (it must not be used there)."""
        return self.pid != os.getpid()

    def undelivered(self, wait: float, deadline: float) -> int:
        """Wait up to `wait` seconds for nothing more to be due before `deadline` (the
        clock's time); then how many tasks are still held or running (0 when nothing more
        can happen before the deadline, as shutdown() would find), or 0 in a forked child."""
        if self.forked():
            return 0
        with self.lock:
            sched = self.sched

            def settled() -> bool:
                return sched.idle() or sched.nothing_due_before(deadline)

            if self.drained.wait_for(settled, wait):
                return 0
            return sched.size() + sched.in_flight

    def wake(self, count: int = 1) -> int:
        """Called with the lock held: wake up to `count` idle workers, each once; returns
        how many were woken."""
        waiting = self.waiting
        woken = 0
        while woken < count and waiting:
            waiting.popitem()[0].notify()
            woken += 1
        return woken

    def wake_all(self) -> None:
        """Called with the lock held: wake every idle worker (shutdown)."""
        waiting, self.waiting = self.waiting, {}
        for cond in waiting:
            cond.notify()

    def notify_if_drained(self) -> None:
        """Called with the lock held: wake flush() and shutdown() when they may be done.

        Both wait for (at least) nothing ready and nothing running: while a task is still
        queued or in flight, waking them would only have them check and wait again, once
        per task delivered, taking the GIL and the lock from the workers.
        """
        sched = self.sched
        if sched.ready or sched.in_flight:
            return
        self.drained.notify_all()

    def stats(
        self, counts: StoreCounts | None, dead_letters: int, dropped: int, running: bool
    ) -> Stats:
        """The ledger and the scheduler's snapshot as Stats, read in one critical section
        (so that the ledger's sum holds), with what the store said (`counts`: None for the
        memory store)."""
        with self.lock:
            sched, ledger, leaving = self.sched, self.ledger, self.leaving
            return Stats(
                enqueued=ledger.enqueued,
                succeeded=ledger.succeeded,
                retried=ledger.retried,
                dead_lettered=ledger.dead_lettered,
                rejected=ledger.rejected,
                queued=sched.queued + leaving.queued,
                delayed=len(sched.delayed) + leaving.delayed,
                in_flight=sched.in_flight,
                dead_letters=dead_letters,
                dead_letters_dropped=dropped,
                worker_running=running,
                claimed=ledger.claimed,
                released=ledger.released,
                stored_ready=None if counts is None else counts.ready,
                stored_delayed=None if counts is None else counts.delayed,
                stored_leased=None if counts is None else counts.leased,
                deduplicated=ledger.deduplicated,
            )

    def key_states(self, now: float) -> dict[str, KeyState]:
        """Every key the scheduler knows a state of at monotonic `now` (gated, limited,
        waiting or running), sorted by key."""
        limits = self.limits
        with self.lock:
            sched = self.sched
            waiting: dict[str, int] = {}
            for task in sched.ready:
                key = task.key
                if key is not None:
                    waiting[key] = waiting.get(key, 0) + 1
            states = {}
            for key in sched.known_keys():
                gate = sched.gates.get(key)
                pace = sched.paces.get(key)
                held = sched.held.get(key)
                limit = limits.get(key)
                states[key] = KeyState(
                    key=key,
                    waiting=waiting.get(key, 0) + (len(held) if held else 0),
                    in_flight=sched.running.get(key, 0),
                    reopens_in=None if gate is None else max(0.0, gate.open_at - now),
                    rate=pace.rate if pace is not None else _declared_rate(limit),
                    limit=limit,
                    down=sched.down(key),
                )
        return dict(sorted(states.items()))


def _declared_rate(limit: Limit | None) -> float | None:
    return None if limit is None else limit.per_second
