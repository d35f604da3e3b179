"""SQLAlchemy: enqueue inside the session's transaction (PostgreSQL, psycopg 3).

    DATABASE_URL=postgresql://app@127.0.0.1:5432/app python examples/postgres_sqlalchemy.py

`offload.transaction(session.connection())` makes each enqueue in the block an INSERT
in the session's own transaction: `session.commit()` commits the order and its call
together; a rollback drops both. The engine must use psycopg 3
(`postgresql+psycopg://`), which offload writes through.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import offload


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "sa_orders"

    id: Mapped[str] = mapped_column(String, primary_key=True)


def place_order(session: Session, crm_url: str, order_id: str, *, fail: bool) -> None:
    """Save the order and enqueue its CRM call; commit both, or neither."""
    with session.begin():  # commits at the end of the block, rolls back on an exception
        session.add(Order(id=order_id))
        session.flush()
        with offload.transaction(session.connection()):
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
    engine = create_engine(database.replace("postgresql://", "postgresql+psycopg://", 1))
    Base.metadata.create_all(engine)
    with LocalAPI() as crm, Session(engine) as session:
        for order_id, fail in (("order-1", False), ("order-2", True), ("order-3", False)):
            try:
                place_order(session, crm.url, order_id, fail=fail)
                print("committed:", order_id)
            except RuntimeError as exc:
                print("rolled back:", exc)
        offload.flush(timeout=10)
        print("orders in the table:", list(session.scalars(select(Order.id).order_by(Order.id))))
        for received in crm.received:
            print("CRM received", received.headers["idempotency-key"])
    engine.dispose()
    stats = offload.stats()
    print(f"delivered {stats.succeeded}, dead letters {stats.dead_letters}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
