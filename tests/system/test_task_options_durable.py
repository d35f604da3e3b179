"""Task options over durable stores, with real processes: a delayed task outlives its
process and another performs it when due (SQLite); SQS carries a delay beyond its 900 s;
a worker that trusts only registered functions refuses a planted row or message without
importing its module."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import offload
from offload import DeadLetter, Offloader, Task
from offload.stores.sqlite.schema import SCHEMA_VERSION
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
        before = time.time()  # the task is due 1.5 s after a time no earlier than this
        off.enqueue_task(offload.Task(offload.http("POST", {server.url("/later")!r}), delay=1.5))
        print(before)
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
    assert arrived - enqueued_at >= 1.5, "not before it was due"
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


def first_dead_letters(
    store_url: str, worker: subprocess.Popen[str], server: ScriptedServer
) -> list[DeadLetter]:
    """The store's dead letters once it has any (20 s at most), the worker alive meanwhile."""
    off = Offloader(store=store_url, consume=False)
    try:
        deadline = time.monotonic() + 20
        while not off.dead_letters() and time.monotonic() < deadline:
            assert worker.poll() is None
            server.wait_for(99, "/never", timeout=0.1)  # a bounded pause, no sleep
        return off.dead_letters()
    finally:
        off.shutdown(0)


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
        [letter] = first_dead_letters(store_url, worker, server)
        assert letter.reason == "permanent" and "not registered" in letter.error
        assert "untrusted_tasks" in letter.description
        assert server.requests_to("/planted") == []
        assert not (tmp_path / "imported.txt").exists(), "the untrusted module was imported"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
        reap(worker)


def test_a_stored_retry_policy_cannot_make_a_trusting_worker_import_a_module(
    store_url: str, server: ScriptedServer, worker_env: dict[str, str], tmp_path: Path
) -> None:
    # A policy's retry_on types are imported by path too: under trusted="registered" a
    # planted one naming another module is a dead letter, the module never imported; one
    # whose module the worker has imported (requests, by registered_tasks) is still read.
    planter = run_python(
        f"""
        import requests, offload, registered_tasks
        off = offload.Offloader(store={store_url!r}, consume=False)
        policy = offload.RetryPolicy(retry_on=(requests.ConnectionError,))
        off.enqueue_task(offload.Task(registered_tasks.deliver, ({server.url("/ok")!r}, 1),
                                      retry=policy))
        off.enqueue_task(offload.Task(registered_tasks.deliver,
                                      ({server.url("/planted")!r}, 2), retry=policy))
        off.shutdown()
        """,
        env={"OFFLOAD_TEST_MARKER": ""},
    )
    assert planter.returncode == 0, planter.stderr
    db = store_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        (text,) = conn.execute("SELECT retry FROM tasks WHERE call LIKE '%planted%'").fetchone()
        policy = json.loads(text)
        policy["retry_on"] = {"types": ["untrusted_tasks:job"]}
        conn.execute(
            "UPDATE tasks SET retry = ? WHERE call LIKE '%planted%'", (json.dumps(policy),)
        )
    conn.close()
    worker = spawn_worker(
        store_url, worker_env, "--trusted", "registered", "--import", "registered_tasks"
    )
    try:
        assert server.wait_for(1, "/ok", timeout=20)
        letters = first_dead_letters(store_url, worker, server)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
        reap(worker)
    assert not (tmp_path / "imported.txt").exists(), "the policy's module was imported"
    [letter] = letters
    assert letter.reason == "permanent" and "untrusted_tasks:job" in letter.error
    assert server.requests_to("/planted") == []


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


