"""The console in a real browser: headless Chromium driven by Selenium, against
`offload console` run as a real subprocess, as a person would use it.

Log in through the URL the command prints, filter, open a dead letter, replay it and see
the call delivered at the local server; a form on another site that POSTs to the console
is refused; a dead letter whose error holds `<img src=x onerror=...>` never runs it.

Chromium and chromedriver are Debian's packages (`.ci/run` installs them when missing);
under CI=true their absence fails the test, elsewhere it skips. Screenshots of each page
go to tmp_path, or to the directory OFFLOAD_SCREENSHOTS names: the README's come from
`OFFLOAD_SCREENSHOTS=docs/console pytest tests/system/test_console_browser.py`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import offload
from offload import DeadLetter, Offloader, Task
from offload.records import new_id
from offload.stores.base import LetterQuery
from offload.stores.sqlite import SQLiteStore
from procs import python_env, reap
from server import Answer, ScriptedServer

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
XSS = "<img src=x onerror=\"document.title='pwned'\"> upstream said <b>no</b>"
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def shows(browser: Any, text: str, timeout: float = 10) -> str:
    """The page, once it holds `text` (a click or a submit navigates asynchronously)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda d: text in d.page_source)
    return str(browser.page_source)


def titled(browser: Any, text: str, timeout: float = 10) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda d: text in d.title)


