"""A local API for the benchmarks, run in its own process so that its CPU does not share
the benchmark's GIL.

    python benchmarks/_server.py [--delay SECONDS] [--throttle N] [--retry-after S]

Listens on 127.0.0.1 (a free port, printed as the first line of stdout), HTTP/1.1
keep-alive, Nagle off, a thread per connection. Every request is answered 200 after
`delay` seconds, except that the first `throttle` requests to each path since start (or
since a request to `/_reset`) are answered 429 with `Retry-After`. Exits when stdin closes, so
a benchmark that dies never leaves it behind.
"""

from __future__ import annotations

import argparse
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
        if self.path == "/_reset":
            with srv.lock:
                srv.throttled.clear()
            status = 200
        else:
            with srv.lock:
                count = srv.throttled.get(self.path, 0)
                throttled = count < srv.throttle
                if throttled:
                    srv.throttled[self.path] = count + 1
            if srv.delay:
                time.sleep(srv.delay)  # the simulated API's own latency
            status = 429 if throttled else 200
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", srv.retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--throttle", type=int, default=0)
    parser.add_argument("--retry-after", default="1")
    opts = parser.parse_args()
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.delay, httpd.throttle, httpd.retry_after = opts.delay, opts.throttle, opts.retry_after
    httpd.throttled = {}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(httpd.server_address[1], flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin (or dies)
    httpd.shutdown()


if __name__ == "__main__":
    main()
