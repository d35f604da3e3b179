"""The Store protocol: where an offloader keeps dead letters and, if durable, its tasks.

The memory store keeps queued tasks in the scheduler itself and only holds dead letters
(`durable = False`; the task methods are not called). A durable store (SQLite, SQS) holds
every task from `put` until `complete` or `bury`, so a crash loses nothing:

    put(task, lease=True)  ──► leased to this process ──► complete(task)        delivered
          │                          │      ▲    │
          │ lease=False              │      │    └──► bury(task, letter)        dead letter
          ▼                          │      │
    waiting (due at a time) ◄────────┘      │  release(task, due): retry later, or hand back
          │                                 │
          └──────── claim(limit, ...) ──────┘  (by any process sharing the store)

A leased task is this process's to perform. Leases last `lease_timeout` seconds and are
renewed (`renew`) while the task is held; a lease whose process died is taken back by
`claim` at once where the store can tell (same host, pid gone), otherwise when it expires.
Delivery is at least once: a process killed mid-call leaves a lease that expires, and the
task runs again.

Times are wall-clock epoch seconds (`time.time()`), since they are shared across processes.

`replay` moves a dead letter's task back into the queue (fresh attempt budget, same ids)
before the dead letter goes, so a crash in between duplicates and never loses; `revive`
(the memory store's way) only removes and returns. A store that cannot lease a task as
it writes it (SQS) sets `leases_on_put = False`: the offloader then puts with
`lease=False` and claims its tasks back like any worker.

A store keeps tasks as `codec.task.TaskRecord`s (JSON only); the offloader's stages never
see its rows or messages.

Wake-ups. An idle worker of a durable backlog looks at the store for what other processes
put every `backlog.wakeups.POLL_INTERVAL` seconds, unless the store can tell it: `watch`
(PostgreSQL: LISTEN/NOTIFY) calls back when a task may be due, and the worker then waits
for that (and for lease expiries) instead of polling. A store that cannot returns None.

Rate budgets. A `BudgetStore` (SQLite, PostgreSQL) keeps a token bucket per key for
every process on it (`take_tokens`): a key's declared rate then holds for all of them
together. Over any other store each process paces its calls on its own.

The application's transaction. A `TransactionalStore` (PostgreSQL) also writes tasks
through a connection of the application's, inside the transaction it has open, so that a
task exists if and only if that transaction commits (`Offloader.transaction`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from ..codec.trust import Trust
from ..codec.view import CallView
from ..outcome import Reason
from ..records import DeadLetter, Task

__all__ = [
    "NO_KEYS",
    "BudgetStore",
    "DurableStore",
    "LetterDetail",
    "LetterPage",
    "LetterQuery",
    "LetterTally",
    "Store",
    "StoreCounts",
    "TransactionalStore",
]

NO_KEYS: Mapping[str, float] = MappingProxyType({})
"""`claim(exclude_keys=...)` when no key is excluded."""


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """What a durable store holds now, for stats() and the CLI."""

    # A task whose lease expired, or whose owner is a process of this host that is gone,
    # is no one's: it counts as ready or delayed (the next claim takes it back).
    ready: int  # due now, not leased
    delayed: int  # due later, not leased
    leased: int  # leased to a live process (this one or another), the lease running
    dead_letters: int


@dataclass(frozen=True, slots=True)
class LetterQuery:
    """Which dead letters a listing wants: every field given must match.

    `since`: last attempted at or after (an aware datetime); `text`: a substring of the
    description or the error, case-insensitive.
    """

    key: str | None = None
    status: int | None = None
    reason: Reason | None = None
    since: datetime | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class LetterPage:
    """One page of a listing, newest first; `total` counts every match, `cursor` fetches
    the next page (None on the last)."""

    letters: list[DeadLetter]
    total: int
    cursor: str | None


@dataclass(frozen=True, slots=True)
class LetterDetail:
    """One dead letter and what its task calls (for the console's page of one letter)."""

    letter: DeadLetter
    call: CallView


@dataclass(frozen=True, slots=True)
class LetterTally:
    """How many dead letters there are in all and per key, reason and status (the most
    frequent first, `limit` of each at most): the console's overview."""

    total: int
    by_key: list[tuple[str | None, int]]
    by_reason: list[tuple[str, int]]
    by_status: list[tuple[int | None, int]]


@runtime_checkable
class Store(Protocol):
    """What an Offloader needs of a store."""

    #: The URL the store was opened from ("memory", "sqlite:///...", "sqs://..."), no secrets.
    url: str
    #: True when tasks survive the process: the offloader then writes each one through.
    durable: bool
    #: Dead letters let go to stay within a bound (the memory store's); 0 for stores that
    #: keep every one.
    dropped: int

    # -- dead letters (every store) -------------------------------------------------------

    def bury(self, task: Task, letter: DeadLetter) -> None:
        """Keep a dead letter with what is needed to replay its task; a durable store
        removes the task itself in the same step."""

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter held, oldest first. Never consumes or hides them."""
        ...

    def __len__(self) -> int:
        """How many dead letters are held."""
        ...

    def dead_letter_page(
        self, query: LetterQuery, *, limit: int = 50, cursor: str | None = None
    ) -> LetterPage:
        """The dead letters matching `query`, newest first, `limit` at most, from `cursor`
        (an opaque string a previous page gave): what the console lists, a page at a time,
        without reading the whole store."""
        ...

    def dead_letter_detail(self, dead_letter_id: str) -> LetterDetail:
        """One dead letter and its task's call as a CallView (method, URL, headers with
        secrets as `***`; never a body), without importing the function a task names.

        Raises UnknownDeadLetter when no dead letter has that id."""
        ...

    def dead_letter_tally(self, *, limit: int = 20) -> LetterTally:
        """The dead letters counted in all, and by key, reason and status."""
        ...

    def revive(self, dead_letter_id: str) -> Task:
        """Remove a dead letter and return its task (ids and idempotency key kept).

        Raises UnknownDeadLetter when no dead letter has that id.
        """
        ...

    def discard(self, dead_letter_id: str) -> None:
        """Remove a dead letter; raises UnknownDeadLetter when none has that id."""

    def purge(self) -> int:
        """Remove every dead letter; returns how many."""
        ...

    def close(self) -> None:
        """Release connections and files. The store is not used afterwards."""

    def after_fork(self) -> None:
        """In a forked child: let go of the parent's connections, files and leases (never
        close them: they are still the parent's)."""


