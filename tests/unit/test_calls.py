"""offload.calls: building, validating, describing, performing and storing calls."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import hypothesis
import pytest
import requests
import responses
from botocore.stub import Stubber
from hypothesis import strategies as st
from moto import mock_aws
from requests.auth import AuthBase, HTTPBasicAuth

from offload.calls import (
    DEFAULT_TIMEOUT,
    AwsCall,
    HttpCall,
    Resources,
    aws,
    default_key,
    describe_target,
    http,
)
from offload.calls import aws_call as aws_calls
from offload.codec.task import dump_call as task_to_json
from offload.codec.task import load_call as task_from_json
from offload.codec.trust import callable_path, resolve_callable
from offload.errors import NotSerializable
from offload.outcome import RETRY, classify_exception, classify_result
from server import Answer, ScriptedServer

SECRET = "s3cr3t-v4lue"
KEY = "6f1e0c8a-1d2b-4c3d-9e4f-5a6b7c8d9e0f"  # an idempotency key, as the engine makes them


@pytest.fixture
def resources() -> Iterator[Resources]:
    res = Resources()
    yield res
    res.close()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    for name in ("AWS_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# Module-level targets for the plain-callable tests.


def send_email(to: str, *, subject: str = "") -> str:
    return f"{to}:{subject}"


class Mailer:
    @classmethod
    def build(cls) -> str:
        return "built"

    @staticmethod
    def ping() -> str:
        return "pong"

    def send(self) -> None:
        pass


def decorated_elsewhere() -> None:
    pass


# --------------------------------------------------------------------------------------
# http(): building and validation


def test_http_builds_a_frozen_call_with_a_default_timeout() -> None:
    call = http("post", "https://api.example.com/charges", json={"amount": 100})
    assert call.method == "POST"
    assert call.kwargs["timeout"] == DEFAULT_TIMEOUT
    assert call.kwargs["json"] == {"amount": 100}
    assert call.idempotency_key is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.url = "https://elsewhere"  # type: ignore[misc]


def test_http_kwargs_cannot_be_mutated_after_build() -> None:
    headers = {"Accept": "application/json"}
    body = {"items": [1, 2]}
    call = http("POST", "https://h/x", headers=headers, json=body)
    headers["Accept"] = "text/html"
    body["items"].append(3)  # type: ignore[attr-defined]
    assert call.kwargs["headers"]["Accept"] == "application/json"
    assert list(call.kwargs["json"]["items"]) == [1, 2]
    with pytest.raises(TypeError):
        call.kwargs["timeout"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        call.kwargs["headers"]["Accept"] = "x"


def test_equal_calls_are_equal_and_hash_alike() -> None:
    a = http("GET", "https://h/x", params={"q": "1"})
    b = http("get", "https://h/x", params={"q": "1"})
    assert a == b and hash(a) == hash(b)
    assert a != http("GET", "https://h/x", params={"q": "2"})


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("TRACE", "https://h/x"), {}, ValueError, "method must be one of"),
        (("", "https://h/x"), {}, ValueError, "method"),
        ((b"GET", "https://h/x"), {}, TypeError, "method must be a str"),
        (("GET", b"https://h/x"), {}, TypeError, "url must be a str"),
        (("GET", ""), {}, ValueError, "url is empty"),
        (("GET", "ftp://h/x"), {}, ValueError, "scheme 'ftp'"),
        (("GET", "h/x"), {}, ValueError, "http:// or https://"),
        (("GET", "https:///x"), {}, ValueError, "no host"),
        (("GET", "https://h:99999/x"), {}, ValueError, "not a valid URL"),
        (("GET", "https://h/a b"), {}, ValueError, "whitespace"),
        (("GET", f"https://u:{SECRET}@h:bad/x"), {}, ValueError, "not a valid URL"),
        # A password with an unencoded `/`, `#` or `?`: urlsplit takes its start as a port.
        (("GET", f"https://u:Pa/{SECRET}@h/x"), {}, ValueError, "unencoded '/', '[?]' or '#'"),
        (("GET", f"https://u:Pa#{SECRET}@h/x"), {}, ValueError, "not a valid URL"),
        (("GET", f"https://u:{SECRET}?x@h/x"), {}, ValueError, "not a valid URL"),
        (("GET", "https://h/x"), {"stream": True}, TypeError, "'stream'.*whole response"),
        (("GET", "https://h/x"), {"hooks": {}}, TypeError, "'hooks'"),
        (("GET", "https://h/x"), {"header": {}}, TypeError, "did you mean 'headers'"),
        (("GET", "https://h/x"), {"max_retries": 3}, TypeError, "RetryPolicy"),
        (("GET", "https://h/x"), {"timeout": -1}, ValueError, "positive"),
        (("GET", "https://h/x"), {"timeout": 0}, ValueError, "positive"),
        (("GET", "https://h/x"), {"timeout": float("nan")}, ValueError, "finite"),
        (("GET", "https://h/x"), {"timeout": float("inf")}, ValueError, "finite"),
        (("GET", "https://h/x"), {"timeout": True}, TypeError, "number of seconds"),
        (("GET", "https://h/x"), {"timeout": "5"}, TypeError, "number of seconds"),
        (("GET", "https://h/x"), {"timeout": None}, ValueError, "hang"),
        (("GET", "https://h/x"), {"timeout": (5, None)}, ValueError, "timeout read=None"),
        (("GET", "https://h/x"), {"timeout": (None, 5)}, ValueError, "timeout connect=None"),
        (("GET", "https://h/x"), {"timeout": (1, 2, 3)}, ValueError, "pair"),
        (("GET", "https://h/x"), {"timeout": (1, -2)}, ValueError, "timeout read"),
        (("GET", "https://h/x"), {"headers": {"X-N": 1}}, TypeError, "'X-N' maps a str to a int"),
        (("GET", "https://h/x"), {"headers": [("A", "b")]}, TypeError, "mapping of str"),
        (("GET", "https://h/x"), {"headers": {"A": "b\r\nEvil: 1"}}, ValueError, "line break"),
        (("GET", "https://h/x"), {"headers": {"Bad Name": "1"}}, ValueError, "header name"),
        (("POST", "https://h/x"), {"json": {1: "a"}}, TypeError, "int key"),
        (
            ("POST", "https://h/x"),
            {"json": {"a": {1, 2}}},
            TypeError,
            r"json\['a'\] is a builtins.set",
        ),
        (("POST", "https://h/x"), {"json": float("nan")}, TypeError, "nan"),
        (("POST", "https://h/x"), {"json": {}, "data": "x"}, ValueError, "not both"),
        (("POST", "https://h/x"), {"data": iter([b"a"])}, TypeError, "sent again on retry"),
        (("POST", "https://h/x"), {"data": {"a": object()}}, TypeError, r"data\['a'\]"),
        (("POST", "https://h/x"), {"files": {"f": open}}, TypeError, "content must be bytes"),
        (("POST", "https://h/x"), {"auth": ("user",)}, TypeError, "pair"),
        (("POST", "https://h/x"), {"auth": "user:pw"}, TypeError, "auth must be"),
        (("GET", "https://h/x"), {"allow_redirects": "yes"}, TypeError, "allow_redirects"),
        (("GET", "https://h/x"), {"verify": 1}, TypeError, "verify"),
        (("GET", "https://h/x"), {"cert": ("a",)}, TypeError, "cert"),
        (("GET", "https://h/x"), {"cookies": {"a": 1}}, TypeError, "cookies"),
        (("GET", "https://h/x"), {"idempotency_key": ""}, ValueError, "non-empty"),
        (("GET", "https://h/x"), {"idempotency_key": "a\nb"}, ValueError, "one-line"),
        (("GET", "https://h/x"), {"idempotency_key": 1}, TypeError, "bool or a str"),
        (
            ("POST", "https://h/x"),
            {"idempotency_key": True, "headers": {"idempotency-key": "k"}},
            ValueError,
            "not both",
        ),
    ],
)
def test_http_rejects_bad_input_at_build_time(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        http(*args, **kwargs)
    assert SECRET not in str(info.value)


def test_a_file_body_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "body.bin"
    path.write_bytes(b"abc")
    with path.open("rb") as f, pytest.raises(TypeError, match="sent again on retry"):
        http("POST", "https://h/x", data=f)
    with path.open("rb") as f, pytest.raises(TypeError, match="read once"):
        http("POST", "https://h/x", files={"upload": ("body.bin", f)})


def test_accepted_inputs_are_normalised() -> None:
    call = http(
        "PATCH",
        "https://h/x",
        timeout=[2, 3.5],
        auth=HTTPBasicAuth("user", "pw"),
        cert=["c.pem", "k.pem"],
        params=[("a", "1"), ("a", "2")],
        data=b"raw",
        verify="/etc/ca.pem",
        headers=None,  # None means "not given", as in requests
        idempotency_key="order-42",
    )
    assert call.kwargs["timeout"] == (2.0, 3.5)
    assert call.kwargs["auth"] == ("user", "pw")
    assert call.kwargs["cert"] == ("c.pem", "k.pem")
    assert call.kwargs["params"] == (("a", "1"), ("a", "2"))
    assert "headers" not in call.kwargs
    assert call.idempotency_key == "order-42"


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(TypeError, match="stream"):
        HttpCall("GET", "https://h/x", {"stream": True})
    call = dataclasses.replace(http("GET", "https://h/x"), method="delete")
    assert call.method == "DELETE"


# --------------------------------------------------------------------------------------
# key, describe, repr


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://API.Example.com/v1/x?y=1", "https://api.example.com:443"),
        ("http://api.example.com/x", "http://api.example.com:80"),
        ("HTTP://api.example.com:8080/x", "http://api.example.com:8080"),
        ("https://u:pw@h.example:443/x", "https://h.example:443"),
        ("http://[::1]:9000/x", "http://[::1]:9000"),
        ("http://[::1]/x", "http://[::1]:80"),
    ],
)
def test_http_key(url: str, key: str) -> None:
    call = http("GET", url)
    assert call.key() == key
    assert default_key(call) == key


def test_describe_and_repr_never_show_secrets() -> None:
    call = http(
        "post",
        f"https://user:{SECRET}@api.example.com/x?token={SECRET}&page=2",
        params={"api_key": SECRET, "q": "shoes"},
        headers={"Authorization": f"Bearer {SECRET}", "X-Custom": SECRET},
        json={"card": SECRET},
        data=None,
        auth=("user", SECRET),
        idempotency_key=True,
    )
    assert call.describe() == (
        "POST https://user:***@api.example.com/x?token=***&page=2&api_key=***&q=shoes"
    )
    assert describe_target(call) == call.describe()
    for text in (repr(call), str(call), call.describe()):
        assert SECRET not in text
    assert "json" in repr(call) and "headers" in repr(call)


# --------------------------------------------------------------------------------------
# perform, with responses


@responses.activate
def test_perform_sends_the_request_once_with_a_timeout(resources: Resources) -> None:
    responses.add(responses.POST, "https://api.example.com/charges", json={"id": "ch_1"})
    call = http("POST", "https://api.example.com/charges", json={"amount": 100})
    result = call.perform(resources, KEY)
    assert result.status_code == 200 and result.json() == {"id": "ch_1"}
    [sent] = responses.calls
    assert json.loads(sent.request.body) == {"amount": 100}
    assert sent.request.req_kwargs["timeout"] == DEFAULT_TIMEOUT  # type: ignore[attr-defined]
    assert "Idempotency-Key" not in sent.request.headers


@responses.activate
def test_perform_passes_every_requests_keyword(resources: Resources) -> None:
    # allow_redirects=False: the 302 comes back instead of a GET to an unregistered URL.
    responses.add(responses.PUT, "https://h/x", status=302, headers={"Location": "https://h/y"})
    call = http(
        "PUT",
        "https://h/x",
        params={"q": "1"},
        data={"field": "v"},
        headers={"X-A": "1"},
        cookies={"c": "v"},
        timeout=2.5,
        allow_redirects=False,
        auth=("u", "p"),
    )
    assert call.perform(resources, KEY).status_code == 302
    [sent] = responses.calls
    assert sent.request.url == "https://h/x?q=1"
    assert sent.request.body == "field=v"
    assert sent.request.headers["X-A"] == "1"
    assert sent.request.headers["Cookie"] == "c=v"
    assert sent.request.headers["Authorization"].startswith("Basic ")
    assert sent.request.req_kwargs["timeout"] == 2.5  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("idempotency_key", "expected"), [(True, KEY), ("order-42", "order-42"), (False, None)]
)
@responses.activate
def test_perform_sends_the_idempotency_key(
    resources: Resources, idempotency_key: bool | str, expected: str | None
) -> None:
    responses.add(responses.POST, "https://h/charge")
    call = http("POST", "https://h/charge", headers={"X-A": "1"}, idempotency_key=idempotency_key)
    call.perform(resources, KEY)
    call.perform(resources, KEY)  # a retry sends the same key
    assert [c.request.headers.get("Idempotency-Key") for c in responses.calls] == [expected] * 2
    assert call.kwargs["headers"] == {"X-A": "1"}  # perform did not touch the call


@responses.activate
def test_head_does_not_follow_redirects(resources: Resources) -> None:
    responses.add(responses.HEAD, "https://h/x", status=301, headers={"Location": "https://h/y"})
    assert http("HEAD", "https://h/x").perform(resources, KEY).status_code == 301


@responses.activate
def test_perform_raises_what_requests_raises(resources: Resources) -> None:
    responses.add(responses.GET, "https://h/x", body=requests.ConnectionError("refused"))
    with pytest.raises(requests.ConnectionError):
        http("GET", "https://h/x").perform(resources, KEY)
    assert len(responses.calls) == 1


def test_resources_session_has_requests_retries_off(resources: Resources) -> None:
    session = resources.session()
    assert resources.session() is session
    for prefix in ("http://", "https://"):
        retries = session.get_adapter(prefix + "h").max_retries
        assert retries.total == 0 and not retries.read
    resources.close()
    assert resources.session() is not session


# --------------------------------------------------------------------------------------
# perform, end to end against a real server


def test_e2e_idempotency_key_header_and_keep_alive(
    server: ScriptedServer, resources: Resources
) -> None:
    server.script("/charge", Answer(502), Answer(200, body=b"ok"))
    call = http("POST", server.url("/charge"), json={"n": 1}, idempotency_key=True)
    first = call.perform(resources, KEY)
    second = call.perform(resources, KEY)
    assert (first.status_code, second.status_code, second.text) == (502, 200, "ok")
    assert classify_result(first).kind == RETRY
    sent = server.requests_to("/charge")
    assert [r.headers["Idempotency-Key"] for r in sent] == [KEY, KEY]
    assert all(r.body == b'{"n": 1}' for r in sent)
    assert server.connections_opened == 1  # the session pools the connection


def test_e2e_a_hanging_server_times_out_as_transient(
    server: ScriptedServer, resources: Resources
) -> None:
    release = threading.Event()
    server.script("/slow", Answer.hang(release))
    call = http("GET", server.url("/slow"), timeout=(2, 0.05))
    with pytest.raises(requests.Timeout) as info:
        call.perform(resources, KEY)
    outcome = classify_exception(info.value)
    assert (outcome.kind, outcome.throttled) == (RETRY, False)
    assert len(server.requests_to("/slow")) == 1  # requests did not retry on its own


def test_e2e_a_reset_is_transient_and_not_retried_by_requests(
    server: ScriptedServer, resources: Resources
) -> None:
    server.script("/reset", Answer.reset())
    with pytest.raises(requests.ConnectionError) as info:
        http("POST", server.url("/reset"), data=b"x").perform(resources, KEY)
    assert classify_exception(info.value).kind == RETRY
    assert server.wait_for(1, "/reset")
    assert len(server.requests_to("/reset")) == 1


def test_e2e_slow_answer_within_the_timeout(server: ScriptedServer, resources: Resources) -> None:
    server.script("/slowish", Answer(200, body=b"late", delay=0.05))
    assert http("GET", server.url("/slowish")).perform(resources, KEY).text == "late"


def test_e2e_a_refused_connection_is_transient(resources: Resources) -> None:
    # A port nothing listens on: bind, note it, close.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(requests.ConnectionError) as info:
        http("GET", f"http://127.0.0.1:{port}/x?token={SECRET}").perform(resources, KEY)
    outcome = classify_exception(info.value)
    assert outcome.kind == RETRY
    assert outcome.error is not None and SECRET not in outcome.error
    assert outcome.error.startswith("ConnectionError: ")


# --------------------------------------------------------------------------------------
# HttpCall JSON


def test_http_json_round_trip() -> None:
    call = http(
        "POST",
        "https://h/x?a=1",
        params=[("a", "1"), ("b", "2")],
        headers={"X-A": "1"},
        data=b"\x00\xffbinary",
        files={"doc": ("doc.txt", b"content", "text/plain")},
        auth=("u", "p"),
        timeout=3,
        idempotency_key="k-1",
    )
    record = json.loads(json.dumps(call.to_json()))
    assert HttpCall.from_json(record) == call
    json_body = http("POST", "https://h/x", json={"$bytes": "not bytes", "$dict": {"a": [1]}})
    assert HttpCall.from_json(json.loads(json.dumps(json_body.to_json()))) == json_body


def test_http_json_refuses_code_auth() -> None:
    class Signer(AuthBase):
        def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
            return r

    call = http("GET", "https://h/x", auth=Signer())
    with pytest.raises(NotSerializable, match="Signer"):
        call.to_json()
    with pytest.raises(NotSerializable, match="Signer"):
        task_to_json(call, (), {})


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.pop("url"), "missing"),
        (lambda r: r.update(extra=1), "unexpected"),
        (lambda r: r.update(type="aws"), "not a http target"),
        (lambda r: r.update(method="TRACE"), "method"),
        (lambda r: r.update(url="file:///etc/passwd"), "scheme"),
        (lambda r: r.update(kwargs=[]), "kwargs must be an object"),
        (lambda r: r["kwargs"].update(stream=True), "stream"),
        (lambda r: r["kwargs"].update(timeout=-1), "positive"),
        (lambda r: r["kwargs"].update(timeout=None), "hang"),
        (lambda r: r["kwargs"].update(data={"$bytes": "!!!"}), "base64"),
        (lambda r: r["kwargs"].update(data={"$bytes": 1}), "base64"),
        (lambda r: r.update(idempotency_key=3), "idempotency_key"),
    ],
)
def test_http_from_json_rejects_tampered_records(
    mutate: Callable[[dict[str, Any]], Any], match: str
) -> None:
    record = http("POST", "https://h/x", data=b"x").to_json()
    mutate(record)
    with pytest.raises(ValueError, match=match):
        HttpCall.from_json(record)


# --------------------------------------------------------------------------------------
# aws()


def test_aws_accepts_either_operation_spelling(aws_env: None) -> None:
    a = aws("glue", "StartJobRun", JobName="etl")
    b = aws("Glue", "start_job_run", JobName="etl")
    assert a == b and hash(a) == hash(b)
    assert (a.service, a.operation, a.region) == ("glue", "start_job_run", None)
    assert a.describe() == "glue.start_job_run" == describe_target(a)


def test_aws_key_resolves_the_region(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert aws("glue", "start_job_run", region="us-east-2").key() == (
        "aws:glue:us-east-2:start_job_run"
    )
    call = aws("glue", "start_job_run")
    assert call.key() == "aws:glue:eu-west-1:start_job_run"  # AWS_DEFAULT_REGION
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert call.key() == "aws:glue:ap-south-1:start_job_run"  # AWS_REGION first
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert default_key(call) == "aws:glue:default:start_job_run"


def test_aws_repr_hides_parameter_values(aws_env: None) -> None:
    call = aws("secretsmanager", "create_secret", Name="db", SecretString=SECRET)
    assert repr(call) == (
        "AwsCall(secretsmanager.create_secret, region=None, params=<Name, SecretString>)"
    )
    with pytest.raises(TypeError):
        call.params["Name"] = "x"  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("", "start_job_run"), {}, ValueError, "service must be a non-empty str"),
        (("  ", "start_job_run"), {}, ValueError, "service must be a non-empty str"),
        ((None, "start_job_run"), {}, ValueError, "service must be a non-empty str"),
        (("glue", ""), {}, ValueError, "operation must be a non-empty str"),
        (("glue", 3), {}, ValueError, "operation must be a non-empty str"),
        (("glu", "start_job_run"), {}, ValueError, "unknown AWS service 'glu'.*glue"),
        (("not-a-service", "x"), {}, ValueError, "unknown AWS service"),
        (("glue", "start_jobrun"), {}, ValueError, "no operation 'start_jobrun'.*start_job_run"),
        (("glue", "SendMessage"), {}, ValueError, "no operation 'SendMessage'"),
        (("glue", "start_job_run"), {"region": "EU WEST"}, ValueError, "region"),
        (("glue", "start_job_run"), {"region": ""}, ValueError, "region"),
        (("glue", "start_job_run"), {"region": 1}, ValueError, "region"),
    ],
)
def test_aws_rejects_bad_input_at_build_time(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        aws(*args, **kwargs)


def test_aws_model_lookups_are_cached() -> None:
    aws("glue", "start_job_run")
    before = aws_calls._operations.cache_info().hits
    aws("glue", "get_job_run")
    assert aws_calls._operations.cache_info().hits == before + 1


def test_aws_json_round_trip(aws_env: None) -> None:
    call = aws("kms", "encrypt", region="eu-west-1", KeyId="alias/x", Plaintext=b"\x00\x01")
    record = json.loads(json.dumps(call.to_json()))
    assert AwsCall.from_json(record) == call
    assert AwsCall.from_json(record).params["Plaintext"] == b"\x00\x01"


def test_aws_json_refuses_what_json_cannot_hold(aws_env: None) -> None:
    import datetime

    call = aws(
        "cloudwatch",
        "get_metric_statistics",
        StartTime=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    )
    with pytest.raises(NotSerializable, match=r"params\['StartTime'\].*isoformat"):
        call.to_json()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda r: r.update(service="nope"), "unknown AWS service"),
        (lambda r: r.update(operation="delete_everything"), "no operation"),
        (lambda r: r.update(operation="StartJobRun"), "snake_case"),
        (lambda r: r.update(region="a:b"), "region"),
        (lambda r: r.update(params=[]), "params must be an object"),
        (lambda r: r.pop("region"), "missing"),
    ],
)
def test_aws_from_json_rejects_tampered_records(
    aws_env: None, mutate: Callable[[dict[str, Any]], Any], match: str
) -> None:
    record = aws("glue", "start_job_run", JobName="etl").to_json()
    mutate(record)
    with pytest.raises(ValueError, match=match):
        AwsCall.from_json(record)


# --------------------------------------------------------------------------------------
# AWS perform: Resources clients, moto, Stubber


def test_resources_client_is_cached_and_has_retries_off(
    aws_env: None, resources: Resources
) -> None:
    client = resources.client("sqs", "eu-west-1")
    assert resources.client("sqs", "eu-west-1") is client
    assert resources.client("sqs", "us-east-1") is not client
    config = client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 1}
    assert (config.connect_timeout, config.read_timeout) == (5.0, 30.0)


def test_resources_client_respects_aws_endpoint_url(
    aws_env: None, resources: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://localhost:4566")
    assert resources.client("sqs", "eu-west-1").meta.endpoint_url == "http://localhost:4566"


def test_moto_create_queue(aws_env: None, resources: Resources) -> None:
    with mock_aws():
        result = aws("sqs", "create_queue", QueueName="jobs").perform(resources, KEY)
        assert result["QueueUrl"].endswith("/jobs")
        send = aws("sqs", "SendMessage", QueueUrl=result["QueueUrl"], MessageBody="hi")
        assert "MessageId" in send.perform(resources, KEY)
        attrs = boto3.client("sqs", region_name="eu-west-1").get_queue_attributes(
            QueueUrl=result["QueueUrl"], AttributeNames=["ApproximateNumberOfMessages"]
        )
        assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "1"


def test_moto_client_request_token_is_the_idempotency_key(
    aws_env: None, resources: Resources
) -> None:
    # secretsmanager.CreateSecret's ClientRequestToken has the idempotencyToken trait, and
    # moto answers with it as the VersionId.
    with mock_aws():
        call = aws("secretsmanager", "create_secret", Name="db", SecretString=SECRET)
        assert call.perform(resources, KEY)["VersionId"] == KEY
        own = "a" * 32
        mine = aws(
            "secretsmanager", "create_secret", Name="db2", SecretString="x", ClientRequestToken=own
        )
        assert mine.perform(resources, KEY)["VersionId"] == own  # the caller's wins


def test_stubbed_run_instances_gets_the_client_token(aws_env: None, resources: Resources) -> None:
    client = resources.client("ec2", "eu-west-1")
    call = aws("ec2", "run_instances", region="eu-west-1", ImageId="ami-1", MinCount=1, MaxCount=1)
    with Stubber(client) as stubber:
        stubber.add_response(
            "run_instances",
            {"Instances": []},
            expected_params={"ImageId": "ami-1", "MinCount": 1, "MaxCount": 1, "ClientToken": KEY},
        )
        assert call.perform(resources, KEY)["Instances"] == []
        stubber.assert_no_pending_responses()


def test_a_token_that_must_be_a_uuid_is_one_and_alike_on_every_try(
    aws_env: None, resources: Resources
) -> None:
    """SSM's DeleteInventory takes its ClientToken only as a UUID (the model's pattern, which
    the service enforces): a task's key, as the engine makes it, is sent as its own UUID,
    the same on every attempt, another task's another."""
    import re
    import uuid

    from offload.records import new_id

    client = resources.client("ssm", "eu-west-1")
    shape = client.meta.service_model.operation_model("DeleteInventory").input_shape
    pattern = shape.members["ClientToken"].metadata["pattern"]
    sent: list[str] = []
    client.meta.events.register(
        "provide-client-params.ssm.DeleteInventory",
        lambda params, **_: sent.append(params["ClientToken"]),
    )
    call = aws("ssm", "delete_inventory", region="eu-west-1", TypeName="Custom:Stock")
    key, other = new_id(), new_id()
    with Stubber(client) as stubber:
        for _ in range(3):
            stubber.add_response("delete_inventory", {"DeletionId": str(uuid.uuid4())})
        for each in (key, key, other):
            call.perform(resources, each)
        stubber.assert_no_pending_responses()
    assert all(re.search(pattern, token) for token in sent), (pattern, sent)
    assert sent[0] == sent[1] != sent[2]


