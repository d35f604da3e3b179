"""An API that is down is paused, not hammered: a port that refuses connections for several
seconds and then answers, with the default retry policy (issue 13).

Every queued call is delivered once, none is dead-lettered, the attempts against the
down host are a handful (its first failures and one probe per pause), and the log has
one line when the key goes down and one when it is back. A call that fails on its own
while its host answers the others still gives up after its five attempts.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

import pytest
from tenacity import wait_fixed

import offload
from offload import Offloader, RetryPolicy, Task
from pacing import DownServer
from server import Answer, ScriptedServer

MakeOffloader = Callable[..., Offloader]

CALLS = 60
WORKERS = 4


def test_an_outage_is_paused_with_a_few_probes_and_every_call_is_delivered_once(
    make_offloader: MakeOffloader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="offload")
    down = DownServer()
    changed = threading.Condition()
    paused: list[float] = []  # the delays of retries made because the key is down
    attempts: dict[str, int] = {}

    def on_retry(task: Task, delay: float, error: str | None) -> None:
        if error is not None and "its API is down" in error:
            with changed:
                paused.append(delay)
                changed.notify_all()

    def on_success(task: Task, result: object) -> None:
        attempts[task.id] = task.progress.attempts

    off = make_offloader(workers=WORKERS, on_retry=on_retry, on_success=on_success, idle_timeout=30)
    try:
        for i in range(CALLS):
            off.enqueue_task(offload.http("POST", f"{down.url}/call/{i}"))
        key = f"http://127.0.0.1:{down.port}"
        with changed:
            # Down, and then one probe failed more: several seconds of refused connections.
            assert changed.wait_for(lambda: len(paused) >= 2, timeout=60), paused
            state = off.keys()[key]
            assert state.down and state.waiting >= CALLS // 2, state
        down.up()
        assert off.flush(timeout=120), off.stats()

        stats = off.stats()
        assert (stats.succeeded, stats.dead_lettered) == (CALLS, 0)
        assert off.dead_letters() == []
        assert down.answered == CALLS  # each call delivered once
        assert not off.keys()[key].down

        failed_attempts = sum(attempts.values()) - CALLS
        # Its first failures (about OUTAGE_AFTER, plus the calls in flight with them), and
        # then one probe per pause: nothing like one attempt per queued call.
        assert failed_attempts <= 3 + 2 * WORKERS + len(paused), (failed_attempts, paused)
        assert failed_attempts < CALLS // 3

        lines = [r for r in caplog.records if r.name == "offload"]
        warnings = [r.getMessage() for r in lines if r.levelno >= logging.WARNING]
        assert len([m for m in warnings if " is down " in m]) == 1, warnings
        assert len([m for m in warnings if " is back after " in m]) == 1, warnings
        assert len(warnings) == 2, warnings
        # INFO: only the retries of its first failures, before the key was held.
        assert len(lines) <= 2 + 3 + 2 * WORKERS, [r.getMessage() for r in lines]
    finally:
        off.shutdown(timeout=5)
        down.close()


def test_calls_that_fail_on_their_own_while_the_host_answers_give_up_after_their_attempts(
    make_offloader: MakeOffloader, server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Three calls that always get a 500, among calls to the same host that succeed: no
    outage (something succeeds between their failures), so each uses its five attempts."""
    caplog.set_level(logging.WARNING, logger="offload")
    bad = [f"/bad/{i}" for i in range(3)]
    for path in bad:
        server.script(path, Answer(500))
    box: list[Offloader] = []

    def on_retry(task: Task, delay: float, error: str | None) -> None:
        # Two good calls queued at once, ready before this retry is due: the host answers
        # others between every two failures.
        for _ in range(2):
            box[0].enqueue_task(offload.http("POST", server.url("/ok")))

    policy = RetryPolicy(wait=wait_fixed(0.05))  # the default stop: five attempts
    off = make_offloader(workers=1, retry=policy, on_retry=on_retry)
    box.append(off)
    for path in bad:
        off.enqueue_task(offload.http("POST", server.url(path)))
        off.enqueue_task(offload.http("POST", server.url("/ok")))
    assert off.flush(timeout=60)

    letters = off.dead_letters()
    assert sorted(letter.description.rsplit("/", 1)[1] for letter in letters) == ["0", "1", "2"]
    assert {(letter.reason, letter.attempts, letter.status) for letter in letters} == {
        ("exhausted", 5, 500)
    }
    assert Counter(r.path for r in server.requests)["/bad/0"] == 5
    messages = [r.getMessage() for r in caplog.records]
    assert not any(" is down " in m for m in messages), messages
    assert not any(state.down for state in off.keys().values())


@pytest.mark.parametrize(
    "max_retry_after",
    [
        pytest.param(0.1, id="below-the-suspect-hold"),
        pytest.param(0.5, id="below-the-first-pause"),
    ],
)
def test_an_outage_is_waited_out_with_max_retry_after_below_its_pause(
    make_offloader: MakeOffloader,
    server: ScriptedServer,
    monkeypatch: pytest.MonkeyPatch,
    max_retry_after: float,
) -> None:
    """The hold of a suspect key and the pause of a down one are offload's own, not a
    server's Retry-After: a policy whose `max_retry_after` is shorter must not dead-letter
    the key's calls as if a server had asked for a wait beyond it. No server here sends a
    Retry-After; the host fails six calls (three tasks, then three probes: down, as soon as
    its probes fail) and then answers."""
    monkeypatch.setattr(offload.scheduler, "OUTAGE_SECONDS", 0.0)
    server.script("/flaky", *[Answer(500)] * 6, Answer(200))
    policy = RetryPolicy(wait=wait_fixed(0.01), max_retry_after=max_retry_after)
    off = make_offloader(workers=1, retry=policy, idle_timeout=30)
    for _ in range(3):
        off.enqueue_task(offload.http("POST", server.url("/flaky")))
    assert off.flush(timeout=60), off.stats()

    assert [(letter.attempts, letter.error) for letter in off.dead_letters()] == []
    assert off.stats().succeeded == 3