@runtime_checkable
class DurableStore(Store, Protocol):
    """A Store that also holds tasks until they are delivered or dead-lettered."""

    #: Seconds a lease lasts unless renewed; the offloader renews every third of it.
    lease_timeout: float
    #: False when `put(lease=True)` is impossible (see the module docstring).
    leases_on_put: bool
    #: True when `put` deduplicates by the task's dedup key for every process on the
    #: store; otherwise the offloader does, for its own process.
    dedups: bool
    #: Which functions a stored task may name: a store loads each task through it, so
    #: that a function it refuses is never imported (the Offloader sets its own).
    trust: Trust
    #: Seconds between flush()'s looks at what other processes changed (each look is a
    #: request to a remote store).
    flush_poll: float

    def put(self, task: Task, *, lease: bool, due: float | None = None) -> Task:
        """Write a new task durably before returning (NotSerializable if it cannot be
        stored), due at `due` (epoch seconds; now if None). `lease=True` (never with a
        `due`): leased to this process, which will perform it.

        Returns the task; or, for a store that `dedups`, the task already holding its
        dedup key, when one does (then nothing is written)."""
        ...

    def claim(self, limit: int, *, exclude_keys: Mapping[str, float] = NO_KEYS) -> list[Task]:
        """Lease up to `limit` tasks that are due now, oldest first, skipping the keys
        whose gates this process holds closed: key -> the epoch time its gate reopens (a
        store that must receive a task to see its key puts it back due then). Tasks come
        back with their attempt state."""
        ...

    def renew(self, tasks: Sequence[Task]) -> None:
        """Extend the leases of tasks this process holds."""

    def release(self, task: Task, due: float) -> None:
        """Hand a leased task back, due again at `due` (epoch seconds), keeping its attempt
        state (attempts, first/last attempt times) so that any process continues it."""

    def complete(self, task: Task) -> None:
        """Forget a delivered task."""

    def next_due(self) -> float | None:
        """When the earliest task not leased is due (epoch seconds); None if none is held.
        Tasks of processes that are gone or whose lease has expired count as not leased."""
        ...

    def replay(self, dead_letter_id: str) -> Task:
        """Put a dead letter's task back in the queue, due now, with a fresh attempt budget
        (same id and idempotency key), then remove the dead letter; return the task.

        Raises UnknownDeadLetter when no dead letter has that id."""
        ...

    def counts(self) -> StoreCounts:
        """What the store holds now."""
        ...

    def watch(self, wake: Callable[[], None]) -> Callable[[], None] | None:
        """Call `wake()` (from a thread of the store's own, never holding a lock of the
        caller's) whenever tasks may have become due for this process: another process
        put or handed back a task, or leases were taken back; and once whenever watching
        (re)starts, for what it may have missed. Returns the function that stops it, or
        None when the store cannot watch (SQLite, SQS): the caller then polls. Must not
        block: the caller may hold its own lock. A caller that watches still looks on its
        own now and then, for expired leases (which nobody announces) and for the time the
        store could not watch."""
        ...


@runtime_checkable
class BudgetStore(DurableStore, Protocol):
    """A DurableStore that keeps declared rates' budgets, shared by every process on it."""

    def take_tokens(self, key: str, rate: float, burst: float, want: int = 1) -> tuple[int, float]:
        """Take up to `want` tokens of `key`'s bucket (refilled at `rate` tokens a second,
        holding `burst` at most, full when new), which every process on the store shares:
        (how many were taken, 0.0), or (0, the seconds until one is there). StoreError
        when the store cannot be read."""
        ...

    def take_slots(self, key: str, slots: int, want: int = 1) -> tuple[list[str], float]:
        """Take up to `want` of `key`'s `slots` slots for calls in flight, which every
        process on the store shares, each held `lease_timeout` seconds unless renewed:
        (their ids, 0.0), or ([], the seconds until the earliest held one lapses).
        StoreError when the store cannot be read."""
        ...

    def release_slots(self, ids: Sequence[str]) -> None:
        """Give back slots taken by `take_slots` (a lapsed one is gone already)."""
        ...

    def renew_slots(self, ids: Sequence[str]) -> None:
        """Hold slots taken by `take_slots` `lease_timeout` seconds more."""
        ...


@runtime_checkable
class TransactionalStore(DurableStore, Protocol):
    """A DurableStore that writes tasks inside the application's own transactions."""

    def join(self, connection: Any) -> Any:
        """The driver connection to write through, from what the application passed (a
        psycopg connection, Django's or SQLAlchemy's), checked against the store and with
        the store's tables made; TypeError or ValueError when it cannot be used."""
        ...

    def put_in(self, connection: Any, task: Task, *, due: float | None = None) -> Task:
        """Write a new task, due at `due` (now if None) and not leased, through
        `connection` (from `join`), in the transaction it has open: nothing is committed
        here, and the task (with its wake-up for the workers) exists once, and only if,
        that transaction commits. Returns the task, or (as `put`) the one already holding
        its dedup key, for a store that `dedups`."""
