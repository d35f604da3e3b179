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

Over a durable store (SQLite, SQS) the store holds every task and this process holds a
working set of leased tasks: an enqueue writes the task through before it returns (leased
to this process when it will perform it), workers claim due tasks from the store when the
scheduler has none, a retry is handed back to the store (any process may continue it), a
success or dead letter removes it. A lease keeper thread renews the leases of the tasks
held here every `lease_timeout / 3` seconds. An idle worker looks for tasks other
processes put every POLL_INTERVAL seconds.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, cast

from .calls import AwsCall, HttpCall, Resources, describe_target
from .clock import Clock, SystemClock
from .errors import OffloadError, QueueFull, ShutDown, StoreError
from .outcome import Outcome, classify_exception, classify_result
from .policy import Decision, RetryPolicy
from .records import DeadLetter, Stats, Task, new_id
from .scheduler import Gate, Scheduler
from .stores import DurableStore, Store, open_store

__all__ = ["Offloader"]

log = logging.getLogger("offload")


class _GuardFlag(threading.local):
    # A class default, so that reading it on a thread that never set it costs no failed
    # lookup (getattr with a default raises and catches AttributeError: 0.5 us an enqueue).
    active = False  # offload's own code is running on this worker thread


_guard = _GuardFlag()


class _Guarded:
    """Marks offload's own work on a worker thread (library calls, its own log lines).

    A user's log handler that enqueues from inside it would loop forever: every call the
    handler queues logs again (urllib3, botocore, our WARNING on a dead letter).
    """

    __slots__ = ("previous",)

    def __enter__(self) -> None:
        self.previous = _guard.active
        _guard.active = True

    def __exit__(self, *exc: object) -> None:
        _guard.active = self.previous


_PERFORMED = (HttpCall, AwsCall)

POLL_INTERVAL = 0.5
"""Seconds between an idle worker's looks at a durable store for tasks that other
processes put (a worker that has tasks, or knows when the next one is due, does not wait
for it). flush() looks every _FLUSH_POLL seconds."""
_FLUSH_POLL = 0.05


