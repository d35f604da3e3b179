"""The PostgreSQL store on a real server: the session's throwaway one (conftest.py), a schema
of its own per test.

Multi-process, kill -9, wake-up and transaction tests with real workers are in
tests/system/test_postgres_e2e.py; the contract shared with the other stores is in
test_store_contract.py.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from textwrap import dedent
from typing import Any

import psycopg
import pytest

import offload
from offload import DeadLetter, NotSerializable, StoreError, Task, UnknownDeadLetter
from offload._redact import redact_dsn
from offload.records import new_id
from offload.stores import StoreCounts, open_store
from offload.stores._shared import page_of
from offload.stores.base import LetterQuery
from offload.stores.postgres import PostgresStore, parse_postgres_url
from offload.testing import FakeClock
from pgserver import PASSWORD, PASSWORD_USER, PgServer, assert_waits_for_a_lock
from procs import python_env, reap, run_python

HERE = os.path.dirname(os.path.abspath(__file__))


def record(value: Any) -> None:
    """A module-level function a worker can import."""


MakeStore = Callable[..., PostgresStore]


@pytest.fixture
def make_store(postgres_url: str) -> Iterator[MakeStore]:
    """Open PostgresStores on this test's schema (extra URL options appended)."""
    opened: list[PostgresStore] = []

    def make(options: str = "", **kwargs: Any) -> PostgresStore:
        store = PostgresStore.from_url(postgres_url + options, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def schema_of(url: str) -> str:
    return parse_postgres_url(url).schema


@contextlib.contextmanager
def raw(postgres: Any) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection, to look behind the store's back."""
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        yield conn


def letter_for(task: Task, **fields: Any) -> DeadLetter:
    when = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    values: dict[str, Any] = {
        "id": new_id(),
        "task_id": task.id,
        "description": "tests.record",
        "key": task.key,
        "attempts": 3,
        "error": "HTTP 503 Service Unavailable",
        "status": 503,
        "reason": "exhausted",
        "first_attempt_at": when,
        "last_attempt_at": when + timedelta(seconds=5),
    }
    values.update(fields)
    return DeadLetter(**values)


# -- the URL ------------------------------------------------------------------------------


def test_the_url_options_and_libpq_parameters() -> None:
    url = (
        "postgresql://app:s3cret@db.example:6543/shop?schema=jobs&lease_timeout=12.5"
        "&create=false&sslmode=disable&application_name=web"
    )
    parsed = parse_postgres_url(url)
    assert (parsed.schema, parsed.lease_timeout, parsed.create) == ("jobs", 12.5, False)
    assert parsed.password == "s3cret"
    assert "s3cret" not in parsed.shown and "app:***@db.example:6543/shop" in parsed.shown
    assert "schema=" not in parsed.conninfo and "sslmode=disable" in parsed.conninfo
    assert "connect_timeout=10" in parsed.conninfo  # an enqueue never waits forever
    # A connection that dies silently is noticed: TCP keepalives and a user timeout.
    for option in ("keepalives=1", "keepalives_idle=30", "tcp_user_timeout=30000"):
        assert option in parsed.conninfo
    mine = parse_postgres_url("postgresql://app@db/shop?keepalives_idle=5&tcp_user_timeout=0")
    assert "keepalives_idle=5" in mine.conninfo and "keepalives_idle=30" not in mine.conninfo
    assert "tcp_user_timeout=0" in mine.conninfo and "tcp_user_timeout=30000" not in mine.conninfo
    assert "s3cret" not in repr(parsed)
    store = PostgresStore(url)  # nothing is connected yet
    assert store.lease_timeout == 12.5 and store.schema == "jobs"
    assert "s3cret" not in repr(store) and "s3cret" not in store.url
    assert isinstance(open_store("postgres://app@db.example/shop"), PostgresStore)


def test_a_url_of_the_local_socket_opens_the_store(postgres: Any) -> None:
    """`postgresql:///db` (no host: libpq's unix socket, the usual form on the database's
    own machine) is a URL libpq takes: the store opens it, and shows it as given."""
    schema = f"sock{uuid.uuid4().hex[:12]}"
    url = (
        f"postgresql:///postgres?host={postgres.directory}&port={postgres.port}"
        f"&user=postgres&schema={schema}"
    )
    store = PostgresStore(url)
    try:
        assert store.url.startswith("postgresql:///postgres?")
        store.put(Task(record, (1,)), lease=False)
        assert [task.args for task in store.claim(10)] == [(1,)]
    finally:
        store.close()
        with raw(postgres) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u@h/db?schema=no-dashes", "schema= must be a plain identifier"),
        ("postgresql://u@h/db?lease_timeout=0", "lease_timeout= must be a number > 0"),
        ("postgresql://u@h/db?create=perhaps", "create= must be true or false"),
        ("postgresql://u@h/db?schema=a&schema=b", "gives schema twice"),
        ("postgresql://u:pw0rd@h/db?bogus=1", 'invalid URI query parameter: "bogus"'),
        ("postgresql://u@h/db#frag", "takes none"),
        # libpq takes `#` and `?` in a password; a URL parser ends the host there.
        ("postgresql://u:pa#pw0rd@h/db", "must be percent-encoded"),
        ("postgresql://u:pa?pw0rd@h/db", "must be percent-encoded"),
    ],
)
def test_bad_urls_name_the_problem_and_never_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        PostgresStore(url)
    assert "pw0rd" not in str(info.value)
    assert "pw0rd" not in redact_dsn(url)


