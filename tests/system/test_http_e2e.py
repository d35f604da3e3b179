"""offload.http through a real Offloader against real local HTTP servers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from email.utils import formatdate

import pytest
import requests
import tenacity

import offload
from offload import Offloader, RetryPolicy
from offload.testing import FakeClock
from server import Answer, ScriptedServer

MakeOffloader = Callable[..., Offloader]
FAST = RetryPolicy(wait=tenacity.wait_none())


@pytest.fixture
def other_server() -> Iterator[ScriptedServer]:
    srv = ScriptedServer()
    try:
        yield srv
    finally:
        srv.close()


def test_503_then_200_is_delivered(server: ScriptedServer, make_offloader: MakeOffloader) -> None:
    server.script("/hook", Answer(503), Answer(503), Answer(200, body=b"ok"))
    off = make_offloader(retry=FAST)
    off.enqueue_task(offload.http("POST", server.url("/hook"), json={"n": 1}))
    assert off.flush(10)
    assert len(server.requests_to("/hook")) == 3
    assert all(r.body == b'{"n": 1}' for r in server.requests_to("/hook"))
    s = off.stats()
    assert (s.succeeded, s.retried, s.dead_lettered) == (1, 2, 0)


def test_400_is_dead_lettered_with_status(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    server.script("/bad", Answer(400, body=b"nope"))
    off = make_offloader(retry=FAST)
    task = off.enqueue_task(offload.http("PUT", server.url("/bad")))
    assert off.flush(10)
    [letter] = off.dead_letters()
    assert (letter.status, letter.reason, letter.attempts) == (400, "permanent", 1)
    assert letter.description == f"PUT {server.url('/bad')}"
    assert letter.key == server.base_url.lower()
    assert letter.task_id == task.id


def test_500s_exhaust_after_five_attempts(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    server.script("/down", Answer(500))
    off = make_offloader(retry=RetryPolicy(wait=tenacity.wait_none()))
    off.enqueue_task(offload.http("GET", server.url("/down")))
    assert off.flush(10)
    [letter] = off.dead_letters()
    assert (letter.status, letter.reason, letter.attempts) == (500, "exhausted", 5)
    assert len(server.requests_to("/down")) == 5


def test_connection_reset_is_retried(server: ScriptedServer, make_offloader: MakeOffloader) -> None:
    server.script("/flaky", Answer.reset(), Answer(200))
    off = make_offloader(retry=FAST)
    off.enqueue_task(offload.http("GET", server.url("/flaky")))
    assert off.flush(10)
    assert off.stats().succeeded == 1
    assert len(server.requests_to("/flaky")) == 2


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_a_floor(
    form: str, server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    import time

    value = "1" if form == "seconds" else formatdate(time.time() + 2, usegmt=True)
    server.script("/rl", Answer(429, headers={"Retry-After": value}), Answer(200))
    off = make_offloader(retry=FAST)
    off.enqueue_task(offload.http("POST", server.url("/rl")))
    assert off.flush(15)
    first, second = server.requests_to("/rl")
    # HTTP-dates have one-second resolution: the floor is the date, at least 1 s away.
    assert second.at - first.at >= 1.0
    assert off.stats().succeeded == 1


def test_a_retry_after_sent_twice_is_a_floor(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    """A Retry-After header sent twice reaches the classifier as requests joins repeated
    headers ("1, 1"): it is still the server's floor, not a malformed value to ignore."""
    server.script("/rl2", Answer(429, headers={"Retry-After": ["1", "1"]}), Answer(200))
    off = make_offloader(retry=FAST)
    off.enqueue_task(offload.http("POST", server.url("/rl2")))
    assert off.flush(15)
    first, second = server.requests_to("/rl2")
    assert second.at - first.at >= 1.0
    assert off.stats().succeeded == 1


