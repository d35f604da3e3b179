"""100 forks from a process whose workers are busy: no deadlock, no task run twice.

The parent keeps two workers busy while it forks: one hangs on a call the test holds
open, the other churns through thousands of small tasks that log at DEBUG (so the
scheduler's lock and the logging locks change hands all the time). Each child checks it
starts empty, enqueues its own calls, flushes them, and exits; an alarm kills a child
that deadlocks, so a deadlock shows as a failed child rather than a hung test. The server
counts every request, so a parent task performed by a child would show up twice.
gunicorn --preload is covered by tests/system/test_gunicorn.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter

import pytest

from procs import SRC, reap
from server import Answer, ScriptedServer

FORKS = 100
CHILD_CALLS = 2
PARENT_CALLS = 20

SCRIPT = """
import json, logging, os, signal, sys, threading
from collections import Counter
import offload

base, forks, child_calls, parent_calls = sys.argv[1], *map(int, sys.argv[2:])
class RawHandler(logging.Handler):
    # os.write, not a buffered file: CPython does not reset a BufferedWriter's lock at
    # fork, so a child forked while another thread writes to one can hang in its own
    # first write. That is Python's hazard, not offload's; logging's own locks are reset.
    def __init__(self):
        super().__init__()
        self.fd = os.open(os.devnull, os.O_WRONLY)
    def emit(self, record):
        os.write(self.fd, (self.format(record) + "\\n").encode())
logging.basicConfig(level=logging.DEBUG, handlers=[RawHandler()])
log = logging.getLogger("churn")
off = offload.Offloader(workers=2, idle_timeout=30)
offload.configure(workers=1)  # the default offloader is in use in the parent too

# Worker 1 hangs on a call the test releases only after every child has reported.
off.enqueue_task(offload.http("GET", base + "/hang/parent", timeout=120))
for i in range(parent_calls):
    off.enqueue_task(offload.http("POST", base + f"/parent/{i}"))
    offload.enqueue_task(offload.http("POST", base + f"/parent-default/{i}"))
churned = []
forking = threading.Event()
ticked = threading.Event()
def churn(i):
    # Keeps worker 2 busy for as long as the forking lasts: each task queues the next.
    log.debug("churn %d", i)
    churned.append(i)
    ticked.set()
    if forking.is_set():
        off.enqueue_task(churn, i + 1)
forking.set()
off.enqueue_task(churn, 0)

pids = []
for n in range(forks):
    # Fork right after the churning worker has made progress, so that it is mid-loop
    # (taking its next task, logging) rather than waiting for the GIL.
    if not ticked.wait(10):
        sys.exit("the churning worker stopped")
    ticked.clear()
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a deadlocked child dies instead of hanging the test
        code = 0
        churned_at_fork = len(churned)
        try:
            for o in (off, offload):
                s = o.stats()
                if (s.enqueued, s.queued, s.in_flight, s.worker_running) != (0, 0, 0, False):
                    code = 10
            for j in range(child_calls):
                off.enqueue_task(offload.http("POST", base + f"/child/{n}/{j}"))
                offload.enqueue_task(offload.http("POST", base + f"/child-default/{n}/{j}"))
            log.debug("child %d enqueued", n)
            if not (off.flush(15) and offload.flush(15)):
                code = 11
            elif off.stats().succeeded != child_calls or offload.stats().succeeded != child_calls:
                code = 12
            elif len(churned) != churned_at_fork:
                code = 13  # the parent's churn ran in the child
        except BaseException:
            code = 14
        os._exit(code)
    pids.append(pid)
forking.clear()

codes = Counter()
for pid in pids:
    _, status = os.waitpid(pid, 0)
    codes[os.waitstatus_to_exitcode(status)] += 1
print(json.dumps({"codes": codes, "churned_while_forking": len(churned)}), flush=True)
sys.stdin.read()  # the test releases the hanging call, then closes our stdin
ok = off.flush(30) and offload.flush(30)
s = off.stats()
print(json.dumps({"flushed": ok, "churned": len(churned), "succeeded": s.succeeded,
                  "dead_lettered": s.dead_lettered}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_100_forks_while_workers_are_busy(server: ScriptedServer) -> None:
    release = threading.Event()
    server.script("/hang/parent", Answer.hang(release), Answer(200))
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, server.base_url]
        + [str(n) for n in (FORKS, CHILD_CALLS, PARENT_CALLS)],
        env={**os.environ, "PYTHONPATH": SRC},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    try:
        first = proc.stdout.readline()
        assert first, proc.stderr.read()
        forked = json.loads(first)
        # Every child exited 0: none deadlocked (SIGALRM would give -14), none saw the
        # parent's state or ran the parent's tasks.
        assert forked["codes"] == {"0": FORKS}, forked
        # The parent's first worker is still hanging: the forks happened while it was busy.
        assert server.wait_for(1, "/hang/parent")
        release.set()
        proc.stdin.close()
        last = json.loads(proc.stdout.readline() or "{}")
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        reap(proc)

    assert forked["churned_while_forking"] >= FORKS, "the parent's worker was not busy"
    assert last["flushed"] is True
    assert last["succeeded"] == 1 + PARENT_CALLS + last["churned"]  # the 2nd offloader's
    assert last["dead_lettered"] == 0
    # No task performed by two processes: every call reached the server exactly once.
    seen = Counter(r.path for r in server.requests)
    # (The hanging call ends in a reset when released, and its retry gets a 200.)
    assert seen.pop("/hang/parent") == 2
    twice = {path: n for path, n in seen.items() if n > 1}
    assert twice == {}
    expected = {f"/parent/{i}" for i in range(PARENT_CALLS)}
    expected |= {f"/parent-default/{i}" for i in range(PARENT_CALLS)}
    expected |= {f"/child/{n}/{j}" for n in range(FORKS) for j in range(CHILD_CALLS)}
    expected |= {f"/child-default/{n}/{j}" for n in range(FORKS) for j in range(CHILD_CALLS)}
    assert set(seen) == expected
