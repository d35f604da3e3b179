"""The PostgreSQL store's dedup keys where another session is involved: a key an open
transaction took, a key whose task row went without it, and a role that may only read.

The session's throwaway server (conftest.py), a schema of its own per test; the dedup
contract shared with SQLite is in test_store_contract.py.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from offload import DeadLetter, StoreError, Task
from offload.records import new_id
from offload.stores import StoreCounts
from offload.stores.postgres import PostgresStore, parse_postgres_url
from offload.testing import FakeClock
from pgserver import PASSWORD, assert_waits_for_a_lock


def record(value: Any) -> None:
    """A module-level function a worker can import."""


def keyed(value: str) -> Task:
    return Task(record, (value,), dedup_key="crm-sync:7")


@pytest.fixture
def stores(postgres_url: str) -> Iterator[list[PostgresStore]]:
    """Stores opened by a test, closed after it."""
    opened: list[PostgresStore] = []
    yield opened
    for store in opened:
        store.close()


def open_store(stores: list[PostgresStore], url: str, **options: Any) -> PostgresStore:
    store = PostgresStore(url, **options)
    stores.append(store)
    return store


class Tries:
    """Counts the store's enqueue transactions (each takes its lock once): a second one
    means the first waited at the key's index, gave up, and let the lock go."""

    def __init__(self, store: PostgresStore) -> None:
        self.count = 0
        self.again = threading.Event()
        use = store._use

        @contextlib.contextmanager
        def counting(what: str) -> Iterator[Any]:
            if what == "enqueue":
                self.count += 1
                if self.count >= 2:
                    self.again.set()
            with use(what) as cur:
                yield cur

        store._use = counting  # type: ignore[method-assign]


def enqueue_in_thread(store: PostgresStore, task: Task) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []

    def run() -> None:
        try:
            got.append(store.put(task, lease=False))
        except BaseException as exc:
            got.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, got


def counts_in_time(store: PostgresStore) -> StoreCounts:
    """The store's counts, read from another thread: it must get the store's lock."""
    got: list[StoreCounts] = []
    reader = threading.Thread(target=lambda: got.append(store.counts()))
    reader.start()
    reader.join(10)
    assert got, "counts() waited for the store's lock: the keyed enqueue holds it"
    return got[0]


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_key_an_open_transaction_took_is_waited_for_without_holding_the_store(
    postgres: Any, postgres_url: str, stores: list[PostgresStore], end: str
) -> None:
    store = open_store(stores, postgres_url)
    tries = Tries(store)
    with psycopg.connect(postgres.url()) as app:
        first = keyed("in the transaction")
        assert store.put_in(store.join(app), first) is first  # open: not committed
        second = keyed("outside")
        thread, got = enqueue_in_thread(store, second)
        assert tries.again.wait(10)  # it waited a moment, let go of the lock, tries again
        assert thread.is_alive()
        # Meanwhile the store's other work (renewals, claims, counts) goes on.
        assert counts_in_time(store) == StoreCounts(0, 0, 0, 0)
        getattr(app, end)()
        thread.join(10)
    assert not thread.is_alive()
    (kept,) = got
    if end == "commit":  # the transaction's task holds the key: handed back
        assert kept is not second and kept.id == first.id
        assert store.counts().ready == 1
    else:  # rolled back: the key was free, and the enqueue took it
        assert kept is second
        assert store.counts().ready == 1


def test_a_key_held_open_past_a_lease_timeout_is_a_store_error(
    postgres: Any, postgres_url: str, stores: list[PostgresStore]
) -> None:
    store = open_store(stores, postgres_url, lease_timeout=0.5)
    with psycopg.connect(postgres.url()) as app:
        store.put_in(store.join(app), keyed("in the transaction"))
        thread, got = enqueue_in_thread(store, keyed("outside"))
        thread.join(30)
        assert not thread.is_alive(), "the enqueue waits for the transaction without end"
        app.rollback()
    (error,) = got
    assert isinstance(error, StoreError)
    message = str(error)
    assert "dedup key 'crm-sync:7' is held by a transaction not yet committed" in message
    assert store.url in message and PASSWORD not in message
    assert store.put(keyed("later"), lease=False).args == ("later",)  # free now


