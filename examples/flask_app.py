"""Flask: a signup view hands the CRM call to offload and answers at once.

    python examples/flask_app.py                     # a self-contained run (stand-in CRM)
    CRM_URL=http://127.0.0.1:9000 gunicorn -w 4 --chdir examples flask_app:app

The CRM's latency and outages are no longer the handler's: a 429 or a 503 is retried in
the background, and a call that still fails is kept as a dead letter to replay.
"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify, request

import offload
import offload.web

app = Flask(__name__)
# offload's worker starts on a request's calls once its response is sent, not while the
# handler is still answering (the round trip the user waits for is the handler's own).
app.wsgi_app = offload.web.WSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
app.config["CRM_URL"] = os.environ.get("CRM_URL", "http://127.0.0.1:9000")


@app.post("/signup")
def signup() -> tuple[Response, int]:
    email = request.get_json(force=True)["email"]
    # ... create the user in your own database here ...
    try:
        offload.enqueue_task(
            offload.http(
                "POST",
                f"{app.config['CRM_URL']}/contacts",
                json={"email": email},
                headers={"Authorization": f"Bearer {os.environ.get('CRM_TOKEN', 'demo')}"},
                idempotency_key=True,  # a retried POST cannot create the contact twice
            )
        )
    except offload.QueueFull:
        # Never blocks: when the CRM has been down long enough to fill the queue, the
        # handler decides (here: the signup still succeeds, the CRM misses it, we log).
        app.logger.warning("CRM queue full; %s not sent to the CRM", email)
    return jsonify(status="welcome", email=email), 201


@app.get("/ops/offload")
def offload_status() -> Response:
    """What the background worker holds, for a health check or a dashboard."""
    dead_letters = [dl.to_json() for dl in offload.dead_letters()]
    return jsonify({**offload.stats().to_json(), "dead_letters": dead_letters})


if __name__ == "__main__":
    from _local_api import LocalAPI

    with LocalAPI() as crm:
        app.config["CRM_URL"] = crm.url
        client = app.test_client()
        for email in ("ada@example.com", "grace@example.com", "edsger@example.com"):
            response = client.post("/signup", json={"email": email})
            print(response.status_code, response.get_json())
        offload.flush(timeout=10)  # a script ends here; a server would just go on
        for received in crm.received:
            print("CRM received", received.method, received.path, received.json())
        print("stats:", client.get("/ops/offload").get_json()["succeeded"], "delivered")
