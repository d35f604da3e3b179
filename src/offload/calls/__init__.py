"""What a task performs: an HTTP call, an AWS call or a plain callable.

`http()` and `aws()` build frozen, validated descriptions. Everything that can be wrong
with a call raises in the handler that built it, not minutes later on the worker. Each
kind knows its own JSON form (`to_json` / `from_json`); `offload.codec` assembles the
stored task around it.
"""

from __future__ import annotations

from .aws_call import AwsCall, aws
from .base import PERFORMED, Call, default_key, describe_target
from .connections import Resources
from .http_call import HttpCall, http
from .requests_kwargs import DEFAULT_TIMEOUT

__all__ = [
    "DEFAULT_TIMEOUT",
    "PERFORMED",
    "AwsCall",
    "Call",
    "HttpCall",
    "Resources",
    "aws",
    "default_key",
    "describe_target",
    "http",
]