def fails_with_markup() -> None:
    """A task whose error a third party wrote: markup."""
    raise offload.GiveUp(XSS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{', '.join(missing)} missing: .ci/run installs chromium-driver")
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"offload-chromium-{os.getpid()}"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1280,860",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    where = os.environ.get("OFFLOAD_SCREENSHOTS")
    directory = Path(where) if where else tmp_path / "screenshots"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def bury(
    store: SQLiteStore,
    call: Any,
    *,
    minutes: int,
    status: int | None,
    reason: str,
    error: str,
    key: str | None = None,
) -> DeadLetter:
    task = Task(call, key=key)
    store.put(task, lease=True)
    when = NOW - timedelta(minutes=minutes)
    letter = DeadLetter(
        id=new_id(),
        task_id=task.id,
        description=call.describe(),
        key=task.key,
        attempts=1 if reason == "permanent" else 5,
        error=error,
        status=status,
        reason=reason,  # type: ignore[arg-type]
        first_attempt_at=when - timedelta(minutes=4),
        last_attempt_at=when,
    )
    store.bury(task, letter)
    return letter


def plant(store: SQLiteStore) -> None:
    """Dead letters as an application's would look: several APIs, statuses and reasons,
    buried in the order they failed (a store lists the newest buried first)."""
    bearer = {"Authorization": "Bearer sk_live_never_shown"}
    planned: list[tuple[int, Any, dict[str, Any]]] = []
    for i in range(14):
        call = offload.http(
            "POST",
            "https://api.payments.example/v1/charges",
            headers=bearer,
            json={"amount": 1000 + i},
            idempotency_key=f"order-{4100 + i}",
        )
        declined = bool(i % 3)
        planned.append(
            (
                300 - 17 * i,
                call,
                {
                    "status": 402 if declined else 503,
                    "reason": "permanent" if declined else "exhausted",
                    "error": "HTTP 402 Payment Required: card_declined"
                    if declined
                    else "HTTP 503 Service Unavailable",
                },
            )
        )
    for i in range(9):
        call = offload.http(
            "POST",
            f"https://crm.example/api/contacts?api_key=k{i}",
            json={"email": f"user{i}@example.com"},
        )
        planned.append(
            (
                250 - 23 * i,
                call,
                {
                    "status": 429,
                    "reason": "exhausted",
                    "error": "HTTP 429 Too Many Requests (throttled for 900s)",
                },
            )
        )
    for i in range(4):
        call = offload.aws(
            "sqs",
            "send_message",
            region="eu-west-1",
            QueueUrl="https://sqs.example/q",
            MessageBody="x",
        )
        planned.append(
            (
                200 - 31 * i,
                call,
                {
                    "status": None,
                    "reason": "shutdown",
                    "error": "undelivered at shutdown",
                },
            )
        )
    for minutes, call, fields in sorted(planned, key=lambda p: -p[0]):
        bury(store, call, minutes=minutes, **fields)


@pytest.fixture
def scene(tmp_path: Path, server: ScriptedServer) -> Iterator[dict[str, Any]]:
    """A store with dead letters, one of them a call to the local server that will succeed
    when replayed, and a worker of this process waiting for work on the same file."""
    pytest.importorskip("boto3")
    path = tmp_path / "offload.db"
    url = f"sqlite:///{path}"
    store = SQLiteStore(path)
    plant(store)
    server.script("/webhooks/order-shipped", Answer(400), Answer(200))
    worker = Offloader(store=url, idle_timeout=120, workers=1)
    try:
        worker.enqueue_task(
            offload.http(
                "POST",
                server.url("/webhooks/order-shipped"),
                json={"order": 4242},
                idempotency_key=True,
            )
        )
        worker.enqueue_task(fails_with_markup)
        assert worker.flush(20)
        yield {"url": url, "store": store, "worker": worker}
    finally:
        worker.shutdown(5)
        store.close()


@pytest.fixture
def console(scene: dict[str, Any]) -> Iterator[str]:
    """`offload console --store URL --port 0` as a user runs it; the URL it printed."""
    env = python_env({"OFFLOAD_SHUTDOWN_TIMEOUT": "1"})
    env.pop("OFFLOAD_CONSOLE_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "offload", "console", "--store", scene["url"], "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("offload console for sqlite:///"), lines
        printed = lines[1].split("open ", 1)[1].strip()
        assert printed.startswith("http://127.0.0.1:") and "?token=" in printed
        yield printed
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        finally:
            reap(proc)
        err = proc.stderr.read() if proc.stderr and not proc.stderr.closed else ""
        assert "token=" not in err.replace("token=***", "")


def test_a_person_logs_in_filters_opens_and_replays_a_dead_letter(
    browser: Any, console: str, scene: dict[str, Any], server: ScriptedServer, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    base = console.split("?", 1)[0]
    browser.delete_all_cookies()
    browser.get(base)
    assert "Log in" in browser.title
    browser.save_screenshot(str(shots / "login.png"))

    browser.get(console)  # the printed URL: logged in, and the token gone from the address
    assert browser.current_url == base
    assert "Overview" in browser.title
    browser.save_screenshot(str(shots / "overview.png"))

    browser.find_element(By.LINK_TEXT, "Dead letters").click()
    shows(browser, "<strong>29</strong> dead letters in all")
    browser.save_screenshot(str(shots / "dead-letters.png"))
    box = browser.find_element(By.NAME, "text")
    box.send_keys("order-shipped")
    box.submit()
    shows(browser, "<strong>1</strong> dead letter matches")
    assert "order-shipped" in browser.current_url
    browser.find_element(By.PARTIAL_LINK_TEXT, "/webhooks/order-shipped").click()
    page = shows(browser, "The call")
    assert "HTTP 400 Bad Request" in page and "Idempotency-Key" in page
    assert len(server.requests_to("/webhooks/order-shipped")) == 1

    browser.find_element(By.XPATH, "//button[text()='Replay']").click()
    shows(browser, "Replayed 1 dead letter.")
    # The replayed task went back to the file; this process's idle worker takes it.
    assert server.wait_for(2, path="/webhooks/order-shipped", timeout=20)
    delivered = server.requests_to("/webhooks/order-shipped")
    assert delivered[0].headers["Idempotency-Key"] == delivered[1].headers["Idempotency-Key"]
    assert scene["worker"].flush(10)
    assert all("order-shipped" not in d.description for d in scene["store"].dead_letters())

    [charge] = scene["store"].dead_letter_page(LetterQuery(status=503), limit=1).letters
    browser.get(f"{base}dead-letters/{charge.id}")
    page = shows(browser, "The call")
    assert "sk_live_never_shown" not in page and "order-41" in page
    browser.save_screenshot(str(shots / "dead-letter.png"))

    browser.get(base + "confirm?action=replay&reason=shutdown")
    assert "Replay 4 dead letters (matching reason = shutdown)?" in browser.page_source
    browser.save_screenshot(str(shots / "confirm.png"))


def test_markup_in_an_error_never_runs_and_a_foreign_form_is_refused(
    browser: Any, console: str, scene: dict[str, Any], server: ScriptedServer, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    base = console.split("?", 1)[0]
    browser.get(console)
    [letter] = [d for d in scene["store"].dead_letters() if "fails_with_markup" in d.description]
    assert letter.error == XSS
    for path in (f"dead-letters/{letter.id}", "dead-letters?text=onerror"):
        browser.get(base + path)
        assert browser.title != "pwned"
        assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
        assert browser.find_elements(By.CSS_SELECTOR, "main b") == []
        assert "<img src=x onerror=" in browser.find_element(By.TAG_NAME, "main").text
    browser.save_screenshot(str(shots / "markup-as-text.png"))

    # Another site's page (localhost is another site than 127.0.0.1; another port of
    # 127.0.0.1 is the same site, another origin): its form POSTs to the console.
    target = f"{base}dead-letters/{letter.id}/discard"
    evil = (
        f'<html><body><form method="post" action="{target}">'
        '<input type="hidden" name="csrf" value="guessed"><button id="go">win a prize</button>'
        "</form></body></html>"
    ).encode()
    server.script("/evil", Answer(200, body=evil, headers={"Content-Type": "text/html"}))
    # From another site the session cookie (SameSite=Strict) is not even sent: the login
    # page. From the same site (another port), the cookie goes but Sec-Fetch-Site says
    # where the form was, and the CSRF token is not the console's: refused.
    for origin, answer in (
        (f"http://localhost:{server.port}", "Log in"),
        (f"http://127.0.0.1:{server.port}", "Refused"),
    ):
        browser.get(f"{origin}/evil")
        browser.find_element(By.ID, "go").click()
        titled(browser, answer)
        assert letter.id in {d.id for d in scene["store"].dead_letters()}, origin
    assert "Nothing was changed" in browser.page_source
