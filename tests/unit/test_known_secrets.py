"""offload.calls.secrets: the secret values a failed call holds, to scrub from its error."""

from __future__ import annotations

import base64
import functools
from typing import Any

from offload.calls import aws, http
from offload.calls.secrets import known_secrets


def test_an_http_calls_secrets() -> None:
    call = http(
        "POST",
        "https://ann:URLPASS1@h.example/x?access_token=QTOKEN01&page=22222",
        headers={
            "Authorization": "Bearer BEARER01",
            "X-Authorization": "XAUTH001",
            "Accept": "application/json",
        },
        params={"user[api_key]": "PKEY0001", "q": "hello world"},
        auth=("bob", "AUTHPW01"),
        cookies={"sid": "COOKIE01"},
        json={"user": "carol", "nested": {"password": "BODYPW01", "secret_pin": 73311337}},
    )
    found = known_secrets(call, (), {})
    basic = base64.b64encode(b"bob:AUTHPW01").decode()
    for secret in ("URLPASS1", "QTOKEN01", "Bearer BEARER01", "BEARER01", "XAUTH001"):
        assert secret in found
    for secret in ("PKEY0001", "AUTHPW01", basic, "COOKIE01", "BODYPW01", "73311337"):
        assert secret in found
    for shown in ("application/json", "hello world", "carol", "ann", "bob", "22222"):
        assert shown not in found


def test_secrets_as_a_url_quotes_them() -> None:
    call = http("GET", "https://h.example/x", params={"token": "a/b c+d"})
    assert {"a/b c+d", "a%2Fb+c%2Bd", "a%2Fb%20c%2Bd"} <= known_secrets(call, (), {})


def test_a_token_as_the_url_user_name() -> None:
    call = http("GET", "https://ghp_TOKEN01@h.example/x")
    assert "ghp_TOKEN01" in known_secrets(call, (), {})
    # Unencoded, the `#` ends the host: requests goes to host ghp_TOKEN02 and says so.
    broken = http("GET", "https://ghp_TOKEN02#x@h.example/x")
    assert {"ghp_TOKEN02#x", "ghp_TOKEN02", "ghp_token02"} <= known_secrets(broken, (), {})


def test_short_values_are_left_out() -> None:
    call = http("GET", "https://h.example/x", headers={"X-Api-Key": "abc"})
    assert known_secrets(call, (), {}) == set()


def test_an_aws_calls_secret_named_params() -> None:
    call = aws(
        "sqs",
        "send_message",
        QueueUrl="https://sqs.eu-west-1.amazonaws.com/1/q",
        MessageBody="hello there",
        MessageAttributes={"api_token": {"DataType": "String", "StringValue": "ATTR0001"}},
    )
    assert known_secrets(call, (), {}) >= {"ATTR0001"}
    assert not {"String", "hello there"} & known_secrets(call, (), {})
    secret = aws("secretsmanager", "create_secret", Name="db", SecretString="SSTRING1")
    assert "SSTRING1" in known_secrets(secret, (), {})


def charge(amount: int, api_key: str, *, options: dict[str, Any]) -> None:
    """A function with a secret-named argument."""


def test_a_functions_secret_named_arguments() -> None:
    kwargs = {"options": {"client_secret": "NESTED01", "note": "plain text"}}
    found = known_secrets(charge, (1000, "POSKEY01"), kwargs)
    assert {"POSKEY01", "NESTED01"} <= found
    assert not {"1000", "plain text"} & found
    partial = functools.partial(charge, api_key="PARTKEY1")
    assert "PARTKEY1" in known_secrets(partial, (5,), {"options": {}})


def test_arguments_a_signature_refuses_are_still_looked_at() -> None:
    found = known_secrets(charge, (), {"api_key": "KWKEY001", "extra": {"token": "EXTRA001"}})
    assert {"KWKEY001", "EXTRA001"} <= found
    assert known_secrets(print, ("x",), {"password": "BUILTIN1"}) >= {"BUILTIN1"}


def test_an_auth_password_not_in_utf8_leaves_the_rest_found() -> None:
    call = http(
        "GET",
        "https://h.example/x",
        headers={"X-Api-Key": "HEADER01"},
        auth=(b"bob", b"\xffPW0001"),
    )
    assert {"HEADER01", "\ufffdPW0001"} <= known_secrets(call, (), {})
