"""Shared fixtures."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# The tests' own helpers (servers, subprocess runners) in tests/support/, importable by name.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))

from offload import Offloader, _default
from server import ScriptedServer


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """A real local HTTP server with scripted answers (see tests/support/server.py)."""
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
        if not offloader._owns_store:  # a Store the test made: shutdown leaves it open
            offloader.store.close()


@pytest.fixture(autouse=True)
def _fresh_default() -> Iterator[None]:
    """Each test starts without a module-level default offloader or configured options."""
    _default.reset()
    yield
    _default.reset()


def wait_workers_exit(offloader: Offloader, timeout: float = 5.0) -> bool:
    """Join the offloader's worker threads (they exit when idle)."""
    for thread in list(offloader._pool.threads):
        thread.join(timeout)
    return not offloader.running


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real AWS endpoint for the SQS store: moto's ThreadedMotoServer on 127.0.0.1.

    Shared by the session; each test uses queues of its own (`sqs_store_url`).
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    moto_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto_server.start()
    host, port = moto_server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        moto_server.stop()


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake AWS credentials and region in the environment (and for subprocesses)."""
    fake = {
        "AWS_ACCESS_KEY_ID": "AKIAOFFLOADTESTFAKE1",
        "AWS_SECRET_ACCESS_KEY": "offload-test-fake-secret",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    for name, value in fake.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(name, raising=False)
    return fake


@pytest.fixture
def sqs_store_url(moto_endpoint: str, aws_credentials: dict[str, str]) -> str:
    """An `sqs://` store URL naming a queue no other test uses, on the moto endpoint."""
    import uuid

    return f"sqs://q{uuid.uuid4().hex[:12]}?region=eu-west-1&endpoint_url={moto_endpoint}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL server of the session's own (see tests/support/pgserver.py).

    Under CI (CI=true) a server that cannot start fails the tests that need it; elsewhere
    they are skipped, saying why."""
    from contextlib import ExitStack

    from pgserver import PgServer, PgUnavailable

    with ExitStack() as stack:
        try:
            import psycopg  # noqa: F401

            server = stack.enter_context(PgServer.start())
        except (PgUnavailable, ImportError) as exc:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"PostgreSQL is needed under CI and could not start: {exc}")
            pytest.skip(f"no PostgreSQL server here: {exc}")
        yield server


@pytest.fixture
def postgres_url(postgres: Any) -> Iterator[str]:
    """A `postgresql://` store URL on the session's server, in a schema no other test uses
    (dropped afterwards)."""
    import uuid

    import psycopg

    schema = f"t{uuid.uuid4().hex[:12]}"
    yield postgres.url(query=f"schema={schema}")
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
