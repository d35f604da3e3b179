"""The module-level default Offloader: made on first use, configured from OFFLOAD_* variables.

`offload.configure(**options)` replaces its options at any time. An offloader already in
use is retired, not dropped: it takes no new tasks, its worker finishes what it holds,
and it keeps the same store, so its dead letters stay visible through the new default.
"""

from __future__ import annotations

import threading
from typing import Any

from .config import options_from_env
from .offloader import Offloader

__all__ = ["configure", "current", "get"]

_lock = threading.Lock()
_default: Offloader | None = None
_options: dict[str, Any] = {}

_OPTIONS = frozenset(
    {
        "store",
        "retry",
        "max_queue",
        "idle_timeout",
        "workers",
        "consume",
        "max_dead_letters",
        "on_success",
        "on_retry",
        "on_dead_letter",
        "clock",
        "shutdown_timeout",
        "lease_timeout",
        "worker_nice",
        "limits",
        "adaptive",
        "trusted",
    }
)


def get() -> Offloader:
    """The default offloader, made on first use (after shutdown(), the shut-down one, so
    that a late enqueue raises ShutDown instead of starting a worker nobody will stop)."""
    offloader = _default
    if offloader is not None:
        return offloader
    return _make()


def _make() -> Offloader:
    global _default
    with _lock:
        if _default is None:  # another thread may have made it while we waited
            _default = Offloader(**{**options_from_env(), **_options})
        return _default


def configure(**options: Any) -> None:
    """Set the default offloader's options (as Offloader takes them), before or after use.

    Options given here win over OFFLOAD_* variables. Unknown names raise TypeError and bad
    values ValueError, at once.
    """
    global _default
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"configure() got unknown option(s): {', '.join(sorted(unknown))}")
    with _lock:
        merged = {**options_from_env(), **_options, **options}
        previous = _default
        if previous is not None and "store" not in options:
            merged["store"] = previous.store
        replacement = Offloader(**merged)  # validates before anything changes
        _options.update(options)
        _default = replacement
    if previous is not None:
        previous._retire()


def reset() -> None:
    """Forget the default offloader and configured options (for tests): shut it down first."""
    global _default
    with _lock:
        previous, _default = _default, None
        _options.clear()
    if previous is not None:
        previous.shutdown(0)


def current() -> Offloader | None:
    """The default offloader if one was made, without making one (offload.testing)."""
    return _default


def configured() -> dict[str, Any]:
    """A copy of the options given to configure() so far (offload.testing.eager)."""
    with _lock:
        return dict(_options)


def swap(offloader: Offloader | None) -> Offloader | None:
    """Make `offloader` the default and return the one it replaces (offload.testing.eager)."""
    global _default
    with _lock:
        previous, _default = _default, offloader
    return previous
