"""An Offloader over the SQS store, in one process: the durable path against a real endpoint
(moto's ThreadedMotoServer on 127.0.0.1) and a real HTTP server (ScriptedServer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import boto3
import pytest
import tenacity

import offload
from offload import Offloader, RetryPolicy
from offload.stores.sqs import SqsStore
from server import Answer, ScriptedServer

MakeOffloader = Callable[..., Offloader]

FAST = RetryPolicy(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_fixed(0.1))


def counts_of(url: str) -> tuple[int, int, int, int]:
    store = SqsStore.from_url(url)
    try:
        c = store.counts()
        return c.ready, c.delayed, c.leased, c.dead_letters
    finally:
        store.close()


def test_calls_are_delivered_and_a_failing_one_is_dead_lettered(
    sqs_store_url: str, server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    server.script("/fail", Answer(503))
    off = make_offloader(store=sqs_store_url, retry=FAST)
    for i in range(8):
        off.enqueue_task(offload.http("POST", server.url("/ok"), json={"i": i}))
    failing = off.enqueue_task(offload.http("POST", server.url("/fail")))
    assert off.flush(60)
    assert server.wait_for(8, path="/ok") and len(server.requests_to("/fail")) == 3
    [letter] = off.dead_letters()
    assert (letter.task_id, letter.attempts, letter.status, letter.reason) == (
        failing.id,
        3,
        503,
        "exhausted",
    )
    stats = off.stats()
    assert (stats.enqueued, stats.succeeded, stats.dead_lettered) == (9, 8, 1)
    # The durable ledger: what this process took from the store, it settled or gave back.
    assert stats.claimed == (
        stats.succeeded + stats.dead_lettered + stats.released + stats.queued + stats.in_flight
    )
    assert counts_of(sqs_store_url) == (0, 0, 0, 1)

    server.script("/fail", Answer(200))
    replayed = off.replay(letter.id)
    assert replayed.id == failing.id
    assert off.flush(60)
    assert server.wait_for(4, path="/fail")
    assert off.dead_letters() == []
    assert counts_of(sqs_store_url) == (0, 0, 0, 0)


def test_a_throttled_api_waits_its_retry_after_while_another_flows(
    sqs_store_url: str, server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    other = ScriptedServer()
    try:
        server.script("/a", Answer(429, headers={"Retry-After": "2"}), Answer(200))
        off = make_offloader(store=sqs_store_url, retry=FAST, workers=2)
        off.enqueue_task(offload.http("POST", server.url("/a")))
        assert server.wait_for(1, path="/a", timeout=30)
        for i in range(4):
            off.enqueue_task(offload.http("POST", server.url("/b"), json={"i": i}))
            off.enqueue_task(offload.http("POST", other.url("/c"), json={"i": i}))
        assert off.flush(60)
        assert other.wait_for(4, path="/c") and server.wait_for(4, path="/b")
        throttled = server.requests_to("/a")[0]
        later = server.requests_to("/a")[1:] + server.requests_to("/b")
        assert len(later) == 5
        # Never earlier than the API asked: the gate held the key's calls, wherever they were.
        assert min(r.at for r in later) - throttled.at >= 2.0
        assert off.stats().succeeded == 9
        assert counts_of(sqs_store_url) == (0, 0, 0, 0)
    finally:
        other.close()


def test_a_message_that_is_not_offloads_is_dead_lettered_not_stuck(
    sqs_store_url: str,
    moto_endpoint: str,
    server: ScriptedServer,
    make_offloader: MakeOffloader,
) -> None:
    off = make_offloader(store=sqs_store_url, retry=FAST)
    store: Any = off.store
    sqs = boto3.client("sqs", region_name="eu-west-1", endpoint_url=moto_endpoint)
    try:
        queue = sqs.get_queue_url(QueueName=store.name)["QueueUrl"]
        stray = sqs.send_message(QueueUrl=queue, MessageBody="<order id=7/>")["MessageId"]
    finally:
        sqs.close()
    off.enqueue_task(offload.http("POST", server.url("/ok")))
    assert server.wait_for(1, path="/ok", timeout=30)
    assert off.flush(60)
    [letter] = off.dead_letters()
    assert letter.task_id == stray and letter.reason == "permanent"
    assert "unreadable" in letter.error
    assert off.stats().succeeded == 1


def test_consume_false_only_enqueues(
    sqs_store_url: str, server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    web = make_offloader(store=sqs_store_url, consume=False)
    for i in range(3):
        web.enqueue_task(offload.http("POST", server.url("/later"), json={"i": i}))
    assert not web.running
    assert counts_of(sqs_store_url) == (3, 0, 0, 0)
    assert server.requests == []
    # A consuming process (a worker) performs them.
    worker = make_offloader(store=sqs_store_url)
    assert worker.flush(60)
    assert server.wait_for(3, path="/later")
    assert counts_of(sqs_store_url) == (0, 0, 0, 0)


def test_a_task_too_large_for_sqs_is_refused_at_enqueue(
    sqs_store_url: str, moto_endpoint: str, make_offloader: MakeOffloader
) -> None:
    sqs = boto3.client("sqs", region_name="eu-west-1", endpoint_url=moto_endpoint)
    try:
        name = sqs_store_url.split("://", 1)[1].split("?", 1)[0]
        sqs.create_queue(QueueName=name, Attributes={"MaximumMessageSize": "262144"})
    finally:
        sqs.close()
    off = make_offloader(store=sqs_store_url, consume=False)
    with pytest.raises(offload.NotSerializable, match="MaximumMessageSize"):
        off.enqueue_task(offload.http("POST", "http://127.0.0.1:9/x", data="x" * 300_000))
    assert off.stats().enqueued == 0
    assert counts_of(sqs_store_url) == (0, 0, 0, 0)
