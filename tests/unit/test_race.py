"""Stress: many producers racing the worker's idle exit. Nothing lost, nothing run twice."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from offload import Offloader

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
