"""One contract for every store: what the Offloader relies on, run against each backend.

Dead letters are every store's business; tasks (put, claim, renew, release, complete,
bury, replay) only a durable store's. Each backend provides ONE fixture, named
`<backend>_stores`, returning a `MakeStore`: a callable that opens a new handle on one
fresh backend per test (two handles stand for two processes sharing it), closed at
teardown. To add a backend, write that fixture and put its name in STORES (and DURABLE
when it holds tasks).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import offload
from offload import DeadLetter, NotSerializable, Task, UnknownDeadLetter
from offload.records import new_id
from offload.stores import DurableStore, MemoryStore, Store
from offload.stores.sqlite import SQLiteStore
from offload.stores.sqs import SqsStore

MakeStore = Callable[[], Any]

STORES = ["memory", "sqlite", "sqs", "postgres"]
DURABLE = ["sqlite", "sqs", "postgres"]


def greet(name: str, *, punctuation: str = "!") -> str:
    """A module-level function another process can import."""
    return f"hello {name}{punctuation}"


# -- the backends -----------------------------------------------------------------------


@pytest.fixture
def memory_stores() -> MakeStore:
    """The memory store lives in one process: every handle is the same store."""
    store = MemoryStore()
    return lambda: store


@pytest.fixture
def sqlite_stores(tmp_path: Any) -> Iterator[MakeStore]:
    """Handles on one SQLite file; each has its own connection and lease owner."""
    opened: list[SQLiteStore] = []

    def make() -> SQLiteStore:
        store = SQLiteStore(tmp_path / "contract.db")
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def sqs_stores(sqs_store_url: str) -> Iterator[MakeStore]:
    """Handles on one pair of SQS queues (moto's server on 127.0.0.1, see conftest.py);
    each holds its own receipt handles, as a worker process does."""
    opened: list[SqsStore] = []

    def make() -> SqsStore:
        store = SqsStore.from_url(sqs_store_url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def postgres_stores(postgres_url: str) -> Iterator[MakeStore]:
    """Handles on one schema of the session's PostgreSQL server (see conftest.py); each has
    its own connection and lease owner, as a process has."""
    from offload.stores.postgres import PostgresStore

    opened: list[PostgresStore] = []

    def make() -> PostgresStore:
        store = PostgresStore.from_url(postgres_url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture(params=STORES)
def stores(request: pytest.FixtureRequest) -> MakeStore:
    make: MakeStore = request.getfixturevalue(f"{request.param}_stores")
    return make


@pytest.fixture
def store(stores: MakeStore) -> Store:
    made: Store = stores()
    return made


@pytest.fixture(params=DURABLE)
def durable_stores(request: pytest.FixtureRequest) -> MakeStore:
    make: MakeStore = request.getfixturevalue(f"{request.param}_stores")
    return make


@pytest.fixture
def durable(durable_stores: MakeStore) -> DurableStore:
    made: DurableStore = durable_stores()
    return made


# -- helpers ----------------------------------------------------------------------------

WHEN = datetime(2026, 3, 4, 5, 6, 7, 123000, tzinfo=timezone.utc)


def make_task(name: str = "ada", key: str | None = None) -> Task:
    return Task(greet, (name,), {"punctuation": "?"}, key=key)


def letter_for(task: Task, reason: str = "exhausted", status: int | None = 503) -> DeadLetter:
    return DeadLetter(
        id=new_id(),
        task_id=task.id,
        description="tests.greet",
        key=task.key,
        attempts=5,
        error="HTTP 503 Service Unavailable",
        status=status,
        reason=reason,
        first_attempt_at=WHEN,
        last_attempt_at=WHEN + timedelta(seconds=42),
    )


def put_leased(store: DurableStore, task: Task) -> Task:
    """Put a task leased to `store`'s process, as a consuming enqueue does."""
    if getattr(store, "leases_on_put", True):
        store.put(task, lease=True)
        return task
    store.put(task, lease=False)
    (claimed,) = store.claim(1)
    return claimed


def claim_all(store: DurableStore, limit: int = 100) -> list[Task]:
    return store.claim(limit)


# -- dead letters: every store ----------------------------------------------------------


def test_a_buried_letter_is_listed_with_every_field(stores: MakeStore) -> None:
    store, other = stores(), stores()
    task = make_task()
    if store.durable:
        task = put_leased(store, task)
    letter = letter_for(task)
    store.bury(task, letter)
    assert other.dead_letters() == [letter]
    assert len(other) == 1
    assert other.dead_letters() == [letter], "listing must not consume dead letters"


def test_dead_letters_come_oldest_first(store: Store) -> None:
    letters = []
    for name in ("a", "b", "c"):
        task = make_task(name)
        if store.durable:
            task = put_leased(store, task)  # type: ignore[arg-type]
        letters.append(letter_for(task))
        store.bury(task, letters[-1])
    assert [x.id for x in store.dead_letters()] == [x.id for x in letters]


def test_revive_removes_the_letter_and_returns_its_task(stores: MakeStore) -> None:
    store, other = stores(), stores()
    task = make_task()
    if store.durable:
        task = put_leased(store, task)
    letter = letter_for(task, reason="permanent", status=None)
    store.bury(task, letter)
    revived = other.revive(letter.id)
    assert (revived.id, revived.idempotency_key, revived.key) == (
        task.id,
        task.idempotency_key,
        task.key,
    )
    assert revived.call is greet
    assert (revived.args, dict(revived.kwargs)) == (("ada",), {"punctuation": "?"})
    assert store.dead_letters() == []
    with pytest.raises(UnknownDeadLetter):
        other.revive(letter.id)


def test_discard_removes_one_letter(stores: MakeStore) -> None:
    store, other = stores(), stores()
    kept, dropped = make_task("kept"), make_task("dropped")
    letters = []
    for made in (kept, dropped):
        task = put_leased(store, made) if store.durable else made
        letters.append(letter_for(task))
        store.bury(task, letters[-1])
    other.discard(letters[1].id)
    assert store.dead_letters() == [letters[0]]


def test_unknown_ids_raise_unknown_dead_letter(store: Store) -> None:
    with pytest.raises(UnknownDeadLetter) as info:
        store.revive("no-such-id")
    assert isinstance(info.value, KeyError)
    assert "no-such-id" in str(info.value)
    with pytest.raises(UnknownDeadLetter):
        store.discard("no-such-id")


# -- tasks: durable stores --------------------------------------------------------------


def test_a_put_task_comes_back_whole(durable_stores: MakeStore) -> None:
    web, worker = durable_stores(), durable_stores()
    http = offload.http("POST", "http://127.0.0.1:9/hook", json={"n": 1}, idempotency_key=True)
    tasks = [make_task(key="crm"), Task(http)]
    for task in tasks:
        web.put(task, lease=False)
    claimed = {t.id: t for t in worker.claim(10)}
    assert set(claimed) == {t.id for t in tasks}
    fn = claimed[tasks[0].id]
    assert (fn.call, fn.args, dict(fn.kwargs), fn.key) == (
        greet,
        ("ada",),
        {"punctuation": "?"},
        "crm",
    )
    assert fn.idempotency_key == tasks[0].idempotency_key
    call = claimed[tasks[1].id]
    assert call.call == http and call.key == http.key()
    assert call.attempts == 0


def test_a_leased_task_is_not_claimed_by_another_process(durable_stores: MakeStore) -> None:
    mine, theirs = durable_stores(), durable_stores()
    put_leased(mine, make_task())
    assert theirs.claim(10) == []
    counts = theirs.counts()
    assert (counts.ready, counts.delayed, counts.leased) == (0, 0, 1)


def test_claim_takes_at_most_limit(durable: DurableStore) -> None:
    tasks = [make_task(str(i)) for i in range(5)]
    for task in tasks:
        durable.put(task, lease=False)
    first = durable.claim(3)
    rest = durable.claim(10)
    assert len(first) == 3 and len(rest) == 2
    assert {t.id for t in first + rest} == {t.id for t in tasks}


def test_claim_skips_excluded_keys(durable: DurableStore) -> None:
    gated, free = make_task("gated", key="slow-api"), make_task("free", key="other-api")
    durable.put(gated, lease=False)
    durable.put(free, lease=False)
    reopen = time.time() + 600
    claimed = durable.claim(10, exclude_keys={"slow-api": reopen})
    assert [t.id for t in claimed] == [free.id]


def test_release_keeps_attempt_state_for_any_process(durable_stores: MakeStore) -> None:
    first, second = durable_stores(), durable_stores()
    task = put_leased(first, make_task())
    task.progress.attempts, task.progress.failures = 3, 2
    task.progress.first_attempt_at, task.progress.last_attempt_at = (
        1_700_000_000.25,
        1_700_000_042.5,
    )
    first.release(task, time.time() - 1)
    (again,) = second.claim(10)
    assert again.id == task.id and again.idempotency_key == task.idempotency_key
    assert (again.progress.attempts, again.progress.failures) == (3, 2)
    assert (again.progress.first_attempt_at, again.progress.last_attempt_at) == (
        1_700_000_000.25,
        1_700_000_042.5,
    )


def test_a_task_released_for_later_waits(durable_stores: MakeStore) -> None:
    first, second = durable_stores(), durable_stores()
    task = put_leased(first, make_task())
    first.release(task, time.time() + 600)
    assert second.claim(10) == []
    counts = second.counts()
    assert (counts.ready, counts.delayed, counts.leased) == (0, 1, 0)
    due = second.next_due()
    assert due is not None and due > time.time()


def test_complete_forgets_the_task(durable_stores: MakeStore) -> None:
    first, second = durable_stores(), durable_stores()
    task = put_leased(first, make_task())
    first.renew([task])
    first.complete(task)
    assert second.claim(10) == []
    assert second.next_due() is None
    assert second.counts() == type(second.counts())(0, 0, 0, 0)


def test_bury_removes_the_task_and_replay_puts_it_back(durable_stores: MakeStore) -> None:
    worker, operator = durable_stores(), durable_stores()
    task = put_leased(worker, make_task())
    task.progress.attempts = 5
    letter = letter_for(task)
    worker.bury(task, letter)
    assert operator.claim(10) == []
    assert operator.dead_letters() == [letter]
    replayed = operator.replay(letter.id)
    assert replayed.id == task.id
    assert operator.dead_letters() == []
    (again,) = worker.claim(10)
    assert (again.id, again.idempotency_key, again.attempts) == (
        task.id,
        task.idempotency_key,
        0,
    )
    with pytest.raises(UnknownDeadLetter):
        operator.replay(letter.id)


def test_purge_removes_every_letter(durable_stores: MakeStore) -> None:
    worker, operator = durable_stores(), durable_stores()
    for name in ("a", "b"):
        task = put_leased(worker, make_task(name))
        worker.bury(task, letter_for(task))
    assert operator.purge() == 2
    assert operator.dead_letters() == [] and len(operator) == 0


def test_next_due_is_none_for_an_empty_store(durable: DurableStore) -> None:
    assert durable.next_due() is None
    assert durable.claim(5) == []


@pytest.mark.parametrize(
    ("call", "args", "kwargs", "message"),
    [
        (lambda: None, (), {}, "lambda"),
        (greet, ((1, 2),), {}, "tuple"),
        (greet, (), {"when": datetime(2026, 1, 1)}, "datetime"),
        (greet, ({1: "x"},), {}, "key"),
        (greet, (float("nan"),), {}, "nan"),
    ],
)
def test_put_refuses_what_json_cannot_hold(
    durable: DurableStore, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(NotSerializable, match=message):
        durable.put(Task(call, args, kwargs), lease=False)
    assert durable.counts().ready == 0


def test_put_refuses_a_local_function(durable: DurableStore) -> None:
    def local() -> None:
        pass

    with pytest.raises(NotSerializable, match="inside a function"):
        durable.put(Task(local), lease=False)
