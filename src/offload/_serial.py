"""JSON forms of what durable stores keep: a task's call, its RetryPolicy, its attempt state.

Durable stores hold JSON only, never pickle: unpickling a tampered file runs code, and a
pickle ties the file to one version of the code. A call is `calls.task_to_json`; a
RetryPolicy is its tenacity strategies by name and parameters (the built-in ones only:
a custom strategy is code, refused with NotSerializable); attempt state is four numbers.

A record a store cannot read back (tampered, or naming a function this process cannot
import) becomes a Task whose call raises GiveUp with the reason, so that the worker
dead-letters it with reason "permanent" and goes on, and the raw record is kept with
the dead letter for a replay once the cause is fixed.
"""

from __future__ import annotations

import json
import json.encoder
import math
from collections.abc import Mapping
from typing import Any

from tenacity import stop as _stop
from tenacity import wait as _wait

from .calls import (
    _TASK_FORMAT,
    AwsCall,
    HttpCall,
    _json_problem,
    _name_of,
    callable_path,
    resolve_callable,
    resolve_task_function,
    task_from_json,
    task_function_path,
    task_to_json,
)
from .errors import GiveUp, NotSerializable
from .policy import RetryPolicy
from .records import Task

__all__ = [
    "Unreadable",
    "dump_call",
    "dump_policy",
    "load_policy",
    "load_task",
    "stored_call",
    "task_from_record",
    "task_to_record",
]

# -- calls ------------------------------------------------------------------------------

# callable_path() imports a function back to check it, and json.dumps with options builds
# an encoder per call: a web process enqueues the same few functions over and over, so the
# checked path (as the record's fixed opening text) is remembered per function, and one C
# encoder is kept. The text is what calls.task_to_json writes (task_from_json reads both).
_openings: dict[Any, str] = {}
_MAX_OPENINGS = 4_096
_SCALARS = frozenset({str, int, bool, type(None)})
_TEXT = frozenset({str})

