"""The console: a web page to inspect and replay dead letters, with stats, keys, metrics
and a health check (`pip install 'offload[console]'`).

    app = offload.console.make_app(token=os.environ["OFFLOAD_CONSOLE_TOKEN"])
    app = offload.console.make_app(off, auth=lambda environ: is_staff(environ))
    app = offload.console.make_app("sqlite:////var/lib/app/offload.db", read_only=True)

`make_app` returns a WSGI application to mount in your own (Flask's DispatcherMiddleware,
Django by wrapping its WSGI application, FastAPI through a WSGI adapter such as a2wsgi);
`offload console --store URL` serves one on its own. The security model (access, sessions,
CSRF, headers, escaping) is in `access.py` and `app.py`; docs/DESIGN.md sums it up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..offloader import Offloader
    from ..stores import Store
    from .app import ConsoleApp

__all__ = ["MIN_TOKEN", "make_app"]

MIN_TOKEN = 16
"""Characters a console token has at least: it is all that stands before the dead letters."""


def make_app(
    offloader_or_store_url: Offloader | Store | str | None = None,
    *,
    token: str | None = None,
    auth: Callable[[Mapping[str, Any]], bool] | None = None,
    read_only: bool = False,
) -> ConsoleApp:
    """The console as a WSGI application.

    `offloader_or_store_url`: an Offloader (its store, stats and keys), a durable store's
    URL or Store (what the processes that perform the calls left there), or None for the
    module-level default offloader. Access: `token` (else OFFLOAD_CONSOLE_TOKEN), or
    `auth(environ) -> bool`, the host application's own check (either admits when both
    are given); neither is a ValueError. `read_only=True` shows no actions and refuses them.
    """
    try:
        import jinja2  # noqa: F401, PLC0415
    except ImportError:
        raise ImportError(
            "offload's console needs Jinja2: pip install 'offload[console]'"
        ) from None
    from .access import Access  # noqa: PLC0415 - jinja2 is an optional extra
    from .app import ConsoleApp  # noqa: PLC0415
    from .source import Source  # noqa: PLC0415

    if token is None:
        token = os.environ.get("OFFLOAD_CONSOLE_TOKEN") or None
    if token is not None:
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__}")
        if len(token) < MIN_TOKEN or token != token.strip() or not token.isprintable():
            raise ValueError(
                f"token must be at least {MIN_TOKEN} printable characters without spaces "
                "around them (secrets.token_urlsafe() makes one)"
            )
    if auth is not None and not callable(auth):
        raise TypeError(f"auth must be a callable auth(environ) -> bool, got {auth!r}")
    if token is None and auth is None:
        raise ValueError(
            "the console needs a way to let people in: token= (or OFFLOAD_CONSOLE_TOKEN) "
            "or auth=lambda environ: ..."
        )
    if not isinstance(read_only, bool):
        raise TypeError(f"read_only must be True or False, got {read_only!r}")
    return ConsoleApp(Source(offloader_or_store_url), Access(token, auth), read_only=read_only)
