"""A chaos API on 127.0.0.1: a real HTTP server that misbehaves on a seeded plan.

Each request names a request id as the last segment of its path (`/calls/<rid>`). What
the server does with the n-th request for a rid is a pure function of (seed, rid, n),
so a run is reproducible whatever order the requests arrive in (`ChaosServer.plan`).

What it can do, besides answering 200:

=================  ===========================================================  =========
fault              what the client sees                                         processed
=================  ===========================================================  =========
slow               200 after a short delay (below the client's read timeout)    yes
503, 502           the status, no Retry-After                                   no
503_retry_after    503 with `Retry-After: 0.1` (a throttle)                     no
429_seconds        429, `Retry-After: <retry_after_seconds>`                    no
429_date           429, `Retry-After: <HTTP-date up to a second or two ahead>`   no
429_zero           429, `Retry-After: 0`                                        no
429_negative       429, `Retry-After: -1`                                       no
429_fraction       429, `Retry-After: 0.1`                                      no
429_junk           429, `Retry-After: soon, maybe` (malformed)                  no
reset              a TCP reset instead of an answer                             no
reset_after        the work is done, then a TCP reset: the answer is lost       yes
garbage            bytes that are not HTTP                                      no
truncated          200 whose body is cut short: the answer is lost             yes
read_timeout       the work is done, the answer comes after `hang` seconds     yes
=================  ===========================================================  =========

Some rids are poisoned for good (seeded too): `permanent` ones always answer 400 and
`exhaust` ones always answer 500, so a run has dead letters of both kinds.

The server counts, per rid: requests received, times the work was done ("processed"),
2xx answers given, answers lost on purpose after processing (so a duplicate delivery has
a reason), idempotency keys seen, and requests that came earlier than a Retry-After the
server had given that rid ("early"; must stay 0).

In a test: `ChaosServer(seed=1, apis=4)`; each API is its own port, so its own throttle
key. As a separate process (the soak): `python tests/support/chaos.py --seed 1 --apis 4` prints
`{"urls": [...]}` and serves `GET /__chaos__/counts` as JSON until stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import json
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

__all__ = [
    "FAULTS",
    "ChaosServer",
    "ClientLedger",
    "Ending",
    "RidCounts",
    "Summary",
    "Tarpit",
    "check",
    "fetch_counts",
    "summarise",
]

# The faults whose answer is lost after the work was done: a retry then repeats the work,
# and that duplicate has a reason.
LOST_ANSWER = frozenset({"reset_after", "truncated", "read_timeout"})
PROCESSED = LOST_ANSWER | {"ok", "slow"}

#: Default weights of each fault per request (the rest answer 200 at once).
FAULTS: Mapping[str, float] = {
    "slow": 0.05,
    "503": 0.04,
    "502": 0.03,
    "503_retry_after": 0.01,
    "429_seconds": 0.001,
    "429_date": 0.001,
    "429_zero": 0.005,
    "429_negative": 0.004,
    "429_fraction": 0.005,
    "429_junk": 0.004,
    "reset": 0.01,
    "reset_after": 0.005,
    "garbage": 0.01,
    "truncated": 0.005,
    "read_timeout": 0.003,
}

_COUNTS_PATH = "/__chaos__/counts"


@dataclass
class RidCounts:
    """What the server saw and did for one request id."""

    received: int = 0
    processed: int = 0  # times the work was done
    answered_2xx: int = 0  # 2xx answers given in time
    lost: int = 0  # answers lost on purpose after the work was done
    early: int = 0  # requests before a Retry-After given to this rid had passed
    keys: list[str] = field(default_factory=list)  # distinct Idempotency-Key values
    not_before: float = 0.0  # wall clock: the last Retry-After given, as a time


@dataclass(frozen=True)
class Summary:
    """Totals over every rid (see `summarise`)."""

    rids: int
    requests: int
    faults: dict[str, int]
    processed: int
    answered_2xx: int
    lost_answers: int
    duplicates: int  # times the work was done beyond the first
    unexplained_duplicates: int  # duplicates not preceded by a lost answer
    early: int
    rids_with_several_keys: int


def summarise(counts: Mapping[str, RidCounts], faults: Mapping[str, int]) -> Summary:
    """Totals and the two numbers that must be 0: unexplained duplicates, early requests."""
    values = list(counts.values())
    return Summary(
        rids=len(values),
        requests=sum(c.received for c in values),
        faults={k: v for k, v in sorted(faults.items()) if k != "ok"},
        processed=sum(c.processed for c in values),
        answered_2xx=sum(c.answered_2xx for c in values),
        lost_answers=sum(c.lost for c in values),
        duplicates=sum(max(0, c.processed - 1) for c in values),
        unexplained_duplicates=sum(max(0, c.processed - 1 - c.lost) for c in values),
        early=sum(c.early for c in values),
        rids_with_several_keys=sum(1 for c in values if len(c.keys) > 1),
    )


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.partition("?")[0]
        if path == _COUNTS_PATH:
            self._send(200, json.dumps(self.server.chaos._export()).encode())
            return None
        rid = path.rstrip("/").rpartition("/")[2]
        chaos = self.server.chaos
        fault, extra = chaos._receive(rid, self.headers.get("Idempotency-Key"))
        if fault in ("ok", "slow"):
            if fault == "slow" and chaos._stop.wait(extra):
                return self._reset()
            # Counted before it is sent: a client that has its answer may read the counts
            # at once, before this thread would run again.
            chaos._answered(rid)
            self._send(200, b'{"ok":true}')
        elif fault == "permanent":
            self._send(400, b'{"error":"poisoned"}')
        elif fault == "exhaust":
            self._send(500, b'{"error":"always failing"}')
        elif fault in ("503", "502"):
            self._send(int(fault), b"")
        elif fault == "503_retry_after" or fault.startswith("429"):
            status = 503 if fault == "503_retry_after" else 429
            self._send(status, b"", {"Retry-After": str(extra)})
        elif fault in ("reset", "reset_after"):
            self._reset()
        elif fault == "garbage":
            self.wfile.write(b"\x00\xffTHIS IS NOT HTTP\r\n\r\n")
            self.close_connection = True
        elif fault == "truncated":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"ok":')
            self.close_connection = True
        elif fault == "read_timeout":
            if chaos._stop.wait(extra):
                return self._reset()
            with contextlib.suppress(OSError):  # the client is long gone
                self._send(200, b'{"ok":"late"}')
        return None

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST instead of FIN.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    chaos: ChaosServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out and go away are the point of this server


class ChaosServer:
    """See the module docstring. `close()` when done (or use it as a context manager)."""

    def __init__(
        self,
        seed: int = 0,
        *,
        apis: int = 1,
        faults: Mapping[str, float] = FAULTS,
        fault_rate: float = 1.0,
        poison_permanent: float = 0.01,
        poison_exhaust: float = 0.003,
        slow: tuple[float, float] = (0.005, 0.03),
        hang: float = 1.5,
        retry_after_seconds: int = 1,
        scripted: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        self.seed = seed
        self.fault_rate = fault_rate
        self.poison_permanent = poison_permanent
        self.poison_exhaust = poison_exhaust
        self.slow = slow
        self.hang = hang
        self.retry_after_seconds = retry_after_seconds
        self.scripted = {rid: list(plan) for rid, plan in (scripted or {}).items()}
        for plan in self.scripted.values():
            bad = set(plan) - set(FAULTS) - {"ok", "permanent", "exhaust"}
            if bad:
                raise ValueError(f"unknown faults in a script: {sorted(bad)}")
        self._names = list(faults)
        self._cumulative: list[float] = []
        total = 0.0
        for name in self._names:
            total += faults[name] * fault_rate
            self._cumulative.append(total)
        if total > 1:
            raise ValueError(f"fault weights add up to {total:g} > 1")
        self._lock = threading.Lock()
        self._counts: dict[str, RidCounts] = {}
        self._faults: Counter[str] = Counter()
        self._stop = threading.Event()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        for _ in range(apis):
            httpd = _Server(("127.0.0.1", 0), _Handler)
            httpd.chaos = self
            thread = threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="chaos-server",
                daemon=True,
            )
            thread.start()
            self._servers.append(httpd)
            self._threads.append(thread)

    # -- the plan: a pure function of (seed, rid, n) ---------------------------------------

    def fate(self, rid: str) -> str:
        """The rid's fate: "ok", or poisoned: "permanent" (always 400), "exhaust" (always 500)."""
        if rid in self.scripted:
            return "ok"
        draw = random.Random(f"{self.seed}/{rid}").random()
        if draw < self.poison_permanent:
            return "permanent"
        if draw < self.poison_permanent + self.poison_exhaust:
            return "exhaust"
        return "ok"

    def plan(self, rid: str, n: int) -> tuple[str, Any]:
        """What the server does with the n-th (from 1) request for `rid`, and its parameter
        (a delay, or a Retry-After value)."""
        rng = random.Random(f"{self.seed}/{rid}/{n}")
        script = self.scripted.get(rid)
        if script is not None:  # a scripted rid answers 200 once its script is done
            name = script[n - 1] if n <= len(script) else "ok"
            return name, self._parameter(name, rng)
        fate = self.fate(rid)
        if fate != "ok":
            return fate, None
        draw = rng.random()
        for name, edge in zip(self._names, self._cumulative, strict=True):
            if draw < edge:
                return name, self._parameter(name, rng)
        return "ok", None

    def _parameter(self, fault: str, rng: random.Random) -> Any:
        if fault == "slow":
            return rng.uniform(*self.slow)
        if fault == "read_timeout":
            return self.hang
        return {
            "503_retry_after": "0.1",
            "429_seconds": str(self.retry_after_seconds),
            "429_date": "date",  # made when answering: it is relative to that moment
            "429_zero": "0",
            "429_negative": "-1",
            "429_fraction": "0.1",
            "429_junk": "soon, maybe",
        }.get(fault)

    # -- called by handler threads ---------------------------------------------------------

    def _receive(self, rid: str, key: str | None) -> tuple[str, Any]:
        now = time.time()
        with self._lock:
            counts = self._counts.get(rid)
            if counts is None:
                counts = self._counts[rid] = RidCounts()
            counts.received += 1
            if now < counts.not_before:
                counts.early += 1
            if key is not None and key not in counts.keys:
                counts.keys.append(key)
            fault, extra = self.plan(rid, counts.received)
            self._faults[fault] += 1
            if fault in PROCESSED:
                counts.processed += 1
            if fault in LOST_ANSWER:
                counts.lost += 1
            if fault == "429_date":
                # An HTTP-date has whole seconds: "not before" this instant, which is
                # up to a second sooner than now + retry_after_seconds.
                when = int(now) + self.retry_after_seconds
                extra = email.utils.formatdate(when, usegmt=True)
                counts.not_before = float(when)
            elif extra is not None and fault.startswith(("429", "503_")):
                try:
                    seconds = float(extra)
                except ValueError:
                    seconds = 0.0
                # The answer leaves after `now`; the client measures from its arrival.
                counts.not_before = max(counts.not_before, now + max(seconds, 0.0))
        return fault, extra

    def _answered(self, rid: str) -> None:
        with self._lock:
            self._counts[rid].answered_2xx += 1

    def _export(self) -> dict[str, Any]:
        with self._lock:
            return {
                "counts": {rid: asdict(c) for rid, c in self._counts.items()},
                "faults": dict(self._faults),
            }

    # -- for the test ----------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """The base URL of each API (`http://127.0.0.1:PORT`)."""
        return [f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers]

    def url(self, rid: str, api: int = 0) -> str:
        """The URL that names `rid` on API number `api`."""
        return f"{self.urls[api]}/calls/{rid}"

    def counts(self) -> dict[str, RidCounts]:
        """A copy of the per-rid counts."""
        with self._lock:
            return {
                rid: RidCounts(**{**asdict(c), "keys": list(c.keys)})
                for rid, c in self._counts.items()
            }

    def faults(self) -> Counter[str]:
        """How many times each plan entry was carried out ("ok" included)."""
        with self._lock:
            return Counter(self._faults)

    def summary(self) -> Summary:
        with self._lock:
            return summarise(self._counts, self._faults)

    def close(self) -> None:
        """Stop serving and release every delayed answer."""
        self._stop.set()
        for httpd in self._servers:
            httpd.shutdown()
            httpd.server_close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> ChaosServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Ending:
    """How the client saw a call end as a dead letter (a copy of the DeadLetter's fields)."""

    reason: str
    status: int | None
    attempts: int


