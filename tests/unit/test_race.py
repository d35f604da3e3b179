"""Stress: many producers racing the worker's idle exit. Nothing lost, nothing run twice."""

from __future__ import annotations

import random
import sys
import threading
from collections import Counter
from collections.abc import Callable

from offload import Offloader, Task

PRODUCERS = 16
PER_PRODUCER = 1_250  # 20,000 tasks


def test_idle_exit_racing_enqueue_loses_nothing(make_offloader: Callable[..., Offloader]) -> None:
    # idle_timeout=0: the worker exits the moment it runs dry, so nearly every enqueue races
    # an exit decision. A lost wake-up would strand tasks and flush() would time out.
    off = make_offloader(idle_timeout=0)
    runs: Counter[int] = Counter()
    lock = threading.Lock()
    starts = threading.Barrier(PRODUCERS)
    starts_seen = Counter[int]()

    def record(n: int) -> None:
        with lock:
            runs[n] += 1

    def produce(p: int) -> None:
        starts.wait(10)
        for i in range(PER_PRODUCER):
            off.enqueue_task(record, p * PER_PRODUCER + i)
            if i % 97 == 0:
                # Let the worker drain and exit now and then, so exits race new work.
                off.flush(5)
                starts_seen[p] += 1

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(PRODUCERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert off.flush(30), f"stranded tasks: {off.stats()}"
    total = PRODUCERS * PER_PRODUCER
    assert len(runs) == total, f"lost {total - len(runs)} tasks"
    assert max(runs.values()) == 1, "a task ran twice"
    s = off.stats()
    assert s.enqueued == total == s.succeeded
    assert s.enqueued == s.succeeded + s.dead_lettered + s.queued + s.delayed + s.in_flight


def test_many_workers_many_producers_ledger(make_offloader: Callable[..., Offloader]) -> None:
    off = make_offloader(idle_timeout=0, workers=4)
    runs: Counter[int] = Counter()
    lock = threading.Lock()
    ledger_broken = []

    def record(n: int) -> None:
        with lock:
            runs[n] += 1

    def produce(p: int) -> None:
        for i in range(500):
            off.enqueue_task(record, p * 500 + i)
            if i % 50 == 0:
                s = off.stats()
                if s.enqueued != s.succeeded + s.dead_lettered + s.queued + s.delayed + s.in_flight:
                    ledger_broken.append(s)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert off.flush(30)
    assert not ledger_broken
    assert len(runs) == 8_000 and max(runs.values()) == 1


def test_bursts_delays_and_idle_exits_always_start_the_workers_a_group_needs(
    make_offloader: Callable[..., Offloader],
) -> None:
    """Producers enqueue bursts of quick and delayed tasks, pausing shorter and longer than
    the idle timeout so that workers time out between them; now and then a group of four
    tasks that meet at a barrier, which needs all four workers at once. Every group meets
    (no burst leaves the pool short), nothing is lost, and the ledger holds throughout."""
    idle = 0.02
    off = make_offloader(workers=4, idle_timeout=idle)
    done: Counter[str] = Counter()
    lock = threading.Lock()
    broken: list[int] = []
    ledger_broken: list[object] = []
    stop = threading.Event()
    one_group = threading.Lock()  # two groups at once could hold two workers each

    def quick(kind: str) -> None:
        with lock:
            done[kind] += 1

    def meet(barrier: threading.Barrier, group: int, met: threading.Semaphore) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            broken.append(group)
        quick("meet")
        met.release()

    def group(number: int) -> None:
        """Four tasks that must run together, enqueued in a burst; back once they ran."""
        with one_group:
            barrier = threading.Barrier(4, timeout=10)
            met = threading.Semaphore(0)
            interval = sys.getswitchinterval()
            sys.setswitchinterval(0.05)  # a burst that woken workers get no turn in
            try:
                for _ in range(4):
                    off.enqueue_task(meet, barrier, number, met)
            finally:
                sys.setswitchinterval(interval)
            for _ in range(4):
                assert met.acquire(timeout=20)

    def monitor() -> None:
        while not stop.is_set():
            s = off.stats()
            if s.enqueued != s.succeeded + s.dead_lettered + s.queued + s.delayed + s.in_flight:
                ledger_broken.append(s)
            stop.wait(0.002)  # pacing the reads, not waiting for anything

    def produce(p: int) -> None:
        rng = random.Random(p)
        for round_ in range(40):
            if p < 2 and round_ % 5 == 0:
                group(p * 100 + round_)
            for _ in range(rng.randint(1, 8)):
                if rng.random() < 0.8:
                    off.enqueue_task(quick, "quick")
                else:
                    off.enqueue_task(Task(quick, ("delayed",), delay=rng.choice([0.001, idle])))
            stop.wait(rng.choice([0.0, 0.5, 1.0, 2.0]) * idle)  # workers idle out meanwhile

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=produce, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # Groups alone: each after one task, so that one worker is freshly idle (the others
    # idle, or gone) when its burst comes.
    for number in range(10):
        assert off.flush(10)
        stop.wait(number % 3 * idle)
        off.enqueue_task(quick, "quick")
        assert off.flush(10)
        group(1000 + number)
    assert off.flush(60), off.stats()
    stop.set()
    watcher.join(10)
    s = off.stats()
    assert not broken, f"groups whose four tasks did not run together: {broken}"
    assert not ledger_broken, ledger_broken[:3]
    assert s.enqueued == s.succeeded == sum(done.values()) and s.dead_lettered == 0
    assert len(off._pool.threads) <= 4
