"""What the durable stores share: lease owners, process liveness, store URL options.

A lease owner is `host:pid:token`: the machine and process holding a lease, and a random
token per store object, so that two store objects of one process are two owners. A store
that meets an owner of its own host whose process is gone takes its leases back at once;
any other owner's leases only when they expire. `new_owner` writes that string and
`owner_dead` reads it. The host is the host name and, where /proc tells, the PID
namespace (`this_host`): containers that share a host name (host networking, one compose
`hostname:` for every replica) each number their processes alone, and one must not read
another's live process as its own gone one.

URL options (`?lease_timeout=60&create=false`) are strings: `number_option` and
`bool_option` turn them into values, each error naming the option and what it takes.

A store that dedups (SQLite, PostgreSQL) answers an enqueue whose key is held with
`holder_handle`: the holder's ids, this enqueue's call.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from .._numbers import plain_int
from ..config import describe_range
from ..records import DeadLetter, Task
from .base import LetterPage, LetterQuery, LetterTally

if TYPE_CHECKING:
    from _typeshed import SupportsDunderLT

__all__ = [
    "LETTER_FIELDS",
    "bool_option",
    "check_cursor",
    "check_page",
    "check_tally",
    "epoch",
    "holder_handle",
    "json_list",
    "letter_of",
    "letter_terms",
    "new_owner",
    "number_option",
    "owner_dead",
    "page_of",
    "pid_alive",
    "tally_of",
    "tally_tasks",
    "this_host",
]


Mark = TypeVar("Mark", bound="SupportsDunderLT[Any]")  # a dead letter's place in a listing


def this_host() -> str:
    """This machine as lease owners name it: the host name, and the PID namespace whose
    process ids `pid_alive` can check (see the module docstring)."""
    try:
        namespace = f"/pid{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (macOS): the host name alone
        namespace = ""
    return socket.gethostname() + namespace


def new_owner() -> str:
    """A lease owner for a store object of this process: 'host:pid:token'."""
    return f"{this_host()}:{os.getpid()}:{secrets.token_hex(6)}"


def owner_dead(owner: str, host: str) -> bool:
    """True when `owner` ('host:pid:token') is a process of this host that is gone."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host:
        return False  # another machine's process: only its lease expiry tells
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # another store object of this very process
    return not pid_alive(pid)


def tally_tasks(
    groups: Iterable[tuple[str | None, Any, Any, Any]], owner: str
) -> tuple[int, int, int, int]:
    """(ready, delayed, leased, lapsed) from a count of tasks grouped by (owner, lease
    still running, how many due now, how many), as the stores' counts read it. A task
    whose lease expired, or whose owner is a process of this host that is gone, is
    ready or delayed by its due time (`lapsed` counts those): the next sweep takes it
    back, and a flush() must not take it for one that some process is performing."""
    host = this_host()
    ready = delayed = leased = lapsed = 0
    for other, running, due, total in groups:
        tasks, due_now = int(total), int(due or 0)
        if other is not None and running and (other == owner or not owner_dead(other, host)):
            leased += tasks
            continue
        if other is not None:
            lapsed += tasks
        ready += due_now
        delayed += tasks - due_now
    return ready, delayed, leased, lapsed


def pid_alive(pid: int) -> bool:
    """True unless process `pid` of this host surely no longer exists (or is a zombie)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != b"Z"  # killed, not yet reaped by its parent


def number_option(
    scheme: str,
    name: str,
    value: str,
    *,
    minimum: float,
    maximum: float | None = None,
    above: bool = False,
    integer: bool = False,
) -> float:
    """The number a `scheme://` URL option gives, finite and in range (`above`: strictly
    greater than `minimum`); ValueError naming the option and its range otherwise."""
    kind = "an integer" if integer else "a number"
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        problem = f"not {kind}"
    else:
        top = math.inf if maximum is None else maximum
        if minimum <= number <= top and math.isfinite(number) and not (above and number <= minimum):
            return number
        problem = "out of range"
    raise ValueError(
        f"store: {scheme} URL option {name}= must be {kind} "
        f"{describe_range(minimum, maximum, above=above)}, got {value!r} ({problem})"
    )


def bool_option(scheme: str, name: str, value: str) -> bool:
    """The boolean a `scheme://` URL option gives (true/false, yes/no, on/off, 1/0)."""
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"store: {scheme} URL option {name}= must be true or false, got {value!r}")


def json_list(values: Iterable[Any]) -> str:
    """`values` as a JSON array, for SQL's `IN (SELECT value FROM json_each(?))`."""
    return json.dumps(list(values))


def epoch(value: datetime | None) -> float | None:
    """A time as epoch seconds, as stores keep it."""
    return None if value is None else value.timestamp()


