"""The memory backlog: the scheduler holds every task; the store only dead letters."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from .._guard import Guarded
from ..calls.base import describe_target
from ..clock import Clock
from ..core import Core
from ..errors import QueueFull, ShutDown
from ..records import DeadLetter, Task
from ..stores.base import Store, StoreCounts
from ..worker import WorkerPool
from .base import Take

if TYPE_CHECKING:
    from ..settle import Settler

__all__ = ["DedupIndex", "MemoryBacklog"]

log = logging.getLogger("offload")

_SHOWN = 10  # undelivered tasks named in the shutdown warning


class DedupIndex:
    """Which task holds each dedup key: while it is queued, delayed, running or retrying,
    and for its `dedup_window` after it ended (then the key is free again). Called with
    the core's lock held; times are the offloader clock's monotonic seconds."""

    _PRUNE_AT = 1_000  # ended keys kept before the expired ones are swept

    def __init__(self) -> None:
        self.holders: dict[str, Task] = {}
        self.ended: dict[str, tuple[Task, float]] = {}  # key -> (task, free again at)

    def holder(self, key: str, now: float) -> Task | None:
        """The task holding `key` now, or None."""
        task = self.holders.get(key)
        if task is not None:
            return task
        ended = self.ended.get(key)
        if ended is None:
            return None
        if ended[1] > now:
            return ended[0]
        del self.ended[key]
        return None

    def take(self, key: str, task: Task) -> None:
        self.ended.pop(key, None)
        self.holders[key] = task

    def release(self, task: Task, now: float) -> None:
        """`task` ended (delivered or dead-lettered): its key is free, after its window."""
        key = task.dedup_key
        if key is None or self.holders.get(key) is not task:
            return
        del self.holders[key]
        if task.dedup_window > 0:
            if len(self.ended) >= self._PRUNE_AT:
                for stale in [k for k, (_, until) in self.ended.items() if until <= now]:
                    del self.ended[stale]
            self.ended[key] = (task, now + task.dedup_window)


class MemoryBacklog:
    """Tasks in the scheduler, bounded by `max_queue`; lost with the process, so shutdown
    turns what is left into dead letters (reason "shutdown") and says so once."""

    def __init__(
        self, core: Core, pool: WorkerPool, store: Store, clock: Clock, max_queue: int
    ) -> None:
        self.core = core
        self.pool = pool
        self.store = store
        self.clock = clock
        self.max_queue = max_queue
        self.settler: Settler | None = None
        self.dedup = DedupIndex()

    def bind(self, settler: Settler) -> None:
        self.settler = settler

    def add(self, task: Task, *, dedup: bool = True) -> Task:
        core = self.core
        sched = core.sched
        pool = self.pool
        meta = task._meta
        with core.lock:
            if core.closed:
                raise ShutDown("this offloader was shut down; it takes no new tasks")
            if meta is not None and meta.dedup_key is not None and dedup:
                holder = self.dedup.holder(meta.dedup_key, self.clock.monotonic())
                if holder is not None:
                    core.ledger.deduplicated += 1
                    return holder
            if len(sched.ready) + sched.held_count + len(sched.delayed) >= self.max_queue:
                core.ledger.rejected += 1
                raise QueueFull(f"offload queue is full ({self.max_queue} tasks held)")
            pool.engage(raise_unstarted=True)  # before the append: it may raise ShutDown
            core.ledger.enqueued += 1
            if meta is None:  # a plain callable's task (no meta yet) is made enqueued
                sched.ready.append(task)
                return task
            meta.enqueued = True
            if meta.dedup_key is not None:
                self.dedup.take(meta.dedup_key, task)
            if meta.delay or meta.at is not None:
                wall = self.clock.time()
                due = task.due(wall)
                if due is not None:
                    sched.delay(task, self.clock.monotonic() + (due - wall))
                    return task
            sched.ready.append(task)
            return task

    def take(self, now: float) -> Take:
        sched = self.core.sched
        task = sched.take(now)
        if task is not None:
            return Take(task)
        if sched.size() == 0:
            return Take(None, None, idle=True)
        return Take(None, sched.next_wake(now))

    def can_retry(self) -> bool:
        return not self.core.stopping

    def requeue(self, task: Task, now: float, delay: float, throttled: bool) -> bool:
        core = self.core
        due = now + delay
        with core.lock:
            if core.stopping:
                return False
            core.sched.settle(task, due if throttled else None, now=now)
            core.sched.delay(task, due)
            core.ledger.retried += 1
            core.wake()
        return True

    def complete(self, task: Task) -> None:
        pass

    def bury(self, task: Task, letter: DeadLetter) -> bool:
        self.store.bury(task, letter)
        return True

    def forget(self, task: Task) -> None:
        meta = task._meta
        if meta is not None and meta.dedup_key is not None:
            self.dedup.release(task, self.clock.monotonic())

    def worker_left(self) -> None:
        pass

    def flush(self, timeout: float | None) -> bool:
        core = self.core
        with core.lock:
            return core.drained.wait_for(core.sched.idle, timeout)

    def shutting_down(self) -> list[Task]:
        # Still counted as queued and delayed until close() dead-letters each.
        core = self.core
        sched = core.sched
        core.leaving.queued += sched.queued  # drain() returns these first
        core.leaving.delayed += len(sched.delayed)
        return sched.drain()

    def store_threads(self) -> list[threading.Thread]:
        return []

    def close(
        self,
        left: list[Task],
        ok: bool,
        threads: list[threading.Thread],
        deadline: float | None,
    ) -> bool:
        settler = self.settler
        assert settler is not None
        for task in left:
            settler.dead_letter(task, None, "shutdown", error="undelivered at shutdown")
        core = self.core
        with core.lock:
            running = core.sched.in_flight
        lost = len(left) + running
        if lost:
            shown = ", ".join(f"{t.id} {describe_target(t.call)}" for t in left[:_SHOWN])
            more = f", and {len(left) - _SHOWN} more" if len(left) > _SHOWN else ""
            with Guarded():
                log.warning(
                    "offload shut down with %d task(s) undelivered: %d dead-lettered (reason "
                    "'shutdown'), %d still running%s",
                    lost,
                    len(left),
                    running,
                    f"; dead-lettered: {shown}{more}. The memory store's dead letters end "
                    "with the process: keep them with on_dead_letter, or use a durable store"
                    if left
                    else "",
                )
        self.pool.join(threads, deadline)
        return ok and not lost

    def replay(self, dead_letter_id: str) -> Task:
        task = self.store.revive(dead_letter_id)
        letter = task._meta.progress.letter if task._meta and task._meta.progress else None
        task._restart()
        try:
            self.add(task, dedup=False)  # it takes its key again
        except (QueueFull, ShutDown):
            if letter is not None:
                task.progress.letter = letter
                self.store.bury(task, letter)  # put the same dead letter back
            raise
        return task

    def counts(self) -> StoreCounts | None:
        return None
