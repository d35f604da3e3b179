"""offload: hand outbound API calls to a background worker, and never lose one.

    task = offload.enqueue_task(offload.http("POST", url, json=body))

The worker retries throttled (429, AWS throttling) and failing (5xx, network) calls on a
schedule, honours Retry-After, pauses only the throttled API, and keeps calls that still
fail as dead letters to inspect and replay. See the README for the whole contract.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from . import _default
from .calls import AwsCall, HttpCall, aws, http
from .clock import Clock, SystemClock
from .codec.trust import register as task
from .errors import (
    GiveUp,
    NotSerializable,
    OffloadError,
    QueueFull,
    Retry,
    ShutDown,
    StoreError,
    UnknownDeadLetter,
)
from .limits import Limit
from .offloader import Offloader
from .policy import RetryPolicy
from .records import DeadLetter, Task
from .status import Health, KeyState, Stats
from .stores import Store

try:
    __version__ = version("offload")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AwsCall",
    "Clock",
    "DeadLetter",
    "GiveUp",
    "Health",
    "HttpCall",
    "KeyState",
    "Limit",
    "NotSerializable",
    "OffloadError",
    "Offloader",
    "QueueFull",
    "Retry",
    "RetryPolicy",
    "ShutDown",
    "Stats",
    "Store",
    "StoreError",
    "SystemClock",
    "Task",
    "UnknownDeadLetter",
    "__version__",
    "aws",
    "configure",
    "dead_letters",
    "discard",
    "enqueue_task",
    "flush",
    "gates",
    "health",
    "http",
    "keys",
    "replay",
    "shutdown",
    "stats",
    "task",
    "transaction",
]

configure = _default.configure


def enqueue_task(call: Any, /, *args: Any, **kwargs: Any) -> Task:
    """Queue a call on the default offloader and return at once (see Offloader.enqueue_task)."""
    offloader = _default._default  # (get(), inline: every handler's enqueue comes this way)
    if offloader is None:
        offloader = _default.get()
    if args or kwargs:
        return offloader.enqueue_task(call, *args, **kwargs)
    return offloader.enqueue_task(call)


def transaction(connection: Any) -> AbstractContextManager[Any]:
    """A block in which this thread's enqueues to the default offloader write through the
    application's `connection`, in its open transaction (see Offloader.transaction)."""
    return _default.get().transaction(connection)


def dead_letters() -> list[DeadLetter]:
    """The default offloader's dead letters, oldest first."""
    return _default.get().dead_letters()


def replay(dead_letter_id: str) -> Task:
    """Remove a dead letter and enqueue its task again with a fresh attempt budget."""
    return _default.get().replay(dead_letter_id)


def discard(dead_letter_id: str) -> None:
    """Remove one dead letter for good."""
    _default.get().discard(dead_letter_id)


def flush(timeout: float | None = None) -> bool:
    """Wait until nothing is queued, delayed or running; False if `timeout` ran out first."""
    return _default.get().flush(timeout)


def stats() -> Stats:
    """Counters and a snapshot of the default offloader."""
    return _default.get().stats()


def shutdown(timeout: float | None = None) -> bool:
    """Flush, then stop the default offloader (also run automatically at interpreter exit)."""
    return _default.get().shutdown(timeout)


def gates() -> dict[str, float]:
    """The default offloader's closed gates: key -> seconds until it reopens."""
    return _default.get().gates()


def keys() -> dict[str, KeyState]:
    """The default offloader's keys (APIs) and their state now: gates, limits, rates."""
    return _default.get().keys()


def health(*, max_age: float | None = None, max_dead_letters: int | None = None) -> Health:
    """Whether the default offloader is well (see Offloader.health)."""
    return _default.get().health(max_age=max_age, max_dead_letters=max_dead_letters)


def __dir__() -> list[str]:
    """The public names only (not the modules and helpers imported to make them)."""
    return sorted(__all__)