def page_of(
    letters: Sequence[tuple[Mark, DeadLetter]],
    query: LetterQuery,
    limit: int,
    after: Mark | None,
    cursor_of: Callable[[Mark], str],
) -> LetterPage:
    """A page of `letters`, filtered and newest first: for stores that list by reading
    every dead letter. Each letter comes with its mark, rising from the oldest, that lasts
    as long as the letter (removing or burying others changes no letter's mark).

    `after` is the mark of the previous page's last letter (what `check_cursor` read from
    its cursor; None for the first page), and this page the letters marked below it, so
    that letters buried (marked higher) or removed meanwhile move nothing from one page
    onto the next. `cursor_of` writes a mark as the next page's cursor. The memory store
    numbers each letter when it buries it; the SQS store marks each by (SentTimestamp,
    id), SQS giving no number that lasts."""
    text = query.text.lower() if query.text else None
    chosen: list[tuple[Mark, DeadLetter]] = []
    total = 0
    for mark, letter in reversed(letters):
        if not (
            (query.key is None or letter.key == query.key)
            and (query.status is None or letter.status == query.status)
            and (query.reason is None or letter.reason == query.reason)
            and (
                query.since is None
                or (letter.last_attempt_at is not None and letter.last_attempt_at >= query.since)
            )
            and (text is None or text in letter.description.lower() or text in letter.error.lower())
        ):
            continue
        total += 1
        if (after is None or mark < after) and len(chosen) <= limit:
            chosen.append((mark, letter))
    cursor = cursor_of(chosen[limit - 1][0]) if len(chosen) > limit else None
    return LetterPage([letter for _, letter in chosen[:limit]], total, cursor)


def tally_of(letters: Sequence[DeadLetter], limit: int) -> LetterTally:
    """The tally of `letters`: for stores that count by reading every dead letter."""
    check_tally(limit)
    return LetterTally(
        len(letters),
        _top(Counter(letter.key for letter in letters), limit),
        _top(Counter(str(letter.reason) for letter in letters), limit),
        _top(Counter(letter.status for letter in letters), limit),
    )


def _top(counts: Counter[Any], limit: int) -> list[tuple[Any, int]]:
    """The most frequent first; ties by value, None first (as SQL's ORDER BY n DESC, v)."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0] is not None, item[0]))
    return ordered[:limit]


def check_tally(limit: int) -> None:
    """ValueError for a tally size a store cannot take."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise ValueError(f"limit must be an integer from 1 to 1000, got {limit!r}")


def check_page(limit: int, cursor: str | None) -> int | None:
    """The cursor as the number it is (None for the first page); ValueError for a page
    size or cursor a listing cannot take."""
    return check_cursor(limit, cursor, plain_int)


def check_cursor(limit: int, cursor: str | None, read: Callable[[str], Mark | None]) -> Mark | None:
    """The mark `read` finds in the cursor (None for the first page); ValueError for a
    page size a listing cannot take, or a cursor `read` finds none in (None)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise ValueError(f"limit must be an integer from 1 to 1000, got {limit!r}")
    if cursor is None:
        return None
    after = read(cursor) if isinstance(cursor, str) else None
    if after is None:
        raise ValueError(f"not a cursor a page gave: {cursor!r}")
    return after


# A dead letter's columns in a SQL store, in the order `letter_of` reads them.
LETTER_FIELDS = (
    "id",
    "task_id",
    "description",
    "key",
    "attempts",
    "error",
    "status",
    "reason",
    "first_attempt_at",
    "last_attempt_at",
)


def letter_of(row: Sequence[Any]) -> DeadLetter:
    """The dead letter a row of LETTER_FIELDS holds. A row that does not read as one (edited
    by hand, or by a newer offload) stands in as a letter saying so, under the row's id:
    listed, shown and discarded like the others, instead of failing every listing."""
    try:
        return DeadLetter.from_json(dict(zip(LETTER_FIELDS, row, strict=True)))
    except ValueError as exc:
        row_id = row[0] if isinstance(row[0], str) else str(row[0])
        return DeadLetter(
            id=row_id,
            task_id=row[1] if isinstance(row[1], str) else row_id,
            description="(unreadable row)",
            key=None,
            attempts=0,
            error=f"this dead letter's row does not read as one ({exc}); discard it or repair it",
            status=None,
            reason="permanent",
            first_attempt_at=None,
            last_attempt_at=None,
        )


def letter_terms(query: LetterQuery) -> list[tuple[str, Any]]:
    """The conditions of `query` but its text, as (column and operator, value) for a SQL
    store to write with its own placeholder: [("key =", "api.example.com:443"), ...]."""
    terms: list[tuple[str, Any]] = []
    if query.key is not None:
        terms.append(("key =", query.key))
    if query.status is not None:
        terms.append(("status =", query.status))
    if query.reason is not None:
        terms.append(("reason =", query.reason))
    if query.since is not None:
        terms.append(("last_attempt_at >=", epoch(query.since)))
    return terms


def holder_handle(task: Task, held_by: tuple[str, str]) -> Task:
    """A handle on the task holding `task`'s dedup key, `held_by` (its id, idempotency
    key): its ids, this enqueue's call."""
    task_id, idempotency_key = held_by
    return Task._restore(
        task.call,
        task.args,
        dict(task.kwargs),
        task_id=task_id,
        idempotency_key=idempotency_key,
        key=task.key,
        retry=task.retry,
        progress=None,
        dedup_key=task.dedup_key,
        dedup_window=task.dedup_window,
    )
