"""Two real worker processes on one durable store with one declared rate, against a test's
server: what the tests of a shared rate budget run (SQLite and PostgreSQL alike)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from procs import python_env, reap
from server import Recorded, ScriptedServer

__all__ = [
    "BURST",
    "PER_PROCESS",
    "RATE",
    "WORKERS",
    "allowed",
    "assert_one_budget",
    "busiest",
    "run_two",
]

RATE, BURST, PER_PROCESS, WORKERS = 10, 2, 25, 2

_WORKER = f"""
import os, sys
import offload

url, target = sys.argv[1], sys.argv[2]
limits = {{sys.argv[3]: offload.Limit(rate={RATE}, burst={BURST})}}
off = offload.Offloader(store=url, limits=limits, workers={WORKERS})
off.stats()  # the store opened (and made) before the race begins
print("ready", flush=True)
sys.stdin.readline()
for i in range({PER_PROCESS}):
    off.enqueue_task(offload.http("POST", target, headers={{"X-Pid": str(os.getpid())}}))
print("done", off.flush(timeout=120), flush=True)
off.shutdown(timeout=10)
"""


def run_two(url: str, server: ScriptedServer, path: str = "/paced") -> list[Recorded]:
    """Start two processes on the store at `url`, let both enqueue PER_PROCESS calls to
    `path` at once (each performs its own: leased as it enqueues them), wait for every
    call; the server's record of them."""
    argv = [sys.executable, "-c", textwrap.dedent(_WORKER), url, server.url(path), server.base_url]
    procs = [
        subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=python_env(),
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready\n", line + (proc.stderr.read() if proc.stderr else "")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        assert server.wait_for(2 * PER_PROCESS, path, timeout=120)
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "done True" in out, out + err
    finally:
        for proc in procs:
            reap(proc)
    return server.requests_to(path)


def busiest(arrivals: list[float], window: float) -> int:
    """The most arrivals in any `window` seconds."""
    ordered = sorted(arrivals)
    return max(sum(1 for at in ordered if start <= at < start + window) for start in ordered)


def allowed(window: float) -> float:
    """What one budget lets arrive in `window` seconds: the burst and the rate, plus the
    calls on their way when the window began (per process: its workers' calls in flight,
    and the token per worker it may hold). Budgets per process would let twice the rate
    through."""
    return BURST + RATE * window + 2 * (WORKERS + WORKERS)


def assert_one_budget(url: str, server: ScriptedServer) -> None:
    """Two processes on the store at `url` each perform their own calls at once; every
    2-second window of the server's arrivals holds at most what one budget allows."""
    requests = run_two(url, server)
    by_pid: dict[str, int] = {}
    for request in requests:
        by_pid[request.headers["X-Pid"]] = by_pid.get(request.headers["X-Pid"], 0) + 1
    assert sorted(by_pid.values()) == [PER_PROCESS, PER_PROCESS]
    arrivals = [request.at for request in requests]
    most, bound = busiest(arrivals, 2.0), allowed(2.0)
    offsets = [round(at - min(arrivals), 3) for at in sorted(arrivals)]
    assert most <= bound, (most, bound, json.dumps(offsets))
