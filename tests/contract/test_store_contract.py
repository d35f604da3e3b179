"""One contract for every store: what the Offloader relies on, run against each backend.

Dead letters are every store's business; tasks (put, claim, renew, release, complete,
bury, replay) only a durable store's. Each backend provides ONE fixture, named
`<backend>_stores`, returning a `MakeStore`: a callable that opens a new handle on one
fresh backend per test (two handles stand for two processes sharing it), closed at
teardown. To add a backend, write that fixture and put its name in STORES (and DURABLE
when it holds tasks).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import offload
from offload import DeadLetter, NotSerializable, Task, UnknownDeadLetter
from offload.codec.task import Unreadable
from offload.codec.trust import Trust
from offload.records import new_id
from offload.stores import DurableStore, MemoryStore, Store
from offload.stores.base import LetterQuery
from offload.stores.sqlite import SQLiteStore
from offload.stores.sqs import SqsStore
from offload.testing import FakeClock

MakeStore = Callable[[], Any]

STORES = ["memory", "sqlite", "sqs", "postgres"]
DURABLE = ["sqlite", "sqs", "postgres"]
DEDUPS = ["sqlite", "postgres"]  # `dedups = True`: one dedup key for every process


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


def letter_for(
    task: Task,
    reason: str = "exhausted",
    status: int | None = 503,
    *,
    error: str = "HTTP 503 Service Unavailable",
    description: str = "tests.greet",
    last: datetime = WHEN + timedelta(seconds=42),
) -> DeadLetter:
    return DeadLetter(
        id=new_id(),
        task_id=task.id,
        description=description,
        key=task.key,
        attempts=5,
        error=error,
        status=status,
        reason=reason,
        first_attempt_at=WHEN,
        last_attempt_at=last,
    )


def buried(store: Store, task: Task, **fields: Any) -> DeadLetter:
    """Bury `task` (put first, leased, in a durable store) as a letter with `fields`."""
    if store.durable:
        task = put_leased(store, task)  # type: ignore[arg-type]
    letter = letter_for(task, **fields)
    store.bury(task, letter)
    return letter


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


# -- dead letters a page at a time (the console) -------------------------------------------


def test_pages_come_newest_first_with_the_total_and_a_cursor(stores: MakeStore) -> None:
    store, other = stores(), stores()
    letters = [buried(store, make_task(str(i))) for i in range(7)]
    newest_first = [letter.id for letter in reversed(letters)]
    seen: list[str] = []
    cursor = None
    sizes = []
    for _ in range(4):
        page = other.dead_letter_page(LetterQuery(), limit=3, cursor=cursor)
        assert page.total == 7
        seen += [letter.id for letter in page.letters]
        sizes.append(len(page.letters))
        cursor = page.cursor
        if cursor is None:
            break
    assert sizes == [3, 3, 1]
    assert seen == newest_first
    first = other.dead_letter_page(LetterQuery(), limit=50)
    assert first.letters == list(reversed(letters)) and first.cursor is None
    assert other.dead_letters() == letters, "a listing must not consume dead letters"


def test_a_letter_buried_between_pages_moves_no_other_onto_two_pages(store: Store) -> None:
    for i in range(4):
        buried(store, make_task(str(i)))
    first = store.dead_letter_page(LetterQuery(), limit=2)
    buried(store, make_task("late"))
    second = store.dead_letter_page(LetterQuery(), limit=2, cursor=first.cursor)
    ids = [x.id for x in first.letters + second.letters]
    assert len(set(ids)) == 4


def test_letters_removed_between_pages_move_no_other_onto_two_pages(store: Store) -> None:
    letters = [buried(store, make_task(str(i))) for i in range(9)]
    first = store.dead_letter_page(LetterQuery(), limit=3)
    store.discard(letters[0].id)  # older than the cursor: every position below it shifts
    store.revive(letters[1].id)
    second = store.dead_letter_page(LetterQuery(), limit=3, cursor=first.cursor)
    shown = [x.id for x in first.letters + second.letters]
    assert shown == [letter.id for letter in reversed(letters[3:])]
    assert second.total == 7


def test_letters_replayed_or_discarded_between_pages_repeat_and_skip_none(
    durable_stores: MakeStore,
) -> None:
    store, other = durable_stores(), durable_stores()  # the console pages from another
    letters = [buried(store, make_task(str(i))) for i in range(7)]
    first = other.dead_letter_page(LetterQuery(), limit=3)
    assert first.letters == letters[:3:-1]
    store.discard(letters[5].id)  # shown on page 1
    store.replay(letters[4].id)  # shown on page 1: the page's last, its cursor's letter
    store.replay(letters[2].id)  # not shown yet: older than the cursor
    second = other.dead_letter_page(LetterQuery(), limit=3, cursor=first.cursor)
    shown = [x.id for x in first.letters + second.letters]
    assert len(shown) == len(set(shown)), "a letter shown on both pages"
    left = [x.id for x in other.dead_letters()]
    assert set(left) <= set(shown), "a letter still there shown on neither page"
    assert [x.id for x in second.letters] == [letters[i].id for i in (3, 1, 0)]
    assert (second.total, second.cursor) == (4, None)


def test_a_cursor_from_another_kind_of_store_is_refused(
    sqlite_stores: MakeStore, sqs_stores: MakeStore
) -> None:
    """SQS's cursors name a place, the others' a number: neither reads the other's."""
    sqlite, sqs = sqlite_stores(), sqs_stores()
    for store in (sqlite, sqs):
        for i in range(2):
            buried(store, make_task(str(i)))
    for store, foreign in [(sqlite, sqs), (sqs, sqlite)]:
        cursor = foreign.dead_letter_page(LetterQuery(), limit=1).cursor
        assert cursor is not None
        with pytest.raises(ValueError, match="not a cursor a page gave"):
            store.dead_letter_page(LetterQuery(), limit=1, cursor=cursor)


