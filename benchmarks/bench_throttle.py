"""Delivery latency of calls to a healthy API while another API throttles.

Two local APIs (benchmarks/_server.py, each its own process, so each its own throttle
key): the healthy one answers 200 at once; the throttled one answers the first three
requests of each call (each call has its own path) 429 with `Retry-After: 1`, then 200.
One call to the throttled API is enqueued first, then 100 calls to the healthy one; the
figure is the latency of the healthy calls (enqueue to response received). The reference
is the same 100 calls with no throttled call, in the same run. The naive design
(ANCHORS.md) is a `queue.Queue` and one thread running each call under tenacity `@retry`
(exponential wait, multiplier 0.5): the throttled call's backoff is slept through, and
every call behind it waits. A second scenario repeats it with 4 workers and 4 throttled
calls.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial

import requests
import tenacity
from _harness import TIMES, LocalAPI, Row, Samples, Scale, at_most, percentile
from tenacity import retry_if_result, stop_after_attempt, wait_exponential, wait_fixed

import offload
from offload.calls import DEFAULT_TIMEOUT

THROTTLED_ANSWERS = 3


def run_offload(
    healthy: str,
    throttled: str,
    n_throttled: int,
    workers: int,
    n_healthy: int = 100,
    retry: offload.RetryPolicy | None = None,
) -> list[float]:
    """Latencies (s) of the healthy calls, delivered by an Offloader."""
    done: dict[offload.Task, float] = {}
    enqueued: dict[offload.Task, float] = {}

    def on_success(task: offload.Task, result: object) -> None:
        done[task] = time.perf_counter()

    calls = [offload.http("POST", healthy, json={"n": i}) for i in range(n_healthy)]
    slow = [offload.http("POST", f"{throttled}/{i}", json={}) for i in range(n_throttled)]
    off = offload.Offloader(workers=workers, retry=retry, on_success=on_success, idle_timeout=30)
    try:
        for call in slow:
            off.enqueue_task(call)
        for call in calls:
            t0 = time.perf_counter()
            enqueued[off.enqueue_task(call)] = t0
        if not off.flush(timeout=120):
            raise RuntimeError("offload did not deliver in time")
        stats = off.stats()
        if stats.succeeded != len(calls) + len(slow):
            raise RuntimeError(f"offload lost calls: {stats}")
    finally:
        off.shutdown(timeout=5)
    return [done[task] - t0 for task, t0 in enqueued.items()]


def run_naive(
    healthy: str,
    throttled: str,
    n_throttled: int,
    workers: int,
    multiplier: float,
    n_healthy: int = 100,
) -> list[float]:
    """Latencies (s) of the healthy calls, delivered by the naive queue + tenacity worker."""
    q: queue.Queue[tuple[str, float] | None] = queue.Queue()
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        with requests.Session() as session:

            @tenacity.retry(
                retry=retry_if_result(lambda r: r.status_code == 429),
                wait=wait_exponential(multiplier=multiplier, max=30),
                stop=stop_after_attempt(5),
            )
            def post(url: str) -> requests.Response:
                return session.post(url, json={}, timeout=DEFAULT_TIMEOUT)

            while (item := q.get()) is not None:
                url, t0 = item
                post(url)
                if url == healthy:
                    with lock:
                        latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for i in range(n_throttled):
        q.put((f"{throttled}/{i}", time.perf_counter()))
    for _ in range(n_healthy):
        q.put((healthy, time.perf_counter()))
    for _ in threads:
        q.put(None)
    for thread in threads:
        thread.join()
    return latencies


def run(scale: Scale) -> list[Row]:
    full = scale.factor >= 1
    retry_after = "1" if full else "0"
    multiplier = 0.5 if full else 0.001
    n = scale.n(100, 10)
    # The documented run uses the default policy; the smoke run waits milliseconds.
    retry = None if full else offload.RetryPolicy(wait=wait_fixed(0.001))
    p50, p95 = Samples(), Samples()
    with LocalAPI() as good, LocalAPI(throttle=THROTTLED_ANSWERS, retry_after=retry_after) as bad:
        healthy, throttled = good.url + "/ok", bad.url + "/busy"
        ours = partial(run_offload, healthy, throttled, n_healthy=n, retry=retry)
        naive = partial(run_naive, healthy, throttled, multiplier=multiplier, n_healthy=n)
        ours(0, 1)  # warm up both servers and the imports
        scenarios: list[tuple[str, Callable[[], list[float]]]] = [
            ("offload, no throttled API", partial(ours, 0, 1)),
            ("offload, 1 call throttled", partial(ours, 1, 1)),
            ("naive, no throttled API", partial(naive, 0, 1)),
            ("naive, 1 call throttled", partial(naive, 1, 1)),
        ]
        four: list[tuple[str, Callable[[], list[float]]]] = [
            ("offload 4 workers, no throttled API", partial(ours, 0, 4)),
            ("offload 4 workers, 4 calls throttled", partial(ours, 4, 4)),
            ("naive 4 workers, 4 calls throttled", partial(naive, 4, 4)),
        ]
        for _ in range(min(scale.repeats, 3)):
            for name, fn in scenarios + four:
                bad.reset()
                latencies = fn()
                p50.add(name, statistics.median(latencies) * 1000)
                p95.add(name, percentile(latencies, 95) * 1000)

    def row(name: str, ref: str, target: bool = False) -> Row:
        ratio = p50.ratio(name, ref) if name != ref else None
        r95 = p95.ratio(name, ref) if name != ref else None
        return Row(
            "throttle",
            f"{name}: healthy calls' p50 latency",
            p50.median(name),
            "ms",
            baseline=ref if name != ref else "",
            ratio=ratio,
            target=at_most(1.5) if target else "",
            met=(ratio is not None and ratio <= 1.5) if target else None,
            note=f"p95 {p95.median(name):.0f} ms"
            + (f" ({r95:.2f}{TIMES})" if r95 is not None else ""),
            runs=p50.count(name),
        )

    ref = "offload, no throttled API"
    ref4 = "offload 4 workers, no throttled API"
    return [
        row(ref, ref),
        row("offload, 1 call throttled", ref, target=True),
        row("naive, no throttled API", ref),
        row("naive, 1 call throttled", ref),
        row(ref4, ref4),
        row("offload 4 workers, 4 calls throttled", ref4, target=True),
        row("naive 4 workers, 4 calls throttled", ref4),
    ]
