"""A task as a durable store keeps it: one JSON form, written and read here only.

`TaskRecord` is every field a store keeps of a task: its ids, throttle key, the call as
JSON text (`dump_call`), its own RetryPolicy as JSON text (or None), and its attempt
state. A store that keeps a task as one document (an SQS message) uses `to_json` /
`from_json`; one that keeps columns (SQLite) uses the fields by name (`_fields`).

The call's text: `{"offload": 1, "target": ..., "args": [...], "kwargs": {...}}`, where
the target is an HttpCall's or AwsCall's own `to_json()`, or `{"type": "function",
"path": "module:qualname"}` (see `codec.trust`). JSON only, never pickle: unpickling a
tampered file runs code, and a pickle ties the file to one version of the code.

A record that cannot be read back (tampered, or naming a function this process cannot
import) becomes a Task whose call is `Unreadable`: performing it raises GiveUp, so that
the worker dead-letters it with reason "permanent" and goes on, and the raw text is kept
with the dead letter for a replay once the cause is fixed.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

from .._redact import redact_text
from ..calls.aws_call import AwsCall
from ..calls.base import PERFORMED, Call
from ..calls.http_call import HttpCall
from ..errors import GiveUp, NotSerializable
from ..policy import RetryPolicy
from ..records import Progress, Task
from .trust import TRUST_ANY, Trust, name_of, task_function_path
from .values import check_record, dumps, json_problem, loads

__all__ = [
    "CALL_FORMAT",
    "TaskRecord",
    "Unreadable",
    "attempt_state",
    "describe_call",
    "dump_call",
    "load_call",
]

CALL_FORMAT = 1

# A web process enqueues the same few functions over and over: the checked path (as the
# text's fixed opening) is remembered per function. The opening is what a full encoding
# of the record would write, so that `load_call` reads both alike.
_openings: dict[Any, str] = {}
_MAX_OPENINGS = 4_096
_SCALARS = frozenset({str, int, bool, type(None)})
_TEXT = frozenset({str})
_SURROGATE = re.compile("[\ud800-\udfff]")


def dump_call(call: Call, args: Any, kwargs: Any) -> str:
    """The JSON text of what a task performs; NotSerializable says what cannot be stored.

    Arguments must be exact JSON types (dict with str keys, list, str, int, finite float,
    bool, None) so that the worker gets back exactly what was enqueued: a tuple, a
    datetime or a set is refused, with its position named.
    """
    if isinstance(call, PERFORMED):
        if args or kwargs:
            raise TypeError(f"{type(call).__name__} takes no arguments; put them in the call")
        return _storable(
            f'{{"offload":{CALL_FORMAT},"target":{call.json_text()},"args":[],"kwargs":{{}}}}'
        )
    try:
        opening = _openings.get(call)
    except TypeError:  # an unhashable callable object: not a function a path can name
        opening = None
        task_function_path(call)  # raises NotSerializable, saying why
    if opening is None:
        target = {"type": "function", "path": task_function_path(call)}
        opening = f'{{"offload":{CALL_FORMAT},"target":{dumps(target)},"args":'
        if len(_openings) >= _MAX_OPENINGS:
            _openings.clear()
        _openings[call] = opening
    # Text, whole numbers, flags and None (what most calls pass) need no deeper look;
    # anything else is checked: a tuple, a set or a datetime would not come back as it was.
    if not (
        _SCALARS.issuperset(map(type, args))
        and _SCALARS.issuperset(map(type, kwargs.values()))
        and _TEXT.issuperset(map(type, kwargs))
    ):
        problem = json_problem(list(args), "args") or json_problem(dict(kwargs), "kwargs")
        if problem:
            raise NotSerializable(f"cannot store a task for {name_of(call)}: {problem}")
        args, kwargs = list(args), dict(kwargs)
    try:
        # Most calls pass keywords only: no encoder call for the empty positional list.
        text = f'{opening}{dumps(args) if args else "[]"},"kwargs":{dumps(kwargs)}}}'
    except ValueError:  # the values are checked: only an int too long to write is left
        raise NotSerializable(
            f"cannot store a task for {name_of(call)}: an argument is an int of more digits "
            "than Python writes as text (sys.get_int_max_str_digits()); pass it as a str"
        ) from None
    return _storable(text)


def _storable(text: str) -> str:
    """`text` with each lone surrogate (os.fsdecode's for an undecodable byte), which no
    store can encode, written as JSON's escape: it reads back the same."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)


def load_call(
    text: str | bytes, trust: Trust = TRUST_ANY
) -> tuple[Call, tuple[Any, ...], dict[str, Any]]:
    """(call, args, kwargs) from `dump_call` text; ValueError for a malformed record, or
    one naming a function `trust` refuses (then nothing is imported)."""
    try:
        record = loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"malformed task record: {exc}") from None
    if not isinstance(record, dict) or set(record) != {"offload", "target", "args", "kwargs"}:
        raise ValueError("malformed task record: expected offload, target, args and kwargs")
    if record["offload"] != CALL_FORMAT:
        raise ValueError(f"unsupported task record format {record['offload']!r}")
    target, args, kwargs = record["target"], record["args"], record["kwargs"]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("malformed task record: args must be a list and kwargs an object")
    if not isinstance(target, dict):
        raise ValueError("malformed task record: target must be an object")
    kind = target.get("type")
    call: Call
    if kind == "http":
        call = HttpCall.from_json(target)
    elif kind == "aws":
        call = AwsCall.from_json(target)
    elif kind == "function":
        check_record(target, "function", {"path"})
        call = trust.resolve(target["path"])
    else:
        raise ValueError(f"malformed task record: unknown target type {kind!r}")
    if not callable(call) and (args or kwargs):
        raise ValueError("malformed task record: an http or aws call takes no arguments")
    return call, tuple(args), kwargs


