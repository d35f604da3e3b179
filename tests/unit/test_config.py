"""Options, OFFLOAD_* variables and the module-level default offloader."""

from __future__ import annotations

import logging
import math
import os
import sys
import threading

import pytest
import tenacity

import offload
from offload import Offloader, RetryPolicy, _default


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"max_queue": 0}, ValueError, "max_queue"),
        ({"max_queue": 1.5}, TypeError, "max_queue"),
        ({"max_queue": True}, TypeError, "max_queue"),
        ({"idle_timeout": -1}, ValueError, "idle_timeout"),
        ({"idle_timeout": math.nan}, ValueError, "idle_timeout"),
        ({"idle_timeout": math.inf}, ValueError, "idle_timeout"),
        ({"idle_timeout": "2"}, TypeError, "idle_timeout"),
        ({"workers": 0}, ValueError, "workers"),
        ({"max_dead_letters": -1}, ValueError, "max_dead_letters"),
        ({"consume": "yes"}, TypeError, "consume"),
        ({"consume": False}, ValueError, "consume"),
        ({"retry": 5}, TypeError, "retry"),
        ({"on_success": "print"}, TypeError, "on_success"),
        ({"on_dead_letter": 1}, TypeError, "on_dead_letter"),
        ({"store": "redis://x"}, ValueError, "store"),
        ({"store": "memory://x"}, ValueError, "store"),
        ({"store": 42}, TypeError, "store"),
        ({"shutdown_timeout": -0.1}, ValueError, "shutdown_timeout"),
        ({"worker_nice": -1}, ValueError, "worker_nice"),
        ({"worker_nice": 20}, ValueError, "worker_nice"),
        ({"worker_nice": 2.5}, TypeError, "worker_nice"),
        ({"worker_nice": True}, TypeError, "worker_nice"),
    ],
)
def test_bad_options_fail_at_construction(
    options: dict[str, object], error: type[Exception], names: str
) -> None:
    with pytest.raises(error, match=names):
        Offloader(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"stop": 5}, TypeError),
        ({"wait": "fast"}, TypeError),
        ({"max_retry_after": -1}, ValueError),
        ({"max_throttled": math.nan}, ValueError),
        ({"retry_on": ("x",)}, TypeError),
        ({"retry_on": 3}, TypeError),
    ],
)
def test_bad_retry_policy(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        RetryPolicy(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, 42, "text", object()])
def test_enqueue_rejects_what_cannot_be_performed(bad: object) -> None:
    off = Offloader()
    with pytest.raises(TypeError):
        off.enqueue_task(bad)
    assert off.stats().enqueued == 0
    assert not off.running


def test_retry_raised_with_bad_after() -> None:
    with pytest.raises(ValueError):
        offload.Retry(after=-1)
    with pytest.raises(ValueError):
        offload.Retry(after=math.nan)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("OFFLOAD_MAX_QUEUE", "lots"),
        ("OFFLOAD_MAX_QUEUE", "0"),
        ("OFFLOAD_IDLE_TIMEOUT", "-1"),
        ("OFFLOAD_IDLE_TIMEOUT", "nan"),
        ("OFFLOAD_WORKERS", "1.5"),
        ("OFFLOAD_MAX_ATTEMPTS", "0"),
        ("OFFLOAD_SHUTDOWN_TIMEOUT", "soon"),
        ("OFFLOAD_WORKER_NICE", "20"),
        ("OFFLOAD_WORKER_NICE", "-1"),
        ("OFFLOAD_STORE", "ftp://x"),
    ],
)
def test_bad_environment_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var if var != "OFFLOAD_STORE" else "store"):
        offload.enqueue_task(print)
    _default.reset()


