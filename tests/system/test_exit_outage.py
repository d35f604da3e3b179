"""Exit under an outage: an API that accepts connections and never answers.

A process that enqueued 50 calls must exit within its shutdown deadline plus a second,
and say how many calls it could not deliver: the queued ones become dead letters with
reason "shutdown", the ones hanging on a worker are reported as still running. Real
subprocesses; the deadline comes from OFFLOAD_SHUTDOWN_TIMEOUT, `configure()`, or an
explicit Offloader's `shutdown_timeout`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from chaos import Tarpit
from offload import lifecycle
from procs import SRC, reap, run_python
from server import ScriptedServer

CALLS = 50

# The child enqueues, says so, and ends when its stdin closes (the test's "now").
# An atexit hook registered before offload is imported runs after offload's own hook,
# and prints what the offloader holds once it has shut down.
SCRIPT = """
import atexit, json, sys
def report():
    s = off.stats() if off is not None else offload.stats()
    letters = off.dead_letters() if off is not None else offload.dead_letters()
    reasons = sorted({d.reason for d in letters})
    print("after-exit", json.dumps({"succeeded": s.succeeded, "dead": len(letters),
          "reasons": reasons, "in_flight": s.in_flight}), flush=True)
atexit.register(report)

import offload
healthy, tarpit, mode, timeout, workers, healthy_calls, calls = sys.argv[1:]
off = None
if mode == "explicit":
    off = offload.Offloader(workers=int(workers), shutdown_timeout=float(timeout))
    enqueue = off.enqueue_task
elif mode == "configure":
    offload.configure(workers=int(workers), shutdown_timeout=float(timeout))
    enqueue = offload.enqueue_task
else:
    enqueue = offload.enqueue_task
for i in range(int(healthy_calls)):
    enqueue(offload.http("POST", healthy + f"/ok/{i}", json={"i": i}))
for i in range(int(calls) - int(healthy_calls)):
    enqueue(offload.http("POST", tarpit + f"/hang/{i}", json={"i": i}, timeout=60))
print("enqueued", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    with Tarpit() as pit:
        yield pit


def run_until_exit(
    tarpit: Tarpit,
    healthy: ScriptedServer,
    *,
    mode: str,
    timeout: float,
    workers: int,
    healthy_calls: int = 0,
) -> tuple[float, str, str]:
    """Start the child, wait until every worker hangs on the tarpit, end it; returns
    (seconds from the end of its script to its exit, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    for name in ("OFFLOAD_SHUTDOWN_TIMEOUT", "OFFLOAD_WORKERS"):
        env.pop(name, None)
    if mode == "env":
        env["OFFLOAD_SHUTDOWN_TIMEOUT"] = str(timeout)
        env["OFFLOAD_WORKERS"] = str(workers)
    args = [healthy.base_url, tarpit.url(), mode, str(timeout), str(workers), str(healthy_calls)]
    args.append(str(CALLS))
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        assert line.strip() == "enqueued", line
        # A wide timeout: on a loaded machine the child's threads may wait long for a core.
        if not tarpit.wait_for_connections(workers, timeout=60):
            proc.kill()
            pytest.fail(
                f"the workers never reached the tarpit; the child said:\n{proc.communicate()[1]}"
            )
        started = time.monotonic()
        proc.stdin.close()
        proc.wait(timeout + 15)
        elapsed = time.monotonic() - started
        out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    return elapsed, out, err


@pytest.mark.parametrize(
    ("mode", "timeout", "workers"),
    [
        ("env", 0.0, 1),
        ("env", 0.5, 4),
        ("env", 2.0, 4),
        ("configure", 1.0, 4),
        ("explicit", 1.0, 4),
        ("explicit", 0.0, 2),
    ],
)
def test_exit_within_the_deadline_and_report_what_was_undelivered(
    tarpit: Tarpit, server: ScriptedServer, mode: str, timeout: float, workers: int
) -> None:
    elapsed, out, err = run_until_exit(tarpit, server, mode=mode, timeout=timeout, workers=workers)
    assert elapsed <= timeout + 1.0, f"exit took {elapsed:.2f}s, deadline {timeout}s\n{err}"
    queued = CALLS - workers
    assert (
        f"offload shut down with {CALLS} task(s) undelivered: {queued} dead-lettered "
        f"(reason 'shutdown'), {workers} still running"
    ) in err
    assert f'"dead": {queued}, "reasons": ["shutdown"], "in_flight": {workers}' in out
    assert tarpit.connections == workers, "a call was started after shutdown began"


def test_what_can_be_delivered_is_and_the_rest_is_reported(
    tarpit: Tarpit, server: ScriptedServer
) -> None:
    # 20 calls to a healthy API go first; the 30 after them meet the outage.
    elapsed, out, err = run_until_exit(
        tarpit, server, mode="env", timeout=1.0, workers=4, healthy_calls=20
    )
    assert elapsed <= 2.0, err
    assert len(server.requests) == 20
    assert '"succeeded": 20' in out
    assert "offload shut down with 30 task(s) undelivered: 26 dead-lettered" in err


def test_the_exit_hook_says_that_it_waits_before_it_waits(
    tarpit: Tarpit, server: ScriptedServer
) -> None:
    """An API that is down at exit: one WARNING, a second into the exit hook, says how
    many calls it waits for, for how long, and what a server's own deadline must allow."""
    _, _, err = run_until_exit(tarpit, server, mode="env", timeout=3.0, workers=2)
    lines = [line for line in err.splitlines() if "not delivered yet at exit" in line]
    assert len(lines) == 1, err
    waiting = re.search(r"offload: (\d+) call\(s\) .* waiting up to ([\d.]+)s for them", lines[0])
    assert waiting is not None and int(waiting.group(1)) == CALLS, lines[0]
    assert 0 < float(waiting.group(2)) <= 3.0 - lifecycle.EXIT_QUIET
    assert "OFFLOAD_SHUTDOWN_TIMEOUT" in lines[0] and "worker-reload-mercy" in lines[0]
    assert err.index(lines[0]) < err.index("offload shut down with")  # before, not after


def test_calls_delivered_quickly_at_exit_are_not_announced(server: ScriptedServer) -> None:
    result = run_python(
        f"""
        import offload
        for i in range(20):
            offload.enqueue_task(offload.http("POST", "{server.url("/ok")}", json={{"i": i}}))
        """,
        env={"OFFLOAD_SHUTDOWN_TIMEOUT": "30"},
    )
    assert result.returncode == 0, result.stderr
    assert len(server.requests) == 20
    assert "not delivered yet" not in result.stderr and "offload" not in result.stderr
