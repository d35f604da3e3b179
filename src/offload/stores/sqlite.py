"""The SQLite store: tasks and dead letters in one file, shared by the processes of a machine.

    Offloader(store="sqlite:///var/lib/app/offload.db")           # relative: sqlite:///offload.db
    Offloader(store="sqlite:////var/lib/app/offload.db?synchronous=full")

Durability. An enqueue appends one line (the task as JSON) to its process's journal file,
in `<database>-journals/`, with one write() and no fsync, before `enqueue_task` returns:
a process that is killed, crashes or is OOM-killed loses nothing. The lines are copied into
the database (WAL mode, `synchronous=NORMAL`) in batches by whichever process next reads
tasks, its own worker or any other; the journal of a process that is gone is copied by the
next one and deleted. A power cut or kernel crash can lose the last writes (never corrupt
the file); `?synchronous=full` writes every enqueue straight into the database with an
fsync'd commit and closes that gap too, at about twenty times the cost per enqueue.

Sharing. Every process (gunicorn workers, `offload worker`) opens its own connection; a
connection is never used across fork() (a child opens its own, by a process-id check).
Writers wait for each other up to `busy_timeout` seconds (default 5). A task being
performed is leased to one owner (host, pid, a random token per store object) until
`lease_until`; leases are renewed while held. A lease whose owner is a process of this
host that no longer exists is taken back by the next claim, at once; any other lease when
it expires.

Only JSON is stored (see offload._serial); the files are made mode 0600, the journal
directory 0700.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import socket
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from json.encoder import encode_basestring_ascii as _quote
from typing import Any
from urllib.parse import parse_qsl, unquote

try:
    import fcntl
except ImportError:  # Windows: no flock(), so no journal; every enqueue writes the database
    fcntl = None  # type: ignore[assignment]

from ..clock import Clock, SystemClock
from ..codec.task import TaskRecord, Unreadable, attempt_state
from ..config import check_lease_timeout, check_number, lease_timeout_from_env
from ..errors import StoreError, UnknownDeadLetter
from ..records import DeadLetter, Task
from ._shared import epoch, json_list, new_owner, number_option, owner_dead, pid_alive
from .base import NO_KEYS, StoreCounts

__all__ = ["SQLiteStore", "parse_sqlite_url"]

log = logging.getLogger("offload")

_SCHEMA_VERSION = 2  # 2: the journals and meta tables, the index on tasks.id
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tasks (
        seq INTEGER PRIMARY KEY,      -- insertion order, and the handle of a leased row
        id TEXT NOT NULL,
        idempotency_key TEXT,         -- NULL when it is the id (the usual case)
        key TEXT,                     -- throttle key
        call TEXT NOT NULL,           -- JSON (offload._serial.dump_call)
        retry TEXT,                   -- JSON RetryPolicy, or NULL for the consumer's
        due REAL NOT NULL,            -- epoch seconds
        owner TEXT,                   -- host:pid:token while leased
        lease_until REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        first_attempt_at REAL,
        last_attempt_at REAL
    )""",
    # Only waiting rows are indexed: an enqueue that leases its task at once (the usual
    # case) writes the table and nothing else.
    "CREATE INDEX IF NOT EXISTS tasks_waiting ON tasks (due) WHERE owner IS NULL",
    # Settling a task finds it by id. (It would also make a journal line copied twice a
    # no-op while its task is there; the recorded offsets keep that from happening at all.)
    "CREATE UNIQUE INDEX IF NOT EXISTS tasks_id ON tasks (id)",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        task_id TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        description TEXT NOT NULL,
        key TEXT,
        attempts INTEGER NOT NULL,
        error TEXT NOT NULL,
        status INTEGER,
        reason TEXT NOT NULL,
        first_attempt_at REAL,
        last_attempt_at REAL,
        buried_at REAL NOT NULL,
        call TEXT NOT NULL,           -- as the task stored it, for replay
        retry TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS journals (
        name TEXT PRIMARY KEY,        -- a file in the journal directory
        copied INTEGER NOT NULL       -- bytes of it copied into tasks
    )""",
    # store_id: random, made with the file; a journal names the store it was written for.
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

_PUT = (
    "INSERT INTO tasks (id, idempotency_key, key, call, retry, due, owner, lease_until) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_TASK_COLUMNS = (
    "seq, id, idempotency_key, key, call, retry, attempts, failures, "
    "first_attempt_at, last_attempt_at"
)
_LETTER_FIELDS = (
    "id",
    "task_id",
    "description",
    "key",
    "attempts",
    "error",
    "status",
    "reason",
    "first_attempt_at",
    "last_attempt_at",
)
_LETTER_COLUMNS = ", ".join(_LETTER_FIELDS)
_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL", "extra": "EXTRA"}

# Sweeping leases (expired ones, and those of dead processes) reads every leased row, so
# it runs at most this often per store object; the first claim or next_due runs it at once.
_SWEEP_EVERY = 2.0

# With synchronous=NORMAL the only fsyncs are a checkpoint's (the log copied back into the
# database file), run inside the commit that fills the log to this many pages: SQLite's
# default of 1,000 would put one in every few hundred enqueues (a task writes a page or
# two); 10,000 pages (about 40 MB of log, reused after each checkpoint) makes them ten
# times rarer, at the same cost each.
_AUTOCHECKPOINT_PAGES = 10_000

# Connections inherited over fork(): never used again and never closed, since closing a
# connection in the child can disturb the parent's locks (as the SQLite docs warn).
_orphans: list[sqlite3.Connection] = []

# Every store object, so that a forked child lets go of its parent's journal files at once
# (it holds their locks otherwise, which would keep them from being taken over if the parent
# died). A child that forks without running the hooks (uWSGI) does it on first use.
_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


def _forget_inherited_journals() -> None:
    for fd in list(_transient_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _transient_fds.clear()
    for store in list(_stores):
        journal = store._journal
        if journal is not None:
            journal.forget_inherited()


# One lock per process for noticing a fork lazily, so that two threads of a child (forked
# without the hooks) never both start over, each with its own connection and journal.
_fork_locks: dict[int, threading.Lock] = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_journals)


# -- the intake journal --------------------------------------------------------------------
#
# An enqueue appends one line to this process's journal file (in `<database>-journals/`)
# instead of writing the database: one write() into the page cache, the same durability
# as a WAL commit with synchronous=NORMAL (a killed process loses nothing; a power cut
# may lose the last writes), at a fraction of the cost. The lines are copied into the
# tasks table in batches by whichever process next reads tasks (a claim, a completion,
# counts), journaling or not: any process may copy any journal, since the bytes copied so
# far are recorded, per file, in the same transaction as the rows (table `journals`), so
# each line is copied exactly once. A journal's process holds an exclusive flock() on it
# while it writes it; a file whose lock can be taken (its process is gone, or moved on to a
# new file) and that is copied to the end is deleted, in a transaction of its own after
# the copy, committed with an fsync so that the copied rows outlive a power cut as the file
# would have.
#
# A file begins with a line naming the database it is for (its store id). A task's line: the
# JSON list [id, idempotency key or null, key or null, due, owner or null, lease seconds or
# null, retry policy text or null], a tab, and the call's JSON text (which, made by
# json.dumps, holds no raw newline). A task that its own process performs and completes
# before its line is copied is marked done by a later line of the same file, {"done": id}:
# one write() instead of a row inserted and deleted. A copy that meets both inserts
# nothing; one that meets the mark alone deletes the row an earlier copy made. (The mark
# goes to the file that holds the task's line, after it, so it is never copied first.)

_JOURNAL_SUFFIX = ".journal"
# A journal file is left for a new one once it holds this many bytes (a few thousand tasks).
_JOURNAL_ROTATE = 1 << 20
# At most this many bytes of journal are copied in one transaction, so that a backlog (a
# worker that was down) never holds the write lock for long; the next reader goes on.
_COPY_BUDGET = 4 << 20
_JOURNAL_INSERT = (
    "INSERT OR IGNORE INTO tasks (id, idempotency_key, key, call, retry, due, owner, "
    "lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

# Descriptors that a forked child must not keep (it would hold their flock() for its whole
# life): journals being made, and files locked to be deleted. Closed in the child.
_transient_fds: set[int] = set()


class _Journal:
    """The journal file this process appends to (see above), under its own lock so that an
    enqueue never waits for a transaction."""

    def __init__(self, directory: str, header: bytes) -> None:
        self.directory = directory
        self.header = header  # the first line of each file: which store it is for
        self.lock = threading.Lock()
        self.fd = -1
        self.name = ""  # the file appended to now
        self.size = 0  # bytes appended to it
        self.copied = 0  # bytes of it known to be in the tasks table
        self.retired: list[str] = []  # earlier files of ours, perhaps not all copied
        self._prefix = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._serial = 0

    def behind(self) -> bool:
        """True when some line of ours may not be in the tasks table yet."""
        return self.size > self.copied or bool(self.retired)

    def append(self, data: bytes, *, only_to: str | None = None) -> str:
        """Append one whole line; returns the name of the file it went to. With `only_to`,
        only to that file: "" (and nothing written) if it is no longer the current one."""
        with self.lock:
            if only_to is not None:
                if only_to != self.name or self.fd < 0:
                    return ""
            elif self.fd < 0 or self.size >= _JOURNAL_ROTATE:
                self._open()  # never for `only_to`: that line must follow the others
            try:
                written = os.write(self.fd, data)
                while written < len(data):  # rare for a regular file: a signal, a full disk
                    written += os.write(self.fd, data[written:])
                self.size += len(data)
            except BaseException:
                # The enqueue fails: leave no part of its line behind (a torn line would
                # swallow the next one), and go on in a new file.
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self.size)
                self._retire()
                raise
            return self.name

    def _open(self) -> None:
        self._retire()
        # Others' files that are gone were copied and deleted: no need to remember them.
        self.retired = [n for n in self.retired if os.path.exists(os.path.join(self.directory, n))]
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._serial += 1
        name = f"{self._prefix}{self._serial}{_JOURNAL_SUFFIX}"
        # Made, headed and locked under another name, then renamed: no other process ever
        # sees it unlocked (which would let it delete the file) or without its header.
        temporary = os.path.join(self.directory, f".{name}.new")
        fd = os.open(
            temporary, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        _transient_fds.add(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.write(fd, self.header) != len(self.header):
                raise OSError(f"cannot write the header of journal {name}")
            os.rename(temporary, os.path.join(self.directory, name))
        except BaseException:
            _transient_fds.discard(fd)
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self.fd, self.name, self.size, self.copied = fd, name, len(self.header), 0
        _transient_fds.discard(fd)

    def _retire(self) -> None:
        """Stop appending to the current file; unlocked, it is deleted once copied."""
        fd = self.fd
        if fd >= 0:
            self.retired.append(self.name)
            self.fd, self.name, self.size, self.copied = -1, "", 0, 0
            os.close(fd)

    def close(self) -> None:
        with self.lock:
            self._retire()

    def forget_inherited(self) -> None:
        """In a forked child: drop the parent's file descriptor (the parent keeps its lock)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


