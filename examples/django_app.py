"""Django, in one file: a signup view that tells the CRM once the signup is committed.

    python examples/django_app.py                    # a self-contained run (stand-in CRM)
    python examples/django_app.py runserver          # any manage.py command
    CRM_URL=http://127.0.0.1:9000 gunicorn --chdir examples django_app:application

`transaction.on_commit` is the Django way to enqueue: the call is handed to offload only
after the request's transaction commits, so a signup that rolls back tells the CRM nothing.
"""

from __future__ import annotations

import json
import os
import sys

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only-not-a-secret",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": ":memory:",
            # Each request runs in a transaction; on_commit fires once the view returned.
            "ATOMIC_REQUESTS": True,
        },
    },
    CRM_URL=os.environ.get("CRM_URL", "http://127.0.0.1:9000"),
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402 - after settings
from django.db import transaction  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.http import require_POST  # noqa: E402

import offload  # noqa: E402


def tell_crm(email: str) -> None:
    """Queue the CRM call once the current transaction commits (at once outside one)."""
    call = offload.http(
        "POST", f"{settings.CRM_URL}/contacts", json={"email": email}, idempotency_key=True
    )
    transaction.on_commit(lambda: offload.enqueue_task(call))


@require_POST
def signup(request: HttpRequest) -> JsonResponse:
    email = json.loads(request.body)["email"]
    # ... User.objects.create(email=email) here, in the request's transaction ...
    tell_crm(email)
    return JsonResponse({"status": "welcome", "email": email}, status=201)


urlpatterns = [path("signup", signup)]
application = get_wsgi_application()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        from django.core.management import execute_from_command_line

        execute_from_command_line(sys.argv)
        raise SystemExit(0)

    from _local_api import LocalAPI
    from django.test import Client, override_settings

    with LocalAPI() as crm, override_settings(CRM_URL=crm.url):
        client = Client()
        for email in ("ada@example.com", "grace@example.com"):
            response = client.post("/signup", {"email": email}, content_type="application/json")
            print(response.status_code, response.json())
        try:
            with transaction.atomic():
                tell_crm("rolled-back@example.com")
                raise RuntimeError("the signup failed after the call was queued")
        except RuntimeError as exc:
            print("rolled back:", exc)
        offload.flush(timeout=10)
        for received in crm.received:
            print("CRM received", received.path, received.json())
