"""The SQS store's dead letters: its dead-letter queue, listed without consuming it.

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
suit the hundreds, not millions: so does the console's listing of them, a page at a time
(`dead_letter_page` reads the whole DLQ for each page: SQS cannot filter or seek).

A page's cursor names the last letter's place, (SentTimestamp in ms, letter id,
MessageId): the order `letters` gives, which lasts as long as the message does, so that
letters removed or buried between two pages move no other onto both or off both (a place
counted in the queue would). The MessageId makes a place unique where two messages share
a millisecond and a letter id (copies of one letter, see below). It reads
`<ms>.<id as UTF-8 hex>.<MessageId as UTF-8 hex>`: nothing else is one (`_read_place`).

Copies of one letter (that bury sent again, or a task SQS delivered twice and both
deliveries buried) are one dead letter, as in every other store: listed once, at the
oldest copy's place, and replay, revive and discard remove every copy (they read the
whole DLQ to find them). `count()` is SQS's count of messages, copies included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..._numbers import plain_int
from ...codec.trust import TRUST_ANY, Trust
from ...codec.view import CallView, view_call
from ...errors import StoreError, UnknownDeadLetter
from ...records import DeadLetter, Task
from .._shared import check_cursor, page_of, tally_of
from ..base import LetterDetail, LetterPage, LetterQuery, LetterTally
from .messages import Entry, read_entry
from .queues import BATCH, Queues

__all__ = ["DeadLetterQueue", "LetterViews", "Place", "Scan", "task_of"]

_LIST_VISIBILITY = 30  # seconds a DLQ scan hides what it read, if it dies before unhiding

Place = tuple[int, str, str]
"""A dead letter's place in the DLQ's order: (SentTimestamp in ms, letter id, MessageId)."""


def _place_cursor(place: Place) -> str:
    """The cursor of a page that ends at `place`."""
    sent, *texts = place
    return ".".join([str(sent), *(t.encode("utf-8", "surrogatepass").hex() for t in texts)])


def _read_place(cursor: str) -> Place | None:
    """The place a cursor of `_place_cursor` names; None for any other text."""
    parts = cursor.split(".")
    sent = plain_int(parts[0])
    if sent is None or len(parts) != 3:
        return None
    texts = []
    for part in parts[1:]:
        if not (part.isascii() and part.isalnum()):
            return None  # isalnum: bytes.fromhex would admit spaces
        try:
            texts.append(bytes.fromhex(part).decode("utf-8", "surrogatepass"))
        except ValueError:  # not hex, or not UTF-8
            return None
    return sent, texts[0], texts[1]


def _place_of(entry: Entry) -> Place:
    return entry.sent, entry.letter.id, entry.message["MessageId"]


def _oldest_copies(entries: list[Entry]) -> list[Entry]:
    """One entry per dead letter: the oldest of its copies (a bury sent again when its
    answer was lost leaves two messages with one letter)."""
    oldest: dict[str, Entry] = {}
    for entry in entries:
        kept = oldest.get(entry.letter.id)
        if kept is None or _place_of(entry) < _place_of(kept):
            oldest[entry.letter.id] = entry
    return list(oldest.values())


@dataclass(frozen=True, slots=True)
class Scan:
    """The DLQ messages one scan read (hidden until it ends), and those it deleted."""

    entries: list[Entry]
    deleted: set[str]  # message ids


class DeadLetterQueue:
    """The DLQ called `name`, at `url`, reached through `queues`."""

    def __init__(self, queues: Queues, name: str, url: str) -> None:
        self.queues = queues
        self.name = name
        self.url = url

    def send(self, body: str) -> None:
        """Keep a dead-letter record (messages.letter_body)."""
        self.queues.send(self.url, body)

    def count(self) -> int:
        """Messages in the DLQ, visible or being read (approximate, as SQS counts)."""
        attrs = self.queues.attributes(
            self.url, ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        )
        return int(attrs.get("ApproximateNumberOfMessages", 0)) + int(
            attrs.get("ApproximateNumberOfMessagesNotVisible", 0)
        )

    def letters(self) -> list[DeadLetter]:
        """Every dead letter in the DLQ, oldest first, left as it was (see `scan`)."""
        return [letter for _, letter in self.placed()]

    def placed(self) -> list[tuple[Place, DeadLetter]]:
        """Every dead letter in the DLQ with its place, oldest first (see `scan`): once,
        at its oldest copy's place, however many copies of it the DLQ holds."""
        with self.scan() as scan:
            oldest = _oldest_copies(scan.entries)
        return sorted(((_place_of(e), e.letter) for e in oldest), key=lambda pair: pair[0])

    @contextmanager
    def scan(self, stop: Callable[[Entry], bool] | None = None) -> Iterator[Scan]:
        """Read the DLQ's messages, hidden while the caller looks at them; on exit, make
        every one the caller did not delete visible again.

        Stops early once `stop(entry)` is true. Reads until an empty answer, long polling
        for a second while fewer than the count SQS gave have been read (a short poll of a
        real queue may miss messages).
        """
        expected = int(
            self.queues.attributes(self.url, ["ApproximateNumberOfMessages"]).get(
                "ApproximateNumberOfMessages", 0
            )
        )
        scan = Scan([], set())
        seen: set[str] = set()
        try:
            found = False
            while not found:
                wait = 1.0 if len(seen) < expected else 0.0
                messages = self.queues.receive(self.url, BATCH, wait, _LIST_VISIBILITY)
                fresh = [m for m in messages if m["MessageId"] not in seen]
                if not fresh:
                    break
                for message in fresh:
                    seen.add(message["MessageId"])
                    entry = read_entry(message)
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
                self.queues.set_visibility(self.url, left, 0)

    @contextmanager
    def find(self, dead_letter_id: str) -> Iterator[tuple[Scan, Entry]]:
        """The scan that found a dead letter, and its oldest copy; UnknownDeadLetter if
        none. It reads the whole DLQ, so that `delete` finds every copy."""
        with self.scan() as scan:
            copies = [e for e in scan.entries if e.letter.id == dead_letter_id]
            if not copies:
                raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r} in {self.name}")
            yield scan, min(copies, key=_place_of)

    def detail(self, dead_letter_id: str) -> LetterDetail:
        """One dead letter and its task's call, read from offload's record in the message
        (nothing imported); UnknownDeadLetter if none has that id."""
        with self.find(dead_letter_id) as (_, entry):
            record = entry.task
            call = (
                view_call(record.call, record.idempotency_key)
                if record is not None
                else CallView("unreadable", "(no task record: moved by the redrive policy?)")
            )
            return LetterDetail(entry.letter, call)

    def delete(self, scan: Scan, entry: Entry) -> None:
        """Delete a dead letter `scan` read, and every other copy of it the scan read (a
        copy SQS fails to delete is logged, and is listed again later)."""
        self.queues.delete(self.url, entry.message["ReceiptHandle"])
        scan.deleted.add(entry.message["MessageId"])
        others = [
            e.message
            for e in scan.entries
            if e.letter.id == entry.letter.id and e.message["MessageId"] not in scan.deleted
        ]
        if others:
            self.queues.delete_many(self.url, [m["ReceiptHandle"] for m in others])
            scan.deleted.update(m["MessageId"] for m in others)

    def purge(self) -> int:
        """Delete every dead letter; returns how many."""
        expected = self.count()
        removed = 0
        while True:
            wait = 1.0 if removed < expected else 0.0
            messages = self.queues.receive(self.url, BATCH, wait, _LIST_VISIBILITY)
            if not messages:
                return removed
            self.queues.delete_many(self.url, [m["ReceiptHandle"] for m in messages])
            removed += len(messages)


