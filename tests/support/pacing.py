"""Local APIs that enforce a limit, and one that is down for a while, for the pacing tests.

`RateServer`: a token bucket of `rate` calls a second (holding `burst` tokens, by default
`rate`) on 127.0.0.1, answering 429 (with `Retry-After` if given) to a request that finds
no token, 200 otherwise, after `delay` seconds of the API's own latency. It records every
arrival (its time on the server's monotonic clock and its answer) and the most requests
it ever had in flight at once, so that a test judges what the server saw:

    api = RateServer(rate=20)
    ...
    assert max_in_window(api.arrival_times(), 1.0) <= 20 + 20

`DownServer`: a port that refuses connections (a socket bound but not listening) until
`up()`, then answers 200, counting the connections it accepted.

ThreadingHTTPServer, HTTP/1.1 keep-alive, Nagle off, as tests/support/server.py.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Arrival", "DownServer", "RateServer", "max_in_window"]


@dataclass(frozen=True)
class Arrival:
    """One request as the rate-enforcing server judged it."""

    at: float  # time.monotonic() on arrival
    path: str
    status: int


def max_in_window(times: Sequence[float], window: float, start: float | None = None) -> int:
    """The most of `times` in any half-open window of `window` seconds (that begins at or
    after `start`, if given)."""
    ordered = sorted(times)
    most = 0
    for i, t in enumerate(ordered):
        if start is not None and t < start:
            continue
        most = max(most, bisect.bisect_left(ordered, t + window) - i)
    return most


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, headers = self.server.owner._arrive(self.path.split("?", 1)[0])
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
        finally:
            self.server.owner._leave()

    do_GET = do_POST = _answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a dozen workers connecting at once must not see a refused SYN
    owner: Any

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _Base:
    def __init__(self, *, listen: bool = True) -> None:
        self._httpd = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        self._httpd.owner = self
        self._httpd.allow_reuse_address = True
        self._httpd.server_bind()  # the port is ours from now on; refused until listening
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None
        if listen:
            self._listen()

    def _listen(self) -> None:
        self._httpd.server_activate()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-pacing-server",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _arrive(self, path: str) -> tuple[int, dict[str, str]]:
        raise NotImplementedError

    def _leave(self) -> None:
        pass


class RateServer(_Base):
    """An API allowing `rate` calls a second (a token bucket of `burst` tokens); see the
    module docstring."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        retry_after: str | None = None,
        delay: float = 0.0,
    ) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self.retry_after = retry_after
        self.delay = delay
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._arrivals: list[Arrival] = []
        self._in_flight = 0
        self.max_in_flight = 0
        self._stopped = threading.Event()
        super().__init__()

    def _arrive(self, path: str) -> tuple[int, dict[str, str]]:
        with self._changed:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            allowed = self._tokens >= 1.0
            if allowed:
                self._tokens -= 1.0
            status = 200 if allowed else 429
            self._arrivals.append(Arrival(now, path, status))
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self._changed.notify_all()
        if self.delay:
            self._stopped.wait(self.delay)  # the API's own latency; the test never sleeps
        headers = {}
        if status == 429 and self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return status, headers

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    @property
    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals)

    def arrival_times(self, path: str | None = None) -> list[float]:
        return [a.at for a in self.arrivals if path is None or a.path == path]

    def count(self, status: int | None = None) -> int:
        return sum(1 for a in self.arrivals if status is None or a.status == status)

    def wait_for(self, count: int, path: str | None = None, timeout: float = 30) -> bool:
        """Block until `count` requests (to `path`, if given) have arrived."""

        def enough() -> bool:
            return sum(1 for a in self._arrivals if path is None or a.path == path) >= count

        with self._changed:
            return self._changed.wait_for(enough, timeout=timeout)

    def close(self) -> None:
        self._stopped.set()
        super().close()


class DownServer(_Base):
    """A port that refuses connections until `up()`, then answers 200 to everything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answered = 0
        super().__init__(listen=False)

    def up(self) -> None:
        """Start listening on the port (connections were refused until now)."""
        self._listen()

    def _arrive(self, path: str) -> tuple[int, dict[str, str]]:
        with self._lock:
            self.answered += 1
        return 200, {}
