"""Settling an attempt: delivered, retried later, or dead-lettered; callbacks; the ledger.

`Settler.settle` takes what `attempt.perform` returned and asks the task's RetryPolicy
what a failure means. Where the task goes next is the backlog's work (`backlog/`): it
completes, requeues or buries it in the store and the scheduler. Callbacks run before
the task stops counting as in flight, so that `flush()` returning means they have run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._guard import Guarded
from ._redact import scrub
from .attempt import Attempt
from .calls.base import describe_target
from .calls.secrets import known_secrets
from .clock import Clock
from .core import AttemptKind, Core
from .outcome import Outcome, Reason, clean_text
from .policy import Decision, RetryPolicy
from .records import DeadLetter, Task, new_id, utc
from .scheduler import Pause, next_probe

if TYPE_CHECKING:
    from .backlog.base import Backlog

__all__ = ["Callbacks", "Settler", "dead_letter_for"]

log = logging.getLogger("offload")


class Callbacks:
    """The user's callbacks; their exceptions are logged, never fatal."""

    __slots__ = ("on_dead_letter", "on_retry", "on_success")

    def __init__(
        self,
        on_success: Callable[[Task, Any], object] | None,
        on_retry: Callable[[Task, float, str | None], object] | None,
        on_dead_letter: Callable[[Task, DeadLetter], object] | None,
    ) -> None:
        self.on_success = on_success
        self.on_retry = on_retry
        self.on_dead_letter = on_dead_letter

    @staticmethod
    def call(name: str, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException:
            with Guarded():
                log.exception("offload: %s callback raised; ignored", name)


def dead_letter_for(
    task: Task, error: str | None, outcome: Outcome | None, reason: Reason
) -> DeadLetter:
    """The dead letter `task` becomes now.

    Its text is cleaned of what a store cannot hold (NUL, a lone surrogate) and of the
    task's own secrets: an outcome's error is already, but `error` may be a retry
    policy's own words. A letter that cannot be stored would leave its task to run again
    at every lease expiry."""
    progress = task.progress
    text = error or (outcome.error if outcome else None) or reason
    if outcome is None or text is not outcome.error:
        text = scrub(clean_text(text), known_secrets(task.call, task.args, task.kwargs))
    return DeadLetter(
        id=new_id(),
        task_id=task.id,
        description=clean_text(describe_target(task.call)),
        key=task.key,
        attempts=progress.attempts,
        error=text,
        status=outcome.status if outcome else None,
        reason=reason,
        first_attempt_at=utc(progress.first_attempt_at),
        last_attempt_at=utc(progress.last_attempt_at),
    )


class Settler:
    """Turns an attempt's outcome into delivered, retry or dead letter, for one offloader."""

    def __init__(
        self,
        core: Core,
        backlog: Backlog,
        policy: RetryPolicy,
        callbacks: Callbacks,
        clock: Clock,
    ) -> None:
        self.core = core
        self.backlog = backlog
        self.policy = policy
        self.callbacks = callbacks
        self.clock = clock

    def settle(self, task: Task, attempt: Attempt) -> None:
        """Record an attempt's outcome (called on the worker thread that made it)."""
        outcome = attempt.outcome
        progress = task.progress
        progress.last = outcome
        callbacks = self.callbacks
        if outcome.kind == "success":
            if callbacks.on_success is not None:
                callbacks.call("on_success", callbacks.on_success, task, attempt.result)
            self.backlog.complete(task)
            self._finish(task, in_flight=True, delivered=True)
            return

        now = self.clock.monotonic()
        outage = False
        kind: AttemptKind = (
            "permanent"
            if outcome.kind == "permanent"
            else "throttled"
            if outcome.throttled
            else "transient"
        )
        core = self.core
        with core.lock:
            core.ledger.attempted(task.key, kind)  # as it ended, before an outage is seen
            pause = (
                core.sched.failed(task, now)
                if kind == "transient" and task.key is not None
                else None
            )
        policy = task.retry or self.policy
        if pause is not None:
            # The key is down (or suspected), not this call: its backlog waits, one probe
            # when the pause ends; an outage's calls wait as a throttle's do, using no attempts.
            outage = pause.down
            outcome = self._outage(task, outcome, pause, policy.max_retry_after)
        try:
            decision = policy.decide(progress, outcome, attempt.exc, now)
        except Exception as error:  # a user's stop/wait strategy must not kill the worker
            with Guarded():
                log.exception("offload: the retry policy raised for task %s", task.id)
            decision = Decision(False, reason="permanent", error=f"retry policy raised {error!r}")
        if not decision.retry:
            assert decision.reason is not None
            closed = None
            if outcome.throttled and not outage and task.key is not None:
                # Its key stays closed for the Retry-After (at most as long as the policy
                # lets a task wait for one): the key's calls must not go earlier because
                # this one gave up, nor an ending probe release its held calls at once.
                # (A key that is down has its own pause: `Scheduler.failed`.)
                wait = min(outcome.retry_after or 0.0, policy.max_retry_after)
                with core.lock:  # before the store's round trip, as a hand-back's
                    if wait > 0 or task.key in core.sched.gates:
                        closed = now + wait
                        core.sched.close_gate(task.key, closed)
            self.dead_letter(
                task,
                outcome,
                decision.reason,
                error=decision.error,
                in_flight=True,
                throttled_until=closed,
            )
            return
        if self.backlog.can_retry():
            with Guarded():
                log.log(
                    logging.DEBUG if outage else logging.INFO,
                    "retrying %s in %.2fs (attempt %d%s): %s",
                    describe_target(task.call),
                    decision.delay,
                    progress.attempts,
                    ", throttled" if outcome.throttled else "",
                    outcome.error,
                )
            if callbacks.on_retry is not None:
                callbacks.call("on_retry", callbacks.on_retry, task, decision.delay, outcome.error)
            if self.backlog.requeue(task, now, decision.delay, outcome.throttled):
                return
        # shutdown() has begun and this backlog cannot keep a retry for later.
        self.dead_letter(task, outcome, "shutdown", error=outcome.error, in_flight=True)

    def _outage(
        self, task: Task, outcome: Outcome, pause: Pause, max_retry_after: float
    ) -> Outcome:
        """The outcome of a call to a key held by `pause`: "not now" for that long at least,
        a throttle once the key is down; one log line when it goes down.

        The hold is offload's own, not a server's Retry-After: it is no floor beyond
        `max_retry_after`, which would dead-letter the call as if a server had asked for
        it. The key's gate stays closed for the whole hold, so the call retried sooner
        waits behind it, using no attempt."""
        hold = max(min(pause.seconds, max_retry_after), outcome.retry_after or 0.0)
        if not pause.down:  # suspected: the failure counts, the retry waits out the hold
            return dataclasses.replace(outcome, retry_after=hold)
        with Guarded():
            log.log(
                logging.WARNING if pause.news else logging.DEBUG,
                "offload: %s is down (%s); its calls wait, next try in %.0fs",
                task.key,
                outcome.error,
                pause.seconds,
            )
        return dataclasses.replace(
            outcome,
            throttled=True,
            retry_after=hold,
            error=f"{outcome.error} (its API is down)" if outcome.error else "its API is down",
        )

    def dead_letter(
        self,
        task: Task,
        outcome: Outcome | None,
        reason: Reason,
        *,
        error: str | None = None,
        in_flight: bool = False,
        throttled_until: float | None = None,
    ) -> None:
        """Bury `task` in the store, then count it (with its attempt, if `in_flight`) in
        one step, so that the ledger holds for every reader of stats(). `throttled_until`:
        its last attempt was throttled, and its key stays closed until then."""
        progress = task.progress
        if outcome is None:
            outcome = progress.last
        letter = progress.letter = dead_letter_for(task, error, outcome, reason)
        if not self.backlog.bury(task, letter):
            progress.letter = None  # the store keeps the task: the backlog has counted it
            return
        if reason != "shutdown":  # shutdown() logs one line for all of them
            with Guarded():
                log.warning(
                    "dead letter %s: %s after %d attempt(s) (%s): %s",
                    letter.id,
                    letter.description,
                    letter.attempts,
                    reason,
                    letter.error,
                )
        callbacks = self.callbacks
        if callbacks.on_dead_letter is not None:
            callbacks.call("on_dead_letter", callbacks.on_dead_letter, task, letter)
        self._finish(
            task, in_flight=in_flight, delivered=False, reason=reason, closed=throttled_until
        )

    def _finish(
        self,
        task: Task,
        *,
        in_flight: bool,
        delivered: bool,
        reason: Reason | None = None,
        closed: float | None = None,
    ) -> None:
        """The task leaves this offloader, delivered (its attempt counted a success) or
        dead-lettered (counted by `reason`): one step."""
        core = self.core
        now = self.clock.monotonic()
        with core.lock:
            released = in_flight and core.sched.settle(task, closed, now=now, delivered=delivered)
            if closed is not None and task.key is not None:  # it will not probe its key again
                next_probe(core.sched, task.key)
            if not in_flight:  # left over at shutdown: it stops counting as waiting
                core.leaving.one_gone()
            if released:
                core.wake()  # a probe's success released its key's held tasks
            down_for = core.sched.succeeded(task, now) if delivered else None
            self.backlog.forget(task)
            ledger = core.ledger
            if delivered:
                ledger.succeeded += 1
                ledger.attempted(task.key, "success")
            else:
                ledger.dead_lettered += 1
                if reason is not None:
                    ledger.by_reason[reason] = ledger.by_reason.get(reason, 0) + 1
            core.notify_if_drained()
        if down_for is not None:
            with Guarded():
                log.warning("offload: %s is back after %.1fs down", task.key, down_for)
