"""Which task runs next: a ready queue, per-key gates and paces, and a delay heap.

A plain data structure with no threads and no lock of its own: every caller holds the
offloader's one lock (`core.Core.lock`). Everything here is O(1) or O(log n) per task
(and O(keys waiting for a pace) at most), so the lock is held for microseconds. Time
comes in as arguments (monotonic seconds from the offloader's Clock), which lets tests
drive it step by step.

Gates. A throttled outcome closes the task's key until a time. While closed, the key's
tasks are set aside in order (`held`) and other keys' tasks flow. When the time comes,
one task of the key goes first as a probe; if it is not throttled again, the gate is
removed and the held tasks go back to the front of the ready queue, in order. A key whose
calls keep failing (connection errors, timeouts, 5xx from several of its tasks in a row,
nothing succeeding) is closed the same way: an outage is paused, not hammered.

Paces (`limits.py`). A key with a declared Limit, or one the adaptive rate has learnt,
starts a call only when its pace has a token and a free slot; until then its tasks are
held in order, and the key's next token is among the times a worker wakes for. Over a
store that keeps rate budgets (`shared_rates`), a declared rate's token also comes from
the budget every process on the store shares: `wanting()` names the keys waiting for
one, and the durable backlog asks the store for them with the lock let go; a declared
concurrency's slot too (`Pace.slots`, backlog/slots.py).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from .limits import Limit, Pace

if TYPE_CHECKING:
    from .records import Task

__all__ = ["OUTAGE_AFTER", "Gate", "Pause", "Scheduler", "next_probe"]

OUTAGE_AFTER = 3
"""Distinct tasks of a key failing in a row, nothing succeeding, that make it suspect, and
probes failing then that make it an outage..."""
OUTAGE_SECONDS = 1.0
"""... over at least this long: a few unlucky calls in a row are not an outage."""
SUSPECT_HOLD = 0.25
"""Seconds a suspect key is held before each probe."""
_MAX_IDLE_PACES = 1_000  # paces kept before quiet, unthrottled ones are dropped
FIRST_PAUSE = 1.0
MAX_PAUSE = 60.0


class Pause(NamedTuple):
    """What `Scheduler.failed` says of a key whose calls keep failing."""

    seconds: float  # the key is held this long at least
    down: bool  # an outage: its calls wait as a throttle's do (False: only suspected)
    news: bool = False  # it has just gone down (logged once)


class Gate:
    """A closed key: closed until `open_at`, then one probe at a time."""

    __slots__ = ("counted", "open_at", "probe")

    def __init__(self, open_at: float) -> None:
        self.open_at = open_at
        self.probe: Task | None = None
        self.counted = False  # its throttle cut the key's adaptive rate already

    def __repr__(self) -> str:
        return f"Gate(open_at={self.open_at:.3f}, probing={self.probe is not None})"


class _Outage:
    """A key's failures in a row, and its pause once they made it an outage."""

    __slots__ = ("failing", "first", "pause", "probes", "since")

    def __init__(self, now: float) -> None:
        self.failing: set[str] = set()  # ids of the tasks that failed since the last success
        self.first = now  # the first of those failures
        self.probes = 0  # probes failed while it was suspect
        self.pause = 0.0  # seconds; 0.0 while the key is not (yet) down
        self.since = 0.0  # when it went down

    def failed(self, task_id: str, probe: bool, open_at: float | None, now: float) -> Pause | None:
        """A transient failure of a task of the key (`probe`: the one call its gate let
        through; `open_at`: when its gate opens, if it has one).

        OUTAGE_AFTER of its tasks failing in a row, nothing succeeding, make the key
        suspect: it is held for SUSPECT_HOLD and then tried one probe at a time (a refused
        connection fails in a millisecond: without the hold every queued call would spend
        an attempt at once). OUTAGE_AFTER probes failing too, OUTAGE_SECONDS after the
        first failure or more, make it an outage, paused longer each time a probe fails.
        Calls that were in flight when the key closed are echoes of the same failure:
        they wait out the hold or pause without growing it.
        """
        echo = open_at is not None and not probe and now < open_at
        if self.pause:
            if echo:
                assert open_at is not None
                return Pause(open_at - now, down=True)
            if probe:
                self.pause = min(MAX_PAUSE, self.pause * 2)
            return Pause(self.pause, down=True)
        self.failing.add(task_id)
        if len(self.failing) < OUTAGE_AFTER:
            return None
        if echo:
            assert open_at is not None
            return Pause(open_at - now, down=False)
        if probe:
            self.probes += 1
        if self.probes < OUTAGE_AFTER or now - self.first < OUTAGE_SECONDS:
            return Pause(SUSPECT_HOLD, down=False)
        self.pause, self.since = FIRST_PAUSE, now
        self.failing.clear()
        return Pause(self.pause, down=True, news=True)


