"""The default store: dead letters in a bounded dict, tasks only in the scheduler."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..codec.view import view_of
from ..errors import UnknownDeadLetter
from ..records import DeadLetter, Task
from ._shared import check_page, page_of, tally_of
from .base import LetterDetail, LetterPage, LetterQuery, LetterTally

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps the newest `max_dead_letters` dead letters; counts the ones it let go. Each
    is numbered as it is buried (the console's pages carry on below a number)."""

    url = "memory"
    durable = False

    def __init__(self, max_dead_letters: int = 1_000) -> None:
        self.max_dead_letters = max_dead_letters
        self.dropped = 0
        self._letters: OrderedDict[str, tuple[int, DeadLetter, Task]] = OrderedDict()
        self._buried = 0
        self._lock = threading.Lock()

    def bury(self, task: Task, letter: DeadLetter) -> None:
        with self._lock:
            self._buried += 1
            self._letters.pop(letter.id, None)  # buried again: the newest, renumbered
            self._letters[letter.id] = (self._buried, letter, task)
            while len(self._letters) > self.max_dead_letters:
                self._letters.popitem(last=False)
                self.dropped += 1

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            return [letter for _, letter, _ in self._letters.values()]

    def __len__(self) -> int:
        return len(self._letters)

    def dead_letter_page(
        self, query: LetterQuery, *, limit: int = 50, cursor: str | None = None
    ) -> LetterPage:
        after = check_page(limit, cursor)
        with self._lock:
            letters = [(number, letter) for number, letter, _ in self._letters.values()]
        return page_of(letters, query, limit, after, str)

    def dead_letter_detail(self, dead_letter_id: str) -> LetterDetail:
        with self._lock:
            try:
                _, letter, task = self._letters[dead_letter_id]
            except KeyError:
                raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}") from None
        return LetterDetail(
            letter, view_of(task.call, task.args, task.kwargs, task.idempotency_key)
        )

    def dead_letter_tally(self, *, limit: int = 20) -> LetterTally:
        return tally_of(self.dead_letters(), limit)

    def revive(self, dead_letter_id: str) -> Task:
        with self._lock:
            try:
                _, _, task = self._letters.pop(dead_letter_id)
            except KeyError:
                raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}") from None
        return task

    def discard(self, dead_letter_id: str) -> None:
        with self._lock:
            if self._letters.pop(dead_letter_id, None) is None:
                raise UnknownDeadLetter(f"no dead letter with id {dead_letter_id!r}")

    def purge(self) -> int:
        with self._lock:
            removed = len(self._letters)
            self._letters.clear()
        return removed

    def close(self) -> None:
        pass

    def after_fork(self) -> None:
        # The child starts empty: the parent's dead letters stay the parent's.
        self._letters = OrderedDict()
        self._lock = threading.Lock()
        self.dropped = 0
        self._buried = 0

    def __repr__(self) -> str:
        return f"MemoryStore(max_dead_letters={self.max_dead_letters})"
