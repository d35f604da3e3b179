"""Enqueues inside the application's transaction: which connection, if any, an enqueue of
this thread (or asyncio task) writes through, store by store.

`Offloader.transaction(connection)` opens a block with `joined`; while it is open, the
durable backlog's `add` asks `joined_connection(store)` and, when the block is for its
store, writes the task through the application's connection (`TransactionalStore.put_in`)
instead of its own. The binding lives in a ContextVar: it belongs to the thread or the
asyncio task that opened the block (a new thread starts with none; each task has its own
copy), so concurrent requests never write through each other's connections; a copy that
outlives the block (a task made in it) is bound no more once it has closed. Blocks nest:
an inner block for another store adds to the outer, one for the same store replaces it
until it closes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from ..stores.base import TransactionalStore

if TYPE_CHECKING:
    from ..records import Task
    from .durable import DurableBacklog

__all__ = ["joined", "joined_connection", "put_joined"]


class _Block:
    """One open block: its store (kept, so that its id cannot be reused by another object
    while the block is open), the driver connection, and whether it is still open."""

    __slots__ = ("driver", "open", "store")

    def __init__(self, store: TransactionalStore, driver: Any) -> None:
        self.store = store
        self.driver = driver
        self.open = True


_NONE: MappingProxyType[int, _Block] = MappingProxyType({})
# id(store) -> its block.
_joined: ContextVar[MappingProxyType[int, _Block]] = ContextVar(
    "offload_transaction", default=_NONE
)


@contextmanager
def joined(store: TransactionalStore, connection: Any) -> Iterator[Any]:
    """While the block runs, this context's enqueues to `store` write through
    `connection`; yields the driver connection they use."""
    driver = store.join(connection)  # TypeError/ValueError before anything is bound
    block = _Block(store, driver)
    token = _joined.set(MappingProxyType({**_joined.get(), id(store): block}))
    try:
        yield driver
    finally:
        # A copy of this context (an asyncio task made in the block, asyncio.to_thread)
        # may outlive it: closed, the block binds none of them any more.
        block.open = False
        _joined.reset(token)


def joined_connection(store: object) -> Any:
    """The application's connection this context's enqueues to `store` write through, or
    None outside such a block."""
    bound = _joined.get()
    if not bound:
        return None
    block = bound.get(id(store))
    return block.driver if block is not None and block.store is store and block.open else None


def put_joined(backlog: DurableBacklog, task: Task, connection: Any, due: float | None) -> Task:
    """Write `task` through the application's connection, in its open transaction (the
    durable backlog's `add` inside a block): not leased, not queued here (it exists once
    that transaction commits)."""
    meta = task.meta
    meta.enqueued = True
    try:
        kept = cast("TransactionalStore", backlog.store).put_in(connection, task, due=due)
    except BaseException:
        meta.enqueued = False
        raise
    core = backlog.core
    if kept is not task:  # the store found the key held (taken in that transaction)
        meta.enqueued = False
        with core.lock:
            core.ledger.deduplicated += 1
        return kept
    with core.lock:
        core.ledger.enqueued += 1
        # Not in this process's dedup index: a rollback would leave the key taken here.
        backlog.wakeups.ensure()  # so that this process hears of the commit
    return task
