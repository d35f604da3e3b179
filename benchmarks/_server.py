"""A local API for the benchmarks, run in its own process so that its CPU does not share
the benchmark's GIL.

    python benchmarks/_server.py [--delay SECONDS] [--throttle N] [--retry-after S]
                                 [--rate R --burst B]

Listens on 127.0.0.1 (a free port, printed as the first line of stdout), HTTP/1.1
keep-alive, Nagle off, a thread per connection. Every request is answered 200 after
`delay` seconds, except that the first `throttle` requests to each path since start (or
since a request to `/_reset`) are answered 429 with `Retry-After` (none if it is empty).
With `--rate`, the API allows R calls a second (a token bucket of B tokens, full at start
and at `/_reset`) and answers 429 to a request that finds no token. `/_stats` answers
`{"requests": N, "throttled": N}` since the last reset. Exits when stdin closes, so a
benchmark that dies never leaves it behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 16 workers connecting at once must not see a refused SYN
    delay = 0.0
    throttle = 0
    retry_after = "1"
    throttled: dict[str, int] = {}  # path -> 429s answered
    lock = threading.Lock()
    rate = 0.0  # calls a second the API allows (0: no limit)
    burst = 1.0
    tokens = 0.0
    stamp = 0.0
    requests = 0  # since the last reset
    answered_429 = 0

    def reset(self) -> None:
        with self.lock:
            self.throttled.clear()
            self.tokens, self.stamp = self.burst, time.monotonic()
            self.requests = self.answered_429 = 0

    def over_rate(self) -> bool:
        """A request arrives: False if the bucket had a token for it (called with lock)."""
        if not self.rate:
            return False
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return False
        return True


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        srv = self.server
        body = b""
        if self.path == "/_reset":
            srv.reset()
            status = 200
        elif self.path == "/_stats":
            with srv.lock:
                stats = {"requests": srv.requests, "throttled": srv.answered_429}
            body = json.dumps(stats).encode()
            status = 200
        else:
            with srv.lock:
                count = srv.throttled.get(self.path, 0)
                throttled = count < srv.throttle
                if throttled:
                    srv.throttled[self.path] = count + 1
                throttled = srv.over_rate() or throttled
                srv.requests += 1
                srv.answered_429 += throttled
            if srv.delay:
                time.sleep(srv.delay)  # the simulated API's own latency
            status = 429 if throttled else 200
        self.send_response(status)
        if status == 429 and srv.retry_after:
            self.send_header("Retry-After", srv.retry_after)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    do_GET = do_POST = _answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--throttle", type=int, default=0)
    parser.add_argument("--retry-after", default="1")
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--burst", type=float, default=1.0)
    opts = parser.parse_args()
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.delay, httpd.throttle, httpd.retry_after = opts.delay, opts.throttle, opts.retry_after
    httpd.rate, httpd.burst = opts.rate, max(1.0, opts.burst)
    httpd.throttled = {}
    httpd.reset()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(httpd.server_address[1], flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin (or dies)
    httpd.shutdown()


if __name__ == "__main__":
    main()
