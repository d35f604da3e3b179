"""`offload dead-letters list|show|replay|discard|purge` and `offload stats`: each opens
the store, does one thing and prints it (a table, or JSON with --json)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TextIO

from ..errors import UnknownDeadLetter
from ..limits import normalise_key
from ..records import DeadLetter
from ..stores import DurableStore
from .common import CommandError, UsageError, dump, open_durable, printable

__all__ = [
    "discard_letters",
    "list_letters",
    "print_stats",
    "purge_letters",
    "replay_letters",
    "show_letter",
]


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _clip(text: str, width: int) -> str:
    text = printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"


def table(letters: Sequence[DeadLetter], out: TextIO) -> None:
    rows = [
        (
            printable(letter.id),
            printable(letter.reason),
            "-" if letter.status is None else str(letter.status),
            str(letter.attempts),
            _when(letter.last_attempt_at),
            printable(letter.key or "-"),
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


def key_of(given: str, letters: list[DeadLetter]) -> str:
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
    listed = printable(", ".join(sorted(keys))) if keys else "none"
    raise CommandError(f"no dead letter has the key {given!r}; their keys: {listed}")


def matching(letters: list[DeadLetter], args: argparse.Namespace) -> list[DeadLetter]:
    status, since = args.status, args.since
    key = None if args.key is None else key_of(args.key, letters)
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


def list_letters(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = open_durable(args)
    try:
        letters = matching(store.dead_letters(), args)
    finally:
        store.close()
    if args.json:
        dump([letter.to_json() for letter in letters], out)
    elif letters:
        table(letters, out)
    else:
        out.write("no dead letters\n")
    return 0


def find(store: DurableStore, dead_letter_id: str) -> DeadLetter:
    one = getattr(store, "dead_letter", None)  # a direct lookup where the store has one
    if one is not None:
        letter: DeadLetter = one(dead_letter_id)
        return letter
    for letter in store.dead_letters():
        if letter.id == dead_letter_id:
            return letter
    raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")


def show_letter(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = open_durable(args)
    try:
        letter = find(store, args.id)
    finally:
        store.close()
    if args.json:
        dump(letter.to_json(), out)
        return 0
    fields = letter.to_json()
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        out.write(f"{name.ljust(width)}  {'-' if value is None else printable(str(value))}\n")
    return 0


def each(
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


def replay_letters(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if bool(args.ids) == bool(args.all):
        raise UsageError("give dead letter IDs or --all (not both)")
    if args.ids and (args.key is not None or args.status is not None or args.since is not None):
        raise UsageError("--key, --status and --since go with --all")
    store = open_durable(args)
    try:
        if args.all:
            letters = matching(store.dead_letters(), args)
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
                return f"would replay {letter.id}: {printable(letter.description)}"

            return each(out, err, ids, would)

        def replay(dead_letter_id: str) -> str:
            task = store.replay(dead_letter_id)
            return f"replayed {dead_letter_id} (task {task.id})"

        return each(out, err, ids, replay)
    finally:
        store.close()


def discard_letters(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = open_durable(args)
    try:

        def discard(dead_letter_id: str) -> str:
            store.discard(dead_letter_id)
            return f"discarded {dead_letter_id}"

        return each(out, err, args.ids, discard)
    finally:
        store.close()


def purge_letters(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = open_durable(args)
    try:
        removed = store.purge()
    finally:
        store.close()
    out.write(f"purged {removed} dead letter(s)\n")
    return 0


def print_stats(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    store = open_durable(args)
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
        dump(figures, out)
        return 0
    for name, value in figures.items():
        out.write(f"{name.replace('_', ' '):<13}{value}\n")
    return 0
