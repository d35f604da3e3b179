"""What an idle offloader costs once `idle_timeout` has passed: threads, CPU, wake-ups.

Ten calls are delivered, then the worker is left to exit on its own after `idle_timeout`
(joined, not slept for). Over the following window the process should hold no offload
thread, use no CPU and see no thread wake up: the figures are the offload threads alive,
the process CPU time used during the window, and the context switches of every thread
but the main one (read from /proc, where there is one).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from _harness import Row, Samples, Scale

import offload


def _switches() -> dict[int, int] | None:
    """Context switches so far of each thread of this process but the main one (Linux)."""
    tasks = Path("/proc/self/task")
    if not tasks.exists():
        return None
    counts = {}
    for task in tasks.iterdir():
        tid = int(task.name)
        if tid == os.getpid():
            continue  # the main thread: it waits for the window to end, once
        try:
            lines = (task / "status").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited meanwhile
        # voluntary_ctxt_switches and nonvoluntary_ctxt_switches
        counts[tid] = sum(int(line.split()[1]) for line in lines if "ctxt_switches:" in line)
    return counts


def _woken(before: dict[int, int], after: dict[int, int]) -> int:
    """Switches in between: of threads alive at both readings, and all of new threads."""
    return sum(count - before.get(tid, 0) for tid, count in after.items())


def _offload_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("offload-")]


def once(idle_timeout: float, window: float) -> tuple[int, float, int | None, bool]:
    """(offload threads alive, CPU ms in the window, wake-ups in the window, restarted)."""
    off = offload.Offloader(idle_timeout=idle_timeout, workers=2)
    try:
        for _ in range(10):
            off.enqueue_task(int)
        if not off.flush(timeout=30):
            raise RuntimeError("offload did not deliver in time")
        for thread in _offload_threads():
            thread.join(idle_timeout + 30)  # they exit by themselves after idle_timeout
        switches0, cpu0 = _switches(), time.process_time()
        threading.Event().wait(window)  # the window being measured: nothing should run
        cpu1 = time.process_time()
        switches1 = _switches()
        alive = len(_offload_threads())
        # And the next enqueue starts a worker again.
        off.enqueue_task(int)
        restarted = off.running or off.flush(timeout=30)
    finally:
        off.shutdown(timeout=5)
    wakeups = None if switches0 is None or switches1 is None else _woken(switches0, switches1)
    return alive, (cpu1 - cpu0) * 1000, wakeups, restarted


def run(scale: Scale) -> list[Row]:
    full = scale.factor >= 1
    idle_timeout, window = (0.5, 2.0) if full else (0.05, 0.1)
    samples = Samples()
    restarted = True
    for _ in range(min(scale.repeats, 3)):
        alive, cpu_ms, wakeups, again = once(idle_timeout, window)
        samples.add("alive", alive)
        samples.add("cpu", cpu_ms)
        if wakeups is not None:
            samples.add("wakeups", wakeups)
        restarted = restarted and again
    alive = max(samples.runs["alive"])
    rows = [
        Row(
            "idle",
            f"offload threads alive after idle_timeout ({idle_timeout:g} s, 2 workers)",
            alive,
            "threads",
            target="0",
            met=alive == 0,
            note="worst of the runs" + ("" if restarted else "; the next enqueue did NOT restart"),
            runs=samples.count("alive"),
        ),
        Row(
            "idle",
            f"process CPU time during a {window:g} s idle window",
            samples.median("cpu"),
            "ms",
            note="the main thread's own wait included",
            runs=samples.count("cpu"),
        ),
    ]
    if samples.count("wakeups"):
        worst = max(samples.runs["wakeups"])
        rows.append(
            Row(
                "idle",
                f"thread wake-ups during the {window:g} s window",
                worst,
                "switches",
                target="0",
                met=worst == 0,
                note="worst of the runs; context switches of all threads but the main one",
                runs=samples.count("wakeups"),
            )
        )
    return rows
