"""The SQLite store's journal: an enqueue appends one line to its process's journal file,
and whichever process next reads tasks copies the lines into the database, each once.

Real files, real processes (killed with SIGKILL where a test needs a journal whose process
is gone), real threads with a connection each for the concurrent copies.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import offload
from offload import Offloader, StoreError, Task
from offload.records import DeadLetter
from offload.stores.sqlite import SQLiteStore
from offload.stores.sqlite import journal as sqlite_journal
from offload.stores.sqlite import store as sqlite_store
from offload.stores.sqlite.schema import SCHEMA_VERSION
from offload.testing import FakeClock
from procs import run_python


def record(*args: Any) -> None:
    """A task target; never performed by the stores under test."""


DELIVERED: list[int] = []
_delivered_lock = threading.Lock()


def deliver(i: int) -> None:
    """A task target that notes what it was given."""
    with _delivered_lock:
        DELIVERED.append(i)


def journals(db: Path) -> list[Path]:
    directory = Path(f"{db}-journals")
    return sorted(directory.glob("*.journal")) if directory.exists() else []


def rows(db: Path) -> list[tuple[Any, ...]]:
    """The tasks table as it is, read behind the store's back (no copy first)."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id, owner FROM tasks ORDER BY seq").fetchall()
    finally:
        conn.close()


