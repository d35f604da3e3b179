"""Django: the offload console at /ops/offload, by wrapping Django's WSGI application.

    python examples/console_django.py                # a self-contained run (stand-in CRM)
    OPS_USERS=ada,grace gunicorn --chdir examples console_django:application

Requests under /ops/offload go to the console (with SCRIPT_NAME extended, so its links
and cookies stay under the prefix); everything else to Django. Here access is the
application's own decision (`auth=`): the user a login proxy in front of the site put in
REMOTE_USER must be one of OPS_USERS. `token=` works as well, or both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only-not-a-secret",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    DATABASES={},
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402 - after settings
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

import offload  # noqa: E402
import offload.console  # noqa: E402

PREFIX = "/ops/offload"
OPS_USERS = set(filter(None, os.environ.get("OPS_USERS", "ada").split(",")))


def orders(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"orders": []})


urlpatterns = [path("orders", orders)]
django_application = get_wsgi_application()


def is_ops(environ: Mapping[str, Any]) -> bool:
    """The console's access check: the user the login proxy authenticated."""
    return environ.get("REMOTE_USER") in OPS_USERS


console = offload.console.make_app(auth=is_ops)


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Django's application, with the console under PREFIX."""
    path_info = environ.get("PATH_INFO", "")
    if path_info == PREFIX or path_info.startswith(PREFIX + "/"):
        environ = {
            **environ,
            "SCRIPT_NAME": environ.get("SCRIPT_NAME", "") + PREFIX,
            "PATH_INFO": path_info[len(PREFIX) :] or "/",
        }
        return console(environ, start_response)
    return django_application(environ, start_response)


if __name__ == "__main__":
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import requests
    from _local_api import LocalAPI

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, application, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = f"http://127.0.0.1:{server.server_address[1]}"
    with LocalAPI(lambda req: (410, {}, {"error": "gone"})) as api:
        offload.enqueue_task(offload.http("POST", f"{api.url}/hooks/order-paid"))
        offload.flush(timeout=10)
        print("django:", requests.get(f"{site}/orders", timeout=5).json())
        print("stranger:", requests.get(f"{site}{PREFIX}/", timeout=5).status_code)
        ops = requests.Session()
        # What the login proxy adds for an authenticated user (wsgiref passes no
        # REMOTE_USER header through, so this demo's server reads it from the environ).
        server.base_environ["REMOTE_USER"] = "ada"
        page = ops.get(f"{site}{PREFIX}/dead-letters", timeout=5).text
        print("ops:", re.search(r"<strong>(\d+)</strong> dead letters? in all", page).group(0))
        letter = re.search(rf'href="{PREFIX}/dead-letters/(\w+)"', page).group(1)
        detail = ops.get(f"{site}{PREFIX}/dead-letters/{letter}", timeout=5).text
        print("call:", re.search(r"<h1 class=\"mono\">([^<]+)</h1>", detail).group(1))
        csrf = re.search(r'name="csrf" value="(\w+)"', detail).group(1)
        done = ops.post(
            f"{site}{PREFIX}/dead-letters/{letter}/discard",
            data={"csrf": csrf},
            allow_redirects=False,
            timeout=5,
        )
        print("discard:", done.status_code, done.headers["Location"])
        print("dead letters now:", len(offload.dead_letters()))
    server.shutdown()
