"""The SQLite store's file: its tables, the statements more than one module runs, opening
a connection, and the `sqlite://` URL.

Opening a file puts it in WAL mode (which it keeps), sets the connection's `synchronous`
and checkpoint size, makes or upgrades the schema (a file that holds other tables is
refused, never touched), reads the store id, and makes the files private: they hold
request headers, tokens among them. A new file is made 0600 before SQLite opens it, so
that the -wal and -shm files SQLite makes next to it are private from the start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote

from ...errors import StoreError
from .._shared import LETTER_FIELDS, number_option

__all__ = [
    "LETTER_COLUMNS",
    "MIGRATIONS",
    "PUT",
    "PUT_UNIQUE",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SYNCHRONOUS",
    "TASK_COLUMNS",
    "connect",
    "parse_sqlite_url",
    "store_options",
    "transaction",
]

log = logging.getLogger("offload")

# 2: the journals and meta tables, the index on tasks.id; 3: dedup; 4: dead-letter indexes;
# 5: rate budgets; 6: the index of dedup keys with a window; 7: concurrency slots
SCHEMA_VERSION = 7
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tasks (
        seq INTEGER PRIMARY KEY,      -- insertion order, and the handle of a leased row
        id TEXT NOT NULL,
        idempotency_key TEXT,         -- NULL when it is the id (the usual case)
        key TEXT,                     -- throttle key
        call TEXT NOT NULL,           -- JSON (codec.task.TaskRecord)
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

# Statements that take a file from the format before to theirs, in the transaction that
# sets user_version ("ADD COLUMN" ones are skipped where the column is there already).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    3: (
        # Dedup keys: held in `dedup` while their task lives, and `until` a time after it
        # ended (its window); the task rows carry them, so any process that settles one
        # can let its key go.
        "ALTER TABLE tasks ADD COLUMN dedup_key TEXT",
        "ALTER TABLE tasks ADD COLUMN dedup_window REAL NOT NULL DEFAULT 0",
        "ALTER TABLE dead_letters ADD COLUMN dedup_key TEXT",
        "ALTER TABLE dead_letters ADD COLUMN dedup_window REAL NOT NULL DEFAULT 0",
        """CREATE TABLE IF NOT EXISTS dedup (
            key TEXT PRIMARY KEY,
            task_id TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            until REAL                -- NULL while its task lives
        )""",
    ),
    4: (
        # The console lists dead letters a page at a time, newest first, filtered
        # (listing.py): each index also orders its rows by seq, so a filtered page is a
        # range of one index.
        "CREATE INDEX IF NOT EXISTS dead_letters_key ON dead_letters (key)",
        "CREATE INDEX IF NOT EXISTS dead_letters_status ON dead_letters (status)",
        "CREATE INDEX IF NOT EXISTS dead_letters_reason ON dead_letters (reason)",
        "CREATE INDEX IF NOT EXISTS dead_letters_last_attempt ON dead_letters (last_attempt_at)",
        # A text search reads every description and error: from this index, a fraction of
        # the table's size (its rows also hold each task's call).
        "CREATE INDEX IF NOT EXISTS dead_letters_text ON dead_letters (description, error)",
    ),
    5: (
        # A declared rate's token bucket per key, shared by every process on the file
        # (budgets.py).
        """CREATE TABLE IF NOT EXISTS budgets (
            key TEXT PRIMARY KEY,
            tokens REAL NOT NULL,         -- left at `stamp`
            stamp REAL NOT NULL           -- epoch seconds
        )""",
    ),
    6: (
        # The sweep deletes the keys whose window passed (dedup.free_keys): through this
        # index, without reading the keys of live tasks (`until` NULL), which are most.
        "CREATE INDEX IF NOT EXISTS dedup_until ON dedup (until) WHERE until IS NOT NULL",
    ),
    7: (
        # A declared concurrency's slots: a row per call in flight of the key, shared by
        # every process on the file (budgets.py).
        """CREATE TABLE IF NOT EXISTS slots (
            id TEXT PRIMARY KEY,
            key TEXT NOT NULL,
            until REAL NOT NULL           -- epoch seconds: it lapses then, unless renewed
        )""",
        "CREATE INDEX IF NOT EXISTS slots_key ON slots (key, until)",
    ),
}

PUT = (
    "INSERT INTO tasks (id, idempotency_key, key, call, retry, due, owner, lease_until) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
PUT_UNIQUE = (
    "INSERT INTO tasks (id, idempotency_key, key, call, retry, due, owner, lease_until, "
    "dedup_key, dedup_window) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
TASK_COLUMNS = (
    "seq, id, idempotency_key, key, call, retry, attempts, failures, "
    "first_attempt_at, last_attempt_at, dedup_key, dedup_window"
)
LETTER_COLUMNS = ", ".join(LETTER_FIELDS)
SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL", "extra": "EXTRA"}

# With synchronous=NORMAL the only fsyncs are a checkpoint's (the log copied back into the
# database file), run inside the commit that fills the log to this many pages: SQLite's
# default of 1,000 would put one in every few hundred enqueues (a task writes a page or
# two); 10,000 pages (about 40 MB of log, reused after each checkpoint) makes them ten
# times rarer, at the same cost each.
_AUTOCHECKPOINT_PAGES = 10_000


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


def store_options(url: str) -> tuple[str, dict[str, Any]]:
    """(path, SQLiteStore keyword arguments) of a `sqlite://` URL: its options
    `synchronous` (normal, full), `lease_timeout` and `busy_timeout` (seconds)."""
    path, options = parse_sqlite_url(url)
    kwargs: dict[str, Any] = {}
    for name, value in options.items():
        if name == "synchronous":
            if value.lower() not in SYNCHRONOUS:
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
    return path, kwargs


# -- opening -------------------------------------------------------------------------------


def connect(
    path: str, *, url: str, synchronous: str, busy_timeout: float, journal_dir: str
) -> tuple[sqlite3.Connection, str]:
    """A connection to the store file at `path` (made if missing), checked and set up, and
    the file's store id. StoreError, naming `url`, for a file that is no usable store."""
    if not os.path.exists(path):
        # Made here, not by SQLite, so that it is private from the start: SQLite gives
        # the -wal and -shm files the database file's permissions.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it meanwhile
        except OSError as exc:
            raise StoreError(f"{url}: cannot create the store file: {exc}") from None
        else:
            os.close(fd)
    try:
        conn = sqlite3.connect(
            path,
            timeout=busy_timeout,
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
            check_same_thread=False,  # shared by the store's threads, under its lock
            cached_statements=64,
        )
    except sqlite3.Error as exc:
        raise StoreError(f"{url}: cannot open: {exc}") from None
    try:
        mode = _switch_to_wal(conn, busy_timeout)
        if str(mode).lower() != "wal":
            raise StoreError(f"{url}: cannot switch to WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous={SYNCHRONOUS[synchronous]}")
        conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
        _ensure_schema(conn, url)
        row = conn.execute("SELECT value FROM meta WHERE name = 'store_id'").fetchone()
        if row is None:
            raise StoreError(f"{url}: not a usable offload store: it has no store id")
        store_id = str(row[0])
        # Only now, known to be a store: never touch the mode of a file that is not.
        loose = [
            _make_private(name, url) for name in (path, f"{path}-wal", f"{path}-shm", journal_dir)
        ]
        if any(loose):
            log.warning("offload: %s was readable by other users; made it private", url)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"{url}: not a usable offload store: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn, store_id


