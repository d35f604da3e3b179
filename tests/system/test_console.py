"""The console over HTTP: a real server on 127.0.0.1, requests as the browser and the script.

Dead letters are planted in a SQLite store the way a worker leaves them (`store.bury`),
their calls full of secrets (in URLs, headers, bodies) and their errors full of markup;
others come from real calls that failed against the ScriptedServer.
"""

from __future__ import annotations

import html
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin

import pytest
import requests

import offload
from offload import DeadLetter, Offloader, Task
from offload.console import make_app
from offload.console.http import MAX_FORM
from offload.records import new_id
from offload.stores.sqlite import SQLiteStore
from offload.stores.sqs import SqsStore
from procs import python_env
from server import Answer, ScriptedServer
from wsgi import WsgiServer

TOKEN = "console-test-token-0123456789"
SECRETS = (
    "sk_live_SECRET_IN_HEADER",
    "SECRET_API_KEY_PARAM",
    "SECRET_URL_PASSWORD",
    "SECRET_BODY_PASSWORD",
    "SECRET_COOKIE_VALUE",
    "SECRET_X_API_KEY",
    TOKEN,
)
MARKUP = "<img src=x onerror=\"document.title='pwned'\"><script>alert(1)</script>"


def secret_call(path: str, port: int = 9) -> offload.HttpCall:
    """A call holding every kind of secret."""
    return offload.http(
        "POST",
        f"http://ops:SECRET_URL_PASSWORD@127.0.0.1:{port}{path}?api_key=SECRET_API_KEY_PARAM&n=1",
        headers={
            "Authorization": "Bearer sk_live_SECRET_IN_HEADER",
            "X-Api-Key": "SECRET_X_API_KEY",
        },
        cookies={"session": "SECRET_COOKIE_VALUE"},
        json={"password": "SECRET_BODY_PASSWORD", "email": "ada@example.com"},
        idempotency_key=True,
    )


def bury(
    store: SQLiteStore | SqsStore,
    call: Any,
    *,
    key: str | None = None,
    status: int | None = 503,
    reason: str = "exhausted",
    error: str = "HTTP 503 Service Unavailable",
    when: datetime | None = None,
) -> DeadLetter:
    when = when or datetime.now(timezone.utc)
    task = Task(call, key=key)
    store.put(task, lease=store.leases_on_put)
    if not store.leases_on_put:
        (task,) = store.claim(1)
    letter = DeadLetter(
        id=new_id(),
        task_id=task.id,
        description=call.describe(),
        key=task.key,
        attempts=5,
        error=error,
        status=status,
        reason=reason,  # type: ignore[arg-type]
        first_attempt_at=when - timedelta(minutes=3),
        last_attempt_at=when,
    )
    store.bury(task, letter)
    return letter


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "console.db"


