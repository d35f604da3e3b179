"""The PostgreSQL store: what an enqueue costs beside procrastinate and pgqueuer, how fast
worker processes drain it, and how soon an idle worker wakes.

    python benchmarks/bench_postgres.py            # prints the table (about a minute)
    python benchmarks/run.py --only postgres       # the same, into RESULTS.md

Every figure comes from one throwaway PostgreSQL server started for the run (the test
suite's, tests/support/pgserver.py: initdb into a temporary directory, 127.0.0.1, fsync
and synchronous_commit off, so that the figures are of the queues' own work, not of a
disk), each contender in a database of its own on it.

Enqueue (p50 and mean of single calls, the timing loop's own cost taken off). Every
contender stores the same task (a function and three keyword arguments, built per call as
a handler would) and nothing consumes it while it is measured:

- `offload, own connection`: `Offloader(store="postgresql://…", consume=False)`, a web
  process that only enqueues: one INSERT (with its NOTIFY), committed.
- `offload, own connection, leased`: the default `consume=True`: the INSERT leases the
  task to this process (no NOTIFY); its worker is kept busy on a blocking call.
- `offload in the application's transaction`: `with off.transaction(conn):` around the
  enqueues on the application's psycopg connection: the INSERT only, in the open
  transaction; the application commits after each round, outside the timing.
- `procrastinate defer`: procrastinate's `task.defer(**kwargs)` with its
  `SyncPsycopgConnector` (the sync path), each defer its own commit.
- `pgqueuer enqueue`: pgqueuer's `SyncQueries.enqueue(entrypoint, payload)` over
  `SyncPsycopgDriver` (an autocommit connection), the payload the same JSON as bytes.

The contenders take turns, round by round, in a rotating order, so the machine's load
falls on all of them alike; ratios are against figures of the same run.

Drain: 2,000 calls to the instant local API (benchmarks/_server.py) stored first, in one
transaction; then `offload worker` processes (one worker thread each), already started
and idle, are timed from the commit (their wake-up) until the store holds nothing, with 1
and with 4 processes, against the bare `requests` loop (bench_drain's) in the same run.
The same loop run in 1 and in 4 processes of its own, the calls shared among them, is the
ceiling that this machine's cores put on any 4-process speedup of that work.

Wake-up: one idle `offload worker`; after 0.6 s of nothing to do (longer than a polling
store's 0.5 s between looks), one call is enqueued from another connection and timed
until it reaches a local HTTP server of this process: the NOTIFY, the claim and the call.

Targets (issue 16): an enqueue in the application's transaction at most half of
procrastinate's `defer`; 4 worker processes at least twice one; the wake-up at most 20 ms
(median).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
# The test suite's throwaway server: one implementation of starting PostgreSQL here.
SUPPORT = HERE.parent / "tests" / "support"

from _harness import (  # noqa: E402
    TIMES,
    LocalAPI,
    Row,
    Samples,
    Scale,
    at_least,
    at_most,
    gc_collected,
    standalone,
    timers,
)

import offload  # noqa: E402

_release = threading.Event()
_started = threading.Event()

KW = {"user_id": 42, "email": "user42@example.com", "plan": "pro"}
_KW = 'user_id=42, email="user42@example.com", plan="pro"'


def send_welcome(user_id: int, email: str, plan: str) -> None:
    """The task every contender stores (never run while measured)."""


def block() -> None:
    """Keeps a consuming offloader's worker busy while the enqueue path is measured."""
    _started.set()
    _release.wait()


@contextmanager
def postgres_server() -> Iterator[Any]:
    """The run's PostgreSQL server (see the module docstring)."""
    if str(SUPPORT) not in sys.path:
        sys.path.insert(0, str(SUPPORT))
    from pgserver import PgServer

    with PgServer.start() as server:
        yield server


def _quiet_shutdown(off: offload.Offloader) -> None:
    logger = logging.getLogger("offload")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the tasks handed back at shutdown are expected
    try:
        off.shutdown(timeout=0)
        # Again, now that nothing is left: waits for the call in flight (the blocking one,
        # released), then closes the store's connections.
        off.shutdown(timeout=10)
    finally:
        logger.setLevel(level)


# -- the enqueue contenders -------------------------------------------------------------------


@contextmanager
def _offload_own(url: str, *, consume: bool) -> Iterator[dict[str, Any]]:
    off = offload.Offloader(
        store=url, consume=consume, max_queue=10**8, idle_timeout=600, lease_timeout=3600
    )
    try:
        if consume:
            _release.clear()
            _started.clear()
            off.enqueue_task(block)
            if not _started.wait(30):
                raise RuntimeError("the worker did not start the blocking call")
        yield {"enqueue": off.enqueue_task}
    finally:
        _release.set()
        _quiet_shutdown(off)


