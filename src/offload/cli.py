"""The `offload` command (also `python -m offload`): a worker process, dead letters, stats.

    offload worker --store URL [--workers N]
    offload dead-letters list [--json] [--key K] [--status N] [--since T]
    offload dead-letters show ID [--json]
    offload dead-letters replay ID... | --all [--dry-run]
    offload dead-letters discard ID...
    offload dead-letters purge
    offload stats [--json]
    offload console [--host H] [--port P] [--read-only]
    offload health [--max-age S] [--max-dead-letters N]
    offload demo [--store URL]

`--store` defaults to OFFLOAD_STORE. Errors are one line on stderr and a non-zero exit
status (1; 2 for a usage error), never a traceback. Nothing printed holds a secret: dead
letters are redacted when they are made, and store URLs are shown without passwords.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

from . import __version__
from .codec.trust import Trust
from .console.command import add_commands
from .errors import OffloadError, UnknownDeadLetter
from .limits import normalise_key
from .records import DeadLetter
from .stores import DurableStore, Store, open_store

__all__ = ["main"]

# The worker never exits for want of work; it stops on SIGTERM or SIGINT.
_FOREVER = 365 * 24 * 3600.0


class CommandError(Exception):
    """A one-line error for the user (exit status 1)."""


class UsageError(Exception):
    """A command given the wrong arguments (exit status 2, as argparse's own errors)."""


# -- the parser -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload",
        description="Background API calls: run a worker, look after dead letters, read stats.",
    )
    parser.add_argument("--version", action="version", version=f"offload {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help="store URL, e.g. sqlite:////var/lib/app/offload.db or "
        "postgresql://app@db/app (default: $OFFLOAD_STORE)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--key", metavar="K", help="only dead letters of this throttle key")
    filters.add_argument("--status", metavar="N", type=int, help="only this HTTP status")
    filters.add_argument(
        "--since",
        metavar="T",
        type=_since,
        help="only dead letters last tried at or after T: ISO 8601 (2026-05-01T12:00Z) "
        "or an age (90s, 30m, 12h, 7d)",
    )

    worker = commands.add_parser(
        "worker",
        parents=[store],
        help="perform calls from a durable store until SIGTERM or SIGINT",
        description="Perform calls from a durable store until SIGTERM or SIGINT, then let "
        "the calls in flight finish (OFFLOAD_SHUTDOWN_TIMEOUT), hand the rest back and exit 0.",
    )
    worker.add_argument(
        "--workers", metavar="N", type=int, help="threads performing calls ($OFFLOAD_WORKERS)"
    )
    worker.add_argument(
        "--create",
        action="store_true",
        help="make the SQLite store file, or the PostgreSQL store's tables, if missing "
        "(without it, a missing store is an error: a typo must not make an empty store that "
        "nothing writes to)",
    )
    worker.add_argument(
        "--trusted",
        metavar="WHICH",
        help="which functions a stored task may name: any (default), registered (only "
        "@offload.task functions) or comma-separated module prefixes ($OFFLOAD_TRUSTED)",
    )
    worker.add_argument(
        "--import",
        dest="imports",
        metavar="MODULE",
        action="append",
        default=[],
        help="import the application's task module at start, so that its @offload.task "
        "functions are registered (repeatable; $OFFLOAD_IMPORTS, comma-separated)",
    )
    worker.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level on stderr (default: info)",
    )
    worker.set_defaults(handler=_worker)

    letters = commands.add_parser("dead-letters", help="list, show, replay, discard, purge")
    actions = letters.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list", parents=[store, as_json, filters], help="list dead letters, oldest first"
    )
    listing.set_defaults(handler=_list)
    show = actions.add_parser("show", parents=[store, as_json], help="show one dead letter")
    show.add_argument("id", metavar="ID")
    show.set_defaults(handler=_show)
    replay = actions.add_parser(
        "replay",
        parents=[store, filters],
        help="queue dead letters' tasks again, with a fresh attempt budget",
        description="Queue dead letters' tasks again (same ids and idempotency keys, a fresh "
        "attempt budget) and remove the dead letters. --all takes the filters.",
    )
    replay.add_argument("ids", metavar="ID", nargs="*")
    replay.add_argument("--all", action="store_true", help="every dead letter (that matches)")
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed")
    replay.set_defaults(handler=_replay)
    discard = actions.add_parser("discard", parents=[store], help="remove dead letters")
    discard.add_argument("ids", metavar="ID", nargs="+")
    discard.set_defaults(handler=_discard)
    purge = actions.add_parser("purge", parents=[store], help="remove every dead letter")
    purge.set_defaults(handler=_purge)

    stats = commands.add_parser(
        "stats", parents=[store, as_json], help="what the store holds: tasks and dead letters"
    )
    stats.set_defaults(handler=_stats)

    add_commands(commands, store, _open)  # console, health: console/command.py

    demo = commands.add_parser("demo", help="a local misbehaving API and a live run")
    demo.add_argument("--store", metavar="URL", default=None, help="store URL (default: memory)")
    demo.set_defaults(handler=_demo)
    return parser


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> datetime:
    """An ISO 8601 time (UTC when it names no zone) or an age such as 30m."""
    age = _AGE.match(text)
    if age:
        seconds = float(age.group(1)) * _UNITS[age.group(2)]
        return datetime.now(timezone.utc) - timedelta(seconds=seconds)
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"  # Python 3.10 reads no "Z"
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 time nor an age such as 30m, 12h or 7d"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


