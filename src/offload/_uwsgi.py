"""What offload needs to know of uWSGI, read from the `uwsgi` module it gives the
processes it runs (absent anywhere else, where every function here answers None).

By default uWSGI loads the application in its master and forks the workers from it
without CPython's fork hooks. A Python thread of the master that holds the GIL, or waits
for it, at that moment leaves the child's GIL owned by a thread the child does not have:
the worker hangs before it serves a request. Offload's worker thread in the master (a
call enqueued at import) is such a thread; `py-call-uwsgi-fork-hooks` makes uWSGI take
the GIL around its forks and run the hooks, and `lazy-apps` loads the application in
each worker instead, so the master runs no thread.
"""

from __future__ import annotations

import sys

__all__ = ["master_thread_hazard", "threads_hint"]

_FALSE = {b"", b"0", b"false", b"no", b"off", "", "0", "false", "no", "off"}


def _option(name: str) -> bool | None:
    """Whether uWSGI option `name` is set in this process; None outside uWSGI."""
    uwsgi = sys.modules.get("uwsgi")
    opt = getattr(uwsgi, "opt", None)
    if not isinstance(opt, dict):
        return None
    value = opt.get(name)
    if isinstance(value, list):  # an option given more than once
        value = value[-1]
    if isinstance(value, (bytes, str)):
        return value.strip().lower() not in _FALSE
    return bool(value)


def master_thread_hazard() -> str | None:
    """The warning to give when a worker thread starts in the uWSGI master, which forks
    its workers without CPython's fork hooks; None elsewhere."""
    uwsgi = sys.modules.get("uwsgi")
    try:
        in_master = uwsgi is not None and uwsgi.worker_id() == 0 and bool(_option("master"))
    except Exception:  # an older or a stand-in module: say nothing rather than fail
        return None
    if not in_master or _option("py-call-uwsgi-fork-hooks"):
        return None
    return (
        "offload: a worker thread started in the uWSGI master (a call enqueued while the "
        "application loads); uWSGI forks its workers from the master without CPython's fork "
        "hooks, and a worker forked while this thread runs Python hangs before serving. Set "
        "`py-call-uwsgi-fork-hooks = true` (--py-call-uwsgi-fork-hooks), or "
        "`lazy-apps = true` (--lazy-apps) to load the application in each worker"
    )


def threads_hint() -> str | None:
    """What to set when a started worker thread does not run under uWSGI (before 2.0.27,
    uWSGI ran the application's threads only with enable-threads); None elsewhere."""
    if "uwsgi" not in sys.modules:
        return None
    return (
        "uWSGI before 2.0.27 runs the application's threads only with "
        "`enable-threads = true` (--enable-threads): set it"
    )
