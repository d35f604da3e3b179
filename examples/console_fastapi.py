"""FastAPI: the offload console mounted at /ops/offload through a WSGI adapter (a2wsgi).

    python examples/console_fastapi.py               # a self-contained run (stand-in API)
    OFFLOAD_CONSOLE_TOKEN=... uvicorn --app-dir examples console_fastapi:app

The console is a WSGI application; `a2wsgi.WSGIMiddleware` runs it in a thread pool,
off the event loop. Read-only here: the page shows everything and changes nothing (no
buttons; every action refused), for people who should look but not touch. Scripts use
its JSON with `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import os
import secrets

from a2wsgi import WSGIMiddleware
from fastapi import FastAPI

import offload
import offload.console

CONSOLE_TOKEN = os.environ.get("OFFLOAD_CONSOLE_TOKEN") or secrets.token_urlsafe(24)

app = FastAPI()


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": offload.health().ok}


console = offload.console.make_app(token=CONSOLE_TOKEN, read_only=True)
app.mount("/ops/offload", WSGIMiddleware(console))  # type: ignore[arg-type]


if __name__ == "__main__":
    from _local_api import LocalAPI
    from fastapi.testclient import TestClient

    with LocalAPI(lambda req: (422, {}, {"error": "sku unknown"})) as warehouse:
        offload.enqueue_task(offload.http("POST", f"{warehouse.url}/shipments", json={"sku": "x"}))
        offload.flush(timeout=10)
        bearer = {"Authorization": f"Bearer {CONSOLE_TOKEN}"}
        with TestClient(app) as client:
            print("app:", client.get("/health").json())
            listed = client.get("/ops/offload/api/dead-letters", headers=bearer).json()
            print("api: total", listed["total"], "status", listed["items"][0]["status"])
            letter = listed["items"][0]["id"]
            refused = client.post(f"/ops/offload/api/dead-letters/{letter}/replay", headers=bearer)
            print("replay (read-only):", refused.status_code, refused.json()["error"])
            print("no token:", client.get("/ops/offload/api/stats").status_code)
            metrics = client.get("/ops/offload/metrics", headers=bearer).text
            print(
                "metrics:",
                next(m for m in metrics.splitlines() if m.startswith("offload_dead_letters")),
            )
