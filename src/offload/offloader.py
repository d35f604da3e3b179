"""Offloader: ties a store, the scheduler and the worker threads together.

Lifecycle, in one place:

- The first enqueue starts a worker thread; a worker that has had nothing to do for
  `idle_timeout` seconds exits. Both happen under the scheduler's one lock, so a task
  enqueued while a worker decides to exit is always seen by a worker (no lost wake-up).
- `enqueue_task` never blocks: a full offloader raises QueueFull at once.
- Workers never sleep through a backoff: a retry goes on the delay heap and the worker
  takes the next task; it waits on a Condition until the earliest due time.
- `shutdown` flushes with one deadline, then turns whatever a memory store still holds
  into dead letters (reason "shutdown"), logged once. Every live offloader is shut down
  at interpreter exit.
- After fork() the child gets a fresh, empty offloader state (new lock, no threads).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .calls import AwsCall, HttpCall, Resources, describe_target
from .clock import Clock, SystemClock
from .errors import OffloadError, QueueFull, ShutDown
from .outcome import Outcome, classify_exception, classify_result
from .policy import Decision, RetryPolicy
from .records import DeadLetter, Stats, Task, new_id
from .scheduler import Scheduler
from .stores import Store, open_store

__all__ = ["Offloader"]

log = logging.getLogger("offload")

_guard = threading.local()  # .active: offload's own code is running on this worker thread


class _Guarded:
    """Marks offload's own work on a worker thread (library calls, its own log lines).

    A user's log handler that enqueues from inside it would loop forever: every call the
    handler queues logs again (urllib3, botocore, our WARNING on a dead letter).
    """

    __slots__ = ("previous",)

    def __enter__(self) -> None:
        self.previous = getattr(_guard, "active", False)
        _guard.active = True

    def __exit__(self, *exc: object) -> None:
        _guard.active = self.previous


_PERFORMED = (HttpCall, AwsCall)


def _check_number(name: str, value: Any, *, minimum: float, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if not (minimum <= value < math.inf):
        raise ValueError(f"{name} must be {kind} >= {minimum:g} and finite, got {value!r}")


def _check_callback(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {value!r}")


class Offloader:
    """Performs calls in the background, retrying and dead-lettering as its policy says.

    Most applications use the module-level default (`offload.enqueue_task`); make an
    Offloader of your own for tests or several independent queues in one process.
    Options are validated here, each error naming the option.
    """

    def __init__(
        self,
        store: str | Store = "memory",
        retry: RetryPolicy | None = None,
        max_queue: int = 10_000,
        idle_timeout: float = 2.0,
        workers: int = 1,
        consume: bool = True,
        max_dead_letters: int = 1_000,
        on_success: Callable[[Task, Any], object] | None = None,
        on_retry: Callable[[Task, float, str | None], object] | None = None,
        on_dead_letter: Callable[[Task, DeadLetter], object] | None = None,
        *,
        clock: Clock | None = None,
        shutdown_timeout: float = 5.0,
    ) -> None:
        if retry is None:
            retry = RetryPolicy()
        elif not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be an offload.RetryPolicy, got {retry!r}")
        _check_number("max_queue", max_queue, minimum=1, integer=True)
        _check_number("idle_timeout", idle_timeout, minimum=0)
        _check_number("workers", workers, minimum=1, integer=True)
        _check_number("max_dead_letters", max_dead_letters, minimum=0, integer=True)
        _check_number("shutdown_timeout", shutdown_timeout, minimum=0)
        if not isinstance(consume, bool):
            raise TypeError(f"consume must be True or False, got {consume!r}")
        _check_callback("on_success", on_success)
        _check_callback("on_retry", on_retry)
        _check_callback("on_dead_letter", on_dead_letter)
        self._store = open_store(store, max_dead_letters=max_dead_letters)
        if not consume and not self._store.durable:
            raise ValueError(
                "consume=False needs a durable store (sqlite:// or sqs://): "
                "with the memory store nothing else could perform the calls"
            )
        self.retry = retry
        self.max_queue = max_queue
        self.idle_timeout = float(idle_timeout)
        self.workers = workers
        self.consume = consume
        self.max_dead_letters = max_dead_letters
        self.shutdown_timeout = float(shutdown_timeout)
        self.on_success = on_success
        self.on_retry = on_retry
        self.on_dead_letter = on_dead_letter
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._init_state()
        _live.add(self)

    def _init_state(self) -> None:
        """Fresh runtime state: used at construction and in a forked child."""
        self._pid = os.getpid()
        self._sched = Scheduler()
        self._lock = self._sched.lock
        self._work = threading.Condition(self._lock)  # workers wait here for tasks
        self._drained = threading.Condition(self._lock)  # flush() waits here
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # workers waiting on _work
        self._closed = False  # no new tasks (shutdown called)
        self._stopping = False  # workers exit after their current task
        self._enqueued = self._succeeded = self._retried = 0
        self._dead_lettered = self._rejected = 0

    # -- the public API -------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store this offloader keeps dead letters (and, if durable, tasks) in."""
        return self._store

    @property
    def running(self) -> bool:
        """True while a worker thread is alive."""
        return bool(self._threads) and self._pid == os.getpid()

    def enqueue_task(self, call: Any, /, *args: Any, **kwargs: Any) -> Task:
        """Queue `call(*args, **kwargs)`, an HttpCall/AwsCall, or a Task; return the Task.

        Never blocks: raises QueueFull when `max_queue` tasks are held, ShutDown after
        shutdown(), TypeError for something that cannot be performed.
        """
        if type(call) is Task:
            if args or kwargs:
                raise TypeError("enqueue_task(Task(...)) takes no further arguments")
            task = call
            if task._enqueued_at:
                raise ValueError(f"{task!r} was enqueued already; make a new Task")
        elif isinstance(call, _PERFORMED):
            task = Task(call, args, kwargs)
        elif callable(call):
            task = Task._fast(call, args, kwargs)
        else:
            raise TypeError(
                "enqueue_task takes a callable, an offload.http(...)/offload.aws(...) call or an "
                f"offload.Task; got {type(call).__name__}"
            )
        if getattr(_guard, "active", False):
            raise OffloadError(
                "enqueue_task called from offload's own work on a worker thread (a log handler "
                "that enqueues?); refused, since every such call would log and enqueue again"
            )
        if self._pid != os.getpid():
            self._after_fork()  # a server that forks without running fork hooks (uWSGI)
        self._submit(task)
        return task

    def _submit(self, task: Task) -> None:
        sched = self._sched
        with self._lock:
            if self._closed:
                raise ShutDown("this offloader was shut down; it takes no new tasks")
            if len(sched.ready) + sched.held_count + len(sched.delayed) >= self.max_queue:
                self._rejected += 1
                raise QueueFull(f"offload queue is full ({self.max_queue} tasks held)")
            if self._idle:
                self._work.notify()
            elif len(self._threads) < self.workers:
                self._start_worker()  # before the append: it may raise ShutDown
            task._enqueued_at = self._clock.monotonic()
            sched.ready.append(task)
            self._enqueued += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued, delayed or running; False if `timeout` ran out."""
        if timeout is not None:
            _check_number("timeout", timeout, minimum=0)
        if self._pid != os.getpid():
            return True  # a forked child's copy of a parent's offloader holds nothing
        with self._lock:
            return self._drained.wait_for(self._sched.idle, timeout)

    def stats(self) -> Stats:
        """Counters and a snapshot; `enqueued == succeeded + dead_lettered + queued +
        delayed + in_flight` holds for the memory store."""
        store = self._store
        held = len(store)
        with self._lock:
            sched = self._sched
            return Stats(
                enqueued=self._enqueued,
                succeeded=self._succeeded,
                retried=self._retried,
                dead_lettered=self._dead_lettered,
                rejected=self._rejected,
                queued=sched.queued,
                delayed=len(sched.delayed),
                in_flight=sched.in_flight,
                dead_letters=held,
                dead_letters_dropped=getattr(store, "dropped", 0),
                worker_running=bool(self._threads),
            )

    def gates(self) -> dict[str, float]:
        """Throttled keys whose gates are closed, with the seconds until each reopens
        (0.0 once it is open and a probe call is deciding); a snapshot, for displays."""
        with self._lock:
            now = self._clock.monotonic()
            snapshot = self._sched.snapshot()
        return {key: max(0.0, open_at - now) for key, open_at in snapshot.items()}

    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters the store holds, oldest first."""
        return self._store.dead_letters()

    def replay(self, dead_letter_id: str) -> Task:
        """Remove a dead letter and enqueue its task again with a fresh attempt budget.

        The task keeps its id and idempotency key. Raises UnknownDeadLetter for an id the
        store does not hold; if the queue is full, the dead letter is put back.
        """
        task = self._store.revive(dead_letter_id)
        letter = task._letter
        task._reset()
        try:
            self._submit(task)
        except (QueueFull, ShutDown):
            if letter is not None:
                task._letter = letter
                self._store.bury(task, letter)  # put the same dead letter back
            raise
        return task

    def discard(self, dead_letter_id: str) -> None:
        """Remove a dead letter for good; raises UnknownDeadLetter for an unknown id."""
        self._store.discard(dead_letter_id)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Take no new tasks, deliver what can be delivered within `timeout`, then stop.

        Returns True when everything was delivered or dead-lettered for its own reasons.
        What a memory store still holds at the deadline becomes dead letters with reason
        "shutdown" (one WARNING line with the count). Safe to call more than once.
        """
        if timeout is not None:
            _check_number("timeout", timeout, minimum=0)
        if self._pid != os.getpid():
            self._after_fork()
        clock = self._clock
        with self._lock:
            self._closed = True
            deadline = None if timeout is None else clock.monotonic() + timeout
            if deadline is None:
                ok = self._drained.wait_for(self._sched.idle)
            else:
                # Stop waiting as soon as nothing more can happen before the deadline: a
                # task delayed for a minute will not be delivered in the next five seconds.
                ok = self._drained.wait_for(
                    lambda: self._sched.idle() or self._sched.nothing_due_before(deadline),
                    timeout,
                )
                ok = ok and self._sched.idle()
            self._stopping = True
            left = self._sched.drain()
            self._work.notify_all()
            threads = list(self._threads)
        for task in left:
            self._dead_letter(task, None, "shutdown", error="undelivered at shutdown")
        lost = len(left)
        with self._lock:
            lost += self._sched.in_flight
        if lost:
            with _Guarded():
                log.warning(
                    "offload shut down with %d task(s) undelivered: %d dead-lettered (reason "
                    "'shutdown'), %d still running",
                    lost,
                    len(left),
                    lost - len(left),
                )
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                remaining = None if deadline is None else max(0.0, deadline - clock.monotonic())
                thread.join(remaining)
        return ok and not lost

    def _retire(self) -> None:
        """Take no new tasks, but let the workers finish what is held (configure())."""
        with self._lock:
            self._closed = True

    def __repr__(self) -> str:
        return (
            f"Offloader(store={self._store.url!r}, workers={self.workers}, "
            f"max_queue={self.max_queue}, idle_timeout={self.idle_timeout:g}, "
            f"consume={self.consume}, retry={self.retry!r})"
        )

    # -- workers --------------------------------------------------------------------------

    def _start_worker(self) -> None:
        """Start one worker thread; called with the lock held."""
        if sys.is_finalizing():
            raise ShutDown("the interpreter is shutting down; offload cannot start a worker")
        index = len(self._threads)
        name = "offload-worker" if self.workers == 1 else f"offload-worker-{index}"
        thread = threading.Thread(target=self._run, name=name, daemon=True)
        try:
            thread.start()
        except (
            RuntimeError
        ) as exc:  # Python 3.12+: "can't create new thread at interpreter shutdown"
            raise ShutDown(f"cannot start offload's worker thread: {exc}") from exc
        self._threads.add(thread)

    def _run(self) -> None:
        resources = Resources()
        try:
            while True:
                task = self._next_task()
                if task is None:
                    return
                self._perform(task, resources)
        finally:
            resources.close()

    def _next_task(self) -> Task | None:
        """Block until a task may run, or return None when this worker should exit."""
        clock = self._clock
        sched = self._sched
        with self._lock:
            idle_since: float | None = None
            while True:
                if self._stopping or self._pid != os.getpid():
                    self._exit_worker()
                    return None
                now = clock.monotonic()
                task = sched.take(now)
                if task is not None:
                    return task
                if sched.size() == 0:
                    if idle_since is None:
                        idle_since = now
                    timeout: float | None = self.idle_timeout - (now - idle_since)
                    if timeout is not None and timeout <= 0:  # (None only for mypy's sake)
                        self._exit_worker()
                        return None
                else:
                    idle_since = None
                    timeout = sched.next_wake(now)
                self._idle += 1
                try:
                    clock.wait(self._work, timeout)
                finally:
                    self._idle -= 1

    def _exit_worker(self) -> None:
        """Called with the lock held: this thread leaves the worker set."""
        self._threads.discard(threading.current_thread())
        self._drained.notify_all()

    def _perform(self, task: Task, resources: Resources) -> None:
        clock = self._clock
        now, wall = clock.monotonic(), clock.time()
        if task._started is None:
            task._started = now
            task._first_attempt_at = wall
        task._attempts += 1
        task._last_attempt_at = wall
        exc: BaseException | None = None
        call = task.call
        try:
            if isinstance(call, _PERFORMED):
                with _Guarded():
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "attempt %d: %s (task %s)", task._attempts, call.describe(), task.id
                        )
                    result = call.perform(resources, task.idempotency_key)
            else:
                if log.isEnabledFor(logging.DEBUG):
                    with _Guarded():
                        log.debug(
                            "attempt %d: %s (task %s)",
                            task._attempts,
                            describe_target(call),
                            task.id,
                        )
                result = call(*task.args, **task.kwargs)
            outcome = classify_result(result, now=wall)
        except BaseException as error:
            exc = error
            result = None
            try:
                outcome = classify_exception(error, now=wall)
            except BaseException:
                outcome = Outcome("permanent", error=type(error).__name__)
        self._settle(task, outcome, exc, result)

    def _settle(self, task: Task, outcome: Outcome, exc: BaseException | None, result: Any) -> None:
        """Record an attempt's outcome. Callbacks run before the task stops counting as in
        flight, so that flush() returning means the callbacks have run too."""
        task._last = outcome
        if outcome.kind == "success":
            if self.on_success is not None:
                self._callback("on_success", self.on_success, task, result)
            with self._lock:
                self._sched.settle(task, None)
                self._succeeded += 1
                self._work.notify()  # held tasks may have been released
                self._notify_if_drained()
            return

        now = self._clock.monotonic()
        policy = task.retry or self.retry
        try:
            decision = policy.decide(task, outcome, exc, now)
        except Exception as error:  # a user's stop/wait strategy must not kill the worker
            with _Guarded():
                log.exception("offload: the retry policy raised for task %s", task.id)
            decision = Decision(False, reason="permanent", error=f"retry policy raised {error!r}")
        if not decision.retry:
            self._dead_letter(task, outcome, decision.reason, error=decision.error, in_flight=True)
            return
        if not self._stopping:
            with _Guarded():
                log.info(
                    "retrying %s in %.2fs (attempt %d%s): %s",
                    describe_target(task.call),
                    decision.delay,
                    task._attempts,
                    ", throttled" if outcome.throttled else "",
                    outcome.error,
                )
            if self.on_retry is not None:
                self._callback("on_retry", self.on_retry, task, decision.delay, outcome.error)
            due = now + decision.delay
            with self._lock:
                if not self._stopping:
                    self._sched.settle(task, due if outcome.throttled else None)
                    self._sched.delay(task, due)
                    self._retried += 1
                    self._work.notify()
                    return
        # shutdown() has begun: a memory store cannot keep the retry for later.
        self._dead_letter(task, outcome, "shutdown", error=outcome.error, in_flight=True)

    def _dead_letter_for(
        self, task: Task, error: str | None, outcome: Outcome | None, reason: str
    ) -> DeadLetter:
        def utc(ts: float | None) -> datetime | None:
            return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)

        return DeadLetter(
            id=new_id(),
            task_id=task.id,
            description=describe_target(task.call),
            key=task.key,
            attempts=task._attempts,
            error=error or (outcome.error if outcome else None) or reason,
            status=outcome.status if outcome else None,
            reason=reason,
            first_attempt_at=utc(task._first_attempt_at),
            last_attempt_at=utc(task._last_attempt_at),
        )

    def _dead_letter(
        self,
        task: Task,
        outcome: Outcome | None,
        reason: str,
        *,
        error: str | None = None,
        in_flight: bool = False,
    ) -> None:
        """Bury the task in the store, then count it (with its attempt, if `in_flight`)
        in one step, so that the ledger holds for every reader of stats()."""
        if outcome is None:
            outcome = task._last
        letter = task._letter = self._dead_letter_for(task, error, outcome, reason)
        self._store.bury(task, letter)
        if reason != "shutdown":  # shutdown() logs one line for all of them
            with _Guarded():
                log.warning(
                    "dead letter %s: %s after %d attempt(s) (%s): %s",
                    letter.id,
                    letter.description,
                    letter.attempts,
                    reason,
                    letter.error,
                )
        if self.on_dead_letter is not None:
            self._callback("on_dead_letter", self.on_dead_letter, task, letter)
        with self._lock:
            if in_flight:
                self._sched.settle(task, None)
                self._work.notify()
            self._dead_lettered += 1
            self._notify_if_drained()

    def _notify_if_drained(self) -> None:
        """Called with the lock held: wake flush() and shutdown() when something changed."""
        self._drained.notify_all()

    @staticmethod
    def _callback(name: str, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException:
            with _Guarded():
                log.exception("offload: %s callback raised; ignored", name)

    # -- fork -----------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: start empty. The parent's tasks and threads stay the parent's."""
        self._init_state()
        after_fork = getattr(self._store, "_after_fork", None)
        if after_fork is not None:
            after_fork()


_live: weakref.WeakSet[Offloader] = weakref.WeakSet()


def _reset_all_after_fork() -> None:
    for offloader in list(_live):
        offloader._after_fork()


os.register_at_fork(after_in_child=_reset_all_after_fork)


def shutdown_all(timeout: float | None = None) -> None:
    """Shut every live offloader down within one shared deadline (run at exit)."""
    clock = SystemClock()
    deadline = None if timeout is None else clock.monotonic() + timeout
    for offloader in list(_live):
        if offloader._closed and offloader._sched.idle():
            continue
        remaining = None if deadline is None else max(0.0, deadline - clock.monotonic())
        try:
            offloader.shutdown(remaining)
        except Exception:
            log.exception("offload: error while shutting down %r at exit", offloader)


def _at_exit() -> None:
    from ._default import shutdown_timeout_from_env  # noqa: PLC0415 - read at exit, not import

    shutdown_all(shutdown_timeout_from_env())


atexit.register(_at_exit)
