"""The `offload` command, end to end: every command run as a real subprocess.

Dead letters are made with the SQLite store's own API (as a worker makes them); the
calls go to the ScriptedServer on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import offload
from offload import DeadLetter, Task
from offload.records import new_id
from offload.settle import dead_letter_for
from offload.stores.sqlite import SQLiteStore
from procs import IMPORTABLE
from server import Answer, ScriptedServer

SECRET = "sk_live_do_not_print"
ENV_DROP = ("OFFLOAD_STORE", "OFFLOAD_WORKERS", "OFFLOAD_SHUTDOWN_TIMEOUT", "OFFLOAD_MAX_ATTEMPTS")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    return {**base, "PYTHONPATH": os.pathsep.join(IMPORTABLE), **extra}


def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`offload ARGS...` as a user runs it (python -m offload, this checkout)."""
    return subprocess.run(
        [sys.executable, "-m", "offload", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(**extra),
        check=False,
    )


def failed_with_one_line(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'q.db'}"


def bury(
    url: str,
    call: Any,
    *,
    key: str | None = None,
    status: int | None = 500,
    reason: str = "exhausted",
    when: datetime | None = None,
    error: str | None = None,
) -> DeadLetter:
    """A dead letter in the store, as a worker leaves one."""
    store = SQLiteStore(url.removeprefix("sqlite:///"))
    try:
        task = Task(call, key=key)
        store.put(task, lease=True)
        when = when or datetime.now(timezone.utc)
        letter = DeadLetter(
            id=new_id(),
            task_id=task.id,
            description=offload.calls.describe_target(call),
            key=task.key,
            attempts=5,
            error=f"HTTP {status}" if error is None else error,
            status=status,
            reason=reason,
            first_attempt_at=when - timedelta(seconds=30),
            last_attempt_at=when,
        )
        store.bury(task, letter)
        return letter
    finally:
        store.close()


@pytest.fixture
def letters(store_url: str, server: ScriptedServer) -> list[DeadLetter]:
    """Three dead letters: two for the CRM (500, one old), one for billing (422, with a
    secret in its URL)."""
    old = datetime.now(timezone.utc) - timedelta(days=3)
    return [
        bury(store_url, offload.http("POST", server.url("/crm")), key="crm", when=old),
        bury(store_url, offload.http("POST", server.url("/crm")), key="crm"),
        bury(
            store_url,
            offload.http("POST", server.url(f"/bill?api_key={SECRET}")),
            key="billing",
            status=422,
            reason="permanent",
        ),
    ]


def counts(url: str) -> tuple[int, int, int, int]:
    store = SQLiteStore(url.removeprefix("sqlite:///"))
    try:
        c = store.counts()
        return c.ready, c.delayed, c.leased, c.dead_letters
    finally:
        store.close()


# -- dead-letters -----------------------------------------------------------------------


def test_list_prints_a_table_and_json(store_url: str, letters: list[DeadLetter]) -> None:
    table = cli("dead-letters", "list", "--store", store_url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "REASON", "STATUS", "ATTEMPTS"]
    assert [line.split()[0] for line in lines[1:]] == [x.id for x in letters]
    as_json = cli("dead-letters", "list", "--store", store_url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == [x.to_json() for x in letters]
    for result in (table, as_json):
        assert SECRET not in result.stdout + result.stderr


def test_list_filters(store_url: str, letters: list[DeadLetter]) -> None:
    def ids(*args: str) -> list[str]:
        result = cli("dead-letters", "list", "--store", store_url, "--json", *args)
        assert result.returncode == 0, result.stderr
        return [x["id"] for x in json.loads(result.stdout)]

    assert ids("--key", "crm") == [letters[0].id, letters[1].id]
    assert ids("--status", "422") == [letters[2].id]
    assert ids("--since", "1d") == [letters[1].id, letters[2].id]
    assert ids("--key", "crm", "--since", "1h") == [letters[1].id]
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%MZ")
    assert ids("--since", future) == []
    unknown = cli("dead-letters", "list", "--store", store_url, "--key", "nobody")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert "no dead letter has the key 'nobody'; their keys: billing, crm" in unknown.stderr
    assert cli("dead-letters", "list", "--store", store_url, "--key", "crm").returncode == 0


def test_show_one(store_url: str, letters: list[DeadLetter]) -> None:
    letter = letters[2]
    text = cli("dead-letters", "show", letter.id, "--store", store_url)
    assert text.returncode == 0, text.stderr
    fields = dict(line.split(None, 1) for line in text.stdout.splitlines())
    assert fields["id"] == letter.id and fields["status"] == "422"
    assert fields["reason"] == "permanent" and fields["attempts"] == "5"
    as_json = cli("dead-letters", "show", letter.id, "--store", store_url, "--json")
    assert json.loads(as_json.stdout) == letter.to_json()
    assert SECRET not in text.stdout + as_json.stdout
    failed_with_one_line(
        cli("dead-letters", "show", "nope", "--store", store_url), "no dead letter with id 'nope'"
    )


def test_a_third_partys_terminal_escapes_are_printed_as_text(
    store_url: str, server: ScriptedServer
) -> None:
    # What an old store may hold: a reason phrase that retitles the window, clears the
    # screen, draws in red and makes a hyperlink, and a key holding escapes too.
    error = (
        "HTTP 500 Oops \x1b]0;owned-title\x07\x1b[2J\x1b[31mFAKE: all calls delivered\x1b[0m "
        "\x1b]8;;https://evil.example\x07click\x1b]8;;\x07 \u202egnp.exe"
    )
    letter = bury(store_url, offload.http("POST", server.url("/x")), key="k\x1b[5m", error=error)
    listed = cli("dead-letters", "list", "--store", store_url)
    shown = cli("dead-letters", "show", letter.id, "--store", store_url)
    dry = cli("dead-letters", "replay", "--all", "--dry-run", "--store", store_url)
    unknown = cli("dead-letters", "list", "--key", "nobody", "--store", store_url)
    for result in (listed, shown, dry, unknown):
        for control in ("\x1b", "\x07", "\u202e"):
            assert control not in result.stdout + result.stderr, (result.args, control)
    assert "HTTP 500 Oops \\x1b]0;owned-title\\x07\\x1b[2J" in listed.stdout
    assert "k\\x1b[5m" in listed.stdout
    assert f"error{' ' * 13}{error.encode('unicode_escape').decode()}\n" in shown.stdout
    assert "their keys: k\\x1b[5m" in unknown.stderr
    as_json = cli("dead-letters", "show", letter.id, "--json", "--store", store_url)
    assert json.loads(as_json.stdout)["error"] == error  # JSON escapes them itself


def test_replay_by_id_and_unknown_ids(store_url: str, letters: list[DeadLetter]) -> None:
    result = cli("dead-letters", "replay", letters[0].id, "nope", "--store", store_url)
    assert result.returncode == 1
    assert result.stdout == f"replayed {letters[0].id} (task {letters[0].task_id})\n"
    assert result.stderr == "offload: no dead letter with id 'nope'\n"
    assert counts(store_url) == (1, 0, 0, 2)


def test_replay_does_not_import_the_function_a_dead_letter_names(
    store_url: str, tmp_path: Path
) -> None:
    # The dead letter may be one a worker refused: the command moves its row back and
    # names its ids, and the operator's process never imports (runs) the module.
    import untrusted_tasks

    letter = bury(store_url, untrusted_tasks.job, status=None, reason="permanent")
    marker = tmp_path / "imported.txt"
    result = cli(
        "dead-letters", "replay", letter.id, "--store", store_url, OFFLOAD_TEST_MARKER=str(marker)
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"replayed {letter.id} (task {letter.task_id})\n"
    assert not marker.exists(), "the command imported the dead letter's module"
    assert counts(store_url) == (1, 0, 0, 0)


def test_the_console_on_a_store_url_replays_without_importing_the_function(
    store_url: str, tmp_path: Path
) -> None:
    # make_app("sqlite:///...") in a process of its own (a console deployed apart from the
    # workers): its replay, as the CLI's, never imports the module a dead letter names.
    import untrusted_tasks

    letter = bury(store_url, untrusted_tasks.job, status=None, reason="permanent")
    marker = tmp_path / "imported.txt"
    code = (
        "import sys, offload.console\n"
        "app = offload.console.make_app(sys.argv[1], token='t' * 16)\n"
        "print(app.source.replay(sys.argv[2]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, store_url, letter.id],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(OFFLOAD_TEST_MARKER=str(marker)),
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, f"{letter.task_id}\n"), result.stderr
    assert not marker.exists(), "the console imported the dead letter's module"
    assert counts(store_url) == (1, 0, 0, 0)


def test_replay_all_with_a_dry_run_first(store_url: str, letters: list[DeadLetter]) -> None:
    dry = cli("dead-letters", "replay", "--all", "--key", "crm", "--dry-run", "--store", store_url)
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[2].rstrip(":") for line in dry.stdout.splitlines()] == [
        letters[0].id,
        letters[1].id,
    ]
    assert counts(store_url) == (0, 0, 0, 3), "a dry run changed the store"
    done = cli("dead-letters", "replay", "--all", "--store", store_url)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3
    assert counts(store_url) == (3, 0, 0, 0)
    again = cli("dead-letters", "replay", "--all", "--store", store_url)
    assert again.stdout == "no dead letters to replay\n"


def test_replay_needs_ids_or_all(store_url: str, letters: list[DeadLetter]) -> None:
    failed_with_one_line(cli("dead-letters", "replay", "--store", store_url), "--all")
    failed_with_one_line(
        cli("dead-letters", "replay", letters[0].id, "--all", "--store", store_url), "not both"
    )


def test_discard_and_purge(store_url: str, letters: list[DeadLetter]) -> None:
    result = cli("dead-letters", "discard", letters[1].id, "--store", store_url)
    assert (result.returncode, result.stdout) == (0, f"discarded {letters[1].id}\n")
    missing = cli("dead-letters", "discard", letters[1].id, "--store", store_url)
    assert missing.returncode == 1 and "no dead letter" in missing.stderr
    purged = cli("dead-letters", "purge", "--store", store_url)
    assert (purged.returncode, purged.stdout) == (0, "purged 2 dead letter(s)\n")
    assert counts(store_url) == (0, 0, 0, 0)


def test_an_unreadable_letter_is_listed_among_the_others_and_can_be_discarded(
    store_url: str, letters: list[DeadLetter]
) -> None:
    # A row edited by hand: before, every `list` (and the console's pages) failed on it.
    with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
        conn.execute("UPDATE dead_letters SET attempts = 'lots' WHERE id = ?", (letters[1].id,))
    conn.close()
    listed = cli("dead-letters", "list", "--store", store_url, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [row["id"] for row in rows] == [x.id for x in letters]
    assert rows[1]["description"] == "(unreadable row)" and "attempts" in rows[1]["error"]
    assert rows[0] == letters[0].to_json() and rows[2] == letters[2].to_json()
    shown = cli("dead-letters", "show", letters[1].id, "--store", store_url)
    assert shown.returncode == 0 and "unreadable" in shown.stdout, shown.stderr
    discarded = cli("dead-letters", "discard", letters[1].id, "--store", store_url)
    assert discarded.returncode == 0, discarded.stderr
    left = cli("dead-letters", "list", "--store", store_url, "--json")
    assert [row["id"] for row in json.loads(left.stdout)] == [letters[0].id, letters[2].id]


def test_the_store_comes_from_offload_store(store_url: str, letters: list[DeadLetter]) -> None:
    result = cli("dead-letters", "list", "--json", OFFLOAD_STORE=store_url)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 3


# -- stats ------------------------------------------------------------------------------


def test_stats(store_url: str, letters: list[DeadLetter], server: ScriptedServer) -> None:
    store = SQLiteStore(store_url.removeprefix("sqlite:///"))
    try:
        store.put(Task(offload.http("POST", server.url("/x"))), lease=False)
    finally:
        store.close()
    text = cli("stats", "--store", store_url)
    assert text.returncode == 0, text.stderr
    rows = dict(line.rsplit(None, 1) for line in text.stdout.splitlines())
    assert (rows["ready"], rows["delayed"], rows["leased"], rows["dead letters"]) == (
        "1",
        "0",
        "0",
        "3",
    )
    as_json = json.loads(cli("stats", "--store", store_url, "--json").stdout)
    assert as_json == {
        "store": store_url,
        "ready": 1,
        "delayed": 0,
        "leased": 0,
        "dead_letters": 3,
    }


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("stats",), "no store: pass --store URL or set OFFLOAD_STORE"),
        (("stats", "--store", "memory"), "memory store lives inside one process"),
        (("dead-letters", "list", "--store", "sqlite:///no/such/file.db"), "no store at"),
        (("stats", "--store", "sqlite://host/x.db"), "has a host part"),
        (("stats", "--store", "redis://localhost"), "unknown or unsupported store URL"),
        (("stats", "--store", "sqlite:///x.db?journal=off"), "unknown option"),
        (("worker", "--store", "memory"), "memory store"),
    ],
)
def test_errors_are_one_line_and_a_non_zero_exit(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "offload", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        cwd=tmp_path,
        check=False,
    )
    failed_with_one_line(result, message)
    assert os.listdir(tmp_path) == [], "an error made a store file"


