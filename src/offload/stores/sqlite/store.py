"""SQLiteStore: one store object per process and file, over its parts: the file
(schema.py), the intake journal (journal.py), the tasks table (tasks.py) and the dead
letters (letters.py). What it keeps itself is a process's state: its connection, its
lock, its lease owner, its journal file, and starting over in a forked child.

Sharing. Every process (gunicorn workers, `offload worker`) opens its own connection; a
connection is never used across fork() (a child opens its own, by a process-id check).
Writers wait for each other up to `busy_timeout` seconds (default 5). A task being
performed is leased to one owner (host, pid, a random token per store object) until
`lease_until`; leases are renewed while held. A lease whose owner is a process of this
host that no longer exists is taken back by the next claim, at once; any other lease when
it expires. `counts` takes them back too, and counts their tasks as ready or delayed.

Reading tasks copies the journals first: a claim, `next_due` and `counts` copy every
process's lines, so that they see every task; settling a task (complete, release, bury,
renew) copies this process's own, so that its task has a row.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

from ...clock import Clock, SystemClock
from ...codec.task import TaskRecord
from ...codec.trust import TRUST_ANY, Trust
from ...config import check_lease_timeout, check_number, lease_timeout_from_env
from ...errors import StoreError
from ...records import DeadLetter, Task
from .._shared import new_owner
from ..base import NO_KEYS, StoreCounts
from .budgets import SharedBudgets
from .dedup import let_key_go, put_unique
from .journal import CAN_JOURNAL, Journals, JournalWriter, done_line, lease_text, task_line
from .letters import (
    bury_task,
    count_letters,
    discard_letter,
    purge_letters,
    read_letter,
    read_letters,
    replay_letter,
    revive_letter,
)
from .listing import LetterListing
from .schema import PUT, SYNCHRONOUS, connect, store_options, transaction
from .tasks import (
    claim_due,
    count_tasks,
    delete_task,
    earliest_due,
    release_task,
    renew_leases,
    sweep,
)

__all__ = ["SQLiteStore"]

log = logging.getLogger("offload")

# Sweeping leases (expired ones, and those of dead processes) reads every leased row, so
# it runs at most this often per store object; the first claim or next_due runs it at once.
# The sweep also deletes the dedup keys whose window passed (dedup.free_keys).
_SWEEP_EVERY = 2.0

# Connections inherited over fork(): never used again and never closed, since closing a
# connection in the child can disturb the parent's locks (as the SQLite docs warn).
_orphans: list[sqlite3.Connection] = []

# One lock per process for noticing a fork lazily, so that two threads of a child (forked
# without the hooks) never both start over, each with its own connection and journal.
_fork_locks: dict[int, threading.Lock] = {}


class SQLiteStore(LetterListing, SharedBudgets):
    """A durable store in one SQLite file (see the package docstring)."""

    durable = True
    dedups = True  # for every process on the file: a table of keys (see dedup.py)
    #: Which functions a stored task may name (the Offloader sets its own).
    trust: Trust = TRUST_ANY
    leases_on_put = True
    #: flush() looks at the file this often for what other processes changed.
    flush_poll = 0.05
    dropped = 0  # every dead letter is kept

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "normal",
        lease_timeout: float = 60.0,
        busy_timeout: float = 5.0,
        clock: Clock | None = None,
        url: str | None = None,
    ) -> None:
        path = os.fspath(path)
        if not path or path == ":memory:":
            raise ValueError("SQLiteStore needs a file path (an in-memory database is not durable)")
        mode = synchronous.lower() if isinstance(synchronous, str) else synchronous
        if mode not in SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got {synchronous!r}"
            )
        check_lease_timeout("lease_timeout", lease_timeout)
        check_number("busy_timeout", busy_timeout, minimum=0)
        self.path = path
        self.synchronous = mode
        self.lease_timeout = float(lease_timeout)
        self.busy_timeout = float(busy_timeout)
        self.url = url if url is not None else f"sqlite:///{path}"
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._connection: sqlite3.Connection | None = None
        #: Where enqueues append (see journal.py); none with synchronous=full, where every
        #: enqueue is its own fsync'd commit, nor where there is no flock() (Windows).
        self.journal_dir = f"{path}-journals"
        self._journaled = mode == "normal" and CAN_JOURNAL
        self._journals = Journals(self.journal_dir, url=self.url, synchronous=mode)
        self._init_process_state()

    @classmethod
    def from_url(
        cls, url: str, *, lease_timeout: float | None = None, clock: Clock | None = None
    ) -> SQLiteStore:
        """The store a `sqlite://` URL names; options `synchronous` (normal, full),
        `lease_timeout` and `busy_timeout` (seconds). The file is opened on first use."""
        path, kwargs = store_options(url)
        if "lease_timeout" not in kwargs:
            kwargs["lease_timeout"] = (
                lease_timeout if lease_timeout is not None else lease_timeout_from_env()
            )
        return cls(path, clock=clock, url=url, **kwargs)

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._owner = new_owner()
        self._lease_text = lease_text(self._owner, self.lease_timeout)  # for journal lines
        self._cursor: sqlite3.Cursor | None = None
        self._opened = False  # the file was opened and checked in this process
        self._journal: JournalWriter | None = None  # made at the first enqueue (journaled)
        # Tasks leased on put whose line is in this process's journal: id -> file name.
        self._journaled_here: dict[str, str] = {}
        self._next_sweep = -math.inf

    @property
    def owner(self) -> str:
        """The lease owner this store object writes: 'host:pid:token'."""
        self._check_pid()
        return self._owner

    def after_fork(self) -> None:
        """In a forked child: its own connection and owner, opened on first use."""
        self._check_pid()

    # -- connection ------------------------------------------------------------------------

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            with _fork_locks.setdefault(os.getpid(), threading.Lock()):
                if self._pid != os.getpid():
                    self._start_over()

    def _start_over(self) -> None:
        """In a forked child: a new lock, owner and (on first use) connection."""
        if self._connection is not None:
            _orphans.append(self._connection)  # never touched again, never closed
        self._connection = None
        if self._journal is not None:
            self._journal.forget_inherited()
        self._init_process_state()

    def _conn(self) -> sqlite3.Connection:
        """The connection of this process (the lock is held)."""
        conn = self._connection
        if conn is None:
            conn, self._journals.store_id = connect(
                self.path,
                url=self.url,
                synchronous=self.synchronous,
                busy_timeout=self.busy_timeout,
                journal_dir=self.journal_dir,
            )
            self._connection = conn
            self._cursor = conn.cursor()
        return conn

    @contextlib.contextmanager
    def _use(self, what: str) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; SQLite errors become StoreError naming `what`."""
        self._check_pid()
        with self._lock:
            try:
                yield self._conn()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.url}: {what} failed: {exc}") from exc

    def _copy_journals(
        self, conn: sqlite3.Connection, *, everyone: bool, all_of_it: bool = False
    ) -> None:
        """Copy journal lines into the tasks table: every process's, or this one's own;
        `all_of_it`: every line there is, a transaction per budget's worth (counts must
        count every task on disk), rather than one budget's worth."""
        while self._journals.copy(conn, self._journal, everyone=everyone) and all_of_it:
            pass

    def close(self) -> None:
        """Close this process's connection; a later use opens a new one."""
        if self._pid != os.getpid():
            self._check_pid()
            return
        with self._lock:
            journal = self._journal
            if journal is not None and (journal.fd >= 0 or journal.retired):
                self._journals.hand_over(self._conn, journal)
            conn, self._connection, self._cursor = self._connection, None, None
            if conn is not None:
                conn.close()

    # -- tasks -----------------------------------------------------------------------------

    def put(self, task: Task, *, lease: bool, due: float | None = None) -> Task:
        """Write a new task before returning, due at `due` (epoch seconds; now if None):
        one line appended to this process's journal (one write(), no fsync), or with
        synchronous=full one fsync'd INSERT. The enqueue path: kept short on purpose."""
        record = TaskRecord.of(task)  # NotSerializable before touching the file
        now = self._clock.time() if due is None else due
        if self._pid != os.getpid():
            self._check_pid()
        if not self._opened:
            with self._use("opening the store"):  # errors in the file surface here
                if self._journaled and self._journal is None:
                    self._journal = self._journals.writer()
                self._opened = True  # last: a thread that sees it sees the journal
        if record.dedup_key is not None:
            return self._put_unique(task, record, lease, now)
        journal = self._journal
        if journal is not None and (
            (line := task_line(record, now, self._lease_text if lease else None)) is not None
        ):
            try:
                name = journal.append(line)
            except OSError as exc:
                raise StoreError(f"{self.url}: enqueue failed: {exc}") from exc
            if lease:
                self._journaled_here[record.id] = name
            return task
        task_id, idempotency_key = record.id, record.idempotency_key
        owner, until = (self._owner, now + self.lease_timeout) if lease else (None, None)
        stored_key = None if idempotency_key == task_id else idempotency_key
        row = (task_id, stored_key, record.key, record.call, record.retry, now, owner, until)
        with self._lock:
            try:
                cursor = self._cursor
                if cursor is None:
                    self._conn()
                    cursor = self._cursor
                    assert cursor is not None
                cursor.execute(PUT, row)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.url}: enqueue failed: {exc}") from exc
        return task

    def _put_unique(self, task: Task, record: TaskRecord, lease: bool, due: float) -> Task:
        """A task with a dedup key: written to the database, not the journal (see dedup.py)."""
        owner, until = (self._owner, due + self.lease_timeout) if lease else (None, None)
        with self._use("enqueue") as conn:
            return put_unique(conn, task, record, due, owner, until, self._clock.time())

    def claim(self, limit: int, *, exclude_keys: Mapping[str, float] = NO_KEYS) -> list[Task]:
        """Lease up to `limit` due tasks, oldest due first, skipping `exclude_keys`."""
        if limit <= 0:
            return []
        now = self._clock.time()
        with self._use("claim") as conn:
            self._copy_journals(conn, everyone=True)
            if now >= self._next_sweep:
                self._sweep(conn, now)
            return claim_due(
                conn,
                owner=self._owner,
                now=now,
                until=now + self.lease_timeout,
                limit=limit,
                exclude_keys=exclude_keys,
                trust=self.trust,
            )

    def _sweep(self, conn: sqlite3.Connection, now: float) -> None:
        """Take back expired leases, and at once those of dead processes of this host;
        delete the journal files that are done with, and dedup keys whose window passed."""
        self._next_sweep = now + min(_SWEEP_EVERY, self.lease_timeout / 4)
        self._journals.tidy(conn)
        sweep(conn, owner=self._owner, now=now)

    def renew(self, tasks: Sequence[Task]) -> None:
        """Extend the leases of `tasks` (one UPDATE)."""
        if not tasks:
            return
        with self._use("renewing leases") as conn:
            self._copy_journals(conn, everyone=False)
            until = self._clock.time() + self.lease_timeout
            lost = renew_leases(conn, tasks, owner=self._owner, until=until)
        if lost:
            log.warning(
                "offload: %d lease(s) were lost before renewal (taken back after expiry); "
                "those tasks may run twice",
                lost,
            )

    def release(self, task: Task, due: float) -> None:
        """Hand `task` back, due at `due`, with its attempt state."""
        self._journaled_here.pop(task.id, None)  # settled in the database from now on
        with self._use("releasing a task") as conn:
            self._copy_journals(conn, everyone=False)
            release_task(conn, task, owner=self._owner, due=due)

    def complete(self, task: Task) -> None:
        """Delete a delivered task (whoever holds it now: it was delivered). One that this
        process journaled and leased is marked done in the same journal file instead."""
        name = self._journaled_here.pop(task.id, None)
        journal = self._journal
        if name and journal is not None and self._pid == os.getpid():
            try:
                if journal.append(done_line(task.id, self._owner), only_to=name):
                    return
            except OSError as exc:
                log.warning("offload: %s: marking a task done in its journal: %s", self.url, exc)
        with self._use("completing a task") as conn:
            self._copy_journals(conn, everyone=False)
            if task.dedup_key is None:
                delete_task(conn, task.id)
                return
            with transaction(conn):
                delete_task(conn, task.id)
                let_key_go(conn, task, self._clock.time())

    def next_due(self) -> float | None:
        """When the earliest claimable task is due (after sweeping dead leases); None if none."""
        now = self._clock.time()
        with self._use("reading the next due time") as conn:
            self._copy_journals(conn, everyone=True)
            if now >= self._next_sweep:
                self._sweep(conn, now)
            return earliest_due(conn)

    def watch(self, wake: Callable[[], None]) -> Callable[[], None] | None:
        """None: a file says nothing of new rows: idle workers poll (see DurableStore.watch)."""
        return None

    def counts(self) -> StoreCounts:
        """Tasks ready, delayed and leased, and dead letters, now (see count_tasks)."""
        now = self._clock.time()
        with self._use("counting") as conn:
            self._copy_journals(conn, everyone=True, all_of_it=True)
            ready, delayed, leased = count_tasks(conn, owner=self._owner, now=now)
            letters = count_letters(conn)
        return StoreCounts(ready=ready, delayed=delayed, leased=leased, dead_letters=letters)

    # -- dead letters (letters.py) ---------------------------------------------------------

    def bury(self, task: Task, letter: DeadLetter) -> None:
        """Keep `letter` with the task's stored call, and delete the task, in one transaction."""
        self._journaled_here.pop(task.id, None)
        now = self._clock.time()
        with self._use("storing a dead letter") as conn:
            self._copy_journals(conn, everyone=False)
            bury_task(conn, task, letter, now)

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        with self._use("listing dead letters") as conn:
            return read_letters(conn)

    def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """One dead letter by id; UnknownDeadLetter if none has it."""
        with self._use("reading a dead letter") as conn:
            return read_letter(conn, dead_letter_id)

    def __len__(self) -> int:
        with self._use("counting dead letters") as conn:
            return count_letters(conn)

    def revive(self, dead_letter_id: str) -> Task:
        """Remove a dead letter and return its task (fresh attempt budget, same ids).

        StoreError, and the dead letter kept, when its task cannot be loaded in this
        process (a function it cannot import). Prefer `replay`, which moves the task back
        into the queue in the same transaction.
        """
        with self._use("reviving a dead letter") as conn:
            return revive_letter(conn, dead_letter_id, self.trust)

    def replay(self, dead_letter_id: str) -> Task:
        """Move a dead letter's task back to the queue, due now, with a fresh attempt budget
        (same id and idempotency key), in one transaction; return the task.

        The task is not loaded to do so: a process that cannot import its function (the
        `offload` command, say) can replay it for the workers that can."""
        now = self._clock.time()
        with self._use("replaying a dead letter") as conn:
            return replay_letter(conn, dead_letter_id, now, self.trust)

    def discard(self, dead_letter_id: str) -> None:
        """Delete one dead letter; UnknownDeadLetter if none has that id."""
        with self._use("discarding a dead letter") as conn:
            discard_letter(conn, dead_letter_id)

    def purge(self) -> int:
        """Delete every dead letter; returns how many there were."""
        with self._use("purging dead letters") as conn:
            return purge_letters(conn)

    def __repr__(self) -> str:
        return (
            f"SQLiteStore({self.path!r}, synchronous={self.synchronous!r}, "
            f"lease_timeout={self.lease_timeout:g})"
        )
