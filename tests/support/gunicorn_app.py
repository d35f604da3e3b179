"""A Flask app served by a real gunicorn in tests/system/test_gunicorn.py (and in
benchmarks/bench_handler_latency.py).

`OFFLOAD_TEST_API` is the base URL of the local API the handlers' calls go to.

- POST /enqueue/<rid>: hands `POST {API}/deliver/<rid>` to offload and answers at once.
- POST /plain/<rid>: the same handler without the enqueue, for comparing latency.
- POST /inline/<rid>: the same handler making the call itself, as it would without offload
  (to `{API}/inline/<rid>`, which the tests do not count as a delivery).

Every route is also served under `/web/` (`/web/enqueue/<rid>`), through
`offload.web.WSGIMiddleware`: the enqueue's wake-up waits until the response is sent.

Both answer with the process id (`X-Pid`) and the handler's own time in nanoseconds
(`X-Handler-Ns`). At import the app also enqueues `POST {API}/boot/<pid>`: with
`--preload` that runs in the gunicorn master before it forks, so a worker that inherited
the master's queue would deliver the boot call a second time.
"""

from __future__ import annotations

import os
import time
from typing import Any

import requests
from flask import Flask, Response

import offload
import offload.web

API = os.environ["OFFLOAD_TEST_API"]

app = Flask(__name__)
_flask_wsgi = app.wsgi_app
_held_wsgi = offload.web.WSGIMiddleware(_flask_wsgi)


def _dispatch(environ: dict[str, Any], start_response: Any) -> Any:
    """/web/... is the same app under offload.web.WSGIMiddleware (same server, same routes)."""
    path = environ.get("PATH_INFO", "")
    if path.startswith("/web/"):
        environ["PATH_INFO"] = path[len("/web") :]
        return _held_wsgi(environ, start_response)
    return _flask_wsgi(environ, start_response)


app.wsgi_app = _dispatch  # type: ignore[method-assign]

offload.enqueue_task(offload.http("POST", f"{API}/boot/{os.getpid()}"))


def _answer(started: int) -> Response:
    elapsed = time.perf_counter_ns() - started
    return Response("ok\n", headers={"X-Handler-Ns": str(elapsed), "X-Pid": str(os.getpid())})


@app.post("/enqueue/<rid>")
def enqueue(rid: str) -> Response:
    started = time.perf_counter_ns()
    call = offload.http("POST", f"{API}/deliver/{rid}", json={"rid": rid, "pid": os.getpid()})
    offload.enqueue_task(call)
    return _answer(started)


@app.post("/plain/<rid>")
def plain(rid: str) -> Response:
    started = time.perf_counter_ns()
    # The same work as /enqueue but for handing the call over: build it, then drop it.
    call = offload.http("POST", f"{API}/deliver/{rid}", json={"rid": rid, "pid": os.getpid()})
    del call
    return _answer(started)


_session = requests.Session()


@app.post("/inline/<rid>")
def inline(rid: str) -> Response:
    started = time.perf_counter_ns()
    # What the handler would do without offload: the call, in the request.
    answer = _session.post(f"{API}/inline/{rid}", json={"rid": rid, "pid": os.getpid()}, timeout=5)
    answer.raise_for_status()
    return _answer(started)
