"""The `requests` keywords an HttpCall takes, each checked when the call is built.

Everything that can be wrong with a request (a bad method, a URL without a host, a typo
in a keyword, a timeout that lets the worker hang, a body that could not be sent twice)
raises in the handler that built it, not minutes later on the worker.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from requests.auth import AuthBase, HTTPBasicAuth

from ..codec.values import dumps, dumps_frozen, encode_frozen, holds_tags, json_problem
from ._frozen import FrozenDict, freeze, thaw

__all__ = [
    "DEFAULT_TIMEOUT",
    "HEADER_VALUE",
    "HTTP_METHODS",
    "RequestKwargs",
    "check_http_kwargs",
    "check_idempotency_key",
    "check_method",
]

DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)
"""(connect, read) seconds, applied when a call gives none: without one a request can
hang the worker forever."""

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REFUSED = {
    "stream": "offload reads the whole response so the connection goes back to the pool",
    "hooks": "hooks are code, which a durable store cannot hold; wrap the call in a function",
    "method": "give it as the first argument",
    "url": "give it as the second argument",
    "max_retries": "offload does the retrying; see RetryPolicy",
}
# As requests checks them, but at build time. \Z, not $: "$" also matches before a final
# newline, and a header that ends in one is refused by requests on the worker.
_HEADER_NAME = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
HEADER_VALUE = re.compile(r"\A(\S[^\r\n]*)?\Z")
_FORM_SCALARS = (str, bytes, int, float)


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_method(method: Any) -> str:
    if method in HTTP_METHODS and type(method) is str:
        return method  # (the usual case: already upper case, no space)
    if not isinstance(method, str):
        raise TypeError(f"method must be a str such as 'POST', got {_type_name(method)}")
    upper = method.strip().upper()
    if upper not in HTTP_METHODS:
        raise ValueError(f"method must be one of {', '.join(sorted(HTTP_METHODS))}, got {method!r}")
    return upper


def _timeout_part(value: Any, what: str) -> float:
    if value is None:
        raise ValueError(f"{what}=None would let a request hang the worker forever; give seconds")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {_type_name(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def _check_timeout(value: Any) -> float | tuple[float, float]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"timeout must be seconds or a (connect, read) pair, got {value!r}")
        return (_timeout_part(value[0], "timeout connect"), _timeout_part(value[1], "timeout read"))
    return _timeout_part(value, "timeout")


def _check_str_mapping(value: Any, what: str) -> dict[str, str]:
    if (
        type(value) is dict
        and _STR.issuperset(map(type, value))
        and _STR.issuperset(map(type, value.values()))
    ):
        return value  # the usual case; the caller copies it
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of str to str, got {_type_name(value)}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            # Name the key only: the value may be a secret.
            raise TypeError(
                f"{what} must map str to str; {k!r} maps a {_type_name(k)} to a {_type_name(v)}"
            )
    return dict(value)


_STR = frozenset({str})

# Header names that passed, so that a handler's usual few cost a set lookup each.
_GOOD_NAMES: set[str] = set()


class Headers(FrozenDict):
    """Checked headers. A handler sends the same few sets of headers (an API's token and
    content type) on every call: each set is checked once, encoded once (when a durable
    store first asks), and every call built with it shares the one read-only copy."""

    __slots__ = ("_text",)

    def __init__(self, checked: Mapping[str, str]) -> None:
        dict.__init__(self, checked)
        self._text: str | None = None

    def text(self) -> str:
        """The headers as JSON text, made once."""
        text = self._text
        if text is None:
            text = self._text = dumps_frozen(self)
        return text


_HEADERS: dict[tuple[tuple[str, str], ...], Headers] = {}
_MAX_HEADERS = 256


def _check_headers(value: Any) -> FrozenDict:
    items = None
    if type(value) is dict:  # the usual case: a set already seen costs a dict lookup
        try:
            items = tuple(value.items())
            headers = _HEADERS.get(items)
        except TypeError:  # an unhashable value: refused below
            items = headers = None
        if headers is not None:
            return headers
    checked = _checked_headers(value)
    headers = Headers(checked)
    # Only a set of exact str (the one-pass check returned it as it is): an equal set of a
    # str subclass (a StrEnum value) must not be handed to later calls of plain str.
    if items is not None and checked is value:
        if len(_HEADERS) >= _MAX_HEADERS:
            _HEADERS.clear()  # a handler that sends per-user tokens: no unbounded growth
        _HEADERS[items] = headers
    return headers


def _checked_headers(value: Any) -> dict[str, str]:
    if type(value) is dict:  # the usual case: one pass over the items
        for name, v in value.items():
            if type(name) is not str or type(v) is not str:
                break
            if name not in _GOOD_NAMES:
                _check_header_name(name)
            # HEADER_VALUE's rule without the regex: empty, or no leading space, one line.
            if v and (v[0].isspace() or "\n" in v or "\r" in v):
                raise ValueError(
                    f"headers: the value of {name!r} has a line break or leading whitespace"
                )
        else:
            return value
    headers = _check_str_mapping(value, "headers")
    for name, v in headers.items():
        if name not in _GOOD_NAMES:
            _check_header_name(name)
        if not HEADER_VALUE.match(v):
            raise ValueError(
                f"headers: the value of {name!r} has a line break or leading whitespace"
            )
    return headers


def _check_header_name(name: str) -> None:
    if not _HEADER_NAME.match(name):
        raise ValueError(f"headers: {name!r} is not a valid header name")
    if len(_GOOD_NAMES) < 4096:
        _GOOD_NAMES.add(name)


def _check_form(value: Any, what: str) -> Any:
    """params= / data=: text, or a mapping or list of pairs of scalars (or lists of them)."""
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = list(value)
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise TypeError(f"{what} as a list must hold (name, value) pairs")
    else:
        why = (
            " (a file or generator is read once and could not be sent again on retry)"
            if hasattr(value, "read") or hasattr(value, "__next__")
            else ""
        )
        raise TypeError(
            f"{what} must be str, bytes, a mapping or a list of (name, value) pairs, "
            f"got {_type_name(value)}{why}"
        )
    for name, item in pairs:
        if not isinstance(name, (str, bytes)):
            raise TypeError(f"{what}: names must be str, got {_type_name(name)}")
        items = item if isinstance(item, (list, tuple)) else [item]
        for scalar in items:
            if scalar is not None and not isinstance(scalar, _FORM_SCALARS):
                raise TypeError(
                    f"{what}[{name!r}] must be str, bytes, a number or a list of them, "
                    f"got {_type_name(scalar)}"
                )
    return value


def _check_auth(value: Any) -> Any:
    if type(value) is HTTPBasicAuth:  # the same as a pair, and a pair can be stored
        value = (value.username, value.password)
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(v, (str, bytes)) for v in value):
            raise TypeError("auth must be a (user, password) pair of str")
        return tuple(value)
    if isinstance(value, AuthBase) or callable(value):
        return value  # fine in memory; to_json refuses it
    raise TypeError(
        f"auth must be a (user, password) pair or a requests auth, got {_type_name(value)}"
    )


def _check_files(value: Any) -> Any:
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    if not isinstance(pairs, (list, tuple)):
        raise TypeError(f"files must be a mapping or a list of pairs, got {_type_name(value)}")
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise TypeError("files must map a field name to its content")
        name, spec = pair
        content = spec[1] if isinstance(spec, (list, tuple)) and len(spec) >= 2 else spec
        if isinstance(spec, (list, tuple)) and not (
            2 <= len(spec) <= 4 and (spec[0] is None or isinstance(spec[0], str))
        ):
            raise TypeError(
                f"files[{name!r}] must be content or (filename, content[, type[, headers]])"
            )
        if not isinstance(content, (bytes, str)):
            raise TypeError(
                f"files[{name!r}] content must be bytes or str, got {_type_name(content)} "
                "(an open file is read once and could not be sent again on retry)"
            )
    return value


_NOT_PLAIN: Any = object()
_FLAT = frozenset({str, int, bool, type(None)})


def _frozen_json(value: Any, depth: int = 0) -> Any:
    """A frozen copy of a value of exact JSON types (tuples too), or _NOT_PLAIN: one walk
    that checks and copies, before the slower one that names what is wrong."""
    kind = type(value)
    if kind is dict and depth <= 100:
        for k, v in value.items():  # flat: text, whole numbers, flags, null (a usual body)
            if type(k) is not str or type(v) not in _FLAT:
                break  # (a float, too: the walk below checks that it is finite)
        else:
            return FrozenDict(value)
        out = {}
        for k, v in value.items():
            item = _frozen_json(v, depth + 1)
            if type(k) is not str or item is _NOT_PLAIN:
                return _NOT_PLAIN
            out[k] = item
        return FrozenDict(out)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else _NOT_PLAIN
    if depth > 100:
        return _NOT_PLAIN
    if kind is list or kind is tuple:
        items = []
        for v in value:
            item = _frozen_json(v, depth + 1)
            if item is _NOT_PLAIN:
                return _NOT_PLAIN
            items.append(item)
        return tuple(items)
    return _NOT_PLAIN


def _check_json(value: Any) -> Any:
    frozen = _frozen_json(value)
    if frozen is not _NOT_PLAIN:
        return frozen
    problem = json_problem(thaw(value, list), "json")
    if problem:
        raise TypeError(problem)
    return freeze(value)


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"allow_redirects must be a bool, got {_type_name(value)}")
    return value


def _check_verify(value: Any) -> bool | str:
    if not isinstance(value, (bool, str)):
        raise TypeError(f"verify must be a bool or a CA bundle path, got {_type_name(value)}")
    if isinstance(value, str) and (
        value.strip().lower() in _NOT_PATHS or not value.strip() or value != value.strip()
    ):
        # requests would take the text as a file name, and fail on the worker (or, for
        # "false", check certificates the caller meant to skip).
        raise ValueError(f"verify must be True, False or the path of a CA bundle, got {value!r}")
    return value


_NOT_PATHS = frozenset(
    {"true", "false", "yes", "no", "on", "off", "0", "1", "none", "maybe", "y", "n"}
)


def _check_cert(value: Any) -> str | tuple[str, str]:
    if isinstance(value, str):
        return value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    ):
        return (value[0], value[1])
    raise TypeError(f"cert must be a path or a (cert, key) pair of paths, got {value!r}")


# Each check returns the value to keep, frozen (a read-only copy) but for these three,
# which may hold containers of the caller's.
_FROZEN_LATER = frozenset({"params", "data", "files"})
_KWARG_CHECKS: dict[str, Callable[[Any], Any]] = {
    "params": lambda v: _check_form(v, "params"),
    "data": lambda v: _check_form(v, "data"),
    "json": _check_json,
    "headers": _check_headers,
    "cookies": lambda v: FrozenDict(_check_str_mapping(v, "cookies")),
    "auth": _check_auth,
    "timeout": _check_timeout,
    "allow_redirects": _check_bool,
    "proxies": lambda v: FrozenDict(_check_str_mapping(v, "proxies")),
    "verify": _check_verify,
    "cert": _check_cert,
    "files": _check_files,
}


def _kept(name: str, value: Any) -> bool:
    """False for the default timeout, which a stored call leaves out (it gets it back)."""
    return name != "timeout" or value != DEFAULT_TIMEOUT


class RequestKwargs(FrozenDict):
    """The checked `requests` keywords of an HttpCall: a read-only deep copy (a handler
    that changes its body dict after building the call changes nothing of the call).

    Keywords that JSON cannot hold (a requests auth object) have no text: a durable store
    refuses such a call.
    """

    __slots__ = ()

    def text(self) -> str | None:
        """The keywords as JSON text (bytes tagged, see codec.values), keyword by keyword:
        the default timeout left out (a call read back gets it again), a set of headers
        encoded once (`Headers`). None when JSON cannot hold them."""
        parts = []
        try:
            for name, value in self.items():  # names are the identifiers of _KWARG_CHECKS
                if type(value) is Headers:
                    parts.append(f'"{name}":{value.text()}')
                elif name != "timeout" or value != DEFAULT_TIMEOUT:  # (as _kept, inline)
                    parts.append(f'"{name}":{dumps_frozen(value)}')
            text = "{" + ",".join(parts) + "}"
            if holds_tags(text):  # bytes, or a user's dict that looks like a tag
                text = dumps(
                    encode_frozen({k: v for k, v in self.items() if _kept(k, v)}, "kwargs")
                )
        except (TypeError, ValueError, RecursionError):
            return None
        return text

    def thawed(self) -> dict[str, Any]:
        """A fresh, mutable copy to hand to requests (arrays as tuples, as it takes them)."""
        return thaw(self)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"RequestKwargs(<{', '.join(self)}>)"


def check_http_kwargs(kwargs: Any) -> RequestKwargs:
    if type(kwargs) is RequestKwargs:
        return kwargs  # checked when it was made (dataclasses.replace of a call)
    if type(kwargs) is not dict and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping, got {_type_name(kwargs)}")
    checked: dict[str, Any] = {}
    for name, value in kwargs.items():
        check = _KWARG_CHECKS.get(name)
        if check is None:
            close = difflib.get_close_matches(str(name), _KWARG_CHECKS, 1)
            hint = _REFUSED.get(name) or (f"did you mean {close[0]!r}?" if close else "")
            raise TypeError(
                f"http() got an unexpected keyword argument {name!r}"
                + (f": {hint}" if hint else "")
            )
        if value is None and name != "timeout":  # timeout=None would mean "wait forever"
            continue  # requests treats None as "not given"
        checked[name] = freeze(check(value)) if name in _FROZEN_LATER else check(value)
    if "json" in checked and ("data" in checked or "files" in checked):
        # requests would silently drop json= here.
        body = "data" if "data" in checked else "files"
        raise ValueError(f"give {body}= or json=, not both")
    checked.setdefault("timeout", DEFAULT_TIMEOUT)
    return RequestKwargs(checked)


def check_idempotency_key(value: Any, kwargs: Mapping[str, Any]) -> bool | str:
    if not isinstance(value, (bool, str)):
        raise TypeError(f"idempotency_key must be a bool or a str, got {_type_name(value)}")
    if isinstance(value, str) and (
        not value or not HEADER_VALUE.match(value) or value != value.strip()
    ):
        raise ValueError("idempotency_key must be True, False or a non-empty one-line str")
    if value is False:
        return value
    if any(k.lower() == "idempotency-key" for k in kwargs.get("headers") or ()):
        raise ValueError("give idempotency_key= or an Idempotency-Key header, not both")
    return value
