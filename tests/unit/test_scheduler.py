"""The scheduler alone: ready order, the delay heap and throttle gates, driven step by step."""

from __future__ import annotations

import pytest

from offload.records import Task
from offload.scheduler import (
    FIRST_PAUSE,
    OUTAGE_AFTER,
    OUTAGE_SECONDS,
    SUSPECT_HOLD,
    Scheduler,
)


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


# -- outages: a key whose calls keep failing is held, then paused -------------------------


def _fail(s: Scheduler, t: Task, now: float) -> object:
    """`t` ran and failed with a transient error at `now`, as settle.py reports it."""
    return s.failed(t, now)


def test_failures_of_one_task_never_make_an_outage() -> None:
    s = Scheduler()
    t = task("k")
    for i in range(10):
        s.put(t)
        assert s.take(float(i)) is t
        assert _fail(s, t, float(i)) is None
        s.settle(t, None)
    assert not s.down("k") and "k" not in s.gates


def test_three_tasks_failing_in_a_row_hold_the_key_at_once() -> None:
    s = Scheduler()
    a, b, c, d = (task("k") for _ in range(4))
    for t in (a, b, c, d):
        s.put(t)
    assert [s.take(0.0) for _ in range(4)] == [a, b, c, d]
    assert _fail(s, a, 0.0) is None
    assert _fail(s, b, 0.01) is None
    held = s.failed(c, 0.02)
    assert held is not None and not held.down and held.seconds == SUSPECT_HOLD
    assert s.gates["k"].open_at == pytest.approx(0.02 + SUSPECT_HOLD), "no other call starts"
    echo = s.failed(d, 0.03)  # in flight with them: the rest of the same hold
    assert echo is not None and not echo.down
    assert echo.seconds == pytest.approx(SUSPECT_HOLD - 0.01)
    assert not s.down("k")


def _suspect(s: Scheduler, n: int = 8) -> list[Task]:
    """Three of `n` tasks of key "k" fail at 0.0: the key is held; the others are queued."""
    tasks = [task("k") for _ in range(n)]
    for t in tasks:
        s.put(t)
    first = [s.take(0.0) for _ in range(3)]
    for t in first:
        assert t is not None
        s.failed(t, 0.0)
        s.settle(t, None)
        s.delay(t, 60.0)  # their own backoff: out of the way
    return tasks


def test_a_suspect_key_is_probed_one_call_at_a_time_and_a_success_ends_it() -> None:
    s = Scheduler()
    tasks = _suspect(s)
    assert s.take(0.1) is None
    probe = s.take(SUSPECT_HOLD)
    assert probe is tasks[3] and s.take(SUSPECT_HOLD) is None, "one probe at a time"
    s.settle(probe, None, now=SUSPECT_HOLD, delivered=True)
    assert s.succeeded(probe, SUSPECT_HOLD) is None  # never down: nothing to say
    assert [s.take(SUSPECT_HOLD) for _ in range(4)] == tasks[4:]
    assert not s.down("k") and "k" not in s.gates


def test_probes_failing_for_a_second_make_an_outage_and_only_probes_grow_its_pause() -> None:
    s = Scheduler()
    _suspect(s, n=20)
    now, pauses = 0.0, []
    while True:
        now = s.gates["k"].open_at
        probe = s.take(now)
        assert probe is not None and s.take(now) is None
        pause = s.failed(probe, now)
        assert pause is not None
        pauses.append(pause)
        s.settle(probe, now + pause.seconds if pause.down else None, now=now)
        s.delay(probe, 60.0)
        assert s.held_count > 0, "the backlog is still held"
        if pause.down:
            break
    assert [p.down for p in pauses].count(True) == 1 and pauses[-1].news
    assert now >= OUTAGE_SECONDS and len(pauses) >= OUTAGE_AFTER
    assert s.down("k") and pauses[-1].seconds == FIRST_PAUSE
    # Down: the next probe failing doubles the pause, and is no news.
    now = s.gates["k"].open_at
    probe = s.take(now)
    assert probe is not None
    again = s.failed(probe, now)
    assert again is not None and again.down and not again.news
    assert again.seconds == 2 * FIRST_PAUSE
    s.settle(probe, now + again.seconds, now=now)
    assert s.take(now + 2 * FIRST_PAUSE - 0.01) is None


