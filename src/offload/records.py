"""The records users see: Task (what to perform, and the handle enqueue_task returns),
DeadLetter (a call that failed for good) and Stats (counters and a snapshot of the queue)."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tenacity import RetryCallState

    from .policy import RetryPolicy

__all__ = ["DeadLetter", "Stats", "Task"]

# Task ids: a random per-process prefix and a counter. Cheap on the enqueue path (no uuid4,
# no os.urandom per task), unique across processes sharing a durable store, and renewed
# after fork() so that parent and child never hand out the same id.
_prefix = secrets.token_hex(8)
_counter = itertools.count(1)


def _renew_ids() -> None:
    global _prefix, _counter
    _prefix = secrets.token_hex(8)
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_renew_ids)


def new_id() -> str:
    """A fresh task id, also used as the task's idempotency key."""
    return f"{_prefix}{next(_counter):08x}"


class Task:
    """A call to perform in the background, with its per-task options.

    `Task(call, args, kwargs, retry=..., key=...)` is what `enqueue_task` takes when a task
    needs its own RetryPolicy or throttle key; `enqueue_task` returns the Task it queued, a
    handle whose `id` names it in logs and dead letters. `idempotency_key` stays the same
    across retries and replays (sent as `Idempotency-Key` when the HttpCall asks for it).
    Treat a Task as read-only: the offloader keeps its attempt state in private slots.
    """

    __slots__ = (
        "_attempts",
        "_due",
        "_enqueued_at",
        "_failures",
        "_first_attempt_at",
        "_last",
        "_last_attempt_at",
        "_letter",
        "_started",
        "_state",
        "args",
        "call",
        "id",
        "idempotency_key",
        "key",
        "kwargs",
        "retry",
    )

    def __init__(
        self,
        call: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        key: str | None = None,
    ) -> None:
        from .calls import AwsCall, HttpCall, default_key  # noqa: PLC0415 - import cycle
        from .policy import RetryPolicy  # noqa: PLC0415

        if isinstance(call, Task):
            raise TypeError("Task(call=...) takes the call itself, not another Task")
        if not callable(call) and not isinstance(call, (HttpCall, AwsCall)):
            raise TypeError(
                f"a task performs a callable, an offload.http(...) or an offload.aws(...) call; "
                f"got {type(call).__name__}"
            )
        if isinstance(call, (HttpCall, AwsCall)) and (args or kwargs):
            raise TypeError("an HttpCall or AwsCall takes no extra arguments; put them in the call")
        if not isinstance(args, tuple):
            raise TypeError(f"Task(args=...) must be a tuple, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"Task(kwargs=...) must be a mapping, got {type(kwargs).__name__}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"Task(retry=...) must be an offload.RetryPolicy, got {retry!r}")
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(f"Task(key=...) must be a non-empty string or None, got {key!r}")
        self.call = call
        self.args = args
        self.kwargs: Mapping[str, Any] = dict(kwargs) if kwargs else {}
        self.retry = retry
        self.key = key if key is not None else default_key(call)
        self.id = new_id()
        self.idempotency_key = self.id
        self._reset()

    @classmethod
    def _fast(cls, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Task:
        """The enqueue hot path for a plain callable: checks done by the caller."""
        self = cls.__new__(cls)
        self.call = call
        self.args = args
        self.kwargs = kwargs
        self.retry = None
        self.key = None
        self.id = self.idempotency_key = f"{_prefix}{next(_counter):08x}"
        self._attempts = self._failures = 0
        self._state = self._first_attempt_at = self._last_attempt_at = None
        self._started = self._last = self._letter = None
        self._due = 0.0
        self._enqueued_at = 0.0
        return self

    def _reset(self) -> None:
        """A fresh attempt budget (new tasks and replays); the ids stay."""
        self._attempts = 0  # calls made
        self._failures = 0  # attempts that ended in a non-throttled retry
        self._state: RetryCallState | None = None  # tenacity's view, made on first failure
        self._first_attempt_at: float | None = None  # wall clock (epoch seconds)
        self._last_attempt_at: float | None = None
        self._started: float | None = None  # monotonic, at the first attempt
        self._last: Any = None  # the last Outcome
        self._letter: DeadLetter | None = None  # the dead letter this task became, if any
        self._due = 0.0  # monotonic time the task may run again
        self._enqueued_at = 0.0  # monotonic

    @property
    def attempts(self) -> int:
        """Calls made so far."""
        return self._attempts

    def __repr__(self) -> str:
        from .calls import describe_target  # noqa: PLC0415

        return f"<offload.Task {self.id} {describe_target(self.call)}>"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A call that failed for good, kept for people to inspect, replay or discard.

    `reason` is "exhausted" (retries or time used up), "permanent" (an error retrying
    cannot fix) or "shutdown" (still undelivered when a memory-store offloader stopped).
    `description` and `error` never hold secrets (see the README's redaction rules).
    """

    id: str
    task_id: str
    description: str
    key: str | None
    attempts: int
    error: str
    status: int | None
    reason: str
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with ISO 8601 datetimes (as the CLI prints with --json)."""
        return {
            "id": self.id,
            "task_id": self.task_id,
            "description": self.description,
            "key": self.key,
            "attempts": self.attempts,
            "error": self.error,
            "status": self.status,
            "reason": self.reason,
            "first_attempt_at": _iso(self.first_attempt_at),
            "last_attempt_at": _iso(self.last_attempt_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True, slots=True)
class Stats:
    """Counters since the offloader was made, and a snapshot of what it holds now.

    The memory store keeps the ledger exact:
    `enqueued == succeeded + dead_lettered + queued + delayed + in_flight`.

    Over a durable store the counters are this process's and tasks pass through it:
    `claimed` (taken from the store to perform, including those leased as they were
    enqueued) `== succeeded + dead_lettered + released + queued + in_flight`, where
    `released` counts tasks handed back (retries, shutdown). `stored_ready`,
    `stored_delayed` and `stored_leased` are what the store holds now for every process
    (None for the memory store).
    """

    enqueued: int
    succeeded: int
    retried: int
    dead_lettered: int
    rejected: int
    queued: int
    delayed: int
    in_flight: int
    dead_letters: int
    dead_letters_dropped: int
    worker_running: bool
    claimed: int = 0
    released: int = 0
    stored_ready: int | None = None
    stored_delayed: int | None = None
    stored_leased: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
