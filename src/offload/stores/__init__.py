"""Stores: memory (default), SQLite, SQS and PostgreSQL, all behind the small Store protocol."""

from __future__ import annotations

from .._redact import redact_dsn
from ..clock import Clock
from .base import BudgetStore, DurableStore, Store, StoreCounts, TransactionalStore
from .memory import MemoryStore

__all__ = [
    "BudgetStore",
    "DurableStore",
    "MemoryStore",
    "Store",
    "StoreCounts",
    "TransactionalStore",
    "open_store",
]


def open_store(
    spec: str | Store,
    *,
    max_dead_letters: int = 1_000,
    lease_timeout: float | None = None,
    clock: Clock | None = None,
) -> Store:
    """The store a URL names ("memory", "sqlite:///path.db", "sqs://name?region=...",
    "postgresql://user@host/db"), or `spec` itself when it already is a Store.

    `lease_timeout` (seconds) is for durable stores (a URL option wins over it; otherwise
    OFFLOAD_LEASE_TIMEOUT, else 60). `clock` gives a SQLite or PostgreSQL store its
    wall-clock time (tests); SQS uses the real time."""
    if not isinstance(spec, str):
        if isinstance(spec, Store):
            return spec
        raise TypeError(f"store must be a URL string or a Store, got {type(spec).__name__}")
    scheme = spec.split(":", 1)[0].lower() if ":" in spec else spec.lower()
    if spec == "memory" or scheme == "memory":
        if spec not in ("memory", "memory://"):
            raise ValueError(f"store: the memory store takes no path, got {spec!r}")
        return MemoryStore(max_dead_letters)
    if scheme == "sqlite":
        from .sqlite import SQLiteStore  # noqa: PLC0415 - imported when used

        return SQLiteStore.from_url(spec, lease_timeout=lease_timeout, clock=clock)
    if scheme == "sqs":
        from .sqs import SqsStore  # noqa: PLC0415 - boto3 is an optional extra

        return SqsStore.from_url(spec, lease_timeout=lease_timeout)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore  # noqa: PLC0415 - psycopg is an optional extra

        return PostgresStore.from_url(spec, lease_timeout=lease_timeout, clock=clock)
    raise ValueError(
        f"store: unknown or unsupported store URL {redact_dsn(spec)!r} (expected 'memory', "
        "'sqlite:///path.db', 'sqs://queue-name?region=...' or 'postgresql://user@host/db')"
    )
