"""The PostgreSQL store's tables, in a schema of their own (`?schema=offload`), and making
them: every statement names its tables with the schema, so that an application's
connection (whatever its search_path) writes the same tables as offload's own.

Making the tables takes a transaction-scoped advisory lock first, so that processes
starting at once (gunicorn workers) do not race each other's CREATEs; `create=false`
refuses a database without them instead. The `meta` table holds the format version: a
newer one is refused, never changed.

Columns follow the SQLite store's (`codec.task.TaskRecord`'s fields; the call and its
policy as JSON text, never pickle; times as epoch seconds, as the Store protocol has
them). A task's first due time is `due` (a delay is a later `due`). Dedup keys are held in
the `dedup` table (see dedup.py), as the SQLite store holds them: its primary key is the
unique index that two processes racing for a key meet at.
"""

from __future__ import annotations

import time
from typing import Any

from ...errors import StoreError
from .._shared import LETTER_FIELDS
from .budgets import budget_statement

__all__ = ["SCHEMA_VERSION", "Sql", "channel", "ensure_tables"]

# 2: rate budgets; 3: dedup keys; 4: concurrency slots
SCHEMA_VERSION = 4

_LETTER_COLUMNS = ", ".join(LETTER_FIELDS)
TASK_FIELDS = (
    "seq",
    "due",
    "id",
    "idempotency_key",
    "key",
    "call",
    "retry",
    "attempts",
    "failures",
    "first_attempt_at",
    "last_attempt_at",
    "dedup_key",
    "dedup_window",
)
_TASK_COLUMNS = ", ".join(f"t.{name}" for name in TASK_FIELDS)


_CHANNEL_CHARS = 63  # NAMEDATALEN - 1: pg_notify refuses a longer channel name


def channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel of the store in `schema` (channels are per database), cut
    to the length PostgreSQL takes: a schema name may be longer than the channel's room.
    Two schemas that share the cut name share the channel: only extra wake-ups."""
    return f"offload:{schema}"[:_CHANNEL_CHARS]


def _ddl(s: str) -> tuple[str, ...]:
    return (
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"""CREATE TABLE IF NOT EXISTS {s}.tasks (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- insertion order
            id text NOT NULL UNIQUE,
            idempotency_key text,              -- NULL when it is the id (the usual case)
            key text,                          -- throttle key
            call text NOT NULL,                -- JSON (codec.task.TaskRecord)
            retry text,                        -- JSON RetryPolicy, NULL: the consumer's
            due double precision NOT NULL,     -- epoch seconds
            owner text,                        -- host:pid:token while leased
            lease_until double precision,
            attempts integer NOT NULL DEFAULT 0,
            failures integer NOT NULL DEFAULT 0,
            first_attempt_at double precision,
            last_attempt_at double precision
        )""",
        # Claims read waiting rows in due order; sweeps read leased rows by owner.
        f"CREATE INDEX IF NOT EXISTS tasks_waiting ON {s}.tasks (due, seq) WHERE owner IS NULL",
        f"CREATE INDEX IF NOT EXISTS tasks_leased ON {s}.tasks (owner) WHERE owner IS NOT NULL",
        f"""CREATE TABLE IF NOT EXISTS {s}.dead_letters (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id text NOT NULL UNIQUE,
            task_id text NOT NULL,
            idempotency_key text NOT NULL,
            description text NOT NULL,
            key text,
            attempts integer NOT NULL,
            error text NOT NULL,
            status integer,
            reason text NOT NULL,
            first_attempt_at double precision,
            last_attempt_at double precision,
            buried_at double precision NOT NULL,
            call text NOT NULL,                -- as the task stored it, for replay
            retry text
        )""",
        # The console's filters, newest first (seq descending), a page at a time.
        f"CREATE INDEX IF NOT EXISTS dead_letters_key ON {s}.dead_letters (key, seq)",
        f"CREATE INDEX IF NOT EXISTS dead_letters_status ON {s}.dead_letters (status, seq)",
        f"CREATE INDEX IF NOT EXISTS dead_letters_reason ON {s}.dead_letters (reason, seq)",
        f"CREATE INDEX IF NOT EXISTS dead_letters_last ON {s}.dead_letters (last_attempt_at)",
        *_MIGRATIONS[2](s),
        *_MIGRATIONS[3](s),
        *_MIGRATIONS[4](s),
        f"CREATE TABLE IF NOT EXISTS {s}.meta (name text PRIMARY KEY, value text NOT NULL)",
        f"INSERT INTO {s}.meta (name, value) VALUES ('version', '{SCHEMA_VERSION}') "
        "ON CONFLICT (name) DO NOTHING",
    )


def _budgets(s: str) -> tuple[str, ...]:
    # A declared rate's token bucket per key, shared by every process (budgets.py).
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.budgets (
            key text PRIMARY KEY,
            tokens double precision NOT NULL,  -- left at `stamp`
            stamp double precision NOT NULL,   -- epoch seconds, the server's clock
            taken integer NOT NULL             -- by the statement that wrote the row
        )""",
    )


