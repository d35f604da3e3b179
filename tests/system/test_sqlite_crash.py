"""Crashes and several processes over one SQLite file, with real subprocesses.

The calls go to the ScriptedServer on 127.0.0.1; each carries its index in the body, so
the server's record says what was delivered, and how often.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import offload
from offload.stores.sqlite import SQLiteStore
from procs import SRC
from server import Answer, ScriptedServer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def spawn(code: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": SRC, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"subprocess hung\n{err}") from None
    assert proc.returncode == 0, err
    return out, err


def delivered(server: ScriptedServer, path: str) -> Counter[int]:
    """How often each call arrived whole (a process killed while it sent leaves a request
    the server saw only in part: not a delivery)."""
    return Counter(json.loads(r.body)["i"] for r in server.requests_to(path) if whole(r))


def whole(request: Any) -> bool:
    return bool(request.body) and len(request.body) == int(request.headers["Content-Length"])


def kill_mid_drain(
    url: str, server: ScriptedServer, calls: int, workers: int, seen: int, options: str = ""
) -> Counter[int]:
    """Run a process that enqueues `calls` POSTs to /pay (with `options` added to each
    `http(...)`) and drains them with `workers`; SIGKILL it once `seen` have arrived.
    Returns what had been delivered by then."""
    victim = spawn(
        f"""
        import sys, offload
        off = offload.Offloader(store={url!r}, workers={workers})
        for i in range({calls}):
            off.enqueue_task(
                offload.http("POST", {server.url("/pay")!r}, json={{"i": i}}{options})
            )
        print("enqueued", flush=True)
        sys.stdin.read()
        """
    )
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "enqueued"
        assert server.wait_for(seen, "/pay", timeout=30)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    before = delivered(server, "/pay")
    assert len(before) < calls, "the drain finished before the kill; nothing was tested"
    return before


def test_a_killed_process_loses_nothing(tmp_path: Path, server: ScriptedServer) -> None:
    calls, workers = 300, 4
    server.script("/pay", Answer(200, delay=0.005))  # a slow API: the drain takes a while
    url = f"sqlite:///{tmp_path / 'q.db'}"
    before = kill_mid_drain(url, server, calls, workers, 50, ", idempotency_key=True")

    # What the killed process held: still in the file, its leases no one's (its pid is gone).
    store = SQLiteStore(tmp_path / "q.db")
    try:
        counts = store.counts()
        assert counts.ready + counts.leased + counts.delayed >= calls - len(before)
    finally:
        store.close()

    survivor = spawn(
        f"""
        import offload
        off = offload.Offloader(store={url!r}, workers={workers})
        assert off.running, "the backlog was not resumed"
        assert off.flush(60)
        print(off.stats().succeeded, flush=True)
        off.shutdown(5)
        """
    )
    out, _ = finish(survivor)
    after = delivered(server, "/pay")
    assert set(after) == set(range(calls)), "a call was lost"
    duplicates = sum(after.values()) - calls
    # Only calls in flight when the process died can run twice: at most one per worker.
    in_flight_at_kill = sum(1 for i in before if after[i] > 1)
    assert duplicates == in_flight_at_kill <= workers
    assert int(out) == calls - len(before) + in_flight_at_kill
    # A call delivered twice carries the same idempotency key both times.
    keys: dict[int, set[str]] = {}
    for r in server.requests_to("/pay"):
        if whole(r):
            keys.setdefault(json.loads(r.body)["i"], set()).add(r.headers["Idempotency-Key"])
    assert all(len(k) == 1 for k in keys.values())
    store = SQLiteStore(tmp_path / "q.db")
    try:
        assert store.counts() == type(store.counts())(0, 0, 0, 0)
    finally:
        store.close()
    # The killed process's journal was copied, then deleted by the survivor.
    assert list((tmp_path / "q.db-journals").iterdir()) == []


def test_a_process_open_before_the_kill_takes_over_what_the_killed_one_held(
    tmp_path: Path, server: ScriptedServer
) -> None:
    # The survivor opened the file first and found nothing to do: no worker of its own
    # runs when the other is killed. Its flush() must see the dead process's leases as
    # no one's, take them back and deliver them, not report success at once.
    calls, workers = 200, 2
    server.script("/pay", Answer(200, delay=0.005))
    url = f"sqlite:///{tmp_path / 'q.db'}"
    survivor = offload.Offloader(store=url, workers=workers, idle_timeout=0.05)
    try:
        assert not survivor.running
        before = kill_mid_drain(url, server, calls, workers, 30)
        assert not survivor.running
        assert survivor.flush(60)
        after = delivered(server, "/pay")
        assert set(after) == set(range(calls)), "flush() returned with the dead one's tasks left"
        assert sum(after.values()) - calls <= workers  # only the calls in flight at the kill
        s = survivor.stats()
        assert (s.stored_ready, s.stored_delayed, s.stored_leased) == (0, 0, 0)
        assert s.claimed == s.succeeded == calls - len(before) + sum(after[i] > 1 for i in before)
    finally:
        survivor.shutdown(5)


WORKER = """
    import json, offload
    off = offload.Offloader(store={url!r}, workers=2)
    print("started", flush=True)
    assert off.flush(60)
    s = off.stats()
    print(json.dumps({{"claimed": s.claimed, "succeeded": s.succeeded}}), flush=True)
    off.shutdown(5)
