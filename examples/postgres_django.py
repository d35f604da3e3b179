"""Django on PostgreSQL: the request's transaction holds the order and its CRM call.

    DATABASE_URL=postgresql://app@127.0.0.1:5432/app python examples/postgres_django.py

With `ATOMIC_REQUESTS`, each view runs in a transaction. `offload.transaction(connection)`
(Django's `django.db.connection`) makes each enqueue in the block an INSERT in that
transaction: a view that returns commits the order and the call together; a view that
raises rolls back both, and the CRM never hears of an order that does not exist. Unlike
`transaction.on_commit` (examples/django_app.py), nothing is lost if the process dies
between the commit and the enqueue: they are one commit.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import django
from django.conf import settings


def _database(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",  # psycopg 3 where installed
        "NAME": parts.path.lstrip("/"),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": parts.port or "",
        "ATOMIC_REQUESTS": True,
    }


DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only-not-a-secret",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    DATABASES={"default": _database(DATABASE_URL)},
    CRM_URL=os.environ.get("CRM_URL", "http://127.0.0.1:9000"),
)
django.setup()

from django.db import connection  # noqa: E402 - after settings
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.http import require_POST  # noqa: E402

import offload  # noqa: E402


@require_POST
def order(request: HttpRequest) -> JsonResponse:
    body = json.loads(request.body)
    order_id = body["id"]
    with connection.cursor() as cursor:  # ... Order.objects.create(...) in a real app
        cursor.execute("INSERT INTO dj_orders (id) VALUES (%s)", [order_id])
    with offload.transaction(connection):
        offload.enqueue_task(
            offload.http(
                "POST",
                f"{settings.CRM_URL}/orders",
                json={"order": order_id},
                idempotency_key=order_id,
            )
        )
    if body.get("fail"):
        raise RuntimeError(f"{order_id}: payment declined after the call was queued")
    return JsonResponse({"order": order_id}, status=201)


urlpatterns = [path("orders", order)]


def main() -> int:
    from _local_api import LocalAPI
    from django.test import Client, override_settings

    if "DATABASE_URL" not in os.environ:
        print("set DATABASE_URL=postgresql://user@host/db (a database you may create tables in)")
        return 2
    offload.configure(store=f"{DATABASE_URL}?schema=offload_example")
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS dj_orders (id text PRIMARY KEY)")
    client = Client(raise_request_exception=False)
    with LocalAPI() as crm, override_settings(CRM_URL=crm.url):
        for order_id, fail in (("order-1", False), ("order-2", True), ("order-3", False)):
            response = client.post(
                "/orders", {"id": order_id, "fail": fail}, content_type="application/json"
            )
            print(response.status_code, order_id)
        offload.flush(timeout=10)
        with connection.cursor() as cursor:
            cursor.execute("SELECT id FROM dj_orders ORDER BY id")
            print("orders in the table:", [row[0] for row in cursor.fetchall()])
        for received in crm.received:
            print("CRM received", received.headers["idempotency-key"])
    stats = offload.stats()
    print(f"delivered {stats.succeeded}, dead letters {stats.dead_letters}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
