"""The Store protocol: where an offloader keeps dead letters and, if durable, its tasks.

The memory store holds its queued tasks in the scheduler itself and only keeps dead
letters; durable stores (SQLite, SQS) also hold every task until it is delivered or
dead-lettered, so that a crash loses nothing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..records import DeadLetter, Task

__all__ = ["Store"]


@runtime_checkable
class Store(Protocol):
    """What an Offloader needs of a store."""

    #: The URL the store was opened from ("memory", "sqlite:///...", "sqs://...").
    url: str
    #: True when tasks survive the process (the offloader then writes each one through).
    durable: bool

    def bury(self, task: Task, letter: DeadLetter) -> None:
        """Keep a dead letter, with what is needed to replay its task."""

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter held, oldest first."""
        ...

    def __len__(self) -> int:
        """How many dead letters are held."""
        ...

    def revive(self, dead_letter_id: str) -> Task:
        """Remove a dead letter and return its task, ready to enqueue again.

        Raises UnknownDeadLetter when no dead letter has that id.
        """
        ...

    def discard(self, dead_letter_id: str) -> None:
        """Remove a dead letter; raises UnknownDeadLetter when none has that id."""

    def close(self) -> None:
        """Release connections and files."""
