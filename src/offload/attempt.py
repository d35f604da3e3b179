"""One attempt: perform a task's call once and say how it ended.

Nothing here retries or decides: `perform` records the attempt in the task's Progress,
runs the call (an HttpCall or AwsCall with the worker's own connections, or the user's
callable) and classifies what it returned or raised (`outcome.py`). Settling the outcome
is `settle.py`'s work.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, NamedTuple

from ._guard import Guarded
from .calls.base import PERFORMED, describe_target
from .calls.connections import Resources
from .clock import Clock
from .outcome import PERMANENT, Outcome, classify_exception, classify_result
from .records import Task

__all__ = ["Attempt", "perform"]

log = logging.getLogger("offload")


class Attempt(NamedTuple):
    """How one attempt ended: its outcome, and what the call raised or returned."""

    outcome: Outcome
    exc: BaseException | None = None
    result: Any = None


def perform(task: Task, resources: Resources, clock: Clock) -> Attempt:
    """Make one attempt at `task` on this worker thread; never raises."""
    now, wall = clock.monotonic(), clock.time()
    progress = task.progress
    if progress.started is None:
        progress.started = now
        progress.first_attempt_at = wall
    progress.attempts += 1
    progress.last_attempt_at = wall
    call = task.call
    try:
        if isinstance(call, PERFORMED):
            with Guarded():
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "attempt %d: %s (task %s)", progress.attempts, call.describe(), task.id
                    )
                result = call.perform(resources, task.idempotency_key)
        else:
            if log.isEnabledFor(logging.DEBUG):
                with Guarded():
                    log.debug(
                        "attempt %d: %s (task %s)",
                        progress.attempts,
                        describe_target(call),
                        task.id,
                    )
            result = call(*task.args, **task.kwargs)
            if inspect.iscoroutine(result):  # an `async def`: none of it ran
                result.close()
                raise TypeError(
                    f"{describe_target(call)} returned a coroutine: offload runs plain "
                    "functions (wrap an async one in a function that calls asyncio.run)"
                )
        return Attempt(classify_result(result, now=wall), None, result)
    except BaseException as error:
        try:
            outcome = classify_exception(error, now=wall)
        except BaseException:
            outcome = Outcome(PERMANENT, error=type(error).__name__)
        return Attempt(outcome, error, None)
