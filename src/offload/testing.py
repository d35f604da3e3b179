"""Helpers for testing code that uses offload.

- `FakeClock`: time that moves only when the test says so; pass it as
  `Offloader(clock=...)` to drive retries, Retry-After and gates without waiting.
"""

from __future__ import annotations

import threading
import weakref

__all__ = ["FakeClock"]


class FakeClock:
    """A Clock whose time moves only with `advance()`; waiting workers wake when it does."""

    def __init__(self, start: float = 1_000.0, epoch: float = 1_767_225_600.0) -> None:
        self._now = float(start)
        self._epoch = float(epoch) - float(start)  # time() = epoch at `start`
        self._lock = threading.Lock()
        self._waiting: weakref.WeakSet[threading.Condition] = weakref.WeakSet()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._epoch + self._now

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        with self._lock:
            self._waiting.add(cond)
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
