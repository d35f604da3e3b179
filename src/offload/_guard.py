"""The re-entrancy guard: marks offload's own work on a worker thread.

A user's log handler that ships records through `enqueue_task` would loop forever if it
ran inside offload's own work: every call it queues logs again (urllib3, botocore, our
WARNING on a dead letter). `enqueue_task` refuses while the guard is up. A plain callable
running on the worker is user code and may enqueue freely.
"""

from __future__ import annotations

import threading

__all__ = ["Guarded", "guard"]


class _GuardFlag(threading.local):
    # A class default, so that reading it on a thread that never set it costs no failed
    # lookup (getattr with a default raises and catches AttributeError).
    active = False  # offload's own code is running on this thread


guard = _GuardFlag()


class Guarded:
    """`with Guarded():` around offload's own work (library calls, its own log lines)."""

    __slots__ = ("previous",)

    def __enter__(self) -> None:
        self.previous = guard.active
        guard.active = True

    def __exit__(self, *exc: object) -> None:
        guard.active = self.previous
