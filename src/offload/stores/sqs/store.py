"""SqsStore: tasks as messages of an SQS standard queue, leased by visibility timeouts,
over its parts: the messages (messages.py), the requests (queues.py) and the dead-letter
queue (letters.py).

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

Every step that moves a task sends before it deletes, so a crash between the two
duplicates a task, never loses one. SQS standard queues order only roughly: "oldest
first" is best effort.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from ..._redact import redact_url
from ...codec.trust import TRUST_ANY, Trust
from ...config import check_lease_timeout, lease_timeout_from_env
from ...records import DeadLetter, Task
from .._shared import bool_option, number_option
from ..base import NO_KEYS, StoreCounts
from .letters import DeadLetterQueue, LetterViews, task_of
from .messages import (
    dumps,
    letter_body,
    load_message,
    task_body,
    task_message,
    unreadable_task,
)
from .queues import BATCH, MAX_DELAY, MAX_VISIBILITY, Queues

__all__ = ["SqsStore"]

log = logging.getLogger("offload")

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")


@dataclass(frozen=True, slots=True)
class _Held:
    """The latest receipt of a message this process leased (SQS deletes only with it)."""

    receipt: str
    message_id: str


class SqsStore(LetterViews):
    """A durable store on an Amazon SQS standard queue and its dead-letter queue.

    Open it with `open_store("sqs://NAME?region=...")` or `Offloader(store="sqs://...")`;
    the docstrings of this module and its siblings say how each operation maps onto SQS
    and why.
    """

    durable = True
    dedups = False  # standard queues keep no deduplication: the sending process does
    #: Which functions a stored task may name (the Offloader sets its own).
    trust: Trust = TRUST_ANY
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
            lease_timeout = lease_timeout_from_env(maximum=MAX_VISIBILITY)
        else:
            check_lease_timeout("lease_timeout", lease_timeout, maximum=MAX_VISIBILITY)
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
        self._queues = Queues(
            name, url=self.url, region=region, endpoint_url=endpoint_url, wait=self.wait
        )
        try:
            self._queue_url, self.dlq, dlq_url, self._max_body = self._queues.open_queues(
                dlq, create=create, max_receives=max_receives
            )
        except BaseException:
            self._queues.close()
            raise
        self._letters = DeadLetterQueue(self._queues, self.dlq, dlq_url)

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
                    "sqs", key, value, minimum=0.001, maximum=MAX_VISIBILITY
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

    def close(self) -> None:
        """Close the SQS client's connections. Leases still held run out by themselves."""
        self._queues.close()

    def after_fork(self) -> None:
        # A boto3 client's connection pool must not be shared with the parent; the
        # parent's leases stay the parent's.
        self._held = {}
        self._lock = threading.Lock()
        self._queues.after_fork()

    def __repr__(self) -> str:
        return f"SqsStore({self.url!r}, dlq={self.dlq!r}, lease_timeout={self.lease_timeout:g})"

    # -- tasks -----------------------------------------------------------------------------

    def _body(self, task: Task, due: float | None = None) -> str:
        return task_body(task, due, max_body=self._max_body, queue=self.name)

    def _take_held(self, task: Task) -> _Held | None:
        with self._lock:
            return self._held.pop(task.id, None)

    def put(self, task: Task, *, lease: bool, due: float | None = None) -> Task:
        """Send a new task (NotSerializable if it cannot be stored or is too large), due at
        `due` if given (DelaySeconds up to 900; beyond, the due time goes in the message).
        `lease=True` is refused: SQS cannot lease a message as it is sent."""
        if lease:
            raise ValueError(
                "the SQS store cannot lease a task as it sends it (leases_on_put is False); "
                "put it with lease=False and claim it like any worker"
            )
        if due is None:
            self._queues.send(self._queue_url, self._body(task))
            return task
        delay = max(0, math.ceil(due - time.time()))  # rounded up: never earlier
        body = self._body(task, due if delay > MAX_DELAY else None)
        self._queues.send(self._queue_url, body, min(delay, MAX_DELAY))
        return task

    def claim(self, limit: int, *, exclude_keys: Mapping[str, float] = NO_KEYS) -> list[Task]:
        """Lease up to `limit` tasks now visible, skipping the keys given (see the module doc).

        Waits up to `wait` seconds (long polling) when the queue is empty. A message that
        is not an offload task, or whose function cannot be imported here, is buried at
        once with reason "permanent", its body kept.
        """
        tasks: list[tuple[int, Task]] = []
        wait = self.wait
        while len(tasks) < limit:
            count = min(BATCH, limit - len(tasks))
            messages = self._queues.receive(self._queue_url, count, wait, self._visibility)
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
                    record = load_message(message["Body"])
                    stored, due = task_message(record)
                    task = stored.load(self.trust)
                except ValueError as exc:
                    task = unreadable_task(message, str(exc))
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
            if delay > MAX_DELAY:
                resent["due"] = due
            entries.append((dumps(resent), min(max(delay, 0), MAX_DELAY)))
        sent = self._queues.send_many(self._queue_url, entries)
        done = [item[0]["ReceiptHandle"] for item, ok in zip(items, sent, strict=True) if ok]
        if done:
            self._queues.delete_many(self._queue_url, done)

    def renew(self, tasks: Sequence[Task]) -> None:
        """Extend the visibility timeout of the given tasks' messages to a full lease."""
        with self._lock:
            receipts = [self._held[t.id].receipt for t in tasks if t.id in self._held]
        if not receipts:
            return
        failed = self._queues.set_visibility(self._queue_url, receipts, self._visibility)
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
        body = self._body(task, due if delay > MAX_DELAY else None)
        self._queues.send(self._queue_url, body, min(delay, MAX_DELAY))
        held = self._take_held(task)
        if held is not None:
            self._queues.delete(self._queue_url, held.receipt)

    def complete(self, task: Task) -> None:
        """Delete a delivered task's message."""
        held = self._take_held(task)
        if held is None:
            log.warning("offload: %r is not leased from %s; nothing to delete", task, self.name)
            return
        self._queues.delete(self._queue_url, held.receipt)

    def next_due(self) -> float | None:
        """Now if messages are visible; in `wait` seconds (at least 1) while some are delayed
        or leased (SQS does not say when they come back); None if the queue is empty."""
        attrs = self._queues.attributes(
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

    def watch(self, wake: Callable[[], None]) -> Callable[[], None] | None:
        """None: SQS says nothing of new messages; idle workers long-poll `claim` (see
        DurableStore.watch)."""
        return None

    def counts(self) -> StoreCounts:
        """SQS's approximate numbers: visible, delayed, in flight (leased), dead letters."""
        attrs = self._queues.attributes(
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
            dead_letters=self._letters.count(),
        )

    # -- dead letters (letters.py) ---------------------------------------------------------

    def bury(self, task: Task, letter: DeadLetter) -> None:
        """Send offload's dead-letter record (with the task, to replay it) to the DLQ, then
        delete the task's message."""
        self._letters.send(letter_body(task, letter))
        held = self._take_held(task)
        if held is not None:
            self._queues.delete(self._queue_url, held.receipt)

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter in the DLQ, oldest first, left as it was (see letters.py)."""
        return self._letters.letters()

    def __len__(self) -> int:
        """Messages in the DLQ, visible or being read (approximate, as SQS counts)."""
        return self._letters.count()

    def revive(self, dead_letter_id: str) -> Task:
        """Remove a dead letter and return its task (ids and idempotency key kept).

        UnknownDeadLetter for an unknown id; StoreError (the dead letter kept) when it
        holds no task this process can import. Prefer `replay`, which sends the task back
        before it deletes the dead letter.
        """
        with self._letters.find(dead_letter_id) as (scan, entry):
            task = task_of(entry, self.trust)
            self._letters.delete(scan, entry)
        return task

    def replay(self, dead_letter_id: str) -> Task:
        """Send a dead letter's task to the queue with a fresh attempt budget, then delete
        the dead letter; returns the task. A crash in between leaves both, never neither."""
        with self._letters.find(dead_letter_id) as (scan, entry):
            task = task_of(entry, self.trust)
            task._restart()
            self._queues.send(self._queue_url, self._body(task))
            self._letters.delete(scan, entry)
        return task

    def discard(self, dead_letter_id: str) -> None:
        """Delete a dead letter; UnknownDeadLetter for an unknown id."""
        with self._letters.find(dead_letter_id) as (scan, entry):
            self._letters.delete(scan, entry)

    def purge(self) -> int:
        """Delete every dead letter; returns how many."""
        return self._letters.purge()
