"""Middleware for web applications: offload's workers start on a request's tasks once its
response has been sent.

A worker woken by an enqueue in a handler runs while the handler is still answering: in
CPython it takes the GIL whenever the request's thread lets go of it (gunicorn writes the
headers and the body of a response in two calls), and the client waits for the rest of the
answer while the worker prepares its call. Wrapped in this middleware, an application's
enqueues hold their wake-up until the response is out: once the server has written its
body (WSGI: the first chunk of it, or the close; ASGI: the first body message), so that a
streamed response holds nothing for its whole length. Nothing else changes: the task is
queued, counted and, in a durable store, written before `enqueue_task` returns; a worker
that is already busy takes it as soon as it is free; `flush()` and `shutdown()` let every
hold go, and a response never closed lets its hold go when it is dropped.

    app.wsgi_app = offload.web.WSGIMiddleware(app.wsgi_app)          # Flask
    application = offload.web.WSGIMiddleware(get_wsgi_application())  # Django
    app.add_middleware(offload.web.ASGIMiddleware)                     # FastAPI, Starlette
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

from ._threads import daemon_thread
from .worker import HOLD, WakeHold

__all__ = ["ASGIMiddleware", "WSGIMiddleware"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# The messages that carry a response's body (zerocopysend and pathsend: ASGI extensions).
_BODIES = frozenset({"http.response.body", "http.response.zerocopysend", "http.response.pathsend"})


class _Closing:
    """A WSGI response that lets the hold go once the server has written its first chunk,
    or when it closes the response (PEP 3333: always, after the last byte or on an
    error)."""

    __slots__ = ("_hold", "_result")

    def __init__(self, result: Iterable[bytes], hold: WakeHold) -> None:
        self._result = result
        self._hold = hold

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._result)
        for chunk in chunks:
            yield chunk  # the server asks for the next one once it has written this one
            self._hold.release()
            yield from chunks

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._hold.release()

    def __del__(self) -> None:
        # A harness that never closes the response (Flask's test client keeps it open): the
        # wake-ups go when it is dropped, or at the next flush() or shutdown(). Given from
        # a thread of their own: the cyclic GC may run this in any thread at any moment,
        # one that holds an offloader's lock among them, which release() takes.
        hold = self._hold
        if hold.kept:
            with contextlib.suppress(RuntimeError):  # at exit: shutdown() lets it go
                daemon_thread(hold.release, "offload-release").start()


class _SizedClosing(_Closing):
    """_Closing over a list or tuple, whose length a server may read (wsgiref and waitress
    set Content-Length from a one-chunk body)."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._result)  # type: ignore[arg-type]


def _sent_by_server(result: Iterable[bytes], environ: dict[str, Any]) -> bool:
    """Whether `result` is a file the server may send itself (sendfile), to pass as it is:
    the server's `wsgi.file_wrapper` (a class, as gunicorn's and wsgiref's are), or a
    file-like object (what uWSGI's wrapper, a function, hands back)."""
    wrapper = environ.get("wsgi.file_wrapper")
    if isinstance(wrapper, type) and isinstance(result, wrapper):
        return True
    return hasattr(result, "filelike") or hasattr(result, "read")


class WSGIMiddleware:
    """Wrap a WSGI application: workers are woken for its tasks after each response."""

    def __init__(self, app: WSGIApp) -> None:
        if not callable(app):
            raise TypeError(f"WSGIMiddleware wraps a WSGI application, not {app!r}")
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        hold = WakeHold()
        token = HOLD.set(hold)
        try:
            result = self.app(environ, start_response)
        except BaseException:
            hold.release()
            raise
        finally:
            HOLD.reset(token)
        if not hold.kept:
            hold.release()  # nothing enqueued: the response goes out as the app made it
            return result
        if _sent_by_server(result, environ):
            hold.release()  # a file the server sends itself: keep it as it is
            return result
        if isinstance(result, (list, tuple)):
            return _SizedClosing(result, hold)
        return _Closing(result, hold)


class ASGIMiddleware:
    """Wrap an ASGI application: workers are woken for a request's tasks once the first
    part of its response's body has been sent (or when the request ends without one)."""

    def __init__(self, app: ASGIApp) -> None:
        if not callable(app):
            raise TypeError(f"ASGIMiddleware wraps an ASGI application, not {app!r}")
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        hold = WakeHold()

        async def sending(message: Message) -> None:
            await send(message)
            if message.get("type") in _BODIES:
                hold.release()

        token = HOLD.set(hold)
        try:
            await self.app(scope, receive, sending)
        finally:
            HOLD.reset(token)
            hold.release()
