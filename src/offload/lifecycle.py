"""Process events every live Offloader must hear of: fork() and interpreter exit.

- After fork(), the child gets a fresh, empty state in every offloader (new lock, no
  threads, zeroed counters): nothing of the parent's is performed by the child. A pid
  check at enqueue covers servers that fork without Python's hooks (uWSGI).
- At exit, one `atexit` hook shuts every live offloader down within one shared deadline:
  OFFLOAD_SHUTDOWN_TIMEOUT when set, else each offloader's own `shutdown_timeout`. The
  variable is read when offload is imported and when an offloader is made, never first
  in the hook, where a bad value could only be ignored. Calls still undelivered after
  a second are announced in one WARNING (how many, how long the hook will wait): a
  server's reload that waits on an API that is down is never silent.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

from ._guard import Guarded
from .clock import Clock, SystemClock
from .config import shutdown_timeout_from_env

if TYPE_CHECKING:
    from .offloader import Offloader

__all__ = ["fork_lock", "live", "register", "shutdown_all"]

log = logging.getLogger("offload")

EXIT_QUIET = 1.0
"""Seconds the exit hook waits for calls to be delivered before saying that it waits."""

live: weakref.WeakSet[Offloader] = weakref.WeakSet()
_fork_locks: dict[int, threading.Lock] = {}  # by process: a lock held at fork stays held


def fork_lock() -> threading.Lock:
    """This process's lock for starting an offloader over after a fork."""
    return _fork_locks.setdefault(os.getpid(), threading.Lock())


def register(offloader: Offloader) -> None:
    """Count `offloader` among those that fork and exit must reach."""
    live.add(offloader)


def _after_fork_in_child() -> None:
    for offloader in list(live):
        offloader._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def shutdown_all(timeout: float | None = None) -> None:
    """Shut every live offloader down within one shared deadline (run at exit), and each
    within its own `shutdown_timeout`; without `timeout`, the deadline is the longest.
    Calls still undelivered after EXIT_QUIET seconds are announced before the wait."""
    clock = SystemClock()
    offloaders = list(live)
    if timeout is None:
        timeout = max((o.shutdown_timeout for o in offloaders), default=0.0)
    deadline = clock.monotonic() + timeout
    for offloader in offloaders:  # a request still open at exit holds no wake-up now
        try:
            remaining = max(0.0, deadline - clock.monotonic())
            offloader._let_go(min(remaining, offloader.shutdown_timeout))
        except Exception:
            log.exception("offload: error while waking the workers of %r at exit", offloader)
    _announce(offloaders, deadline, clock)
    for offloader in offloaders:
        if offloader._finished():
            continue
        remaining = max(0.0, deadline - clock.monotonic())
        try:
            offloader.shutdown(min(remaining, offloader.shutdown_timeout))
        except Exception:
            log.exception("offload: error while shutting down %r at exit", offloader)


def _announce(offloaders: list[Offloader], deadline: float, clock: Clock) -> None:
    """One WARNING when calls are still undelivered EXIT_QUIET seconds into the exit hook:
    the process will wait for them until `deadline`, unless its server kills it sooner."""
    quiet = clock.monotonic() + EXIT_QUIET
    waiting = 0
    longest = 0.0
    for offloader in offloaders:
        if offloader._finished():
            continue
        now = clock.monotonic()
        window = min(max(0.0, deadline - now), offloader.shutdown_timeout)
        try:  # the deadline on the offloader's own clock (a FakeClock in tests)
            end = offloader._clock.monotonic() + window
            held = offloader._core.undelivered(min(max(0.0, quiet - now), window), end)
        except Exception:  # never raise in the exit hook; shutdown() reports what is left
            continue
        if held:
            waiting += held
            longest = max(longest, window - (clock.monotonic() - now))
    if waiting and longest >= 0.05:  # else shutdown()'s own WARNING follows at once
        with Guarded():
            log.warning(
                "offload: %d call(s) not delivered yet at exit; waiting up to %.1fs for them "
                "(OFFLOAD_SHUTDOWN_TIMEOUT). A server that stops its workers sooner cuts this "
                "short: keep uWSGI's worker-reload-mercy (and reload-mercy) or gunicorn's "
                "--graceful-timeout above it",
                waiting,
                longest,
            )


def _at_exit() -> None:
    try:
        timeout = shutdown_timeout_from_env()
    except ValueError as exc:  # changed after import; never raise in the exit hook
        log.warning("offload: %s; each offloader's own shutdown_timeout applies", exc)
        timeout = None
    shutdown_all(timeout)


atexit.register(_at_exit)
