"""Threads offload starts, each in an empty context of its own.

From Python 3.14 a new thread may begin with a copy of the context of the thread that
starts it (the default on free-threaded builds; `-X thread_inherit_context=1` elsewhere).
A worker started lazily by a request's enqueue would then carry that request's context
variables for the rest of its life: a user's request id in every later task's log lines,
a tracing span as the parent of every later call, offload's own wake-up hold and
transaction binding. Offload's threads run in a fresh context on every Python, as they
did before 3.14.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any

from ._guard import Guarded

log = logging.getLogger("offload")

__all__ = ["after_threads", "daemon_thread"]


def daemon_thread(target: Callable[[], Any], name: str) -> threading.Thread:
    """A daemon thread (not started) that runs `target` in an empty context."""
    return threading.Thread(
        target=contextvars.Context().run, args=(target,), name=name, daemon=True
    )


def after_threads(threads: list[threading.Thread], then: Callable[[], Any]) -> None:
    """Run `then` once every one of `threads` has ended: now when none is alive, else on
    a daemon thread that waits for them (a shutdown that timed out closes its store when
    its last call ends, not never: an open SQLite or PostgreSQL connection is a resource
    Python 3.13 warns about when it is collected). At interpreter exit, not at all."""
    alive = [t for t in threads if t.is_alive()]
    if not alive:
        then()
        return

    def wait_then() -> None:
        for thread in alive:
            thread.join()
        try:
            then()
        except Exception as exc:  # nothing is left to tell but the log
            with Guarded():
                log.warning("offload: closing the store after shutdown failed: %s", exc)

    with contextlib.suppress(RuntimeError):  # interpreter exit: the process's end closes all
        daemon_thread(wait_then, "offload-close").start()
