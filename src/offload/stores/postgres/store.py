"""PostgresStore: one store object per process and database schema, over its parts: the URL
(url.py), the tables (schema.py), the tasks (tasks.py), the dead letters (letters.py), the
LISTEN thread (listener.py) and the application's connection (joining.py). What it keeps
itself is a process's state: its connection and lock, its lease owner, its listener, and
starting over in a forked child.

Connections. Each process opens one connection (autocommit: every statement is its own
transaction) on first use, shared by its threads under a lock, and checks the tables
then (making them unless `create=false`); a second one LISTENs once a worker waits for
tasks (`watch`). A broken connection is dropped and the next use opens a new one (one
the server ended while idle is found so before a statement is sent: `_hung_up`); a
psycopg error becomes a StoreError whose text never holds the password. A connection is
never used across fork(): the child opens its own, and the parent's is left alone.

Leases. As in the SQLite store: a claimed row is leased to this store object's owner
('host:pid:token') until `lease_until`, renewed while held; a claim or `next_due` first
takes back expired leases, and at once those of processes of this host that are gone
(at most every SWEEP_EVERY seconds); a role that may only read (`offload health`, a
console) leaves that to the workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..._redact import REDACTED, redact_text
from ...clock import Clock, SystemClock
from ...codec.task import TaskRecord
from ...codec.trust import TRUST_ANY, Trust
from ...config import check_lease_timeout, lease_timeout_from_env
from ...errors import StoreError
from ...records import DeadLetter, Task
from .._shared import new_owner
from ..base import NO_KEYS, StoreCounts
from .budgets import SharedBudgets
from .dedup import free_keys, let_key_go, put_alone, put_unique
from .joining import app_cursor, check_same_server, psycopg_connection, server_of
from .letters import LetterMethods, bury_task
from .listener import Listener, wait_readable
from .schema import Sql, ensure_tables
from .tasks import (
    NO_PRIVILEGE,
    claim_due,
    count_tasks,
    earliest_due,
    release_task,
    renew_leases,
    take_back,
    task_row,
)
from .url import parse_postgres_url

__all__ = ["PostgresStore"]

log = logging.getLogger("offload")

SWEEP_EVERY = 2.0
"""Seconds between a store object's looks for leases to take back (each reads every
leased row's owner)."""

# Connections inherited over fork(): never used again and never closed, since closing one
# in the child sends the server a Terminate for the parent's session.
_orphans: list[Any] = []
_fork_locks: dict[int, threading.Lock] = {}


