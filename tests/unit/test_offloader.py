"""The Offloader with plain callables: outcomes, retries, dead letters, callbacks, limits."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import tenacity

import offload
from conftest import wait_workers_exit
from offload import GiveUp, Offloader, Retry, RetryPolicy, Task
from offload.clock import SystemClock
from offload.testing import FakeClock

MakeOffloader = Callable[..., Offloader]

FAST = RetryPolicy(wait=tenacity.wait_none())


def ledger_holds(off: Offloader) -> bool:
    s = off.stats()
    return s.enqueued == s.succeeded + s.dead_lettered + s.queued + s.delayed + s.in_flight


def test_runs_a_callable_and_returns_a_task(make_offloader: MakeOffloader) -> None:
    off = make_offloader()
    seen: list[tuple[Any, ...]] = []
    task = off.enqueue_task(lambda *a, **k: seen.append((a, k)), 1, 2, x=3)
    assert isinstance(task, Task)
    assert task.id and task.idempotency_key == task.id
    assert off.flush(5)
    assert seen == [((1, 2), {"x": 3})]
    s = off.stats()
    assert (s.enqueued, s.succeeded, s.dead_lettered, s.queued, s.in_flight) == (1, 1, 0, 0, 0)


def test_no_thread_until_first_enqueue_then_idle_exit(make_offloader: MakeOffloader) -> None:
    off = make_offloader(idle_timeout=0)
    assert not off.running
    assert not [t for t in threading.enumerate() if t.name.startswith("offload-worker")] or True
    done = threading.Event()
    off.enqueue_task(done.set)
    names = {t.name for t in off._pool.threads}
    assert names <= {"offload-worker"}
    assert done.wait(5)
    assert wait_workers_exit(off)
    assert not off.stats().worker_running
    # The next enqueue starts it again.
    again = threading.Event()
    off.enqueue_task(again.set)
    assert again.wait(5)


def test_transient_error_retried_then_succeeds(make_offloader: MakeOffloader) -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    results: list[Any] = []
    off = make_offloader(retry=FAST, on_success=lambda task, result: results.append(result))
    off.enqueue_task(flaky)
    assert off.flush(5)
    assert len(calls) == 3
    assert results == ["ok"]
    s = off.stats()
    assert (s.succeeded, s.retried, s.dead_lettered) == (1, 2, 0)


def test_exhausted_after_max_attempts(make_offloader: MakeOffloader) -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise TimeoutError("no answer")

    off = make_offloader(
        retry=RetryPolicy(stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_none())
    )
    task = off.enqueue_task(down)
    assert off.flush(5)
    assert len(calls) == 4
    [letter] = off.dead_letters()
    assert letter.reason == "exhausted"
    assert letter.attempts == 4
    assert letter.task_id == task.id
    assert "TimeoutError" in letter.error and "no answer" in letter.error
    assert letter.first_attempt_at is not None and letter.last_attempt_at is not None
    assert letter.first_attempt_at <= letter.last_attempt_at
    assert letter.first_attempt_at.tzinfo is not None
    assert ledger_holds(off)


def test_permanent_error_dead_letters_at_once(make_offloader: MakeOffloader) -> None:
    off = make_offloader(retry=FAST)
    off.enqueue_task(int, "not a number")
    assert off.flush(5)
    [letter] = off.dead_letters()
    assert (letter.reason, letter.attempts) == ("permanent", 1)
    assert "ValueError" in letter.error
    assert letter.description.endswith("int")


def test_giveup_and_retry_raised_by_the_call(make_offloader: MakeOffloader) -> None:
    attempts = []

    def wants_retry() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise Retry(after=0)
        raise GiveUp("card declined")

    off = make_offloader(retry=FAST)
    off.enqueue_task(wants_retry)
    assert off.flush(5)
    [letter] = off.dead_letters()
    assert letter.reason == "permanent"
    assert letter.error == "card declined"
    assert letter.attempts == 2


def test_retry_on_extends_the_retryable_set(make_offloader: MakeOffloader) -> None:
    class Flaky(Exception):
        pass

    calls = []

    def fn() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise Flaky("once")

    off = make_offloader(retry=RetryPolicy(wait=tenacity.wait_none(), retry_on=(Flaky,)))
    off.enqueue_task(fn)
    assert off.flush(5)
    assert len(calls) == 2 and off.stats().succeeded == 1

    calls.clear()
    off2 = make_offloader(
        retry=RetryPolicy(wait=tenacity.wait_none(), retry_on=lambda e: "once" in str(e))
    )
    off2.enqueue_task(fn)
    assert off2.flush(5)
    assert len(calls) == 2 and off2.stats().succeeded == 1


def test_per_task_policy_and_key(make_offloader: MakeOffloader) -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise ConnectionError("down")

    off = make_offloader(retry=FAST)
    task = off.enqueue_task(
        Task(
            down,
            retry=RetryPolicy(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none()),
            key="billing",
        )
    )
    assert off.flush(5)
    assert len(calls) == 2
    [letter] = off.dead_letters()
    assert letter.key == "billing" and letter.task_id == task.id


def test_a_task_cannot_be_enqueued_twice(make_offloader: MakeOffloader) -> None:
    off = make_offloader()
    task = Task(len, ("x",))
    off.enqueue_task(task)
    with pytest.raises(ValueError, match="enqueued already"):
        off.enqueue_task(task)
    with pytest.raises(TypeError, match="no further arguments"):
        off.enqueue_task(Task(print), 1)


@pytest.mark.parametrize(
    "exc",
    [SystemExit(3), KeyboardInterrupt(), RecursionError("deep"), MemoryError(), GeneratorExit()],
)
def test_nothing_a_call_raises_kills_the_worker(
    make_offloader: MakeOffloader, exc: BaseException
) -> None:
    def bad() -> None:
        raise exc

    done = threading.Event()
    off = make_offloader(retry=FAST)
    off.enqueue_task(bad)
    off.enqueue_task(done.set)
    assert done.wait(5)
    assert off.flush(5)
    [letter] = off.dead_letters()
    assert letter.reason == "permanent"
    assert type(exc).__name__ in letter.error


def test_exception_whose_str_raises(make_offloader: MakeOffloader) -> None:
    class Nasty(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    def bad() -> None:
        raise Nasty()

    off = make_offloader()
    off.enqueue_task(bad)
    assert off.flush(5)
    [letter] = off.dead_letters()
    assert "Nasty" in letter.error


def test_infinite_recursion_in_a_call(make_offloader: MakeOffloader) -> None:
    def recurse(n: int) -> int:
        return recurse(n + 1) + 1

    off = make_offloader()
    off.enqueue_task(recurse, 0)
    ok = threading.Event()
    off.enqueue_task(ok.set)
    assert ok.wait(10)
    assert off.flush(5)
    [letter] = off.dead_letters()
    assert "RecursionError" in letter.error


def test_callback_errors_are_logged_not_fatal(
    make_offloader: MakeOffloader, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("callback bug")

    off = make_offloader(
        retry=RetryPolicy(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none()),
        on_success=broken,
        on_retry=broken,
        on_dead_letter=broken,
    )
    caplog.set_level(logging.ERROR, logger="offload")
    off.enqueue_task(lambda: None)
    off.enqueue_task(int, "x")  # permanent

    def fails() -> None:
        raise ConnectionError("x")

    off.enqueue_task(fails)  # a retry, then exhausted
    assert off.flush(5)
    s = off.stats()
    assert (s.succeeded, s.dead_lettered, s.retried) == (1, 2, 1)
    names = [r.getMessage() for r in caplog.records if "callback raised" in r.getMessage()]
    assert any("on_success" in n for n in names)
    assert any("on_retry" in n for n in names)
    assert any("on_dead_letter" in n for n in names)


def test_callbacks_receive_task_and_details(make_offloader: MakeOffloader) -> None:
    retries: list[tuple[str, float, str | None]] = []
    letters: list[tuple[str, str]] = []

    def once() -> None:
        if not retries:
            raise ConnectionError("blip")
        raise GiveUp("no")

    off = make_offloader(
        retry=FAST,
        on_retry=lambda task, delay, error: retries.append((task.id, delay, error)),
        on_dead_letter=lambda task, letter: letters.append((task.id, letter.reason)),
    )
    task = off.enqueue_task(once)
    assert off.flush(5)
    assert retries[0][0] == task.id and "blip" in (retries[0][2] or "")
    assert letters == [(task.id, "permanent")]


def test_queue_full_is_immediate_and_counted(make_offloader: MakeOffloader) -> None:
    release = threading.Event()
    started = threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    off = make_offloader(max_queue=3)
    off.enqueue_task(block)
    assert started.wait(5)
    for _ in range(3):
        off.enqueue_task(len, "")
    with pytest.raises(offload.QueueFull) as info:
        off.enqueue_task(print)
    import queue

    assert isinstance(info.value, queue.Full)
    assert off.stats().rejected == 1
    release.set()
    assert off.flush(5)
    s = off.stats()
    assert s.enqueued == 4 and s.succeeded == 4 and s.rejected == 1


def test_dead_letters_replay_and_discard(make_offloader: MakeOffloader) -> None:
    outcomes = iter([GiveUp("first"), GiveUp("second"), None])

    def fn() -> None:
        error = next(outcomes)
        if error is not None:
            raise error

    off = make_offloader()
    task = off.enqueue_task(fn)
    off.enqueue_task(fn)
    assert off.flush(5)
    first, second = off.dead_letters()
    assert (first.error, second.error) == ("first", "second")
    off.discard(second.id)
    with pytest.raises(offload.UnknownDeadLetter):
        off.discard(second.id)
    with pytest.raises(KeyError):
        off.replay("nope")
    replayed = off.replay(first.id)
    assert replayed.id == task.id and replayed.idempotency_key == task.idempotency_key
    assert off.flush(5)
    assert off.dead_letters() == []
    s = off.stats()
    assert s.succeeded == 1
    assert replayed.attempts == 1, "replay starts a fresh attempt budget"


def test_max_dead_letters_keeps_newest_and_counts_dropped(make_offloader: MakeOffloader) -> None:
    off = make_offloader(max_dead_letters=3)
    for i in range(5):
        off.enqueue_task(GiveUp.__call__ if False else _raise_giveup, str(i))
    assert off.flush(5)
    assert [d.error for d in off.dead_letters()] == ["2", "3", "4"]
    s = off.stats()
    assert (s.dead_letters, s.dead_letters_dropped, s.dead_lettered) == (3, 2, 5)


def _raise_giveup(reason: str) -> None:
    raise GiveUp(reason)


def test_shutdown_dead_letters_what_is_left_and_refuses_more(
    make_offloader: MakeOffloader, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    started = threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    off = make_offloader()
    off.enqueue_task(block)
    assert started.wait(5)
    for _ in range(4):
        off.enqueue_task(len, "")
    caplog.set_level(logging.WARNING, logger="offload")
    threading.Timer(0.2, release.set).start()  # the blocked call ends after the deadline
    assert off.shutdown(timeout=0.05) is False
    letters = off.dead_letters()
    assert [d.reason for d in letters] == ["shutdown"] * 4
    warnings = [r for r in caplog.records if "undelivered" in r.getMessage()]
    assert len(warnings) == 1 and "5 task(s)" in warnings[0].getMessage()
    with pytest.raises(offload.ShutDown):
        off.enqueue_task(print)
    assert wait_workers_exit(off)
    s = off.stats()
    assert s.enqueued == s.succeeded + s.dead_lettered == 5


def test_the_ledger_holds_for_every_reader_while_shutdown_dead_letters_what_is_left(
    make_offloader: MakeOffloader,
) -> None:
    # shutdown() takes the queued and delayed tasks from the scheduler at once, then
    # dead-letters them one by one: meanwhile they still count as queued or delayed.
    release, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    seen: list[tuple[int, int]] = []  # (enqueued, the ledger's sum) that did not match
    inside: list[offload.Stats] = []

    def check(s: offload.Stats) -> None:
        total = s.succeeded + s.dead_lettered + s.queued + s.delayed + s.in_flight
        if s.enqueued != total:
            seen.append((s.enqueued, total))

    asked, answered = threading.Event(), threading.Event()

    def on_dead_letter(task: Task, letter: offload.DeadLetter) -> None:
        s = off.stats()
        check(s)
        inside.append(s)
        if len(inside) == 100:  # a reading by another thread, mid-way, for certain
            asked.set()
            answered.wait(10)

    off = make_offloader(max_queue=2_000, on_dead_letter=on_dead_letter)
    off.enqueue_task(block)
    assert started.wait(5)
    for i in range(1_200):
        off.enqueue_task(Task(len, ("",), delay=600 if i % 3 == 0 else None))
    stop = threading.Event()
    readings = 0

    def poll() -> None:
        nonlocal readings
        while not stop.is_set():
            if asked.is_set() and not answered.is_set():
                check(off.stats())
                readings += 1
                answered.set()
            check(off.stats())
            readings += 1

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        assert off.shutdown(timeout=0) is False
    finally:
        stop.set()
        release.set()
        poller.join(10)
    assert answered.is_set() and readings > 1
    assert seen == []
    assert len(inside) == 1_200
    # The letter being made is still queued or delayed for its own callback.
    assert (inside[0].queued, inside[0].delayed, inside[0].dead_lettered) == (800, 400, 0)
    assert (inside[-1].queued, inside[-1].delayed, inside[-1].dead_lettered) == (0, 1, 1_199)
    s = off.stats()
    assert (s.queued, s.delayed, s.dead_lettered) == (0, 0, 1_200)


def test_shutdown_does_not_wait_for_far_retries(make_offloader: MakeOffloader) -> None:
    off = make_offloader(retry=RetryPolicy(wait=tenacity.wait_fixed(300)))

    def fails() -> None:
        raise ConnectionError("x")

    off.enqueue_task(fails)
    assert not off.flush(0.2)  # delayed for five minutes
    import time

    start = time.monotonic()
    assert off.shutdown(timeout=30) is False
    assert time.monotonic() - start < 10, "nothing could be delivered before the deadline"
    [letter] = off.dead_letters()
    assert letter.reason == "shutdown" and letter.attempts == 1


def test_retry_waits_for_its_due_time_on_a_fake_clock(make_offloader: MakeOffloader) -> None:
    clock = FakeClock()
    calls: list[float] = []

    def fails_once() -> None:
        calls.append(clock.monotonic())
        if len(calls) == 1:
            raise ConnectionError("x")

    off = make_offloader(clock=clock, retry=RetryPolicy(wait=tenacity.wait_fixed(10)))
    off.enqueue_task(fails_once)

    def barrier() -> None:
        """Run a task: when it has run, the worker has passed a take() at the current time."""
        done = threading.Event()
        off.enqueue_task(done.set)
        assert done.wait(5)

    barrier()
    assert len(calls) == 1 and off.stats().delayed == 1
    clock.advance(9.99)
    barrier()
    assert len(calls) == 1, "retried before its due time"
    clock.advance(0.01)
    assert off.flush(5)
    assert calls == [1000.0, 1010.0]


def test_throttle_uses_no_attempts_and_is_bounded_by_time(make_offloader: MakeOffloader) -> None:
    clock = FakeClock()
    calls = []
    called = threading.Semaphore(0)

    def throttled() -> None:
        calls.append(clock.monotonic())
        called.release()
        raise Retry(after=60)

    off = make_offloader(
        clock=clock,
        retry=RetryPolicy(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none(), max_throttled=300
        ),
    )
    off.enqueue_task(throttled)
    assert called.acquire(timeout=5)
    for _ in range(4):
        clock.advance(61.5)  # past Retry-After and its jitter
        assert called.acquire(timeout=5)
    assert off.flush(5)
    # stop_after_attempt(3) did not count throttles: it went on until 300 s would be spent.
    assert calls == [1000.0, 1061.5, 1123.0, 1184.5, 1246.0]
    [letter] = off.dead_letters()
    assert letter.reason == "exhausted" and "max_throttled" in letter.error
    assert letter.attempts == 5


def test_retry_after_beyond_max_retry_after_dead_letters_at_once(
    make_offloader: MakeOffloader,
) -> None:
    def fn() -> None:
        raise Retry(after=3600)

    off = make_offloader(retry=RetryPolicy(max_retry_after=600))
    off.enqueue_task(fn)
    assert off.flush(5)
    [letter] = off.dead_letters()
    assert letter.reason == "exhausted" and letter.attempts == 1
    assert "max_retry_after" in letter.error


def test_gate_holds_key_while_other_keys_flow_on_fake_clock(make_offloader: MakeOffloader) -> None:
    clock = FakeClock()
    log: list[tuple[str, float]] = []
    state = {"a_calls": 0}

    def call_a(i: int) -> None:
        log.append((f"a{i}", clock.monotonic()))
        state["a_calls"] += 1
        if state["a_calls"] == 1:
            raise Retry(after=30)

    def call_b(i: int) -> None:
        log.append((f"b{i}", clock.monotonic()))

    off = make_offloader(clock=clock, retry=RetryPolicy(wait=tenacity.wait_none()))
    off.enqueue_task(Task(call_a, (0,), key="a"))
    for i in range(1, 4):
        off.enqueue_task(Task(call_a, (i,), key="a"))
        off.enqueue_task(Task(call_b, (i,), key="b"))
    done = threading.Event()
    off.enqueue_task(done.set)
    assert done.wait(5)
    assert [name for name, _ in log] == ["a0", "b1", "b2", "b3"]
    assert off.stats().queued == 3  # a1..a3 held behind the gate
    clock.advance(31.5)  # past Retry-After and its jitter
    assert off.flush(5)
    assert [name for name, _ in log][4:] == ["a0", "a1", "a2", "a3"], "probe first, then in order"


def test_stats_ledger_with_mixed_outcomes(make_offloader: MakeOffloader) -> None:
    off = make_offloader(
        retry=RetryPolicy(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none()), workers=4
    )

    def fails() -> None:
        raise ConnectionError("x")

    for i in range(300):
        off.enqueue_task(
            [lambda: None, fails, _raise_giveup][i % 3], *(("r",) if i % 3 == 2 else ())
        )
        assert ledger_holds(off)
    assert off.flush(10)
    s = off.stats()
    assert s.succeeded == 100 and s.dead_lettered == 200 and s.retried == 100
    assert ledger_holds(off)


def test_workers_run_calls_concurrently(make_offloader: MakeOffloader) -> None:
    barrier = threading.Barrier(4, timeout=5)
    off = make_offloader(workers=4)
    for _ in range(4):
        off.enqueue_task(barrier.wait)
    assert off.flush(10)
    assert off.stats().succeeded == 4
    assert off.dead_letters() == []


_burst = threading.Barrier(4, timeout=10)


def _nothing() -> None:
    """A stored task's function (a module-level one)."""