def describe_call(text: str) -> str:
    """What a stored call performs, without importing the function it names (listings of
    dead letters made by another process); never raises."""
    try:
        target = json.loads(text)["target"]
        kind = target["type"]
        if kind == "http":
            return HttpCall.from_json(target).describe()
        if kind == "aws":
            return AwsCall.from_json(target).describe()
        if kind == "function":
            return redact_text(str(target["path"]).replace(":", "."))
    except Exception:  # a description must never break a listing
        pass
    return "(unreadable task)"


class Unreadable:
    """The call of a stored task that cannot be loaded here: performing it raises GiveUp.

    `raw` keeps the stored call text and `raw_retry` the policy text, so that the dead
    letter it becomes can be replayed once the cause (a module not importable by this
    worker, say) is fixed.
    """

    def __init__(self, task_id: str, raw: str, raw_retry: str | None, error: str) -> None:
        self.raw = raw
        self.raw_retry = raw_retry
        self.error = error
        # Read by describe_target(): the dead letter names what it can without the record.
        self.__module__ = None  # type: ignore[assignment]
        what = describe_call(raw)
        self.__qualname__ = (
            f"<unreadable task {task_id}>" if what == "(unreadable task)" else f"{what} (refused)"
        )

    def __call__(self) -> None:
        raise GiveUp(f"unreadable task record: {self.error}")

    def __repr__(self) -> str:
        return f"<offload unreadable task record: {self.error}>"


def attempt_state(task: Task) -> tuple[int, int, float | None, float | None]:
    """(attempts, failures, first_attempt_at, last_attempt_at): what a store updates when
    a task comes back for a retry."""
    meta = task._meta
    progress = None if meta is None else meta.progress
    if progress is None:
        return 0, 0, None, None
    return (
        progress.attempts,
        progress.failures,
        progress.first_attempt_at,
        progress.last_attempt_at,
    )


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"bad {what} {value!r}")
    return value


def _stamp(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"bad {what} {value!r}")
    return float(value)


def _window(value: Any) -> float:
    seconds = _stamp(value, "dedup window")
    if seconds is None or seconds < 0:
        raise ValueError(f"bad dedup window {value!r}")
    return seconds


def _text(value: Any, what: str, optional: bool = False) -> Any:
    if not (isinstance(value, str) or (optional and value is None)):
        raise ValueError(f"{what} must be text")
    return value


_new_record = tuple.__new__
_NEW_STATE = (0, 0, None, None, None, 0.0)  # TaskRecord's defaults, attempts onwards


