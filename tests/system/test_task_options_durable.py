"""Task options over durable stores, with real processes: a delayed task outlives its
process and another performs it when due (SQLite); SQS carries a delay beyond its 900 s;
a worker that trusts only registered functions refuses a planted row or message without
importing its module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import offload
from offload import Offloader, Task
from offload.stores.sqs import SqsStore
from procs import python_env, reap, run_python
from server import ScriptedServer


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'offload.db'}"


def test_a_delayed_task_outlives_its_process_and_another_performs_it_when_due(
    store_url: str, server: ScriptedServer, make_offloader: Any
) -> None:
    result = run_python(
        f"""
        import time, offload
        off = offload.Offloader(store={store_url!r}, consume=False)
        off.enqueue_task(offload.Task(offload.http("POST", {server.url("/later")!r}), delay=1.5))
        print(time.time())
        """
    )
    assert result.returncode == 0, result.stderr
    enqueued_at = float(result.stdout.split()[-1])
    # The process is gone; a new one over the same file performs the task when it is due.
    off = make_offloader(store=store_url)
    s = off.stats()
    assert s.stored_delayed == 1 and s.stored_ready == 0
    assert server.wait_for(1, "/later", timeout=10)
    arrived = time.time() - (time.monotonic() - server.requests_to("/later")[0].at)
    assert arrived - enqueued_at >= 1.5 - 0.01, "not before it was due"
    assert off.flush(5)


def test_a_delay_longer_than_sqs_allows_is_carried_and_sent_on(
    sqs_store_url: str,
) -> None:
    store = SqsStore.from_url(sqs_store_url + "&wait=0")
    sent: list[tuple[dict[str, Any], int | None]] = []
    send = store._queues.send

    def recording(url: str, body: str, delay: int | None = None) -> None:
        sent.append((json.loads(body), delay))
        send(url, body, delay)

    send_many = store._queues.send_many

    def recording_many(url: str, entries: Any) -> Any:
        sent.extend((json.loads(body), delay) for body, delay in entries)
        return send_many(url, entries)

    store._queues.send = recording  # type: ignore[method-assign]
    store._queues.send_many = recording_many  # type: ignore[method-assign]
    try:
        now = time.time()
        store.put(Task(offload.http("POST", "http://127.0.0.1:9/x")), lease=False, due=now + 1200)
        record, delay = sent[-1]
        assert delay == 900 and record["due"] == pytest.approx(now + 1200)
        # A worker that receives it early (here: a copy sent visible at once, 300 s short of
        # its due time, as the end of its first 900 s would be) sends it on for the rest,
        # and does not run it.
        record["due"] = time.time() + 300
        send(store._queue_url, json.dumps(record), 0)
        assert store.claim(5) == []
        record, delay = sent[-1]
        assert 290 <= (delay or 0) <= 300 and "due" not in record
        assert store.counts().delayed >= 1
    finally:
        store.close()


# -- trusted functions ----------------------------------------------------------------------


@pytest.fixture
def worker_env(tmp_path: Path) -> dict[str, str]:
    return python_env({"OFFLOAD_TEST_MARKER": str(tmp_path / "imported.txt")})


def spawn_worker(store_url: str, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "offload", "worker", "--store", store_url, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "performing calls" in line, line + proc.stderr.read()
    return proc


def test_a_worker_trusting_registered_functions_refuses_a_planted_row_without_importing(
    store_url: str, server: ScriptedServer, worker_env: dict[str, str], tmp_path: Path
) -> None:
    # A process that may write the store plants a row naming an unregistered function,
    # and enqueues one naming a registered function.
    planter = run_python(
        f"""
        import offload, untrusted_tasks, registered_tasks
        off = offload.Offloader(store={store_url!r}, consume=False)
        off.enqueue_task(untrusted_tasks.job, {server.url("/planted")!r})
        off.enqueue_task(registered_tasks.deliver, {server.url("/ok")!r}, 7)
        off.shutdown()
        """,
        env={"OFFLOAD_TEST_MARKER": ""},
    )
    assert planter.returncode == 0, planter.stderr
    worker = spawn_worker(
        store_url, worker_env, "--trusted", "registered", "--import", "registered_tasks"
    )
    try:
        assert server.wait_for(1, "/ok", timeout=20)
        off = Offloader(store=store_url, consume=False)
        try:
            deadline = time.monotonic() + 20
            while not off.dead_letters() and time.monotonic() < deadline:
                assert worker.poll() is None
                server.wait_for(99, "/never", timeout=0.1)  # a bounded pause, no sleep
            [letter] = off.dead_letters()
        finally:
            off.shutdown(0)
        assert letter.reason == "permanent" and "not registered" in letter.error
        assert "untrusted_tasks" in letter.description
        assert server.requests_to("/planted") == []
        assert not (tmp_path / "imported.txt").exists(), "the untrusted module was imported"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
        reap(worker)


def test_prefixes_allow_their_modules_only(
    store_url: str, server: ScriptedServer, worker_env: dict[str, str], tmp_path: Path
) -> None:
    planter = run_python(
        f"""
        import offload, untrusted_tasks, registered_tasks
        off = offload.Offloader(store={store_url!r}, consume=False)
        off.enqueue_task(untrusted_tasks.job, {server.url("/planted")!r})
        off.enqueue_task(registered_tasks.deliver, {server.url("/ok")!r}, 1)
        """,
        env={"OFFLOAD_TEST_MARKER": ""},
    )
    assert planter.returncode == 0, planter.stderr
    off = Offloader(store=store_url, trusted=("registered_tasks",), workers=1)
    try:
        assert off.flush(20)
        [letter] = off.dead_letters()
        assert "outside the trusted modules registered_tasks" in letter.error
        assert len(server.requests_to("/ok")) == 1 and server.requests_to("/planted") == []
    finally:
        off.shutdown(5)


def test_an_offloader_that_trusts_registered_functions_refuses_to_enqueue_others(
    store_url: str,
) -> None:
    import untrusted_tasks

    off = Offloader(store=store_url, consume=False, trusted="registered")
    try:
        with pytest.raises(offload.NotSerializable, match="not registered"):
            off.enqueue_task(untrusted_tasks.job, "http://127.0.0.1:9/x")
        assert off.stats().enqueued == 0
    finally:
        off.shutdown(0)


def test_an_untrusted_message_sent_to_sqs_is_refused_without_import(
    sqs_store_url: str, server: ScriptedServer
) -> None:
    code = f"""
        import sys, offload
        sender = offload.Offloader(store={sqs_store_url!r}, consume=False)
        import untrusted_tasks
        sender.enqueue_task(untrusted_tasks.job, {server.url("/planted")!r})
        del sys.modules["untrusted_tasks"]
        off = offload.Offloader(store={sqs_store_url!r} + "&wait=0", trusted="registered")
        assert off.flush(30)
        [letter] = off.dead_letters()
        assert letter.reason == "permanent" and "not registered" in letter.error, letter
        assert "untrusted_tasks" not in sys.modules, "imported"
        off.shutdown(5)
        print("ok")
        """
    result = run_python(
        textwrap.dedent(code), env={k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert server.requests_to("/planted") == []


@pytest.fixture(autouse=True)
def _no_marker_leak(tmp_path: Path) -> Iterator[None]:
    yield
    assert not (tmp_path / "imported.txt").exists()
