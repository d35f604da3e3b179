"""Offloader.health() and the health of a store alone: what is measured, and each problem."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import offload
from offload import Health, Offloader, Task
from offload.health_check import store_health, summary
from offload.stores.sqlite import SQLiteStore
from offload.testing import FakeClock


def test_an_idle_offloader_is_healthy(make_offloader: Any) -> None:
    health = make_offloader().health()
    assert health == Health(
        ok=True,
        worker_running=False,
        store_ok=True,
        oldest_waiting_s=None,
        dead_letters=0,
        problems=(),
    )
    assert summary(health).startswith("healthy: no task waiting, 0 dead letter(s)")


def test_a_stuck_queue_is_seen_waiting_longer_at_each_look(make_offloader: Any) -> None:
    clock = FakeClock()
    release, started = threading.Event(), threading.Event()

    def hang() -> None:
        started.set()
        release.wait(30)

    off: Offloader = make_offloader(clock=clock)
    try:
        off.enqueue_task(hang)
        assert started.wait(10)
        off.enqueue_task(print, "waits behind the hung call")
        first = off.health(max_age=10)
        assert first.ok and first.oldest_waiting_s == 0.0 and first.worker_running
        clock.advance(25)
        second = off.health(max_age=10)
        assert second.oldest_waiting_s == 25.0
        assert not second.ok
        assert second.problems == ("the oldest due task has waited 25s (max 10s)",)
        assert summary(second) == "unhealthy: the oldest due task has waited 25s (max 10s)"
    finally:
        release.set()
    assert off.flush(10)
    assert off.health(max_age=10).oldest_waiting_s is None


def test_too_many_dead_letters(make_offloader: Any) -> None:
    off = make_offloader()

    def fails() -> None:
        raise offload.GiveUp("no")

    for _ in range(3):
        off.enqueue_task(fails)
    assert off.flush(10)
    health = off.health(max_dead_letters=2)
    assert not health.ok and health.dead_letters == 3
    assert health.problems == ("3 dead letter(s) held (max 2)",)
    assert off.health(max_dead_letters=3).ok


def test_tasks_with_no_worker_alive_are_a_problem(make_offloader: Any) -> None:
    off = make_offloader()
    with off._core.lock:  # as if every worker thread had died with tasks queued
        off._core.sched.put(Task(print))
    health = off.health()
    assert not health.ok and health.worker_running is False
    assert health.problems == ("1 task(s) due but no worker thread is running",)
    with off._core.lock:
        off._core.sched.ready.clear()


@pytest.mark.parametrize(
    ("options", "error"),
    [({"max_age": -1}, ValueError), ({"max_dead_letters": 1.5}, TypeError)],
)
def test_bad_thresholds_name_the_option(
    make_offloader: Any, options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error, match=next(iter(options))):
        make_offloader().health(**options)


def test_a_store_that_does_not_answer(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing-dir" / "q.db")
    health = store_health(store, time.time())
    assert not health.ok and not health.store_ok and health.dead_letters is None
    assert len(health.problems) == 1 and health.problems[0].startswith("store unreachable: ")
    assert health.worker_running is None


def test_a_store_alone_says_how_long_its_earliest_due_task_has_waited(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    web = Offloader(store=url, consume=False)
    web.enqueue_task(offload.http("POST", "http://127.0.0.1:9/hook"))
    store = SQLiteStore(tmp_path / "q.db")
    try:
        later = time.time() + 120
        health = store_health(store, later, max_age=60)
        assert health.oldest_waiting_s is not None and 119 < health.oldest_waiting_s < 125
        assert not health.ok and "max 60s" in health.problems[0]
        assert store_health(store, later, max_age=600).ok
        assert web.health().oldest_waiting_s is not None  # the web process sees it too
    finally:
        store.close()
        web.shutdown(0)
