"""The offloader's life cycle under races: starting over in a forked child, delayed tasks,
flush and shutdown."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import offload
from offload import GiveUp, Offloader, QueueFull, ShutDown, Task
from offload.backlog import Backlog
from offload.clock import SystemClock
from offload.core import Core
from offload.stores.sqlite import SQLiteStore
from offload.testing import FakeClock
from offload.worker import WorkerPool
from server import Answer, ScriptedServer


class _SlowStartOver(Offloader):
    """An offloader whose first start-over after a fork waits (briefly) for a second
    thread to start over too: what two request threads of a uWSGI worker, forked
    without the fork hooks, may do when both make their first enqueue at once."""

    def __init__(self, **options: Any) -> None:
        self.made = 0
        self.starting = threading.Event()
        self.second = threading.Event()
        super().__init__(**options)

    def _make_backlog(self, core: Core, pool: WorkerPool) -> Backlog:
        self.made += 1
        if self.made == 2:  # the first start-over
            self.starting.set()
            self.second.wait(0.5)  # bounded: once per child, no second one comes
        elif self.made > 2:
            self.second.set()
        return super()._make_backlog(core, pool)


def test_threads_of_a_child_forked_without_hooks_start_the_offloader_over_once() -> None:
    """Two threads' first enqueues in a child that no fork hook reached: the offloader
    starts over once, and both tasks are in the one this process keeps (a second start-
    over abandoned the first's task: stats(), flush() and shutdown() never saw it)."""
    off = _SlowStartOver(idle_timeout=0.5)
    ran: list[int] = []
    try:
        off._pid = -1  # the state a child inherits when its server runs no fork hooks
        first = threading.Thread(target=off.enqueue_task, args=(ran.append, 1))
        first.start()
        assert off.starting.wait(5)
        second = threading.Thread(target=off.enqueue_task, args=(ran.append, 2))
        second.start()
        first.join(5)
        second.join(5)
        assert off.flush(5)
        s = off.stats()
        assert (s.enqueued, s.succeeded) == (2, 2), s
        assert sorted(ran) == [1, 2]
        assert off.made == 2, "started over more than once"
    finally:
        off.shutdown(5)


def test_a_replayed_delayed_task_is_due_now(make_offloader: Callable[..., Offloader]) -> None:
    """A delayed task that became a dead letter is replayed due now, as the durable stores
    replay it: the memory store put it on the delay heap for its whole delay again."""
    clock = FakeClock()
    off = make_offloader(clock=clock)
    calls: list[int] = []

    def refuse() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise GiveUp("not yet")

    off.enqueue_task(Task(refuse, delay=3600))
    assert off.stats().delayed == 1
    clock.advance(3600)
    assert off.flush(5)
    [letter] = off.dead_letters()
    off.replay(letter.id)
    assert off.stats().delayed == 0, "replayed onto the delay heap"
    assert off.flush(5) and len(calls) == 2
    s = off.stats()
    assert (s.enqueued, s.succeeded, s.dead_lettered) == (2, 1, 1)


class _ReadingStore(SQLiteStore):
    """A SQLite store that, once armed, holds a worker's look for the next due time after
    reading it, until the test has enqueued meanwhile."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.armed = False
        self.read = threading.Event()
        self.go = threading.Event()

    def next_due(self) -> float | None:
        due = super().next_due()
        if self.armed:
            self.armed = False
            self.read.set()
            self.go.wait(5)
        return due


class _WaitsClock(SystemClock):
    """The real clock, noting how long each wait was meant to last once `noting` is set."""

    def __init__(self) -> None:
        self.noting = False
        self.waits: list[float | None] = []

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        if self.noting:
            self.waits.append(timeout)
        super().wait(cond, timeout)


@pytest.mark.parametrize("put", ["delayed enqueue", "replay"])
def test_a_task_stored_while_a_worker_reads_the_store_is_not_late_by_a_poll(
    tmp_path: Path, server: ScriptedServer, put: str
) -> None:
    """A durable store's idle worker reads when the next task is due; a task put meanwhile
    (delayed, or a replayed dead letter) was missed by that read, and the worker waited a
    whole poll before it looked again (a task due in a few milliseconds ran half a second
    late). The put now tells the reading worker to look again at once."""
    server.script("/soon", Answer(status=400), Answer(status=200))
    store = _ReadingStore(tmp_path / "offload.db")
    clock = _WaitsClock()
    off = Offloader(store=store, clock=clock, idle_timeout=5)
    try:
        call = offload.http("POST", server.url("/soon"))
        if put == "replay":
            off.enqueue_task(call)
            assert off.flush(5)
            [letter] = off.dead_letters()
        store.armed = True
        off.start()  # a worker looks at the store, now or at its next poll
        assert store.read.wait(5)
        if put == "replay":
            off.replay(letter.id)
        else:
            off.enqueue_task(Task(call, delay=0.05))
        clock.noting = True
        store.go.set()
        assert server.wait_for(1 if put != "replay" else 2, "/soon")
        first = clock.waits[0]
        assert first is not None and first <= 0.05, f"waited {first}s before looking again"
    finally:
        store.go.set()
        off.shutdown(5)


# -- shutdown racing producers ---------------------------------------------------------------

_RAN: Counter[int] = Counter()
_RAN_LOCK = threading.Lock()


def count_run(n: int) -> None:
    """A task that counts its runs (module level: a durable store names it)."""
    with _RAN_LOCK:
        _RAN[n] += 1


def _race_shutdown(
    off: Offloader, seed: int, base: int, longest: float = 3600
) -> tuple[list[tuple[int, Task]], int]:
    """Eight threads enqueue quick and delayed tasks while shutdown() (with a short or no
    timeout) begins once they are under way; the ledger is read throughout. Returns the
    tasks accepted (numbered from `base`) and how many stats() found the ledger broken."""
    rng = random.Random(seed)
    accepted: list[tuple[int, Task]] = []
    broken = 0
    lock = threading.Lock()
    under_way = threading.Event()

    def produce(p: int) -> None:
        nonlocal broken
        for i in range(300):
            n = base + p * 1_000 + i
            delay = rng.choice([None, None, None, 0.0, 0.001, 0.01, longest])
            try:
                if delay is None:
                    task = off.enqueue_task(count_run, n)
                else:
                    task = off.enqueue_task(Task(count_run, (n,), delay=delay))
            except (ShutDown, QueueFull):
                pass
            else:
                with lock:
                    accepted.append((n, task))
            if i == 100:
                under_way.set()
            if i % 5 == 0:  # (also while shutdown() dead-letters what is left)
                s = off.stats()
                if s.enqueued != s.succeeded + s.dead_lettered + s.queued + s.delayed + s.in_flight:
                    with lock:
                        broken += 1

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(8)]
    for thread in threads:
        thread.start()
    assert under_way.wait(10)
    off.shutdown(timeout=rng.choice([0.0, 0.001, 0.05]))
    for thread in threads:
        thread.join(30)
    for thread in list(off._pool.threads):  # a call in flight at the deadline ends
        thread.join(10)
    return accepted, broken


@pytest.mark.parametrize("seed", range(12))
def test_shutdown_racing_producers_of_quick_and_delayed_tasks_loses_nothing(
    make_offloader: Callable[..., Offloader], seed: int
) -> None:
    """Memory store: each task accepted ends delivered once or as one "shutdown" dead
    letter, those refused are counted nowhere, and the ledger holds for every reader."""
    letters: Counter[str] = Counter()
    off = make_offloader(
        workers=1 + seed % 4,
        idle_timeout=0.001,
        max_queue=800,
        on_dead_letter=lambda task, letter: letters.update([task.id]),
    )
    base = 10_000 * seed
    accepted, broken = _race_shutdown(off, seed, base)
    s = off.stats()
    assert not broken
    assert s.enqueued == len(accepted) == s.succeeded + s.dead_lettered, s
    assert (s.queued, s.delayed, s.in_flight) == (0, 0, 0)
    with _RAN_LOCK:
        ends = [(_RAN[n], letters[task.id]) for n, task in accepted]
    assert all(end in ((1, 0), (0, 1)) for end in ends), Counter(ends)
    assert sum(dead for _, dead in ends) == s.dead_lettered


@pytest.mark.parametrize("seed", range(4))
def test_shutdown_racing_producers_over_sqlite_leaves_the_rest_stored(
    tmp_path: Path, seed: int
) -> None:
    """SQLite: what a shutdown racing enqueues did not deliver stays in the file (delayed
    ones with their due times), and the offloader that comes after delivers it: each task
    accepted runs once."""
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    base = 1_000_000 + 10_000 * seed
    off = Offloader(store=url, workers=1 + seed % 3, idle_timeout=0.001, max_queue=40)
    accepted, _ = _race_shutdown(off, seed, base, longest=0.2)
    assert off.stats().enqueued == len(accepted)
    after = Offloader(store=url, workers=2, idle_timeout=0.05)
    try:
        assert after.flush(30), after.stats()
    finally:
        after.shutdown(5)
    with _RAN_LOCK:
        runs = Counter(_RAN[n] for n, _ in accepted)
    assert runs == {1: len(accepted)}, runs


def test_shutdown_from_a_task_on_its_own_offloader_raises(
    make_offloader: Callable[..., Offloader],
) -> None:
    """shutdown() waits for the tasks running: called from one, it waited for itself,
    for ever without a timeout (only the process's exit cut it short). It raises, as
    flush() does, and the offloader goes on."""
    off = make_offloader()
    errors: list[BaseException] = []
    done = threading.Event()

    def stop() -> None:
        try:
            off.shutdown()
        except offload.OffloadError as exc:
            errors.append(exc)
        done.set()

    off.enqueue_task(stop)
    assert done.wait(5), "shutdown() from its own task is waiting for itself"
    assert len(errors) == 1 and "own tasks" in str(errors[0])
    assert off.flush(5)
    off.enqueue_task(print, end="")
    assert off.flush(5) and off.stats().succeeded == 2
