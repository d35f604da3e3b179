"""What every benchmark shares: the result row, medians and percentiles, per-call timing
with the timer's own cost taken out, and the local API server in a child process."""

from __future__ import annotations

import gc
import math
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TIMES = "\N{MULTIPLICATION SIGN}"


def at_most(limit: float) -> str:
    """A target such as "at most 2.5 times the baseline", written with ≤."""
    return f"≤ {limit:g}{TIMES}"


def at_least(limit: float) -> str:
    return f"≥ {limit:g}{TIMES}"


@dataclass
class Row:
    """One line of the results table: a figure, and its ratio to a same-run baseline."""

    bench: str
    figure: str
    value: float | None
    unit: str
    baseline: str = ""  # what the ratio is against, measured in the same run
    ratio: float | None = None
    target: str = ""  # e.g. "<= 2.5x"
    met: bool | None = None  # None: no target for this row
    note: str = ""
    runs: int = 0  # how many runs the median is over

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Scale:
    """How big a run is: `factor` scales sizes (1.0 = the documented run), `repeats` runs."""

    factor: float = 1.0
    repeats: int = 5

    def n(self, full: int, minimum: int = 1) -> int:
        return max(minimum, int(full * self.factor))

    def seconds(self, full: float, minimum: float = 0.0) -> float:
        return max(minimum, full * self.factor)


@dataclass
class Samples:
    """Per-run figures of several contenders, for medians and paired ratios."""

    runs: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.runs.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.runs[name])

    def ratio(self, name: str, base: str) -> float:
        """Median of the per-run ratios: each run's pair shares that moment's machine load."""
        pairs = zip(self.runs[name], self.runs[base], strict=True)
        return statistics.median(a / b for a, b in pairs if b)

    def spread(self, name: str, base: str) -> str:
        """The per-run ratios' range, for the table's note ("runs 0.93-1.04" and the sign)."""
        ratios = [a / b for a, b in zip(self.runs[name], self.runs[base], strict=True) if b]
        return f"runs {min(ratios):.2f}-{max(ratios):.2f}{TIMES}"

    def count(self, name: str) -> int:
        return len(self.runs.get(name, ()))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


# -- per-call timing ------------------------------------------------------------------------
#
# A Python function call costs about as much as a queue.Queue.put, so the statement under test
# is compiled into the timing loop itself (as timeit does) instead of being called through a
# lambda; and the same loop with `pass` in it is timed too, and taken off.

_TIMERS = """
def batches(count, size, _ns=_perf_counter_ns, _repeat=_repeat):
    out = []
    for _ in range(count):
        t0 = _ns()
        for _ in _repeat(None, size):
            {stmt}
        out.append((_ns() - t0) / size)
    return out

def singles(count, _ns=_perf_counter_ns, _repeat=_repeat):
    out = [0] * count
    for i in range(count):
        t0 = _ns()
        {stmt}
        out[i] = _ns() - t0
    return out
"""


def timers(stmt: str, namespace: dict[str, Any]) -> tuple[Callable[..., list[float]], ...]:
    """`(batches(count, size), singles(count))` timing `stmt` in `namespace`, in ns per call."""
    import itertools

    ns = dict(namespace, _perf_counter_ns=time.perf_counter_ns, _repeat=itertools.repeat)
    exec(_TIMERS.format(stmt=stmt), ns)
    return ns["batches"], ns["singles"]


@contextmanager
def gc_collected() -> Iterator[None]:
    """Every contender starts from a collected heap; GC stays on, as in a real web handler."""
    gc.collect()
    yield


# -- the local API --------------------------------------------------------------------------


