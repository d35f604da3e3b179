"""The PostgreSQL store's dead letters, on a connection the store hands over (its lock held).

Each change is one transaction: `bury` deletes the task and keeps its stored call with
the letter (and lets its dedup key go); `replay` deletes the letter and puts its task back
(without loading it: a process that cannot import the task's function, the `offload`
command say, replays it for the workers that can), takes its dedup key again, and
NOTIFYs. A page of the console's listing is filtered and cut in SQL, newest first, with
the last row's `seq` as the cursor, so a page costs the same at the start of 100,000
letters as at their end.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ...clock import Clock
from ...codec.task import TaskRecord, Unreadable
from ...codec.trust import TRUST_ANY, Trust
from ...codec.view import view_call
from ...errors import StoreError, UnknownDeadLetter
from ...records import DeadLetter, Task
from .._shared import check_page, check_tally, epoch, letter_of, letter_terms
from ..base import LetterDetail, LetterPage, LetterQuery, LetterTally
from .dedup import let_key_go
from .schema import Sql

__all__ = [
    "LetterMethods",
    "bury_task",
    "letter_detail",
    "letter_page",
    "letter_tally",
    "read_letter",
    "read_letters",
    "replay_letter",
    "revive_letter",
]


class LetterMethods:
    """The PostgreSQL store's dead-letter methods (PostgresStore's), each on the store's
    cursor under its lock."""

    trust: Trust
    _sql: Sql
    _clock: Clock
    _conn: Any

    def _use(self, what: str) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        with self._use("listing dead letters") as cur:
            return read_letters(cur, self._sql)

    def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """One dead letter by id; UnknownDeadLetter if none has it."""
        with self._use("reading a dead letter") as cur:
            return read_letter(cur, self._sql, dead_letter_id)

    def dead_letter_page(
        self, query: LetterQuery, *, limit: int = 50, cursor: str | None = None
    ) -> LetterPage:
        """A page of the dead letters matching `query`, newest first, filtered and cut in
        SQL (see letters.py)."""
        with self._use("listing dead letters") as cur:
            return letter_page(cur, self._sql, query, limit, cursor)

    def dead_letter_detail(self, dead_letter_id: str) -> LetterDetail:
        """One dead letter and its task's call, read without importing anything."""
        with self._use("reading a dead letter") as cur:
            return letter_detail(cur, self._sql, dead_letter_id)

    def dead_letter_tally(self, *, limit: int = 20) -> LetterTally:
        """The dead letters counted in all and by key, reason and status."""
        with self._use("counting dead letters") as cur:
            return letter_tally(cur, self._sql, limit)

    def __len__(self) -> int:
        with self._use("counting dead letters") as cur:
            return int(cur.execute(self._sql.count_letters).fetchone()[0])

    def revive(self, dead_letter_id: str) -> Task:
        """Remove a dead letter and return its task (fresh attempt budget, same ids).

        StoreError, and the dead letter kept, when its task cannot be loaded in this
        process. Prefer `replay`, which moves the task back into the queue at once."""
        with self._use("reviving a dead letter"):
            return revive_letter(self._conn, self._sql, dead_letter_id, self.trust)

    def replay(self, dead_letter_id: str) -> Task:
        """Move a dead letter's task back to the queue, due now, with a fresh attempt budget
        (same id and idempotency key), in one statement; return the task."""
        with self._use("replaying a dead letter") as cur:
            return replay_letter(cur, self._sql, dead_letter_id, self._clock.time(), self.trust)

    def discard(self, dead_letter_id: str) -> None:
        """Delete one dead letter; UnknownDeadLetter if none has that id."""
        with self._use("discarding a dead letter") as cur:
            if not cur.execute(self._sql.discard, (dead_letter_id,)).rowcount:
                raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")

    def purge(self) -> int:
        """Delete every dead letter; returns how many there were."""
        with self._use("purging dead letters") as cur:
            return int(cur.execute(self._sql.purge).rowcount)


def bury_task(cur: Any, sql: Sql, task: Task, letter: DeadLetter, now: float) -> None:
    """Keep `letter` with the task's stored call, and delete the task (one statement; a
    task with a dedup key also lets its key go, in the same transaction)."""
    if task.dedup_key is None:
        _bury(cur, sql, task, letter, now)
        return
    with cur.connection.transaction():
        _bury(cur, sql, task, letter, now)
        let_key_go(cur, sql, task, now)


