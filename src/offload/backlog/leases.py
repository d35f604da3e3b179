"""The lease keeper: a durable backlog's thread that renews the leases it holds (and the
shared concurrency slots of its calls in flight, backlog/slots.py)."""

from __future__ import annotations

import logging
import threading

from .._guard import Guarded
from .._threads import daemon_thread
from ..core import Core
from ..records import Task
from ..stores.base import DurableStore
from ..worker import WorkerPool
from .slots import Slots

__all__ = ["LeaseKeeper"]

log = logging.getLogger("offload")


class LeaseKeeper:
    """Renews every lease in `leased`, in one store call, every `lease_timeout / 3` seconds,
    so that a long call keeps its task; its thread runs while leases are held or a worker
    runs, and exits when neither."""

    def __init__(
        self, core: Core, pool: WorkerPool, store: DurableStore, leased: dict[str, Task]
    ) -> None:
        self.core = core
        self.pool = pool
        self.store = store
        self.leased = leased  # the durable backlog's own dict: it adds and removes
        self.thread: threading.Thread | None = None
        self.slots: Slots | None = None  # shared concurrency slots, renewed with the leases
        self._wake = threading.Condition(core.lock)
        # Held while a renewal is under way, so that a task handed back meanwhile is not
        # renewed after its hand-back (and then reported lost): see `let_go`.
        self._renewing = threading.Lock()

    def let_go(self, tasks: list[Task]) -> None:
        """Lock not held: stop holding `tasks` here before the store has them back, with no
        renewal of them under way."""
        with self._renewing, self.core.lock:
            for task in tasks:
                self.leased.pop(task.id, None)

    def ensure(self) -> None:
        """Called with the lock held: make sure the keeper runs (leases are held)."""
        thread = self.thread
        if thread is not None and thread.is_alive():
            return
        thread = daemon_thread(self._run, "offload-leases")
        try:
            thread.start()
        except RuntimeError:
            return  # interpreter exit; leases then expire, and the tasks run elsewhere
        self.thread = thread

    def wake(self) -> None:
        """Called with the lock held: look again now (a worker left, shutdown began)."""
        self._wake.notify_all()

    def _run(self) -> None:
        core = self.core
        interval = self.store.lease_timeout / 3
        me = threading.current_thread()
        while True:
            with core.lock:
                if not core.forked() and (self.pool.threads or self.leased):
                    self._wake.wait(interval)
                if core.forked() or not (self.pool.threads or self.leased):
                    if self.thread is me:
                        self.thread = None
                    return
            with self._renewing:
                with core.lock:
                    held = list(self.leased.values())
                try:
                    self.store.renew(held)
                except Exception as exc:
                    with Guarded():
                        log.error("offload: could not renew %d lease(s): %s", len(held), exc)
            if self.slots is not None:
                self.slots.renew()
