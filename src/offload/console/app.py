"""ConsoleApp: the console's WSGI application: access, routing, and the headers every
answer carries.

Every response, whatever it is, says `Cache-Control: no-store` (dead letters and tokens do
not belong in caches), `Content-Security-Policy: default-src 'none'; style-src 'self';
form-action 'self'; frame-ancestors 'none'; base-uri 'none'` (no script at all, inline or
not: the pages need none; no framing, so no clickjacking), `X-Frame-Options: DENY`,
`X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer` (a URL with
`?token=` never leaks through a Referer). Pages are Jinja2 templates with autoescaping
on, so a dead letter's error, which a third party wrote, is shown as text, never as
markup. Errors are answered without details: the log has them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from importlib.resources import files
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from .._redact import redact_text
from ..errors import StoreError, UnknownDeadLetter
from .access import CSRF_COOKIE, SESSION_COOKIE, SESSION_SECONDS, Access
from .api import Api
from .http import Request, Response, TooLarge
from .pages import Pages, clip, when
from .source import Source

__all__ = ["SECURITY_HEADERS", "ConsoleApp"]

log = logging.getLogger("offload")

SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)

View = Callable[[Request, dict[str, str]], Response]
_ID = r"(?P<id>[^/]+)"


class ConsoleApp:
    """The console as a WSGI application (made by `offload.console.make_app`)."""

    def __init__(self, source: Source, access: Access, *, read_only: bool) -> None:
        self.source = source
        self.access = access
        self.read_only = read_only
        self.templates = Environment(
            loader=PackageLoader("offload.console", "templates"),
            autoescape=True,  # every value is text unless a template says otherwise
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["when"] = when
        self.templates.filters["clip"] = clip
        static = files("offload.console") / "static"
        self._static = {
            "/static/console.css": (
                (static / "console.css").read_bytes(),
                "text/css; charset=utf-8",
            ),
            "/static/favicon.svg": ((static / "favicon.svg").read_bytes(), "image/svg+xml"),
        }
        pages, api = Pages(self), Api(self)
        self.api = api
        # (method, path pattern, handler, changes something)
        routes: list[tuple[str, str, View, bool]] = [
            ("GET", "/", pages.overview, False),
            ("GET", "/dead-letters", pages.letters, False),
            ("GET", f"/dead-letters/{_ID}", pages.letter, False),
            ("POST", f"/dead-letters/{_ID}/(?P<action>replay|discard)", pages.act_one, True),
            ("GET", "/confirm", pages.confirm, False),
            ("POST", "/act", pages.act, True),
            ("GET", "/purge", pages.purge_confirm, False),
            ("POST", "/purge", pages.purge, True),
            ("GET", "/api/dead-letters", api.letters, False),
            ("GET", f"/api/dead-letters/{_ID}", api.letter, False),
            ("POST", f"/api/dead-letters/{_ID}/replay", api.replay, True),
            ("GET", "/api/stats", api.stats, False),
            ("GET", "/api/health", api.health, False),
            ("GET", "/metrics", api.metrics, False),
        ]
        self.routes = [(m, re.compile(f"^{p}$"), view, changes) for m, p, view, changes in routes]
        self.pages = pages

    # -- WSGI -----------------------------------------------------------------------------

    def __call__(
        self, environ: Mapping[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        request = Request(environ)
        nonce = request.cookies.get(CSRF_COOKIE) or ""
        fresh = not nonce or len(nonce) > 64
        if fresh:
            nonce = self.access.new_nonce()
        request.environ = {**environ, "offload.csrf": self.access.csrf_token(nonce)}
        try:
            response = self.handle(request)
        except TooLarge:
            response = self.refuse(request, 413, "The request is too large.")
        except Exception:
            log.exception("offload console: %s %s failed", request.method, request.path)
            response = self.refuse(request, 500, "Something went wrong; the log says what.")
        if fresh and response.content_type.startswith("text/html"):
            response.set_cookie(
                CSRF_COOKIE,
                nonce,
                path=request.prefix or "/",
                secure=request.secure,
                max_age=SESSION_SECONDS,
            )
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *SECURITY_HEADERS,
            *response.headers,
        ]
        start_response(response.status_line, headers)
        return [b"" if request.method == "HEAD" else response.body]

    def handle(self, request: Request) -> Response:
        path, method = request.path, request.method
        if method == "HEAD":
            method = "GET"
        if path in self._static and method == "GET":
            return Response(200, *self._static[path])
        allowed = self.access.allowed(request)
        if path == "/healthz" and method == "GET":
            return self.api.healthz(request, allowed)
        if method == "GET" and "token" in request.query:
            return self._login_by_url(request)
        if path == "/login":
            return self._login(request, method)
        if not allowed:
            return self._refused(request)
        if method == "POST":
            ok, why = self.access.post_allowed(request)
            if not ok:
                return self.refuse(request, 403, f"Refused: {why}. Nothing was changed.")
            if path == "/logout":
                return self._logout(request)
        methods: set[str] = set()  # of the routes whose pattern matches the path
        for route_method, pattern, view, changes in self.routes:
            match = pattern.match(path)
            if match is None:
                continue
            methods.add(route_method)
            if route_method != method:
                continue
            if changes and self.read_only:
                return self.refuse(request, 403, "This console is read-only. Nothing was changed.")
            try:
                return view(request, match.groupdict())
            except UnknownDeadLetter:
                return self.refuse(request, 404, "No dead letter has that id (any more).")
            except StoreError as exc:
                log.warning("offload console: %s", redact_text(str(exc)))
                return self.refuse(request, 503, "The store did not answer; the log says why.")
        if methods:
            return self._not_allowed(request, method, methods)
        return self.refuse(request, 404, "There is no such page.")

    # -- answers --------------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> Response:
        """A page from `template`, with what every page needs (`context` may override it)."""
        values: dict[str, Any] = {
            "url": request.url,
            "csrf": request.environ["offload.csrf"],
            "read_only": self.read_only,
            "authorized": True,
            "sessions": self.access.uses_sessions,
            "error": None,
        }
        values.update(context)
        if "store_url" not in values:
            values["store_url"] = self.source.store_url
        if "notice" not in values:
            values["notice"] = self.pages.notice(request)
        body = self.templates.get_template(template).render(values)
        return Response(status, body.encode())

    def message(self, request: Request, status: int, heading: str, message: str) -> Response:
        """A page with one message (errors and refusals), never with data."""
        authorized = status not in (401, 403) and self.access.allowed(request)
        return self.render(
            request,
            "message.html",
            status,
            title=heading,
            nav="",
            heading=heading,
            message=message,
            authorized=authorized,
            store_url="",
            notice=None,
        )

    def refuse(self, request: Request, status: int, message: str) -> Response:
        """An error for a page (HTML) or a script (JSON: the API and metrics)."""
        if _for_scripts(request):
            return Response.json({"error": message}, status)
        heading = {
            403: "Refused",
            404: "Not found",
            405: "Not allowed",
        }.get(status, "Error")
        return self.message(request, status, heading, message)

    def _not_allowed(self, request: Request, method: str, methods: set[str]) -> Response:
        """405, with the `Allow` header RFC 9110 asks for: what the path does take."""
        if "GET" in methods:
            methods = {*methods, "HEAD"}
        response = self.refuse(request, 405, f"{method} is not allowed here.")
        response.headers.append(("Allow", ", ".join(sorted(methods))))
        return response

    def log_failure(self, what: str) -> None:
        log.exception("offload console: %s failed", what)

    # -- access ---------------------------------------------------------------------------

    def _refused(self, request: Request) -> Response:
        """Not admitted: 401 for scripts; the login page (no data) for browsers."""
        if _for_scripts(request):
            response = Response.json(
                {"error": "unauthorized: send Authorization: Bearer TOKEN"}, 401
            )
            response.headers.append(("WWW-Authenticate", 'Bearer realm="offload console"'))
            return response
        here = request.path + (
            ("?" + str(request.environ.get("QUERY_STRING"))) if request.query else ""
        )
        return self._login_page(request, 401, next_path=here if request.method == "GET" else "/")

    def _login_page(
        self, request: Request, status: int, *, next_path: str, error: str | None = None
    ) -> Response:
        return self.render(
            request,
            "login.html",
            status,
            title="Log in",
            nav="",
            authorized=False,
            store_url="",
            can_log_in=self.access.uses_sessions,
            next=_safe_next(next_path),
            error=error,
            notice=None,
        )

    def _login(self, request: Request, method: str) -> Response:
        if method == "GET":
            return self._login_page(request, 200, next_path=request.arg("next") or "/")
        if method != "POST":
            return self._not_allowed(request, method, {"GET", "POST"})
        ok, why = self.access.post_allowed(request)
        if not ok:
            return self.refuse(request, 403, f"Refused: {why}. Log in from the console's own page.")
        next_path = _safe_next(request.field("next") or "/")
        if not self.access.token_matches(request.field("token")):
            return self._login_page(
                request, 401, next_path=next_path, error="That is not the token."
            )
        return self._session(request, request.prefix + next_path)

    def _login_by_url(self, request: Request) -> Response:
        """`?token=TOKEN` (the URL `offload console` prints): a session, then the same page
        without the token in the address bar (or history)."""
        token = request.arg("token")
        rest = {k: v for k, v in request.query.items() if k != "token"}
        if not self.access.token_matches(token):
            if _for_scripts(request):
                return self._refused(request)  # a script's 401, in JSON
            return self._login_page(
                request, 401, next_path=request.path, error="That link's token is not right."
            )
        return self._session(request, request.url(_safe_next(request.path), rest))

    def _session(self, request: Request, location: str) -> Response:
        response = Response.redirect(location)
        response.set_cookie(
            SESSION_COOKIE,
            self.access.new_session(),
            path=request.prefix or "/",
            secure=request.secure,
            max_age=SESSION_SECONDS,
        )
        return response

    def _logout(self, request: Request) -> Response:
        response = Response.redirect(request.url("/login"))
        response.set_cookie(
            SESSION_COOKIE, "", path=request.prefix or "/", secure=request.secure, max_age=0
        )
        return response


def _for_scripts(request: Request) -> bool:
    """Whether `request` is a script's (the API and metrics), answered in JSON."""
    return request.path.startswith("/api/") or request.path == "/metrics"


_UNSAFE_IN_NEXT = re.compile(r"[\x00-\x1f\x7f\\\s]")


def _safe_next(path: str) -> str:
    """Where a login may send the browser on: a path of this console, nothing else.

    Not another site (`//host`, a backslash, `scheme://`), and no control character or
    whitespace: a browser drops tabs and newlines from a URL (`/<TAB>/evil.example` takes
    it to `//evil.example`), and a server that writes headers as it is given them (the
    stdlib's, which `offload console` uses) would end the Location header at a CRLF."""
    if (
        not path.startswith("/")
        or path.startswith("//")
        or "://" in path
        or _UNSAFE_IN_NEXT.search(path)
    ):
        return "/"
    return path
