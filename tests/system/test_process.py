"""Real subprocesses: delivery at exit, fork while the worker is busy, exit under an outage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from procs import python_env, run_python
from server import Answer, ScriptedServer


def test_atexit_delivers_what_was_enqueued(server: ScriptedServer) -> None:
    # The script enqueues and returns at once; the exit hook delivers before the process ends.
    result = run_python(
        f"""
        import offload
        for i in range(25):
            offload.enqueue_task(offload.http("POST", "{server.url("/exit")}", json={{"i": i}}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert len(server.requests_to("/exit")) == 25
    assert sorted(json.loads(r.body)["i"] for r in server.requests_to("/exit")) == list(range(25))


# Python 3.12+ starts no thread once the interpreter is finalizing (atexit hooks included);
# this atexit hook, registered last and so run first, makes any Python refuse them too.
NO_THREADS_AT_EXIT = """
import atexit, threading
def _refuse(self):
    raise RuntimeError("can't create new thread at interpreter shutdown")
atexit.register(lambda: setattr(threading.Thread, "start", _refuse))
"""


def test_at_exit_a_held_task_whose_worker_cannot_start_is_performed_by_the_hook(
    server: ScriptedServer,
) -> None:
    """A response never closed holds its task's wake-up (offload.web) until exit; where no
    worker thread can start then (Python 3.12+), the exit hook performs the memory store's
    calls itself: before, they waited the whole shutdown timeout and became dead letters.
    (An enqueue made at exit with no worker to start raises ShutDown, as documented.)"""
    result = run_python(
        f"""
        import atexit, offload, offload.web
        URL = "{server.url("/at-exit")}"
        def app(environ, start_response):
            offload.enqueue_task(offload.http("POST", URL))
            start_response("200 OK", [])
            return [b"ok"]
        """
        + "\n        OPEN = offload.web.WSGIMiddleware(app)({}, lambda s, h: None)\n"
        + NO_THREADS_AT_EXIT.replace("\n", "\n        "),
        env={"OFFLOAD_SHUTDOWN_TIMEOUT": "20"},
    )
    assert result.returncode == 0, result.stderr
    assert len(server.requests_to("/at-exit")) == 1, result.stderr
    assert "dead-lettered" not in result.stderr and "could not start" not in result.stderr


def test_exit_under_outage_is_bounded_and_reports(server: ScriptedServer) -> None:
    never = threading.Event()
    server.script("/hang", Answer.hang(never))
    import time

    start = time.monotonic()
    result = run_python(
        f"""
        import logging, offload
        logging.basicConfig(level=logging.WARNING)
        for i in range(50):
            offload.enqueue_task(offload.http("POST", "{server.url("/hang")}", timeout=60))
        """,
        env={"OFFLOAD_SHUTDOWN_TIMEOUT": "1"},
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "50 task(s) undelivered" in result.stderr
    assert "49 dead-lettered" in result.stderr and "1 still running" in result.stderr
    assert elapsed < 1 + 5, "exit waited longer than OFFLOAD_SHUTDOWN_TIMEOUT (plus start-up)"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_worker_busy_gives_child_a_fresh_offloader(server: ScriptedServer) -> None:
    release = threading.Event()
    server.script("/slow", Answer.hang(release))
    # The parent's worker is busy with a call that hangs until the child has reported.
    script = _FORK_SCRIPT.format(
        slow=server.url("/slow"), parent=server.url("/parent"), child=server.url("/child")
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=python_env({"OFFLOAD_SHUTDOWN_TIMEOUT": "10"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "child 0", line + (proc.stderr.read() if proc.stderr else "")
    assert server.wait_for(3, "/child")
    assert len(server.requests_to("/parent")) == 0, (
        "the parent's backlog is still behind its busy call"
    )
    release.set()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # The parent delivered its own tasks; the child did not take any of them.
    assert len(server.requests_to("/parent")) == 5
    assert len(server.requests_to("/child")) == 3


_FORK_SCRIPT = """
import os, sys, offload
offload.enqueue_task(offload.http("GET", "{slow}", timeout=30))
for i in range(5):
    offload.enqueue_task(offload.http("GET", "{parent}"))
pid = os.fork()
if pid == 0:
    s = offload.stats()
    ok = (s.queued, s.in_flight, s.enqueued, s.worker_running) == (0, 0, 0, False)
    for i in range(3):
        offload.enqueue_task(offload.http("GET", "{child}"))
    ok = offload.flush(10) and ok and offload.stats().succeeded == 3
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_enqueue_during_interpreter_shutdown_raises_shutdown() -> None:
    # An atexit hook registered before offload's runs after it: the default offloader is
    # shut down by then, so the late enqueue is refused loudly instead of lost.
    result = run_python(
        """
        import atexit
        def late():
            import offload
            try:
                offload.enqueue_task(print, "late")
            except offload.ShutDown as exc:
                print("refused:", type(exc).__name__)
        atexit.register(late)
        import offload
        offload.enqueue_task(print, "early")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "early" in result.stdout
    assert "refused: ShutDown" in result.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_children_forked_without_fork_hooks_make_ids_of_their_own(tmp_path: Path) -> None:
    """uWSGI's default forks its workers from the master in C, so no fork hook runs. Two
    such children must still make different task ids (they are idempotency keys too),
    whether the offloader was made in the parent or in the child, or a Task before either
    enqueues: over a shared SQLite file a second task with the first's id took its place,
    and one of the two calls was lost."""
    result = run_python(
        f"""
        import ctypes, json, os
        import offload
        url = "sqlite:///{tmp_path / "shared.db"}"
        parent = offload.Offloader(store=url, consume=False)
        fork = ctypes.CDLL(None).fork  # as uWSGI forks: CPython's fork hooks do not run
        read, write = os.pipe()
        pids = []
        for n in range(2):
            pid = fork()
            if pid == 0:
                made = offload.Task(offload.http("POST", f"http://127.0.0.1:9/made/{{n}}"))
                own = offload.Offloader(store=url, consume=False)
                ids = [
                    made.id,
                    parent.enqueue_task(offload.http("POST", f"http://127.0.0.1:9/p/{{n}}")).id,
                    own.enqueue_task(offload.http("POST", f"http://127.0.0.1:9/c/{{n}}")).id,
                    own.enqueue_task(made).id,
                ]
                os.write(write, (json.dumps(ids) + "\\n").encode())
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(write)
        with os.fdopen(read) as lines:
            ids = [i for line in lines for i in json.loads(line)]
        print(json.dumps({{"ids": ids, "stored": parent.stats().stored_ready}}))
        """
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["ids"]) == 8
    assert len(set(out["ids"])) == 6, out["ids"]  # each child's Task enqueued keeps its id
    assert out["stored"] == 6, "a child's task took the place of its sibling's"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_child_forked_without_fork_hooks_reads_a_fresh_offloader() -> None:
    """Where no fork hook ran (uWSGI's default), a child's first stats(), dead_letters(),
    replay() or start() are its own offloader's too, not the parent's: stats() showed the
    parent's ledger and a worker running that the child does not have, and a parent's
    dead letter replayed there went to the parent's scheduler, which no worker serves."""
    result = run_python(
        """
        import ctypes, json, os
        import offload
        off = offload.Offloader(idle_timeout=30)
        for _ in range(3):
            off.enqueue_task(print, end="")
        def refuse():
            raise offload.GiveUp("no")
        off.enqueue_task(refuse)
        assert off.flush(5)
        [letter] = off.dead_letters()
        pid = ctypes.CDLL(None).fork()  # as uWSGI forks: CPython's fork hooks do not run
        if pid == 0:
            s = off.stats()
            seen = [s.enqueued, s.succeeded, s.dead_letters, s.worker_running]
            seen.append(len(off.dead_letters()))
            try:
                off.replay(letter.id)
                seen.append("replayed")
            except offload.UnknownDeadLetter:
                seen.append("unknown")
            off.enqueue_task(print, end="")
            seen.append(off.flush(5) and off.stats().succeeded)
            print(json.dumps(seen), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        """
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [0, 0, 0, False, 0, "unknown", 1]
