"""The worker threads: started on demand, fed by the backlog, gone when idle.

- The first enqueue starts a worker thread; a worker that has had nothing to do for
  `idle_timeout` seconds exits. Both happen under the core's one lock, and a worker
  removes itself from the pool before letting go of it: a producer either sees an idle
  worker to wake, or starts a new one. The lost wake-up of the hand-written version
  cannot happen, and a worker woken counts as busy from then (`Core.wake`), so a burst
  starts the workers it needs.
- A worker never sleeps through a backoff: with nothing it may take, it waits on its own
  Condition until the backlog's next due time (or a wake-up), never polls.

The pool knows threads and waiting, not what a task is: it takes the next task from the
backlog and hands it to `run` (an attempt, then settling it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING

from ._guard import Guarded
from ._threads import daemon_thread
from ._uwsgi import master_thread_hazard, threads_hint
from .calls.connections import Resources
from .clock import Clock
from .core import Core
from .errors import ShutDown
from .records import Task

if TYPE_CHECKING:
    from .backlog.base import Backlog

__all__ = ["STALL_WARNING", "WorkerPool"]

STALL_WARNING = 5.0
"""Seconds a started worker thread may not have run before an enqueue says so."""

log = logging.getLogger("offload")


def _be_nicer(steps: int) -> None:
    """Lower this thread's CPU priority by `steps` (Linux, where a thread has its own nice
    value), so that a busy machine runs the process's request threads first."""
    if not sys.platform.startswith("linux"):
        return
    try:
        thread = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, now + steps))
    except OSError as exc:  # a sandbox that forbids it: the worker runs as it is
        with Guarded():
            log.debug("offload: could not lower the worker thread's priority: %s", exc)


