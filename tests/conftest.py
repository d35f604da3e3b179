"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server import ScriptedServer


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """A real local HTTP server with scripted answers (see tests/server.py)."""
    srv = ScriptedServer()
    try:
        yield srv
    finally:
        srv.close()
