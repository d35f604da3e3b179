"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from offload import Offloader, _default
from server import ScriptedServer


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """A real local HTTP server with scripted answers (see tests/server.py)."""
    srv = ScriptedServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def make_offloader() -> Iterator[Callable[..., Offloader]]:
    """Make Offloaders that are shut down (and checked for stray workers) at teardown."""
    made: list[Offloader] = []

    def make(**options: Any) -> Offloader:
        options.setdefault("idle_timeout", 0.5)
        offloader = Offloader(**options)
        made.append(offloader)
        return offloader

    yield make
    for offloader in made:
        offloader.shutdown(timeout=5)


@pytest.fixture(autouse=True)
def _fresh_default() -> Iterator[None]:
    """Each test starts without a module-level default offloader or configured options."""
    _default.reset()
    yield
    _default.reset()


def wait_workers_exit(offloader: Offloader, timeout: float = 5.0) -> bool:
    """Join the offloader's worker threads (they exit when idle)."""
    for thread in list(offloader._threads):
        thread.join(timeout)
    return not offloader.running
