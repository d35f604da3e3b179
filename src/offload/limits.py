"""Pacing a key to its limits: a declared rate and concurrency, and an adaptive rate.

Gates react to a throttle after it happened; a `Limit` keeps a key from being throttled at
all. `Pace` is one key's state: a token bucket for its rate, a count of its calls in
flight, and (once the key was throttled, when the offloader is adaptive) an
`AdaptiveRate` that learns the rate the API allows. Pure data with time passed in, as the
scheduler that asks it: no threads, no clock, no lock of its own.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .calls.urls import url_key

__all__ = [
    "AdaptiveRate",
    "Limit",
    "Pace",
    "SharedSlots",
    "SharedTokens",
    "TokenBucket",
    "limits_from_json",
    "normalise_key",
]

_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
_TEXT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(?:(\d+(?:\.\d+)?)\s*)?(s|sec|min|m|h)\s*$")


@dataclass(frozen=True)
class Limit:
    """At most `rate` calls of a key start in any `per` seconds (a token bucket holding
    `burst` tokens, by default `max(1, rate)`), and at most `concurrency` are in flight.

    `Limit(rate=25)` is Stripe's 25 calls a second; `Limit(rate=100, per=10)` (or the text
    `"100/10s"`) HubSpot's 100 calls in 10 seconds; `Limit(concurrency=2)` two calls at a
    time. At least one of `rate` and `concurrency`.
    """

    rate: float | None = None
    per: float = 1.0
    burst: float | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        for name in ("rate", "per", "burst"):
            value = getattr(self, name)
            if value is None and name != "per":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Limit({name}=...) must be a number, got {value!r}")
            if not (0 < value < math.inf):
                raise ValueError(
                    f"Limit({name}=...) must be a number > 0 and finite, got {value!r}"
                )
        if self.burst is not None and self.rate is None:
            raise ValueError("Limit(burst=...) needs a rate")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"Limit(burst=...) must be at least 1 (a call), got {self.burst!r}")
        concurrency = self.concurrency
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int)
        ):
            raise TypeError(f"Limit(concurrency=...) must be an integer, got {concurrency!r}")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"Limit(concurrency=...) must be at least 1, got {concurrency!r}")
        if self.rate is None and concurrency is None:
            raise ValueError("a Limit needs a rate, a concurrency, or both")

    @classmethod
    def parse(cls, text: str) -> Limit:
        """`"25/s"`, `"600/min"`, `"5000/h"` or `"100/10s"`; ValueError naming the text."""
        if not isinstance(text, str):
            raise TypeError(f"a limit is a Limit or text such as '25/s', got {text!r}")
        match = _TEXT.match(text)
        if match is None:
            raise ValueError(
                f"a limit as text is 'N/s', 'N/min', 'N/h' or 'N/<seconds>s' ('100/10s'), "
                f"got {text!r}"
            )
        count, seconds, unit = match.groups()
        if seconds is not None and unit not in ("s", "sec"):
            raise ValueError(f"a limit 'N/<seconds>s' counts seconds only, got {text!r}")
        per = float(seconds or 1) * _UNITS[unit]
        rate = float(count)
        return cls(rate=int(rate) if rate.is_integer() else rate, per=per)

    @classmethod
    def of(cls, value: Limit | str) -> Limit:
        """A Limit, or one made from its text."""
        return value if isinstance(value, Limit) else cls.parse(value)

    @property
    def per_second(self) -> float | None:
        """The rate in calls a second (None without a rate)."""
        return None if self.rate is None else self.rate / self.per

    def __str__(self) -> str:
        parts = []
        if self.rate is not None:
            per = "s" if self.per == 1 else f"{self.per:g}s"
            parts.append(f"{self.rate:g}/{per}")
        if self.concurrency is not None:
            parts.append(f"{self.concurrency} at a time")
        return ", ".join(parts)


def normalise_key(key: str) -> str:
    """A key as tasks' keys are made: `https://api.stripe.com` is `https://api.stripe.com:443`
    (an HTTP key is the URL's scheme, host and port); any other key as it is."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a limit's key must be a non-empty str, got {key!r}")
    lowered = key.lower()
    if lowered.startswith(("http://", "https://")):
        try:
            return url_key(key)
        except ValueError as exc:
            raise ValueError(f"a limit's key {key!r} is not a valid URL: {exc}") from None
    return key


def check_limits(limits: Any) -> dict[str, Limit]:
    """`Offloader(limits=...)`: a mapping of key to Limit or its text, keys normalised."""
    if limits is None:
        return {}
    if not isinstance(limits, Mapping):
        raise TypeError(f"limits must be a mapping of key to offload.Limit, got {limits!r}")
    checked: dict[str, Limit] = {}
    for key, value in limits.items():
        name = normalise_key(key)
        try:
            limit = Limit.of(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"limits[{key!r}]: {exc}") from None
        if name in checked:
            raise ValueError(f"limits: {key!r} names the same key as another entry ({name})")
        checked[name] = limit
    return checked


def limits_from_json(text: str, what: str = "OFFLOAD_LIMITS") -> dict[str, Limit]:
    """`{"https://api.stripe.com": "25/s", "aws:glue:...": {"concurrency": 1}}`; ValueError
    naming `what` for anything else."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object of key to limit, got {text[:80]!r}")
    limits: dict[str, Limit | str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            try:
                limits[key] = Limit(**value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{what}[{key!r}]: {exc}") from None
            continue
        limits[key] = value
    try:
        return check_limits(limits)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: {exc}") from None


class TokenBucket:
    """`rate` tokens a second, up to `capacity`; a call takes one."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0.0: now, and when the token is short only by
        the refill's rounding: a wait too small to move `now`, which no clock would end)."""
        self._refill(now)
        if self.tokens >= 1.0:
            return 0.0
        wait = (1.0 - self.tokens) / self.rate
        return wait if now + wait > now else 0.0

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0

    def set_rate(self, rate: float, capacity: float, now: float) -> None:
        self._refill(now)  # what was earned at the old rate is kept
        self.rate = rate
        self.capacity = capacity
        self.tokens = min(self.tokens, capacity)


class AdaptiveRate:
    """The rate a key is allowed, learnt from its throttles, as botocore's adaptive retry
    mode learns one client's (a cut to `BETA` of the rate actually sent at the first
    throttle, of the rate allowed at later ones, then CUBIC growth back), but per key,
    and cut once per throttle event: the throttles of calls already in flight when the
    key closed are the same event.

    The send rate is measured over the last second (calls started, counted over the whole
    second), so that the first throttle of a burst cuts from a rate that means something;
    and a throttle after fewer than MIN_SAMPLES calls in that second says nothing of a rate
    (one call told "not now", as Glue's concurrent runs are): it engages nothing, and the
    key's gate alone answers it.
    """

    BETA = 0.7  # the cut
    SCALE = 0.4  # CUBIC's C
    MIN_RATE = 0.5  # calls a second, never below
    WINDOW = 1.0  # seconds of starts the send rate is measured over
    MIN_SAMPLES = 4  # calls in the window before a first throttle is taken as a rate

    __slots__ = ("_k", "_starts", "ceiling", "last_max", "last_throttle", "rate")

    def __init__(self, ceiling: float | None) -> None:
        self.ceiling = ceiling  # a declared rate, never exceeded
        self.rate: float | None = None  # None until the first throttle: not limiting
        self.last_max = 0.0
        self.last_throttle = 0.0
        self._k = 0.0
        self._starts: deque[float] = deque()

    def measured(self, now: float) -> float:
        """Calls started in the last WINDOW seconds, a second."""
        starts = self._starts
        while starts and starts[0] <= now - self.WINDOW:
            starts.popleft()
        return len(starts) / self.WINDOW

    def sent(self, now: float) -> None:
        starts = self._starts
        starts.append(now)
        while starts[0] <= now - self.WINDOW or len(starts) > 100_000:
            starts.popleft()

    def quiet(self, now: float) -> bool:
        """Never throttled, and nothing sent in the last WINDOW seconds."""
        return self.rate is None and self.measured(now) == 0

    def throttled(self, now: float) -> bool:
        """A throttle event: cut to BETA of what was sent at the first, of the rate allowed
        at a later one; False when it engaged nothing (too few calls to tell a rate).

        A later cut is from the rate, never from what was sent: the window still holds
        calls sent before the last cut (a burst), and cutting from those raised the rate
        at a throttle (41 to 50 calls a second, against an API allowing 40).
        """
        rate = self.rate
        if rate is None and len(self._starts) < self.MIN_SAMPLES:
            return False
        peak = self.measured(now) if rate is None else rate
        self.last_max = max(peak, self.MIN_RATE)
        self.last_throttle = now
        self._k = (self.last_max * (1 - self.BETA) / self.SCALE) ** (1 / 3)
        self.rate = self._bound(self.BETA * self.last_max)
        return True

    def succeeded(self, now: float) -> None:
        """Grow back (CUBIC): fast at first, flat near the rate of the last throttle, then
        probing beyond it; never more than twice what is sent."""
        if self.rate is None:
            return
        t = now - self.last_throttle
        cubic = self.SCALE * (t - self._k) ** 3 + self.last_max
        self.rate = self._bound(min(cubic, max(2 * self.measured(now), self.rate)))

    def _bound(self, rate: float) -> float:
        rate = max(self.MIN_RATE, rate)
        return rate if self.ceiling is None else min(rate, self.ceiling)


class SharedTokens:
    """A declared rate's tokens from the budget that every process on a durable store
    shares (`stores.base.BudgetStore`): the backlog takes them from the store, a few at a
    time, with the core's lock let go (`backlog/budgets.py`), and a call starting spends
    one. The process's own bucket still applies (and the adaptive rate cuts it)."""

    __slots__ = ("asking", "burst", "held", "rate", "retry_at")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate  # tokens a second
        self.burst = burst
        self.held = 0  # taken from the store, not spent yet
        self.asking = False  # a worker is asking the store now
        self.retry_at = -math.inf  # (monotonic) the store had none before then

    def wait(self, now: float) -> float | None:
        """0.0 with a token in hand, the seconds until the store may have one, or None
        while it is to be asked (or being asked)."""
        if self.held:
            return 0.0
        if self.asking or now >= self.retry_at:
            return None
        return self.retry_at - now

    def wanted(self, now: float) -> bool:
        """No token in hand, nobody asking, and the store may have one now."""
        return not self.held and not self.asking and now >= self.retry_at


class SharedSlots:
    """A declared concurrency's slots from the store every process shares
    (`stores.base.BudgetStore`): the backlog takes them with the core's lock let go
    (`backlog/slots.py`), a call starting takes one in hand (`started`, which the backlog
    records against its task), and the call's settling gives it back to the store. The
    process's own count of calls in flight still applies."""

    __slots__ = ("asking", "ids", "retry_at", "slots", "started")

    def __init__(self, slots: int) -> None:
        self.slots = slots  # the declared concurrency
        self.ids: list[str] = []  # taken from the store, no call started with them yet
        self.started: str | None = None  # the slot of the call that started last
        self.asking = False  # a worker is asking the store now
        self.retry_at = -math.inf  # (monotonic) the store had none free before then

    def wait(self, now: float) -> float | None:
        """0.0 with a slot in hand, the seconds until the store is asked again, or None
        while it is to be asked (or being asked)."""
        if self.ids:
            return 0.0
        if self.asking or now >= self.retry_at:
            return None
        return self.retry_at - now

    def wanted(self, now: float) -> bool:
        """No slot in hand, nobody asking, and the store may have one now."""
        return not self.ids and not self.asking and now >= self.retry_at


_MOST_STARTS = 10_000  # starts a declared rate's window keeps (a longer one is scaled down)


class Pace:
    """One key's limits: its declared Limit, its adaptive rate, and its calls in flight.

    A declared rate is a token bucket and a window: a bucket alone lets a full bucket go at
    once and then `rate` more within the same `per` seconds (HubSpot's `"100/10s"`: 199
    calls in the first 10 s). The window holds the starts of the last `per` seconds (of
    as many seconds as `burst` tokens take to come, when it is the larger, or `rate` is
    not whole), and a call starts only while fewer than `rate` (`burst`) are in it.
    """

    __slots__ = (
        "adaptive",
        "bucket",
        "limit",
        "most",
        "running",
        "shared",
        "slots",
        "span",
        "starts",
    )

    def __init__(
        self, limit: Limit | None, adaptive: bool, now: float, *, shared: bool = False
    ) -> None:
        self.limit = limit
        self.running = 0
        rate = None if limit is None else limit.per_second
        self.adaptive = AdaptiveRate(rate) if adaptive else None
        self.bucket: TokenBucket | None = None
        #: The declared rate's budget shared with other processes (`shared`: the store
        #: keeps one); None: this process's own bucket alone.
        self.shared: SharedTokens | None = None
        #: The declared concurrency's slots shared with other processes (`shared`).
        self.slots: SharedSlots | None = None
        if shared and limit is not None and limit.concurrency is not None:
            self.slots = SharedSlots(limit.concurrency)
        self.starts: deque[float] | None = None  # a declared rate's starts in its window
        self.most = 0  # starts the window may hold
        self.span = 0.0  # the window's seconds
        if limit is not None and rate is not None:
            burst = limit.burst if limit.burst is not None else max(1.0, float(limit.rate or 1))
            self.bucket = TokenBucket(rate, burst, now)
            self.most = min(math.ceil(max(float(limit.rate or 1), burst)), _MOST_STARTS)
            self.span = self.most / rate
            self.starts = deque()
            if shared:
                self.shared = SharedTokens(rate, burst)

    @property
    def rate(self) -> float | None:
        """Calls a second the key is allowed now (None: unlimited)."""
        return None if self.bucket is None else self.bucket.rate

    def wait(self, now: float) -> float | None:
        """Seconds until a call may start (0.0: now), None while every slot is taken (a
        call that settles frees one)."""
        wait = self._own_wait(now)
        if wait != 0.0:
            return wait
        if self.shared is not None:
            wait = self.shared.wait(now)  # None: the shared budget is to be asked first
            if wait != 0.0:
                return wait
        # A slot is asked for once the token is in hand: a slot held waiting for a token
        # would keep other processes' calls out meanwhile.
        return wait if self.slots is None else self.slots.wait(now)

    def _own_wait(self, now: float) -> float | None:
        limit = self.limit
        slots = None if limit is None else limit.concurrency
        if slots is not None and self.running >= slots:
            return None
        wait = 0.0 if self.bucket is None else self.bucket.wait(now)
        starts = self.starts
        if starts is not None:
            edge = now - self.span
            while starts and starts[0] <= edge:
                starts.popleft()
            if len(starts) >= self.most:
                window = starts[0] + self.span - now
                if now + window > now:  # (not only rounding, as the bucket's wait)
                    wait = max(wait, window)
        return wait

    def wants_tokens(self, now: float) -> int:
        """How many calls could start now (by the concurrency cap and this process's own
        bucket) but for tokens of the shared budget, which nobody here is asking the
        store for yet; 0 when none."""
        shared = self.shared
        if shared is None or not shared.wanted(now) or self._own_wait(now) != 0.0:
            return 0
        bucket = self.bucket
        assert bucket is not None  # a shared budget is a declared rate's
        limit = self.limit
        slots = None if limit is None else limit.concurrency
        room = int(bucket.tokens)  # whole tokens of its own, refilled by _own_wait
        if self.starts is not None:  # and room in its window (pruned by _own_wait)
            room = min(room, self.most - len(self.starts))
        return max(1, room if slots is None else min(room, slots - self.running))

    def wants_slots(self, now: float) -> int:
        """How many calls could start now (by this process's own limits and the tokens in
        hand) but for slots of the shared concurrency, which nobody here is asking the
        store for yet; 0 when none."""
        slots = self.slots
        if slots is None or not slots.wanted(now) or self._own_wait(now) != 0.0:
            return 0
        room = slots.slots - self.running  # >= 1: _own_wait checked the cap
        shared = self.shared
        if shared is not None:
            if not shared.held:
                return 0
            room = min(room, shared.held)
        return max(1, room)

    def start(self, now: float) -> None:
        self.running += 1
        slots = self.slots
        if slots is not None and slots.ids:
            slots.started = slots.ids.pop()
        if self.bucket is not None:
            self.bucket.take(now)
        if self.starts is not None:
            self.starts.append(now)
        if self.shared is not None:
            self.shared.held = max(0, self.shared.held - 1)
        if self.adaptive is not None:
            self.adaptive.sent(now)

    def idle(self, now: float) -> bool:
        """Nothing in flight, no limit of its own, and nothing learnt: safe to forget."""
        adaptive = self.adaptive
        return (
            self.running == 0 and self.limit is None and (adaptive is None or adaptive.quiet(now))
        )

    def finish(self) -> None:
        self.running = max(0, self.running - 1)

    def throttled(self, now: float) -> None:
        """A throttle event on the key: the adaptive rate is cut (and starts limiting)."""
        adaptive = self.adaptive
        if adaptive is not None and adaptive.throttled(now):
            self._apply(now)
            # No burst after any cut, not only the first: tokens saved up at the old rate
            # (a second's worth, at most) would all go out when the gate reopens.
            assert self.bucket is not None
            self.bucket.tokens = min(self.bucket.tokens, 1.0)

    def succeeded(self, now: float) -> None:
        adaptive = self.adaptive
        if adaptive is None or adaptive.rate is None:
            return
        adaptive.succeeded(now)
        self._apply(now)

    def _apply(self, now: float) -> None:
        adaptive = self.adaptive
        assert adaptive is not None
        assert adaptive.rate is not None
        rate = adaptive.rate
        if self.bucket is None:
            self.bucket = TokenBucket(rate, max(1.0, rate), now)
            self.bucket.tokens = min(self.bucket.tokens, 1.0)  # no burst right after a cut
        else:
            declared = self.limit.burst if self.limit and self.limit.burst else None
            capacity = declared if declared is not None else max(1.0, rate)
            self.bucket.set_rate(rate, capacity, now)