# -- stores -----------------------------------------------------------------------------


def _store_url(args: argparse.Namespace) -> str:
    url: str | None = args.store or os.environ.get("OFFLOAD_STORE") or None
    if url is None:
        raise CommandError("no store: pass --store URL or set OFFLOAD_STORE")
    if url.strip().lower() in ("memory", "memory://"):
        raise CommandError(
            "the memory store lives inside one process; the offload command needs a durable "
            "store (sqlite:///path.db, sqs://queue-name?region=... or postgresql://user@host/db)"
        )
    return url


def _open(args: argparse.Namespace, *, must_exist: bool = True) -> DurableStore:
    """The durable store `--store` names. A SQLite file that is not there, or a database
    without the store's tables, is an error (a typo must not make an empty store), unless
    the worker is told to `--create` it."""
    from .stores.sqlite import SQLiteStore  # noqa: PLC0415

    store: Store = open_store(_store_url(args))  # a SQLite file is opened on first use
    if must_exist and isinstance(store, SQLiteStore) and not os.path.exists(store.path):
        raise CommandError(f"no store at {store.path}: the file does not exist")
    exists = getattr(store, "exists", None)  # a database: are the store's tables there?
    if must_exist and exists is not None and not exists():
        store.close()
        raise CommandError(f"no store at {store.url}: the database has no offload tables")
    if not store.durable:
        store.close()
        raise CommandError(f"{store.url} is not a durable store")
    return store  # type: ignore[return-value]  # durable: it has the DurableStore methods


# -- output -----------------------------------------------------------------------------


def _dump(value: Any, out: TextIO) -> None:
    json.dump(value, out, indent=2, ensure_ascii=False)
    out.write("\n")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(letters: Sequence[DeadLetter], out: TextIO) -> None:
    rows = [
        (
            letter.id,
            letter.reason,
            "-" if letter.status is None else str(letter.status),
            str(letter.attempts),
            _when(letter.last_attempt_at),
            letter.key or "-",
            _clip(letter.description, 60),
            _clip(letter.error, 60),
        )
        for letter in letters
    ]
    header = ("ID", "REASON", "STATUS", "ATTEMPTS", "LAST ATTEMPT (UTC)", "KEY", "CALL", "ERROR")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
        out.write("\n")


def _key_of(given: str, letters: list[DeadLetter]) -> str:
    """The key `--key` names, as a user types it: the key itself, a URL of the API
    (https://api.example.com/v1 is https://api.example.com:443), or host:port. A key no
    dead letter has is an error that lists those they have."""
    keys = {letter.key for letter in letters if letter.key is not None}
    if given in keys:
        return given
    candidates = [given]
    if "://" not in given:
        candidates += [f"http://{given}", f"https://{given}"]
    for candidate in candidates:
        try:
            key = normalise_key(candidate)
        except ValueError:
            continue
        if key in keys:
            return key
    listed = ", ".join(sorted(keys)) if keys else "none"
    raise CommandError(f"no dead letter has the key {given!r}; their keys: {listed}")


