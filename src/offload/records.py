"""The records users see: Task (what to perform, and the handle enqueue_task returns),
DeadLetter (a call that failed for good) and Stats (counters and a snapshot of the queue)."""

from __future__ import annotations

import itertools
import math
import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

# Imported here, not in Task.__init__: an import statement costs a microsecond per call.
from .calls import AwsCall, HttpCall, default_key, describe_target
from .policy import RetryPolicy

if TYPE_CHECKING:
    from tenacity import RetryCallState

__all__ = ["DeadLetter", "Stats", "Task"]

# Task ids: a random per-process prefix and a counter. Cheap on the enqueue path (no uuid4,
# no os.urandom per task), unique across processes sharing a durable store, and renewed
# after fork() so that parent and child never hand out the same id.
_prefix = secrets.token_hex(8)
_counter = itertools.count(1)


def _renew_ids() -> None:
    global _prefix, _counter, _extra_lock
    _prefix = secrets.token_hex(8)
    _counter = itertools.count(1)
    _extra_lock = threading.Lock()  # another thread may have held it at fork()


os.register_at_fork(after_in_child=_renew_ids)


def new_id() -> str:
    """A fresh task id, also used as the task's idempotency key."""
    return f"{_prefix}{next(_counter):08x}"


class _Extra:
    """A Task's options, ids and attempt state, made when first needed (see Task)."""

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
        "call",
        "id",
        "idempotency_key",
        "key",
        "retry",
    )

    def __init__(self, call: Any, enqueued_at: float) -> None:
        self.call = call
        self.retry: RetryPolicy | None = None
        self.key: str | None = None
        self.id = self.idempotency_key = new_id()
        self._attempts = 0  # calls made
        self._failures = 0  # attempts that ended in a non-throttled retry
        self._state: RetryCallState | None = None  # tenacity's view, made on first failure
        self._first_attempt_at: float | None = None  # wall clock (epoch seconds)
        self._last_attempt_at: float | None = None
        self._started: float | None = None  # monotonic, at the first attempt
        self._last: Any = None  # the last Outcome
        self._letter: DeadLetter | None = None  # the dead letter this task became, if any
        self._due = 0.0  # monotonic time the task may run again
        self._enqueued_at = enqueued_at  # monotonic; 0.0 until enqueued


_T = TypeVar("_T")


class _Field(Generic[_T]):
    """A Task attribute kept in its _Extra: reads as `default` while the task has none."""

    __slots__ = ("default", "name")

    def __init__(self, default: _T) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, task: None, owner: type | None = None) -> _Field[_T]: ...
    @overload
    def __get__(self, task: Task, owner: type | None = None) -> _T: ...
    def __get__(self, task: Task | None, owner: type | None = None) -> _T | _Field[_T]:
        if task is None:
            return self
        extra = task._x
        if type(extra) is _Extra:
            return cast("_T", getattr(extra, self.name))
        return self.default

    def __set__(self, task: Task, value: _T) -> None:
        extra = getattr(task, "_x", None)
        if type(extra) is not _Extra:  # (the worker sets several per attempt: stay inline)
            extra = task._extra()
        setattr(extra, self.name, value)


class _IdField:
    """`id` and `idempotency_key`: a task that has no id yet gets one on first read."""

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, task: None, owner: type | None = None) -> _IdField: ...
    @overload
    def __get__(self, task: Task, owner: type | None = None) -> str: ...
    def __get__(self, task: Task | None, owner: type | None = None) -> str | _IdField:
        if task is None:
            return self
        return cast("str", getattr(task._extra(), self.name))

    def __set__(self, task: Task, value: str) -> None:
        setattr(task._extra(), self.name, value)


_extra_lock = threading.Lock()
_UNSET: Any = object()


