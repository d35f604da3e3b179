"""Pacing an API that allows R = 50 calls a second: goodput and 429s, four ways.

The API (benchmarks/_server.py --rate 50 --burst 50, its own process on 127.0.0.1) is a
token bucket of 50 calls a second holding 50, full at the start, answering 429 without
`Retry-After` to a request that finds no token. 1,000 calls, 8 workers, on each of:

- offload with no limit and `adaptive=False`: the gates alone (a 429 closes the key
  until the backoff has passed, then one probe, then the backlog floods again);
- offload with no limit, adaptive (the default): the key's rate is learnt from its 429s;
- offload with `limits={url: Limit(rate=50)}` declared;
- the naive design: 8 threads, each looping a `requests.Session` under tenacity `@retry`
  on 429 (`wait_random_exponential(multiplier=0.5, max=30)`, ten attempts).

Goodput is the rate of successful calls beyond the bucket's first 50, as a share of R:
`(delivered - 50) / elapsed / 50` (a perfect client scores 1.00); elapsed runs from the
first enqueue to the last call settled. 429s are a share of all requests the API saw.

Glue's case: `start_job_run` answers `ConcurrentRunsExceededException` while a run of the
job lasts (here a run lasts as long as its call: 40 ms; 20 runs, 4 workers, an in-process
fake raising botocore's `ClientError`); with `Limit(concurrency=1)` declared on its key,
no attempt should be throttled at all.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import requests
import tenacity
from _harness import TIMES, LocalAPI, Row, Samples, Scale, standalone
from tenacity import retry_if_result, stop_after_attempt, wait_random_exponential

import offload
from offload import Limit
from offload.calls import DEFAULT_TIMEOUT

R = 50
BURST = 50
WORKERS = 8
GLUE_KEY = "aws:glue:eu-west-1:start_job_run"

GATES = "offload, no limit, adaptive=False (gates only)"
ADAPTIVE = "offload, no limit, adaptive"
DECLARED = "offload, Limit(rate=50) declared"
NAIVE = "naive: 8 threads, tenacity retrying 429s"


def run_offload(url: str, n: int, *, adaptive: bool, declared: bool) -> tuple[float, int]:
    """(elapsed seconds, calls delivered) by an Offloader."""
    limits = {url: Limit(rate=R)} if declared else None
    off = offload.Offloader(workers=WORKERS, adaptive=adaptive, limits=limits, idle_timeout=30)
    calls = [offload.http("POST", f"{url}/send", json={"n": i}) for i in range(n)]
    try:
        t0 = time.perf_counter()
        for call in calls:
            off.enqueue_task(call)
        if not off.flush(timeout=240):
            raise RuntimeError(f"offload did not deliver in time: {off.stats()}")
        elapsed = time.perf_counter() - t0
        return elapsed, off.stats().succeeded
    finally:
        off.shutdown(timeout=5)


def run_naive(url: str, n: int) -> tuple[float, int]:
    """(elapsed seconds, calls delivered) by the naive worker pool."""
    q: queue.Queue[int | None] = queue.Queue()
    delivered = [0]
    lock = threading.Lock()

    def worker() -> None:
        with requests.Session() as session:

            @tenacity.retry(
                retry=retry_if_result(lambda r: r.status_code == 429),
                wait=wait_random_exponential(multiplier=0.5, max=30),
                stop=stop_after_attempt(10),
                retry_error_callback=lambda state: state.outcome.result(),  # type: ignore[union-attr]
            )
            def post(i: int) -> requests.Response:
                return session.post(f"{url}/send", json={"n": i}, timeout=DEFAULT_TIMEOUT)

            while (i := q.get()) is not None:
                if post(i).status_code < 400:
                    with lock:
                        delivered[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    t0 = time.perf_counter()
    for i in range(n):
        q.put(i)
    for thread in threads:
        thread.start()
    for _ in threads:
        q.put(None)
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0, delivered[0]


class FakeGlue:
    """One job with MaxConcurrentRuns=1: `start_job_run` raises botocore's
    ConcurrentRunsExceededException while a run lasts (a run lasts as long as its call)."""

    def __init__(self, run_seconds: float) -> None:
        self.run_seconds = run_seconds
        self._running = threading.Lock()
        self._count = threading.Lock()
        self.attempts = 0
        self.throttled = 0

    def start_job_run(self, n: int) -> dict[str, str]:
        from botocore.exceptions import ClientError

        with self._count:
            self.attempts += 1
        if not self._running.acquire(blocking=False):
            with self._count:
                self.throttled += 1
            error = {"Code": "ConcurrentRunsExceededException", "Message": "a run is going"}
            raise ClientError({"Error": error}, "StartJobRun")
        try:
            time.sleep(self.run_seconds)  # the run, as the fake API's own latency
        finally:
            self._running.release()
        return {"JobRunId": f"jr_{n}"}


def run_glue(runs: int, *, declared: bool) -> tuple[int, int, float]:
    """(attempts, throttled attempts, elapsed seconds) for `runs` runs of one job."""
    glue = FakeGlue(0.04)
    policy = offload.RetryPolicy(wait=wait_random_exponential(multiplier=0.05, max=1))
    limits = {GLUE_KEY: Limit(concurrency=1)} if declared else None
    off = offload.Offloader(workers=4, retry=policy, limits=limits, idle_timeout=30)
    try:
        t0 = time.perf_counter()
        for i in range(runs):
            off.enqueue_task(offload.Task(glue.start_job_run, (i,), key=GLUE_KEY))
        if not off.flush(timeout=120):
            raise RuntimeError(f"offload did not start every run in time: {off.stats()}")
        elapsed = time.perf_counter() - t0
        if off.stats().succeeded != runs:
            raise RuntimeError(f"runs lost: {off.stats()}")
    finally:
        off.shutdown(timeout=5)
    return glue.attempts, glue.throttled, elapsed


def _goodput(elapsed: float, delivered: int) -> float:
    return max(0.0, (delivered - BURST) / elapsed / R) if elapsed > 0 else 0.0


def run(scale: Scale) -> list[Row]:
    n = scale.n(1000, 20)
    repeats = max(1, min(scale.repeats, 2))
    goodput, share = Samples(), Samples()
    contenders: list[tuple[str, Callable[[str], tuple[float, int]]]] = [
        (GATES, lambda url: run_offload(url, n, adaptive=False, declared=False)),
        (ADAPTIVE, lambda url: run_offload(url, n, adaptive=True, declared=False)),
        (DECLARED, lambda url: run_offload(url, n, adaptive=True, declared=True)),
        (NAIVE, lambda url: run_naive(url, n)),
    ]
    with LocalAPI(rate=R, burst=BURST, retry_after="") as api:
        run_offload(api.url, min(n, 20), adaptive=False, declared=False)  # warm up
        for _ in range(repeats):
            for name, fn in contenders:
                api.reset()  # a full bucket and the counts at zero
                elapsed, delivered = fn(api.url)
                stats = api.stats()
                goodput.add(name, _goodput(elapsed, delivered))
                share.add(name, 100 * stats["throttled"] / max(1, stats["requests"]))
    glue_runs = scale.n(20, 4)
    glue = {declared: run_glue(glue_runs, declared=declared) for declared in (False, True)}

    others = (GATES, NAIVE)
    targets = {DECLARED: (0.97, 1.0), ADAPTIVE: (0.9, 5.0)}
    rows: list[Row] = []
    for name, _ in contenders:
        g, s = goodput.median(name), share.median(name)
        target = targets.get(name)
        beats = all(g > goodput.median(o) and s < share.median(o) for o in others)
        rows.append(
            Row(
                "limits",
                f"{name}: goodput, {n:,} calls to a {R}/s API, {WORKERS} workers",
                g,
                f"{TIMES} R",
                target=f"≥ {target[0]:g} R, above gates and naive" if target else "",
                met=(g >= target[0] and beats) if target else None,
                note=f"{g:.3f} R, {g * R:.1f} calls/s",
                runs=goodput.count(name),
            )
        )
        rows.append(
            Row(
                "limits",
                f"{name}: 429s, share of requests",
                s,
                "%",
                target=f"≤ {target[1]:g} %, below gates and naive" if target else "",
                met=(s <= target[1] and beats) if target else None,
                runs=share.count(name),
            )
        )
    for declared, (attempts, throttled, elapsed) in glue.items():
        what = "Limit(concurrency=1) declared" if declared else "gates only"
        rows.append(
            Row(
                "limits",
                f"Glue's case, {glue_runs} runs of one job, {what}: throttled attempts",
                float(throttled),
                "attempts",
                target="0" if declared else "",
                met=(throttled == 0) if declared else None,
                note=f"{attempts} attempts in all, {elapsed:.2f} s",
                runs=1,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    return standalone(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
