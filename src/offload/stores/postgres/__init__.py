"""The PostgreSQL store: tasks and dead letters in the application's own database, shared by
every process on every machine that reaches it; enqueues inside the application's
transactions.

    Offloader(store="postgresql://app@db.internal:5432/app?schema=offload&lease_timeout=60")

    with offload.transaction(connection):       # psycopg, Django's or SQLAlchemy's
        save_order(connection, order)
        offload.enqueue_task(offload.http("POST", crm_url, json=order, idempotency_key=True))
    # the task exists if and only if that transaction commits

Durability is the database's: an enqueue returns once its INSERT is committed (or, inside
the application's transaction, once it is written there: the commit is the
application's). Workers claim due rows with `FOR UPDATE SKIP LOCKED`, lease them, renew
the leases, and hear of new tasks through LISTEN/NOTIFY instead of polling.

Credentials are libpq's (the URL, PGPASSWORD, ~/.pgpass); the password never appears in
`url`, a repr, a log line or an error. Only JSON is stored (see codec.task).

The parts, each with the design notes of its job: `store.py` (PostgresStore: a process's
connection, lock, lease owner, listener, and the fork), `url.py` (the URL), `schema.py`
(the tables and every statement), `tasks.py` (claims, leases, settling), `letters.py`
(dead letters, the paginated listing), `listener.py` (LISTEN and wake-ups), `joining.py`
(the application's connection). PostgresStore and parse_postgres_url are its public names.
"""

from .store import PostgresStore
from .url import parse_postgres_url

__all__ = ["PostgresStore", "parse_postgres_url"]
