"""The SQS store against a real endpoint: moto's ThreadedMotoServer on 127.0.0.1.

Each test has queues of its own (the `sqs_store_url` fixture). A second SqsStore on the
same queue stands for another worker process. Waiting for a lease to run out is waiting
on SQS itself: claim() long-polls, no test sleeps.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import boto3
import pytest
import tenacity

import offload
from offload import (
    DeadLetter,
    GiveUp,
    NotSerializable,
    RetryPolicy,
    StoreError,
    Task,
    UnknownDeadLetter,
)
from offload.stores import DurableStore, open_store
from offload.stores.base import LetterQuery
from offload.stores.sqs import SqsStore, task_record
from offload.stores.sqs.messages import letter_body

MakeStore = Callable[..., SqsStore]


def greet(name: str, *, punctuation: str = "!") -> str:
    """A module-level function a worker can import."""
    return f"hello {name}{punctuation}"


@pytest.fixture
def make_store(sqs_store_url: str) -> Iterator[MakeStore]:
    """Open SqsStores on this test's queue (extra URL options appended); closed at teardown."""
    opened: list[SqsStore] = []

    def make(options: str = "", **kwargs: Any) -> SqsStore:
        store = SqsStore.from_url(sqs_store_url + options, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def sqs(moto_endpoint: str, aws_credentials: dict[str, str]) -> Iterator[Any]:
    """A plain boto3 SQS client on the moto endpoint, to look behind the store's back."""
    client = boto3.client("sqs", region_name="eu-west-1", endpoint_url=moto_endpoint)
    yield client
    client.close()


def name_of(url: str) -> str:
    return url.split("://", 1)[1].split("?", 1)[0]


def attributes(sqs: Any, queue_url: str, *names: str) -> dict[str, str]:
    response = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=list(names))
    return dict(response.get("Attributes", {}))


def http_task(path: str = "/x", **kwargs: Any) -> Task:
    return Task(offload.http("POST", f"http://127.0.0.1:9{path}", **kwargs))


def letter_for(task: Task, **fields: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "id": f"L-{task.id}",
        "task_id": task.id,
        "description": "POST http://127.0.0.1:9/x",
        "key": task.key,
        "attempts": task.attempts,
        "error": "HTTP 500",
        "status": 500,
        "reason": "exhausted",
        "first_attempt_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        "last_attempt_at": datetime(2026, 1, 2, 3, 9, 5, tzinfo=timezone.utc),
    }
    values.update(fields)
    return DeadLetter(**values)


