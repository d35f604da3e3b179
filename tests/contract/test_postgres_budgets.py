"""A declared rate shared by every process on one PostgreSQL store (the session's real
server, a schema per test): the budgets table, and two real processes against a real
server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from offload.stores.base import BudgetStore
from offload.stores.postgres import PostgresStore, parse_postgres_url
from offload.stores.postgres.schema import SCHEMA_VERSION
from paced import assert_one_budget
from server import ScriptedServer


@pytest.fixture
def stores(postgres_url: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two store objects on one schema, as two processes have."""
    one, two = PostgresStore(postgres_url), PostgresStore(postgres_url)
    try:
        yield one, two
    finally:
        one.close()
        two.close()


def test_the_postgres_store_keeps_rate_budgets(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    assert isinstance(stores[0], BudgetStore)


def test_two_stores_take_at_most_the_burst_plus_the_rate(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    one, two = stores
    rate, burst = 20.0, 3.0
    one.counts()  # connected, tables made: the clock starts at the first take
    two.counts()
    taken = {id(one): 0, id(two): 0}
    start = time.monotonic()
    while time.monotonic() - start < 0.5:  # both asking as fast as they can
        for store in (one, two):
            taken[id(store)] += store.take_tokens("api", rate, burst)[0]
    elapsed = time.monotonic() - start
    total = sum(taken.values())
    # The server's clock runs within the client's readings: its budget is within ours.
    assert burst <= total <= burst + rate * elapsed, (total, elapsed)
    assert all(count > 0 for count in taken.values()), taken


def test_an_empty_bucket_says_when_its_next_token_comes(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    one, two = stores
    assert one.take_tokens("api", 2.0, 2.0, 5) == (2, 0.0)
    taken, wait = two.take_tokens("api", 2.0, 2.0, 5)
    assert taken == 0 and 0 < wait <= 0.5
    assert two.take_tokens("hubspot", 2.0, 2.0) == (1, 0.0)  # a key of its own


def test_a_format_1_store_gains_the_budgets_table(postgres: Any, postgres_url: str) -> None:
    schema = parse_postgres_url(postgres_url).schema
    first = PostgresStore(postgres_url)
    first.counts()
    first.close()
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{schema}".budgets')
        conn.execute(f"UPDATE \"{schema}\".meta SET value = '1' WHERE name = 'version'")
    again = PostgresStore(postgres_url)
    try:
        assert again.take_tokens("api", 1.0, 1.0) == (1, 0.0)
    finally:
        again.close()
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        version = conn.execute(f'SELECT value FROM "{schema}".meta').fetchone()
        assert version == (str(SCHEMA_VERSION),) == ("4",)


def test_two_processes_on_one_database_together_stay_within_the_declared_rate(
    postgres_url: str, server: ScriptedServer
) -> None:
    """As over SQLite (tests/support/paced.py)."""
    assert_one_budget(postgres_url, server)