def _meet() -> None:
    _burst.wait()


@pytest.mark.parametrize("durable", [False, True])
def test_a_burst_while_a_worker_is_idle_starts_the_workers_it_needs(
    make_offloader: MakeOffloader, tmp_path: Any, durable: bool
) -> None:
    """One worker waits idle; a burst of four tasks arrives before it wakes. A worker that
    was woken is no longer idle, so the burst starts three more: all four run at once.
    (Counting it idle until it woke sent the burst's wake-ups to nobody, and the pool
    stayed at one worker until the next enqueue.)"""
    _burst.reset()
    store = {"store": f"sqlite:///{tmp_path / 'burst.db'}"} if durable else {}
    off = make_offloader(workers=4, idle_timeout=60, **store)
    off.enqueue_task(_nothing)
    assert off.flush(10)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30)  # the woken worker gets no turn unless the burst blocks
    try:
        for _ in range(4):
            off.enqueue_task(_meet)
    finally:
        sys.setswitchinterval(interval)
    assert off.flush(15)
    s = off.stats()
    assert (s.succeeded, s.dead_lettered) == (5, 0), off.dead_letters()


class _ParkClock(SystemClock):
    """The real clock, counting the waits workers begin (so that a test knows one waits)."""

    def __init__(self, fail_first: bool = False) -> None:
        self.parked = threading.Condition()
        self.parks = 0
        self.timeouts: list[float | None] = []
        self.fail_first = fail_first
        self.failed_in: threading.Thread | None = None

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        with self.parked:
            self.parks += 1
            self.timeouts.append(timeout)
            self.parked.notify_all()
            fail, self.fail_first = self.fail_first, False
        if fail:
            self.failed_in = threading.current_thread()
            raise RuntimeError("a wait that went wrong")
        cond.wait(timeout)

    def wait_parks(self, count: int) -> bool:
        with self.parked:
            return self.parked.wait_for(lambda: self.parks >= count, 10)


