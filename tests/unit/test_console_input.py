"""What the console and the `offload` command read from a request or a command line:
numbers, times and filters, each refused with a ValueError (a 400, a usage error), never
another exception (a 500, a traceback)."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

import pytest

from offload import cli
from offload._numbers import plain_int
from offload.cli import parser
from offload.console.filters import Filters, parse_since


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


@pytest.mark.parametrize("age", ["1000000d", "99999999999d", "1" + "0" * 400 + "s"])
def test_an_age_further_back_than_any_date_is_a_value_error(age: str) -> None:
    with pytest.raises(ValueError, match="an age too large"):
        parse_since(age)
    error = Filters.read(lambda name: age if name == "since" else "").error
    assert error is not None and error.startswith(f"since: {age!r} is an age too large")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'.*' is an age too large"):
        parser.since(age)


def test_the_command_and_the_console_read_since_alike() -> None:
    now = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
    assert parse_since("90m", now) == datetime(2026, 5, 1, 10, 30, tzinfo=timezone.utc)
    assert parser.since("2026-05-01T12:00Z") == now == parse_since("2026-05-01T12:00")


def test_an_argument_check_that_raises_is_a_usage_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def overflows(text: str) -> datetime:
        raise OverflowError("date value out of range")

    monkeypatch.setattr(parser, "since", overflows)  # what argparse does not catch itself
    assert cli.main(["dead-letters", "list", "--since", "1d"]) == 2
    out, err = capsys.readouterr()
    assert (
        out == "" and err == "offload: usage error: date value out of range (see offload --help)\n"
    )


@pytest.mark.parametrize("name", ["key", "status", "reason", "since", "text"])
def test_a_nul_in_any_filter_is_refused_before_a_store_sees_it(name: str) -> None:
    given = {name: "a\x00b"}
    assert Filters.read(lambda field: given.get(field, "")).error == (
        f"{name}: a NUL character is not allowed"
    )


@pytest.mark.parametrize("theirs_first", [True, False])
def test_a_post_carrying_two_csrf_cookies_is_refused_in_either_order(theirs_first: bool) -> None:
    """A site of a parent domain can set a cookie of the console's CSRF cookie's name: the
    request then carries two, and which one is read depends on the client's order (Python
    3.10's cookie jar and 3.11's send them in opposite orders). Refused either way, even
    when the token matches one of them; one cookie with its token is allowed."""
    from offload.console.access import CSRF_COOKIE, Access
    from offload.console.http import Request

    access = Access("a-console-token-of-some-length", None)
    ours, theirs = access.new_nonce(), access.new_nonce()  # theirs: got from /login
    cookies = [f"{CSRF_COOKIE}={ours}", f"{CSRF_COOKIE}={theirs}"]
    if theirs_first:
        cookies.reverse()

    def post(cookie: str, token: str) -> tuple[bool, str]:
        environ = {"REQUEST_METHOD": "POST", "HTTP_COOKIE": cookie, "HTTP_X_CSRF_TOKEN": token}
        return access.post_allowed(Request(environ))

    for token in (access.csrf_token(ours), access.csrf_token(theirs)):
        allowed, why = post("; ".join(cookies), token)
        assert not allowed and "two CSRF cookies" in why
    assert post(f"{CSRF_COOKIE}={ours}; other=1", access.csrf_token(ours)) == (True, "")
