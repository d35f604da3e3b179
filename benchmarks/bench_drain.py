"""Delivery throughput against a local API that answers at once, with one worker.

The API (benchmarks/_server.py) runs in its own process on 127.0.0.1, HTTP/1.1
keep-alive, Nagle off, and answers 200 at once; both contenders talk to the same server
in the same run, so its CPU cost (it shares the machine's cores) weighs on both alike.
The floor is one thread looping `requests.Session().post` with the same body and
timeout. offload is timed from the first `enqueue_task` to `flush()` returning, the
calls built beforehand (building them is the handler's cost, measured elsewhere), over
the memory store and over a SQLite file (each task journaled, copied into the database
and deleted from it once delivered; no target, for what durability costs the worker).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import requests
from _harness import LocalAPI, Row, Samples, Scale, at_least

import offload
from offload.calls import DEFAULT_TIMEOUT

BODY = {"event": "signup", "user_id": 42, "email": "user42@example.com"}


def loop(url: str, n: int) -> float:
    """Calls per second of one thread looping a keep-alive Session."""
    with requests.Session() as session:
        t0 = time.perf_counter()
        for _ in range(n):
            response = session.post(url, json=BODY, timeout=DEFAULT_TIMEOUT)
            if response.status_code >= 400:
                raise RuntimeError(f"the benchmark server answered {response.status_code}")
        return n / (time.perf_counter() - t0)


def drain(url: str, n: int, workers: int = 1, store: str = "memory") -> float:
    """Calls per second delivered by an Offloader with `workers` threads."""
    calls = [offload.http("POST", url, json=BODY) for _ in range(n)]
    off = offload.Offloader(workers=workers, max_queue=n + 1, idle_timeout=30, store=store)
    try:
        t0 = time.perf_counter()
        for call in calls:
            off.enqueue_task(call)
        if not off.flush(timeout=600):
            raise RuntimeError("offload did not drain in time")
        rate = n / (time.perf_counter() - t0)
        stats = off.stats()
        if stats.succeeded != n:
            raise RuntimeError(f"offload delivered {stats.succeeded} of {n}: {stats}")
        return rate
    finally:
        off.shutdown(timeout=5)


def durable_drain(url: str, n: int) -> float:
    """Calls per second delivered by an Offloader over a new SQLite file, 1 worker."""
    with tempfile.TemporaryDirectory(prefix="offload-drain-") as directory:
        return drain(url, n, store=f"sqlite:///{Path(directory) / 'drain.db'}")


def run(scale: Scale) -> list[Row]:
    n = scale.n(2_000, 20)
    samples = Samples()
    with LocalAPI() as api:
        url = api.url + "/events"
        loop(url, max(10, n // 10))  # warm up the server process and the imports
        for run_index in range(scale.repeats):
            order = [("loop", loop), ("offload", drain), ("sqlite", durable_drain)]
            shift = run_index % len(order)
            for name, fn in order[shift:] + order[:shift]:
                samples.add(name, fn(url, n))
    ratio = samples.ratio("offload", "loop")
    return [
        Row(
            "drain",
            f"requests.Session().post loop, {n:,} calls",
            samples.median("loop"),
            "calls/s",
            runs=samples.count("loop"),
        ),
        Row(
            "drain",
            f"offload, 1 worker, {n:,} calls, instant API",
            samples.median("offload"),
            "calls/s",
            baseline="requests.Session().post loop",
            ratio=ratio,
            target=at_least(0.95),
            met=ratio >= 0.95,
            note=samples.spread("offload", "loop"),
            runs=samples.count("offload"),
        ),
        Row(
            "drain",
            f"offload over SQLite, 1 worker, {n:,} calls, instant API",
            samples.median("sqlite"),
            "calls/s",
            baseline="requests.Session().post loop",
            ratio=samples.ratio("sqlite", "loop"),
            note=samples.spread("sqlite", "loop"),
            runs=samples.count("sqlite"),
        ),
    ]