def test_a_key_whose_task_row_is_gone_is_free(
    postgres: Any, postgres_url: str, stores: list[PostgresStore]
) -> None:
    """A process of an older format settles a task by deleting its row only (it knows no
    `dedup` table): the key it leaves behind must not hold every later enqueue off."""
    store = open_store(stores, postgres_url)
    old = keyed("old")
    store.put(old, lease=False)
    schema = parse_postgres_url(postgres_url).schema
    with psycopg.connect(postgres.url(), autocommit=True) as raw:
        raw.execute(f'DELETE FROM "{schema}".tasks WHERE id = %s', (old.id,))
        (left,) = raw.execute(f'SELECT task_id FROM "{schema}".dedup').fetchall()
        assert left == (old.id,)  # the orphaned key
    new = keyed("new")
    assert store.put(new, lease=False) is new
    assert store.put(keyed("again"), lease=False).id == new.id  # held by the new one


def test_a_role_that_may_only_read_counts_a_lapsed_lease(
    postgres: Any, postgres_url: str, stores: list[PostgresStore]
) -> None:
    """A console's role may SELECT only: counts() still counts a lease that lapsed (as
    ready), and leaves taking it back to a worker's next claim."""
    clock = FakeClock()
    writer = open_store(stores, postgres_url, lease_timeout=10, clock=clock)
    writer.put(Task(record, ("leased",)), lease=True)
    schema = parse_postgres_url(postgres_url).schema
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.url(), autocommit=True) as raw:
        raw.execute(f"CREATE ROLE {role} LOGIN")
        raw.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
        raw.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
    try:
        url = postgres.url(user=role, query=f"schema={schema}")
        reader = open_store(stores, url, clock=clock)
        clock.advance(11)
        assert reader.counts() == StoreCounts(ready=1, delayed=0, leased=0, dead_letters=0)
        assert writer.counts().leased == 0  # a role that may write takes it back
    finally:
        for store in stores:
            store.close()
        with psycopg.connect(postgres.url(), autocommit=True) as raw:
            raw.execute(f"DROP OWNED BY {role}")
            raw.execute(f"DROP ROLE {role}")