class ClientLedger:
    """What the offloader told the client about each rid, through its callbacks.

    Pass `callbacks` to the Offloader and call `enqueued(task)` for each task queued.
    A task's rid is the last segment of its URL. With a `journal` (a text file open for
    writing), events go to the file instead of memory, so that a long soak's own
    bookkeeping does not show in the client's memory; `ClientLedger.read(path)` loads it.
    """

    def __init__(self, journal: TextIO | None = None) -> None:
        self._lock = threading.Lock()
        self._journal = journal
        self.delivered: Counter[str] = Counter()
        self.dead: dict[str, list[Ending]] = {}
        self.no_answer: Counter[str] = Counter()  # failed attempts that got no status
        self._keys: dict[str, str] = {}  # rid -> the task's idempotency key

    @classmethod
    def read(cls, path: str) -> ClientLedger:
        """The ledger a journal recorded."""
        ledger = cls()
        with open(path) as f:
            for line in f:
                ledger._apply(*line.split())
        return ledger

    @staticmethod
    def rid_of(task: Any) -> str:
        return str(task.call.url).rpartition("/")[2]

    def key(self, rid: str) -> str:
        return self._keys[rid]

    @property
    def rids(self) -> set[str]:
        return set(self._keys)

    def _record(self, *event: str) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.write(" ".join(event) + "\n")
            else:
                self._apply(*event)

    def _apply(self, kind: str, rid: str, *fields: str) -> None:
        if kind == "enqueued":
            self._keys[rid] = fields[0]
        elif kind == "delivered":
            self.delivered[rid] += 1
        elif kind == "no_answer":
            self.no_answer[rid] += 1
        elif kind == "dead":
            reason, status, attempts = fields
            ending = Ending(reason, None if status == "-" else int(status), int(attempts))
            self.dead.setdefault(rid, []).append(ending)

    def enqueued(self, task: Any) -> None:
        self._record("enqueued", self.rid_of(task), task.idempotency_key)

    def on_success(self, task: Any, result: Any) -> None:
        self._record("delivered", self.rid_of(task))

    def on_retry(self, task: Any, delay: float, error: str | None) -> None:
        if not (error or "").startswith("HTTP "):  # a reset, garbage or a timeout
            self._record("no_answer", self.rid_of(task))

    def on_dead_letter(self, task: Any, letter: Any) -> None:
        rid = self.rid_of(task)
        status = "-" if letter.status is None else str(letter.status)
        self._record("dead", rid, str(letter.reason), status, str(letter.attempts))
        if not (letter.error or "").startswith("HTTP "):
            self._record("no_answer", rid)

    @property
    def callbacks(self) -> dict[str, Any]:
        return {
            "on_success": self.on_success,
            "on_retry": self.on_retry,
            "on_dead_letter": self.on_dead_letter,
        }