def test_pages_filter_by_key_status_reason_since_and_text(stores: MakeStore) -> None:
    store, other = stores(), stores()
    later = WHEN + timedelta(hours=5)
    crm = buried(
        store,
        make_task("a", key="crm"),
        status=400,
        reason="permanent",
        error="HTTP 400 Bad Request: <b>email</b> is invalid",
    )
    crm_old = buried(store, make_task("b", key="crm"), status=503, reason="exhausted")
    mail = buried(
        store,
        make_task("c", key="mail"),
        status=503,
        reason="exhausted",
        error="HTTP 503 100%_Unavailable",
        last=later,
    )
    plain = buried(
        store,
        make_task("d"),
        status=None,
        reason="shutdown",
        error="undelivered at shutdown",
        description="myapp.Tasks.send_welcome",
    )

    def ids(**query: Any) -> tuple[list[str], int]:
        page = other.dead_letter_page(LetterQuery(**query), limit=50)
        return [x.id for x in page.letters], page.total

    assert ids(key="crm") == ([crm_old.id, crm.id], 2)
    assert ids(key="nobody") == ([], 0)
    assert ids(status=503) == ([mail.id, crm_old.id], 2)
    assert ids(reason="shutdown") == ([plain.id], 1)
    assert ids(key="crm", status=400) == ([crm.id], 1)
    assert ids(since=later) == ([mail.id], 1)
    assert ids(since=later + timedelta(seconds=1)) == ([], 0)
    assert ids(text="<B>EMAIL</b>") == ([crm.id], 1), "text is a substring, in either case"
    assert ids(text="tasks.send") == ([plain.id], 1), "text matches the description too"
    assert ids(text="100%_") == ([mail.id], 1), "% and _ are plain characters"
    assert ids(text="%") == ([mail.id], 1)
    assert ids(text="_") == ([plain.id, mail.id], 2)
    assert ids(text="503", status=503, key="mail") == ([mail.id], 1)
    crm_only = other.dead_letter_page(LetterQuery(key="crm"), limit=1)
    assert crm_only.total == 2 and [x.id for x in crm_only.letters] == [crm_old.id]
    rest = other.dead_letter_page(LetterQuery(key="crm"), limit=1, cursor=crm_only.cursor)
    assert [x.id for x in rest.letters] == [crm.id] and rest.cursor is None


def test_a_text_page_beyond_the_first(store: Store) -> None:
    letters = [buried(store, make_task(str(i)), error=f"timeout {i}") for i in range(5)]
    buried(store, make_task("other"), error="refused")
    first = store.dead_letter_page(LetterQuery(text="TIMEOUT"), limit=2)
    second = store.dead_letter_page(LetterQuery(text="timeout"), limit=2, cursor=first.cursor)
    third = store.dead_letter_page(LetterQuery(text="timeout"), limit=2, cursor=second.cursor)
    got = [x.id for x in first.letters + second.letters + third.letters]
    assert got == [x.id for x in reversed(letters)]
    assert (first.total, third.total, third.cursor) == (5, 5, None)


