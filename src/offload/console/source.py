"""What the console shows and acts on: an Offloader (its store, stats and keys), the
default offloader, or a durable store alone (the `offload console` command's case: the
calls are performed by other processes, which replays hand their tasks back to)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import _default
from .._redact import redact_url
from ..codec.trust import Trust
from ..errors import UnknownDeadLetter
from ..health_check import store_health
from ..offloader import Offloader
from ..status import Health, KeyState
from ..stores import Store, open_store
from ..stores.base import DurableStore, LetterDetail, LetterPage, LetterQuery, LetterTally

__all__ = ["PAGE", "Source"]

PAGE = 50  # dead letters a page


class Source:
    """The console's one way in to offload (see the module docstring)."""

    def __init__(self, target: Offloader | Store | str | None) -> None:
        self._offloader: Callable[[], Offloader | None]
        self._store: Store | None = None
        if target is None:
            self._offloader = _default.get  # the default as it is at each request
        elif isinstance(target, Offloader):
            self._offloader = lambda: target
        else:
            store = open_store(target) if isinstance(target, str) else target
            if not isinstance(store, Store):
                raise TypeError(
                    "make_app takes an Offloader, a store URL or a Store, "
                    f"got {type(target).__name__}"
                )
            if not store.durable:
                raise ValueError(
                    "the memory store lives inside one Offloader: pass that Offloader "
                    "to make_app (or a durable store's URL)"
                )
            if isinstance(target, str):
                # Opened here, for the console alone: a replay moves the row back and
                # never imports the function it names (a dead letter may be one a worker
                # refused), as the CLI's commands (cli/common.py).
                store.trust = Trust("registered")  # type: ignore[attr-defined]  # durable
            self._store = store
            self._offloader = lambda: None

    @property
    def offloader(self) -> Offloader | None:
        return self._offloader()

    @property
    def store(self) -> Store:
        offloader = self._offloader()
        if offloader is not None:
            return offloader.store
        assert self._store is not None
        return self._store

    @property
    def store_url(self) -> str:
        return redact_url(self.store.url)

    def stats(self) -> dict[str, Any]:
        """The offloader's Stats, or what a store alone holds, as JSON-ready figures."""
        offloader = self._offloader()
        if offloader is not None:
            return offloader.stats().to_json()
        store: DurableStore = self.store  # type: ignore[assignment]  # durable: checked
        counts = store.counts()
        return {
            "stored_ready": counts.ready,
            "stored_delayed": counts.delayed,
            "stored_leased": counts.leased,
            "dead_letters": counts.dead_letters,
        }

    def keys(self) -> list[KeyState] | None:
        """Each key's state in this process (None for a store alone: no scheduler here)."""
        offloader = self._offloader()
        return None if offloader is None else list(offloader.keys().values())

    def page(self, query: LetterQuery, cursor: str | None, limit: int = PAGE) -> LetterPage:
        """A page of dead letters; ValueError for a cursor that is none of the store's
        (each store reads its own: the console passes it on as it came)."""
        return self.store.dead_letter_page(query, limit=limit, cursor=cursor)

    def matching_ids(self, query: LetterQuery) -> list[str]:
        """Every id `query` matches now, newest first (a bulk action's list)."""
        ids: list[str] = []
        cursor = None
        while True:
            page = self.store.dead_letter_page(query, limit=1000, cursor=cursor)
            ids += [letter.id for letter in page.letters]
            cursor = page.cursor
            if cursor is None:
                return ids

    def detail(self, dead_letter_id: str) -> LetterDetail:
        return self.store.dead_letter_detail(_possible(dead_letter_id))

    def tally(self) -> LetterTally:
        return self.store.dead_letter_tally()

    def replay(self, dead_letter_id: str) -> str:
        """Replay one dead letter; the task's id."""
        _possible(dead_letter_id)
        offloader = self._offloader()
        if offloader is not None:
            return offloader.replay(dead_letter_id).id
        store: DurableStore = self.store  # type: ignore[assignment]  # durable: checked
        return store.replay(dead_letter_id).id

    def discard(self, dead_letter_id: str) -> None:
        self.store.discard(_possible(dead_letter_id))

    def purge(self) -> int:
        return self.store.purge()

    def health(self, max_age: float | None, max_dead_letters: int | None) -> Health:
        offloader = self._offloader()
        if offloader is not None:
            return offloader.health(max_age=max_age, max_dead_letters=max_dead_letters)
        return store_health(
            self.store, time.time(), max_age=max_age, max_dead_letters=max_dead_letters
        )

    def metrics(self) -> bytes:
        """The Prometheus exposition (ImportError without prometheus_client)."""
        from ..metrics import exposition  # noqa: PLC0415 - an optional extra

        offloader = self._offloader()
        return exposition(offloader) if offloader is not None else exposition(store=self.store)


def _possible(dead_letter_id: str) -> str:
    """`dead_letter_id` if a store could hold it; UnknownDeadLetter for one with a NUL
    (which PostgreSQL cannot even look up: every store answers the same, "no such id")."""
    if "\x00" in dead_letter_id:
        raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")
    return dead_letter_id
