"""The console over a large store: a SQLite store holding 100,000 dead letters.

    python benchmarks/bench_console.py              # prints the table (about half a minute)
    python benchmarks/run.py --only console         # the same, into RESULTS.md

Server time: each figure is one request answered by the console's WSGI application,
called in this process (no network, no browser): the time from the call to the last
byte of the body, for a page of 50 rendered as HTML with its total (the first page; the
pages filtered by key, by status, by a rare text and by a text every letter holds; the
overview with its tally by key, reason and status), and for the count alone
(`api/dead-letters?limit=1`, whose `total` counts every match). The baseline, measured in
the same run, is what listing took before the console: the store's own `dead_letters()`,
every letter read.

The letters are written straight into the store's table in one transaction (as 100,000
workers' `bury` would leave them, without the hours): calls to 20 APIs with headers and a
JSON body, four statuses, the reasons a store sees, errors of which one in fifty timed out.

The target (issue 15): each figure at most 50 ms, median.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _harness import Row, Samples, Scale, standalone  # noqa: E402

import offload  # noqa: E402
from offload.codec.task import dump_call  # noqa: E402
from offload.console import make_app  # noqa: E402
from offload.stores.sqlite import SQLiteStore  # noqa: E402

TOKEN = "bench-console-token-0123456789"
LIMIT_MS = 50.0
BASELINE = "dead_letters(), every letter"
_INSERT = (
    "INSERT INTO dead_letters (id, task_id, idempotency_key, description, key, attempts, "
    "error, status, reason, first_attempt_at, last_attempt_at, buried_at, call, retry) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def fill(store: SQLiteStore, count: int, seed: int = 15) -> None:
    """`count` dead letters in `store`'s table, in one transaction."""
    rnd = random.Random(seed)
    start = time.time() - count
    rows = []
    for i in range(count):
        host = f"api{i % 20}.example.com"
        call = offload.http(
            "POST",
            f"https://{host}/v1/customers/{i}/charges",
            headers={"Authorization": "Bearer sk_live_x", "X-Request-Id": f"req-{i}"},
            json={"amount": 100 + i % 900, "currency": "eur", "customer": f"cus_{i:06d}"},
        )
        status = rnd.choice([400, 409, 422, 503])
        timed_out = i % 50 == 0
        error = (
            f"ReadTimeout: {host} read timed out (read timeout=30) on request {i}"
            if timed_out
            else f"HTTP {status} from upstream for customer cus_{i:06d}"
        )
        reason = "exhausted" if status == 503 or timed_out else "permanent"
        ids = f"{i:016x}{rnd.getrandbits(32):08x}"
        rows.append(
            (
                f"dl{ids}",
                f"t{ids}",
                f"t{ids}",
                call.describe(),
                call.key(),
                5 if reason == "exhausted" else 1,
                error,
                None if timed_out else status,
                reason,
                start + i - 30,
                start + i,
                start + i + 1,
                dump_call(call, (), {}),
                None,
            )
        )
    store.counts()  # opens the file: schema and indexes
    conn = store._connection
    assert conn is not None
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(_INSERT, rows)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")


def request(app: Any, path: str, query: str = "") -> int:
    """Call the console as a server would; the length of the body (all of it is made)."""
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SCRIPT_NAME": "",
        "HTTP_AUTHORIZATION": f"Bearer {TOKEN}",
        "wsgi.url_scheme": "http",
    }
    status: list[str] = []
    body = b"".join(app(environ, lambda s, h: status.append(s)))
    if not status[0].startswith("200"):
        raise RuntimeError(f"{path}?{query}: {status[0]}")
    return len(body)


def figures(count: int) -> dict[str, tuple[str, str]]:
    """figure -> (path, query)."""
    return {
        "first page": ("/dead-letters", ""),
        "page by key": ("/dead-letters", "key=https%3A%2F%2Fapi7.example.com%3A443"),
        "page by status": ("/dead-letters", "status=409"),
        "page by text, rare (one letter)": ("/dead-letters", f"text=cus_{count // 2:06d}"),
        "page by text, in one letter of 50": ("/dead-letters", "text=timed+out"),
        "page by text, in every letter": ("/dead-letters", "text=customer"),
        "overview (tally by key, reason, status)": ("/", ""),
        "the count alone (api, by status)": ("/api/dead-letters", "status=503&limit=1"),
    }


def _time(fn: Any, times: int) -> float:
    """Median milliseconds of `times` calls."""
    taken = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        taken.append((time.perf_counter() - t0) * 1000)
    return statistics.median(taken)


def run(scale: Scale) -> list[Row]:
    count = scale.n(100_000, 100)
    directory = Path(tempfile.mkdtemp(prefix="offload-bench-console-"))
    samples = Samples()
    try:
        store = SQLiteStore(directory / "console.db")
        fill(store, count)
        app = make_app(store, token=TOKEN)
        wanted = figures(count)
        for path, query in wanted.values():
            request(app, path, query)  # warm: templates compiled, pages in the cache
        for _ in range(scale.repeats):
            samples.add(BASELINE, _time(store.dead_letters, 1))
            for name, (path, query) in wanted.items():
                samples.add(name, _time(lambda p=path, q=query: request(app, p, q), 9))
        store.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    rows = [
        Row(
            "console",
            f"{BASELINE} ({count:,})",
            samples.median(BASELINE),
            "ms",
            runs=samples.count(BASELINE),
        )
    ]
    for name in wanted:
        value = samples.median(name)
        rows.append(
            Row(
                "console",
                name,
                value,
                "ms",
                baseline=BASELINE,
                ratio=samples.ratio(name, BASELINE),
                target=f"≤ {LIMIT_MS:g} ms",
                met=value <= LIMIT_MS,
                note=f"{count:,} dead letters; server time, HTML or JSON made",
                runs=samples.count(name),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    return standalone(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    os.environ.setdefault("OFFLOAD_SHUTDOWN_TIMEOUT", "0")
    raise SystemExit(main())
