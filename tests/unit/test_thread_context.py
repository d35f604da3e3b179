"""Offload's threads run in an empty context, also where a new thread begins with a copy
of its starter's (Python 3.14's thread_inherit_context, the default on free-threaded
builds): a worker started by one request's enqueue must not carry that request's context
variables into every later task."""

from __future__ import annotations

import contextvars
import threading
from pathlib import Path

import pytest

import offload

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


@pytest.fixture
def inheriting_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every thread started from here on begins in a copy of its starter's context, as
    Python 3.14 starts them with thread_inherit_context set."""
    start = threading.Thread.start

    def start_in_a_copy(self: threading.Thread) -> None:
        context = contextvars.copy_context()
        run = self.run
        self.run = lambda: context.run(run)  # type: ignore[method-assign]
        start(self)

    monkeypatch.setattr(threading.Thread, "start", start_in_a_copy)
    seen: list[str | None] = []
    probe = threading.Thread(target=lambda: seen.append(REQUEST_ID.get()))
    contextvars.copy_context().run(lambda: (REQUEST_ID.set("probe"), probe.start()))
    probe.join()
    assert seen == ["probe"], "the fixture does not make threads inherit"


def record_request_id(seen: list[str | None]) -> None:
    seen.append(REQUEST_ID.get())


def in_request(request_id: str, off: offload.Offloader, seen: list[str | None]) -> None:
    REQUEST_ID.set(request_id)
    off.enqueue_task(record_request_id, seen)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_worker_started_in_a_request_carries_none_of_its_context(
    inheriting_threads: None, store: str, tmp_path: Path
) -> None:
    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path / 'o.db'}"
    seen: list[str | None] = []
    off = offload.Offloader(store=url)
    try:
        # The first enqueue starts the worker (and, over SQLite, the lease keeper).
        contextvars.copy_context().run(in_request, "first request", off, seen)
        assert off.flush(10)
        contextvars.copy_context().run(in_request, "second request", off, seen)
        assert off.flush(10)
    finally:
        assert off.shutdown(10)
    assert seen == [None, None]