def test_prefixes_refuse_a_path_that_walks_out_of_their_module(
    store_url: str, server: ScriptedServer
) -> None:
    # registered_tasks imports requests: `registered_tasks:requests.post` names a trusted
    # module, but the function it reaches is requests' own.
    import registered_tasks

    web = Offloader(store=store_url, consume=False)
    web.enqueue_task(registered_tasks.deliver, server.url("/ok"), 1)
    web.shutdown(0)
    planted = {
        "offload": 1,
        "target": {"type": "function", "path": "registered_tasks:requests.post"},
        "args": [server.url("/planted")],
        "kwargs": {},
    }
    with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
        conn.execute("UPDATE tasks SET call = ?", (json.dumps(planted),))
    conn.close()
    off = Offloader(store=store_url, trusted=("registered_tasks",), workers=1)
    try:
        assert off.flush(20)
        letters = off.dead_letters()
    finally:
        off.shutdown(5)
    assert server.requests_to("/planted") == [], "requests.post ran from a planted row"
    [letter] = letters
    assert letter.reason == "permanent"
    assert "requests.api.post, which is outside the trusted modules" in letter.error


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


# -- deduplication over SQLite: every process on the file -------------------------------------


def test_two_processes_on_one_file_make_one_call_for_a_dedup_key(
    store_url: str, server: ScriptedServer
) -> None:
    code = f"""
        import threading, offload
        off = offload.Offloader(store={store_url!r}, consume=False)
        start = threading.Barrier(8)
        ids = set()

        def enqueue():
            start.wait()
            for _ in range(25):
                task = off.enqueue_task(offload.Task(
                    offload.http("POST", {server.url("/sync")!r}), dedup_key="crm-sync:42"))
                ids.add(task.id)

        threads = [threading.Thread(target=enqueue) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        s = off.stats()
        print(sorted(ids), s.enqueued, s.deduplicated)
        """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=python_env(),
        )
        for _ in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    ids = {text.split("]")[0] for text in outputs}
    assert len(ids) == 1, outputs  # both processes were handed the one task
    enqueued = sum(int(text.split("]")[1].split()[0]) for text in outputs)
    assert enqueued == 1
    off = Offloader(store=store_url)
    try:
        assert off.flush(20)
    finally:
        off.shutdown(5)
    assert len(server.requests_to("/sync")) == 1


def test_a_dedup_window_and_a_replay_over_sqlite(store_url: str, server: ScriptedServer) -> None:
    from server import Answer

    server.script("/sync", Answer(422), Answer(200))
    off = Offloader(store=store_url)
    try:
        first = off.enqueue_task(
            Task(offload.http("POST", server.url("/sync")), dedup_key="k", dedup_window=3600)
        )
        assert off.flush(10)
        [letter] = off.dead_letters()  # 422: permanent
        again = off.enqueue_task(Task(offload.http("POST", server.url("/sync")), dedup_key="k"))
        assert again.id == first.id, "within the window the key stays taken"
        replayed = off.replay(letter.id)
        assert replayed.id == first.id and replayed.dedup_key == "k"
        assert off.flush(10)
        assert len(server.requests_to("/sync")) == 2 and off.dead_letters() == []
        later = off.enqueue_task(Task(offload.http("POST", server.url("/sync")), dedup_key="j"))
        assert later.id != first.id and off.flush(10)
        assert off.stats().deduplicated == 1
    finally:
        off.shutdown(5)


def test_a_format_2_file_is_upgraded_to_hold_dedup_keys(tmp_path: Path) -> None:
    import sqlite3

    from offload.stores.sqlite import SQLiteStore
    from offload.stores.sqlite.schema import PUT, SCHEMA

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    for statement in SCHEMA:  # the format-2 tables, as an older offload made them
        conn.execute(statement)
    conn.execute("INSERT INTO meta (name, value) VALUES ('store_id', 'abcd')")
    record = Task(offload.http("POST", "http://127.0.0.1:9/x"))
    from offload.codec.task import TaskRecord

    stored = TaskRecord.of(record)
    conn.execute(PUT, (stored.id, None, stored.key, stored.call, None, 1.0, None, None))
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    store = SQLiteStore(db)
    try:
        [task] = store.claim(5)
        assert task.id == record.id and task.dedup_key is None
        check = sqlite3.connect(db)
        assert check.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        columns = {row[1] for row in check.execute("PRAGMA table_info(tasks)")}
        assert {"dedup_key", "dedup_window"} <= columns
        check.close()
    finally:
        store.close()
