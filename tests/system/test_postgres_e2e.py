"""The PostgreSQL store end to end: `offload worker` processes, a web process that only
enqueues, kill -9, wake-ups, the application's transactions, the `offload` command, and
the password that must never come out.

Real parts only: the session's throwaway PostgreSQL server (conftest.py), the
ScriptedServer on 127.0.0.1 as the third-party API (it records each request with the
time it arrived), real subprocesses for the workers, the web process and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import tenacity

import offload
from offload import DeadLetter, Offloader, RetryPolicy, Task
from offload.records import new_id
from offload.stores.postgres import PostgresStore
from pgserver import PASSWORD, PASSWORD_USER
from procs import python_env, reap, run_python
from server import Answer, ScriptedServer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class Workers:
    """`offload worker --store URL` subprocesses; killed at teardown if still running."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, url: str, *args: str) -> subprocess.Popen[str]:
        """Start one (making the tables, `--create`, on a new schema) and wait until it says
        it performs calls."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "offload", "worker", "--store", url, "--create", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=python_env({"OFFLOAD_SHUTDOWN_TIMEOUT": "10"}),
        )
        self.procs.append(proc)
        assert proc.stderr is not None
        for line in proc.stderr:
            if "offload worker: performing calls" in line:
                break
        else:
            raise AssertionError(f"the worker exited: {proc.wait()}")
        # Keep reading its log, so that a chatty worker never blocks on a full pipe.
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True).start()
        proc.log = lines  # type: ignore[attr-defined]
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[str], timeout: float = 30) -> str:
        """SIGTERM, then wait for exit 0; the worker's log."""
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout) == 0
        return "".join(proc.log)  # type: ignore[attr-defined]

    def close(self) -> None:
        for proc in self.procs:
            reap(proc)


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    yield started
    started.close()


def keys_at(server: ScriptedServer, path: str) -> Counter[str]:
    """How often each Idempotency-Key reached `path`."""
    return Counter(r.headers["Idempotency-Key"] for r in server.requests_to(path))


def delivered_counts(log: str) -> int:
    match = re.search(r"stopped: (\d+) delivered", log)
    assert match, log
    return int(match.group(1))


# -- many processes -----------------------------------------------------------------------


def test_two_workers_and_a_web_process_deliver_each_call_once(
    postgres_url: str, server: ScriptedServer, workers: Workers
) -> None:
    calls = 500
    server.script("/job", Answer(200, delay=0.002))
    first = workers.start(postgres_url, "--workers", "4")
    second = workers.start(postgres_url, "--workers", "4")
    web = run_python(
        f"""
        import offload
        off = offload.Offloader(store={postgres_url!r}, consume=False)
        for i in range({calls}):
            off.enqueue_task(offload.http("POST", {server.url("/job")!r}, json={{"i": i}},
                                          idempotency_key=True))
        assert not off.running
        """,
        timeout=120,
    )
    assert web.returncode == 0, web.stderr
    assert server.wait_for(calls, path="/job", timeout=120)
    one, two = delivered_counts(workers.stop(first)), delivered_counts(workers.stop(second))
    keys = keys_at(server, "/job")
    assert len(keys) == calls and set(keys.values()) == {1}, "a call arrived twice"
    assert one + two == calls and one > 0 and two > 0
    store = PostgresStore(postgres_url)
    try:
        assert store.counts() == type(store.counts())(0, 0, 0, 0)
    finally:
        store.close()


def test_a_killed_worker_task_is_delivered_by_another_with_the_same_key(
    postgres_url: str, server: ScriptedServer, workers: Workers
) -> None:
    release = threading.Event()
    server.script("/pay", Answer.hang(release), Answer(200))
    url = postgres_url + "&lease_timeout=2"
    try:
        victim = workers.start(url)
        off = Offloader(store=url, consume=False)
        off.enqueue_task(offload.http("POST", server.url("/pay"), json={}, idempotency_key=True))
        off.shutdown(5)
        assert server.wait_for(1, path="/pay", timeout=30)  # in the victim's hands, hanging
        survivor = workers.start(url)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        assert server.wait_for(2, path="/pay", timeout=30), "the task was not taken back"
        log = workers.stop(survivor)
    finally:
        release.set()
    first, second = server.requests_to("/pay")
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert "took back 1 task(s)" in log and delivered_counts(log) == 1