def _matching(letters: list[DeadLetter], args: argparse.Namespace) -> list[DeadLetter]:
    status, since = args.status, args.since
    key = None if args.key is None else _key_of(args.key, letters)
    chosen = []
    for letter in letters:
        if key is not None and letter.key != key:
            continue
        if status is not None and letter.status != status:
            continue
        if since is not None:
            when = letter.last_attempt_at or letter.first_attempt_at
            if when is None or when < since:
                continue
        chosen.append(letter)
    return chosen


# -- commands ---------------------------------------------------------------------------


def _list(args: argparse.Namespace, out: TextIO) -> int:
    store = _open(args)
    try:
        letters = _matching(store.dead_letters(), args)
    finally:
        store.close()
    if args.json:
        _dump([letter.to_json() for letter in letters], out)
    elif letters:
        _table(letters, out)
    else:
        out.write("no dead letters\n")
    return 0


def _find(store: DurableStore, dead_letter_id: str) -> DeadLetter:
    one = getattr(store, "dead_letter", None)  # a direct lookup where the store has one
    if one is not None:
        letter: DeadLetter = one(dead_letter_id)
        return letter
    for letter in store.dead_letters():
        if letter.id == dead_letter_id:
            return letter
    raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")


def _show(args: argparse.Namespace, out: TextIO) -> int:
    store = _open(args)
    try:
        letter = _find(store, args.id)
    finally:
        store.close()
    if args.json:
        _dump(letter.to_json(), out)
        return 0
    fields = letter.to_json()
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        out.write(f"{name.ljust(width)}  {'-' if value is None else value}\n")
    return 0


def _each(
    out: TextIO,
    err: TextIO,
    ids: Sequence[str],
    act: Callable[[str], str],
) -> int:
    """Run `act` on each id; report unknown ids on stderr and go on. Exit 1 if any was."""
    status = 0
    for dead_letter_id in ids:
        try:
            out.write(act(dead_letter_id) + "\n")
        except UnknownDeadLetter as exc:
            err.write(f"offload: {exc}\n")
            status = 1
    return status


