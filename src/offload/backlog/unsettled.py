"""Settling a finished task in the store, when the store refuses the first time.

When a delivered task's `complete`, or a dead letter's `bury`, fails, the store still
holds the task, leased to this process. Left alone, the lease would lapse (the task then
runs again), and until then a flush() here would take the leased row for one that some
process is performing. So a second call follows at once. A failed bury hands the task
back, for any process: it runs again and becomes a dead letter then; it waits half a
second first, doubled at each refusal up to a lease timeout (`_backoff`), so that a store
that keeps refusing does not have the call made again and again. A failed complete is
made again: the call was delivered, and running it again would send it twice.

A task whose second call fails too waits here: flush() makes that call again each time it
looks at the store, and does not report success while one waits; shutdown() makes it once
more. A delivered task that waits stays among the leases this process renews, so that no
process (this one's own flush() included) takes it back and sends it again. A dead letter
the store did not keep is remembered until the task ends, so that shutdown() reports it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .._guard import Guarded
from ..records import DeadLetter, Task

if TYPE_CHECKING:
    from .durable import DurableBacklog

__all__ = ["Unsettled"]

log = logging.getLogger("offload")


class Unsettled:
    """A durable backlog's `complete` and `bury`, and the tasks whose second call failed
    (`waiting`: id -> (task, whether it was delivered), changed under the core's lock)."""

    def __init__(self, backlog: DurableBacklog) -> None:
        self.backlog = backlog
        self.waiting: dict[str, tuple[Task, bool]] = {}
        self.trying = 0  # second calls under way outside the lock (flush() waits for them)
        # Tasks whose dead letter the store refused, until they settle: id -> refusals.
        self.unkept: dict[str, int] = {}
        self.closed = False  # at_close ran: nothing retries a second call any more

    def holds(self, task: Task) -> bool:
        """Lock held: `task` was delivered and waits for its complete (keep renewing it),
        before `at_close`: a worker that outlived a shutdown's wait has its task let go."""
        waiting = self.waiting.get(task.id)
        return waiting is not None and waiting[1] and not self.closed

    def complete(self, task: Task) -> None:
        """A delivered task (still in flight: flush() cannot miss it meanwhile)."""
        backlog = self.backlog
        backlog.slots.release(task)  # the call ended: its shared slot, if it holds one
        try:
            backlog.store.complete(task)
        except Exception as exc:
            if not self._second_call(task, True, exc):
                with backlog.core.lock:
                    self.waiting[task.id] = (task, True)
                return
        self.unkept.pop(task.id, None)  # (a replayed or handed-back task, delivered now)

    def bury(self, task: Task, letter: DeadLetter) -> bool:
        """Keep `letter` in place of the task; False when the store refused it: then the
        task goes back as a retry does (no longer renewed, counted as handed back)."""
        backlog = self.backlog
        backlog.slots.release(task)  # the call ended: its shared slot, if it holds one
        try:
            backlog.store.bury(task, letter)
        except Exception as exc:
            error = exc
        else:
            self.unkept.pop(task.id, None)
            return True
        backlog.keeper.let_go([task])
        core = backlog.core
        with core.lock:  # counted first: this refusal sets the hand-back's wait
            self.unkept[task.id] = self.unkept.get(task.id, 0) + 1
        back = self._second_call(task, False, error)
        with core.lock:
            core.sched.settle(task, None)
            core.wake()
            core.ledger.released += 1
            if not back:
                self.waiting[task.id] = (task, False)
            core.notify_if_drained()
        return False

    def retry(self) -> bool:
        """Lock held (let go meanwhile): make the waiting tasks' second calls again; True
        when none waits any more."""
        if not self.waiting:
            return True
        core = self.backlog.core
        tasks, self.waiting = list(self.waiting.values()), {}
        self.trying += 1
        core.lock.release()
        failed: list[tuple[Task, bool]] = []
        done: list[Task] = []
        try:
            for task, delivered in tasks:
                if not self._call(task, delivered, quiet=True):
                    failed.append((task, delivered))
                elif delivered:
                    done.append(task)
        finally:
            core.lock.acquire()
            self.trying -= 1
            for task, delivered in failed:
                self.waiting.setdefault(task.id, (task, delivered))
            for task in done:  # deleted in the store: no lease left to renew
                self.unkept.pop(task.id, None)
                if not self.holds(task):
                    self.backlog.leased.pop(task.id, None)
            core.drained.notify_all()  # another flush() may wait for this one's calls
        return not self.waiting

    def at_close(self) -> bool:
        """Lock not held, the workers gone: the second calls once more; True when every
        task this process finished is settled in the store (every dead letter was kept).
        A delivered task still unsettled is let go here: its lease lapses (the store
        refused every delete), and the lease keeper may stop."""
        backlog = self.backlog
        with backlog.core.lock:
            settled = self.retry()
            self.closed = True
            for task, _ in self.waiting.values():
                backlog.leased.pop(task.id, None)
            backlog.keeper.wake()
            return settled and not self.unkept

    def settled_elsewhere(self) -> None:
        """Lock held: the store holds nothing ready, delayed or leased to this process (a
        flush() saw so): the tasks handed back for a dead letter have ended."""
        self.unkept.clear()

    def _backoff(self, task: Task) -> float:
        """How long a task handed back for a refused dead letter waits (see above)."""
        refusals = self.unkept.get(task.id, 1)
        return min(self.backlog.store.lease_timeout, 0.5 * 2.0 ** min(refusals - 1, 16))

    def _second_call(self, task: Task, delivered: bool, error: Exception) -> bool:
        what, then = (
            ("complete", "trying again") if delivered else ("dead-letter", "handing it back")
        )
        with Guarded():
            log.error(
                "offload: could not %s task %s in the store (%s); %s", what, task.id, error, then
            )
        return self._call(task, delivered, quiet=False)

    def _call(self, task: Task, delivered: bool, *, quiet: bool) -> bool:
        backlog = self.backlog
        try:
            if delivered:
                backlog.store.complete(task)
            elif task.id not in backlog.leased:  # (claimed here again once its lease lapsed)
                backlog.store.release(task, backlog.clock.time() + self._backoff(task))
        except Exception as exc:
            if quiet:
                log.debug("offload: task %s still unsettled in the store: %s", task.id, exc)
                return False
            with Guarded():
                log.error(
                    "offload: task %s is still leased to this process in the store (%s); "
                    "flush() and shutdown() try again, and its lease expires in the end",
                    task.id,
                    exc,
                )
            return False
        return True
