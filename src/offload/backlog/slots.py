"""Slots: a durable backlog's share of the concurrency caps its store keeps for every
process on it.

Over a store that keeps them (`stores.base.BudgetStore`: SQLite, PostgreSQL), a key's
declared `Limit(concurrency=N)` holds for every process on the store together: a call of
the key starts only with one of the key's N slots in the store, a row per call in flight.
A worker that finds keys waiting for one takes them in one store transaction with the
core's lock let go (as `Budgets.ask` takes tokens: the store never holds up an enqueue or
another key's calls); the call's slot goes back to the store when it settles (the lock
let go again), and until then the lease keeper renews it with the task leases. A release
that fails, or a process that dies, leaves the row to lapse a lease timeout after its
last renewal, and the other processes go on then.

A key told "none free" asks again when a call of its own here settles, when the earliest
slot lapses, or ASK_AGAIN seconds later, whichever comes first: the store tells nobody
when another process gives a slot back. Keys without a declared concurrency never ask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from .._guard import Guarded
from ..limits import SharedSlots
from .base import Take

if TYPE_CHECKING:
    from ..clock import Clock
    from ..core import Core
    from ..records import Task
    from ..stores.base import BudgetStore
    from ..worker import WorkerPool

__all__ = ["ASK_AGAIN", "Slots", "ask_unlocked"]

log = logging.getLogger("offload")

ASK_AGAIN = 1.0
"""Seconds at most before a key told "none free" (or whose store could not be read) asks
again: another process's call that settles says nothing to this one."""


class _Asking(Protocol):
    asking: bool


class _Asker(Protocol):
    core: Core
    asking: int


_S = TypeVar("_S", bound=_Asking)
_A = TypeVar("_A")


def ask_unlocked(
    owner: _Asker, asks: list[tuple[str, _S, int]], take: Callable[[str, _S, int], _A]
) -> list[_A]:
    """Called with the core's lock held, each of `asks` marked `asking`: `take(key,
    shared, want)` for each with the lock let go (a store's transaction never holds up an
    enqueue or another key's calls), the marks cleared once it is back. The answers, in
    order; `owner.asking` counts the askers meanwhile (each notifies when done)."""
    core = owner.core
    answers: list[_A] = []
    owner.asking += 1
    core.lock.release()
    try:
        for key, shared, want in asks:
            answers.append(take(key, shared, want))
    finally:
        core.lock.acquire()
        owner.asking -= 1
        for _, shared, _ in asks:
            shared.asking = False
    return answers


