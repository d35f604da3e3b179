"""The dead-letter filters a page or the API takes (`key`, `status`, `reason`, `since`,
`text`) as a store's LetterQuery, each bad value named in one line."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .._numbers import plain_int
from ..outcome import REASONS
from ..stores.base import LetterQuery

__all__ = ["FILTERS", "Filters", "parse_since"]

FILTERS = ("key", "status", "reason", "since", "text")
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_TEXT = 200


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when it names no zone) or an age (`90s`, `30m`, `12h`,
    `7d`); ValueError otherwise (an age longer ago than any date among them). The console's
    filter and the `offload` command's `--since` both read it."""
    age = _AGE.match(text)
    if age:
        try:
            seconds = float(age.group(1)) * _UNITS[age.group(2)]
            return (now or datetime.now(timezone.utc)) - timedelta(seconds=seconds)
        except OverflowError:  # more days than a timedelta holds, or before year 1
            raise ValueError(f"since: {text!r} is an age too large: no date is that old") from None
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"  # Python 3.10 reads no "Z"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"since: {text!r} is neither an ISO 8601 time nor an age such as 30m, 12h or 7d"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Filters:
    """The filters as given (to show them back in the form and in links) and as a query."""

    given: dict[str, str]
    query: LetterQuery
    error: str | None = None

    @classmethod
    def read(cls, get: Callable[[str], str]) -> Filters:
        """The filters `get(name)` gives (a query parameter or a form field)."""
        given = {name: get(name) for name in FILTERS}
        try:
            return cls(given, _query(given))
        except ValueError as exc:
            return cls(given, LetterQuery(), str(exc))

    @property
    def active(self) -> bool:
        return any(self.given.values())

    def describe(self) -> str:
        """The filters in words, for a confirmation page: `key = ..., status = 503`."""
        shown = [f"{name} = {value}" for name, value in self.given.items() if value]
        return ", ".join(shown) if shown else "no filter"


def _query(given: dict[str, str]) -> LetterQuery:
    for name, value in given.items():
        if "\x00" in value:  # PostgreSQL's text refuses NUL: refused here for every store
            raise ValueError(f"{name}: a NUL character is not allowed")
    status = None
    if given["status"]:
        status = plain_int(given["status"])
        if status is None or not 100 <= status <= 599:
            raise ValueError(f"status: {given['status']!r} is not an HTTP status such as 503")
    reason = given["reason"] or None
    if reason is not None and reason not in REASONS:  # narrows reason to a Reason
        raise ValueError(f"reason: {reason!r} is not one of {', '.join(sorted(REASONS))}")
    text = given["text"] or None
    if text is not None and len(text) > _MAX_TEXT:
        raise ValueError(f"text: at most {_MAX_TEXT} characters")
    return LetterQuery(
        key=given["key"] or None,
        status=status,
        reason=reason,
        since=parse_since(given["since"]) if given["since"] else None,
        text=text,
    )
