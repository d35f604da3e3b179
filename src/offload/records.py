"""The records that flow through offload: Task (what to perform, and the handle
enqueue_task returns) and DeadLetter (a call that failed for good). What an offloader
reports of itself (Stats, KeyState, Health) is in status.py.

A Task is four slots: `call`, `args`, `kwargs`, and `_meta`, its identity and options
(`TaskMeta`), which holds its attempt state (`Progress`) once it has made an attempt. A
plain callable's task, which `enqueue_task` makes on its hot path, has no `_meta` until
something needs its id: a queued task costs what the `(fn, kwargs)` tuple of a
hand-written queue costs.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

# Imported here, not in Task.__init__: an import statement costs a microsecond per call.
from .calls.base import PERFORMED, default_key, describe_target
from .outcome import REASONS, Outcome, Reason
from .policy import RetryPolicy

if TYPE_CHECKING:
    from tenacity import RetryCallState

__all__ = [
    "DeadLetter",
    "Progress",
    "Task",
    "TaskMeta",
    "new_id",
    "utc",
]

# Task ids: a random per-process prefix and a counter. Cheap on the enqueue path (no uuid4,
# no os.urandom per task), unique across processes sharing a durable store, and renewed
# after fork() so that parent and child never hand out the same id.
_prefix = secrets.token_hex(8)
_counter = itertools.count(1)
_meta_lock = threading.Lock()  # a worker and a handler may both make a fast task's meta


_ids_pid = os.getpid()  # the process `_prefix` was made in
_renew_locks: dict[int, threading.Lock] = {}  # by process: a lock held at fork stays held


def _renew_ids() -> None:
    global _prefix, _counter, _meta_lock, _ids_pid
    _prefix = secrets.token_hex(8)
    _counter = itertools.count(1)
    _meta_lock = threading.Lock()  # another thread may have held it at fork()
    _ids_pid = os.getpid()


os.register_at_fork(after_in_child=_renew_ids)


def renew_ids_after_fork() -> None:
    """Ids of this process's own in a child forked without the fork hooks (uWSGI's
    default): sibling workers would make the same ids, and over a shared store one's task
    would take the other's place."""
    if _ids_pid != os.getpid():
        with _renew_locks.setdefault(os.getpid(), threading.Lock()):
            if _ids_pid != os.getpid():
                _renew_ids()


def new_id() -> str:
    """A fresh task id, also used as the task's idempotency key."""
    if _ids_pid != os.getpid():  # (a Task made before the child's first enqueue)
        renew_ids_after_fork()
    return f"{_prefix}{next(_counter):08x}"


class Progress:
    """A task's attempt state: what its retry policy reads and a durable store keeps.

    Times: `first_attempt_at` and `last_attempt_at` are wall-clock epoch seconds (shared
    with other processes through a store); `started` is the offloader clock's monotonic
    reading at the first attempt, rebuilt from `first_attempt_at` by a process that
    continues another's task.
    """

    __slots__ = (
        "attempts",
        "failures",
        "first_attempt_at",
        "last",
        "last_attempt_at",
        "letter",
        "started",
        "tenacity",
    )

    def __init__(
        self,
        attempts: int = 0,
        failures: int = 0,
        first_attempt_at: float | None = None,
        last_attempt_at: float | None = None,
    ) -> None:
        self.attempts = attempts  # calls made
        self.failures = failures  # attempts that ended in a non-throttled retry
        self.first_attempt_at = first_attempt_at
        self.last_attempt_at = last_attempt_at
        self.started: float | None = None
        self.last: Outcome | None = None  # the last attempt's outcome
        self.tenacity: RetryCallState | None = None  # tenacity's view, made on first failure
        self.letter: DeadLetter | None = None  # the dead letter the task became, if any

    def __repr__(self) -> str:
        return f"Progress(attempts={self.attempts}, failures={self.failures})"


