"""Flask: the offload console mounted at /ops/offload, beside the application.

    python examples/console_flask.py                 # a self-contained run (stand-in CRM)
    OFFLOAD_CONSOLE_TOKEN=... gunicorn -w 4 --chdir examples console_flask:app

`DispatcherMiddleware` sends /ops/offload/... to the console's WSGI application and
everything else to Flask. The console lets in whoever has the token (a browser logs in
once, with `?token=` or its login form; a script sends `Authorization: Bearer`); every
gunicorn worker accepts the same sessions, since they share the token.
"""

from __future__ import annotations

import os
import re
import secrets

from flask import Flask, Response, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import offload
import offload.console

CONSOLE_TOKEN = os.environ.get("OFFLOAD_CONSOLE_TOKEN") or secrets.token_urlsafe(24)

app = Flask(__name__)
app.config["CRM_URL"] = os.environ.get("CRM_URL", "http://127.0.0.1:9000")


@app.post("/signup")
def signup() -> tuple[Response, int]:
    email = request.get_json(force=True)["email"]
    offload.enqueue_task(
        offload.http("POST", f"{app.config['CRM_URL']}/contacts", json={"email": email})
    )
    return jsonify(status="welcome"), 201


# The console over the module-level default offloader (its store, stats and keys).
console = offload.console.make_app(token=CONSOLE_TOKEN)
app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/ops/offload": console})  # type: ignore[method-assign]


if __name__ == "__main__":
    from _local_api import LocalAPI

    accepting = False

    def crm(req: object) -> tuple[int, dict[str, str], object]:
        return (201, {}, {}) if accepting else (400, {}, {"error": "CRM is being migrated"})

    with LocalAPI(crm) as api:
        app.config["CRM_URL"] = api.url
        client = app.test_client()
        for email in ("ada@example.com", "grace@example.com"):
            client.post("/signup", json={"email": email})
        offload.flush(timeout=10)
        login = client.get(f"/ops/offload/dead-letters?token={CONSOLE_TOKEN}")
        print("login:", login.status_code, login.headers["Location"])
        page = client.get("/ops/offload/dead-letters").get_data(as_text=True)
        print("console:", re.search(r"<strong>(\d+)</strong> dead letters in all", page).group(0))
        csrf = re.search(r'name="csrf" value="(\w+)"', page).group(1)
        accepting = True  # the CRM is back: replay every dead letter from the console
        form = {"csrf": csrf, "action": "replay", "scope": "matching"}
        done = client.post("/ops/offload/act", data=form)
        print("replay:", done.status_code, done.headers["Location"])
        offload.flush(timeout=10)
        print("CRM accepted", sum(1 for r in api.received if r.path == "/contacts") - 2, "replayed")
        print("dead letters now:", len(offload.dead_letters()))
