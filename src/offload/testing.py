"""Helpers for testing code that uses offload, in your own test suite.

- `eager()`: a context manager that makes the module-level offloader perform every call
  inline, in the thread that enqueues it, with no backoff. `enqueue_task` returns once the
  call was delivered or dead-lettered, so a test can assert on what the third party saw
  right after the code under test ran. `EagerOffloader` is the same for an explicit
  instance.
- `assert_no_dead_letters()`, `assert_dead_lettered()`, `dead_letters_matching()`:
  flush, then assert on dead letters (dramatiq's `StubBroker.join(fail_fast=True)` and
  stamina's `set_testing()` are the models).
- `FakeClock`: time that moves only when the test says so; pass it as
  `Offloader(clock=...)` to drive retries, Retry-After and gates without waiting.

    def test_signup_tells_the_crm(crm_server):
        with offload.testing.eager():
            client.post("/signup", json={"email": "ada@example.com"})
        assert crm_server.received == [...]
        offload.testing.assert_no_dead_letters()
"""

from __future__ import annotations

import contextlib
import heapq
import re
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from . import _default
from .attempt import perform
from .backlog import Backlog, MemoryBacklog
from .calls.connections import Resources
from .clock import Clock, SystemClock
from .core import Core
from .errors import ShutDown
from .offloader import Offloader
from .outcome import REASONS
from .policy import RetryPolicy
from .records import DeadLetter, Task
from .stores import Store
from .worker import WorkerPool

__all__ = [
    "DeadLettered",
    "EagerOffloader",
    "FakeClock",
    "assert_dead_lettered",
    "assert_no_dead_letters",
    "dead_letters_matching",
    "eager",
]


class FakeClock:
    """A Clock whose time moves only with `advance()`; waiting workers wake when it does."""

    def __init__(self, start: float = 1_000.0, epoch: float = 1_767_225_600.0) -> None:
        self._now = float(start)
        self._epoch = float(epoch) - float(start)  # time() = epoch at `start`
        self._lock = threading.Lock()
        self._waiting: weakref.WeakSet[threading.Condition] = weakref.WeakSet()
        # The time each thread last read: a wait that starts after an advance() it has not
        # seen returns at once (that advance() did not know its Condition to wake).
        self._seen: dict[int, float] = {}

    def monotonic(self) -> float:
        now = self._seen[threading.get_ident()] = self._now
        return now

    def time(self) -> float:
        return self._epoch + self.monotonic()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        with self._lock:
            self._waiting.add(cond)
            if self._seen.get(threading.get_ident(), self._now) != self._now:
                return  # time moved since this thread looked: it must look again
        cond.wait()  # woken by a notify, or by advance()

    def advance(self, seconds: float) -> None:
        """Move time forward and wake everything waiting on this clock."""
        if not seconds >= 0:
            raise ValueError(f"advance() takes seconds >= 0, got {seconds!r}")
        with self._lock:
            self._now += seconds
            waiting = list(self._waiting)
        for cond in waiting:
            with cond:
                cond.notify_all()

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now:.3f})"


# -- eager mode -----------------------------------------------------------------------------


class DeadLettered(AssertionError):
    """Raised by `enqueue_task` in eager mode with `fail_fast=True` when the call ended as a
    dead letter; `dead_letter` is the record (also kept in the store as usual)."""

    def __init__(self, dead_letter: DeadLetter) -> None:
        super().__init__(f"offload dead-lettered a call: {_describe(dead_letter)}")
        self.dead_letter = dead_letter


class _SkippingClock:
    """Eager mode's clock: monotonic time jumps over each backoff instead of waiting.

    The retry policy then sees the timeline it would see in production, so that
    `stop_before_delay` and `max_throttled` end an endless throttle just as they would,
    while nothing actually waits. Wall-clock time is not skipped: dead-letter timestamps
    say when the calls were really made.
    """

    def __init__(self, base: Clock) -> None:
        self._base = base
        self._skipped = 0.0
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self._base.monotonic() + self._skipped

    def time(self) -> float:
        return self._base.time()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        self._base.wait(cond, timeout)

    def skip_to(self, due: float) -> None:
        """Move monotonic time forward to `due` (never back)."""
        with self._lock:
            gap = due - (self._base.monotonic() + self._skipped)
            if gap > 0:
                self._skipped += gap

    def __repr__(self) -> str:
        return f"_SkippingClock({self._base!r}, skipped={self._skipped:.3f})"


