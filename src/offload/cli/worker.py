"""`offload worker`: an Offloader that consumes a durable store until SIGTERM or SIGINT,
then finishes the calls in flight and hands the rest back; and `offload demo`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import threading
from typing import Any, TextIO

from ..codec.trust import Trust
from .common import CommandError, open_durable, store_url

__all__ = ["run_demo", "run_worker"]

# The worker never exits for want of work; it stops on SIGTERM or SIGINT.
_FOREVER = 365 * 24 * 3600.0


def import_task_modules(given: list[str]) -> None:
    """Import --import modules and OFFLOAD_IMPORTS ones: their @offload.task decorators run."""
    env = [m.strip() for m in os.environ.get("OFFLOAD_IMPORTS", "").split(",") if m.strip()]
    for module in [*env, *given]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # one clear line, not a traceback
            raise CommandError(f"cannot import {module}: {type(exc).__name__}: {exc}") from None


def run_worker(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ..config import options_from_env  # noqa: PLC0415
    from ..offloader import Offloader  # noqa: PLC0415

    url = store_url(args)
    if not args.create:
        open_durable(args).close()  # a missing SQLite file or tables are an error here too
    options = options_from_env()
    options.update(store=url, consume=True, idle_timeout=_FOREVER)
    if args.trusted is not None:
        try:
            options["trusted"] = Trust.parse(args.trusted, "--trusted")
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    import_task_modules(args.imports)
    if args.workers is not None:
        if args.workers < 1:
            raise CommandError(f"--workers must be at least 1, got {args.workers}")
        options["workers"] = args.workers
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=err,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = _Signals()  # before any thread starts: the threads inherit the blocked signals
    try:
        off = Offloader(**options)
    except BaseException:
        stop.restore()
        raise
    if not off.store.durable:
        off.shutdown(0)
        stop.restore()
        raise CommandError(f"offload worker needs a durable store, not {off.store.url}")
    off.start()  # consume now, backlog or not; the worker never idles out
    logging.getLogger("offload").info(
        "offload worker: performing calls from %s with %d thread(s) (pid %d)",
        off.store.url,
        off.workers,
        os.getpid(),
    )
    received = stop.wait()
    logging.getLogger("offload").info(
        "offload worker: %s received; finishing calls in flight (up to %gs)",
        received,
        off.shutdown_timeout,
    )
    try:
        off.shutdown(off.shutdown_timeout)
    finally:
        stop.restore()
    s = off.stats()
    logging.getLogger("offload").info(
        "offload worker: stopped: %d delivered, %d dead-lettered, %d retried, %d handed back",
        s.succeeded,
        s.dead_lettered,
        s.retried,
        s.released - s.retried,
    )
    return 0


class _Signals:
    """SIGTERM and SIGINT, received by the main thread only: blocked in every thread (the
    worker threads inherit the mask) and taken with sigwait, where the platform has it."""

    _SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._event = threading.Event()
        self._got = ""
        self._previous: dict[int, Any] = {}
        self._masked = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwait")
        if self._masked:
            signal.pthread_sigmask(signal.SIG_BLOCK, self._SIGNALS)
        else:  # pragma: no cover - Windows
            for signum in self._SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:  # pragma: no cover - Windows
        self._got = signal.Signals(signum).name
        self._event.set()

    def wait(self) -> str:
        """Block until SIGTERM or SIGINT; return its name."""
        if self._masked:
            return signal.Signals(signal.sigwait(self._SIGNALS)).name
        while not self._event.wait(0.5):  # pragma: no cover - Windows
            pass
        return self._got  # pragma: no cover

    def restore(self) -> None:
        if self._masked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._SIGNALS)
        for signum, handler in self._previous.items():  # pragma: no cover - Windows
            signal.signal(signum, handler)


def run_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        from .. import demo  # noqa: PLC0415 - only this command needs it
    except ModuleNotFoundError as exc:
        if exc.name != "offload.demo":
            raise
        raise CommandError("the demo is not available in this installation") from None
    result: int = demo.run(store=args.store)
    return result
