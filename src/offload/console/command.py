"""`offload console --store URL`: the console served on its own, by a threaded stdlib
WSGI server, on loopback unless told otherwise; and `offload health` (both commands'
parsers are added to cli/parser.py's by `add_commands`).

It prints the URL to open, with a login token made for this run (as Jupyter does), unless
OFFLOAD_CONSOLE_TOKEN gives one (then the URL goes without it: whoever set the variable
knows it). The request log on stderr never shows a token: query strings are redacted.
Runs until SIGINT or SIGTERM, then exits 0.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any, TextIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .._numbers import plain_int
from .._redact import redact_url
from ..stores import Store
from . import make_app  # raises ImportError, naming the extra, without Jinja2

__all__ = ["add_commands", "serve"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_QUERY = re.compile(r"[^\s\"]*\?[^\s\"]*")  # a request target with a query string


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's idle keep-alive never holds the exit up


class _Handler(WSGIRequestHandler):
    disable_nagle_algorithm = True
    log_to: TextIO | None = None

    def log_message(self, format: str, *args: Any) -> None:
        # "GET /?token=... HTTP/1.1" 303 -: the request line's URL is redacted.
        line = _QUERY.sub(lambda m: redact_url(m.group(0)), format % args)
        out = self.log_to
        if out is not None:
            out.write(f"offload console: {self.address_string()} {line}\n")
            out.flush()

    def get_stderr(self) -> Any:
        return self.log_to


def serve(
    store: Store,
    *,
    host: str,
    port: int,
    read_only: bool,
    out: TextIO,
    err: TextIO,
    ready: threading.Event | None = None,
) -> int:
    """Serve the console over `store` until SIGINT or SIGTERM; exit status 0."""
    given = os.environ.get("OFFLOAD_CONSOLE_TOKEN") or None
    token = given or secrets.token_urlsafe(24)
    app = make_app(store, token=token, read_only=read_only)
    handler = type("Handler", (_Handler,), {"log_to": err})
    server = make_server(host, port, app, server_class=_Server, handler_class=handler)
    shown_host = host if ":" not in host else f"[{host}]"
    base = f"http://{shown_host}:{server.server_address[1]}/"
    if host not in _LOOPBACK:
        err.write(
            f"offload console: listening on {host}, not only on this machine: anyone who can "
            "reach the port can try the token; put it behind HTTPS\n"
        )
    mode = " (read-only)" if read_only else ""
    out.write(f"offload console{mode} for {redact_url(store.url)}\n")
    if given is None:
        out.write(f"    open {base}?token={token}\n")
    else:
        out.write(f"    open {base} and log in with the token in OFFLOAD_CONSOLE_TOKEN\n")
    out.write("    (Ctrl-C to stop)\n")
    out.flush()
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    thread = threading.Thread(target=server.serve_forever, name="offload-console", daemon=True)
    thread.start()
    if ready is not None:
        ready.set()
    try:
        while not stop.wait(3600):
            pass
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)
        server.shutdown()
        server.server_close()
        thread.join(5)
    return 0


def _port(text: str) -> int:
    """`--port`: 0 to 65535 (a usage error otherwise, not a failed bind)."""
    port = plain_int(text)
    if port is None or port > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return port


def add_commands(
    commands: Any, store: argparse.ArgumentParser, open_store: Callable[[Any], Store]
) -> None:
    """Add `console` and `health` to the `offload` command's subcommands; `store` is the
    parent parser of `--store`, `open_store(args)` the CLI's way to open it. Handlers take
    (args, out, err) and return the exit status."""

    def console_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        opened = open_store(args)
        try:
            return serve(
                opened,
                host=args.host,
                port=args.port,
                read_only=args.read_only,
                out=out,
                err=err,
            )
        finally:
            opened.close()

    def health_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
        from ..health_check import check_command  # noqa: PLC0415

        opened = open_store(args)
        try:
            return check_command(opened, args.max_age, args.max_dead_letters, out)
        finally:
            opened.close()

    console = commands.add_parser(
        "console", parents=[store], help="a web page: dead letters, stats, metrics, health"
    )
    console.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    console.add_argument("--port", type=_port, default=8765, help="port (default: 8765; 0: any)")
    console.add_argument("--read-only", action="store_true", help="show, never change")
    console.set_defaults(handler=console_command)
    health = commands.add_parser("health", parents=[store], help="exit 0 if healthy, 1 if not")
    health.add_argument("--max-age", metavar="S", type=float, help="seconds a due task may wait")
    health.add_argument("--max-dead-letters", metavar="N", type=int, help="dead letters allowed")
    health.set_defaults(handler=health_command)
