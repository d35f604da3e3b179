"""The intake journal of the SQLite store: each process's file of enqueued tasks, copied
into the tasks table by whichever process next reads tasks.

An enqueue appends one line to this process's journal file (in `<database>-journals/`)
instead of writing the database: one write() into the page cache, the same durability
as a WAL commit with synchronous=NORMAL (a killed process loses nothing; a power cut
may lose the last writes), at a fraction of the cost. The lines are copied into the
tasks table in batches by whichever process next reads tasks (a claim, a completion,
counts), journaling or not: any process may copy any journal, since the bytes copied so
far are recorded, per file, in the same transaction as the rows (table `journals`), so
each line is copied exactly once. A journal's process holds an exclusive flock() on it
while it writes it; a file whose lock can be taken (its process is gone, or moved on to a
new file) and that is copied to the end is deleted, in a transaction of its own after
the copy, committed with an fsync so that the copied rows outlive a power cut as the file
would have.

A file begins with a line naming the database it is for (its store id). A task's line: the
JSON list [id, idempotency key or null, key or null, due, owner or null, lease seconds or
null, retry policy text or null], a tab, and the call's JSON text (which, made by
json.dumps, holds no raw newline). A task that its own process performs and completes
before its line is copied is marked done by a later line of the same file,
{"done": id, "owner": owner}: one write() instead of a row inserted and deleted. A copy
that meets both inserts nothing; one that meets the mark alone deletes the row an
earlier copy made, if that owner still holds it. (The mark goes to the file that holds
the task's line, after it, so it is never copied first.)

`JournalWriter` is one process's file (appending, rotating, letting go after a fork);
`task_line` and `done_line` write the line format and `_journal_lines` reads it;
`Journals` is the directory as every process sees it (copying, deleting).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import weakref
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock(), so no journal; every enqueue writes the database
    fcntl = None  # type: ignore[assignment]

from ...codec.task import TaskRecord
from ...errors import StoreError
from .._shared import json_list, pid_alive
from .schema import transaction

__all__ = ["CAN_JOURNAL", "JournalWriter", "Journals", "done_line", "lease_text", "task_line"]

log = logging.getLogger("offload")

#: False where there is no flock() (Windows): no journals, every enqueue an INSERT.
CAN_JOURNAL = fcntl is not None

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

# Every writer, so that a forked child lets go of its parent's journal files at once (it
# holds their locks otherwise, which would keep them from being taken over if the parent
# died). A child that forks without running the hooks (uWSGI) does it on first use.
_writers: weakref.WeakSet[JournalWriter] = weakref.WeakSet()


def _forget_inherited_journals() -> None:
    for fd in list(_transient_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _transient_fds.clear()
    for writer in list(_writers):
        writer.forget_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_journals)


class JournalWriter:
    """The journal file this process appends to (see the module docstring), under its own
    lock so that an enqueue never waits for a transaction."""

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
        _writers.add(self)

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


def done_line(task_id: str, owner: str) -> bytes:
    """The line that marks a task of this file done (by `owner`, who holds its lease)."""
    return f'{{"done":{_quote(task_id)},"owner":{_quote(owner)}}}\n'.encode()


def lease_text(owner: str, seconds: float) -> str:
    """The lease fields of a task line leased on put (`task_line`'s `lease`)."""
    return f"{_quote(owner)},{seconds!r}"


def task_line(record: TaskRecord, due: float, lease: str | None) -> bytes | None:
    """The journal line of a task put at `due`, leased (`lease_text`) or not (None); None
    when it cannot be a line: a call whose stored text holds a newline."""
    call = record.call
    if "\n" in call:
        return None
    task_id = record.id
    idempotency_key = record.idempotency_key
    key = record.key
    retry = record.retry
    # The line's head written out rather than by json.dumps: half the cost, and every
    # string in it still goes through JSON's own quoting.
    head = (
        f"[{_quote(task_id)},"
        f"{'null' if idempotency_key == task_id else _quote(idempotency_key)},"
        f"{'null' if key is None else _quote(key)},"
        f"{due!r},{'null,null' if lease is None else lease},"
        f"{'null' if retry is None else _quote(retry)}]"
    )
    return f"{head}\t{call}\n".encode()


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


def _writable(text: str) -> str:
    """`text` with any lone surrogate written as its escape: an older offload let one into
    a task's key, and SQLite cannot write it (every line of the copy then failed)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
            if key is not None and not key.isascii():
                key = _writable(key)
            rows.append((task_id, idempotency_key, key, call.decode(), retry, due, owner, until))
        except (ValueError, UnicodeDecodeError) as exc:
            log.error("offload: left an unreadable line in journal %s: %s", source, exc)
    return rows, done


class Journals:
    """A store's journal directory as every process sees it: the new lines of its files
    copied into the tasks table, the files done with deleted. Copying is every process's
    work, journaling or not (a synchronous=full process copies the others' files); where
    there is no flock() (Windows) there are no journals, and this does nothing."""

    def __init__(self, directory: str, *, url: str, synchronous: str) -> None:
        self.directory = directory
        self.url = url  # for log lines
        self.synchronous = synchronous
        self.store_id = ""  # read from the database when it is opened (schema.connect)
        self._strays: set[str] = set()  # journal files of another database, left alone
        self._troubled: set[str] = set()  # journal files that could not be read (logged)

    def writer(self) -> JournalWriter:
        """A writer of this process's journal files, headed with the store id."""
        return JournalWriter(self.directory, _journal_header(self.store_id))

    def names(self) -> list[str]:
        """The journal files there are, but those of another database."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            self._trouble(self.directory, exc)
            return []
        return [n for n in names if n.endswith(_JOURNAL_SUFFIX) and n not in self._strays]

    def _trouble(self, name: str, exc: OSError) -> None:
        """A journal file (or the directory) that cannot be read: logged once, left out,
        so that one bad file never stops the others from being copied."""
        if name not in self._troubled:
            self._troubled.add(name)
            log.error("offload: %s: journal %s cannot be read; left out: %s", self.url, name, exc)

    def copy(
        self, conn: sqlite3.Connection, journal: JournalWriter | None, *, everyone: bool
    ) -> bool:
        """Copy journal lines not yet in the tasks table into it: every process's
        (`everyone`), or only those of `journal`, this store's writer, so that its tasks
        have rows. With the store's lock held, outside a transaction; takes the write lock
        only when a file has grown. True when it stopped at its budget with more to copy
        (one transaction copies at most _COPY_BUDGET bytes)."""
        more = False
        if fcntl is None:
            return more
        if not everyone and (journal is None or not journal.behind()):
            return more
        current, retired = "", []
        if journal is not None:
            with journal.lock:
                current, retired = journal.name, list(journal.retired)
        if everyone:
            names = self.names()
        else:
            names = [n for n in (current, *retired) if n and n not in self._strays]
        sizes: dict[str, int] = {}
        for name in names:
            try:
                sizes[name] = os.stat(os.path.join(self.directory, name)).st_size
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._trouble(name, exc)
        copied = dict(conn.execute("SELECT name, copied FROM journals").fetchall())
        behind = [name for name, size in sizes.items() if size > copied.get(name, 0)]
        stale = [name for name in copied if name not in sizes] if everyone else []
        if behind or stale:
            with transaction(conn):
                # Read again under the write lock: another process may have copied meanwhile.
                copied = dict(conn.execute("SELECT name, copied FROM journals").fetchall())
                budget = _COPY_BUDGET
                for name in behind:
                    if budget <= 0:
                        more = True  # the rest in the next transaction: the lock is shared
                        break
                    start = copied.get(name, 0)
                    copied[name] = self._copy_file(conn, name, start, budget)
                    budget -= copied[name] - start
                    more = more or budget <= 0
                gone = [n for n in stale if not os.path.exists(os.path.join(self.directory, n))]
                if gone:
                    conn.execute(
                        "DELETE FROM journals WHERE name IN (SELECT value FROM json_each(?))",
                        (json_list(gone),),
                    )
        if journal is None:
            return more
        with journal.lock:
            if journal.name == current and current in copied:
                journal.copied = max(journal.copied, copied[current])
            # A retired file is never written again: copied up to its size, it is done.
            done = [n for n in retired if n not in sizes or copied.get(n, 0) >= sizes[n]]
            journal.retired = [n for n in journal.retired if n not in done]
        if done:
            self.delete(conn, done)
        return more

    def hand_over(self, connect: Callable[[], sqlite3.Connection], journal: JournalWriter) -> None:
        """A store closing: copy its process's lines while it can, so that its files can
        go; those left are copied and deleted by the next process that reads tasks."""
        journal.close()
        mine = list(journal.retired)
        try:
            conn = connect()
            self.copy(conn, journal, everyone=False)
            self.delete(conn, mine)
        except (sqlite3.Error, StoreError, OSError) as exc:
            log.warning("offload: %s: journal left for the next process: %s", self.url, exc)

    def _copy_file(self, conn: sqlite3.Connection, name: str, start: int, most: int) -> int:
        """Copy the whole lines of journal `name` from byte `start`, about `most` bytes of
        them (in the caller's transaction); returns how far it is copied."""
        try:
            with open(os.path.join(self.directory, name), "rb") as file:
                file.seek(start)
                data = file.read(most)
                if not data.endswith(b"\n"):
                    data += file.readline()  # to the end of the line cut in two
        except FileNotFoundError:
            return start
        except OSError as exc:
            self._trouble(name, exc)
            return start
        end = data.rfind(b"\n") + 1
        if not end:
            return start
        lines = data[:end]
        if start == 0:
            first, _, lines = lines.partition(b"\n")
            if _journal_store(first) != self.store_id:
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

    def delete(self, conn: sqlite3.Connection, names: list[str]) -> None:
        """Delete the journal files among `names` that are copied to the end and that no
        process writes (their lock can be taken: the writer is gone or moved on)."""
        held: list[tuple[str, int]] = []
        try:
            for name in names:
                try:
                    fd = os.open(os.path.join(self.directory, name), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self._trouble(name, exc)
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
            with transaction(conn):
                # Under the write lock, so that no copy reads a file between its deletion
                # and its row's: a copy that found no row would take the file from the start.
                copied = dict(conn.execute("SELECT name, copied FROM journals").fetchall())
                for name, fd in held:
                    done = copied.get(name, 0)
                    try:
                        rest = os.pread(fd, max(0, os.fstat(fd).st_size - done), done)
                    except OSError as exc:
                        self._trouble(name, exc)
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
                    os.unlink(os.path.join(self.directory, name))
                    conn.execute("DELETE FROM journals WHERE name = ?", (name,))
        finally:
            if held and self.synchronous == "normal":
                conn.execute("PRAGMA synchronous=NORMAL")
            for _, fd in held:
                _transient_fds.discard(fd)
                os.close(fd)

    def tidy(self, conn: sqlite3.Connection) -> None:
        """Delete the journal files that are done with, and the half-made ones."""
        if fcntl is None:
            return
        self.delete(conn, self.names())
        self._delete_leftovers()

    def _delete_leftovers(self) -> None:
        """Remove journals that a process killed while making them left half-made."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.startswith(".") and name.endswith(_JOURNAL_SUFFIX + ".new"):
                pid = name[1:].partition("-")[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.directory, name))
