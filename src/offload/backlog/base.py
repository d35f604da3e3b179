"""The Backlog protocol: what the enqueue path, the workers, settling and shutdown need of
the place where tasks wait."""

from __future__ import annotations

import threading
from typing import NamedTuple, Protocol

from ..records import DeadLetter, Task
from ..stores.base import StoreCounts

__all__ = ["Backlog", "Take"]


class Take(NamedTuple):
    """What a worker got from `Backlog.take`: a task, or how long to wait for one.

    `wait`: seconds until the backlog may have a task (None: until notified). `idle`: it
    holds nothing to do at all, so the worker's idle countdown runs.
    """

    task: Task | None
    wait: float | None = None
    idle: bool = False


class Backlog(Protocol):
    """Methods marked "lock held" are called with the core's lock held; the others
    without it (they may read or write a store)."""

    def add(self, task: Task) -> Task:
        """Accept a new task (the enqueue path): the task, or the one already holding its
        dedup key (then nothing is added); QueueFull, ShutDown, NotSerializable."""
        ...

    def take(self, now: float) -> Take:
        """Lock held (a durable backlog lets go of it while it reads the store): the next
        task a worker may perform at `now`, counted in flight."""
        ...

    def can_retry(self) -> bool:
        """False when a retry could not be kept (a memory backlog shutting down)."""
        ...

    def requeue(self, task: Task, now: float, delay: float, throttled: bool) -> bool:
        """Keep a task that failed for a retry in `delay` seconds, and count it (its key's
        gate closes when `throttled`); False when it cannot be kept."""
        ...

    def complete(self, task: Task) -> None:
        """A delivered task: the store forgets it (the settler counts it)."""

    def bury(self, task: Task, letter: DeadLetter) -> bool:
        """Keep `letter` in the store in place of the task; False (and the task counted as
        handed back) when the store could not take it."""
        ...

    def forget(self, task: Task) -> None:
        """Lock held: a task delivered or dead-lettered leaves this process."""

    def worker_left(self) -> None:
        """Lock held: a worker thread exited."""

    def flush(self, timeout: float | None) -> bool:
        """Wait until nothing is queued, delayed or running; False if `timeout` ran out."""
        ...

    def shutting_down(self) -> list[Task]:
        """Lock held: take what is left from the scheduler, for `close`, counted in the
        same step (the workers are stopping)."""
        ...

    def close(
        self,
        left: list[Task],
        ok: bool,
        threads: list[threading.Thread],
        deadline: float | None,
    ) -> bool:
        """The end of shutdown: what becomes of `left`, then wait for `threads` until
        `deadline`. True when nothing was left undelivered."""
        ...

    def store_threads(self) -> list[threading.Thread]:
        """Threads of the backlog's own that use the store (a lease keeper), which a
        shutdown lets end before it closes the store."""
        ...

    def replay(self, dead_letter_id: str) -> Task:
        """Enqueue a dead letter's task again with a fresh attempt budget."""
        ...

    def counts(self) -> StoreCounts | None:
        """What a durable store holds now (None for the memory backlog)."""
        ...