def check(
    server: ChaosServer | None,
    ledger: ClientLedger,
    counts: Mapping[str, RidCounts],
    faults: Mapping[str, int],
    max_attempts: int,
) -> dict[str, Any]:
    """Hold the client's ledger against the server's counts; return the figures and every
    violation found (`violations` must be empty).

    A rid is delivered or dead-lettered, once. The work for a rid is done more than once
    only after an answer was lost: on purpose (the plan's lost answers) or by accident (a
    retry after which the client saw no status, e.g. a read timeout under load); the
    rest are `unexplained` duplicates. Poisoned rids end as their poison says.
    """
    violations: list[str] = []
    rids = ledger.rids
    lost = [r for r in rids if ledger.delivered[r] + len(ledger.dead.get(r, ())) == 0]
    twice = [r for r in rids if ledger.delivered[r] + len(ledger.dead.get(r, ())) > 1]
    both = [r for r in rids if ledger.delivered[r] and r in ledger.dead]
    for name, bad in (("lost", lost), ("ended twice", twice), ("delivered and dead", both)):
        if bad:
            violations.append(f"{len(bad)} rid(s) {name}: {sorted(bad)[:5]}")
    duplicates = planned = accidental = unexplained = processed_then_dead = 0
    for rid in rids:
        c = counts.get(rid)
        if c is None:
            violations.append(f"{rid}: never reached the server")
            continue
        extra = max(0, c.processed - 1)
        duplicates += extra
        planned_here = min(extra, c.lost)
        accidental_here = min(extra - planned_here, ledger.no_answer[rid])
        planned += planned_here
        accidental += accidental_here
        unexplained += extra - planned_here - accidental_here
        if extra - planned_here - accidental_here:
            violations.append(f"{rid}: processed {c.processed} times without a lost answer")
        if c.early:
            violations.append(f"{rid}: {c.early} request(s) before its Retry-After")
        if c.keys != [ledger.key(rid)]:
            violations.append(f"{rid}: Idempotency-Key {c.keys} != {ledger.key(rid)!r}")
        if ledger.delivered[rid] and c.answered_2xx + c.lost == 0:
            violations.append(f"{rid}: delivered, but the server never did the work")
        if rid in ledger.dead and c.processed:
            processed_then_dead += 1
        fate = server.fate(rid) if server is not None else None
        letters = ledger.dead.get(rid, [])
        if fate == "permanent" and [(x.reason, x.status) for x in letters] != [("permanent", 400)]:
            violations.append(f"{rid}: poisoned with 400 but ended {letters}")
        if fate == "exhaust" and [(x.reason, x.status, x.attempts) for x in letters] != [
            ("exhausted", 500, max_attempts)
        ]:
            violations.append(f"{rid}: poisoned with 500 but ended {letters}")
    summary = summarise({r: counts[r] for r in rids if r in counts}, faults)
    dead_reasons = Counter(x.reason for letters in ledger.dead.values() for x in letters)
    return {
        "calls": len(rids),
        "requests": summary.requests,
        "faults_injected": sum(summary.faults.values()),
        "faults": summary.faults,
        "delivered": sum(1 for r in rids if ledger.delivered[r]),
        "dead_lettered": dict(dead_reasons),
        "lost": len(lost),
        "duplicates": duplicates,
        "duplicates_after_planned_lost_answer": planned,
        "duplicates_after_accidental_lost_answer": accidental,
        "duplicates_unexplained": unexplained,
        "processed_but_dead_lettered": processed_then_dead,
        "early_requests": summary.early,
        "violations": violations,
    }


