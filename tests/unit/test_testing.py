"""offload.testing: eager mode and the dead-letter assertions, against a real local server."""

from __future__ import annotations

import gc
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
import tenacity

import offload
from offload import Offloader, RetryPolicy, _default
from offload.testing import (
    DeadLettered,
    EagerOffloader,
    FakeClock,
    assert_dead_lettered,
    assert_no_dead_letters,
    dead_letters_matching,
    eager,
)
from server import Answer, ScriptedServer

MakeOffloader = Callable[..., Offloader]


def ledger_holds(off: Offloader) -> bool:
    s = off.stats()
    return s.enqueued == s.succeeded + s.dead_lettered + s.queued + s.delayed + s.in_flight


def run_bounded(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run `fn` in a thread; fail if it has not returned within `timeout` (it would be
    waiting out a backoff or a Retry-After that eager mode must skip)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "eager enqueue did not return: it waited instead of skipping"
    if "error" in result:
        raise result["error"]
    return result.get("value")


# -- eager mode: inline delivery ------------------------------------------------------------


def test_eager_delivers_inline_before_enqueue_returns(server: ScriptedServer) -> None:
    with eager() as off:
        task = offload.enqueue_task(offload.http("POST", server.url("/hook"), json={"n": 1}))
        # No flush: the call was made by the time enqueue_task returned.
        received = server.requests_to("/hook")
        assert [r.body for r in received] == [b'{"n": 1}']
        assert task.attempts == 1
        s = offload.stats()
        assert (s.enqueued, s.succeeded, s.dead_lettered, s.worker_running) == (1, 1, 0, False)
        assert not off.running
    assert not [t for t in threading.enumerate() if t.name.startswith("offload-worker")]


def test_eager_runs_the_callable_in_the_enqueuing_thread() -> None:
    seen: list[threading.Thread] = []
    with eager():
        offload.enqueue_task(lambda: seen.append(threading.current_thread()))
    assert seen == [threading.current_thread()]


def test_eager_retries_at_once_ignoring_backoff_and_retry_after(server: ScriptedServer) -> None:
    server.script(
        "/charge",
        Answer(503),
        Answer(429, headers={"Retry-After": "120"}),
        Answer(503, headers={"Retry-After": "90"}),
        Answer(200),
    )
    with eager() as off:
        task = run_bounded(lambda: off.enqueue_task(offload.http("POST", server.url("/charge"))))
        assert len(server.requests_to("/charge")) == 4
        assert task.attempts == 4
        s = off.stats()
        assert (s.succeeded, s.retried, s.delayed, s.dead_lettered) == (1, 3, 0, 0)
        assert off._core.sched.gates == {}
        assert ledger_holds(off)


def test_eager_keeps_the_policy_decisions_of_production(server: ScriptedServer) -> None:
    """Only the waiting is skipped: attempts and reasons are those production would give."""
    server.script("/down", Answer(500))
    server.script("/far", Answer(429, headers={"Retry-After": "3600"}))
    server.script("/bad", Answer(422))
    policy = RetryPolicy(stop=tenacity.stop_after_attempt(3), max_retry_after=60)
    with eager(retry=policy) as off:
        off.enqueue_task(offload.http("POST", server.url("/down")))
        off.enqueue_task(offload.http("POST", server.url("/far")))
        off.enqueue_task(offload.http("POST", server.url("/bad")))
        letters = {dl.description.rsplit("/", 1)[1]: dl for dl in off.dead_letters()}
    assert (letters["down"].reason, letters["down"].attempts, letters["down"].status) == (
        "exhausted",
        3,
        500,
    )
    assert letters["far"].reason == "exhausted" and letters["far"].attempts == 1
    assert "max_retry_after" in letters["far"].error
    assert (letters["bad"].reason, letters["bad"].attempts) == ("permanent", 1)


def test_eager_ends_an_endless_throttle_by_skipped_time(server: ScriptedServer) -> None:
    server.script("/busy", Answer(429, headers={"Retry-After": "1"}))
    policy = RetryPolicy(max_throttled=30)
    off = EagerOffloader(retry=policy)
    try:
        run_bounded(lambda: off.enqueue_task(offload.http("GET", server.url("/busy"))))
        [letter] = off.dead_letters()
        assert letter.reason == "exhausted"
        assert "max_throttled" in letter.error
        calls = len(server.requests_to("/busy"))
        assert 2 <= calls == letter.attempts
        assert calls <= 31  # at least 1 s of skipped time per throttled attempt
    finally:
        off.shutdown(0)


def test_eager_callable_retry_and_giveup() -> None:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise offload.Retry(after=30)
        return "ok"

    def declined() -> None:
        raise offload.GiveUp("card declined")

    with eager() as off:
        run_bounded(lambda: off.enqueue_task(flaky))
        off.enqueue_task(declined)
        assert len(attempts) == 3
        [letter] = off.dead_letters()
        assert letter.reason == "permanent" and "card declined" in letter.error
        assert ledger_holds(off)


def test_eager_fail_fast_raises_and_still_keeps_the_dead_letter(server: ScriptedServer) -> None:
    server.script("/bad", Answer(400))
    with eager(fail_fast=True) as off:
        with pytest.raises(DeadLettered) as info:
            offload.enqueue_task(offload.http("POST", server.url("/bad")))
        assert info.value.dead_letter.status == 400
        assert isinstance(info.value, AssertionError)
        assert "POST" in str(info.value) and "permanent" in str(info.value)
        assert [dl.id for dl in off.dead_letters()] == [info.value.dead_letter.id]
        # A call that is delivered raises nothing.
        offload.enqueue_task(offload.http("POST", server.url("/ok")))


def test_eager_nested_enqueue_runs_inline_too() -> None:
    order: list[str] = []

    def inner() -> None:
        order.append("inner")

    def outer() -> None:
        order.append("outer")
        offload.enqueue_task(inner)
        order.append("outer done")

    with eager() as off:
        offload.enqueue_task(outer)
        assert order == ["outer", "inner", "outer done"]
        assert off.stats().succeeded == 2


def test_eager_replay_performs_at_once(server: ScriptedServer) -> None:
    server.script("/crm", Answer(500))
    with eager(retry=RetryPolicy(stop=tenacity.stop_after_attempt(2))) as off:
        task = off.enqueue_task(offload.http("POST", server.url("/crm"), idempotency_key=True))
        [letter] = off.dead_letters()
        server.script("/crm", Answer(200))
        replayed = off.replay(letter.id)
        assert off.dead_letters() == []
        requests = server.requests_to("/crm")
        assert len(requests) == 3
        assert {r.headers["Idempotency-Key"] for r in requests} == {task.idempotency_key}
        assert replayed.id == task.id
        assert ledger_holds(off)


def test_eager_from_many_threads_keeps_the_ledger() -> None:
    counts: dict[int, int] = {}
    lock = threading.Lock()

    def job(n: int) -> None:
        with lock:
            counts[n] = counts.get(n, 0) + 1
            seen = counts[n]
        if n % 3 == 0 and seen < 3:
            # Two retries, skipped. Short: the skipped time is shared by the threads, and
            # all 266 retries' skips must stay far inside the policy's 600 s bound (at
            # after=5 a call preempted for most of the test saw 1,330 s go by, and gave up).
            raise offload.Retry(after=1)
        if n % 7 == 0:
            raise ValueError(f"bad {n}")

    off = EagerOffloader()
    barrier = threading.Barrier(8)

    def producer(base: int) -> None:
        barrier.wait()
        for i in range(50):
            off.enqueue_task(job, base * 1000 + i)

    threads = [threading.Thread(target=producer, args=(b,)) for b in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not any(t.is_alive() for t in threads)
        s = off.stats()
        assert s.enqueued == 400
        assert (s.queued, s.delayed, s.in_flight) == (0, 0, 0)
        assert ledger_holds(off)
        sevens = [n for n in counts if n % 7 == 0]
        assert s.dead_lettered == len(sevens) == len(off.dead_letters())
        assert all(counts[n] == (3 if n % 3 == 0 else 1) for n in counts)
        assert off._core.sched.gates == {}
    finally:
        off.shutdown(0)


def test_eager_with_a_fake_clock_stamps_fake_wall_time(server: ScriptedServer) -> None:
    server.script("/x", Answer(404))
    clock = FakeClock(epoch=1_700_000_000.0)
    off = EagerOffloader(clock=clock)
    try:
        off.enqueue_task(offload.http("GET", server.url("/x")))
        [letter] = off.dead_letters()
        assert letter.first_attempt_at is not None
        assert letter.first_attempt_at.timestamp() == 1_700_000_000.0
    finally:
        off.shutdown(0)


def test_eager_shutdown_refuses_new_tasks_and_closes_connections(server: ScriptedServer) -> None:
    off = EagerOffloader()
    off.enqueue_task(offload.http("GET", server.url("/a")))
    assert len(off._backlog._resources) == 1
    assert off.shutdown(1)
    assert off._backlog._resources == []
    with pytest.raises(offload.ShutDown):
        off.enqueue_task(offload.http("GET", server.url("/a")))


def test_eager_offloader_collected_without_shutdown_closes_connections(
    server: ScriptedServer,
) -> None:
    off = EagerOffloader()
    off.enqueue_task(offload.http("GET", server.url("/a")))
    finalizer = off._backlog._finalizer
    assert finalizer.alive
    del off
    gc.collect()
    assert not finalizer.alive


def test_eager_options_are_validated() -> None:
    with pytest.raises(ValueError, match="memory"):
        EagerOffloader(store="sqlite:///never-created.db")
    with pytest.raises(ValueError, match="consume"):
        EagerOffloader(consume=False)
    with pytest.raises(TypeError, match="fail_fast"):
        EagerOffloader(fail_fast="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_dead_letters"):
        EagerOffloader(max_dead_letters=-1)
    assert repr(EagerOffloader()).startswith("EagerOffloader(store='memory'")


# -- eager(): swapping the module-level default -------------------------------------------


def test_eager_restores_the_previous_default(server: ScriptedServer) -> None:
    offload.configure(idle_timeout=0.5)
    before = _default.get()
    with eager() as off:
        assert _default.get() is off
        offload.enqueue_task(offload.http("GET", server.url("/in")))
    assert _default.get() is before
    assert before.stats().enqueued == 0  # the eager call never touched it
    offload.enqueue_task(offload.http("GET", server.url("/after")))
    assert offload.flush(5)
    assert before.stats().succeeded == 1


def test_eager_without_a_default_leaves_none_behind() -> None:
    assert _default.current() is None
    with eager():
        offload.enqueue_task(lambda: None)
    assert _default.current() is None


def test_eager_inherits_configured_retry_and_callbacks(server: ScriptedServer) -> None:
    server.script("/down", Answer(500))
    letters: list[offload.DeadLetter] = []
    offload.configure(
        retry=RetryPolicy(stop=tenacity.stop_after_attempt(2)),
        on_dead_letter=lambda task, letter: letters.append(letter),
        store="memory",
    )
    with eager():
        offload.enqueue_task(offload.http("POST", server.url("/down")))
    assert len(server.requests_to("/down")) == 2
    assert [dl.attempts for dl in letters] == [2]
    # Options given to eager() win.
    with eager(retry=RetryPolicy(stop=tenacity.stop_after_attempt(1))):
        offload.enqueue_task(offload.http("POST", server.url("/down")))
    assert len(server.requests_to("/down")) == 3


def test_eager_ignores_the_store_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_STORE", "sqlite:///must-not-be-opened.db")
    with eager() as off:
        assert off.store.url == "memory"


def test_configure_inside_eager_is_undone_on_exit() -> None:
    with eager():
        offload.configure(idle_timeout=0.1)
        replacement = _default.get()
        assert not isinstance(replacement, EagerOffloader)
    assert _default.current() is None
    with pytest.raises(offload.ShutDown):
        replacement.enqueue_task(lambda: None)


# -- dead-letter assertions -----------------------------------------------------------------


def test_assert_no_dead_letters_flushes_a_background_offloader_first(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    server.script("/slow", Answer(200, delay=0.2))
    off = make_offloader()
    off.enqueue_task(offload.http("POST", server.url("/slow")))
    assert_no_dead_letters(off)
    assert len(server.requests_to("/slow")) == 1
    assert off.stats().succeeded == 1


def test_assert_no_dead_letters_lists_what_failed_without_secrets(server: ScriptedServer) -> None:
    server.script("/contacts", Answer(400))
    with eager() as off:
        offload.enqueue_task(offload.http("POST", server.url("/contacts?api_token=s3cr3t")))
        with pytest.raises(AssertionError) as info:
            assert_no_dead_letters()
        with pytest.raises(AssertionError):
            assert_no_dead_letters(off)
    message = str(info.value)
    assert "1 dead letter" in message
    assert "/contacts" in message and "permanent" in message and "status 400" in message
    assert "s3cr3t" not in message


def test_assert_no_dead_letters_fails_when_work_is_still_pending(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    release = threading.Event()
    server.script("/hang", Answer.hang(release))
    off = make_offloader()
    off.enqueue_task(offload.http("GET", server.url("/hang"), timeout=10))
    assert server.wait_for(1, path="/hang")
    try:
        with pytest.raises(AssertionError, match="1 running"):
            assert_no_dead_letters(off, timeout=0.1)
    finally:
        release.set()


def test_assert_no_dead_letters_makes_no_default_offloader() -> None:
    assert_no_dead_letters()
    assert dead_letters_matching() == []
    assert _default.current() is None


def test_dead_letters_matching_filters(server: ScriptedServer) -> None:
    server.script("/a", Answer(404))
    server.script("/b", Answer(500))

    def broken() -> None:
        raise KeyError("customer_42")

    with eager(retry=RetryPolicy(stop=tenacity.stop_after_attempt(2))):
        offload.enqueue_task(offload.http("GET", server.url("/a")))
        offload.enqueue_task(offload.http("GET", server.url("/b")))
        offload.enqueue_task(broken)
        everything = dead_letters_matching()
        assert len(everything) == 3
        assert [dl.status for dl in dead_letters_matching(reason="permanent")] == [404, None]
        assert [dl.status for dl in dead_letters_matching(reason="exhausted")] == [500]
        assert [dl.status for dl in dead_letters_matching(status=500)] == [500]
        assert len(dead_letters_matching(key=server.base_url)) == 2
        assert len(dead_letters_matching(description="/a")) == 1
        assert len(dead_letters_matching(description=re.compile(r"broken$"))) == 1
        assert len(dead_letters_matching(error="customer_42")) == 1
        assert dead_letters_matching(error=re.compile(r"^nothing")) == []
        assert dead_letters_matching(reason="shutdown") == []
    with pytest.raises(ValueError, match="reason"):
        dead_letters_matching(reason="failed")
    with pytest.raises(TypeError, match="description"):
        dead_letters_matching(description=42)  # type: ignore[arg-type]


def test_assert_dead_lettered(server: ScriptedServer) -> None:
    server.script("/gone", Answer(410))
    with eager() as off:
        off.enqueue_task(offload.http("DELETE", server.url("/gone")))
        off.enqueue_task(offload.http("DELETE", server.url("/gone")))
        found = assert_dead_lettered(status=410)
        assert len(found) == 2
        assert assert_dead_lettered(off, count=2, reason="permanent") == found
        with pytest.raises(AssertionError, match=r"expected 1 matching.*found 2"):
            assert_dead_lettered(count=1)
        with pytest.raises(AssertionError, match=r"(?s)at least 1.*found 0.*DELETE"):
            assert_dead_lettered(status=500)
        assert assert_dead_lettered(count=0, status=500) == []
        with pytest.raises(ValueError, match="count"):
            assert_dead_lettered(count=-1)


def test_fake_clock_still_moves_only_when_told() -> None:
    clock = FakeClock(start=10.0, epoch=100.0)
    assert (clock.monotonic(), clock.time()) == (10.0, 100.0)
    clock.advance(2.5)
    assert (clock.monotonic(), clock.time()) == (12.5, 102.5)
    with pytest.raises(ValueError, match="advance"):
        clock.advance(-1)


def test_eager_works_with_responses_mocking_requests() -> None:
    import responses

    with responses.RequestsMock() as mocked, eager():
        mocked.post("http://127.0.0.1:9/hook", status=503)
        mocked.post("http://127.0.0.1:9/hook", status=201)
        task = offload.enqueue_task(offload.http("POST", "http://127.0.0.1:9/hook", json={}))
        assert task.attempts == 2
        assert len(mocked.calls) == 2
        assert_no_dead_letters()


def test_a_fake_clock_wait_that_begins_after_an_advance_returns_at_once() -> None:
    """A thread that read the time, then waits after an advance() it did not see (that
    advance() knew no Condition of its to wake) returns at once, to look again."""
    clock = FakeClock()
    cond = threading.Condition()
    returned = threading.Event()

    def waiter(looked: threading.Event, go: threading.Event) -> None:
        clock.monotonic()
        looked.set()
        go.wait(10)
        with cond:
            clock.wait(cond, 5.0)
        returned.set()

    looked, go = threading.Event(), threading.Event()
    thread = threading.Thread(target=waiter, args=(looked, go), daemon=True)
    thread.start()
    assert looked.wait(10)
    clock.advance(1.0)
    go.set()
    assert returned.wait(10)
    thread.join(10)
