"""Where an offloader's tasks wait between enqueue and settle: two implementations.

- `MemoryBacklog` (memory store): the scheduler holds every task; what is undelivered at
  shutdown becomes dead letters with reason "shutdown".
- `DurableBacklog` (SQLite, SQS, any DurableStore): the store holds every task; this
  process holds a working set of leased tasks in the scheduler, claims more when it runs
  out, renews their leases and hands back what it will not perform.

Both implement `base.Backlog`, the seam between the pipeline's stages and the store.
"""

from __future__ import annotations

from .base import Backlog, Take
from .durable import DurableBacklog
from .memory import MemoryBacklog

__all__ = ["Backlog", "DurableBacklog", "MemoryBacklog", "Take"]
