"""A Flask app under a real gunicorn with preforked workers, with and without --preload.

A few hundred requests each enqueue one call to a local counting API. The API holds every
answer back until gunicorn has been told to stop (SIGTERM to the master) and each worker
has logged that it is exiting, so every worker exits with calls still queued: they must
all be delivered by offload's exit hook, each exactly once (one in ten is answered 503
first and retried). The handlers' latency is measured against a handler that does not
enqueue and printed (run with -s to see it); it is not asserted, speed lives in
benchmarks/bench_handler_latency.py.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import SUPPORT
from served import Counts, LoggedProcess, counting_api, send

HERE = Path(SUPPORT)
WORKERS = 3
REQUESTS = 300


@pytest.fixture
def api() -> Iterator[tuple[str, Counts]]:
    with counting_api() as served:
        yield served


# -- gunicorn -------------------------------------------------------------------------------


def gunicorn(api_url: str, tmp_path: Path, preload: bool) -> LoggedProcess:
    """`gunicorn -w N tests/support/gunicorn_app:app` in a subprocess, its log lines collected."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env.update(
        OFFLOAD_TEST_API=api_url,
        OFFLOAD_SHUTDOWN_TIMEOUT="30",  # the exit hook's deadline in each worker
        # gunicorn >= 25.1 makes a control socket in XDG_RUNTIME_DIR or ~/.gunicorn.
        XDG_RUNTIME_DIR=str(tmp_path),
        HOME=str(tmp_path),
    )
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        str(WORKERS),
        "--bind",
        "127.0.0.1:0",
        "--chdir",
        str(HERE),
        "--graceful-timeout",
        "40",
        "--log-level",
        "info",
        *(["--preload"] if preload else []),
        "gunicorn_app:app",
    ]
    return LoggedProcess(args, env)


def summary(label: str, results: list[tuple[float, int, int]]) -> str:
    rtt = sorted(r[0] * 1e3 for r in results)
    handler = sorted(r[1] / 1e3 for r in results)
    q = statistics.quantiles(rtt, n=100)
    h = statistics.quantiles(handler, n=100)
    return (
        f"{label:8} round trip p50 {q[49]:.2f} ms p99 {q[98]:.2f} ms; "
        f"in handler p50 {h[49]:.1f} us p99 {h[98]:.1f} us"
    )


@pytest.mark.parametrize(
    ("preload", "middleware"),
    [(False, False), (True, False), (False, True)],
    ids=["fork-then-import", "preload", "web-middleware"],
)
def test_every_call_delivered_exactly_once_through_worker_exit(
    api: tuple[str, Counts], tmp_path: Path, preload: bool, middleware: bool
) -> None:
    api_url, counts = api
    server = gunicorn(api_url, tmp_path, preload)
    try:
        port = server.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)")[0].group(1)
        base = f"http://127.0.0.1:{port}"
        booted = server.wait_for(r"Booting worker with pid: (\d+)", WORKERS)
        worker_pids = {int(m.group(1)) for m in booted}

        plain = send(base, "plain", REQUESTS)
        # /web/enqueue: the same handler under offload.web.WSGIMiddleware
        enqueued = send(base, "web/enqueue" if middleware else "enqueue", REQUESTS)
        print(f"\n[gunicorn -w {WORKERS}{' --preload' if preload else ''}]")
        print(summary("plain", plain))
        print(summary("enqueue", enqueued))
        served_by = {pid for _, _, pid in enqueued}
        assert served_by <= worker_pids and len(served_by) >= 2  # preforked workers shared it

        # Nothing could be delivered yet: the API holds every answer back.
        assert sum(counts.delivered.values()) == 0
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for(r"Worker exiting \(pid: \d+\)", WORKERS)
        counts.release.set()  # every worker is now in its exit path, calls still queued
        assert server.proc.wait(60) == 0, "".join(server.lines)
    finally:
        server.stop()

    rids = [f"r{i:04d}" for i in range(REQUESTS)]
    with counts.lock:
        delivered = dict(counts.delivered)
        attempts = dict(counts.attempts)
        boots = dict(counts.boots)
        pids = set(counts.pids)
    assert sorted(delivered) == rids and set(delivered.values()) == {1}  # exactly once each
    expected = {rid: 2 if int(rid[1:]) % 10 == 0 else 1 for rid in rids}
    assert attempts == expected  # the 503s retried once, nothing else repeated
    assert pids == served_by  # each call was made by the worker that took the request
    # The boot call enqueued at import: once in the master with --preload (the forked
    # workers must not deliver the master's queue again), once per worker otherwise.
    if preload:
        assert list(boots.values()) == [1] and int(next(iter(boots))) not in worker_pids
    else:
        assert {int(pid) for pid in boots} == worker_pids and set(boots.values()) == {1}
    assert "Traceback" not in "".join(server.lines)
