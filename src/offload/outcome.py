"""How one attempt ended: success, retry (throttled or transient) or permanent failure.

This is the table in DESIGN.md ("Outcomes") and nothing else; `RetryPolicy(retry_on=...)`
extends it. A throttled retry means the whole target is saturated ("not now") and closes
its key's gate; a transient one is a failure of this attempt only.

`Retry-After` (and AWS's `x-amz-retry-after`, in milliseconds) becomes `retry_after`, the
server's floor in seconds; the policy decides what to do with it. botocore is optional:
its exception types are recognised only when botocore is already imported, which it
always is when one of them was raised.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import email.utils
import http
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Final, Literal, get_args

import requests
import urllib3.exceptions

from ._redact import redact_text, scrub
from .errors import GiveUp, Retry

__all__ = [
    "KINDS",
    "PERMANENT",
    "REASONS",
    "RETRY",
    "SUCCESS",
    "Kind",
    "Modeled",
    "Outcome",
    "Reason",
    "Secrets",
    "classify_exception",
    "classify_result",
    "clean_text",
    "parse_retry_after",
]

log = logging.getLogger("offload")

Kind = Literal["success", "retry", "permanent"]
"""How an attempt ended."""
KINDS: Final[frozenset[Kind]] = frozenset(get_args(Kind))
SUCCESS: Final = "success"
RETRY: Final = "retry"
PERMANENT: Final = "permanent"

Reason = Literal["exhausted", "permanent", "shutdown"]
"""Why a task became a dead letter: retries or time used up; an error retrying cannot fix;
still undelivered when a memory-store offloader shut down."""
REASONS: Final[frozenset[Reason]] = frozenset(get_args(Reason))

MAX_ERROR_CHARS: Final = 300
# Read no more of a message: all of it that is read is redacted before it is cut short.
_MAX_MESSAGE_CHARS = 20_000
# C0 control characters but for the whitespace ones (which become spaces), DEL, and C1
# controls but for NEL (whitespace too); lone surrogates. PostgreSQL refuses NUL in text,
# SQLite a surrogate, and ESC would start a terminal escape in the CLI's output.
_UNSHOWABLE = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff]")

Secrets = Callable[[], Collection[str]]
"""What gives the secret values a failed call holds (its own headers, params, password),
asked only when there is an error text to scrub them from."""

Modeled = Callable[[str], bool | None]
"""What an AWS operation's service model says of an error code, asked only for a
ClientError the table does not already throttle: True if marked retryable as a throttle,
False if marked retryable, None if not marked (botocore's standard retry mode reads the
same `retryable` trait)."""

# 520-524: the answers of a proxy in front of the API (Cloudflare's) when the API itself did
# not answer: an unknown error, refused, timed out connecting, unreachable, timed out.
_TRANSIENT_STATUS = frozenset({408, 425, 500, 502, 503, 504, 520, 521, 522, 523, 524})
_AWS_TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
# botocore's standard retry mode (botocore/retries/standard.py), plus Glue's answer while
# the previous run of a job is still going: that one lasts minutes and must not use up
# attempts.
_AWS_THROTTLING_CODES = frozenset(
    {
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
        "ConcurrentRunsExceededException",
    }
)
_AWS_TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException"})

_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,  # includes ConnectTimeout, SSLError, ProxyError
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    # Raised unwrapped when a caller reads a response body itself.
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.NewConnectionError,
    ConnectionError,  # builtin: resets, refusals, broken pipes
    TimeoutError,
    # Python 3.10's own classes (aliases of TimeoutError from 3.11 on): what
    # asyncio.wait_for() and a future's result(timeout=...) raise in an async task.
    asyncio.TimeoutError,
    concurrent.futures.TimeoutError,
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended. `error` is a one-line, redacted summary (<= 300 chars)."""

    kind: Kind
    throttled: bool = False  # a retry because the target is saturated: close its gate
    retry_after: float | None = None  # the server's floor, in seconds
    status: int | None = None  # HTTP status, when there was a response
    error: str | None = None
    value: Any = None  # what the call returned, on success

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Outcome kind must be one of {sorted(KINDS)}, got {self.kind!r}")


