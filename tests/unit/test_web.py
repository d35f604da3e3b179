"""offload.web: a request's tasks wake the workers once its response has been sent."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

import offload.web
from offload import Offloader, SystemClock
from offload.stores.sqlite.store import SQLiteStore

WAIT = 10.0


def start_response(status: str, headers: list[tuple[str, str]]) -> None:
    pass


def environ(**extra: Any) -> dict[str, Any]:
    return {"REQUEST_METHOD": "POST", "PATH_INFO": "/", **extra}


class Done:
    """A task function that records what it was called with."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.event = threading.Event()

    def __call__(self, rid: str) -> None:
        self.seen.append(rid)
        self.event.set()


class Closable(list[bytes]):
    closed = False

    def close(self) -> None:
        self.closed = True


class Entering(SystemClock):
    """The real clock, telling when a worker has gone idle (begins to wait)."""

    def __init__(self) -> None:
        self.idle = threading.Event()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:  # type: ignore[override]
        self.idle.set()
        cond.wait(timeout)


DURABLE = Done()


def deliver_durably(rid: str) -> None:
    """A module-level task function, for the durable store."""
    DURABLE(rid)


def wsgi_app(off: Offloader, done: Callable[..., None], body: Iterable[bytes] | None = None) -> Any:
    def app(env: dict[str, Any], respond: Callable[..., Any]) -> Iterable[bytes]:
        off.enqueue_task(done, rid=env["PATH_INFO"])
        respond("200 OK", [("Content-Type", "text/plain")])
        return body if body is not None else [b"ok"]

    return app


def delivered(off: Offloader, done: Done) -> list[str]:
    """What `done` was called with, sorted, once `off` has nothing left to do."""
    assert off.flush(WAIT)
    return sorted(done.seen)


def request(off: Offloader, task: Callable[..., None], body: Any = None, **env: Any) -> Any:
    """One request through the middleware to an app that enqueues `task`: its response."""
    return offload.web.WSGIMiddleware(wsgi_app(off, task, body))(environ(**env), start_response)


def test_a_new_worker_starts_only_once_the_server_has_written_the_first_chunk(
    make_offloader: Callable[..., Offloader],
) -> None:
    off = make_offloader()
    done = Done()
    inner = Closable([b"o", b"k"])
    result = request(off, done, inner)
    chunks = iter(result)
    assert next(chunks) == b"o"  # the server writes this one now
    stats = off.stats()
    assert (stats.enqueued, stats.queued) == (1, 1)  # queued and counted, not yet worked
    assert not off._pool.threads
    assert list(chunks) == [b"k"]  # it asked for more: the first chunk is out
    assert off._pool.threads
    result.close()  # type: ignore[attr-defined]
    assert inner.closed  # the application's own close still runs
    assert delivered(off, done) == ["/"]


def test_a_response_closed_before_its_body_is_read_lets_the_hold_go(
    make_offloader: Callable[..., Offloader],
) -> None:
    off = make_offloader()
    done = Done()
    result = request(off, done)
    assert not off._pool.threads
    result.close()  # type: ignore[attr-defined]  # (a HEAD request, a client gone)
    assert off._pool.threads
    assert delivered(off, done) == ["/"]


def test_a_list_body_keeps_its_length_and_a_file_like_body_is_passed_as_it_is(
    make_offloader: Callable[..., Offloader], tmp_path: Path
) -> None:
    off = make_offloader()
    done = Done()
    listed = request(off, done, [b"ok"])
    assert len(listed) == 1  # type: ignore[arg-type]  # wsgiref sets Content-Length from it
    listed.close()  # type: ignore[attr-defined]
    (tmp_path / "f").write_bytes(b"file")
    with open(tmp_path / "f", "rb") as body:  # what uWSGI's file_wrapper hands back
        uwsgi_wrapper = {"wsgi.file_wrapper": lambda f, size=8192: f}  # a function
        assert request(off, done, body, **uwsgi_wrapper) is body
    assert delivered(off, done) == ["/", "/"]


def test_an_idle_worker_is_woken_only_when_the_response_is_closed(
    make_offloader: Callable[..., Offloader],
) -> None:
    clock = Entering()
    off = make_offloader(clock=clock, idle_timeout=60)
    first = Done()
    off.enqueue_task(first, rid="warm")
    assert off.flush(WAIT)
    assert clock.idle.wait(WAIT)  # the worker waits on its Condition now
    done = Done()
    result = request(off, done)
    with off._core.lock:
        assert off._core.waiting  # the idle worker was not woken: it is still listed
    assert not done.event.is_set()
    result.close()  # type: ignore[attr-defined]
    assert done.event.wait(WAIT)
    assert off.flush(WAIT)


