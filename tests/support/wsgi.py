"""A WSGI application served for real on 127.0.0.1 in a thread, for end-to-end tests.

    with WsgiServer(app) as srv:
        requests.get(srv.url("/dead-letters"))

The console's own threaded server (`offload.console.command`), on port 0, quiet.
"""

from __future__ import annotations

import threading
from typing import Any
from wsgiref.simple_server import make_server

from offload.console.command import _Handler, _Server

__all__ = ["WsgiServer"]


class _Quiet(_Handler):
    log_to = None  # no request log in test output


class WsgiServer:
    """`app` on 127.0.0.1:PORT until closed; a context manager."""

    def __init__(self, app: Any) -> None:
        self._httpd = make_server("127.0.0.1", 0, app, server_class=_Server, handler_class=_Quiet)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-wsgi-server",
            daemon=True,
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> WsgiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
