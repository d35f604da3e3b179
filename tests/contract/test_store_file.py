"""The SQLite store file as an attacker or a careless admin sees it: private, JSON only,
and a tampered row refused without stopping the worker.

tests/contract/test_sqlite.py checks the file mode under the test's umask, pickle markers and four
tampered columns; here: the mode under a permissive umask (a real subprocess), the type of
every value in every column after a workload that writes every kind of row, and a wider
set of tampered rows met by a worker that is already running.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import tenacity

import offload
from offload import Offloader, RetryPolicy, Task
from offload.codec.trust import resolve_task_function
from procs import SRC, run_python
from server import Answer, ScriptedServer

delivered: list[Any] = []
delivered_lock = threading.Lock()


def deliver(value: Any) -> None:
    """What the good tasks call (importable, so that the store can hold it)."""
    with delivered_lock:
        delivered.append(value)


@pytest.fixture(autouse=True)
def _clear_delivered() -> None:
    with delivered_lock:
        delivered.clear()


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def modes(directory: Path) -> dict[str, int]:
    """The mode of every file and directory under `directory`, by relative path."""
    return {
        str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode)
        for p in sorted(directory.rglob("*"))
    }


def private(found: dict[str, int], directory: Path) -> bool:
    """True when every file is 0600 and every directory 0700."""
    return all(
        mode == (0o700 if (directory / name).is_dir() else 0o600) for name, mode in found.items()
    )


def test_private_under_a_permissive_umask(tmp_path: Path) -> None:
    # umask 000 would make every file SQLite creates world-writable.
    script = f"""
import os, offload
os.umask(0)
off = offload.Offloader(store={url_of(tmp_path / "q.db")!r}, consume=False)
call = offload.http("POST", "http://127.0.0.1:9/x", headers={{"Authorization": "Bearer t"}})
off.enqueue_task(call)
print(sorted(os.listdir({str(tmp_path)!r})))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found = modes(tmp_path)
    assert "q.db" in found
    assert "q.db-journals" in found  # the enqueue went to the journal
    assert private(found, tmp_path), found


