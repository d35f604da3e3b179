"""The Flask app of the gunicorn test under a real uWSGI: `--master --processes 3
--http-socket 127.0.0.1:0`, the application loaded in the master and forked (uWSGI's
default, with `--py-call-uwsgi-fork-hooks`) or loaded in each worker (`--lazy-apps`).

Never with `--enable-threads`: from uWSGI 2.0.27 the application's threads run without
it, and the calls must be delivered all the same. The local counting API holds every
answer back until each worker has said, in offload's exit WARNING, that it waits for
its calls, so every worker exits holding them; each must then be delivered exactly once
(one in ten is answered 503 first and retried), through a stop (SIGINT to the master),
and through a graceful reload (SIGHUP) with requests still coming in. A reload while
the API does not answer must say what it waits for and end at OFFLOAD_SHUTDOWN_TIMEOUT;
the master, when it loads the application without the fork hooks, must warn that a
worker forked while offload's thread runs can hang.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from procs import SUPPORT
from served import Counts, LoggedProcess, counting_api, send

WORKERS = 3
REQUESTS = 300
ANNOUNCED = r"offload: (\d+) call\(s\) not delivered yet at exit; waiting up to ([\d.]+)s"
MODES = {
    "fork-after-load": ["--py-call-uwsgi-fork-hooks"],
    "lazy-apps": ["--lazy-apps"],
}


def _uwsgi_binary() -> str:
    """The uwsgi next to this interpreter (the test extra installs it), else on PATH;
    under CI a missing or older uWSGI fails the tests, elsewhere it skips them."""
    found = shutil.which("uwsgi", path=os.path.dirname(sys.executable)) or shutil.which("uwsgi")
    problem = None
    if found is None:
        problem = "uwsgi is not installed (pip install -e '.[test]' builds it)"
    else:
        version = subprocess.run(
            [found, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
        parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
        if parts < (2, 0, 27):  # older ones run no thread without --enable-threads
            problem = f"uWSGI {version or '?'} found, 2.0.27 or later needed"
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"uWSGI is needed under CI: {problem}")
        pytest.skip(problem)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def uwsgi_binary() -> str:
    return _uwsgi_binary()


@pytest.fixture
def api() -> Iterator[tuple[str, Counts]]:
    with counting_api() as served:
        yield served


class Uwsgi(LoggedProcess):
    """`uwsgi --master --processes 3 --http-socket` on 127.0.0.1 serving
    tests/support/gunicorn_app.py, its log collected."""

    def __init__(
        self, binary: str, api_url: str, options: list[str], shutdown_timeout: float = 30
    ) -> None:
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        env.update(OFFLOAD_TEST_API=api_url, OFFLOAD_SHUTDOWN_TIMEOUT=str(shutdown_timeout))
        venv = ["--virtualenv", sys.prefix] if sys.prefix != sys.base_prefix else []
        args = [
            binary,
            "--master",
            "--processes",
            str(WORKERS),
            "--http-socket",  # a socket of the test's own, which survives reloads
            f"fd://{listener.fileno()}",
            "--chdir",
            SUPPORT,
            "--module",
            "gunicorn_app:app",
            "--need-app",
            *venv,
            # What the README asks for: room for offload's exit hook and a margin.
            "--worker-reload-mercy",
            str(int(shutdown_timeout) + 30),
            "--reload-mercy",
            str(int(shutdown_timeout) + 30),
            "--disable-logging",  # no line per request
            *options,
        ]
        assert "--enable-threads" not in args
        with listener:
            super().__init__(args, env, pass_fds=(listener.fileno(),))
            self.base = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def workers(self) -> list[int]:
        """The pids of every worker spawned so far, in order."""
        return [int(m.group(1)) for m in self.matching(r"spawned uWSGI worker \d+ \(pid: (\d+)")]

    def announced(self) -> list[int]:
        """The call counts of offload's exit WARNINGs logged so far."""
        return [int(m.group(1)) for m in self.matching(ANNOUNCED)]


def _booted(counts: Counts, pids: int) -> None:
    """Wait until `pids` processes have delivered their boot call (the app is loaded)."""
    assert counts.wait_for(lambda: len(counts.boots) >= pids), dict(counts.boots)


def _delivered_once(counts: Counts, rids: list[str]) -> dict[str, int]:
    with counts.lock:
        delivered, attempts = dict(counts.delivered), dict(counts.attempts)
    assert sorted(delivered) == rids and set(delivered.values()) == {1}  # exactly once each
    expected = {rid: 2 if int(rid[1:]) % 10 == 0 else 1 for rid in rids}
    assert attempts == expected  # the 503s retried once, nothing else repeated
    return delivered


def _clean(server: Uwsgi) -> None:
    log = server.log
    assert "Traceback" not in log, log
    assert "NO MERCY" not in log, log  # no worker outlived its mercy (a hang)
    assert "has not run yet" not in log, log  # the worker thread ran without enable-threads
    assert "offload: a worker thread started in the uWSGI master" not in log, log


