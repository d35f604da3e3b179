"""What the `offload` commands share: their errors, the store `--store` names, JSON output."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, TextIO

from ..codec.trust import Trust
from ..stores import DurableStore, Store, open_store

__all__ = ["CommandError", "UsageError", "dump", "open_durable", "printable", "store_url"]


class CommandError(Exception):
    """A one-line error for the user (exit status 1)."""


class UsageError(Exception):
    """A command given the wrong arguments (exit status 2, as argparse's own errors)."""


def store_url(args: argparse.Namespace) -> str:
    """The URL `--store` or OFFLOAD_STORE gives; CommandError for none, or the memory store."""
    url: str | None = args.store or os.environ.get("OFFLOAD_STORE") or None
    if url is None:
        raise CommandError("no store: pass --store URL or set OFFLOAD_STORE")
    if url.strip().lower() in ("memory", "memory://"):
        raise CommandError(
            "the memory store lives inside one process; the offload command needs a durable "
            "store (sqlite:///path.db, sqs://queue-name?region=... or postgresql://user@host/db)"
        )
    return url


def open_durable(args: argparse.Namespace, *, must_exist: bool = True) -> DurableStore:
    """The durable store `--store` names. A SQLite file that is not there, or a database
    without the store's tables, is an error (a typo must not make an empty store), unless
    the worker is told to `--create` it."""
    from ..stores.sqlite import SQLiteStore  # noqa: PLC0415

    store: Store = open_store(store_url(args))  # a SQLite file is opened on first use
    if must_exist and isinstance(store, SQLiteStore) and not os.path.exists(store.path):
        raise CommandError(f"no store at {store.path}: the file does not exist")
    exists = getattr(store, "exists", None)  # a database: are the store's tables there?
    if must_exist and exists is not None and not exists():
        store.close()
        raise CommandError(f"no store at {store.url}: the database has no offload tables")
    if not store.durable:
        store.close()
        raise CommandError(f"{store.url} is not a durable store")
    # The commands move rows and print ids: a replayed task's function is never imported
    # here (this process registers none), since a dead letter may be one a worker refused.
    store.trust = Trust("registered")  # type: ignore[attr-defined]  # durable: it has trust
    return store  # type: ignore[return-value]  # durable: it has the DurableStore methods


def printable(text: str) -> str:
    """`text` with each character a terminal would act on (ESC, BEL, any other control, a
    bidi override) written as repr writes it (`\\x1b`): a dead letter's error, key and
    reason phrase are a third party's text, and must not retitle, clear or recolour the
    operator's terminal. Old dead letters in a store may hold such characters."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def dump(value: Any, out: TextIO) -> None:
    """`value` as indented JSON, one document per command."""
    json.dump(value, out, indent=2, ensure_ascii=False)
    out.write("\n")
