"""What a task's call looks like to people (the console's page of one dead letter): a
CallView, made from the stored call's JSON text (`view_call`, nothing imported) or from a
live call (`view_of`, the memory store's). Never a body, never a secret: headers and URLs
go through `_redact`, and of everything else only the names are shown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .._redact import redact_headers, redact_text
from ..calls.aws_call import AwsCall
from ..calls.base import describe_target
from ..calls.http_call import HttpCall
from .task import Unreadable

__all__ = ["CallView", "view_call", "view_of"]


@dataclass(frozen=True, slots=True)
class CallView:
    """What a dead letter's task calls, for people to read: never a body or a secret.

    `kind` is "http", "aws", "function" or "unreadable"; `target` the call in one line
    (`POST https://api.example.com/v1/charges?token=***`, `glue.start_job_run`,
    `myapp.tasks.send_welcome`). For HTTP: `method`, `url` (redacted) and `headers` (secret
    values as `***`, the Idempotency-Key the call sends among them); for AWS: `region`.
    `fields` names what else the call sends (`json`, `params`, `auth`, an AWS call's
    parameters, a function's keyword arguments), never their values.
    """

    kind: str
    target: str
    method: str | None = None
    url: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    region: str | None = None
    fields: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "method": self.method,
            "url": self.url,
            "headers": [list(pair) for pair in self.headers],
            "region": self.region,
            "fields": list(self.fields),
        }


def view_call(text: str, idempotency_key: str | None = None) -> CallView:
    """What a stored call performs, for display (see CallView), from `dump_call` text,
    without importing the function it names; never raises. `idempotency_key` is the
    task's, which an HttpCall with `idempotency_key=True` sends."""
    try:
        record = json.loads(text)
        target = record["target"]
        kind = target["type"]
        if kind == "http":
            return view_of(HttpCall.from_json(target), (), {}, idempotency_key)
        if kind == "aws":
            # Read as it is: AwsCall.from_json would load botocore's model to check it.
            service, operation, region = target["service"], target["operation"], target["region"]
            params = target["params"]
            if isinstance(service, str) and isinstance(operation, str) and isinstance(params, dict):
                return CallView(
                    "aws",
                    redact_text(f"{service}.{operation}"),
                    region=region if isinstance(region, str) else None,
                    fields=tuple(redact_text(str(name)) for name in params),
                )
        if kind == "function":
            args, kwargs = record["args"], record["kwargs"]
            return CallView(
                "function",
                redact_text(str(target["path"]).replace(":", ".")),
                fields=_argument_names(args, kwargs),
            )
    except Exception:  # a page must never break on a record
        pass
    return CallView("unreadable", "(unreadable task)")


def view_of(call: Any, args: Any, kwargs: Any, idempotency_key: str | None = None) -> CallView:
    """What a task's call performs, for display (see CallView); never raises."""
    try:
        if isinstance(call, HttpCall):
            target = call.describe()
            kw = call.kwargs
            headers = redact_headers(kw.get("headers") or {})
            if call.idempotency_key is not False:
                sent = idempotency_key if call.idempotency_key is True else call.idempotency_key
                headers["Idempotency-Key"] = redact_text(str(sent))
            return CallView(
                "http",
                target,
                method=call.method,
                url=target.partition(" ")[2],
                headers=tuple(headers.items()),
                fields=tuple(name for name in kw if name not in ("headers", "timeout")),
            )
        if isinstance(call, AwsCall):
            return CallView(
                "aws",
                call.describe(),
                region=call.region,
                fields=tuple(redact_text(name) for name in call.params),
            )
        if isinstance(call, Unreadable):
            return view_call(call.raw, idempotency_key)
        return CallView("function", describe_target(call), fields=_argument_names(args, kwargs))
    except Exception:  # a page must never break on a task
        return CallView("unreadable", "(unreadable task)")


def _argument_names(args: Any, kwargs: Any) -> tuple[str, ...]:
    """A function call's arguments as names: `2 positional`, then each keyword's name."""
    names = [f"{len(args)} positional"] if args else []
    return (*names, *(redact_text(str(name)) for name in kwargs or {}))