class Scheduler:
    """Ready queue, held tasks of gated and paced keys, delay heap and in-flight counts."""

    def __init__(self, limits: Mapping[str, Limit] | None = None, adaptive: bool = False) -> None:
        self.ready: deque[Task] = deque()
        self.held: dict[str, deque[Task]] = {}
        self.held_count = 0
        self.gates: dict[str, Gate] = {}
        self.delayed: list[tuple[float, int, Task]] = []
        self.in_flight = 0
        self.running: dict[str, int] = {}  # calls in flight, per key
        self.limits: Mapping[str, Limit] = dict(limits or {})
        self.adaptive = adaptive
        self.paces: dict[str, Pace] = {}
        #: Declared rates and concurrencies take tokens and slots from the store's shared
        #: budgets too (set by a durable backlog whose store keeps them).
        self.shared_rates = False
        self._paced: dict[str, None] = {}  # keys with held tasks waiting for their pace
        self._outages: dict[str, _Outage] = {}
        self._seq = itertools.count()  # ties on the heap keep insertion order

    # -- sizes ----------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Tasks waiting to run now, behind a gate or for a pace."""
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
        if self._paced:  # held for a pace whose token has come: they were first
            task = self._take_paced(now)
            if task is not None:
                return task
        gates = self.gates
        paces = self.paces
        limits = self.limits
        while ready:
            task = ready.popleft()
            key = task.key
            if key is not None:
                gate = gates.get(key) if gates else None
                if gate is not None and (gate.probe is not None or now < gate.open_at):
                    self._hold(key, task)
                    continue
                pace = paces.get(key) if paces or limits or self.adaptive else None
                if pace is None and (self.adaptive or key in limits):
                    pace = self._new_pace(key, now)
                if pace is not None:
                    if key in self._paced or pace.wait(now) != 0.0:
                        self._hold(key, task)
                        if gate is None:
                            self._paced[key] = None
                        continue
                    pace.start(now)
                if gate is not None:
                    gate.probe = task
                self.running[key] = self.running.get(key, 0) + 1
            self.in_flight += 1
            return task
        # Nothing ready: a gate whose time has come lets its first held task probe.
        for key, gate in gates.items():
            if gate.probe is None and now >= gate.open_at:
                held = self.held.get(key)
                pace = paces.get(key)
                if held and (pace is None or pace.wait(now) == 0.0):
                    task = self._unhold(key)
                    gate.probe = task
                    self._start(key, task, pace, now)
                    return task
        return None

    def _new_pace(self, key: str, now: float) -> Pace:
        paces = self.paces
        if len(paces) >= _MAX_IDLE_PACES:
            self._forget_idle_paces(now)
        limit = self.limits.get(key)
        pace = paces[key] = Pace(limit, self.adaptive, now, shared=self.shared_rates)
        return pace

    def wanting(self, now: float) -> list[tuple[str, int]]:
        """Keys whose held calls may start at `now` but for tokens of the shared budget,
        that nobody here is asking the store for yet, with how many could start (one
        for a gated key's probe)."""
        if not self.shared_rates or not self.held:
            return []
        keys = []
        gates = self.gates
        for key, held in self.held.items():
            pace = self.paces.get(key)
            count = 0 if pace is None else pace.wants_tokens(now)
            if not count:
                continue
            gate = gates.get(key)
            if gate is None:
                keys.append((key, min(count, len(held))))
            elif gate.probe is None and now >= gate.open_at:
                keys.append((key, 1))
        return keys

    def _forget_idle_paces(self, now: float) -> None:
        """Drop what the adaptive rate knows of keys that are quiet and never throttled (a
        key per user would keep one each otherwise)."""
        for key in [k for k, p in self.paces.items() if p.idle(now) and k not in self.held]:
            if key not in self.limits:
                del self.paces[key]

    def _take_paced(self, now: float) -> Task | None:
        for key in self._paced:
            if key in self.gates:
                continue  # closed meanwhile: the gate decides, and releases them
            pace = self.paces[key]
            if pace.wait(now) == 0.0:
                task = self._unhold(key)
                self._start(key, task, pace, now)
                return task
        return None

    def _start(self, key: str, task: Task, pace: Pace | None, now: float) -> None:
        if pace is not None:
            pace.start(now)
        self.running[key] = self.running.get(key, 0) + 1
        self.in_flight += 1

    def _hold(self, key: str, task: Task) -> None:
        held = self.held.get(key)
        if held is None:
            held = self.held[key] = deque()
        held.append(task)
        self.held_count += 1

    def _unhold(self, key: str) -> Task:
        held = self.held[key]
        task = held.popleft()
        self.held_count -= 1
        if not held:
            del self.held[key]
            self._paced.pop(key, None)
        return task

    def next_wake(self, now: float) -> float | None:
        """Seconds until a delayed task is due, a gate with held tasks opens or a paced key
        has its next token.

        None when nothing can become ready with time alone (a probe or a call holding a
        key's last slot in flight will settle).
        """
        due = self.delayed[0][0] if self.delayed else None
        for key, gate in self.gates.items():
            if gate.probe is not None or not self.held.get(key):
                continue
            at = gate.open_at
            pace = self.paces.get(key)
            if pace is not None and at <= now:  # open, but its probe waits for the pace
                wait = pace.wait(now)
                if wait is None:
                    continue
                at = now + wait
            if due is None or at < due:
                due = at
        for key in self._paced:
            if key in self.gates:
                continue
            wait = self.paces[key].wait(now)
            if wait is not None and (due is None or now + wait < due):
                due = now + wait
        if due is None:
            return None
        return max(0.0, due - now)

    def next_opening(self, now: float) -> float | None:
        """Seconds until the next closed gate reopens; None if none is closed."""
        opening = [gate.open_at - now for gate in self.gates.values() if gate.open_at > now]
        return min(opening) if opening else None

    # -- settling -------------------------------------------------------------------------

    def settle(
        self,
        task: Task,
        throttled_until: float | None,
        *,
        now: float | None = None,
        delivered: bool = False,
    ) -> bool:
        """Account for a finished attempt; returns True if queued tasks were released.

        `throttled_until`: the attempt was throttled, and its key stays closed until then.
        `delivered`: it succeeded (the key's adaptive rate grows, an outage is over).
        `now` is needed for the adaptive rate only.
        """
        self.in_flight -= 1
        key = task.key
        if key is None:
            return False
        running = self.running.get(key, 0) - 1
        if running > 0:
            self.running[key] = running
        else:
            self.running.pop(key, None)
        pace = self.paces.get(key)
        if pace is not None:
            pace.finish()
        gate = self.gates.get(key)
        if throttled_until is not None:
            if gate is None:
                gate = self.gates[key] = Gate(throttled_until)
            else:
                gate.open_at = max(gate.open_at, throttled_until)
            event = not gate.counted or gate.probe is task  # a new throttle, not its echo
            if gate.probe is task:
                gate.probe = None
            if event and now is not None and self.adaptive:
                gate.counted = True
                if pace is None:  # dropped while quiet: it counts from now on
                    pace = self._new_pace(key, now)
                    pace.running = running if running > 0 else 0
                pace.throttled(now)
            return False
        if delivered and pace is not None and now is not None:
            pace.succeeded(now)
        if gate is not None and gate.probe is task:
            # The probe got an answer that was not a throttle: the key is open again.
            del self.gates[key]
            held = self.held.pop(key, None)
            self._paced.pop(key, None)
            if held:
                self.held_count -= len(held)
                held.reverse()
                self.ready.extendleft(held)
                return True
        return False

    # -- outages --------------------------------------------------------------------------

    def failed(self, task: Task, now: float) -> Pause | None:
        """A transient failure of `task` (connection error, timeout, 5xx): how long its key
        is held (see `_Outage.failed`), or None if nothing says it is down. The key's gate
        is closed here, so that no other worker starts a call of it meanwhile."""
        key = task.key
        if key is None:
            return None
        outage = self._outages.get(key)
        if outage is None:
            outage = self._outages[key] = _Outage(now)
        gate = self.gates.get(key)
        probe = gate is not None and gate.probe is task
        pause = outage.failed(task.id, probe, None if gate is None else gate.open_at, now)
        if pause is not None:
            if probe and not pause.down:
                assert gate is not None
                gate.probe = None  # the hold goes on: settle() must not release its backlog
            self.close_gate(key, now + pause.seconds)
        return pause

    def succeeded(self, task: Task, now: float) -> float | None:
        """A success of `task`: how long its key had been down, if it was (None if not)."""
        key = task.key
        if key is None or not self._outages:
            return None
        outage = self._outages.pop(key, None)
        if outage is None or not outage.pause:
            return None
        return now - outage.since

    def down(self, key: str) -> bool:
        """True while `key` is paused for an outage."""
        outage = self._outages.get(key)
        return outage is not None and outage.pause > 0

    # -- shutdown -------------------------------------------------------------------------

    def nothing_due_before(self, deadline: float) -> bool:
        """Nothing ready or running, and nothing delayed, gated or paced can run before
        `deadline`."""
        if self.ready or self.in_flight:
            return False
        if self.delayed and self.delayed[0][0] < deadline:
            return False
        for key, gate in self.gates.items():
            if self.held.get(key) and gate.open_at < deadline:
                return False
        return not self._paced  # a paced key runs as soon as its next token comes

    def drain(self) -> list[Task]:
        """Remove and return every task not in flight, oldest first as far as known."""
        tasks = list(self.ready)
        for held in self.held.values():
            tasks.extend(held)
        tasks.extend(entry[2] for entry in sorted(self.delayed))
        self.ready.clear()
        self.held.clear()
        self._paced.clear()
        self.held_count = 0
        self.delayed.clear()
        for gate in self.gates.values():
            gate.probe = None
        return tasks

    def snapshot(self) -> dict[str, float]:
        """Gated keys and the monotonic times their gates open (Offloader.gates() turns them
        into seconds from now)."""
        return {key: gate.open_at for key, gate in self.gates.items()}

    def known_keys(self) -> set[str]:
        """Every key the scheduler knows a state of: gated, limited, held or running."""
        return {*self.gates, *self.paces, *self.held, *self.running, *self.limits}


def next_probe(sched: Scheduler, key: str) -> None:
    """A throttled task of `key` gave up (settled, its gate closed): the key's first held
    task probes in its place, put on the delay heap for the gate's reopening as a retry
    is; left held, it would probe only once the ready queue is empty, which other keys'
    calls may never leave it."""
    gate = sched.gates.get(key)
    if gate is not None and gate.probe is None and sched.held.get(key):
        sched.delay(sched._unhold(key), gate.open_at)