def test_an_idle_worker_is_woken_by_an_enqueue_at_once(
    postgres_url: str, server: ScriptedServer, workers: Workers
) -> None:
    worker = workers.start(postgres_url)
    web = Offloader(store=postgres_url, consume=False)
    latencies = []
    try:
        for n in range(5):
            # The worker idles past the 0.5 s a polling store would wait between looks:
            # this pause is the condition measured, not a wait for something to happen.
            time.sleep(0.6)
            sent = time.monotonic()
            web.enqueue_task(offload.http("POST", server.url("/hook"), json={"n": n}))
            assert server.wait_for(n + 1, path="/hook", timeout=10)
            latencies.append(server.requests_to("/hook")[n].at - sent)
    finally:
        web.shutdown(5)
    workers.stop(worker)
    assert statistics.median(latencies) < 0.1, latencies


# -- the application's transaction --------------------------------------------------------


@pytest.fixture
def app_conn(postgres: Any) -> Iterator[psycopg.Connection[Any]]:
    """The application's own connection (not autocommit: it commits when it means to)."""
    with psycopg.connect(postgres.url()) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY)")
        conn.commit()
        yield conn


def call(server: ScriptedServer, path: str) -> offload.HttpCall:
    return offload.http("POST", server.url(path), json={}, idempotency_key=True)


def delivered_after(off: Offloader, server: ScriptedServer, path: str) -> None:
    """Enqueue a marker outside any transaction and wait for its delivery: whatever the
    worker could see before it has been delivered by then."""
    count = len(server.requests_to(path))
    off.enqueue_task(call(server, path))
    assert server.wait_for(count + 1, path=path, timeout=10)
    assert off.flush(10)


def test_a_rolled_back_transaction_delivers_nothing_and_stores_nothing(
    postgres_url: str, server: ScriptedServer, app_conn: Any, make_offloader: Any
) -> None:
    off = make_offloader(store=postgres_url)
    delivered_after(off, server, "/marker")  # the worker runs, and listens
    with off.transaction(app_conn):
        app_conn.execute("INSERT INTO orders VALUES ('rolled-back')")
        off.enqueue_task(call(server, "/crm"))
    app_conn.rollback()
    delivered_after(off, server, "/marker")
    assert server.requests_to("/crm") == []
    assert off.store.counts() == type(off.store.counts())(0, 0, 0, 0)


def test_a_committed_transaction_delivers_once_and_not_before_the_commit(
    postgres_url: str, server: ScriptedServer, app_conn: Any, make_offloader: Any
) -> None:
    off = make_offloader(store=postgres_url)
    with off.transaction(app_conn):
        app_conn.execute("INSERT INTO orders VALUES ('A1')")
        task = off.enqueue_task(call(server, "/crm"))
    other = PostgresStore(postgres_url)
    try:
        assert other.counts().ready == 0  # not visible before the commit
        delivered_after(off, server, "/marker")
        assert server.requests_to("/crm") == []
        app_conn.commit()
        assert server.wait_for(1, path="/crm", timeout=10)
        assert off.flush(10)
        assert keys_at(server, "/crm") == Counter({task.idempotency_key: 1})
        assert other.counts() == type(other.counts())(0, 0, 0, 0)
    finally:
        other.close()


def test_a_rolled_back_savepoint_drops_only_its_enqueues(
    postgres_url: str, server: ScriptedServer, app_conn: Any, make_offloader: Any
) -> None:
    off = make_offloader(store=postgres_url)
    with app_conn.transaction(), off.transaction(app_conn):
        off.enqueue_task(call(server, "/kept"))
        savepoint = app_conn.transaction()
        with contextlib.suppress(ZeroDivisionError), savepoint:
            off.enqueue_task(call(server, "/dropped"))
            raise ZeroDivisionError  # the savepoint rolls back; the transaction goes on
        off.enqueue_task(call(server, "/kept-too"))
    assert server.wait_for(1, path="/kept", timeout=10)
    assert server.wait_for(1, path="/kept-too", timeout=10)
    delivered_after(off, server, "/marker")
    assert server.requests_to("/dropped") == []


def test_the_block_belongs_to_the_thread_that_opened_it(
    postgres_url: str, server: ScriptedServer, app_conn: Any, make_offloader: Any
) -> None:
    off = make_offloader(store=postgres_url)
    other_thread: list[Task] = []
    with off.transaction(app_conn):
        thread = threading.Thread(
            target=lambda: other_thread.append(off.enqueue_task(call(server, "/elsewhere")))
        )
        thread.start()
        thread.join(10)
        assert server.wait_for(1, path="/elsewhere", timeout=10)  # not held by the block
        off.enqueue_task(call(server, "/mine"))
    app_conn.rollback()
    delivered_after(off, server, "/marker")
    assert server.requests_to("/mine") == []