def not_performable(call: Any) -> str:
    """What a refused `call` is, for its TypeError. A coroutine (`fn(x)` where `fn(x)`'s
    function was meant) is closed, so that refusing it warns of no coroutine never awaited."""
    if inspect.iscoroutine(call):
        call.close()
        return (
            f"the coroutine {call.__qualname__}(...); pass the async function and its "
            "arguments, not the result of calling it"
        )
    return type(call).__name__


class TaskMeta:
    """A task's identity and options; `progress` once it has made an attempt."""

    __slots__ = (
        "at",
        "dedup_key",
        "dedup_window",
        "delay",
        "enqueued",
        "id",
        "idempotency_key",
        "key",
        "progress",
        "retry",
    )

    def __init__(
        self,
        key: str | None,
        retry: RetryPolicy | None,
        *,
        enqueued: bool = False,
        task_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        self.id = task_id if task_id is not None else new_id()
        self.idempotency_key = idempotency_key if idempotency_key is not None else self.id
        self.key = key
        self.retry = retry
        self.enqueued = enqueued  # handed to an offloader (a Task is enqueued once)
        self.progress: Progress | None = None
        self.delay = 0.0  # seconds after the enqueue the first attempt may be made
        self.at: float | None = None  # or: epoch seconds it may be made at
        self.dedup_key: str | None = None
        self.dedup_window = 0.0  # seconds the key stays taken after the task ended

    @classmethod
    def fresh(cls, key: str | None) -> TaskMeta:
        """A new task's meta, as `__init__` makes it with no options: the enqueue path's."""
        self = cls.__new__(cls)
        self.id = self.idempotency_key = f"{_prefix}{next(_counter):08x}"
        self.key = key
        self.retry = None
        self.enqueued = False
        self.progress = None
        self.delay = 0.0
        self.at = None
        self.dedup_key = None
        self.dedup_window = 0.0
        return self


class Task:
    """A call to perform in the background, with its per-task options.

    `Task(call, args, kwargs, retry=..., key=...)` is what `enqueue_task` takes when a task
    needs its own RetryPolicy or throttle key; `enqueue_task` returns the Task it queued, a
    handle whose `id` names it in logs and dead letters. `idempotency_key` stays the same
    across retries and replays (sent as `Idempotency-Key` when the HttpCall asks for it).
    Treat a Task as read-only: the offloader keeps its attempt state in `progress`.
    """

    __slots__ = ("_meta", "args", "call", "kwargs")

    call: Any
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    _meta: TaskMeta | None  # None: a task enqueue_task made, untouched since

    def __init__(
        self,
        call: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        key: str | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        dedup_key: str | None = None,
        dedup_window: float | timedelta = 0.0,
    ) -> None:
        if isinstance(call, Task):
            raise TypeError("Task(call=...) takes the call itself, not another Task")
        if not callable(call) and not isinstance(call, PERFORMED):
            raise TypeError(
                f"a task performs a callable, an offload.http(...) or an offload.aws(...) call; "
                f"got {not_performable(call)}"
            )
        if isinstance(call, PERFORMED) and (args or kwargs):
            raise TypeError("an HttpCall or AwsCall takes no extra arguments; put them in the call")
        if not isinstance(args, tuple):
            raise TypeError(f"Task(args=...) must be a tuple, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"Task(kwargs=...) must be a mapping, got {type(kwargs).__name__}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"Task(retry=...) must be an offload.RetryPolicy, got {retry!r}")
        if key is not None:
            _check_key("key", key)
        self.call = call
        self.args = args
        self.kwargs = dict(kwargs) if kwargs else {}
        meta = self._meta = TaskMeta(key if key is not None else default_key(call), retry)
        if delay is not None or at is not None:
            meta.delay, meta.at = _check_when(delay, at)
        if dedup_key is not None or dedup_window:
            meta.dedup_key, meta.dedup_window = _check_dedup(dedup_key, dedup_window)

    @classmethod
    def _fast(cls, call: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Task:
        """The enqueue hot path (a plain callable, or a call with no options): checks done
        by the caller; no meta (and so no id) until one is needed."""
        self = cls.__new__(cls)
        self.call = call
        self.args = args
        self.kwargs = kwargs
        self._meta = None
        return self

    @classmethod
    def _restore(
        cls,
        call: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        task_id: str,
        idempotency_key: str,
        key: str | None,
        retry: RetryPolicy | None,
        progress: Progress | None,
        dedup_key: str | None = None,
        dedup_window: float = 0.0,
    ) -> Task:
        """A task as a store gives it back: its ids, options and attempt state."""
        self = cls.__new__(cls)
        self.call = call
        self.args = args
        self.kwargs = kwargs
        meta = self._meta = TaskMeta(
            key, retry, task_id=task_id, idempotency_key=idempotency_key, enqueued=True
        )
        meta.progress = progress
        meta.dedup_key, meta.dedup_window = dedup_key, dedup_window
        return self

    @property
    def meta(self) -> TaskMeta:
        """The task's identity and options, made (with its id) if it has none yet."""
        meta = self._meta
        if meta is not None:
            return meta
        with _meta_lock:  # a worker's first attempt and a handler reading task.id, at once
            meta = self._meta
            if meta is None:
                meta = self._meta = TaskMeta.fresh(default_key(self.call))
                meta.enqueued = True
            return meta

    def _own_meta(self) -> TaskMeta:
        """`meta` for a task no other thread can see yet (one `enqueue_task` just made):
        made without the lock."""
        meta = self._meta
        if meta is None:
            meta = self._meta = TaskMeta.fresh(default_key(self.call))
        return meta

    @property
    def id(self) -> str:
        """The task's id, unique across the processes sharing a store."""
        return self.meta.id

    @property
    def idempotency_key(self) -> str:
        """The same on every attempt and replay; the id unless a store kept another."""
        return self.meta.idempotency_key

    @property
    def key(self) -> str | None:
        """The throttle key: the API this task calls (None for a plain callable)."""
        meta = self._meta
        return default_key(self.call) if meta is None else meta.key

    @property
    def retry(self) -> RetryPolicy | None:
        """This task's own RetryPolicy, or None for the offloader's."""
        meta = self._meta
        return None if meta is None else meta.retry

    @property
    def delay(self) -> float:
        """Seconds after its enqueue the task's first attempt may be made (0.0: at once)."""
        meta = self._meta
        return 0.0 if meta is None else meta.delay

    @property
    def at(self) -> datetime | None:
        """The time the task's first attempt may be made, if it was given one."""
        meta = self._meta
        return None if meta is None or meta.at is None else utc(meta.at)

    @property
    def dedup_key(self) -> str | None:
        """While a task with this key is held, an enqueue of another adds nothing."""
        meta = self._meta
        return None if meta is None else meta.dedup_key

    @property
    def dedup_window(self) -> float:
        """Seconds the dedup key stays taken after the task ended."""
        meta = self._meta
        return 0.0 if meta is None else meta.dedup_window

    def due(self, now: float) -> float | None:
        """The epoch time the task's first attempt may be made, enqueued at `now` (epoch
        seconds); None when at once."""
        meta = self._meta
        if meta is None:
            return None
        if meta.at is not None:
            return meta.at if meta.at > now else None
        return now + meta.delay if meta.delay > 0 else None

    @property
    def progress(self) -> Progress:
        """The task's attempt state (made on first use)."""
        meta = self.meta
        progress = meta.progress
        if progress is None:
            progress = meta.progress = Progress()
        return progress

    @property
    def attempts(self) -> int:
        """Calls made so far."""
        meta = self._meta
        return 0 if meta is None or meta.progress is None else meta.progress.attempts

    @property
    def enqueued(self) -> bool:
        """True once the task was handed to an offloader (a Task is enqueued once)."""
        meta = self._meta
        return meta is None or meta.enqueued

    def _restart(self) -> None:
        """A fresh attempt budget, not yet enqueued (a replay); the ids stay. Due now, as
        every store replays: its delay was served before its first attempt."""
        meta = self.meta
        meta.progress = None
        meta.enqueued = False
        meta.delay, meta.at = 0.0, None

    def __repr__(self) -> str:
        return f"<offload.Task {self.id} {describe_target(self.call)}>"


def _check_when(delay: Any, at: Any) -> tuple[float, float | None]:
    """Task(delay=..., at=...): (seconds, epoch or None); ValueError or TypeError naming it."""
    if delay is not None and at is not None:
        raise ValueError("give Task(delay=...) or Task(at=...), not both")
    if at is not None:
        if not isinstance(at, datetime):
            raise TypeError(f"Task(at=...) must be a datetime, got {type(at).__name__}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(
                "Task(at=...) must be a timezone-aware datetime "
                "(datetime.now(timezone.utc) + timedelta(...)): a naive one is ambiguous"
            )
        return 0.0, at.timestamp()
    if isinstance(delay, timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise TypeError(
            f"Task(delay=...) must be seconds or a timedelta, got {type(delay).__name__}"
        )
    else:
        seconds = float(delay)
    if not (0 <= seconds < math.inf):
        raise ValueError(f"Task(delay=...) must be >= 0 seconds and finite, got {delay!r}")
    return seconds, None


def _check_key(name: str, key: Any) -> None:
    """A key is non-empty text every store can write: a lone surrogate (os.fsdecode's for
    an undecodable byte) would fail the durable stores' encoding after the enqueue."""
    if not isinstance(key, str):
        raise TypeError(f"Task({name}=...) must be a str or None, got {type(key).__name__}")
    if key == "":
        raise ValueError(f"Task({name}=...) must be a non-empty string or None")
    if not key.isascii() and any("\ud800" <= char <= "\udfff" for char in key):
        raise ValueError(
            f"Task({name}=...) holds a lone surrogate (os.fsdecode's for an undecodable "
            f"byte), which no store can write: {key!r}"
        )


def _check_dedup(key: Any, window: Any) -> tuple[str | None, float]:
    if key is not None:
        _check_key("dedup_key", key)
    seconds = window.total_seconds() if isinstance(window, timedelta) else window
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(
            f"Task(dedup_window=...) must be seconds or a timedelta, got {type(window).__name__}"
        )
    if not (0 <= seconds < math.inf):
        raise ValueError(f"Task(dedup_window=...) must be >= 0 seconds and finite, got {window!r}")
    if seconds and key is None:
        raise ValueError("Task(dedup_window=...) needs a dedup_key")
    return key, float(seconds)


def utc(ts: float | None) -> datetime | None:
    """Epoch seconds as an aware UTC datetime (None stays None)."""
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


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
    reason: Reason
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None

    @classmethod
    def from_json(cls, data: Any) -> DeadLetter:
        """The dead letter `to_json` described (times as ISO 8601 text or epoch seconds);
        ValueError naming the field that is missing or of the wrong type."""
        if not isinstance(data, Mapping):
            raise ValueError("malformed dead-letter record: not an object")

        def text(name: str, optional: bool = False) -> Any:
            value = data.get(name)
            if not (isinstance(value, str) or (optional and value is None)):
                raise ValueError(f"malformed dead-letter record: {name}")
            return value

        def number(name: str, optional: bool = False) -> Any:
            value = data.get(name)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"malformed dead-letter record: {name}")
            return value

        def when(name: str) -> datetime | None:
            value = data.get(name)
            try:
                if isinstance(value, str):
                    return datetime.fromisoformat(value)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return utc(float(value))
            except (ValueError, OverflowError, OSError):
                pass
            if value is None:
                return None
            raise ValueError(f"malformed dead-letter record: {name}")

        reason = text("reason")
        if reason not in REASONS:
            raise ValueError(f"malformed dead-letter record: reason {reason!r}")
        return cls(
            id=text("id"),
            task_id=text("task_id"),
            description=text("description"),
            key=text("key", optional=True),
            attempts=number("attempts"),
            error=text("error"),
            status=number("status", optional=True),
            reason=reason,
            first_attempt_at=when("first_attempt_at"),
            last_attempt_at=when("last_attempt_at"),
        )

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