class Slots:
    """Takes shared concurrency slots for the keys the scheduler holds for one, and gives
    them back as their calls settle."""

    def __init__(
        self, core: Core, pool: WorkerPool, store: BudgetStore | None, clock: Clock
    ) -> None:
        self.core = core
        self.pool = pool
        self.store = cast("BudgetStore", store)  # (None: no keys, never asked)
        self.clock = clock
        self.asking = 0  # workers asking the store now (each notifies when done)
        #: The keys with a declared concurrency (none without a store that keeps slots):
        #: no other key's call looks further here.
        limits = core.sched.limits if store is not None else {}
        self.keys = {key for key, limit in limits.items() if limit.concurrency}
        self.held: dict[str, str] = {}  # every slot this process holds (id -> key): renewed
        self.calls: dict[str, str] = {}  # task id -> the slot its call in flight holds

    def wanting(self, now: float) -> list[tuple[str, SharedSlots, int]]:
        """Keys whose held calls may start at `now` but for a shared slot, that nobody
        here is asking the store for yet, with how many could start (one for a gated
        key's probe)."""
        sched = self.core.sched
        wanting = []
        for key in self.keys.intersection(sched.held):
            pace = sched.paces.get(key)
            count = 0 if pace is None else pace.wants_slots(now)
            if not count:
                continue
            assert pace is not None
            assert pace.slots is not None
            gate = sched.gates.get(key)
            if gate is None:
                wanting.append((key, pace.slots, min(count, len(sched.held[key]))))
            elif gate.probe is None and now >= gate.open_at:
                wanting.append((key, pace.slots, 1))
        return wanting

    def ask(self, now: float) -> bool:
        """Called with the lock held, which it lets go while it asks the store: slots for
        each key waiting for one. True when it asked."""
        if not self.keys:
            return False
        core = self.core
        asks = self.wanting(now)
        if not asks:
            return False
        workers = self.pool.size
        for _, slots, _ in asks:
            slots.asking = True
        answers = ask_unlocked(
            self, asks, lambda key, slots, want: self._take(key, slots.slots, min(want, workers))
        )
        now = self.clock.monotonic()
        taken = 0
        for (key, slots, _), (ids, wait) in zip(asks, answers, strict=True):
            if ids:
                slots.ids.extend(ids)
                self.held.update(dict.fromkeys(ids, key))
                taken += len(ids)
            else:
                slots.retry_at = now + min(wait, ASK_AGAIN)
        core.wake(max(1, taken))  # idle workers start the calls; or ask again
        return True

    def _take(self, key: str, slots: int, want: int) -> tuple[list[str], float]:
        try:
            return self.store.take_slots(key, slots, want)
        except Exception as exc:
            with Guarded():
                log.error(
                    "offload: could not take a concurrency slot of %s from %s: %s",
                    key,
                    self.store.url,
                    exc,
                )
            return [], ASK_AGAIN

    def started(self, task: Task) -> Take:
        """Lock held: `task`'s call starts (the scheduler handed it out) with the slot its
        pace took in hand, if its key has one; `task` for the worker to run."""
        key = task.key
        if key in self.keys:
            pace = self.core.sched.paces.get(key)
            slots = None if pace is None else pace.slots
            if slots is not None and slots.started is not None:
                self.calls[task.id] = slots.started
                slots.started = None
        return Take(task)

    def release(self, task: Task) -> None:
        """Lock not held: `task`'s call ended; its slot goes back to the store. One that
        cannot be given back lapses a lease timeout later (it is renewed no more)."""
        if task.key not in self.keys:
            return
        core = self.core
        with core.lock:
            slot = self.calls.pop(task.id, None)
            if slot is None:
                return
            self.held.pop(slot, None)  # renewed no more, whatever the store answers
        try:
            self.store.release_slots([slot])
        except Exception as exc:
            with Guarded():
                log.error(
                    "offload: could not give back a concurrency slot of %s to %s (it "
                    "lapses in %gs): %s",
                    task.key,
                    self.store.url,
                    self.store.lease_timeout,
                    exc,
                )
        with core.lock:
            pace = core.sched.paces.get(task.key)  # type: ignore[arg-type]
            if pace is not None and pace.slots is not None:
                pace.slots.retry_at = -math.inf  # ask again now: one is free, ours or not
            core.wake()

    def renew(self) -> None:
        """Lock not held (the lease keeper's thread): hold every slot here another lease
        timeout."""
        with self.core.lock:
            ids = list(self.held)
        if not ids:
            return
        try:
            self.store.renew_slots(ids)
        except Exception as exc:
            with Guarded():
                log.error("offload: could not renew %d concurrency slot(s): %s", len(ids), exc)

    def give_back(self) -> None:
        """Lock not held (shutdown): the slots taken that no call holds go back to the
        store; those of calls still running lapse if this process ends first."""
        if not self.keys:
            return
        with self.core.lock:
            spent = set(self.calls.values())
            ids = [slot for slot in self.held if slot not in spent]
            for slot in ids:
                del self.held[slot]
            for key in self.keys:
                pace = self.core.sched.paces.get(key)
                if pace is not None and pace.slots is not None:
                    pace.slots.ids.clear()
        if not ids:
            return
        try:
            self.store.release_slots(ids)
        except Exception as exc:
            with Guarded():
                log.warning(
                    "offload: could not give back %d concurrency slot(s): %s", len(ids), exc
                )
