"""Scale-out end to end: web processes enqueue into SQS, `offload worker` processes perform.

Real parts only: moto's ThreadedMotoServer on 127.0.0.1 as the SQS endpoint, the
ScriptedServer as the third-party API, and real subprocesses for the enqueuing web
process (consume=False), the workers (`python -m offload worker`) and the CLI.

`post_from` (below) is a task function the workers import from this module, so that
each request says which worker process made it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import requests

import offload
from offload import DeadLetter, Task
from offload.records import new_id
from offload.stores.sqs import SqsStore
from procs import python_env, run_python
from server import Answer, ScriptedServer


def post_from(url: str, n: int) -> requests.Response:
    """A task: POST {"n": n, "pid": <the worker's pid>} (the worker classifies the answer)."""
    return requests.post(url, json={"n": n, "pid": os.getpid()}, timeout=10)


def offload_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`offload ARGS...` as a user types it (python -m offload, this checkout)."""
    return subprocess.run(
        [sys.executable, "-m", "offload", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=python_env(),
        check=False,
    )


class Workers:
    """`offload worker --store URL` subprocesses, stopped (SIGTERM, then SIGKILL) at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, store_url: str, env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "offload", "worker", "--store", store_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=python_env(env),
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
        """SIGTERM, then wait for the exit: (exit code, stderr)."""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    yield started
    started.close()


def enqueue(store_url: str, calls: Sequence[str]) -> None:
    """Enqueue from a separate web process that only enqueues (consume=False)."""
    result = run_python(
        f"""
        import offload, test_sqs_e2e
        offload.configure(store={store_url!r}, consume=False)
        {"; ".join(calls) or "pass"}
        stats = offload.stats()
        assert stats.enqueued == {len(calls)}, stats
        """,
        env={"OFFLOAD_SHUTDOWN_TIMEOUT": "0"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def dead_letters(store_url: str) -> list[dict[str, Any]]:
    result = offload_cli("dead-letters", "list", "--store", store_url, "--json")
    assert result.returncode == 0, result.stderr
    letters = json.loads(result.stdout)
    assert isinstance(letters, list)
    return letters


def wait_for_dead_letters(store_url: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """List until `count` dead letters are there: a worker buries right after the last
    attempt, which the server has already seen; each listing is a subprocess run."""
    done = threading.Event()
    timer = threading.Timer(timeout, done.set)
    timer.start()
    try:
        while True:
            letters = dead_letters(store_url)
            if len(letters) >= count or done.is_set():
                return letters
    finally:
        timer.cancel()


def test_workers_on_two_processes_drain_dead_letter_replay_and_stop_cleanly(
    sqs_store_url: str, server: ScriptedServer, workers: Workers
) -> None:
    server.script("/fail", Answer(500), Answer(500), Answer(500), Answer(200))
    # A slow API: one worker process alone would need several seconds for /fn, so the
    # second, started a moment later, takes its share.
    server.script("/fn", Answer(200, delay=0.5))
    ok, fail = server.url("/ok"), server.url("/fail")
    n_http, n_fn = 12, 16
    calls = [
        f"offload.enqueue_task(offload.http('POST', {ok!r}, json={{'i': {i}}}, "
        "idempotency_key=True))"
        for i in range(n_http)
    ]
    calls += [
        f"offload.enqueue_task(test_sqs_e2e.post_from, {server.url('/fn')!r}, {n})"
        for n in range(n_fn)
    ]
    calls.append(f"offload.enqueue_task(offload.http('POST', {fail!r}))")
    enqueue(sqs_store_url, calls)

    env = {"OFFLOAD_MAX_ATTEMPTS": "3", "OFFLOAD_WORKERS": "2", "OFFLOAD_LEASE_TIMEOUT": "10"}
    first = workers.start(sqs_store_url, env)
    second = workers.start(sqs_store_url, env)

    assert server.wait_for(n_http, path="/ok", timeout=60)
    assert server.wait_for(n_fn, path="/fn", timeout=60)
    assert server.wait_for(3, path="/fail", timeout=60)
    # At least once: SQS (and moto) may deliver a message twice, so sets, not lists.
    assert {json.loads(r.body)["i"] for r in server.requests_to("/ok")} == set(range(n_http))
    bodies = [json.loads(r.body) for r in server.requests_to("/fn")]
    assert {b["n"] for b in bodies} == set(range(n_fn))
    # Both worker processes did some of the work.
    assert {b["pid"] for b in bodies} == {first.pid, second.pid}

    # The always-failing call: a dead letter with offload's own record.
    [letter] = wait_for_dead_letters(sqs_store_url, 1)
    assert letter["reason"] == "exhausted"
    assert letter["attempts"] == 3 and letter["status"] == 500
    assert letter["description"] == f"POST {fail}"
    assert "500" in letter["error"]
    shown = offload_cli("dead-letters", "show", letter["id"], "--store", sqs_store_url, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == letter["id"]

    # Replay: the server now answers 200; a worker performs it and no dead letter is left.
    replayed = offload_cli("dead-letters", "replay", letter["id"], "--store", sqs_store_url)
    assert replayed.returncode == 0, replayed.stderr
    assert server.wait_for(4, path="/fail", timeout=60)
    assert dead_letters(sqs_store_url) == []

    # SIGTERM: each worker finishes what it holds and exits 0.
    for proc in (first, second):
        code, err = Workers.stop(proc)
        assert code == 0, err
        assert "Traceback" not in err
    assert_empty(sqs_store_url)


def test_a_killed_workers_task_is_performed_by_another_after_its_lease(
    sqs_store_url: str, server: ScriptedServer, workers: Workers
) -> None:
    hung = threading.Event()  # never set by the test; the server's close() releases it
    server.script("/charge", Answer.hang(hung), Answer(200))
    enqueue(
        sqs_store_url,
        [
            f"offload.enqueue_task(offload.http('POST', {server.url('/charge')!r}, "
            "json={'cents': 500}, idempotency_key=True, timeout=60))"
        ],
    )
    env = {"OFFLOAD_LEASE_TIMEOUT": "2"}
    doomed = workers.start(sqs_store_url, env)
    assert server.wait_for(1, path="/charge", timeout=60)  # performing it, hanging
    doomed.kill()  # SIGKILL: no hand-back, no exit hook; the lease just stops being renewed
    doomed.communicate(timeout=30)

    survivor = workers.start(sqs_store_url, env)
    assert server.wait_for(2, path="/charge", timeout=60)
    first, second = server.requests_to("/charge")
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]  # same task
    code, err = Workers.stop(survivor)
    assert code == 0, err
    assert_empty(sqs_store_url)


def test_the_dead_letter_commands_against_sqs(sqs_store_url: str) -> None:
    store = SqsStore.from_url(sqs_store_url)
    try:
        buried: list[DeadLetter] = []
        for path in ("/a", "/b", "/c"):
            store.put(Task(offload.http("POST", f"http://127.0.0.1:9{path}")), lease=False)
        held: list[Any] = []
        while len(held) < 3:
            held += store.claim(3)
        for task, status in zip(
            sorted(held, key=lambda t: t.call.url), (500, 404, 500), strict=True
        ):
            letter = DeadLetter(
                id=new_id(),
                task_id=task.id,
                description=task.call.describe(),
                key=task.key,
                attempts=2,
                error=f"HTTP {status}",
                status=status,
                reason="exhausted" if status == 500 else "permanent",
                first_attempt_at=None,
                last_attempt_at=None,
            )
            store.bury(task, letter)
            buried.append(letter)
    finally:
        store.close()

    stats = offload_cli("stats", "--store", sqs_store_url, "--json")
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert (figures["ready"], figures["leased"], figures["dead_letters"]) == (0, 0, 3)

    only_500 = offload_cli("dead-letters", "list", "--store", sqs_store_url, "--status", "500")
    assert only_500.returncode == 0, only_500.stderr
    assert buried[0].id in only_500.stdout and buried[2].id in only_500.stdout
    assert buried[1].id not in only_500.stdout

    discarded = offload_cli("dead-letters", "discard", buried[1].id, "--store", sqs_store_url)
    assert discarded.returncode == 0, discarded.stderr
    unknown = offload_cli("dead-letters", "show", "no-such-id", "--store", sqs_store_url)
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1 and "no-such-id" in unknown.stderr

    replayed = offload_cli("dead-letters", "replay", "--all", "--store", sqs_store_url)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.count("replayed ") == 2
    assert dead_letters(sqs_store_url) == []
    stats = offload_cli("stats", "--store", sqs_store_url, "--json")
    assert json.loads(stats.stdout)["ready"] == 2  # back in the queue, for any worker

    purged = offload_cli("dead-letters", "purge", "--store", sqs_store_url)
    assert purged.returncode == 0 and "purged 0" in purged.stdout


def test_an_unreachable_sqs_endpoint_is_one_line_without_secrets(
    aws_credentials: dict[str, str],
) -> None:
    result = offload_cli(
        "dead-letters",
        "list",
        "--store",
        "sqs://jobs?region=eu-west-1&endpoint_url=http://u:hunter2@127.0.0.1:1",
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "GetQueueUrl failed" in result.stderr
    for secret in ("hunter2", *aws_credentials.values()):
        if secret != "eu-west-1":
            assert secret not in result.stderr


def assert_empty(url: str) -> None:
    """The queue holds nothing ready, delayed or leased, and no dead letter."""
    store = SqsStore.from_url(url)
    try:
        counts = store.counts()
        assert (counts.ready, counts.delayed, counts.leased, counts.dead_letters) == (0, 0, 0, 0)
    finally:
        store.close()
