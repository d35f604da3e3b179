"""An HttpCall's URL: checked when the call is built, and its throttle key.

A handler calls the same few APIs, but often with a different URL each time (an id in the
path). What can be wrong with a URL (its scheme, a host that requests would refuse, a bad
port) lies in its origin, `scheme://authority`: each origin is checked once, in full, and
a new URL of an origin that passed needs only a look at its characters. A whole URL that
passed costs a dict lookup, which also gives its throttle key.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import requests

from .._redact import redact_text, redact_url

__all__ = ["GOOD_URLS", "check_url", "url_key"]

GOOD_URLS: dict[str, str] = {}  # whole URLs that passed -> their throttle keys
_GOOD_ORIGINS: dict[str, str] = {}  # origins whose URLs passed the whole check -> keys
_MAX = 4096  # entries each; a table that is full is emptied, so memory stays bounded

# `scheme://authority` of an http(s) URL, as urlsplit and urllib3 both cut it, followed
# by the path, query, fragment or nothing. No match for an authority with userinfo (whose
# URLs are always checked in full) or a backslash (which urllib3 takes as the end of the
# authority and urlsplit does not).
_ORIGIN = re.compile(r"[hH][tT][tT][pP][sS]?://[^/?#\\@]*(?=[/?#]|\Z)")
_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
# The origin of the URL checked last (one that passed), and its key: a handler's next URL
# is most often of the same API, and `startswith` costs a tenth of the match. One tuple,
# so that a thread reads an origin and its own key together.
_last: tuple[str, str] = ("", "")
_AFTER_ORIGIN = frozenset({"", "/", "?", "#"})  # what _ORIGIN's lookahead allows after it


def check_url(url: Any) -> str:
    """`url` if requests can send it: http(s), a host, no whitespace or control characters
    (checked here, not on the worker); TypeError or ValueError, the URL redacted, if not.
    The URL's throttle key is made with the check (both depend on its origin alone) and
    kept with it, for `url_key`."""
    if type(url) is str and url in GOOD_URLS:
        return url
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    global _last
    last, last_key = _last
    end = len(last)
    origin: str | None
    key: str | None
    if end and url.startswith(last) and url[end : end + 1] in _AFTER_ORIGIN:
        origin, key = last, last_key  # as _ORIGIN would cut it, without the match
    else:
        match = _ORIGIN.match(url)
        origin = None if match is None else match.group()
        key = None if origin is None else _GOOD_ORIGINS.get(origin)
    # Printable and without a space is the usual case of "no whitespace or control
    # character" (the whole check's regex decides the rest).
    if key is None or not url.isprintable() or " " in url:
        _check_whole(url)
        key = _key(url)
        if origin is not None:
            if len(_GOOD_ORIGINS) >= _MAX:
                _GOOD_ORIGINS.clear()
            _GOOD_ORIGINS[origin] = key
    if origin is not None and origin is not last:
        _last = (origin, key)
    if len(GOOD_URLS) >= _MAX:  # every new URL comes this way
        GOOD_URLS.clear()
    GOOD_URLS[url] = key
    return url


def url_key(url: str) -> str:
    """The throttle key of a URL: `scheme://host:port`, host lowercased, the default port
    explicit. A URL checked before costs a dict lookup. ValueError for a port that is not
    a number."""
    key = GOOD_URLS.get(url)
    if key is None:
        origin = _ORIGIN.match(url)
        key = None if origin is None else _GOOD_ORIGINS.get(origin.group())
        if key is None:
            key = _key(url)
    return key


def _check_whole(url: str) -> None:
    if not url:
        raise ValueError("url is empty")
    if _BAD_URL_CHARS.search(url):
        raise ValueError(f"url contains whitespace or control characters: {redact_url(url)!r}")
    try:
        split = urlsplit(url)
        _ = split.port  # parsing the port validates it
    except ValueError as exc:
        raise ValueError(
            f"url is not a valid URL ({_why(url, exc)}): {redact_url(url)!r}"
        ) from None
    if split.scheme.lower() not in ("http", "https"):
        scheme = split.scheme or "none"
        raise ValueError(
            f"url must be http:// or https://, got scheme {scheme!r}: {redact_url(url)!r}"
        )
    if not split.hostname:
        raise ValueError(f"url has no host: {redact_url(url)!r}")
    try:  # requests' own checks (IDNA host labels, ...), now rather than on the worker
        requests.PreparedRequest().prepare_url(url, None)
    except (requests.exceptions.RequestException, ValueError, UnicodeError) as exc:
        raise ValueError(f"url is not valid for requests ({redact_text(str(exc))})") from None


def _why(url: str, exc: ValueError) -> str:
    """Why urlsplit refused `url`, without its words when they may quote a password:
    `https://u:Pa/ss@h` reads as host `u` and port `Pa`, which its error message quotes."""
    if "@" in url and "'" in str(exc):
        return "its port is not a number, or its password holds an unencoded '/', '?' or '#'"
    return str(exc)


def _key(url: str) -> str:
    split = urlsplit(url)
    scheme = split.scheme.lower()
    host = split.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = split.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{host}:{port}"