def _dedup(s: str) -> tuple[str, ...]:
    # Dedup keys: held in `dedup` while their task lives, and `until` a time after it
    # ended (its window); the task rows and dead letters carry them, so any process that
    # settles a task can let its key go, and a replayed dead letter takes it again.
    return (
        f"ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS dedup_key text",
        f"ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS dedup_window double precision "
        "NOT NULL DEFAULT 0",
        f"ALTER TABLE {s}.dead_letters ADD COLUMN IF NOT EXISTS dedup_key text",
        f"ALTER TABLE {s}.dead_letters ADD COLUMN IF NOT EXISTS dedup_window double precision "
        "NOT NULL DEFAULT 0",
        f"""CREATE TABLE IF NOT EXISTS {s}.dedup (
            key text PRIMARY KEY,
            task_id text NOT NULL,
            idempotency_key text NOT NULL,
            until double precision             -- NULL while its task lives; epoch seconds
        )""",
        # The sweep deletes the keys whose window has passed.
        f"CREATE INDEX IF NOT EXISTS dedup_until ON {s}.dedup (until) WHERE until IS NOT NULL",
    )


def _slots(s: str) -> tuple[str, ...]:
    # A declared concurrency's slots: a row per call in flight of the key, shared by every
    # process (budgets.py).
    return (
        f"""CREATE TABLE IF NOT EXISTS {s}.slots (
            id text PRIMARY KEY,
            key text NOT NULL,
            until double precision NOT NULL    -- epoch seconds, the server's: it lapses then
        )""",
        f"CREATE INDEX IF NOT EXISTS slots_key ON {s}.slots (key, until)",
    )


# The statements that take a store from the format before to theirs (in the transaction
# that sets the version); a new store runs them all with its tables.
_MIGRATIONS = {2: _budgets, 3: _dedup, 4: _slots}


