"""Which task runs next: a ready queue, per-key throttle gates, and a delay heap.

A plain data structure with no threads and no lock of its own: every caller holds the
offloader's one lock (`core.Core.lock`). Everything here is O(1) or O(log n) per task,
so the lock is held for microseconds. Time comes in as arguments (monotonic seconds from
the offloader's Clock), which lets tests drive it step by step.

Gates. A throttled outcome closes the task's key until a time. While closed, the key's
tasks are set aside in order (`held`) and other keys' tasks flow. When the time comes,
one task of the key goes first as a probe; if it is not throttled again, the gate is
removed and the held tasks go back to the front of the ready queue, in order.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import Task

__all__ = ["Gate", "Scheduler"]


class Gate:
    """A throttled key: closed until `open_at`, then one probe at a time."""

    __slots__ = ("open_at", "probe")

    def __init__(self, open_at: float) -> None:
        self.open_at = open_at
        self.probe: Task | None = None

    def __repr__(self) -> str:
        return f"Gate(open_at={self.open_at:.3f}, probing={self.probe is not None})"


class Scheduler:
    """Ready queue, held tasks of gated keys, delay heap and the in-flight count."""

    def __init__(self) -> None:
        self.ready: deque[Task] = deque()
        self.held: dict[str, deque[Task]] = {}
        self.held_count = 0
        self.gates: dict[str, Gate] = {}
        self.delayed: list[tuple[float, int, Task]] = []
        self.in_flight = 0
        self._seq = itertools.count()  # ties on the heap keep insertion order

    # -- sizes ----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Tasks waiting to run now or behind a gate."""
        return len(self.ready) + self.held_count

    def size(self) -> int:
        """Tasks held (queued + delayed), the figure `max_queue` bounds."""
        return len(self.ready) + self.held_count + len(self.delayed)

    def idle(self) -> bool:
        """Nothing queued, delayed or running."""
        return not (self.ready or self.held_count or self.delayed or self.in_flight)

    # -- adding ---------------------------------------------------------------------------

    def put(self, task: Task) -> None:
        self.ready.append(task)

    def delay(self, task: Task, due: float) -> None:
        heapq.heappush(self.delayed, (due, next(self._seq), task))

    def close_gate(self, key: str, until: float) -> None:
        """Close `key` until `until` (or later, if it is closed longer already), ahead of
        the `settle()` that records the throttle (a durable store's hand-back takes a
        round trip, and other workers must not call the throttled API meanwhile)."""
        gate = self.gates.get(key)
        if gate is None:
            self.gates[key] = Gate(until)
        else:
            gate.open_at = max(gate.open_at, until)

    def closed_until(self, now: float) -> dict[str, float]:
        """The keys whose gates are closed at `now` (or probing), with their reopening
        times: a durable store leaves their tasks for other processes, or for later."""
        return {
            key: gate.open_at
            for key, gate in self.gates.items()
            if gate.probe is not None or now < gate.open_at
        }

    # -- taking ---------------------------------------------------------------------------

    def take(self, now: float) -> Task | None:
        """The next task that may run at `now`, counted in flight; None if there is none."""
        delayed = self.delayed
        ready = self.ready
        while delayed and delayed[0][0] <= now:
            ready.append(heapq.heappop(delayed)[2])
        gates = self.gates
        while ready:
            task = ready.popleft()
            key = task.key
            if key is not None and gates:
                gate = gates.get(key)
                if gate is not None:
                    if gate.probe is not None or now < gate.open_at:
                        self._hold(key, task)
                        continue
                    gate.probe = task
            self.in_flight += 1
            return task
        # Nothing ready: a gate whose time has come lets its first held task probe.
        for key, gate in gates.items():
            if gate.probe is None and now >= gate.open_at:
                held = self.held.get(key)
                if held:
                    task = held.popleft()
                    self.held_count -= 1
                    gate.probe = task
                    self.in_flight += 1
                    return task
        return None

    def _hold(self, key: str, task: Task) -> None:
        held = self.held.get(key)
        if held is None:
            held = self.held[key] = deque()
        held.append(task)
        self.held_count += 1

    def next_wake(self, now: float) -> float | None:
        """Seconds until a delayed task is due or a gate with held tasks opens.

        None when nothing can become ready with time alone (a probe in flight will settle).
        """
        due = self.delayed[0][0] if self.delayed else None
        for key, gate in self.gates.items():
            waiting = gate.probe is None and self.held.get(key)
            if waiting and (due is None or gate.open_at < due):
                due = gate.open_at
        if due is None:
            return None
        return max(0.0, due - now)

    def next_opening(self, now: float) -> float | None:
        """Seconds until the next closed gate reopens; None if none is closed."""
        opening = [gate.open_at - now for gate in self.gates.values() if gate.open_at > now]
        return min(opening) if opening else None

    # -- settling -------------------------------------------------------------------------

    def settle(self, task: Task, throttled_until: float | None) -> bool:
        """Account for a finished attempt; returns True if queued tasks were released.

        `throttled_until`: the attempt was throttled, and its key stays closed until then.
        """
        self.in_flight -= 1
        key = task.key
        if key is None:
            return False
        gate = self.gates.get(key)
        if throttled_until is not None:
            if gate is None:
                self.gates[key] = Gate(throttled_until)
            else:
                gate.open_at = max(gate.open_at, throttled_until)
                if gate.probe is task:
                    gate.probe = None
            return False
        if gate is not None and gate.probe is task:
            # The probe got through: the key is healthy again.
            del self.gates[key]
            held = self.held.pop(key, None)
            if held:
                self.held_count -= len(held)
                held.reverse()
                self.ready.extendleft(held)
                return True
        return False

    # -- shutdown -------------------------------------------------------------------------

    def nothing_due_before(self, deadline: float) -> bool:
        """Nothing ready or running, and nothing delayed or gated can run before `deadline`."""
        if self.ready or self.in_flight:
            return False
        if self.delayed and self.delayed[0][0] < deadline:
            return False
        for key, gate in self.gates.items():
            if self.held.get(key) and gate.open_at < deadline:
                return False
        return True

    def drain(self) -> list[Task]:
        """Remove and return every task not in flight, oldest first as far as known."""
        tasks = list(self.ready)
        for held in self.held.values():
            tasks.extend(held)
        tasks.extend(entry[2] for entry in sorted(self.delayed))
        self.ready.clear()
        self.held.clear()
        self.held_count = 0
        self.delayed.clear()
        for gate in self.gates.values():
            gate.probe = None
        return tasks

    def snapshot(self) -> dict[str, float]:
        """Gated keys and the monotonic times their gates open (Offloader.gates() turns them
        into seconds from now)."""
        return {key: gate.open_at for key, gate in self.gates.items()}
