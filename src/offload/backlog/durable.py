"""The durable backlog: the store holds every task; this process holds what it leased.

An enqueue writes the task through before it returns (leased to this process when it
will perform it and has room); workers claim due tasks from the store when the scheduler
has none; a retry goes back to the store with its attempt state, for any process to
continue; a success or a dead letter removes it. A lease keeper thread renews the leases
held here every `lease_timeout / 3` seconds. An idle worker looks for tasks that other
processes put every POLL_INTERVAL seconds (a worker that has tasks, or knows when the next
one is due, does not wait for that), unless the store can tell it (`DurableStore.watch`:
PostgreSQL's LISTEN/NOTIFY; see wakeups.py). Over a store that keeps rate budgets, a
worker takes a limited key's tokens from the budget every process shares (budgets.py),
and a slot of its declared concurrency, which its call gives back as it settles
(slots.py).

Inside `Offloader.transaction(connection)` an enqueue writes through the application's
connection instead (see transaction.py): the task is not leased here, nor queued here,
since it does not exist until that transaction commits; the commit's NOTIFY wakes the
workers, this process's among them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .._guard import Guarded
from ..clock import Clock
from ..codec.trust import TRUST_ANY, Trust
from ..core import Core
from ..errors import ShutDown, StoreError
from ..records import DeadLetter, Task
from ..stores.base import BudgetStore, DurableStore, StoreCounts, TransactionalStore
from ..worker import WorkerPool
from .base import Take
from .budgets import Budgets
from .claims import Claims
from .leases import LeaseKeeper
from .memory import DedupIndex
from .slots import Slots
from .transaction import joined_connection, put_joined
from .unsettled import Unsettled
from .wakeups import POLL_INTERVAL, Wakeups

__all__ = ["POLL_INTERVAL", "DurableBacklog"]

log = logging.getLogger("offload")


class DurableBacklog:
    """A DurableStore and this process's leased working set (`leased`, in the scheduler)."""

    def __init__(
        self,
        core: Core,
        pool: WorkerPool,
        store: DurableStore,
        clock: Clock,
        max_queue: int,
        *,
        consume: bool,
        trust: Trust = TRUST_ANY,
    ) -> None:
        self.core = core
        self.pool = pool
        self.store = store
        self.clock = clock
        self.max_queue = max_queue
        self.consume = consume
        self.trust = trust
        # A consuming enqueue leases its task as it writes it (when the store can, and this
        # process has room), so that no other process takes it.
        self.lease_on_put = consume and store.leases_on_put
        self.leased: dict[str, Task] = {}  # by id: ready, held or in flight here
        self.dedup = DedupIndex()  # this process's, for a store that does not dedup
        self.claims = Claims(self, POLL_INTERVAL)
        self.keeper = LeaseKeeper(core, pool, store, self.leased)
        # Declared rates and concurrencies shared by every process: a store that keeps them.
        shared = store if isinstance(store, BudgetStore) else None
        self.slots = self.keeper.slots = Slots(core, pool, shared, clock)  # (none: no keys)
        self.budgets = None if shared is None else Budgets(core, pool, shared, clock, self.slots)
        core.sched.shared_rates = shared is not None
        # Settling finished tasks, and those the store refused to settle (unsettled.py).
        self.unsettled = Unsettled(self)
        self.wakeups = Wakeups(core, pool, store, consume=consume)
        # Enqueues inside the application's transaction: only a store that can join one.
        self._joins = isinstance(store, TransactionalStore)

    # -- enqueue --------------------------------------------------------------------------

    def add(self, task: Task) -> Task:
        """Write `task` to the store; if this process performs it, also queue it here.

        NotSerializable (or StoreError) leaves nothing stored and nothing counted. The
        store is the buffer, so this never raises QueueFull: beyond `max_queue` tasks held
        here, a task is stored without a lease, for whichever process has room.
        """
        core = self.core
        # Read without the lock (one less on the enqueue path): a shutdown that begins
        # meanwhile is seen below, and the room is a soft bound.
        if core.closed:
            raise ShutDown("this offloader was shut down; it takes no new tasks")
        if self.trust.mode != "any" and callable(task.call):  # refused now, not as a dead letter
            self.trust.check(task.call)
        meta = task._own_meta()  # the id, which the store writes (the task is ours alone)
        key = meta.dedup_key
        if key is not None and not self.store.dedups:
            with core.lock:
                holder = self.dedup.holder(key, self.clock.monotonic())
                if holder is not None:
                    core.ledger.deduplicated += 1
                    return holder
        due = task.due(self.clock.time()) if meta.delay or meta.at is not None else None
        if self._joins:
            connection = joined_connection(self.store)
            if connection is not None:
                return put_joined(self, task, connection, due)
        # A delayed task waits in the store, for whichever process is there when it is due.
        lease = self.lease_on_put and due is None and core.sched.size() < self.max_queue
        meta.enqueued = True
        try:
            kept = self.store.put(task, lease=lease, due=due)  # stored before we return
        except BaseException:
            meta.enqueued = False
            raise
        if kept is not task:  # the store found the key held, by any process
            meta.enqueued = False
            with core.lock:
                core.ledger.deduplicated += 1
            return kept
        hand_back = False
        with core.lock:
            core.ledger.enqueued += 1
            if key is not None and not self.store.dedups:
                self.dedup.take(key, task)
                if not lease:  # another process may perform it: its window runs from now
                    self.dedup.release(task, self.clock.monotonic())
            if not self.consume:
                return task
            if lease:
                core.ledger.claimed += 1
                if core.stopping:  # shutdown() ran meanwhile: hand it back, below
                    core.ledger.released += 1
                    hand_back = True
                else:
                    self.leased[task.id] = task
                    core.sched.ready.append(task)
                    self.keeper.ensure()
            else:  # for a claim: one under way may have read the store before this put
                self.wakeups.heard += 1
            self.pool.engage()  # at interpreter exit the task is stored, for a later process
        if hand_back:
            self.hand_back([task])
        return task

    def resume(self) -> None:
        """Start a worker if the store holds a backlog (a new process over a file that a
        crashed or stopped one left)."""
        try:
            due = self.store.next_due()
        except StoreError as exc:
            log.warning("offload: could not look for a backlog in %s: %s", self.store.url, exc)
            return
        if due is not None:
            with self.core.lock:
                self.pool.ensure()

    # -- taking ---------------------------------------------------------------------------

    def take(self, now: float) -> Take:
        core = self.core
        sched = core.sched
        task = sched.take(now)
        if task is not None:
            return self.slots.started(task)
        budgets = self.budgets
        if budgets is not None:  # shared tokens and slots for limited keys
            if budgets.ask(now):
                if core.stopping or core.forked():
                    return Take(None, 0.0)
                now = self.clock.monotonic()
                task = sched.take(now)
                if task is not None:
                    return self.slots.started(task)
            elif budgets.asking or self.slots.asking:
                # Another worker is taking a token (or slot), and notifies when it has:
                # reading the store meanwhile (a claim per token) would cost more.
                return Take(None, self.wakeups.look())
        claimed, store_wait = self.claims.poll(now)
        if core.stopping or core.forked():
            return Take(None, 0.0)
        now = self.clock.monotonic()
        task = sched.take(now)  # enqueued here while the store was being read
        if task is not None:
            return self.slots.started(task)
        if claimed:
            return Take(None, 0.0)  # another worker took them meanwhile: look again
        look = self.wakeups.look()
        if store_wait is None and sched.size() == 0:
            return Take(None, look, idle=True)
        waits = [w for w in (store_wait, sched.next_wake(now)) if w is not None]
        return Take(None, min([look, *waits]))

    # -- settling -------------------------------------------------------------------------

    def can_retry(self) -> bool:
        return True  # the store keeps a retry, whatever this process does next

    def requeue(self, task: Task, now: float, delay: float, throttled: bool) -> bool:
        """Back to the store with its attempt state: any process continues it when due."""
        core = self.core
        due = now + delay
        self.slots.release(task)  # the call ended: its shared slot, if it holds one
        if throttled and task.key is not None:
            with core.lock:  # before the store has it back: other workers must wait now
                core.sched.close_gate(task.key, due)
        self.keeper.let_go([task])  # no longer renewed once the store has it back
        self._store_call("hand back", self.store.release, task, self.clock.time() + delay)
        with core.lock:
            core.sched.settle(task, due if throttled else None, now=now)
            core.ledger.retried += 1
            core.ledger.released += 1
            core.wake()
            core.notify_if_drained()
        return True

    def complete(self, task: Task) -> None:
        self.unsettled.complete(task)  # (its shared slot first, if its call holds one)

    def bury(self, task: Task, letter: DeadLetter) -> bool:
        return self.unsettled.bury(task, letter)  # (as complete)

    def forget(self, task: Task) -> None:
        if not self.unsettled.holds(task):  # (delivered, its complete refused: renew it)
            self.leased.pop(task.id, None)
        if task.dedup_key is not None and not self.store.dedups:
            self.dedup.release(task, self.clock.monotonic())

    def worker_left(self) -> None:
        self.keeper.wake()

    def _store_call(self, what: str, fn: Callable[..., object], task: Task, *args: Any) -> bool:
        """Run a store operation for `task` from a worker; a failure is logged, not raised:
        the task's lease then expires and it runs again (at least once, never lost)."""
        try:
            fn(task, *args)
        except Exception as exc:
            with Guarded():
                log.error(
                    "offload: could not %s task %s in the store (%s); it stays there and "
                    "runs again once its lease expires",
                    what,
                    task.id,
                    exc,
                )
            return False
        return True

    def hand_back(self, tasks: list[Task]) -> None:
        """Release tasks this process will not perform (lock not held; the caller counts
        them): due now, for any process. A task that cannot be released comes back when
        its lease expires."""
        self.keeper.let_go(tasks)  # not renewed once the store has them back
        wall = self.clock.time()
        for task in tasks:
            self._store_call("hand back", self.store.release, task, wall)
        core = self.core
        with core.lock:
            core.notify_if_drained()

    # -- flush and shutdown ---------------------------------------------------------------

    def flush(self, timeout: float | None) -> bool:
        """Wait until this process holds nothing (nor a task the store could not settle)
        and the store has nothing ready or delayed: tasks leased to other live processes
        are theirs to finish; a lease that lapsed counts as ready (see count_tasks)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        core = self.core

        def idle() -> bool:
            # A claim in progress has leased tasks not yet in the scheduler; a store call
            # being made again for an unsettled task may yet hand it back.
            return core.sched.idle() and not self.claims.claiming and not self.unsettled.trying

        with core.lock:
            while True:
                if not core.drained.wait_for(idle, remaining()):
                    return False
                # A task the store could not settle is still leased to this process there.
                settled = self.unsettled.retry()  # lets go of the lock meanwhile
                core.lock.release()
                try:
                    counts = self.store.counts()
                except StoreError as exc:
                    log.warning("offload: flush could not read the store: %s", exc)
                    counts = None
                finally:
                    core.lock.acquire()
                if settled and counts is not None and not (counts.ready or counts.delayed):
                    if idle():
                        self.unsettled.settled_elsewhere()
                        return True
                    continue
                if self.consume and not self.pool.threads:
                    self.pool.ensure()  # a backlog that no worker here is performing yet
                left = remaining()
                if left is not None and left <= 0:
                    return False
                # Other processes change the store without telling us: look again soon.
                # A remote store (SQS) says how often it may be asked: each look is a request.
                poll = self.store.flush_poll
                core.drained.wait(poll if left is None else min(poll, left))

    def shutting_down(self) -> list[Task]:
        left = self.core.sched.drain()
        self.core.ledger.released += len(left)  # handed back in close()
        self.keeper.wake()
        return left

    def store_threads(self) -> list[threading.Thread]:
        keeper = self.keeper.thread
        return [] if keeper is None else [keeper]

    def close(
        self,
        left: list[Task],
        ok: bool,
        threads: list[threading.Thread],
        deadline: float | None,
    ) -> bool:
        """The end of shutdown: hand back, join, close."""
        store = self.store
        self.wakeups.stop()
        if left:
            self.hand_back(left)
            with Guarded():
                log.info(
                    "offload shut down: %d undelivered task(s) handed back to %s",
                    len(left),
                    store.url,
                )
        core = self.core
        with core.lock:
            running = core.sched.in_flight
            keeper = self.keeper.thread
        if running:
            with Guarded():
                log.warning(
                    "offload shut down with %d call(s) still running; their tasks stay in %s "
                    "and run again if this process ends first",
                    running,
                    store.url,
                )
        self.pool.join(threads, deadline)
        self.slots.give_back()
        settled = self.unsettled.at_close()  # (it lets go of what the keeper still renews)
        self.pool.join([keeper] if keeper is not None else [], deadline)
        return ok and not left and not running and settled

    # -- dead letters, stats --------------------------------------------------------------

    def replay(self, dead_letter_id: str) -> Task:
        """The store moves the task back into its queue itself, for any process."""
        core = self.core
        with core.lock:
            if core.closed:
                raise ShutDown("this offloader was shut down; it takes no new tasks")
        task = self.store.replay(dead_letter_id)
        with core.lock:
            core.ledger.enqueued += 1
            self.wakeups.heard += 1  # (as an enqueue's put)
            if self.consume and not core.wake():
                self.pool.ensure()
        return task

    def counts(self) -> StoreCounts | None:
        return self.store.counts()