@pytest.mark.parametrize("how", ["come due", "released by a probe"])
def test_tasks_that_become_runnable_together_grow_the_pool(
    make_offloader: MakeOffloader, how: str
) -> None:
    """Four tasks enqueued one by one while one worker idles (each enqueue wakes that one)
    become runnable at once, by coming due or by a probe reopening their key: the worker
    that takes the first wakes or starts the next, so all four run together."""
    _burst.reset()
    clock = _ParkClock()
    off = make_offloader(workers=4, idle_timeout=60, clock=clock)
    tries: list[int] = []

    def probe() -> None:
        tries.append(1)
        if len(tries) == 1:
            raise offload.Retry(after=1.5)  # the key reopens once all four wait

    off.enqueue_task(Task(probe, key="k") if how != "come due" else Task(_nothing))
    assert clock.wait_parks(1)
    # All four due at one moment, whatever the machine's load makes of the loop below.
    due = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    for _ in range(4):
        parks = clock.parks
        task = Task(_meet, at=due) if how == "come due" else Task(_meet, key="k")
        off.enqueue_task(task)
        assert clock.wait_parks(parks + 1)  # the one worker looked, and waits again
    assert len(off._pool.threads) == 1
    assert off.flush(15)
    s = off.stats()
    assert (s.succeeded, s.dead_lettered) == (5, 0), off.dead_letters()