@pytest.mark.parametrize(
    ("limit", "cursor"),
    [(0, None), (1001, None), (True, None), (5, "x"), (5, "²"), (5, "9" * 19), (5, "9" * 5000)]
    # and what no SQS page gives: no id, no time, not hex, not UTF-8, spaces, a sign
    + [(5, c) for c in ["5.", ".61", "5.6", "5.zz", "5.ff", "5.61 62", "-5.61", "5.\u0661"]],
)
def test_a_page_refuses_a_bad_limit_or_cursor(store: Store, limit: Any, cursor: Any) -> None:
    with pytest.raises(ValueError):
        store.dead_letter_page(LetterQuery(), limit=limit, cursor=cursor)


def test_the_tally_counts_by_key_reason_and_status(stores: MakeStore) -> None:
    store, other = stores(), stores()
    for name, key, status, reason in [
        ("a", "crm", 400, "permanent"),
        ("b", "crm", 503, "exhausted"),
        ("c", "crm", 503, "exhausted"),
        ("d", "mail", 503, "exhausted"),
        ("e", None, None, "shutdown"),
    ]:
        buried(store, make_task(name, key=key), status=status, reason=reason)
    tally = other.dead_letter_tally()
    assert tally.total == 5
    assert tally.by_key == [("crm", 3), (None, 1), ("mail", 1)]
    assert tally.by_reason == [("exhausted", 3), ("permanent", 1), ("shutdown", 1)]
    assert tally.by_status == [(503, 3), (None, 1), (400, 1)]
    assert other.dead_letter_tally(limit=1).by_key == [("crm", 3)]


def test_the_detail_shows_the_call_without_its_secrets_or_body(stores: MakeStore) -> None:
    store, other = stores(), stores()
    call = offload.http(
        "POST",
        "http://127.0.0.1:9/hook?token=s3cr3t-q&page=2",
        headers={"Authorization": "Bearer s3cr3t-h", "X-Trace": "trace-1"},
        json={"password": "s3cr3t-b", "email": "ada@example.com"},
        idempotency_key=True,
    )
    http_letter = buried(store, Task(call))
    fn_letter = buried(store, make_task())
    detail = other.dead_letter_detail(http_letter.id)
    assert detail.letter == http_letter
    view = detail.call
    assert (view.kind, view.method) == ("http", "POST")
    assert view.url == "http://127.0.0.1:9/hook?token=***&page=2"
    headers = dict(view.headers)
    assert headers["Authorization"] == "***" and headers["X-Trace"] == "trace-1"
    assert headers["Idempotency-Key"] == http_letter.task_id
    assert view.fields == ("json",)
    shown = repr(detail) + str(view.to_json())
    assert "s3cr3t" not in shown and "ada@example.com" not in shown
    function = other.dead_letter_detail(fn_letter.id).call
    assert (function.kind, function.target) == ("function", f"{__name__}.greet")
    assert function.fields == ("1 positional", "punctuation")
    with pytest.raises(UnknownDeadLetter):
        other.dead_letter_detail("no-such-id")


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