class LetterViews:
    """The SQS store's listings for the console, each a scan of the DLQ (see above)."""

    _letters: DeadLetterQueue

    def dead_letter_page(
        self, query: LetterQuery, *, limit: int = 50, cursor: str | None = None
    ) -> LetterPage:
        """A page of the dead letters matching `query`, newest first (see Store), from the
        place a cursor names (see above); ValueError for a cursor no page gave."""
        after = check_cursor(limit, cursor, _read_place)
        return page_of(self._letters.placed(), query, limit, after, _place_cursor)

    def dead_letter_detail(self, dead_letter_id: str) -> LetterDetail:
        """One dead letter and its task's call."""
        return self._letters.detail(dead_letter_id)

    def dead_letter_tally(self, *, limit: int = 20) -> LetterTally:
        """The dead letters counted in all, by key, reason and status."""
        return tally_of(self._letters.letters(), limit)


def task_of(entry: Entry, trust: Trust = TRUST_ANY) -> Task:
    """The task a dead letter holds, to revive or replay; StoreError when it holds none."""
    if entry.task is None:
        raise StoreError(
            f"dead letter {entry.letter.id} holds no task offload can replay "
            f"({entry.letter.error}); discard it"
        )
    task = entry.task.load(trust)  # an unreadable one dead-letters itself again
    task.progress.letter = entry.letter
    return task
