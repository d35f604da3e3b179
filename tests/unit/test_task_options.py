"""Task options over the memory store: delays, deduplication, async callables, httpx, and
the trusted-function rule (its registry and checks; stores that refuse rows: contract/system).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import tenacity

import offload
from offload import GiveUp, NotSerializable, Offloader, Retry, RetryPolicy, Task
from offload.codec.trust import Trust, registered
from offload.testing import EagerOffloader, FakeClock, eager
from server import Answer, ScriptedServer

MakeOffloader = Any
FAST = RetryPolicy(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_none())


def ledger_holds(off: Offloader) -> bool:
    s = off.stats()
    return s.enqueued == s.succeeded + s.dead_lettered + s.queued + s.delayed + s.in_flight


# -- delays ---------------------------------------------------------------------------------


def test_a_delayed_call_is_not_made_early_and_counts_as_delayed(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    off = make_offloader()
    started = time.monotonic()
    off.enqueue_task(Task(offload.http("POST", server.url("/later")), delay=0.6))
    off.enqueue_task(offload.http("POST", server.url("/now")))
    assert server.wait_for(1, "/now")
    s = off.stats()
    assert s.delayed == 1 and s.queued == 0 and ledger_holds(off)
    assert off.flush(5), "flush waits for the delayed task"
    (request,) = server.requests_to("/later")
    assert request.at - started >= 0.6
    assert off.stats().delayed == 0 and off.stats().succeeded == 2


def test_at_and_timedelta_delays(server: ScriptedServer, make_offloader: MakeOffloader) -> None:
    off = make_offloader()
    started = time.monotonic()
    when = datetime.now(timezone.utc) + timedelta(seconds=0.5)
    off.enqueue_task(Task(offload.http("POST", server.url("/at")), at=when))
    off.enqueue_task(Task(offload.http("POST", server.url("/td")), delay=timedelta(seconds=0.3)))
    off.enqueue_task(Task(offload.http("POST", server.url("/past")), at=when - timedelta(days=1)))
    assert off.flush(5)
    at = {path: server.requests_to(path)[0].at - started for path in ("/at", "/td", "/past")}
    assert at["/at"] >= 0.45  # wall-clock `at` against the monotonic arrival: a little slack
    assert at["/td"] >= 0.3
    assert at["/past"] < at["/td"], "a time in the past means at once"


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"delay": -1}, ValueError, "delay"),
        ({"delay": float("nan")}, ValueError, "delay"),
        ({"delay": "10"}, TypeError, "delay"),
        ({"at": datetime(2030, 1, 1)}, ValueError, "timezone-aware"),
        ({"at": "2030-01-01T00:00Z"}, TypeError, "at"),
        ({"delay": 1, "at": datetime.now(timezone.utc)}, ValueError, "not both"),
        ({"dedup_key": ""}, ValueError, "dedup_key"),
        ({"dedup_key": 5}, TypeError, "dedup_key"),
        ({"dedup_key": "k", "dedup_window": -1}, ValueError, "dedup_window"),
        ({"dedup_window": 10}, ValueError, "needs a dedup_key"),
    ],
)
def test_bad_task_options_are_refused_naming_them(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Task(print, **options)


def test_shutdown_dead_letters_a_delayed_task_of_the_memory_store(
    make_offloader: MakeOffloader,
) -> None:
    off = make_offloader()
    off.enqueue_task(Task(print, ("x",), delay=3600))
    assert off.shutdown(timeout=0.2) is False, "shutdown does not sit out an hour"
    [letter] = off.dead_letters()
    assert letter.reason == "shutdown"


def test_eager_runs_delayed_tasks_now_or_on_its_clock() -> None:
    ran: list[str] = []
    with eager() as off:
        off.enqueue_task(Task(ran.append, ("now",), delay=600))
    assert ran == ["now"]
    clock = FakeClock()
    off2 = EagerOffloader(clock=clock, delays="clock")
    try:
        off2.enqueue_task(Task(ran.append, ("later",), delay=600))
        assert ran == ["now"] and off2.stats().delayed == 1
        assert off2.flush(0) is False  # not due on the fake clock yet
        clock.advance(601)
        assert off2.flush(0) is True
        assert ran == ["now", "later"]
    finally:
        off2.shutdown(0)


# -- deduplication --------------------------------------------------------------------------


def test_sixteen_threads_enqueue_one_key_and_one_call_is_made(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    server.script("/sync", Answer(200, delay=1.0))  # in flight while the threads enqueue
    off = make_offloader(workers=4)
    start = threading.Barrier(16)
    handles: list[Task] = []
    lock = threading.Lock()

    def enqueue() -> None:
        start.wait()
        for _ in range(20):
            task = off.enqueue_task(
                Task(offload.http("POST", server.url("/sync")), dedup_key="crm:user:42")
            )
            with lock:
                handles.append(task)

    threads = [threading.Thread(target=enqueue) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert ledger_holds(off)
    assert off.flush(10)
    assert len(server.requests_to("/sync")) == 1
    assert len({t.id for t in handles}) == 1, "every enqueue returned the task holding the key"
    s = off.stats()
    assert s.enqueued == 1 and s.deduplicated == 16 * 20 - 1 and ledger_holds(off)


def test_a_key_is_free_again_after_the_task_ends_and_its_window(
    make_offloader: MakeOffloader,
) -> None:
    clock = FakeClock()
    calls: list[int] = []
    off = make_offloader(clock=clock)
    first = off.enqueue_task(Task(calls.append, (1,), dedup_key="k", dedup_window=300))
    assert off.flush(5) and calls == [1]
    again = off.enqueue_task(Task(calls.append, (2,), dedup_key="k", dedup_window=300))
    assert again.id == first.id and off.stats().deduplicated == 1  # within the window
    clock.advance(301)
    third = off.enqueue_task(Task(calls.append, (3,), dedup_key="k"))
    assert third.id != first.id
    assert off.flush(5) and calls == [1, 3]
    fourth = off.enqueue_task(Task(calls.append, (4,), dedup_key="k"))  # no window: free
    assert fourth.id != third.id and off.flush(5) and calls == [1, 3, 4]
    assert ledger_holds(off)


def test_a_dead_lettered_key_is_free_and_a_replay_takes_it_again(
    make_offloader: MakeOffloader,
) -> None:
    release = threading.Event()
    outcomes = iter([GiveUp("no"), None, None])

    def crm() -> None:
        error = next(outcomes)
        if error is not None:
            raise error
        release.wait(10)  # the replay holds the key while the test looks

    off = make_offloader()
    first = off.enqueue_task(Task(crm, dedup_key="user:1"))
    assert off.flush(5)
    [letter] = off.dead_letters()
    replayed = off.replay(letter.id)
    assert replayed.id == first.id and replayed.dedup_key == "user:1"
    duplicate = off.enqueue_task(Task(crm, dedup_key="user:1"))
    assert duplicate is replayed, "the replayed task holds its key again"
    release.set()
    assert off.flush(5)
    fresh = off.enqueue_task(Task(crm, dedup_key="user:1"))
    assert fresh.id != first.id and off.flush(5)
    assert off.stats().deduplicated == 1 and ledger_holds(off)


def test_the_ledger_is_exact_under_a_race_of_dedup_and_settling(
    make_offloader: MakeOffloader,
) -> None:
    off = make_offloader(workers=4, max_queue=100_000)
    stop = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        while not stop.is_set():
            if not ledger_holds(off):
                errors.append(AssertionError(off.stats()))
                return

    watcher = threading.Thread(target=watch)
    watcher.start()

    def enqueue(offset: int) -> None:
        for i in range(2_000):
            off.enqueue_task(Task(len, ((),), dedup_key=f"k{(i + offset) % 50}"))

    threads = [threading.Thread(target=enqueue, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert off.flush(30)
    stop.set()
    watcher.join(5)
    assert not errors
    s = off.stats()
    assert s.enqueued + s.deduplicated == 8_000 and s.enqueued == s.succeeded


def test_eager_mode_deduplicates_too() -> None:
    calls: list[int] = []
    with eager(delays="clock", clock=FakeClock()) as off:
        a = off.enqueue_task(Task(calls.append, (1,), dedup_key="k", delay=60))
        b = off.enqueue_task(Task(calls.append, (2,), dedup_key="k"))
        assert a.id == b.id and calls == [] and off.stats().deduplicated == 1


# -- async callables ------------------------------------------------------------------------

_seen: list[str] = []


async def async_record(name: str) -> str:
    await asyncio.sleep(0)
    _seen.append(name)
    return name


def test_an_async_callable_runs_to_completion_with_its_outcomes(
    make_offloader: MakeOffloader,
) -> None:
    clock = FakeClock()
    attempts: list[float] = []
    loops: list[asyncio.AbstractEventLoop] = []

    tried = threading.Event()

    async def later() -> None:
        loops.append(asyncio.get_running_loop())
        attempts.append(clock.monotonic())
        tried.set()
        if len(attempts) == 1:
            raise Retry(after=30)

    async def broken() -> None:
        raise ValueError("bad input")

    retried = threading.Event()  # set once the retry's due time was read off the clock
    off = make_offloader(
        clock=clock, retry=FAST, idle_timeout=0.1, on_retry=lambda *_: retried.set()
    )
    off.enqueue_task(async_record, "side effect")
    off.enqueue_task(later)
    off.enqueue_task(broken)
    assert tried.wait(5) and retried.wait(5)
    clock.advance(29)
    assert len(attempts) == 1, "Retry(after=30) is honoured"
    clock.advance(3)  # past its jitter
    assert off.flush(5)
    assert _seen == ["side effect"] and len(attempts) == 2 and attempts[1] - attempts[0] >= 30
    [letter] = off.dead_letters()
    assert letter.reason == "permanent" and "ValueError: bad input" in letter.error
    # The worker's loop is the same across its tasks, and closed when it exits idle (its
    # idle time is on the fake clock too).
    clock.advance(1)
    for thread in list(off._pool.threads):
        thread.join(5)
    assert not off.running and loops and all(loop.is_closed() for loop in loops)


def test_eager_mode_awaits_an_async_callable_even_from_async_code() -> None:
    async def handler() -> None:
        with eager(fail_fast=True):
            offload.enqueue_task(async_record, "from a running loop")

    asyncio.run(handler())
    assert "from a running loop" in _seen


# -- httpx ----------------------------------------------------------------------------------


async def httpx_post(url: str) -> Any:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.post(url, json={"n": 1})


async def httpx_raising(url: str) -> Any:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url)
        response.raise_for_status()
        return response


def test_httpx_async_calls_are_retried_and_judged_like_requests(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    server.script("/flaky", Answer(503), Answer(200))
    server.script("/slow-down", Answer(429, headers={"Retry-After": "1"}), Answer(200))
    server.script("/missing", Answer(404))
    server.script("/raised", Answer(502), Answer(200))
    off = make_offloader(retry=FAST, workers=2)
    off.enqueue_task(httpx_post, server.url("/flaky"))
    off.enqueue_task(httpx_post, server.url("/slow-down"))
    off.enqueue_task(httpx_post, server.url("/missing"))
    off.enqueue_task(httpx_raising, server.url("/raised"))
    off.enqueue_task(httpx_post, "http://127.0.0.1:9/closed")  # a refused connection
    assert off.flush(20)
    assert len(server.requests_to("/flaky")) == 2
    first, second = server.requests_to("/slow-down")
    assert second.at - first.at >= 1.0, "not earlier than Retry-After"
    assert len(server.requests_to("/raised")) == 2  # HTTPStatusError judged by its status
    letters = {letter.status: letter for letter in off.dead_letters()}
    assert letters[404].reason == "permanent" and len(server.requests_to("/missing")) == 1
    refused = [dl for dl in off.dead_letters() if dl.status is None]
    assert refused and refused[0].reason == "exhausted" and refused[0].attempts == 3


_KEY = "sk-live-4f9a1c\n"  # as read from a file: the task's own, not among its arguments


async def httpx_with_key(url: str) -> Any:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(url, headers={"X-Api-Key": _KEY})


def test_httpx_raised_redirects_and_refused_headers_are_dead_letters_without_secrets(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    """raise_for_status() on a redirect httpx did not follow is not a delivery, and a header
    value h11 refuses (a key read with its line break) fails the same way every time: both
    are permanent, and the refused value, quoted by h11, stays out of the letter."""
    server.script("/moved", Answer(301, headers={"Location": "https://elsewhere.invalid/"}))
    off = make_offloader(retry=FAST)
    off.enqueue_task(httpx_raising, server.url("/moved"))
    off.enqueue_task(httpx_with_key, server.url("/keyed"))
    assert off.flush(20)
    assert off.stats().succeeded == 0
    moved, keyed = sorted(off.dead_letters(), key=lambda dl: dl.status is None)
    assert moved.reason == "permanent" and moved.status == 301 and moved.attempts == 1
    assert keyed.reason == "permanent" and keyed.attempts == 1
    assert "LocalProtocolError" in keyed.error and "sk-live-4f9a1c" not in keyed.error
    assert not server.requests_to("/keyed")


async def httpx_fan_out(urls: list[str]) -> None:
    async with httpx.AsyncClient(timeout=5) as client:

        async def post(url: str) -> None:
            (await client.post(url)).raise_for_status()

        async with asyncio.TaskGroup() as group:
            for url in urls:
                group.create_task(post(url))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups: 3.11+")
def test_an_async_task_group_is_retried_by_the_errors_it_holds(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    """A 503 inside an asyncio.TaskGroup reaches offload as an ExceptionGroup: still
    transient (retried), while a 404 in one is permanent."""
    server.script("/flaky", Answer(503), Answer(200))
    server.script("/missing", Answer(404))
    off = make_offloader(retry=FAST)
    off.enqueue_task(httpx_fan_out, [server.url("/flaky"), server.url("/fine")])
    off.enqueue_task(httpx_fan_out, [server.url("/missing")])
    assert off.flush(20)
    assert len(server.requests_to("/flaky")) == 2 and off.stats().succeeded == 1
    [letter] = off.dead_letters()
    assert letter.reason == "permanent" and letter.status == 404 and letter.attempts == 1


# -- trusted functions ----------------------------------------------------------------------


@offload.task
def registered_job(n: int) -> int:
    return n


def unregistered_job(n: int) -> int:
    return n


def test_task_registers_a_function_by_its_path_and_returns_it() -> None:
    assert registered()[f"{__name__}:registered_job"] is registered_job
    assert registered_job(3) == 3
    with pytest.raises(NotSerializable, match="lambda"):
        offload.task(lambda: None)


def test_trust_says_which_paths_a_store_may_name_without_importing() -> None:
    trust = Trust("registered")
    assert trust.allows(f"{__name__}:registered_job")
    assert not trust.allows(f"{__name__}:unregistered_job")
    with pytest.raises(ValueError, match="not registered"):
        trust.resolve("nosuch.module.that.would.fail:fn")  # refused before any import
    prefixes = Trust(("myapp.tasks",))
    assert prefixes.allows("myapp.tasks:a") and prefixes.allows("myapp.tasks.billing:b")
    assert not prefixes.allows("myapp.tasksx:a") and not prefixes.allows("os:system")
    assert Trust.parse("myapp.tasks, myapp.billing").prefixes == ("myapp.tasks", "myapp.billing")
    for bad in ("", "registred", "my app", ["os", 5]):
        with pytest.raises(ValueError, match=r"trusted|OFFLOAD_TRUSTED"):
            Trust.parse(bad) if isinstance(bad, str) else Trust(bad)


def test_offload_trusted_is_read_and_refused_when_malformed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OFFLOAD_TRUSTED", "registered")
    assert offload._default.get().trusted.mode == "registered"
    offload._default.reset()
    monkeypatch.setenv("OFFLOAD_TRUSTED", "not a module")
    with pytest.raises(ValueError, match="OFFLOAD_TRUSTED"):
        offload.stats()
