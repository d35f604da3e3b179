"""`offload demo`: four misbehaving local APIs and a few hundred calls pushed through offload.

Everything runs on 127.0.0.1 in this process and ends on its own in a few seconds:

- **crm** answers 503 to the first attempt of one contact in four (and to the first two of
  one in twelve), and 422 to a contact without an email address;
- **mail** allows 20 requests a second (a bucket of a second's worth, so a request that
  arrives late after a paced one still passes) and answers the rest 429 with
  `Retry-After: 1`;
  offload paces it with the declared `Limit(rate=20)`, so it is never throttled while
  the other APIs go on;
- **search** is slow (0.2 s a call);
- **legacy** is down (500 to everything): offload pauses it after a second of failures,
  its calls wait without using attempts and one probe goes now and then, until its calls
  have waited `max_throttled` (3 s here) and become dead letters.

The progress (delivered, retrying, gated and paced keys, dead letters) is redrawn in place
on a terminal and printed as plain lines otherwise; then a summary table and the dead
letters with their reasons.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

import tenacity

from .calls import http
from .errors import OffloadError
from .limits import Limit
from .offloader import Offloader
from .policy import RetryPolicy
from .records import DeadLetter, Task

__all__ = ["run"]

WORKERS = 4
MAIL_PER_SECOND = 20
SLOW_SECONDS = 0.2
TIME_LIMIT = 25.0  # the demo gives up (exit 1) rather than run on; it needs about 5 s

# (status, headers) for a request: method, path, headers, body.
_Answer = tuple[int, dict[str, str]]
Responder = Callable[[str, str, dict[str, str], bytes], _Answer]


# -- the local APIs -------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: offload's pooled connections are reused
    disable_nagle_algorithm = True
    timeout = 10  # an idle keep-alive connection does not hold a thread for long

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the demo draws its own output

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        api = self.server.api
        status, headers = api.respond(self.command, self.path, dict(self.headers.items()), body)
        api.count(status)
        payload = json.dumps({"status": status}).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: LocalApi


@dataclass
class LocalApi:
    """One local API on its own port (so that offload gates each separately)."""

    name: str
    behaviour: str
    path: str
    respond: Responder
    received: int = 0
    answered: Counter[int] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: _Server | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.api = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"demo-{self.name}",
            daemon=True,
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def count(self, status: int) -> None:
        with self._lock:
            self.received += 1
            self.answered[status] += 1

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)


def _apis(stopping: threading.Event) -> list[LocalApi]:
    lock = threading.Lock()
    crm_attempts: Counter[int] = Counter()
    # The mail API's token bucket: a second's worth of requests, refilled at its rate, so
    # that a paced request the network (or a loaded machine) delivers late still passes.
    bucket = {"tokens": float(MAIL_PER_SECOND), "at": time.monotonic()}

    def crm(method: str, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        contact = json.loads(body or b"{}")
        if "@" not in str(contact.get("email", "")):
            return 422, {}
        n = int(contact.get("n", 0))
        with lock:
            crm_attempts[n] += 1
            attempt = crm_attempts[n]
        failures = 2 if n % 12 == 0 else 1 if n % 4 == 0 else 0
        return (503, {}) if attempt <= failures else (200, {})

    def mail(method: str, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        now = time.monotonic()
        with lock:
            refill = (now - bucket["at"]) * MAIL_PER_SECOND
            bucket["tokens"] = min(float(MAIL_PER_SECOND), bucket["tokens"] + refill)
            bucket["at"] = now
            over = bucket["tokens"] < 1
            if not over:
                bucket["tokens"] -= 1
        return (429, {"Retry-After": "1"}) if over else (202, {})

    def search(method: str, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        stopping.wait(SLOW_SECONDS)  # a slow third party (returns early when the demo ends)
        return 200, {}

    def legacy(method: str, path: str, headers: dict[str, str], body: bytes) -> _Answer:
        return 500, {}

    return [
        LocalApi("crm", "503 on some first attempts; 422 if no email", "/contacts", crm),
        LocalApi("mail", f"{MAIL_PER_SECOND} req/s, then 429 Retry-After: 1", "/send", mail),
        LocalApi("search", f"slow: {SLOW_SECONDS:g} s a call", "/index", search),
        LocalApi("legacy", "down: always 500", "/sync", legacy),
    ]


def _plan(apis: dict[str, LocalApi]) -> list[tuple[str, Any]]:
    """The calls to make, as (api name, HttpCall), in a shuffled but repeatable order."""
    calls: list[tuple[str, Any]] = []
    for n in range(1, 145):
        email = f"user{n}@example.com" if n % 24 else f"user{n}"  # 6 without a valid email
        body = {"n": n, "email": email}
        calls.append(("crm", http("POST", apis["crm"].url, json=body, idempotency_key=True)))
    for n in range(1, 101):
        calls.append(("mail", http("POST", apis["mail"].url, json={"to": f"user{n}@example.com"})))
    for n in range(1, 51):
        calls.append(("search", http("POST", apis["search"].url, json={"doc": n})))
    for n in range(1, 7):
        calls.append(("legacy", http("POST", apis["legacy"].url, json={"record": n})))
    random.Random(7).shuffle(calls)
    return calls


# -- output ---------------------------------------------------------------------------------


class _Progress:
    """Live progress: redrawn in place on a terminal, a plain line a second otherwise."""

    def __init__(self, out: TextIO, total: int, names: dict[str, str]) -> None:
        self.out = out
        self.total = total
        self.names = names  # throttle key -> API name
        self.tty = _is_tty(out)
        self.interval = 0.1 if self.tty else 1.0
        self._drawn = 0  # lines drawn last time (terminal only)

    def draw(self, off: Offloader, elapsed: float) -> None:
        s = off.stats()
        gates = off.gates()
        settled = s.succeeded + s.dead_lettered
        # A durable store holds waiting tasks itself; count them with the scheduler's.
        retrying = s.delayed + (getattr(s, "stored_delayed", None) or 0)
        queued = s.queued + (getattr(s, "stored_ready", None) or 0)
        keys = off.keys()
        gated = ", ".join(
            f"{self.names.get(key, key)}{' down,' if keys.get(key) and keys[key].down else ''}"
            f" reopens in {wait:.1f}s"
            for key, wait in sorted(gates.items())
        )
        paced = ", ".join(
            f"{self.names.get(key, key)} at {state.rate:g}/s"
            for key, state in keys.items()
            if state.limit is not None and state.rate is not None
        )
        if not self.tty:
            self.out.write(
                f"[{elapsed:5.1f}s] delivered {s.succeeded}/{self.total}  "
                f"retrying {retrying}  queued {queued}  in flight {s.in_flight}  "
                f"gated {len(gates)}{f' ({gated})' if gates else ''}  "
                f"paced {paced or 'none'}  dead letters {s.dead_lettered}\n"
            )
            self.out.flush()
            return
        width = 36
        done = width * settled // max(1, self.total)
        lines = [
            f"  [{'#' * done}{'.' * (width - done)}] {settled}/{self.total} settled  "
            f"{elapsed:4.1f}s",
            f"  delivered {s.succeeded:<5} retrying {retrying:<5} queued {queued:<5} "
            f"in flight {s.in_flight:<3} dead letters {s.dead_lettered}",
            f"  gated keys: {gated or 'none'}",
            f"  paced keys: {paced or 'none'}",
        ]
        # Move up over the previous drawing and clear it, then draw again.
        prefix = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.out.write(prefix + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.out.flush()
        self._drawn = len(lines)


def _is_tty(out: TextIO) -> bool:
    try:
        return out.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def _summary(
    apis: list[LocalApi],
    planned: Counter[str],
    delivered: Counter[str],
    letters: list[DeadLetter],
    names: dict[str, str],
) -> list[str]:
    dead = Counter(names.get(dl.key or "", "?") for dl in letters)
    rows = [["API", "behaviour", "calls", "delivered", "dead letters", "requests received"]]
    for api in apis:
        rows.append(
            [
                api.name,
                api.behaviour,
                str(planned[api.name]),
                str(delivered[api.name]),
                str(dead[api.name]),
                str(api.received),
            ]
        )
    rows.append(
        [
            "total",
            "",
            str(sum(planned.values())),
            str(sum(delivered.values())),
            str(len(letters)),
            str(sum(api.received for api in apis)),
        ]
    )
    return _table(rows, right={2, 3, 4, 5})


def _dead_letter_lines(letters: list[DeadLetter], names: dict[str, str]) -> list[str]:
    rows = [["id", "API", "reason", "attempts", "status", "error"]]
    for dl in letters:
        rows.append(
            [
                dl.id,
                names.get(dl.key or "", "?"),
                dl.reason,
                str(dl.attempts),
                "-" if dl.status is None else str(dl.status),
                dl.error,
            ]
        )
    return _table(rows, right={3, 4})


@contextlib.contextmanager
def _quiet_offload_log() -> Iterator[None]:
    """Keep offload's WARNING per dead letter off the screen (the demo lists them itself),
    unless the application configured logging."""
    logger = logging.getLogger("offload")
    if logger.hasHandlers():
        yield
        return
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


# -- the run --------------------------------------------------------------------------------


def run(store: str | None = None, *, out: TextIO | None = None) -> int:
    """Run the demo, writing to `out` (stdout), and return the exit status: 0; 1 if it did
    not finish in time; 2 for a store that cannot be opened; 130 when interrupted.
    `store` is a store URL ("sqlite:///demo.db"); the default is the memory store."""
    out = out if out is not None else sys.stdout
    stopping = threading.Event()
    apis = _apis(stopping)
    delivered: Counter[str] = Counter()
    delivered_lock = threading.Lock()
    names: dict[str, str] = {}

    def on_success(task: Task, result: object) -> None:
        with delivered_lock:
            delivered[names.get(task.key or "", "?")] += 1

    # Short waits so that the demo ends in seconds; production defaults are in RetryPolicy.
    policy_attempts = 4
    policy = RetryPolicy(
        stop=tenacity.stop_after_attempt(policy_attempts),
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=1),
        max_throttled=3,
    )
    mail_api = next(api for api in apis if api.name == "mail")
    for api in apis:
        api.start()  # first: the mail API's limit names its address
    try:
        off = Offloader(
            store=store if store is not None else "memory",
            retry=policy,
            workers=WORKERS,
            idle_timeout=0.5,
            on_success=on_success,
            # burst=1: evenly spaced, as the API counts its limit per calendar second.
            limits={mail_api.base_url: Limit(rate=MAIL_PER_SECOND, burst=1)},
        )
    except (OffloadError, ValueError, TypeError) as exc:
        for api in apis:
            api.stop()
        print(f"offload demo: {exc}", file=sys.stderr)
        return 2

    started = time.monotonic()
    finished = False
    try:
        with _quiet_offload_log():
            by_name = {api.name: api for api in apis}
            names.update({api.base_url: api.name for api in apis})
            plan = _plan(by_name)
            planned = Counter(name for name, _ in plan)
            out.write(
                f"offload demo: {len(plan)} calls to {len(apis)} misbehaving local APIs, "
                f"{WORKERS} workers, store {off.store.url}\n"
            )
            for api in apis:
                out.write(f"  {api.name:<7} {api.url:<36} {api.behaviour}\n")
            out.write("\n")
            out.flush()

            tasks = [off.enqueue_task(call) for _, call in plan]
            ids = {task.id for task in tasks}
            progress = _Progress(out, len(plan), names)
            while True:
                if off.flush(timeout=progress.interval):
                    finished = True
                    break
                elapsed = time.monotonic() - started
                progress.draw(off, elapsed)
                if elapsed > TIME_LIMIT:
                    break
            elapsed = time.monotonic() - started
            progress.draw(off, elapsed)
            stats = off.stats()
            letters = [dl for dl in off.dead_letters() if dl.task_id in ids]
            with delivered_lock:
                delivered_now = Counter(delivered)

            unsettled = len(plan) - sum(delivered_now.values()) - len(letters)
            lost = "nothing lost" if unsettled == 0 else f"{unsettled} not settled"
            lines = [
                "",
                f"Done in {elapsed:.1f}s: {sum(delivered_now.values())} delivered, "
                f"{len(letters)} dead letters, {stats.retried} retries, {lost}.",
                "",
                *_summary(apis, planned, delivered_now, letters, names),
                "",
                f"  mail: paced at {MAIL_PER_SECOND}/s by its declared offload.Limit: "
                f"{mail_api.answered[429]} of its {mail_api.received} requests answered 429.",
                f"  legacy: down, so paused: {by_name['legacy'].received} requests for "
                f"{planned['legacy']} calls (without the pause, {policy_attempts} each).",
                "",
            ]
            if letters:
                lines.append(f"Dead letters ({len(letters)}), kept to inspect, replay or discard:")
                lines.extend(_dead_letter_lines(letters, names))
                lines.append("")
                if off.store.durable:
                    lines.append(f"  offload dead-letters list --store {off.store.url}")
                else:
                    lines.append(
                        "  In your code: offload.dead_letters(), offload.replay(id), "
                        "offload.discard(id)"
                    )
            if not finished:
                lines.append(f"offload demo: not finished after {TIME_LIMIT:g}s; giving up")
            out.write("\n".join(lines) + "\n")
            out.flush()
    except KeyboardInterrupt:
        out.write("\noffload demo: interrupted\n")
        return 130
    finally:
        stopping.set()
        off.shutdown(timeout=5)
        for api in apis:
            api.stop()
        off.store.close()
    return 0 if finished else 1


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1] if len(sys.argv) > 1 else None))
