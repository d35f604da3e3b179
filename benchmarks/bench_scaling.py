"""Scaling with workers against a local API that takes 100 ms per call.

The API (benchmarks/_server.py, its own process, a thread per connection) sleeps 100 ms
before answering, so it is never the bottleneck. Each worker count gets the same
duration of work (30 calls per worker: a backlog drains in rounds, and the last round is
uneven, which weighs less in a longer run); efficiency at W workers is the throughput at W
divided by W times the throughput of one worker measured in the same run (ideal linear
scaling). The throughput one worker could reach at best (10 calls/s) is shown beside it.
"""

from __future__ import annotations

from _harness import TIMES, LocalAPI, Row, Samples, Scale
from bench_drain import drain

DELAY = 0.1
WORKERS = (1, 4, 16)


def run(scale: Scale) -> list[Row]:
    per_worker = scale.n(30, 2)
    delay = DELAY if scale.factor >= 1 else 0.01  # the smoke run keeps it short
    samples = Samples()
    with LocalAPI(delay=delay) as api:
        url = api.url + "/slow"
        for _ in range(min(scale.repeats, 3)):
            for workers in WORKERS:
                samples.add(str(workers), drain(url, per_worker * workers, workers=workers))
    rows = []
    one = samples.runs["1"]
    for workers in WORKERS:
        rates = samples.runs[str(workers)]
        efficiency = sorted(r / (workers * o) for r, o in zip(rates, one, strict=True))
        eff = efficiency[len(efficiency) // 2]
        rows.append(
            Row(
                "scaling",
                f"{workers} worker{'s' if workers > 1 else ''}, {per_worker * workers} calls, "
                f"{delay * 1000:g} ms API",
                samples.median(str(workers)),
                "calls/s",
                baseline=f"{workers}{TIMES} 1 worker's calls/s" if workers > 1 else "",
                ratio=eff if workers > 1 else None,
                target="≥ 90 %" if workers == 16 else "",
                met=(eff >= 0.9) if workers == 16 else None,
                note=f"efficiency {eff:.0%}; ideal {workers / delay:g} calls/s",
                runs=len(rates),
            )
        )
    return rows