class WorkerPool:
    """Up to `size` worker threads of one offloader; every method but `join` is called
    with the core's lock held."""

    def __init__(
        self, core: Core, clock: Clock, *, size: int, idle_timeout: float, nice: int
    ) -> None:
        self.core = core
        self.clock = clock
        self.size = size
        self.idle_timeout = idle_timeout
        self.nice = nice
        self.threads: set[threading.Thread] = set()
        # A worker thread that was started but never ran: a server that does not run the
        # application's threads (uWSGI without enable-threads). Checked on enqueue, cheaply.
        self.ran = False
        self._started_at: float | None = None
        self._warned = False
        self._backlog: Backlog | None = None
        self._run_one: Callable[[Task, Resources], None] | None = None
        self.holds: set[WakeHold] = set()  # requests holding a wake-up of this pool (web.py)

    def serve(self, backlog: Backlog, run_one: Callable[[Task, Resources], None]) -> None:
        """Where the workers take tasks from, and what they do with each."""
        self._backlog = backlog
        self._run_one = run_one

    def ensure(self, want: int = 1) -> None:
        """Start workers until `want` (at most `size`) are alive; quietly none at exit."""
        want = min(want, self.size)
        core = self.core
        while len(self.threads) < want and not core.closed and not core.forked():
            try:
                self.start()
            except ShutDown:  # interpreter exit: a durable store keeps the tasks
                return

    def start(self) -> None:
        """Start one worker thread."""
        if sys.is_finalizing():
            raise ShutDown("the interpreter is shutting down; offload cannot start a worker")
        index = len(self.threads)
        name = "offload-worker" if self.size == 1 else f"offload-worker-{index}"
        thread = daemon_thread(self._run, name)
        try:
            thread.start()
        except RuntimeError as exc:  # 3.12+: "can't create new thread at interpreter shutdown"
            raise ShutDown(f"cannot start offload's worker thread: {exc}") from exc
        self.threads.add(thread)
        if self._started_at is None:  # this pool's first thread
            self._started_at = time.monotonic()
            hazard = master_thread_hazard()
            if hazard is not None:
                with Guarded():
                    log.warning("%s", hazard)

    def check_running(self) -> None:
        """Warn once when a worker thread started a while ago has still not run: the
        server does not run the application's threads, and calls would wait silently."""
        started = self._started_at
        if self.ran or started is None or self._warned:
            return
        waited = time.monotonic() - started
        if waited < STALL_WARNING:
            return
        self._warned = True
        hint = threads_hint() or "does this server run the application's threads?"
        with Guarded():
            log.warning(
                "offload: the worker thread started %.0fs ago has not run yet, so calls are "
                "waiting; %s",
                waited,
                hint,
            )

    def join(self, threads: list[threading.Thread], deadline: float | None) -> None:
        """Wait (lock not held) for `threads` to exit, until `deadline` (the clock's
        monotonic time)."""
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                left = None if deadline is None else max(0.0, deadline - self.clock.monotonic())
                thread.join(left)

    # -- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        self.ran = True
        if self.nice:
            _be_nicer(self.nice)
        run_one = self._run_one
        assert run_one is not None
        resources = Resources()
        wake = threading.Condition(self.core.lock)  # this worker's, while it is idle
        try:
            while True:
                task = self._next(wake)
                if task is None:
                    return
                run_one(task, resources)
        finally:
            resources.close()
            with self.core.lock:  # ended by an exception: leave, so that enqueues start another
                if threading.current_thread() in self.threads:
                    self._leave()

    def run_here(self, until: float) -> None:
        """Perform ready tasks on the calling thread until none is left or `until` (the
        clock's monotonic time) passes, waiting for a retry due before then. For the exit
        hook where no worker could start (Python 3.12+ refuses new threads at exit): a
        memory store's tasks would otherwise be lost. An attempt under way when `until`
        passes is finished first."""
        core, clock, backlog, run_one = self.core, self.clock, self._backlog, self._run_one
        assert backlog is not None
        assert run_one is not None
        resources = Resources()
        pause = threading.Condition(core.lock)
        try:
            while True:
                with core.lock:
                    now = clock.monotonic()
                    if self.threads or core.stopping or now >= until:
                        return  # a worker runs after all, or the time is up
                    task, wait, idle = backlog.take(now)
                    if task is None:
                        if idle or wait is None or now + wait >= until:
                            return
                        clock.wait(pause, wait)  # a retry's backoff
                        continue
                run_one(task, resources)
        finally:
            resources.close()

    def _next(self, wake: threading.Condition) -> Task | None:
        """Block until a task may run, or return None when this worker should exit."""
        core = self.core
        clock = self.clock
        backlog = self._backlog
        assert backlog is not None
        with core.lock:
            idle_since: float | None = None
            while True:
                if core.stopping or core.forked():
                    self._leave()
                    return None
                now = clock.monotonic()
                task, wait, idle = backlog.take(now)  # may let go of the lock meanwhile
                if task is not None:
                    # More may run now (come due, or released by a probe, together): each
                    # worker that takes one and leaves more passes the word on, so that the
                    # pool grows to them.
                    if core.sched.ready:
                        self.engage()
                    return task
                if core.stopping or core.forked():
                    continue
                timeout = wait
                if idle:
                    now = clock.monotonic()
                    if idle_since is None:
                        idle_since = now
                    left = self.idle_timeout - (now - idle_since)
                    if left <= 0:
                        self._leave()
                        return None
                    timeout = left if wait is None else min(left, wait)
                else:
                    idle_since = None
                if timeout is not None and timeout > threading.TIMEOUT_MAX:
                    timeout = threading.TIMEOUT_MAX  # a task due in the year 2400
                core.waiting[wake] = None
                try:
                    clock.wait(wake, timeout)
                finally:  # woken (and so already off the list), timed out, or interrupted
                    core.waiting.pop(wake, None)

    def engage(self, *, raise_unstarted: bool = False, holdable: bool = True) -> None:
        """Called with the lock held, for a task just made ready: wake an idle worker, or
        start one if the pool has room (else warn if its threads never ran).

        A thread may fail to start (at interpreter exit, or refused by the system):
        `raise_unstarted` lets that ShutDown out (a memory task nobody would perform must
        not be taken; a hold's release logs it); otherwise the task stays where it is, in
        a durable store for a later process, or for the workers still here.
        `holdable=False` (a hold being released) wakes even in a request that holds.
        """
        core = self.core
        if core.waiting:  # (read first: on the enqueue path, no call when none is idle)
            hold = HOLD.get() if holdable else None
            if hold is None or not hold.keep(self):
                core.wake()
        elif len(self.threads) < self.size and not core.stopping:
            hold = HOLD.get() if holdable else None
            if hold is not None and not sys.is_finalizing() and hold.keep(self):
                return
            if raise_unstarted:
                self.start()
            else:
                with contextlib.suppress(ShutDown):
                    self.start()
        elif not self.ran:
            self.check_running()

    def let_go(self, *, at_exit: bool = False) -> None:
        """Give the wake-ups every request holds for this pool (flush() and shutdown() wait
        for the workers, and a response a server never closed must not keep them). At
        exit, a worker that cannot start is not reported: the exit hook performs the
        tasks itself (run_here)."""
        with self.core.lock:
            holds, self.holds = self.holds, set()
        for hold in holds:
            hold.release(quiet=at_exit)

    def _leave(self) -> None:
        """Called with the lock held: this thread leaves the pool."""
        self.threads.discard(threading.current_thread())
        self.core.drained.notify_all()
        backlog = self._backlog
        if backlog is not None:
            backlog.worker_left()


