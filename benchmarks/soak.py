"""Soak: >= 50,000 calls through 4 workers against the chaos API, with the ledger checked.

    python benchmarks/soak.py                    # 50,000 calls, seed 1 (a few minutes)
    python benchmarks/soak.py --calls 5000       # a quicker look
    python benchmarks/soak.py --store sqlite     # through a SQLite store (a temporary file)

The chaos server (tests/support/chaos.py) runs in its own process, so that client and server do
not share one GIL, and injects 503, 502, 429 with Retry-After in every form, resets,
garbage, truncated bodies, read timeouts and slow answers on a seeded plan; 1% of calls
always answer 400 and 0.3% always 500. The producer keeps at most `--window` calls held,
as a web server under steady load would.

Checked at the end (tests/support/chaos.py `check`), with a non-zero exit on any violation:
every call delivered or dead-lettered exactly once; the work done twice only after an
answer was lost (on purpose by the plan, or by accident: a retry after which the client
saw no status); never a request before its Retry-After; one idempotency key per call;
all workers alive at every sample and no exception escaped a thread. Memory is sampled
(RSS, which includes this script's own per-call ledger); with `--tracemalloc` the traced
memory of everything but this script and its ledger must not grow from the first half
of the run to the second.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import tenacity

import offload

SUPPORT = Path(__file__).resolve().parent.parent / "tests" / "support"
sys.path.insert(0, str(SUPPORT))

from chaos import ChaosServer, ClientLedger, check, fetch_counts  # noqa: E402

MAX_ATTEMPTS = 5


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), or the peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def traced_snapshot() -> tracemalloc.Snapshot:
    """What is allocated (and still held) by anything but this script and the ledger."""
    return tracemalloc.take_snapshot().filter_traces(
        (
            tracemalloc.Filter(False, str(SUPPORT / "chaos.py")),
            tracemalloc.Filter(False, __file__),
            tracemalloc.Filter(False, tracemalloc.__file__),
        )
    )


def traced_mb(snapshot: tracemalloc.Snapshot) -> float:
    return round(sum(stat.size for stat in snapshot.statistics("filename")) / 2**20, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--apis", type=int, default=4, help="chaos APIs (throttle keys)")
    parser.add_argument("--window", type=int, default=2_000, help="calls held at most")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--read-timeout", type=float, default=0.3)
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also trace allocations (checked for growth; the run takes about 2.5x longer)",
    )
    parser.add_argument(
        "--store",
        default="memory",
        help="memory (default), sqlite (a new temporary file) or a store URL",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON only")
    parser.add_argument("--log", action="store_true", help="print offload's log to stderr")
    args = parser.parse_args()

    command = [sys.executable, str(SUPPORT / "chaos.py"), "--seed", str(args.seed)]
    command += ["--apis", str(args.apis), "--hang", str(args.read_timeout * 2)]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    assert server.stdin is not None
    urls: list[str] = json.loads(server.stdout.readline())["urls"]

    log_records: Counter[str] = Counter()
    if not args.log:  # count offload's log lines instead of printing a thousand of them
        handler = logging.Handler()
        handler.emit = lambda record: log_records.update([record.levelname])  # type: ignore[method-assign]
        logging.getLogger("offload").addHandler(handler)
        logging.getLogger("offload").propagate = False

    thread_errors: list[str] = []
    threading.excepthook = lambda a: thread_errors.append(repr(a.exc_value))
    # The ledger goes to a file: kept in memory, 50,000 calls' worth would show in the
    # memory figures that are meant to be offload's.
    journal_path = os.path.join(tempfile.mkdtemp(prefix="offload-soak-"), "ledger.txt")
    journal = open(journal_path, "w")  # noqa: SIM115 - closed after the run
    ledger = ClientLedger(journal)
    window = threading.BoundedSemaphore(args.window)

    def done_success(task: offload.Task, result: Any) -> None:
        ledger.on_success(task, result)
        window.release()

    def done_dead(task: offload.Task, letter: offload.DeadLetter) -> None:
        ledger.on_dead_letter(task, letter)
        window.release()

    store = args.store
    if store == "sqlite":
        store = f"sqlite:///{os.path.join(tempfile.mkdtemp(prefix='offload-soak-'), 'soak.db')}"
    off = offload.Offloader(
        store=store,
        retry=offload.RetryPolicy(
            stop=tenacity.stop_after_attempt(MAX_ATTEMPTS), wait=tenacity.wait_random(0, 0.01)
        ),
        workers=args.workers,
        idle_timeout=60,
        max_dead_letters=200,  # fewer than the run makes: the rest are counted, not kept
        on_success=done_success,
        on_retry=ledger.on_retry,
        on_dead_letter=done_dead,
    )
    if args.tracemalloc:
        tracemalloc.start(1)
    samples: list[dict[str, Any]] = []
    snapshots: list[tracemalloc.Snapshot] = []
    warm: tracemalloc.Snapshot | None = None
    every = max(1, args.calls // args.samples)
    started = time.monotonic()
    try:
        for i in range(args.calls):
            window.acquire()
            rid = f"c{i:07d}"
            call = offload.http(
                "POST",
                f"{urls[i % len(urls)]}/calls/{rid}",
                json={"rid": rid, "n": i},
                timeout=(1.0, args.read_timeout),
                idempotency_key=True,
            )
            ledger.enqueued(off.enqueue_task(call))
            if (i + 1) % every == 0:
                gc.collect()
                if args.tracemalloc:
                    snapshots[-1:] = [traced_snapshot()]
                    if len(samples) == args.samples // 4:
                        warm = snapshots[0]
                stats = off.stats()
                samples.append(
                    {
                        "enqueued": i + 1,
                        "seconds": round(time.monotonic() - started, 1),
                        "rss_mb": round(rss_bytes() / 2**20, 1),
                        "traced_mb": traced_mb(snapshots[-1]) if snapshots else None,
                        "held": stats.queued + stats.delayed + stats.in_flight,
                        "workers_alive": sum(
                            t.name.startswith("offload-worker") for t in threading.enumerate()
                        ),
                    }
                )
                if not args.json:
                    print(samples[-1], file=sys.stderr, flush=True)
        flushed = off.flush(600)
        elapsed = time.monotonic() - started
        stats = off.stats()
        counts, faults = fetch_counts(urls[0])
    finally:
        off.shutdown(5)
        server.stdin.close()
        server.wait(30)
        if tracemalloc.is_tracing():
            peak_traced = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        else:
            peak_traced = 0

    journal.close()
    fates = ChaosServer(args.seed, apis=0)  # the same seeded plan, to check poisoned calls
    report = check(fates, ClientLedger.read(journal_path), counts, faults, MAX_ATTEMPTS)
    violations: list[str] = report.pop("violations")
    if not flushed:
        violations.append("flush(600) timed out")
    if thread_errors:
        violations.append(f"exceptions escaped threads: {thread_errors[:5]}")
    if any(s["workers_alive"] != args.workers for s in samples):
        violations.append("a worker was missing at a sample")
    if stats.enqueued != stats.succeeded + stats.dead_lettered:
        violations.append(f"stats ledger does not hold: {stats}")
    # Flat: the second half of the run holds no more than the first (after warm-up), with
    # a little room for allocator noise.
    half = samples[len(samples) // 4 :]
    first, second = half[: len(half) // 2], half[len(half) // 2 :]
    for field in ("rss_mb", "traced_mb"):
        if args.tracemalloc or field == "rss_mb":
            a, b = max(s[field] for s in first), max(s[field] for s in second)
            report[f"{field}_first_half_max"], report[f"{field}_second_half_max"] = a, b
    report.update(
        seed=args.seed,
        workers=args.workers,
        seconds=round(elapsed, 1),
        calls_per_second=round(args.calls / elapsed),
        peak_rss_mb=max(s["rss_mb"] for s in samples),
        dead_letters_kept=stats.dead_letters,
        dead_letters_dropped=stats.dead_letters_dropped,
        retried=stats.retried,
        log_records=dict(log_records),
        workers_alive_at_every_sample=all(s["workers_alive"] == args.workers for s in samples),
        violations=violations,
    )
    if not args.tracemalloc:  # RSS is offload's own only when nothing traces it
        growth = report["rss_mb_second_half_max"] - report["rss_mb_first_half_max"]
        report["rss_mb_growth"] = round(growth, 1)
        if growth > 5.0:
            violations.append(f"RSS grew {growth:.1f} MB in the second half")
    if args.tracemalloc:
        report["peak_traced_mb"] = round(peak_traced / 2**20, 2)
        growth = report["traced_mb_second_half_max"] - report["traced_mb_first_half_max"]
        report["traced_mb_growth"] = round(growth, 2)
        if warm is not None and snapshots:
            top = snapshots[-1].compare_to(warm, "lineno")[:5]
            report["traced_top_growth"] = [str(stat) for stat in top]
        if growth > 2.0:
            violations.append(f"traced memory grew {growth:.2f} MB in the second half")
    print(json.dumps(report, indent=None if args.json else 1))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