def test_a_response_never_closed_lets_its_hold_go_when_it_is_dropped(
    make_offloader: Callable[..., Offloader],
) -> None:
    off = make_offloader()
    done = Done()
    result = request(off, done)
    assert not off._pool.threads
    del result
    assert done.event.wait(WAIT)  # no flush: the drop alone woke the worker


def test_a_response_collected_while_its_offloader_is_locked_does_not_deadlock(
    make_offloader: Callable[..., Offloader],
) -> None:
    off = make_offloader()
    done = Done()
    result = request(off, done)
    cycle: list[Any] = [result]
    cycle.append(cycle)  # only the cyclic GC frees it, at whatever moment it runs
    del result, cycle
    collected = threading.Event()

    def collect_under_the_lock() -> None:
        with off._core.lock:  # as if the GC ran inside one of offload's locked sections
            gc.collect()
        collected.set()

    thread = threading.Thread(target=collect_under_the_lock, daemon=True)
    thread.start()
    assert collected.wait(WAIT), "the response's __del__ waited for a lock its thread held"
    assert done.event.wait(WAIT)


@pytest.mark.parametrize("how", ["flush", "shutdown"])
def test_flush_in_one_request_gives_another_requests_held_wake_up(
    make_offloader: Callable[..., Offloader], how: str
) -> None:
    off = make_offloader()
    done = Done()
    first = request(off, done)
    outcome: list[bool] = []

    def flushing(env: dict[str, Any], respond: Callable[..., Any]) -> Iterable[bytes]:
        outcome.append(getattr(off, how)(WAIT))  # its own hold, open, must not keep it
        respond("200 OK", [])
        return [b"ok"]

    offload.web.WSGIMiddleware(flushing)(environ(), start_response)
    assert outcome == [True]
    assert done.seen == ["/"]
    first.close()  # type: ignore[attr-defined]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")
