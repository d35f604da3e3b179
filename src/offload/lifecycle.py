"""Process events every live Offloader must hear of: fork() and interpreter exit.

- After fork(), the child gets a fresh, empty state in every offloader (new lock, no
  threads, zeroed counters): nothing of the parent's is performed by the child. A pid
  check at enqueue covers servers that fork without Python's hooks (uWSGI).
- At exit, one `atexit` hook shuts every live offloader down within one shared deadline:
  OFFLOAD_SHUTDOWN_TIMEOUT when set, else each offloader's own `shutdown_timeout`. The
  variable is read when offload is imported and when an offloader is made, never first
  in the hook, where a bad value could only be ignored.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from typing import TYPE_CHECKING

from .clock import SystemClock
from .config import shutdown_timeout_from_env

if TYPE_CHECKING:
    from .offloader import Offloader

__all__ = ["live", "register", "shutdown_all"]

log = logging.getLogger("offload")

live: weakref.WeakSet[Offloader] = weakref.WeakSet()


def register(offloader: Offloader) -> None:
    """Count `offloader` among those that fork and exit must reach."""
    live.add(offloader)


def _after_fork_in_child() -> None:
    for offloader in list(live):
        offloader._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def shutdown_all(timeout: float | None = None) -> None:
    """Shut every live offloader down within one shared deadline (run at exit), and each
    within its own `shutdown_timeout`; without `timeout`, the deadline is the longest."""
    clock = SystemClock()
    offloaders = list(live)
    if timeout is None:
        timeout = max((o.shutdown_timeout for o in offloaders), default=0.0)
    deadline = clock.monotonic() + timeout
    for offloader in offloaders:
        if offloader._finished():
            continue
        remaining = max(0.0, deadline - clock.monotonic())
        try:
            offloader.shutdown(min(remaining, offloader.shutdown_timeout))
        except Exception:
            log.exception("offload: error while shutting down %r at exit", offloader)


def _at_exit() -> None:
    try:
        timeout = shutdown_timeout_from_env()
    except ValueError as exc:  # changed after import; never raise in the exit hook
        log.warning("offload: %s; each offloader's own shutdown_timeout applies", exc)
        timeout = None
    shutdown_all(timeout)


atexit.register(_at_exit)
