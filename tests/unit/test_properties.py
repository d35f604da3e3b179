"""Property tests (hypothesis) for scheduling: the ledger holds, gates never open early,
one probe at a time, no task lost, duplicated or stranded.

Two levels:

- `SchedulerMachine` drives `offload.scheduler.Scheduler` directly against a model, with
  time as a number: random enqueues over several keys, takes, outcomes (success,
  transient, throttled until a time, permanent) settled as the Offloader settles them
  (a retry delayed here, or handed back to a durable store), and clock advances; and,
  now and then, runs everything to the end to show that nothing strands.
- `test_offloader_on_a_fake_clock` runs random scripts of outcomes through a real
  Offloader (two workers) on `offload.testing.FakeClock`, advancing time only when every
  worker is parked, and checks each task's fate against what its script and the policy
  say, and that no call of a throttled key starts before its Retry-After.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import tenacity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from offload import GiveUp, Offloader, Retry, RetryPolicy, Task
from offload.scheduler import Scheduler
from offload.testing import FakeClock

KEYS = ["a", "b", "c", None]

# -- the scheduler against a model ---------------------------------------------------------


class FakeTask:
    """What the scheduler looks at: a key (and an id for the model)."""

    __slots__ = ("id", "key")

    def __init__(self, id: int, key: str | None) -> None:
        self.id = id
        self.key = key

    def __repr__(self) -> str:
        return f"T{self.id}:{self.key}"


@dataclass
class ModelGate:
    open_at: float
    probe: int | None = None


@dataclass
class Model:
    waiting: dict[int, float] = field(default_factory=dict)  # task id -> due time
    in_flight: dict[int, FakeTask] = field(default_factory=dict)
    gates: dict[str, ModelGate] = field(default_factory=dict)
    enqueued: int = 0
    done: int = 0
    dead: int = 0
    handed_back: int = 0  # a durable store's retries leave this process


class SchedulerMachine(RuleBasedStateMachine):
    """The Scheduler, step by step, checked against a model after every step."""

    @initialize()
    def start(self) -> None:
        self.sched = Scheduler()
        self.model = Model()
        self.now = 0.0
        self.ids = itertools.count()
        self.tasks: dict[int, FakeTask] = {}

    # -- rules ----------------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS), count=st.integers(1, 3))
    def enqueue(self, key: str | None, count: int) -> None:
        for _ in range(count):
            task = FakeTask(next(self.ids), key)
            self.tasks[task.id] = task
            self.sched.put(task)  # type: ignore[arg-type]
            self.model.waiting[task.id] = self.now
            self.model.enqueued += 1

    @rule()
    def take(self) -> None:
        task: Any = self.sched.take(self.now)
        if task is None:
            runnable = [i for i, due in self.model.waiting.items() if self._may_run(i, due)]
            assert not runnable, f"take() returned None at {self.now} with {runnable} runnable"
            return
        assert task.id in self.model.waiting, f"{task} taken but not waiting (duplicate?)"
        due = self.model.waiting.pop(task.id)
        assert due <= self.now, f"{task} taken at {self.now}, due at {due}"
        gate = self.model.gates.get(task.key) if task.key is not None else None
        if gate is not None:
            assert self.now >= gate.open_at, f"{task} taken at {self.now}, gate opens {gate}"
            assert gate.probe is None, f"{task} taken while T{gate.probe} probes"
            gate.probe = task.id
        self.model.in_flight[task.id] = task

    @precondition(lambda self: self.model.in_flight)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["success", "transient", "throttled", "permanent"]),
        delay=st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5, 30.0]),
        hand_back=st.booleans(),
    )
    def settle(self, data: st.DataObject, outcome: str, delay: float, hand_back: bool) -> None:
        task = self.model.in_flight.pop(
            data.draw(st.sampled_from(sorted(self.model.in_flight)), label="task")
        )
        sched, model, due = self.sched, self.model, self.now + delay
        gate = model.gates.get(task.key) if task.key is not None else None
        # As Offloader._settle does it: a throttle closes the key until the retry's due.
        # Over a durable store a retry is handed back to the store instead of delayed here
        # (`hand_back`), so the gate alone must bring its held tasks back in time.
        if outcome == "throttled":
            sched.settle(task, due)  # type: ignore[arg-type]
            if hand_back:
                model.handed_back += 1
            else:
                sched.delay(task, due)  # type: ignore[arg-type]
                model.waiting[task.id] = due
            if task.key is not None:
                if gate is None:
                    model.gates[task.key] = ModelGate(due)
                else:
                    gate.open_at = max(gate.open_at, due)
                    if gate.probe == task.id:
                        gate.probe = None
            return
        sched.settle(task, None)  # type: ignore[arg-type]
        if gate is not None and gate.probe == task.id:
            del model.gates[task.key]  # type: ignore[arg-type]  # the probe got an answer
        if outcome == "transient" and hand_back:
            model.handed_back += 1
        elif outcome == "transient":
            sched.delay(task, due)  # type: ignore[arg-type]
            model.waiting[task.id] = due
        elif outcome == "success":
            model.done += 1
        else:
            model.dead += 1

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.5, 1.0, 3.0, 40.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def run_everything(self) -> None:
        """Settle everything as a success, moving time to each next wake: nothing strands."""
        for _ in range(10_000):
            while self.model.in_flight:
                task = next(iter(self.model.in_flight.values()))
                del self.model.in_flight[task.id]
                self.sched.settle(task, None)  # type: ignore[arg-type]
                gate = self.model.gates.get(task.key) if task.key is not None else None
                if gate is not None and gate.probe == task.id:
                    del self.model.gates[task.key]  # type: ignore[arg-type]
                self.model.done += 1
            if not self.model.waiting:
                break
            before = len(self.model.in_flight)
            self.take()
            if len(self.model.in_flight) == before:  # nothing runnable now
                wake = self.sched.next_wake(self.now)
                assert wake is not None, f"tasks {sorted(self.model.waiting)} can never run"
                self.now += wake
        assert self.sched.idle()
        m = self.model
        assert m.done + m.dead + m.handed_back == m.enqueued

    # -- checks after every step ----------------------------------------------------------

    def _may_run(self, task_id: int, due: float) -> bool:
        if due > self.now:
            return False
        key = self.tasks[task_id].key
        gate = self.model.gates.get(key) if key is not None else None
        return gate is None or (gate.probe is None and self.now >= gate.open_at)

    @invariant()
    def ledger_holds(self) -> None:
        s, m = self.sched, self.model
        assert m.enqueued == (
            m.done + m.dead + m.handed_back + s.queued + len(s.delayed) + s.in_flight
        )
        assert s.in_flight == len(m.in_flight)

    @invariant()
    def every_waiting_task_is_held_once(self) -> None:
        s = self.sched
        held = [t for q in s.held.values() for t in q]
        ids = [t.id for t in itertools.chain(s.ready, held, (e[2] for e in s.delayed))]  # type: ignore[attr-defined]
        assert sorted(ids) == sorted(self.model.waiting), "a task was lost or duplicated"
        assert s.held_count == len(held)
        for key, queue in s.held.items():
            assert key in s.gates or not queue, f"tasks held behind {key!r} with no gate"

    @invariant()
    def gates_match_the_model(self) -> None:
        s, m = self.sched, self.model
        assert set(s.gates) == set(m.gates)
        for key, gate in s.gates.items():
            assert gate.open_at == m.gates[key].open_at
            probe = gate.probe.id if gate.probe is not None else None  # type: ignore[attr-defined]
            assert probe == m.gates[key].probe


SchedulerMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
TestScheduler = SchedulerMachine.TestCase


# -- a real Offloader on a fake clock ------------------------------------------------------


class SteppedClock(FakeClock):
    """A FakeClock that knows when every worker is parked, so time moves only then."""

    def __init__(self) -> None:
        super().__init__()
        self._parked_cond = threading.Condition()
        self._epoch = 0
        self._parked: dict[int, int] = {}  # thread ident -> epoch it parked in

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        me = threading.get_ident()
        with self._parked_cond:
            self._parked[me] = self._epoch
            self._parked_cond.notify_all()
        try:
            super().wait(cond, timeout)
        finally:
            with self._parked_cond:
                self._parked.pop(me, None)

    def advance(self, seconds: float) -> None:
        with self._parked_cond:
            self._epoch += 1
        super().advance(seconds)

    def quiesce(self, threads: list[threading.Thread], timeout: float = 10) -> bool:
        """Block until each thread has parked since the last advance()."""

        def parked() -> bool:
            return all(self._parked.get(t.ident or 0) == self._epoch for t in threads)

        with self._parked_cond:
            return self._parked_cond.wait_for(parked, timeout)


MAX_FAILURES = 3
AFTERS = [0.0, 0.5, 1.0, 2.5]
outcome_st = st.one_of(
    st.just(("ok", 0.0)),
    st.just(("transient", 0.0)),
    st.just(("permanent", 0.0)),
    st.tuples(st.just("throttled"), st.sampled_from(AFTERS)),
)
script_st = st.lists(outcome_st, max_size=5)


def expected_fate(script: list[tuple[str, float]]) -> tuple[str, int]:
    """("success" | "permanent" | "exhausted", attempts) as the policy below decides."""
    failures = 0
    for attempt, (kind, _) in enumerate([*script, ("ok", 0.0)], start=1):
        if kind == "ok":
            return "success", attempt
        if kind == "permanent":
            return "permanent", attempt
        if kind == "transient":
            failures += 1
            if failures >= MAX_FAILURES:
                return "exhausted", attempt
    raise AssertionError("unreachable")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    tasks=st.lists(st.tuples(st.sampled_from(KEYS), script_st), min_size=1, max_size=10),
    step=st.sampled_from([0.25, 0.5, 1.0]),
    workers=st.sampled_from([1, 2]),
)
def test_offloader_on_a_fake_clock(
    tasks: list[tuple[str | None, list[tuple[str, float]]]], step: float, workers: int
) -> None:
    clock = SteppedClock()
    lock = threading.Lock()
    log: list[tuple[str, int, float, str, float]] = []  # (event, task, time, kind, after)
    attempts = [0] * len(tasks)
    succeeded: list[int] = []
    dead: dict[int, Any] = {}

    def perform(i: int) -> None:
        with lock:
            n = attempts[i]
            attempts[i] += 1
            script = tasks[i][1]
            kind, after = script[n] if n < len(script) else ("ok", 0.0)
            log.append(("start", i, clock.monotonic(), kind, after))
            log.append(("end", i, clock.monotonic(), kind, after))
        if kind == "transient":
            raise ConnectionError("transient")
        if kind == "throttled":
            raise Retry(after=after)
        if kind == "permanent":
            raise GiveUp("permanent")

    off = Offloader(
        clock=clock,
        workers=workers,
        idle_timeout=1e6,
        retry=RetryPolicy(
            stop=tenacity.stop_after_attempt(MAX_FAILURES),
            wait=tenacity.wait_none(),
            max_throttled=1e4,
        ),
        on_success=lambda task, _: succeeded.append(task.args[0]),
        on_dead_letter=lambda task, letter: dead.setdefault(task.args[0], []).append(letter),
    )
    try:
        for i, (key, _) in enumerate(tasks):
            off.enqueue_task(Task(perform, (i,), key=key))
        for _ in range(2_000):
            # Every worker parked, those started meanwhile too, and nothing in flight: a
            # worker woken by another's notify still reads as parked until it runs, so a
            # quiesce can end just before it takes a task. Then look again.
            for _look in range(1_000):
                threads = list(off._pool.threads)
                assert clock.quiesce(threads), "a worker never parked (busy loop or deadlock?)"
                stats = off.stats()
                if set(off._pool.threads) <= set(threads) and not stats.in_flight:
                    break
            else:
                raise AssertionError(f"a task stayed in flight with every worker parked: {stats}")
            if stats.succeeded + stats.dead_lettered == len(tasks):
                break
            assert stats.queued + stats.delayed > 0, f"nothing left to wait for: {stats}"
            clock.advance(step)
        stats = off.stats()
    finally:
        off.shutdown(5)

    # The ledger, and every task's fate as its script and the policy say.
    assert stats.enqueued == stats.succeeded + stats.dead_lettered == len(tasks), stats
    assert sorted(succeeded + list(dead)) == list(range(len(tasks))), "lost or duplicated"
    for i, (_, script) in enumerate(tasks):
        fate, calls = expected_fate(script)
        assert attempts[i] == calls, (i, script, attempts[i])
        if fate == "success":
            assert i in succeeded and i not in dead
        else:
            [letter] = dead[i]
            assert (letter.reason, letter.attempts) == (fate, calls)

    # No call starts before the Retry-After its own task was given has passed, nor, for
    # a throttled key, any call of that key. (With two workers, a call starting at the
    # very instant of the throttle may have been taken before the gate closed.)
    own: dict[int, float] = {}  # task -> not before
    closed: dict[str, tuple[float, float]] = {}  # key -> (throttled at, opens at)
    for event, i, at, kind, after in log:
        key = tasks[i][0]
        if event == "start":
            assert at >= own.get(i, 0.0), f"task {i} retried at {at}, not before {own[i]}"
            if key in closed:
                since, opens = closed[key]
                early_ok = workers > 1 and at == since
                assert early_ok or at >= opens, f"task {i} of {key!r} at {at}, opens {opens}"
        elif kind == "throttled":
            own[i] = at + after
            if key is not None:
                closed[key] = (at, max(closed.get(key, (0.0, 0.0))[1], at + after))
