"""What a task performs, named for logs and keyed for throttling, whatever its kind."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeAlias

from .._redact import redact_text
from ..codec.trust import name_of
from .aws_call import AwsCall
from .http_call import HttpCall

__all__ = ["PERFORMED", "Call", "default_key", "describe_target"]

Call: TypeAlias = HttpCall | AwsCall | Callable[..., Any]
"""What a task performs."""

PERFORMED = (HttpCall, AwsCall)
"""The calls offload performs itself (with the worker's connections), not user code."""


def describe_target(call: Any) -> str:
    """What a task performs, for logs and dead letters: redacted, never raises."""
    try:
        if isinstance(call, PERFORMED):
            return call.describe()
        if isinstance(call, functools.partial):
            return f"partial({describe_target(call.func)})"
        return redact_text(name_of(call))
    except Exception:  # a description must never break the worker
        return type(call).__qualname__


def default_key(call: Any) -> str | None:
    """The throttle key of an HttpCall or AwsCall; None for a plain callable."""
    if isinstance(call, PERFORMED):
        return call.key()
    return None