@pytest.fixture
def store(store_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(store_path)
    yield opened
    opened.close()


@pytest.fixture
def planted(store: SQLiteStore) -> dict[str, DeadLetter]:
    """Named dead letters: secrets, markup, and several keys, statuses and reasons."""
    now = datetime.now(timezone.utc)
    letters = {
        "secret": bury(
            store,
            secret_call("/charge"),
            status=402,
            reason="permanent",
            error="HTTP 402 Payment Required",
            when=now - timedelta(hours=3),
        ),
        "markup": bury(
            store,
            offload.http("GET", "http://127.0.0.1:9/xss"),
            status=400,
            reason="permanent",
            error=MARKUP,
            when=now - timedelta(hours=2),
        ),
        "crm": bury(store, offload.http("POST", "http://127.0.0.1:9/contacts"), key="crm"),
    }
    for i in range(3):
        letters[f"mail{i}"] = bury(
            store,
            offload.http("POST", f"http://127.0.0.1:9/mail/{i}"),
            key="mail",
            status=500,
            error=f"HTTP 500 mail-{i}",
        )
    return letters


class Console:
    """A console served over HTTP, and a browser-like session on it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.server = WsgiServer(app)
        self.browser = requests.Session()

    def url(self, path: str) -> str:
        return self.server.url(path)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.browser.get(self.url(path), allow_redirects=False, timeout=10, **kwargs)

    def post(self, path: str, data: Any = None, **kwargs: Any) -> requests.Response:
        return self.browser.post(
            self.url(path), data=data, allow_redirects=False, timeout=10, **kwargs
        )

    def log_in(self) -> None:
        response = self.get(f"/?token={TOKEN}")
        assert response.status_code == 303, response.text

    def csrf(self, path: str = "/") -> str:
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', self.get(path).text)
        assert match, "a page with a form carries a CSRF token"
        return match.group(1)

    def script(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A script's request: the Bearer token, no cookie."""
        return requests.request(
            method,
            self.url(path),
            headers={"Authorization": f"Bearer {TOKEN}"},
            allow_redirects=False,
            timeout=10,
            **kwargs,
        )

    def close(self) -> None:
        self.browser.close()
        self.server.close()


@pytest.fixture
def console_of() -> Iterator[Callable[..., Console]]:
    made: list[Console] = []

    def make(target: Any, **options: Any) -> Console:
        options.setdefault("token", TOKEN)
        console = Console(make_app(target, **options))
        made.append(console)
        return console

    yield make
    for console in made:
        console.close()


@pytest.fixture
def console(console_of: Callable[..., Console], store_path: Path, planted: Any) -> Console:
    """A console over the SQLite store (as `offload console` serves one), logged in."""
    made = console_of(f"sqlite:///{store_path}")
    made.log_in()
    return made


class Tags(HTMLParser):
    """The element and attribute names of a page, as a browser parses them."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.names.add(tag)
        self.attributes.update(name for name, _ in attrs)


def ids_in(store: SQLiteStore) -> set[str]:
    return {letter.id for letter in store.dead_letters()}


# -- access -----------------------------------------------------------------------------------

PAGES = ["/", "/dead-letters", "/dead-letters?key=crm", "/purge", "/confirm?action=replay"]
SCRIPTS = ["/api/dead-letters", "/api/stats", "/api/health", "/metrics"]


def test_without_the_token_nothing_is_revealed(
    console_of: Callable[..., Console],
    store_path: Path,
    planted: dict[str, DeadLetter],
    store: SQLiteStore,
) -> None:
    console = console_of(f"sqlite:///{store_path}")
    letter = planted["crm"]
    before = ids_in(store)
    responses = [console.get(path) for path in [*PAGES, f"/dead-letters/{letter.id}"]]
    responses += [console.get(path) for path in SCRIPTS]
    responses.append(console.get(f"/api/dead-letters/{letter.id}"))
    responses.append(console.get("/?token=not-the-token"))
    responses.append(
        requests.get(console.url("/api/stats"), headers={"Authorization": "Bearer nope"}, timeout=5)
    )
    responses.append(console.post(f"/dead-letters/{letter.id}/discard", {"csrf": "x"}))
    responses.append(console.post("/purge"))
    responses.append(requests.post(console.url(f"/api/dead-letters/{letter.id}/replay"), timeout=5))
    for response in responses:
        assert response.status_code == 401, (response.url, response.status_code)
        body = re.sub(r'name="next" value="[^"]*"', "", response.text)  # the page it asked for
        for leaked in (letter.id, "crm", "mail", "127.0.0.1:9", "dead_letters", "503"):
            assert leaked not in body, (response.url, leaked)
    assert responses[-1].headers["WWW-Authenticate"].startswith("Bearer")
    assert ids_in(store) == before
    health = console.get("/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")


def test_the_printed_url_logs_in_with_a_strict_cookie_and_drops_the_token(
    console_of: Callable[..., Console], store_path: Path, planted: Any
) -> None:
    console = console_of(f"sqlite:///{store_path}")
    response = console.get(f"/dead-letters?key=crm&token={TOKEN}")
    assert response.status_code == 303
    assert response.headers["Location"] == "/dead-letters?key=crm"
    cookies = response.headers["Set-Cookie"]
    assert "offload_console_session=" in cookies
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookies
    assert TOKEN not in cookies
    page = console.get("/dead-letters?key=crm")
    assert page.status_code == 200 and "1</strong> dead letter matches" in page.text


def test_the_login_form(console_of: Callable[..., Console], store_path: Path, planted: Any) -> None:
    console = console_of(f"sqlite:///{store_path}")
    login = console.get("/login?next=/dead-letters")
    assert login.status_code == 200 and 'type="password"' in login.text
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', login.text).group(1)  # type: ignore[union-attr]
    wrong = console.post("/login", {"csrf": csrf, "token": "guess", "next": "/dead-letters"})
    assert wrong.status_code == 401 and "not the token" in wrong.text
    assert "offload_console_session" not in wrong.headers.get("Set-Cookie", "")
    no_csrf = console.post("/login", {"token": TOKEN})
    assert no_csrf.status_code == 403
    ok = console.post("/login", {"csrf": csrf, "token": TOKEN, "next": "/dead-letters"})
    assert ok.status_code == 303 and ok.headers["Location"] == "/dead-letters"
    assert console.get("/dead-letters").status_code == 200
    away = console.post("/login", {"csrf": csrf, "token": TOKEN, "next": "//evil.example/x"})
    assert away.headers["Location"] == "/"  # never an open redirect
    out = console.post("/logout", {"csrf": console.csrf("/")})
    assert out.status_code == 303 and console.get("/").status_code == 401


def raw_headers(console: Console, request: bytes) -> list[str]:
    """The header lines of the answer to `request`, sent as it is over a socket (the
    lines as the server wrote them, before any client could refuse or merge them)."""
    with socket.create_connection(("127.0.0.1", console.server.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")


def test_a_login_goes_on_only_to_a_path_of_this_console(
    console_of: Callable[..., Console], store_path: Path, planted: Any
) -> None:
    console = console_of(f"sqlite:///{store_path}")

    def next_field(path: str) -> str:
        found = re.search(r'name="next" value="([^"]*)"', console.get(path).text)
        assert found, path
        return html.unescape(found.group(1))

    injected = "/x\r\nSet-Cookie: offload_console_session=attacker; Path=/"
    assert next_field("/login?next=/x%0d%0aSet-Cookie:%20offload_console_session=attacker") == "/"
    assert next_field("/login?next=/%09/evil.example") == "/"  # a browser drops the tab
    assert next_field("/%09/evil.example") == "/"  # the page asked for, without a session
    assert next_field("/login?next=/dead-letters?key=crm") == "/dead-letters?key=crm"
    csrf = console.csrf("/login")
    cookie = "; ".join(f"{name}={value}" for name, value in console.browser.cookies.items())
    for sent in (injected, "/\t/evil.example", "/ /evil.example", "/\x7f/evil.example"):
        body = urlencode({"csrf": csrf, "token": TOKEN, "next": sent}).encode()
        lines = raw_headers(
            console,
            b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            + f"Cookie: {cookie}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
            + body,
        )
        assert lines[0].split()[1] == "303", (sent, lines)
        assert "Location: /" in lines, (sent, lines)
        assert not [line for line in lines if "attacker" in line], (sent, lines)
    by_link = raw_headers(
        console,
        f"GET /%0d%0aSet-Cookie:%20x=attacker/%09/evil.example?token={TOKEN} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nConnection: close\r\n\r\n".encode(),
    )
    assert "Location: /" in by_link and not [line for line in by_link if "attacker" in line]
    accented = console.post(
        "/login", {"csrf": csrf, "token": TOKEN, "next": "/dead-letters?key=café"}
    )
    assert accented.headers["Location"] == "/dead-letters?key=caf%C3%A9"  # escaped, not refused


def test_an_auth_callable_decides_and_posts_still_need_csrf(
    console_of: Callable[..., Console],
    store_path: Path,
    planted: dict[str, DeadLetter],
    store: SQLiteStore,
) -> None:
    def staff(environ: Any) -> bool:
        if environ.get("HTTP_X_USER") == "boom":
            raise RuntimeError("the app's session store is down")
        return environ.get("HTTP_X_USER") == "ops"

    console = console_of(f"sqlite:///{store_path}", token=None, auth=staff)
    ops = {"X-User": "ops"}
    assert console.get("/", headers=ops).status_code == 200
    assert console.get("/").status_code == 401
    assert console.get("/", headers={"X-User": "boom"}).status_code == 401
    assert "Log in" in console.get("/").text and 'type="password"' not in console.get("/").text
    letter = planted["crm"]
    refused = console.post(f"/dead-letters/{letter.id}/discard", headers=ops)
    assert refused.status_code == 403 and letter.id in ids_in(store)
    csrf = re.search(
        r'name="csrf" value="([0-9a-f]+)"',
        console.get(f"/dead-letters/{letter.id}", headers=ops).text,
    )
    assert csrf is not None
    done = console.post(f"/dead-letters/{letter.id}/discard", {"csrf": csrf.group(1)}, headers=ops)
    assert done.status_code == 303 and letter.id not in ids_in(store)


def test_make_app_checks_its_options(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{store_path}"
    monkeypatch.delenv("OFFLOAD_CONSOLE_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"token= .* or auth="):
        make_app(url)
    with pytest.raises(ValueError, match="at least 16"):
        make_app(url, token="short")
    with pytest.raises(TypeError, match="auth"):
        make_app(url, auth="ops")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory store"):
        make_app("memory", token=TOKEN)
    monkeypatch.setenv("OFFLOAD_CONSOLE_TOKEN", TOKEN)
    assert make_app(url).access.token == TOKEN


# -- headers, CSRF, GET, read-only -----------------------------------------------------------


def test_every_answer_carries_the_security_headers_and_no_inline_script(
    console: Console, planted: dict[str, DeadLetter]
) -> None:
    letter = planted["markup"]
    paths = [
        *PAGES,
        f"/dead-letters/{letter.id}",
        "/no-such-page",
        "/static/console.css",
        *SCRIPTS,
        "/healthz",
        "/login",
        f"/dead-letters/{letter.id}/replay",
    ]
    for path in paths:
        response = console.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, path
        assert "script-src" not in csp and "unsafe-inline" not in csp, path
        assert response.headers["Cache-Control"] == "no-store", path
        assert response.headers["X-Frame-Options"] == "DENY", path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
        assert response.headers["Referrer-Policy"] == "no-referrer", path
        if response.headers["Content-Type"].startswith("text/html"):
            tags = Tags()
            tags.feed(response.text)
            assert not {"script", "style"} & tags.names, path
            assert not [a for a in tags.attributes if a == "style" or a.startswith("on")], path
    anonymous = requests.get(console.url("/"), timeout=5)
    assert (
        anonymous.headers["Content-Security-Policy"]
        == console.get("/").headers["Content-Security-Policy"]
    )


def test_a_post_without_a_valid_csrf_token_is_refused_and_changes_nothing(
    console: Console, store: SQLiteStore, planted: dict[str, DeadLetter]
) -> None:
    letter = planted["crm"]
    before = ids_in(store)
    csrf = console.csrf("/")
    attempts = [
        (f"/dead-letters/{letter.id}/discard", {}, {}),
        (f"/dead-letters/{letter.id}/replay", {"csrf": "0" * 40}, {}),
        (f"/dead-letters/{letter.id}/discard", {"csrf": csrf}, {"Sec-Fetch-Site": "cross-site"}),
        (f"/dead-letters/{letter.id}/discard", {"csrf": csrf}, {"Sec-Fetch-Site": "same-site"}),
        ("/act", {"action": "discard", "scope": "matching"}, {}),
        ("/purge", {"csrf": csrf[:-1]}, {}),
    ]
    for path, form, headers in attempts:
        response = console.post(path, form, headers=headers)
        assert response.status_code == 403, (path, form, headers)
        assert "Nothing was changed" in response.text
    other = requests.Session()  # someone else's CSRF cookie with the right token for it
    other.get(console.url("/login"), timeout=5)
    console.browser.cookies.set("offload_console_csrf", other.cookies["offload_console_csrf"])
    assert console.post("/purge", {"csrf": csrf}).status_code == 403
    assert ids_in(store) == before
    console.browser.cookies.clear()
    console.log_in()
    done = console.post(
        f"/dead-letters/{letter.id}/discard",
        {"csrf": console.csrf("/")},
        headers={"Sec-Fetch-Site": "same-origin"},
    )
    assert done.status_code == 303 and ids_in(store) == before - {letter.id}


def test_get_never_changes_anything(
    console: Console, store: SQLiteStore, planted: dict[str, DeadLetter]
) -> None:
    before = ids_in(store)
    letter = planted["crm"]
    for path in [
        *PAGES,
        f"/dead-letters/{letter.id}",
        f"/dead-letters/{letter.id}/replay",
        f"/dead-letters/{letter.id}/discard",
        "/confirm?action=discard&key=crm",
        f"/confirm?action=discard&id={letter.id}",
        "/act?action=discard&scope=matching",
        "/purge",
        f"/api/dead-letters/{letter.id}/replay",
    ]:
        assert console.get(path).status_code in (200, 405), path
    assert ids_in(store) == before
    assert store.counts().ready == 0


def test_read_only_shows_no_action_and_refuses_them(
    console_of: Callable[..., Console],
    store_path: Path,
    store: SQLiteStore,
    planted: dict[str, DeadLetter],
) -> None:
    console = console_of(f"sqlite:///{store_path}", read_only=True)
    console.log_in()
    letter = planted["crm"]
    before = ids_in(store)
    for path in ["/", "/dead-letters", f"/dead-letters/{letter.id}"]:
        page = console.get(path).text
        assert "read-only" in page
        posts = re.findall(r'<form method="post" action="([^"]+)"', page)
        assert posts == ["/logout"], (path, posts)
        assert "Replay" not in page and "Discard" not in page and "Purge" not in page
    csrf = console.csrf("/")
    for path, form in [
        (f"/dead-letters/{letter.id}/replay", {"csrf": csrf}),
        ("/act", {"csrf": csrf, "action": "discard", "scope": "matching"}),
        ("/purge", {"csrf": csrf}),
    ]:
        response = console.post(path, form)
        assert response.status_code == 403 and "read-only" in response.text
    assert console.script("POST", f"/api/dead-letters/{letter.id}/replay").status_code == 403
    assert ids_in(store) == before


# -- pages ------------------------------------------------------------------------------------


def row_count(page: str) -> int:
    return page.count('<input type="checkbox" name="id"')


def test_pages_of_fifty_newest_first_with_every_filter(
    console_of: Callable[..., Console], store_path: Path, store: SQLiteStore
) -> None:
    made = []
    start = datetime.now(timezone.utc).replace(microsecond=0)
    for i in range(120):
        made.append(
            bury(
                store,
                offload.http("POST", f"http://127.0.0.1:9/orders/{i}"),
                key="shop" if i % 3 else "billing",
                status=503 if i % 2 else 429,
                reason="exhausted" if i % 4 else "permanent",
                error=f"HTTP error on order-{i:03d}",
                when=start - timedelta(minutes=120 - i),
            )
        )
    console = console_of(f"sqlite:///{store_path}")
    console.log_in()
    first = console.get("/dead-letters").text
    assert "<strong>120</strong> dead letters in all" in first
    assert row_count(first) == 50
    assert first.index("order-119") < first.index("order-118"), "newest first"
    older = re.search(r'<a href="([^"]+)">older »</a>', first)
    assert older is not None
    second = console.get(older.group(1).replace("&amp;", "&")).text
    assert row_count(second) == 50 and "order-069" in second and "order-070" not in second
    third_link = re.search(r'<a href="([^"]+)">older »</a>', second)
    assert third_link is not None
    third = console.get(third_link.group(1).replace("&amp;", "&")).text
    assert row_count(third) == 20 and "older »" not in third and "« newest" in third

    def count(query: str) -> int:
        page = console.get(f"/dead-letters?{query}").text
        found = re.search(r"<strong>([\d,]+)</strong> dead letters? match", page)
        assert found, query
        return int(found.group(1).replace(",", ""))

    assert count("key=billing") == 40
    assert count("status=429") == 60
    assert count("reason=permanent") == 30
    assert count("key=billing&status=503&reason=exhausted") == sum(
        1 for i in range(120) if i % 3 == 0 and i % 2 and i % 4
    )
    assert count("since=30.5m") == 30  # the last attempts are a minute apart
    since = (start - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S")
    assert count(f"since={since}") == 10
    assert count("text=ORDER-04") == 10
    assert count("text=orders/7") == 11, "text matches the call too"
    bad = console.get("/dead-letters?status=teapot")
    assert bad.status_code == 400 and "status" in bad.text and row_count(bad.text) == 0
    assert console.get("/dead-letters?since=yesterday").status_code == 400
    assert console.get("/dead-letters?reason=bored").status_code == 400


def test_the_console_pages_over_sqs_by_the_cursor_the_store_gave(
    console_of: Callable[..., Console], sqs_store_url: str
) -> None:
    """An SQS cursor is no number: the console passes it on, and refuses what the store
    refuses (a cursor of SQLite's) with a 400."""
    store = SqsStore.from_url(sqs_store_url)
    try:
        letters = [bury(store, secret_call(f"/orders/{i}")) for i in range(3)]
        console = console_of(sqs_store_url)
        first = console.script("GET", "/api/dead-letters", params={"limit": 2}).json()
        rest = console.script("GET", "/api/dead-letters", params={"cursor": first["cursor"]})
        assert rest.status_code == 200 and rest.json()["cursor"] is None
        shown = [item["id"] for item in first["items"] + rest.json()["items"]]
        assert shown == [letter.id for letter in reversed(letters)]
        console.log_in()
        page = console.get("/dead-letters?" + urlencode({"cursor": first["cursor"]}))
        assert page.status_code == 200 and letters[0].id in page.text
        assert letters[2].id not in page.text
        for path in ("/dead-letters?cursor=12", "/api/dead-letters?cursor=12"):
            refused = console.script("GET", path) if "api" in path else console.get(path)
            assert refused.status_code == 400 and "not a page this console gave" in refused.text
    finally:
        store.close()


def test_a_number_that_is_not_plain_digits_is_a_400_never_a_500(console: Console) -> None:
    huge = "9" * 5000
    for path in ("/dead-letters?done=replayed&n=%C2%B2", f"/?done=purged&n={huge}"):
        notice = console.get(path)
        assert notice.status_code == 200 and "0 dead letters." in notice.text, path
    for path in ("/dead-letters?cursor=%C2%B2", "/dead-letters?cursor=99999999999999999999"):
        page = console.get(path)
        assert page.status_code == 400 and "not a page this console gave" in page.text, path
    status = console.get("/dead-letters?status=%C2%B2")
    assert status.status_code == 400 and "not an HTTP status" in status.text
    for params, error in [
        ({"limit": "²"}, "limit"),
        ({"limit": huge}, "limit"),
        ({"cursor": "²"}, "cursor"),
        ({"cursor": huge}, "cursor"),
        ({"status": "5\u0660\u0663"}, "status"),  # Arabic-Indic digits: isdigit() says yes
    ]:
        answer = console.script("GET", "/api/dead-letters", params=params)
        assert answer.status_code == 400 and answer.json()["error"].startswith(error), params


def test_a_since_further_back_than_any_date_is_a_400(console: Console) -> None:
    for path in ("/dead-letters?since=1000000d", "/confirm?action=discard&since=1000000d"):
        page = console.get(path)
        assert page.status_code == 400 and "an age too large" in page.text, path
    answer = console.script("GET", "/api/dead-letters", params={"since": "99999999999d"})
    assert answer.status_code == 400 and "an age too large" in answer.json()["error"]


def test_one_dead_letter_shows_every_field_and_the_call_without_secrets_or_body(
    console: Console, planted: dict[str, DeadLetter]
) -> None:
    letter = planted["secret"]
    page = console.get(f"/dead-letters/{letter.id}").text
    for value in (
        letter.id,
        letter.task_id,
        letter.description.replace("&", "&amp;"),
        "permanent",
        "402",
        "HTTP 402 Payment Required",
        letter.last_attempt_at.strftime("%Y-%m-%d %H:%M:%S"),
    ):
        assert value in page
    assert "POST" in page
    assert "http://ops:***@127.0.0.1:9/charge?api_key=***&amp;n=1" in page
    assert re.search(r"Authorization</th><td class=\"mono\">\*\*\*<", page)
    assert re.search(r"X-Api-Key</th><td class=\"mono\">\*\*\*<", page)
    assert f'Idempotency-Key</th><td class="mono">{letter.task_id}<' in page
    assert "json" in page and "cookies" in page
    assert "ada@example.com" not in page, "never the body"
    for secret in SECRETS:
        assert secret not in page
    missing = console.get("/dead-letters/no-such-id")
    assert missing.status_code == 404 and "no-such-id" not in missing.text


def test_a_nul_in_a_filter_or_an_id_is_a_400_or_a_404_on_postgresql(
    console_of: Callable[..., Console], postgres_url: str
) -> None:
    from offload.stores.postgres import PostgresStore

    store = PostgresStore.from_url(postgres_url)
    try:
        letter = bury(store, offload.http("POST", "http://127.0.0.1:9/pg"), key="crm")  # type: ignore[arg-type]
        console = console_of(store)  # closed below: a connection left open warns later
        console.log_in()
        for path in (
            "/dead-letters?text=%00",
            "/dead-letters?key=crm%00",
            "/confirm?action=discard&text=a%00",
        ):
            page = console.get(path)
            assert page.status_code == 400 and "a NUL character is not allowed" in page.text, path
        listed = console.script("GET", "/api/dead-letters", params={"text": "\x00"})
        assert listed.status_code == 400 and listed.json()["error"].startswith("text: a NUL")
        for method, path in [
            ("GET", "/dead-letters/%00"),
            ("GET", f"/api/dead-letters/{letter.id}%00"),
            ("POST", "/api/dead-letters/%00/replay"),
        ]:
            assert console.script(method, path).status_code == 404, path
        csrf = console.csrf("/")
        form = {"csrf": csrf, "action": "discard", "scope": "selected", "id": ["\x00", letter.id]}
        done = console.get(console.post("/act", form).headers["Location"]).text
        assert "Discarded 1 dead letter. 1 had gone already." in done
        assert store.dead_letters() == []
    finally:
        store.close()


def test_an_error_holding_markup_is_shown_as_text(
    console: Console, planted: dict[str, DeadLetter]
) -> None:
    letter = planted["markup"]
    for path in (
        f"/dead-letters/{letter.id}",
        "/dead-letters?reason=permanent",
        "/dead-letters?text=onerror",
    ):
        page = console.get(path).text
        assert "&lt;img src=x onerror=" in page, path
        assert "<img" not in page and "<script>" not in page, path
    api = console.script("GET", f"/api/dead-letters/{letter.id}")
    assert api.headers["Content-Type"] == "application/json"
    assert api.json()["dead_letter"]["error"] == MARKUP


def test_replay_and_discard_one_each_say_what_was_done(
    console: Console, store: SQLiteStore, planted: dict[str, DeadLetter]
) -> None:
    crm, mail = planted["crm"], planted["mail0"]
    csrf = console.csrf("/")
    replayed = console.post(f"/dead-letters/{crm.id}/replay", {"csrf": csrf})
    assert replayed.status_code == 303
    notice = console.get(replayed.headers["Location"]).text
    assert "Replayed 1 dead letter." in notice
    discarded = console.post(f"/dead-letters/{mail.id}/discard", {"csrf": csrf})
    assert "Discarded 1 dead letter." in console.get(discarded.headers["Location"]).text
    assert {crm.id, mail.id}.isdisjoint(ids_in(store))
    assert store.counts().ready == 1  # the replayed task is back in the queue
    (task,) = store.claim(5)
    assert task.id == crm.task_id and task.attempts == 0
    again = console.post(f"/dead-letters/{crm.id}/replay", {"csrf": csrf})
    assert again.status_code == 404


def test_bulk_actions_name_the_count_before_they_act(
    console: Console, store: SQLiteStore, planted: dict[str, DeadLetter]
) -> None:
    confirm = console.get("/confirm?action=replay&key=mail").text
    assert "Replay 3 dead letters (matching key = mail)?" in confirm
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', confirm).group(1)  # type: ignore[union-attr]
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', confirm))
    assert fields["scope"] == "matching" and fields["key"] == "mail"
    done = console.post("/act", fields)
    assert "Replayed 3 dead letters." in console.get(done.headers["Location"]).text
    assert not any(letter.key == "mail" for letter in store.dead_letters())
    assert store.counts().ready == 3

    chosen = [planted["crm"].id, planted["markup"].id]
    confirm = console.get(f"/confirm?action=discard&id={chosen[0]}&id={chosen[1]}").text
    assert "Discard 2 dead letters (selected)?" in confirm
    form = {"csrf": csrf, "action": "discard", "scope": "selected", "id": chosen}
    assert "Discarded 2" in console.get(console.post("/act", form).headers["Location"]).text
    assert ids_in(store) == {planted["secret"].id}

    nothing = console.get("/confirm?action=discard&key=nobody").text
    assert (
        "No dead letter is matching key = nobody" in nothing
        and '<form method="post" action="/act"' not in nothing
    )
    purge = console.get("/purge").text
    assert "Remove every dead letter (1) for good?" in purge
    gone = console.post("/purge", {"csrf": csrf})
    assert "Purged 1 dead letter." in console.get(gone.headers["Location"]).text
    assert ids_in(store) == set()


# -- JSON, metrics, health -------------------------------------------------------------------


def test_the_json_api_with_a_bearer_token(
    console_of: Callable[..., Console],
    store_path: Path,
    store: SQLiteStore,
    planted: dict[str, DeadLetter],
) -> None:
    console = console_of(f"sqlite:///{store_path}")  # never logged in: no cookie
    listed = console.script("GET", "/api/dead-letters", params={"key": "mail", "limit": 2})
    assert listed.status_code == 200
    body = listed.json()
    assert body["total"] == 3 and len(body["items"]) == 2 and body["cursor"]
    assert body["items"][0] == planted["mail2"].to_json()
    rest = console.script(
        "GET", "/api/dead-letters", params={"key": "mail", "cursor": body["cursor"]}
    )
    assert [item["id"] for item in rest.json()["items"]] == [planted["mail0"].id]
    assert rest.json()["cursor"] is None
    for params, total in [
        ({"status": 500}, 3),
        ({"reason": "permanent"}, 2),
        ({"text": "mail-1"}, 1),
        ({"since": "1h"}, 4),
    ]:
        assert console.script("GET", "/api/dead-letters", params=params).json()["total"] == total
    bad = console.script("GET", "/api/dead-letters", params={"status": "x"})
    assert bad.status_code == 400 and "status" in bad.json()["error"]
    one = console.script("GET", f"/api/dead-letters/{planted['secret'].id}").json()
    assert one["dead_letter"]["id"] == planted["secret"].id
    assert one["call"]["method"] == "POST" and ["Authorization", "***"] in one["call"]["headers"]
    assert console.script("GET", "/api/dead-letters/nope").status_code == 404
    replay = console.script("POST", f"/api/dead-letters/{planted['crm'].id}/replay")
    assert replay.status_code == 200
    assert replay.json() == {"replayed": planted["crm"].id, "task_id": planted["crm"].task_id}
    assert store.counts().ready == 1
    stats = console.script("GET", "/api/stats").json()
    assert stats["dead_letters"] == 5 and stats["stored_ready"] == 1 and stats["keys"] is None
    health = console.script("GET", "/api/health", params={"max_dead_letters": 2}).json()
    assert health["ok"] is False and health["dead_letters"] == 5
    assert health["summary"] == "unhealthy: 5 dead letter(s) held (max 2)"


def test_the_api_answers_every_error_in_json(
    console_of: Callable[..., Console], console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    console.csrf("/")
    cookie = "; ".join(f"{name}={value}" for name, value in console.browser.cookies.items())
    for path, kind in [("/api/dead-letters/x/replay", "application/json"), ("/act", "text/html")]:
        # A form's length alone is too large (the CSRF check would read it): no body sent.
        lines = raw_headers(
            console,
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Cookie: {cookie}\r\nContent-Length: {MAX_FORM + 1}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode(),
        )
        assert lines[0].split()[1] == "413", (path, lines)
        assert any(line.startswith(f"Content-Type: {kind}") for line in lines), (path, lines)
    wrong = console.get("/api/stats?token=not-the-token")
    assert wrong.status_code == 401 and wrong.json()["error"].startswith("unauthorized")
    assert wrong.headers["WWW-Authenticate"].startswith("Bearer")
    monkeypatch.setenv("OFFLOAD_LEASE_TIMEOUT", "soon")  # the default offloader cannot be made
    broken = console_of(None)
    failed = broken.script("GET", "/api/stats")
    assert failed.status_code == 500 and failed.headers["Content-Type"] == "application/json"
    assert failed.json() == {"error": "Something went wrong; the log says what."}
    broken.log_in()
    page = broken.get("/")
    assert page.status_code == 500 and page.headers["Content-Type"].startswith("text/html")


def test_a_405_says_which_methods_the_path_allows(console: Console) -> None:
    for method, path, allowed in [
        ("DELETE", "/api/dead-letters/x", "GET, HEAD"),
        ("GET", "/api/dead-letters/x/replay", "POST"),
        ("PUT", "/purge", "GET, HEAD, POST"),
        ("OPTIONS", "/", "GET, HEAD"),
        ("TRACE", "/dead-letters", "GET, HEAD"),
        ("DELETE", "/login", "GET, HEAD, POST"),
    ]:
        answer = console.script(method, path)
        assert (answer.status_code, answer.headers.get("Allow")) == (405, allowed), (method, path)


def test_metrics_and_healthz(
    console_of: Callable[..., Console], store_path: Path, planted: dict[str, DeadLetter]
) -> None:
    console = console_of(f"sqlite:///{store_path}")
    metrics = console.script("GET", "/metrics")
    assert metrics.status_code == 200 and metrics.headers["Content-Type"].startswith("text/plain")
    assert "offload_dead_letters 6.0" in metrics.text
    assert 'offload_store_tasks{state="ready"} 0.0' in metrics.text
    assert console.get("/healthz").status_code == 200
    unhealthy = console.get("/healthz?max_dead_letters=5")
    assert (unhealthy.status_code, unhealthy.text) == (503, "unhealthy\n")
    detailed = console.script("GET", "/healthz", params={"max_dead_letters": 5})
    assert detailed.status_code == 503 and detailed.json()["dead_letters"] == 6
    assert console.get("/healthz?max_age=soon").status_code == 400


def test_no_secret_on_any_page_or_answer(
    console: Console, planted: dict[str, DeadLetter], server: ScriptedServer, store_path: Path
) -> None:
    # Calls that really failed, with secrets in their URLs and headers: the errors a
    # worker wrote for them are on the pages too.
    server.script("/fail", Answer(401, body=b"bad key SECRET_X_API_KEY"))
    worker = Offloader(store=f"sqlite:///{store_path}", idle_timeout=0.1)
    try:
        worker.enqueue_task(secret_call("/fail", port=server.port))
        worker.enqueue_task(secret_call("/refused", port=9))
        assert worker.flush(20)
    finally:
        worker.shutdown(5)
    pages = [console.get(path) for path in [*PAGES, "/dead-letters?text=fail", "/api/stats"]]
    links = set(re.findall(r'href="(/dead-letters/[0-9a-f]+)"', pages[1].text))
    assert len(links) == 8
    pages += [console.get(link) for link in links]
    for link in links:
        letter_id = link.rsplit("/", 1)[1]
        pages.append(console.script("GET", f"/api/dead-letters/{letter_id}"))
        pages.append(console.get(f"/confirm?action=replay&id={letter_id}"))
    pages += [console.script("GET", path) for path in [*SCRIPTS, "/healthz"]]
    pages.append(console.get("/login"))
    for response in pages:
        text = response.text + str(response.headers)
        for secret in SECRETS:
            assert secret not in text, (response.url, secret)
    assert any("127.0.0.1:9/refused?api_key=***" in r.text for r in pages)


def test_over_an_offloader_the_overview_shows_its_stats_and_keys(
    console_of: Callable[..., Console], server: ScriptedServer, make_offloader: Any
) -> None:
    server.script("/busy", Answer(429, headers={"Retry-After": "300"}))
    server.script("/gone", Answer(410), Answer(200))
    key = f"http://127.0.0.1:{server.port}"
    off = make_offloader(limits={"https://api.stripe.example": "25/s"})
    off.enqueue_task(offload.http("POST", server.url("/gone")))
    for _ in range(2):
        off.enqueue_task(offload.Task(offload.http("GET", server.url("/busy")), key="busy-api"))
    # One worker: the sentinel (another key) goes once the throttle has closed the gate.
    off.enqueue_task(offload.Task(offload.http("GET", server.url("/sentinel")), key="other"))
    assert server.wait_for(1, path="/sentinel")
    console = console_of(off)
    console.log_in()
    page = console.get("/").text
    assert "closed," in page and "busy-api" in page
    assert "enqueued" in page and "worker running" in page
    [letter] = off.dead_letters()
    assert letter.status == 410
    replayed = console.post(f"/dead-letters/{letter.id}/replay", {"csrf": console.csrf("/")})
    assert replayed.status_code == 303
    assert server.wait_for(2, path="/gone"), "replayed into this offloader, and delivered"
    assert off.dead_letters() == []
    stats = console.script("GET", "/api/stats").json()
    assert stats["enqueued"] == 5 and {k["key"] for k in stats["keys"]} >= {"busy-api"}
    assert key not in {k["key"] for k in stats["keys"] if k["reopens_in"]}


def test_mounted_under_a_prefix_every_link_and_cookie_stays_under_it(
    store_path: Path, planted: dict[str, DeadLetter]
) -> None:
    app = make_app(f"sqlite:///{store_path}", token=TOKEN)

    def call(path: str, query: str = "", cookie: str = "") -> tuple[str, dict[str, str], str]:
        seen: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            seen["status"], seen["headers"] = status, headers

        environ = {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "/ops/offload",
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "HTTP_COOKIE": cookie,
            "wsgi.url_scheme": "https",
        }
        body = b"".join(app(environ, start_response)).decode()
        headers = {}
        for name, value in seen["headers"]:
            headers[name] = headers[name] + "\n" + value if name in headers else value
        return seen["status"], headers, body

    status, headers, _ = call("/dead-letters", f"token={TOKEN}")
    assert status.startswith("303") and headers["Location"] == "/ops/offload/dead-letters"
    session = next(
        c for c in headers["Set-Cookie"].split("\n") if c.startswith("offload_console_session")
    )
    assert "Path=/ops/offload" in session and "Secure" in session
    status, _, body = call("/dead-letters", cookie=session.split(";")[0])
    assert status.startswith("200")
    hrefs = re.findall(r'(?:href|action)="([^"]+)"', body)
    assert hrefs and all(h.startswith("/ops/offload/") for h in hrefs), hrefs
    assert urljoin("https://x/ops/offload/dead-letters", hrefs[0]).startswith("https://x/ops/")


# -- the commands -----------------------------------------------------------------------------


def offload_command(*args: str) -> subprocess.CompletedProcess[str]:
    env = python_env()
    env.pop("OFFLOAD_STORE", None)
    return subprocess.run(
        [sys.executable, "-m", "offload", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_offload_health_exits_0_or_1_with_one_line(
    store_path: Path, planted: dict[str, DeadLetter], tmp_path: Path
) -> None:
    url = f"sqlite:///{store_path}"
    healthy = offload_command("health", "--store", url, "--max-dead-letters", "10")
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout == "healthy: no task waiting, 6 dead letter(s)\n"
    sick = offload_command("health", "--store", url, "--max-dead-letters", "5", "--max-age", "60")
    assert sick.returncode == 1
    assert sick.stdout == "unhealthy: 6 dead letter(s) held (max 5)\n"
    web = Offloader(store=url, consume=False)
    try:
        web.enqueue_task(offload.http("POST", "http://127.0.0.1:9/later"))
    finally:
        web.shutdown(0)
    waiting = offload_command("health", "--store", url, "--max-age", "0")
    assert waiting.returncode == 1 and waiting.stdout.startswith(
        "unhealthy: the oldest due task has waited"
    )
    missing = offload_command("health", "--store", f"sqlite:///{tmp_path / 'nope.db'}")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "Traceback" not in missing.stderr