def test_an_operation_without_a_token_is_left_alone(aws_env: None, resources: Resources) -> None:
    client = resources.client("glue", "eu-west-1")
    with Stubber(client) as stubber:
        # expected_params is exact: a token added to StartJobRun would fail the call.
        stubber.add_response("start_job_run", {"JobRunId": "jr_1"}, {"JobName": "etl"})
        call = aws("glue", "start_job_run", region="eu-west-1", JobName="etl")
        assert call.perform(resources, KEY)["JobRunId"] == "jr_1"
        stubber.assert_no_pending_responses()


def test_stubbed_glue_concurrent_runs_is_throttled(aws_env: None, resources: Resources) -> None:
    client = resources.client("glue", "eu-west-1")
    call = aws("glue", "start_job_run", region="eu-west-1", JobName="etl")
    with Stubber(client) as stubber:
        stubber.add_client_error(
            "start_job_run", "ConcurrentRunsExceededException", "Concurrent runs exceeded"
        )
        with pytest.raises(client.exceptions.ConcurrentRunsExceededException) as info:
            call.perform(resources, KEY)
    outcome = classify_exception(info.value)
    assert (outcome.kind, outcome.throttled) == (RETRY, True)
    assert outcome.error == ("ConcurrentRunsExceededException: Concurrent runs exceeded (HTTP 400)")


