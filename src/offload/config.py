"""Every option check and every OFFLOAD_* reader, once.

Options are checked where they are given (`Offloader(...)`, `configure()`, a store URL),
each error naming the option and the range it takes; environment variables are read when
the default offloader is made, each error naming the variable. Nothing here is read again
later on a worker or in the exit hook, where an error could only be logged.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Callable
from typing import Any

from .codec.trust import Trust
from .limits import limits_from_json
from .policy import RetryPolicy, default_stop, default_wait

__all__ = [
    "DEFAULT_LEASE_TIMEOUT",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "check_callback",
    "check_lease_timeout",
    "check_number",
    "describe_range",
    "env_number",
    "lease_timeout_from_env",
    "options_from_env",
    "shutdown_timeout_from_env",
]

log = logging.getLogger("offload")

DEFAULT_SHUTDOWN_TIMEOUT = 5.0
DEFAULT_LEASE_TIMEOUT = 60.0
MAX_NICE = 19


def describe_range(minimum: float, maximum: float | None, *, above: bool) -> str:
    """The range an option takes, as its errors say it ("from 1 to 20", "> 0 and finite")."""
    low = f"> {minimum:g}" if above else f">= {minimum:g}"
    return f"from {minimum:g} to {maximum:g}" if maximum is not None else f"{low} and finite"


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float,
    maximum: float | None = None,
    integer: bool = False,
    above: bool = False,
) -> None:
    """TypeError for a value of the wrong type, ValueError for one out of range; both name
    the option and say the range it takes (`above`: strictly greater than `minimum`)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    top = math.inf if maximum is None else maximum
    if not (minimum <= value <= top and value < math.inf) or (above and value <= minimum):
        raise ValueError(
            f"{name} must be {kind} {describe_range(minimum, maximum, above=above)}, got {value!r}"
        )


def check_lease_timeout(name: str, value: Any, maximum: float | None = None) -> float:
    """A lease in seconds: a number > 0 (and at most `maximum`, where a store has one)."""
    check_number(name, value, minimum=0, above=True, maximum=maximum)
    return float(value)


def check_callback(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {value!r}")


# -- the environment ---------------------------------------------------------------------


def env_number(
    name: str,
    convert: Callable[[str], Any],
    *,
    minimum: float,
    maximum: float | None = None,
    above: bool = False,
) -> Any:
    """The number a variable holds, None when unset or empty; ValueError naming it if bad."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    kind = "an integer" if convert is int else "a number"
    try:
        value = convert(raw.strip())
    except ValueError:
        value = None
    top = math.inf if maximum is None else maximum
    if (
        value is None
        or not (minimum <= value <= top and value < math.inf)
        or (above and value <= minimum)
    ):
        raise ValueError(
            f"{name}={raw!r} must be {kind} {describe_range(minimum, maximum, above=above)}"
        ) from None
    return value


def shutdown_timeout_from_env() -> float | None:
    """OFFLOAD_SHUTDOWN_TIMEOUT in seconds, None when unset."""
    value = env_number("OFFLOAD_SHUTDOWN_TIMEOUT", float, minimum=0)
    return None if value is None else float(value)


def lease_timeout_from_env(maximum: float | None = None) -> float:
    """OFFLOAD_LEASE_TIMEOUT in seconds, or DEFAULT_LEASE_TIMEOUT when unset."""
    value = env_number("OFFLOAD_LEASE_TIMEOUT", float, minimum=0, above=True, maximum=maximum)
    return DEFAULT_LEASE_TIMEOUT if value is None else float(value)


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLEANS.update({"0": False, "false": False, "no": False, "off": False})

# (variable, option, convert, minimum, maximum)
_NUMBERS: tuple[tuple[str, str, Callable[[str], Any], float, float | None], ...] = (
    ("OFFLOAD_MAX_QUEUE", "max_queue", int, 1, None),
    ("OFFLOAD_IDLE_TIMEOUT", "idle_timeout", float, 0, None),
    ("OFFLOAD_WORKERS", "workers", int, 1, None),
    ("OFFLOAD_SHUTDOWN_TIMEOUT", "shutdown_timeout", float, 0, None),
    ("OFFLOAD_WORKER_NICE", "worker_nice", int, 0, MAX_NICE),
)


KNOWN_VARIABLES = frozenset(
    {
        "OFFLOAD_STORE",
        "OFFLOAD_MAX_QUEUE",
        "OFFLOAD_IDLE_TIMEOUT",
        "OFFLOAD_WORKERS",
        "OFFLOAD_MAX_ATTEMPTS",
        "OFFLOAD_SHUTDOWN_TIMEOUT",
        "OFFLOAD_LEASE_TIMEOUT",
        "OFFLOAD_WORKER_NICE",
        "OFFLOAD_LIMITS",
        "OFFLOAD_ADAPTIVE",
        "OFFLOAD_TRUSTED",
        "OFFLOAD_IMPORTS",
        "OFFLOAD_CONSOLE_TOKEN",
    }
)
_checked_environment = False


def check_environment() -> None:
    """Warn once per process of an OFFLOAD_* variable that is not one offload reads but
    looks like one (OFFLOAD_WROKERS): it would be ignored without a word."""
    global _checked_environment
    if _checked_environment:
        return
    _checked_environment = True
    for name in sorted(os.environ):
        if not name.startswith("OFFLOAD_") or name in KNOWN_VARIABLES:
            continue
        close = difflib.get_close_matches(name, KNOWN_VARIABLES, 1, 0.8)
        if close:
            log.warning(
                "offload: the environment variable %s is not one offload reads (did you mean "
                "%s?); it is ignored",
                name,
                close[0],
            )


def options_from_env() -> dict[str, Any]:
    """Offloader options set by OFFLOAD_* environment variables; ValueError names a bad one."""
    check_environment()
    options: dict[str, Any] = {}
    store = os.environ.get("OFFLOAD_STORE")
    if store:
        options["store"] = store
    for var, option, convert, minimum, maximum in _NUMBERS:
        value = env_number(var, convert, minimum=minimum, maximum=maximum)
        if value is not None:
            options[option] = value
    lease = env_number("OFFLOAD_LEASE_TIMEOUT", float, minimum=0, above=True)
    if lease is not None:
        options["lease_timeout"] = float(lease)
    limits = os.environ.get("OFFLOAD_LIMITS", "").strip()
    if limits:
        options["limits"] = limits_from_json(limits)
    adaptive = os.environ.get("OFFLOAD_ADAPTIVE", "").strip().lower()
    if adaptive:
        if adaptive not in _BOOLEANS:
            raise ValueError(f"OFFLOAD_ADAPTIVE={adaptive!r} must be 1 or 0 (true or false)")
        options["adaptive"] = _BOOLEANS[adaptive]
    trusted = os.environ.get("OFFLOAD_TRUSTED", "").strip()
    if trusted:
        options["trusted"] = Trust.parse(trusted)
    attempts = env_number("OFFLOAD_MAX_ATTEMPTS", int, minimum=1)
    if attempts is not None:
        options["retry"] = RetryPolicy(stop=default_stop(attempts), wait=default_wait())
    return options
