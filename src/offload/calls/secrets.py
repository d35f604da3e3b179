"""The secret values a task's call holds, to scrub from its error text when it fails.

Redaction by pattern (`_redact.redact_text`) finds `token=...` and `Bearer ...`, but not
an API key an exception quotes in prose ("the API refused key sk_live_..."). A failed
call knows its own secrets: the values of its secret-named headers, params and body
fields, its cookies, its `auth` password and URL userinfo, its AWS parameters of secret
names, a function's arguments of secret names. Gathered only when an attempt failed:
never when a call is built or enqueued.
"""

from __future__ import annotations

import base64
import functools
import inspect
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

from .._redact import MIN_SCRUBBED_CHARS, is_secret_name, userinfo_of
from .aws_call import AwsCall
from .http_call import HttpCall

__all__ = ["known_secrets"]

_MAX_VISITS = 10_000  # values looked at in one task's arguments: a huge body costs no more
# Keys that name the type of a secret-named entry, not its value: AWS's message attributes
# are {"api_token": {"DataType": "String", "StringValue": "..."}}.
_TYPE_KEYS = frozenset({"DataType", "Type", "type"})


def known_secrets(call: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> set[str]:
    """The secret values of a task's call, each as written and as a URL or JSON text
    would quote it; never raises (what it cannot read, it leaves out)."""
    found: list[str] = []
    try:
        if isinstance(call, HttpCall):
            _http(call, found)
        elif isinstance(call, AwsCall):
            _Walk(found).value(call.params, secret=False)
        else:
            _arguments(call, args, kwargs, found)
    except Exception:  # the patterns of redact_text still apply
        pass
    return _as_quoted(found)


def _as_quoted(values: list[str]) -> set[str]:
    out: set[str] = set()
    for value in values:
        if len(value) < MIN_SCRUBBED_CHARS:
            continue
        out.add(value)
        out.add(quote_plus(value))  # as requests encodes params=
        out.add(quote(value, safe=""))
        out.add(json.dumps(value)[1:-1])  # as a JSON body quotes it
    return out


def _http(call: HttpCall, found: list[str]) -> None:
    walk = _Walk(found)
    _url(call.url, found)
    kwargs = call.kwargs
    for name, value in (kwargs.get("headers") or {}).items():
        if is_secret_name(name):
            found.append(value)
            found.extend(value.split()[1:])  # "Bearer <token>": the token alone too
    for value in (kwargs.get("cookies") or {}).values():
        found.append(value)  # whatever its name, a cookie is a session's
    auth = kwargs.get("auth")
    if isinstance(auth, tuple):
        user, password = (v.decode(errors="replace") if isinstance(v, bytes) else v for v in auth)
        found.append(password)
        found.append(base64.b64encode(f"{user}:{password}".encode()).decode())
    for keyword in ("params", "data"):
        form = kwargs.get(keyword)
        if isinstance(form, (str, bytes)):
            text = form.decode(errors="replace") if isinstance(form, bytes) else form
            found.extend(v for k, v in parse_qsl(text) if is_secret_name(k))
        elif form is not None:
            pairs = form.items() if isinstance(form, Mapping) else form
            for key, value in pairs:
                name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
                walk.value(value, secret=is_secret_name(name))
    if "json" in kwargs:
        walk.value(kwargs["json"], secret=False)
    for proxy in (kwargs.get("proxies") or {}).values():
        _url(proxy, found)


def _url(url: str, found: list[str]) -> None:
    userinfo = userinfo_of(url)
    if userinfo:
        user, colon, password = userinfo.partition(":")
        # A lone user name is how several APIs take a token (https://ghp_xxx@github.com).
        secret = password if colon and password else user
        found.extend({secret, unquote(secret)})
        # Unencoded, a `#` or `?` ends the host for requests: https://tok#en@h goes to
        # host `tok`, which its connection errors then name (in lower case).
        for piece in re.split(r"[#?/]", secret):
            found.extend({piece, piece.lower()})
    split = urlsplit(url)
    for part in (split.query, split.fragment):
        found.extend(v for k, v in parse_qsl(part) if is_secret_name(k))


def _arguments(
    call: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], found: list[str]
) -> None:
    """A function's arguments: those of secret names (positional ones named by the
    function's signature) and, in any argument, entries of secret names."""
    while isinstance(call, functools.partial):
        args, kwargs = call.args + args, {**call.keywords, **kwargs}
        call = call.func
    walk = _Walk(found)
    named: Mapping[str, Any] = kwargs
    try:
        named = inspect.signature(call).bind_partial(*args, **kwargs).arguments
        args = ()
    except (TypeError, ValueError):  # no signature (a builtin), or arguments it refuses
        pass
    for value in args:
        walk.value(value, secret=False)
    for name, value in named.items():
        walk.value(value, secret=is_secret_name(name))


class _Walk:
    """Collects the text of values under a secret name, in nested mappings and lists."""

    __slots__ = ("found", "visits")

    def __init__(self, found: list[str]) -> None:
        self.found = found
        self.visits = 0

    def value(self, value: Any, *, secret: bool, depth: int = 0) -> None:
        self.visits += 1
        if self.visits > _MAX_VISITS or depth > 20:
            return
        if isinstance(value, str):
            if secret:
                self.found.append(value)
        elif isinstance(value, (bytes, bytearray)):
            if secret:
                self.found.append(bytes(value).decode(errors="replace"))
        elif isinstance(value, int) and not isinstance(value, bool):
            if secret:
                self.found.append(str(value))  # a PIN, a numeric password
        elif isinstance(value, Mapping):
            for key, item in value.items():
                name = str(key)
                if not (secret and name in _TYPE_KEYS):
                    self.value(item, secret=secret or is_secret_name(name), depth=depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self.value(item, secret=secret, depth=depth + 1)