def test_offload_calls_does_not_import_boto3() -> None:
    code = """
import sys
sys.modules["boto3"] = None  # as if not installed
sys.modules["botocore"] = None
import offload.calls, offload.outcome
assert not any(m.startswith(("boto3", "botocore")) for m in sys.modules if sys.modules[m])
outcome = offload.outcome.classify_exception(ConnectionResetError())
assert outcome.kind == "retry", outcome
offload.calls.http("GET", "https://h/x")
try:
    offload.calls.aws("glue", "start_job_run")
except ImportError as exc:
    assert "pip install offload[aws]" in str(exc), exc
else:
    raise AssertionError("aws() without boto3 did not raise")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --------------------------------------------------------------------------------------
# plain callables


def test_callable_path_of_importable_callables() -> None:
    assert callable_path(send_email) == f"{__name__}:send_email"
    assert callable_path(Mailer.build) == f"{__name__}:Mailer.build"
    assert callable_path(Mailer.ping) == f"{__name__}:Mailer.ping"
    assert callable_path(len) == "builtins:len"
    assert callable_path(os.path.join) == f"{os.path.join.__module__}:join"
    assert resolve_callable(callable_path(send_email)) is send_email


def _nested_function() -> Callable[[], None]:
    def inner() -> None:
        pass

    return inner


class _CallableObject:
    def __call__(self) -> None:
        pass


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda: None, "lambda"),
        (_nested_function(), "inside a function"),
        (Mailer().send, "bound to an instance"),
        (functools.partial(send_email, "a"), "partial"),
        (_CallableObject(), "no importable module path"),
        ("abc".upper, "no importable module path"),
        (str.upper, "no importable module path"),
    ],
    ids=["lambda", "nested", "bound", "partial", "object", "builtin-bound", "descriptor"],
)
def test_callable_path_refuses(fn: Callable[..., Any], match: str) -> None:
    with pytest.raises(NotSerializable, match=match):
        callable_path(fn)


def test_callable_path_refuses_a_rebound_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def imposter() -> None:
        pass

    imposter.__qualname__ = "decorated_elsewhere"
    imposter.__module__ = __name__
    with pytest.raises(NotSerializable, match="different object"):
        callable_path(imposter)


def test_callable_path_in_main(monkeypatch: pytest.MonkeyPatch) -> None:
    def job() -> None:
        pass

    job.__module__ = "__main__"
    job.__qualname__ = "job"
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    with pytest.raises(NotSerializable, match="__main__ script"):
        callable_path(job)
    monkeypatch.setattr(main, "__spec__", types.SimpleNamespace(name="myapp.tasks"))
    assert callable_path(job) == "myapp.tasks:job"  # started with `python -m myapp.tasks`
    monkeypatch.setattr(main, "__spec__", types.SimpleNamespace(name="myapp.__main__"))
    with pytest.raises(NotSerializable, match="__main__"):
        callable_path(job)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("no_colon", "module:qualname"),
        ("a:b:c", "module:qualname"),
        ("os:path.<locals>", "module:qualname"),
        (":join", "module:qualname"),
        ("surely_missing_module_xyz:fn", "ModuleNotFoundError"),
        ("os.path:no_such_function", "AttributeError"),
        ("os:sep", "not callable"),
    ],
)
def test_resolve_callable_errors(path: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_callable(path)


# --------------------------------------------------------------------------------------
# task records


def test_task_round_trip_for_a_function() -> None:
    text = task_to_json(send_email, ("a@b.c",), {"subject": "hi", "extra": {"n": [1, 2.5, None]}})
    fn, args, kwargs = task_from_json(text)
    assert fn is send_email
    assert args == ("a@b.c",)
    assert kwargs == {"subject": "hi", "extra": {"n": [1, 2.5, None]}}


def test_task_round_trip_for_calls(aws_env: None) -> None:
    for call in (
        http("POST", "https://h/x", json={"a": 1}, idempotency_key=True),
        aws("glue", "start_job_run", region="eu-west-1", JobName="etl"),
    ):
        assert task_from_json(task_to_json(call, (), {})) == (call, (), {})


def test_a_call_takes_no_task_arguments() -> None:
    with pytest.raises(TypeError, match="takes no arguments"):
        task_to_json(http("GET", "https://h/x"), (1,), {})


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((("a", "b"),), {}, r"args\[0\] is a tuple"),
        ((), {"when": __import__("datetime").date(2024, 1, 1)}, r"kwargs\['when'\].*isoformat"),
        (({"a", "b"},), {}, r"args\[0\] is a builtins.set"),
        ((float("nan"),), {}, r"args\[0\] is nan"),
        (({1: "a"},), {}, r"args\[0\] has a int key"),
        (([{"deep": [object()]}],), {}, r"args\[0\]\[0\]\['deep'\]\[0\] is a builtins.object"),
        ((b"raw",), {}, r"args\[0\] is a builtins.bytes.*base64"),
        ((__import__("decimal").Decimal("1.5"),), {}, "Decimal"),
    ],
)
def test_task_arguments_must_be_exact_json(
    args: tuple[Any, ...], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(NotSerializable, match=match):
        task_to_json(send_email, args, kwargs)


def test_task_to_json_refuses_an_unimportable_function() -> None:
    with pytest.raises(NotSerializable, match="lambda"):
        task_to_json(lambda: None, (), {})


_GOOD = {"offload": 1, "target": {"type": "function", "path": f"{__name__}:send_email"}}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "malformed task record"),
        ("[]", "expected offload"),
        (json.dumps({**_GOOD, "args": [], "kwargs": {}, "more": 1}), "expected offload"),
        (json.dumps({**_GOOD, "offload": 2, "args": [], "kwargs": {}}), "format 2"),
        (json.dumps({**_GOOD, "args": {}, "kwargs": {}}), "args must be a list"),
        (json.dumps({**_GOOD, "args": [], "kwargs": []}), "args must be a list"),
        (
            '{"offload":1,"target":{"type":"function","path":"os:getcwd"},"args":[NaN],"kwargs":{}}',
            "NaN",
        ),
        (json.dumps({**_GOOD, "target": "os:getcwd", "args": [], "kwargs": {}}), "target must be"),
        (json.dumps({**_GOOD, "target": {"type": "pickle"}, "args": [], "kwargs": {}}), "pickle"),
        (
            json.dumps(
                {
                    **_GOOD,
                    "target": {"type": "function", "path": "nope:x"},
                    "args": [],
                    "kwargs": {},
                }
            ),
            "cannot resolve",
        ),
        (
            json.dumps(
                {
                    **_GOOD,
                    "target": {"type": "function", "path": "os:getcwd", "x": 1},
                    "args": [],
                    "kwargs": {},
                }
            ),
            "unexpected",
        ),
        (
            json.dumps(
                {
                    "offload": 1,
                    "target": http("GET", "https://h/x").to_json(),
                    "args": [1],
                    "kwargs": {},
                }
            ),
            "takes no arguments",
        ),
    ],
)
def test_task_from_json_rejects_malformed_records(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        task_from_json(text)


# --------------------------------------------------------------------------------------
# describe_target, default_key


def test_describe_target_of_plain_callables() -> None:
    assert describe_target(send_email) == f"{__name__}.send_email"
    assert describe_target(functools.partial(send_email, "x")) == (
        f"partial({__name__}.send_email)"
    )
    assert describe_target(_CallableObject()) == f"{__name__}._CallableObject object"
    assert default_key(send_email) is None


def test_describe_target_never_raises() -> None:
    class Hostile:
        def __call__(self) -> None:
            pass

        def __getattribute__(self, name: str) -> Any:
            raise RuntimeError("no")

    assert "Hostile" in describe_target(Hostile())


def test_session_reads_the_environment_only_when_it_holds_request_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from offload.calls import Resources

    for name in list(os.environ):
        if name.lower() in {
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "no_proxy",
            "netrc",
            "requests_ca_bundle",
            "curl_ca_bundle",
        }:
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    plain = Resources()
    assert plain.session().trust_env is False
    plain.close()
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    proxied = Resources()
    assert proxied.session().trust_env is True, "a proxy setting must be honoured"
    proxied.close()
    monkeypatch.delenv("HTTPS_PROXY")
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login u password p\n")
    netrc = Resources()
    assert netrc.session().trust_env is True
    netrc.close()
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    bundled = Resources()  # a CA bundle alone: read once, not on every request
    assert bundled.session().trust_env is False
    assert bundled.session().verify == bundled.ca_bundle == str(tmp_path / "ca.pem")
    bundled.close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate: (base URL, cert path)."""
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
    ]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    made = subprocess.run(command, capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate here: {made.stderr!r}")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", cert
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_ca_bundle_from_the_environment_is_honoured_as_requests_would(
    monkeypatch: pytest.MonkeyPatch, tls_server: tuple[str, Path], variable: str
) -> None:
    from offload.calls import Resources

    url, cert = tls_server
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    untrusting = Resources()
    with pytest.raises(requests.exceptions.SSLError):
        http("GET", f"{url}/x").perform(untrusting, "k")  # a self-signed certificate
    untrusting.close()
    monkeypatch.setenv(variable, str(cert))
    trusting = Resources()
    try:
        for call in (http("GET", f"{url}/x"), http("GET", f"{url}/x", verify=True)):
            assert call.perform(trusting, "k").status_code == 200
        with pytest.raises(requests.exceptions.SSLError):  # a bundle of the call's own wins
            http("GET", f"{url}/x", verify=requests.certs.where()).perform(trusting, "k")
    finally:
        trusting.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json": {"a": [1, 2.5, None, True], "b": {"c": "d"}}, "headers": {"X-A": "1"}},
        {"data": b"\x00\xff", "params": [("q", "1"), ("q", "2")]},
        {"json": {"$bytes": "looks like a tag"}},
        {"json": [{"$dict": {"x": 1}}]},
        {"headers": {"$bytes": "a header named like a tag"}},
        {"files": {"f": ("a.txt", b"body", "text/plain")}, "timeout": (1, 2)},
    ],
)
def test_the_stored_text_made_once_is_the_one_walk_of_the_call(kwargs: dict[str, Any]) -> None:
    from offload.codec.values import encode_frozen

    call = http("POST", "https://h/x", **kwargs)
    walked = encode_frozen(call.kwargs, "kwargs")
    if walked["timeout"] == list(DEFAULT_TIMEOUT):
        del walked["timeout"]  # left out of the text: a call read back gets it again
    assert json.loads(call.json_text())["kwargs"] == walked
    again = HttpCall.from_json(json.loads(call.json_text()))
    assert again == call and again.json_text() == call.json_text()