def _check_number(name: str, value: Any, *, minimum: float, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if not (minimum <= value < math.inf):
        raise ValueError(f"{name} must be {kind} >= {minimum:g} and finite, got {value!r}")


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
        with _Guarded():
            log.debug("offload: could not lower the worker thread's priority: %s", exc)


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
        lease_timeout: float | None = None,
        worker_nice: int = 0,
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
        _check_number("worker_nice", worker_nice, minimum=0, integer=True)
        if worker_nice > 19:
            raise ValueError(f"worker_nice must be an integer from 0 to 19, got {worker_nice!r}")
        if lease_timeout is not None:
            _check_number("lease_timeout", lease_timeout, minimum=0)
            if lease_timeout == 0:
                raise ValueError("lease_timeout must be a number > 0, got 0")
        if not isinstance(consume, bool):
            raise TypeError(f"consume must be True or False, got {consume!r}")
        _check_callback("on_success", on_success)
        _check_callback("on_retry", on_retry)
        _check_callback("on_dead_letter", on_dead_letter)
        if clock is not None and not all(
            callable(getattr(clock, name, None)) for name in ("monotonic", "time", "wait")
        ):
            raise TypeError(
                f"clock must be an offload.Clock (monotonic, time, wait), got {clock!r}"
            )
        self._store = open_store(
            store, max_dead_letters=max_dead_letters, lease_timeout=lease_timeout, clock=clock
        )
        self._owns_store = isinstance(store, str)  # closed at shutdown; a given one is not
        self._durable: DurableStore | None = (
            cast("DurableStore", self._store) if self._store.durable else None
        )
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
        #: How many steps nicer than the rest of the process its worker threads run (Linux).
        self.worker_nice = worker_nice
        self.on_success = on_success
        self.on_retry = on_retry
        self.on_dead_letter = on_dead_letter
        self._clock: Clock = clock if clock is not None else SystemClock()
        # Over a durable store, a consuming enqueue leases its task as it writes it (when
        # the store can, and this process has room), so that no other process takes it.
        self._lease_on_put = consume and bool(getattr(self._store, "leases_on_put", True))
        self._init_state()
        _live.add(self)
        if self._durable is not None and consume:
            self._resume()

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
        # Durable stores: the tasks leased to this process (ready, held or in flight), by id.
        self._leased: dict[str, Task] = {}
        self._claimed = self._released = 0
        self._claiming = False  # one worker at a time reads the store
        self._keeper: threading.Thread | None = None  # renews the leases of _leased
        self._keeper_wake = threading.Condition(self._lock)

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
        durable = self._durable
        if callable(call):  # the common case first (a Task or an HttpCall is not callable)
            task = Task._fast(call, args, kwargs, with_id=durable is not None)
        elif type(call) is Task:
            if args or kwargs:
                raise TypeError("enqueue_task(Task(...)) takes no further arguments")
            task = call
            if task._enqueued_at:
                raise ValueError(f"{task!r} was enqueued already; make a new Task")
        elif isinstance(call, _PERFORMED):
            task = Task(call, args, kwargs)
        else:
            raise TypeError(
                "enqueue_task takes a callable, an offload.http(...)/offload.aws(...) call or an "
                f"offload.Task; got {type(call).__name__}"
            )
        if _guard.active:
            raise OffloadError(
                "enqueue_task called from offload's own work on a worker thread (a log handler "
                "that enqueues?); refused, since every such call would log and enqueue again"
            )
        if self._pid != os.getpid():
            self._after_fork()  # a server that forks without running fork hooks (uWSGI)
        if durable is not None:
            self._put(durable, task)
        else:
            self._submit(task)
        return task

    def _put(self, durable: DurableStore, task: Task) -> None:
        """Write `task` to the durable store; if this process performs it, also queue it here.

        NotSerializable (or StoreError) leaves nothing stored and nothing counted. The
        store is the buffer, so this never raises QueueFull: beyond `max_queue` tasks held
        here, a task is stored without a lease, for whichever process has room.
        """
        sched = self._sched
        # Read without the lock (one less on the enqueue path): a shutdown that begins
        # meanwhile is seen below, and the room is a soft bound.
        if self._closed:
            raise ShutDown("this offloader was shut down; it takes no new tasks")
        lease: bool | None = self._lease_on_put and sched.size() < self.max_queue
        task._enqueued_at = self._clock.monotonic() or 1e-9
        try:
            durable.put(task, lease=bool(lease))  # on disk (or in the queue) before we return
        except BaseException:
            task._enqueued_at = 0.0
            raise
        with self._lock:
            self._enqueued += 1
            if not self.consume:
                return
            if lease:
                self._claimed += 1
                if self._stopping:  # shutdown() ran meanwhile: hand it back, below
                    self._released += 1
                    lease = None
                else:
                    self._leased[task.id] = task
                    sched.ready.append(task)
            if self._idle:
                self._work.notify()
            elif len(self._threads) < self.workers and not self._stopping:
                # On failure (interpreter exit) the task is stored: a later process does it.
                with contextlib.suppress(ShutDown):
                    self._start_worker()
        if lease is None:
            self._hand_back(durable, [task])

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
            if not task._enqueued_at:  # a plain callable's task is made enqueued (Task._fast)
                task._enqueued_at = self._clock.monotonic()
            sched.ready.append(task)
            self._enqueued += 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued, delayed or running; False if `timeout` ran out."""
        if timeout is not None:
            _check_number("timeout", timeout, minimum=0)
        if self._pid != os.getpid():
            return True  # a forked child's copy of a parent's offloader holds nothing
        if threading.current_thread() in self._threads:
            # The calling task is itself in flight: waiting for "nothing running" would
            # wait for itself, forever (or until the timeout, always in vain).
            raise OffloadError("flush() called from one of this offloader's own tasks")
        if self._durable is not None:
            return self._flush_durable(self._durable, timeout)
        with self._lock:
            return self._drained.wait_for(self._sched.idle, timeout)

    def _flush_durable(self, durable: DurableStore, timeout: float | None) -> bool:
        """Wait until this process holds nothing and the store has nothing ready or delayed
        (tasks leased to other processes are theirs to finish)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        def idle() -> bool:
            # A claim in progress has leased tasks not yet in the scheduler.
            return self._sched.idle() and not self._claiming

        with self._lock:
            while True:
                if not self._drained.wait_for(idle, remaining()):
                    return False
                self._lock.release()
                try:
                    counts = durable.counts()
                except StoreError as exc:
                    log.warning("offload: flush could not read the store: %s", exc)
                    counts = None
                finally:
                    self._lock.acquire()
                if counts is not None and not (counts.ready or counts.delayed):
                    if idle():
                        return True
                    continue
                if self.consume:
                    self._ensure_worker()  # a backlog that no worker here is performing yet
                left = remaining()
                if left is not None and left <= 0:
                    return False
                # Other processes change the store without telling us: look again soon.
                # A remote store (SQS) says how often it may be asked: each look is a request.
                poll = float(getattr(durable, "flush_poll", _FLUSH_POLL))
                self._drained.wait(poll if left is None else min(poll, left))

    def stats(self) -> Stats:
        """Counters and a snapshot; `enqueued == succeeded + dead_lettered + queued +
        delayed + in_flight` holds for the memory store."""
        store = self._store
        counts = self._durable.counts() if self._durable is not None else None
        held = counts.dead_letters if counts is not None else len(store)
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
                claimed=self._claimed,
                released=self._released,
                stored_ready=None if counts is None else counts.ready,
                stored_delayed=None if counts is None else counts.delayed,
                stored_leased=None if counts is None else counts.leased,
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
        store does not hold; if the queue is full, the dead letter is put back. A durable
        store moves the task back into its queue itself, so that any process may perform it.
        """
        if self._durable is not None:
            with self._lock:
                if self._closed:
                    raise ShutDown("this offloader was shut down; it takes no new tasks")
            task = self._durable.replay(dead_letter_id)
            with self._lock:
                self._enqueued += 1
                if self.consume:
                    if self._idle:
                        self._work.notify()
                    else:
                        self._ensure_worker()
            return task
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
        "shutdown" (one WARNING line with the count). A durable store keeps what is
        undelivered: the tasks held here are handed back to it, for any process to perform.
        Safe to call more than once.
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
            if self._durable is not None:
                self._released += len(left)  # handed back below, after the lock
            self._work.notify_all()
            self._keeper_wake.notify_all()
            threads = list(self._threads)
            keeper = self._keeper
        if self._durable is not None:
            return self._shutdown_durable(self._durable, ok, left, threads, keeper, deadline)
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

    def _shutdown_durable(
        self,
        durable: DurableStore,
        ok: bool,
        left: list[Task],
        threads: list[threading.Thread],
        keeper: threading.Thread | None,
        deadline: float | None,
    ) -> bool:
        """The end of shutdown() over a durable store: hand back, join, close."""
        clock = self._clock
        if left:
            self._hand_back(durable, left)
            with _Guarded():
                log.info(
                    "offload shut down: %d undelivered task(s) handed back to %s",
                    len(left),
                    durable.url,
                )
        with self._lock:
            running = self._sched.in_flight
        if running:
            with _Guarded():
                log.warning(
                    "offload shut down with %d call(s) still running; their tasks stay in %s "
                    "and run again if this process ends first",
                    running,
                    durable.url,
                )
        current = threading.current_thread()
        for thread in [*threads, *([keeper] if keeper is not None else [])]:
            if thread is not current:
                remaining = None if deadline is None else max(0.0, deadline - clock.monotonic())
                thread.join(remaining)
        if self._owns_store and not any(t.is_alive() for t in threads):
            self._store.close()
        return ok and not left and not running

    def _hand_back(self, durable: DurableStore, tasks: list[Task]) -> None:
        """Release tasks this process will not perform (lock not held; the caller counts
        them): due now, for any process. A task that cannot be released comes back when
        its lease expires."""
        wall = self._clock.time()
        for task in tasks:
            self._store_call("hand back", durable.release, task, wall)
        with self._lock:
            for task in tasks:
                self._leased.pop(task.id, None)
            self._notify_if_drained()

    def _store_call(self, what: str, fn: Callable[..., object], task: Task, *args: Any) -> bool:
        """Run a store operation for `task` from a worker; a failure is logged, not raised:
        the task's lease then expires and it runs again (at least once, never lost)."""
        try:
            fn(task, *args)
        except Exception as exc:
            with _Guarded():
                log.error(
                    "offload: could not %s task %s in the store (%s); it stays there and "
                    "runs again once its lease expires",
                    what,
                    task.id,
                    exc,
                )
            return False
        return True

    def _resume(self) -> None:
        """Start a worker if the durable store holds a backlog (a new process over a file
        that a crashed or stopped one left)."""
        assert self._durable is not None
        try:
            due = self._durable.next_due()
        except StoreError as exc:
            log.warning("offload: could not look for a backlog in %s: %s", self._store.url, exc)
            return
        if due is not None:
            with self._lock:
                self._ensure_worker()

    def _ensure_worker(self) -> None:
        """Called with the lock held: start a worker if none runs (durable stores)."""
        if not self._threads and not self._closed and self._pid == os.getpid():
            with contextlib.suppress(ShutDown):  # interpreter exit: the store keeps the tasks
                self._start_worker()

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
        if self._durable is not None and (self._keeper is None or not self._keeper.is_alive()):
            keeper = threading.Thread(target=self._keep_leases, name="offload-leases", daemon=True)
            try:
                keeper.start()
            except RuntimeError:
                return  # interpreter exit; leases then expire, and the tasks run elsewhere
            self._keeper = keeper

    def _keep_leases(self) -> None:
        """The lease keeper: renew every lease held here, in one store call, every
        `lease_timeout / 3` seconds, so that a long call keeps its task; exit once no
        worker runs and nothing is held."""
        durable = self._durable
        assert durable is not None
        interval = float(getattr(durable, "lease_timeout", 60.0)) / 3
        me = threading.current_thread()
        while True:
            with self._lock:
                if self._pid == os.getpid() and (self._threads or self._leased):
                    self._keeper_wake.wait(interval)
                if self._pid != os.getpid() or not (self._threads or self._leased):
                    if self._keeper is me:
                        self._keeper = None
                    return
                held = list(self._leased.values())
            try:
                durable.renew(held)
            except Exception as exc:
                with _Guarded():
                    log.error("offload: could not renew %d lease(s): %s", len(held), exc)

    def _run(self) -> None:
        if self.worker_nice:
            _be_nicer(self.worker_nice)
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
            timeout: float | None
            while True:
                if self._stopping or self._pid != os.getpid():
                    self._exit_worker()
                    return None
                now = clock.monotonic()
                task = sched.take(now)
                if task is not None:
                    return task
                if self._durable is not None:
                    claimed, store_wait = self._poll_store(self._durable, now)
                    if claimed:
                        idle_since = None
                        continue
                    if self._stopping or self._pid != os.getpid():
                        continue
                    now = clock.monotonic()
                    task = sched.take(now)  # enqueued while the store was being read
                    if task is not None:
                        return task
                    if store_wait is None and sched.size() == 0:
                        if idle_since is None:
                            idle_since = now
                        timeout = self.idle_timeout - (now - idle_since)
                        if timeout <= 0:
                            self._exit_worker()
                            return None
                        timeout = min(timeout, POLL_INTERVAL)
                    else:
                        idle_since = None
                        waits = [w for w in (store_wait, sched.next_wake(now)) if w is not None]
                        timeout = min([POLL_INTERVAL, *waits])
                elif sched.size() == 0:
                    if idle_since is None:
                        idle_since = now
                    timeout = self.idle_timeout - (now - idle_since)
                    if timeout is not None and timeout <= 0:
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
        self._keeper_wake.notify_all()

    def _poll_store(self, durable: DurableStore, now: float) -> tuple[bool, float | None]:
        """Called with the lock held, which it lets go while it reads the store: claim due
        tasks into the scheduler. Returns (claimed some, seconds until the store has a task
        due, or None when it holds none this worker could take)."""
        sched = self._sched
        if self._claiming:
            return False, POLL_INTERVAL  # another worker is reading; it notifies on success
        if self._closed:
            return False, None  # shutting down: take nothing new
        room = self.max_queue - sched.size()
        if room <= 0:
            return False, POLL_INTERVAL  # a settling task notifies
        clock = self._clock
        wall = clock.time()
        # Keys whose gates are closed here, with their reopening (epoch) times: their
        # tasks stay in the store for other processes, or for later.
        exclude = {
            key: wall + max(0.0, gate.open_at - now)
            for key, gate in sched.gates.items()
            if gate.probe is not None or now < gate.open_at
        }
        self._claiming = True
        self._lock.release()
        tasks: list[Task] = []
        due: float | None = None
        try:
            tasks = durable.claim(min(room, 2 * self.workers), exclude_keys=exclude)
            if not tasks:
                due = durable.next_due()
        except Exception as exc:
            with _Guarded():
                log.error("offload: could not read %s: %s", durable.url, exc)
            due = wall + POLL_INTERVAL
        finally:
            self._lock.acquire()
            self._claiming = False
            self._drained.notify_all()  # flush() waits for claims in progress
        if tasks:
            if self._stopping or self._closed or self._pid != os.getpid():
                self._lock.release()
                try:
                    self._hand_back(durable, tasks)
                finally:
                    self._lock.acquire()
                return False, None
            self._adopt(tasks)
            return True, 0.0
        if due is None:
            return False, None
        wait = due - clock.time()
        if wait <= 0:
            # Due, but not for us: its key is gated here, or another process took it.
            now = clock.monotonic()
            opening = [g.open_at - now for g in sched.gates.values() if g.open_at > now]
            wait = min(opening) if opening else POLL_INTERVAL
        return False, wait

    def _adopt(self, tasks: list[Task]) -> None:
        """Called with the lock held: queue claimed tasks here, leased to this process."""
        sched = self._sched
        now, wall = self._clock.monotonic(), self._clock.time()
        for task in tasks:
            first = task._first_attempt_at
            if first is not None:
                # The policy's time bounds run on the monotonic clock from the first
                # attempt, which may have been made by another process, or before a crash.
                task._started = now - max(0.0, wall - first)
            task._enqueued_at = now or 1e-9
            self._leased[task.id] = task
            sched.ready.append(task)
        self._claimed += len(tasks)
        self._work.notify(len(tasks))
        want = min(self.workers, len(sched.ready) + sched.in_flight)
        while len(self._threads) < want:
            try:
                self._start_worker()
            except ShutDown:
                break

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
                if inspect.iscoroutine(result):  # an `async def`: none of it ran
                    result.close()
                    raise TypeError(
                        f"{describe_target(call)} returned a coroutine: offload runs plain "
                        "functions (wrap an async one in a function that calls asyncio.run)"
                    )
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
        durable = self._durable
        if outcome.kind == "success":
            if self.on_success is not None:
                self._callback("on_success", self.on_success, task, result)
            if durable is not None:
                self._store_call("complete", durable.complete, task)
            with self._lock:
                self._sched.settle(task, None)
                if durable is not None:
                    self._leased.pop(task.id, None)
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
        if durable is not None and outcome.throttled and task.key is not None:
            # Close the key's gate now, not after the store has the task back (a network
            # round trip for SQS): meanwhile other workers must not call the throttled API.
            with self._lock:
                self._hold_key(task.key, now + decision.delay)
        if not self._stopping or durable is not None:
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
            if durable is not None:
                # Back to the store with its attempt state: any process continues it when due.
                self._store_call(
                    "hand back", durable.release, task, self._clock.time() + decision.delay
                )
                with self._lock:
                    self._sched.settle(task, due if outcome.throttled else None)
                    self._leased.pop(task.id, None)
                    self._retried += 1
                    self._released += 1
                    self._work.notify()
                    self._notify_if_drained()
                return
            with self._lock:
                if not self._stopping:
                    self._sched.settle(task, due if outcome.throttled else None)
                    self._sched.delay(task, due)
                    self._retried += 1
                    self._work.notify()
                    return
        # shutdown() has begun: a memory store cannot keep the retry for later.
        self._dead_letter(task, outcome, "shutdown", error=outcome.error, in_flight=True)

    def _hold_key(self, key: str, until: float) -> None:
        """Called with the lock held: close `key`'s gate until `until` (monotonic) ahead of
        the settle() that records the throttle, which keeps whichever is later."""
        gate = self._sched.gates.get(key)
        if gate is None:
            self._sched.gates[key] = Gate(until)
        else:
            gate.open_at = max(gate.open_at, until)

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
        if self._durable is None:
            self._store.bury(task, letter)
        elif not self._store_call("dead-letter", self._store.bury, task, letter):
            task._letter = None
            with self._lock:  # not buried: the store keeps the task, as a hand-back would
                if in_flight:
                    self._sched.settle(task, None)
                    self._work.notify()
                self._leased.pop(task.id, None)
                self._released += 1
                self._notify_if_drained()
            return
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
            self._leased.pop(task.id, None)
            self._dead_lettered += 1
            self._notify_if_drained()

    def _notify_if_drained(self) -> None:
        """Called with the lock held: wake flush() and shutdown() when they may be done.

        Both wait for (at least) nothing ready and nothing running: while a task is still
        queued or in flight, waking them would only have them check and wait again, once
        per task delivered, taking the GIL and the lock from the workers (10 % of an
        instant API's throughput).
        """
        sched = self._sched
        if sched.ready or sched.in_flight:
            return
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
    """Shut every live offloader down within one shared deadline (run at exit), and each
    within its own `shutdown_timeout`; without `timeout`, the deadline is the longest."""
    clock = SystemClock()
    offloaders = list(_live)
    if timeout is None:
        timeout = max((o.shutdown_timeout for o in offloaders), default=0.0)
    deadline = clock.monotonic() + timeout
    for offloader in offloaders:
        if offloader._closed and offloader._sched.idle():
            continue
        remaining = max(0.0, deadline - clock.monotonic())
        try:
            offloader.shutdown(min(remaining, offloader.shutdown_timeout))
        except Exception:
            log.exception("offload: error while shutting down %r at exit", offloader)


def _at_exit() -> None:
    from ._default import shutdown_timeout_from_env  # noqa: PLC0415 - read at exit, not import

    # OFFLOAD_SHUTDOWN_TIMEOUT, when set, bounds every offloader; otherwise each has its
    # own shutdown_timeout (configure(), Offloader(...); 5 s by default).
    set_in_env = os.environ.get("OFFLOAD_SHUTDOWN_TIMEOUT", "").strip()
    shutdown_all(shutdown_timeout_from_env() if set_in_env else None)


atexit.register(_at_exit)
