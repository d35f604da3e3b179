"""offload against the chaos API (tests/support/chaos.py): every fault once, then a short
seeded soak.

The long soak (>= 50,000 calls) is benchmarks/soak.py; this is its short version, with the
same checks (chaos.check): the ledger is exact, no duplicate without a lost answer, never
a request before its Retry-After, one idempotency key per call, the workers never die.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import tenacity

import offload
from chaos import FAULTS, LOST_ANSWER, ChaosServer, ClientLedger, check
from offload import Offloader, RetryPolicy

MakeOffloader = Callable[..., Offloader]

MAX_ATTEMPTS = 5
# Short waits so that the run is quick; Retry-After stays a floor whatever the wait says.
POLICY = RetryPolicy(
    stop=tenacity.stop_after_attempt(MAX_ATTEMPTS), wait=tenacity.wait_random(0, 0.02)
)
READ_TIMEOUT = 0.5  # the chaos server's read_timeout fault answers after 1.5 s


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Exceptions that escaped any thread (a dying worker would land here)."""
    errors: list[BaseException] = []
    original = threading.excepthook

    def hook(args: Any) -> None:
        errors.append(args.exc_value)
        original(args)

    monkeypatch.setattr(threading, "excepthook", hook)
    return errors


def _call(chaos: ChaosServer, rid: str, api: int = 0) -> offload.HttpCall:
    return offload.http(
        "POST",
        chaos.url(rid, api),
        json={"rid": rid},
        timeout=(2.0, READ_TIMEOUT),
        idempotency_key=True,
    )


def _run(
    chaos: ChaosServer, make_offloader: MakeOffloader, rids: list[str], apis: int = 1
) -> tuple[Offloader, ClientLedger, dict[str, Any]]:
    ledger = ClientLedger()
    off = make_offloader(retry=POLICY, workers=4, idle_timeout=30, **ledger.callbacks)
    for i, rid in enumerate(rids):
        ledger.enqueued(off.enqueue_task(_call(chaos, rid, i % apis)))
    assert off.flush(120), off.stats()
    report = check(chaos, ledger, chaos.counts(), chaos.faults(), MAX_ATTEMPTS)
    return off, ledger, report


def test_the_plan_is_a_pure_function_of_the_seed() -> None:
    with ChaosServer(7) as a, ChaosServer(7) as b, ChaosServer(8) as c:
        plan_a = [a.plan(f"r{i}", n) for i in range(300) for n in (1, 2, 3)]
        assert plan_a == [b.plan(f"r{i}", n) for i in range(300) for n in (1, 2, 3)]
        assert plan_a != [c.plan(f"r{i}", n) for i in range(300) for n in (1, 2, 3)]
        assert {name for name, _ in plan_a} >= {"ok", "503", "reset", "slow"}


def test_every_fault_once_then_success(
    make_offloader: MakeOffloader, thread_errors: list[BaseException]
) -> None:
    # One call per fault: the fault on its first attempt, 200 on its second.
    script = {f"tour-{name}": [name] for name in FAULTS}
    script["tour-permanent"] = ["permanent"]
    with ChaosServer(1, scripted=script, hang=1.5) as chaos:
        off, ledger, report = _run(chaos, make_offloader, sorted(script))
        counts = chaos.counts()

    assert report["violations"] == []
    assert chaos.faults()["permanent"] == 1
    for name in FAULTS:
        rid = f"tour-{name}"
        c = counts[rid]
        assert ledger.delivered[rid] == 1, (name, c)
        expected_requests = 1 if name == "slow" else 2
        assert c.received == expected_requests, (name, c)
        # The work is done twice exactly when the first answer was lost after doing it.
        assert c.processed == (2 if name in LOST_ANSWER else 1), (name, c)
        assert c.early == 0, name
    [letter] = off.dead_letters()
    assert (letter.reason, letter.status, letter.attempts) == ("permanent", 400, 1)
    stats = off.stats()
    assert stats.enqueued == stats.succeeded + stats.dead_lettered == len(script)
    assert thread_errors == []


def test_retry_after_in_every_form_is_a_floor(make_offloader: MakeOffloader) -> None:
    # Two throttles in a row per call: the server checks that each retry came no earlier
    # than the Retry-After it gave (seconds, HTTP-date, 0, negative, fractional, junk).
    forms = [n for n in FAULTS if n.startswith(("429", "503_retry"))]
    script = {f"ra-{name}": [name, name] for name in forms}
    with ChaosServer(2, scripted=script) as chaos:
        off, _, report = _run(chaos, make_offloader, sorted(script))
        counts = chaos.counts()
    assert report["violations"] == []
    for name in forms:
        c = counts[f"ra-{name}"]
        assert (c.received, c.processed, c.early) == (3, 1, 0), (name, c)
    # A throttle uses up no attempts: 3 calls each, none dead-lettered.
    assert off.stats().succeeded == len(forms)
    assert off.stats().retried == 2 * len(forms)


def test_short_soak_ledger_is_exact(
    make_offloader: MakeOffloader, thread_errors: list[BaseException]
) -> None:
    calls = 1500
    rids = [f"s{i:05d}" for i in range(calls)]
    with ChaosServer(2, apis=4, fault_rate=2.0, hang=1.5) as chaos:
        off, _, report = _run(chaos, make_offloader, rids, apis=4)
        workers_alive = sum(t.name.startswith("offload-worker") for t in threading.enumerate())

    assert report["violations"] == [], report["violations"][:10]
    assert report["calls"] == calls
    assert report["lost"] == 0
    assert report["duplicates_unexplained"] == 0
    assert report["early_requests"] == 0
    # The plan did inject every kind of fault, and poisoned some calls.
    injected = report["faults"]
    assert set(injected) >= set(FAULTS) | {"permanent", "exhaust"}, injected
    assert report["faults_injected"] >= calls // 5
    assert report["dead_lettered"].get("permanent", 0) >= 1
    assert report["dead_lettered"].get("exhausted", 0) >= 1
    # The workers never died: all four are still there, nothing escaped a thread.
    assert workers_alive == 4
    assert thread_errors == []
    stats = off.stats()
    assert stats.enqueued == stats.succeeded + stats.dead_lettered == calls
    assert stats.succeeded == report["delivered"]