# --------------------------------------------------------------------------------------
# Retry-After


_DELAY_SECONDS = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def _ignored(value: object, why: str) -> None:
    log.warning("ignoring %s Retry-After %r", why, str(value)[:100])


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` value: delay-seconds or an HTTP-date.

    `now` is the wall-clock time (epoch seconds) an HTTP-date is measured from. A time in
    the past or a negative delay is 0.0. Several delay-seconds joined by commas (the
    header sent twice, as HTTP clients join repeated headers: "5, 5") are the longest of
    them. A malformed value is logged and ignored (None): a misbehaving server must not
    break the worker.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        _ignored(value, "non-text")
        return None
    text = value.strip()
    if not text:
        _ignored(value, "empty")
        return None
    if _DELAY_SECONDS.match(text):
        seconds = float(text)
        if not math.isfinite(seconds):  # hundreds of digits
            _ignored(value, "out-of-range")
            return None
        return max(seconds, 0.0)
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and all(_DELAY_SECONDS.match(part) for part in parts):
        # Never earlier than any of them asked.
        seconds = max(float(part) for part in parts)
        if not math.isfinite(seconds):
            _ignored(value, "out-of-range")
            return None
        return max(seconds, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000": UTC, origin unknown
            when = when.replace(tzinfo=timezone.utc)
        delay = when.timestamp() - now
    except (TypeError, ValueError, IndexError, OverflowError):
        _ignored(value, "malformed")
        return None
    return max(delay, 0.0)


def _header(headers: Any, name: str) -> str | None:
    """A header from a case-insensitive or plain (lowercase-keyed) mapping."""
    if not isinstance(headers, Mapping):
        return None
    for key in (name, name.lower()):
        if key in headers:
            return str(headers[key])
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name.lower():
            return str(value)
    return None


def _aws_retry_after(headers: Any, now: float) -> float | None:
    millis = _header(headers, "x-amz-retry-after")
    if millis is not None:
        # Sent twice, it arrives joined ("500, 500"): the longest, as for Retry-After.
        parts = [part.strip() for part in millis.split(",")]
        if all(_DELAY_SECONDS.match(part) for part in parts):
            seconds = max(float(part) for part in parts) / 1000.0
            if math.isfinite(seconds):
                return max(seconds, 0.0)
        log.warning("ignoring malformed x-amz-retry-after %r", millis[:100])
    return parse_retry_after(_header(headers, "Retry-After"), now=now)


# --------------------------------------------------------------------------------------
# Summaries


def _no_secrets() -> Collection[str]:
    return ()


def _unshowable(match: re.Match[str]) -> str:
    return "\ufffd" if match.group() >= "\ud800" else ""


def clean_text(text: str) -> str:
    """`text` without control characters (whitespace ones kept) and with lone surrogates
    as U+FFFD: what every store can hold and a terminal shows as it is."""
    return _UNSHOWABLE.sub(_unshowable, text)


def _clean(text: str, secrets: Secrets = _no_secrets) -> str:
    """Redacted (the call's own `secrets` too), printable, on one line, at most
    MAX_ERROR_CHARS. All of it is redacted before it is cut: a URL cut between its
    password and `@` would no longer read as one."""
    if len(text) > _MAX_MESSAGE_CHARS:
        # Beyond this, nothing could survive the cut; the word cut in two goes too.
        text = text[:_MAX_MESSAGE_CHARS].rsplit(maxsplit=1)[0]
    text = " ".join(redact_text(scrub(clean_text(text), secrets())).split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # an exception's __str__ can itself be broken
        return ""


def _summary(exc: BaseException, secrets: Secrets = _no_secrets) -> str:
    name = type(exc).__name__
    message = _clean(_message(exc), secrets)
    return _clean(f"{name}: {message}") if message else name


def _http_summary(status: int, reason: Any, secrets: Secrets) -> str:
    if not isinstance(reason, str) or not reason.strip():
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    return _clean(f"HTTP {status} {reason}".strip(), secrets)


# --------------------------------------------------------------------------------------
# Classification


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def classify_result(
    value: Any, *, now: float | None = None, secrets: Secrets = _no_secrets
) -> Outcome:
    """The outcome of an attempt that returned `value`.

    A `requests.Response` (or an httpx one, when httpx is imported) is judged by its
    status: < 400 success; 429, and 503 with a Retry-After, throttled; 408, 425, 500, 502,
    503, 504 and a proxy's 520-524 transient; any other status permanent (other 4xx,
    501). Anything else returned is a success. `secrets()`, asked only for a failure,
    gives values to scrub from the error text.
    """
    if isinstance(value, requests.Response):
        return _classify_status(value.status_code, value.reason, value.headers, value, now, secrets)
    for httpx in _httpx_modules():
        if isinstance(value, httpx.Response):
            return _classify_status(
                value.status_code, value.reason_phrase, value.headers, value, now, secrets
            )
    return Outcome(SUCCESS, value=value)


def _httpx_modules() -> list[Any]:
    """httpx, and httpx2 (its successor's module name), where the application imported
    them: their types are looked at only then."""
    return [m for m in (sys.modules.get("httpx"), sys.modules.get("httpx2")) if m is not None]


def _classify_status(
    status: int,
    reason: Any,
    headers: Mapping[str, str],
    value: Any,
    now: float | None,
    secrets: Secrets,
) -> Outcome:
    if status < 400:
        return Outcome(SUCCESS, status=status, value=value)
    error = _http_summary(status, reason, secrets)
    raw = headers.get("Retry-After")
    if status == 429 or (status == 503 and raw is not None and raw.strip()):
        retry_after = parse_retry_after(raw, now=_now(now))
        return Outcome(RETRY, throttled=True, retry_after=retry_after, status=status, error=error)
    if status in _TRANSIENT_STATUS:
        retry_after = parse_retry_after(raw, now=_now(now)) if raw is not None else None
        return Outcome(RETRY, retry_after=retry_after, status=status, error=error)
    return Outcome(PERMANENT, status=status, error=error)


def _no_model(code: str) -> bool | None:
    return None


def _classify_client_error(
    exc: BaseException, now: float | None, secrets: Secrets, modeled: Modeled
) -> Outcome:
    response = getattr(exc, "response", None)
    response = response if isinstance(response, Mapping) else {}
    details = response.get("Error")
    details = details if isinstance(details, Mapping) else {}
    meta = response.get("ResponseMetadata")
    meta = meta if isinstance(meta, Mapping) else {}
    code = str(details.get("Code") or "")
    status = meta.get("HTTPStatusCode")
    status = status if isinstance(status, int) and not isinstance(status, bool) else None

    message = _clean(str(details.get("Message") or ""), secrets)
    error = (
        f"{code or type(exc).__name__}: {message}" if message else code or _summary(exc, secrets)
    )
    error = _clean(f"{error} (HTTP {status})" if status is not None else error)

    throttled = code in _AWS_THROTTLING_CODES or status == 429
    transient = code in _AWS_TRANSIENT_CODES or status in _AWS_TRANSIENT_STATUS
    if code and not throttled:
        marked = modeled(code)  # what the operation's model marks retryable, as botocore
        throttled, transient = marked is True, transient or marked is False
    if throttled:
        retry_after = _aws_retry_after(meta.get("HTTPHeaders"), _now(now))
        return Outcome(RETRY, throttled=True, retry_after=retry_after, status=status, error=error)
    if transient:
        retry_after = _aws_retry_after(meta.get("HTTPHeaders"), _now(now))
        return Outcome(RETRY, retry_after=retry_after, status=status, error=error)
    return Outcome(PERMANENT, status=status, error=error)


def _exception_groups() -> tuple[type[BaseException], ...]:
    """BaseExceptionGroup (3.11+), and the `exceptiongroup` backport's where it is
    imported (anyio's task groups raise it on 3.10)."""
    found = []
    for module in (builtins, sys.modules.get("exceptiongroup")):
        group = getattr(module, "BaseExceptionGroup", None)
        if isinstance(group, type) and group not in found:
            found.append(group)
    return tuple(found)


def _classify_group(
    exc: BaseException, now: float | None, secrets: Secrets, modeled: Modeled
) -> Outcome:
    """A task group's errors (asyncio.TaskGroup, anyio): permanent if any of them is,
    else a retry, throttled if any is, no sooner than the longest Retry-After of them."""
    outcomes = [
        classify_exception(inner, now=now, secrets=secrets, modeled=modeled)
        for inner in getattr(exc, "exceptions", ())
    ]
    if not outcomes:
        return Outcome(PERMANENT, error=_summary(exc, secrets))
    for outcome in outcomes:
        if outcome.kind == PERMANENT:
            return outcome
    throttled = [o for o in outcomes if o.throttled]
    first = (throttled or outcomes)[0]
    afters = [o.retry_after for o in outcomes if o.retry_after is not None]
    return Outcome(
        RETRY,
        throttled=bool(throttled),
        retry_after=max(afters) if afters else None,
        status=first.status,
        error=first.error,
    )


def classify_exception(
    exc: BaseException,
    *,
    now: float | None = None,
    secrets: Secrets = _no_secrets,
    modeled: Modeled = _no_model,
) -> Outcome:
    """The outcome of an attempt that raised `exc`.

    `offload.Retry` is throttled (with its `after`), `offload.GiveUp` permanent (with its
    reason). A requests or httpx `raise_for_status()` error goes by its response, as a
    returned response would; botocore ClientErrors by error code and HTTP status, and by
    what `modeled(code)` says the operation's model marks retryable (an AwsCall's); network
    errors and timeouts of requests, urllib3, botocore and the builtins are transient;
    anything else is permanent. An exception group is judged by what it holds. `secrets()` gives
    values to scrub from the error text (the call's own headers, params and passwords,
    which an exception may quote).
    """
    groups = _exception_groups()
    if groups and isinstance(exc, groups):
        return _classify_group(exc, now, secrets, modeled)
    if isinstance(exc, Retry):
        error = "Retry requested" + (f" after {exc.after:g}s" if exc.after is not None else "")
        return Outcome(RETRY, throttled=True, retry_after=exc.after, error=error)
    if isinstance(exc, GiveUp):
        reason = exc.reason if isinstance(exc.reason, str) else _message(exc)
        return Outcome(PERMANENT, error=_clean(reason, secrets) or "GiveUp")

    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        if isinstance(exc, botocore.ClientError):
            return _classify_client_error(exc, now, secrets, modeled)
        # As botocore's standard mode: every connection error and HTTP client error
        # (EndpointConnectionError, ConnectionClosedError, connect and read timeouts).
        if isinstance(exc, (botocore.ConnectionError, botocore.HTTPClientError)):
            return Outcome(RETRY, error=_summary(exc, secrets))

    response = getattr(exc, "response", None)
    if (
        isinstance(exc, requests.HTTPError)
        and isinstance(response, requests.Response)
        and isinstance(response.status_code, int)
        and response.status_code >= 400
    ):
        # response.raise_for_status() in a task function: judged as its response would be.
        return _classify_status(
            response.status_code, response.reason, response.headers, None, now, secrets
        )

    for httpx in _httpx_modules():
        if isinstance(exc, httpx.HTTPStatusError):  # response.raise_for_status()
            response = exc.response
            status = response.status_code
            if status < 400:  # raised for a redirect httpx did not follow: not delivered
                error = _http_summary(status, response.reason_phrase, secrets)
                return Outcome(PERMANENT, status=status, error=error)
            return _classify_status(
                status, response.reason_phrase, response.headers, None, now, secrets
            )
        # The request as built breaks the protocol (a header value with a line break, a
        # body shorter than its Content-Length): sending it again cannot help.
        if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
            return Outcome(PERMANENT, error=_summary(exc, secrets))
        if isinstance(exc, (httpx.TimeoutException, httpx.TransportError)):
            return Outcome(RETRY, error=_summary(exc, secrets))

    if isinstance(exc, _TRANSIENT_EXCEPTIONS):
        return Outcome(RETRY, error=_summary(exc, secrets))
    return Outcome(PERMANENT, error=_summary(exc, secrets))
