"""Time as the scheduler sees it, so that tests can drive retries and gates without waiting.

The offloader never reads the time or waits on a condition except through its Clock.
`SystemClock` is the real one; `offload.testing.FakeClock` moves only when told to.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """What the scheduler needs of time: two readings and a way to wait."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; due times and deadlines use it."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch; dead-letter timestamps and HTTP-dates use it."""
        ...

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Wait on `cond` (held by the caller) until notified or `timeout` seconds pass."""
        ...


class SystemClock:
    """The real clock: time.monotonic, time.time and Condition.wait."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    @staticmethod
    def wait(cond: threading.Condition, timeout: float | None) -> None:
        cond.wait(timeout)

    def __repr__(self) -> str:
        return "SystemClock()"
