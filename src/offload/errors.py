"""Exceptions raised by offload, and the two a call may raise to steer its own retries.

OffloadError
├── QueueFull          (also queue.Full)   enqueue_task when max_queue tasks are held
├── NotSerializable    (also TypeError)    a durable store cannot hold this task as JSON
├── ShutDown                               enqueue after shutdown() or at interpreter exit
├── UnknownDeadLetter  (also KeyError)     replay/discard of an id the store does not hold
└── StoreError                             a store is unreachable, or holds a bad record

Retry    raised by a call: "try again" (optionally not before `after` seconds)
GiveUp   raised by a call: "dead-letter me now", with a reason
"""

from __future__ import annotations

import queue

__all__ = [
    "GiveUp",
    "NotSerializable",
    "OffloadError",
    "QueueFull",
    "Retry",
    "ShutDown",
    "StoreError",
    "UnknownDeadLetter",
]


class OffloadError(Exception):
    """Base class of every error offload raises."""


class QueueFull(OffloadError, queue.Full):
    """The offloader already holds `max_queue` tasks; enqueue_task never blocks."""


class NotSerializable(OffloadError, TypeError):
    """A durable store can hold only JSON: an HttpCall, an AwsCall or an importable function."""


class ShutDown(OffloadError):
    """The offloader (or the interpreter) is shutting down and takes no new tasks."""


class UnknownDeadLetter(OffloadError, KeyError):
    """No dead letter with that id is held."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown dead letter"


class StoreError(OffloadError):
    """A store could not be opened or reached, or holds a record offload cannot read."""


class Retry(Exception):
    """Raised by a call to ask for another attempt, not before `after` seconds if given.

    A Retry is a throttle ("not now"): it closes the task's key gate and does not use up
    an attempt; the task is bounded by time instead (see RetryPolicy.max_throttled).
    """

    def __init__(self, after: float | None = None) -> None:
        if after is not None and not (after >= 0):  # also rejects NaN
            raise ValueError(f"Retry(after=...) must be a number >= 0, got {after!r}")
        super().__init__(after)
        self.after = after


class GiveUp(Exception):
    """Raised by a call to dead-letter its task at once, with `reason` as the error."""

    def __init__(self, reason: str = "gave up") -> None:
        super().__init__(reason)
        self.reason = reason
