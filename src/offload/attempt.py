"""One attempt: perform a task's call once and say how it ended.

Nothing here retries or decides: `perform` records the attempt in the task's Progress,
runs the call (an HttpCall or AwsCall with the worker's own connections, or the user's
callable; a coroutine function's awaitable is run to completion on the worker thread's
own event loop) and classifies what it returned or raised (`outcome.py`), with the call's
own secret values scrubbed from the error text (`calls/secrets.py`): every log line,
retry callback and dead letter is made from that text. Settling the outcome is
`settle.py`'s work.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Collection
from typing import Any, NamedTuple

from ._guard import Guarded
from .calls.aws_call import AwsCall
from .calls.base import PERFORMED, describe_target
from .calls.connections import Resources
from .calls.secrets import known_secrets
from .clock import Clock
from .outcome import (
    PERMANENT,
    Modeled,
    Outcome,
    Secrets,
    classify_exception,
    classify_result,
)
from .records import Task

__all__ = ["Attempt", "perform"]

log = logging.getLogger("offload")


def _await(awaitable: Any, resources: Resources) -> Any:
    """Run an awaitable to completion on this worker thread's own event loop; or, where
    this thread runs a loop already (eager mode called from async code), on a loop of
    its own thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return resources.loop().run_until_complete(_as_coroutine(awaitable))
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, asyncio.run(_as_coroutine(awaitable))))
        except BaseException as exc:  # carried back to the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="offload-async")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class Attempt(NamedTuple):
    """How one attempt ended: its outcome, and what the call raised or returned."""

    outcome: Outcome
    exc: BaseException | None = None
    result: Any = None


def _secrets(task: Task) -> Secrets:
    """What gives the secret values `task` holds, for its error text: gathered only if
    the attempt failed, and then once."""
    found: list[Collection[str]] = []

    def secrets() -> Collection[str]:
        if not found:
            found.append(known_secrets(task.call, task.args, task.kwargs))
        return found[0]

    return secrets


def _modeled(call: Any, resources: Resources) -> Modeled:
    """What an AwsCall's operation model marks retryable, for its ClientError; nothing
    for any other call (a user's own boto3 call has no model offload knows)."""

    def modeled(code: str) -> bool | None:
        if not isinstance(call, AwsCall):
            return None
        try:
            return call.retryable(resources, code)
        except Exception:  # a model that cannot be read leaves the table as it is
            return None

    return modeled


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
            if inspect.isawaitable(result):  # an `async def`: run it to completion here
                result = _await(result, resources)
        # A Retry-After HTTP-date counts from when the answer came, not from the start:
        # a slow call would otherwise wait its own duration more than the server asked.
        ended = clock.time()
        return Attempt(classify_result(result, now=ended, secrets=_secrets(task)), None, result)
    except BaseException as error:
        try:
            outcome = classify_exception(
                error,
                now=clock.time(),
                secrets=_secrets(task),
                modeled=_modeled(call, resources),
            )
        except BaseException:
            outcome = Outcome(PERMANENT, error=type(error).__name__)
        return Attempt(outcome, error, None)
