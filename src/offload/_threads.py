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

import contextvars
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["daemon_thread"]


def daemon_thread(target: Callable[[], Any], name: str) -> threading.Thread:
    """A daemon thread (not started) that runs `target` in an empty context."""
    return threading.Thread(
        target=contextvars.Context().run, args=(target,), name=name, daemon=True
    )
