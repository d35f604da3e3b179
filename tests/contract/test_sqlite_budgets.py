"""A declared rate shared by every process on one SQLite file: the budgets table, and two
real processes against a real server."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import offload
from offload.stores.base import BudgetStore
from offload.stores.sqlite import SQLiteStore
from offload.stores.sqlite.schema import SCHEMA_VERSION
from offload.testing import FakeClock
from paced import assert_one_budget
from server import ScriptedServer

calls: list[str] = []
calls_lock = threading.Lock()


def note(name: str) -> None:
    """A task function the worker imports: records the call."""
    with calls_lock:
        calls.append(name)


class SettableClock(FakeClock):
    """A FakeClock whose wall time can also be set back, as an administrator or NTP may."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = 0.0

    def time(self) -> float:
        return super().time() + self.shift


def take(store: SQLiteStore, key: str, rate: float, burst: float) -> float:
    """One token: 0.0 when taken, else the seconds until one is there."""
    taken, wait = store.take_tokens(key, rate, burst)
    assert taken in (0, 1) and (wait == 0.0) == (taken == 1)
    return wait


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[SQLiteStore, SQLiteStore, FakeClock]]:
    """Two store objects on one file (as two processes have), on one clock."""
    clock = FakeClock()
    one = SQLiteStore(tmp_path / "b.db", clock=clock)
    two = SQLiteStore(tmp_path / "b.db", clock=clock)
    try:
        yield one, two, clock
    finally:
        one.close()
        two.close()


def test_the_sqlite_store_keeps_rate_budgets(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "b.db")
    assert isinstance(store, BudgetStore)
    store.close()


def test_two_stores_on_one_file_take_at_most_the_burst_plus_the_rate(
    stores: tuple[SQLiteStore, SQLiteStore, FakeClock],
) -> None:
    one, two, clock = stores
    rate, burst = 10.0, 3.0
    taken = {id(one): 0, id(two): 0}
    steps = 400  # 2 seconds in steps of 5 ms, each store asking every step
    for _ in range(steps):
        for store in (one, two):
            if take(store, "api", rate, burst) == 0.0:
                taken[id(store)] += 1
        clock.advance(0.005)
    elapsed = steps * 0.005
    total = sum(taken.values())
    # At most what the bucket allows, and all of it: the budget is one, not one each.
    assert burst + rate * elapsed - 1 <= total <= burst + rate * elapsed
    assert all(count > 0 for count in taken.values()), taken


def test_an_empty_bucket_says_when_its_next_token_comes_and_refills_up_to_the_burst(
    stores: tuple[SQLiteStore, SQLiteStore, FakeClock],
) -> None:
    one, two, clock = stores
    assert [take(one, "api", 4.0, 2.0) for _ in range(2)] == [0.0, 0.0]
    wait = take(two, "api", 4.0, 2.0)
    assert wait == pytest.approx(0.25)
    assert take(one, "api", 4.0, 2.0) == pytest.approx(0.25)  # nothing was taken
    clock.advance(0.125)
    assert take(two, "api", 4.0, 2.0) == pytest.approx(0.125)
    clock.advance(0.125)
    assert take(two, "api", 4.0, 2.0) == 0.0
    assert take(one, "api", 4.0, 2.0) > 0
    clock.advance(3600)  # an hour idle refills the burst, no more
    assert [take(one, "api", 4.0, 2.0) == 0.0 for _ in range(3)] == [True, True, False]


def test_a_process_takes_the_tokens_there_are_up_to_what_it_wants(
    stores: tuple[SQLiteStore, SQLiteStore, FakeClock],
) -> None:
    one, two, clock = stores
    assert one.take_tokens("api", 10.0, 3.0, 5) == (3, 0.0)
    taken, wait = two.take_tokens("api", 10.0, 3.0, 5)
    assert taken == 0 and wait == pytest.approx(0.1)
    clock.advance(0.25)
    assert two.take_tokens("api", 10.0, 3.0, 5) == (2, 0.0)
    assert one.take_tokens("api", 10.0, 3.0, 1)[0] == 0


