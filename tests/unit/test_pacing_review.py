"""Gates and paces at their edges: a real worker thread on a FakeClock, and the scheduler."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

import pytest
import tenacity

from offload import Limit, Offloader, Retry, RetryPolicy, Task
from offload.scheduler import Scheduler, next_probe
from offload.testing import FakeClock

MakeOffloader = Callable[..., Offloader]


class _ParkingClock(FakeClock):
    """A FakeClock that counts its waits: a test knows when the worker has looked and
    parked, and moves time on only then."""

    def __init__(self) -> None:
        super().__init__()
        self.parked = threading.Condition()
        self.parks = 0

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        with self.parked:
            self.parks += 1
            self.parked.notify_all()
        super().wait(cond, timeout)

    def wait_parks(self, count: int) -> bool:
        with self.parked:
            return self.parked.wait_for(lambda: self.parks >= count, 10)


def test_a_throttled_probe_that_gives_up_keeps_its_key_closed_for_its_retry_after(
    make_offloader: MakeOffloader,
) -> None:
    """A probe told "not before 10 s" that gives up (its max_throttled spent) still closes
    its key for those 10 s: the held calls must not go at once, earlier than the server
    asked, because the probe's own task ended."""
    clock = _ParkingClock()
    calls: list[tuple[str, float]] = []

    def fn(name: str) -> None:
        calls.append((name, clock.monotonic()))
        raise Retry(after=10)

    off = make_offloader(
        clock=clock,
        adaptive=False,
        retry=RetryPolicy(wait=tenacity.wait_none(), max_throttled=15),
    )
    off.enqueue_task(Task(fn, ("first",), key="api"))
    assert clock.wait_parks(1)  # throttled at 1000: the key is closed until 1010 or so
    off.enqueue_task(Task(fn, ("second",), key="api"))
    assert clock.wait_parks(2)  # held behind the gate
    clock.advance(11)  # "first" probes, is told 10 s again, and gives up
    assert clock.wait_parks(3)
    assert calls == [("first", 1000.0), ("first", 1011.0)]
    [letter] = off.dead_letters()
    assert letter.reason == "exhausted" and "max_throttled" in letter.error
    clock.advance(11)  # past the Retry-After the probe was given (and its jitter)
    assert clock.wait_parks(4)
    assert calls[-1] == ("second", 1022.0)


def test_a_retry_after_beyond_max_retry_after_closes_its_key_for_max_retry_after(
    make_offloader: MakeOffloader,
) -> None:
    """Told "not before an hour", a task dead-letters at once (max_retry_after 60 s), and
    its key closes for those 60 s: the next call does not go to the API the same instant."""
    clock = _ParkingClock()
    calls: list[tuple[str, float]] = []

    def fn(name: str) -> None:
        calls.append((name, clock.monotonic()))
        if name == "first":
            raise Retry(after=3600)

    off = make_offloader(clock=clock, adaptive=False, retry=RetryPolicy(max_retry_after=60))
    off.enqueue_task(Task(fn, ("first",), key="api"))
    assert clock.wait_parks(1)
    [letter] = off.dead_letters()
    assert "max_retry_after" in letter.error
    off.enqueue_task(Task(fn, ("second",), key="api"))
    assert clock.wait_parks(2)
    assert calls == [("first", 1000.0)]
    clock.advance(60)
    assert off.flush(5)
    assert calls == [("first", 1000.0), ("second", 1060.0)]


def _noop() -> None:
    pass


@pytest.mark.parametrize("limit", [Limit(rate=100, per=10), Limit(rate=25), Limit(rate=2.5)])
def test_a_declared_rate_starts_at_most_rate_calls_in_any_per_seconds(limit: Limit) -> None:
    """`Limit(rate=100, per=10)` (HubSpot's 100 calls in any 10 s): a backlog's calls go
    100 at once, then none until those 10 s have passed, never 100 and then 10 a second
    more (199 in the first 10 s, half of them answered 429)."""
    sched = Scheduler({"api": limit})
    for _ in range(int(limit.rate or 0) * 4):
        sched.put(Task(_noop, key="api"))
    now, starts = 1000.0, []
    while not sched.idle():
        task = sched.take(now)
        if task is not None:
            starts.append(now)
            sched.settle(task, None, now=now, delivered=True)
            continue
        wait = sched.next_wake(now)
        assert wait is not None and wait > 0
        now += wait
    window = limit.per * math.ceil(limit.rate or 0) / (limit.rate or 1)
    allowed = math.ceil(limit.rate or 0)
    for i, start in enumerate(starts):
        within = bisect.bisect_left(starts, start + window - 1e-9) - i
        assert within <= allowed, f"{within} calls started in {window:g} s from {start}"
    # and no slower than the rate: the last call starts when the rate says it may
    assert starts[-1] - starts[0] <= len(starts) / limit.per_second  # type: ignore[operator]


def test_a_token_due_now_is_there_when_time_has_moved_by_exactly_its_interval() -> None:
    """25 calls a second, one at a time: 0.04 s after a call the next one's token has come.
    The refill's float rounding (0.99999999999909 of a token) said "in 3.6e-14 s", a wait
    the clock cannot represent: next_wake said 0.0 while take() gave nothing, so a worker
    on a FakeClock spun until the test moved time again, and the call never ran."""
    clock = FakeClock()
    sched = Scheduler({"api": Limit(rate=25, burst=1)})
    for _ in range(2):
        sched.put(Task(_noop, key="api"))
    first = sched.take(clock.monotonic())
    assert first is not None
    sched.settle(first, None, now=clock.monotonic(), delivered=True)
    assert sched.take(clock.monotonic()) is None
    clock.advance(0.04)
    assert sched.take(clock.monotonic()) is not None


def test_when_a_throttled_probe_gives_up_the_next_held_call_probes_despite_other_keys() -> None:
    """The probe of a closed key gives up: the key's first held call probes when the gate
    opens, as a retry would, not only once other keys leave the ready queue empty (a busy
    key kept it waiting for ever)."""
    sched = Scheduler()
    probe, held = Task(_noop, key="api"), Task(_noop, key="api")
    sched.put(probe)
    assert sched.take(1000.0) is probe
    sched.settle(probe, 1010.0, now=1000.0)
    sched.delay(probe, 1010.0)
    sched.put(held)
    assert sched.take(1001.0) is None  # held behind the gate
    assert sched.take(1010.0) is probe  # it probes, is throttled again, and gives up
    sched.settle(probe, 1020.0, now=1010.0)  # as the settler does for a task that gives up
    next_probe(sched, "api")
    sched.put(Task(_noop, key="busy"))
    for _ in range(10):  # the busy key's calls keep coming
        sched.put(Task(_noop, key="busy"))
        task = sched.take(1020.0)
        assert task is not None
        sched.settle(task, None, now=1020.0, delivered=True)
        if task is held:
            return
    raise AssertionError("the held call never probed")