class Sql:
    """Every statement of the store in one schema, made once per store object."""

    def __init__(self, schema: str) -> None:
        s = self.schema = f'"{schema}"'  # a plain identifier (url.py checked it), quoted
        tasks, letters, dedup = f"{s}.tasks", f"{s}.dead_letters", f"{s}.dedup"
        take_key = f"INSERT INTO {dedup} (key, task_id, idempotency_key, until)"
        # A key whose holder's row is gone (a process of an older format settled it, and
        # its key stayed) is held by no one: never returned, freed when next taken.
        alive = f"EXISTS (SELECT 1 FROM {tasks} WHERE {tasks}.id = d.task_id)"
        # A replay takes its key again only from no live task (a window it may end).
        retake_key = (
            "ON CONFLICT (key) DO UPDATE SET task_id = EXCLUDED.task_id, "
            "idempotency_key = EXCLUDED.idempotency_key, until = NULL "
            f"WHERE d.until IS NOT NULL OR NOT {alive}"
        )
        self.ddl = _ddl(s)
        self.channel = channel(schema)
        self.version = f"SELECT to_regclass('{s}.meta') IS NOT NULL"
        self.read_version = f"SELECT value FROM {s}.meta WHERE name = 'version'"
        self.tables = (
            f"SELECT to_regclass('{s}.tasks') IS NOT NULL "
            f"AND to_regclass('{s}.dead_letters') IS NOT NULL"
        )
        #: As `tables` and `version` together, but read from the catalog's rows with this
        #: statement's snapshot (to_regclass may answer from a cache of this session's).
        self.made = (
            "SELECT count(*) = 3 FROM pg_catalog.pg_tables WHERE schemaname = %s "
            "AND tablename IN ('tasks', 'dead_letters', 'meta')"
        )
        self.schema_name = schema
        # -- tasks ----------------------------------------------------------------------
        insert = (
            f"INSERT INTO {tasks} (id, idempotency_key, key, call, retry, due, owner, "
            "lease_until) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        )
        #: A task this process leased as it wrote it: no one else needs to hear of it.
        self.put_leased = insert
        #: A waiting task: the NOTIFY wakes the listening workers (at the commit).
        self.put_waiting = f"WITH t AS ({insert}) SELECT pg_notify(%s, '')"
        self.claim = (
            f"WITH picked AS (SELECT seq FROM {tasks} WHERE owner IS NULL AND due <= %s "
            "{keys}ORDER BY due, seq LIMIT %s FOR UPDATE SKIP LOCKED) "
            f"UPDATE {tasks} t SET owner = %s, lease_until = %s FROM picked "
            f"WHERE t.seq = picked.seq RETURNING {_TASK_COLUMNS}"
        )
        self.claim_all = self.claim.format(keys="")
        self.claim_some = self.claim.format(keys="AND (key IS NULL OR key <> ALL(%s)) ")
        self.owners = (
            f"SELECT owner, MIN(lease_until) FROM {tasks} WHERE owner IS NOT NULL GROUP BY owner"
        )
        self.take_back = (
            f"WITH t AS (UPDATE {tasks} SET owner = NULL, lease_until = NULL "
            "WHERE owner IS NOT NULL AND (owner = ANY(%s) OR lease_until <= %s) "
            "RETURNING owner) SELECT owner, count(*), pg_notify(%s, '') FROM t GROUP BY owner"
        )
        self.renew = f"UPDATE {tasks} SET lease_until = %s WHERE owner = %s AND id = ANY(%s)"
        self.lost = (
            f"SELECT count(*) FROM {tasks} WHERE id = ANY(%s) AND (owner IS NULL OR owner <> %s)"
        )
        self.release = (
            f"WITH t AS (UPDATE {tasks} SET owner = NULL, lease_until = NULL, due = %s, "
            "attempts = %s, failures = %s, first_attempt_at = %s, last_attempt_at = %s "
            "WHERE id = %s AND owner = %s) SELECT pg_notify(%s, '')"
        )
        self.complete = f"DELETE FROM {tasks} WHERE id = %s"
        # -- dedup keys (dedup.py) ----------------------------------------------------------
        #: Take the key and write the task, in one statement, or neither when it is held
        #: (a row comes back when it was taken); {then}: the NOTIFY of a waiting task.
        #: {wait}: on the store's own connection, a short wait at the key's index (set
        #: before the INSERT reads its row; local: it ends with the statement).
        put_unique = (  # (the template)
            "WITH {wait}"
            f"k AS ({take_key} SELECT %s, %s, %s, NULL {{after}}ON CONFLICT (key) DO NOTHING "
            f"RETURNING task_id), t AS (INSERT INTO {tasks} (id, idempotency_key, key, call, "
            "retry, due, owner, lease_until, dedup_key, dedup_window) "
            "SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s FROM k) SELECT {then} FROM k"
        )
        moment = "w AS (SELECT set_config('lock_timeout', '50ms', true))"
        short = f"{moment}, "
        #: (alone: on the store's own connection, notify): the statement
        self.put_unique = {
            (alone, notify): put_unique.format(
                wait=short if alone else "",
                after="FROM w " if alone else "",
                then="pg_notify(%s, '')" if notify else "1",
            )
            for alone in (False, True)
            for notify in (False, True)
        }
        #: The key's row, if any: (task_id, idempotency_key, whether it holds the key at
        #: now, the row's version for free_key).
        self.key_holder = (
            f"SELECT task_id, idempotency_key, COALESCE(until > %s, {alive}), xmin::text "
            f"FROM {dedup} d WHERE key = %s"
        )
        #: (alone): delete the row version key_holder found free, and no later one: a
        #: delete that meets a row changed meanwhile (a replay took the key again) judges
        #: the new row with the tasks as it saw them (the replay's task not yet there). On
        #: the store's own connection, it waits a moment only for another's row lock.
        self.free_key = {
            alone: (
                f"{f'WITH {moment} ' if alone else ''}DELETE FROM {dedup} d "
                f"{'USING w ' if alone else ''}WHERE key = %s AND d.xmin = %s::xid "
                f"AND (until <= %s OR (until IS NULL AND NOT {alive}))"
            )
            for alone in (False, True)
        }
        #: The sweep: a row another transaction has locked (one taking the key again, in
        #: the application's transaction, say) is left to it, not waited for.
        self.free_keys = (
            f"DELETE FROM {dedup} WHERE key IN (SELECT key FROM {dedup} WHERE until <= %s "
            "FOR UPDATE SKIP LOCKED)"
        )
        self.let_key_go = f"DELETE FROM {dedup} WHERE key = %s AND task_id = %s"
        self.let_key_go_later = f"UPDATE {dedup} SET until = %s WHERE key = %s AND task_id = %s"
        self.next_due = f"SELECT MIN(due) FROM {tasks} WHERE owner IS NULL"
        #: (owner, lease still running, due now, tasks, dead letters): the waiting rows in
        #: one, the leased ones by owner and by whether the lease runs (see tally_tasks).
        self.counts = (
            "SELECT NULL, false, count(*) FILTER (WHERE due <= %(now)s), count(*), "
            f"(SELECT count(*) FROM {letters}) FROM {tasks} WHERE owner IS NULL UNION ALL "
            "SELECT owner, lease_until > %(now)s, count(*) FILTER (WHERE due <= %(now)s), "
            f"count(*), 0 FROM {tasks} WHERE owner IS NOT NULL "
            "GROUP BY owner, lease_until > %(now)s"
        )
        # -- dead letters ---------------------------------------------------------------
        self.bury = (
            f"WITH gone AS (DELETE FROM {tasks} WHERE id = %s "
            "RETURNING call, retry, dedup_key, dedup_window), "
            # The row is gone when its lease was lost: then the call as this process has it.
            "stored AS (SELECT call, retry, dedup_key, dedup_window FROM gone UNION ALL "
            "SELECT %s, %s, %s, %s WHERE NOT EXISTS (SELECT 1 FROM gone)) "
            f"INSERT INTO {letters} (id, task_id, idempotency_key, description, key, "
            "attempts, error, status, reason, first_attempt_at, last_attempt_at, buried_at, "
            "call, retry, dedup_key, dedup_window) SELECT %s, %s, %s, %s, %s, %s, %s, %s, "
            "%s, %s, %s, %s, call, retry, dedup_key, dedup_window FROM stored"
        )
        self.letters = f"SELECT {_LETTER_COLUMNS} FROM {letters} ORDER BY seq"
        self.letter = f"SELECT {_LETTER_COLUMNS} FROM {letters} WHERE id = %s"
        self.letter_detail = (
            f"SELECT {_LETTER_COLUMNS}, idempotency_key, call FROM {letters} WHERE id = %s"
        )
        #: The most common values of one column ({column}: key, reason or status).
        self.tally = (
            f"SELECT {{column}}, count(*) AS n FROM {letters} GROUP BY {{column}} "
            "ORDER BY n DESC, {column} NULLS FIRST LIMIT %s"  # as SQLite orders NULL
        )
        self.page = (
            f"SELECT seq, {_LETTER_COLUMNS} FROM {letters} WHERE {{where}} "
            "ORDER BY seq DESC LIMIT %s"
        )
        self.page_total = f"SELECT count(*) FROM {letters} WHERE {{where}}"
        self.count_letters = f"SELECT count(*) FROM {letters}"
        revived = "task_id, idempotency_key, key, call, retry, dedup_key, dedup_window"
        self.revive = f"DELETE FROM {letters} WHERE id = %s RETURNING {revived}"
        self.replay = (
            f"WITH letter AS (DELETE FROM {letters} WHERE id = %s RETURNING {revived}), "
            f"put AS (INSERT INTO {tasks} (id, idempotency_key, key, call, retry, due, "
            "dedup_key, dedup_window) SELECT task_id, NULLIF(idempotency_key, task_id), key, "
            "call, retry, %s, dedup_key, dedup_window FROM letter), "
            # A replayed dead letter takes its key again, unless a live task holds it.
            f"keyed AS (INSERT INTO {dedup} AS d (key, task_id, idempotency_key, until) "
            "SELECT dedup_key, task_id, idempotency_key, NULL "
            f"FROM letter WHERE dedup_key IS NOT NULL {retake_key}) "
            f"SELECT {revived}, pg_notify(%s, '') FROM letter"
        )
        self.discard = f"DELETE FROM {letters} WHERE id = %s"
        self.purge = f"DELETE FROM {letters}"
        # -- rate budgets (budgets.py) ------------------------------------------------------
        self.take_tokens = budget_statement(s)


def ensure_tables(conn: Any, sql: Sql, *, create: bool, shown: str) -> None:
    """Make the store's tables if they are missing (or refuse, with `create=false`), and
    check their format. `conn` is an autocommit psycopg connection."""
    if not conn.execute(sql.tables).fetchone()[0] or not conn.execute(sql.version).fetchone()[0]:
        if not create:
            raise StoreError(
                f"{shown}: no offload tables in schema {sql.schema} (create=false: "
                "make them with create=true, or point the URL at the right database)"
            )
        with conn.transaction():
            # Serialise the CREATEs of processes that start at once; released at commit.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (sql.channel,))
            # Made meanwhile by the process that held the lock: its ALTERs again would
            # wait for (and deadlock with) that process's first enqueues.
            if not conn.execute(sql.made, (sql.schema_name,)).fetchone()[0]:
                for statement in sql.ddl:
                    conn.execute(statement)
    row = conn.execute(sql.read_version).fetchone()
    version = int(row[0]) if row is not None else 0
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{shown}: written by a newer offload (store format {version}); upgrade offload"
        )
    if version < 1:
        raise StoreError(f"{shown}: not a usable offload store (format {version!r})")
    if version < SCHEMA_VERSION:
        _upgrade(conn, sql, shown, version)


