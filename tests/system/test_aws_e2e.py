"""offload.aws and boto3 errors through a real Offloader: moto, and botocore's Stubber."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
import tenacity
from botocore.stub import Stubber
from moto import mock_aws

import offload
from offload import Offloader, RetryPolicy, Task
from offload.testing import FakeClock
from server import Answer, ScriptedServer

MakeOffloader = Callable[..., Offloader]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield


def test_aws_call_performed_by_the_worker(aws_env: None, make_offloader: MakeOffloader) -> None:
    sqs = boto3.client("sqs", region_name="eu-west-1")
    url = sqs.create_queue(QueueName="orders")["QueueUrl"]
    off = make_offloader()
    task = off.enqueue_task(
        offload.aws("sqs", "SendMessage", region="eu-west-1", QueueUrl=url, MessageBody="hi")
    )
    assert task.key == "aws:sqs:eu-west-1:send_message"
    assert off.flush(10)
    assert off.stats().succeeded == 1
    messages = sqs.receive_message(QueueUrl=url).get("Messages", [])
    assert [m["Body"] for m in messages] == ["hi"]


def test_aws_permanent_error_dead_letters_with_code(
    aws_env: None, make_offloader: MakeOffloader
) -> None:
    off = make_offloader()
    off.enqueue_task(
        offload.aws(
            "sqs",
            "send_message",
            region="eu-west-1",
            QueueUrl="https://sqs.eu-west-1.amazonaws.com/123456789012/missing",
            MessageBody="x",
        )
    )
    assert off.flush(10)
    [letter] = off.dead_letters()
    assert letter.reason == "permanent" and letter.attempts == 1
    assert letter.description == "sqs.send_message"


def test_glue_concurrent_runs_exceeded_is_a_throttle_not_a_failure(
    aws_env: None, make_offloader: MakeOffloader
) -> None:
    # Glue answers ConcurrentRunsExceededException for as long as the previous run lasts:
    # offload keeps trying past the 5-attempt budget, each time after the backoff, and
    # start_job_run goes through once the run has finished.
    glue = boto3.client("glue", region_name="eu-west-1")
    stubber = Stubber(glue)
    for _ in range(7):
        stubber.add_client_error(
            "start_job_run",
            service_error_code="ConcurrentRunsExceededException",
            service_message="Concurrent runs exceeded for nightly",
            http_status_code=400,
        )
    stubber.add_response("start_job_run", {"JobRunId": "jr_1"}, {"JobName": "nightly"})
    stubber.activate()
    clock = FakeClock()
    called = threading.Semaphore(0)
    results: list[Any] = []

    def start() -> dict[str, Any]:
        try:
            return glue.start_job_run(JobName="nightly")
        finally:
            called.release()

    off = make_offloader(
        clock=clock,
        retry=RetryPolicy(wait=tenacity.wait_fixed(20)),
        on_success=lambda task, result: results.append(result),
    )
    off.enqueue_task(Task(start, key="aws:glue:eu-west-1:start_job_run"))
    assert called.acquire(timeout=5)
    for _ in range(7):
        assert off.stats().delayed == 1
        clock.advance(21)
        assert called.acquire(timeout=5)
    assert off.flush(5)
    assert results and results[0]["JobRunId"] == "jr_1"
    s = off.stats()
    assert (s.retried, s.succeeded, s.dead_lettered) == (7, 1, 0)
    stubber.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("code", "status", "throttled", "kind"),
    [
        ("ThrottlingException", 400, True, "retry"),
        ("ProvisionedThroughputExceededException", 400, True, "retry"),
        ("SlowDown", 503, True, "retry"),
        ("InternalFailure", 500, False, "retry"),
        ("AccessDeniedException", 403, False, "permanent"),
    ],
)
def test_stubbed_client_errors_through_the_worker(
    aws_env: None, make_offloader: MakeOffloader, code: str, status: int, throttled: bool, kind: str
) -> None:
    ddb = boto3.client("dynamodb", region_name="eu-west-1")
    stubber = Stubber(ddb)
    stubber.add_client_error("get_item", service_error_code=code, http_status_code=status)
    stubber.add_response("get_item", {})
    stubber.activate()
    retries: list[str | None] = []
    off = make_offloader(
        retry=RetryPolicy(wait=tenacity.wait_none()),
        on_retry=lambda task, delay, error: retries.append(error),
    )
    off.enqueue_task(
        Task(ddb.get_item, kwargs={"TableName": "t", "Key": {"k": {"S": "1"}}}, key="ddb")
    )
    assert off.flush(10)
    if kind == "retry":
        assert off.stats().succeeded == 1 and len(retries) == 1 and code in (retries[0] or "")
    else:
        [letter] = off.dead_letters()
        assert letter.reason == "permanent" and code in letter.error and letter.status == status


@pytest.fixture
def aws_server(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> ScriptedServer:
    """Real boto3 clients, with botocore's real models, talking to the scripted server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.base_url)
    return server