def killed_producer(db: Path, code: str) -> list[str]:
    """Run `code` (with `store`, a SQLiteStore over `db`, and `put(n)` that enqueues n tasks
    without a lease) in a process that then kills itself with SIGKILL; the task ids put."""
    script = textwrap.dedent(
        f"""\
        import os, signal, sys
        from offload import Task
        from offload.stores.sqlite import SQLiteStore
        from test_journal import record
        store = SQLiteStore({str(db)!r})
        def put(n, lease=False):
            for i in range(n):
                task = Task(record, (i,))
                store.put(task, lease=lease)
                print(task.id, flush=True)
        """
    )
    result = run_python(f"{script}{code}\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert result.returncode == -signal.SIGKILL, result.stderr
    return result.stdout.split()


def test_an_enqueue_is_one_line_of_this_process_journal(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    web = SQLiteStore(db)
    reader = SQLiteStore(db)
    try:
        tasks = [Task(record, (i,), key="k") for i in range(3)]
        for task in tasks:
            web.put(task, lease=False)
        (journal,) = journals(db)
        assert journal.name.startswith(f"{os.getpid()}-")
        header, *lines = journal.read_bytes().split(b"\n")
        assert json.loads(header)["offload_journal"] == 2
        assert lines[-1] == b"" and len(lines) == 4
        for task, line in zip(tasks, lines, strict=False):
            head, tab, call = line.partition(b"\t")
            assert tab and json.loads(head)[:3] == [task.id, None, "k"]
            assert json.loads(call)["args"] == [tasks.index(task)]
        assert rows(db) == []  # not copied yet: nothing has read tasks

        assert reader.counts().ready == 3  # any reader copies every journal first
        assert rows(db) == [(t.id, None) for t in tasks]
        assert journals(db) == [journal]  # its process is alive: the file stays
        assert reader.counts().ready == 3  # copied once
    finally:
        web.close()
        reader.close()


def test_a_task_leased_on_put_is_copied_leased_and_completed_by_its_owner(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    store = SQLiteStore(db)
    try:
        task = Task(record, ("mine",))
        store.put(task, lease=True)
        assert rows(db) == []
        store.renew([task])  # settling a task copies this process's lines first
        assert rows(db) == [(task.id, store.owner)]
        store.complete(task)  # marked done in the journal; the next copy deletes the row
        assert store.counts() == type(store.counts())(0, 0, 0, 0)
        assert rows(db) == []
    finally:
        store.close()


def test_a_dead_process_journal_is_copied_then_deleted(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    ids = killed_producer(db, "put(5)")
    (journal,) = journals(db)
    store = SQLiteStore(db)
    try:
        claimed = store.claim(10)
        assert [t.id for t in claimed] == ids
        assert journals(db) == []  # copied to the end, its process gone: deleted
        assert not journal.exists()
        for task in claimed:
            store.complete(task)
        assert store.claim(10) == []
        conn = sqlite3.connect(db)
        assert conn.execute("SELECT count(*) FROM journals").fetchone() == (0,)
        conn.close()
    finally:
        store.close()


def test_leases_written_by_a_killed_process_are_taken_back(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    ids = killed_producer(db, "put(3, lease=True)")
    store = SQLiteStore(db)
    try:
        assert sorted(t.id for t in store.claim(10)) == sorted(ids)
    finally:
        store.close()


def test_a_torn_last_line_of_a_dead_journal_is_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "q.db"
    # Killed in the middle of writing its third line (as if the write was cut short).
    ids = killed_producer(
        db,
        """
put(2)
journal = store._journal
os.write(journal.fd, b'["half a line')
""",
    )
    store = SQLiteStore(db)
    try:
        with caplog.at_level(logging.WARNING, logger="offload"):
            assert [t.id for t in store.claim(10)] == ids
        assert "incomplete line (13 bytes" in caplog.text
        assert journals(db) == []
    finally:
        store.close()


def test_an_unreadable_line_is_logged_and_the_others_are_copied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "q.db"
    ids = killed_producer(
        db, "put(1)\nos.write(store._journal.fd, b'not json\\tnor this\\n')\nput(1)"
    )
    store = SQLiteStore(db)
    try:
        with caplog.at_level(logging.ERROR, logger="offload"):
            assert [t.id for t in store.claim(10)] == ids
        assert "unreadable line in journal" in caplog.text
    finally:
        store.close()


def test_a_line_whose_key_sqlite_cannot_write_is_copied_with_the_others(tmp_path: Path) -> None:
    """A key holding a lone surrogate, as an offload before its build-time check wrote it:
    its line is copied with the surrogate escaped, and the lines around it with it (before,
    the copy failed as a whole, every time, and no task of the journal ran)."""
    db = tmp_path / "q.db"
    ids = killed_producer(
        db,
        "put(1)\n"
        "task = Task(record, (9,), key='api')\n"
        "task.meta.key = 'api-\\udcff'\n"
        "store.put(task, lease=False)\n"
        "print(task.id, flush=True)\n"
        "put(1)",
    )
    store = SQLiteStore(db)
    try:
        claimed = store.claim(10)
        assert [t.id for t in claimed] == ids
        assert claimed[1].key == "api-\\udcff"
    finally:
        store.close()


def test_journals_rotate_and_every_line_is_delivered_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_journal, "_JOURNAL_ROTATE", 2_000)  # a few lines a file
    db = tmp_path / "q.db"
    DELIVERED.clear()
    off = Offloader(store=f"sqlite:///{db}", workers=2)
    try:
        for i in range(300):
            off.enqueue_task(deliver, i)
        assert off.flush(30)
    finally:
        off.shutdown(5)
    assert sorted(DELIVERED) == list(range(300))
    assert journals(db) == []  # its own files, copied, are deleted when it closes
    assert rows(db) == []


def test_concurrent_copies_take_each_line_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Producers append (rotating often) while consumers, each with its own connection,
    # copy, claim, complete and delete finished files all at once. A line copied twice
    # would come back after its task completed, and be claimed a second time.
    monkeypatch.setattr(sqlite_journal, "_JOURNAL_ROTATE", 4_000)
    monkeypatch.setattr(sqlite_store, "_SWEEP_EVERY", 0.0)
    db = tmp_path / "q.db"
    producers, per_producer, consumers = 4, 400, 3
    total = producers * per_producer
    claimed: Counter[str] = Counter()
    put: list[str] = []
    lock = threading.Lock()
    done_putting = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        store = SQLiteStore(db)
        try:
            for i in range(per_producer):
                task = Task(record, (i,))
                store.put(task, lease=False)
                with lock:
                    put.append(task.id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    def consume() -> None:
        store = SQLiteStore(db, busy_timeout=30)
        try:
            while True:
                finished = done_putting.is_set()
                tasks = store.claim(50)
                for task in tasks:
                    store.complete(task)
                with lock:
                    claimed.update(t.id for t in tasks)
                if finished and not tasks and store.counts().ready == 0:
                    return
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=consume) for _ in range(consumers)]
    makers = [threading.Thread(target=produce) for _ in range(producers)]
    for thread in threads + makers:
        thread.start()
    for thread in makers:
        thread.join(60)
    done_putting.set()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads + makers)
    assert len(put) == total
    assert set(claimed) == set(put)
    assert max(claimed.values()) == 1, "a line was copied twice"
    final = SQLiteStore(db)
    try:
        assert final.claim(10) == []  # sweeps what is left
        assert journals(db) == []
    finally:
        final.close()


def test_a_forked_child_writes_a_journal_of_its_own(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    result = run_python(
        f"""
        import os
        from offload import Task
        from offload.stores.sqlite import SQLiteStore
        from test_journal import record
        store = SQLiteStore({str(db)!r})
        store.put(Task(record, ("parent",)), lease=False)
        pid = os.fork()
        if pid == 0:
            store.put(Task(record, ("child",)), lease=False)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        print(pid, flush=True)
        store.put(Task(record, ("parent again",)), lease=False)
        os.kill(os.getpid(), 9)
        """
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    child = int(result.stdout)
    names = [p.name for p in journals(db)]
    assert len(names) == 2 and sum(n.startswith(f"{child}-") for n in names) == 1
    store = SQLiteStore(db)
    try:
        args = sorted(t.args[0] for t in store.claim(10))
        assert args == ["child", "parent", "parent again"]
        assert journals(db) == []
    finally:
        store.close()


def test_a_failed_write_leaves_no_torn_line_and_the_next_enqueue_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "q.db"
    store = SQLiteStore(db)
    try:
        first = Task(record, (1,))
        store.put(first, lease=False)
        journal = store._journal
        assert journal is not None
        real_write = os.write

        def disk_full(fd: int, data: Any) -> int:
            if fd == journal.fd:
                real_write(fd, bytes(data[:10]))  # part of the line reaches the file
                raise OSError(28, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(sqlite_journal.os, "write", disk_full)
        with pytest.raises(StoreError, match="No space left on device"):
            store.put(Task(record, (2,)), lease=False)
        monkeypatch.undo()
        third = Task(record, (3,))
        store.put(third, lease=False)
        assert len(journals(db)) == 2  # the third went to a new file
        assert [t.id for t in store.claim(10)] == [first.id, third.id]
    finally:
        store.close()


def test_a_journal_of_a_database_made_anew_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The database deleted (its queue thrown away) but not its journals: their lines are
    # not the new database's tasks, and may have been delivered long ago.
    db = tmp_path / "q.db"
    killed_producer(db, "put(2)")
    for path in tmp_path.glob("q.db*"):
        if path.is_file():
            path.unlink()
    (stray,) = journals(db)
    store = SQLiteStore(db)
    try:
        with caplog.at_level(logging.WARNING, logger="offload"):
            assert store.claim(10) == []
            assert store.claim(10) == []
        assert caplog.text.count("was not written for this database") == 1
        assert journals(db) == [stray]
        task = Task(record, ("new",))
        store.put(task, lease=False)
        assert [t.id for t in store.claim(10)] == [task.id]
    finally:
        store.close()


def test_a_format_1_store_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    old = SQLiteStore(db, synchronous="full")  # writes the database directly
    task = Task(record, ("old",))
    old.put(task, lease=False)
    old.close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE journals")
    conn.execute("DROP TABLE meta")
    conn.execute("DROP INDEX tasks_id")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = SQLiteStore(db)
    try:
        assert [t.id for t in store.claim(1)] == [task.id]
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert {"journals", "meta", "tasks_id"} <= names
        conn.close()
    finally:
        store.close()


def test_synchronous_full_writes_the_database_at_once(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    store = SQLiteStore(db, synchronous="full")
    try:
        task = Task(record, (1,))
        store.put(task, lease=False)
        assert rows(db) == [(task.id, None)]
        assert not Path(f"{db}-journals").exists()
    finally:
        store.close()


def test_the_journal_holds_no_secret_readable_by_others(tmp_path: Path) -> None:
    # It holds request headers, as the database does: 0700 directory, 0600 files.
    db = tmp_path / "q.db"
    off = Offloader(store=f"sqlite:///{db}", consume=False)
    try:
        off.enqueue_task(
            offload.http("POST", "http://127.0.0.1:9/x", headers={"Authorization": "Bearer t"})
        )
        (journal,) = journals(db)
        assert journal.stat().st_mode & 0o777 == 0o600
        assert journal.parent.stat().st_mode & 0o777 == 0o700
    finally:
        off.shutdown(1)


def test_every_field_survives_the_journal(tmp_path: Path) -> None:
    # The line's head is written by hand: keys with quotes, tabs, newlines, backslashes and
    # non-ASCII text, a lease, a retry policy, and the call's own text come back as they
    # went in.
    db = tmp_path / "q.db"
    store = SQLiteStore(db, lease_timeout=42.5)
    try:
        odd = 'a"b\tc\nd\\e ü \u2028 😀'
        one_line = odd.replace("\n", "")  # as an idempotency key (a header) must be
        call = offload.http("POST", "http://127.0.0.1:9/x", idempotency_key=one_line)
        tasks = [
            Task(record, ("plain",)),
            Task(record, (odd,), key=odd, retry=offload.RetryPolicy(max_retry_after=5)),
            Task(call, key="k"),
        ]
        for task in tasks:
            store.put(task, lease=task is tasks[0])
        assert rows(db) == []
        store.renew([tasks[0]])
        conn = sqlite3.connect(db)
        got = conn.execute(
            "SELECT id, idempotency_key, key, retry IS NOT NULL, owner, lease_until - due "
            "FROM tasks ORDER BY seq"
        ).fetchall()
        conn.close()
        assert got[0][:5] == (tasks[0].id, None, None, 0, store.owner)
        assert got[0][5] == pytest.approx(42.5, abs=1.0)  # renewed just now
        assert got[1] == (tasks[1].id, None, odd, 1, None, None)
        assert got[2] == (tasks[2].id, None, "k", 0, None, None)
        claimed = {t.id: t for t in store.claim(10)}
        assert claimed[tasks[1].id].args == (odd,)
        assert repr(claimed[tasks[1].id].retry) == repr(tasks[1].retry)
        assert claimed[tasks[2].id].call.idempotency_key == one_line  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_concurrent_first_enqueue_waits_for_the_journal_to_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second thread's first put while the first is still opening the store must not go
    # ahead and write a journal with no header (its lines would never be copied).
    db = tmp_path / "q.db"
    store = SQLiteStore(db)
    in_window = threading.Event()
    release = threading.Event()
    real_header = sqlite_journal._journal_header

    def slow_header(store_id: str) -> bytes:
        in_window.set()
        assert release.wait(10)
        return real_header(store_id)

    monkeypatch.setattr(sqlite_journal, "_journal_header", slow_header)
    first, second = Task(record, (1,)), Task(record, (2,))
    threads = [
        threading.Thread(target=store.put, args=(task,), kwargs={"lease": False})
        for task in (first, second)
    ]
    threads[0].start()
    try:
        assert in_window.wait(10)
        threads[1].start()
        # It must not finish while the journal is being made (a bounded look, not a wait
        # for something to happen: before the fix it finished at once).
        threads[1].join(0.5)
        assert threads[1].is_alive()
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    try:
        reader = SQLiteStore(db)
        try:
            assert {t.id for t in reader.claim(10)} == {first.id, second.id}
        finally:
            reader.close()
    finally:
        store.close()


def test_a_failed_header_write_does_not_leave_a_headerless_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk when a new file's header is written: the enqueue fails, and the next one
    # (disk freed) goes into a whole new file.
    db = tmp_path / "q.db"
    store = SQLiteStore(db)
    try:
        real_write = os.write
        failed: list[int] = []

        def full_once(fd: int, data: Any) -> int:
            if not failed and bytes(data).startswith(b'{"offload_journal"'):
                failed.append(fd)
                raise OSError(28, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(sqlite_journal.os, "write", full_once)
        with pytest.raises(StoreError, match="No space left"):
            store.put(Task(record, (1,)), lease=False)
        monkeypatch.undo()
        after = Task(record, (2,))
        store.put(after, lease=False)  # returns: durable
        reader = SQLiteStore(db)
        try:
            ids = [t.id for t in reader.claim(10)]
        finally:
            reader.close()
        assert ids == [after.id], "a task enqueued after the disk was freed is lost"
    finally:
        store.close()


def test_a_synchronous_full_process_copies_other_processes_journals(tmp_path: Path) -> None:
    # "Any process may copy any journal": a worker opened with ?synchronous=full has no
    # journal of its own, yet copies the others'.
    db = tmp_path / "q.db"
    web = SQLiteStore(db)
    worker = SQLiteStore(db, synchronous="full")
    try:
        task = Task(record, ("from the web",))
        web.put(task, lease=False)
        assert [t.id for t in worker.claim(10)] == [task.id]
    finally:
        web.close()
        worker.close()


def test_a_badly_typed_journal_line_is_left_and_the_rest_copied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # JSON of the right length but the wrong types (due a string, lease a number) must not
    # fail every copy from then on.
    db = tmp_path / "q.db"
    writer = SQLiteStore(db)
    reader = SQLiteStore(db)
    try:
        good = Task(record, (1,))
        writer.put(good, lease=False)
        journal = writer._journal
        assert journal is not None
        os.write(journal.fd, b'["bad",null,null,"x",null,5,null]\t{}\n')
        os.write(journal.fd, b"[7,null,null,1.5,null,null,null]\t{}\n")
        later = Task(record, (2,))
        writer.put(later, lease=False)
        with caplog.at_level(logging.ERROR, logger="offload"):
            assert [t.id for t in reader.claim(10)] == [good.id, later.id]
        assert caplog.text.count("a field of the wrong type") == 2
    finally:
        writer.close()
        reader.close()


def test_a_backlog_is_copied_in_transactions_of_bounded_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that was down for a while must not hold the write lock for the whole backlog.
    db = tmp_path / "q.db"
    killed_producer(db, "put(60)")
    monkeypatch.setattr(sqlite_journal, "_COPY_BUDGET", 1_000)  # a few lines a transaction
    store = SQLiteStore(db)
    try:
        first = store.claim(100)  # one transaction's worth was copied, and claimed
        assert 0 < len(first) < 60
        # counts() counts every task on disk (issue 17: `offload stats` right after a
        # producer exits counted part of it), copying the rest a transaction at a time.
        counts = store.counts()
        assert counts.ready + counts.leased == 60 and counts.leased == len(first)
        total = [t.id for t in first]
        while batch := store.claim(100):
            total.extend(t.id for t in batch)
        assert len(total) == len(set(total)) == 60
    finally:
        store.close()


def test_a_journal_that_cannot_be_read_is_left_out_and_the_others_copied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "q.db"
    ids = killed_producer(db, "put(2)")
    (Path(f"{db}-journals") / "0-unreadable-1.journal").mkdir()  # open() fails on it
    store = SQLiteStore(db)
    try:
        with caplog.at_level(logging.ERROR, logger="offload"):
            assert [t.id for t in store.claim(10)] == ids
            assert store.claim(10) == []
        assert caplog.text.count("cannot be read; left out") == 1
    finally:
        store.close()


def test_a_journal_left_half_made_by_a_killed_process_is_removed(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    killed_producer(db, "put(1)")
    directory = Path(f"{db}-journals")
    (journal,) = journals(db)
    dead_pid = journal.name.partition("-")[0]
    half = directory / f".{dead_pid}-abcd-2.journal.new"
    half.write_bytes(b"")
    mine = directory / f".{os.getpid()}-abcd-1.journal.new"  # a live process's: kept
    mine.write_bytes(b"")
    store = SQLiteStore(db)
    try:
        store.claim(10)
        assert not half.exists()
        assert mine.exists()
    finally:
        store.close()


def test_a_task_performed_before_its_line_is_copied_never_reaches_the_database(
    tmp_path: Path,
) -> None:
    # Enqueued and completed by its own process: a mark in the same journal, no row
    # inserted and deleted. A copy meeting both inserts nothing.
    db = tmp_path / "q.db"
    store = SQLiteStore(db)
    reader = SQLiteStore(db)
    try:
        quick, slow = Task(record, ("quick",)), Task(record, ("slow",))
        store.put(quick, lease=True)
        store.put(slow, lease=True)
        store.complete(quick)
        (journal,) = journals(db)
        mark = {"done": quick.id, "owner": store.owner}
        assert json.loads(journal.read_bytes().splitlines()[-1]) == mark
        assert rows(db) == []
        assert reader.counts().leased == 1  # the copy: `slow` only
        assert rows(db) == [(slow.id, store.owner)]
        store.complete(slow)  # its line was copied (by another store): the mark deletes it
        assert rows(db) == [(slow.id, store.owner)]
        assert reader.counts() == type(reader.counts())(0, 0, 0, 0)
        assert rows(db) == []
    finally:
        store.close()
        reader.close()


def test_marks_of_a_killed_process_are_honoured(tmp_path: Path) -> None:
    # Killed after completing two of its three tasks: the next process gets only the third.
    db = tmp_path / "q.db"
    ids = killed_producer(
        db,
        """
tasks = [Task(record, (i,)) for i in range(3)]
for task in tasks:
    store.put(task, lease=True)
    print(task.id, flush=True)
store.complete(tasks[0])
store.complete(tasks[2])
""",
    )
    store = SQLiteStore(db)
    try:
        assert [t.id for t in store.claim(10)] == [ids[1]]  # its lease taken back at once
    finally:
        store.close()


def test_a_task_released_then_completed_is_deleted(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    store = SQLiteStore(db)
    try:
        task = Task(record, ("retried",))
        store.put(task, lease=True)
        store.release(task, due=0.0)  # a retry: settled in the database from now on
        (again,) = store.claim(1)
        store.complete(again)
        assert rows(db) == []
        assert store.counts() == type(store.counts())(0, 0, 0, 0)
    finally:
        store.close()


def test_a_mark_goes_to_the_file_of_its_task_even_when_that_file_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The put line takes the file past _JOURNAL_ROTATE and its mark comes next: the mark
    # must follow the line in the same file (in another, it could be copied first, delete
    # nothing, and the line after it would bring the completed task back).
    monkeypatch.setattr(sqlite_journal, "_JOURNAL_ROTATE", 100)
    clock = FakeClock()
    db = tmp_path / "q.db"
    store = SQLiteStore(db, lease_timeout=10, clock=clock)
    try:
        task = Task(record, ("done once",))
        store.put(task, lease=True)
        store.complete(task)  # delivered
        files = journals(db)
        assert len(files) == 1, [f.read_bytes() for f in files]
        store.complete(Task(record, ("other",)))  # any copy of this process's own lines
        clock.advance(11)  # a lease it might have had, held by nobody now, lapses
        assert task.id not in [t.id for t in store.claim(10)], "a completed task came back"
    finally:
        store.close()


def test_a_stale_mark_does_not_delete_a_replayed_task(tmp_path: Path) -> None:
    # A runs T past its lease; B claims T, buries it; A then succeeds (a mark, not yet
    # copied); the operator replays T. The mark deletes only a row A still holds.
    clock = FakeClock()
    db = tmp_path / "q.db"
    a = SQLiteStore(db, lease_timeout=10, clock=clock)
    b = SQLiteStore(db, lease_timeout=10, clock=clock)
    try:
        task = Task(record, ("slow",))
        a.put(task, lease=True)
        assert b.counts().leased == 1  # B copies A's line
        clock.advance(11)  # A's lease lapses (a renew that failed, a paused VM)
        (taken,) = b.claim(1)
        letter = DeadLetter(
            id="dl-1",
            task_id=taken.id,
            description="record",
            key=None,
            attempts=1,
            error="boom",
            status=None,
            reason="permanent",
            first_attempt_at=None,
            last_attempt_at=None,
        )
        b.bury(taken, letter)
        a.complete(task)  # A's attempt succeeded: a mark in A's journal, not yet copied
        b.replay("dl-1")  # the operator asks for it again
        counts = b.counts()  # copies A's mark
        assert counts.ready == 1, "the replayed task was deleted by an earlier done mark"
    finally:
        a.close()
        b.close()


def test_renewing_a_task_settled_meanwhile_is_no_lost_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The lease keeper renews what it held a moment ago; a task that completed meanwhile is
    # simply gone, not a lease lost (only one taken back by another process is).
    clock = FakeClock()
    db = tmp_path / "q.db"
    a = SQLiteStore(db, lease_timeout=10, clock=clock)
    b = SQLiteStore(db, lease_timeout=10, clock=clock)
    try:
        done, slow = Task(record, ("done",)), Task(record, ("slow",))
        a.put(done, lease=True)
        a.put(slow, lease=True)
        a.complete(done)
        with caplog.at_level(logging.WARNING, logger="offload"):
            a.renew([done, slow])
        assert "were lost" not in caplog.text
        clock.advance(11)
        assert [t.id for t in b.claim(10)] == [slow.id]  # taken back after expiry
        with caplog.at_level(logging.WARNING, logger="offload"):
            a.renew([slow])
        assert "1 lease(s) were lost before renewal" in caplog.text
    finally:
        a.close()
        b.close()