def test_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("shopping list\n" * 100)
    result = cli("dead-letters", "list", "--store", f"sqlite:///{tmp_path / 'notes.db'}")
    failed_with_one_line(result, "not a usable offload store")


def test_a_bad_lease_timeout_names_the_variable(store_url: str, letters: Any) -> None:
    result = cli("stats", "--store", store_url, OFFLOAD_LEASE_TIMEOUT="soon")
    failed_with_one_line(result, "OFFLOAD_LEASE_TIMEOUT")


def test_usage_errors_exit_2() -> None:
    result = cli("dead-letters", "frobnicate")
    assert result.returncode == 2 and "usage:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_since_further_back_than_any_date_is_a_usage_error(
    store_url: str, letters: list[DeadLetter]
) -> None:
    for args in (("list", "--since", "1000000d"), ("replay", "--all", "--since", "99999999999d")):
        result = cli("dead-letters", *args, "--store", store_url)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert "argument --since: '" in result.stderr and "an age too large" in result.stderr
        assert "Traceback" not in result.stderr
    assert counts(store_url)[3] == 3, "nothing replayed"


def test_a_port_out_of_range_is_a_usage_error() -> None:
    for port in ("99999", "-1", "http"):
        result = cli("console", "--port", port, "--store", "sqlite:///nowhere.db")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"argument --port: '{port}' is not a port (0 to 65535)" in result.stderr