@contextmanager
def _offload_in_transaction(url: str) -> Iterator[dict[str, Any]]:
    import psycopg

    off = offload.Offloader(store=url, consume=False, max_queue=10**8)
    conn = psycopg.connect(url.partition("?")[0])
    try:
        with off.transaction(conn):
            yield {"enqueue": off.enqueue_task, "after_round": conn.commit}
        conn.commit()
    finally:
        conn.close()
        _quiet_shutdown(off)


@contextmanager
def _procrastinate(url: str) -> Iterator[dict[str, Any]]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=url))
    task = app.task(name="send_welcome")(send_welcome)
    with app.open():
        app.schema_manager.apply_schema()
        yield {"defer": task.defer}


@contextmanager
def _pgqueuer(url: str) -> Iterator[dict[str, Any]]:
    import psycopg
    from pgqueuer.db import SyncPsycopgDriver
    from pgqueuer.queries import SyncQueries

    done = subprocess.run(
        [sys.executable, "-m", "pgqueuer", "--pg-dsn", url, "install"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pgqueuer install failed: {done.stderr.strip()[-300:]}")
    conn = psycopg.connect(url, autocommit=True)
    try:
        queries = SyncQueries(SyncPsycopgDriver(conn))
        yield {"enqueue": queries.enqueue, "dumps": json.dumps}
    finally:
        conn.close()


OWN = "offload, own connection"
IN_TX = "offload in the application's transaction"
PROCRASTINATE = "procrastinate defer (sync)"
PGQUEUER = "pgqueuer enqueue (sync)"

# name -> (statement timed, context(url), needs)
CONTENDERS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    OWN: (f"enqueue(fn, {_KW})", lambda u: _offload_own(u, consume=False), ""),
    f"{OWN}, leased": (f"enqueue(fn, {_KW})", lambda u: _offload_own(u, consume=True), ""),
    IN_TX: (f"enqueue(fn, {_KW})", _offload_in_transaction, ""),
    PROCRASTINATE: (f"defer({_KW})", _procrastinate, "procrastinate"),
    PGQUEUER: (
        'enqueue("send_welcome", dumps('
        '{"user_id": 42, "email": "user42@example.com", "plan": "pro"}).encode())',
        _pgqueuer,
        "pgqueuer",
    ),
}


def _installed(module: str) -> bool:
    if not module:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def enqueue_rows(server: Any, scale: Scale) -> list[Row]:
    names = [n for n, (_, _, needs) in CONTENDERS.items() if _installed(needs)]
    rounds, chunk = scale.n(12, 2), scale.n(250, 10)
    p50, mean = Samples(), Samples()
    for run_index in range(scale.repeats):
        empty = timers("pass", {})[1]
        with ExitStack() as stack:
            timed = {}
            after: dict[str, Callable[[], object]] = {}
            for name in names:
                stmt, context, _ = CONTENDERS[name]
                database = server.create_database(f"enq_{run_index}_{len(timed)}")
                if name.startswith(OWN) or name == IN_TX:
                    database += "?schema=offload"
                namespace = stack.enter_context(context(database))
                timed[name] = timers(stmt, dict(namespace, fn=send_welcome))[1]
                if "after_round" in namespace:
                    after[name] = namespace["after_round"]
            single: dict[str, list[float]] = {name: [] for name in names}
            loop: list[float] = []
            for r in range(rounds):
                shift = (r + run_index) % len(names)
                with gc_collected():
                    loop += empty(chunk)
                    for name in names[shift:] + names[:shift]:
                        single[name] += timed[name](chunk)
                        if name in after:
                            after[name]()  # the application commits, untimed
            overhead = statistics.median(loop)
            for name in names:
                values = [max(0.0, v - overhead) / 1000 for v in single[name][chunk:]]  # warm
                values = values or [max(0.0, v - overhead) / 1000 for v in single[name]]
                p50.add(name, statistics.median(values))
                mean.add(name, statistics.fmean(values))
    rows: list[Row] = []
    base = PROCRASTINATE if PROCRASTINATE in names else ""
    for name in names:
        for label, samples in (("p50", p50), ("mean", mean)):
            target = name == IN_TX and base and label == "p50"
            ratio = samples.ratio(name, base) if base and name != base else None
            rows.append(
                Row(
                    bench="postgres",
                    figure=f"enqueue: {name} {label}",
                    value=samples.median(name),
                    unit="µs",
                    baseline=f"{base} {label}" if ratio is not None else "",
                    ratio=ratio,
                    target=at_most(0.5) if target else "",
                    met=(ratio is not None and ratio <= 0.5) if target else None,
                    runs=samples.count(name),
                )
            )
        if name == PGQUEUER and base:
            rows[-2].note = rows[-1].note = "pgqueuer's own enqueue, for scale"
    for needs, label in (("procrastinate", PROCRASTINATE), ("pgqueuer", PGQUEUER)):
        if not _installed(needs):
            rows.append(
                Row("postgres", f"enqueue: {label}", None, "µs", note=f"{needs} not installed")
            )
    return rows


# -- drain ------------------------------------------------------------------------------------


class Workers:
    """`offload worker` processes over one store, each with one worker thread, started and
    idle; stopped with SIGTERM."""

    def __init__(self, url: str, count: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        src = str(HERE.parent / "src")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        env["OFFLOAD_SHUTDOWN_TIMEOUT"] = "5"
        command = [sys.executable, "-m", "offload", "worker", "--store", url, "--create"]
        self.procs = [
            subprocess.Popen(
                [*command, "--workers", "1"],
                stderr=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
                env=env,
            )
            for _ in range(count)
        ]
        for proc in self.procs:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "performing calls" in line:
                    break
            else:
                raise RuntimeError(f"an offload worker exited: {proc.wait()}")
        # Keep reading their logs, so that a chatty worker never blocks on a full pipe.
        self.readers = [
            threading.Thread(target=proc.stderr.read, daemon=True)  # type: ignore[union-attr]
            for proc in self.procs
        ]
        for reader in self.readers:
            reader.start()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc, reader in zip(self.procs, self.readers, strict=True):
            reader.join(10)  # at the end of its pipe, now that the process is gone
            if proc.stderr is not None:
                proc.stderr.close()


def _cpu() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in ticks (Linux; else zeros)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(t) for t in stat.readline().split()[1:9]]
    except OSError:
        return 0, 0
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # less idle and iowait


BUSY: Samples = Samples()  # the machine's busy share during each drain, by processes


def drain(server: Any, api: str, n: int, processes: int, run_index: int) -> float:
    """Calls a second that `processes` idle workers deliver of `n` stored at once (and,
    in BUSY, how busy the machine's cores were meanwhile)."""
    import psycopg

    from offload.stores.postgres import PostgresStore

    database = server.create_database(f"drain_{processes}_{run_index}")
    url = f"{database}?schema=offload"
    store = PostgresStore(url)
    workers = None
    try:
        store.counts()  # the tables, before the workers open the store
        workers = Workers(url, processes)
        web = offload.Offloader(store=url, consume=False, max_queue=n + 1)
        body = {"event": "signup", "user_id": 42, "email": "user42@example.com"}
        calls = [offload.http("POST", f"{api}/hook", json=body) for _ in range(n)]
        with psycopg.connect(database) as conn:
            with web.transaction(conn):
                for call in calls:
                    web.enqueue_task(call)
            busy0, total0 = _cpu()
            t0 = time.perf_counter()
            conn.commit()  # the workers hear of all n at once
            # Until the table is empty: a look every 5 ms (the drain takes seconds), each
            # one index probe, so as to take little of the cores the drain needs.
            while conn.execute('SELECT 1 FROM "offload".tasks LIMIT 1').fetchone():
                conn.rollback()
                time.sleep(0.005)
            rate = n / (time.perf_counter() - t0)
        busy1, total1 = _cpu()
        if total1 > total0:
            BUSY.add(f"{processes}", 100 * (busy1 - busy0) / (total1 - total0))
        web.shutdown(5)
        return rate
    finally:
        if workers is not None:
            workers.stop()
        store.close()


_LOOPER = """
import sys
sys.path.insert(0, sys.argv[1])
from bench_drain import loop
loop(sys.argv[2], 20)  # warm: its connection made, its modules imported
print("ready", flush=True)
sys.stdin.readline()
loop(sys.argv[2], int(sys.argv[3]))
"""


def loops(url: str, n: int, processes: int) -> float:
    """Calls a second of `processes` bare `requests` loops in processes of their own, `n`
    calls among them: what this machine's cores allow that many processes doing a
    delivery's work, the ceiling of the drain's speedup here."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOOPER, str(HERE), url, str(n // processes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a requests loop exited: {proc.wait()}")
        t0 = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            if proc.wait(600) != 0:
                raise RuntimeError(f"a requests loop failed: {proc.returncode}")
        return (n // processes) * processes / (time.perf_counter() - t0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


def drain_rows(server: Any, scale: Scale) -> list[Row]:
    from bench_drain import loop

    n = scale.n(2_000, 20)
    rates = Samples()
    with LocalAPI() as api:
        loop(f"{api.url}/hook", scale.n(200, 5))  # warm the server and the connection
        for run_index in range(scale.repeats):
            rates.add("requests loop", loop(f"{api.url}/hook", n))
            for processes in (1, 4):
                rates.add(f"{processes}", drain(server, api.url, n, processes, run_index))
                rates.add(f"loops {processes}", loops(f"{api.url}/hook", n, processes))
    rows = [
        Row(
            "postgres",
            f"drain {n:,} calls: the bare requests loop",
            rates.median("requests loop"),
            "calls/s",
            runs=rates.count("requests loop"),
        )
    ]
    for processes in (1, 4):
        rows.append(
            Row(
                "postgres",
                f"drain {n:,} calls: {processes} worker process{'es' if processes > 1 else ''}",
                rates.median(f"{processes}"),
                "calls/s",
                baseline="the bare requests loop",
                ratio=rates.ratio(f"{processes}", "requests loop"),
                note=rates.spread(f"{processes}", "requests loop")
                + (
                    f"; cores {BUSY.median(str(processes)):.0f} % busy"
                    if BUSY.count(str(processes))
                    else ""
                ),
                runs=rates.count(f"{processes}"),
            )
        )
    ceiling = rates.ratio("loops 4", "loops 1")
    rows.append(
        Row(
            "postgres",
            "bare requests loops: 4 processes, times 1 (the machine's ceiling)",
            ceiling,
            TIMES,
            baseline="1 loop process",
            ratio=ceiling,
            note=f"{os.cpu_count()} cores shared with the API server; "
            + rates.spread("loops 4", "loops 1"),
            runs=rates.count("loops 4"),
        )
    )
    speedup = rates.ratio("4", "1")
    rows.append(
        Row(
            "postgres",
            "drain: 4 worker processes, times 1",
            speedup,
            TIMES,
            baseline="1 worker process",
            ratio=speedup,
            target=at_least(2),
            met=speedup >= 2,
            note=f"{os.cpu_count()} cores shared with the API server and PostgreSQL; "
            + rates.spread("4", "1")
            + f"; {speedup / ceiling:.0%} of the bare loops' {ceiling:.2f}{TIMES}",
            runs=rates.count("4"),
        )
    )
    return rows


# -- wake-up ----------------------------------------------------------------------------------


class _Arrivals(ThreadingHTTPServer):
    """A local HTTP server that notes when each request arrived (time.monotonic)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ArrivalHandler)
        self.times: list[float] = []
        self.cond = threading.Condition()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.times) >= count, timeout)


