"""The scheduler's side of a shared rate budget, step by step: a declared rate's call waits
for a token the backlog takes from the store (`wanting`, `SharedTokens`), a declared
concurrency's for a slot (`Pace.wants_slots`, `SharedSlots`); other keys flow, and order
within a key is kept."""

from __future__ import annotations

import pytest

from offload.limits import Limit
from offload.records import Task
from offload.scheduler import Scheduler


def noop() -> None:
    pass


def task(key: str | None = None) -> Task:
    return Task(noop, key=key)


def shared(**limits: Limit) -> Scheduler:
    s = Scheduler(limits)
    s.shared_rates = True
    return s


def grant(s: Scheduler, key: str, count: int = 1) -> None:
    """What the backlog does when the store gave tokens."""
    tokens = s.paces[key].shared
    assert tokens is not None
    tokens.held += count


def give_slot(s: Scheduler, key: str, slot: str = "slot-1") -> None:
    """What the backlog does when the store gave a slot."""
    slots = s.paces[key].slots
    assert slots is not None
    slots.ids.append(slot)


def test_a_limited_call_waits_for_a_shared_token_and_others_flow() -> None:
    s = shared(api=Limit(rate=100))
    a1, a2, other = task("api"), task("api"), task("other")
    for t in (a1, a2, other):
        s.put(t)
    assert s.take(0.0) is other  # api's calls are held for a token
    assert s.take(0.0) is None
    assert s.wanting(0.0) == [("api", 2)]  # both could start, by the process's own limits
    assert s.next_wake(0.0) is None  # nothing to wake for: the asking worker looks again
    grant(s, "api")
    assert s.wanting(0.0) == []
    assert s.take(0.0) is a1  # in order, the token spent
    assert s.take(0.0) is None and s.wanting(0.0) == [("api", 1)]
    grant(s, "api", 2)  # a token more than it used: kept for the next call
    assert s.take(0.0) is a2
    a3 = task("api")
    s.put(a3)
    assert s.take(0.0) is a3 and s.wanting(0.0) == []


def test_a_key_being_asked_for_or_told_to_wait_is_not_wanted_again() -> None:
    s = shared(api=Limit(rate=100))
    s.put(task("api"))
    assert s.take(0.0) is None
    tokens = s.paces["api"].shared
    assert tokens is not None
    tokens.asking = True
    assert s.wanting(0.0) == []
    tokens.asking = False
    tokens.retry_at = 0.25  # the store had none until then
    assert s.wanting(0.1) == []
    assert s.next_wake(0.1) == pytest.approx(0.15)
    assert s.wanting(0.25) == [("api", 1)]


def test_the_own_bucket_and_the_concurrency_cap_come_first() -> None:
    s = shared(api=Limit(rate=1, concurrency=1))
    first, second = task("api"), task("api")
    s.put(first)
    s.put(second)
    assert s.take(0.0) is None
    grant(s, "api")
    pace = s.paces["api"]
    assert s.take(0.0) is None  # a token in hand: now the shared slot
    assert pace.wants_slots(0.0) == 1
    give_slot(s, "api")
    assert s.take(0.0) is first
    assert pace.slots is not None and pace.slots.started == "slot-1"
    # Its one slot is taken: no token, nor slot, is asked for meanwhile.
    assert s.wanting(0.0) == [] and pace.wants_slots(0.0) == 0
    s.settle(first, None)
    assert s.wanting(0.5) == []  # the process's own bucket: one a second
    assert s.wanting(1.0) == [("api", 1)]


def test_a_gated_key_asks_once_its_gate_opens_and_its_probe_spends_the_token() -> None:
    s = shared(api=Limit(rate=100))
    throttled, probe = task("api"), task("api")
    s.put(throttled)
    assert s.take(0.0) is None
    grant(s, "api")
    assert s.take(0.0) is throttled
    s.settle(throttled, throttled_until=5.0, now=0.5)
    s.put(probe)
    assert s.take(1.0) is None
    assert s.wanting(1.0) == []  # closed: nothing is asked for
    assert s.wanting(5.0) == [("api", 1)]
    grant(s, "api")
    assert s.take(5.0) is probe
    assert s.gates["api"].probe is probe


def test_unlimited_keys_never_ask_and_a_concurrency_cap_asks_for_slots_alone() -> None:
    s = shared(capped=Limit(concurrency=2))
    capped = [task("capped"), task("capped"), task("capped")]
    for t in (*capped, task("free"), task(None)):
        s.put(t)
    assert s.take(0.0) is not None and s.take(0.0) is not None  # the free and None ones
    assert s.take(0.0) is None  # the capped ones wait for a shared slot
    pace = s.paces["capped"]
    assert s.wanting(0.0) == [] and pace.shared is None  # no token: it has no rate
    assert pace.wants_slots(0.0) == 2  # its own cap lets two start
    give_slot(s, "capped", "a")
    give_slot(s, "capped", "b")
    assert s.take(0.0) is capped[0] and s.take(0.0) is capped[1]
    assert s.take(0.0) is None and pace.wants_slots(0.0) == 0  # its own cap is full
    s.settle(capped[0], None)
    assert pace.wants_slots(0.0) == 1
    assert "free" not in s.paces or s.paces["free"].slots is None


def test_without_shared_rates_the_process_paces_alone() -> None:
    s = Scheduler({"api": Limit(rate=100)})
    t = task("api")
    s.put(t)
    assert s.take(0.0) is t
    assert s.paces["api"].shared is None and s.wanting(0.0) == []
