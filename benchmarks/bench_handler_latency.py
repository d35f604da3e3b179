"""A web handler's latency with an enqueue in it, against the same handler without.

The Flask app of tests/support/gunicorn_app.py runs under a real gunicorn (sync workers,
preforked); `/enqueue/<id>` hands a POST to a local API (a separate process) to offload,
`/plain/<id>` does the same work but for the hand-over, and `/inline/<id>` makes the call
itself, in the request, as a handler without offload would. A second gunicorn runs the same
app with `OFFLOAD_WORKER_NICE=10` (offload's worker threads 10 steps nicer), for the
enqueuing handler once more; `/web/enqueue/<id>` on the first is the enqueuing handler
under `offload.web.WSGIMiddleware` (the workers are woken after the response). One client sends
requests one at a time, in blocks of each kind taking turns, so all see the same machine. The
figures are the round trip seen by the client (what a user of the site waits; it includes
the cost of the offload worker thread delivering in the background, in the same process)
and the handler's own time; every ratio is enqueue / plain in the same run.

    python benchmarks/bench_handler_latency.py [--scale 0.2]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from _harness import LocalAPI, Row, Samples, Scale, at_most, percentile

APP_DIR = Path(__file__).resolve().parent.parent / "tests" / "support"
WORKERS = 2


@contextmanager
def gunicorn(api_url: str, **offload_env: str) -> Iterator[str]:
    """gunicorn serving tests/support/gunicorn_app.py (with `offload_env`, OFFLOAD_* variables);
    yields its base URL, stops it with SIGTERM."""
    with tempfile.TemporaryDirectory() as runtime:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        env.update(OFFLOAD_TEST_API=api_url, XDG_RUNTIME_DIR=runtime, HOME=runtime)
        env.update(offload_env)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                str(WORKERS),
                "--bind",
                "127.0.0.1:0",
                "--chdir",
                str(APP_DIR),
                "--log-level",
                "info",
                "gunicorn_app:app",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stderr is not None
        lines: list[str] = []
        booted = threading.Event()
        port: list[str] = []

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", line)
                if found:
                    port.append(found.group(1))
                if sum("Booting worker" in x for x in lines) >= WORKERS and port:
                    booted.set()
            booted.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if not booted.wait(60) or not port:
                raise RuntimeError("gunicorn did not start:\n" + "".join(lines))
            yield f"http://127.0.0.1:{port[0]}"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            reader.join(5)
            proc.stderr.close()


def block(session: requests.Session, base: str, kind: str, count: int) -> list[tuple[float, float]]:
    """`count` requests one after another; (round trip ms, handler us) for each."""
    out = []
    for i in range(count):
        started = time.perf_counter()
        response = session.post(f"{base}/{kind}/b{i}", timeout=30)
        elapsed = (time.perf_counter() - started) * 1e3
        response.raise_for_status()
        out.append((elapsed, int(response.headers["X-Handler-Ns"]) / 1e3))
    return out


# name -> (server, handler). "nice" is the enqueuing handler on a second gunicorn whose
# offload worker threads run 10 steps nicer (OFFLOAD_WORKER_NICE=10), as the gunicorn
# recipe suggests for a busy machine; "web" is the enqueuing handler on the first, under
# offload.web.WSGIMiddleware (the workers are woken once the response is out).
KINDS = {
    "plain": ("default", "plain"),
    "enqueue": ("default", "enqueue"),
    "inline": ("default", "inline"),
    "nice": ("nice", "enqueue"),
    "web": ("default", "web/enqueue"),
}


def run(scale: Scale) -> list[Row]:
    count = scale.n(1000, minimum=50)
    samples = Samples()
    names = list(KINDS)
    with (
        LocalAPI() as api,
        gunicorn(api.url) as default,
        gunicorn(api.url, OFFLOAD_WORKER_NICE="10") as nice,
        requests.Session() as session,
    ):
        bases = {"default": default, "nice": nice}
        for server, kind in KINDS.values():  # warm up the handlers and the workers
            block(session, bases[server], kind, 50)
        for repeat in range(scale.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                server, kind = KINDS[name]
                results = block(session, bases[server], kind, count)
                rtt = [r[0] for r in results]
                handler = [r[1] for r in results]
                samples.add(f"{name} p50", percentile(rtt, 50))
                samples.add(f"{name} p99", percentile(rtt, 99))
                samples.add(f"{name} handler", percentile(handler, 50))
    base_note = f"gunicorn -w {WORKERS} sync, one client, {count} requests a block"
    rows = []
    for name, who in (
        ("enqueue", "a handler that enqueues"),
        ("nice", "a handler that enqueues, worker_nice=10"),
        ("web", "a handler that enqueues, under offload.web.WSGIMiddleware"),
    ):
        for figure, key, unit, target in (
            ("round trip p50", "p50", "ms", at_most(1.25)),
            ("round trip p99", "p99", "ms", at_most(2.0)),
            ("handler time p50", "handler", "µs", ""),
        ):
            ratio = samples.ratio(f"{name} {key}", f"plain {key}")
            limit = float(target[2:-1]) if target else None
            plain = samples.median(f"plain {key}")
            rows.append(
                Row(
                    "handler_latency",
                    f"{figure}, {who}",
                    samples.median(f"{name} {key}"),
                    unit,
                    baseline=f"the same handler without enqueue: {plain:.3g} {unit}",
                    ratio=ratio,
                    target=target,
                    met=None if limit is None else ratio <= limit,
                    note=base_note,
                    runs=samples.count(f"{name} {key}"),
                )
            )
    # What offload is for: the same handler making the call itself.
    for figure, key, unit in (
        ("round trip p50", "p50", "ms"),
        ("handler time p50", "handler", "µs"),
    ):
        rows.append(
            Row(
                "handler_latency",
                f"{figure}, a handler that makes the call inline",
                samples.median(f"inline {key}"),
                unit,
                baseline=f"the handler that enqueues: {samples.median(f'enqueue {key}'):.3g} "
                f"{unit}",
                ratio=samples.ratio(f"inline {key}", f"enqueue {key}"),
                note=base_note,
                runs=samples.count(f"inline {key}"),
            )
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    for row in run(Scale(options.scale, options.repeats)):
        ratio = "" if row.ratio is None else f"  {row.ratio:.2f}x {row.target}"
        print(f"{row.figure}: {row.value:.3f} {row.unit} ({row.baseline}){ratio}")
