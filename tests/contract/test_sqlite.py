"""The SQLite store and the Offloader's durable path, on real files in tmp_path.

Crash, kill -9 and multi-process tests are in test_sqlite_crash.py; the store contract
shared with the other backends is in test_store_contract.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import tenacity

import offload
from offload import NotSerializable, Offloader, RetryPolicy, StoreError, Task, UnknownDeadLetter
from offload.settle import dead_letter_for
from offload.stores import StoreCounts, open_store
from offload.stores.base import LetterQuery
from offload.stores.sqlite import SQLiteStore, parse_sqlite_url
from offload.stores.sqlite import dedup as sqlite_dedup
from offload.stores.sqlite.dedup import ANY_PASSED, FREE_KEYS
from offload.stores.sqlite.listing import _where
from offload.stores.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from offload.testing import FakeClock
from procs import run_python
from server import Answer, ScriptedServer

HERE = os.path.dirname(os.path.abspath(__file__))

delivered: list[Any] = []
delivered_lock = threading.Lock()


def record(value: Any) -> None:
    """A module-level function the worker can import: records what it was called with."""
    with delivered_lock:
        delivered.append(value)


def always_fails(value: Any) -> None:
    raise ValueError(f"cannot handle {value!r}")


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection to look behind the store's back (every journal copied into the
    tables first): committed and closed after."""
    if path.exists():
        settle = SQLiteStore(path)
        settle.counts()
        settle.close()
    conn = sqlite3.connect(path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def ledger_holds(off: Offloader) -> bool:
    s = off.stats()
    return s.claimed == s.succeeded + s.dead_lettered + s.released + s.queued + s.in_flight


@pytest.fixture(autouse=True)
def _clear_delivered() -> None:
    with delivered_lock:
        delivered.clear()


# -- URLs and files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path", "options"),
    [
        ("sqlite:///offload.db", "offload.db", {}),
        ("sqlite:///data/offload.db", "data/offload.db", {}),
        ("sqlite:////var/lib/app/offload.db", "/var/lib/app/offload.db", {}),
        ("sqlite:////tmp/x.db?synchronous=full", "/tmp/x.db", {"synchronous": "full"}),
        ("sqlite:///a%20b.db", "a b.db", {}),
    ],
)
def test_sqlite_urls_as_sqlalchemy_writes_them(
    url: str, path: str, options: dict[str, str]
) -> None:
    assert parse_sqlite_url(url) == (path, options)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://", "has a host part"),
        ("sqlite:///", "names no database file"),
        ("sqlite:///:memory:", "names no database file"),
        ("sqlite://host/x.db", "has a host part"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous"),
        ("sqlite:///x.db?lease_timeout=0", "out of range"),
        ("sqlite:///x.db?lease_timeout=soon", "not a number"),
        ("sqlite:///x.db?busy_timeout=-1", "out of range"),
        ("sqlite:///x.db?journal=off", "unknown option 'journal'"),
        ("sqlite:///x.db?synchronous=full&synchronous=normal", "twice"),
    ],
)
def test_bad_sqlite_urls_name_the_problem(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_the_file_is_private_and_in_wal_mode(tmp_path: Path, make_offloader: Any) -> None:
    off = make_offloader(store=url_of(tmp_path / "q.db"), consume=False)
    off.enqueue_task(record, 1)
    for name in ("q.db", "q.db-wal", "q.db-shm"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    with raw(tmp_path / "q.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert off.store.synchronous == "normal"


def test_synchronous_full_is_an_option(tmp_path: Path) -> None:
    store = open_store(url_of(tmp_path / "q.db") + "?synchronous=full&lease_timeout=7")
    assert isinstance(store, SQLiteStore)
    try:
        assert store.lease_timeout == 7
        store.put(Task(record, (1,)), lease=False)
        assert store._connection is not None
        assert store._connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        store.close()


def test_lease_timeout_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFLOAD_LEASE_TIMEOUT", "12.5")
    monkeypatch.setenv("OFFLOAD_STORE", url_of(tmp_path / "env.db"))
    store = offload._default.get().store
    assert isinstance(store, SQLiteStore) and store.lease_timeout == 12.5
    monkeypatch.setenv("OFFLOAD_LEASE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="OFFLOAD_LEASE_TIMEOUT"):
        offload._default.options_from_env()


def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not a database, not at all" * 100)
    with raw(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    for name, message in (("junk.db", "not a usable offload store"), ("other.db", "users")):
        store = SQLiteStore(tmp_path / name)
        with pytest.raises(StoreError, match=message):
            store.counts()
        store.close()


def test_a_store_written_by_a_newer_offload_is_refused(tmp_path: Path) -> None:
    with raw(tmp_path / "new.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    store = SQLiteStore(tmp_path / "new.db")
    with pytest.raises(StoreError, match="newer offload"):
        store.next_due()
    store.close()


def test_a_store_of_format_2_gains_the_dead_letter_indexes_and_keeps_its_letters(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    task = Task(record, (1,))
    store.put(task, lease=True)
    store.bury(task, dead_letter_for(task, "boom", None, "permanent"))
    store.close()
    with raw(path) as conn:  # as offload wrote it before the console: format 2
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'dead_letters_%'"
        ).fetchall():
            conn.execute(f"DROP INDEX {name}")
        conn.execute("PRAGMA user_version = 2")
    again = SQLiteStore(path)
    page = again.dead_letter_page(LetterQuery(key=None), limit=5)
    assert [letter.task_id for letter in page.letters] == [task.id] and page.total == 1
    again.close()
    with raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
        indexes = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
    wanted = {s.split(" ON ")[0].split()[-1] for s in MIGRATIONS[4]}
    assert {"dead_letters_key", "dead_letters_text"} <= wanted <= indexes


def test_the_sweep_deletes_passed_keys_through_an_index_a_format_5_store_gains(
    tmp_path: Path,
) -> None:
    """The sweep's read and delete of keys whose window passed search the index of keys
    with an `until`: they never read the keys of live tasks, most of the table."""
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    store.counts()
    store.close()
    with raw(path) as conn:  # as offload wrote it before the sweep deleted keys
        conn.execute("DROP INDEX IF EXISTS dedup_until")
        conn.execute("PRAGMA user_version = 5")
    again = SQLiteStore(path)
    again.counts()
    conn = again._connection
    assert conn is not None
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
    for statement, params in ((ANY_PASSED, (0.0,)), (FREE_KEYS, (0.0, 10))):
        plan = " ".join(
            str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", params)
        )
        assert "INDEX dedup_until" in plan and "SCAN" not in plan, (statement, plan)
    again.close()


def test_the_sweep_deletes_a_pile_of_passed_keys_a_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pile of passed keys (a file an older offload used for months) goes a few batches
    per sweep, each a short write of its own, the rest at the next sweep."""
    monkeypatch.setattr(sqlite_dedup, "_BATCH", 10)
    monkeypatch.setattr(sqlite_dedup, "_BATCHES", 2)
    path = tmp_path / "q.db"
    store = SQLiteStore(path)
    store.counts()
    with raw(path) as conn:
        conn.executemany(
            "INSERT INTO dedup (key, task_id, idempotency_key, until) VALUES (?, ?, ?, ?)",
            [(f"k{i}", f"t{i}", f"t{i}", 1.0) for i in range(25)]
            + [("live", "t-live", "t-live", None)],
        )

    def left() -> int:
        with raw(path) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM dedup").fetchone()[0])

    conn = store._connection
    assert conn is not None
    sqlite_dedup.free_keys(conn, now=2.0)
    assert left() == 1 + 5  # two batches of ten; the live key stays
    sqlite_dedup.free_keys(conn, now=2.0)
    assert left() == 1
    store.close()


def test_filtered_pages_read_an_index_not_the_table(tmp_path: Path) -> None:
    """A page filtered by key, status or reason is a range of one index (so it costs the
    same in a store of 100,000 letters as in one of ten); a text search reads the text
    index, not the table with every task's call in it."""
    store = SQLiteStore(tmp_path / "plans.db")
    store.counts()
    conn = store._connection
    assert conn is not None
    for query, index in [
        (LetterQuery(key="crm"), "dead_letters_key"),
        (LetterQuery(status=503), "dead_letters_status"),
        (LetterQuery(reason="permanent"), "dead_letters_reason"),
        (LetterQuery(since=datetime.now(timezone.utc)), "dead_letters_last_attempt"),
        (LetterQuery(text="timeout"), "dead_letters_text"),
    ]:
        where, args = _where(query)
        select = "seq" if query.text or query.since else "*"
        order = "" if query.text or query.since else " ORDER BY seq DESC LIMIT 51"
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                f"EXPLAIN QUERY PLAN SELECT {select} FROM dead_letters WHERE {where}{order}", args
            )
        )
        assert index in plan and "TEMP B-TREE" not in plan, (query, plan)
    store.close()


def test_rare_text_matches_beyond_the_newest_window_are_paged_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.stores.sqlite import listing

    monkeypatch.setattr(listing, "_WINDOW", 3)  # the newest 3 rows hold fewer than a page
    store = SQLiteStore(tmp_path / "window.db")
    letters = []
    for i in range(10):
        task = Task(record, (i,))
        store.put(task, lease=True)
        error = "needle" if i in (0, 1, 2, 9) else "hay"
        letters.append(dead_letter_for(task, error, None, "permanent"))
        store.bury(task, letters[-1])
    seen = []
    cursor = None
    for _ in range(3):
        page = store.dead_letter_page(LetterQuery(text="NEEDLE"), limit=2, cursor=cursor)
        assert page.total == 4
        seen += [letter.id for letter in page.letters]
        cursor = page.cursor
        if cursor is None:
            break
    assert seen == [letters[i].id for i in (9, 2, 1, 0)] and cursor is None
    since = letters[0].last_attempt_at
    assert store.dead_letter_page(LetterQuery(since=since), limit=50).total == 10
    store.close()


def test_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing" / "q.db")
    with pytest.raises(StoreError, match="cannot create the store file"):
        store.put(Task(record, (1,)), lease=False)


def test_no_pickle_anywhere_in_the_file(tmp_path: Path, make_offloader: Any) -> None:
    off = make_offloader(store=url_of(tmp_path / "q.db"), consume=False)
    off.enqueue_task(record, {"nested": [1, 2.5, None, True, "ü"]})
    off.enqueue_task(offload.http("POST", "http://127.0.0.1:9/x", json={"a": 1}, data=None))
    off.enqueue_task(
        Task(
            record,
            ("with policy",),
            retry=RetryPolicy(
                stop=tenacity.stop_after_attempt(2) | tenacity.stop_before_delay(60),
                wait=tenacity.wait_fixed(0) + tenacity.wait_random(0, 1),
                retry_on=(KeyError,),
            ),
        )
    )
    store = off.store
    (task,) = store.claim(1)
    store.bury(task, dead_letter_for(task, "boom", None, "permanent"))
    files = [tmp_path / "q.db", tmp_path / "q.db-wal", *tmp_path.glob("q.db-journals/*")]
    assert any(f.parent.name == "q.db-journals" for f in files)
    contents = b"".join(f.read_bytes() for f in files if f.exists())
    # Pickle's protocol 4 and 5 openings (PROTO, then FRAME), and its ways to name a global.
    for marker in (b"\x80\x04\x95", b"\x80\x05\x95", b"cbuiltins\n", b"\x8c\x08builtins"):
        assert marker not in contents
    with raw(tmp_path / "q.db") as conn:
        texts = conn.execute(
            "SELECT call, retry FROM tasks UNION ALL SELECT call, retry FROM dead_letters"
        ).fetchall()
    assert len(texts) == 3
    for call, retry in texts:
        json.loads(call)
        if retry is not None:
            json.loads(retry)


# -- the durable offloader --------------------------------------------------------------


def test_calls_are_delivered_through_the_file(
    tmp_path: Path, make_offloader: Any, server: ScriptedServer
) -> None:
    off = make_offloader(store=url_of(tmp_path / "q.db"), workers=2)
    for i in range(60):
        off.enqueue_task(offload.http("POST", server.url("/hook"), json={"i": i}))
    assert off.flush(10)
    assert sorted(json.loads(r.body)["i"] for r in server.requests_to("/hook")) == list(range(60))
    s = off.stats()
    assert (s.enqueued, s.succeeded, s.claimed, s.dead_lettered) == (60, 60, 60, 0)
    assert (s.stored_ready, s.stored_delayed, s.stored_leased) == (0, 0, 0)
    assert ledger_holds(off)


def test_a_retry_goes_back_to_the_store_with_its_attempts(
    tmp_path: Path, make_offloader: Any, server: ScriptedServer
) -> None:
    server.script("/flaky", Answer(503), Answer(503), Answer(200))
    policy = RetryPolicy(wait=tenacity.wait_fixed(0))
    off = make_offloader(store=url_of(tmp_path / "q.db"), retry=policy)
    task = off.enqueue_task(offload.http("POST", server.url("/flaky"), idempotency_key=True))
    assert off.flush(10)
    requests = server.requests_to("/flaky")
    assert len(requests) == 3
    assert {r.headers["Idempotency-Key"] for r in requests} == {task.idempotency_key}
    s = off.stats()
    assert (s.retried, s.released, s.claimed, s.succeeded) == (2, 2, 3, 1)
    assert ledger_holds(off)


def test_attempt_state_from_another_process_bounds_the_retries(
    tmp_path: Path, make_offloader: Any, server: ScriptedServer
) -> None:
    # A task first tried 1000 s ago by a process that is gone: stop_before_delay(600)
    # counts from then, so the next failure dead-letters it with the old first attempt.
    server.script("/down", Answer(500))
    store = SQLiteStore(tmp_path / "q.db")
    task = Task(offload.http("POST", server.url("/down")))
    store.put(task, lease=True)
    task.progress.attempts = task.progress.failures = 1
    task.progress.first_attempt_at = task.progress.last_attempt_at = time.time() - 1000
    store.release(task, time.time())
    store.close()
    off = make_offloader(store=url_of(tmp_path / "q.db"))
    assert off.running, "a backlog resumes when the offloader is made"
    assert off.flush(10)
    (letter,) = off.dead_letters()
    assert (letter.task_id, letter.attempts, letter.reason, letter.status) == (
        task.id,
        2,
        "exhausted",
        500,
    )
    assert letter.first_attempt_at is not None
    assert abs(letter.first_attempt_at.timestamp() - task.progress.first_attempt_at) < 1e-3
    assert len(server.requests_to("/down")) == 1


def test_a_throttled_key_waits_while_others_flow(tmp_path: Path, server: ScriptedServer) -> None:
    clock = FakeClock()
    server.script("/a", Answer(429, headers={"Retry-After": "30"}), Answer(200))
    off = Offloader(store=url_of(tmp_path / "q.db"), clock=clock, idle_timeout=3600)
    try:
        a_call, b_call = (offload.http("POST", server.url(p)) for p in ("/a", "/b"))
        for _ in range(2):
            off.enqueue_task(Task(a_call, key="a"))
        for _ in range(3):
            off.enqueue_task(Task(b_call, key="b"))
        assert server.wait_for(3, "/b") and server.wait_for(1, "/a")
        assert off.gates().keys() == {"a"}
        assert len(server.requests_to("/a")) == 1, "a closed gate let a call through"
        assert off.stats().stored_delayed == 1  # the throttled task waits in the store
        clock.advance(32)
        assert server.wait_for(3, "/a")
        assert off.flush(10)
        assert off.gates() == {}
        s = off.stats()
        assert (s.succeeded, s.retried, s.dead_lettered) == (5, 1, 0)
        assert ledger_holds(off)
    finally:
        off.shutdown(5)


def test_dead_letters_keep_every_field_and_replay_works(
    tmp_path: Path, make_offloader: Any, server: ScriptedServer
) -> None:
    server.script("/bad", Answer(404), Answer(200))
    off = make_offloader(store=url_of(tmp_path / "q.db"))
    task = off.enqueue_task(offload.http("GET", server.url("/bad"), params={"api_key": "s3cret"}))
    assert off.flush(10)
    (letter,) = off.dead_letters()
    assert (letter.task_id, letter.status, letter.reason, letter.attempts) == (
        task.id,
        404,
        "permanent",
        1,
    )
    assert "s3cret" not in letter.description and "***" in letter.description
    assert letter.first_attempt_at is not None and letter.first_attempt_at.tzinfo is not None
    replayed = off.replay(letter.id)
    assert replayed.id == task.id
    assert off.flush(10)
    assert off.dead_letters() == []
    assert len(server.requests_to("/bad")) == 2
    with pytest.raises(UnknownDeadLetter):
        off.replay(letter.id)


def test_not_serializable_is_raised_at_once_and_nothing_is_stored(
    tmp_path: Path, make_offloader: Any
) -> None:
    off = make_offloader(store=url_of(tmp_path / "q.db"))

    class Wait(tenacity.wait.wait_base):
        def __call__(self, retry_state: Any) -> float:
            return 1.0

    refused: list[Callable[[], Any]] = [
        lambda: off.enqueue_task(lambda: None),
        lambda: off.enqueue_task(record, (1, 2)),
        lambda: off.enqueue_task(record, object()),
        lambda: off.enqueue_task(Task(record, (1,), retry=RetryPolicy(wait=Wait()))),
        lambda: off.enqueue_task(Task(record, (1,), retry=RetryPolicy(retry_on=lambda e: True))),
        lambda: off.enqueue_task(
            Task(
                record,
                (1,),
                retry=RetryPolicy(stop=tenacity.stop_when_event_set(threading.Event())),
            )
        ),
    ]
    for enqueue in refused:
        with pytest.raises(NotSerializable):
            enqueue()
    s = off.stats()
    assert (s.enqueued, s.stored_ready, s.stored_leased) == (0, 0, 0)
    assert not off.running


def test_a_per_task_policy_is_stored_and_applies(
    tmp_path: Path, make_offloader: Any, server: ScriptedServer
) -> None:
    server.script("/down", Answer(500))
    policy = RetryPolicy(
        stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_fixed(0), retry_on=(KeyError,)
    )
    assert RetryPolicy.from_json(policy.to_json()).to_json() == policy.to_json()
    web = make_offloader(store=url_of(tmp_path / "q.db"), consume=False)
    web.enqueue_task(Task(offload.http("POST", server.url("/down")), retry=policy))
    worker = make_offloader(store=url_of(tmp_path / "q.db"))  # its own policy: 5 attempts
    assert worker.running
    assert worker.flush(10)
    assert len(server.requests_to("/down")) == 2
    assert [x.attempts for x in worker.dead_letters()] == [2]


def test_consume_false_only_puts_and_a_worker_elsewhere_delivers(
    tmp_path: Path, make_offloader: Any
) -> None:
    web = make_offloader(store=url_of(tmp_path / "q.db"), consume=False)
    for i in range(10):
        web.enqueue_task(record, i)
    assert not web.running
    s = web.stats()
    assert (s.enqueued, s.claimed, s.stored_ready) == (10, 0, 10)
    worker = make_offloader(store=url_of(tmp_path / "q.db"))
    assert worker.running
    # The web process's flush waits until every task is taken (none is its own to run);
    # the worker's, until it has delivered what it took.
    assert web.flush(10) and worker.flush(10)
    assert sorted(delivered) == list(range(10))
    assert worker.stats().claimed == 10


def test_an_idle_worker_finds_tasks_other_processes_put(
    tmp_path: Path, make_offloader: Any
) -> None:
    worker = make_offloader(store=url_of(tmp_path / "q.db"), idle_timeout=30)
    worker.enqueue_task(record, "first")
    assert worker.flush(10)
    web = make_offloader(store=url_of(tmp_path / "q.db"), consume=False)
    web.enqueue_task(record, "second")
    assert worker.flush(10)
    assert delivered == ["first", "second"]
    assert worker.stats().claimed == 2


def test_shutdown_hands_back_what_it_holds(
    tmp_path: Path, make_offloader: Any, server: ScriptedServer
) -> None:
    release = threading.Event()
    server.script("/slow", Answer.hang(release), Answer(200))
    off = make_offloader(store=url_of(tmp_path / "q.db"))
    off.enqueue_task(offload.http("POST", server.url("/slow"), timeout=30))
    for i in range(5):
        off.enqueue_task(record, i)
    assert server.wait_for(1, "/slow")
    assert off.shutdown(timeout=0.2) is False
    assert off.dead_letters() == []
    counts = off.store.counts()
    assert (counts.ready, counts.leased) == (5, 1)  # handed back; the running call holds on
    release.set()  # the hung call fails (reset) and goes back to the store too
    for thread in list(off._pool.threads):
        thread.join(10)
    assert off.store.counts().leased == 0
    assert ledger_holds(off)
    after = make_offloader(store=url_of(tmp_path / "q.db"))
    assert after.flush(10)
    assert sorted(delivered) == list(range(5))
    assert len(server.requests_to("/slow")) == 2


def test_stats_of_the_memory_store_have_no_store_figures(make_offloader: Any) -> None:
    s = make_offloader().stats()
    assert (s.stored_ready, s.stored_delayed, s.stored_leased, s.claimed) == (None, None, None, 0)


# -- leases -----------------------------------------------------------------------------


def test_an_expired_lease_is_taken_back(tmp_path: Path) -> None:
    clock = FakeClock()
    first = SQLiteStore(tmp_path / "q.db", lease_timeout=10, clock=clock)
    second = SQLiteStore(tmp_path / "q.db", lease_timeout=10, clock=clock)
    try:
        task = Task(record, (1,))
        first.put(task, lease=True)
        clock.advance(8)
        first.renew([task])  # now good until 18
        clock.advance(8)
        assert second.claim(5) == []
        assert second.counts() == StoreCounts(ready=0, delayed=0, leased=1, dead_letters=0)
        clock.advance(3)
        # Expired: ready for the next claim (a flush() must not wait for nobody), taken back.
        assert second.counts() == StoreCounts(ready=1, delayed=0, leased=0, dead_letters=0)
        (taken,) = second.claim(5)
        assert taken.id == task.id
        assert second.counts().leased == 1
    finally:
        first.close()
        second.close()


def test_leases_of_a_dead_process_are_taken_back_at_once(tmp_path: Path) -> None:
    code = f"""
        import os, sys
        sys.path[:0] = [{HERE!r}]
        from offload import Task
        from offload.stores.sqlite import SQLiteStore
        import test_sqlite
        store = SQLiteStore({str(tmp_path / "q.db")!r}, lease_timeout=3600)
        for i in range(3):
            store.put(Task(test_sqlite.record, (i,)), lease=True)
        os._exit(0)  # gone without releasing anything
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    store = SQLiteStore(tmp_path / "q.db", lease_timeout=3600)
    try:
        # No process performs them: they count as ready, for the next claim.
        assert store.counts() == StoreCounts(ready=3, delayed=0, leased=0, dead_letters=0)
        taken = store.claim(10)
        assert sorted(t.args[0] for t in taken) == [0, 1, 2]
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    code = f"""
        import os, sys
        sys.path[:0] = [{HERE!r}]
        from offload import Task
        from offload.stores.sqlite import SQLiteStore
        import test_sqlite
        store = SQLiteStore({str(tmp_path / "q.db")!r})
        store.put(Task(test_sqlite.record, ("parent",)), lease=False)
        parent_conn, parent_owner = store._connection, store.owner
        pid = os.fork()
        if pid == 0:
            ok = True
            try:
                store.put(Task(test_sqlite.record, ("child",)), lease=False)
                ok = store._connection is not parent_conn and store.owner != parent_owner
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child could not use the store"
        assert store._connection is parent_conn
        print(sorted(t.args[0] for t in store.claim(10)))
        store.close()
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['child', 'parent']"


# -- records that cannot be read --------------------------------------------------------

UNIMPORTABLE = json.dumps(
    {
        "offload": 1,
        "target": {"type": "function", "path": "nosuch.mod:fn"},
        "args": [],
        "kwargs": {},
    }
)


@pytest.mark.parametrize(
    ("column", "value", "error"),
    [
        ("call", "{not json", "malformed task record"),
        ("call", UNIMPORTABLE, "cannot resolve 'nosuch.mod:fn'"),
        ("retry", '{"stop": 1}', "malformed retry policy"),
        ("attempts", "many", "bad attempt count"),  # the call itself is fine: revivable
    ],
)
def test_an_unreadable_row_is_dead_lettered_and_the_worker_goes_on(
    tmp_path: Path, make_offloader: Any, column: str, value: str, error: str
) -> None:
    web = make_offloader(store=url_of(tmp_path / "q.db"), consume=False)
    bad = web.enqueue_task(record, "tampered")
    web.enqueue_task(record, "fine")
    with raw(tmp_path / "q.db") as conn:
        conn.execute(f"UPDATE tasks SET {column} = ? WHERE id = ?", (value, bad.id))
    worker = make_offloader(store=url_of(tmp_path / "q.db"))
    assert worker.flush(10)
    assert delivered == ["fine"]
    (letter,) = worker.dead_letters()
    assert (letter.task_id, letter.reason) == (bad.id, "permanent")
    assert "unreadable task record" in letter.error and error in letter.error
    if column == "attempts":
        assert worker.store.revive(letter.id).args == ("tampered",)
        return
    with pytest.raises(StoreError, match="cannot be revived here"):
        worker.store.revive(letter.id)
    assert [x.id for x in worker.dead_letters()] == [letter.id], "a failed revive keeps it"
    worker.replay(letter.id)  # moved back as stored, for a worker that can read it
    assert worker.flush(10)
    assert [x.task_id for x in worker.dead_letters()] == [bad.id]


def test_an_unreadable_dead_letter_stands_in_as_a_letter_saying_so(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "q.db")
    task = Task(record, (1,))
    store.put(task, lease=True)
    store.bury(task, dead_letter_for(task, "boom", None, "permanent"))
    store.close()
    with raw(tmp_path / "q.db") as conn:
        conn.execute("UPDATE dead_letters SET attempts = 'lots'")
    store = SQLiteStore(tmp_path / "q.db")
    try:
        [letter] = store.dead_letters()
        assert letter == store.dead_letter(letter.id)
        assert letter.description == "(unreadable row)" and letter.task_id == task.id
        assert "attempts" in letter.error and letter.reason == "permanent"
        [paged] = store.dead_letter_page(LetterQuery()).letters
        assert paged == letter
        store.discard(letter.id)
        assert store.dead_letters() == []
    finally:
        store.close()


# -- idling and stress ------------------------------------------------------------------

attempts_seen: dict[int, int] = {}


def later_then_fine(i: int) -> None:
    """Asks to be retried in a second the first time, then succeeds."""
    with delivered_lock:
        attempts_seen[i] = attempts_seen.get(i, 0) + 1
        first = attempts_seen[i] == 1
    if first:
        raise offload.Retry(after=1.0)
    record(i)


def mixed(i: int) -> None:
    """Fails in a transient way once for some, for good for others, succeeds for the rest."""
    with delivered_lock:
        attempts_seen[i] = attempts_seen.get(i, 0) + 1
        first = attempts_seen[i] == 1
    if i % 7 == 0:
        raise offload.GiveUp("no")
    if i % 3 == 0 and first:
        raise ConnectionError("flaky")
    record(i)


def test_a_worker_waits_for_a_delayed_task_then_exits_when_idle(
    tmp_path: Path, make_offloader: Any
) -> None:
    from conftest import wait_workers_exit

    attempts_seen.clear()
    off = make_offloader(store=url_of(tmp_path / "q.db"), idle_timeout=0.1)
    off.enqueue_task(later_then_fine, 1)
    assert off.flush(15)
    assert delivered == [1] and attempts_seen == {1: 2}
    assert wait_workers_exit(off)
    keeper = off._backlog.keeper.thread
    if keeper is not None:
        keeper.join(5)
        assert not keeper.is_alive()


def test_many_threads_enqueue_while_workers_drain(tmp_path: Path, make_offloader: Any) -> None:
    attempts_seen.clear()
    off = make_offloader(
        store=url_of(tmp_path / "q.db"),
        workers=4,
        max_queue=50,  # beyond it, tasks wait in the store unleased
        retry=RetryPolicy(wait=tenacity.wait_fixed(0)),
    )
    per_thread, threads = 100, 8
    ledgers: list[bool] = []

    def produce(start: int) -> None:
        for i in range(start, start + per_thread):
            off.enqueue_task(mixed, i)
            if i % 25 == 0:
                ledgers.append(ledger_holds(off))

    producers = [threading.Thread(target=produce, args=(n * per_thread,)) for n in range(threads)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(60)
    assert off.flush(60)
    total = per_thread * threads
    gave_up = {i for i in range(total) if i % 7 == 0}
    assert sorted(delivered) == sorted(set(range(total)) - gave_up)
    s = off.stats()
    assert (s.enqueued, s.succeeded, s.dead_lettered) == (total, total - len(gave_up), len(gave_up))
    assert s.retried == len({i for i in range(total) if i % 3 == 0} - gave_up)
    assert (s.stored_ready, s.stored_delayed, s.stored_leased) == (0, 0, 0)
    assert ledger_holds(off) and all(ledgers)


def test_many_openers_of_a_new_file_all_get_a_store(tmp_path: Path) -> None:
    # gunicorn workers starting at once on a store file nobody made yet: the switch to WAL
    # mode takes an exclusive lock that SQLite's busy handler does not wait for.
    errors: list[BaseException] = []
    for attempt in range(20):
        db = tmp_path / f"q{attempt}.db"
        start = threading.Barrier(8)

        def open_and_put(db: Path = db, start: threading.Barrier = start) -> None:
            store = SQLiteStore(db)
            try:
                start.wait(10)
                store.put(Task(record, ()), lease=False)
            except BaseException as exc:
                errors.append(exc)
            finally:
                store.close()

        threads = [threading.Thread(target=open_and_put) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        reader = SQLiteStore(db)
        try:
            assert reader.counts().ready == 8
        finally:
            reader.close()


def record_then_fail(value: Any) -> None:
    record(value)
    raise ValueError(f"cannot handle {value!r}")


class FailingStore(SQLiteStore):
    """A real SQLite file whose `complete`, `bury` or `release` raise StoreError the first
    few times, as a full disk or a lock held too long would make them."""

    def __init__(self, path: Path, *, failing: list[str], **options: Any) -> None:
        super().__init__(path, **options)
        self.failing = list(failing)  # one name per failure, in any order
        self.failed: list[str] = []

    def _maybe_fail(self, what: str) -> None:
        if what in self.failing:
            self.failing.remove(what)
            self.failed.append(what)
            raise StoreError(f"{self.url}: {what} failed: injected")

    def complete(self, task: Task) -> None:
        self._maybe_fail("complete")
        super().complete(task)

    def bury(self, task: Task, letter: offload.DeadLetter) -> None:
        self._maybe_fail("bury")
        super().bury(task, letter)

    def release(self, task: Task, due: float) -> None:
        self._maybe_fail("release")
        super().release(task, due)


@pytest.mark.parametrize(
    ("failing", "lease_timeout"),
    [
        (["bury"], 60.0),  # handed back at once, due in 0.5 s: it runs again, no lapse
        (["bury", "release"], 60.0),  # the hand-back failed too: flush() makes it again
    ],
)
def test_a_dead_letter_the_store_could_not_keep_runs_again_before_flush_returns(
    tmp_path: Path, make_offloader: Any, failing: list[str], lease_timeout: float
) -> None:
    store = FailingStore(tmp_path / "q.db", failing=failing, lease_timeout=lease_timeout)
    off = make_offloader(store=store, idle_timeout=0.05)
    off.enqueue_task(record_then_fail, 7)
    assert off.flush(30)
    # It ran again, and is a dead letter now; nothing is left leased in the file.
    assert delivered == [7, 7]
    assert [d.reason for d in off.dead_letters()] == ["permanent"]
    assert store.counts() == StoreCounts(0, 0, 0, 1)
    assert store.failed == failing
    s = off.stats()
    assert (s.claimed, s.dead_lettered, s.released) == (2, 1, 1)
    assert ledger_holds(off)
    assert off.shutdown(5)


@pytest.mark.parametrize("failing", [["complete"], ["complete", "complete"]])
def test_a_delivered_task_the_store_could_not_forget_is_forgotten_not_sent_again(
    tmp_path: Path, make_offloader: Any, failing: list[str]
) -> None:
    store = FailingStore(tmp_path / "q.db", failing=failing)
    off = make_offloader(store=store, idle_timeout=0.05)
    off.enqueue_task(record, 7)
    assert off.flush(30)
    assert store.counts() == StoreCounts(0, 0, 0, 0)  # not left leased, to run again
    assert off.shutdown(5)
    assert delivered == [7]
    assert store.failed == failing


class RefusingCompleteStore(SQLiteStore):
    """A real SQLite file that refuses `complete` until `allow` is set, and counts the
    renewals of each task's lease, as a lock held for a while would make it."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.allow = threading.Event()
        self.renewed_enough = threading.Event()
        self.renewals: dict[str, int] = {}

    def complete(self, task: Task) -> None:
        if not self.allow.is_set():
            raise StoreError(f"{self.url}: complete failed: injected")
        super().complete(task)

    def renew(self, tasks: Sequence[Task]) -> None:
        super().renew(tasks)
        for task in tasks:
            self.renewals[task.id] = self.renewals.get(task.id, 0) + 1
            if self.renewals[task.id] >= 4:
                self.renewed_enough.set()


def test_a_delivered_task_whose_complete_waits_keeps_its_lease_and_runs_once(
    tmp_path: Path, make_offloader: Any
) -> None:
    # The store refuses the delete for longer than a lease: the lease keeper goes on
    # renewing the delivered task, so that no flush() or other process takes it back and
    # sends it a second time; once the store takes the delete, it is gone.
    store = RefusingCompleteStore(tmp_path / "q.db", lease_timeout=0.3)
    off = make_offloader(store=store, idle_timeout=0.05)
    off.enqueue_task(record, 7)
    assert store.renewed_enough.wait(30), store.renewals  # renewed after it was delivered
    assert not off.flush(0.5)  # the delete still waits: not settled
    store.allow.set()
    assert off.flush(30)
    assert delivered == [7]
    assert store.counts() == StoreCounts(0, 0, 0, 0)
    assert off.shutdown(5)


def test_shutdown_reports_a_dead_letter_the_store_never_kept(
    tmp_path: Path, make_offloader: Any
) -> None:
    # Every bury is refused; each hand-back succeeds, so the task runs again and again:
    # shutdown() cannot say all went well, and the file still holds the task.
    store = FailingStore(tmp_path / "q.db", failing=["bury"] * 10_000)
    off = make_offloader(store=store, idle_timeout=0.05)
    twice = threading.Event()
    real_bury = store.bury

    def bury(task: Task, letter: offload.DeadLetter) -> None:
        if len(delivered) >= 2:  # (its second run)
            twice.set()
        real_bury(task, letter)

    store.bury = bury  # type: ignore[method-assign]
    off.enqueue_task(record_then_fail, 7)
    assert twice.wait(30)
    assert off.shutdown(5) is False
    assert set(store.failed) == {"bury"} and delivered[:2] == [7, 7]
    with raw(tmp_path / "q.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 1


class TimedReleases(FailingStore):
    """Records how far ahead each hand-back is due."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.waits: list[float] = []
        self.twice = threading.Event()

    def release(self, task: Task, due: float) -> None:
        super().release(task, due)
        self.waits.append(due - time.time())
        if len(self.waits) >= 2:
            self.twice.set()


def test_a_refused_dead_letter_waits_longer_at_each_hand_back(
    tmp_path: Path, make_offloader: Any
) -> None:
    # A store that keeps refusing the dead letter: the task is handed back due in 0.5 s,
    # then 1 s (doubled each time), not sent again and again.
    store = TimedReleases(tmp_path / "q.db", failing=["bury"] * 10_000)
    off = make_offloader(store=store, idle_timeout=0.05)
    off.enqueue_task(record_then_fail, 7)
    assert store.twice.wait(30)
    first, second = store.waits[:2]
    assert 0.3 < first <= 0.5 and 0.8 < second <= 1.0, store.waits
    off.shutdown(5)


gate = threading.Event()
at_gate = threading.Event()


def record_at_gate(value: Any) -> None:
    at_gate.set()
    assert gate.wait(30)
    record(value)


def test_a_task_whose_complete_is_refused_after_a_timed_out_shutdown_is_let_go(
    tmp_path: Path, make_offloader: Any
) -> None:
    # shutdown() gave up waiting for a running call; the call then ends and the store
    # refuses its delete: nothing will retry it any more, so its lease is let go (it lapses,
    # and the task runs elsewhere) instead of being renewed for the life of the process.
    gate.clear()
    at_gate.clear()
    store = RefusingCompleteStore(tmp_path / "q.db", lease_timeout=0.3)
    off = make_offloader(store=store, idle_timeout=0.05)
    off.enqueue_task(record_at_gate, 7)
    assert at_gate.wait(30)
    assert off.shutdown(timeout=0.1) is False  # the call still runs
    keeper = off._backlog.keeper.thread
    assert keeper is not None
    gate.set()
    keeper.join(30)
    assert not keeper.is_alive(), "the lease keeper renews a task nothing will settle"
    assert delivered == [7]


def open_files(path: Path) -> list[str]:
    """This process's descriptors open on `path` or its journals and WAL (Linux)."""
    fds = Path("/proc/self/fd")
    found = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(path)):
                found.append(target)
    return found


def test_a_shutdown_that_timed_out_closes_its_store_when_the_last_call_ends(
    tmp_path: Path,
) -> None:
    # shutdown() gave up waiting for a running call: the store stays open for that call's
    # settling, and is closed once it ends, not left open for the life of the process.
    gate.clear()
    at_gate.clear()
    db = tmp_path / "q.db"
    off = Offloader(store=url_of(db))
    off.enqueue_task(record_at_gate, 8)
    assert at_gate.wait(30)
    assert off.shutdown(timeout=0.1) is False  # the call still runs
    assert open_files(db), "the store was closed under a running call"
    closers = [t for t in threading.enumerate() if t.name == "offload-close"]
    gate.set()
    for closer in closers:
        closer.join(30)
    assert len(closers) == 1 and not closers[0].is_alive()
    assert delivered == [8]
    assert open_files(db) == []
    with raw(db) as conn:  # settled before the close: delivered once, gone from the file
        assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 0


def test_shutdown_reports_a_task_the_store_could_not_settle(
    tmp_path: Path, make_offloader: Any
) -> None:
    # Every store call for it fails to the end: shutdown() cannot say all went well.
    store = FailingStore(tmp_path / "q.db", failing=["bury"] + ["release"] * 10_000)
    off = make_offloader(store=store, idle_timeout=0.05)
    off.enqueue_task(record_then_fail, 7)
    assert not off.flush(0.2)  # it waits for the task, still leased to this process
    assert off.shutdown(5) is False
    assert store.failed[0] == "bury" and set(store.failed[1:]) == {"release"}
    assert delivered == [7]
    with raw(tmp_path / "q.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 1


def test_no_lease_is_reported_lost_when_a_shutdown_hands_tasks_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 17: a lease keeper renewing while a shutdown hands tasks back used to renew
    them after their hand-back and report them "lost ... may run twice"; they were not
    (handed back, each once). A short lease makes the keeper renew often."""
    caplog.set_level(logging.INFO, logger="offload")
    url = url_of(tmp_path / "q.db")
    off = Offloader(store=url, workers=4, lease_timeout=0.3)
    for i in range(2_000):
        off.enqueue_task(offload.http("POST", "http://127.0.0.1:9/closed", json={"i": i}))
    off.shutdown(timeout=0.1)
    assert not [r for r in caplog.records if "were lost" in r.getMessage()]
    store = SQLiteStore(tmp_path / "q.db")
    try:
        counts = store.counts()
        # Every task is in the file exactly once, none leased: each was handed back.
        assert counts.ready + counts.delayed == 2_000 and counts.leased == 0
    finally:
        store.close()
