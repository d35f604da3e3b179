"""Bad input is refused at once, with an error that names the problem, and nothing queued.

One table: each case is a call that must raise a given exception whose message names
what was wrong. After it, the offloader it was aimed at holds nothing new (stats
unchanged) and no worker thread was started. A durable store (SQLite) has its own table:
tasks it cannot hold as JSON are refused with NotSerializable before anything is written.

The second half: callables that misbehave on the worker (what tests/unit/test_offloader.py
does not already cover): an exception whose str() and repr() both raise, one whose str()
raises SystemExit, one with a huge multi-line message, an `async def` function, and an
HTTP call against a server that never answers, bounded by its timeout.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import io
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import tenacity

import offload
from chaos import Tarpit
from offload import (
    NotSerializable,
    Offloader,
    RetryPolicy,
    ShutDown,
    StoreError,
    Task,
    UnknownDeadLetter,
    _default,
)

URL = "https://api.example.com/v1/charges"
MakeOffloader = Callable[..., Offloader]


def module_level(x: object = None) -> None:
    """An importable function: what a durable store can hold."""


@dataclass(frozen=True)
class Case:
    id: str
    action: Callable[[Offloader], object]
    error: type[BaseException]
    match: str  # a regex the message must contain: the option, value or problem

    def __repr__(self) -> str:
        return self.id


def _shut(off: Offloader) -> Offloader:
    off.shutdown(1)
    return off


def _bad_env(var: str, value: str) -> Callable[[Offloader], object]:
    """Enqueue on a default offloader made (lazily, on this enqueue) with `var=value`."""

    def action(off: Offloader) -> object:
        _default.reset()  # variables are read when the default offloader is made
        os.environ[var] = value
        try:
            return offload.enqueue_task(module_level)
        finally:
            del os.environ[var]

    return action


CASES = [
    # -- options of the wrong type or range -------------------------------------------
    Case("max_queue=0", lambda _: Offloader(max_queue=0), ValueError, "max_queue"),
    Case("max_queue='10'", lambda _: Offloader(max_queue="10"), TypeError, "max_queue"),  # type: ignore[arg-type]
    Case("workers=2.5", lambda _: Offloader(workers=2.5), TypeError, "workers"),  # type: ignore[arg-type]
    Case("workers=-1", lambda _: Offloader(workers=-1), ValueError, "workers"),
    Case(
        "idle_timeout=NaN", lambda _: Offloader(idle_timeout=math.nan), ValueError, "idle_timeout"
    ),
    Case(
        "shutdown_timeout=inf",
        lambda _: Offloader(shutdown_timeout=math.inf),
        ValueError,
        "shutdown_timeout",
    ),
    Case(
        "max_dead_letters=None",
        lambda _: Offloader(max_dead_letters=None),  # type: ignore[arg-type]
        TypeError,
        "max_dead_letters",
    ),
    Case(
        "retry=a tenacity strategy",
        lambda _: Offloader(retry=tenacity.stop_after_attempt(3)),  # type: ignore[arg-type]
        TypeError,
        "retry must be an offload.RetryPolicy",
    ),
    Case("on_retry=42", lambda _: Offloader(on_retry=42), TypeError, "on_retry"),  # type: ignore[arg-type]
    Case("clock='now'", lambda _: Offloader(clock="now"), TypeError, "clock"),  # type: ignore[arg-type]
    Case(
        "RetryPolicy(max_retry_after=NaN)",
        lambda _: RetryPolicy(max_retry_after=math.nan),
        ValueError,
        "max_retry_after",
    ),
    Case("RetryPolicy(stop=3)", lambda _: RetryPolicy(stop=3), TypeError, "stop"),  # type: ignore[arg-type]
    Case("flush(timeout=-1)", lambda off: off.flush(-1), ValueError, "timeout"),
    Case("shutdown(timeout=NaN)", lambda off: off.shutdown(math.nan), ValueError, "timeout"),
    # -- store URLs ---------------------------------------------------------------------
    Case("store='redis://x'", lambda _: Offloader(store="redis://x"), ValueError, "redis://x"),
    Case("store=''", lambda _: Offloader(store=""), ValueError, "store"),
    Case("store='memory://x'", lambda _: Offloader(store="memory://x"), ValueError, "memory"),
    Case("store=42", lambda _: Offloader(store=42), TypeError, "store"),  # type: ignore[arg-type]
    # -- HTTP calls ---------------------------------------------------------------------
    Case("empty URL", lambda _: offload.http("POST", ""), ValueError, "url is empty"),
    Case("ftp URL", lambda _: offload.http("GET", "ftp://host/f"), ValueError, "ftp"),
    Case("URL without host", lambda _: offload.http("GET", "http:///x"), ValueError, "no host"),
    Case(
        "URL with a space", lambda _: offload.http("GET", "http://a b/"), ValueError, "whitespace"
    ),
    Case("method FETCH", lambda _: offload.http("FETCH", URL), ValueError, "FETCH"),
    Case(
        "unknown requests kwarg",
        lambda _: offload.http("POST", URL, jsn={}),
        TypeError,
        "'jsn'.*did you mean 'json'",
    ),
    Case("stream=True", lambda _: offload.http("GET", URL, stream=True), TypeError, "stream"),
    Case("timeout=-1", lambda _: offload.http("GET", URL, timeout=-1), ValueError, "timeout"),
    Case(
        "timeout=(1, NaN)",
        lambda _: offload.http("GET", URL, timeout=(1, math.nan)),
        ValueError,
        "timeout read",
    ),
    Case("timeout=None", lambda _: offload.http("GET", URL, timeout=None), ValueError, "hang"),
    Case(
        "header value not str",
        lambda _: offload.http("GET", URL, headers={"X-N": 1}),
        TypeError,
        "headers",
    ),
    Case(
        "header value ending in a line break",
        lambda _: offload.http("GET", URL, headers={"Authorization": "Bearer x\n"}),
        ValueError,
        "line break",
    ),
    Case(
        "header name ending in a line break",
        lambda _: offload.http("GET", URL, headers={"X-Trace\n": "1"}),
        ValueError,
        "not a valid header name",
    ),
    Case(
        "a file as the body",
        lambda _: offload.http("POST", URL, data=io.BytesIO(b"x")),
        TypeError,
        "read once",
    ),
    # -- AWS calls ----------------------------------------------------------------------
    Case("empty AWS service", lambda _: offload.aws("", "send_message"), ValueError, "service"),
    Case("empty AWS operation", lambda _: offload.aws("sqs", " "), ValueError, "operation"),
    Case(
        "unknown AWS service",
        lambda _: offload.aws("sqss", "send_message"),
        ValueError,
        "unknown AWS service 'sqss'",
    ),
    Case(
        "misspelt AWS operation",
        lambda _: offload.aws("sqs", "send_mesage"),
        ValueError,
        "did you mean send_message",
    ),
    # -- what enqueue_task takes --------------------------------------------------------
    Case("enqueue 42", lambda off: off.enqueue_task(42), TypeError, "int"),
    Case("enqueue a str", lambda off: off.enqueue_task("print"), TypeError, "str"),
    Case("enqueue None", lambda off: off.enqueue_task(None), TypeError, "NoneType"),
    Case(
        "HttpCall with arguments",
        lambda off: off.enqueue_task(offload.http("GET", URL), 1),
        TypeError,
        "no extra arguments",
    ),
    Case(
        "Task with arguments",
        lambda off: off.enqueue_task(Task(module_level), 1),
        TypeError,
        "no further arguments",
    ),
    Case("Task(args=list)", lambda _: Task(module_level, [1]), TypeError, "tuple"),  # type: ignore[arg-type]
    Case("Task(key='')", lambda _: Task(module_level, key=""), ValueError, "key"),
    # A lone surrogate (os.fsdecode's) in a key: SQLite cannot encode it, and its journal
    # line then failed every later copy into the file (no task in that journal ran).
    Case(
        "Task(key=surrogate)",
        lambda _: Task(module_level, key="host-\udcff"),
        ValueError,
        r"Task\(key=\.\.\.\) holds a lone surrogate",
    ),
    Case(
        "Task(dedup_key=surrogate)",
        lambda _: Task(module_level, dedup_key="order-\udcff"),
        ValueError,
        r"Task\(dedup_key=\.\.\.\) holds a lone surrogate",
    ),
    Case("Task(Task)", lambda _: Task(Task(module_level)), TypeError, "not another Task"),  # type: ignore[arg-type]
    # -- dead letters, shutdown ---------------------------------------------------------
    Case("replay unknown id", lambda off: off.replay("nope"), UnknownDeadLetter, "nope"),
    Case("discard unknown id", lambda off: off.discard("nope"), UnknownDeadLetter, "nope"),
    Case("module replay unknown", lambda _: offload.replay("x1"), UnknownDeadLetter, "x1"),
    Case(
        "enqueue after shutdown",
        lambda off: _shut(off).enqueue_task(module_level),
        ShutDown,
        "shut down",
    ),
    # -- OFFLOAD_* variables and configure() -------------------------------------------
    Case("OFFLOAD_WORKERS=0", _bad_env("OFFLOAD_WORKERS", "0"), ValueError, "OFFLOAD_WORKERS"),
    Case(
        "OFFLOAD_MAX_QUEUE=1e3",
        _bad_env("OFFLOAD_MAX_QUEUE", "1e3"),
        ValueError,
        "OFFLOAD_MAX_QUEUE",
    ),
    Case(
        "OFFLOAD_SHUTDOWN_TIMEOUT=inf",
        _bad_env("OFFLOAD_SHUTDOWN_TIMEOUT", "inf"),
        ValueError,
        "OFFLOAD_SHUTDOWN_TIMEOUT",
    ),
    Case(
        "OFFLOAD_MAX_ATTEMPTS=-2",
        _bad_env("OFFLOAD_MAX_ATTEMPTS", "-2"),
        ValueError,
        "OFFLOAD_MAX_ATTEMPTS",
    ),
    Case(
        "OFFLOAD_LEASE_TIMEOUT=soon",
        _bad_env("OFFLOAD_LEASE_TIMEOUT", "soon"),
        ValueError,
        "OFFLOAD_LEASE_TIMEOUT",
    ),
    Case("OFFLOAD_STORE=ftp://x", _bad_env("OFFLOAD_STORE", "ftp://x"), ValueError, "ftp://x"),
    Case("configure(worker=2)", lambda _: offload.configure(worker=2), TypeError, "worker"),
    Case(
        "configure(max_queue=-5)",
        lambda _: offload.configure(max_queue=-5),
        ValueError,
        "max_queue",
    ),
]


def offload_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("offload-")}


@pytest.fixture
def off() -> Iterator[Offloader]:
    offloader = Offloader(idle_timeout=0.5)
    yield offloader
    offloader.shutdown(1)


def test_the_table_is_long_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_nothing_is_queued(case: Case, off: Offloader) -> None:
    before, threads = off.stats(), offload_threads()
    default_before = offload.stats()  # makes the default offloader, as a user would
    with pytest.raises(case.error, match=case.match):
        case.action(off)
    assert offload_threads() <= threads, "a worker was started"
    after = off.stats()
    if case.id == "enqueue after shutdown":  # the shutdown itself is allowed to change it
        assert (after.enqueued, after.queued) == (before.enqueued, 0)
    else:
        assert after == before
    assert _default.get().stats() == default_before


def test_a_refused_shutdown_timeout_does_not_shut_down(off: Offloader) -> None:
    with pytest.raises(ValueError, match="timeout"):
        off.shutdown(-1)
    done = threading.Event()
    off.enqueue_task(done.set)
    assert done.wait(5)


def test_a_refused_configure_keeps_the_default_working() -> None:
    offload.configure(max_queue=7)
    first = _default.get()
    with pytest.raises(ValueError, match="max_queue"):
        offload.configure(max_queue=0)
    assert _default.get() is first and first.max_queue == 7
    done = threading.Event()
    offload.enqueue_task(done.set)
    assert done.wait(5)


# -- a durable store: what cannot be stored as JSON ---------------------------------------


def _sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'offload.db'}"
    try:
        Offloader(store=url, consume=False).shutdown(0)
    except (ValueError, ImportError, StoreError) as exc:  # the SQLite store not built yet
        pytest.skip(f"sqlite:// store not available: {exc}")
    return url


def _local() -> None:
    pass


class _CodeAuth(requests.auth.AuthBase):
    def __call__(self, r: Any) -> Any:
        return r


DURABLE_CASES = [
    Case("a lambda", lambda off: off.enqueue_task(lambda: None), NotSerializable, "lambda"),
    Case(
        "a function defined inside a function",
        lambda off: off.enqueue_task(_make_local()),
        NotSerializable,
        "inside a function",
    ),
    Case(
        "a bound method",
        lambda off: off.enqueue_task(threading.Event().set),
        NotSerializable,
        "bound|import",
    ),
    Case(
        "a datetime argument",
        lambda off: off.enqueue_task(module_level, dt.datetime(2026, 1, 1)),
        NotSerializable,
        "datetime",
    ),
    Case(
        "a tuple argument",
        lambda off: off.enqueue_task(module_level, (1, 2)),
        NotSerializable,
        "tuple",
    ),
    Case(
        "a NaN argument",
        lambda off: off.enqueue_task(module_level, math.nan),
        NotSerializable,
        "nan",
    ),
    Case(
        "a set keyword argument",
        lambda off: off.enqueue_task(module_level, x={1}),
        NotSerializable,
        "set",
    ),
    Case(
        "HTTP auth that is code",
        lambda off: off.enqueue_task(offload.http("GET", URL, auth=_CodeAuth())),
        NotSerializable,
        "auth",
    ),
    Case(
        "a retry policy that is code",
        lambda off: off.enqueue_task(
            Task(module_level, retry=RetryPolicy(retry_on=lambda exc: True))
        ),
        NotSerializable,
        "retry",
    ),
]


def _make_local() -> Callable[[], None]:
    def inner() -> None:
        pass

    return inner


@pytest.mark.parametrize("case", DURABLE_CASES, ids=[c.id for c in DURABLE_CASES])
def test_durable_store_refuses_what_it_cannot_hold(case: Case, tmp_path: Path) -> None:
    off = Offloader(store=_sqlite_url(tmp_path), consume=False)
    try:
        before = off.stats()
        with pytest.raises(case.error, match=case.match):
            case.action(off)
        assert off.stats() == before
        counts = off.store.counts()  # type: ignore[attr-defined]
        assert (counts.ready, counts.delayed, counts.leased) == (0, 0, 0), "something was stored"
    finally:
        off.shutdown(1)


# -- callables that misbehave on the worker ------------------------------------------------

FAST = RetryPolicy(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none())


def test_exception_whose_str_and_repr_raise(make_offloader: MakeOffloader) -> None:
    class Hostile(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    def bad() -> None:
        raise Hostile()

    off = make_offloader()
    off.enqueue_task(bad)
    assert off.flush(5)
    [letter] = off.dead_letters()
    assert letter.reason == "permanent" and "Hostile" in letter.error
    assert "Hostile" in repr(letter) and letter.to_json()["error"] == letter.error


def test_exception_whose_str_raises_system_exit(make_offloader: MakeOffloader) -> None:
    class Exiting(Exception):
        def __str__(self) -> str:
            raise SystemExit(9)

    def bad() -> None:
        raise Exiting()

    done = threading.Event()
    off = make_offloader()
    off.enqueue_task(bad)
    off.enqueue_task(done.set)
    assert done.wait(5), "the worker died"
    assert off.flush(5)
    [letter] = off.dead_letters()
    assert "Exiting" in letter.error


def test_huge_multi_line_message_is_one_short_line(make_offloader: MakeOffloader) -> None:
    def bad() -> None:
        raise ValueError("line\n" * 2_000_000)

    off = make_offloader()
    off.enqueue_task(bad)
    assert off.flush(10)
    [letter] = off.dead_letters()
    assert "\n" not in letter.error and len(letter.error) <= 300
    assert letter.error.startswith("ValueError")


def test_an_async_function_is_run_to_completion_not_counted_as_done(
    make_offloader: MakeOffloader,
) -> None:
    # Calling an `async def` function runs none of it: the worker awaits what it returns,
    # so "succeeded" means its body ran.
    ran = threading.Event()

    async def notify() -> None:
        await asyncio.sleep(0)
        ran.set()

    off = make_offloader()
    off.enqueue_task(notify)
    assert off.flush(5)
    assert off.stats().succeeded == 1 and off.dead_letters() == []
    assert ran.is_set()


def test_a_coroutine_passed_for_its_function_is_refused_closed_and_named(
    make_offloader: MakeOffloader,
) -> None:
    """`enqueue_task(notify(x))` instead of `enqueue_task(notify, x)`: the TypeError says
    so, and the refused coroutine is closed, not left to warn it was never awaited."""

    async def notify(channel: str) -> None:
        await asyncio.sleep(0)

    off = make_offloader()
    for enqueue in (off.enqueue_task, Task):
        coroutine, message = notify("#ops"), ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                enqueue(coroutine)
            except TypeError as exc:
                message = str(exc)
            del coroutine  # (the exception, with the frames that held it, is gone)
            gc.collect()
        assert "coroutine" in message and "async function and its arguments" in message
        assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert off.stats().enqueued == 0 and not off.running


def test_a_call_that_never_returns_is_bounded_by_its_timeout(
    make_offloader: MakeOffloader,
) -> None:
    # The API accepts the connection and never answers; the call's read timeout ends each
    # attempt, the policy ends the task, and other calls flow meanwhile on the 2nd worker.
    with Tarpit() as pit:
        off = make_offloader(retry=FAST, workers=2)
        off.enqueue_task(offload.http("POST", pit.url("/never"), timeout=(1, 0.2)))
        others = threading.Semaphore(0)
        for _ in range(20):
            off.enqueue_task(others.release)
        for _ in range(20):
            assert others.acquire(timeout=5)
        assert off.flush(10)
        assert pit.connections == 2  # one per attempt
    [letter] = off.dead_letters()
    assert (letter.reason, letter.attempts) == ("exhausted", 2)
    assert "Timeout" in letter.error