# An upgrade's ALTER TABLE waits for every open transaction on the table, and while it
# waits, every later statement on the table (other processes' enqueues and claims) waits
# behind it: so each try waits this long at most, and lets them through between tries.
_UPGRADE_LOCK_WAIT = "250ms"
_UPGRADE_PATIENCE = 30.0  # seconds of tries before the store's opening fails


def _upgrade(conn: Any, sql: Sql, shown: str, version: int) -> None:
    """Take the store's tables to this format, once, whichever process comes first; a try
    that finds a table held by an open transaction gives way and tries again."""
    import psycopg  # noqa: PLC0415

    deadline = time.monotonic() + _UPGRADE_PATIENCE
    pause = 0.05
    while True:
        try:
            _upgrade_once(conn, sql)
            return
        except psycopg.errors.InsufficientPrivilege:
            raise StoreError(
                f"{shown}: the store is at format {version}, and this role may not take its "
                f"tables to format {SCHEMA_VERSION}: open it once as their owner (a worker's "
                "role), and then this one can use it"
            ) from None
        except psycopg.errors.LockNotAvailable:
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"{shown}: cannot take the store's tables to format {SCHEMA_VERSION}: "
                    f"an open transaction held them through {_UPGRADE_PATIENCE:g} s of tries "
                    "(a long transaction on them, or one left open?)"
                ) from None
        time.sleep(pause)  # a try's lock wait let the others through; give them a moment
        pause = min(pause * 2, 1.0)


def _upgrade_once(conn: Any, sql: Sql) -> None:
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (_UPGRADE_LOCK_WAIT,))
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (sql.channel,))
        version = int(conn.execute(sql.read_version).fetchone()[0])
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step](sql.schema):
                conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(
                f"UPDATE {sql.schema}.meta SET value = %s WHERE name = 'version'",
                (str(SCHEMA_VERSION),),
            )