def _aws_error(code: str, status: int = 400) -> Answer:
    body = json.dumps({"__type": code, "message": f"{code} from the test"}).encode()
    return Answer(status, body, {"Content-Type": "application/x-amz-json-1.0"})


def test_an_error_the_operation_model_marks_retryable_is_retried(
    aws_server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    # DynamoDB's model marks PutItem's ReplicatedWriteConflictException retryable (not a
    # throttle): botocore's standard mode retries it, and so does offload, though its
    # status is a 400 and its code is in no list.
    aws_server.script("/", _aws_error("ReplicatedWriteConflictException"), Answer(200, b"{}"))
    retries: list[str | None] = []
    off = make_offloader(
        retry=RetryPolicy(wait=tenacity.wait_none()),
        on_retry=lambda task, delay, error: retries.append(error),
    )
    off.enqueue_task(
        offload.aws("dynamodb", "put_item", TableName="t", Item={"k": {"S": "1"}}),
    )
    assert off.flush(10)
    assert len(aws_server.requests_to("/")) == 2
    assert off.stats().succeeded == 1 and off.dead_letters() == []
    assert len(retries) == 1 and "ReplicatedWriteConflictException" in (retries[0] or "")


def test_a_code_the_operation_does_not_mark_retryable_stays_permanent(
    aws_server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    # GetItem's model lists no ReplicatedWriteConflictException: the model is the
    # operation's, not the service's.
    aws_server.script("/", _aws_error("ReplicatedWriteConflictException"), Answer(200, b"{}"))
    off = make_offloader(retry=RetryPolicy(wait=tenacity.wait_none()))
    off.enqueue_task(offload.aws("dynamodb", "get_item", TableName="t", Key={"k": {"S": "1"}}))
    assert off.flush(10)
    [letter] = off.dead_letters()
    assert letter.reason == "permanent" and letter.status == 400
    assert "ReplicatedWriteConflictException" in letter.error
    assert len(aws_server.requests_to("/")) == 1


def test_an_error_the_model_marks_a_throttle_is_throttled(
    aws_server: ScriptedServer, make_offloader: MakeOffloader
) -> None:
    # SageMaker's inference router marks ModelNotReadyException `"throttling": true`:
    # answered with a 400 (no 429 to go by), it is still a throttle, which uses no
    # attempts: one attempt allowed, and the call goes through on the third.
    path = "/inference-routers/r/invocations"
    aws_server.script(
        path,
        _aws_error("ModelNotReadyException"),
        _aws_error("ModelNotReadyException"),
        Answer(200, b"ok", {"Content-Type": "application/octet-stream"}),
    )
    throttled: list[str | None] = []
    off = make_offloader(
        retry=RetryPolicy(stop=tenacity.stop_after_attempt(1), wait=tenacity.wait_none()),
        on_retry=lambda task, delay, error: throttled.append(error),
    )
    off.enqueue_task(
        offload.aws(
            "sagemaker-inference-router-runtime",
            "invoke_inference_router",
            InferenceRouterName="r",
            RoutingTargetName="a",
            Body="{}",
        )
    )
    assert off.flush(10)
    assert off.stats().succeeded == 1 and off.dead_letters() == []
    assert len(aws_server.requests_to(path)) == 3
    assert len(throttled) == 2 and "ModelNotReadyException" in (throttled[0] or "")