@pytest.mark.parametrize("mode", list(MODES))
def test_every_call_delivered_exactly_once_through_a_stop(
    uwsgi_binary: str, api: tuple[str, Counts], mode: str
) -> None:
    api_url, counts = api
    server = Uwsgi(uwsgi_binary, api_url, MODES[mode])
    try:
        _booted(counts, 1 if mode == "fork-after-load" else WORKERS)
        assert "python threads support enabled" in server.log
        enqueued = send(server.base, "enqueue", REQUESTS)
        workers = set(server.workers())
        served_by = {pid for _, _, pid in enqueued}
        assert served_by <= workers and len(served_by) >= 2  # preforked workers shared it
        assert sum(counts.delivered.values()) == 0  # the API holds every answer back

        server.proc.send_signal(signal.SIGINT)  # uWSGI 2.0: stop the instance
        server.wait_for(ANNOUNCED, len(served_by), timeout=60)
        assert sum(server.announced()) == REQUESTS  # every call still held, and said so
        counts.release.set()
        assert server.proc.wait(90) == 0, server.log
    finally:
        server.stop()

    _delivered_once(counts, [f"r{i:04d}" for i in range(REQUESTS)])
    with counts.lock:
        pids, boots = set(counts.pids), dict(counts.boots)
    assert pids == served_by  # each call was made by the worker that took the request
    if mode == "fork-after-load":  # the master's boot call, once: the workers start empty
        assert list(boots.values()) == [1] and int(next(iter(boots))) not in workers
    else:
        assert {int(pid) for pid in boots} == workers and set(boots.values()) == {1}
    _clean(server)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_graceful_reload_mid_traffic_delivers_every_call_once(
    uwsgi_binary: str, api: tuple[str, Counts], mode: str
) -> None:
    api_url, counts = api
    first, second = REQUESTS // 3, REQUESTS - REQUESTS // 3
    server = Uwsgi(uwsgi_binary, api_url, MODES[mode])
    results: list[Any] = []
    try:
        _booted(counts, 1 if mode == "fork-after-load" else WORKERS)
        before = send(server.base, "enqueue", first)
        old = set(server.workers())
        old_served = {pid for _, _, pid in before}

        # The reload, with the old workers holding their calls and requests still coming;
        # these through offload.web.WSGIMiddleware (/web/), whose wake-ups wait for the
        # response: uWSGI closes it, and every call is delivered once all the same.
        server.proc.send_signal(signal.SIGHUP)
        more = threading.Thread(
            target=lambda: results.append(send(server.base, "web/enqueue", second, start=first))
        )
        more.start()
        server.wait_for(ANNOUNCED, len(old_served), timeout=60)
        counts.release.set()  # the old workers deliver what they hold, and go
        more.join(120)
        assert results, server.log  # every request of the second batch answered 200
        assert counts.wait_for(lambda: len(counts.delivered) == REQUESTS), server.log
        new = set(server.workers()) - old
        assert len(new) >= WORKERS, server.log  # the reload replaced every worker
        after = {pid for _, _, pid in results[0]}
        assert after & new, "no request of the second batch reached a new worker"
        assert server.proc.poll() is None  # a reload, not a stop
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(90) == 0, server.log
    finally:
        server.stop()

    _delivered_once(counts, [f"r{i:04d}" for i in range(REQUESTS)])
    with counts.lock:
        pids = set(counts.pids)
    assert pids == old_served | after
    _clean(server)


def test_a_reload_while_the_api_does_not_answer_says_so_and_ends_at_the_deadline(
    uwsgi_binary: str, api: tuple[str, Counts]
) -> None:
    """The API never answers: each old worker warns, a second into its exit, how many
    calls it waits for and how long, then gives up at OFFLOAD_SHUTDOWN_TIMEOUT with its
    dead letters named; the new workers serve."""
    api_url, counts = api
    timeout = 4.0
    server = Uwsgi(uwsgi_binary, api_url, MODES["lazy-apps"], shutdown_timeout=timeout)
    try:
        _booted(counts, WORKERS)
        old_served = {pid for _, _, pid in send(server.base, "enqueue", 60)}
        old = set(server.workers())
        server.proc.send_signal(signal.SIGHUP)
        announced = server.wait_for(ANNOUNCED, len(old_served), timeout=60)
        for match in announced:
            assert 0 < float(match.group(2)) <= timeout
        assert sum(server.announced()) == 60
        line = announced[0].string
        assert "OFFLOAD_SHUTDOWN_TIMEOUT" in line and "worker-reload-mercy" in line
        # At the deadline: what each worker still holds, named, and the worker goes.
        server.wait_for(r"offload shut down with \d+ task\(s\) undelivered", len(old_served))
        server.wait_for(r"spawned uWSGI worker \d+ \(pid: \d+", len(old) + WORKERS, timeout=60)
        answer = requests.post(f"{server.base}/plain/r9999", timeout=60)
        assert answer.status_code == 200 and int(answer.headers["X-Pid"]) not in old
    finally:
        server.stop()
    _clean(server)


def test_the_master_warns_when_it_loads_the_app_without_the_fork_hooks(
    uwsgi_binary: str, api: tuple[str, Counts]
) -> None:
    """uWSGI's default without --py-call-uwsgi-fork-hooks: the app's boot call starts
    offload's thread in the master, and a worker forked while it runs Python hangs.
    Said once, naming the options to set. (The workers may hang: the test stops there.)"""
    api_url, _ = api
    server = Uwsgi(uwsgi_binary, api_url, [])
    try:
        hazard = server.wait_for(r"offload: a worker thread started in the uWSGI master.*")
        line = hazard[0].group(0)
        assert "--py-call-uwsgi-fork-hooks" in line and "--lazy-apps" in line
        server.wait_for(r"spawned uWSGI worker \d+", WORKERS)
        assert len(server.matching("a worker thread started in the uWSGI master")) == 1
    finally:
        server.stop()
