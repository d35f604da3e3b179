"""The application's connection, for enqueues inside its transaction: what `transaction()`
accepts, and the psycopg connection it writes through.

Accepted, without importing any framework:

- a psycopg 3 `Connection` (plain psycopg; `with conn.transaction():` or autocommit off);
- Django's `django.db.connection` (or `connections["name"]`): its psycopg 3 connection,
  opened if it is not yet; inside `transaction.atomic()` the enqueue joins that block;
- SQLAlchemy's `session.connection()` or `engine.connect()` (a `Connection` over the
  `postgresql+psycopg` dialect): the DBAPI connection it holds, in its transaction (begun
  when the block opens if SQLAlchemy has not begun one yet, so that its commit() commits
  a block that only enqueued).

psycopg 2, an async connection and anything else are refused with TypeError: a task
written outside the application's transaction would break the promise of the block.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from ...errors import StoreError

__all__ = ["app_cursor", "check_same_server", "psycopg_connection", "server_of"]


def psycopg_connection(connection: Any) -> Any:
    """The psycopg 3 (sync) connection behind what the application passed; TypeError when
    there is none."""
    import psycopg  # noqa: PLC0415 - the store's own import; an optional extra

    if isinstance(connection, psycopg.AsyncConnection):
        raise TypeError(
            "offload.transaction takes a sync psycopg connection; an enqueue never awaits "
            "(open the block around a sync connection of the same database)"
        )
    if isinstance(connection, psycopg.Connection):
        return connection
    module = type(connection).__module__ or ""
    if module.startswith("django.") and hasattr(connection, "ensure_connection"):
        if getattr(connection, "vendor", None) != "postgresql":
            raise TypeError(
                f"offload.transaction needs a PostgreSQL database; Django's "
                f"{getattr(connection, 'alias', '?')!r} is {connection.vendor!r}"
            )
        connection.ensure_connection()
        return _checked(connection.connection, "Django's database connection")
    if module.startswith("sqlalchemy."):
        # A Connection holds a pool proxy; the proxy holds the DBAPI connection.
        proxy = getattr(connection, "connection", connection)
        driver = _checked(getattr(proxy, "driver_connection", None), "SQLAlchemy's connection")
        # SQLAlchemy begins at a Connection's first statement, and offload's go to the
        # driver, unseen: begun here as that statement would, or its commit() would do
        # nothing and the pool's rollback would drop the enqueues.
        if callable(getattr(connection, "in_transaction", None)) and not (
            connection.in_transaction()
        ):
            connection.begin()
        return driver
    raise TypeError(
        "offload.transaction takes a psycopg 3 connection, Django's django.db.connection or "
        f"SQLAlchemy's session.connection(); got {type(connection).__name__}"
    )


def _checked(driver: Any, what: str) -> Any:
    import psycopg  # noqa: PLC0415

    if isinstance(driver, psycopg.Connection):
        return driver
    raise TypeError(
        f"{what} is not a psycopg 3 connection ({type(driver).__name__}): offload writes "
        "through psycopg 3 (Django 4.2+ uses it when installed; SQLAlchemy: "
        "postgresql+psycopg://)"
    )


def app_cursor(driver: Any) -> Any:
    """A cursor on the application's connection that makes tuples, as offload reads them,
    whatever rows the connection makes for the application (`row_factory=dict_row`)."""
    from psycopg.rows import tuple_row  # noqa: PLC0415

    return driver.cursor(row_factory=tuple_row)


# What tells two PostgreSQL servers apart from a connection: the database's name alone
# does not (one name in two clusters), nor do host names (one server under two names, or
# a socket and a TCP port); a server's start time does, and any role may read it.
_SERVER = "SELECT current_database(), pg_postmaster_start_time()"
# Asked once per connection (a psycopg connection is one server's for its whole life).
_servers: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def server_of(driver: Any) -> tuple[Any, ...]:
    """(database name, server start time) of a psycopg connection, asked once for it;
    psycopg's errors (an application's aborted transaction) propagate."""
    known = _servers.get(driver)
    if known is None:
        from psycopg.pq import TransactionStatus  # noqa: PLC0415

        # Outside a transaction, the question would begin one, and the application's
        # `with conn.transaction():` opened next would then be a savepoint in it that
        # commits nothing: that transaction, which holds only the question, is ended.
        begins = not driver.autocommit and (
            driver.info.transaction_status == TransactionStatus.IDLE
        )
        with app_cursor(driver) as cur:
            known = tuple(cur.execute(_SERVER).fetchone())
        if begins:
            driver.rollback()
        _servers[driver] = known
    return known


def check_same_server(
    ours: tuple[Any, ...], driver: Any, shown: str, scrub: Callable[[str], str]
) -> None:
    """ValueError unless the application's connection `driver` is to the store's database
    on the store's server (`ours`, `server_of` the store's connection); StoreError when it
    cannot be asked (an aborted transaction of the application's)."""
    import psycopg  # noqa: PLC0415

    try:
        theirs = server_of(driver)
    except psycopg.Error as exc:
        raise StoreError(
            f"{shown}: offload.transaction cannot ask the connection which server it is on: "
            f"{scrub(str(exc))}"
        ) from None
    (our_db, our_server), (their_db, their_server) = ours, theirs
    if their_db != our_db:
        raise ValueError(
            f"offload.transaction: the connection is to database {their_db!r}, but the store "
            f"{shown} is in {our_db!r}"
        )
    if their_server != our_server:
        raise ValueError(
            f"offload.transaction: the connection is to database {their_db!r} on another "
            f"server than the store {shown} (started {their_server}; the store's {our_server})"
        )