class PostgresStore(LetterMethods, SharedBudgets):
    """A durable store in a PostgreSQL database (see the package docstring)."""

    durable = True
    leases_on_put = True
    dedups = True  # for every process on the database: a table of keys (see dedup.py)
    #: Which functions a stored task may name (the Offloader sets its own).
    trust: Trust = TRUST_ANY
    #: flush() looks at the tables this often for what other processes changed.
    flush_poll = 0.05
    dropped = 0  # every dead letter is kept

    def __init__(
        self, url: str, *, lease_timeout: float | None = None, clock: Clock | None = None
    ) -> None:
        """`url`: postgresql://user@host:port/db?schema=offload&lease_timeout=60&create=true
        (its lease_timeout wins over the argument's; OFFLOAD_LEASE_TIMEOUT, else 60).
        `clock` gives the wall-clock time (tests); processes sharing the database must
        agree on the time, as with any lease."""
        parsed = parse_postgres_url(url)
        if parsed.lease_timeout is not None:
            lease_timeout = parsed.lease_timeout
        elif lease_timeout is None:
            lease_timeout = lease_timeout_from_env()
        check_lease_timeout("lease_timeout", lease_timeout)
        self.lease_timeout = float(lease_timeout)
        #: The URL as given, with the password as ***: what reprs, logs and errors show.
        self.url = parsed.shown
        self.schema = parsed.schema
        self.create = parsed.create
        self._conninfo = parsed.conninfo
        self._password = parsed.password
        self._sql = Sql(parsed.schema)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._init_process_state()

    @classmethod
    def from_url(
        cls, url: str, *, lease_timeout: float | None = None, clock: Clock | None = None
    ) -> PostgresStore:
        """The store a `postgresql://` URL names; nothing is connected until first use."""
        return cls(url, lease_timeout=lease_timeout, clock=clock)

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._listen_lock = threading.Lock()
        self._owner = new_owner()
        self._conn: Any = None
        self._cur: Any = None
        self._ready = False  # the tables were checked in this process
        self._next_sweep = -math.inf
        self._listener: Listener | None = None

    @property
    def owner(self) -> str:
        """The lease owner this store object writes: 'host:pid:token'."""
        self._check_pid()
        return self._owner

    # -- connections ----------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """`text` (a psycopg error, say) with the password hidden, and any other secret."""
        if self._password:
            text = text.replace(self._password, REDACTED)
        return redact_text(text)

    def _connect(self) -> Any:
        """A new autocommit connection; StoreError (password hidden) if none can be made."""
        try:
            import psycopg  # noqa: PLC0415 - an optional extra

            return psycopg.connect(self._conninfo, autocommit=True)
        except ImportError:
            raise StoreError(
                "the PostgreSQL store needs psycopg 3: pip install 'offload[postgres]'"
            ) from None
        except Exception as exc:
            raise StoreError(f"{self.url}: cannot connect: {self._scrub(str(exc))}") from None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            with _fork_locks.setdefault(os.getpid(), threading.Lock()):
                if self._pid != os.getpid():
                    self._start_over()

    def _start_over(self) -> None:
        """In a forked child: a new lock, owner, listener and (on first use) connection."""
        if self._conn is not None:
            _orphans.append(self._conn)  # never touched again, never closed
        if self._listener is not None:
            self._listener.after_fork()
        self._init_process_state()

    def after_fork(self) -> None:
        """In a forked child: its own connection and owner, opened on first use."""
        self._check_pid()

    def _cursor(self) -> Any:
        """This process's cursor, connecting (and checking the tables) first if need be;
        the lock is held."""
        cur = self._cur
        if cur is not None and _hung_up(self._conn):  # ended by the server while idle
            cur = self._conn = self._cur = None
        if cur is None:
            conn = self._connect()
            try:
                if not self._ready:
                    ensure_tables(conn, self._sql, create=self.create, shown=self.url)
                    self._ready = True
            except BaseException:
                conn.close()
                raise
            self._conn, self._cur = conn, conn.cursor()
            cur = self._cur
        return cur

    @contextlib.contextmanager
    def _use(self, what: str) -> Iterator[Any]:
        """A cursor, under the lock; psycopg errors become StoreError naming `what`, and a
        broken connection is dropped for the next use to replace."""
        self._check_pid()
        with self._lock:
            try:
                yield self._cursor()
            except StoreError:
                raise
            except Exception as exc:
                if not _is_psycopg_error(exc):
                    raise
                conn = self._conn
                if conn is not None and (conn.broken or conn.closed):
                    self._conn = self._cur = None
                    with contextlib.suppress(Exception):
                        conn.close()
                raise StoreError(f"{self.url}: {what} failed: {self._scrub(str(exc))}") from None

    def exists(self) -> bool:
        """True when the database holds this store's tables (never makes them): for the
        `offload` command, which must not make an empty store out of a typo."""
        self._check_pid()
        with self._lock:
            conn = self._connect()
            try:
                return bool(conn.execute(self._sql.tables).fetchone()[0])
            except Exception as exc:
                raise StoreError(f"{self.url}: cannot read: {self._scrub(str(exc))}") from None
            finally:
                conn.close()

    def close(self) -> None:
        """Stop listening and close this process's connection; a later use opens a new one."""
        if self._pid != os.getpid():
            self._check_pid()
            return
        with self._listen_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conn, self._conn, self._cur = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- wake-ups ---------------------------------------------------------------------------

    def watch(self, wake: Callable[[], None]) -> Callable[[], None] | None:
        """Call `wake()` from a thread of the store's own when tasks may be due for this
        process: on every NOTIFY of the store's channel (a put without a lease, a release,
        a replay, a take-back, by any process: heard at their commit), and once each time
        it starts listening (after a lost connection too). Returns the function that stops
        it."""
        self._check_pid()
        with self._listen_lock:  # not the connection's lock: a query may hold that one
            listener = self._listener
            if listener is None:
                listener = self._listener = Listener(
                    self._connect, self._sql.channel, self.url, self._scrub
                )
        return listener.add(wake)

    # -- the application's transaction ----------------------------------------------------

    def join(self, connection: Any) -> Any:
        """The psycopg connection to write through for `connection` (psycopg, Django's or
        SQLAlchemy's; see joining.py), checked: the same database as the store's, and the
        store's tables made first (so an enqueue cannot fail the application's transaction
        for want of them). TypeError or ValueError when it cannot be used."""
        driver = psycopg_connection(connection)
        with self._use("opening the store") as cur:
            ours = server_of(cur.connection)
        check_same_server(ours, driver, self.url, self._scrub)
        return driver

    def put_in(self, connection: Any, task: Task, *, due: float | None = None) -> Task:
        """Write a new task, due at `due` (now if None) and not leased, through the
        application's `connection` (from `join`), in the transaction it has open; nothing
        is committed here. Its NOTIFY goes out at that transaction's commit, and with it,
        the task (and its dedup key: the task holding the key is returned instead, when
        one does)."""
        record = TaskRecord.of(task)  # NotSerializable before touching the connection
        sql = self._sql
        now = self._clock.time()
        row = task_row(record, now if due is None else due, None, None)
        try:
            cur = app_cursor(connection)  # tuples, whatever the application's rows are
            if record.dedup_key is not None:
                held = put_unique(cur, sql, task, record, row, now, notify=True)
                return self._kept(held, record)
            cur.execute(sql.put_waiting, (*row, sql.channel))
        except Exception as exc:
            if not _is_psycopg_error(exc):
                raise
            raise StoreError(
                f"{self.url}: enqueue in the application's transaction failed (that "
                f"transaction is now aborted; roll it back): {self._scrub(str(exc))}"
            ) from None
        return task

    # -- tasks ------------------------------------------------------------------------------

    def put(self, task: Task, *, lease: bool, due: float | None = None) -> Task:
        """Write a new task before returning, due at `due` (epoch seconds; now if None):
        one INSERT, committed (autocommit). A task not leased here NOTIFYs the listening
        workers (a delayed one too: they learn when it is due). A task with a dedup key
        takes it in the same statement; while another task holds it, that task is
        returned and nothing is written; one an open transaction took is waited for, with
        the store's lock let go between tries (dedup.put_alone)."""
        record = TaskRecord.of(task)  # NotSerializable before touching the database
        now = self._clock.time()
        sql = self._sql
        if lease:
            row = task_row(record, now, self._owner, now + self.lease_timeout)
        else:
            row = task_row(record, now if due is None else due, None, None)
        if record.dedup_key is not None:  # one statement takes the key, for everyone
            kept = put_alone(
                self._use, sql, task, record, row, self._clock.time, notify=not lease,
                patience=self.lease_timeout, shown=self.url,
            )  # fmt: skip
            return self._kept(kept, record)
        with self._use("enqueue") as cur:
            if lease:
                cur.execute(sql.put_leased, row)
            else:
                cur.execute(sql.put_waiting, (*row, sql.channel))
        return task

    def _kept(self, kept: Task | None, record: TaskRecord) -> Task:
        """The task written, or the one holding its key (dedup.py); None: it kept moving."""
        if kept is None:
            raise StoreError(f"{self.url}: dedup key {record.dedup_key!r} kept changing hands")
        return kept

    def claim(self, limit: int, *, exclude_keys: Mapping[str, float] = NO_KEYS) -> list[Task]:
        """Lease up to `limit` due tasks, oldest due first, skipping `exclude_keys`."""
        if limit <= 0:
            return []
        now = self._clock.time()
        with self._use("claim") as cur:
            if now >= self._next_sweep:
                self._sweep(cur, now)
            return claim_due(
                cur,
                self._sql,
                owner=self._owner,
                now=now,
                until=now + self.lease_timeout,
                limit=limit,
                exclude_keys=exclude_keys,
                trust=self.trust,
            )

    def _sweep(self, cur: Any, now: float) -> None:
        self._next_sweep = now + min(SWEEP_EVERY, self.lease_timeout / 4)
        try:
            take_back(cur, self._sql, owner=self._owner, now=now)
            free_keys(cur, self._sql, now)
        except Exception as exc:  # a role that may only read (offload health) leaves it
            if getattr(exc, "sqlstate", None) != NO_PRIVILEGE:
                raise

    def renew(self, tasks: Sequence[Task]) -> None:
        """Extend the leases of `tasks` (one UPDATE)."""
        if not tasks:
            return
        with self._use("renewing leases") as cur:
            until = self._clock.time() + self.lease_timeout
            lost = renew_leases(cur, self._sql, tasks, owner=self._owner, until=until)
        if lost:
            log.warning(
                "offload: %d lease(s) were lost before renewal (taken back after expiry); "
                "those tasks may run twice",
                lost,
            )

    def release(self, task: Task, due: float) -> None:
        """Hand `task` back, due at `due`, with its attempt state."""
        with self._use("releasing a task") as cur:
            release_task(cur, self._sql, task, owner=self._owner, due=due)

    def complete(self, task: Task) -> None:
        """Forget a delivered task."""
        with self._use("completing a task") as cur:
            if task.dedup_key is None:
                cur.execute(self._sql.complete, (task.id,))
                return
            with cur.connection.transaction():  # the row and its key go together
                cur.execute(self._sql.complete, (task.id,))
                let_key_go(cur, self._sql, task, self._clock.time())

    def next_due(self) -> float | None:
        """When the earliest task not leased is due (leases of dead processes and expired
        ones are taken back first)."""
        now = self._clock.time()
        with self._use("reading the queue") as cur:
            if now >= self._next_sweep:
                self._sweep(cur, now)
            return earliest_due(cur, self._sql)

    def counts(self) -> StoreCounts:
        """Tasks ready, delayed and leased, and dead letters, now (see count_tasks)."""
        now = self._clock.time()
        with self._use("counting") as cur:
            ready, delayed, leased, letters = count_tasks(
                cur, self._sql, owner=self._owner, now=now
            )
        return StoreCounts(ready=ready, delayed=delayed, leased=leased, dead_letters=letters)

    # -- dead letters -----------------------------------------------------------------------

    def bury(self, task: Task, letter: DeadLetter) -> None:
        """Keep `letter` with the task's stored call, and delete the task, in one statement."""
        with self._use("storing a dead letter") as cur:
            bury_task(cur, self._sql, task, letter, self._clock.time())

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r}, lease_timeout={self.lease_timeout:g})"


def _hung_up(conn: Any) -> bool:
    """Whether the server ended idle `conn` (closed here, quietly): an idle autocommit
    connection has nothing to read unless the server hung up (a restart, a failover,
    pg_terminate_backend, idle_session_timeout), which is found now, before a statement
    is sent, rather than by that statement's failure."""
    try:
        readable = bool(wait_readable([conn.fileno()], 0))
    except Exception:  # closed already
        readable = True
    if readable:  # (a notice the server sent meanwhile costs a new connection: no harm)
        with contextlib.suppress(Exception):
            conn.close()
    return readable


def _is_psycopg_error(exc: BaseException) -> bool:
    import psycopg  # noqa: PLC0415

    return isinstance(exc, psycopg.Error)