def test_echoes_of_an_outage_wait_out_its_pause_without_growing_it() -> None:
    s = Scheduler()
    first, second, third, echo1, echo2 = (task("k") for _ in range(5))
    for t in (first, second, third, echo1, echo2):
        s.put(t)
        s.take(0.0)
    s.failed(first, 0.0)
    s.failed(second, 0.0)
    held = s.failed(third, 0.0)
    assert held is not None and not held.down
    # Three probes fail over a second and more: down.
    s._outages["k"].probes = OUTAGE_AFTER - 1
    gate = s.gates["k"]
    probe = task("k")
    s.put(probe)
    assert s.take(gate.open_at) is probe
    down = s.failed(probe, 1.5)
    assert down is not None and down.down and down.news and down.seconds == FIRST_PAUSE
    for echo in (echo1, echo2):
        paused = s.failed(echo, 1.6)
        assert paused is not None and paused.down and not paused.news
        assert paused.seconds == pytest.approx(0.9)  # the rest of the same pause
    assert s.gates["k"].open_at == pytest.approx(2.5)


def test_a_success_ends_an_outage_and_says_how_long_it_lasted() -> None:
    s = Scheduler()
    ts = [task("k") for _ in range(4)]
    for t in ts:
        s.put(t)
        s.take(0.0)
    for t in ts[:3]:
        s.failed(t, 0.0)
    s._outages["k"].probes = OUTAGE_AFTER  # as if its probes had failed too
    s.gates["k"].probe = ts[2]
    assert s.failed(ts[2], 1.0) is not None and s.down("k")
    assert s.succeeded(ts[3], 11.0) == pytest.approx(10.0)
    assert not s.down("k")
    assert s.succeeded(ts[3], 12.0) is None  # over: nothing more to say


def test_a_success_between_failures_starts_the_count_again() -> None:
    s = Scheduler()
    ts = [task("k") for _ in range(5)]
    for t in ts:
        s.put(t)
        s.take(0.0)
    s.failed(ts[0], 0.0)
    s.failed(ts[1], 2.0)
    assert s.succeeded(ts[2], 2.0) is None
    assert s.failed(ts[3], 3.0) is None
    assert s.failed(ts[4], 4.0) is None
    assert not s.down("k") and "k" not in s.gates


def test_the_default_policy_keeps_a_probe_of_an_outage_for_about_ten_minutes() -> None:
    """The figure the README states: a call that failed once and then probes a key that is
    down (each failed probe a throttle, pauses doubling to MAX_PAUSE) is given up only once
    its next try would start 600 s after its first (`stop_before_delay(600)`)."""
    from offload.outcome import Outcome
    from offload.policy import RetryPolicy
    from offload.records import Progress
    from offload.scheduler import MAX_PAUSE

    policy = RetryPolicy()
    progress = Progress(attempts=1)
    progress.started = 0.0
    first = policy.decide(progress, Outcome("retry", error="refused"), None, 0.0)
    assert first.retry
    now, pause = first.delay, FIRST_PAUSE
    while True:
        progress.attempts += 1
        probe = Outcome("retry", throttled=True, retry_after=pause, error="its API is down")
        decision = policy.decide(progress, probe, None, now)
        if not decision.retry:
            break
        assert decision.delay >= pause
        now += decision.delay
        pause = min(MAX_PAUSE, pause * 2)
    assert decision.reason == "exhausted"
    assert 600 - MAX_PAUSE - 2 <= now <= 600, now
    assert progress.failures == 1, "the probes' failures used no attempts"
