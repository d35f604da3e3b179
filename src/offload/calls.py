"""What a task performs: an HTTP call, an AWS call or a plain callable; and their JSON form.

`http()` and `aws()` build frozen, validated descriptions. Everything that can be wrong
with a call (a bad method, a URL without a host, a typo in a keyword, a timeout that lets
the worker hang, an unknown AWS operation) raises in the handler that built it, not
minutes later on the worker.

Durable stores hold tasks as JSON, never pickle: an HttpCall, an AwsCall, or a
`module:qualname` function path with JSON arguments (`task_to_json` / `task_from_json`).

boto3 is an optional extra: this module imports neither boto3 nor botocore until an AWS
call is built or performed.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, HTTPBasicAuth

from ._redact import redact_text, redact_third_party_logs, redact_url
from .errors import NotSerializable

__all__ = [
    "DEFAULT_TIMEOUT",
    "AwsCall",
    "Call",
    "HttpCall",
    "Resources",
    "aws",
    "callable_path",
    "default_key",
    "describe_target",
    "http",
    "resolve_callable",
    "task_from_json",
    "task_to_json",
]

DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)
"""(connect, read) seconds, applied when a call gives none: without one a request can
hang the worker forever."""

_TASK_FORMAT = 1

# --------------------------------------------------------------------------------------
# Freezing: a frozen dataclass is only as immutable as the containers it holds.


def _freeze(value: Any) -> Any:
    """A deep copy with mappings as read-only proxies and lists as tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any, sequence: type[list[Any]] | type[tuple[Any, ...]] = tuple) -> Any:
    """A mutable deep copy of a frozen value, for handing to requests or botocore."""
    if isinstance(value, Mapping):
        return {k: _thaw(v, sequence) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return sequence(_thaw(v, sequence) for v in value)
    return value


# --------------------------------------------------------------------------------------
# JSON: exact types only, so that what a durable store gives back is what was put in.

_JSON_HINTS = {
    "datetime": " (pass .isoformat() text)",
    "date": " (pass .isoformat() text)",
    "Decimal": " (pass a str)",
    "set": " (pass a sorted list)",
    "frozenset": " (pass a sorted list)",
    "bytes": " (pass base64 text)",
    "UUID": " (pass str(uuid))",
}
_MAX_DEPTH = 100


def _json_problem(value: Any, where: str, depth: int = 0) -> str | None:
    """What in `value` a JSON round trip would not give back unchanged, or None."""
    if depth > _MAX_DEPTH:
        return f"{where} is nested more than {_MAX_DEPTH} levels deep"
    kind = type(value)
    if value is None or kind in (str, bool, int):
        return None
    if kind is float:
        return None if math.isfinite(value) else f"{where} is {value!r}, which JSON cannot hold"
    if kind is list:
        for i, item in enumerate(value):
            problem = _json_problem(item, f"{where}[{i}]", depth + 1)
            if problem:
                return problem
        return None
    if kind is dict:
        for k, item in value.items():
            if type(k) is not str:
                return f"{where} has a {type(k).__name__} key (JSON keys are strings)"
            problem = _json_problem(item, f"{where}[{k!r}]", depth + 1)
            if problem:
                return problem
        return None
    if kind is tuple:
        return f"{where} is a tuple, which would come back as a list (pass a list)"
    name = kind.__name__
    return (
        f"{where} is a {kind.__module__}.{kind.__qualname__}, not JSON{_JSON_HINTS.get(name, '')}"
    )


# Frozen call fields are encoded with two tags so that bytes (request bodies, AWS blobs)
# survive; a user dict that looks like a tag is escaped rather than misread on load.
_BYTES, _DICT = "$bytes", "$dict"


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, item in value.items():
            if type(k) is not str:
                raise NotSerializable(
                    f"{where} has a {type(k).__name__} key; JSON keys are strings"
                )
            out[k] = _encode(item, f"{where}[{k!r}]")
        return {_DICT: out} if set(out) in ({_BYTES}, {_DICT}) else out
    if isinstance(value, (tuple, list)):
        return [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    if type(value) is float and not math.isfinite(value):
        raise NotSerializable(f"{where} is {value!r}, which JSON cannot hold")
    if value is None or type(value) in (str, bool, int, float):
        return value
    kind = type(value)
    raise NotSerializable(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, not JSON"
        f"{_JSON_HINTS.get(kind.__name__, '')}"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES}:
            if not isinstance(value[_BYTES], str):
                raise ValueError("a $bytes value must be base64 text")
            try:
                return base64.b64decode(value[_BYTES], validate=True)
            except binascii.Error as exc:
                raise ValueError(f"bad base64 in a $bytes value: {exc}") from None
        if set(value) == {_DICT}:
            if not isinstance(value[_DICT], dict):
                raise ValueError("a $dict value must be an object")
            return {k: _decode(v) for k, v in value[_DICT].items()}
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid in a task record")


# --------------------------------------------------------------------------------------
# HTTP


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
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
_HEADER_VALUE = re.compile(r"\A(\S[^\r\n]*)?\Z")
_FORM_SCALARS = (str, bytes, int, float)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_method(method: Any) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str such as 'POST', got {_type_name(method)}")
    upper = method.strip().upper()
    if upper not in _HTTP_METHODS:
        raise ValueError(
            f"method must be one of {', '.join(sorted(_HTTP_METHODS))}, got {method!r}"
        )
    return upper


def _check_url(url: Any) -> str:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {_type_name(url)}")
    return _check_url_text(url)


_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


# Web handlers build calls to the same few endpoints over and over: remember the URLs that
# passed (failures raise and are not cached), so a repeated URL costs a dict lookup.
@functools.lru_cache(maxsize=4096)
def _check_url_text(url: str) -> str:
    if not url:
        raise ValueError("url is empty")
    if _BAD_URL_CHARS.search(url):
        raise ValueError(f"url contains whitespace or control characters: {redact_url(url)!r}")
    try:
        split = urlsplit(url)
        _ = split.port  # parsing the port validates it
    except ValueError as exc:
        raise ValueError(f"url is not a valid URL ({exc}): {redact_url(url)!r}") from None
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
    return url


@functools.lru_cache(maxsize=4096)
def _url_key(url: str) -> str:
    split = urlsplit(url)
    scheme = split.scheme.lower()
    host = split.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = split.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{host}:{port}"


def _environment_shapes_requests() -> bool:
    """True when the environment holds proxies or netrc, which requests reads per request
    (by host); otherwise a session can skip reading the environment on every call."""
    names = {name.lower() for name in os.environ}
    if names & {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "netrc"}:
        return True
    home = os.path.expanduser("~")
    return any(os.path.exists(os.path.join(home, f)) for f in (".netrc", "_netrc"))


def _environment_ca_bundle() -> str | None:
    """The CA bundle requests would take from the environment (same names, same order)."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


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
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of str to str, got {_type_name(value)}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            # Name the key only: the value may be a secret.
            raise TypeError(
                f"{what} must map str to str; {k!r} maps a {_type_name(k)} to a {_type_name(v)}"
            )
    return dict(value)


def _check_headers(value: Any) -> dict[str, str]:
    headers = _check_str_mapping(value, "headers")
    for name, v in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"headers: {name!r} is not a valid header name")
        if not _HEADER_VALUE.match(v):
            raise ValueError(
                f"headers: the value of {name!r} has a line break or leading whitespace"
            )
    return headers


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


def _check_json(value: Any) -> Any:
    problem = _json_problem(_thaw(value, list), "json")
    if problem:
        raise TypeError(problem)
    return value


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"allow_redirects must be a bool, got {_type_name(value)}")
    return value


def _check_verify(value: Any) -> bool | str:
    if not isinstance(value, (bool, str)):
        raise TypeError(f"verify must be a bool or a CA bundle path, got {_type_name(value)}")
    return value


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


_KWARG_CHECKS: dict[str, Callable[[Any], Any]] = {
    "params": lambda v: _check_form(v, "params"),
    "data": lambda v: _check_form(v, "data"),
    "json": _check_json,
    "headers": _check_headers,
    "cookies": lambda v: _check_str_mapping(v, "cookies"),
    "auth": _check_auth,
    "timeout": _check_timeout,
    "allow_redirects": _check_bool,
    "proxies": lambda v: _check_str_mapping(v, "proxies"),
    "verify": _check_verify,
    "cert": _check_cert,
    "files": _check_files,
}


def _check_http_kwargs(kwargs: Any) -> MappingProxyType[str, Any]:
    if not isinstance(kwargs, Mapping):
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
        checked[name] = check(value)
    for body in ("data", "files"):
        # requests would silently drop json= here.
        if body in checked and "json" in checked:
            raise ValueError(f"give {body}= or json=, not both")
    checked.setdefault("timeout", DEFAULT_TIMEOUT)
    return cast("MappingProxyType[str, Any]", _freeze(checked))


def _check_idempotency_key(value: Any, kwargs: Mapping[str, Any]) -> bool | str:
    if not isinstance(value, (bool, str)):
        raise TypeError(f"idempotency_key must be a bool or a str, got {_type_name(value)}")
    if isinstance(value, str) and (
        not value or not _HEADER_VALUE.match(value) or value != value.strip()
    ):
        raise ValueError("idempotency_key must be True, False or a non-empty one-line str")
    headers = kwargs.get("headers") or {}
    if value is not False and any(k.lower() == "idempotency-key" for k in headers):
        raise ValueError("give idempotency_key= or an Idempotency-Key header, not both")
    return value


@dataclass(frozen=True, slots=True)
class HttpCall:
    """An HTTP request to perform on a worker: frozen, validated, JSON-serialisable.

    Build it with `offload.http(...)`. `kwargs` are `requests` keyword arguments, held
    read-only; a timeout is always among them. The repr and `describe()` never show
    header values, bodies or secret query parameters.
    """

    method: str
    url: str
    kwargs: Mapping[str, Any]
    idempotency_key: bool | str = False

    def __post_init__(self) -> None:
        # Validated here, not only in http(), so from_json and replace() are checked too.
        kwargs = _check_http_kwargs(self.kwargs)
        object.__setattr__(self, "method", _check_method(self.method))
        object.__setattr__(self, "url", _check_url(self.url))
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(
            self, "idempotency_key", _check_idempotency_key(self.idempotency_key, kwargs)
        )

    def __hash__(self) -> int:  # kwargs is a mapping; equal calls still hash alike
        return hash((self.method, self.url, self.idempotency_key))

    def __repr__(self) -> str:
        names = ", ".join(k for k in self.kwargs if k != "timeout")
        ikey = f", idempotency_key={self.idempotency_key!r}" if self.idempotency_key else ""
        return (
            f"HttpCall({self.method} {self._shown_url()}"
            f"{f', kwargs=<{names}>' if names else ''}, timeout={self.kwargs['timeout']!r}{ikey})"
        )

    def _shown_url(self) -> str:
        url = self.url
        if "params" in self.kwargs:  # show the URL that is actually requested
            try:
                prepared = requests.PreparedRequest()
                prepared.prepare_url(url, _thaw(self.kwargs["params"]))
                url = prepared.url or url
            except Exception:  # describing must never fail
                pass
        return redact_url(url)

    def key(self) -> str:
        """The throttle key: `scheme://host:port`, host lowercased, default port explicit."""
        return _url_key(self.url)

    def describe(self) -> str:
        """`POST https://api.example.com/charge?token=***`: method and redacted URL."""
        return f"{self.method} {self._shown_url()}"

    def perform(self, resources: Resources, idempotency_key: str) -> requests.Response:
        """Send the request once with the worker's session; offload does any retrying."""
        kwargs = _thaw(self.kwargs)
        kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
        if self.method == "HEAD":
            kwargs.setdefault("allow_redirects", False)  # as requests.head() does
        if self.idempotency_key is not False:
            headers = dict(kwargs.get("headers") or {})
            headers["Idempotency-Key"] = (
                idempotency_key if self.idempotency_key is True else self.idempotency_key
            )
            kwargs["headers"] = headers
        session = resources.session()
        if kwargs.get("verify") is True and resources.ca_bundle is not None:
            kwargs["verify"] = resources.ca_bundle  # as requests does with the environment's
        return session.request(self.method, self.url, **kwargs)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; NotSerializable if it holds code (a custom `auth`)."""
        auth = self.kwargs.get("auth")
        if auth is not None and not isinstance(auth, tuple):
            raise NotSerializable(
                f"HttpCall auth={_type_name(auth)} is code, which a durable store cannot hold; "
                "pass a (user, password) pair or an Authorization header"
            )
        return {
            "type": "http",
            "method": self.method,
            "url": self.url,
            "kwargs": _encode(self.kwargs, "kwargs"),
            "idempotency_key": self.idempotency_key,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HttpCall:
        """The call `to_json` described; ValueError for a malformed or tampered record."""
        _expect_record(data, "http", {"method", "url", "kwargs", "idempotency_key"})
        if not isinstance(data["kwargs"], dict):
            raise ValueError("malformed http call record: kwargs must be an object")
        try:
            return cls(
                data["method"], data["url"], _decode(data["kwargs"]), data["idempotency_key"]
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed http call record: {exc}") from None


def http(
    method: str, url: str, *, idempotency_key: bool | str = False, **requests_kwargs: Any
) -> HttpCall:
    """An HTTP call for `enqueue_task`: `http("POST", url, json={...}, idempotency_key=True)`.

    Takes the `requests` keywords params, data, json, headers, cookies, auth, timeout,
    allow_redirects, proxies, verify, cert and files; anything else is a TypeError.
    Bodies must be replayable (bytes, text, forms, JSON; no open files or generators),
    because a retry sends them again. `timeout` defaults to DEFAULT_TIMEOUT and cannot be
    None. `idempotency_key=True` sends the task's key as the `Idempotency-Key` header,
    the same on every attempt and replay; a str sends that value instead.
    """
    return HttpCall(method, url, requests_kwargs, idempotency_key)


# --------------------------------------------------------------------------------------
# AWS

_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def _require_boto3() -> Any:
    try:
        import boto3  # noqa: PLC0415 - optional extra, imported on first AWS use
    except ImportError as exc:
        raise ImportError(
            "offload.aws() needs boto3, an optional extra: pip install offload[aws]"
        ) from exc
    return boto3


@functools.lru_cache(maxsize=1)
def _service_names() -> frozenset[str]:
    from botocore.loaders import create_loader  # noqa: PLC0415

    return frozenset(create_loader().list_available_services("service-2"))


@functools.lru_cache(maxsize=64)
def _operations(service: str) -> Mapping[str, str]:
    """snake_case method name -> API operation name, from botocore's service model."""
    from botocore import xform_name  # noqa: PLC0415
    from botocore.loaders import create_loader  # noqa: PLC0415

    model = create_loader().load_service_model(service, "service-2")
    return MappingProxyType({xform_name(op): op for op in model["operations"]})


def _check_service(service: str) -> str:
    from botocore.utils import SERVICE_NAME_ALIASES  # noqa: PLC0415

    name: str = SERVICE_NAME_ALIASES.get(service.strip().lower(), service.strip().lower())
    known = _service_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, 3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown AWS service {service!r}{hint}")
    return name


def _check_operation(service: str, operation: str) -> str:
    from botocore import xform_name  # noqa: PLC0415

    operations = _operations(service)
    name = operation.strip()
    if name not in operations:
        name = xform_name(name)
    if name not in operations:
        close = difflib.get_close_matches(xform_name(operation.strip()), operations, 3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"AWS service {service!r} has no operation {operation!r}{hint}")
    return name


def _resolve_region(region: str | None) -> str | None:
    # The same order for the throttle key and the client, so they cannot disagree.
    return region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@dataclass(frozen=True, slots=True)
class AwsCall:
    """An AWS API call to perform on a worker with a per-thread boto3 client.

    Build it with `offload.aws(...)`, which checks the service and operation against
    botocore's model. `operation` is the client method name (`start_job_run`); `params`
    are its keyword arguments, held read-only and never shown in the repr.
    """

    service: str
    operation: str
    region: str | None
    params: Mapping[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.service, str) or not _SNAKE.match(self.service.replace("-", "_")):
            raise ValueError(f"service must be a botocore service name, got {self.service!r}")
        if not isinstance(self.operation, str) or not _SNAKE.match(self.operation):
            raise ValueError(
                f"operation must be a snake_case method name (aws() accepts either form), "
                f"got {self.operation!r}"
            )
        if self.region is not None and (
            not isinstance(self.region, str) or not _REGION.match(self.region)
        ):
            raise ValueError(f"region must be None or a region name, got {self.region!r}")
        if not isinstance(self.params, Mapping) or not all(isinstance(k, str) for k in self.params):
            raise TypeError("params must be a mapping with str keys")
        object.__setattr__(self, "params", _freeze(self.params))

    def __hash__(self) -> int:
        return hash((self.service, self.operation, self.region))

    def __repr__(self) -> str:
        names = ", ".join(self.params)
        return f"AwsCall({self.describe()}, region={self.region!r}, params=<{names}>)"

    def key(self) -> str:
        """The throttle key, `aws:<service>:<region>:<operation>`: AWS throttles per operation."""
        return f"aws:{self.service}:{_resolve_region(self.region) or 'default'}:{self.operation}"

    def describe(self) -> str:
        """`glue.start_job_run`."""
        return f"{self.service}.{self.operation}"

    def perform(self, resources: Resources, idempotency_key: str) -> dict[str, Any]:
        """Call the operation once, with the task's idempotency key as its token member.

        botocore would otherwise make a fresh token per attempt, and a retried
        `run_instances` would start a second instance.
        """
        client = resources.client(self.service, _resolve_region(self.region))
        params = _thaw(self.params, list)
        api_name = client.meta.method_to_api_mapping.get(self.operation)
        if api_name is not None:
            operation_model = client.meta.service_model.operation_model(api_name)
            for member in operation_model.idempotent_members:
                # Some tokens must be longer than the key (Athena's and Secrets Manager's
                # ClientRequestToken: 32 characters at least): pad it, alike on every try.
                shape = operation_model.input_shape.members.get(member)
                minimum = shape.metadata.get("min", 0) if shape is not None else 0
                params.setdefault(member, idempotency_key.ljust(minimum, "0"))
        return cast("dict[str, Any]", getattr(client, self.operation)(**params))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; NotSerializable names a parameter JSON cannot hold."""
        return {
            "type": "aws",
            "service": self.service,
            "operation": self.operation,
            "region": self.region,
            "params": _encode(self.params, "params"),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AwsCall:
        """The call `to_json` described; ValueError for a malformed or tampered record."""
        _expect_record(data, "aws", {"service", "operation", "region", "params"})
        if not isinstance(data["params"], dict):
            raise ValueError("malformed aws call record: params must be an object")
        try:
            call = cls(data["service"], data["operation"], data["region"], _decode(data["params"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed aws call record: {exc}") from None
        try:
            import botocore  # noqa: F401, PLC0415
        except ImportError:  # cannot check against the model; perform() will say why
            return call
        _check_service(call.service)
        _check_operation(call.service, call.operation)
        return call


def aws(service: str, operation: str, *, region: str | None = None, **params: Any) -> AwsCall:
    """An AWS call for `enqueue_task`: `aws("glue", "start_job_run", JobName="etl")`.

    `operation` may be the API name (`StartJobRun`) or the client method name
    (`start_job_run`). An unknown service or operation is a ValueError now rather than on
    the worker. Needs boto3 (`pip install offload[aws]`).
    """
    for what, value in (("service", service), ("operation", operation)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{what} must be a non-empty str, got {value!r}")
    _require_boto3()
    service = _check_service(service)
    return AwsCall(service, _check_operation(service, operation), region, params)


# --------------------------------------------------------------------------------------
# Per-worker connection state


class Resources:
    """The connections one worker thread owns: a requests Session and boto3 clients.

    One per worker thread, never shared: neither a Session nor a boto3 client creation is
    safe to share across threads, and neither may survive a fork.
    """

    def __init__(self) -> None:
        self._session: requests.Session | None = None
        #: The environment's CA bundle, read once when the session does not read it per call.
        self.ca_bundle: str | None = None
        self._boto_session: Any = None
        self._clients: dict[tuple[str, str | None], Any] = {}

    def session(self) -> requests.Session:
        """The pooled session, made on first use, with requests' own retries off."""
        if self._session is None:
            redact_third_party_logs()
            session = requests.Session()
            # requests looks up proxies, CA bundles and netrc in the environment on every
            # request (a quarter of its per-call cost, scanning os.environ twice): skip that
            # unless proxies or netrc are set, taking a CA bundle from it once, here.
            session.trust_env = _environment_shapes_requests()
            bundle = None if session.trust_env else _environment_ca_bundle()
            if bundle is not None:
                session.verify = bundle
            self.ca_bundle = bundle
            adapter = HTTPAdapter(max_retries=0)  # one retry layer: offload's
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._session = session
        return self._session

    def client(self, service: str, region: str | None) -> Any:
        """A boto3 client per (service, region), with botocore's retries off.

        Made from this thread's own boto3 Session (the default one is not thread-safe).
        AWS_ENDPOINT_URL and the other AWS_* variables apply as boto3 reads them.
        """
        client = self._clients.get((service, region))
        if client is None:
            boto3 = _require_boto3()
            from botocore.config import Config  # noqa: PLC0415

            if self._boto_session is None:
                redact_third_party_logs()
                self._boto_session = boto3.session.Session()
            config = Config(
                # botocore 1.44 changed the default mode: say it. One attempt per call.
                retries={"mode": "standard", "total_max_attempts": 1},
                connect_timeout=DEFAULT_TIMEOUT[0],
                read_timeout=DEFAULT_TIMEOUT[1],
            )
            client = self._boto_session.client(service, region_name=region, config=config)
            self._clients[(service, region)] = client
        return client

    def close(self) -> None:
        """Close every connection; the next use makes new ones."""
        session, self._session = self._session, None
        clients, self._clients = list(self._clients.values()), {}
        if session is not None:
            session.close()
        for client in clients:
            close = getattr(client, "close", None)
            if close is not None:
                close()


# --------------------------------------------------------------------------------------
# Plain callables and task records

Call: TypeAlias = HttpCall | AwsCall | Callable[..., Any]
"""What a task performs."""

_PATH = re.compile(r"^[^\W\d]\w*(\.[^\W\d]\w*)*:[^\W\d]\w*(\.[^\W\d]\w*)*$")


def _name_of(fn: Any) -> str:
    try:
        qualname = getattr(fn, "__qualname__", None)
        module = getattr(fn, "__module__", None)
        if isinstance(qualname, str):
            return f"{module}.{qualname}" if isinstance(module, str) else qualname
    except Exception:  # naming must never fail
        pass
    kind = type(fn)
    return f"{kind.__module__}.{kind.__qualname__} object"


def callable_path(fn: Callable[..., Any]) -> str:
    """`module:qualname` for a function another process can import; else NotSerializable.

    Refused: lambdas, functions defined inside functions, bound methods of instances,
    partials and callable objects, builtin methods without a module, and anything whose
    path imports back as a different object. Classmethods and staticmethods are fine.
    A function in `__main__` is accepted only when the program was started with
    `python -m package.module` (the path then names that module); a script run by file
    name cannot be imported by the `offload worker` process, so it is refused.
    """
    name = _name_of(fn)
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if isinstance(fn, functools.partial):
        raise NotSerializable(
            f"{name} is a functools.partial; pass the function and its arguments instead"
        )
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise NotSerializable(f"{name} has no importable module path; pass a module-level function")
    if "<lambda>" in qualname:
        raise NotSerializable(f"{name} is a lambda; pass a module-level function")
    if "<locals>" in qualname:
        raise NotSerializable(
            f"{name} is defined inside a function, so another process cannot import it; "
            "move it to module level"
        )
    if inspect.ismethod(fn) and not inspect.isclass(fn.__self__):
        raise NotSerializable(
            f"{name} is a method bound to an instance, which cannot be stored; "
            "pass a module-level function and the data it needs as arguments"
        )
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        spec_name = getattr(spec, "name", None)
        if not spec_name or spec_name.rpartition(".")[2] == "__main__":
            raise NotSerializable(
                f"{qualname} is defined in the __main__ script, which another process "
                "cannot import; move it into a module"
            )
        # Not imported to check: importing the main module a second time would run it again.
        return f"{spec_name}:{qualname}"
    path = f"{module}:{qualname}"
    try:
        resolved = resolve_callable(path)
    except ValueError as exc:
        raise NotSerializable(f"{name} cannot be imported back from {path!r}: {exc}") from None
    if resolved is not fn and resolved != fn:
        raise NotSerializable(
            f"{path!r} imports as a different object than {name} (rebound or decorated?)"
        )
    return path


def task_function_path(fn: Callable[..., Any]) -> str:
    """`callable_path` of a function a stored task performs: not one of Python's own."""
    path = callable_path(fn)
    if _in_standard_library(path.partition(":")[0]):
        raise NotSerializable(
            f"{_name_of(fn)} is in Python's standard library, whose functions a stored task "
            "may not name (a row naming os:system would run it); call it from a function "
            "of your own"
        )
    return path


def resolve_task_function(path: str) -> Callable[..., Any]:
    """`resolve_callable` for a stored task's function; ValueError for one of Python's own:
    whoever can write a store can name any function, and these (os:system,
    subprocess:run, builtins:exec, ...) would hand them the machine at once."""
    if isinstance(path, str) and _in_standard_library(path.partition(":")[0]):
        raise ValueError(
            f"{path!r} is in Python's standard library, whose functions a stored task may not name"
        )
    fn = resolve_callable(path)
    # Where the function is defined, not only the path: `mymodule:os.system`, or a module
    # that imports `system` from os, must not reach it. (An alias or a re-export of one of
    # the application's own functions is fine.)
    module = getattr(fn, "__module__", None)
    if not isinstance(module, str) or _in_standard_library(module):
        raise ValueError(
            f"{path!r} leads to {_name_of(fn)}, a function of Python's standard library (or "
            "of no module), which a stored task may not name"
        )
    return fn


def _in_standard_library(module: str) -> bool:
    """True for `os`, `subprocess.x`, `builtins`, `_testcapi`, and Python's own test suite:
    a module of Python itself."""
    top = module.partition(".")[0]
    return top in sys.stdlib_module_names or top.startswith("_test") or _is_python_test_suite(top)


@functools.lru_cache(maxsize=64)
def _is_python_test_suite(top: str) -> bool:
    """True for `test` where it is the package installed with Python (not in
    `sys.stdlib_module_names`), False for an application's own package of that name."""
    if top != "test":
        return False
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None)
    if not isinstance(origin, str) or not origin:
        return False
    where = os.path.realpath(origin)
    paths = sysconfig.get_paths()

    def under(key: str) -> bool:
        return where.startswith(os.path.realpath(paths[key]) + os.sep)

    # site-packages may lie inside the standard library's directory: an installed `test`
    # package of someone's is not Python's.
    return under("stdlib") and not (under("purelib") or under("platlib"))


def resolve_callable(path: str) -> Callable[..., Any]:
    """Import the callable a `module:qualname` path names; ValueError if it cannot."""
    if not isinstance(path, str) or not _PATH.match(path):
        raise ValueError(f"not a 'module:qualname' function path: {path!r}")
    module_name, _, qualname = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for attr in qualname.split("."):
            target = getattr(target, attr)
    except Exception as exc:  # any import failure means "cannot resolve"
        raise ValueError(f"cannot resolve {path!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(target):
        raise ValueError(f"{path!r} is not callable")
    return cast("Callable[..., Any]", target)


def task_to_json(call: Call, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The JSON text a durable store keeps for a task; NotSerializable says what cannot be.

    Arguments must be exact JSON types (dict with str keys, list, str, int, finite float,
    bool, None) so that the worker gets back exactly what was enqueued: a tuple, a
    datetime or a set is refused, with its position named.
    """
    if isinstance(call, (HttpCall, AwsCall)):
        if args or kwargs:
            raise TypeError(f"{type(call).__name__} takes no arguments; put them in the call")
        target = call.to_json()
        args_json: list[Any] = []
        kwargs_json: dict[str, Any] = {}
    else:
        target = {"type": "function", "path": task_function_path(call)}
        args_json = list(args)
        kwargs_json = dict(kwargs)
        problem = _json_problem(args_json, "args") or _json_problem(kwargs_json, "kwargs")
        if problem:
            raise NotSerializable(f"cannot store a task for {_name_of(call)}: {problem}")
    record = {"offload": _TASK_FORMAT, "target": target, "args": args_json, "kwargs": kwargs_json}
    return json.dumps(record, allow_nan=False, separators=(",", ":"), ensure_ascii=False)


def task_from_json(text: str | bytes) -> tuple[Call, tuple[Any, ...], dict[str, Any]]:
    """(call, args, kwargs) from `task_to_json` text; ValueError for a malformed record."""
    try:
        record = json.loads(text, parse_constant=_reject_constant)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"malformed task record: {exc}") from None
    if not isinstance(record, dict) or set(record) != {"offload", "target", "args", "kwargs"}:
        raise ValueError("malformed task record: expected offload, target, args and kwargs")
    if record["offload"] != _TASK_FORMAT:
        raise ValueError(f"unsupported task record format {record['offload']!r}")
    target, args, kwargs = record["target"], record["args"], record["kwargs"]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("malformed task record: args must be a list and kwargs an object")
    if not isinstance(target, dict):
        raise ValueError("malformed task record: target must be an object")
    kind = target.get("type")
    call: Call
    if kind == "http":
        call = HttpCall.from_json(target)
    elif kind == "aws":
        call = AwsCall.from_json(target)
    elif kind == "function":
        _expect_record(target, "function", {"path"})
        call = resolve_task_function(target["path"])
    else:
        raise ValueError(f"malformed task record: unknown target type {kind!r}")
    if not callable(call) and (args or kwargs):
        raise ValueError("malformed task record: an http or aws call takes no arguments")
    return call, tuple(args), kwargs


def _expect_record(data: Any, kind: str, fields: set[str]) -> None:
    if not isinstance(data, Mapping) or data.get("type") != kind:
        raise ValueError(f"malformed task record: not a {kind} target")
    keys = set(data) - {"type"}
    if keys != fields:
        wrong = sorted(keys ^ fields)
        raise ValueError(f"malformed {kind} target: unexpected or missing {', '.join(wrong)}")


def describe_target(call: Any) -> str:
    """What a task performs, for logs and dead letters: redacted, never raises."""
    try:
        if isinstance(call, (HttpCall, AwsCall)):
            return call.describe()
        if isinstance(call, functools.partial):
            return f"partial({describe_target(call.func)})"
        return redact_text(_name_of(call))
    except Exception:  # a description must never break the worker
        return type(call).__qualname__


def default_key(call: Any) -> str | None:
    """The throttle key of an HttpCall or AwsCall; None for a plain callable."""
    if isinstance(call, (HttpCall, AwsCall)):
        return call.key()
    return None