def _replay(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if bool(args.ids) == bool(args.all):
        raise UsageError("give dead letter IDs or --all (not both)")
    if args.ids and (args.key is not None or args.status is not None or args.since is not None):
        raise UsageError("--key, --status and --since go with --all")
    store = _open(args)
    try:
        if args.all:
            letters = _matching(store.dead_letters(), args)
            ids = [letter.id for letter in letters]
            if not ids:
                out.write("no dead letters to replay\n")
                return 0
        else:
            ids = list(args.ids)
        if args.dry_run:
            by_id = {letter.id: letter for letter in store.dead_letters()}

            def would(dead_letter_id: str) -> str:
                letter = by_id.get(dead_letter_id)
                if letter is None:
                    raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
                return f"would replay {letter.id}: {letter.description}"

            return _each(out, err, ids, would)

        def replay(dead_letter_id: str) -> str:
            task = store.replay(dead_letter_id)
            return f"replayed {dead_letter_id} (task {task.id})"

        return _each(out, err, ids, replay)
    finally:
        store.close()


def _discard(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = _open(args)
    try:

        def discard(dead_letter_id: str) -> str:
            store.discard(dead_letter_id)
            return f"discarded {dead_letter_id}"

        return _each(out, err, args.ids, discard)
    finally:
        store.close()


def _purge(args: argparse.Namespace, out: TextIO) -> int:
    store = _open(args)
    try:
        removed = store.purge()
    finally:
        store.close()
    out.write(f"purged {removed} dead letter(s)\n")
    return 0


def _stats(args: argparse.Namespace, out: TextIO) -> int:
    store = _open(args)
    try:
        counts = store.counts()
    finally:
        store.close()
    figures = {
        "store": store.url,
        "ready": counts.ready,
        "delayed": counts.delayed,
        "leased": counts.leased,
        "dead_letters": counts.dead_letters,
    }
    if args.json:
        _dump(figures, out)
        return 0
    for name, value in figures.items():
        out.write(f"{name.replace('_', ' '):<13}{value}\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from . import demo  # noqa: PLC0415 - only this command needs it
    except ModuleNotFoundError as exc:
        if exc.name != "offload.demo":
            raise
        raise CommandError("the demo is not available in this installation") from None
    result: int = demo.run(store=args.store)
    return result


def _import_task_modules(given: list[str]) -> None:
    """Import --import modules and OFFLOAD_IMPORTS ones: their @offload.task decorators run."""
    env = [m.strip() for m in os.environ.get("OFFLOAD_IMPORTS", "").split(",") if m.strip()]
    for module in [*env, *given]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # one clear line, not a traceback
            raise CommandError(f"cannot import {module}: {type(exc).__name__}: {exc}") from None


def _worker(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .config import options_from_env  # noqa: PLC0415
    from .offloader import Offloader  # noqa: PLC0415

    url = _store_url(args)
    if not args.create:
        _open(args).close()  # a missing SQLite file or tables are an error here too
    options = options_from_env()
    options.update(store=url, consume=True, idle_timeout=_FOREVER)
    if args.trusted is not None:
        try:
            options["trusted"] = Trust.parse(args.trusted, "--trusted")
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    _import_task_modules(args.imports)
    if args.workers is not None:
        if args.workers < 1:
            raise CommandError(f"--workers must be at least 1, got {args.workers}")
        options["workers"] = args.workers
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=err,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = _Signals()  # before any thread starts: the threads inherit the blocked signals
    try:
        off = Offloader(**options)
    except BaseException:
        stop.restore()
        raise
    if not off.store.durable:
        off.shutdown(0)
        stop.restore()
        raise CommandError(f"offload worker needs a durable store, not {off.store.url}")
    off.start()  # consume now, backlog or not; the worker never idles out
    logging.getLogger("offload").info(
        "offload worker: performing calls from %s with %d thread(s) (pid %d)",
        off.store.url,
        off.workers,
        os.getpid(),
    )
    received = stop.wait()
    logging.getLogger("offload").info(
        "offload worker: %s received; finishing calls in flight (up to %gs)",
        received,
        off.shutdown_timeout,
    )
    try:
        off.shutdown(off.shutdown_timeout)
    finally:
        stop.restore()
    s = off.stats()
    logging.getLogger("offload").info(
        "offload worker: stopped: %d delivered, %d dead-lettered, %d retried, %d handed back",
        s.succeeded,
        s.dead_lettered,
        s.retried,
        s.released - s.retried,
    )
    return 0


class _Signals:
    """SIGTERM and SIGINT, received by the main thread only: blocked in every thread (the
    worker threads inherit the mask) and taken with sigwait, where the platform has it."""

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._event = threading.Event()
        self._got = ""
        self._previous: dict[int, Any] = {}
        self._masked = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwait")
        if self._masked:
            signal.pthread_sigmask(signal.SIG_BLOCK, self._SIGNALS)
        else:  # pragma: no cover - Windows
            for signum in self._SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:  # pragma: no cover - Windows
        self._got = signal.Signals(signum).name
        self._event.set()

    def wait(self) -> str:
        """Block until SIGTERM or SIGINT; return its name."""
        if self._masked:
            return signal.Signals(signal.sigwait(self._SIGNALS)).name
        while not self._event.wait(0.5):  # pragma: no cover - Windows
            pass
        return self._got  # pragma: no cover

    def restore(self) -> None:
        if self._masked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._SIGNALS)
        for signum, handler in self._previous.items():  # pragma: no cover - Windows
            signal.signal(signum, handler)


# -- main -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `offload` command; returns the exit status."""
    out, err = sys.stdout, sys.stderr
    args = _parser().parse_args(argv)
    handler: Callable[..., int] = args.handler
    try:
        if handler in (_replay, _discard, _worker):
            return handler(args, out, err)
        if handler is _demo:
            return handler(args)
        return handler(args, out)
    except KeyboardInterrupt:
        err.write("offload: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): end quietly, and keep Python from complaining
        # again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except UsageError as exc:
        err.write(f"offload: usage error: {exc} (see offload {args.command} --help)\n")
        return 2
    except (CommandError, OffloadError, ValueError, OSError) as exc:
        # StoreError and UnknownDeadLetter are OffloadErrors: a store that cannot be
        # reached, a record it cannot read, an id it does not hold.
        err.write(f"offload: error: {_one_line(exc)}\n")
        return 1
    except Exception as exc:  # the contract: one line, never a traceback
        err.write(f"offload: unexpected error: {type(exc).__name__}: {_one_line(exc)}\n")
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
