"""What an offloader reports of itself, for displays and probes: Stats (its counters and
a snapshot of what it holds), KeyState (one API as the scheduler sees it) and Health (is
it well). Frozen snapshots, each with the `to_json()` the CLI, the console and the
metrics share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .limits import Limit

__all__ = ["Health", "KeyState", "Stats"]


@dataclass(frozen=True, slots=True)
class Stats:
    """Counters since the offloader was made, and a snapshot of what it holds now.

    The memory store keeps the ledger exact:
    `enqueued == succeeded + dead_lettered + queued + delayed + in_flight`.

    Over a durable store the counters are this process's and tasks pass through it:
    `claimed` (taken from the store to perform, including those leased as they were
    enqueued) `== succeeded + dead_lettered + released + queued + in_flight`, where
    `released` counts tasks handed back (retries, shutdown). `stored_ready`,
    `stored_delayed` and `stored_leased` are what the store holds now for every process
    (None for the memory store).
    """

    enqueued: int
    succeeded: int
    retried: int
    dead_lettered: int
    rejected: int
    queued: int
    delayed: int
    in_flight: int
    dead_letters: int
    dead_letters_dropped: int
    worker_running: bool
    claimed: int = 0
    released: int = 0
    stored_ready: int | None = None
    stored_delayed: int | None = None
    stored_leased: int | None = None
    deduplicated: int = 0  # enqueues that returned a task already holding the dedup key

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class KeyState:
    """One key (an API) as the scheduler sees it now, for displays (`Offloader.keys()`).

    `waiting`: its tasks queued here, ready or held behind its gate or its pace;
    `in_flight`: its calls running; `reopens_in`: seconds until its closed gate reopens
    (None when open; 0.0 while a probe call decides); `rate`: calls a second it is allowed
    now (a declared or learnt rate; None when unlimited); `limit`: its declared Limit;
    `down`: paused for an outage (its calls keep failing, nothing succeeds).
    """

    key: str
    waiting: int
    in_flight: int
    reopens_in: float | None
    rate: float | None
    limit: Limit | None
    down: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "waiting": self.waiting,
            "in_flight": self.in_flight,
            "reopens_in": self.reopens_in,
            "rate": self.rate,
            "limit": None if self.limit is None else str(self.limit),
            "down": self.down,
        }


@dataclass(frozen=True, slots=True)
class Health:
    """Whether an offloader (or a store) is well, for probes: `Offloader.health()`.

    `ok` is True when `problems` is empty. `worker_running`: a worker thread of this
    process is alive (None when no offloader of this process is asked: a store alone);
    `store_ok`: the store answered; `oldest_waiting_s`: seconds the oldest task that is due
    has waited to start (None when none is due; see `Offloader.health`); `dead_letters`:
    held now (None when the store did not answer); `problems`: one line each.
    """

    ok: bool
    worker_running: bool | None
    store_ok: bool
    oldest_waiting_s: float | None
    dead_letters: int | None
    problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "worker_running": self.worker_running,
            "store_ok": self.store_ok,
            "oldest_waiting_s": self.oldest_waiting_s,
            "dead_letters": self.dead_letters,
            "problems": list(self.problems),
        }
