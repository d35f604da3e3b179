"""The `offload` command's arguments: one subcommand per job, each with its handler
(`handler(args, out, err) -> exit status`)."""

from __future__ import annotations

import argparse
from datetime import datetime

from .. import __version__
from ..console.command import add_commands
from ..console.filters import parse_since
from .common import open_durable
from .letters import (
    discard_letters,
    list_letters,
    print_stats,
    purge_letters,
    replay_letters,
    show_letter,
)
from .worker import run_demo, run_worker

__all__ = ["build_parser", "since"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each sets `handler`."""
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
        type=since,
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
    worker.set_defaults(handler=run_worker)

    letters = commands.add_parser("dead-letters", help="list, show, replay, discard, purge")
    actions = letters.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list", parents=[store, as_json, filters], help="list dead letters, oldest first"
    )
    listing.set_defaults(handler=list_letters)
    show = actions.add_parser("show", parents=[store, as_json], help="show one dead letter")
    show.add_argument("id", metavar="ID")
    show.set_defaults(handler=show_letter)
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
    replay.set_defaults(handler=replay_letters)
    discard = actions.add_parser("discard", parents=[store], help="remove dead letters")
    discard.add_argument("ids", metavar="ID", nargs="+")
    discard.set_defaults(handler=discard_letters)
    purge = actions.add_parser("purge", parents=[store], help="remove every dead letter")
    purge.set_defaults(handler=purge_letters)

    stats = commands.add_parser(
        "stats", parents=[store, as_json], help="what the store holds: tasks and dead letters"
    )
    stats.set_defaults(handler=print_stats)

    add_commands(commands, store, open_durable)  # console, health: console/command.py

    demo = commands.add_parser("demo", help="a local misbehaving API and a live run")
    demo.add_argument("--store", metavar="URL", default=None, help="store URL (default: memory)")
    demo.set_defaults(handler=run_demo)
    return parser


def since(text: str) -> datetime:
    """`--since`: an ISO 8601 time (UTC when it names no zone) or an age such as 30m, read
    as the console reads its `since` filter."""
    try:
        return parse_since(text)
    except ValueError as exc:  # argparse names the option: "argument --since: ..."
        raise argparse.ArgumentTypeError(str(exc).removeprefix("since: ")) from None