def test_a_set_of_headers_is_checked_once_and_shared_read_only_by_the_calls_built_with_it() -> None:
    from offload.calls.requests_kwargs import _HEADERS, _MAX_HEADERS, Headers

    headers = {"Authorization": "Bearer sk_live_x", "Content-Type": "application/json"}
    first = http("POST", "https://h/x", headers=headers)
    headers["Authorization"] = "Bearer changed"  # the handler's dict, changed after the build
    second = http("POST", "https://h/x", headers=dict(first.kwargs["headers"]))
    assert first.kwargs["headers"]["Authorization"] == "Bearer sk_live_x"
    assert type(first.kwargs["headers"]) is Headers
    assert second.kwargs["headers"] is first.kwargs["headers"]  # one copy, checked once
    with pytest.raises(TypeError):
        first.kwargs["headers"]["X-New"] = "1"
    assert json.loads(first.json_text())["kwargs"]["headers"] == {
        "Authorization": "Bearer sk_live_x",
        "Content-Type": "application/json",
    }
    # A bad set is refused every time, with the same message, and never remembered.
    for _ in range(2):
        with pytest.raises(ValueError, match="has a line break"):
            http("GET", "https://h/x", headers={"X-A": "a\r\nInjected: 1"})
        with pytest.raises(TypeError, match="maps a str to a int"):
            http("GET", "https://h/x", headers={"X-A": 1})
    # Per-user tokens do not grow the cache without bound.
    for i in range(_MAX_HEADERS + 10):
        call = http("GET", "https://h/x", headers={"Authorization": f"Bearer user-{i}"})
        assert call.kwargs["headers"] == {"Authorization": f"Bearer user-{i}"}
    assert len(_HEADERS) <= _MAX_HEADERS