class WakeHold:
    """Wake-ups held back while a web request is answered (offload.web), let go at once
    when its response has begun to go out.

    A worker woken in the middle of a response takes the GIL from the request's thread
    between two writes of the answer; held, the wake-up comes when the client has it. Only
    the wake-up waits: the task is queued (and written, in a durable store) as without the
    hold, and a worker already busy takes it as soon as it is free. Safe across threads
    that share the request's context (an async app's thread pool): a wake-up offered after
    the release happens at once, and so does one in a forked child, which inherits the
    context but not the request.
    """

    __slots__ = ("_lock", "_open", "_pid", "_pools")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = True
        self._pid = os.getpid()
        self._pools: list[WorkerPool] = []

    def keep(self, pool: WorkerPool) -> bool:
        """Called with `pool`'s lock held: hold its wake-up; False once released."""
        if self._pid != os.getpid():  # (checked before the lock, which fork may have held)
            return False
        with self._lock:
            if not self._open:
                return False
            if pool not in self._pools:
                self._pools.append(pool)
                pool.holds.add(self)
            return True

    @property
    def kept(self) -> bool:
        """Whether a wake-up is being held."""
        return bool(self._pools)

    def release(self, *, quiet: bool = False) -> None:
        """Give every held wake-up now; later ones are not held. Idempotent.

        One pool at a time: an interruption leaves the rest listed, for `let_go`. Each is
        engaged past any hold (a flush() in another request releasing this one must not
        have that request's hold keep the wake-up again)."""
        with self._lock:
            self._open = False
        while True:
            with self._lock:
                if not self._pools:
                    return
                pool = self._pools.pop()
            failed = None
            with pool.core.lock:
                pool.holds.discard(self)
                try:
                    pool.engage(raise_unstarted=True, holdable=False)
                except ShutDown as exc:  # no thread: the task stays, for the next engage
                    failed = exc
            if failed is not None and not quiet:  # (after the response: nobody else to tell)
                with Guarded():
                    log.warning(
                        "offload: could not start a worker after the response (%s); its "
                        "task waits for the next enqueue",
                        failed,
                    )


HOLD: ContextVar[WakeHold | None] = ContextVar("offload_wake_hold", default=None)
"""The hold of the request being answered in this context, if it is held (offload.web)."""
