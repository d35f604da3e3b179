"""Budgets: a durable backlog's tokens from the rate budgets its store shares.

Over a store that keeps them (`stores.base.BudgetStore`: SQLite, PostgreSQL), a key's
declared rate holds for every process on the store together. The scheduler holds a
limited key's calls until its pace has a token (`limits.SharedTokens`); a worker that
finds keys waiting for one asks the store, a token per key, with the core's lock let go
(the store's transaction never holds up an enqueue or another key's calls), then looks at
the scheduler again. Keys without a declared rate never ask; the adaptive rate and
concurrency caps stay per process.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .._guard import Guarded
from ..limits import SharedTokens

if TYPE_CHECKING:
    from ..clock import Clock
    from ..core import Core
    from ..stores.base import BudgetStore

__all__ = ["ASK_AGAIN", "Budgets"]

log = logging.getLogger("offload")

ASK_AGAIN = 1.0
"""Seconds before a key asks again after the store could not be read."""


class Budgets:
    """Takes shared tokens from the store for the keys the scheduler holds for one."""

    def __init__(self, core: Core, store: BudgetStore, clock: Clock) -> None:
        self.core = core
        self.store = store
        self.clock = clock
        self.asking = 0  # workers asking the store now (each notifies when done)

    def ask(self, now: float) -> bool:
        """Called with the lock held, which it lets go while it asks the store: a token
        for each key waiting for one. True when it asked (the scheduler may have a task
        to start now, or a time to wake at)."""
        core = self.core
        sched = core.sched
        keys = sched.wanting(now)
        if not keys:
            return False
        asks: list[tuple[str, SharedTokens]] = []
        for key in keys:
            shared = sched.paces[key].shared
            assert shared is not None
            shared.asking = True
            asks.append((key, shared))
        waits: list[float] = []
        self.asking += 1
        core.lock.release()
        try:
            for key, shared in asks:
                waits.append(self._take(key, shared))
        finally:
            core.lock.acquire()
            self.asking -= 1
            for _, shared in asks:
                shared.asking = False
        now = self.clock.monotonic()
        for (_, shared), wait in zip(asks, waits, strict=True):
            if wait > 0:
                shared.retry_at = now + wait
            else:
                shared.held += 1
        core.work.notify()  # another worker may ask for the next token meanwhile
        return True

    def _take(self, key: str, shared: SharedTokens) -> float:
        try:
            return self.store.take_token(key, shared.rate, shared.burst)
        except Exception as exc:
            with Guarded():
                log.error(
                    "offload: could not take a token of %s's rate budget from %s: %s",
                    key,
                    self.store.url,
                    exc,
                )
            return ASK_AGAIN
