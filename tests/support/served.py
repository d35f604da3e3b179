"""A real web server in a subprocess, a counting API for its calls, and its clients: the
parts tests/system/test_gunicorn.py and test_uwsgi.py share (the app they serve is
tests/support/gunicorn_app.py).

- `counting_api()`: a local API on 127.0.0.1 that counts, per request id, the calls the
  served app's workers deliver (POST /deliver/<rid>, held back until `Counts.release` is
  set; one in ten answered 503 once and retried) and the boot call each process makes
  at import (POST /boot/<pid>).
- `LoggedProcess`: the server's process, its log lines collected, waited on by pattern.
- `send()`: POST /<kind>/r0000... from several client threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

__all__ = ["CLIENTS", "Counts", "LoggedProcess", "counting_api", "send"]

CLIENTS = 8


@dataclass
class Counts:
    """What the counting API saw; read under `lock`, waited on with `changed`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)
    release: threading.Event = field(default_factory=threading.Event)
    attempts: Counter[str] = field(default_factory=Counter)  # rid -> requests
    delivered: Counter[str] = field(default_factory=Counter)  # rid -> 200s answered
    boots: Counter[str] = field(default_factory=Counter)  # pid -> boot calls
    pids: set[int] = field(default_factory=set)  # processes the calls were enqueued in

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def wait_for(self, done: Any, timeout: float = 60) -> bool:
        """Block until `done()` (called with the lock held) is true, or `timeout`."""
        with self.changed:
            return bool(self.changed.wait_for(done, timeout))


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
            counts.release.wait(30)  # held until the test lets the calls through
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


@contextmanager
def counting_api() -> Iterator[tuple[str, Counts]]:
    """The counting API on 127.0.0.1: (its base URL, what it counts)."""
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


class LoggedProcess:
    """`args` in a subprocess of its own session, its stderr lines collected."""

    def __init__(
        self, args: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()
    ) -> None:
        self.proc = subprocess.Popen(
            args,
            pass_fds=pass_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,  # stop() ends its children too, whatever they do
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

    @property
    def log(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def matching(self, pattern: str) -> list[re.Match[str]]:
        """The log lines (so far) that match `pattern`."""
        regex = re.compile(pattern)
        with self._changed:
            return [m for m in map(regex.search, self.lines) if m]

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
        assert ok and len(matches) >= count, f"waited for {count} x {pattern!r}\n{self.log}"
        return matches

    def stop(self) -> None:
        """Kill what is left of the process and its children, and collect the log."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        # The children of a server killed outright (a uWSGI master's workers).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def send(
    base: str, kind: str, count: int, start: int = 0, clients: int = CLIENTS
) -> list[tuple[float, int, int]]:
    """POST /kind/r{start:04d}... `count` times from `clients` threads; (round trip s,
    handler ns, pid) each."""

    def one(i: int) -> tuple[float, int, int]:
        started = time.perf_counter()
        response = requests.post(f"{base}/{kind}/r{i:04d}", timeout=60)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        return elapsed, int(response.headers["X-Handler-Ns"]), int(response.headers["X-Pid"])

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(start, start + count)))