class LocalAPI:
    """benchmarks/_server.py in a child process, on 127.0.0.1; a context manager."""

    def __init__(
        self,
        delay: float = 0.0,
        throttle: int = 0,
        retry_after: str = "1",
        *,
        rate: float = 0.0,
        burst: float = 1.0,
    ) -> None:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_server.py"),
                "--delay",
                str(delay),
                "--throttle",
                str(throttle),
                "--retry-after",
                retry_after,
                "--rate",
                str(rate),
                "--burst",
                str(burst),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the benchmark server did not start: {line!r}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Start the throttled count again (the next `throttle` requests get 429), with a
        full bucket and the counts of `stats()` at zero."""
        import requests

        with requests.Session() as session:
            session.post(self.url + "/_reset", timeout=5).raise_for_status()

    def stats(self) -> dict[str, int]:
        """`{"requests": N, "throttled": N}` since the last reset (429s answered)."""
        import requests

        with requests.Session() as session:
            answer = session.get(self.url + "/_stats", timeout=5)
            answer.raise_for_status()
            data: dict[str, int] = answer.json()
            return data

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()  # the server exits when its stdin closes
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> LocalAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- a private Redis, for the peers that need one ------------------------------------------


def redis_available() -> bool:
    """The Redis peers (Celery, RQ, Dramatiq) are measured only where redis-server exists."""
    import shutil

    return shutil.which("redis-server") is not None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _command(port: int, command: bytes, expect: bytes) -> bool:
    """One inline command (redis-py is not needed); False if the reply is not `expect` or
    the server does not accept connections (yet)."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(command + b"\r\n")
            return sock.recv(64).startswith(expect)
    except OSError:
        return False


class RedisServer:
    """A throwaway redis-server on 127.0.0.1 (a free port, its own temp dir, no persistence,
    not daemonized), so that no system service is needed or touched; a context manager."""

    def __init__(self, start_timeout: float = 20.0) -> None:
        import shutil
        import tempfile

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self._dir = tempfile.TemporaryDirectory(prefix="offload-bench-redis-")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        log = Path(self._dir.name) / "redis.log"
        options = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "dir": self._dir.name,
            "save": "",  # no snapshots, no append-only file: a queue that only fills up
            "appendonly": "no",
            "daemonize": "no",  # our child, so that close() can stop it
        }
        args = [exe, *(a for key, value in options.items() for a in (f"--{key}", value))]
        with log.open("wb") as out:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + start_timeout
        while not _command(self.port, b"PING", b"+PONG"):
            # Between PINGs, wait on the process itself: a server that exits (a taken
            # port, a bad option) ends the wait at once instead of running out the deadline.
            try:
                code = self._proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                self.close()
                why = f"exited {code}" if code is not None else f"no PONG in {start_timeout:g} s"
                raise RuntimeError(f"redis-server did not start ({why}): {tail[0]}")

    def flush(self) -> None:
        """Empty every database: each run starts from empty queues."""
        if not _command(self.port, b"FLUSHALL", b"+OK"):
            raise RuntimeError("redis-server did not answer FLUSHALL")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def busy_worker(submit: Callable[[Callable[[], None]], Any]) -> Iterator[threading.Event]:
    """Occupy a single worker with a call that blocks until the yielded event is set, so
    that what is enqueued meanwhile only queues up (enqueue cost, memory per queued task)."""
    started, release = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait()

    submit(block)
    if not started.wait(30):
        raise RuntimeError("the worker did not start the blocking call")
    try:
        yield release
    finally:
        release.set()


def standalone(
    run: Callable[[Scale], list[Row]],
    description: str,
    argv: list[str] | None = None,
    *,
    repeats: int = 5,
) -> int:
    """A benchmark run as a script: `--repeats` and `--scale`, then its rows as a table."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats, help=f"runs (default {repeats})")
    parser.add_argument("--scale", type=float, default=1.0, help="size factor (default 1)")
    args = parser.parse_args(argv)
    rows = run(Scale(factor=args.scale, repeats=args.repeats))
    width = max(len(row.figure) for row in rows)
    print(f"{'figure'.ljust(width)}  {'median':>12}  {'vs baseline':>11}  target  runs")
    for row in rows:
        value = "—" if row.value is None else f"{row.value:.2f} {row.unit}"
        ratio = "—" if row.ratio is None else f"{row.ratio:.3g}{TIMES}"
        met = "" if row.met is None else ("met" if row.met else "MISSED")
        print(
            f"{row.figure.ljust(width)}  {value:>12}  {ratio:>11}  {row.target} {met}  "
            f"{row.runs}  {row.note}".rstrip()
        )
    return 0