def test_environment_configures_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_MAX_QUEUE", "7")
    monkeypatch.setenv("OFFLOAD_IDLE_TIMEOUT", "0.25")
    monkeypatch.setenv("OFFLOAD_WORKERS", "3")
    monkeypatch.setenv("OFFLOAD_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("OFFLOAD_WORKER_NICE", "5")
    off = _default.get()
    assert (off.max_queue, off.idle_timeout, off.workers) == (7, 0.25, 3)
    assert off.worker_nice == 5
    assert off.retry.stop(_state(attempt=2))
    assert not off.retry.stop(_state(attempt=1))


def _state(attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.outcome_timestamp = state.start_time
    return state


def test_import_starts_nothing_and_default_is_lazy() -> None:
    assert _default._default is None
    assert not [t for t in threading.enumerate() if t.name.startswith("offload-worker")]
    done = threading.Event()
    offload.enqueue_task(done.set)
    assert done.wait(5)
    assert offload.flush(5)
    assert offload.stats().succeeded == 1


def test_configure_before_and_after_use_keeps_dead_letters() -> None:
    offload.configure(retry=RetryPolicy(stop=tenacity.stop_after_attempt(1)))
    offload.enqueue_task(int, "x")
    assert offload.flush(5)
    [letter] = offload.dead_letters()
    old = _default.get()
    offload.configure(max_queue=5)
    new = _default.get()
    assert new is not old and new.max_queue == 5
    assert new.retry is old.retry, "earlier options are kept"
    assert [d.id for d in offload.dead_letters()] == [letter.id]
    with pytest.raises(offload.ShutDown):
        old.enqueue_task(print)
    with pytest.raises(TypeError, match="bogus"):
        offload.configure(bogus=1)
    with pytest.raises(ValueError, match="max_queue"):
        offload.configure(max_queue=-1)
    assert _default.get() is new


def test_module_level_api_round_trip() -> None:
    def fails() -> None:
        raise offload.GiveUp("nope")

    offload.enqueue_task(fails)
    assert offload.flush(5)
    [letter] = offload.dead_letters()
    task = offload.replay(letter.id)
    assert offload.flush(5)
    [again] = offload.dead_letters()
    assert again.task_id == task.id
    offload.discard(again.id)
    assert offload.dead_letters() == []
    with pytest.raises(offload.UnknownDeadLetter):
        offload.discard(again.id)
    assert offload.shutdown(5)
    with pytest.raises(offload.ShutDown):
        offload.enqueue_task(print)


def test_public_names_are_exported() -> None:
    for name in offload.__all__:
        assert hasattr(offload, name), name
    assert issubclass(offload.QueueFull, offload.OffloadError)
    assert issubclass(offload.NotSerializable, TypeError)
    assert issubclass(offload.UnknownDeadLetter, KeyError)


def test_retry_policy_repr_reads_as_the_code_that_made_it() -> None:
    assert repr(RetryPolicy()) == (
        "RetryPolicy(stop=stop_after_attempt(5) | stop_before_delay(600), "
        "wait=wait_random_exponential(multiplier=0.5, min=0, max=30, exp_base=2), "
        "max_retry_after=600, max_throttled=900, retry_on=())"
    )
    custom = RetryPolicy(stop=tenacity.stop_after_attempt(3), retry_on=(KeyError,))
    assert "stop=stop_after_attempt(3)" in repr(custom)
    assert "retry_on=(KeyError,)" in repr(custom)


def _my_priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread: Linux")
def test_worker_nice_lowers_the_worker_threads_priority_only() -> None:
    main = _my_priority()
    seen: list[int] = []
    for nice in (0, 3):
        off = Offloader(worker_nice=nice)
        try:
            off.enqueue_task(lambda: seen.append(_my_priority()))
            assert off.flush(10)
        finally:
            off.shutdown(1)
    assert seen == [main, min(19, main + 3)]
    assert _my_priority() == main  # the caller's thread is untouched


# -- issue 17: what a new user ran into -------------------------------------------------------


def test_a_bad_shutdown_timeout_is_refused_where_it_is_first_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OFFLOAD_SHUTDOWN_TIMEOUT", "5s")
    with pytest.raises(ValueError, match="OFFLOAD_SHUTDOWN_TIMEOUT"):
        Offloader()


def test_the_exit_hook_never_raises_for_a_variable_changed_after_use() -> None:
    from procs import run_python

    result = run_python(
        """
        import atexit, os
        delivered = []
        atexit.register(lambda: print("delivered", len(delivered)))  # runs after offload's
        import offload
        off = offload.Offloader()
        for i in range(20):
            off.enqueue_task(delivered.append, i)
        os.environ["OFFLOAD_SHUTDOWN_TIMEOUT"] = "5s"  # set after the offloader was made
        """
    )
    assert result.returncode == 0, result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr
    assert "OFFLOAD_SHUTDOWN_TIMEOUT" in result.stderr  # one warning, naming it
    assert "delivered 20" in result.stdout


def test_a_misspelt_variable_is_named_once_with_the_likely_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from offload import config

    monkeypatch.setattr(config, "_checked_environment", False)
    monkeypatch.setenv("OFFLOAD_WROKERS", "4")
    monkeypatch.setenv("OFFLOAD_TEST_SOMETHING", "1")  # not like any of offload's: quiet
    with caplog.at_level(logging.WARNING, logger="offload"):
        offload.stats()
        Offloader().shutdown(0)
    warned = [r.getMessage() for r in caplog.records if "not one offload reads" in r.getMessage()]
    assert len(warned) == 1 and "OFFLOAD_WROKERS" in warned[0] and "OFFLOAD_WORKERS" in warned[0]


@pytest.mark.parametrize("text", ["maybe", "false", "True", "0", "", " /etc/ca.pem"])
def test_verify_takes_a_bool_or_a_bundle_path_not_a_word(text: str) -> None:
    assert offload.http("GET", "https://h/x", verify="/etc/ca.pem").kwargs["verify"]
    with pytest.raises(ValueError, match="CA bundle"):
        offload.http("GET", "https://h/x", verify=text)


def test_dir_shows_the_public_names_only() -> None:
    names = dir(offload)
    assert names == sorted(offload.__all__)
    assert not {"Any", "annotations", "PackageNotFoundError", "_default"} & set(names)
    assert {"keys", "gates", "Limit", "KeyState", "task"} <= set(names)
