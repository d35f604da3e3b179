"""The SQS store's requests: one boto3 client, the queues opened or made, and the batch
requests the store sends.

Queues. NAME and its dead-letter queue (`dlq`, default `NAME-dlq`) are created when
missing (`create=false` refuses instead): the DLQ first, then NAME with a RedrivePolicy
(`maxReceiveCount` = `max_receives`, default 10), 14 days' retention and SQS-managed
encryption (task messages carry the call's headers). The redrive policy is only the
safety net for a task whose worker dies every time it runs it; offload buries tasks
itself. Existing queues are used as they are, never modified: when NAME has a redrive
policy its target is the DLQ, otherwise `dlq` (created if missing). A FIFO queue is
refused: it cannot delay single messages, which retries need.

Every SQS request is tried once (offload's one retry layer: botocore's own retries are
off, as for AwsCall); a failed one raises StoreError, its text redacted (botocore's may
hold the endpoint URL). A batch entry SQS did not take is logged, and reported to the
caller where it matters (`send_many`, `set_visibility`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from ..._redact import redact_text
from ...errors import StoreError
from .messages import RESERVE

__all__ = ["BATCH", "MAX_DELAY", "MAX_VISIBILITY", "Queues", "error_code"]

log = logging.getLogger("offload")

MAX_DELAY = 900  # SQS's DelaySeconds limit
MAX_VISIBILITY = 43_200  # SQS's VisibilityTimeout limit (12 h)
BATCH = 10  # entries per SQS batch request
_BATCH_BYTES = 262_144  # payload per batch request, the limit of queues made before 2025
_RETENTION = 1_209_600  # 14 days, SQS's longest
_NO_QUEUE = frozenset({"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"})


def error_code(exc: BaseException | None) -> str:
    """The SQS error code of a botocore ClientError (JSON and query protocols alike)."""
    error = getattr(exc, "response", {}).get("Error", {})
    return str(error.get("QueryErrorCode") or error.get("Code") or type(exc).__name__)


class Queues:
    """One SQS client, for the queue called `name` and its DLQ: opening them, and every
    request the store makes. Error texts name the store by `url` (redacted)."""

    def __init__(
        self, name: str, *, url: str, region: str | None, endpoint_url: str | None, wait: float
    ) -> None:
        self.name = name
        self.url = url
        self.region = region
        self.endpoint_url = endpoint_url
        self.wait = wait
        self.client: Any = self._client()

    def after_fork(self) -> None:
        """A new client: a boto3 client's connection pool must not be shared with the parent."""
        self.client = self._client()

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()

    def _client(self) -> Any:
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
    def errors(self, what: str) -> Iterator[None]:
        """Turn botocore's errors into StoreError, naming the operation and the queue."""
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        try:
            yield
        except ClientError as exc:
            message = exc.response.get("Error", {}).get("Message", "")
            raise StoreError(
                redact_text(f"SQS {what} failed on {self.url}: {error_code(exc)}: {message}")
            ) from exc
        except BotoCoreError as exc:  # botocore's text may hold the endpoint URL
            raise StoreError(redact_text(f"SQS {what} failed on {self.url}: {exc}")) from exc

    def queue_url(self, name: str, account: str | None = None) -> str | None:
        """The URL of the queue called `name`; None if there is none."""
        kwargs: dict[str, str] = {"QueueName": name}
        if account:
            kwargs["QueueOwnerAWSAccountId"] = account
        try:
            with self.errors("GetQueueUrl"):
                return str(self.client.get_queue_url(**kwargs)["QueueUrl"])
        except StoreError as exc:
            if error_code(exc.__cause__) in _NO_QUEUE:
                return None
            raise

    def attributes(self, url: str, names: Sequence[str]) -> dict[str, str]:
        with self.errors("GetQueueAttributes"):
            response = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=list(names))
        return dict(response.get("Attributes", {}))

    def create(self, name: str, attributes: Mapping[str, str]) -> str:
        with self.errors("CreateQueue"):
            url = self.client.create_queue(QueueName=name, Attributes=dict(attributes))
        log.info("offload: created SQS queue %s", name)
        return str(url["QueueUrl"])

    def open_queues(
        self, dlq: str | None, *, create: bool, max_receives: int
    ) -> tuple[str, str, str, int]:
        """(queue URL, DLQ name, DLQ URL, largest task body) with the queues made if missing."""
        common = {"MessageRetentionPeriod": str(_RETENTION), "SqsManagedSseEnabled": "true"}
        url = self.queue_url(self.name)
        dlq_url: str | None = None
        if url is not None:
            attrs = self.attributes(url, ["RedrivePolicy", "MaximumMessageSize", "FifoQueue"])
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
                dlq_url = self.queue_url(target, parts[4] if len(parts) > 5 else None)
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
            dlq_url = self.queue_url(dlq)
        if dlq_url is None:
            if not create:
                raise StoreError(f"SQS queue {dlq} does not exist (and the URL says create=false)")
            dlq_url = self.create(dlq, common)
        if url is None:
            arn = self.attributes(dlq_url, ["QueueArn"])["QueueArn"]
            redrive = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receives)})
            url = self.create(self.name, {**common, "RedrivePolicy": redrive})
        sizes = [
            int(self.attributes(u, ["MaximumMessageSize"]).get("MaximumMessageSize", 262_144))
            for u in (url, dlq_url)
        ]
        return url, dlq, dlq_url, min(sizes) - RESERVE

    def send(self, url: str, body: str, delay: int | None = None) -> None:
        """SendMessage, delayed by `delay` seconds if given."""
        with self.errors("SendMessage"):
            if delay is None:
                self.client.send_message(QueueUrl=url, MessageBody=body)
            else:
                self.client.send_message(QueueUrl=url, MessageBody=body, DelaySeconds=delay)

    def delete(self, url: str, receipt: str) -> None:
        """DeleteMessage of the message last received with `receipt`."""
        with self.errors("DeleteMessage"):
            self.client.delete_message(QueueUrl=url, ReceiptHandle=receipt)

    def send_many(self, url: str, entries: Sequence[tuple[str, int]]) -> list[bool]:
        """SendMessageBatch for (body, delay) entries; which of them were sent."""
        sent = [False] * len(entries)
        start = 0
        while start < len(entries):
            end, size = start, 0
            while end < len(entries) and end - start < BATCH:
                size += len(entries[end][0])
                if end > start and size > _BATCH_BYTES:
                    break
                end += 1
            batch = [
                {"Id": str(i), "MessageBody": entries[i][0], "DelaySeconds": entries[i][1]}
                for i in range(start, end)
            ]
            with self.errors("SendMessageBatch"):
                response = self.client.send_message_batch(QueueUrl=url, Entries=batch)
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

    def delete_many(self, url: str, receipts: Sequence[str]) -> None:
        for start in range(0, len(receipts), BATCH):
            batch = [
                {"Id": str(i), "ReceiptHandle": receipt}
                for i, receipt in enumerate(receipts[start : start + BATCH])
            ]
            with self.errors("DeleteMessageBatch"):
                response = self.client.delete_message_batch(QueueUrl=url, Entries=batch)
            for failed in response.get("Failed", []):
                log.warning(
                    "offload: SQS did not delete a message from %s (%s); it comes back later",
                    self.name,
                    failed.get("Code"),
                )

    def set_visibility(self, url: str, receipts: Sequence[str], seconds: int) -> list[str]:
        """ChangeMessageVisibilityBatch; the SQS codes of the entries that failed."""
        codes: list[str] = []
        for start in range(0, len(receipts), BATCH):
            batch = [
                {"Id": str(i), "ReceiptHandle": receipt, "VisibilityTimeout": seconds}
                for i, receipt in enumerate(receipts[start : start + BATCH])
            ]
            with self.errors("ChangeMessageVisibilityBatch"):
                response = self.client.change_message_visibility_batch(QueueUrl=url, Entries=batch)
            codes.extend(str(failed.get("Code")) for failed in response.get("Failed", []))
        return codes

    def receive(self, url: str, count: int, wait: float, visibility: int) -> list[dict[str, Any]]:
        with self.errors("ReceiveMessage"):
            response = self.client.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=math.ceil(wait),
                VisibilityTimeout=visibility,
                MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
            )
        return list(response.get("Messages", []))
