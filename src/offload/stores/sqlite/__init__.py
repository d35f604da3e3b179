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

Sharing. Every process (gunicorn workers, `offload worker`) opens its own connection, and
leases the tasks it performs; a lease of a process that is gone is taken back at once
(see store.py).

Only JSON is stored (see codec.task); the files are made mode 0600, the journal
directory 0700.

The parts, each with the design notes of its job: `store.py` (SQLiteStore: a process's
connection, lock, lease owner and journal file, and the fork), `journal.py` (the intake
journal), `tasks.py` (the tasks table: claims, leases, settling), `letters.py` (dead
letters), `listing.py` (dead letters a page at a time, for the console), `schema.py`
(the file: tables, opening, the URL). Their names are this package's internals;
SQLiteStore and parse_sqlite_url are its public ones.
"""

from .schema import parse_sqlite_url
from .store import SQLiteStore

__all__ = ["SQLiteStore", "parse_sqlite_url"]
