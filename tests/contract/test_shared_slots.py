"""A declared concurrency shared by every process on one SQLite file or PostgreSQL schema
(the session's real server): the slots table, two store objects as two processes have,
and an offloader's calls holding and giving back their slots."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import offload
from offload.stores.base import BudgetStore
from offload.stores.postgres import PostgresStore, parse_postgres_url
from offload.stores.postgres.schema import SCHEMA_VERSION as PG_VERSION
from offload.stores.sqlite import SQLiteStore
from offload.stores.sqlite.schema import SCHEMA_VERSION as SQLITE_VERSION
from offload.testing import FakeClock

Pair = tuple[Any, Any, Callable[[float], None]]  # two stores, and a way to move time on

LEASE = 10.0


@pytest.fixture(params=["sqlite", "postgres"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    """Two stores on one file (one clock, moved by the test) or one schema (the server's
    clock: time moves on by moving the slots' times back)."""
    if request.param == "sqlite":
        clock = FakeClock()
        one = SQLiteStore(tmp_path / "s.db", clock=clock, lease_timeout=LEASE)
        two = SQLiteStore(tmp_path / "s.db", clock=clock, lease_timeout=LEASE)
        advance: Callable[[float], None] = clock.advance
    else:
        postgres = request.getfixturevalue("postgres")
        url = request.getfixturevalue("postgres_url")
        schema = parse_postgres_url(url).schema
        one = PostgresStore(url, lease_timeout=LEASE)
        two = PostgresStore(url, lease_timeout=LEASE)
        one.counts()

        def advance(seconds: float) -> None:
            with psycopg.connect(postgres.url(), autocommit=True) as conn:
                conn.execute(f'UPDATE "{schema}".slots SET until = until - %s', (seconds,))

    try:
        yield one, two, advance
    finally:
        one.close()
        two.close()


def test_both_stores_keep_shared_slots(pair: Pair) -> None:
    assert isinstance(pair[0], BudgetStore)
    assert isinstance(pair[1], BudgetStore)


def test_two_stores_hold_at_most_the_declared_slots_and_a_release_frees_one(
    pair: Pair,
) -> None:
    one, two, _ = pair
    first, wait = one.take_slots("glue", 2, 1)
    assert len(first) == 1 and wait == 0.0
    second, _ = two.take_slots("glue", 2, 5)  # one left of two
    assert len(second) == 1 and second != first
    none, wait = one.take_slots("glue", 2, 1)
    assert none == [] and 0 < wait <= LEASE  # until the earliest one lapses
    assert len(two.take_slots("other", 2, 5)[0]) == 2  # a key of its own
    one.release_slots(first)
    again, _ = two.take_slots("glue", 2, 1)
    assert len(again) == 1
    assert one.take_slots("glue", 2, 1)[0] == []


def test_a_slot_lapses_a_lease_timeout_after_its_last_renewal(pair: Pair) -> None:
    """A process that died holds its slot no longer once it lapses; one that lives keeps
    it by renewing it."""
    one, two, advance = pair
    held, _ = one.take_slots("glue", 1, 1)
    assert held
    advance(LEASE * 0.8)
    one.renew_slots(held)
    advance(LEASE * 0.8)  # past its first lapse, not its renewed one
    assert two.take_slots("glue", 1, 1)[0] == []
    advance(LEASE * 0.3)
    taken, _ = two.take_slots("glue", 1, 1)
    assert len(taken) == 1  # the lapsed one was dropped, a new one taken


def test_stores_taking_at_once_never_hold_more_than_the_slots(pair: Pair) -> None:
    """Two stores asking at the same moment, from threads of their own, for the one slot
    of each of many keys: each key's slot goes to one of them (two counting at once
    would both see it free)."""
    one, two, _ = pair
    rounds = 200
    granted: dict[int, list[str]] = {id(one): [], id(two): []}
    go = threading.Barrier(2, timeout=30)

    def run(store: Any) -> None:
        for round_ in range(rounds):
            go.wait()
            granted[id(store)].extend(store.take_slots(f"key-{round_}", 1, 1)[0])

    threads = [threading.Thread(target=run, args=(store,)) for store in (one, two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(granted[id(one)]) + len(granted[id(two)]) == rounds


def test_a_format_6_sqlite_store_gains_the_slots_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    store.counts()  # the file made
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE slots")
        conn.execute("PRAGMA user_version = 6")
    conn.close()
    again = SQLiteStore(path)
    try:
        assert len(again.take_slots("glue", 1, 1)[0]) == 1
    finally:
        again.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SQLITE_VERSION == 7
        assert conn.execute("SELECT key FROM slots").fetchall() == [("glue",)]
    conn.close()


def test_a_format_3_postgres_store_gains_the_slots_table(postgres: Any, postgres_url: str) -> None:
    schema = parse_postgres_url(postgres_url).schema
    first = PostgresStore(postgres_url)
    first.counts()
    first.close()
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{schema}".slots')
        conn.execute(f"UPDATE \"{schema}\".meta SET value = '3' WHERE name = 'version'")
    again = PostgresStore(postgres_url)
    try:
        assert len(again.take_slots("glue", 1, 1)[0]) == 1
    finally:
        again.close()
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        version = conn.execute(f'SELECT value FROM "{schema}".meta').fetchone()
        assert version == (str(PG_VERSION),) == ("4",)


# -- an offloader's calls ------------------------------------------------------------------

calls: list[str] = []
calls_lock = threading.Lock()
holding = threading.Event()
carry_on = threading.Event()


def note(name: str) -> None:
    """A task function: records the call."""
    with calls_lock:
        calls.append(name)


def hold(name: str) -> None:
    """A task function: says it runs, and waits for the test."""
    note(name)
    holding.set()
    assert carry_on.wait(60)


def slot_rows(path: Path, table: str = "slots") -> list[tuple[str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(f"SELECT key FROM {table}").fetchall()
    conn.close()
    return rows


def test_only_keys_with_a_declared_concurrency_touch_the_slots_table(tmp_path: Path) -> None:
    """Unlimited keys and a declared rate alone flow with the slots table gone: they never
    ask it. A capped key's calls give their slots back as they settle."""
    path = tmp_path / "o.db"
    off = offload.Offloader(
        store=f"sqlite:///{path}",
        limits={"paced": offload.Limit(rate=1000), "capped": offload.Limit(concurrency=2)},
        idle_timeout=5,
    )
    try:
        off.stats()
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE slots RENAME TO slots_away")
        conn.close()
        for key in ("paced", "free", None):
            for i in range(5):
                off.enqueue_task(offload.Task(note, (f"{key}-{i}",), key=key))
        assert off.flush(timeout=60)
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE slots_away RENAME TO slots")
        conn.close()
        for i in range(5):
            off.enqueue_task(offload.Task(note, (f"capped-{i}",), key="capped"))
        assert off.flush(timeout=60)
    finally:
        off.shutdown(timeout=10)
    names = {f"{key}-{i}" for key in ("paced", "free", None, "capped") for i in range(5)}
    assert names <= set(calls)
    assert slot_rows(path) == []  # every call gave its slot back


def test_a_call_holds_its_slot_in_the_store_while_it_runs(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    holding.clear()
    carry_on.clear()
    off = offload.Offloader(
        store=f"sqlite:///{path}", limits={"glue": offload.Limit(concurrency=1)}, idle_timeout=5
    )
    try:
        off.enqueue_task(offload.Task(hold, ("held",), key="glue"))
        assert holding.wait(30)
        assert slot_rows(path) == [("glue",)]
        carry_on.set()
        assert off.flush(timeout=60)
        assert slot_rows(path) == []
    finally:
        carry_on.set()
        off.shutdown(timeout=10)


class _Seen(logging.Handler):
    def __init__(self, words: str) -> None:
        super().__init__(level=logging.ERROR)
        self.words = words
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.seen.set()


def test_slots_the_store_cannot_take_hold_the_calls_and_are_asked_again(
    tmp_path: Path,
) -> None:
    """A store error is logged and the key asks again: nothing is lost, and the calls go
    once the store answers."""
    path = tmp_path / "o.db"
    seen = _Seen("could not take a concurrency slot")
    logging.getLogger("offload").addHandler(seen)
    off = offload.Offloader(
        store=f"sqlite:///{path}", limits={"glue": offload.Limit(concurrency=1)}, idle_timeout=5
    )
    try:
        off.stats()
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE slots RENAME TO slots_away")
        conn.close()
        off.enqueue_task(offload.Task(note, ("waits",), key="glue"))
        off.enqueue_task(offload.Task(note, ("flows",), key="other"))
        assert seen.seen.wait(30)
        assert off.flush(timeout=0.5) is False
        assert "flows" in calls and "waits" not in calls
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE slots_away RENAME TO slots")
        conn.close()
        assert off.flush(timeout=60)
        assert "waits" in calls
    finally:
        logging.getLogger("offload").removeHandler(seen)
        off.shutdown(timeout=10)


def away(path: str) -> None:
    """A task function: takes the slots table away while its call holds a slot, so that
    the slot cannot be given back."""
    note("away")
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE slots RENAME TO slots_away")
    conn.close()


def test_a_slot_that_cannot_be_given_back_lapses_and_the_key_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    seen = _Seen("could not give back a concurrency slot")
    logging.getLogger("offload").addHandler(seen)
    off = offload.Offloader(
        store=f"sqlite:///{path}?lease_timeout=1",
        limits={"glue": offload.Limit(concurrency=1)},
        idle_timeout=5,
    )
    try:
        off.enqueue_task(offload.Task(away, (str(path),), key="glue"))
        assert seen.seen.wait(30)
        with sqlite3.connect(path) as conn:  # the lost release's row is back, not renewed
            conn.execute("ALTER TABLE slots_away RENAME TO slots")
            assert conn.execute("SELECT key FROM slots").fetchall() == [("glue",)]
        conn.close()
        off.enqueue_task(offload.Task(note, ("after",), key="glue"))
        assert off.flush(timeout=60)
        assert "after" in calls
        stats = off.stats()
        assert stats.succeeded == 2 and stats.dead_lettered == 0
    finally:
        logging.getLogger("offload").removeHandler(seen)
        off.shutdown(timeout=10)