class TaskRecord(NamedTuple):
    """Every field a durable store keeps of a task (see the module docstring). A named
    tuple: made on every durable enqueue, it costs a tuple."""

    id: str
    idempotency_key: str
    key: str | None
    call: str  # dump_call's text
    retry: str | None  # RetryPolicy.to_json's text, or None for the consumer's policy
    attempts: int = 0
    failures: int = 0
    first_attempt_at: float | None = None  # epoch seconds
    last_attempt_at: float | None = None
    dedup_key: str | None = None  # held while the task lives, for dedup_window after
    dedup_window: float = 0.0

    @classmethod
    def of(cls, task: Task) -> TaskRecord:
        """What a store keeps of `task`; NotSerializable if it cannot be stored. An
        Unreadable call keeps the text it was read from."""
        call = task.call
        meta = task.meta
        if isinstance(call, Unreadable):
            text, retry = call.raw, call.raw_retry
        else:
            text = dump_call(call, task.args, task.kwargs)
            policy = meta.retry
            retry = None if policy is None else policy.to_json()
        progress = meta.progress
        if progress is None:
            if meta.dedup_key is None:  # a new task (the enqueue path): the tuple, made in C
                return _new_record(
                    cls, (meta.id, meta.idempotency_key, meta.key, text, retry, *_NEW_STATE)
                )
            return cls(
                meta.id,
                meta.idempotency_key,
                meta.key,
                text,
                retry,
                dedup_key=meta.dedup_key,
                dedup_window=meta.dedup_window,
            )
        return cls(
            meta.id,
            meta.idempotency_key,
            meta.key,
            text,
            retry,
            progress.attempts,
            progress.failures,
            progress.first_attempt_at,
            progress.last_attempt_at,
            meta.dedup_key,
            meta.dedup_window,
        )

    def load(self, trust: Trust = TRUST_ANY) -> Task:
        """The Task this record describes, with its ids and attempt state.

        Never raises for a bad record: the Task then performs an `Unreadable` call (its
        attempt state dropped). The monotonic start time (`Progress.started`) is left for
        the offloader to rebuild from `first_attempt_at`, on its own clock.
        """
        try:
            task_id = _text(self.id, "task id")
            idempotency_key = _text(self.idempotency_key, "idempotency key")
            key = _text(self.key, "task key", optional=True)
            call, args, kwargs = load_call(self.call, trust)
            policy = None if self.retry is None else RetryPolicy.from_json(self.retry, trust)
            progress = None
            if self.attempts or self.failures or self.first_attempt_at is not None:
                progress = Progress(
                    _count(self.attempts, "attempt count"),
                    _count(self.failures, "failure count"),
                    _stamp(self.first_attempt_at, "attempt time"),
                    _stamp(self.last_attempt_at, "attempt time"),
                )
            dedup_key = _text(self.dedup_key, "dedup key", optional=True)
            dedup_window = _window(self.dedup_window)
        except (ValueError, TypeError, RecursionError) as exc:
            return self.unreadable(str(exc))
        return Task._restore(
            call,
            args,
            kwargs,
            task_id=task_id,
            idempotency_key=idempotency_key,
            key=key,
            retry=policy,
            progress=progress,
            dedup_key=dedup_key,
            dedup_window=dedup_window,
        )

    def unreadable(self, error: str) -> Task:
        """A task that dead-letters itself with `error`, keeping this record's text."""
        raw_retry = self.retry if isinstance(self.retry, str) else None
        task_id = str(self.id)
        try:
            window = _window(self.dedup_window)
        except ValueError:
            window = 0.0
        return Task._restore(
            Unreadable(task_id, str(self.call), raw_retry, error),
            (),
            {},
            task_id=task_id,
            idempotency_key=str(self.idempotency_key),
            key=self.key if isinstance(self.key, str) else None,
            retry=None,
            progress=None,
            # Kept, so that its dead letter lets the key go (else it is held for good).
            dedup_key=self.dedup_key if isinstance(self.dedup_key, str) else None,
            dedup_window=window,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return self._asdict()

    @classmethod
    def from_json(cls, data: Any) -> TaskRecord:
        """The record `to_json` gave; ValueError when an id, the key, the call text or an
        attempt field is of the wrong type. (The call is checked when it is loaded.)"""
        if not isinstance(data, dict):
            raise ValueError("malformed offload task record: not an object")
        task_id = data.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("malformed offload task record: id must be a string")
        try:
            return cls(
                id=task_id,
                idempotency_key=_text(data.get("idempotency_key", task_id), "idempotency_key"),
                key=_text(data.get("key"), "key", optional=True),
                call=_text(data.get("call"), "call"),
                retry=_text(data.get("retry"), "retry", optional=True),
                attempts=_count(data.get("attempts", 0), "attempts"),
                failures=_count(data.get("failures", 0), "failures"),
                first_attempt_at=_stamp(data.get("first_attempt_at"), "first_attempt_at"),
                last_attempt_at=_stamp(data.get("last_attempt_at"), "last_attempt_at"),
                dedup_key=_text(data.get("dedup_key"), "dedup_key", optional=True),
                dedup_window=_window(data.get("dedup_window", 0.0)),
            )
        except ValueError as exc:
            raise ValueError(f"malformed offload task record: {exc}") from None