def test_a_url_is_checked_once_and_a_bad_one_every_time() -> None:
    from offload.calls.urls import _MAX as _MAX_URLS
    from offload.calls.urls import GOOD_URLS

    assert http("GET", "https://api.example.com/v1/a").url in GOOD_URLS
    for _ in range(2):  # refused each time, never remembered
        with pytest.raises(ValueError, match="has no host"):
            http("GET", "https://:443/x")
        with pytest.raises(TypeError, match="url must be a str"):
            http("GET", b"https://api.example.com/")  # type: ignore[arg-type]
    assert "https://:443/x" not in GOOD_URLS
    for i in range(_MAX_URLS + 10):  # one URL per user: the set stays bounded
        http("GET", f"https://api.example.com/users/{i}")
    assert len(GOOD_URLS) <= _MAX_URLS


ORIGINS = [
    "https://api.example.com",
    "http://127.0.0.1:8080",
    "https://[::1]:8443",
    "HTTPS://API.Example.COM",
    "https://bücher.example",
]


@hypothesis.given(
    origin=st.sampled_from(ORIGINS),
    rest=st.text(
        alphabet=st.sampled_from("/?#%:@\\ az09-._~\t\n\x00\x7f\u00a0\u2028é"), max_size=12
    ),
)
def test_a_url_of_an_origin_that_passed_is_judged_as_the_whole_check_would(
    origin: str, rest: str
) -> None:
    """Only the origin's checks are remembered: any URL of a known origin is accepted or
    refused exactly as the whole check (urlsplit, requests) would, and its key is the one
    urlsplit gives, whether the URL was seen before or not."""
    from offload.calls.urls import _check_whole, _key, check_url, url_key

    check_url(origin + "/")  # the origin is known
    url = origin + rest
    try:
        _check_whole(url)
        whole: str | None = None
    except ValueError as exc:
        whole = str(exc)
    try:
        check_url(url)
        fast: str | None = None
    except ValueError as exc:
        fast = str(exc)
    assert fast == whole
    if whole is None:  # the key that comes with the check, for a call and for a limit
        assert http("GET", url).key() == url_key(url) == _key(url)