def test_a_password_with_a_slash_is_never_shown() -> None:
    store = PostgresStore("postgresql://u:pa/pw0rd@h/db")  # nothing is connected yet
    assert "pw0rd" not in store.url and "pw0rd" not in repr(store)


def test_the_password_may_come_from_the_environment(
    postgres: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres.url(PASSWORD_USER, user=PASSWORD_USER, query="schema=from_env")
    without = PostgresStore(url)
    with pytest.raises(StoreError, match="password") as info:
        without.counts()
    assert PASSWORD not in str(info.value)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    store = PostgresStore(url)
    try:
        assert store.counts().ready == 0
    finally:
        store.close()


def test_an_unreachable_server_is_one_store_error(postgres: Any) -> None:
    store = PostgresStore(f"postgresql://u:hidden99@127.0.0.1:{postgres.port + 1}/x")
    with pytest.raises(StoreError, match="cannot connect") as info:
        store.put(Task(record, (1,)), lease=False)
    assert "hidden99" not in str(info.value)


# -- the tables ---------------------------------------------------------------------------


def test_tables_are_made_once_by_processes_opening_at_once(make_store: MakeStore) -> None:
    """Each enqueues at once too: one with a dedup key writes two tables, which a process
    that ran the DDL again after another made them would deadlock with."""
    stores = [make_store() for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))
    held: list[str] = []

    def open_one(store: PostgresStore) -> None:
        start.wait()
        try:
            store.counts()
            held.append(store.put(Task(record, (1,), dedup_key="first"), lease=False).id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(held) == len(stores) and len(set(held)) == 1


def back_to_format_2(postgres: Any, postgres_url: str) -> str:
    """The store's tables as an older offload made them (format 2); returns the schema."""
    schema = schema_of(postgres_url)
    with raw(postgres) as conn:
        conn.execute(f'DROP TABLE "{schema}".dedup')
        for table in ("tasks", "dead_letters"):
            conn.execute(
                f'ALTER TABLE "{schema}".{table} DROP COLUMN dedup_key, DROP COLUMN dedup_window'
            )
        conn.execute(f"UPDATE \"{schema}\".meta SET value = '2' WHERE name = 'version'")
    return schema


def test_a_format_2_store_is_upgraded_to_hold_dedup_keys(
    make_store: MakeStore, postgres: Any, postgres_url: str
) -> None:
    old = Task(record, ("before",))
    make_store().put(old, lease=False)
    schema = back_to_format_2(postgres, postgres_url)
    store = make_store()
    (task,) = store.claim(5)
    assert task.id == old.id and task.dedup_key is None
    keyed = Task(record, ("after",), dedup_key="k")
    assert store.put(keyed, lease=False) is keyed
    assert store.put(Task(record, ("again",), dedup_key="k"), lease=False).id == keyed.id
    with raw(postgres) as conn:
        version = conn.execute(f'SELECT value FROM "{schema}".meta').fetchone()
        assert version == ("4",)


def test_an_upgrade_waiting_for_an_open_transaction_lets_the_others_through(
    make_store: MakeStore, postgres: Any, postgres_url: str
) -> None:
    """An older process's transaction holds the tasks table while a new process opens the
    store: its ALTER TABLE waits, but in short tries, so that the older processes' own
    statements on the table are not held behind it (before, every one waited until that
    transaction ended). Once it ends, the upgrade is made."""
    make_store().counts()
    schema = back_to_format_2(postgres, postgres_url)
    opened: list[BaseException | None] = []
    with psycopg.connect(postgres.url()) as holder:
        holder.execute(f'SELECT count(*) FROM "{schema}".tasks')  # its transaction stays open
        upgrading = threading.Thread(
            target=lambda: opened.append(_error_of(make_store().counts)), daemon=True
        )
        upgrading.start()
        assert_waits_for_a_lock(postgres, "ALTER TABLE")
        with psycopg.connect(postgres.url(), autocommit=True) as older:
            older.execute("SET statement_timeout = '10s'")
            assert older.execute(f'SELECT count(*) FROM "{schema}".tasks').fetchone() == (0,)
        holder.rollback()
    upgrading.join(30)
    assert opened == [None]
    with raw(postgres) as conn:
        assert conn.execute(f'SELECT value FROM "{schema}".meta').fetchone() == ("4",)


def test_an_upgrade_held_off_past_its_patience_fails_the_opening_and_changes_nothing(
    make_store: MakeStore, postgres: Any, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.stores.postgres import schema as schema_module

    monkeypatch.setattr(schema_module, "_UPGRADE_PATIENCE", 0.5)
    make_store().counts()
    schema = back_to_format_2(postgres, postgres_url)
    with psycopg.connect(postgres.url()) as holder:
        holder.execute(f'SELECT count(*) FROM "{schema}".tasks')
        with pytest.raises(StoreError, match="an open transaction held them"):
            make_store().counts()
        holder.rollback()
    with raw(postgres) as conn:
        assert conn.execute(f'SELECT value FROM "{schema}".meta').fetchone() == ("2",)
    make_store().counts()  # once it ended, the next opening upgrades


def test_a_role_that_may_not_upgrade_an_older_store_is_told_who_may(
    make_store: MakeStore, postgres: Any, postgres_url: str
) -> None:
    make_store().counts()
    schema = back_to_format_2(postgres, postgres_url)
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with raw(postgres) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
    reader = PostgresStore(postgres.url(user=role, query=f"schema={schema}"))
    try:
        with pytest.raises(StoreError, match="at format 2, and this role may not take"):
            reader.counts()
        make_store().counts()  # its owner upgrades it; then the reader reads it
        assert reader.counts().ready == 0
    finally:
        reader.close()
        with raw(postgres) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def _error_of(action: Callable[[], Any]) -> BaseException | None:
    try:
        action()
    except BaseException as exc:
        return exc
    return None


def test_create_false_refuses_a_database_without_the_tables(make_store: MakeStore) -> None:
    store = make_store("&create=false")
    assert not store.exists()
    with pytest.raises(StoreError, match="no offload tables"):
        store.put(Task(record, (1,)), lease=False)
    make_store().counts()  # create=true (the default) makes them
    assert store.exists()
    assert store.counts().ready == 0


def test_a_store_written_by_a_newer_offload_is_refused(
    make_store: MakeStore, postgres: Any, postgres_url: str
) -> None:
    make_store().counts()
    with raw(postgres) as conn:
        conn.execute(f"UPDATE \"{schema_of(postgres_url)}\".meta SET value = '99'")
    with pytest.raises(StoreError, match="newer offload"):
        make_store().counts()


def test_no_pickle_in_any_table(
    make_store: MakeStore, postgres: Any, postgres_url: str, make_offloader: Any
) -> None:
    off = make_offloader(store=make_store(), consume=False)
    off.enqueue_task(offload.http("POST", "http://127.0.0.1:9/x", json={"a": [1, 2]}))
    off.enqueue_task(Task(record, ({"nested": True},), key="k"))
    worker = make_store()
    (task, _) = worker.claim(2)
    worker.bury(task, letter_for(task))
    schema = schema_of(postgres_url)
    with raw(postgres) as conn:
        kinds = conn.execute(
            "SELECT DISTINCT data_type FROM information_schema.columns WHERE table_schema = %s",
            (schema,),
        ).fetchall()
        assert {kind for (kind,) in kinds} <= {"text", "bigint", "integer", "double precision"}
        texts = conn.execute(
            f'SELECT call FROM "{schema}".tasks UNION ALL SELECT call FROM "{schema}".dead_letters'
        ).fetchall()
    assert len(texts) == 2
    for (text,) in texts:
        assert text.startswith('{"offload":1,') and "pickle" not in text


# -- leases -------------------------------------------------------------------------------


def test_an_expired_lease_is_taken_back(make_store: MakeStore) -> None:
    clock = FakeClock()
    first, second = make_store(lease_timeout=10, clock=clock), make_store(clock=clock)
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


def test_leases_of_a_dead_process_are_taken_back_at_once(postgres_url: str) -> None:
    code = f"""
        import os, sys
        sys.path[:0] = [{HERE!r}]
        from offload import Task
        from offload.stores.postgres import PostgresStore
        import test_postgres
        store = PostgresStore({postgres_url!r}, lease_timeout=3600)
        for i in range(3):
            store.put(Task(test_postgres.record, (i,)), lease=True)
        os._exit(0)  # gone without releasing anything
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    store = PostgresStore(postgres_url, lease_timeout=3600)
    try:
        # No process performs them: they count as ready, for the next claim.
        assert store.counts() == StoreCounts(ready=3, delayed=0, leased=0, dead_letters=0)
        taken = store.claim(10)
        assert sorted(t.args[0] for t in taken) == [0, 1, 2]
    finally:
        store.close()


def _unshare_works() -> bool:
    """Whether this machine lets us run a process in a PID namespace of its own."""
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
    )
    return done.returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PID namespaces are Linux's")
def test_a_live_lease_of_a_container_with_the_same_host_name_is_not_taken_back(
    postgres_url: str,
) -> None:
    """Containers that share a host name (host networking, a compose `hostname:`) number
    their processes each in a PID namespace of its own: a live process of another one,
    whose id is no process here, holds its lease until it expires, as another machine's."""
    if not _unshare_works():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("a PID namespace is needed under CI and unshare cannot make one")
        pytest.skip("cannot make a PID namespace here (unshare)")
    # A process id free here, which the container's process will have (ids are handed
    # out in order in a new namespace: 1 is the first process, then 2, 3, ...).
    pid = next(p for p in range(3, 1000) if not os.path.exists(f"/proc/{p}"))
    code = f"""
        import os, sys
        sys.path[:0] = [{HERE!r}]
        while True:  # fork until this namespace hands out the id that is free outside it
            child = os.fork()
            if child == 0:
                if os.getpid() == {pid}:
                    break
                os._exit(0)
            os.waitpid(child, 0)
            if child >= {pid}:
                sys.exit(1)
        from offload import Task
        from offload.stores.postgres import PostgresStore
        import test_postgres
        store = PostgresStore({postgres_url!r}, lease_timeout=3600)
        store.put(Task(test_postgres.record, ("held",)), lease=True)
        print(store.owner, flush=True)
        sys.stdin.read()  # holds its lease until the test ends
        os._exit(0)
    """
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    store = PostgresStore(postgres_url, lease_timeout=3600)
    try:
        assert proc.stdout is not None
        owner = proc.stdout.readline().strip()
        assert owner, proc.stderr.read()
        assert owner.split(":")[1] == str(pid), owner
        assert store.claim(10) == []  # its lease runs: not taken back
        assert store.counts().leased == 1
    finally:
        store.close()
        reap(proc)


runs: list[Any] = []


def record_then_fail(value: Any) -> None:
    runs.append(value)
    raise ValueError(f"cannot handle {value!r}")


class BuryFailsOnce(PostgresStore):
    """The real store, whose first `bury` raises StoreError (a connection cut, say)."""

    failed = False

    def bury(self, task: Task, letter: DeadLetter) -> None:
        if not self.failed:
            self.failed = True
            raise StoreError(f"{self.url}: storing a dead letter failed: injected")
        super().bury(task, letter)


def test_a_dead_letter_the_store_could_not_keep_runs_again_before_flush_returns(
    postgres_url: str, make_offloader: Any
) -> None:
    runs.clear()
    store = BuryFailsOnce(postgres_url, lease_timeout=0.5)
    off = make_offloader(store=store, idle_timeout=0.05)
    off.enqueue_task(record_then_fail, 7)
    assert off.flush(30)
    assert store.failed and runs == [7, 7]
    assert [d.reason for d in off.dead_letters()] == ["permanent"]
    assert store.counts() == StoreCounts(ready=0, delayed=0, leased=0, dead_letters=1)
    assert off.shutdown(5)


def test_a_role_that_may_only_read_answers_next_due_and_health(
    make_store: MakeStore, postgres: Any, postgres_url: str
) -> None:
    """`offload health` and a console run with a role that may only SELECT: next_due()
    answers (the sweep of leases and dedup keys is left to the workers), so the store is
    not reported unreachable."""
    from offload.health_check import store_health

    clock = FakeClock()
    writer = make_store(lease_timeout=10, clock=clock)
    writer.put(Task(record, ("waiting",)), lease=False)
    writer.put(Task(record, ("leased",)), lease=True)
    schema = parse_postgres_url(postgres_url).schema
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with raw(postgres) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
    reader = PostgresStore(postgres.url(user=role, query=f"schema={schema}"), clock=clock)
    try:
        clock.advance(11)  # the lease lapsed: a sweep would take it back
        assert reader.next_due() == pytest.approx(clock.time() - 11)
        health = store_health(reader, clock.time())
        assert health.store_ok and health.problems == (), health.problems
    finally:
        reader.close()
        with raw(postgres) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_a_lost_lease_is_reported_at_renewal(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    first, second = make_store(lease_timeout=10, clock=clock), make_store(clock=clock)
    task = Task(record, (1,))
    first.put(task, lease=True)
    clock.advance(11)
    assert [t.id for t in second.claim(5)] == [task.id]
    first.renew([task])
    assert "1 lease(s) were lost" in caplog.text


def test_claims_of_many_threads_never_share_a_task(make_store: MakeStore) -> None:
    producer = make_store()
    for i in range(200):
        producer.put(Task(record, (i,)), lease=False)
    claimers = [make_store() for _ in range(4)]
    got: list[list[Task]] = [[] for _ in claimers]

    def drain(index: int) -> None:
        while batch := claimers[index].claim(7):
            got[index] += batch

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(claimers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    ids = [t.id for batch in got for t in batch]
    assert len(ids) == 200 and len(set(ids)) == 200


def test_a_connection_the_server_ended_is_replaced_before_the_next_enqueue(
    make_store: MakeStore, postgres: Any
) -> None:
    """A connection the server ended while it was idle (a restart, a failover,
    pg_terminate_backend, idle_session_timeout) is found gone before the next statement
    is sent: that enqueue goes through a new connection instead of failing."""
    store = make_store()
    store.put(Task(record, (1,)), lease=False)
    backend = store._conn.info.backend_pid
    fd = store._conn.fileno()
    with raw(postgres) as conn:  # (waits for the backend to exit)
        conn.execute("SELECT pg_terminate_backend(%s, 5000)", (backend,))
    select.select([fd], [], [], 5)  # its hang-up has reached this end
    store.put(Task(record, (2,)), lease=False)
    assert store.counts().ready == 2
    assert store._conn.info.backend_pid != backend


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_opens_its_own_connection(postgres_url: str) -> None:
    code = f"""
        import os, sys
        sys.path[:0] = [{HERE!r}]
        from offload import Task
        from offload.stores.postgres import PostgresStore
        import test_postgres
        store = PostgresStore({postgres_url!r})
        store.put(Task(test_postgres.record, ("parent",)), lease=False)
        parent_conn, parent_owner = store._conn, store.owner
        pid = os.fork()
        if pid == 0:
            ok = True
            try:
                store.put(Task(test_postgres.record, ("child",)), lease=False)
                ok = store._conn is not parent_conn and store.owner != parent_owner
            except BaseException:
                ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child could not use the store"
        assert store._conn is parent_conn
        print(sorted(t.args[0] for t in store.claim(10)))  # the parent's session still works
        store.close()
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['child', 'parent']"


def test_not_serializable_is_raised_before_the_database_is_touched(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(NotSerializable):
        store.put(Task(record, ((1, 2),)), lease=False)
    assert store._conn is None  # never connected


# -- wake-ups -----------------------------------------------------------------------------


class Woken:
    """A watcher's wake(): counts calls, and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.calls = 0
        self.cond = threading.Condition()

    def __call__(self) -> None:
        with self.cond:
            self.calls += 1
            self.cond.notify_all()

    def wait_for(self, calls: int, timeout: float = 10) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.calls >= calls, timeout)


def test_a_watcher_is_woken_by_another_process_put(make_store: MakeStore) -> None:
    worker, web = make_store(), make_store()
    woken = Woken()
    stop = worker.watch(woken)
    assert stop is not None
    assert woken.wait_for(1), "no wake-up once listening"
    web.put(Task(record, (1,)), lease=True)  # leased by the web process: nobody to wake
    web.put(Task(record, (2,)), lease=False)
    assert woken.wait_for(2)
    stop()
    web.put(Task(record, (3,)), lease=False)
    assert worker.claim(10)  # the notification has been sent by now
    assert woken.calls == 2


def test_an_enqueue_in_a_transaction_wakes_at_the_commit_only(
    make_store: MakeStore, postgres: Any
) -> None:
    worker = make_store()
    store = make_store()
    woken = Woken()
    worker.watch(woken)
    assert woken.wait_for(1)
    with psycopg.connect(postgres.url()) as app:
        conn = store.join(app)
        store.put_in(conn, Task(record, ("kept",)))
        assert worker.counts().ready == 0  # not visible before the commit
        app.commit()
        assert woken.wait_for(2)
        assert worker.counts().ready == 1
        calls = woken.calls
        store.put_in(conn, Task(record, ("dropped",)))
        app.rollback()
    (only,) = worker.claim(10)
    assert only.args == ("kept",) and woken.calls == calls


def test_the_listener_listens_again_after_its_connection_is_cut(
    make_store: MakeStore, postgres: Any, caplog: pytest.LogCaptureFixture
) -> None:
    worker, web = make_store(), make_store()
    woken = Woken()
    worker.watch(woken)
    assert woken.wait_for(1)
    with raw(postgres) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN %%' AND pid <> pg_backend_pid()"
        )
    assert woken.wait_for(2), "no wake-up after listening again"
    web.put(Task(record, (1,)), lease=False)
    assert woken.wait_for(3)
    assert "lost the connection that listens" in caplog.text


def test_a_schema_of_the_longest_name_puts_and_wakes(postgres: Any) -> None:
    """A schema name of 63 characters (the most the URL takes) leaves no room for the
    channel's prefix: the channel is cut to fit, or every NOTIFY would fail its enqueue."""
    schema = f"s{uuid.uuid4().hex}".ljust(63, "x")
    url = postgres.url(query=f"schema={schema}")
    worker, web = PostgresStore(url), PostgresStore(url)
    try:
        woken = Woken()
        worker.watch(woken)
        assert woken.wait_for(1)
        web.put(Task(record, (1,)), lease=False)
        assert woken.wait_for(2), "the enqueue's NOTIFY was not heard"
        assert len(worker.claim(10)) == 1
    finally:
        worker.close()
        web.close()
        with raw(postgres) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_close_while_the_listener_still_connects_ends_its_thread_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close() while the server does not answer (the listener's connect runs until the
    URL's connect_timeout) must not pull the stop pipe from under the thread: it ends on
    its own, without an exception, once its connect gives up."""
    from offload.stores.postgres import listener

    monkeypatch.setattr(listener, "CLOSE_WAIT", 0.05)
    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        store = PostgresStore(f"postgresql://u@127.0.0.1:{port}/db?connect_timeout=2")
        store.watch(lambda: None)
        assert store._listener is not None
        thread = store._listener._thread
        assert thread is not None
        store.close()
        thread.join(10)
    assert not thread.is_alive()
    assert failures == []


def test_the_listener_listens_on_a_descriptor_past_1024(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A busy process holds more than 1024 descriptors, and the listener's connection gets
    one past select()'s FD_SETSIZE: it listens all the same, on the one connection, rather
    than taking each refusal of select() for a lost connection and connecting again."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        worker, web = make_store(), make_store()
        woken = Woken()
        worker.watch(woken)
        assert woken.wait_for(1)
        web.put(Task(record, (1,)), lease=False)
        assert woken.wait_for(2)
        assert worker._listener is not None and worker._listener._conn is not None
        assert worker._listener._conn.fileno() >= 1024
        assert "lost the connection that listens" not in caplog.text
    finally:
        for fd in held:
            os.close(fd)


def test_sqlite_and_sqs_do_not_watch(tmp_path: Any) -> None:
    from offload.stores.sqlite import SQLiteStore

    assert SQLiteStore(tmp_path / "q.db").watch(lambda: None) is None


# -- the application's connection ---------------------------------------------------------


def test_join_refuses_what_it_cannot_write_through(make_store: MakeStore, postgres: Any) -> None:
    store = make_store()
    with pytest.raises(TypeError, match="psycopg 3 connection"):
        store.join(object())
    other = postgres.create_database(f"other{new_id()[:8]}")
    with psycopg.connect(other) as conn, pytest.raises(ValueError, match="database"):
        store.join(conn)


def test_join_refuses_another_database_when_the_url_names_none(postgres: Any) -> None:
    """A URL without a database is in libpq's default one (the user's name): a connection
    to another database is refused, not joined to abort the application's transaction at
    its first enqueue (or to write into another store)."""
    url = f"postgresql://postgres@127.0.0.1:{postgres.port}?schema=nodb{uuid.uuid4().hex[:12]}"
    store = PostgresStore(url)
    try:
        other = postgres.create_database(f"other{uuid.uuid4().hex[:12]}")
        with psycopg.connect(other) as conn, pytest.raises(ValueError, match="'postgres'"):
            store.join(conn)
        with psycopg.connect(postgres.url()) as conn:  # the default database: the same
            store.put_in(store.join(conn), Task(record, (1,)))
            conn.commit()
        assert store.counts().ready == 1
    finally:
        store.close()
        with raw(postgres) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE')


def test_join_refuses_the_same_database_name_on_another_server(
    make_store: MakeStore, postgres: Any
) -> None:
    """Two servers each have a database `postgres`: a connection to the other one is
    refused (its enqueues would go to a store no worker of this one reads), and one to
    this server under another host name is taken. An application's aborted transaction
    is a StoreError saying so, the transaction left as it was."""
    store = make_store()
    with PgServer.start() as other, psycopg.connect(other.url()) as conn:
        with pytest.raises(ValueError, match="on another server than the store"):
            store.join(conn)
    with psycopg.connect(postgres.url().replace("127.0.0.1", "localhost")) as conn:
        store.put_in(store.join(conn), Task(record, (1,)))
        conn.commit()
    assert store.counts().ready == 1
    with psycopg.connect(postgres.url()) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(StoreError, match="cannot ask the connection") as caught:
            store.join(conn)
        assert PASSWORD not in str(caught.value)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR


def test_joining_leaves_no_transaction_of_its_own_open(
    make_store: MakeStore, postgres: Any
) -> None:
    """`with off.transaction(conn):` and then `with conn.transaction():` (autocommit off):
    the server check made at the join must not begin a transaction, or the application's
    block would be a savepoint in it, and its commit would commit nothing."""
    store = make_store()
    table = f"app_{uuid.uuid4().hex[:8]}"
    with raw(postgres) as conn:
        conn.execute(f"CREATE TABLE {table} (id int)")
    try:
        with psycopg.connect(postgres.url()) as conn:
            driver = store.join(conn)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (1)")
                store.put_in(driver, Task(record, (1,)))
            with raw(postgres) as other:  # committed at the block's end, seen elsewhere
                assert other.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)
            assert store.counts().ready == 1
    finally:
        with raw(postgres) as conn:
            conn.execute(f"DROP TABLE {table}")


def test_an_sqlalchemy_connection_commits_a_block_that_only_enqueued(
    make_store: MakeStore, postgres: Any
) -> None:
    """`engine.connect()`: SQLAlchemy begins its transaction at the first statement it
    runs, and an enqueue's INSERT is not one of its own. A block that only enqueued is
    committed by the connection's commit() (and dropped by its rollback()), instead of
    rolled back unseen when the connection goes back to the pool."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    store = make_store()
    engine = sqlalchemy.create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{postgres.port}/postgres"
    )
    try:
        with engine.connect() as conn:
            store.put_in(store.join(conn), Task(record, ("kept",)))
            conn.commit()
        with engine.connect() as conn:
            store.put_in(store.join(conn), Task(record, ("dropped",)))
            conn.rollback()
    finally:
        engine.dispose()
    (only,) = store.claim(10)
    assert only.args == ("kept",)


def test_the_offloaders_transaction_needs_a_store_that_can_join(make_offloader: Any) -> None:
    off = make_offloader()
    with pytest.raises(TypeError, match="postgresql"):
        off.transaction(object())


# -- dead letters -------------------------------------------------------------------------


def test_pages_are_filtered_and_cut_in_sql_as_page_of_does(make_store: MakeStore) -> None:
    store = make_store()
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i in range(23):
        task = Task(record, (i,), key=f"k{i % 3}")
        store.put(task, lease=True)
        store.bury(
            task,
            letter_for(
                task,
                status=None if i % 4 == 0 else 500 + i % 2,
                reason="permanent" if i % 5 == 0 else "exhausted",
                error=f"Boom {i} <b>",
                last_attempt_at=None if i == 7 else base + timedelta(hours=i),
            ),
        )
    every = list(enumerate(store.dead_letters()))  # numbered from the oldest
    queries = [
        LetterQuery(),
        LetterQuery(key="k1"),
        LetterQuery(status=501),
        LetterQuery(reason="permanent"),
        LetterQuery(since=base + timedelta(hours=10)),
        LetterQuery(text="BOOM 1"),
        LetterQuery(key="k2", status=500, text="<b>"),
        LetterQuery(key="nothing"),
    ]
    for query in queries:
        for limit in (1, 4, 50):
            expected = page_of(every, query, limit, None, str)
            page = store.dead_letter_page(query, limit=limit)
            assert page.total == expected.total, query
            seen = list(page.letters)
            while page.cursor is not None:
                page = store.dead_letter_page(query, limit=limit, cursor=page.cursor)
                seen += page.letters
            everything = page_of(every, query, 1000, None, str).letters
            assert seen == everything, (query, limit)
    with pytest.raises(ValueError, match="cursor"):
        store.dead_letter_page(LetterQuery(), cursor="not-a-cursor")


def test_revive_keeps_an_unreadable_letter(
    make_store: MakeStore, postgres: Any, postgres_url: str
) -> None:
    store = make_store()
    task = Task(record, (1,))
    store.put(task, lease=True)
    letter = letter_for(task)
    store.bury(task, letter)
    with raw(postgres) as conn:
        conn.execute(
            f'UPDATE "{schema_of(postgres_url)}".dead_letters SET call = %s',
            (
                '{"offload":1,"target":{"type":"function","path":"nosuch.mod:fn"},'
                '"args":[],"kwargs":{}}',
            ),
        )
    with pytest.raises(StoreError, match="cannot be revived"):
        store.revive(letter.id)
    assert [dl.id for dl in store.dead_letters()] == [letter.id]
    replayed = store.replay(letter.id)  # replay moves it without loading it
    assert replayed.id == task.id
    with pytest.raises(UnknownDeadLetter):
        store.discard(letter.id)


def test_a_delayed_task_waits_until_due(make_store: MakeStore, postgres: Any) -> None:
    clock = FakeClock()
    web, worker = make_store(clock=clock), make_store(clock=clock)
    woken = Woken()
    worker.watch(woken)
    assert woken.wait_for(1)
    web.put(Task(record, ("later",)), lease=False, due=clock.time() + 60)
    assert woken.wait_for(2)  # told, so that it learns when the task is due
    assert worker.claim(5) == []
    assert worker.counts().delayed == 1 and worker.next_due() == clock.time() + 60
    with psycopg.connect(postgres.url()) as app:
        web.put_in(web.join(app), Task(record, ("in a transaction",)), due=clock.time() + 30)
        app.commit()
    clock.advance(31)
    assert [t.args for t in worker.claim(5)] == [("in a transaction",)]
    clock.advance(30)
    assert [t.args for t in worker.claim(5)] == [("later",)]