class Task:
    """A call to perform in the background, with its per-task options.

    `Task(call, args, kwargs, retry=..., key=...)` is what `enqueue_task` takes when a task
    needs its own RetryPolicy or throttle key; `enqueue_task` returns the Task it queued, a
    handle whose `id` names it in logs and dead letters. `idempotency_key` stays the same
    across retries and replays (sent as `Idempotency-Key` when the HttpCall asks for it).
    Treat a Task as read-only: the offloader keeps its attempt state in private attributes.
    """

    # A queued task is held in memory until a worker takes it, so its size is the cost of
    # a backlog: three slots, as small as the `(fn, kwargs)` tuple of a hand-written
    # queue. Everything else (options, ids, attempt state) lives in an _Extra, made when
    # first needed: at construction for a Task(...) or an HTTP/AWS call; for a plain
    # callable's task (which enqueue_task makes with `_fast`) at its first attempt, or when
    # its id is first read (at once over a durable store, which writes the id). Until then
    # `_x` holds the call itself.
    __slots__ = ("_x", "args", "kwargs")

    _x: Any  # the call (a task made by _fast, never touched since), or its _Extra
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]

    retry: _Field[RetryPolicy | None] = _Field(None)
    key: _Field[str | None] = _Field(None)
    id: _IdField = _IdField()
    idempotency_key: _IdField = _IdField()
    _attempts: _Field[int] = _Field(0)
    _failures: _Field[int] = _Field(0)
    _state: _Field[RetryCallState | None] = _Field(None)
    _first_attempt_at: _Field[float | None] = _Field(None)
    _last_attempt_at: _Field[float | None] = _Field(None)
    _started: _Field[float | None] = _Field(None)
    _last: _Field[Any] = _Field(None)
    _letter: _Field[DeadLetter | None] = _Field(None)
    _due: _Field[float] = _Field(0.0)
    # Enqueued as it was made (by _fast): the time is not kept; it reads as infinity.
    _enqueued_at: _Field[float] = _Field(math.inf)

    def __init__(
        self,
        call: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        key: str | None = None,
    ) -> None:
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
        extra = self._x = _Extra(call, 0.0)
        self.args = args
        self.kwargs = dict(kwargs) if kwargs else {}
        extra.retry = retry
        extra.key = key if key is not None else default_key(call)

    @classmethod
    def _fast(
        cls, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, with_id: bool = False
    ) -> Task:
        """The enqueue hot path for a plain callable: checks done by the caller, and the
        task counts as enqueued from the start (see `_enqueued_at`).

        `with_id` makes its _Extra (and so its id) now, for a durable store, which writes
        the id: no other thread can see the task yet, so this needs none of `_extra()`'s
        locking (1.3 us there, 0.7 us here)."""
        self = cls.__new__(cls)
        self._x = _Extra(call, math.inf) if with_id else call
        self.args = args
        self.kwargs = kwargs
        return self

    def _extra(self) -> _Extra:
        """The task's _Extra, made (with the task's id) if it has none yet."""
        extra = getattr(self, "_x", None)
        if type(extra) is _Extra:
            return extra
        # A worker's first attempt and a handler reading task.id may get here at once:
        # exactly one _Extra (and one id) must win.
        with _extra_lock:
            extra = getattr(self, "_x", _UNSET)
            if type(extra) is not _Extra:
                # No _x at all: Task.__new__ without _fast or __init__ (a store's loader).
                fresh = extra is _UNSET
                extra = _Extra(None, 0.0) if fresh else _Extra(extra, math.inf)
                self._x = extra
            return extra

    @property
    def call(self) -> Any:
        """What the task performs: a callable, an HttpCall or an AwsCall."""
        extra = self._x
        return extra.call if type(extra) is _Extra else extra

    @call.setter
    def call(self, value: Any) -> None:
        self._extra().call = value

    def _reset(self) -> None:
        """A fresh attempt budget (new tasks and replays); the ids stay."""
        extra = self._extra()
        extra._attempts = extra._failures = 0
        extra._state = extra._first_attempt_at = extra._last_attempt_at = None
        extra._started = extra._last = extra._letter = None
        extra._due = 0.0
        extra._enqueued_at = 0.0

    @property
    def attempts(self) -> int:
        """Calls made so far."""
        return self._attempts

    def __repr__(self) -> str:
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
