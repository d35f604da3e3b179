"""Gates at their edges, on a FakeClock with a real worker thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import tenacity

from offload import Offloader, Retry, RetryPolicy, Task
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