def test_version_and_console_script() -> None:
    result = cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"offload {offload.__version__}")
    script = shutil.which("offload", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the console script is not installed in this environment")
    installed = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=60, env=env(), check=False
    )
    assert installed.returncode == 0 and "dead-letters" in installed.stdout


# -- worker -----------------------------------------------------------------------------


@pytest.fixture
def spawn() -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, **extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "offload", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(**extra),
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def started(proc: subprocess.Popen[str]) -> str:
    """Wait for the worker's first log line (it is then consuming); return it."""
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "offload worker: performing calls from" in line, line + proc.stderr.read()
    return line


def enqueue(url: str, code: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import offload\n"
            f"off = offload.Offloader(store={url!r}, consume=False)\n" + textwrap.dedent(code),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_performs_calls_until_a_signal_then_exits_0(
    store_url: str, server: ScriptedServer, spawn: Any, sig: signal.Signals
) -> None:
    worker = spawn("worker", "--store", store_url, "--workers", "3", "--create")
    started(worker)
    enqueue(
        store_url,
        f"""
        for i in range(20):
            off.enqueue_task(offload.http("POST", {server.url("/w")!r}, json={{"i": i}}))
        """,
    )
    assert server.wait_for(20, "/w", timeout=30)
    assert {json.loads(r.body)["i"] for r in server.requests_to("/w")} == set(range(20))
    worker.send_signal(sig)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert f"{sig.name} received" in err and "stopped: 20 delivered" in err
    assert "Traceback" not in err
    assert counts(store_url) == (0, 0, 0, 0)


def test_worker_replays_and_reads_offload_variables(
    store_url: str, server: ScriptedServer, spawn: Any, letters: list[DeadLetter]
) -> None:
    server.script("/crm", Answer(200))
    worker = spawn("worker", OFFLOAD_STORE=store_url, OFFLOAD_WORKERS="2")
    assert "with 2 thread(s)" in started(worker)
    assert (
        cli("dead-letters", "replay", "--all", "--key", "crm", "--store", store_url).returncode == 0
    )
    assert server.wait_for(2, "/crm", timeout=30)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "stopped: 2 delivered" in err
    assert counts(store_url) == (0, 0, 0, 1)


def test_worker_stopped_during_a_hung_call_keeps_the_task(
    store_url: str, server: ScriptedServer, spawn: Any, tmp_path: Path
) -> None:
    import threading

    hang = threading.Event()
    server.script("/hang", Answer.hang(hang))
    worker = spawn("worker", "--store", store_url, "--create", OFFLOAD_SHUTDOWN_TIMEOUT="0.5")
    started(worker)
    enqueue(
        store_url,
        f"""
        off.enqueue_task(offload.http("POST", {server.url("/hang")!r}, timeout=60))
        for i in range(3):
            off.enqueue_task(offload.http("POST", {server.url("/later")!r}, json={{"i": i}}))
        """,
    )
    assert server.wait_for(1, "/hang", timeout=30)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "still running" in err
    # Nothing is lost: the hung call's task is leased to a process that is gone (the next
    # claim takes it back at once), the others are in the store.
    ready, _, leased, dead = counts(store_url)
    assert ready + leased == 4 - len(server.requests_to("/later")) and dead == 0


def test_demo_runs_through_the_command(tmp_path: Path) -> None:
    result = cli("demo", "--store", f"sqlite:///{tmp_path / 'demo.db'}")
    assert result.returncode == 0, result.stderr
    assert "delivered" in result.stdout
    assert (tmp_path / "demo.db").exists()


# -- issue 17: what a new user ran into ---------------------------------------------------


def test_the_worker_refuses_a_missing_sqlite_file_unless_told_to_create_it(
    tmp_path: Path, spawn: Any
) -> None:
    typo = f"sqlite:///{tmp_path / 'typo.db'}"
    result = cli("worker", "--store", typo)
    failed_with_one_line(result, "does not exist")
    assert not (tmp_path / "typo.db").exists()
    worker = spawn("worker", "--store", typo, "--create")
    started(worker)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0 and (tmp_path / "typo.db").exists()


def test_a_closed_pipe_ends_the_output_quietly(store_url: str, letters: list[DeadLetter]) -> None:
    command = f"{sys.executable} -m offload dead-letters list --json --store {store_url} | head -1"
    result = subprocess.run(
        command, shell=True, capture_output=True, text=True, timeout=60, env=env(), check=False
    )
    assert result.stdout.strip() == "["
    assert result.stderr == "", result.stderr


def test_replay_needs_ids_or_all_as_a_usage_error(
    store_url: str, letters: list[DeadLetter]
) -> None:
    result = cli("dead-letters", "replay", "--store", store_url)
    assert result.returncode == 2 and "give dead letter IDs or --all" in result.stderr
    assert "Traceback" not in result.stderr


def test_key_takes_the_host_as_a_user_types_it(store_url: str) -> None:
    store = SQLiteStore(store_url.removeprefix("sqlite:///"))
    try:
        task = Task(offload.http("POST", "http://127.0.0.1:34907/v1/contacts"))
        store.put(task, lease=True)
        store.bury(task, dead_letter_for(task, "HTTP 503", None, "exhausted"))
    finally:
        store.close()
    for typed in ("127.0.0.1:34907", "http://127.0.0.1:34907/v1"):
        result = cli("dead-letters", "list", "--store", store_url, "--json", "--key", typed)
        assert result.returncode == 0, result.stderr
        assert [x["key"] for x in json.loads(result.stdout)] == ["http://127.0.0.1:34907"]
    table = cli("dead-letters", "list", "--store", store_url)
    assert "KEY" in table.stdout and "http://127.0.0.1:34907" in table.stdout