def test_a_child_forked_in_a_request_is_not_held() -> None:
    script = textwrap.dedent(
        """
        import os, sys, threading
        import offload, offload.web

        ran = threading.Event()

        def task():
            ran.set()

        def app(environ, start_response):
            pid = os.fork()
            if pid == 0:  # the child: the request's context, not the request
                off = offload.Offloader()
                off.enqueue_task(task)
                os._exit(0 if ran.wait(10) else 7)
            _, status = os.waitpid(pid, 0)
            start_response("200 OK", [])
            return [str(os.waitstatus_to_exitcode(status)).encode()]

        print(b"".join(offload.web.WSGIMiddleware(app)({}, lambda s, h: None)).decode())
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert run.stdout.strip() == "0", run.stderr


@pytest.mark.parametrize("how", ["flush", "shutdown"])
def test_flush_and_shutdown_elsewhere_let_the_holds_of_open_responses_go(
    make_offloader: Callable[..., Offloader], how: str
) -> None:
    off = make_offloader()
    done = Done()
    app = offload.web.WSGIMiddleware(wsgi_app(off, done))
    open_responses = [app(environ(PATH_INFO=f"/{i}"), start_response) for i in range(3)]
    assert not off._pool.threads
    assert getattr(off, how)(WAIT)
    assert sorted(done.seen) == ["/0", "/1", "/2"]
    for result in open_responses:
        result.close()  # type: ignore[attr-defined]  # (nothing left to give)
    assert off.stats().succeeded == 3


def test_a_request_that_enqueues_nothing_gets_its_response_back_untouched(
    make_offloader: Callable[..., Offloader],
) -> None:
    inner = Closable([b"ok"])

    def app(env: dict[str, Any], respond: Callable[..., Any]) -> Iterable[bytes]:
        respond("200 OK", [])
        return inner

    assert offload.web.WSGIMiddleware(app)(environ(), start_response) is inner


def test_a_file_the_server_sends_itself_is_not_wrapped_and_the_workers_start_at_once(
    make_offloader: Callable[..., Offloader],
) -> None:
    class FileWrapper:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def __iter__(self) -> Any:
            return iter([self.data])

    off = make_offloader()
    done = Done()
    sent = FileWrapper(b"file")
    assert request(off, done, sent, **{"wsgi.file_wrapper": FileWrapper}) is sent
    assert delivered(off, done) == ["/"]


def test_an_application_that_raises_lets_the_hold_go(
    make_offloader: Callable[..., Offloader],
) -> None:
    off = make_offloader()
    done = Done()

    def app(env: dict[str, Any], respond: Callable[..., Any]) -> Iterable[bytes]:
        off.enqueue_task(done, rid="before the error")
        raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError, match="the handler failed"):
        offload.web.WSGIMiddleware(app)(environ(), start_response)
    assert delivered(off, done) == ["before the error"]


def test_a_worker_that_cannot_start_after_the_response_is_logged_and_the_task_kept(
    make_offloader: Callable[..., Offloader],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    off = make_offloader()
    done = Done()
    refused: list[str] = []

    class Refused(threading.Thread):
        """A thread that the system refuses once (a process at its thread limit)."""

        def start(self) -> None:
            if not refused:
                refused.append(self.name)
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(threading, "Thread", Refused)
    with caplog.at_level(logging.WARNING, logger="offload"):
        request(off, done).close()
    assert refused == ["offload-worker"]
    assert "could not start a worker after the response (cannot start" in caplog.text
    assert not off._pool.threads and off.stats().queued == 1  # kept, not lost
    off.enqueue_task(done, rid="next")  # the next enqueue starts a worker, for both
    assert delivered(off, done) == ["/", "next"]


def test_flush_in_a_request_lets_the_hold_go(make_offloader: Callable[..., Offloader]) -> None:
    off = make_offloader()
    done = Done()
    flushed: list[bool] = []

    def app(env: dict[str, Any], respond: Callable[..., Any]) -> Iterable[bytes]:
        off.enqueue_task(done, rid="flushed")
        flushed.append(off.flush(WAIT))
        respond("200 OK", [])
        return [b"ok"]

    result = offload.web.WSGIMiddleware(app)(environ(), start_response)
    assert flushed == [True]
    assert done.seen == ["flushed"]
    assert list(result) == [b"ok"]


def test_enqueues_outside_a_request_are_not_held(make_offloader: Callable[..., Offloader]) -> None:
    off = make_offloader()
    done = Done()
    inner = Closable([b"ok"])
    result = request(off, done, inner)
    off.enqueue_task(done, rid="after the handler returned")  # the server's thread, unheld
    assert off._pool.threads
    result.close()  # type: ignore[attr-defined]
    assert delivered(off, done) == ["/", "after the handler returned"]


def test_a_durable_task_is_written_before_enqueue_returns_while_its_wake_up_is_held(
    make_offloader: Callable[..., Offloader], tmp_path: Path
) -> None:
    path = tmp_path / "q.db"
    off = make_offloader(store=f"sqlite:///{path}")
    result = request(off, deliver_durably)
    assert not off._pool.threads
    look = SQLiteStore(path)
    try:
        counts = look.counts()
    finally:
        look.close()
    assert counts.ready + counts.leased == 1
    result.close()  # type: ignore[attr-defined]
    assert off.flush(WAIT)
    assert DURABLE.seen == ["/"]


def asgi_request(app: Any) -> list[dict[str, Any]]:
    """Run one HTTP request through an ASGI `app`; the messages it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": "/"}, receive, send))
    return sent


def test_asgi_workers_start_once_the_first_body_message_is_sent(
    make_offloader: Callable[..., Offloader],
) -> None:
    off = make_offloader()
    done = Done()
    threads_seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.to_thread(off.enqueue_task, done, rid="from a thread")  # shares the context
        off.enqueue_task(done, rid="from the loop")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        threads_seen.append(len(off._pool.threads))
        await send({"type": "http.response.body", "body": b"o", "more_body": True})
        threads_seen.append(len(off._pool.threads))  # a stream holds nothing for its length
        await send({"type": "http.response.body", "body": b"k"})
        await asyncio.to_thread(off.enqueue_task, done, rid="after the response")

    sent = asgi_request(offload.web.ASGIMiddleware(app))
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert threads_seen == [0, 1]
    assert delivered(off, done) == ["after the response", "from a thread", "from the loop"]


@pytest.mark.parametrize(
    "last",
    [
        {"type": "http.response.pathsend", "path": "/etc/hostname"},
        {"type": "http.response.zerocopysend", "file": 3},
    ],
    ids=["pathsend", "zerocopysend"],
)
def test_an_asgi_response_ended_by_an_extension_lets_the_hold_go(
    make_offloader: Callable[..., Offloader], last: dict[str, Any]
) -> None:
    off = make_offloader()
    done = Done()
    threads_seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        off.enqueue_task(done, rid="file")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        threads_seen.append(len(off._pool.threads))
        await send(last)
        threads_seen.append(len(off._pool.threads))

    asgi_request(offload.web.ASGIMiddleware(app))
    assert threads_seen == [0, 1]
    assert delivered(off, done) == ["file"]


def test_an_asgi_request_that_ends_without_a_body_lets_the_hold_go(
    make_offloader: Callable[..., Offloader],
) -> None:
    off = make_offloader()
    done = Done()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        off.enqueue_task(done, rid="no answer")
        raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError, match="the handler failed"):
        asgi_request(offload.web.ASGIMiddleware(app))
    assert delivered(off, done) == ["no answer"]


