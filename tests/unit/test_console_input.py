"""What the console and the `offload` command read from a request or a command line:
numbers, times and filters, each refused with a ValueError (a 400, a usage error), never
another exception (a 500, a traceback)."""

from __future__ import annotations

import pytest

from offload._numbers import plain_int


@pytest.mark.parametrize(
    ("text", "number"),
    [("0", 0), ("42", 42), ("007", 7), ("9" * 18, 10**18 - 1)],
)
def test_plain_digits_are_a_number(text: str, number: int) -> None:
    assert plain_int(text) == number


@pytest.mark.parametrize(
    "text",
    ["", " 1", "1 ", "-1", "+1", "1.0", "1e3", "²", "1²", "\u0663", "\uff11", "9" * 19, "9" * 5000],
)
def test_anything_else_is_none(text: str) -> None:
    assert plain_int(text) is None
