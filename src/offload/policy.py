"""RetryPolicy: tenacity strategy objects, asked for a decision and a delay without sleeping.

The scheduler never sleeps through a backoff. After an attempt that did not succeed it
asks the policy "again, and when?" through one `tenacity.RetryCallState` per task, puts
the task on the delay heap, and goes on with other work.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .codec import strategies
from .codec.trust import TRUST_ANY, Trust, callable_path, task_function_path
from .errors import NotSerializable
from .outcome import Outcome, Reason

if TYPE_CHECKING:
    from .records import Progress

__all__ = ["Decision", "RetryPolicy"]

RetryOn = tuple[type[BaseException], ...] | Callable[[BaseException], bool]

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MAX_DELAY = 600.0


def default_stop(max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> stop_base:
    """Five attempts, and no attempt that would start ten minutes after the first."""
    return tenacity.stop_after_attempt(max_attempts) | tenacity.stop_before_delay(DEFAULT_MAX_DELAY)


def default_wait() -> wait_base:
    # Full jitter: the AWS "Exponential Backoff and Jitter" study found it does the least
    # work for the time when many clients back off from one saturated API.
    return tenacity.wait_random_exponential(multiplier=0.5, max=30)


class Decision(NamedTuple):
    """What to do after an attempt that did not succeed."""

    retry: bool
    delay: float = 0.0  # seconds from now, when retry
    reason: Reason | None = None  # "exhausted" or "permanent", when not
    error: str | None = None  # replaces the outcome's error in the dead letter, if set


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed call again, and when to give up.

    `stop` and `wait` are tenacity strategies (`stop_after_attempt(5) | stop_before_delay(600)`
    and `wait_random_exponential(multiplier=0.5, max=30)` by default). `Retry-After` is a
    floor on the delay; one beyond `max_retry_after` seconds dead-letters the task at once.
    Throttled outcomes use up no attempts; a throttled task gives up after `max_throttled`
    seconds (or the stop strategy's delay limit). `retry_on` adds exception types, or a
    predicate on the exception, to what is retried as transient.
    """

    stop: stop_base = field(default_factory=default_stop)
    wait: wait_base = field(default_factory=default_wait)
    max_retry_after: float = 600.0
    max_throttled: float = 900.0
    retry_on: RetryOn = ()

    def __post_init__(self) -> None:
        if not isinstance(self.stop, stop_base):
            raise TypeError(
                f"RetryPolicy(stop=...) must be a tenacity stop strategy, got {self.stop!r}"
            )
        if not isinstance(self.wait, wait_base):
            raise TypeError(
                f"RetryPolicy(wait=...) must be a tenacity wait strategy, got {self.wait!r}"
            )
        for name in ("max_retry_after", "max_throttled"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"RetryPolicy({name}=...) must be a number, got {value!r}")
            if not (0 <= value < math.inf):
                raise ValueError(f"RetryPolicy({name}=...) must be >= 0 and finite, got {value!r}")
        retry_on = self.retry_on
        if isinstance(retry_on, type) and issubclass(retry_on, BaseException):
            object.__setattr__(self, "retry_on", (retry_on,))
        elif isinstance(retry_on, (tuple, list)):
            bad = [
                t for t in retry_on if not (isinstance(t, type) and issubclass(t, BaseException))
            ]
            if bad:
                raise TypeError(f"RetryPolicy(retry_on=...) takes exception types, got {bad[0]!r}")
            object.__setattr__(self, "retry_on", tuple(retry_on))
        elif not callable(retry_on):
            raise TypeError(
                f"RetryPolicy(retry_on=...) takes exception types or a predicate, got {retry_on!r}"
            )

    def __repr__(self) -> str:
        retry_on = self.retry_on
        on = (
            "("
            + ", ".join(t.__qualname__ for t in retry_on)
            + ("," if len(retry_on) == 1 else "")
            + ")"
            if isinstance(retry_on, tuple)
            else getattr(retry_on, "__qualname__", repr(retry_on))
        )
        stop, wait = strategies.describe(self.stop), strategies.describe(self.wait)
        return (
            f"RetryPolicy(stop={stop}, wait={wait}, "
            f"max_retry_after={self.max_retry_after:g}, max_throttled={self.max_throttled:g}, "
            f"retry_on={on})"
        )

    def to_json(self) -> str:
        """This policy as JSON text, as a durable store keeps a per-task policy.

        Raises NotSerializable when it holds code another process cannot load: a custom
        stop or wait strategy, or a `retry_on` type or predicate that is not importable.
        """
        retry_on = self.retry_on
        on: dict[str, Any]
        try:
            if isinstance(retry_on, tuple):
                on = {"types": [callable_path(t) for t in retry_on]}
            else:
                on = {"predicate": task_function_path(retry_on)}  # called: as a task's function
        except NotSerializable as exc:
            raise NotSerializable(f"RetryPolicy(retry_on=...) cannot be stored: {exc}") from None
        record = {
            "stop": strategies.dump_stop(self.stop),
            "wait": strategies.dump_wait(self.wait),
            "max_retry_after": self.max_retry_after,
            "max_throttled": self.max_throttled,
            "retry_on": on,
        }
        return json.dumps(record, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str, trust: Trust = TRUST_ANY) -> RetryPolicy:
        """The policy `to_json` wrote; ValueError for text it did not write, or a
        `retry_on` predicate `trust` refuses (it is called, as a task's function is)."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed retry policy: {exc}") from None
        fields = {"stop", "wait", "max_retry_after", "max_throttled", "retry_on"}
        if not isinstance(data, dict) or set(data) != fields:
            raise ValueError("malformed retry policy")
        on = data["retry_on"]
        retry_on: Any
        if isinstance(on, dict) and set(on) == {"types"} and isinstance(on["types"], list):
            types = []
            for path in on["types"]:
                exc_type = trust.resolve_type(path)
                if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                    raise ValueError(f"retry_on names {path!r}, which is not an exception type")
                types.append(exc_type)
            retry_on = tuple(types)
        elif isinstance(on, dict) and set(on) == {"predicate"}:
            retry_on = trust.resolve(on["predicate"])
        else:
            raise ValueError("malformed retry policy: retry_on")
        try:
            return cls(
                stop=strategies.load_stop(data["stop"]),
                wait=strategies.load_wait(data["wait"]),
                max_retry_after=data["max_retry_after"],
                max_throttled=data["max_throttled"],
                retry_on=retry_on,
            )
        except TypeError as exc:
            raise ValueError(f"malformed retry policy: {exc}") from None

    def _retries_anyway(self, exc: BaseException | None) -> bool:
        if exc is None:
            return False
        retry_on = self.retry_on
        if isinstance(retry_on, tuple):
            return bool(retry_on) and isinstance(exc, retry_on)
        try:
            return bool(retry_on(exc))
        except Exception:  # a broken predicate must not kill the worker
            return False

    def decide(
        self, progress: Progress, outcome: Outcome, exc: BaseException | None, now: float
    ) -> Decision:
        """Retry (and after how long) or give up, for an attempt that did not succeed.

        `now` is the scheduler clock's monotonic reading; `progress.started` is the same clock's
        reading at the first attempt.
        """
        throttled = outcome.throttled
        if outcome.kind == "permanent":
            if not self._retries_anyway(exc):
                return Decision(False, reason="permanent")
        elif outcome.kind != "retry":
            raise ValueError(f"decide() takes a failed outcome, got {outcome.kind!r}")

        retry_after = outcome.retry_after
        if retry_after is not None and retry_after > self.max_retry_after:
            return Decision(
                False,
                reason="exhausted",
                error=f"{outcome.error or 'retry'}; Retry-After {retry_after:g}s is beyond "
                f"max_retry_after {self.max_retry_after:g}s",
            )

        state = progress.tenacity
        if state is None:
            state = progress.tenacity = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        started = progress.started if progress.started is not None else now
        state.start_time = started
        state.outcome_timestamp = now
        if not throttled:
            progress.failures += 1

        # The wait strategy sees every call made, so backoff grows under throttling too.
        state.attempt_number = max(1, progress.attempts)
        delay = float(self.wait(state))
        if retry_after is not None:
            # Never call earlier than the server asked; a little jitter keeps the clients
            # that were all told the same second from arriving together.
            delay = max(delay, retry_after) + random.uniform(
                0.0, min(1.0, 0.05 + 0.05 * retry_after)
            )
        state.upcoming_sleep = delay
        state.idle_for += delay

        # The stop strategy counts only attempts that failed: a throttle is "not now".
        state.attempt_number = progress.failures
        if self.stop(state):
            return Decision(False, reason="exhausted")
        if throttled and (now - started) + delay > self.max_throttled:
            return Decision(
                False,
                reason="exhausted",
                error=f"{outcome.error or 'throttled'}; still throttled after "
                f"max_throttled {self.max_throttled:g}s",
            )
        return Decision(True, delay=delay)