def test_a_url_that_only_begins_like_the_last_origin_is_judged_by_its_own() -> None:
    """The origin checked last is reused only for a URL whose origin it is: one whose
    authority goes on (a longer host, a port, userinfo) gets its own check and key."""
    assert http("GET", "https://api.example.com/a").key() == "https://api.example.com:443"
    assert http("GET", "https://api.example.com?q=1").key() == "https://api.example.com:443"
    assert http("GET", "https://api.example.com.evil.test/a").key() == (
        "https://api.example.com.evil.test:443"
    )
    assert http("GET", "https://api.example.com/b").key() == "https://api.example.com:443"
    assert http("GET", "https://api.example.com:8443/a").key() == "https://api.example.com:8443"
    http("GET", "https://api.example.com/c")
    with pytest.raises(ValueError, match="not a valid URL"):
        http("GET", "https://api.example.com:99999/x")
    http("GET", "https://api.example.com/d")
    with pytest.raises(ValueError, match="whitespace or control"):
        http("GET", "https://api.example.com/ x")
    call = http("GET", "https://user@api.example.com/e")  # userinfo: always the whole check
    assert call.key() == "https://api.example.com:443"


def test_headers_of_a_str_subclass_are_not_shared_with_plain_ones() -> None:
    class Text(str):  # as an enum.StrEnum value is
        pass

    first = http("POST", "https://h/x", headers={"Content-Type": Text("application/json")})
    plain = http("POST", "https://h/y", headers={"Content-Type": "application/json"}, data=b"\x00")
    assert type(plain.kwargs["headers"]["Content-Type"]) is str
    assert plain.kwargs["headers"] is not first.kwargs["headers"]
    stored = json.loads(plain.json_text())["kwargs"]["headers"]
    assert stored == {"Content-Type": "application/json"}
