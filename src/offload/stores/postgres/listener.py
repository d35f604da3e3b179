"""Wake-ups without polling: a thread that LISTENs on the store's channel with a connection
of its own and calls every watcher's `wake()` when a NOTIFY arrives.

The thread waits in `poll()` on its connection's socket and on a pipe that `close()`
writes to, so it sleeps until there is something to read, and stops at once. It calls
`wake()` once as soon as it listens (what was put before that was not heard of, or while
it could not listen), and on each batch of notifications. While it cannot listen (the
server restarting, a network cut) it tries again every RETRY seconds; meanwhile the
watchers' idle workers still look at the store on their own, every few seconds.

Fork: the thread does not exist in a child; its connection is the parent's and is never
used nor closed there (closing it would end the parent's session), only forgotten.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import threading
from collections.abc import Callable
from typing import Any

from ..._guard import Guarded
from ..._threads import daemon_thread

__all__ = ["Listener", "wait_readable"]

log = logging.getLogger("offload")

RETRY = 1.0
"""Seconds between attempts to listen again after the connection was lost."""

CLOSE_WAIT = 5.0
"""Seconds close() waits for the thread to end; one still connecting (an unreachable
server: up to the URL's connect_timeout) ends on its own, and closes the stop pipe then."""

# Inherited over fork(): never used again and never closed (see the module docstring).
_orphans: list[Any] = []


class Listener:
    """LISTEN on `channel` through connections from `connect`, and wake the watchers."""

    def __init__(
        self, connect: Callable[[], Any], channel: str, shown: str, scrub: Callable[[str], str]
    ) -> None:
        self._connect = connect
        self._channel = channel
        self._shown = shown
        self._scrub = scrub
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._watchers: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._stop_r, self._stop_w = -1, -1
        self._closed = False  # close() ran: the thread, when it ends, closes the pipe

    def add(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` on every notification from now on (the thread starts with the first
        watcher); returns the function that stops it."""
        with self._lock:
            number = self._next
            self._next += 1
            self._watchers[number] = wake
            if self._thread is None or not self._thread.is_alive():
                self._start()

        def remove() -> None:
            with self._lock:
                self._watchers.pop(number, None)

        return remove

    def _start(self) -> None:
        """Called with the lock held."""
        if self._stop_r < 0:
            self._stop_r, self._stop_w = os.pipe()
        thread = daemon_thread(self._run, "offload-listen")
        try:
            thread.start()
        except RuntimeError:  # interpreter exit: the watchers poll as they would without it
            return
        self._thread = thread

    def _wake_all(self) -> None:
        with self._lock:
            watchers = list(self._watchers.values())
        for wake in watchers:
            try:
                wake()
            except Exception as exc:  # one watcher's failure must not silence the others
                with Guarded():
                    log.error("offload: a wake-up callback failed: %s", exc)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            with self._lock:
                if self._closed:
                    self._close_pipe()

    def _serve(self) -> None:
        complained = False
        while True:
            try:
                conn = self._connect()
                conn.execute(f'LISTEN "{self._channel}"')
            except Exception as exc:
                if not complained:
                    with Guarded():
                        log.warning(
                            "offload: %s: cannot listen for new tasks (%s); looking every "
                            "%gs until it can",
                            self._shown,
                            self._scrub(str(exc)),
                            RETRY,
                        )
                    complained = True
                if self._stopped(RETRY):
                    return
                continue
            with self._lock:
                self._conn = conn
            if complained:
                with Guarded():
                    log.info("offload: %s: listening for new tasks again", self._shown)
                complained = False
            self._wake_all()  # what was put before LISTEN took effect
            try:
                if self._listen(conn):
                    return
            except Exception as exc:  # the connection broke: listen again
                with Guarded():
                    log.warning(
                        "offload: %s: lost the connection that listens for new tasks: %s",
                        self._shown,
                        self._scrub(str(exc)),
                    )
                complained = True
            finally:
                with self._lock:
                    self._conn = None
                _close_quietly(conn)
            if self._stopped(0):
                return

    def _listen(self, conn: Any) -> bool:
        """Wake the watchers on each batch of notifications; True once told to stop."""
        fd = conn.fileno()
        while True:
            readable = wait_readable([fd, self._stop_r], None)
            if self._stop_r in readable:
                return True
            if list(conn.notifies(timeout=0)):
                self._wake_all()

    def _stopped(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for close(); True if it came."""
        return bool(wait_readable([self._stop_r], timeout))

    def close(self) -> None:
        """Stop the thread and close its connection (in the process that made them)."""
        if self._pid != os.getpid():
            self.after_fork()
            return
        with self._lock:
            self._watchers.clear()
            thread = self._thread
            self._thread = None
            self._closed = True
            if self._stop_w >= 0:
                os.write(self._stop_w, b"x")
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_WAIT)
        with self._lock:
            # A thread still connecting reads the pipe once it is done: it closes it.
            if thread is None or not thread.is_alive():
                self._close_pipe()

    def _close_pipe(self) -> None:
        """Called with the lock held; once."""
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r, self._stop_w = -1, -1

    def after_fork(self) -> None:
        """In a forked child: forget the parent's thread and connection; a new watcher
        starts a thread of this process."""
        if self._conn is not None:
            _orphans.append(self._conn)
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)  # the child's copies only; the parent's pipe is untouched
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._watchers = {}
        self._thread = None
        self._conn = None
        self._stop_r, self._stop_w = -1, -1
        self._closed = False


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(Exception):  # a broken connection: nothing left to close
        conn.close()


def wait_readable(fds: list[int], timeout: float | None) -> list[int]:
    """Those of `fds` readable (or hung up) within `timeout` seconds (None: no limit), by
    poll(), which takes any descriptor (select() refuses one past FD_SETSIZE, 1024: a busy
    process's), where the system has it."""
    if not hasattr(select, "poll"):
        return list(select.select(fds, [], [], timeout)[0])
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(None if timeout is None else math.ceil(timeout * 1000))]
