"""Property tests of pacing on a FakeClock: TokenBucket, AdaptiveRate, Pace, and the
scheduler's paced keys (hypothesis; random steps, invariants checked after each)."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload import Limit
from offload.limits import AdaptiveRate, Pace, TokenBucket
from offload.records import Task
from offload.scheduler import Scheduler
from offload.testing import FakeClock

EPS = 1e-6
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

rates = st.floats(min_value=0.5, max_value=100, allow_nan=False)
steps = st.lists(st.floats(min_value=0.0, max_value=1.5), min_size=1, max_size=120)


def _within_law(starts: list[float], rate: float, burst: float) -> bool:
    """No stretch of time holds more starts than the bucket allows: burst + rate * length."""
    return all(
        j - i + 1 <= burst + rate * (starts[j] - starts[i]) + EPS
        for i in range(len(starts))
        for j in range(i, len(starts))
    )


@SETTINGS
@given(rate=rates, capacity=st.floats(min_value=1, max_value=30), gaps=steps)
def test_a_bucket_keeps_its_law_and_says_exactly_when_the_next_token_comes(
    rate: float, capacity: float, gaps: list[float]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, capacity, clock.monotonic())
    starts: list[float] = []
    for gap in gaps:
        clock.advance(gap)
        now = clock.monotonic()
        while (wait := bucket.wait(now)) == 0.0:
            bucket.take(now)
            starts.append(now)
        assert wait > 0
        assert bucket.tokens <= capacity + EPS
        # Asked about later times (a copy: asking moves a bucket's own time on).
        assert copy.copy(bucket).wait(now + wait * 0.99) > 0, "never a token early"
        assert copy.copy(bucket).wait(now + wait + EPS) == 0.0, "and there when it said"
    assert _within_law(starts, rate, capacity)


@SETTINGS
@given(
    first=rates,
    second=rates,
    capacity=st.floats(min_value=1, max_value=30),
    gaps=steps,
)
def test_a_new_rate_applies_from_then_on_and_never_adds_tokens(
    first: float, second: float, capacity: float, gaps: list[float]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(first, capacity, clock.monotonic())
    half = len(gaps) // 2
    starts: list[float] = []
    for i, gap in enumerate(gaps):
        if i == half:
            before = bucket.tokens
            bucket.set_rate(second, max(1.0, min(capacity, second)), clock.monotonic())
            assert bucket.tokens <= max(before, 0.0) + EPS or bucket.tokens <= 1.0
            starts = []
        clock.advance(gap)
        now = clock.monotonic()
        while bucket.wait(now) == 0.0:
            bucket.take(now)
            starts.append(now)
    if half < len(gaps):
        assert _within_law(starts, bucket.rate, bucket.capacity + 1)


events = st.lists(
    st.tuples(
        st.sampled_from(["send", "send", "send", "throttle", "success"]),
        st.floats(min_value=0.0, max_value=0.5),
    ),
    min_size=1,
    max_size=200,
)


@SETTINGS
@given(ceiling=st.one_of(st.none(), rates), script=events)
def test_the_adaptive_rate_stays_between_its_floor_and_the_declared_rate(
    ceiling: float | None, script: list[tuple[str, float]]
) -> None:
    clock = FakeClock()
    adaptive = AdaptiveRate(ceiling)
    for event, gap in script:
        clock.advance(gap)
        now = clock.monotonic()
        before = adaptive.rate
        measured = adaptive.measured(now)
        if event == "send":
            adaptive.sent(now)
        elif event == "throttle":
            samples = len(adaptive._starts)
            engaged = adaptive.throttled(now)
            if before is None and samples < AdaptiveRate.MIN_SAMPLES:
                assert not engaged and adaptive.rate is None, "too few calls to tell a rate"
            else:
                assert engaged and adaptive.rate is not None
                # The first cut is from what was sent; a later one from the rate allowed.
                base = measured if before is None else before
                cut = max(AdaptiveRate.BETA * base, AdaptiveRate.MIN_RATE)
                assert adaptive.rate <= cut + EPS, "a throttle cuts to a fraction of the rate"
                if before is not None:
                    assert adaptive.rate <= before + EPS, "a throttle never raises the rate"
        else:
            adaptive.succeeded(now)
            if before is None:
                assert adaptive.rate is None, "a success engages nothing"
            else:
                assert adaptive.rate is not None
                grown = max(2 * adaptive.measured(now), before, AdaptiveRate.MIN_RATE)
                assert adaptive.rate <= grown + EPS, "never more than twice what is sent"
        if adaptive.rate is not None:
            assert adaptive.rate >= AdaptiveRate.MIN_RATE - EPS
            if ceiling is not None:
                assert adaptive.rate <= ceiling + EPS


@SETTINGS
@given(
    rate=st.one_of(st.none(), st.floats(min_value=1, max_value=50)),
    concurrency=st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
    adaptive=st.booleans(),
    script=st.lists(
        st.tuples(
            st.sampled_from(["start", "start", "finish", "throttle", "success"]),
            st.floats(min_value=0.0, max_value=0.3),
        ),
        min_size=1,
        max_size=150,
    ),
)
def test_a_pace_never_exceeds_its_declared_rate_or_concurrency(
    rate: float | None,
    concurrency: int | None,
    adaptive: bool,
    script: list[tuple[str, float]],
) -> None:
    if rate is None and concurrency is None:
        concurrency = 1
    limit = Limit(rate=rate, concurrency=concurrency)
    clock = FakeClock()
    pace = Pace(limit, adaptive, clock.monotonic())
    starts: list[float] = []
    for event, gap in script:
        clock.advance(gap)
        now = clock.monotonic()
        if event == "start":
            wait = pace.wait(now)
            if concurrency is not None and pace.running >= concurrency:
                assert wait is None, "no slot: a call that settles frees one"
            if wait == 0.0:
                pace.start(now)
                starts.append(now)
        elif event == "finish" and pace.running:
            pace.finish()
        elif event == "throttle":
            pace.throttled(now)
            learnt = pace.adaptive
            if learnt is not None and learnt.rate is not None and learnt.last_throttle == now:
                # Tokens saved up before the cut would all go out when the gate reopens.
                assert pace.bucket is not None and pace.bucket.tokens <= 1.0 + EPS, "no burst"
        elif event == "success":
            pace.succeeded(now)
        if concurrency is not None:
            assert pace.running <= concurrency
        if rate is not None:
            assert pace.rate is not None and pace.rate <= rate + EPS
    if rate is not None:
        assert _within_law(starts, rate, max(1.0, rate))


def _noop() -> None:
    pass


@SETTINGS
@given(
    limits=st.fixed_dictionaries(
        {
            "a": st.builds(Limit, rate=st.sampled_from([1, 2, 5]), concurrency=st.none()),
            "b": st.builds(Limit, rate=st.none(), concurrency=st.integers(1, 2)),
        }
    ),
    script=st.lists(
        st.tuples(
            st.sampled_from(["put a", "put b", "put c", "take", "take", "settle", "advance"]),
            st.floats(min_value=0.0, max_value=0.7),
        ),
        min_size=1,
        max_size=150,
    ),
)
def test_the_scheduler_paces_keys_keeps_their_order_and_lets_other_keys_flow(
    limits: dict[str, Limit], script: list[tuple[str, float]]
) -> None:
    """Key "a" has a rate, "b" a concurrency, "c" nothing. Every start obeys its key's
    limit, a key's tasks start in the order they came, a task that may run is never
    held behind another key's pace, and the worker is told when the next token is due."""
    clock = FakeClock()
    sched = Scheduler(limits, adaptive=False)
    queued: dict[str, list[Task]] = {"a": [], "b": [], "c": []}
    running: list[Task] = []
    starts: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for event, gap in script:
        now = clock.monotonic()
        if event.startswith("put"):
            key = event[-1]
            task = Task(_noop, key=key)
            sched.put(task)
            queued[key].append(task)
        elif event == "take":
            task = sched.take(now)
            if task is None:
                # Nothing may run: every key with tasks waits for its limit.
                assert not queued["c"], "an unlimited key is never held"
                if queued["a"]:
                    wait = sched.paces["a"].wait(now)
                    assert wait is not None and wait > 0
                    woken = sched.next_wake(now)
                    assert woken is not None and woken <= wait + EPS, "the worker wakes for it"
                if queued["b"]:
                    assert sum(t.key == "b" for t in running) >= limits["b"].concurrency  # type: ignore[operator]
                continue
            assert task.key is not None
            assert queued[task.key][0] is task, "order within a key is kept"
            queued[task.key].pop(0)
            running.append(task)
            starts[task.key].append(now)
            concurrency = limits["b"].concurrency
            assert concurrency is not None
            assert sum(t.key == "b" for t in running) <= concurrency
        elif event == "settle" and running:
            task = running.pop(0)
            sched.settle(task, None, now=now, delivered=True)
        else:
            clock.advance(gap)
    a = limits["a"]
    assert a.rate is not None
    assert _within_law(starts["a"], a.rate, max(1.0, a.rate))
