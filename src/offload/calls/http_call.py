"""HttpCall: an HTTP request to perform on a worker, frozen, validated and stored as JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring as quoted  # a str as JSON text, in C
from typing import TYPE_CHECKING, Any

import requests

from .._redact import redact_url
from ..codec.values import check_record, decode_frozen, dumps, loads
from ..errors import NotSerializable
from ._frozen import thaw
from .requests_kwargs import (
    DEFAULT_TIMEOUT,
    HTTP_METHODS,
    RequestKwargs,
    check_http_kwargs,
    check_idempotency_key,
    check_method,
)
from .urls import GOOD_URLS, check_url, url_key

if TYPE_CHECKING:
    from .connections import Resources

__all__ = ["HttpCall", "http"]


@dataclass(frozen=True, slots=True, init=False)
class HttpCall:
    """An HTTP request to perform on a worker: frozen, validated, JSON-serialisable.

    Build it with `offload.http(...)`. `kwargs` are `requests` keyword arguments, held
    read-only; a timeout is always among them. The repr and `describe()` never show
    header values, bodies or secret query parameters.
    """

    method: str
    url: str
    kwargs: Mapping[str, Any]  # a RequestKwargs once checked
    idempotency_key: bool | str = False
    _text: str | None = field(default=None, init=False, repr=False, compare=False)

    def __init__(
        self,
        method: str,
        url: str,
        kwargs: Mapping[str, Any],
        idempotency_key: bool | str = False,
    ) -> None:
        # Validated here, not only in http(), so from_json and replace() are checked too;
        # each field set once (a frozen dataclass's own __init__ would set it twice).
        # The usual case (a known method, a URL built before, no idempotency key) costs no
        # further call: a handler pays for every one.
        checked = check_http_kwargs(kwargs)
        setattr_ = object.__setattr__
        if not (type(method) is str and method in HTTP_METHODS):
            method = check_method(method)
        if not (type(url) is str and url in GOOD_URLS):
            url = check_url(url)
        if idempotency_key is not False:
            idempotency_key = check_idempotency_key(idempotency_key, checked)
        setattr_(self, "method", method)
        setattr_(self, "url", url)
        setattr_(self, "kwargs", checked)
        setattr_(self, "idempotency_key", idempotency_key)
        setattr_(self, "_text", None)

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
                prepared.prepare_url(url, thaw(self.kwargs["params"]))
                url = prepared.url or url
            except Exception:  # describing must never fail
                pass
        return redact_url(url)

    def key(self) -> str:
        """The throttle key: `scheme://host:port`, host lowercased, default port explicit."""
        return url_key(self.url)

    def describe(self) -> str:
        """`POST https://api.example.com/charge?token=***`: method and redacted URL."""
        return f"{self.method} {self._shown_url()}"

    def perform(self, resources: Resources, idempotency_key: str) -> requests.Response:
        """Send the request once with the worker's session; offload does any retrying."""
        checked = self.kwargs
        kwargs = checked.thawed() if isinstance(checked, RequestKwargs) else thaw(checked)
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
        return loads(self.json_text())  # type: ignore[no-any-return]

    def json_text(self) -> str:
        """`to_json()` as JSON text, made once, at the first use (a frozen call's text
        never changes), from one encoding of each keyword. NotSerializable as `to_json`."""
        text = self._text
        if text is None:
            ikey = self.idempotency_key
            text = (
                f'{{"type":"http","method":"{self.method}","url":{quoted(self.url)},'
                f'"kwargs":{self._kwargs_text()},'
                f'"idempotency_key":{"false" if ikey is False else dumps(ikey)}}}'
            )
            object.__setattr__(self, "_text", text)
        return text

    def _kwargs_text(self) -> str:
        kwargs = self.kwargs
        text = kwargs.text() if type(kwargs) is RequestKwargs else None
        if text is not None:
            return text
        auth = kwargs.get("auth")
        if auth is not None and not isinstance(auth, tuple):
            raise NotSerializable(
                f"HttpCall auth={type(auth).__name__} is code, which a durable store cannot hold; "
                "pass a (user, password) pair or an Authorization header"
            )
        from ..codec.values import encode_frozen  # noqa: PLC0415 - the rare, slow way

        return dumps(encode_frozen(kwargs, "kwargs"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HttpCall:
        """The call `to_json` described; ValueError for a malformed or tampered record."""
        check_record(data, "http", {"method", "url", "kwargs", "idempotency_key"})
        if not isinstance(data["kwargs"], dict):
            raise ValueError("malformed http call record: kwargs must be an object")
        try:
            return cls(
                data["method"], data["url"], decode_frozen(data["kwargs"]), data["idempotency_key"]
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