class _ArrivalHandler(BaseHTTPRequestHandler):
    server: _Arrivals
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        arrived = time.monotonic()
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.cond:
            self.server.times.append(arrived)
            self.server.cond.notify_all()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def wake_rows(server: Any, scale: Scale) -> list[Row]:
    samples = scale.n(12, 2)
    database = server.create_database("wake")
    url = f"{database}?schema=offload"
    arrivals = _Arrivals()
    workers = Workers(url, 1)
    web = offload.Offloader(store=url, consume=False)
    latencies: list[float] = []
    try:
        for n in range(samples):
            time.sleep(0.6)  # the idle period: the condition measured
            sent = time.monotonic()
            web.enqueue_task(offload.http("POST", f"http://127.0.0.1:{arrivals.server_port}/"))
            if not arrivals.wait(n + 1, 10):
                raise RuntimeError("the idle worker was not woken")
            latencies.append((arrivals.times[n] - sent) * 1000)
    finally:
        web.shutdown(5)
        workers.stop()
        arrivals.shutdown()
        arrivals.server_close()
    median = statistics.median(latencies)
    return [
        Row(
            "postgres",
            "wake-up of an idle worker, p50",
            median,
            "ms",
            target="≤ 20 ms",
            met=median <= 20,
            note=f"max {max(latencies):.1f} ms of {len(latencies)}; a polling store: up to 500",
            runs=len(latencies),
        )
    ]


def run(scale: Scale) -> list[Row]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return [Row("postgres", "PostgreSQL store", None, "", note="psycopg not installed")]
    try:
        context = postgres_server()
        server = context.__enter__()
    except Exception as exc:  # no PostgreSQL binaries on this machine
        return [Row("postgres", "PostgreSQL store", None, "", note=f"no server: {exc}")]
    try:
        return [*enqueue_rows(server, scale), *drain_rows(server, scale), *wake_rows(server, scale)]
    finally:
        context.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> int:
    return standalone(run, __doc__.splitlines()[0], argv, repeats=3)


if __name__ == "__main__":
    os.environ.setdefault("OFFLOAD_SHUTDOWN_TIMEOUT", "0")
    # Run as the importable module, not __main__: a durable store keeps a task's function
    # as a module path.
    import bench_postgres

    raise SystemExit(bench_postgres.main())
