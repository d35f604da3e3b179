"""offload.outcome: the DESIGN.md "Outcomes" table, row by row, and Retry-After parsing."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import dataclasses
import email.utils
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
import requests
import urllib3.exceptions
from botocore.stub import Stubber

import offload
from offload.calls.connections import Resources
from offload.errors import GiveUp, Retry
from offload.outcome import (
    PERMANENT,
    RETRY,
    SUCCESS,
    Outcome,
    classify_exception,
    classify_result,
    parse_retry_after,
)
from offload.records import Task
from offload.settle import dead_letter_for

NOW = 1_700_000_000.0  # a fixed wall clock for HTTP-dates


def response(
    status: int, headers: dict[str, str] | None = None, reason: str | None = None
) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r.reason = reason  # type: ignore[assignment]
    r.headers.update(headers or {})
    r._content = b""
    return r


# --------------------------------------------------------------------------------------
# requests responses


@pytest.mark.parametrize("status", [200, 201, 204, 301, 302, 304, 399])
def test_status_below_400_is_success(status: int) -> None:
    r = response(status)
    outcome = classify_result(r)
    assert outcome == Outcome(SUCCESS, status=status, value=r)


@pytest.mark.parametrize(
    "status", [400, 401, 403, 404, 405, 409, 410, 413, 422, 451, 501, 505, 511, 525, 526]
)
def test_other_4xx_and_501_are_permanent(status: int) -> None:
    outcome = classify_result(response(status))
    assert (outcome.kind, outcome.throttled, outcome.status) == (PERMANENT, False, status)


@pytest.mark.parametrize("status", [408, 425, 500, 502, 503, 504, 520, 521, 522, 523, 524])
def test_transient_statuses(status: int) -> None:
    outcome = classify_result(response(status))
    assert (outcome.kind, outcome.throttled, outcome.retry_after) == (RETRY, False, None)


def test_429_is_throttled_with_retry_after() -> None:
    outcome = classify_result(response(429, {"Retry-After": "3"}, "Too Many Requests"))
    assert outcome == Outcome(
        RETRY, throttled=True, retry_after=3.0, status=429, error="HTTP 429 Too Many Requests"
    )


def test_429_without_retry_after_is_still_throttled() -> None:
    outcome = classify_result(response(429))
    assert (outcome.kind, outcome.throttled, outcome.retry_after) == (RETRY, True, None)


def test_503_with_retry_after_is_throttled() -> None:
    outcome = classify_result(response(503, {"Retry-After": "120"}))
    assert (outcome.kind, outcome.throttled, outcome.retry_after) == (RETRY, True, 120.0)
    assert outcome.error == "HTTP 503 Service Unavailable"  # phrase when the reason is missing


def test_retry_after_as_http_date_uses_now() -> None:
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    outcome = classify_result(response(429, {"Retry-After": date}), now=NOW)
    assert outcome.retry_after == 30.0


def test_a_transient_status_keeps_a_retry_after_floor() -> None:
    assert classify_result(response(500, {"Retry-After": "4"})).retry_after == 4.0


def test_anything_else_returned_is_success() -> None:
    for value in (None, {"ResponseMetadata": {}}, 0, "text", [1]):
        assert classify_result(value) == Outcome(SUCCESS, value=value)


def test_reason_from_the_server_is_one_line_and_redacted() -> None:
    outcome = classify_result(response(400, reason="Bad\r\nRequest token=abc"))
    assert outcome.error == "HTTP 400 Bad Request token=***"


# --------------------------------------------------------------------------------------
# exceptions without botocore


@pytest.mark.parametrize(
    "exc",
    [
        requests.ConnectionError("refused"),
        requests.exceptions.ConnectTimeout("connect timed out"),
        requests.exceptions.ReadTimeout("read timed out"),
        requests.Timeout("timed out"),
        requests.exceptions.ChunkedEncodingError("broken chunk"),
        requests.exceptions.SSLError("handshake"),
        requests.exceptions.ProxyError("proxy"),
        urllib3.exceptions.ProtocolError("Connection aborted."),
        urllib3.exceptions.ReadTimeoutError(None, "/x", "read timed out"),  # type: ignore[arg-type]
        ConnectionError("builtin"),
        ConnectionResetError(104, "reset by peer"),
        BrokenPipeError(32, "broken pipe"),
        TimeoutError("builtin timeout"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transient_exceptions(exc: BaseException) -> None:
    outcome = classify_exception(exc)
    assert (outcome.kind, outcome.throttled, outcome.status) == (RETRY, False, None)


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (503, {"Retry-After": "7"}, (RETRY, True, 7.0, 503)),
        (429, {}, (RETRY, True, None, 429)),
        (500, {}, (RETRY, False, None, 500)),
        (404, {}, (PERMANENT, False, None, 404)),
    ],
)
def test_raise_for_status_goes_by_its_response(
    status: int, headers: dict[str, str], expected: tuple[object, ...]
) -> None:
    r = response(status, headers)
    with pytest.raises(requests.HTTPError) as raised:
        r.raise_for_status()
    outcome = classify_exception(raised.value, now=NOW)
    assert (outcome.kind, outcome.throttled, outcome.retry_after, outcome.status) == expected


@pytest.mark.parametrize("carried", [None, response(200)], ids=["no response", "200"])
def test_an_http_error_without_a_failed_response_is_permanent(
    carried: requests.Response | None,
) -> None:
    outcome = classify_exception(requests.HTTPError("odd", response=carried))
    assert (outcome.kind, outcome.status) == (PERMANENT, None)


def _async_timeout() -> BaseException:
    async def slow() -> None:
        await asyncio.wait_for(asyncio.sleep(60), 0.001)

    with pytest.raises(asyncio.TimeoutError) as raised:
        asyncio.run(slow())
    return raised.value


def _future_timeout() -> BaseException:
    with pytest.raises(concurrent.futures.TimeoutError) as raised:
        concurrent.futures.Future().result(timeout=0.001)
    return raised.value


@pytest.mark.parametrize("timeout", [_async_timeout, _future_timeout], ids=lambda f: f.__name__)
def test_an_async_or_future_timeout_is_transient_on_every_python(
    timeout: Callable[[], BaseException],
) -> None:
    """asyncio.wait_for's and a future's timeouts are TimeoutError from Python 3.11 on, and
    classes of their own on 3.10: an async task that timed out is retried on both."""
    outcome = classify_exception(timeout())
    assert (outcome.kind, outcome.throttled, outcome.error) == (RETRY, False, "TimeoutError")


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.InvalidURL("bad url"),
        requests.exceptions.MissingSchema("no scheme"),
        requests.exceptions.InvalidSchema("ftp"),
        requests.exceptions.InvalidHeader("bad header"),
        requests.exceptions.TooManyRedirects("loop"),
        requests.exceptions.ContentDecodingError("gzip"),
        ValueError("bug"),
        KeyError("missing"),
        OSError("disk"),
        RuntimeError("boom"),
        Exception("generic"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_permanent_exceptions(exc: BaseException) -> None:
    assert classify_exception(exc).kind == PERMANENT


def test_offload_retry_is_throttled_with_its_delay() -> None:
    assert classify_exception(Retry(after=3)) == Outcome(
        RETRY, throttled=True, retry_after=3, error="Retry requested after 3s"
    )
    outcome = classify_exception(Retry())
    assert (outcome.kind, outcome.throttled, outcome.retry_after) == (RETRY, True, None)


def test_give_up_is_permanent_with_its_reason() -> None:
    assert classify_exception(GiveUp("card declined")) == Outcome(PERMANENT, error="card declined")


def test_error_summary_is_one_line_redacted_and_bounded() -> None:
    exc = requests.ConnectionError(
        "Max retries exceeded with url: /x?token=SECRET123\n(Caused by X)" + "y" * 1000
    )
    error = classify_exception(exc).error
    assert error is not None
    assert error.startswith("ConnectionError: Max retries exceeded with url: /x?token=*** (Caused")
    assert "\n" not in error and "SECRET123" not in error
    assert len(error) == 300 and error.endswith("…")


def test_a_long_message_is_redacted_before_it_is_cut() -> None:
    # Cut first, the URL would lose its `@` and no longer read as userinfo; the spaces
    # collapse afterwards, which pulls the cut end into the first 300 characters.
    message = "upstream said:" + " " * 1956 + "retry at https://bob:SECRET_PW@api.example.com/v1"
    error = classify_exception(RuntimeError(message)).error
    assert error == "RuntimeError: upstream said: retry at https://bob:***@api.example.com/v1"
    # Beyond what is read, the cut falls in the password: the word it cuts goes whole.
    huge = "upstream said:" + " " * 19_971 + "https://bob:SECRET_PW@api.example.com/v1"
    assert classify_exception(RuntimeError(huge)).error == "RuntimeError: upstream said:"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("bad\x00thing", "RuntimeError: badthing"),  # PostgreSQL refuses NUL in text
        ("half \ud800 a pair", "RuntimeError: half \ufffd a pair"),  # SQLite refuses it
        (
            "Oops \x1b]0;owned\x07\x1b[2J\x1b[31mFAKE\x1b[0m \x9b31m",
            "RuntimeError: Oops ]0;owned[2J[31mFAKE[0m 31m",
        ),
        ("del\x7f and\r\nlines\x0b\x0c\x85end\x1c", "RuntimeError: del and lines end"),
        ("caf\u00e9 \u65e5\u672c", "RuntimeError: caf\u00e9 \u65e5\u672c"),
    ],
)
def test_an_error_text_holds_no_control_character_or_lone_surrogate(
    message: str, expected: str
) -> None:
    assert classify_exception(RuntimeError(message)).error == expected
    assert classify_exception(GiveUp(message)).error == expected.removeprefix("RuntimeError: ")


def test_a_reason_phrase_holds_no_terminal_escape() -> None:
    error = classify_result(response(500, reason="Oops \x1b]0;title\x07\x1b[2J")).error
    assert error == "HTTP 500 Oops ]0;title[2J"


def test_the_calls_own_secrets_are_scrubbed_from_the_error_text() -> None:
    secrets = {"sk_live_SECRET", "abc"}  # "abc" is too short to scrub
    outcome = classify_exception(
        PermissionError("the API refused key sk_live_SECRET for abc"), secrets=lambda: secrets
    )
    assert outcome.error == "PermissionError: the API refused key *** for abc"
    reason = classify_result(
        response(401, reason="bad key sk_live_SECRET"), secrets=lambda: secrets
    )
    assert reason.error == "HTTP 401 bad key ***"
    assert (
        classify_exception(GiveUp("no sk_live_SECRET"), secrets=lambda: secrets).error == "no ***"
    )


def test_a_secret_at_the_cut_is_scrubbed_whole() -> None:
    message = "x" * 280 + " sk_live_SECRET_SECRET_SECRET"
    error = classify_exception(
        RuntimeError(message), secrets=lambda: {"sk_live_SECRET_SECRET_SECRET"}
    )
    assert error.error is not None and "sk_live" not in error.error


def test_a_success_never_asks_for_the_secrets() -> None:
    def secrets() -> set[str]:
        raise AssertionError("asked on success")

    assert classify_result(response(200), secrets=secrets).kind == SUCCESS
    assert classify_result("done", secrets=secrets).kind == SUCCESS


def test_an_exception_whose_str_raises_is_named_by_type() -> None:
    class Weird(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert classify_exception(Weird()) == Outcome(PERMANENT, error="Weird")


def test_an_exception_with_an_empty_message_is_named_by_type() -> None:
    assert classify_exception(TimeoutError()).error == "TimeoutError"


def test_outcome_is_frozen_and_checked() -> None:
    with pytest.raises(ValueError, match="kind"):
        Outcome("maybe")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Outcome(SUCCESS).kind = RETRY  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# Retry-After


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (".5", 0.5),
        ("  2 ", 2.0),
        ("+4", 4.0),
        ("-5", 0.0),  # never earlier than now, never negative
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),
        (email.utils.formatdate(NOW + 60, localtime=False), 60.0),  # "-0000" zone: UTC
        ("Tue, 14 Nov 2023 22:13:20 +0100", 0.0),  # an hour before NOW
        ("Tue, 14 Nov 2023 23:13:50 +0100", 30.0),
        ("5, 5", 5.0),  # the header sent twice, joined as HTTP clients join it
        ("2, 7", 7.0),  # never earlier than either asked
    ],
)
def test_parse_retry_after(value: str, expected: float) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    "value",
    [
        "soon",
        "",
        "   ",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "1e3",
        "3 seconds",
        "0x10",
        "9" * 400,
        "Tue, 99 Foo",
    ],
)
def test_malformed_retry_after_is_ignored_and_logged_once(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="offload")
    assert parse_retry_after(value, now=NOW) is None
    records = [r for r in caplog.records if r.name == "offload"]
    assert len(records) == 1
    assert "Retry-After" in records[0].getMessage()


def test_no_retry_after_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="offload")
    assert parse_retry_after(None, now=NOW) is None
    assert not caplog.records


def test_malformed_retry_after_on_429_still_throttles(caplog: pytest.LogCaptureFixture) -> None:
    outcome = classify_result(response(429, {"Retry-After": "later"}))
    assert (outcome.kind, outcome.throttled, outcome.retry_after) == (RETRY, True, None)
    assert "later" in caplog.text


# --------------------------------------------------------------------------------------
# botocore


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def glue(aws_env: None) -> Iterator[tuple[Any, Stubber]]:
    client = boto3.client("glue", region_name="eu-west-1")
    with Stubber(client) as stubber:
        yield client, stubber
    client.close()


def client_error(
    glue: tuple[Any, Stubber], code: str, status: int, headers: dict[str, str] | None = None
) -> botocore.exceptions.ClientError:
    """A real ClientError, as botocore raises it for `code` and `status`."""
    client, stubber = glue
    stubber.add_client_error(
        "start_job_run",
        service_error_code=code,
        service_message=f"{code} happened",
        http_status_code=status,
        response_meta={"HTTPHeaders": headers or {}},
    )
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.start_job_run(JobName="etl")
    return info.value


THROTTLING_CODES = [
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
    "ConcurrentRunsExceededException",  # Glue, while the previous run of the job lasts
]


@pytest.mark.parametrize(
    ("code", "status", "kind", "throttled"),
    [
        *[(code, 400, RETRY, True) for code in THROTTLING_CODES],
        ("SomethingNew", 429, RETRY, True),
        ("RequestTimeout", 400, RETRY, False),
        ("RequestTimeoutException", 408, RETRY, False),
        ("InternalServiceException", 500, RETRY, False),
        ("BadGateway", 502, RETRY, False),
        ("ServiceUnavailable", 503, RETRY, False),
        ("GatewayTimeout", 504, RETRY, False),
        ("NotImplemented", 501, PERMANENT, False),
        ("EntityNotFoundException", 400, PERMANENT, False),
        ("ValidationException", 400, PERMANENT, False),
        ("AccessDeniedException", 403, PERMANENT, False),
        ("InvalidInputException", 400, PERMANENT, False),
        ("ResourceNumberLimitExceededException", 400, PERMANENT, False),
    ],
)
def test_client_error_codes(
    glue: tuple[Any, Stubber], code: str, status: int, kind: str, throttled: bool
) -> None:
    outcome = classify_exception(client_error(glue, code, status))
    assert (outcome.kind, outcome.throttled, outcome.status) == (kind, throttled, status)
    assert outcome.error == f"{code}: {code} happened (HTTP {status})"


@pytest.mark.parametrize(
    ("service", "operation", "code", "status", "kind", "throttled"),
    [
        # Marked retryable in the operation's model: transient, though a 400.
        ("dynamodb", "put_item", "ReplicatedWriteConflictException", 400, RETRY, False),
        ("dynamodb", "update_item", "ReplicatedWriteConflictException", 400, RETRY, False),
        # Not an error of this operation: the table's answer, permanent.
        ("dynamodb", "get_item", "ReplicatedWriteConflictException", 400, PERMANENT, False),
        ("dynamodb", "put_item", "ConditionalCheckFailedException", 400, PERMANENT, False),
        # A 429 stays a throttle, whatever the model says of its code.
        ("bedrock-runtime", "invoke_model", "ModelNotReadyException", 429, RETRY, True),
        # Marked a throttle: throttled even from a 400, or a 503 that is transient else.
        (
            "sagemaker-inference-router-runtime",
            "invoke_inference_router",
            "ModelNotReadyException",
            503,
            RETRY,
            True,
        ),
    ],
)
def test_client_error_codes_the_operation_model_marks_retryable(
    glue: tuple[Any, Stubber],
    service: str,
    operation: str,
    code: str,
    status: int,
    kind: str,
    throttled: bool,
) -> None:
    call = offload.aws(service, operation)
    resources = Resources()
    try:
        outcome = classify_exception(
            client_error(glue, code, status), modeled=lambda code: call.retryable(resources, code)
        )
    finally:
        resources.close()
    assert (outcome.kind, outcome.throttled, outcome.status) == (kind, throttled, status)


def test_the_model_is_asked_only_for_a_code_not_already_throttled(
    glue: tuple[Any, Stubber],
) -> None:
    asked: list[str] = []

    def modeled(code: str) -> bool | None:
        asked.append(code)
        return None

    assert classify_exception(client_error(glue, "SlowDown", 503), modeled=modeled).throttled
    assert classify_exception(client_error(glue, "Whatever", 429), modeled=modeled).throttled
    assert (
        classify_exception(client_error(glue, "Conflict", 409), modeled=modeled).kind == PERMANENT
    )
    assert asked == ["Conflict"]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-amz-retry-after": "1500"}, 1.5),
        ({"retry-after": "7"}, 7.0),
        ({"x-amz-retry-after": "250", "retry-after": "7"}, 0.25),  # x-amz wins
        ({"x-amz-retry-after": "soon", "retry-after": "7"}, 7.0),  # junk: fall back
        ({"x-amz-retry-after": "500, 1500"}, 1.5),  # sent twice, joined: the longest
        ({"x-amz-retry-after": "500, soon", "retry-after": "7"}, 7.0),
        ({"Retry-After": email.utils.formatdate(NOW + 20, usegmt=True)}, 20.0),
        ({}, None),
    ],
)
def test_client_error_retry_after(
    glue: tuple[Any, Stubber], headers: dict[str, str], expected: float | None
) -> None:
    error = client_error(glue, "ThrottlingException", 400, headers)
    assert classify_exception(error, now=NOW).retry_after == expected


@pytest.mark.parametrize(
    "exc",
    [
        botocore.exceptions.EndpointConnectionError(endpoint_url="https://glue"),
        botocore.exceptions.ConnectionClosedError(endpoint_url="https://glue"),
        botocore.exceptions.ConnectTimeoutError(endpoint_url="https://glue"),
        botocore.exceptions.ReadTimeoutError(endpoint_url="https://glue"),
        botocore.exceptions.ProxyConnectionError(proxy_url="http://p", error="x"),
        botocore.exceptions.SSLError(endpoint_url="https://glue", error="x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_botocore_network_errors_are_transient(exc: BaseException) -> None:
    outcome = classify_exception(exc)
    assert (outcome.kind, outcome.throttled) == (RETRY, False)
    assert outcome.error is not None and outcome.error.startswith(type(exc).__name__)


@pytest.mark.parametrize(
    "exc",
    [
        botocore.exceptions.NoCredentialsError(),
        botocore.exceptions.NoRegionError(),
        botocore.exceptions.ParamValidationError(report="Missing required parameter JobName"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_botocore_configuration_errors_are_permanent(exc: BaseException) -> None:
    assert classify_exception(exc).kind == PERMANENT


def test_client_error_message_is_redacted(glue: tuple[Any, Stubber]) -> None:
    client, stubber = glue
    stubber.add_client_error(
        "start_job_run",
        service_error_code="AccessDenied",
        service_message="denied for AKIAABCDEFGHIJKLMNOP\nwith secret=xyz",
        http_status_code=403,
    )
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.start_job_run(JobName="etl")
    assert classify_exception(info.value).error == (
        "AccessDenied: denied for *** with secret=*** (HTTP 403)"
    )


def test_a_hand_made_client_error_without_metadata() -> None:
    exc = botocore.exceptions.ClientError({}, "StartJobRun")
    outcome = classify_exception(exc)
    assert (outcome.kind, outcome.status) == (PERMANENT, None)
    assert outcome.error


def _charge(amount: int, api_key: str) -> None:
    """A task's function with a secret-named argument."""