def test_purge_removes_every_letter(stores: MakeStore) -> None:
    worker, operator = stores(), stores()
    for name in ("a", "b"):
        buried(worker, make_task(name))
    assert operator.purge() == 2
    assert operator.dead_letters() == [] and len(operator) == 0
    assert operator.purge() == 0


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
        (greet, (10**5000,), {}, "digits"),
    ],
)
def test_put_refuses_what_json_cannot_hold(
    durable: DurableStore, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(NotSerializable, match=message):
        durable.put(Task(call, args, kwargs), lease=False)
    assert durable.counts().ready == 0


def test_put_keeps_arguments_exactly(durable: DurableStore) -> None:
    # A lone surrogate is what os.fsdecode makes of a file name's undecodable byte; the
    # tags a call's own fields use are plain keys in arguments.
    args = ("caf\udce9.txt", 2**64, -0.0, 5e-324, {"$bytes": "AAAA"}, [{"$dict": {}}])
    kwargs = {"punctuation": "\ud800?", "$dict": {"$bytes": 1}}
    durable.put(Task(greet, args, kwargs), lease=False)
    (task,) = durable.claim(1)
    assert task.args == args and task.kwargs == kwargs
    assert [type(a) for a in task.args] == [type(a) for a in args]
    assert str(task.args[2]) == "-0.0"
    call = offload.http("POST", "http://127.0.0.1:9/x", json={"name": "caf\udce9"})
    durable.put(Task(call), lease=False)
    (task,) = durable.claim(1)
    assert task.call == call


def test_put_refuses_a_local_function(durable: DurableStore) -> None:
    def local() -> None:
        pass

    with pytest.raises(NotSerializable, match="inside a function"):
        durable.put(Task(local), lease=False)


# -- dedup keys: stores that dedup for every process --------------------------------------


@pytest.fixture(params=DEDUPS)
def dedup_stores(
    request: pytest.FixtureRequest, tmp_path: Any
) -> Iterator[tuple[MakeStore, FakeClock]]:
    """Handles on one store that dedups (as `<backend>_stores`), all on one FakeClock, for
    the windows; and that clock."""
    from offload.stores.postgres import PostgresStore

    clock = FakeClock(epoch=time.time())
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    opened: list[Any] = []

    def make() -> Any:
        if url is None:
            store: Any = SQLiteStore(tmp_path / "dedup.db", clock=clock)
        else:
            store = PostgresStore.from_url(url, clock=clock)
        assert store.dedups
        opened.append(store)
        return store

    yield make, clock
    for store in opened:
        store.close()


def keyed(name: str, key: str = "crm-sync:7", window: float = 0.0) -> Task:
    return Task(greet, (name,), dedup_key=key, dedup_window=window)


def assert_held_by(store: DurableStore, task: Task, key: str = "crm-sync:7") -> None:
    """A put with `key` writes nothing and hands back `task`'s ids."""
    before = store.counts()
    probe = keyed("probe", key)
    got = store.put(probe, lease=False)
    assert got is not probe
    assert (got.id, got.idempotency_key, got.dedup_key) == (task.id, task.idempotency_key, key)
    assert store.counts() == before


def assert_free(store: DurableStore, key: str = "crm-sync:7") -> Task:
    """A put with `key` is written; the task written."""
    task = keyed("free", key)
    assert store.put(task, lease=False) is task
    return task


def test_a_held_dedup_key_hands_back_its_task_to_every_process(
    dedup_stores: tuple[MakeStore, FakeClock],
) -> None:
    make, _ = dedup_stores
    one, two = make(), make()
    task = keyed("first")
    assert one.put(task, lease=True) is task
    assert_held_by(one, task)
    assert_held_by(two, task)
    assert one.counts() == type(one.counts())(0, 0, 1, 0)
    other = assert_free(two, "crm-sync:8")  # another key is its own
    assert other.id != task.id


def test_a_dedup_key_is_held_while_its_task_is_delayed_leased_and_retried(
    dedup_stores: tuple[MakeStore, FakeClock],
) -> None:
    """The key goes with the task, whichever process holds it: a retried task comes back
    from the store as a new object, and completing that one lets the key go."""
    make, clock = dedup_stores
    one, two = make(), make()
    task = keyed("first")
    assert one.put(task, lease=False, due=clock.time() + 30) is task
    assert_held_by(two, task)  # delayed
    clock.advance(30)
    (claimed,) = two.claim(5)
    assert (claimed.id, claimed.dedup_key) == (task.id, "crm-sync:7")
    assert_held_by(one, task)  # leased by another process
    claimed.progress.attempts = 1
    two.release(claimed, clock.time() + 5)  # a retry
    assert_held_by(one, task)
    clock.advance(5)
    (again,) = one.claim(5)
    assert again is not claimed and again.dedup_key == "crm-sync:7"
    one.complete(again)
    assert_free(two)


def test_a_dedup_window_holds_the_key_after_its_task_ended(
    dedup_stores: tuple[MakeStore, FakeClock],
) -> None:
    make, clock = dedup_stores
    one, two = make(), make()
    task = keyed("first", window=60)
    one.put(task, lease=True)
    one.complete(task)
    assert one.counts() == type(one.counts())(0, 0, 0, 0)
    assert_held_by(two, task)
    clock.advance(59)
    assert_held_by(two, task)
    clock.advance(2)
    assert one.next_due() is None  # a sweep, which may delete the key whose window passed
    later = assert_free(two)
    assert_held_by(one, later)


def keys_in_table(store: Any, request: pytest.FixtureRequest) -> set[str]:
    """The keys in the store's `dedup` table, read behind its back."""
    if isinstance(store, SQLiteStore):
        with contextlib.closing(sqlite3.connect(store.path)) as conn:
            return {row[0] for row in conn.execute("SELECT key FROM dedup")}
    import psycopg

    server = request.getfixturevalue("postgres")
    with psycopg.connect(server.url(), autocommit=True) as pg:
        return {row[0] for row in pg.execute(f'SELECT key FROM "{store.schema}".dedup')}


def test_the_sweep_deletes_the_keys_whose_window_passed(
    dedup_stores: tuple[MakeStore, FakeClock], request: pytest.FixtureRequest
) -> None:
    """A key nothing holds any longer is deleted, not merely free: a store used with a key
    per event would otherwise grow for ever. Keys of live tasks and running windows stay."""
    make, clock = dedup_stores
    one, two = make(), make()
    for name, window in (("passed", 60), ("running", 600)):
        task = keyed(name, key=f"event:{name}", window=window)
        one.put(task, lease=True)
        one.complete(task)
    live = keyed("live", key="event:live")
    one.put(live, lease=False, due=clock.time() + 3600)
    assert two.next_due() is not None  # a sweep, with every key held
    assert keys_in_table(two, request) == {"event:passed", "event:running", "event:live"}
    clock.advance(61)
    assert two.next_due() is not None  # the next sweep: one window has passed
    assert keys_in_table(two, request) == {"event:running", "event:live"}
    assert_held_by(one, live, "event:live")


def keyed_dead_letter(
    dedup_stores: tuple[MakeStore, FakeClock],
) -> tuple[DurableStore, DurableStore, Task, DeadLetter]:
    """A worker's and an operator's handle on one store, and a keyed task the worker
    dead-lettered (its key let go), with its letter."""
    make, _ = dedup_stores
    worker, operator = make(), make()
    task = keyed("first")
    worker.put(task, lease=True)
    letter = letter_for(task)
    worker.bury(task, letter)
    return worker, operator, task, letter


def test_a_dead_letter_lets_its_key_go_and_a_replay_takes_it_again(
    dedup_stores: tuple[MakeStore, FakeClock],
) -> None:
    worker, operator, task, letter = keyed_dead_letter(dedup_stores)
    replayed = operator.replay(letter.id)
    assert (replayed.id, replayed.dedup_key) == (task.id, "crm-sync:7")
    assert_held_by(worker, task)
    (again,) = worker.claim(5)
    worker.bury(again, letter_for(again))  # dead again: the key goes
    assert_free(operator)


def test_a_replay_leaves_the_key_to_a_live_task_that_took_it_meanwhile(
    dedup_stores: tuple[MakeStore, FakeClock],
) -> None:
    """Once a dead letter let its key go, a new task may take it; replaying the letter
    then must not take the key from that task, or a third enqueue would be let in while
    both live (and the replayed task's end would free the key of the live one)."""
    worker, operator, task, letter = keyed_dead_letter(dedup_stores)
    newer = assert_free(operator)  # the key was free: a new task holds it
    replayed = operator.replay(letter.id)
    assert replayed.id == task.id and operator.counts().ready == 2  # both run
    assert_held_by(worker, newer)
    claimed = {t.id: t for t in worker.claim(5)}
    worker.complete(claimed[task.id])  # the replayed task's end leaves the key alone
    assert_held_by(operator, newer)
    worker.complete(claimed[newer.id])
    assert_free(operator)


def test_a_task_this_process_cannot_load_keeps_its_key_until_its_dead_letter(
    dedup_stores: tuple[MakeStore, FakeClock],
) -> None:
    """A worker that refuses the task's function dead-letters it unread: its key must go
    with it, or every later enqueue with the key would be dropped."""
    make, _ = dedup_stores
    web, worker = make(), make()
    worker.trust = Trust(("myapp.tasks",))  # not this module's greet
    task = keyed("first")
    web.put(task, lease=False)
    (claimed,) = worker.claim(5)
    assert isinstance(claimed.call, Unreadable) and claimed.dedup_key == "crm-sync:7"
    assert_held_by(web, task)
    worker.bury(claimed, letter_for(claimed, "unreadable", None))
    assert_free(web)


def test_processes_racing_for_one_dedup_key_write_one_task(
    dedup_stores: tuple[MakeStore, FakeClock],
) -> None:
    make, _ = dedup_stores
    handles = [make() for _ in range(6)]
    start = threading.Barrier(len(handles))
    ids: list[str] = []

    def enqueue(store: DurableStore) -> None:
        start.wait()
        for i in range(20):
            ids.append(store.put(keyed(f"n{i}"), lease=False).id)

    threads = [threading.Thread(target=enqueue, args=(h,)) for h in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(ids) == 120 and len(set(ids)) == 1
    assert handles[0].counts().ready == 1
