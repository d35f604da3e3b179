"""A durable backlog's wake-ups: how an idle worker learns of tasks other processes put.

A store that can tell (`DurableStore.watch`: PostgreSQL's LISTEN/NOTIFY) calls `woken()`
from a thread of its own; the first idle worker asks it to (`ensure`). Then an idle worker
waits for that, and looks at the store on its own only every WATCHED_LOOK seconds, for
leases to take back (which nobody announces) and for what the store may have missed.
Without it, an idle worker looks every POLL_INTERVAL seconds.

`heard` counts wake-ups, under the core's lock: a worker notes it before it reads the
store, and looks again at once if it changed meanwhile, since what woke it may have come
after its read (the lost wake-up, in another guise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .._guard import Guarded
from ..core import Core
from ..stores.base import DurableStore
from ..worker import WorkerPool

__all__ = ["POLL_INTERVAL", "WATCHED_LOOK", "Wakeups"]

log = logging.getLogger("offload")

POLL_INTERVAL = 0.5
"""Seconds between an idle worker's looks at a durable store for tasks other processes
put."""

WATCHED_LOOK = 2.0
"""Seconds between an idle worker's looks at a store that wakes it (at most a quarter of
the lease timeout)."""


class Wakeups:
    """Whether the store wakes this backlog, and how long an idle worker waits to look."""

    def __init__(self, core: Core, pool: WorkerPool, store: DurableStore, *, consume: bool):
        self.core = core
        self.pool = pool
        self.store = store
        self.consume = consume
        self.heard = 0  # wake-ups so far (lock held to read or change)
        self._asked = False
        self._stop: Callable[[], None] | None = None
        self._watched_look = min(WATCHED_LOOK, store.lease_timeout / 4)

    def look(self) -> float:
        """Seconds an idle worker waits before it looks at the store on its own."""
        return self._watched_look if self._stop is not None else POLL_INTERVAL

    def ensure(self) -> None:
        """Called with the lock held: ask the store to wake this backlog (once)."""
        if self._asked or not self.consume:
            return
        self._asked = True
        watch = getattr(self.store, "watch", None)  # a DurableStore of the user's may lack it
        if watch is None:
            return
        try:
            self._stop = watch(self.woken)
        except Exception as exc:  # the store cannot tell: poll, as without watch
            with Guarded():
                log.warning("offload: %s cannot wake workers (%s); polling", self.store.url, exc)

    def woken(self) -> None:
        """From the store's thread: tasks may be due. Wake an idle worker, or start one."""
        core = self.core
        with core.lock:
            self.heard += 1
            if core.closed or core.stopping or core.forked():
                return
            pool = self.pool
            if not core.wake() and not pool.threads:
                pool.ensure()

    def stop(self) -> None:
        """Lock not held: the store stops waking this backlog (shutdown)."""
        with self.core.lock:
            stop, self._stop = self._stop, None
        if stop is not None:
            stop()
