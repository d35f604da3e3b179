"""The Amazon SQS store: web processes on many machines enqueue, `offload worker` processes
on other machines perform the calls. SQS is the distributed engine; offload adds the retry
policy, the throttle gates and a dead-letter record SQS does not keep.

    sqs://NAME?region=eu-west-1&endpoint_url=http://127.0.0.1:5000&dlq=NAME-dlq
              &max_receives=10&wait=1&create=true&lease_timeout=60

`region` and `endpoint_url` default to boto3's own (AWS_DEFAULT_REGION, AWS_ENDPOINT_URL);
credentials come from boto3's chain, never from the URL. Standard queues only: a FIFO
queue cannot delay single messages, which retries need.

Queues. NAME and its dead-letter queue (`dlq`, default `NAME-dlq`) are created when
missing (`create=false` refuses instead): the DLQ first, then NAME with a RedrivePolicy
(`maxReceiveCount` = `max_receives`, default 10), 14 days' retention and SQS-managed
encryption (task messages carry the call's headers). The redrive policy is only the
safety net for a task whose worker dies every time it runs it; offload buries tasks
itself. Existing queues are used as they are, never modified: when NAME has a redrive
policy its target is the DLQ, otherwise `dlq` (created if missing).

Messages. One SQS message per task, ASCII JSON (SQS would silently replace characters
outside XML's set): `codec.task.TaskRecord` (the call, a per-task RetryPolicy, the
task's id, idempotency key and throttle key, and its attempt state: calls made,
failures, first and last attempt times), so any worker continues where another stopped.
A message that is not offload's, or names a function this worker cannot import, is
handed out as a task that dead-letters itself (`codec.task.Unreadable`: reason "permanent",
the record kept for a replay once the cause is fixed). A task larger than the queue's
MaximumMessageSize (256 KiB by default; up to 1 MiB) less 4 KiB, kept for the
dead-letter record that wraps it, is refused at enqueue with NotSerializable, which the
caller already handles for "this task cannot be stored": keep large payloads elsewhere
(S3) and pass a reference.

Leases are visibility timeouts. `claim` is ReceiveMessage (up to 10 per request, long
polling for `wait` seconds when the queue is empty) with VisibilityTimeout = the lease
(OFFLOAD_LEASE_TIMEOUT, default 60 s); the receipt handles stay in this store, keyed by
task id. `renew` is ChangeMessageVisibilityBatch (SQS caps a message's visibility at 12
hours from its receipt, so a single call cannot hold a task longer). A worker killed
mid-call leaves its message invisible until the lease runs out; then any worker receives
it and performs it again (at-least-once; a standard queue may also deliver a message
twice on its own). SQS cannot lease a message as it is sent, so `put(lease=True)` is
refused (`leases_on_put` is False): a consuming web process sends with `lease=False` and
claims its tasks back like any worker.

Retries re-send. `release` sends the task with its new attempt state and
DelaySeconds = the delay rounded up (so never earlier than asked), then deletes the old
message; a delay beyond SQS's 900 s is carried as `due` in the message, and a worker
that receives it early sends it on again. Re-sending, rather than
ChangeMessageVisibility, keeps each message's receive count at the number of workers
that died holding it, which is what the redrive policy must count. Tasks of keys whose
gate is closed in this process (`exclude_keys`) go back the same way, due when the gate
reopens: throttle gates are per worker process, and SQS cannot filter by key.

Dead letters. `bury` sends offload's own record (the DeadLetter: reason, attempts, last
error, status, times; and the task, to replay it) to the DLQ, then deletes the task's
message. Messages the redrive policy moved there (no record) are listed too, with reason
"exhausted" and error "moved by the SQS redrive policy"; their id is the SQS message id.
Listing receives every DLQ message with a short visibility timeout and makes each
visible again at once (so it neither consumes nor hides them beyond the listing; a
lister killed mid-way hides them for 30 s). While one scan runs, another sees the
messages it holds as missing: two operators listing at the same moment may each see
part, and a replay of a letter being listed elsewhere may answer UnknownDeadLetter; try
again. Replay sends the task to NAME and then deletes the dead letter (moto lacks
StartMessageMoveTask); revive/discard/purge delete. Each of these scans the DLQ, so they
suit the hundreds, not millions.

Trust. A worker performs what a message names, any importable function included, with
the message's arguments: whoever may send to the queue may run code on the workers. The
queue's IAM policy is the boundary (see the README's "Scaling out").

Failures. Every SQS request is tried once (offload's one retry layer: botocore's own
retries are off, as for AwsCall); a failed one raises StoreError. Every step that moves
a task sends before it deletes, so a crash between the two duplicates a task, never
loses one. SQS standard queues order only roughly: "oldest first" is best effort.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from .._redact import redact_text, redact_url
from ..codec.task import TaskRecord, describe_call
from ..config import check_lease_timeout, lease_timeout_from_env
from ..errors import NotSerializable, StoreError, UnknownDeadLetter
from ..records import DeadLetter, Task, utc
from ._shared import bool_option, number_option
from .base import NO_KEYS, StoreCounts

__all__ = ["SqsStore"]

log = logging.getLogger("offload")

_TASK_FORMAT = "offload-task/1"
_LETTER_FORMAT = "offload-dead-letter/1"
_RESERVE = 4096  # bytes kept free in a task message for the dead-letter record around it
_FIELD_MAX = 1000  # characters of a dead letter's description or error kept in the DLQ
_MAX_DELAY = 900  # SQS's DelaySeconds limit
_MAX_VISIBILITY = 43_200  # SQS's VisibilityTimeout limit (12 h)
_BATCH = 10  # entries per SQS batch request
_BATCH_BYTES = 262_144  # payload per batch request, the limit of queues made before 2025
_LIST_VISIBILITY = 30  # seconds a DLQ scan hides what it read, if it dies before unhiding
_RETENTION = 1_209_600  # 14 days, SQS's longest
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_REDRIVEN_ERROR = "moved by the SQS redrive policy"
_NO_QUEUE = frozenset({"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"})


@dataclass(frozen=True, slots=True)
class _Held:
    """The latest receipt of a message this process leased (SQS deletes only with it)."""

    receipt: str
    message_id: str


@dataclass(frozen=True, slots=True)
class _Scan:
    """The DLQ messages one scan read (hidden until it ends), and those it deleted."""

    entries: list[_Entry]
    deleted: set[str]  # message ids


@dataclass(frozen=True, slots=True)
class _Entry:
    """A message read from the dead-letter queue, and what it says."""

    message: dict[str, Any]
    letter: DeadLetter
    task: TaskRecord | None  # the task, to replay; None when unreadable
    sent: int  # SentTimestamp (ms)


def _code(exc: BaseException | None) -> str:
    """The SQS error code of a botocore ClientError (JSON and query protocols alike)."""
    error = getattr(exc, "response", {}).get("Error", {})
    return str(error.get("QueryErrorCode") or error.get("Code") or type(exc).__name__)


def _clip(text: str) -> str:
    return text if len(text) <= _FIELD_MAX else text[: _FIELD_MAX - 1] + "…"


def _dumps(record: Mapping[str, Any]) -> str:
    # ASCII only: SQS replaces characters outside XML's set (lone surrogates, U+FFFE) with
    # U+FFFD instead of refusing them, which would change a task's arguments silently.
    return json.dumps(record, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


# -- task records --------------------------------------------------------------------------


def task_record(task: Task, due: float | None = None) -> dict[str, Any]:
    """The JSON-ready message of a task and its attempt state (`TaskRecord`, marked as
    offload's, with the due time of a delay beyond SQS's); NotSerializable if it cannot
    be stored."""
    record: dict[str, Any] = {"offload": _TASK_FORMAT, **TaskRecord.of(task).to_json()}
    if due is not None:
        record["due"] = due
    return record


def _load(body: str) -> dict[str, Any]:
    try:
        record = json.loads(body)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not an offload message (not JSON: {exc})") from None
    if not isinstance(record, dict) or record.get("offload") not in (_TASK_FORMAT, _LETTER_FORMAT):
        raise ValueError("not an offload message")
    return record


def _task_message(record: Any) -> tuple[TaskRecord, float | None]:
    """The task of an offload task message, and its due time (a delay beyond SQS's);
    ValueError for anything else. (The call is checked when the task is loaded: an
    unreadable one becomes a task that dead-letters itself, see `codec.task.Unreadable`.)"""
    if not isinstance(record, dict) or record.get("offload") != _TASK_FORMAT:
        raise ValueError("not an offload task record")
    due = record.get("due")
    if due is not None and (
        isinstance(due, bool) or not isinstance(due, (int, float)) or not math.isfinite(due)
    ):
        raise ValueError(f"malformed offload message: due must be a number, got {due!r}")
    fields = {k: v for k, v in record.items() if k not in ("offload", "due")}
    return TaskRecord.from_json(fields), due


def _unreadable_task(message: Mapping[str, Any], error: str) -> Task:
    """A task for a message that is not offload's: performing it dead-letters it (reason
    "permanent", the body kept), so that a stray message neither blocks nor vanishes."""
    message_id = str(message.get("MessageId", "?"))
    return TaskRecord(message_id, message_id, None, str(message.get("Body", "")), None).unreadable(
        error
    )


# -- dead-letter records -------------------------------------------------------------------


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    data = letter.to_json()
    data["description"] = _clip(letter.description)
    data["error"] = _clip(letter.error)
    return data


def _entry(message: dict[str, Any]) -> _Entry:
    """Read one DLQ message: offload's record, a task the redrive policy moved, or neither."""
    body = message.get("Body", "")
    sent = int(message.get("Attributes", {}).get("SentTimestamp", "0") or 0)
    message_id = message["MessageId"]
    try:
        record = _load(body)
        if record["offload"] == _LETTER_FORMAT:
            task = record.get("task")
            return _Entry(
                message,
                DeadLetter.from_json(record.get("letter")),
                _task_message(task)[0] if task is not None else None,
                sent,
            )
        task, _ = _task_message(record)
        # Moved by the redrive policy: a worker died holding it max_receives times.
        return _Entry(
            message,
            DeadLetter(
                id=message_id,
                task_id=task.id,
                description=describe_call(task.call),
                key=task.key,
                attempts=task.attempts,
                error=_REDRIVEN_ERROR,
                status=None,
                reason="exhausted",
                first_attempt_at=utc(task.first_attempt_at),
                last_attempt_at=utc(task.last_attempt_at),
            ),
            task,
            sent,
        )
    except ValueError as exc:
        return _Entry(
            message,
            DeadLetter(
                id=message_id,
                task_id=message_id,
                description="(unreadable message)",
                key=None,
                attempts=0,
                error=_clip(str(exc)),
                status=None,
                reason="permanent",
                first_attempt_at=None,
                last_attempt_at=None,
            ),
            None,
            sent,
        )


