"""AwsCall: an AWS API call to perform on a worker with a per-thread boto3 client.

boto3 is an optional extra: this module imports neither boto3 nor botocore until an AWS
call is built or performed.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from ..codec.values import check_record, decode_frozen, dumps, encode_frozen
from ._frozen import freeze, thaw
from .connections import require_boto3

if TYPE_CHECKING:
    from .connections import Resources

__all__ = ["AwsCall", "aws"]


_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]*$")


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


def _token(idempotency_key: str, shape: Any) -> str:
    """The task's idempotency key as the operation's token member, alike on every try.

    Some tokens must be longer than the key (Athena's and Secrets Manager's
    ClientRequestToken: 32 characters at least): it is padded. Some must be a UUID (SSM's
    DeleteInventory): the key's own name-based UUID then, which the service would
    otherwise refuse on every try."""
    metadata = shape.metadata if shape is not None else {}
    token = idempotency_key.ljust(metadata.get("min", 0), "0")
    pattern = metadata.get("pattern")
    if isinstance(pattern, str):
        try:
            fits = re.search(pattern, token) is not None
        except re.error:  # a pattern Python cannot read: leave it to the service
            fits = True
        if not fits:
            as_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"offload:{idempotency_key}"))
            if re.search(pattern, as_uuid) is not None:
                return as_uuid
    return token


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
        object.__setattr__(self, "params", freeze(self.params))

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
        params = thaw(self.params, list)
        api_name = client.meta.method_to_api_mapping.get(self.operation)
        if api_name is not None:
            operation_model = client.meta.service_model.operation_model(api_name)
            for member in operation_model.idempotent_members:
                shape = operation_model.input_shape.members.get(member)
                params.setdefault(member, _token(idempotency_key, shape))
        return cast("dict[str, Any]", getattr(client, self.operation)(**params))

    def retryable(self, resources: Resources, code: str) -> bool | None:
        """Whether the operation's model marks the error `code` retryable: True as a
        throttle (`"throttling": true`), False as a transient error, None if it does not.

        botocore's standard retry mode retries these too (DynamoDB's
        ReplicatedWriteConflictException, Bedrock AgentCore's RetryableConflictException).
        Looked up only for a failed call, in the model its client already holds.
        """
        client = resources.client(self.service, _resolve_region(self.region))
        api_name = client.meta.method_to_api_mapping.get(self.operation)
        if api_name is None:
            return None
        for shape in client.meta.service_model.operation_model(api_name).error_shapes:
            trait = shape.metadata.get("retryable")
            if (
                trait is not None
                and (shape.metadata.get("error", {}).get("code") or shape.name) == code
            ):
                return bool(trait.get("throttling"))
        return None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; NotSerializable names a parameter JSON cannot hold."""
        return {
            "type": "aws",
            "service": self.service,
            "operation": self.operation,
            "region": self.region,
            "params": encode_frozen(self.params, "params"),
        }

    def json_text(self) -> str:
        """`to_json()` as JSON text; NotSerializable as `to_json`."""
        return dumps(self.to_json())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AwsCall:
        """The call `to_json` described; ValueError for a malformed or tampered record."""
        check_record(data, "aws", {"service", "operation", "region", "params"})
        if not isinstance(data["params"], dict):
            raise ValueError("malformed aws call record: params must be an object")
        try:
            call = cls(
                data["service"], data["operation"], data["region"], decode_frozen(data["params"])
            )
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
    require_boto3()
    service = _check_service(service)
    return AwsCall(service, _check_operation(service, operation), region, params)