def _close_all(resources: list[Resources]) -> None:
    for res in resources:
        res.close()
    resources.clear()


class _EagerBacklog(MemoryBacklog):
    """A backlog that performs each task inline, in the thread that enqueues it: the
    attempt and its settling are the workers' own (`attempt.perform`, `Settler`), and a
    retry is taken back at once, on a clock that skips the backoff."""

    def __init__(
        self,
        core: Core,
        pool: WorkerPool,
        store: Store,
        clock: _SkippingClock,
        max_queue: int,
        *,
        fail_fast: bool,
        delays: str,
    ) -> None:
        super().__init__(core, pool, store, clock, max_queue)
        self.skip = clock
        self.fail_fast = fail_fast
        self.delays = delays
        # Per enqueuing thread: its connections (a requests Session is not shared across
        # threads) and the due time of the retry its attempt just asked for.
        self._local = threading.local()
        self._resources: list[Resources] = []
        self._finalizer = weakref.finalize(self, _close_all, self._resources)

    def _thread_resources(self) -> Resources:
        res: Resources | None = getattr(self._local, "resources", None)
        if res is None:
            res = self._local.resources = Resources()
            with self.core.lock:
                self._resources.append(res)
        return res

    def add(self, task: Task, *, dedup: bool = True) -> Task:
        core = self.core
        meta = task._meta
        with core.lock:
            if core.closed:
                raise ShutDown("this offloader was shut down; it takes no new tasks")
            if meta is not None and meta.dedup_key is not None:
                holder = self.dedup.holder(meta.dedup_key, self.skip.monotonic())
                if holder is not None and dedup:
                    core.ledger.deduplicated += 1
                    return holder
                self.dedup.take(meta.dedup_key, task)
            if meta is not None:
                meta.enqueued = True
            core.ledger.enqueued += 1
            if meta is not None and self.delays == "clock" and (meta.delay or meta.at):
                wall = self.skip.time()
                due = task.due(wall)
                if due is not None:  # performed by flush() once the clock says it is due
                    core.sched.delay(task, self.skip.monotonic() + (due - wall))
                    return task
            core.sched.in_flight += 1  # as Scheduler.take() counts a task it hands out
        self._run(task)
        return task

    def _run(self, task: Task) -> None:
        """Perform `task` (counted in flight) here, its retries at once, until it settles."""
        settler = self.settler
        assert settler is not None
        resources = self._thread_resources()
        local = self._local
        while True:
            local.due = None
            settler.settle(task, perform(task, resources, self.skip))
            due = local.due
            if due is None:
                break  # delivered or dead-lettered
            self.skip.skip_to(due)
        letter = task.progress.letter
        if letter is not None and self.fail_fast:
            raise DeadLettered(letter)

    def flush(self, timeout: float | None) -> bool:
        """Perform the delayed tasks that are due on the offloader's clock (delays="clock"),
        here; True once none is left."""
        core = self.core
        while True:
            with core.lock:
                delayed = core.sched.delayed
                if not delayed or delayed[0][0] > self.skip.monotonic():
                    return core.sched.idle()
                task = heapq.heappop(delayed)[2]
                core.sched.in_flight += 1
            self._run(task)

    def requeue(self, task: Task, now: float, delay: float, throttled: bool) -> bool:
        core = self.core
        with core.lock:
            if core.stopping:
                return False
            core.ledger.retried += 1  # still in flight: add() makes the next attempt now
        self._local.due = now + delay
        return True

    def close(
        self,
        left: list[Task],
        ok: bool,
        threads: list[threading.Thread],
        deadline: float | None,
    ) -> bool:
        try:
            return super().close(left, ok, threads, deadline)
        finally:
            with self.core.lock:
                resources = list(self._resources)
                self._resources.clear()
            _close_all(resources)