def test_other_asgi_scopes_pass_through(make_offloader: Callable[..., Offloader]) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    async def nothing() -> dict[str, Any]:
        return {}

    async def drop(message: Any) -> None:
        pass

    asyncio.run(offload.web.ASGIMiddleware(app)({"type": "lifespan"}, nothing, drop))
    assert seen == ["lifespan"]


def test_a_websockets_tasks_are_not_held_until_it_closes(
    make_offloader: Callable[..., Offloader],
) -> None:
    """A WebSocket may stay open for hours: a task enqueued in it is performed while it is
    open, not held as a request's tasks are until its response is sent."""
    off = make_offloader()
    done = Done()
    performed_while_open: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        off.enqueue_task(done, rid="pushed")
        performed_while_open.append(await asyncio.to_thread(done.event.wait, WAIT))

    async def nothing() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def drop(message: Any) -> None:
        pass

    scope = {"type": "websocket", "path": "/ws", "headers": []}
    asyncio.run(offload.web.ASGIMiddleware(app)(scope, nothing, drop))
    assert performed_while_open == [True]
    assert delivered(off, done) == ["pushed"]


@pytest.mark.parametrize("middleware", [offload.web.WSGIMiddleware, offload.web.ASGIMiddleware])
def test_a_middleware_wraps_an_application_only(middleware: Any) -> None:
    with pytest.raises(TypeError, match=r"wraps an? (WSGI|ASGI) application, not 'app'"):
        middleware("app")


def test_stress_requests_from_many_threads_hold_and_give_every_wake_up(
    make_offloader: Callable[..., Offloader],
) -> None:
    off = make_offloader(workers=3, idle_timeout=0.01)  # workers come and go throughout
    seen: list[str] = []
    ran = threading.Semaphore(0)

    def task(rid: str) -> None:
        seen.append(rid)
        ran.release()

    app = offload.web.WSGIMiddleware(wsgi_app(off, task))
    per_thread, threads = 300, 6
    ledger_broken: list[str] = []

    def client(n: int) -> None:
        for i in range(per_thread):
            result = app(environ(PATH_INFO=f"/{n}/{i}"), start_response)
            close = getattr(result, "close", None)  # (unwrapped when nothing was held)
            if close is not None and i % 3:
                close()
            del result, close  # every third response is dropped unclosed
            s = off.stats()
            if s.enqueued != s.succeeded + s.dead_lettered + s.queued + s.delayed + s.in_flight:
                ledger_broken.append(repr(s))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    for _ in range(per_thread * threads):  # each task ran, without any flush to help
        assert ran.acquire(timeout=WAIT)
    assert off.flush(WAIT)
    assert not ledger_broken
    assert sorted(seen) == sorted(f"/{n}/{i}" for n in range(threads) for i in range(per_thread))
    s = off.stats()
    assert s.enqueued == s.succeeded == per_thread * threads


def test_a_request_still_open_at_exit_has_its_task_delivered_without_a_wait() -> None:
    script = textwrap.dedent(
        """
        import offload, offload.web

        def task():
            print("delivered", flush=True)

        def app(environ, start_response):
            offload.enqueue_task(task)
            start_response("200 OK", [])
            return [b"ok"]

        OPEN = offload.web.WSGIMiddleware(app)({}, lambda s, h: None)  # never closed
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert run.stdout.split() == ["delivered"]
    assert "not delivered yet" not in run.stderr, run.stderr  # the exit hook did not wait