def test_a_task_that_outlives_the_block_enqueues_outside_it(
    postgres_url: str, server: ScriptedServer, app_conn: Any, make_offloader: Any
) -> None:
    """An asyncio task made in the block copies its context, and with it the binding: once
    the block has closed, its enqueues must not still write through the application's
    connection, into whatever transaction that connection runs next."""
    off = make_offloader(store=postgres_url)

    async def request() -> None:
        closed = asyncio.Event()

        async def later() -> None:
            await closed.wait()
            off.enqueue_task(call(server, "/later"))

        with off.transaction(app_conn):
            off.enqueue_task(call(server, "/mine"))
            child = asyncio.create_task(later())
        app_conn.commit()
        closed.set()
        await child

    asyncio.run(request())
    app_conn.rollback()  # the connection's next transaction, rolled back
    assert server.wait_for(1, path="/mine", timeout=10)
    assert server.wait_for(1, path="/later", timeout=10)


def test_the_module_level_transaction_uses_the_default_offloader(
    postgres_url: str, server: ScriptedServer, app_conn: Any
) -> None:
    offload.configure(store=postgres_url)
    try:
        with offload.transaction(app_conn):
            offload.enqueue_task(call(server, "/crm"))
        app_conn.commit()
        assert server.wait_for(1, path="/crm", timeout=10)
    finally:
        offload.shutdown(5)


# -- the offload command ------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offload", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
        check=False,
    )


# -- dedup keys: every process on the database ----------------------------------------------


def synced(server: ScriptedServer, path: str, **options: Any) -> Task:
    call = offload.http("POST", server.url(path), json={}, idempotency_key=True)
    return Task(call, dedup_key="crm-sync:7", **options)


def test_a_dedup_key_is_free_again_once_its_retried_task_was_delivered(
    postgres_url: str, server: ScriptedServer, make_offloader: Any
) -> None:
    """The retry comes back from the store as a new task object; its delivery lets the key
    go, so the next enqueue with it is a new task, and delivered."""
    server.script("/first", Answer(503), Answer(200))
    off = make_offloader(store=postgres_url, retry=RetryPolicy(wait=tenacity.wait_none()))
    first = off.enqueue_task(synced(server, "/first"))
    assert off.flush(10)
    assert len(server.requests_to("/first")) == 2 and off.stats().retried == 1
    second = off.enqueue_task(synced(server, "/second"))
    assert second.id != first.id and off.stats().deduplicated == 0
    assert off.flush(10)
    assert len(server.requests_to("/second")) == 1


def test_a_delayed_task_holds_its_dedup_key_until_it_ran(
    postgres_url: str, server: ScriptedServer, make_offloader: Any
) -> None:
    off = make_offloader(store=postgres_url)
    web = make_offloader(store=postgres_url, consume=False)  # another process's enqueue
    first = off.enqueue_task(synced(server, "/welcome", delay=0.5))
    again = off.enqueue_task(synced(server, "/welcome", delay=0.5))
    elsewhere = web.enqueue_task(synced(server, "/welcome"))
    assert again.id == elsewhere.id == first.id
    assert off.stats().deduplicated == 1 and web.stats().deduplicated == 1
    assert off.flush(10)
    assert len(server.requests_to("/welcome")) == 1
    assert off.store.counts() == type(off.store.counts())(0, 0, 0, 0)


def test_a_dedup_key_taken_in_a_rolled_back_transaction_is_free_again(
    postgres_url: str, server: ScriptedServer, app_conn: Any, make_offloader: Any
) -> None:
    off = make_offloader(store=postgres_url)
    with off.transaction(app_conn):
        dropped = off.enqueue_task(synced(server, "/sync"))
        assert off.enqueue_task(synced(server, "/sync")).id == dropped.id  # held in there
    app_conn.rollback()
    kept = off.enqueue_task(synced(server, "/sync"))
    assert kept.id != dropped.id
    assert off.flush(10)
    assert keys_at(server, "/sync") == Counter({kept.idempotency_key: 1})