class StopBeforeFreeing:
    """A cursor or connection that stops before the statement deleting a key it found free
    (its window passed), until `go`: where another session's change of that key falls."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.reached = threading.Event()
        self.go = threading.Event()

    def execute(self, query: str, params: Any = None) -> Any:
        if "DELETE FROM" in query and ".dedup d" in query and not self.reached.is_set():
            self.reached.set()
            assert self.go.wait(10)
        return self._inner.execute(query, params)

    def cursor(self, *args: Any, **kwargs: Any) -> StopBeforeFreeing:
        """A cursor of the connection (put_in writes through one), stopping as it does."""
        wrapped = StopBeforeFreeing(self._inner.cursor(*args, **kwargs))
        wrapped.reached, wrapped.go = self.reached, self.go
        return wrapped

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def a_key_whose_window_passed(
    stores: list[PostgresStore], url: str, clock: FakeClock
) -> tuple[PostgresStore, str, Task]:
    """An operator's store, the dead letter of a task whose key's window has passed (not
    yet swept), and that task."""
    operator = open_store(stores, url, clock=clock)
    task = Task(record, ("first",), dedup_key="crm-sync:7", dedup_window=5.0)
    operator.put(task, lease=True)
    letter = DeadLetter(
        id=new_id(), task_id=task.id, description="tests.record", key=None, attempts=1,
        error="HTTP 503", status=503, reason="exhausted", first_attempt_at=None,
        last_attempt_at=None,
    )  # fmt: skip
    operator.bury(task, letter)
    clock.advance(6)
    return operator, letter.id, task


@contextlib.contextmanager
def replay_uncommitted(operator: PostgresStore, letter_id: str) -> Iterator[None]:
    """The operator's replay of `letter_id`, made in a transaction that commits when the
    block ends (the statement's own, held open)."""
    with operator._use("test") as cur:
        cur.execute("BEGIN")
    try:
        operator.replay(letter_id)
        yield
    finally:
        with operator._use("test") as cur:
            cur.execute("COMMIT")


def test_a_key_freed_while_another_transaction_retakes_it_does_not_hold_the_store(
    postgres: Any, postgres_url: str, stores: list[PostgresStore]
) -> None:
    """An enqueue that found the key free (its window passed) deletes it; if a replay
    retakes it meanwhile in a transaction still open, that delete waits for it: not with
    the store's lock held. Once the replay commits, its task holds the key."""
    clock = FakeClock()
    operator, letter_id, first = a_key_whose_window_passed(stores, postgres_url, clock)
    store = open_store(stores, postgres_url, clock=clock)
    store.counts()  # connected
    stop = store._cur = StopBeforeFreeing(store._cur)
    thread, got = enqueue_in_thread(store, keyed("outside"))
    assert stop.reached.wait(10)
    with replay_uncommitted(operator, letter_id):
        stop.go.set()
        assert counts_in_time(store).ready == 0  # the replay is not committed yet
    thread.join(10)
    (kept,) = got
    assert isinstance(kept, Task) and kept.id == first.id  # the replayed task's key


def test_a_key_freed_in_the_applications_transaction_is_not_taken_from_a_replay(
    postgres: Any, postgres_url: str, stores: list[PostgresStore]
) -> None:
    """The delete of a key found free waits, in the application's transaction, for a
    replay that retakes it; once that commits, the key is the replayed task's: the
    delete must not judge the new row by what it saw before (its task row not yet there),
    or both tasks would live with one key."""
    clock = FakeClock()
    operator, letter_id, first = a_key_whose_window_passed(stores, postgres_url, clock)
    store = open_store(stores, postgres_url, clock=clock)
    with psycopg.connect(postgres.url()) as app:
        stop = StopBeforeFreeing(store.join(app))
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(store.put_in(stop, keyed("in"))))
        thread.start()
        assert stop.reached.wait(10)
        with replay_uncommitted(operator, letter_id):
            stop.go.set()
            assert_waits_for_a_lock(postgres, "DELETE FROM %.dedup d")  # for the replay's commit
        thread.join(10)
        (kept,) = got
        app.commit()
    assert kept.id == first.id  # held by the replayed task: nothing written
    assert store.counts().ready == 1


def test_the_sweep_passes_a_key_an_open_transaction_is_taking(
    postgres: Any, postgres_url: str, stores: list[PostgresStore]
) -> None:
    """An application's transaction that takes a key whose window passed deletes its row
    first; the sweep of a claim must not wait for that transaction, with the store's lock
    held (renewals wait for it), but leave the row to it."""
    clock = FakeClock()
    _, _, _ = a_key_whose_window_passed(stores, postgres_url, clock)
    store = open_store(stores, postgres_url, clock=clock)
    with psycopg.connect(postgres.url()) as app:
        taken = keyed("in the transaction")
        assert store.put_in(store.join(app), taken) is taken  # open: not committed
        claimed: list[Any] = []
        claimer = threading.Thread(target=lambda: claimed.append(store.claim(5)))
        claimer.start()
        claimer.join(10)
        alive = claimer.is_alive()
        app.commit()
        claimer.join(10)
    assert not alive, "the sweep waited for the application's transaction"
    assert claimed == [[]] and store.put(keyed("later"), lease=False).id == taken.id


def test_an_application_connection_of_dict_rows_gets_the_holder_of_a_key(
    postgres: Any, stores: list[PostgresStore], postgres_url: str
) -> None:
    """The application's connection may make rows of its own kind (psycopg's dict_row, a
    common choice): the key's holder is read all the same, not the names of its columns."""
    from psycopg.rows import dict_row

    store = open_store(stores, postgres_url)
    with psycopg.connect(postgres.url(), row_factory=dict_row) as app:
        first = keyed("first")
        assert store.put_in(store.join(app), first) is first
        held = store.put_in(store.join(app), keyed("second"))
        assert (held.id, held.idempotency_key) == (first.id, first.idempotency_key)
        app.commit()
    assert [task.args for task in store.claim(10)] == [("first",)]
