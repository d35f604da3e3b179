"""Claims: a durable backlog's reads of its store for tasks due, one worker at a time."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .._guard import Guarded
from ..records import Task

if TYPE_CHECKING:
    from .durable import DurableBacklog

__all__ = ["Claims"]

log = logging.getLogger("offload")


class Claims:
    """Claims due tasks from the store into the scheduler, leased to this process; while
    one worker reads the store (`claiming`), the others wait for it to notify."""

    def __init__(self, backlog: DurableBacklog, interval: float) -> None:
        self.backlog = backlog
        self.interval = interval  # seconds between an idle worker's looks
        self.claiming = False

    def poll(self, now: float) -> tuple[bool, float | None]:
        """Called with the lock held, which it lets go while it reads the store: claim due
        tasks into the scheduler. Returns (claimed some, seconds until the store has a task
        due, or None when it holds none this worker could take)."""
        backlog = self.backlog
        core = backlog.core
        sched = core.sched
        if self.claiming:
            return False, self.interval  # another worker is reading; it notifies on success
        if core.closed:
            return False, None  # shutting down: take nothing new
        room = backlog.max_queue - sched.size()
        if room <= 0:
            return False, self.interval  # a settling task notifies
        clock = backlog.clock
        wall = clock.time()
        # Keys whose gates are closed here, with their reopening (epoch) times: their
        # tasks stay in the store for other processes, or for later.
        exclude = {key: wall + max(0.0, at - now) for key, at in sched.closed_until(now).items()}
        wakeups = backlog.wakeups
        wakeups.ensure()  # the first idle look asks the store to wake us from now on
        heard = wakeups.heard
        self.claiming = True
        core.lock.release()
        tasks: list[Task] = []
        due: float | None = None
        try:
            tasks = backlog.store.claim(min(room, 2 * backlog.pool.size), exclude_keys=exclude)
            if not tasks:
                due = backlog.store.next_due()
        except Exception as exc:
            with Guarded():
                log.error("offload: could not read %s: %s", backlog.store.url, exc)
            due = wall + self.interval
        finally:
            core.lock.acquire()
            self.claiming = False
            core.drained.notify_all()  # flush() waits for claims in progress
        if tasks:
            if core.stopping or core.closed or core.forked():
                core.lock.release()
                try:
                    backlog.hand_back(tasks)
                finally:
                    core.lock.acquire()
                return False, None
            self._adopt(tasks)
            return True, 0.0
        if wakeups.heard != heard:
            return False, 0.0  # woken while reading: what woke us may not have been seen
        if due is None:
            return False, None
        wait = due - clock.time()
        if wait <= 0:
            # Due, but not for us: its key is gated here, or another process took it.
            opening = sched.next_opening(clock.monotonic())
            wait = opening if opening is not None else self.interval
        return False, wait

    def _adopt(self, tasks: list[Task]) -> None:
        """Called with the lock held: queue claimed tasks here, leased to this process."""
        backlog = self.backlog
        core = backlog.core
        sched = core.sched
        now, wall = backlog.clock.monotonic(), backlog.clock.time()
        for task in tasks:
            progress = task.meta.progress
            if progress is not None and progress.first_attempt_at is not None:
                # The policy's time bounds run on the monotonic clock from the first
                # attempt, which may have been made by another process, or before a crash.
                progress.started = now - max(0.0, wall - progress.first_attempt_at)
            backlog.leased[task.id] = task
            sched.ready.append(task)
        core.ledger.claimed += len(tasks)
        core.wake(len(tasks))
        backlog.pool.ensure(len(sched.ready) + sched.in_flight)
        backlog.keeper.ensure()
