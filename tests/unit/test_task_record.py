"""The compact Task: a plain callable's queued task holds only the call and its arguments;
its options, ids and attempt state are made when first needed, exactly once."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from tenacity import stop_after_attempt, wait_none

from offload import Offloader, RetryPolicy, Task
from offload.records import Progress, new_id

MakeOffloader = Callable[..., Offloader]


def send_welcome(user_id: int, email: str) -> None:
    pass


def test_a_queued_callable_task_is_no_bigger_than_a_tuple_of_fn_and_kwargs(
    make_offloader: MakeOffloader,
) -> None:
    off = make_offloader()
    release = threading.Event()
    off.enqueue_task(release.wait)  # the worker is busy: what follows stays queued
    try:
        task = off.enqueue_task(send_welcome, user_id=1, email="a@example.com")
        # One pointer more than the tuple: the slot its meta (ids, options) goes in when
        # first needed.
        assert sys.getsizeof(task) <= sys.getsizeof((send_welcome, task.kwargs)) + 8
        # Queued and untouched, it has made nothing else yet (no id, no attempt state).
        assert task._meta is None
        assert (task.call, task.args, task.kwargs) == (
            send_welcome,
            (),
            {"user_id": 1, "email": "a@example.com"},
        )
        assert task.retry is None and task.key is None and task.attempts == 0
    finally:
        release.set()
    assert off.flush(5)


def test_the_id_is_made_once_and_kept_through_attempts_and_dead_letter(
    make_offloader: MakeOffloader,
) -> None:
    off = make_offloader(retry=RetryPolicy(stop=stop_after_attempt(2), wait=wait_none()))
    attempts: list[int] = []

    def flaky() -> None:
        attempts.append(1)
        raise ConnectionError("down")

    task = off.enqueue_task(flaky)
    first = task.id
    assert task.id == first and task.idempotency_key == first
    assert off.flush(5)
    assert len(attempts) == 2 and task.attempts == 2
    [letter] = off.dead_letters()
    assert letter.task_id == first == task.id


def test_a_plain_callable_task_cannot_be_enqueued_again(make_offloader: MakeOffloader) -> None:
    off = make_offloader()
    release = threading.Event()
    try:
        task = off.enqueue_task(release.wait)
        with pytest.raises(ValueError, match="enqueued already"):
            off.enqueue_task(task)
    finally:
        release.set()
    assert off.flush(5)


def test_a_task_restored_as_a_store_gives_it_back() -> None:
    policy = RetryPolicy()
    task = Task._restore(
        send_welcome,
        (1,),
        {"email": "a@example.com"},
        task_id="stored-id",
        idempotency_key="stored-key",
        key="crm",
        retry=policy,
        progress=Progress(attempts=3, failures=1, first_attempt_at=1.0, last_attempt_at=2.0),
    )
    assert (task.call, task.args, task.kwargs) == (send_welcome, (1,), {"email": "a@example.com"})
    assert (task.retry, task.key, task.id, task.idempotency_key) == (
        policy,
        "crm",
        "stored-id",
        "stored-key",
    )
    assert task.attempts == 3 and task.progress.failures == 1 and task.enqueued
    task._restart()  # a replay: a fresh attempt budget, the same ids
    assert task.attempts == 0 and not task.enqueued and task.id == "stored-id"


def test_task_form_keeps_its_options_and_fresh_ids() -> None:
    a, b = Task(send_welcome, (1,), {"email": "x"}, key="crm"), Task(send_welcome)
    assert a.key == "crm" and b.key is None
    assert a.id != b.id and a.idempotency_key == a.id
    assert not a.enqueued and a.attempts == 0
    assert new_id() not in (a.id, b.id)


def test_readers_racing_the_worker_for_a_new_task_id_all_see_one_id(
    make_offloader: MakeOffloader,
) -> None:
    """Handlers read task.id while the worker makes the task's attempt state at its first
    attempt: both make it on first need, and exactly one must win, or an id (or an attempt
    count) would be lost."""
    seen_by_worker: dict[int, str] = {}

    def on_success(task: Task, result: Any) -> None:
        seen_by_worker[id(task)] = task.id

    off = make_offloader(on_success=on_success, max_queue=100_000)
    go = threading.Event()
    off.enqueue_task(go.wait)  # hold the worker until every task is queued, untouched
    tasks = [off.enqueue_task(send_welcome, i, email="a@example.com") for i in range(3_000)]
    start = threading.Barrier(5)
    readings: list[dict[int, str]] = [{} for _ in range(4)]

    def reader(mine: dict[int, str]) -> None:
        start.wait()
        for task in tasks:  # in the worker's order, so that reader and worker meet
            mine[id(task)] = task.id

    threads = [threading.Thread(target=reader, args=(r,)) for r in readings]
    for thread in threads:
        thread.start()
    start.wait()
    go.set()
    for thread in threads:
        thread.join(30)
    assert off.flush(30)
    assert len(seen_by_worker) == len(tasks) + 1  # and the blocking task
    for task in tasks:
        worker_id = seen_by_worker[id(task)]
        assert task.id == worker_id and task.idempotency_key == worker_id
        assert task.attempts == 1
        assert all(mine[id(task)] == worker_id for mine in readings)
    assert len({t.id for t in tasks}) == len(tasks)
    s = off.stats()
    assert s.enqueued - 1 == s.succeeded - 1 == len(tasks)


def test_a_new_tasks_record_has_the_record_defaults() -> None:
    """The enqueue path makes a new task's record as a plain tuple: its attempt state must
    be TaskRecord's own defaults, field for field (a field added later included)."""
    from offload.codec.task import _NEW_STATE, TaskRecord

    task = Task(send_welcome, (1, "a@example.com"))
    record = TaskRecord.of(task)
    assert type(record) is TaskRecord
    assert record == TaskRecord(task.id, task.idempotency_key, None, record.call, None)
    assert dict(zip(TaskRecord._fields[5:], _NEW_STATE, strict=True)) == TaskRecord._field_defaults