def _bury(cur: Any, sql: Sql, task: Task, letter: DeadLetter, now: float) -> None:
    record = TaskRecord.of(task)  # the call as this process has it, if the row is gone
    cur.execute(
        sql.bury,
        (
            task.id,
            record.call,
            record.retry,
            record.dedup_key,
            record.dedup_window,
            letter.id,
            letter.task_id,
            task.idempotency_key,
            letter.description,
            letter.key,
            letter.attempts,
            letter.error,
            letter.status,
            letter.reason,
            epoch(letter.first_attempt_at),
            epoch(letter.last_attempt_at),
            now,
        ),
    )


def read_letters(cur: Any, sql: Sql) -> list[DeadLetter]:
    """Every dead letter, oldest first."""
    return [letter_of(row) for row in cur.execute(sql.letters).fetchall()]


def read_letter(cur: Any, sql: Sql, dead_letter_id: str) -> DeadLetter:
    """One dead letter by id; UnknownDeadLetter if none has it."""
    row = cur.execute(sql.letter, (dead_letter_id,)).fetchone()
    if row is None:
        raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
    return letter_of(row)


def letter_page(
    cur: Any, sql: Sql, query: LetterQuery, limit: int, cursor: str | None
) -> LetterPage:
    """The dead letters matching `query`, newest first, `limit` at most, after `cursor`
    (the `seq` of the previous page's last letter)."""
    after = check_page(limit, cursor)
    terms = letter_terms(query)
    where = ["TRUE", *(f"{term} %s" for term, _ in terms)]
    params: list[Any] = [value for _, value in terms]
    if query.text:
        # A substring, case-insensitive, with no LIKE pattern characters to escape.
        where.append("(strpos(lower(description), %s) > 0 OR strpos(lower(error), %s) > 0)")
        params += [query.text.lower()] * 2
    matching = " AND ".join(where)
    total = int(cur.execute(sql.page_total.format(where=matching), params).fetchone()[0])
    if after is not None:
        matching += " AND seq < %s"
        params.append(after)
    rows = cur.execute(sql.page.format(where=matching), [*params, limit + 1]).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    letters = [letter_of(row[1:]) for row in rows]
    return LetterPage(letters, total, str(rows[-1][0]) if more and rows else None)


def letter_detail(cur: Any, sql: Sql, dead_letter_id: str) -> LetterDetail:
    """One dead letter and its call, read from the text the task was stored as (nothing is
    imported); UnknownDeadLetter if none has that id."""
    row = cur.execute(sql.letter_detail, (dead_letter_id,)).fetchone()
    if row is None:
        raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
    return LetterDetail(letter_of(row[:-2]), view_call(str(row[-1]), row[-2]))


def letter_tally(cur: Any, sql: Sql, limit: int) -> LetterTally:
    """The dead letters counted in all and by key, reason and status (each from its index)."""
    check_tally(limit)

    def top(column: str) -> list[Any]:
        rows = cur.execute(sql.tally.format(column=column), (limit,)).fetchall()
        return [(value, int(n)) for value, n in rows]

    total = int(cur.execute(sql.count_letters).fetchone()[0])
    return LetterTally(total, top("key"), top("reason"), top("status"))


def revive_letter(conn: Any, sql: Sql, dead_letter_id: str, trust: Trust = TRUST_ANY) -> Task:
    """Remove a dead letter and return its task, in one transaction; StoreError, and the
    dead letter kept, when its task cannot be loaded in this process."""
    with conn.transaction():
        row = conn.execute(sql.revive, (dead_letter_id,)).fetchone()
        if row is None:
            raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
        task = _record(row).load(trust)
        if isinstance(task.call, Unreadable):  # raised inside: the DELETE is rolled back
            raise StoreError(
                f"dead letter {dead_letter_id} cannot be revived here: {task.call.error}"
            )
    return task


def replay_letter(
    cur: Any, sql: Sql, dead_letter_id: str, now: float, trust: Trust = TRUST_ANY
) -> Task:
    """Move a dead letter's task back to the queue, due `now`, with a fresh attempt budget
    (same id and idempotency key), in one statement; return the task (only a handle: this
    process may not even be able to import it)."""
    row = cur.execute(sql.replay, (dead_letter_id, now, sql.channel)).fetchone()
    if row is None:
        raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
    return _record(row[:-1]).load(trust)


def _record(row: tuple[Any, ...]) -> TaskRecord:
    """The task a dead letter keeps: (task id, idempotency key, key, call, retry, dedup
    key, dedup window), as Sql.revive returns them."""
    task_id, idempotency_key, key, call, retry, dedup_key, window = row
    return TaskRecord(
        task_id, idempotency_key, key, call, retry, dedup_key=dedup_key, dedup_window=window
    )
