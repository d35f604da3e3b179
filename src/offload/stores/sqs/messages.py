"""The SQS store's messages: one per task, and offload's dead-letter record around one.

One SQS message per task, ASCII JSON (SQS would silently replace characters outside
XML's set): `codec.task.TaskRecord` (the call, a per-task RetryPolicy, the task's id,
idempotency key and throttle key, and its attempt state: calls made, failures, first and
last attempt times) marked `"offload": "offload-task/1"`, so any worker continues where
another stopped; and `due`, the time a delay beyond SQS's 900 s runs out. A message that
is not offload's, or names a function this worker cannot import, is handed out as a task
that dead-letters itself (`codec.task.Unreadable`: reason "permanent", the record kept
for a replay once the cause is fixed). A task larger than the queue's MaximumMessageSize
(256 KiB by default; up to 1 MiB) less `RESERVE`, kept for the dead-letter record that
wraps it, is refused at enqueue with NotSerializable, which the caller already handles
for "this task cannot be stored": keep large payloads elsewhere (S3) and pass a
reference.

A dead-letter record (`"offload": "offload-dead-letter/1"`) holds the DeadLetter
(reason, attempts, last error, status, times; description and error clipped) and the
task's message, to replay it. A DLQ message may also be a task message the redrive
policy moved there, or neither: `read_entry` reads all three.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...codec.task import TaskRecord, describe_call
from ...errors import NotSerializable
from ...records import DeadLetter, Task, utc

__all__ = [
    "RESERVE",
    "Entry",
    "dumps",
    "letter_body",
    "load_message",
    "read_entry",
    "task_body",
    "task_message",
    "task_record",
    "unreadable_task",
]

_TASK_FORMAT = "offload-task/1"
_LETTER_FORMAT = "offload-dead-letter/1"
RESERVE = 4096  # bytes kept free in a task message for the dead-letter record around it
_FIELD_MAX = 1000  # characters of a dead letter's description or error kept in the DLQ
_REDRIVEN_ERROR = "moved by the SQS redrive policy"


@dataclass(frozen=True, slots=True)
class Entry:
    """A message read from the dead-letter queue, and what it says."""

    message: dict[str, Any]
    letter: DeadLetter
    task: TaskRecord | None  # the task, to replay; None when unreadable
    sent: int  # SentTimestamp (ms)


def _clip(text: str) -> str:
    return text if len(text) <= _FIELD_MAX else text[: _FIELD_MAX - 1] + "…"


def dumps(record: Mapping[str, Any]) -> str:
    """A message body: compact JSON, ASCII only."""
    # ASCII only: SQS replaces characters outside XML's set (lone surrogates, U+FFFE) with
    # U+FFFD instead of refusing them, which would change a task's arguments silently.
    return json.dumps(record, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


# -- task messages -------------------------------------------------------------------------


def task_record(task: Task, due: float | None = None) -> dict[str, Any]:
    """The JSON-ready message of a task and its attempt state (`TaskRecord`, marked as
    offload's, with the due time of a delay beyond SQS's); NotSerializable if it cannot
    be stored."""
    record: dict[str, Any] = {"offload": _TASK_FORMAT, **TaskRecord.of(task).to_json()}
    if due is not None:
        record["due"] = due
    return record


def load_message(body: str) -> dict[str, Any]:
    """The JSON of an offload message, task or dead letter; ValueError for anything else."""
    try:
        record = json.loads(body)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not an offload message (not JSON: {exc})") from None
    if not isinstance(record, dict) or record.get("offload") not in (_TASK_FORMAT, _LETTER_FORMAT):
        raise ValueError("not an offload message")
    return record


def task_message(record: Any) -> tuple[TaskRecord, float | None]:
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


def unreadable_task(message: Mapping[str, Any], error: str) -> Task:
    """A task for a message that is not offload's: performing it dead-letters it (reason
    "permanent", the body kept), so that a stray message neither blocks nor vanishes."""
    message_id = str(message.get("MessageId", "?"))
    return TaskRecord(message_id, message_id, None, str(message.get("Body", "")), None).unreadable(
        error
    )


def task_body(task: Task, due: float | None, *, max_body: int, queue: str) -> str:
    """The body of a task's message, with `due` for a delay beyond SQS's; NotSerializable
    when it cannot be stored, or is larger than `max_body` (the queue's limit less
    RESERVE)."""
    body = dumps(task_record(task, due))
    size = len(body)  # ASCII: characters are bytes
    if size > max_body:
        raise NotSerializable(
            f"{task!r} is {size:,} bytes as an SQS message; queue {queue} takes at most "
            f"{max_body:,} (its MaximumMessageSize less {RESERVE:,} kept for the "
            "dead-letter record). Keep large payloads elsewhere (S3) and pass a reference"
        )
    return body


# -- dead-letter records -------------------------------------------------------------------


def letter_body(task: Task, letter: DeadLetter) -> str:
    """The body of offload's dead-letter record of `task`, with the task's message to
    replay it (none when the task cannot be stored: the record is kept all the same)."""
    try:
        stored: dict[str, Any] | None = task_record(task)
    except NotSerializable:  # never put in this store; keep at least the record
        stored = None
    return dumps({"offload": _LETTER_FORMAT, "letter": _letter_json(letter), "task": stored})


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    data = letter.to_json()
    data["description"] = _clip(letter.description)
    data["error"] = _clip(letter.error)
    return data


def read_entry(message: dict[str, Any]) -> Entry:
    """Read one DLQ message: offload's record, a task the redrive policy moved, or neither."""
    body = message.get("Body", "")
    sent = int(message.get("Attributes", {}).get("SentTimestamp", "0") or 0)
    message_id = message["MessageId"]
    try:
        record = load_message(body)
        if record["offload"] == _LETTER_FORMAT:
            task = record.get("task")
            return Entry(
                message,
                DeadLetter.from_json(record.get("letter")),
                task_message(task)[0] if task is not None else None,
                sent,
            )
        task, _ = task_message(record)
        # Moved by the redrive policy: a worker died holding it max_receives times.
        return Entry(
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
        return Entry(
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