def _make_private(path: str, url: str) -> bool:
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
        log.warning("offload: %s is readable by other users: %s", url, exc)
    return True


def _switch_to_wal(conn: sqlite3.Connection, busy_timeout: float) -> Any:
    """Put the file in WAL mode (which it keeps); returns the mode it is in. Switching a
    new file takes an exclusive lock without SQLite's busy handler, so processes that
    open a new store at once (gunicorn workers starting) retry, up to busy_timeout."""
    deadline = time.monotonic() + busy_timeout
    pause = 0.001
    while True:
        try:
            return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)  # the busy handler's way too: nothing to wait on across processes
        pause = min(pause * 2, 0.05)


def _ensure_schema(conn: sqlite3.Connection, url: str) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{url}: written by a newer offload (store format {version}); upgrade offload"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            others = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            } - {"tasks", "dead_letters", "journals", "meta", "dedup", "budgets", "slots"}
            if others:
                raise StoreError(f"{url}: not an offload store (it has tables {sorted(others)})")
        if version < SCHEMA_VERSION:
            if version < 2:  # new, or format 1: every statement is IF NOT EXISTS
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES ('store_id', ?)",
                    (secrets.token_hex(8),),
                )
            for step in range(max(version, 2) + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    if not _has_column_already(conn, statement):
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _has_column_already(conn: sqlite3.Connection, statement: str) -> bool:
    """True for an `ALTER TABLE t ADD COLUMN c ...` whose column t has."""
    words = statement.split()
    if words[:2] != ["ALTER", "TABLE"] or words[3:5] != ["ADD", "COLUMN"]:
        return False
    table, column = words[2], words[5]
    return any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})"))


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction: committed at the end, rolled back on any exception."""
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
