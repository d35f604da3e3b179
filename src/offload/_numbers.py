"""Whole numbers read from text that a request or a URL gives: a page's cursor, a page
size, a count in a notice, an HTTP status."""

from __future__ import annotations

__all__ = ["MAX_DIGITS", "plain_int"]

MAX_DIGITS = 18
"""Digits a number may have: below 2**63, so SQLite and PostgreSQL integers hold it."""


def plain_int(text: str, max_digits: int = MAX_DIGITS) -> int | None:
    """The number `text` writes in ASCII digits (1 to `max_digits` of them); None for any
    other text.

    `str.isdigit()` alone is no check: it admits digits `int()` refuses ('²'), and any
    length (`int()` refuses more than 4300 digits, SQLite an integer beyond 64 bits)."""
    if 0 < len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None