class Tarpit:
    """An API that accepts connections and never answers (nor reads, nor closes).

    The worst outage for a client: no refusal, no reset, only its own timeout ends a call.
    """

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._cond = threading.Condition()
        self._held: list[socket.socket] = []
        self._closed = False
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="tarpit", daemon=True)
        self._thread.start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def connections(self) -> int:
        with self._cond:
            return len(self._held)

    def wait_for_connections(self, count: int, timeout: float = 10) -> bool:
        """Block until `count` connections have been accepted; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._held) >= count, timeout)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with self._cond:
                self._held.append(conn)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            held, self._held = self._held, []
        # shutdown() wakes the accept() blocked in the thread; close() alone may not.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in held:
            conn.close()
        self._thread.join(5)

    def __enter__(self) -> Tarpit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_counts(url: str) -> tuple[dict[str, RidCounts], dict[str, int]]:
    """The counts of a chaos server running in another process (`url`: any API's base)."""
    import requests

    data = requests.get(url + _COUNTS_PATH, timeout=60).json()
    counts = {rid: RidCounts(**c) for rid, c in data["counts"].items()}
    return counts, data["faults"]


def main(argv: list[str] | None = None) -> None:
    """Serve until stdin closes: `python tests/support/chaos.py --seed 1 --apis 4`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--apis", type=int, default=1)
    parser.add_argument("--fault-rate", type=float, default=1.0, help="scales every weight")
    parser.add_argument("--hang", type=float, default=1.5, help="read_timeout delay, seconds")
    args = parser.parse_args(argv)
    server = ChaosServer(args.seed, apis=args.apis, fault_rate=args.fault_rate, hang=args.hang)
    sys.stdout.write(json.dumps({"urls": server.urls}) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # the parent closes our stdin (or dies) to stop us
    server.close()


if __name__ == "__main__":
    main()
