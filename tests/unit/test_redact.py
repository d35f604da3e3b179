"""offload._redact: what counts as a secret, and that it never shows in URLs, headers or text."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload._redact import (
    REDACTED,
    RedactingFilter,
    is_secret_name,
    redact_dsn,
    redact_headers,
    redact_text,
    redact_third_party_logs,
    redact_url,
)

SECRET = "s3cr3tV4lue"


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "proxy-authorization",
        "Cookie",
        "Set-Cookie",
        "X-Api-Key",
        "x-api-key",
        "api_key",
        "apiKey",
        "access_token",
        "X-Auth-Token",
        "client_secret",
        "password",
        "passwd",
        "X-Amz-Signature",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "sessionid",
        "sig",
        "X-Auth",
        "jwt",
        "PRIVATE_KEY",
        "X-Authorization",
        "Authentication",
        "X-Amzn-Authorization",
        "X-Forwarded-Authorization",
        "authn",
        "auth_code",
        "user[api_key]",
        "auth[token]",
        "user[auth]",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "Idempotency-Key",
        "idempotency_key",
        "X-Idempotency-Key",
        "Content-Type",
        "Accept",
        "User-Agent",
        "page",
        "q",
        "author",
        "Authors",
        "authority",
        "oauth_version",
        "host",
        "user[name]",
    ],
)
def test_not_secret_names(name: str) -> None:
    assert not is_secret_name(name)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.example.com/v1/charges", "https://api.example.com/v1/charges"),
        (
            f"https://api.example.com/x?token={SECRET}&page=2",
            "https://api.example.com/x?token=***&page=2",
        ),
        (
            f"http://h/x?Api-Key={SECRET}&api%5Fkey={SECRET}&q=a+b",
            "http://h/x?Api-Key=***&api%5Fkey=***&q=a+b",
        ),
        (f"https://user:{SECRET}@h.com:8443/p", "https://user:***@h.com:8443/p"),
        (f"https://{SECRET}@github.com/o/r.git", "https://***@github.com/o/r.git"),
        (f"https://{SECRET}:@api.stripe.com/v1", "https://***@api.stripe.com/v1"),
        (f"https://h/cb#access_token={SECRET}&state=1", "https://h/cb#access_token=***&state=1"),
        ("https://h/x?Idempotency-Key=abc&flag", "https://h/x?Idempotency-Key=abc&flag"),
        (f"http://h/x?a=1;password={SECRET}", "http://h/x?a=1;password=***"),
        (f"https://h/x?user%5Bapi_key%5D={SECRET}&q=1", "https://h/x?user%5Bapi_key%5D=***&q=1"),
        # Unencoded `#`, `?` and `/` in the userinfo: urlsplit ends the netloc there.
        (f"https://bob:Pa#{SECRET}@h.com/v1", "https://bob:***@h.com/v1"),
        (f"https://bob:Pa?{SECRET}@h.com/v1?page=2", "https://bob:***@h.com/v1?page=2"),
        (f"https://{SECRET}#x@h.com/v1", "https://***@h.com/v1"),
        (f"https://bob:Pa/{SECRET}@h.com/v1", "https://***@h.com/v1"),
        # An `@` in the path is no userinfo.
        ("https://discord.com/api/users/@me", "https://discord.com/api/users/@me"),
        ("http://127.0.0.1:8080/users/@me", "http://127.0.0.1:8080/users/@me"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_keeps_a_parseable_url() -> None:
    redacted = redact_url(f"https://u:{SECRET}@Host.example:444/a/b?x=1&secret={SECRET}#f")
    split = urlsplit(redacted)
    assert (split.scheme, split.hostname, split.port, split.path) == (
        "https",
        "host.example",
        444,
        "/a/b",
    )
    assert parse_qs(split.query) == {"x": ["1"], "secret": [REDACTED]}
    assert SECRET not in redacted


def test_redact_url_never_raises_on_an_unparseable_url() -> None:
    redacted = redact_url(f"http://u:{SECRET}@[::1/x?token={SECRET}")
    assert SECRET not in redacted
    assert redacted.startswith("http://")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql://app:Pa#{SECRET}@db:5432/app", "postgresql://app:***@db:5432/app"),
        (f"postgresql://app:Pa?{SECRET}@db:5432/app", "postgresql://app:***@db:5432/app"),
        (f"postgresql://app:Pa/{SECRET}@db:5432/app", "postgresql://app:***@db:5432/app"),
        (
            f"postgresql://app:{SECRET}@db/app?sslmode=require",
            "postgresql://app:***@db/app?sslmode=require",
        ),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        (
            "postgresql://db/app?application_name=me@host",
            "postgresql://db/app?application_name=me@host",
        ),
        (f"postgresql://u:{SECRET}@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        (  # the local socket: no authority, and its `//` kept
            f"postgresql:///app?host=/run/postgresql&password={SECRET}",
            "postgresql:///app?host=/run/postgresql&password=***",
        ),
    ],
)
def test_redact_dsn(url: str, expected: str) -> None:
    assert redact_dsn(url) == expected


def test_redact_headers() -> None:
    headers = {
        "Authorization": f"Bearer {SECRET}",
        "X-Api-Key": SECRET,
        "Cookie": f"sid={SECRET}",
        "Idempotency-Key": "k-1",
        "Accept": "application/json",
        "X-Trace": f"Bearer {SECRET}",  # not a secret name, but the value gives it away
    }
    assert redact_headers(headers) == {
        "Authorization": REDACTED,
        "X-Api-Key": REDACTED,
        "Cookie": REDACTED,
        "Idempotency-Key": "k-1",
        "Accept": "application/json",
        "X-Trace": f"Bearer {REDACTED}",
    }
    assert redact_headers([("Set-Cookie", SECRET)]) == {"Set-Cookie": REDACTED}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            # requests/urllib3 put the path and query in their messages, not the whole URL
            f"HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: "
            f"/x?api_token={SECRET}&page=2 (Caused by NewConnectionError('refused'))",
            "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: "
            "/x?api_token=***&page=2 (Caused by NewConnectionError('refused'))",
        ),
        (
            f"see https://u:{SECRET}@h.com/x?key={SECRET}).",
            "see https://u:***@h.com/x?key=***).",
        ),
        (f"Authorization: Bearer {SECRET}", "Authorization: ***"),
        (f"sent Bearer {SECRET} and basic {SECRET}", "sent Bearer *** and basic ***"),
        ("key AKIAABCDEFGHIJKLMNOP was used", "key *** was used"),
        ("temporary ASIAABCDEFGHIJKLMNOP", "temporary ***"),
        (f"{{'X-Api-Key': '{SECRET}', 'Accept': 'x'}}", "{'X-Api-Key': '***', 'Accept': 'x'}"),
        (f'{{"client_secret": "{SECRET}", "n": 1}}', '{"client_secret": "***", "n": 1}'),
        (f"{{'X-Amz-Security-Token': b'{SECRET}'}}", "{'X-Amz-Security-Token': b'***'}"),
        (f'login(user="bob", password="{SECRET} x")', 'login(user="bob", password="***")'),
        (f"X-Auth-Token: {SECRET}\nAccept: */*", "X-Auth-Token: ***\nAccept: */*"),
        (
            # requests percent-encodes a bracketed name; urllib3 quotes only the path
            f"Max retries exceeded with url: /v1/me?user%5Bapi_key%5D={SECRET}&page=2 (Caused",
            "Max retries exceeded with url: /v1/me?user%5Bapi_key%5D=***&page=2 (Caused",
        ),
        (
            f'"GET /v1/me?auth[token]={SECRET},x;page=2 HTTP/1.1" 400 0',
            '"GET /v1/me?auth[token]=***;page=2 HTTP/1.1" 400 0',
        ),
        (f"see /v1/me?auth%5Btoken%5D={SECRET}).", "see /v1/me?auth%5Btoken%5D=***)."),
        (f"user[api_key]={SECRET} was refused", "user[api_key]=*** was refused"),
        (
            # botocore's ParamValidationError quotes the value it refused
            "Parameter validation failed:\nInvalid type for parameter SecretString, value: "
            f"b'{SECRET}', type: <class 'bytes'>, valid types: <class 'str'>\n"
            f"Invalid length for parameter Password, value: {SECRET}, valid min length: 40",
            "Parameter validation failed:\nInvalid type for parameter SecretString, value: "
            "***, type: <class 'bytes'>, valid types: <class 'str'>\n"
            "Invalid length for parameter Password, value: ***, valid min length: 40",
        ),
        ("KeyError: 'user_id'", "KeyError: 'user_id'"),
        ("Token has expired", "Token has expired"),
        ("nothing to hide here", "nothing to hide here"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


_TOKEN_CHARS = st.text(
    alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd"), max_codepoint=127),
    min_size=6,
    max_size=40,
)


@given(secret=_TOKEN_CHARS, name=st.sampled_from(["token", "api_key", "X-Amz-Signature"]))
def test_a_secret_query_value_never_survives(secret: str, name: str) -> None:
    url = f"https://h.example/p?a=1&{name}={secret}&b=2"
    assert secret not in redact_url(url)
    assert secret not in redact_text(f"failed: {url} (boom)")
    assert secret not in redact_text(f"with url: /p?{name}={secret}")


@given(st.text(max_size=300))
def test_redact_text_never_raises(text: str) -> None:
    assert isinstance(redact_text(text), str)
    assert isinstance(redact_url(text), str)


def test_redacting_filter_rewrites_the_message(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_redact.filter")
    logger.addFilter(RedactingFilter())
    caplog.set_level(logging.DEBUG, logger="test_redact.filter")
    logger.debug('%s "%s %s HTTP/1.1" %s', "http://h:80", "GET", f"/x?token={SECRET}", 200)
    logger.debug("plain %d", 1)
    assert SECRET not in caplog.text
    assert '"GET /x?token=*** HTTP/1.1" 200' in caplog.text
    assert "plain 1" in caplog.text


def test_third_party_log_redaction_is_installed_once() -> None:
    redact_third_party_logs()
    redact_third_party_logs()
    filters = logging.getLogger("urllib3.connectionpool").filters
    assert sum(isinstance(f, RedactingFilter) for f in filters) == 1
