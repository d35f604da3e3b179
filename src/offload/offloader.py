"""Offloader: the front door. It checks its options, assembles the pipeline's stages over
a store, and hands each call to the stage that does the work:

    enqueue_task ─► backlog ─► scheduler ─► worker ─► attempt ─► settle
                  (memory/durable)                      │        ├─ delivered
                                                        │        ├─ retry ─► backlog
                                                        ▼        └─ dead letter ─► store
                                                   outcome.py

- `backlog/`: where tasks wait (the scheduler alone, or a durable store and this
  process's leased working set); `scheduler.py`: which task runs next (ready queue,
  gates, delay heap); `worker.py`: the threads; `attempt.py`: one call; `settle.py`:
  what its outcome means; `core.py`: the lock, conditions and ledger they share.
- `enqueue_task` never blocks: a full offloader raises QueueFull at once.
- `shutdown` flushes with one deadline, then the backlog decides what becomes of what is
  left (dead letters over the memory store, hand-backs over a durable one).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Any, cast

from . import lifecycle
from ._guard import guard
from ._threads import after_threads
from .attempt import perform
from .backlog import Backlog, DurableBacklog, MemoryBacklog
from .backlog.transaction import joined
from .calls.base import PERFORMED
from .calls.connections import Resources
from .clock import Clock, SystemClock
from .codec.trust import Trust
from .config import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    MAX_NICE,
    check_callback,
    check_environment,
    check_lease_timeout,
    check_number,
    shutdown_timeout_from_env,
)
from .core import Core
from .errors import OffloadError
from .health_check import HeadWatch
from .limits import Limit, check_limits
from .policy import RetryPolicy
from .records import DeadLetter, Task, not_performable, renew_ids_after_fork
from .settle import Callbacks, Settler
from .status import Health, KeyState, Stats
from .stores import DurableStore, Store, TransactionalStore, open_store
from .worker import WorkerPool

__all__ = ["Offloader"]

_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})  # shared by every call's task


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
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        lease_timeout: float | None = None,
        worker_nice: int = 0,
        limits: Mapping[str, Limit | str] | None = None,
        adaptive: bool = True,
        trusted: str | Sequence[str] | Trust = "any",
    ) -> None:
        if retry is None:
            retry = RetryPolicy()
        elif not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be an offload.RetryPolicy, got {retry!r}")
        check_number("max_queue", max_queue, minimum=1, integer=True)
        check_number("idle_timeout", idle_timeout, minimum=0)
        check_number("workers", workers, minimum=1, integer=True)
        check_number("max_dead_letters", max_dead_letters, minimum=0, integer=True)
        check_number("shutdown_timeout", shutdown_timeout, minimum=0)
        check_number("worker_nice", worker_nice, minimum=0, maximum=MAX_NICE, integer=True)
        if lease_timeout is not None:
            check_lease_timeout("lease_timeout", lease_timeout)
        if not isinstance(consume, bool):
            raise TypeError(f"consume must be True or False, got {consume!r}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False, got {adaptive!r}")
        checked_limits = check_limits(limits)
        trust = Trust.of(trusted)
        check_callback("on_success", on_success)
        check_callback("on_retry", on_retry)
        check_callback("on_dead_letter", on_dead_letter)
        if clock is not None and not all(
            callable(getattr(clock, name, None)) for name in ("monotonic", "time", "wait")
        ):
            raise TypeError(
                f"clock must be an offload.Clock (monotonic, time, wait), got {clock!r}"
            )
        shutdown_timeout_from_env()  # a bad variable is refused now, not in the exit hook
        check_environment()
        self._store = open_store(
            store, max_dead_letters=max_dead_letters, lease_timeout=lease_timeout, clock=clock
        )
        self._owns_store = isinstance(store, str)  # closed at shutdown; a given one is not
        if self._store.durable:
            # What a stored task may name: checked before its function is imported.
            cast("DurableStore", self._store).trust = trust
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
        #: Declared limits per key (keys as tasks' keys are made), and whether throttled
        #: keys learn an adaptive rate.
        self.limits: Mapping[str, Limit] = MappingProxyType(checked_limits)
        self.adaptive = adaptive
        #: Which functions a stored task may name ("any", "registered", module prefixes).
        self.trusted = trust
        self._clock: Clock = clock if clock is not None else SystemClock()
        renew_ids_after_fork()  # made in a child forked without the fork hooks (uWSGI)?
        self._assemble()
        lifecycle.register(self)
        if isinstance(self._backlog, DurableBacklog) and consume:
            self._backlog.resume()

    def _assemble(self) -> None:
        """The pipeline's runtime parts, fresh: at construction and in a forked child."""
        core = self._core = Core(self.limits, self.adaptive)
        clock = self._clock
        pool = self._pool = WorkerPool(
            core, clock, size=self.workers, idle_timeout=self.idle_timeout, nice=self.worker_nice
        )
        backlog = self._backlog = self._make_backlog(core, pool)
        callbacks = Callbacks(self.on_success, self.on_retry, self.on_dead_letter)
        settler = self._settler = Settler(core, backlog, self.retry, callbacks, clock)
        if isinstance(backlog, MemoryBacklog):
            backlog.bind(settler)

        def run_one(task: Task, resources: Resources) -> None:
            settler.settle(task, perform(task, resources, clock))

        pool.serve(backlog, run_one)
        self._add = backlog.add  # the enqueue path's one call into the backlog
        self._pid = core.pid
        self._head = HeadWatch()  # health(): how long the ready queue's head has waited

    def _make_backlog(self, core: Core, pool: WorkerPool) -> Backlog:
        """The backlog this offloader's store calls for (offload.testing makes another)."""
        store = self._store
        if store.durable:
            return DurableBacklog(
                core,
                pool,
                cast("DurableStore", store),
                self._clock,
                self.max_queue,
                consume=self.consume,
                trust=self.trusted,
            )
        return MemoryBacklog(core, pool, store, self._clock, self.max_queue)

    # -- the public API -------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The store this offloader keeps dead letters (and, if durable, tasks) in."""
        return self._store

    @property
    def running(self) -> bool:
        """True while a worker thread is alive."""
        return bool(self._pool.threads) and self._pid == os.getpid()

    def enqueue_task(self, call: Any, /, *args: Any, **kwargs: Any) -> Task:
        """Queue `call(*args, **kwargs)`, an HttpCall/AwsCall, or a Task; return the Task.

        Never blocks: raises QueueFull when `max_queue` tasks are held, ShutDown after
        shutdown(), TypeError for something that cannot be performed.
        """
        if callable(call):  # the common case first (a Task or an HttpCall is not callable)
            task = Task._fast(call, args, kwargs)
        elif type(call) is Task:
            if args or kwargs:
                raise TypeError("enqueue_task(Task(...)) takes no further arguments")
            task = call
            if task.enqueued:
                raise ValueError(f"{task!r} was enqueued already; make a new Task")
        elif isinstance(call, PERFORMED):
            if args or kwargs:
                raise TypeError(
                    "an HttpCall or AwsCall takes no extra arguments; put them in the call"
                )
            task = Task._fast(call, (), _NO_KWARGS)
        else:
            raise TypeError(
                "enqueue_task takes a callable, an offload.http(...)/offload.aws(...) call or an "
                f"offload.Task; got {not_performable(call)}"
            )
        if guard.active:
            raise OffloadError(
                "enqueue_task called from offload's own work on a worker thread (a log handler "
                "that enqueues?); refused, since every such call would log and enqueue again"
            )
        if self._pid != os.getpid():
            self._after_fork()  # a server that forks without running fork hooks (uWSGI)
        return self._add(task)

    def transaction(self, connection: Any) -> AbstractContextManager[Any]:
        """A block in which this thread's (or asyncio task's) enqueues write through the
        application's `connection`, inside the transaction it has open: each task then
        exists if and only if that transaction commits, and workers hear of it at the
        commit. `connection`: a psycopg 3 connection, Django's `django.db.connection`, or
        SQLAlchemy's `session.connection()`. Needs a store that can join a transaction
        (PostgreSQL), on the same database; TypeError or ValueError otherwise. Outside
        the block, enqueues use the store's own connection.

            with off.transaction(conn):
                conn.execute("INSERT INTO orders ...")
                off.enqueue_task(offload.http("POST", crm, json=order))
        """
        store = self._store
        if not isinstance(store, TransactionalStore):
            raise TypeError(
                f"transaction() needs a store that can join the application's transaction "
                f"(postgresql://...); this offloader's store is {store.url}"
            )
        return joined(store, connection)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued, delayed or running; False if `timeout` ran out."""
        if timeout is not None:
            check_number("timeout", timeout, minimum=0)
        if self._pid != os.getpid():
            return True  # a forked child's copy of a parent's offloader holds nothing
        if threading.current_thread() in self._pool.threads:
            # The calling task is itself in flight: waiting for "nothing running" would
            # wait for itself, forever (or until the timeout, always in vain).
            raise OffloadError("flush() called from one of this offloader's own tasks")
        self._pool.let_go()  # wake-ups held for requests (offload.web): waiting needs them
        return self._backlog.flush(timeout)

    def stats(self) -> Stats:
        """Counters and a snapshot; `enqueued == succeeded + dead_lettered + queued +
        delayed + in_flight` holds for the memory store."""
        self._after_fork()  # a child forked without the fork hooks: a fresh one
        store = self._store
        counts = self._backlog.counts()
        held = counts.dead_letters if counts is not None else len(store)
        return self._core.stats(counts, held, store.dropped, bool(self._pool.threads))

    def gates(self) -> dict[str, float]:
        """Throttled keys whose gates are closed, with the seconds until each reopens
        (0.0 once it is open and a probe call is deciding); a snapshot, for displays."""
        core = self._core
        with core.lock:
            now = self._clock.monotonic()
            snapshot = core.sched.snapshot()
        return {key: max(0.0, open_at - now) for key, open_at in snapshot.items()}

    def keys(self) -> dict[str, KeyState]:
        """Every key (API) the scheduler knows a state of now: gated, limited, waiting or
        running; a snapshot, for displays."""
        return self._core.key_states(self._clock.monotonic())

    def health(
        self, *, max_age: float | None = None, max_dead_letters: int | None = None
    ) -> Health:
        """Whether this offloader is well: its store answers, a worker runs while tasks are
        due, no threshold is crossed (`max_age`: seconds the oldest due task may wait;
        `max_dead_letters`; None: not checked). What is measured: health_check.py."""
        return self._head.health(self, max_age, max_dead_letters)

    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters the store holds, oldest first."""
        self._after_fork()
        return self._store.dead_letters()

    def replay(self, dead_letter_id: str) -> Task:
        """Remove a dead letter and enqueue its task again with a fresh attempt budget.

        The task keeps its id and idempotency key. Raises UnknownDeadLetter for an id the
        store does not hold; if the queue is full, the dead letter is put back. A durable
        store moves the task back into its queue itself, so that any process may perform it.
        """
        self._after_fork()  # (the parent's scheduler would hold it, and no worker of ours)
        return self._backlog.replay(dead_letter_id)

    def discard(self, dead_letter_id: str) -> None:
        """Remove a dead letter for good; raises UnknownDeadLetter for an unknown id."""
        self._store.discard(dead_letter_id)

    def start(self) -> None:
        """Start a worker thread now rather than at the first enqueue (the `offload worker`
        command, which performs what other processes put); more start as tasks come."""
        self._after_fork()
        core = self._core
        with core.lock:
            self._pool.ensure()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Take no new tasks, deliver what can be delivered within `timeout`, then stop.

        Returns True when everything was delivered or dead-lettered for its own reasons.
        What a memory store still holds at the deadline becomes dead letters with reason
        "shutdown" (one WARNING line with the count). A durable store keeps what is
        undelivered: the tasks held here are handed back to it, for any process to perform.
        Safe to call more than once; OffloadError from one of its own tasks, which it
        would wait for (as flush()).
        """
        if timeout is not None:
            check_number("timeout", timeout, minimum=0)
        self._after_fork()  # a child forked without the fork hooks: a fresh one
        if threading.current_thread() in self._pool.threads:
            raise OffloadError("shutdown() called from one of this offloader's own tasks")
        core = self._core
        sched = core.sched
        self._pool.let_go()
        with core.lock:
            core.closed = True
            deadline = None if timeout is None else self._clock.monotonic() + timeout
            if deadline is None:
                ok = core.drained.wait_for(sched.idle)
            else:
                # Stop waiting as soon as nothing more can happen before the deadline: a
                # task delayed for a minute will not be delivered in the next five seconds.
                ok = core.drained.wait_for(
                    lambda: sched.idle() or sched.nothing_due_before(deadline), timeout
                )
                ok = ok and sched.idle()
            core.stopping = True
            left = self._backlog.shutting_down()
            core.wake_all()
            threads = list(self._pool.threads)
        ok = self._backlog.close(left, ok, threads, deadline)
        if self._owns_store:  # once nothing of ours uses it: now, or when the last ends
            after_threads([*threads, *self._backlog.store_threads()], self._store.close)
        return ok

    def _finished(self) -> bool:
        """Shut down already, with nothing left (the exit hook skips it)."""
        return self._core.closed and self._core.sched.idle()

    def _let_go(self, seconds: float) -> None:
        """First thing at exit: give the wake-ups requests still hold (offload.web); if no
        worker could start for a memory store's tasks (Python 3.12+ starts no thread at
        exit), perform them on this thread, within `seconds`."""
        if self._pid != os.getpid():
            return
        pool = self._pool
        pool.let_go(at_exit=True)
        if not self._store.durable and not pool.threads and not self._core.closed:
            pool.run_here(self._clock.monotonic() + seconds)

    def _retire(self) -> None:
        """Take no new tasks, but let the workers finish what is held (configure())."""
        core = self._core
        with core.lock:
            core.closed = True

    def __repr__(self) -> str:
        return (
            f"Offloader(store={self._store.url!r}, workers={self.workers}, "
            f"max_queue={self.max_queue}, idle_timeout={self.idle_timeout:g}, "
            f"consume={self.consume}, retry={self.retry!r})"
        )

    # -- fork -----------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: start empty. The parent's tasks and threads stay the parent's.

        Once per child, at its first use where the server ran no fork hooks (uWSGI): the
        first enqueues of several request threads get here together, and a second start-
        over would abandon the tasks the first had taken (and a memory store's dead
        letters). A no-op in the process the offloader is in already."""
        if self._pid == os.getpid():
            return
        with lifecycle.fork_lock():
            if self._pid == os.getpid():
                return  # another thread of this child started over already
            renew_ids_after_fork()
            self._store.after_fork()  # before the pid is ours, as enqueues then go ahead
            self._assemble()
