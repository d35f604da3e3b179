"""The scheduler alone: ready order, the delay heap and throttle gates, driven step by step."""

from __future__ import annotations

from offload.records import Task
from offload.scheduler import Scheduler


def noop() -> None:
    pass


def task(key: str | None = None) -> Task:
    return Task(noop, key=key)


def test_fifo_and_in_flight_count() -> None:
    s = Scheduler()
    a, b = task(), task()
    s.put(a)
    s.put(b)
    assert s.size() == 2
    assert s.take(0.0) is a
    assert s.take(0.0) is b
    assert s.take(0.0) is None
    assert s.in_flight == 2
    s.settle(a, None)
    s.settle(b, None)
    assert s.idle()


def test_delayed_task_is_not_taken_before_due() -> None:
    s = Scheduler()
    t = task()
    s.delay(t, due=10.0)
    assert s.take(9.999) is None
    assert s.next_wake(9.0) == 1.0
    assert s.take(10.0) is t


def test_delay_heap_keeps_insertion_order_on_ties() -> None:
    s = Scheduler()
    tasks = [task() for _ in range(5)]
    for t in tasks:
        s.delay(t, due=5.0)
    assert [s.take(5.0) for _ in tasks] == tasks


def test_throttled_key_is_held_other_keys_flow() -> None:
    s = Scheduler()
    throttled = task("api-a")
    s.put(throttled)
    assert s.take(0.0) is throttled
    s.settle(throttled, throttled_until=3.0)
    s.delay(throttled, 3.0)
    a2, b1, a3, b2 = task("api-a"), task("api-b"), task("api-a"), task("api-b")
    for t in (a2, b1, a3, b2):
        s.put(t)
    # Only api-b flows while api-a's gate is closed.
    assert s.take(1.0) is b1
    assert s.take(1.0) is b2
    assert s.take(2.9) is None
    assert s.held_count == 2
    assert s.queued == 2
    assert s.next_wake(2.0) == 1.0


def test_gate_reopens_with_one_probe_then_releases_backlog_in_order() -> None:
    s = Scheduler()
    first = task("k")
    s.put(first)
    s.take(0.0)
    s.settle(first, throttled_until=3.0)
    s.delay(first, 3.0)
    backlog = [task("k") for _ in range(3)]
    for t in backlog:
        s.put(t)
    assert s.take(0.5) is None
    # At 3.0 the throttled task is due and goes first, alone.
    probe = s.take(3.0)
    assert probe is first
    assert s.take(3.0) is None, "no second call to the key while the probe is out"
    s.settle(probe, None)  # it got through
    assert [s.take(3.0) for _ in backlog] == backlog
    assert "k" not in s.gates


def test_probe_throttled_again_keeps_gate_closed() -> None:
    s = Scheduler()
    t1, t2 = task("k"), task("k")
    s.put(t1)
    s.take(0.0)
    s.settle(t1, throttled_until=1.0)
    s.put(t2)
    assert s.take(0.5) is None  # t2 held
    probe = s.take(1.0)  # gate time reached; t1 is not due (never delayed) so t2 probes
    assert probe is t2
    s.settle(t2, throttled_until=5.0)
    s.delay(t2, 5.0)
    assert s.take(4.0) is None
    assert s.take(5.0) is t2


def test_gate_keeps_latest_reopen_time() -> None:
    s = Scheduler()
    t1, t2 = task("k"), task("k")
    s.put(t1)
    s.put(t2)
    s.take(0.0)
    s.take(0.0)  # both in flight before any throttle
    s.settle(t1, throttled_until=10.0)
    s.settle(t2, throttled_until=4.0)
    assert s.gates["k"].open_at == 10.0


def test_tasks_without_key_are_never_gated() -> None:
    s = Scheduler()
    t = task(None)
    s.put(t)
    s.take(0.0)
    assert s.settle(t, throttled_until=100.0) is False
    assert s.gates == {}


def test_nothing_due_before_and_drain() -> None:
    s = Scheduler()
    a, b = task(), task()
    s.delay(a, 60.0)
    assert s.nothing_due_before(5.0)
    assert not s.nothing_due_before(61.0)
    s.put(b)
    assert not s.nothing_due_before(5.0)
    assert s.drain() == [b, a]
    assert s.size() == 0