def test_a_dead_letter_holds_only_text_a_store_can_hold_and_no_known_secret() -> None:
    # A text that no outcome made (a retry policy's own words) is cleaned when the letter is.
    task = Task(_charge, (1,), {"api_key": "sk_live_SECRET"})
    letter = dead_letter_for(task, "policy said \x00no to sk_live_SECRET \ud800", None, "permanent")
    assert letter.error == "policy said no to *** \ufffd"
    assert letter.description == "test_outcome._charge"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups: 3.11+")
def test_a_task_group_is_judged_by_the_errors_it_holds() -> None:
    """asyncio.TaskGroup and anyio raise a group: a transient error inside one is still
    transient; any permanent one makes the group permanent; a throttled one throttles it,
    no sooner than the longest Retry-After it holds."""
    group: Any = vars(builtins)["ExceptionGroup"]
    refused = ConnectionRefusedError("refused")
    transient = classify_exception(group("tg", [refused, TimeoutError()]))
    assert transient.kind == RETRY and not transient.throttled
    throttled = classify_exception(
        group("tg", [refused, Retry(after=5), group("inner", [Retry(after=9)])])
    )
    assert throttled.kind == RETRY and throttled.throttled and throttled.retry_after == 9
    given_up = classify_exception(group("tg", [Retry(after=5), GiveUp("card declined")]))
    assert given_up.kind == PERMANENT and given_up.error == "card declined"