@pytest.mark.parametrize("how", ["returned", "raised"])
def test_a_retry_after_date_counts_from_when_the_answer_came(
    how: str, server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    """An HTTP-date is "not before then": a call that took 45 s of the clock to answer
    "come back at start + 60" waits 15 s more, not 60, and is within a 30 s
    max_retry_after, not a dead letter for a wait the server never asked for. Alike for
    a response returned and one a task function's raise_for_status() raised."""
    clock = FakeClock()
    release = threading.Event()
    not_before = formatdate(clock.time() + 60, usegmt=True)
    server.script(
        "/late", Answer(503, headers={"Retry-After": not_before}, event=release), Answer(200)
    )
    delays: list[float] = []
    retried = threading.Event()

    def on_retry(task: object, delay: float, error: str | None) -> None:
        delays.append(delay)
        retried.set()

    off = make_offloader(
        clock=clock,
        retry=RetryPolicy(wait=tenacity.wait_none(), max_retry_after=30),
        on_retry=on_retry,
    )
    if how == "returned":
        off.enqueue_task(offload.http("POST", server.url("/late")))
    else:
        off.enqueue_task(post_and_raise, server.url("/late"))
    assert server.wait_for(1, path="/late")
    clock.advance(45)  # the answer takes this long
    release.set()
    assert retried.wait(5), off.dead_letters()
    [delay] = delays
    assert 15 <= delay < 16  # the rest of the server's wait, and its small jitter
    clock.advance(16)
    assert off.flush(10)
    assert off.stats().succeeded == 1 and len(server.requests_to("/late")) == 2


def post_and_raise(url: str) -> None:
    """A task function as users write them with requests: a 4xx or 5xx raises HTTPError."""
    requests.post(url, json={"n": 1}, timeout=5).raise_for_status()


def test_raise_for_status_is_judged_by_its_response(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    """requests' HTTPError from raise_for_status() is retried or kept as the response it
    carries would be: a throttle with its Retry-After, a 5xx, and a 4xx dead-lettered."""
    server.script("/sync", Answer(429, headers={"Retry-After": "1"}), Answer(502), Answer(200))
    server.script("/gone", Answer(404))
    off = make_offloader(retry=FAST)
    off.enqueue_task(post_and_raise, server.url("/sync"))
    off.enqueue_task(post_and_raise, server.url("/gone"))
    assert off.flush(15)

    first, second, _delivered = server.requests_to("/sync")
    assert second.at - first.at >= 1.0  # the 429's Retry-After
    assert off.stats().succeeded == 1
    [letter] = off.dead_letters()
    assert (letter.reason, letter.attempts, letter.status) == ("permanent", 1, 404)
    assert len(server.requests_to("/gone")) == 1


def test_throttled_host_does_not_delay_other_hosts(
    server: ScriptedServer, other_server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    server.script("/api", Answer(429, headers={"Retry-After": "3"}), Answer(200))
    off = make_offloader(retry=FAST)
    off.enqueue_task(offload.http("POST", server.url("/api")))
    assert server.wait_for(1, "/api")
    for i in range(20):
        off.enqueue_task(offload.http("POST", other_server.url(f"/ok/{i}")))
        off.enqueue_task(offload.http("POST", server.url("/api")))  # held behind the gate
    assert other_server.wait_for(20, timeout=10)
    throttled_at = server.requests_to("/api")[0].at
    healthy_done = max(r.at for r in other_server.requests)
    assert healthy_done - throttled_at < 3.0, "healthy host waited for the throttled one"
    assert len(server.requests_to("/api")) == 1, (
        "calls went to the throttled host during Retry-After"
    )
    assert off.flush(20)
    calls = server.requests_to("/api")
    assert len(calls) == 22  # 21 tasks, the first one twice
    assert calls[1].at - throttled_at >= 3.0
    # One probe first: the backlog followed only after the probe's answer.
    assert all(c.at >= calls[1].at for c in calls[2:])
    assert off.stats().succeeded == 41


def test_idempotency_key_sent_and_kept_across_retries(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    server.script("/charge", Answer(502), Answer(200))
    off = make_offloader(retry=FAST)
    task = off.enqueue_task(offload.http("POST", server.url("/charge"), idempotency_key=True))
    assert off.flush(10)
    keys = [r.headers.get("Idempotency-Key") for r in server.requests_to("/charge")]
    assert keys == [task.idempotency_key, task.idempotency_key]


def test_replayed_call_keeps_its_idempotency_key(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    server.script("/charge", Answer(409), Answer(200))
    off = make_offloader(retry=FAST)
    off.enqueue_task(offload.http("POST", server.url("/charge"), idempotency_key=True))
    assert off.flush(10)
    [letter] = off.dead_letters()
    off.replay(letter.id)
    assert off.flush(10)
    first, second = server.requests_to("/charge")
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]


def test_secrets_never_reach_logs_or_dead_letters(
    server: ScriptedServer, make_offloader: MakeOffloader, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-T0KEN-value"
    server.script("/x", Answer(503), Answer(401))
    caplog.set_level(logging.DEBUG)
    off = make_offloader(retry=FAST)
    call = offload.http(
        "POST",
        server.url(f"/x?api_token={secret}&page=2"),
        headers={"Authorization": f"Bearer {secret}", "X-Api-Key": secret},
        json={"card": "4242"},
    )
    task = off.enqueue_task(call)
    assert off.flush(10)
    [letter] = off.dead_letters()
    assert server.requests_to("/x")[0].headers["Authorization"] == f"Bearer {secret}"
    for text in (repr(call), repr(task), repr(letter), str(letter.to_json()), caplog.text):
        assert secret not in text
    assert "page=2" in letter.description
    assert "dead letter" in caplog.text


def test_worker_keeps_one_session_per_thread(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    off = make_offloader()
    for i in range(20):
        off.enqueue_task(offload.http("GET", server.url(f"/p/{i}")))
    assert off.flush(10)
    assert server.wait_for(20)
    # Keep-alive: 20 requests over far fewer connections than requests.
    assert server.connections_opened <= 2


def test_log_handler_that_enqueues_does_not_loop(
    server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    off = make_offloader(retry=FAST)
    shipped: list[str] = []
    refused: list[BaseException] = []

    class Shipper(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                off.enqueue_task(shipped.append, record.getMessage())
            except offload.OffloadError as exc:
                refused.append(exc)

    handler = Shipper(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    try:
        server.script("/gone", Answer(404))
        off.enqueue_task(offload.http("GET", server.url("/gone")))
        assert off.flush(10)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    assert refused, "offload's own log lines on the worker were not guarded"
    assert off.stats().enqueued < 50


def test_threads_are_named_and_daemonic(make_offloader: MakeOffloader) -> None:
    off = make_offloader()
    seen: list[threading.Thread] = []
    off.enqueue_task(lambda: seen.append(threading.current_thread()))
    assert off.flush(5)
    assert seen[0].name == "offload-worker" and seen[0].daemon
