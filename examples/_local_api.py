"""A stand-in for a third-party API on 127.0.0.1, so that every example runs anywhere.

    with LocalAPI() as crm:                       # answers 200 {} to every request
        print(crm.url)                            # http://127.0.0.1:PORT
    with LocalAPI(respond) as api:                # respond(request) -> (status, headers, body)
        ...
        api.received                              # the requests, in arrival order

Not part of offload: the examples use it in place of a CRM, Stripe or a webhook receiver.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

__all__ = ["LocalAPI", "Request"]


@dataclass(frozen=True)
class Request:
    """One request as the stand-in API received it."""

    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode()).items()}


Answer = tuple[int, dict[str, str], Any]  # status, headers, a JSON-able body
Respond = Callable[[Request], Answer]


def _ok(request: Request) -> Answer:
    return 200, {}, {}


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as real APIs do
    disable_nagle_algorithm = True
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        request = Request(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
        )
        api = self.server.api
        status, headers, body = api.respond(request)
        api._record(request)
        payload = json.dumps(body).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: LocalAPI


class LocalAPI:
    """A local HTTP API answering with `respond(request)`; a context manager."""

    def __init__(self, respond: Respond = _ok) -> None:
        self.respond = respond
        self._received: list[Request] = []
        self._changed = threading.Condition()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.api = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def received(self) -> list[Request]:
        with self._changed:
            return list(self._received)

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until `count` requests have arrived; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._received) >= count, timeout)

    def _record(self, request: Request) -> None:
        with self._changed:
            self._received.append(request)
            self._changed.notify_all()

    def __enter__(self) -> LocalAPI:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