class EagerOffloader(Offloader):
    """An Offloader that performs each call inline, in the thread that enqueues it.

    `enqueue_task` returns once the call was delivered or dead-lettered. Retries happen at
    once: the backoff and `Retry-After` are skipped, not waited for, but the retry policy
    decides as it would in production (the same attempts, the same dead letters, an
    endless throttle still ends after `max_throttled` seconds of skipped time). The
    skipped time is the offloader's, not a thread's: with calls enqueued from many threads
    at once, one call's time bounds also count the backoffs skipped for the others. Dead
    letters land in the store as usual; with `fail_fast=True` `enqueue_task` also raises
    `DeadLettered`. Throttle gates are not kept: there is no queue to hold back.

    Delayed tasks (`Task(delay=...)`, `at=`) run at once with `delays="now"` (the
    default), or with `delays="clock"` wait for the offloader's clock (a FakeClock the test
    advances): `flush()` then performs those that are due. Deduplication works as in
    production (`Task(dedup_key=...)` returns the task already holding the key).

    Takes the options `Offloader` takes; `workers`, `max_queue` and `idle_timeout` have
    no effect, and the store must be one that is not durable (a durable store is for
    tasks that outlive the process; eager tasks never wait).
    """

    def __init__(
        self,
        store: str | Store = "memory",
        retry: RetryPolicy | None = None,
        *,
        fail_fast: bool = False,
        clock: Clock | None = None,
        delays: str = "now",
        **options: Any,
    ) -> None:
        if not isinstance(fail_fast, bool):
            raise TypeError(f"fail_fast must be True or False, got {fail_fast!r}")
        if delays not in ("now", "clock"):
            raise ValueError(f"delays must be 'now' or 'clock', got {delays!r}")
        self.delays = delays
        if options.get("consume", True) is not True:
            raise ValueError("consume=False makes no sense in eager mode: calls run inline")
        durable = store not in ("memory", "memory://") if isinstance(store, str) else None
        if durable is None:
            durable = bool(getattr(store, "durable", False))
        if durable:
            raise ValueError(
                "eager mode performs calls at once and keeps nothing queued: use the memory "
                f"store, not {getattr(store, 'url', store)!r}"
            )
        self.fail_fast = fail_fast
        self._skip = _SkippingClock(clock if clock is not None else SystemClock())
        super().__init__(store, retry, clock=self._skip, **options)

    def _make_backlog(self, core: Core, pool: WorkerPool) -> Backlog:
        return _EagerBacklog(
            core,
            pool,
            self.store,
            self._skip,
            self.max_queue,
            fail_fast=self.fail_fast,
            delays=self.delays,
        )

    def __repr__(self) -> str:
        return "Eager" + super().__repr__()


@contextlib.contextmanager
def eager(
    *, fail_fast: bool = False, delays: str = "now", **options: Any
) -> Iterator[EagerOffloader]:
    """Make the module-level offloader eager for the duration of a `with` block.

    Inside the block, `offload.enqueue_task(...)` performs the call inline and returns when
    it was delivered or dead-lettered; `offload.dead_letters()`, `stats()` and the helpers
    here see the eager offloader. It keeps the options given to `offload.configure()` (the
    retry policy, callbacks) unless `options` override them, but always uses a memory store
    and ignores OFFLOAD_* variables. On exit the previous default comes back untouched.
    Calling `offload.configure()` inside the block replaces the eager offloader.
    """
    inherited = {
        name: value
        for name, value in _default.configured().items()
        if name not in ("store", "consume", "clock")
    }
    off = EagerOffloader(fail_fast=fail_fast, delays=delays, **{**inherited, **options})
    previous = _default.swap(off)
    try:
        yield off
    finally:
        replaced = _default.swap(previous)
        off.shutdown(0)
        if replaced is not None and replaced is not off:
            replaced.shutdown(0)  # made by configure() inside the block


