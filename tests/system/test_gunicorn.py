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

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from procs import SUPPORT

HERE = Path(SUPPORT)
WORKERS = 3
REQUESTS = 300
CLIENTS = 8


# -- the counting API -----------------------------------------------------------------------


@dataclass
class Counts:
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)
    release: threading.Event = field(default_factory=threading.Event)
    attempts: Counter[str] = field(default_factory=Counter)  # rid -> requests
    delivered: Counter[str] = field(default_factory=Counter)  # rid -> 200s answered
    boots: Counter[str] = field(default_factory=Counter)  # pid -> boot calls
    pids: set[int] = field(default_factory=set)  # processes the calls were enqueued in

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)


class _Handler(BaseHTTPRequestHandler):
    server: _CountingServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        counts = self.server.counts
        kind, _, name = self.path.strip("/").partition("/")
        status = 200
        if kind == "boot":
            with counts.changed:
                counts.boots[name] += 1
                counts.changed.notify_all()
        elif kind == "deliver":
            counts.release.wait(30)  # held until the workers are exiting
            with counts.changed:
                counts.attempts[name] += 1
                first = counts.attempts[name] == 1
                if int(name[1:]) % 10 == 0 and first:
                    status = 503  # one in ten fails once and is retried
                else:
                    counts.delivered[name] += 1
                    counts.pids.add(json.loads(body)["pid"])
                counts.changed.notify_all()
        else:
            status = 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    counts: Counts


@pytest.fixture
def api() -> Iterator[tuple[str, Counts]]:
    httpd = _CountingServer(("127.0.0.1", 0), _Handler)
    httpd.counts = Counts()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.counts
    finally:
        httpd.counts.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


# -- gunicorn -------------------------------------------------------------------------------


class Gunicorn:
    """`gunicorn -w N tests/support/gunicorn_app:app` in a subprocess, its log lines collected."""

    def __init__(self, api_url: str, tmp_path: Path, preload: bool) -> None:
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
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<eof>")
            self._changed.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20) -> list[re.Match[str]]:
        """Block until `count` log lines match `pattern`; fail with the log otherwise."""
        regex = re.compile(pattern)

        def found() -> list[re.Match[str]]:
            return [m for m in map(regex.search, self.lines) if m]

        with self._changed:
            ok = self._changed.wait_for(
                lambda: len(found()) >= count or "<eof>" in self.lines, timeout
            )
            matches = found()
        assert ok and len(matches) >= count, "".join(self.lines)
        return matches

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def send(base: str, kind: str, count: int) -> list[tuple[float, int, int]]:
    """POST /kind/r0000... `count` times from CLIENTS threads; (round trip s, handler ns, pid)."""

    def one(i: int) -> tuple[float, int, int]:
        started = time.perf_counter()
        response = requests.post(f"{base}/{kind}/r{i:04d}", timeout=30)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        return elapsed, int(response.headers["X-Handler-Ns"]), int(response.headers["X-Pid"])

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(one, range(count)))


def summary(label: str, results: list[tuple[float, int, int]]) -> str:
    rtt = sorted(r[0] * 1e3 for r in results)
    handler = sorted(r[1] / 1e3 for r in results)
    q = statistics.quantiles(rtt, n=100)
    h = statistics.quantiles(handler, n=100)
    return (
        f"{label:8} round trip p50 {q[49]:.2f} ms p99 {q[98]:.2f} ms; "
        f"in handler p50 {h[49]:.1f} us p99 {h[98]:.1f} us"
    )


@pytest.mark.parametrize("preload", [False, True], ids=["fork-then-import", "preload"])
def test_every_call_delivered_exactly_once_through_worker_exit(
    api: tuple[str, Counts], tmp_path: Path, preload: bool
) -> None:
    api_url, counts = api
    server = Gunicorn(api_url, tmp_path, preload)
    try:
        port = server.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)")[0].group(1)
        base = f"http://127.0.0.1:{port}"
        booted = server.wait_for(r"Booting worker with pid: (\d+)", WORKERS)
        worker_pids = {int(m.group(1)) for m in booted}

        plain = send(base, "plain", REQUESTS)
        enqueued = send(base, "enqueue", REQUESTS)
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