# -- the store -----------------------------------------------------------------------------


class SqsStore:
    """A durable store on an Amazon SQS standard queue and its dead-letter queue.

    Open it with `open_store("sqs://NAME?region=...")` or `Offloader(store="sqs://...")`;
    the module docstring says how each operation maps onto SQS and why.
    """

    durable = True
    dropped = 0  # the DLQ keeps every dead letter (for its retention period)
    #: SQS cannot lease a message as it is sent: put(lease=True) is refused, and a
    #: consuming process claims its own tasks back like any worker.
    leases_on_put = False
    #: flush() looks at the queue's counts this often: each look is a GetQueueAttributes.
    flush_poll = 0.5

    def __init__(
        self,
        name: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        dlq: str | None = None,
        max_receives: int = 10,
        wait: float = 1.0,
        create: bool = True,
        lease_timeout: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"store: an SQS queue name is 1 to 80 letters, digits, '-' or '_' "
                f"(standard queues only, no .fifo), got {name!r}"
            )
        if dlq is not None and (not isinstance(dlq, str) or not _NAME.match(dlq)):
            raise ValueError(f"store: sqs dlq= must be a queue name, got {dlq!r}")
        if dlq == name:
            raise ValueError("store: the dead-letter queue must not be the queue itself")
        if isinstance(max_receives, bool) or not isinstance(max_receives, int):
            raise TypeError(f"max_receives must be an integer, got {max_receives!r}")
        if not 1 <= max_receives <= 1000:
            raise ValueError(f"max_receives must be from 1 to 1000, got {max_receives!r}")
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 20:
            raise ValueError(f"wait must be a number of seconds from 0 to 20, got {wait!r}")
        if lease_timeout is None:
            lease_timeout = lease_timeout_from_env(maximum=_MAX_VISIBILITY)
        else:
            check_lease_timeout("lease_timeout", lease_timeout, maximum=_MAX_VISIBILITY)
        self.name = name
        self.region = region
        self.endpoint_url = endpoint_url
        self.max_receives = max_receives
        self.wait = float(wait)
        self.lease_timeout = float(lease_timeout)
        # Visibility timeouts are whole seconds; rounding up never cuts a lease short.
        self._visibility = max(1, math.ceil(lease_timeout))
        shown_endpoint = None if endpoint_url is None else redact_url(endpoint_url)
        query = {"region": region, "endpoint_url": shown_endpoint, "dlq": dlq}
        shown = "&".join(f"{k}={quote(v, safe=':/@')}" for k, v in query.items() if v is not None)
        self.url = redact_url(f"sqs://{name}" + (f"?{shown}" if shown else ""))
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._client: Any = self._make_client()
        try:
            self._queue_url, self.dlq, self._dlq_url, self._max_body = self._open_queues(
                dlq, create
            )
        except BaseException:
            self._client.close()
            raise

    @classmethod
    def from_url(cls, url: str, *, lease_timeout: float | None = None) -> SqsStore:
        """The store an `sqs://NAME?region=...&endpoint_url=...` URL names.

        `lease_timeout` applies unless the URL gives one; without either,
        OFFLOAD_LEASE_TIMEOUT, else 60 s."""
        split = urlsplit(url)
        if split.scheme.lower() != "sqs" or not split.netloc or split.path not in ("", "/"):
            raise ValueError(
                f"store: expected sqs://QUEUE-NAME?region=...&endpoint_url=..., got {url!r}"
            )
        if "@" in split.netloc:
            raise ValueError(
                "store: an sqs:// URL takes no credentials; boto3 finds them (environment, "
                "profile, instance role)"
            )
        options: dict[str, Any] = {}
        for key, value in parse_qsl(split.query, keep_blank_values=True, strict_parsing=False):
            if key in options:
                raise ValueError(f"store: sqs URL option {key}= given twice")
            if key in ("region", "endpoint_url", "dlq"):
                if not value:
                    raise ValueError(f"store: sqs URL option {key}= is empty")
                options[key] = value
            elif key == "max_receives":
                options[key] = int(
                    number_option("sqs", key, value, minimum=1, maximum=1000, integer=True)
                )
            elif key == "wait":
                options[key] = number_option("sqs", key, value, minimum=0, maximum=20)
            elif key == "lease_timeout":
                options[key] = number_option(
                    "sqs", key, value, minimum=0.001, maximum=_MAX_VISIBILITY
                )
            elif key == "create":
                options[key] = bool_option("sqs", key, value)
            else:
                raise ValueError(
                    f"store: unknown sqs URL option {key!r} (expected region, endpoint_url, "
                    "dlq, max_receives, wait, create, lease_timeout)"
                )
        options.setdefault("lease_timeout", lease_timeout)  # the URL's wins
        return cls(split.netloc, **options)

    # -- connections ---------------------------------------------------------------------

    def _make_client(self) -> Any:
        try:
            import boto3  # noqa: PLC0415 - an optional extra
            from botocore.config import Config  # noqa: PLC0415
        except ImportError:
            raise StoreError("the SQS store needs boto3: pip install 'offload[aws]'") from None
        # As calls.Resources makes them: one attempt per request (offload's one retry
        # layer), the retry mode said explicitly (botocore 1.44 changed the default), and
        # a read timeout that outlasts a long poll.
        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=5.0,
            read_timeout=max(30.0, self.wait + 10.0),
        )
        try:
            return boto3.session.Session().client(
                "sqs", region_name=self.region, endpoint_url=self.endpoint_url, config=config
            )
        except Exception as exc:  # NoRegionError, a bad endpoint URL
            raise StoreError(redact_text(f"cannot open the SQS store {self.url}: {exc}")) from exc

    @contextmanager
    def _sqs(self, what: str) -> Iterator[None]:
        """Turn botocore's errors into StoreError, naming the operation and the queue."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            yield
        except ClientError as exc:
            message = exc.response.get("Error", {}).get("Message", "")
            raise StoreError(
                redact_text(f"SQS {what} failed on {self.url}: {_code(exc)}: {message}")
            ) from exc
        except BotoCoreError as exc:  # botocore's text may hold the endpoint URL
            raise StoreError(redact_text(f"SQS {what} failed on {self.url}: {exc}")) from exc

    def _queue_url_of(self, name: str, account: str | None = None) -> str | None:
        """The URL of the queue called `name`; None if there is none."""
        kwargs: dict[str, str] = {"QueueName": name}
        if account:
            kwargs["QueueOwnerAWSAccountId"] = account
        try:
            with self._sqs("GetQueueUrl"):
                return str(self._client.get_queue_url(**kwargs)["QueueUrl"])
        except StoreError as exc:
            if _code(exc.__cause__) in _NO_QUEUE:
                return None
            raise

    def _attributes(self, url: str, names: Sequence[str]) -> dict[str, str]:
        with self._sqs("GetQueueAttributes"):
            response = self._client.get_queue_attributes(QueueUrl=url, AttributeNames=list(names))
        return dict(response.get("Attributes", {}))

    def _create(self, name: str, attributes: Mapping[str, str]) -> str:
        with self._sqs("CreateQueue"):
            url = self._client.create_queue(QueueName=name, Attributes=dict(attributes))
        log.info("offload: created SQS queue %s", name)
        return str(url["QueueUrl"])

    def _open_queues(self, dlq: str | None, create: bool) -> tuple[str, str, str, int]:
        """(queue URL, DLQ name, DLQ URL, largest task body) with the queues made if missing."""
        common = {"MessageRetentionPeriod": str(_RETENTION), "SqsManagedSseEnabled": "true"}
        url = self._queue_url_of(self.name)
        dlq_url: str | None = None
        if url is not None:
            attrs = self._attributes(url, ["RedrivePolicy", "MaximumMessageSize", "FifoQueue"])
            if attrs.get("FifoQueue") == "true":
                raise StoreError(
                    f"SQS queue {self.name} is a FIFO queue; offload needs a standard one"
                )
            redrive = attrs.get("RedrivePolicy")
            if redrive:
                try:
                    arn = str(json.loads(redrive)["deadLetterTargetArn"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise StoreError(
                        f"SQS queue {self.name} has an unreadable RedrivePolicy"
                    ) from exc
                parts = arn.split(":")
                target = parts[-1]
                if dlq is not None and dlq != target:
                    raise StoreError(
                        f"SQS queue {self.name} sends its dead letters to {target} (its redrive "
                        f"policy), but the store URL names dlq={dlq}"
                    )
                dlq = target
                dlq_url = self._queue_url_of(target, parts[4] if len(parts) > 5 else None)
                if dlq_url is None:
                    raise StoreError(
                        f"SQS queue {self.name}'s redrive policy names {target}, "
                        "which does not exist"
                    )
            else:
                log.info(
                    "offload: SQS queue %s has no redrive policy: offload's own dead letters still "
                    "go to %s, but nothing catches a task whose worker dies every time",
                    self.name,
                    dlq or f"{self.name}-dlq",
                )
        elif not create:
            raise StoreError(
                f"SQS queue {self.name} does not exist (and the URL says create=false)"
            )
        dlq = dlq or f"{self.name}-dlq"
        if dlq_url is None:
            dlq_url = self._queue_url_of(dlq)
        if dlq_url is None:
            if not create:
                raise StoreError(f"SQS queue {dlq} does not exist (and the URL says create=false)")
            dlq_url = self._create(dlq, common)
        if url is None:
            arn = self._attributes(dlq_url, ["QueueArn"])["QueueArn"]
            redrive = json.dumps(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(self.max_receives)}
            )
            url = self._create(self.name, {**common, "RedrivePolicy": redrive})
        sizes = [
            int(self._attributes(u, ["MaximumMessageSize"]).get("MaximumMessageSize", 262_144))
            for u in (url, dlq_url)
        ]
        return url, dlq, dlq_url, min(sizes) - _RESERVE

    def close(self) -> None:
        """Close the SQS client's connections. Leases still held run out by themselves."""
        self._client.close()

    def after_fork(self) -> None:
        # A boto3 client's connection pool must not be shared with the parent; the
        # parent's leases stay the parent's.
        self._held = {}
        self._lock = threading.Lock()
        self._client = self._make_client()

    def __repr__(self) -> str:
        return f"SqsStore({self.url!r}, dlq={self.dlq!r}, lease_timeout={self.lease_timeout:g})"

    # -- sending and deleting ------------------------------------------------------------

    def _body(self, task: Task, due: float | None = None) -> str:
        body = _dumps(task_record(task, due))
        size = len(body)  # ASCII: characters are bytes
        if size > self._max_body:
            raise NotSerializable(
                f"{task!r} is {size:,} bytes as an SQS message; queue {self.name} takes at most "
                f"{self._max_body:,} (its MaximumMessageSize less {_RESERVE:,} kept for the "
                "dead-letter record). Keep large payloads elsewhere (S3) and pass a reference"
            )
        return body

    def _send_many(self, url: str, entries: Sequence[tuple[str, int]]) -> list[bool]:
        """SendMessageBatch for (body, delay) entries; which of them were sent."""
        sent = [False] * len(entries)
        start = 0
        while start < len(entries):
            end, size = start, 0
            while end < len(entries) and end - start < _BATCH:
                size += len(entries[end][0])
                if end > start and size > _BATCH_BYTES:
                    break
                end += 1
            batch = [
                {"Id": str(i), "MessageBody": entries[i][0], "DelaySeconds": entries[i][1]}
                for i in range(start, end)
            ]
            with self._sqs("SendMessageBatch"):
                response = self._client.send_message_batch(QueueUrl=url, Entries=batch)
            for ok in response.get("Successful", []):
                sent[int(ok["Id"])] = True
            for failed in response.get("Failed", []):
                log.warning(
                    "offload: SQS did not take a message for %s: %s",
                    self.name,
                    failed.get("Code"),
                )
            start = end
        return sent

    def _delete_many(self, url: str, receipts: Sequence[str]) -> None:
        for start in range(0, len(receipts), _BATCH):
            batch = [
                {"Id": str(i), "ReceiptHandle": receipt}
                for i, receipt in enumerate(receipts[start : start + _BATCH])
            ]
            with self._sqs("DeleteMessageBatch"):
                response = self._client.delete_message_batch(QueueUrl=url, Entries=batch)
            for failed in response.get("Failed", []):
                log.warning(
                    "offload: SQS did not delete a message from %s (%s); it comes back later",
                    self.name,
                    failed.get("Code"),
                )

    def _set_visibility(self, url: str, receipts: Sequence[str], seconds: int) -> list[str]:
        """ChangeMessageVisibilityBatch; the SQS codes of the entries that failed."""
        codes: list[str] = []
        for start in range(0, len(receipts), _BATCH):
            batch = [
                {"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": seconds}
                for i, receipt in enumerate(receipts[start : start + _BATCH])
            ]
            with self._sqs("ChangeMessageVisibilityBatch"):
                response = self._client.change_message_visibility_batch(QueueUrl=url, Entries=batch)
            codes.extend(str(failed.get("Code")) for failed in response.get("Failed", []))
        return codes

    def _receive(self, url: str, count: int, wait: float, visibility: int) -> list[dict[str, Any]]:
        with self._sqs("ReceiveMessage"):
            response = self._client.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=math.ceil(wait),
                VisibilityTimeout=visibility,
                MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
            )
        return list(response.get("Messages", []))

    def _take_held(self, task: Task) -> _Held | None:
        with self._lock:
            return self._held.pop(task.id, None)

    # -- tasks ---------------------------------------------------------------------------

    def put(self, task: Task, *, lease: bool) -> None:
        """Send a new task (NotSerializable if it cannot be stored or is too large).

        `lease=True` is refused: SQS cannot lease a message as it is sent. Send with
        `lease=False` and claim it like any worker.
        """
        if lease:
            raise ValueError(
                "the SQS store cannot lease a task as it sends it (leases_on_put is False); "
                "put it with lease=False and claim it like any worker"
            )
        body = self._body(task)
        with self._sqs("SendMessage"):
            self._client.send_message(QueueUrl=self._queue_url, MessageBody=body)

    def claim(self, limit: int, *, exclude_keys: Mapping[str, float] = NO_KEYS) -> list[Task]:
        """Lease up to `limit` tasks now visible, skipping the keys given (see the module doc).

        Waits up to `wait` seconds (long polling) when the queue is empty. A message that
        is not an offload task, or whose function cannot be imported here, is buried at
        once with reason "permanent", its body kept.
        """
        tasks: list[tuple[int, Task]] = []
        wait = self.wait
        while len(tasks) < limit:
            count = min(_BATCH, limit - len(tasks))
            messages = self._receive(self._queue_url, count, wait, self._visibility)
            if not messages:
                break
            wait = 0  # the rest of this claim takes only what is there now
            now = time.time()
            later: list[tuple[dict[str, Any], dict[str, Any], float]] = []
            for message in messages:
                sent = int(message.get("Attributes", {}).get("SentTimestamp", "0") or 0)
                record: dict[str, Any] = {}
                due: float | None = None
                try:
                    record = _load(message["Body"])
                    stored, due = _task_message(record)
                    task = stored.load()
                except ValueError as exc:
                    task = _unreadable_task(message, str(exc))
                if due is not None and due > now:
                    later.append((message, record, due))  # a delay longer than SQS's 900 s
                    continue
                if task.key is not None and task.key in exclude_keys:
                    later.append((message, record, max(exclude_keys[task.key], now + 1)))
                    continue
                held = _Held(message["ReceiptHandle"], message["MessageId"])
                with self._lock:
                    again = task.id in self._held
                    # SQS deletes a message only with its latest receipt handle.
                    self._held[task.id] = held
                if again:
                    continue  # delivered again while this process still performs it
                tasks.append((sent, task))
            if later:
                self._send_later(later, now)
            if len(messages) < count:
                break
        tasks.sort(key=lambda pair: pair[0])
        return [task for _, task in tasks]

    def _send_later(
        self, items: Sequence[tuple[dict[str, Any], dict[str, Any], float]], now: float
    ) -> None:
        """Re-send messages due later as new messages, then delete the ones received."""
        entries = []
        for _, record, due in items:
            delay = math.ceil(due - now)
            resent = {k: v for k, v in record.items() if k != "due"}
            if delay > _MAX_DELAY:
                resent["due"] = due
            entries.append((_dumps(resent), min(max(delay, 0), _MAX_DELAY)))
        sent = self._send_many(self._queue_url, entries)
        done = [item[0]["ReceiptHandle"] for item, ok in zip(items, sent, strict=True) if ok]
        if done:
            self._delete_many(self._queue_url, done)

    def renew(self, tasks: Sequence[Task]) -> None:
        """Extend the visibility timeout of the given tasks' messages to a full lease."""
        with self._lock:
            receipts = [self._held[t.id].receipt for t in tasks if t.id in self._held]
        if not receipts:
            return
        failed = self._set_visibility(self._queue_url, receipts, self._visibility)
        if failed:
            log.warning(
                "offload: %d lease(s) on %s could not be renewed (%s); those tasks may run twice",
                len(failed),
                self.name,
                ", ".join(sorted(set(failed))),
            )

    def release(self, task: Task, due: float) -> None:
        """Send the task again with its attempt state, due at `due`; delete the old message."""
        now = time.time()
        delay = max(0, math.ceil(due - now))
        body = self._body(task, due if delay > _MAX_DELAY else None)
        with self._sqs("SendMessage"):
            self._client.send_message(
                QueueUrl=self._queue_url, MessageBody=body, DelaySeconds=min(delay, _MAX_DELAY)
            )
        held = self._take_held(task)
        if held is not None:
            with self._sqs("DeleteMessage"):
                self._client.delete_message(QueueUrl=self._queue_url, ReceiptHandle=held.receipt)

    def complete(self, task: Task) -> None:
        """Delete a delivered task's message."""
        held = self._take_held(task)
        if held is None:
            log.warning("offload: %r is not leased from %s; nothing to delete", task, self.name)
            return
        with self._sqs("DeleteMessage"):
            self._client.delete_message(QueueUrl=self._queue_url, ReceiptHandle=held.receipt)

    def next_due(self) -> float | None:
        """Now if messages are visible; in `wait` seconds (at least 1) while some are delayed
        or leased (SQS does not say when they come back); None if the queue is empty."""
        attrs = self._attributes(
            self._queue_url,
            [
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesDelayed",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )
        now = time.time()
        if int(attrs.get("ApproximateNumberOfMessages", 0)):
            return now
        if int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)) or int(
            attrs.get("ApproximateNumberOfMessagesNotVisible", 0)
        ):
            return now + max(1.0, self.wait)
        return None

    def counts(self) -> StoreCounts:
        """SQS's approximate numbers: visible, delayed, in flight (leased), dead letters."""
        attrs = self._attributes(
            self._queue_url,
            [
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesDelayed",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )
        return StoreCounts(
            ready=int(attrs.get("ApproximateNumberOfMessages", 0)),
            delayed=int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
            leased=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
            dead_letters=len(self),
        )

    # -- dead letters --------------------------------------------------------------------

    def bury(self, task: Task, letter: DeadLetter) -> None:
        """Send offload's dead-letter record (with the task, to replay it) to the DLQ, then
        delete the task's message."""
        try:
            stored: dict[str, Any] | None = task_record(task)
        except NotSerializable:  # never put in this store; keep at least the record
            stored = None
        body = _dumps({"offload": _LETTER_FORMAT, "letter": _letter_json(letter), "task": stored})
        with self._sqs("SendMessage"):
            self._client.send_message(QueueUrl=self._dlq_url, MessageBody=body)
        held = self._take_held(task)
        if held is not None:
            with self._sqs("DeleteMessage"):
                self._client.delete_message(QueueUrl=self._queue_url, ReceiptHandle=held.receipt)

    @contextmanager
    def _scan(self, stop: Callable[[_Entry], bool] | None = None) -> Iterator[_Scan]:
        """Read the DLQ's messages, hidden while the caller looks at them; on exit, make
        every one the caller did not delete visible again.

        Stops early once `stop(entry)` is true. Reads until an empty answer, long polling
        for a second while fewer than the count SQS gave have been read (a short poll of a
        real queue may miss messages).
        """
        expected = int(
            self._attributes(self._dlq_url, ["ApproximateNumberOfMessages"]).get(
                "ApproximateNumberOfMessages", 0
            )
        )
        scan = _Scan([], set())
        seen: set[str] = set()
        try:
            found = False
            while not found:
                wait = 1.0 if len(seen) < expected else 0.0
                messages = self._receive(self._dlq_url, _BATCH, wait, _LIST_VISIBILITY)
                fresh = [m for m in messages if m["MessageId"] not in seen]
                if not fresh:
                    break
                for message in fresh:
                    seen.add(message["MessageId"])
                    entry = _entry(message)
                    scan.entries.append(entry)
                    found = found or (stop is not None and stop(entry))
            yield scan
        finally:
            left = [
                e.message["ReceiptHandle"]
                for e in scan.entries
                if e.message["MessageId"] not in scan.deleted
            ]
            if left:
                self._set_visibility(self._dlq_url, left, 0)

    def _delete_letter(self, scan: _Scan, entry: _Entry) -> None:
        with self._sqs("DeleteMessage"):
            self._client.delete_message(
                QueueUrl=self._dlq_url, ReceiptHandle=entry.message["ReceiptHandle"]
            )
        scan.deleted.add(entry.message["MessageId"])

    @contextmanager
    def _find(self, dead_letter_id: str) -> Iterator[tuple[_Scan, _Entry]]:
        """The scan that found a dead letter, and its entry; UnknownDeadLetter if none."""
        with self._scan(lambda e: e.letter.id == dead_letter_id) as scan:
            for entry in scan.entries:
                if entry.letter.id == dead_letter_id:
                    yield scan, entry
                    return
            raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r} in {self.dlq}")

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter in the DLQ, oldest first, left as it was (see `_scan`)."""
        with self._scan() as scan:
            ordered = sorted(scan.entries, key=lambda e: (e.sent, e.letter.id))
        return [entry.letter for entry in ordered]

    def __len__(self) -> int:
        """Messages in the DLQ, visible or being read (approximate, as SQS counts)."""
        attrs = self._attributes(
            self._dlq_url, ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )
        return int(attrs.get("ApproximateNumberOfMessages", 0)) + int(
            attrs.get("ApproximateNumberOfMessagesNotVisible", 0)
        )

    def revive(self, dead_letter_id: str) -> Task:
        """Remove a dead letter and return its task (ids and idempotency key kept).

        UnknownDeadLetter for an unknown id; StoreError (the dead letter kept) when it
        holds no task this process can import. Prefer `replay`, which sends the task back
        before it deletes the dead letter.
        """
        with self._find(dead_letter_id) as (scan, entry):
            task = self._task_of(entry)
            self._delete_letter(scan, entry)
        return task

    def replay(self, dead_letter_id: str) -> Task:
        """Send a dead letter's task to the queue with a fresh attempt budget, then delete
        the dead letter; returns the task. A crash in between leaves both, never neither."""
        with self._find(dead_letter_id) as (scan, entry):
            task = self._task_of(entry)
            task._restart()
            with self._sqs("SendMessage"):
                self._client.send_message(QueueUrl=self._queue_url, MessageBody=self._body(task))
            self._delete_letter(scan, entry)
        return task

    def _task_of(self, entry: _Entry) -> Task:
        if entry.task is None:
            raise StoreError(
                f"dead letter {entry.letter.id} holds no task offload can replay "
                f"({entry.letter.error}); discard it"
            )
        task = entry.task.load()  # an unreadable one dead-letters itself again
        task.progress.letter = entry.letter
        return task

    def discard(self, dead_letter_id: str) -> None:
        """Delete a dead letter; UnknownDeadLetter for an unknown id."""
        with self._find(dead_letter_id) as (scan, entry):
            self._delete_letter(scan, entry)

    def purge(self) -> int:
        """Delete every dead letter; returns how many."""
        expected = len(self)
        removed = 0
        while True:
            wait = 1.0 if removed < expected else 0.0
            messages = self._receive(self._dlq_url, _BATCH, wait, _LIST_VISIBILITY)
            if not messages:
                return removed
            self._delete_many(self._dlq_url, [m["ReceiptHandle"] for m in messages])
            removed += len(messages)
