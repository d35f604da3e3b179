"""A real local HTTP server with scripted answers, for end-to-end tests.

`ThreadingHTTPServer` on 127.0.0.1, port 0, HTTP/1.1 keep-alive. Each path can be
scripted with a sequence of `Answer`s, consumed in order; the last one repeats forever.
Unscripted paths answer 200 with an empty body. Every request is recorded before it is
answered, so a test can wait for it (`wait_for`) even when the answer hangs.

    server.script("/charge", Answer(503), Answer(429, headers={"Retry-After": "3"}), Answer(200))
    server.script("/slow", Answer.hang(release))
    server.script("/late", Answer(503, event=release))  # answers once `release` is set
    assert server.wait_for(3, path="/charge")

Tests use it through the `server` fixture (tests/conftest.py) and import the helpers as
`from server import Answer` (tests/conftest.py puts tests/support/ on sys.path).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from requests.structures import CaseInsensitiveDict

__all__ = ["Answer", "Recorded", "ScriptedServer"]

_RESPOND, _RESET, _HANG = "respond", "reset", "hang"


@dataclass(frozen=True)
class Answer:
    """One scripted answer: a response (optionally after a server-side delay), a reset or a hang."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str | list[str]] = field(default_factory=dict)
    delay: float = 0.0  # the server simulating a slow API; the test itself never sleeps
    action: str = _RESPOND
    event: threading.Event | None = None  # a response waits for it; a hang, then closes

    @classmethod
    def reset(cls) -> Answer:
        """Close the connection abruptly (TCP RST), without any response."""
        return cls(action=_RESET)

    @classmethod
    def hang(cls, event: threading.Event) -> Answer:
        """Block until `event` is set or the server stops, then close without a response."""
        return cls(action=_HANG, event=event)


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str  # without the query string
    query: dict[str, list[str]]  # parse_qs(keep_blank_values=True)
    headers: CaseInsensitiveDict[str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: requests' pooled connections get reused
    disable_nagle_algorithm = True
    timeout = 60  # an idle keep-alive connection does not hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers (if any) end with an empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        owner = self.server.owner
        split = urlsplit(self.path)
        recorded = Recorded(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=CaseInsensitiveDict(dict(self.headers.items())),
            body=self._read_body(),
        )
        answer = owner._next_answer(split.path)
        owner._record(recorded)

        if answer.action == _RESET:
            self._reset()
            return
        if answer.action == _HANG:
            assert answer.event is not None
            answer.event.wait()  # close() sets every scripted event
            self._reset()
            return
        if answer.event is not None:
            answer.event.wait()  # held until the test releases it (or close() does)
        if (answer.event is not None and owner._stopped.is_set()) or (
            answer.delay and owner._stopped.wait(answer.delay)
        ):
            self._reset()
            return

        self.send_response(answer.status)
        names = {name.lower() for name in answer.headers}
        for name, value in answer.headers.items():
            for one in [value] if isinstance(value, str) else value:  # a list: sent repeated
                self.send_header(name, one)
        if "content-length" not in names:
            self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD" and answer.body:
            self.wfile.write(answer.body)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the connection was reset on purpose
            super().finish()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: ScriptedServer

    def process_request(self, request: Any, client_address: Any) -> None:
        self.owner._track(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and went away is expected, not an error


class ScriptedServer:
    """The server a test talks to; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._scripts: dict[str, list[Answer]] = {}
        self._events: list[threading.Event] = []
        self._requests: list[Recorded] = []
        self._sockets: set[socket.socket] = set()
        self._connections = 0
        self._stopped = threading.Event()
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-http-server",
            daemon=True,
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        """`http://127.0.0.1:PORT/path`."""
        return self.base_url + ("" if path.startswith("/") else "/") + path

    def script(self, path: str, *answers: Answer) -> None:
        """Answer requests to `path` with `answers` in order; the last one repeats forever."""
        if not answers:
            raise ValueError("script() needs at least one Answer")
        with self._lock:
            self._scripts[path] = list(answers)
            self._events.extend(a.event for a in answers if a.event is not None)

    @property
    def connections_opened(self) -> int:
        """How many TCP connections the server has accepted (keep-alive reuses them)."""
        with self._lock:
            return self._connections

    @property
    def requests(self) -> list[Recorded]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path: str) -> list[Recorded]:
        """A snapshot of the requests received for `path`."""
        return [r for r in self.requests if r.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 5) -> bool:
        """Block until `count` requests (to `path`, if given) have arrived; False on timeout."""

        def enough() -> bool:
            return sum(1 for r in self._requests if path is None or r.path == path) >= count

        with self._changed:
            return self._changed.wait_for(enough, timeout=timeout)

    def close(self) -> None:
        """Stop serving, release every hang, and drop open connections."""
        self._stopped.set()
        with self._lock:
            events = list(self._events)
            sockets = list(self._sockets)
        for event in events:
            event.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    # --- called from handler threads ---

    def _next_answer(self, path: str) -> Answer:
        with self._lock:
            answers = self._scripts.get(path)
            if not answers:
                return Answer()
            return answers.pop(0) if len(answers) > 1 else answers[0]

    def _record(self, recorded: Recorded) -> None:
        with self._changed:
            self._requests.append(recorded)
            self._changed.notify_all()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
            self._connections += 1