_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # the C accelerator
if _c_make_encoder is not None:
    # Arguments: markers (no cycle check: the values are checked first), default, string
    # encoder, indent, key and item separators, sort_keys, skipkeys, allow_nan.
    _c_encode = _c_make_encoder(
        None, None, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def _encode(value: Any) -> str:
        return "".join(_c_encode(value, 0))

else:  # pragma: no cover - a Python without it (PyPy)
    _encode_slowly = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode

    def _encode(value: Any) -> str:
        return _encode_slowly(value)


def dump_call(task: Task) -> str:
    """The JSON text of what `task` performs; NotSerializable says what cannot be stored."""
    call = task.call
    if isinstance(call, (HttpCall, AwsCall)):
        return task_to_json(call, task.args, task.kwargs)
    try:
        opening = _openings.get(call)
    except TypeError:  # an unhashable callable object: task_to_json refuses it
        return task_to_json(call, task.args, task.kwargs)
    if opening is None:
        target = {"type": "function", "path": task_function_path(call)}
        opening = f'{{"offload":{_TASK_FORMAT},"target":{_encode(target)},"args":'
        if len(_openings) >= _MAX_OPENINGS:
            _openings.clear()
        _openings[call] = opening
    args: Any = task.args
    kwargs: Any = task.kwargs
    # Text, whole numbers, flags and None (what most calls pass) need no deeper look;
    # anything else is checked: a tuple, a set or a datetime would not come back as it was.
    # (Sets of the types seen: 0.4 us where a loop in Python over the items takes 0.75.)
    if not (
        _SCALARS.issuperset(map(type, args))
        and _SCALARS.issuperset(map(type, kwargs.values()))
        and _TEXT.issuperset(map(type, kwargs))
    ):
        problem = _json_problem(list(args), "args") or _json_problem(dict(kwargs), "kwargs")
        if problem:
            raise NotSerializable(f"cannot store a task for {_name_of(call)}: {problem}")
        args, kwargs = list(args), dict(kwargs)
    # Most calls pass keywords only: no encoder call for the empty positional list.
    return f'{opening}{_encode(args) if args else "[]"},"kwargs":{_encode(kwargs)}}}'


# -- retry policies ---------------------------------------------------------------------

# The tenacity strategies a policy may use, with the attributes that make each one up.
_STOPS: dict[str, tuple[type[Any], tuple[str, ...]]] = {
    "stop_after_attempt": (_stop.stop_after_attempt, ("max_attempt_number",)),
    "stop_after_delay": (_stop.stop_after_delay, ("max_delay",)),
    "stop_before_delay": (_stop.stop_before_delay, ("max_delay",)),
    "stop_never": (type(_stop.stop_never), ()),
}
_WAITS: dict[str, tuple[type[Any], tuple[str, ...]]] = {
    "wait_none": (_wait.wait_none, ("wait_fixed",)),
    "wait_fixed": (_wait.wait_fixed, ("wait_fixed",)),
    "wait_random": (_wait.wait_random, ("wait_random_min", "wait_random_max")),
    "wait_incrementing": (_wait.wait_incrementing, ("start", "increment", "max")),
    "wait_exponential": (_wait.wait_exponential, ("multiplier", "min", "max", "exp_base")),
    "wait_random_exponential": (
        _wait.wait_random_exponential,
        ("multiplier", "min", "max", "exp_base"),
    ),
    "wait_exponential_jitter": (
        _wait.wait_exponential_jitter,
        ("multiplier", "max", "exp_base", "jitter", "min"),
    ),
}
_STOP_GROUPS = {"stop_any": (_stop.stop_any, "stops"), "stop_all": (_stop.stop_all, "stops")}
_WAIT_GROUPS = {
    "wait_combine": (_wait.wait_combine, "wait_funcs"),
    "wait_chain": (_wait.wait_chain, "strategies"),
}


def _dump_strategy(
    value: Any,
    simple: Mapping[str, tuple[type[Any], tuple[str, ...]]],
    groups: Mapping[str, tuple[type[Any], str]],
    what: str,
) -> dict[str, Any]:
    kind = type(value)
    for name, (cls, attrs) in simple.items():
        if kind is cls:
            record: dict[str, Any] = {"type": name}
            for attr in attrs:
                number = getattr(value, attr)
                if isinstance(number, bool) or not isinstance(number, (int, float)):
                    raise NotSerializable(f"{what} {name} has a non-numeric {attr}: {number!r}")
                if not math.isfinite(number):
                    raise NotSerializable(f"{what} {name} has {attr}={number!r}")
                record[attr] = number
            return record
    for name, (cls, attr) in groups.items():
        if kind is cls:
            members = getattr(value, attr)
            return {"type": name, "of": [_dump_strategy(m, simple, groups, what) for m in members]}
    raise NotSerializable(
        f"{what} {kind.__module__}.{kind.__qualname__} cannot be stored: a durable store keeps "
        "tenacity's built-in strategies only (a custom one is code)"
    )


def _load_strategy(
    data: Any,
    simple: Mapping[str, tuple[type[Any], tuple[str, ...]]],
    groups: Mapping[str, tuple[type[Any], str]],
    depth: int = 0,
) -> Any:
    if depth > 20 or not isinstance(data, dict):
        raise ValueError("malformed retry strategy")
    name = data.get("type")
    if not isinstance(name, str):
        raise ValueError("malformed retry strategy: no type")
    if name in simple:
        cls, attrs = simple[name]
        if set(data) != {"type", *attrs}:
            raise ValueError(f"malformed {name} strategy")
        if cls is type(_stop.stop_never):
            return _stop.stop_never
        strategy = object.__new__(cls)
        for attr in attrs:
            number = data[attr]
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ValueError(f"malformed {name} strategy: {attr} is not a number")
            setattr(strategy, attr, number)
        return strategy
    if name in groups:
        cls, attr = groups[name]
        members = data.get("of")
        if set(data) != {"type", "of"} or not isinstance(members, list):
            raise ValueError(f"malformed {name} strategy")
        return cls(*(_load_strategy(m, simple, groups, depth + 1) for m in members))
    raise ValueError(f"unknown retry strategy {name!r}")


def dump_policy(policy: RetryPolicy | None) -> str | None:
    """The JSON text of a per-task RetryPolicy (None for none); NotSerializable if it holds
    code: a custom strategy, or a retry_on predicate or exception type that another
    process cannot import."""
    if policy is None:
        return None
    retry_on = policy.retry_on
    if isinstance(retry_on, tuple):
        on: dict[str, Any] = {"types": [_type_path(t) for t in retry_on]}
    else:
        try:
            on = {"predicate": task_function_path(retry_on)}  # called: as a task's function
        except NotSerializable as exc:
            raise NotSerializable(f"RetryPolicy(retry_on=...) cannot be stored: {exc}") from None
    record = {
        "stop": _dump_strategy(policy.stop, _STOPS, _STOP_GROUPS, "RetryPolicy(stop=...)"),
        "wait": _dump_strategy(policy.wait, _WAITS, _WAIT_GROUPS, "RetryPolicy(wait=...)"),
        "max_retry_after": policy.max_retry_after,
        "max_throttled": policy.max_throttled,
        "retry_on": on,
    }
    return json.dumps(record, separators=(",", ":"), allow_nan=False)


def _type_path(exc_type: type[BaseException]) -> str:
    try:
        return callable_path(exc_type)
    except NotSerializable as exc:
        raise NotSerializable(f"RetryPolicy(retry_on=...) cannot be stored: {exc}") from None


def load_policy(text: str | None) -> RetryPolicy | None:
    """A RetryPolicy from `dump_policy` text; ValueError for a malformed record."""
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed retry policy: {exc}") from None
    fields = {"stop", "wait", "max_retry_after", "max_throttled", "retry_on"}
    if not isinstance(data, dict) or set(data) != fields:
        raise ValueError("malformed retry policy")
    on = data["retry_on"]
    retry_on: Any
    if isinstance(on, dict) and set(on) == {"types"} and isinstance(on["types"], list):
        types = []
        for path in on["types"]:
            exc_type = resolve_callable(path)
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise ValueError(f"retry_on names {path!r}, which is not an exception type")
            types.append(exc_type)
        retry_on = tuple(types)
    elif isinstance(on, dict) and set(on) == {"predicate"}:
        retry_on = resolve_task_function(on["predicate"])
    else:
        raise ValueError("malformed retry policy: retry_on")
    try:
        return RetryPolicy(
            stop=_load_strategy(data["stop"], _STOPS, _STOP_GROUPS),
            wait=_load_strategy(data["wait"], _WAITS, _WAIT_GROUPS),
            max_retry_after=data["max_retry_after"],
            max_throttled=data["max_throttled"],
            retry_on=retry_on,
        )
    except TypeError as exc:
        raise ValueError(f"malformed retry policy: {exc}") from None


# -- whole tasks ------------------------------------------------------------------------


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
        self.__qualname__ = f"<unreadable task {task_id}>"

    def __call__(self) -> None:
        raise GiveUp(f"unreadable task record: {self.error}")

    def __repr__(self) -> str:
        return f"<offload unreadable task record: {self.error}>"


def load_task(
    task_id: str,
    idempotency_key: str,
    key: str | None,
    body: str,
    retry: str | None,
    attempts: int = 0,
    failures: int = 0,
    first_attempt_at: float | None = None,
    last_attempt_at: float | None = None,
) -> Task:
    """A Task from its stored parts, with its ids and attempt state.

    Never raises for a bad record: the Task then performs an `Unreadable` call. The
    monotonic start time (`_started`) is left for the offloader to rebuild from
    `first_attempt_at`, on its own clock.
    """
    try:
        if not isinstance(task_id, str) or not isinstance(idempotency_key, str):
            raise ValueError("task id and idempotency key must be text")
        if key is not None and not isinstance(key, str):
            raise ValueError("task key must be text")
        call, args, kwargs = task_from_json(body)
        policy = load_policy(retry)
        attempts, failures = _count(attempts), _count(failures)
        first_attempt_at, last_attempt_at = _stamp(first_attempt_at), _stamp(last_attempt_at)
        task = Task(call, args, kwargs, retry=policy, key=key)
    except (ValueError, TypeError, RecursionError) as exc:
        raw_retry = retry if isinstance(retry, str) else None
        task = Task(Unreadable(str(task_id), str(body), raw_retry, str(exc)))
        key = key if isinstance(key, str) else None
        attempts = failures = 0
        first_attempt_at = last_attempt_at = None
    task.key = key
    task.id = str(task_id)
    task.idempotency_key = str(idempotency_key)
    if attempts or failures or first_attempt_at is not None or last_attempt_at is not None:
        task._attempts = attempts
        task._failures = failures
        task._first_attempt_at = first_attempt_at
        task._last_attempt_at = last_attempt_at
    return task


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"bad attempt count {value!r}")
    return value