def test_a_wait_beyond_the_longest_a_thread_can_wait_is_cut_to_it(
    make_offloader: MakeOffloader,
) -> None:
    """A task due in the year 2400: the worker waits `threading.TIMEOUT_MAX` (a longer wait
    raises OverflowError, which ended the worker), and the next task still runs."""
    clock = _ParkClock()
    off = make_offloader(clock=clock)
    off.enqueue_task(Task(_nothing, at=datetime(2400, 1, 1, tzinfo=timezone.utc)))
    assert clock.wait_parks(1)
    assert clock.timeouts[-1] == threading.TIMEOUT_MAX
    done = threading.Event()
    off.enqueue_task(done.set)
    assert done.wait(10)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_ended_by_an_exception_leaves_the_pool(make_offloader: MakeOffloader) -> None:
    """Whatever ends a worker thread, it leaves the pool: a later enqueue starts another
    (a dead thread counted in the pool would have taken its place for good)."""
    clock = _ParkClock(fail_first=True)
    off = make_offloader(clock=clock)
    off.enqueue_task(_nothing)
    assert clock.wait_parks(1)
    assert clock.failed_in is not None
    clock.failed_in.join(10)  # gone, its exception reported
    done = threading.Event()
    off.enqueue_task(done.set)
    assert done.wait(10)


