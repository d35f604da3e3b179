"""Plain psycopg: save an order and enqueue its CRM call in one PostgreSQL transaction.

    DATABASE_URL=postgresql://app@127.0.0.1:5432/app python examples/postgres_psycopg.py

The call is written into offload's tables through the application's own connection, in
the transaction that saves the order: the task exists if and only if that transaction
commits, and the workers (here, this process's own) hear of it at the commit. A rollback,
a crash before the commit, leaves neither the order nor the call; a crash after it leaves
both, and some worker delivers the call.

    with conn.transaction(), offload.transaction(conn):
        conn.execute("INSERT INTO orders ...")
        offload.enqueue_task(offload.http("POST", crm_url, json=order, idempotency_key=...))
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg

import offload


def place_order(conn: psycopg.Connection, crm_url: str, order_id: str, *, fail: bool) -> None:
    """Save the order and enqueue its CRM call, in one transaction; `fail` raises before
    the commit, as a bug or a constraint would."""
    with conn.transaction(), offload.transaction(conn):
        conn.execute("INSERT INTO orders (id) VALUES (%s)", (order_id,))
        offload.enqueue_task(
            offload.http(
                "POST", f"{crm_url}/orders", json={"order": order_id}, idempotency_key=order_id
            )
        )
        if fail:
            raise RuntimeError(f"{order_id}: payment declined after the call was queued")


def main() -> int:
    from _local_api import LocalAPI

    database = os.environ.get("DATABASE_URL")
    if not database:
        print("set DATABASE_URL=postgresql://user@host/db (a database you may create tables in)")
        return 2
    offload.configure(store=f"{database}?schema=offload_example")
    with LocalAPI() as crm, psycopg.connect(database) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY)")
        conn.commit()
        for order_id, fail in (("order-1", False), ("order-2", True), ("order-3", False)):
            try:
                place_order(conn, crm.url, order_id, fail=fail)
                print("committed:", order_id)
            except RuntimeError as exc:
                print("rolled back:", exc)
        offload.flush(timeout=10)
        orders = [row[0] for row in conn.execute("SELECT id FROM orders ORDER BY id")]
        print("orders in the table:", orders)
        for received in crm.received:
            print("CRM received", received.headers["idempotency-key"])
    stats = offload.stats()
    print(f"delivered {stats.succeeded}, dead letters {stats.dead_letters}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