def test_an_existing_world_readable_file_is_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One made by `touch` (0644 under the usual umask) would otherwise hold Authorization
    # headers readable by every local user.
    path = tmp_path / "q.db"
    path.touch()
    path.chmod(0o644)
    off = Offloader(store=url_of(path), consume=False)
    try:
        off.enqueue_task(offload.http("POST", "http://127.0.0.1:9/x"))
    finally:
        off.shutdown(1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "made it private" in caplog.text
    assert private(modes(tmp_path), tmp_path)


def later() -> None:
    """Asks to be tried again in five minutes: its row stays in the store, delayed."""
    raise offload.Retry(after=300)


def test_json_only_every_value_of_every_column(tmp_path: Path, server: ScriptedServer) -> None:
    # A workload that writes every kind of row: HTTP and function calls, a per-task
    # policy, a delayed retry, and dead letters.
    server.script("/flaky", Answer(503))
    server.script("/denied", Answer(403))
    db = tmp_path / "q.db"
    ended = threading.Semaphore(0)
    off = Offloader(
        store=url_of(db),
        retry=RetryPolicy(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none()),
        on_success=lambda *_: ended.release(),
        on_dead_letter=lambda *_: ended.release(),
        on_retry=lambda task, *_: task.call is later and ended.release(),
    )
    try:
        off.enqueue_task(offload.http("POST", server.url("/flaky"), json={"a": [1, None]}))
        off.enqueue_task(offload.http("PUT", server.url("/denied"), data=b"\x00\xff raw"))
        off.enqueue_task(deliver, {"nested": [1, 2.5, None, True, "ü"]})
        off.enqueue_task(Task(deliver, ("policy",), retry=RetryPolicy(retry_on=(KeyError,))))
        off.enqueue_task(later)
        for _ in range(5):  # 2 delivered, 2 dead letters, 1 retry scheduled
            assert ended.acquire(timeout=10)
    finally:
        off.shutdown(0)

    conn = sqlite3.connect(db)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        types: dict[str, set[str]] = {}
        json_texts = 0
        for table in tables:
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            for column in columns:
                rows = conn.execute(f"SELECT typeof({column}), {column} FROM {table}").fetchall()
                types[f"{table}.{column}"] = {kind for kind, _ in rows}
                for kind, value in rows:
                    if kind == "text" and value[:1] in ("{", "["):
                        json.loads(value)  # every structured value is JSON
                        json_texts += 1
        tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    finally:
        conn.close()
    assert (tasks, letters) == (1, 2)
    blobs = {name for name, kinds in types.items() if "blob" in kinds}
    assert blobs == set(), f"binary values (pickle?) in {blobs}"
    assert json_texts >= 3


# -- tampered rows -----------------------------------------------------------------------


def _good_record(tmp_path: Path) -> dict[str, Any]:
    """The call column offload writes for `deliver("x")`, to tamper with."""
    db = tmp_path / "model.db"
    off = Offloader(store=url_of(db), consume=False)
    try:
        task = off.enqueue_task(deliver, "x")
    finally:
        off.shutdown(0)
    conn = sqlite3.connect(db)
    try:
        (text,) = conn.execute("SELECT call FROM tasks WHERE id = ?", (task.id,)).fetchone()
    finally:
        conn.close()
    return dict(json.loads(text))


def _tampered(good: dict[str, Any]) -> dict[str, str]:
    """Tampered `call` values: broken JSON, wrong shapes, and calls offload would refuse."""
    deep = "[" * 10_000 + "]" * 10_000
    http = {
        **good,
        "target": {
            "type": "http",
            "method": "POST",
            "url": "http://127.0.0.1:9/x",
            "kwargs": {"timeout": [5.0, 30.0]},
            "idempotency_key": False,
        },
        "args": [],
        "kwargs": {},
    }

    def with_target(**changes: Any) -> str:
        return json.dumps({**http, "target": {**http["target"], **changes}})

    return {
        "not JSON": "{not json",
        "JSON null": "null",
        "a list": "[]",
        "NaN": json.dumps({**good, "args": ["NaN"]}).replace('"NaN"', "NaN"),
        "nested 10,000 deep": json.dumps({**good, "args": ["DEEP"]}).replace('"DEEP"', deep),
        "unknown target type": json.dumps({**good, "target": {"type": "pickle", "data": "x"}}),
        "unknown format": json.dumps({**good, "offload": 99}),
        "ftp URL": with_target(url="ftp://127.0.0.1/x"),
        "method FETCH": with_target(method="FETCH"),
        "header injection": with_target(
            kwargs={"timeout": [5.0, 30.0], "headers": {"X-A": "1\r\nX-Injected: 2"}}
        ),
        "bad base64": with_target(kwargs={"timeout": [5.0, 30.0], "data": {"$bytes": "%%%"}}),
        "extra field": with_target(hooks={"response": "os:system"}),
        "args for an http call": json.dumps({**http, "args": [1]}),
    }


def test_tampered_rows_are_refused_and_the_running_worker_goes_on(tmp_path: Path) -> None:
    variants = _tampered(_good_record(tmp_path))
    db = tmp_path / "q.db"
    worker = Offloader(store=url_of(db), idle_timeout=30)
    web = Offloader(store=url_of(db), consume=False)
    try:
        worker.enqueue_task(deliver, "before")
        assert worker.flush(10)  # the worker is up and has delivered one
        # Rows written straight into the file by someone with write access to it, each
        # in one statement so that the worker never sees them half-made.
        bad = {f"tampered{i:04d}": name for i, name in enumerate(variants)}
        with sqlite3.connect(db) as conn:
            conn.executemany(
                "INSERT INTO tasks (id, call, due) VALUES (?, ?, 0)",
                [(task_id, variants[name]) for task_id, name in bad.items()],
            )
        conn.close()
        for i in range(10):
            web.enqueue_task(deliver, f"after {i}")
        assert worker.flush(30)
        letters = {letter.task_id: letter for letter in worker.dead_letters()}
        alive = worker.running
    finally:
        web.shutdown(1)
        worker.shutdown(5)

    # Every good task delivered, none of the tampered ones performed.
    with delivered_lock:
        got = sorted(v for v in delivered if isinstance(v, str))
    assert got == sorted(["before"] + [f"after {i}" for i in range(10)]), got
    # Each tampered row is a dead letter that says why, and the worker lived on.
    assert set(letters) == set(bad), sorted(bad.get(t, t) for t in set(letters) ^ set(bad))
    for task_id, name in bad.items():
        letter = letters[task_id]
        assert letter.reason == "permanent", (name, letter)
        assert "unreadable task record" in letter.error, (name, letter.error)
    assert alive


def test_a_row_naming_a_standard_library_function_is_refused(
    tmp_path: Path,
) -> None:
    db = tmp_path / "q.db"
    record = json.dumps(
        {
            **_good_record(tmp_path),
            "target": {"type": "function", "path": "os:getcwd"},
            "args": [],
        }
    )
    web = Offloader(store=url_of(db), consume=False)
    web.enqueue_task(deliver, "x")  # the schema, and a row to replace
    web.shutdown(0)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE tasks SET call = ?", (record,))
    conn.close()
    results: list[Any] = []
    worker = Offloader(store=url_of(db), on_success=lambda task, result: results.append(result))
    try:
        assert worker.flush(10)
    finally:
        worker.shutdown(1)
    assert results == [], f"os.getcwd() ran and returned {results}"
    (letter,) = worker.dead_letters()
    assert letter.reason == "permanent"
    assert "'os:getcwd' is in Python's standard library" in letter.error


@pytest.mark.parametrize("fn", [os.getcwd, print, json.dumps, subprocess.run])
def test_a_standard_library_function_cannot_be_stored(tmp_path: Path, fn: Any) -> None:
    # Only a function of the application or its packages: a stored task naming one of
    # Python's own is the first thing someone with write access to the file would try.
    web = Offloader(store=url_of(tmp_path / "q.db"), consume=False)
    try:
        with pytest.raises(offload.NotSerializable, match="Python's standard library"):
            web.enqueue_task(fn)
        assert web.stats().enqueued == 0
    finally:
        web.shutdown(0)


def test_a_file_that_is_not_a_store_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("my notes, not a database\n")
    path.chmod(0o644)
    with pytest.raises(offload.StoreError, match="not a usable offload store"):
        Offloader(store=url_of(path), consume=False).enqueue_task(
            offload.http("POST", "http://127.0.0.1:9/x")
        )
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == "my notes, not a database\n"


def test_a_retry_predicate_of_the_standard_library_cannot_be_stored(tmp_path: Path) -> None:
    # A stored policy's predicate is called, as a task's function is.
    web = Offloader(store=url_of(tmp_path / "q.db"), consume=False)
    try:
        task = Task(deliver, ("x",), retry=offload.RetryPolicy(retry_on=callable))
        with pytest.raises(offload.NotSerializable, match="Python's standard library"):
            web.enqueue_task(task)
    finally:
        web.shutdown(0)


@pytest.mark.parametrize(
    "path",
    [
        # the qualname walks attributes: any module that imports os hands out os.system
        "offload.stores.sqlite.store:os.system",
        "offload.calls:importlib.import_module",
        # Python's own `test` package is not in sys.stdlib_module_names (3.10-3.13)
        "test.support.script_helper:assert_python_ok",
    ],
)
def test_a_standard_library_function_cannot_be_reached_another_way(path: str) -> None:
    with pytest.raises(ValueError):
        resolve_task_function(path)


def test_a_tampered_row_cannot_run_os_system_through_a_module_that_imports_os(
    tmp_path: Path,
) -> None:
    db = tmp_path / "q.db"
    marker = tmp_path / "ran"
    web = Offloader(store=url_of(db), consume=False)
    web.enqueue_task(deliver, "x")
    web.shutdown(0)
    with sqlite3.connect(db) as conn:
        (text,) = conn.execute("SELECT call FROM tasks").fetchone()
        record = json.loads(text)
        record["target"] = {"type": "function", "path": "offload.stores.sqlite.store:os.system"}
        record["args"] = [f"touch {marker}"]
        record["kwargs"] = {}
        conn.execute("UPDATE tasks SET call = ?", (json.dumps(record),))
    conn.close()
    worker = Offloader(store=url_of(db))
    try:
        assert worker.flush(10)
    finally:
        worker.shutdown(1)
    assert not os.path.exists(marker), "os.system ran from a stored row"


@pytest.mark.parametrize(
    ("column", "value"), [("dedup_window", -5.0), ("dedup_window", "soon"), ("dedup_key", b"k")]
)
def test_a_row_with_a_tampered_dedup_column_is_a_dead_letter(
    tmp_path: Path, column: str, value: Any
) -> None:
    # Read like every other column: a bad value makes the row a dead letter, rather than
    # failing the whole claim (the row then stayed leased and was never settled).
    db = tmp_path / "q.db"
    web = Offloader(store=url_of(db), consume=False)
    web.enqueue_task(deliver, "tampered")
    web.shutdown(0)
    with sqlite3.connect(db) as conn:
        conn.execute(f"UPDATE tasks SET {column} = ?", (value,))
    conn.close()
    worker = Offloader(store=url_of(db), workers=1)
    try:
        worker.enqueue_task(deliver, "good")
        assert worker.flush(10)
        (letter,) = worker.dead_letters()
        assert worker.store.counts().leased == 0  # type: ignore[attr-defined]
    finally:
        worker.shutdown(1)
    assert letter.reason == "permanent" and "unreadable task record" in letter.error
    with delivered_lock:
        assert delivered == ["good"]


def test_a_row_naming_a_function_of_the_main_script_is_refused(tmp_path: Path) -> None:
    # Nothing stores a `__main__:` path (a script's functions are refused at enqueue), but
    # a worker would resolve one in its own main module: the script's, or the one that
    # started the process.
    marker = tmp_path / "ran"
    result = run_python(
        f"""
        import json, sqlite3
        import offload

        def wipe(path):
            open(path, "w").write("ran")

        url = {url_of(tmp_path / "q.db")!r}
        web = offload.Offloader(store=url, consume=False)
        web.enqueue_task(offload.http("POST", "http://127.0.0.1:9/x"))
        web.shutdown(0)
        record = {{"offload": 1, "target": {{"type": "function", "path": "__main__:wipe"}},
                   "args": [{str(marker)!r}], "kwargs": {{}}}}
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute("UPDATE tasks SET call = ?", (json.dumps(record),))
        conn.close()
        worker = offload.Offloader(store=url)
        assert worker.flush(10)
        print(json.dumps([letter.error for letter in worker.dead_letters()]))
        worker.shutdown(1)
        """
    )
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "a function of the main script ran from a stored row"
    [error] = json.loads(result.stdout)
    assert "'__main__:wipe'" in error


@pytest.mark.parametrize("path", [5, None, ["test_store_file:deliver"]])
def test_a_row_whose_path_is_not_text_is_a_dead_letter_under_trusted_prefixes(
    tmp_path: Path, path: Any
) -> None:
    db = tmp_path / "q.db"
    web = Offloader(store=url_of(db), consume=False)
    web.enqueue_task(deliver, "tampered")
    web.shutdown(0)
    record = {"offload": 1, "target": {"type": "function", "path": path}, "args": [], "kwargs": {}}
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE tasks SET call = ?", (json.dumps(record),))
    conn.close()
    worker = Offloader(store=url_of(db), workers=1, trusted=(__name__,))
    try:
        worker.enqueue_task(deliver, "good")
        assert worker.flush(10)
        letters = worker.dead_letters()
        leased = worker.store.counts().leased  # type: ignore[attr-defined]
    finally:
        worker.shutdown(1)
    assert leased == 0, "the tampered row was claimed and never settled"
    (letter,) = letters
    assert letter.reason == "permanent" and "not a 'module:qualname' function path" in letter.error
    with delivered_lock:
        assert delivered == ["good"]
