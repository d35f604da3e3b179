"""The SQLite store's dead letters as the console lists them: a page at a time, newest
first, filtered in SQL, on a connection the store hands over (its lock held).

Pages are keyset pages: a page's cursor is the `seq` of its last row, and the next page
is the rows below it, so a page costs the same at the end of the list as at its start,
and a letter that arrives meanwhile never shifts one onto two pages.

How a page is found depends on the filter (the indexes are in schema.py):
- none, or key, status and reason: each is a range of one index in `seq` order, so the
  page is its first rows below the cursor and the total a count of that range;
- a text (a substring of the description or the error, ASCII letters in either case) or
  a time (`since`): the matching rows are not a range in `seq` order. A common match is
  found among the newest rows below the cursor (a bounded window, read in `seq` order), and
  the total is a count over the text index (a fraction of the table's size: the table's
  rows also hold each task's call) or the time index. A rare one (fewer than a page in the
  window) may be the last row of the table: one pass over the index collects every
  matching `seq`, few by then: its length is the total, its largest below the cursor the
  page. Never a sort of whole rows, never more than one pass over the text.
"""

from __future__ import annotations

import heapq
import sqlite3
from contextlib import AbstractContextManager
from typing import Any

from ...codec.view import view_call
from ...errors import UnknownDeadLetter
from ...records import DeadLetter
from .._shared import check_page, check_tally, json_list, letter_of, letter_terms
from ..base import LetterDetail, LetterPage, LetterQuery, LetterTally
from .schema import LETTER_COLUMNS

__all__ = ["LetterListing", "letter_detail", "letter_page", "letter_tally"]

# Rows read, newest first, before a text or time filter is taken to be rare.
_WINDOW = 5_000


class LetterListing:
    """The SQLite store's listings for the console (SQLiteStore's methods), each on the
    store's connection under its lock."""

    def _use(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def dead_letter_page(
        self, query: LetterQuery, *, limit: int = 50, cursor: str | None = None
    ) -> LetterPage:
        """A page of the dead letters matching `query`, newest first, filtered in SQL."""
        with self._use("listing dead letters") as conn:
            return letter_page(conn, query, limit, cursor)

    def dead_letter_detail(self, dead_letter_id: str) -> LetterDetail:
        """One dead letter and its task's call, read without importing anything."""
        with self._use("reading a dead letter") as conn:
            return letter_detail(conn, dead_letter_id)

    def dead_letter_tally(self, *, limit: int = 20) -> LetterTally:
        """The dead letters counted in all and by key, reason and status."""
        with self._use("counting dead letters") as conn:
            return letter_tally(conn, limit)


def _where(query: LetterQuery) -> tuple[str, list[Any]]:
    """The SQL condition `query` asks for, and its arguments."""
    found = letter_terms(query)
    terms = [f"{term} ?" for term, _ in found]
    args: list[Any] = [value for _, value in found]
    if query.text:
        pattern = "%" + query.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern += "%"
        terms.append("(description LIKE ? ESCAPE '\\' OR error LIKE ? ESCAPE '\\')")
        args += [pattern, pattern]
    return " AND ".join(terms) or "1", args


def letter_page(
    conn: sqlite3.Connection, query: LetterQuery, limit: int, cursor: str | None
) -> LetterPage:
    """A page of the dead letters matching `query`, newest first (see the module docstring)."""
    below = check_page(limit, cursor)
    where, args = _where(query)
    rows: list[Any] | None = None
    if query.text or query.since is not None:
        rows = _newest_window(conn, where, args, below, limit)
        if rows is None:
            return _page_of_matches(conn, where, args, below, limit)
    count = conn.execute(f"SELECT COUNT(*) FROM dead_letters WHERE {where}", args)
    total = int(count.fetchone()[0])
    if rows is None:
        page_where, page_args = where, list(args)
        if below is not None:
            page_where += " AND seq < ?"
            page_args.append(below)
        rows = conn.execute(
            f"SELECT seq, {LETTER_COLUMNS} FROM dead_letters WHERE {page_where} "
            "ORDER BY seq DESC LIMIT ?",
            (*page_args, limit + 1),
        ).fetchall()
    return _page(rows, total, limit)


def _newest_window(
    conn: sqlite3.Connection, where: str, args: list[Any], below: int | None, limit: int
) -> list[Any] | None:
    """The page's rows if the newest `_WINDOW` rows below the cursor hold a page of matches
    (a common text: read in rowid order, it stops early); None if they hold fewer."""
    if below is None:
        below = int(
            conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM dead_letters").fetchone()[0]
        )
    rows = conn.execute(
        f"SELECT seq, {LETTER_COLUMNS} FROM dead_letters NOT INDEXED "
        f"WHERE seq >= ? AND seq < ? AND {where} ORDER BY seq DESC LIMIT ?",
        (below - _WINDOW, below, *args, limit + 1),
    ).fetchall()
    return rows if len(rows) > limit else None


def _page_of_matches(
    conn: sqlite3.Connection,
    where: str,
    args: list[Any],
    below: int | None,
    limit: int,
) -> LetterPage:
    """A page of rare matches: one pass over an index collects every matching `seq` (few,
    since the newest window held less than a page): the total, and the page's rows."""
    seqs = [seq for (seq,) in conn.execute(f"SELECT seq FROM dead_letters WHERE {where}", args)]
    candidates = seqs if below is None else [seq for seq in seqs if seq < below]
    rows = conn.execute(
        f"SELECT seq, {LETTER_COLUMNS} FROM dead_letters "
        "WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY seq DESC",
        (json_list(heapq.nlargest(limit + 1, candidates)),),
    ).fetchall()
    return _page(rows, len(seqs), limit)


def _page(rows: list[Any], total: int, limit: int) -> LetterPage:
    """Rows of (seq, LETTER_COLUMNS...), up to `limit` + 1 of them, as a page."""
    more = len(rows) > limit
    rows = rows[:limit]
    letters = [letter_of(row[1:]) for row in rows]
    return LetterPage(letters, total, str(rows[-1][0]) if more else None)


def letter_detail(conn: sqlite3.Connection, dead_letter_id: str) -> LetterDetail:
    """One dead letter and its call, read from the text the task was stored as (nothing is
    imported); UnknownDeadLetter if none has that id."""
    row = conn.execute(
        f"SELECT {LETTER_COLUMNS}, idempotency_key, call FROM dead_letters WHERE id = ?",
        (dead_letter_id,),
    ).fetchone()
    if row is None:
        raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
    letter: DeadLetter = letter_of(row[:-2])
    return LetterDetail(letter, view_call(str(row[-1]), row[-2]))


def letter_tally(conn: sqlite3.Connection, limit: int) -> LetterTally:
    """The dead letters counted in all and by key, reason and status (each from its index)."""
    check_tally(limit)

    def top(column: str) -> list[Any]:
        return [
            (value, int(n))
            for value, n in conn.execute(
                f"SELECT {column}, COUNT(*) AS n FROM dead_letters GROUP BY {column} "
                f"ORDER BY n DESC, {column} LIMIT ?",
                (limit,),
            )
        ]

    total = int(conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])
    return LetterTally(total, top("key"), top("reason"), top("status"))