"""


def test_two_worker_processes_share_one_file(tmp_path: Path, server: ScriptedServer) -> None:
    calls = 400
    server.script("/job", Answer(200, delay=0.01))
    url = f"sqlite:///{tmp_path / 'q.db'}"
    web = spawn(
        f"""
        import offload
        off = offload.Offloader(store={url!r}, consume=False)
        for i in range({calls}):
            off.enqueue_task(offload.http("POST", {server.url("/job")!r}, json={{"i": i}}))
        assert not off.running
        """
    )
    finish(web)
    workers = [spawn(WORKER.format(url=url)) for _ in range(2)]
    outputs = [finish(proc)[0].splitlines() for proc in workers]
    results: list[dict[str, Any]] = []
    for lines in outputs:
        assert lines[0] == "started"
        results.append(json.loads(lines[1]))
    counts = delivered(server, "/job")
    assert set(counts) == set(range(calls)) and set(counts.values()) == {1}, "not exactly once"
    assert sum(r["succeeded"] for r in results) == calls
    assert all(r["claimed"] == r["succeeded"] > 0 for r in results), results


def test_two_web_processes_enqueue_and_deliver_their_own(
    tmp_path: Path, server: ScriptedServer
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    code = """
        import offload
        off = offload.Offloader(store={url!r}, workers=2)
        for i in range({start}, {start} + 150):
            off.enqueue_task(offload.http("POST", {target!r}, json={{"i": i}}))
        assert off.flush(60)
        print(off.stats().succeeded)
        off.shutdown(5)
    """
    procs = [
        spawn(code.format(url=url, start=start, target=server.url("/web"))) for start in (0, 150)
    ]
    outputs = [finish(proc)[0] for proc in procs]
    counts = delivered(server, "/web")
    assert set(counts) == set(range(300)) and set(counts.values()) == {1}
    assert sum(int(out) for out in outputs) == 300


def test_dead_letters_survive_a_restart(tmp_path: Path, server: ScriptedServer) -> None:
    server.script("/gone", Answer(404, body=b"no such customer"))
    url = f"sqlite:///{tmp_path / 'q.db'}"
    show = "print(json.dumps([d.to_json() for d in off.dead_letters()]), flush=True)"
    first = spawn(
        f"""
        import json, offload
        off = offload.Offloader(store={url!r})
        for i in range(3):
            off.enqueue_task(offload.http("DELETE", {server.url("/gone")!r} + f"?token=t{{i}}"))
        assert off.flush(30)
        {show}
        """
    )
    before = json.loads(finish(first)[0])
    second = spawn(
        f"""
        import json, offload
        off = offload.Offloader(store={url!r})
        {show}
        """
    )
    after = json.loads(finish(second)[0])
    assert len(before) == 3 and after == before
    for letter in after:
        assert (letter["status"], letter["reason"], letter["attempts"]) == (404, "permanent", 1)
        assert letter["first_attempt_at"] and letter["last_attempt_at"]
        assert "token=***" in letter["description"] and "t0" not in letter["description"]


def test_replay_from_another_process(tmp_path: Path, server: ScriptedServer) -> None:
    server.script("/flaky", Answer(404), Answer(200))
    url = f"sqlite:///{tmp_path / 'q.db'}"
    worker = spawn(
        f"""
        import sys, offload
        off = offload.Offloader(store={url!r}, idle_timeout=60)
        off.enqueue_task(offload.http("POST", {server.url("/flaky")!r}, json={{"i": 7}}))
        assert off.flush(30)
        print(off.dead_letters()[0].id, flush=True)
        sys.stdin.read()  # stays up, idle, until the test is done
        assert off.flush(30)
        assert off.dead_letters() == [], off.dead_letters()
        s = off.stats()
        assert (s.succeeded, s.dead_lettered, s.claimed) == (1, 1, 2), s
        off.shutdown(5)
        """
    )
    try:
        assert worker.stdout is not None and worker.stdin is not None
        letter_id = worker.stdout.readline().strip()
        assert letter_id
        operator = spawn(
            f"""
            import offload
            off = offload.Offloader(store={url!r}, consume=False)
            task = off.replay({letter_id!r})
            print(task.id)
            """
        )
        finish(operator)
        # The idle worker of the first process finds the replayed task and delivers it.
        assert server.wait_for(2, "/flaky", timeout=30)
    finally:
        finish(worker)
    assert len(server.requests_to("/flaky")) == 2