def claim_within(store: SqsStore, seconds: float, limit: int = 10, **kwargs: Any) -> list[Task]:
    """Claim until something comes (each claim long-polls for up to a second) or time is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tasks = store.claim(limit, **kwargs)
        if tasks:
            return tasks
    return []


# -- opening ---------------------------------------------------------------------------------


def test_open_store_makes_an_sqs_store_that_is_durable(sqs_store_url: str) -> None:
    store = open_store(sqs_store_url)
    try:
        assert isinstance(store, SqsStore)
        assert isinstance(store, DurableStore)
        assert store.durable is True
        assert store.leases_on_put is False
        assert store.url == sqs_store_url
    finally:
        store.close()


def test_missing_queues_are_created_with_a_redrive_policy(make_store: MakeStore, sqs: Any) -> None:
    store = make_store("&max_receives=4")
    assert store.dlq == f"{store.name}-dlq"
    main = sqs.get_queue_url(QueueName=store.name)["QueueUrl"]
    dlq = sqs.get_queue_url(QueueName=store.dlq)["QueueUrl"]
    attrs = attributes(sqs, main, "RedrivePolicy", "MessageRetentionPeriod", "SqsManagedSseEnabled")
    dlq_arn = attributes(sqs, dlq, "QueueArn")["QueueArn"]
    assert json.loads(attrs["RedrivePolicy"]) == {
        "deadLetterTargetArn": dlq_arn,
        "maxReceiveCount": 4,
    }
    assert attrs["MessageRetentionPeriod"] == "1209600"
    assert attrs["SqsManagedSseEnabled"] == "true"
    assert attributes(sqs, dlq, "MessageRetentionPeriod")["MessageRetentionPeriod"] == "1209600"


def test_existing_queues_are_used_as_they_are(sqs_store_url: str, sqs: Any) -> None:
    name = name_of(sqs_store_url)
    dlq = sqs.create_queue(QueueName=f"{name}-graveyard")["QueueUrl"]
    arn = attributes(sqs, dlq, "QueueArn")["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": 3})
    main = sqs.create_queue(QueueName=name, Attributes={"RedrivePolicy": policy})["QueueUrl"]
    store = SqsStore.from_url(sqs_store_url)
    try:
        assert store.dlq == f"{name}-graveyard"  # the redrive policy's target, not NAME-dlq
        assert (
            json.loads(attributes(sqs, main, "RedrivePolicy")["RedrivePolicy"])["maxReceiveCount"]
            == 3
        )
        names = [u.rsplit("/", 1)[1] for u in sqs.list_queues(QueueNamePrefix=name)["QueueUrls"]]
        assert sorted(names) == [name, f"{name}-graveyard"]
    finally:
        store.close()
    with pytest.raises(StoreError, match=r"graveyard.*dlq=other"):
        SqsStore.from_url(sqs_store_url + "&dlq=other")


def test_create_false_refuses_a_missing_queue(sqs_store_url: str, sqs: Any) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        SqsStore.from_url(sqs_store_url + "&create=false")
    assert "QueueUrls" not in sqs.list_queues(QueueNamePrefix=name_of(sqs_store_url))


def test_a_queue_without_redrive_policy_gets_the_named_dlq(sqs_store_url: str, sqs: Any) -> None:
    name = name_of(sqs_store_url)
    main = sqs.create_queue(QueueName=name)["QueueUrl"]
    store = SqsStore.from_url(sqs_store_url + f"&dlq={name}-dead")
    try:
        assert store.dlq == f"{name}-dead"
        sqs.get_queue_url(QueueName=f"{name}-dead")  # created
        assert "RedrivePolicy" not in attributes(sqs, main, "RedrivePolicy")  # not modified
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqs://", "expected sqs://QUEUE-NAME"),
        ("sqs://name/path", "expected sqs://QUEUE-NAME"),
        ("sqs://jobs.fifo", "standard queues only"),
        ("sqs://" + "q" * 81, "1 to 80"),
        ("sqs://user:secret@jobs", "takes no credentials"),
        ("sqs://jobs?colour=red", "unknown sqs URL option 'colour'"),
        ("sqs://jobs?wait=21", "wait= must be a number from 0 to 20"),
        ("sqs://jobs?max_receives=0", "max_receives= must be an integer from 1"),
        ("sqs://jobs?max_receives=two", "max_receives= must be an integer"),
        ("sqs://jobs?create=maybe", "create= must be true or false"),
        ("sqs://jobs?region=", "region= is empty"),
        ("sqs://jobs?region=a&region=b", "given twice"),
        ("sqs://jobs?dlq=jobs", "must not be the queue itself"),
    ],
)
def test_bad_urls_are_refused_before_any_request(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SqsStore.from_url(url)


def test_bad_lease_timeout_from_the_environment_names_the_variable(
    sqs_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFLOAD_LEASE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="OFFLOAD_LEASE_TIMEOUT"):
        SqsStore.from_url(sqs_store_url)


def test_an_unreachable_endpoint_is_a_store_error_without_secrets(
    aws_credentials: dict[str, str],
) -> None:
    # Port 1 on 127.0.0.1: nothing listens, the connection is refused at once.
    with pytest.raises(StoreError, match="GetQueueUrl failed") as caught:
        SqsStore.from_url("sqs://jobs?region=eu-west-1&endpoint_url=http://127.0.0.1:1")
    text = str(caught.value)
    assert aws_credentials["AWS_SECRET_ACCESS_KEY"] not in text
    assert aws_credentials["AWS_ACCESS_KEY_ID"] not in text


def test_url_shown_hides_a_password_in_the_endpoint(aws_credentials: dict[str, str]) -> None:
    with pytest.raises(StoreError) as caught:
        SqsStore.from_url("sqs://jobs?region=eu-west-1&endpoint_url=http://u:hunter2@127.0.0.1:1")
    assert "hunter2" not in str(caught.value)
    assert "u:***@127.0.0.1:1" in str(caught.value)


# -- tasks -----------------------------------------------------------------------------------


def test_put_and_claim_keep_ids_call_and_attempt_state(make_store: MakeStore) -> None:
    web, worker = make_store(), make_store()
    task = http_task(json={"text": "naïve 😀 \ud800 \ufffe \x00"}, headers={"X-Trace": "1"})
    web.put(task, lease=False)
    fn_task = Task(greet, ("ada",), {"punctuation": "?"}, key="greetings")
    web.put(fn_task, lease=False)

    claimed = {t.id: t for t in claim_within(worker, 10, limit=2)}
    if len(claimed) < 2:
        claimed.update({t.id: t for t in claim_within(worker, 10)})
    assert set(claimed) == {task.id, fn_task.id}
    got = claimed[task.id]
    assert got.call == task.call  # lone surrogate and U+FFFE intact: the body is ASCII JSON
    assert got.idempotency_key == task.idempotency_key and got.key == task.key
    got_fn = claimed[fn_task.id]
    assert (
        got_fn.call is greet and got_fn.args == ("ada",) and got_fn.kwargs == {"punctuation": "?"}
    )
    assert got_fn.key == "greetings"
    assert got_fn.call(*got_fn.args, **got_fn.kwargs) == "hello ada?"


def test_attempt_state_travels_with_a_released_task(make_store: MakeStore, sqs: Any) -> None:
    one, other = make_store(), make_store()
    task = http_task()
    one.put(task, lease=False)
    [held] = claim_within(one, 10)
    held.progress.attempts, held.progress.failures = 3, 2
    held.progress.first_attempt_at, held.progress.last_attempt_at = (
        1_700_000_000.5,
        1_700_000_100.25,
    )
    one.release(held, due=time.time())  # due now: any worker may take it
    [again] = claim_within(other, 10)
    assert again.id == task.id
    assert (again.attempts, again.progress.failures) == (3, 2)
    assert (again.progress.first_attempt_at, again.progress.last_attempt_at) == (
        1_700_000_000.5,
        1_700_000_100.25,
    )
    assert one.counts().leased == 1 and one.counts().ready == 0  # only `other`'s lease


def test_release_delays_the_task_by_sqs_delay_seconds(make_store: MakeStore) -> None:
    store = make_store()
    store.put(http_task(), lease=False)
    [task] = claim_within(store, 10)
    store.release(task, due=time.time() + 120)
    counts = store.counts()
    assert (counts.ready, counts.delayed, counts.leased) == (0, 1, 0)
    assert store.claim(10) == []
    next_due = store.next_due()
    assert next_due is not None and next_due > time.time()


def test_a_delay_beyond_fifteen_minutes_is_carried_and_resent(
    make_store: MakeStore, sqs: Any
) -> None:
    store = make_store()
    queue = sqs.get_queue_url(QueueName=store.name)["QueueUrl"]
    task = http_task()
    store.put(task, lease=False)
    [held] = claim_within(store, 10)
    store.release(held, due=time.time() + 3600)
    # Sent with SQS's longest delay and the due time in the body. A worker that gets it
    # early (here: the same record sent with no delay) sends it on instead of running it.
    record = task_record(held, due=time.time() + 3000)
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(record))
    assert claim_within(store, 3) == []
    counts = store.counts()
    assert (counts.ready, counts.delayed, counts.leased) == (0, 2, 0)


def test_put_with_lease_is_refused(make_store: MakeStore) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="lease=False and claim it like any worker"):
        store.put(http_task(), lease=True)
    assert store.counts().ready == 0


def test_a_task_too_large_for_the_queue_is_refused_at_put(sqs_store_url: str, sqs: Any) -> None:
    name = name_of(sqs_store_url)
    sqs.create_queue(QueueName=name, Attributes={"MaximumMessageSize": "8192"})
    store = SqsStore.from_url(sqs_store_url)
    try:
        store.put(http_task(json={"note": "x" * 3000}), lease=False)  # fits in 8192 - 4096
        with pytest.raises(NotSerializable, match=r"MaximumMessageSize.*reference") as caught:
            store.put(http_task(json={"note": "x" * 5000}), lease=False)
        assert "4,096" in str(caught.value)
        assert store.counts().ready == 1
    finally:
        store.close()


def test_a_per_task_policy_travels_and_code_is_refused(make_store: MakeStore) -> None:
    store = make_store()
    policy = RetryPolicy(stop=tenacity.stop_after_attempt(2), max_throttled=60.0)
    store.put(Task(greet, ("ada",), retry=policy), lease=False)
    [task] = claim_within(store, 10)
    assert task.retry is not None and task.retry.max_throttled == 60.0
    assert task.retry.stop.max_attempt_number == 2  # type: ignore[attr-defined]
    custom = RetryPolicy(stop=tenacity.stop_when_event_set(threading.Event()))
    with pytest.raises(NotSerializable, match="stop"):
        store.put(Task(greet, ("ada",), retry=custom), lease=False)
    with pytest.raises(NotSerializable, match="lambda"):
        store.put(Task(lambda: None), lease=False)
    assert store.counts().ready == 0


def test_a_leased_task_is_hidden_until_its_lease_runs_out(make_store: MakeStore) -> None:
    crashed, survivor = make_store(lease_timeout=1), make_store(lease_timeout=1)
    task = http_task()
    crashed.put(task, lease=False)
    [held] = claim_within(crashed, 10)
    assert held.id == task.id
    assert survivor.claim(10) == []  # leased (one second's long poll, nothing)
    # `crashed` never completes it: after the lease SQS delivers it to the survivor.
    [again] = claim_within(survivor, 10)
    assert again.id == task.id
    survivor.complete(again)
    counts = survivor.counts()
    assert (counts.ready, counts.delayed, counts.leased) == (0, 0, 0)


def test_renew_keeps_a_lease_beyond_its_timeout(make_store: MakeStore) -> None:
    holder, other = make_store(lease_timeout=2), make_store(lease_timeout=2)
    holder.put(http_task(), lease=False)
    [held] = claim_within(holder, 10)
    taken_at = time.monotonic()
    # For five seconds (well past two leases) the holder renews and the other finds nothing.
    while time.monotonic() - taken_at < 5:
        holder.renew([held])
        assert other.claim(10) == []
    holder.complete(held)
    assert holder.counts().leased == 0


def test_a_second_delivery_to_the_holder_is_not_handed_out_twice(make_store: MakeStore) -> None:
    store = make_store(lease_timeout=1)
    store.put(http_task(), lease=False)
    [held] = claim_within(store, 10)
    # The lease runs out while "still performing": SQS delivers the message again.
    deadline = time.monotonic() + 10
    while store.counts().ready == 0 and time.monotonic() < deadline:
        store.claim(10)  # long-polls; returns nothing, the task is already held here
    assert store.claim(10) == []
    store.complete(held)  # deletes with the latest receipt handle
    counts = store.counts()
    assert (counts.ready, counts.delayed, counts.leased) == (0, 0, 0)


def test_complete_of_a_task_not_leased_here_only_logs(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    store.complete(http_task())
    assert "not leased" in caplog.text


def test_excluded_keys_go_back_with_a_delay_and_a_fresh_receive_count(
    make_store: MakeStore, sqs: Any
) -> None:
    store = make_store()
    queue = sqs.get_queue_url(QueueName=store.name)["QueueUrl"]
    closed = http_task("/closed")  # key http://127.0.0.1:9
    other = Task(greet, ("ada",), key="greetings")
    store.put(closed, lease=False)
    store.put(other, lease=False)
    claimed: list[Task] = []
    deadline = time.monotonic() + 10
    while store.counts().ready and time.monotonic() < deadline:
        claimed += store.claim(10, exclude_keys={closed.key: time.time() + 60})
    assert [t.id for t in claimed] == [other.id]
    counts = store.counts()
    assert (counts.ready, counts.delayed, counts.leased) == (0, 1, 1)
    # Sent again as a new message (receive count 0), not hidden with ChangeMessageVisibility,
    # so that the redrive policy counts only workers that died holding it.
    sqs.set_queue_attributes(QueueUrl=queue, Attributes={"DelaySeconds": "0"})
    peek = sqs.receive_message(
        QueueUrl=queue, VisibilityTimeout=0, MessageSystemAttributeNames=["All"]
    )
    assert "Messages" not in peek  # still delayed: about 60 s, the gate's reopening time


def test_concurrent_claims_deliver_every_task_and_leave_nothing(make_store: MakeStore) -> None:
    # At least once, not exactly once: a standard queue may deliver a message twice (and
    # moto's server may too, to two concurrent receives), so duplicates are allowed here.
    web = make_store()
    tasks = [http_task(f"/n{i}") for i in range(40)]
    for task in tasks:
        web.put(task, lease=False)
    workers = [make_store("&wait=0"), make_store("&wait=0")]  # stop at the first empty answer
    got: list[str] = []
    lock = threading.Lock()

    def drain(store: SqsStore) -> None:
        while True:
            batch = store.claim(4)
            if not batch:
                return
            with lock:
                got.extend(t.id for t in batch)
            for task in batch:
                store.complete(task)

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(got) == {t.id for t in tasks}
    counts = web.counts()
    assert (counts.ready, counts.delayed, counts.leased) == (0, 0, 0)


# -- dead letters ----------------------------------------------------------------------------


def test_bury_keeps_offloads_record_and_listing_hides_nothing(
    make_store: MakeStore, sqs: Any
) -> None:
    store, elsewhere = make_store(), make_store()
    dlq = sqs.get_queue_url(QueueName=store.dlq)["QueueUrl"]
    buried = []
    for path in ("/a", "/b"):
        store.put(http_task(path), lease=False)
    for held in claim_within(store, 10) + claim_within(store, 2):
        held.progress.attempts = 5
        letter = letter_for(held, description=f"POST {held.call.url}")
        store.bury(held, letter)
        buried.append(letter)
    assert len(buried) == 2
    counts = store.counts()
    assert (counts.ready, counts.leased, counts.dead_letters) == (0, 0, 2)

    first = store.dead_letters()
    assert sorted(first, key=lambda d: d.id) == sorted(buried, key=lambda d: d.id)
    # Listing neither consumes nor hides: all visible again, and another process sees them.
    assert attributes(sqs, dlq, "ApproximateNumberOfMessages")["ApproximateNumberOfMessages"] == "2"
    assert sorted(d.id for d in elsewhere.dead_letters()) == sorted(d.id for d in buried)
    assert len(store) == 2


def send_copies(sqs: Any, dlq: str, body: str) -> None:
    """Ten messages of one letter body, two of them in one SentTimestamp millisecond."""
    for _ in range(5):  # moto stamps each of a batch in turn: two may share a millisecond
        entries = [{"Id": str(i), "MessageBody": body} for i in range(10)]
        sqs.send_message_batch(QueueUrl=dlq, Entries=entries)
        sent = [
            m["Attributes"]["SentTimestamp"]
            for m in sqs.receive_message(
                QueueUrl=dlq,
                MaxNumberOfMessages=10,
                VisibilityTimeout=0,
                AttributeNames=["SentTimestamp"],
            )["Messages"]
        ]
        if len(set(sent)) < len(sent):
            return
        sqs.purge_queue(QueueUrl=dlq)
    pytest.fail("no two messages of a batch shared a millisecond")


@pytest.mark.parametrize("remove", ["discard", "replay", "revive"])
def test_copies_of_a_letter_are_one_dead_letter(
    make_store: MakeStore, sqs: Any, remove: str
) -> None:
    """A bury whose send SQS took but whose answer was lost is sent again: messages with
    one letter id, maybe in one millisecond. They are one dead letter, as in every other
    store: listed, paged and counted once, and removed together (a discard that left a
    copy would show the letter again)."""
    store = make_store()
    dlq = sqs.get_queue_url(QueueName=store.dlq)["QueueUrl"]
    task = http_task()
    letter = letter_for(task)
    send_copies(sqs, dlq, letter_body(task, letter))
    other = http_task("/other")
    store.put(other, lease=False)
    [held] = claim_within(store, 10)
    store.bury(held, letter_for(held))
    assert sorted(d.id for d in store.dead_letters()) == sorted([letter.id, f"L-{other.id}"])
    page = store.dead_letter_page(LetterQuery(), limit=1)
    seen = list(page.letters)
    while page.cursor is not None:
        page = store.dead_letter_page(LetterQuery(), limit=1, cursor=page.cursor)
        seen += page.letters
    assert page.total == 2 and sorted(d.id for d in seen) == sorted([letter.id, f"L-{other.id}"])
    assert store.dead_letter_tally().total == 2
    getattr(store, remove)(letter.id)
    assert [d.id for d in store.dead_letters()] == [f"L-{other.id}"]
    with pytest.raises(UnknownDeadLetter):
        store.discard(letter.id)
    if remove == "replay":  # sent back once, not once a copy
        assert [t.id for t in claim_within(store, 2)] == [task.id]
        assert claim_within(store, 0.5) == []


def test_long_errors_are_clipped_in_the_record(make_store: MakeStore) -> None:
    store = make_store()
    store.put(http_task(), lease=False)
    [held] = claim_within(store, 10)
    store.bury(held, letter_for(held, error="E" * 5000))
    [letter] = store.dead_letters()
    assert len(letter.error) == 1000 and letter.error.endswith("…")


def test_replay_sends_back_with_a_fresh_budget_then_deletes(make_store: MakeStore) -> None:
    store = make_store()
    task = http_task()
    store.put(task, lease=False)
    [held] = claim_within(store, 10)
    held.progress.attempts = 5
    store.bury(held, letter_for(held))
    replayed = store.replay(f"L-{task.id}")
    assert replayed.id == task.id and replayed.idempotency_key == task.idempotency_key
    assert replayed.attempts == 0
    assert store.dead_letters() == []
    [again] = claim_within(store, 10)
    assert again.id == task.id and again.attempts == 0 and again.progress.first_attempt_at is None
    with pytest.raises(UnknownDeadLetter):
        store.replay(f"L-{task.id}")


def test_revive_removes_and_returns_the_task_with_its_letter(make_store: MakeStore) -> None:
    store = make_store()
    task = Task(greet, ("ada",))
    store.put(task, lease=False)
    [held] = claim_within(store, 10)
    held.progress.attempts = 2
    letter = letter_for(held, reason="permanent", status=None)
    store.bury(held, letter)
    revived = store.revive(letter.id)
    assert revived.id == task.id and revived.call is greet and revived.attempts == 2
    assert revived.progress.letter == letter
    assert store.dead_letters() == [] and len(store) == 0


def test_discard_and_purge(make_store: MakeStore) -> None:
    store = make_store()
    ids = []
    for i in range(13):
        store.put(http_task(f"/p{i}"), lease=False)
    held: list[Task] = []
    while len(held) < 13:
        held += claim_within(store, 10)
    for task in held:
        store.bury(task, letter_for(task))
        ids.append(f"L-{task.id}")
    store.discard(ids[0])
    with pytest.raises(UnknownDeadLetter, match=ids[0]):
        store.discard(ids[0])
    assert sorted(d.id for d in store.dead_letters()) == sorted(ids[1:])
    assert store.purge() == 12
    assert store.dead_letters() == [] and store.purge() == 0


def test_messages_moved_by_the_redrive_policy_are_listed_and_replayable(
    make_store: MakeStore,
) -> None:
    # max_receives=1: the first worker to die holding the task is the last.
    died, other = make_store("&max_receives=1", lease_timeout=1), make_store(lease_timeout=1)
    task = http_task()
    died.put(task, lease=False)
    [held] = claim_within(died, 10)
    held.progress.attempts = 1
    # The lease runs out; at the next receive SQS moves the message to the DLQ.
    deadline = time.monotonic() + 10
    while len(other) == 0 and time.monotonic() < deadline:
        assert other.claim(10) == []
    [letter] = other.dead_letters()
    assert letter.reason == "exhausted" and letter.error == "moved by the SQS redrive policy"
    assert letter.task_id == task.id and letter.description == "POST http://127.0.0.1:9/x"
    assert letter.key == task.key and letter.status is None
    replayed = other.replay(letter.id)
    assert replayed.id == task.id
    [again] = claim_within(other, 10)
    assert again.id == task.id


def test_a_message_that_is_not_a_task_dead_letters_itself_and_is_kept(
    make_store: MakeStore, sqs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    queue = sqs.get_queue_url(QueueName=store.name)["QueueUrl"]
    stray_id = sqs.send_message(QueueUrl=queue, MessageBody="hello, not JSON")["MessageId"]
    record = task_record(Task(greet, ("ada",)))
    record["call"] = record["call"].replace("test_sqs:greet", "test_sqs:deployed_later")
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(record))
    claimed: list[Task] = []
    while len(claimed) < 2:
        got = claim_within(store, 10)
        assert got
        claimed += got
    by_id = {t.id: t for t in claimed}
    assert set(by_id) == {stray_id, record["id"]}
    # The worker performs them like any task: they raise GiveUp, so they are buried.
    for task in claimed:
        with pytest.raises(GiveUp) as caught:
            task.call(*task.args, **task.kwargs)
        store.bury(task, letter_for(task, reason="permanent", error=str(caught.value)))
    letters = {d.task_id: d for d in store.dead_letters()}
    assert "not an offload message" in letters[stray_id].error
    assert "test_sqs:deployed_later" in letters[record["id"]].error
    # Once the function exists where the worker runs, the replay performs it.
    monkeypatch.setattr(sys.modules[__name__], "deployed_later", greet, raising=False)
    store.replay(letters[record["id"]].id)
    [again] = claim_within(store, 10)
    assert again.id == record["id"] and again.call is greet and again.args == ("ada",)


def test_a_foreign_message_in_the_dlq_is_listed_not_lost(make_store: MakeStore, sqs: Any) -> None:
    store = make_store()
    dlq = sqs.get_queue_url(QueueName=store.dlq)["QueueUrl"]
    message_id = sqs.send_message(QueueUrl=dlq, MessageBody="{}")["MessageId"]
    [letter] = store.dead_letters()
    assert letter.id == message_id and letter.reason == "permanent"
    assert letter.description == "(unreadable message)"
    store.discard(message_id)
    assert len(store) == 0