# -- assertions on dead letters -----------------------------------------------------------


def _target(off: Offloader | None) -> Offloader | None:
    return off if off is not None else _default.current()


def _describe(letter: DeadLetter) -> str:
    status = f", status {letter.status}" if letter.status is not None else ""
    return (
        f"{letter.description} [{letter.reason} after {letter.attempts} attempt(s){status}]: "
        f"{letter.error}"
    )


def _drain(off: Offloader, timeout: float | None) -> None:
    if not off.flush(timeout):
        s = off.stats()
        raise AssertionError(
            f"offload still held {s.queued} queued, {s.delayed} delayed and {s.in_flight} "
            f"running task(s) after {timeout}s"
        )


def _matches(pattern: str | re.Pattern[str] | None, text: str | None) -> bool:
    if pattern is None:
        return True
    if text is None:
        return False
    if isinstance(pattern, re.Pattern):
        return pattern.search(text) is not None
    return pattern in text


def dead_letters_matching(
    off: Offloader | None = None,
    *,
    reason: str | None = None,
    status: int | None = None,
    key: str | None = None,
    description: str | re.Pattern[str] | None = None,
    error: str | re.Pattern[str] | None = None,
) -> list[DeadLetter]:
    """The dead letters of `off` (default: the module-level offloader) that match every
    filter given, oldest first. Does not wait.

    `description` and `error` match as a substring, or as a compiled regex (`re.search`);
    `reason` is "exhausted", "permanent" or "shutdown"; `status` an HTTP status; `key` a
    throttle key, exactly.
    """
    if reason is not None and reason not in REASONS:
        raise ValueError(f"reason must be one of {sorted(REASONS)}, got {reason!r}")
    for name, value in (("description", description), ("error", error)):
        if value is not None and not isinstance(value, (str, re.Pattern)):
            raise TypeError(f"{name} must be a str or a compiled regex, got {value!r}")
    target = _target(off)
    if target is None:
        return []
    return [
        letter
        for letter in target.dead_letters()
        if (reason is None or letter.reason == reason)
        and (status is None or letter.status == status)
        and (key is None or letter.key == key)
        and _matches(description, letter.description)
        and _matches(error, letter.error)
    ]


def assert_no_dead_letters(off: Offloader | None = None, *, timeout: float | None = 5.0) -> None:
    """Wait until `off` (default: the module-level offloader) has nothing left to do, then
    fail with a readable list if it holds any dead letter.

    Raises AssertionError also when work is still pending after `timeout` seconds.
    """
    target = _target(off)
    if target is None:
        return  # no default offloader was ever made: nothing was enqueued
    _drain(target, timeout)
    letters = target.dead_letters()
    if letters:
        lines = "\n".join(f"  {_describe(letter)}" for letter in letters)
        raise AssertionError(f"offload holds {len(letters)} dead letter(s):\n{lines}")


def assert_dead_lettered(
    off: Offloader | None = None,
    *,
    count: int | None = None,
    timeout: float | None = 5.0,
    reason: str | None = None,
    status: int | None = None,
    key: str | None = None,
    description: str | re.Pattern[str] | None = None,
    error: str | re.Pattern[str] | None = None,
) -> list[DeadLetter]:
    """Wait until `off` has nothing left to do, then assert that dead letters matching the
    filters (as `dead_letters_matching` takes them) exist: at least one, or exactly
    `count`. Returns them.
    """
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValueError(f"count must be an integer >= 0 or None, got {count!r}")
    target = _target(off)
    if target is not None:
        _drain(target, timeout)
    found = dead_letters_matching(
        target,
        reason=reason,
        status=status,
        key=key,
        description=description,
        error=error,
    )
    if (count is None and not found) or (count is not None and len(found) != count):
        held = target.dead_letters() if target is not None else []
        listing = "\n".join(f"  {_describe(letter)}" for letter in held) or "  (none)"
        wanted = "at least 1" if count is None else str(count)
        raise AssertionError(
            f"expected {wanted} matching dead letter(s), found {len(found)}; held:\n{listing}"
        )
    return found