# 2: done marks. A version it does not know, a reader leaves alone (as another database's).
_JOURNAL_VERSION = 2


def _journal_header(store_id: str) -> bytes:
    header = {"offload_journal": _JOURNAL_VERSION, "store": store_id}
    return json.dumps(header).encode() + b"\n"


def _done_line(task_id: str, owner: str) -> bytes:
    return f'{{"done":{_quote(task_id)},"owner":{_quote(owner)}}}\n'.encode()


def _journal_store(line: bytes) -> str | None:
    """The store id a journal's first line names; None if it is no journal header."""
    try:
        header = json.loads(line)
    except ValueError:
        return None
    if isinstance(header, dict) and header.get("offload_journal") in (1, _JOURNAL_VERSION):
        store = header.get("store")
        return store if isinstance(store, str) else None
    return None


def _text_or_none(value: Any) -> bool:
    return value is None or type(value) is str


def _finite(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _journal_lines(data: bytes, source: str) -> tuple[list[tuple[Any, ...]], dict[str, str]]:
    """The task rows of whole journal lines, and the ids marked done with the owner that
    marked them; a line that cannot be read is logged and left."""
    rows = []
    done: dict[str, str] = {}
    for line in data.split(b"\n")[:-1]:  # `data` ends with one
        head, tab, call = line.partition(b"\t")
        try:
            fields = json.loads(head)
            if not tab and isinstance(fields, dict) and "done" in fields:
                task_id, owner = fields.get("done"), fields.get("owner")
                if type(task_id) is not str or type(owner) is not str:
                    raise ValueError("a done mark of the wrong shape")
                done[task_id] = owner
                continue
            if not tab or not isinstance(fields, list) or len(fields) != 7:
                raise ValueError("not a journal line")
            task_id, idempotency_key, key, due, owner, lease, retry = fields
            if not (
                type(task_id) is str
                and all(map(_text_or_none, (idempotency_key, key, owner, retry)))
                and _finite(due)
                and (lease is None or _finite(lease))
            ):
                raise ValueError("a field of the wrong type")
            until = None if lease is None else due + lease
            rows.append((task_id, idempotency_key, key, call.decode(), retry, due, owner, until))
        except (ValueError, UnicodeDecodeError) as exc:
            log.error("offload: left an unreadable line in journal %s: %s", source, exc)
    return rows, done


def parse_sqlite_url(url: str) -> tuple[str, dict[str, str]]:
    """(path, options) of `sqlite:///relative.db` or `sqlite:////absolute.db?opt=value`;
    ValueError for anything else (no host part, no in-memory database)."""
    if not url.lower().startswith("sqlite://"):
        raise ValueError(f"store: not a sqlite:// URL: {url!r}")
    rest = url[len("sqlite://") :]
    rest, _, query = rest.partition("?")
    if not rest.startswith("/"):
        raise ValueError(
            f"store: {url!r} has a host part; use sqlite:///relative.db or sqlite:////absolute.db"
        )
    path = unquote(rest[1:])
    if not path or path == ":memory:" or path.endswith("/"):
        raise ValueError(
            f"store: {url!r} names no database file (an in-memory database would not be durable)"
        )
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if name in options:
            raise ValueError(f"store: {url!r} gives {name} twice")
        options[name] = value
    return path, options


class SQLiteStore:
    """A durable store in one SQLite file (see the module docstring)."""

    durable = True
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
        if mode not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}"
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
        #: Where enqueues append (see _Journal); none with synchronous=full, where every
        #: enqueue is its own fsync'd commit, nor where there is no flock() (Windows).
        self.journal_dir = f"{path}-journals"
        self._journaled = mode == "normal" and fcntl is not None
        # Copying and deleting journals is every process's work, journaling or not.
        self._copies = fcntl is not None
        self._store_id = ""  # read from the file when it is opened
        self._strays: set[str] = set()  # journal files of another database, left alone
        self._troubled: set[str] = set()  # journal files that could not be read (logged)
        self._init_process_state()
        _stores.add(self)

    @classmethod
    def from_url(
        cls, url: str, *, lease_timeout: float | None = None, clock: Clock | None = None
    ) -> SQLiteStore:
        """The store a `sqlite://` URL names; options `synchronous` (normal, full),
        `lease_timeout` and `busy_timeout` (seconds). The file is opened on first use."""
        path, options = parse_sqlite_url(url)
        kwargs: dict[str, Any] = {}
        for name, value in options.items():
            if name == "synchronous":
                if value.lower() not in _SYNCHRONOUS:
                    raise ValueError(
                        f"store: synchronous={value!r} in {url!r}; expected normal or full"
                    )
                kwargs["synchronous"] = value.lower()
            elif name in ("lease_timeout", "busy_timeout"):
                kwargs[name] = number_option(
                    "sqlite", name, value, minimum=0, above=name == "lease_timeout"
                )
            else:
                raise ValueError(
                    f"store: unknown option {name!r} in {url!r} "
                    "(expected synchronous, lease_timeout or busy_timeout)"
                )
        if "lease_timeout" not in kwargs:
            kwargs["lease_timeout"] = (
                lease_timeout if lease_timeout is not None else lease_timeout_from_env()
            )
        return cls(path, clock=clock, url=url, **kwargs)

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._owner = new_owner()
        self._lease_text = f"{_quote(self._owner)},{self.lease_timeout!r}"  # for journal lines
        self._cursor: sqlite3.Cursor | None = None
        self._opened = False  # the file was opened and checked in this process
        self._journal: _Journal | None = None  # made at the first enqueue (journaled)
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

    # -- connection -----------------------------------------------------------------------

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
            conn = self._connection = self._connect()
            self._cursor = conn.cursor()
        return conn

    def _make_private(self, path: str) -> bool:
        """Tighten an existing store file of ours that others can read (one made by `touch`
        under the usual umask): it holds request headers, tokens among them. True if it
        was loose."""
        try:
            info = os.stat(path)
        except OSError:
            return False  # no -wal or -shm file (yet)
        loose = stat.S_IMODE(info.st_mode) & 0o077
        getuid = getattr(os, "getuid", None)  # POSIX only; Windows has no such bits
        if not loose or getuid is None or info.st_uid != getuid():
            return False  # private already, or another user's file: theirs to set
        try:
            os.chmod(path, stat.S_IMODE(info.st_mode) & 0o700)
        except OSError as exc:
            log.warning("offload: %s is readable by other users: %s", self.url, exc)
        return True

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        if not os.path.exists(path):
            # Made here, not by SQLite, so that it is private from the start: SQLite gives
            # the -wal and -shm files the database file's permissions.
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process made it meanwhile
            except OSError as exc:
                raise StoreError(f"{self.url}: cannot create the store file: {exc}") from None
            else:
                os.close(fd)
        try:
            conn = sqlite3.connect(
                path,
                timeout=self.busy_timeout,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,  # shared by this process's threads, under _lock
                cached_statements=64,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.url}: cannot open: {exc}") from None
        try:
            mode = self._switch_to_wal(conn)
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.url}: cannot switch to WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.synchronous]}")
            conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            self._ensure_schema(conn)
            row = conn.execute("SELECT value FROM meta WHERE name = 'store_id'").fetchone()
            if row is None:
                raise StoreError(f"{self.url}: not a usable offload store: it has no store id")
            self._store_id = str(row[0])
            # Only now, known to be a store: never touch the mode of a file that is not.
            loose = [
                self._make_private(name)
                for name in (path, f"{path}-wal", f"{path}-shm", self.journal_dir)
            ]
            if any(loose):
                log.warning("offload: %s was readable by other users; made it private", self.url)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"{self.url}: not a usable offload store: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _switch_to_wal(self, conn: sqlite3.Connection) -> Any:
        """Put the file in WAL mode (which it keeps); returns the mode it is in. Switching a
        new file takes an exclusive lock without SQLite's busy handler, so processes that
        open a new store at once (gunicorn workers starting) retry, up to busy_timeout."""
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.001
        while True:
            try:
                return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)  # the busy handler's way too: nothing to wait on across processes
            pause = min(pause * 2, 0.05)

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == _SCHEMA_VERSION:
            return
        if version > _SCHEMA_VERSION:
            raise StoreError(
                f"{self.url}: written by a newer offload (store format {version}); upgrade offload"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                others = {
                    row[0]
                    for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                } - {"tasks", "dead_letters", "journals", "meta"}
                if others:
                    raise StoreError(
                        f"{self.url}: not an offload store (it has tables {sorted(others)})"
                    )
            if version < _SCHEMA_VERSION:  # new, or format 1: every statement is IF NOT EXISTS
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES ('store_id', ?)",
                    (secrets.token_hex(8),),
                )
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _use(self, what: str) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; SQLite errors become StoreError naming `what`."""
        self._check_pid()
        with self._lock:
            try:
                yield self._conn()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.url}: {what} failed: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        # IMMEDIATE takes the write lock first, so that two processes never both read,
        # then both fail to upgrade to writing.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close this process's connection; a later use opens a new one."""
        if self._pid != os.getpid():
            self._check_pid()
            return
        with self._lock:
            journal = self._journal
            if journal is not None and (journal.fd >= 0 or journal.retired):
                # Copy this process's lines while it can, so that its files can go; those
                # left are copied and deleted by the next process that reads tasks.
                journal.close()
                mine = list(journal.retired)
                try:
                    db = self._conn()
                    self._copy_journals(db, everyone=False)
                    self._delete_journals(db, mine)
                except (sqlite3.Error, StoreError, OSError) as exc:
                    log.warning("offload: %s: journal left for the next process: %s", self.url, exc)
            conn, self._connection, self._cursor = self._connection, None, None
            if conn is not None:
                conn.close()

    # -- the journal ----------------------------------------------------------------------

    def _journal_names(self) -> list[str]:
        """The journal files there are, but those of another database."""
        try:
            names = os.listdir(self.journal_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            self._file_trouble(self.journal_dir, exc)
            return []
        return [n for n in names if n.endswith(_JOURNAL_SUFFIX) and n not in self._strays]

    def _file_trouble(self, name: str, exc: OSError) -> None:
        """A journal file (or the directory) that cannot be read: logged once, left out,
        so that one bad file never stops the others from being copied."""
        if name not in self._troubled:
            self._troubled.add(name)
            log.error("offload: %s: journal %s cannot be read; left out: %s", self.url, name, exc)

    def _copy_journals(self, conn: sqlite3.Connection, *, everyone: bool) -> None:
        """Copy journal lines not yet in the tasks table into it: every process's
        (`everyone`), or only this store's own, so that its tasks have rows. With the lock
        held, outside a transaction; takes the write lock only when a file has grown."""
        if not self._copies:
            return
        journal = self._journal
        if not everyone and (journal is None or not journal.behind()):
            return
        current, retired = "", []
        if journal is not None:
            with journal.lock:
                current, retired = journal.name, list(journal.retired)
        if everyone:
            names = self._journal_names()
        else:
            names = [n for n in (current, *retired) if n and n not in self._strays]
        sizes: dict[str, int] = {}
        for name in names:
            try:
                sizes[name] = os.stat(os.path.join(self.journal_dir, name)).st_size
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._file_trouble(name, exc)
        copied = dict(conn.execute("SELECT name, copied FROM journals").fetchall())
        behind = [name for name, size in sizes.items() if size > copied.get(name, 0)]
        stale = [name for name in copied if name not in sizes] if everyone else []
        if behind or stale:
            with self._transaction(conn):
                # Read again under the write lock: another process may have copied meanwhile.
                copied = dict(conn.execute("SELECT name, copied FROM journals").fetchall())
                budget = _COPY_BUDGET
                for name in behind:
                    if budget <= 0:
                        break  # the rest in the next transaction: the write lock is shared
                    start = copied.get(name, 0)
                    copied[name] = self._copy_journal(conn, name, start, budget)
                    budget -= copied[name] - start
                gone = [n for n in stale if not os.path.exists(os.path.join(self.journal_dir, n))]
                if gone:
                    conn.execute(
                        "DELETE FROM journals WHERE name IN (SELECT value FROM json_each(?))",
                        (json_list(gone),),
                    )
        if journal is None:
            return
        with journal.lock:
            if journal.name == current and current in copied:
                journal.copied = max(journal.copied, copied[current])
            # A retired file is never written again: copied up to its size, it is done.
            done = [n for n in retired if n not in sizes or copied.get(n, 0) >= sizes[n]]
            journal.retired = [n for n in journal.retired if n not in done]
        if done:
            self._delete_journals(conn, done)

    def _copy_journal(self, conn: sqlite3.Connection, name: str, start: int, most: int) -> int:
        """Copy the whole lines of journal `name` from byte `start`, about `most` bytes of
        them (in the caller's transaction); returns how far it is copied."""
        try:
            with open(os.path.join(self.journal_dir, name), "rb") as file:
                file.seek(start)
                data = file.read(most)
                if not data.endswith(b"\n"):
                    data += file.readline()  # to the end of the line cut in two
        except FileNotFoundError:
            return start
        except OSError as exc:
            self._file_trouble(name, exc)
            return start
        end = data.rfind(b"\n") + 1
        if not end:
            return start
        lines = data[:end]
        if start == 0:
            first, _, lines = lines.partition(b"\n")
            if _journal_store(first) != self._store_id:
                # Left behind by a database that was deleted and made anew, say: its lines
                # are not this store's tasks (some may have been delivered long ago).
                self._strays.add(name)
                log.warning(
                    "offload: %s: journal %s was not written for this database; left alone",
                    self.url,
                    name,
                )
                return start
        rows, done = _journal_lines(lines, name)
        if done:
            new = {row[0] for row in rows}
            rows = [row for row in rows if row[0] not in done]
            # Lines copied earlier, by any process: delete their rows, but only while the
            # marking process still holds them (a task taken back after its lease lapsed,
            # dead-lettered and replayed is another delivery's now).
            conn.executemany(
                "DELETE FROM tasks WHERE id = ? AND owner = ?",
                [(task_id, owner) for task_id, owner in done.items() if task_id not in new],
            )
        conn.executemany(_JOURNAL_INSERT, rows)
        conn.execute(
            "INSERT OR REPLACE INTO journals (name, copied) VALUES (?, ?)", (name, start + end)
        )
        return start + end

    def _delete_journals(self, conn: sqlite3.Connection, names: list[str]) -> None:
        """Delete the journal files among `names` that are copied to the end and that no
        process writes (their lock can be taken: the writer is gone or moved on)."""
        held: list[tuple[str, int]] = []
        try:
            for name in names:
                try:
                    fd = os.open(os.path.join(self.journal_dir, name), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self._file_trouble(name, exc)
                    continue
                _transient_fds.add(fd)
                held.append((name, fd))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    held.pop()  # its process is writing it
                    _transient_fds.discard(fd)
                    os.close(fd)
            if not held:
                return
            # The copied rows must outlive a power cut as the file would have: this commit
            # fsyncs the log, and with it every commit before it.
            if self.synchronous == "normal":
                conn.execute("PRAGMA synchronous=FULL")
            with self._transaction(conn):
                # Under the write lock, so that no copy reads a file between its deletion
                # and its row's: a copy that found no row would take the file from the start.
                copied = dict(conn.execute("SELECT name, copied FROM journals").fetchall())
                for name, fd in held:
                    done = copied.get(name, 0)
                    try:
                        rest = os.pread(fd, max(0, os.fstat(fd).st_size - done), done)
                    except OSError as exc:
                        self._file_trouble(name, exc)
                        continue
                    if b"\n" in rest:
                        continue  # whole lines not copied yet: the next copy takes them
                    if rest:
                        log.warning(
                            "offload: journal %s ends in an incomplete line (%d bytes: a write "
                            "that failed, or a process that died in it, before its enqueue "
                            "returned); dropped",
                            name,
                            len(rest),
                        )
                    os.unlink(os.path.join(self.journal_dir, name))
                    conn.execute("DELETE FROM journals WHERE name = ?", (name,))
        finally:
            if held and self.synchronous == "normal":
                conn.execute("PRAGMA synchronous=NORMAL")
            for _, fd in held:
                _transient_fds.discard(fd)
                os.close(fd)

    def _delete_leftovers(self) -> None:
        """Remove journals that a process killed while making them left half-made."""
        try:
            names = os.listdir(self.journal_dir)
        except OSError:
            return
        for name in names:
            if name.startswith(".") and name.endswith(_JOURNAL_SUFFIX + ".new"):
                pid = name[1:].partition("-")[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.journal_dir, name))

    # -- tasks ----------------------------------------------------------------------------

    def put(self, task: Task, *, lease: bool) -> None:
        """Write a new task before returning: one line appended to this process's journal
        (one write(), no fsync), or with synchronous=full one fsync'd INSERT. The enqueue
        path: kept short on purpose."""
        record = TaskRecord.of(task)  # NotSerializable before touching the file
        call, retry = record.call, record.retry
        now = self._clock.time()
        if self._pid != os.getpid():
            self._check_pid()
        if not self._opened:
            with self._use("opening the store"):  # errors in the file surface here
                if self._journaled and self._journal is None:
                    self._journal = _Journal(self.journal_dir, _journal_header(self._store_id))
                self._opened = True  # last: a thread that sees it sees the journal
        task_id = record.id
        idempotency_key = record.idempotency_key
        key = record.key
        journal = self._journal
        if journal is not None and "\n" not in call:
            # The line's head written out rather than by json.dumps: half the cost, and
            # every string in it still goes through JSON's own quoting.
            head = (
                f"[{_quote(task_id)},"
                f"{'null' if idempotency_key == task_id else _quote(idempotency_key)},"
                f"{'null' if key is None else _quote(key)},"
                f"{now!r},{self._lease_text if lease else 'null,null'},"
                f"{'null' if retry is None else _quote(retry)}]"
            )
            try:
                name = journal.append(f"{head}\t{call}\n".encode())
            except OSError as exc:
                raise StoreError(f"{self.url}: enqueue failed: {exc}") from exc
            if lease:
                self._journaled_here[task_id] = name
            return
        owner, until = (self._owner, now + self.lease_timeout) if lease else (None, None)
        stored_key = None if idempotency_key == task_id else idempotency_key
        row = (task_id, stored_key, key, call, retry, now, owner, until)
        with self._lock:
            try:
                cursor = self._cursor
                if cursor is None:
                    self._conn()
                    cursor = self._cursor
                    assert cursor is not None
                cursor.execute(_PUT, row)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.url}: enqueue failed: {exc}") from exc

    def claim(self, limit: int, *, exclude_keys: Mapping[str, float] = NO_KEYS) -> list[Task]:
        """Lease up to `limit` due tasks, oldest due first, skipping `exclude_keys`."""
        if limit <= 0:
            return []
        now = self._clock.time()
        with self._use("claim") as conn:
            self._copy_journals(conn, everyone=True)
            if now >= self._next_sweep:
                self._sweep(conn, now)
            # A read first: polling an empty store must not take the write lock.
            if (
                conn.execute(
                    "SELECT 1 FROM tasks WHERE owner IS NULL AND due <= ? LIMIT 1", (now,)
                ).fetchone()
                is None
            ):
                return []
            select = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE owner IS NULL AND due <= ?"
            params: list[Any] = [now]
            if exclude_keys:
                select += " AND (key IS NULL OR key NOT IN (SELECT value FROM json_each(?)))"
                params.append(json_list(exclude_keys))
            select += " ORDER BY due, seq LIMIT ?"
            params.append(limit)
            with self._transaction(conn):
                rows = conn.execute(select, params).fetchall()
                if rows:
                    conn.execute(
                        "UPDATE tasks SET owner = ?, lease_until = ? "
                        "WHERE seq IN (SELECT value FROM json_each(?))",
                        (self._owner, now + self.lease_timeout, json_list(r[0] for r in rows)),
                    )
            return [_task_from_row(row) for row in rows]

    def _sweep(self, conn: sqlite3.Connection, now: float) -> None:
        """Take back expired leases, and at once those of dead processes of this host;
        delete the journal files that are done with."""
        self._next_sweep = now + min(_SWEEP_EVERY, self.lease_timeout / 4)
        if self._copies:
            self._delete_journals(conn, self._journal_names())
            self._delete_leftovers()
        host = socket.gethostname()
        expired: list[str] = []
        dead: list[str] = []
        for owner, until in conn.execute(
            "SELECT owner, MIN(lease_until) FROM tasks WHERE owner IS NOT NULL GROUP BY owner"
        ).fetchall():
            if owner != self._owner and owner_dead(owner, host):
                dead.append(owner)
            elif until is None or until <= now:
                expired.append(owner)
        if not (dead or expired):
            return
        taken = 0
        with self._transaction(conn):
            for owner in dead:
                taken += conn.execute(
                    "UPDATE tasks SET owner = NULL, lease_until = NULL WHERE owner = ?", (owner,)
                ).rowcount
            for owner in expired:
                taken += conn.execute(
                    "UPDATE tasks SET owner = NULL, lease_until = NULL "
                    "WHERE owner = ? AND (lease_until IS NULL OR lease_until <= ?)",
                    (owner, now),
                ).rowcount
        if taken:
            log.info(
                "offload: took back %d task(s) from %s",
                taken,
                ", ".join(
                    [f"{o} (process gone)" for o in dead]
                    + [f"{o} (lease expired)" for o in expired]
                ),
            )

    def renew(self, tasks: Sequence[Task]) -> None:
        """Extend the leases of `tasks` (one UPDATE)."""
        if not tasks:
            return
        ids = json_list(t.id for t in tasks)
        with self._use("renewing leases") as conn:
            self._copy_journals(conn, everyone=False)
            renewed = conn.execute(
                "UPDATE tasks SET lease_until = ? "
                "WHERE owner = ? AND id IN (SELECT value FROM json_each(?))",
                (self._clock.time() + self.lease_timeout, self._owner, ids),
            ).rowcount
            # Lost: still there, but no longer ours. (One settled meanwhile is simply gone.)
            lost = 0
            if renewed < len(tasks):
                lost = conn.execute(
                    "SELECT COUNT(*) FROM tasks WHERE id IN (SELECT value FROM json_each(?)) "
                    "AND (owner IS NULL OR owner != ?)",
                    (ids, self._owner),
                ).fetchone()[0]
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
            conn.execute(
                "UPDATE tasks SET owner = NULL, lease_until = NULL, due = ?, attempts = ?, "
                "failures = ?, first_attempt_at = ?, last_attempt_at = ? "
                "WHERE id = ? AND owner = ?",
                (due, *attempt_state(task), task.id, self._owner),
            )

    def complete(self, task: Task) -> None:
        """Delete a delivered task (whoever holds it now: it was delivered). One that this
        process journaled and leased is marked done in the same journal file instead."""
        name = self._journaled_here.pop(task.id, None)
        journal = self._journal
        if name and journal is not None and self._pid == os.getpid():
            try:
                if journal.append(_done_line(task.id, self._owner), only_to=name):
                    return
            except OSError as exc:
                log.warning("offload: %s: marking a task done in its journal: %s", self.url, exc)
        with self._use("completing a task") as conn:
            self._copy_journals(conn, everyone=False)
            conn.execute("DELETE FROM tasks WHERE id = ?", (task.id,))

    def next_due(self) -> float | None:
        """When the earliest claimable task is due (after sweeping dead leases); None if none."""
        now = self._clock.time()
        with self._use("reading the next due time") as conn:
            self._copy_journals(conn, everyone=True)
            if now >= self._next_sweep:
                self._sweep(conn, now)
            due = conn.execute("SELECT MIN(due) FROM tasks WHERE owner IS NULL").fetchone()[0]
        return None if due is None else float(due)

    def counts(self) -> StoreCounts:
        """Tasks ready, delayed and leased (by anyone), and dead letters, now."""
        now = self._clock.time()
        with self._use("counting") as conn:
            self._copy_journals(conn, everyone=True)
            ready, delayed, leased = conn.execute(
                "SELECT COALESCE(SUM(owner IS NULL AND due <= :now), 0), "
                "COALESCE(SUM(owner IS NULL AND due > :now), 0), "
                "COALESCE(SUM(owner IS NOT NULL), 0) FROM tasks",
                {"now": now},
            ).fetchone()
            letters = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        return StoreCounts(ready=ready, delayed=delayed, leased=leased, dead_letters=letters)

    # -- dead letters ---------------------------------------------------------------------

    def bury(self, task: Task, letter: DeadLetter) -> None:
        """Keep `letter` with the task's stored call, and delete the task, in one transaction."""
        self._journaled_here.pop(task.id, None)
        first = epoch(letter.first_attempt_at)
        last = epoch(letter.last_attempt_at)
        values = (
            letter.id,
            letter.task_id,
            task.idempotency_key,
            letter.description,
            letter.key,
            letter.attempts,
            letter.error,
            letter.status,
            letter.reason,
            first,
            last,
            self._clock.time(),
        )
        insert = (
            "INSERT INTO dead_letters (id, task_id, idempotency_key, description, key, "
            "attempts, error, status, reason, first_attempt_at, last_attempt_at, buried_at, "
            "call, retry) "
        )
        with self._use("storing a dead letter") as conn:
            self._copy_journals(conn, everyone=False)
            with self._transaction(conn):
                copied = conn.execute(
                    insert + "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, call, retry "
                    "FROM tasks WHERE id = ? LIMIT 1",
                    (*values, task.id),
                ).rowcount
                if not copied:  # the row is gone (a lease lost): store the call from memory
                    record = TaskRecord.of(task)
                    conn.execute(
                        insert + "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*values, record.call, record.retry),
                    )
                conn.execute("DELETE FROM tasks WHERE id = ?", (task.id,))

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        with self._use("listing dead letters") as conn:
            rows = conn.execute(
                f"SELECT {_LETTER_COLUMNS} FROM dead_letters ORDER BY seq"
            ).fetchall()
        return [self._letter(row) for row in rows]

    def dead_letter(self, dead_letter_id: str) -> DeadLetter:
        """One dead letter by id; UnknownDeadLetter if none has it."""
        with self._use("reading a dead letter") as conn:
            row = conn.execute(
                f"SELECT {_LETTER_COLUMNS} FROM dead_letters WHERE id = ?", (dead_letter_id,)
            ).fetchone()
        if row is None:
            raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
        return self._letter(row)

    def _letter(self, row: tuple[Any, ...]) -> DeadLetter:
        try:
            return DeadLetter.from_json(dict(zip(_LETTER_FIELDS, row, strict=True)))
        except ValueError as exc:
            raise StoreError(f"{self.url}: dead letter {row[0]!r} is unreadable: {exc}") from None

    def __len__(self) -> int:
        with self._use("counting dead letters") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    def revive(self, dead_letter_id: str) -> Task:
        """Remove a dead letter and return its task (fresh attempt budget, same ids).

        StoreError, and the dead letter kept, when its task cannot be loaded in this
        process (a function it cannot import). Prefer `replay`, which moves the task back
        into the queue in the same transaction.
        """
        with self._use("reviving a dead letter") as conn, self._transaction(conn):
            task = TaskRecord(*_stored_letter(conn, dead_letter_id)).load()
            if isinstance(task.call, Unreadable):
                raise StoreError(
                    f"dead letter {dead_letter_id} cannot be revived here: {task.call.error}"
                )
            conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
        return task

    def replay(self, dead_letter_id: str) -> Task:
        """Move a dead letter's task back to the queue, due now, with a fresh attempt budget
        (same id and idempotency key), in one transaction; return the task.

        The task is not loaded to do so: a process that cannot import its function (the
        `offload` command, say) can replay it for the workers that can."""
        with self._use("replaying a dead letter") as conn, self._transaction(conn):
            task_id, idempotency_key, key, call, retry = _stored_letter(conn, dead_letter_id)
            conn.execute(
                _PUT,
                (
                    task_id,
                    None if idempotency_key == task_id else idempotency_key,
                    key,
                    call,
                    retry,
                    self._clock.time(),
                    None,
                    None,
                ),
            )
            conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
        # The task is only a handle here; this process may not even be able to import it.
        return TaskRecord(task_id, idempotency_key, key, call, retry).load()

    def discard(self, dead_letter_id: str) -> None:
        """Delete one dead letter; UnknownDeadLetter if none has that id."""
        with self._use("discarding a dead letter") as conn:
            deleted = conn.execute(
                "DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,)
            ).rowcount
        if not deleted:
            raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")

    def purge(self) -> int:
        """Delete every dead letter; returns how many there were."""
        with self._use("purging dead letters") as conn:
            return int(conn.execute("DELETE FROM dead_letters").rowcount)

    def __repr__(self) -> str:
        return (
            f"SQLiteStore({self.path!r}, synchronous={self.synchronous!r}, "
            f"lease_timeout={self.lease_timeout:g})"
        )


def _stored_letter(conn: sqlite3.Connection, dead_letter_id: str) -> tuple[Any, ...]:
    """(task id, idempotency key, key, call, retry) as a dead letter keeps its task;
    UnknownDeadLetter if none has that id."""
    row = conn.execute(
        "SELECT task_id, idempotency_key, key, call, retry FROM dead_letters WHERE id = ?",
        (dead_letter_id,),
    ).fetchone()
    if row is None:
        raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
    return tuple(row)


def _task_from_row(row: tuple[Any, ...]) -> Task:
    _, task_id, idempotency_key, key, call, retry, attempts, failures, first, last = row
    return TaskRecord(
        task_id,
        task_id if idempotency_key is None else idempotency_key,
        key,
        call,
        retry,
        attempts,
        failures,
        first,
        last,
    ).load()