def test_keys_have_budgets_of_their_own(
    stores: tuple[SQLiteStore, SQLiteStore, FakeClock],
) -> None:
    one, two, _ = stores
    assert take(one, "stripe", 1.0, 1.0) == 0.0
    assert take(two, "stripe", 1.0, 1.0) > 0
    assert take(two, "hubspot", 1.0, 1.0) == 0.0
    assert take(one, "hubspot", 1.0, 1.0) > 0


def test_a_clock_set_back_or_forward_neither_stalls_the_budget_nor_overfills_it(
    tmp_path: Path,
) -> None:
    clock = SettableClock()
    store = SQLiteStore(tmp_path / "b.db", clock=clock)
    try:
        assert take(store, "api", 2.0, 1.0) == 0.0
        clock.shift = -3600.0  # set back an hour
        clock.advance(0.5)
        # Not an hour's stall: the row's time restarts at the new now.
        assert take(store, "api", 2.0, 1.0) > 0
        clock.advance(0.5)
        assert take(store, "api", 2.0, 1.0) == 0.0
        clock.shift += 7200.0  # then forward two hours: at most the burst
        assert [take(store, "api", 2.0, 1.0) == 0.0 for _ in range(2)] == [True, False]
    finally:
        store.close()


def test_a_format_4_store_gains_the_budgets_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    store.counts()
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE budgets")
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    again = SQLiteStore(path)
    try:
        assert take(again, "api", 1.0, 1.0) == 0.0
    finally:
        again.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
        assert conn.execute("SELECT key FROM budgets").fetchall() == [("api",)]
    finally:
        conn.close()


def test_only_keys_with_a_declared_rate_ask_the_shared_budget(tmp_path: Path) -> None:
    """Unlimited keys (and a limit of concurrency alone) never touch the budgets table."""
    path = tmp_path / "o.db"
    off = offload.Offloader(
        store=f"sqlite:///{path}",
        limits={"paced": offload.Limit(rate=1000), "capped": offload.Limit(concurrency=1)},
        idle_timeout=0.5,
    )
    try:
        assert off._core.sched.shared_rates
        for key in ("paced", "capped", "free", None):
            for i in range(5):
                off.enqueue_task(offload.Task(note, (f"{key}-{i}",), key=key))
        assert off.flush(timeout=60)
    finally:
        off.shutdown(timeout=10)
    names = {f"{key}-{i}" for key in ("paced", "capped", "free", None) for i in range(5)}
    assert names <= set(calls)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT key FROM budgets").fetchall() == [("paced",)]
    finally:
        conn.close()


def test_a_budget_the_store_cannot_read_holds_the_calls_and_is_asked_again(
    tmp_path: Path,
) -> None:
    """A store error is logged and the key asks again a second later: nothing is lost,
    nothing crashes, and the calls go once the store answers."""
    path = tmp_path / "o.db"
    logged = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "rate budget" in record.getMessage():
                logged.set()

    handler = Seen(level=logging.ERROR)
    logging.getLogger("offload").addHandler(handler)
    off = offload.Offloader(
        store=f"sqlite:///{path}", limits={"paced": offload.Limit(rate=100)}, idle_timeout=5
    )
    try:
        off.stats()
        conn = sqlite3.connect(path)
        conn.execute("ALTER TABLE budgets RENAME TO budgets_away")
        conn.commit()
        off.enqueue_task(offload.Task(note, ("held",), key="paced"))
        assert logged.wait(30)
        assert off.stats().queued == 1 and "held" not in calls
        conn.execute("ALTER TABLE budgets_away RENAME TO budgets")
        conn.commit()
        conn.close()
        assert off.flush(timeout=60)
        assert "held" in calls
    finally:
        logging.getLogger("offload").removeHandler(handler)
        off.shutdown(timeout=10)


def test_the_memory_store_paces_each_process_on_its_own() -> None:
    off = offload.Offloader(limits={"paced": offload.Limit(rate=10)}, idle_timeout=0.5)
    try:
        assert not off._core.sched.shared_rates
    finally:
        off.shutdown(timeout=5)


# -- two real processes ------------------------------------------------------------------


def test_two_processes_on_one_file_together_stay_within_the_declared_rate(
    tmp_path: Path, server: ScriptedServer
) -> None:
    """Both perform their own calls at once (tests/support/paced.py); every 2-second window
    of the server's arrivals holds at most what one budget allows."""
    assert_one_budget(f"sqlite:///{tmp_path / 'shared.db'}", server)
