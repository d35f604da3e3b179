"""Planted secrets never come out: 0 found in logs, dead letters, reprs, stats, errors, CLI.

Secrets are planted the ways people pass them: an Authorization header, an API-key header,
a cookie, a token in the query string, basic auth in the URL and as `auth=`, a password in
a JSON body, AWS credentials (access key id and secret) and AWS parameters holding a
secret. The calls really run (a local HTTP server, moto's server for AWS, both on
127.0.0.1) and fail in the ways that make offload talk: retries, resets, timeouts,
redirects, permanent errors, exhaustion. Then everything offload (and urllib3 and
botocore, whose loggers it filters) said is scanned: every log record at DEBUG with its
traceback, every dead letter (repr and JSON), the reprs of calls, tasks, the offloader and
its stats, the errors raised for bad calls, and the `offload` command's output over the
SQLite store that holds the dead letters.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tenacity

import offload
from offload import Offloader, RetryPolicy
from procs import SRC
from server import Answer, ScriptedServer

BEARER = "sk_live_PLANTEDbearer0001"
QUERY_TOKEN = "PLANTEDquerytoken0002"
API_KEY = "PLANTEDapikey0003"
URL_PASSWORD = "PLANTEDurlpass0004"
AUTH_PASSWORD = "PLANTEDauthpass0005"
COOKIE = "PLANTEDcookie0006"
BODY_PASSWORD = "PLANTEDbodypass0007"
SIGNATURE = "PLANTEDsig0008"
AWS_KEY_ID = "AKIAPLANTED000000009"
AWS_SECRET = "PLANTEDawsSecretKey/0010+xyz"
AWS_PARAM_SECRET = "PLANTEDsecretString0011"
MESSAGE_SECRET = "PLANTEDexceptionToken0012"
BODY_SECRET = "PLANTEDmessageBodyPassword0013"
ATTRIBUTE_SECRET = "PLANTEDattributeToken0014"

PLANTED = [
    BEARER,
    QUERY_TOKEN,
    API_KEY,
    URL_PASSWORD,
    AUTH_PASSWORD,
    COOKIE,
    BODY_PASSWORD,
    SIGNATURE,
    AWS_KEY_ID,
    AWS_SECRET,
    AWS_PARAM_SECRET,
    MESSAGE_SECRET,
    BODY_SECRET,
    ATTRIBUTE_SECRET,
]
# What the wire carries instead of a planted value: basic auth is base64 of user:password.
DERIVED = [
    base64.b64encode(f"user:{URL_PASSWORD}".encode()).decode(),
    base64.b64encode(f"user:{AUTH_PASSWORD}".encode()).decode(),
]
FAST = RetryPolicy(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none())


def leaks(texts: dict[str, str]) -> list[str]:
    """Where each planted secret (or its base64 form) shows up."""
    found = []
    for where, text in texts.items():
        for secret in PLANTED + DERIVED:
            if secret in text:
                found.append(f"{secret} in {where}: ...{_around(text, secret)}...")
    return found


def _around(text: str, secret: str) -> str:
    i = text.index(secret)
    return text[max(0, i - 80) : i + len(secret) + 20]


def log_texts(records: list[logging.LogRecord]) -> dict[str, str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return {f"log {i} ({r.name})": formatter.format(r) for i, r in enumerate(records)}


@pytest.fixture
def moto_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield endpoint
    finally:
        server.stop()


def _http_calls(server: ScriptedServer) -> list[offload.HttpCall]:
    userinfo = f"http://user:{URL_PASSWORD}@127.0.0.1:{server.port}"
    headers = {
        "Authorization": f"Bearer {BEARER}",
        "X-Api-Key": API_KEY,
        "Cookie": f"session={COOKIE}",
    }
    common = {"headers": headers, "json": {"user": "ann", "password": BODY_PASSWORD}}
    return [
        # Retried once (503), then delivered.
        offload.http("POST", server.url(f"/retry?access_token={QUERY_TOKEN}&page=2"), **common),
        # A permanent failure.
        offload.http("POST", server.url(f"/denied?access_token={QUERY_TOKEN}"), **common),
        # Resets until exhausted: requests' ConnectionError names the URL.
        offload.http("POST", userinfo + f"/reset?access_token={QUERY_TOKEN}", **common),
        # Read timeouts until exhausted.
        offload.http(
            "POST",
            server.url(f"/slow?access_token={QUERY_TOKEN}"),
            timeout=(2, 0.2),
            auth=("user", AUTH_PASSWORD),
            **common,
        ),
        # A redirect to a signed URL (urllib3 logs the new request line), then a 500.
        offload.http("GET", server.url("/redirect"), headers=headers),
    ]


def test_no_planted_secret_comes_out(
    server: ScriptedServer,
    moto_endpoint: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # root: offload, urllib3 and botocore at DEBUG
    server.script("/retry", Answer(503), Answer(200))
    server.script("/denied", Answer(401, body=b'{"error": "invalid token"}'))
    server.script("/reset", Answer.reset())
    server.script("/slow", Answer(200, delay=1.0))
    server.script("/redirect", Answer(302, headers={"Location": f"/final?sig={SIGNATURE}"}))
    server.script("/final", Answer(500))

    def leaky(token: str) -> None:
        raise RuntimeError(f"upstream refused Authorization: Bearer {token} (api_key={token})")

    store = f"sqlite:///{tmp_path / 'offload.db'}"
    off = Offloader(store=store, retry=FAST, workers=2, idle_timeout=1)
    aws_off = Offloader(retry=FAST, idle_timeout=1)
    calls: list[object] = _http_calls(server)
    aws_calls = [
        offload.aws("secretsmanager", "create_secret", Name="db", SecretString=AWS_PARAM_SECRET),
        offload.aws("secretsmanager", "get_secret_value", SecretId="db"),
        offload.aws(
            "secretsmanager",
            "create_secret",
            Name="aws-creds",
            SecretString=json.dumps({"access_key_id": AWS_KEY_ID, "secret": AWS_SECRET}),
        ),
        # JSON text under an innocent name, a secret-named key over an object.
        offload.aws(
            "sqs",
            "send_message",
            QueueUrl=f"{moto_endpoint}/123456789012/missing",
            MessageBody=json.dumps({"user": "ann", "password": BODY_SECRET}),
            MessageAttributes={
                "api_token": {"DataType": "String", "StringValue": ATTRIBUTE_SECRET}
            },
        ),
    ]
    try:
        tasks = [off.enqueue_task(call) for call in calls]
        tasks.append(off.enqueue_task(_raises_secret))
        assert off.flush(30)
        aws_tasks = [aws_off.enqueue_task(aws_calls[0])]
        assert aws_off.flush(30)
        aws_tasks += [aws_off.enqueue_task(call) for call in aws_calls[1:]]
        aws_tasks.append(aws_off.enqueue_task(leaky, MESSAGE_SECRET))
        assert aws_off.flush(30)
        stored_ids = [letter.id for letter in off.dead_letters()]  # for the CLI
        letters = off.dead_letters() + aws_off.dead_letters()
        stats = [off.stats(), aws_off.stats()]
    finally:
        off.shutdown(5)
        aws_off.shutdown(5)

    # The secrets were real: they reached the servers.
    received = server.requests_to("/retry")[0]
    assert received.headers["Authorization"] == f"Bearer {BEARER}"
    assert received.query["access_token"] == [QUERY_TOKEN]
    assert server.requests_to("/final")[0].query["sig"] == [SIGNATURE]
    assert stats[1].succeeded >= 3, stats[1]  # create, get, create
    reasons = sorted(letter.reason for letter in letters)
    assert reasons == ["exhausted"] * 3 + ["permanent"] * 4, letters

    texts = log_texts(caplog.records)
    for letter in letters:
        texts[f"dead letter {letter.id} repr"] = repr(letter)
        texts[f"dead letter {letter.id} json"] = json.dumps(letter.to_json())
    for i, thing in enumerate([*calls, *aws_calls, *tasks, *aws_tasks, off, aws_off, *stats]):
        texts[f"repr {i}"] = repr(thing)
        texts[f"str {i}"] = str(thing)
    texts |= cli_texts(store, stored_ids)
    texts |= error_texts()

    found = leaks(texts)
    assert found == [], "\n".join(found[:10])
    # The scan looked at a lot: it would have found a leak.
    assert len(caplog.records) >= 50
    assert any(r.name.startswith("botocore") for r in caplog.records)
    assert any(r.name.startswith("urllib3") for r in caplog.records)
    if _has_cli():
        assert sum(k.startswith("cli") for k in texts) >= 5


BRACKET_KEY = "PLANTEDbracketKey0015"
BRACKET_TOKEN = "PLANTEDbracketToken0016"
PROSE_KEY = "sk_live_PLANTEDprose0017"
POSITIONAL_KEY = "sk_live_PLANTEDpositional0018"
MISTYPED_SECRET = "PLANTEDmistyped0019"
OWN_SECRETS = [BRACKET_KEY, BRACKET_TOKEN, PROSE_KEY, POSITIONAL_KEY, MISTYPED_SECRET]


def refuses_key(amount: int, api_key: str) -> None:
    """Quotes its key in prose, as many SDKs word it: no pattern finds it there."""
    raise PermissionError(f"the API refused key {api_key} for {amount}")


def test_a_calls_own_secrets_never_come_out(
    server: ScriptedServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Secrets no pattern finds: bracketed query names (`user[api_key]`, sent as
    `user%5Bapi_key%5D`) in requests' path-only URLs and urllib3's request lines, a key a
    function's exception quotes in prose, a value botocore quotes when it refuses it."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    server.script("/denied", Answer(400))
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    store = f"sqlite:///{tmp_path / 'offload.db'}"
    off = Offloader(store=store, retry=RetryPolicy(stop=tenacity.stop_after_attempt(1)))
    try:
        off.enqueue_task(
            offload.http(
                "GET", f"http://127.0.0.1:{closed}/v1/me", params={"user[api_key]": BRACKET_KEY}
            )
        )
        off.enqueue_task(offload.http("GET", server.url(f"/denied?auth[token]={BRACKET_TOKEN}")))
        off.enqueue_task(
            offload.http("GET", server.url("/denied"), params={"auth[token]": BRACKET_TOKEN})
        )
        off.enqueue_task(refuses_key, 10, api_key=PROSE_KEY)
        off.enqueue_task(refuses_key, 10, POSITIONAL_KEY)
        off.enqueue_task(
            offload.aws(
                "secretsmanager",
                "create_secret",
                region="eu-west-1",
                Name="db",
                SecretString=MISTYPED_SECRET.encode(),  # bytes: refused before it is sent
            )
        )
        assert off.flush(30)
        letters = off.dead_letters()
    finally:
        off.shutdown(5)

    sent = [request.query.get("auth[token]") for request in server.requests_to("/denied")]
    assert sent == [[BRACKET_TOKEN]] * 2  # the secrets were real: they reached the server
    errors = sorted(letter.error.split(":")[0] for letter in letters)
    assert errors == [
        "ConnectionError",
        "HTTP 400 Bad Request",
        "HTTP 400 Bad Request",
        "ParamValidationError",
        "PermissionError",
        "PermissionError",
    ]
    texts = log_texts(caplog.records)
    for letter in letters:
        texts[f"dead letter {letter.id} json"] = json.dumps(letter.to_json())
    texts |= cli_texts(store, [letter.id for letter in letters])
    found = [
        f"{secret} in {where}: ...{_around(text, secret)}..."
        for where, text in texts.items()
        for secret in OWN_SECRETS
        if secret in text
    ]
    assert found == [], "\n".join(found[:10])
    # The texts that would have held them were looked at.
    assert any(
        "Max retries exceeded with url: /v1/me?user%5Bapi_key%5D=***" in t for t in texts.values()
    )
    assert any("GET /denied?auth%5Btoken%5D=*** HTTP/1.1" in t for t in texts.values())
    assert any("the API refused key *** for 10" in t for t in texts.values())


def _raises_secret() -> None:
    raise PermissionError(f"token={MESSAGE_SECRET} rejected for https://u:{URL_PASSWORD}@x.io/")


def _has_cli() -> bool:
    try:
        import offload.cli  # noqa: F401
    except ImportError:  # the command is not built yet
        return False
    return True


def cli_texts(store: str, letter_ids: list[str]) -> dict[str, str]:
    """Everything `offload dead-letters list/show` and `offload stats` print."""
    if not _has_cli():
        return {}
    runs = [
        ["dead-letters", "list", "--store", store],
        ["dead-letters", "list", "--store", store, "--json"],
        ["stats", "--store", store, "--json"],
    ]
    for letter_id in letter_ids:
        runs += [
            ["dead-letters", "show", letter_id, "--store", store],
            ["dead-letters", "show", letter_id, "--store", store, "--json"],
        ]
    env = {**os.environ, "PYTHONPATH": SRC}
    texts = {}
    for args in runs:
        result = subprocess.run(
            [sys.executable, "-m", "offload", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert result.returncode == 0, (args, result.stderr)
        texts[f"cli {' '.join(args[:3])} stdout"] = result.stdout
        texts[f"cli {' '.join(args[:3])} stderr"] = result.stderr
    return texts


def error_texts() -> dict[str, str]:
    """The messages of errors raised for bad calls that carry secrets."""
    attempts = {
        "ftp URL with userinfo": lambda: offload.http(
            "GET", f"ftp://user:{URL_PASSWORD}@h/f?token={QUERY_TOKEN}"
        ),
        "bad header value": lambda: offload.http(
            "GET", "https://h/", headers={"Authorization": f"Bearer {BEARER}\n"}
        ),
        "header value not str": lambda: offload.http(
            "GET", "https://h/", headers={"X-Api-Key": API_KEY.encode()}
        ),
        "unknown keyword": lambda: offload.http("GET", "https://h/", tokn=QUERY_TOKEN),
        "bad port": lambda: offload.http("GET", f"https://u:{URL_PASSWORD}@h:99999/"),
    }
    texts = {}
    for name, attempt in attempts.items():
        with pytest.raises((TypeError, ValueError)) as info:
            attempt()
        texts[f"error {name}"] = f"{info.value!s} {info.value!r}"
    return texts
