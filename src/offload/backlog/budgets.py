"""Budgets: a durable backlog's tokens from the rate budgets its store shares.

Over a store that keeps them (`stores.base.BudgetStore`: SQLite, PostgreSQL), a key's
declared rate holds for every process on the store together. The scheduler holds a
limited key's calls until its pace has a token (`limits.SharedTokens`); a worker that
finds keys waiting for one asks the store with the core's lock let go (the store's
transaction never holds up an enqueue or another key's calls), for as many tokens as it
and the idle workers can start calls with, then looks at the scheduler again. Keys
without a declared rate never ask; the adaptive rate stays per process. A declared
concurrency is shared the same way, a slot per call in flight (slots.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .._guard import Guarded
from ..limits import SharedTokens
from .slots import ask_unlocked

if TYPE_CHECKING:
    from ..clock import Clock
    from ..core import Core
    from ..stores.base import BudgetStore
    from ..worker import WorkerPool
    from .slots import Slots

__all__ = ["ASK_AGAIN", "Budgets"]

log = logging.getLogger("offload")

ASK_AGAIN = 1.0
"""Seconds before a key asks again after the store could not be read."""


class Budgets:
    """Takes shared tokens from the store for the keys the scheduler holds for one."""

    def __init__(
        self, core: Core, pool: WorkerPool, store: BudgetStore, clock: Clock, slots: Slots
    ) -> None:
        self.core = core
        self.pool = pool
        self.store = store
        self.clock = clock
        self.slots = slots  # a declared concurrency's slots, asked for once a token is in hand
        self.asking = 0  # workers asking the store now (each notifies when done)

    def ask(self, now: float) -> bool:
        """Called with the lock held, which it lets go while it asks the store: a token
        for each key waiting for one, then a slot for each key waiting for one
        (slots.py). True when it asked (the scheduler may have a task to start now, or a
        time to wake at)."""
        core = self.core
        asked = self._ask_tokens(now)
        if asked and (core.stopping or core.forked()):
            return True
        return self.slots.ask(self.clock.monotonic() if asked else now) or asked

    def _ask_tokens(self, now: float) -> bool:
        core = self.core
        sched = core.sched
        keys = sched.wanting(now)
        if not keys:
            return False
        # Up to a token per worker thread: the calls this process starts next, so that the
        # next few need not ask (a worker waits while another asks).
        workers = self.pool.size
        asks: list[tuple[str, SharedTokens, int]] = []
        for key, count in keys:
            shared = sched.paces[key].shared
            assert shared is not None
            shared.asking = True
            asks.append((key, shared, min(count, workers)))
        answers = ask_unlocked(self, asks, self._take)
        now = self.clock.monotonic()
        taken = 0
        for (_, shared, _), (count, wait) in zip(asks, answers, strict=True):
            if count:
                shared.held += count
                taken += count
            else:
                shared.retry_at = now + wait
        core.wake(max(1, taken))  # idle workers start the calls; or ask again
        return True

    def _take(self, key: str, shared: SharedTokens, want: int) -> tuple[int, float]:
        try:
            return self.store.take_tokens(key, shared.rate, shared.burst, want)
        except Exception as exc:
            with Guarded():
                log.error(
                    "offload: could not take tokens of %s's rate budget from %s: %s",
                    key,
                    self.store.url,
                    exc,
                )
            return 0, ASK_AGAIN