def test_cannot_start_thread_at_interpreter_shutdown_raises_shutdown(
    make_offloader: MakeOffloader, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.12+ refuses new threads while the interpreter finalises; offload must say
    # so to the caller rather than queue a task that no thread will ever perform.
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    off = make_offloader()
    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(offload.ShutDown, match="interpreter shutdown"):
        off.enqueue_task(print)
    s = off.stats()
    assert (s.enqueued, s.queued, s.worker_running) == (0, 0, False)
    monkeypatch.undo()
    done = threading.Event()
    off.enqueue_task(done.set)
    assert done.wait(5)


def test_flush_from_a_task_on_its_own_offloader_raises(make_offloader: MakeOffloader) -> None:
    errors: list[BaseException] = []
    off = make_offloader()

    def task() -> None:
        try:
            off.flush()
        except offload.OffloadError as exc:
            errors.append(exc)

    off.enqueue_task(task)
    assert off.flush(5)
    assert len(errors) == 1 and "own tasks" in str(errors[0])


def test_the_shutdown_warning_names_the_calls_the_memory_store_lets_go(
    make_offloader: MakeOffloader, caplog: pytest.LogCaptureFixture
) -> None:
    started, release = threading.Event(), threading.Event()

    def busy() -> None:
        started.set()
        release.wait(5)

    off = make_offloader()
    off.enqueue_task(busy)
    assert started.wait(5)  # the worker is busy: what follows stays queued
    tasks = [
        off.enqueue_task(offload.http("POST", f"https://api.example.com/n{i}?token=s3cr3t"))
        for i in range(12)
    ]
    with caplog.at_level(logging.WARNING, logger="offload"):
        off.shutdown(timeout=0)
    release.set()
    [line] = [r.getMessage() for r in caplog.records if "shut down with" in r.getMessage()]
    assert tasks[0].id in line and "POST https://api.example.com/n0?token=***" in line
    assert tasks[9].id in line and tasks[10].id not in line and "and 2 more" in line
    assert "s3cr3t" not in line and "on_dead_letter" in line


def test_a_worker_thread_that_never_runs_is_reported_once(
    make_offloader: MakeOffloader,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that does not run the application's threads (uWSGI without
    enable-threads): the worker is started but never runs; an enqueue says so, once."""
    from offload import worker

    started: list[threading.Thread] = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self))  # noqa: PLW0108 - a method: it gets the thread
    monkeypatch.setattr(worker, "STALL_WARNING", 0.0)
    off = make_offloader()
    with caplog.at_level(logging.WARNING, logger="offload"):
        for _ in range(3):
            off.enqueue_task(print)
    monkeypatch.undo()
    warned = [r.getMessage() for r in caplog.records if "has not run yet" in r.getMessage()]
    assert len(started) == 1 and len(warned) == 1
    assert "calls are waiting" in warned[0]
    off._pool.threads.clear()  # never started: nothing to join
    assert off.shutdown(0) is False  # the three calls were never made


@pytest.mark.parametrize(
    ("worker_id", "opt", "warns"),
    [
        (0, {"master": True, "processes": b"3"}, True),  # the master, fork after load
        (0, {"master": True, "py-call-uwsgi-fork-hooks": True}, False),
        (0, {"master": True, "py-call-uwsgi-fork-hooks": b"false"}, True),
        (2, {"master": True, "lazy-apps": True}, False),  # a worker
        (1, {"processes": b"1"}, False),  # no master: the process serves
    ],
)
def test_a_worker_thread_started_in_the_uwsgi_master_is_reported_once(
    make_offloader: MakeOffloader,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    worker_id: int,
    opt: dict[str, object],
    warns: bool,
) -> None:
    """uWSGI forks its workers from the master without CPython's fork hooks (unless told
    to): a thread of the master's running Python at a fork hangs the worker. Said once,
    with the options that avoid it. (tests/system/test_uwsgi.py runs the real thing.)"""
    import types

    fake = types.SimpleNamespace(worker_id=lambda: worker_id, opt=opt)
    monkeypatch.setitem(sys.modules, "uwsgi", fake)
    off = make_offloader()
    with caplog.at_level(logging.WARNING, logger="offload"):
        for _ in range(3):
            off.enqueue_task(print)
        assert off.flush(30)
    warned = [r.getMessage() for r in caplog.records if "uWSGI master" in r.getMessage()]
    assert len(warned) == (1 if warns else 0), warned
    if warns:
        assert "py-call-uwsgi-fork-hooks" in warned[0] and "lazy-apps" in warned[0]
