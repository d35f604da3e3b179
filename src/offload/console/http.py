"""The console's view of HTTP: a request read from a WSGI environ, a response to send.

The console is mounted under any prefix (`SCRIPT_NAME`: a Flask `DispatcherMiddleware`
entry, a Django URL prefix), so every link and cookie path it makes starts with the
prefix it was called under (`Request.url`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

__all__ = ["MAX_FORM", "Request", "Response", "TooLarge"]

MAX_FORM = 1_000_000
"""Bytes of a form the console reads at most: its forms hold ids and filters."""

# What a Location keeps as it is: a path's and a query's characters (RFC 3986) and `%`
# (what is already escaped); anything else (a space, a control character, non-ASCII) is
# escaped, so a header never holds a character the server would have to refuse or pass on.
_LOCATION_SAFE = "/?&=%:@!$'()*+,;"


class TooLarge(Exception):
    """A request body the console will not read."""


def _text(value: str) -> str:
    """A WSGI string (latin-1 as the server decoded the bytes) as the UTF-8 text it is."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


class Request:
    """One request: method, path under the console's prefix, query, form and cookies."""

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self.environ = environ
        self.method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        self.prefix = _text(str(environ.get("SCRIPT_NAME", ""))).rstrip("/")
        path = _text(str(environ.get("PATH_INFO", ""))) or "/"
        self.path = path.rstrip("/") or "/"
        self.query = parse_qs(_text(str(environ.get("QUERY_STRING", ""))), keep_blank_values=True)
        self.cookies: dict[str, str] = {}
        # Names sent more than once (a cookie of the same name set for a parent domain, by
        # another site of it): which one SimpleCookie keeps depends on the client's order.
        self.repeated_cookies: frozenset[str] = frozenset()
        header = str(environ.get("HTTP_COOKIE", ""))
        if header:
            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(CookieError):  # another's malformed cookie: read none
                jar.load(header)
            self.cookies = {name: morsel.value for name, morsel in jar.items()}
            names = [part.partition("=")[0].strip() for part in header.split(";")]
            if len(names) != len(set(names)):
                self.repeated_cookies = frozenset(n for n in names if names.count(n) > 1)
        self._form: dict[str, list[str]] | None = None

    @property
    def secure(self) -> bool:
        return self.environ.get("wsgi.url_scheme") == "https"

    def header(self, name: str) -> str | None:
        """A request header by its HTTP name (`Authorization`, `Sec-Fetch-Site`)."""
        value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
        return None if value is None else str(value)

    def arg(self, name: str) -> str:
        """A query parameter's first value, stripped ("" when absent)."""
        return (self.query.get(name) or [""])[0].strip()

    @property
    def form(self) -> dict[str, list[str]]:
        """The POSTed form (application/x-www-form-urlencoded); TooLarge beyond MAX_FORM."""
        if self._form is None:
            self._form = {}
            kind = str(self.environ.get("CONTENT_TYPE", "")).split(";")[0].strip().lower()
            try:
                length = int(self.environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if length > MAX_FORM:
                raise TooLarge(f"a form of {length} bytes")
            if length > 0 and kind == "application/x-www-form-urlencoded":
                body = self.environ["wsgi.input"].read(length)
                text = body.decode("utf-8", "replace")
                self._form = parse_qs(text, keep_blank_values=True)
        return self._form

    def field(self, name: str) -> str:
        """A form field's first value, stripped ("" when absent)."""
        return (self.form.get(name) or [""])[0].strip()

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        """`path` (from the console's root) under the prefix, with `query` (empty values
        and None left out)."""
        pairs = [(k, v) for k, v in (query or {}).items() if v not in (None, "")]
        return self.prefix + path + (("?" + urlencode(pairs, doseq=True)) if pairs else "")


@dataclass
class Response:
    """What the console answers; `headers` are added to the security headers it always
    sends (see app.py)."""

    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        body = json.dumps(value, ensure_ascii=True, indent=1).encode() + b"\n"
        return cls(status, body, "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), "text/plain; charset=utf-8")

    @classmethod
    def redirect(cls, location: str) -> Response:
        """303 See Other: after a POST, or a login, the browser GETs `location` (escaped)."""
        escaped = quote(location, safe=_LOCATION_SAFE)
        return cls(303, b"", "text/plain; charset=utf-8", [("Location", escaped)])

    @property
    def status_line(self) -> str:
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Unknown"
        return f"{self.status} {phrase}"

    def set_cookie(self, name: str, value: str, *, path: str, secure: bool, max_age: int) -> None:
        """A cookie only this console's own pages send back: HttpOnly, SameSite=Strict."""
        attributes = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
        attributes.append(f"Max-Age={max_age}")
        if secure:
            attributes.append("Secure")
        self.headers.append(("Set-Cookie", "; ".join(attributes)))