def _stamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"bad attempt time {value!r}")
    return float(value)


def stored_call(task: Task) -> tuple[str, str | None]:
    """(call text, policy text) to store for `task`; an Unreadable call keeps its raw text."""
    call = task.call
    if isinstance(call, Unreadable):
        return call.raw, call.raw_retry
    return dump_call(task), dump_policy(task.retry)


def task_to_record(task: Task) -> dict[str, Any]:
    """Everything a store keeps of a task as one JSON-ready dict (for stores that keep a
    task as one document, such as a queue message); NotSerializable as `dump_call`."""
    body, retry = stored_call(task)
    return {
        "id": task.id,
        "idempotency_key": task.idempotency_key,
        "key": task.key,
        "call": body,
        "retry": retry,
        "attempts": task._attempts,
        "failures": task._failures,
        "first_attempt_at": task._first_attempt_at,
        "last_attempt_at": task._last_attempt_at,
    }


def task_from_record(record: Any) -> Task:
    """The Task a `task_to_record` dict describes; never raises: a record it cannot read
    gives a Task whose call is `Unreadable` (dead-lettered with reason "permanent")."""
    if not isinstance(record, dict) or not isinstance(record.get("call"), str):
        text = json.dumps(record, default=str)[:2_000]
        task_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
        return load_task(task_id, task_id, None, text, None)
    return load_task(
        record.get("id"),  # type: ignore[arg-type]  # load_task checks the types
        record.get("idempotency_key", record.get("id")),  # type: ignore[arg-type]
        record.get("key"),
        record["call"],
        record.get("retry"),
        record.get("attempts", 0),
        record.get("failures", 0),
        record.get("first_attempt_at"),
        record.get("last_attempt_at"),
    )


def describe_strategy(value: Any) -> str:
    """A tenacity stop or wait strategy as the code that makes it, for reprs:
    `stop_after_attempt(5) | stop_before_delay(600)`; a custom one by its class name."""
    for simple, groups in ((_STOPS, _STOP_GROUPS), (_WAITS, _WAIT_GROUPS)):
        try:
            record = _dump_strategy(value, simple, groups, "strategy")
        except NotSerializable:
            continue
        return _render_strategy(record)
    return f"{type(value).__qualname__}(...)"


_JOINERS = {"stop_any": " | ", "stop_all": " & ", "wait_combine": " + "}


def _render_strategy(record: Mapping[str, Any]) -> str:
    name = record["type"]
    if "of" in record:
        parts = [_render_strategy(member) for member in record["of"]]
        joiner = _JOINERS.get(name)
        return joiner.join(parts) if joiner else f"{name}({', '.join(parts)})"
    args = [f"{key}={value:g}" for key, value in record.items() if key != "type"]
    if len(args) == 1:
        args = [args[0].split("=", 1)[1]]
    return f"{name}({', '.join(args)})"
