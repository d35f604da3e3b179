"""offload.Limit, its text form, `Offloader(limits=...)`, OFFLOAD_LIMITS / OFFLOAD_ADAPTIVE,
and `Offloader.keys()` with `offload.KeyState` (issue 13)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import pytest

import offload
from offload import KeyState, Limit, Offloader, _default
from offload.limits import limits_from_json
from offload.testing import FakeClock
from server import Answer, ScriptedServer

MakeOffloader = Callable[..., Offloader]


# -- Limit ----------------------------------------------------------------------------------


def test_a_limit_and_its_defaults() -> None:
    stripe = Limit(rate=25)
    assert (stripe.rate, stripe.per, stripe.burst, stripe.concurrency) == (25, 1.0, None, None)
    assert stripe.per_second == 25
    assert str(stripe) == "25/s"
    hubspot = Limit(rate=100, per=10)
    assert hubspot.per_second == 10 and str(hubspot) == "100/10s"
    glue = Limit(concurrency=2)
    assert glue.per_second is None and str(glue) == "2 at a time"
    both = Limit(rate=5, burst=2, concurrency=3)
    assert str(both) == "5/s, 3 at a time"
    assert Limit(rate=25) == Limit(rate=25, per=1) and hash(Limit(rate=25)) == hash(stripe)
    with pytest.raises(AttributeError):
        stripe.rate = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "error", "field"),
    [
        ({}, ValueError, "a rate, a concurrency"),
        ({"rate": 0}, ValueError, "rate"),
        ({"rate": -5}, ValueError, "rate"),
        ({"rate": math.nan}, ValueError, "rate"),
        ({"rate": math.inf}, ValueError, "rate"),
        ({"rate": "25"}, TypeError, "rate"),
        ({"rate": True}, TypeError, "rate"),
        ({"rate": 5, "per": 0}, ValueError, "per"),
        ({"rate": 5, "per": -1}, ValueError, "per"),
        ({"rate": 5, "per": math.inf}, ValueError, "per"),
        ({"rate": 5, "per": None}, TypeError, "per"),
        ({"rate": 5, "burst": 0.5}, ValueError, "burst"),
        ({"rate": 5, "burst": 0}, ValueError, "burst"),
        ({"rate": 5, "burst": "2"}, TypeError, "burst"),
        ({"concurrency": 2, "burst": 3}, ValueError, "burst"),
        ({"concurrency": 0}, ValueError, "concurrency"),
        ({"concurrency": -1}, ValueError, "concurrency"),
        ({"concurrency": 1.5}, TypeError, "concurrency"),
        ({"concurrency": True}, TypeError, "concurrency"),
        ({"concurrency": "2"}, TypeError, "concurrency"),
    ],
)
def test_a_bad_limit_raises_naming_the_field(
    options: dict[str, Any], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as info:
        Limit(**options)
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("text", "rate", "per"),
    [
        ("25/s", 25, 1.0),
        ("25/sec", 25, 1.0),
        (" 25 / s ", 25, 1.0),
        ("2.5/s", 2.5, 1.0),
        ("600/min", 600, 60.0),
        ("600/m", 600, 60.0),
        ("5000/h", 5000, 3600.0),
        ("100/10s", 100, 10.0),
        ("1/0.5s", 1, 0.5),
    ],
)
def test_the_text_form(text: str, rate: float, per: float) -> None:
    limit = Limit.parse(text)
    assert (limit.rate, limit.per, limit.burst, limit.concurrency) == (rate, per, None, None)
    assert Limit.of(text) == limit
    assert Limit.of(limit) is limit


@pytest.mark.parametrize(
    "text", ["25", "25/", "/s", "25/x", "25/day", "ten/s", "100/10min", "0/s", "-1/s", "", "25 s"]
)
def test_bad_text_raises_value_error_naming_it(text: str) -> None:
    with pytest.raises(ValueError) as info:
        Limit.parse(text)
    assert repr(text) in str(info.value) or "rate" in str(info.value)


def test_a_limit_that_is_neither_text_nor_limit_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="25/s"):
        Limit.parse(25)  # type: ignore[arg-type]


# -- Offloader(limits=...) ------------------------------------------------------------------


def test_limits_take_limits_and_text_with_keys_made_as_tasks_keys_are(
    make_offloader: MakeOffloader,
) -> None:
    off = make_offloader(
        limits={
            "https://api.stripe.com": Limit(rate=25),
            "HTTPS://API.HUBAPI.COM/crm/v3": "100/10s",
            "aws:glue:eu-west-1:start_job_run": Limit(concurrency=2),
        }
    )
    assert dict(off.limits) == {
        "https://api.stripe.com:443": Limit(rate=25),
        "https://api.hubapi.com:443": Limit(rate=100, per=10),
        "aws:glue:eu-west-1:start_job_run": Limit(concurrency=2),
    }
    task = offload.Task(offload.http("POST", "https://api.stripe.com/v1/charges"))
    assert task.key in off.limits


@pytest.mark.parametrize(
    ("limits", "error", "names"),
    [
        ({"https://api.stripe.com": "25/x"}, ValueError, "https://api.stripe.com"),
        ({"https://api.stripe.com": 25}, TypeError, "https://api.stripe.com"),
        ({"k": Limit(rate=1), "": Limit(rate=1)}, ValueError, "key"),
        ({"https://a.example": "1/s", "https://a.example:443/x": "2/s"}, ValueError, "same key"),
        ({"http://[::1": "1/s"}, ValueError, "URL"),
        ([("k", "1/s")], TypeError, "mapping"),
        ("25/s", TypeError, "mapping"),
    ],
)
def test_bad_limits_are_refused_at_construction(
    limits: Any, error: type[Exception], names: str
) -> None:
    with pytest.raises(error) as info:
        Offloader(limits=limits)
    assert names in str(info.value)


def test_adaptive_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="adaptive"):
        Offloader(adaptive=1)  # type: ignore[arg-type]


# -- OFFLOAD_LIMITS, OFFLOAD_ADAPTIVE -------------------------------------------------------


def test_offload_limits_and_adaptive_configure_the_default_offloader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "OFFLOAD_LIMITS",
        '{"https://api.stripe.com": "25/s", "aws:glue:eu-west-1:start_job_run": '
        '{"concurrency": 1}, "https://api.hubapi.com": {"rate": 100, "per": 10, "burst": 20}}',
    )
    monkeypatch.setenv("OFFLOAD_ADAPTIVE", "0")
    off = _default.get()
    assert dict(off.limits) == {
        "https://api.stripe.com:443": Limit(rate=25),
        "aws:glue:eu-west-1:start_job_run": Limit(concurrency=1),
        "https://api.hubapi.com:443": Limit(rate=100, per=10, burst=20),
    }
    assert off.adaptive is False
    assert set(offload.keys()) == set(off.limits)


def test_adaptive_is_on_by_default_and_offload_adaptive_takes_booleans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _default.get().adaptive is True
    _default.reset()
    monkeypatch.setenv("OFFLOAD_ADAPTIVE", "false")
    assert _default.get().adaptive is False


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("not json", "not JSON"),
        ('["25/s"]', "JSON object"),
        ('"25/s"', "JSON object"),
        ('{"https://api.stripe.com": "25/x"}', "https://api.stripe.com"),
        ('{"https://api.stripe.com": 25}', "https://api.stripe.com"),
        ('{"k": {"speed": 3}}', "'k'"),
        ('{"k": {"rate": 0}}', "rate"),
        ('{"k": {}}', "a rate, a concurrency"),
        ('{"": "1/s"}', "key"),
    ],
)
def test_malformed_offload_limits_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, text: str, names: str
) -> None:
    with pytest.raises(ValueError) as direct:
        limits_from_json(text)
    assert "OFFLOAD_LIMITS" in str(direct.value) and names in str(direct.value)
    monkeypatch.setenv("OFFLOAD_LIMITS", text)
    with pytest.raises(ValueError, match="OFFLOAD_LIMITS"):
        offload.stats()
    assert _default.current() is None


def test_a_bad_offload_adaptive_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_ADAPTIVE", "maybe")
    with pytest.raises(ValueError, match="OFFLOAD_ADAPTIVE"):
        offload.stats()


# -- keys() and KeyState --------------------------------------------------------------------


def test_keys_list_declared_limits_before_any_call(make_offloader: MakeOffloader) -> None:
    off = make_offloader(
        limits={"https://api.stripe.com": "25/s", "glue": Limit(concurrency=1)}, adaptive=False
    )
    assert off.keys() == {
        "glue": KeyState("glue", 0, 0, None, None, Limit(concurrency=1)),
        "https://api.stripe.com:443": KeyState(
            "https://api.stripe.com:443", 0, 0, None, 25.0, Limit(rate=25)
        ),
    }
    state = off.keys()["https://api.stripe.com:443"]
    assert state.to_json() == {
        "key": "https://api.stripe.com:443",
        "waiting": 0,
        "in_flight": 0,
        "reopens_in": None,
        "rate": 25.0,
        "limit": "25/s",
        "down": False,
    }


def test_keys_show_calls_waiting_for_a_token_and_one_in_flight(
    make_offloader: MakeOffloader,
) -> None:
    """On a FakeClock a rate of 1 a second lets one call through; the rest wait for time."""
    clock = FakeClock()
    release = threading.Event()
    changed = threading.Condition()
    started: list[int] = []

    def call(n: int) -> None:
        with changed:
            started.append(n)
            changed.notify_all()
        if n == 0:
            release.wait(30)

    key = "billing"
    off = make_offloader(clock=clock, workers=2, limits={key: Limit(rate=1)}, idle_timeout=30)
    for n in range(3):
        off.enqueue_task(offload.Task(call, (n,), key=key))
    with changed:
        assert changed.wait_for(lambda: started == [0], timeout=10)
    state = off.keys()[key]
    assert (state.waiting, state.in_flight, state.rate, state.limit) == (2, 1, 1.0, Limit(rate=1))
    assert state.reopens_in is None and not state.down
    release.set()
    for count in (2, 3):  # a bucket of one token: one second of the clock, one call
        clock.advance(1.0)
        with changed:
            assert changed.wait_for(lambda n=count: len(started) == n, timeout=10), off.keys()
    assert off.flush(timeout=10), off.keys()
    assert started == [0, 1, 2]
    assert off.stats().succeeded == 3
    assert off.keys()[key] == KeyState(key, 0, 0, None, 1.0, Limit(rate=1))


def test_keys_show_a_throttled_key_reopening_and_its_learnt_rate(
    make_offloader: MakeOffloader, server: ScriptedServer
) -> None:
    clock = FakeClock()
    server.script("/busy", *[Answer(200)] * 6, Answer(429, headers={"Retry-After": "30"}))
    key = f"http://127.0.0.1:{server.port}"
    off = make_offloader(clock=clock, workers=1, idle_timeout=30)  # adaptive by default
    for _ in range(7):
        off.enqueue_task(offload.http("POST", server.url("/busy")))
    assert server.wait_for(7, path="/busy")
    assert not off.flush(timeout=0.5)  # the throttled call waits for its Retry-After
    state = off.keys()[key]
    assert state.reopens_in is not None and 30 <= state.reopens_in <= 32
    # Seven calls started within the same instant of the fake clock: a rate was measured, and
    # the throttle cut it to a fraction of that.
    assert state.rate is not None and 0 < state.rate < 7
    assert state.limit is None and not state.down
    assert off.gates() == {key: state.reopens_in}
