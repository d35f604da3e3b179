"""tenacity's built-in stop and wait strategies as JSON, for a RetryPolicy a store keeps.

Only the built-in strategies, by name and numbers: a custom strategy is code, which a
store cannot hold (NotSerializable). `describe` renders one as the code that makes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tenacity import stop as _stop
from tenacity import wait as _wait

from ..errors import NotSerializable

__all__ = ["describe", "dump_stop", "dump_wait", "load_stop", "load_wait"]

_Simple = Mapping[str, tuple[type[Any], tuple[str, ...]]]
_Groups = Mapping[str, tuple[type[Any], str]]

# The strategies a policy may use, with the attributes that make each one up.
_STOPS: _Simple = {
    "stop_after_attempt": (_stop.stop_after_attempt, ("max_attempt_number",)),
    "stop_after_delay": (_stop.stop_after_delay, ("max_delay",)),
    "stop_before_delay": (_stop.stop_before_delay, ("max_delay",)),
    "stop_never": (type(_stop.stop_never), ()),
}
_WAITS: _Simple = {
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
_STOP_GROUPS: _Groups = {
    "stop_any": (_stop.stop_any, "stops"),
    "stop_all": (_stop.stop_all, "stops"),
}
_WAIT_GROUPS: _Groups = {
    "wait_combine": (_wait.wait_combine, "wait_funcs"),
    "wait_chain": (_wait.wait_chain, "strategies"),
}


def _dump(value: Any, simple: _Simple, groups: _Groups, what: str) -> dict[str, Any]:
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
            return {"type": name, "of": [_dump(m, simple, groups, what) for m in members]}
    raise NotSerializable(
        f"{what} {kind.__module__}.{kind.__qualname__} cannot be stored: a durable store keeps "
        "tenacity's built-in strategies only (a custom one is code)"
    )


def _load(data: Any, simple: _Simple, groups: _Groups, depth: int = 0) -> Any:
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
        return cls(*(_load(m, simple, groups, depth + 1) for m in members))
    raise ValueError(f"unknown retry strategy {name!r}")


def dump_stop(value: Any) -> dict[str, Any]:
    """A stop strategy as JSON; NotSerializable for a custom one."""
    return _dump(value, _STOPS, _STOP_GROUPS, "RetryPolicy(stop=...)")


def dump_wait(value: Any) -> dict[str, Any]:
    """A wait strategy as JSON; NotSerializable for a custom one."""
    return _dump(value, _WAITS, _WAIT_GROUPS, "RetryPolicy(wait=...)")


def load_stop(data: Any) -> Any:
    """The stop strategy `dump_stop` described; ValueError for anything else."""
    return _load(data, _STOPS, _STOP_GROUPS)


def load_wait(data: Any) -> Any:
    """The wait strategy `dump_wait` described; ValueError for anything else."""
    return _load(data, _WAITS, _WAIT_GROUPS)


_JOINERS = {"stop_any": " | ", "stop_all": " & ", "wait_combine": " + "}


def describe(value: Any) -> str:
    """A stop or wait strategy as the code that makes it, for reprs:
    `stop_after_attempt(5) | stop_before_delay(600)`; a custom one by its class name."""
    for simple, groups in ((_STOPS, _STOP_GROUPS), (_WAITS, _WAIT_GROUPS)):
        try:
            record = _dump(value, simple, groups, "strategy")
        except NotSerializable:
            continue
        return _render(record)
    return f"{type(value).__qualname__}(...)"


def _render(record: Mapping[str, Any]) -> str:
    name = record["type"]
    if "of" in record:
        parts = [_render(member) for member in record["of"]]
        joiner = _JOINERS.get(name)
        return joiner.join(parts) if joiner else f"{name}({', '.join(parts)})"
    args = [f"{key}={value:g}" for key, value in record.items() if key != "type"]
    if len(args) == 1:
        args = [args[0].split("=", 1)[1]]
    return f"{name}({', '.join(args)})"