def bury(url: str, path: str, *, status: int = 500) -> DeadLetter:
    store = PostgresStore(url)
    try:
        task = Task(offload.http("POST", f"http://127.0.0.1:9{path}", json={}))
        store.put(task, lease=True)
        letter = DeadLetter(
            id=new_id(),
            task_id=task.id,
            description=f"POST http://127.0.0.1:9{path}",
            key=task.key,
            attempts=5,
            error=f"HTTP {status}",
            status=status,
            reason="exhausted",
            first_attempt_at=None,
            last_attempt_at=None,
        )
        store.bury(task, letter)
        return letter
    finally:
        store.close()


def test_every_command_works_on_the_store(postgres_url: str) -> None:
    first, second, third = (bury(postgres_url, p) for p in ("/a", "/b", "/c"))
    listed = json.loads(cli("dead-letters", "list", "--store", postgres_url, "--json").stdout)
    assert [dl["id"] for dl in listed] == [first.id, second.id, third.id]
    shown = cli("dead-letters", "show", first.id, "--store", postgres_url)
    assert shown.returncode == 0 and "POST http://127.0.0.1:9/a" in shown.stdout
    replayed = cli("dead-letters", "replay", first.id, "--store", postgres_url)
    assert replayed.returncode == 0 and f"replayed {first.id}" in replayed.stdout
    discarded = cli("dead-letters", "discard", second.id, "--store", postgres_url)
    assert discarded.returncode == 0
    stats = json.loads(cli("stats", "--store", postgres_url, "--json").stdout)
    assert (stats["ready"], stats["dead_letters"]) == (1, 1)
    assert cli("dead-letters", "purge", "--store", postgres_url).stdout == (
        "purged 1 dead letter(s)\n"
    )
    unknown = cli("dead-letters", "show", "nope", "--store", postgres_url)
    assert unknown.returncode == 1 and "no dead letter with id 'nope'" in unknown.stderr


def test_a_database_without_the_tables_is_an_error_not_a_new_store(postgres: Any) -> None:
    url = postgres.url(query="schema=typo")
    result = cli("stats", "--store", url)
    assert result.returncode == 1 and "has no offload tables" in result.stderr
    assert "Traceback" not in result.stderr
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        assert conn.execute("SELECT to_regnamespace('typo')").fetchone() == (None,)


# -- the password -------------------------------------------------------------------------


def test_the_password_never_comes_out(
    postgres: Any, server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # offload, psycopg and everyone else, at DEBUG
    url = postgres.url(PASSWORD_USER, user=f"{PASSWORD_USER}:{PASSWORD}", query="schema=secrets")
    server.script("/denied", Answer(403))
    texts: dict[str, str] = {}
    off = Offloader(store=url, workers=2)
    try:
        off.enqueue_task(offload.http("POST", server.url("/denied"), json={}))
        assert off.flush(10)
        texts["dead letters"] = repr(off.dead_letters()) + json.dumps(
            [dl.to_json() for dl in off.dead_letters()]
        )
        texts["reprs"] = repr(off) + repr(off.store) + repr(off.stats()) + off.store.url
        bad = PostgresStore(url.replace("schema=secrets", "schema=other&create=false"))
        with pytest.raises(offload.StoreError) as info:
            bad.counts()
        texts["error"] = str(info.value)
        wrong = PostgresStore(url.replace(PASSWORD, PASSWORD[::-1]))
        with pytest.raises(offload.StoreError) as info:
            wrong.counts()
        texts["auth error"] = str(info.value)
    finally:
        off.shutdown(5)
    for args in (
        ("stats",),
        ("dead-letters", "list"),
        ("dead-letters", "list", "--json"),
        ("stats", "--store", url.replace("schema=secrets", "schema=missing")),
    ):
        result = cli(*args, *(() if "--store" in args else ("--store", url)))
        texts[f"offload {' '.join(args)}"] = result.stdout + result.stderr
    worker = subprocess.Popen(
        [sys.executable, "-m", "offload", "worker", "--store", url, "--log-level", "debug"],
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    try:
        assert worker.stderr is not None
        seen = []
        for line in worker.stderr:
            seen.append(line)
            if "performing calls" in line:
                break
        web = Offloader(store=url, consume=False)
        web.enqueue_task(offload.http("POST", server.url("/denied"), json={}))
        web.shutdown(5)
        assert server.wait_for(2, path="/denied", timeout=10)
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
        texts["offload worker"] = "".join(seen) + err
    finally:
        reap(worker)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts.update({f"log {i}": formatter.format(r) for i, r in enumerate(caplog.records)})
    assert "***" in texts["reprs"] and "performing calls" in texts["offload worker"]
    assert [where for where, text in texts.items() if PASSWORD in text] == []
