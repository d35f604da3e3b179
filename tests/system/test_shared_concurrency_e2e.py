"""A declared concurrency over one SQLite file holds for every process on it: real worker
processes calling a real server on 127.0.0.1 that records the most requests it had in
flight at once; a process killed (-9) while its call holds the key's slot, after which the
others go on once the slot lapses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from pacing import RateServer
from procs import python_env, reap

_WORKER = """
import json, os, sys
import offload

url, base = sys.argv[1], sys.argv[2]
off = offload.Offloader(store=url, limits={base: offload.Limit(concurrency=1)}, workers=4)
off.stats()  # the store opened (and made) before the race begins
print("ready", flush=True)
for line in sys.stdin:
    command, _, arg = line.strip().partition(" ")
    if command == "enqueue":  # enqueue <path> <count>
        path, count = arg.split()
        for i in range(int(count)):
            off.enqueue_task(
                offload.http("POST", f"{base}{path}/{i}", headers={"X-Pid": str(os.getpid())})
            )
        print("enqueued", flush=True)
    elif command == "flush":
        print("flushed", off.flush(timeout=float(arg)), flush=True)
    elif command == "stats":
        s = off.stats()
        fields = ("claimed", "succeeded", "dead_lettered", "released", "queued", "in_flight")
        print("stats", json.dumps({name: getattr(s, name) for name in fields}), flush=True)
    elif command == "quit":
        break
off.shutdown(timeout=10)
print("bye", flush=True)
"""


class HoldingServer(RateServer):
    """A RateServer (no rate to speak of) whose calls to /hold/... wait until `let_go`."""

    def __init__(self, delay: float) -> None:
        self.let_go = threading.Event()
        super().__init__(rate=100_000, delay=delay)

    def _arrive(self, path: str) -> tuple[int, dict[str, str]]:
        answer = super()._arrive(path)
        if path.startswith("/hold"):
            self.let_go.wait(60)
        return answer


class Worker:
    """One worker process on the store, driven a line at a time."""

    def __init__(self, url: str, base: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_WORKER), url, base],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=python_env(),
        )
        assert self.read() == "ready"

    def read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError("worker ended: " + self.proc.stderr.read())
        return line.strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ask(self, line: str) -> str:
        self.send(line)
        return self.read()

    def ledger(self) -> dict[str, Any]:
        answer = self.ask("stats")
        assert answer.startswith("stats "), answer
        stats: dict[str, Any] = json.loads(answer[len("stats ") :])
        settled = ("succeeded", "dead_lettered", "released", "queued", "in_flight")
        assert stats["claimed"] == sum(stats[name] for name in settled), stats
        return stats

    def quit(self) -> None:
        self.send("quit")
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0 and "bye" in out, out + err


def test_three_processes_on_one_file_keep_one_call_in_flight(tmp_path: Path) -> None:
    """Each process performs its own calls (leased as it enqueues them) with four workers:
    per process, three calls would be in flight at once; shared, one."""
    per_process = 6
    with HoldingServer(delay=0.05) as api:
        url = f"sqlite:///{tmp_path / 'c.db'}"
        workers = [Worker(url, api.url) for _ in range(3)]
        try:
            for worker in workers:
                worker.send(f"enqueue /glue {per_process}")
            for worker in workers:
                assert worker.read() == "enqueued"
            assert api.wait_for(3 * per_process, timeout=120)
            for worker in workers:
                assert worker.ask("flush 120") == "flushed True"
                assert worker.ledger()["succeeded"] == per_process
                worker.quit()
        finally:
            for worker in workers:
                reap(worker.proc)
        assert api.count(200) == 3 * per_process
        assert api.max_in_flight == 1


def test_a_killed_process_s_slot_lapses_and_the_others_go_on(tmp_path: Path) -> None:
    """A process killed while its call holds the key's one slot never gives it back: the
    others' calls wait, and go once the slot lapses (a lease timeout after its last
    renewal), not before the kill."""
    lease = 2.0
    with HoldingServer(delay=0.0) as api:
        url = f"sqlite:///{tmp_path / 'c.db'}?lease_timeout={lease:g}"
        holder, other = Worker(url, api.url), Worker(url, api.url)
        try:
            assert holder.ask("enqueue /hold 1") == "enqueued"
            assert api.wait_for(1, "/hold/0", timeout=60)  # its call holds the slot
            assert other.ask("enqueue /after 2") == "enqueued"
            # Held, longer than a lease timeout: the holder renews its slot with its leases.
            assert other.ask(f"flush {lease * 1.5:g}") == "flushed False"
            assert api.count() == 1
            holder.proc.kill()  # -9: no release, no renewal
            holder.proc.wait(timeout=30)
            killed = time.monotonic()
            api.let_go.set()
            # Its task's lease lapses too: the other process performs it as well.
            assert other.ask("flush 60") == "flushed True"
            stats = other.ledger()
            assert stats["succeeded"] == 3 and stats["dead_lettered"] == 0
            other.quit()
        finally:
            api.let_go.set()
            reap(holder.proc)
            reap(other.proc)
        after = api.arrival_times()[1:]
        assert len(after) == 3
        # The slot was renewed at most lease/3 before the kill: it lapsed no sooner.
        assert min(after) - killed >= lease * 2 / 3 - 0.2, min(after) - killed
