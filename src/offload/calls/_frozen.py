"""Frozen copies of a call's containers: a frozen dataclass is only as immutable as the
containers it holds."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["freeze", "thaw"]


# Values that need no copy; a container holding only these is copied in one C call.
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


def freeze(value: Any) -> Any:
    """A deep copy with mappings as read-only proxies and lists as tuples."""
    kind = type(value)
    if kind is dict:  # exact types first: what handlers pass, without ABC checks
        if _SCALARS.issuperset(map(type, value.values())):
            return MappingProxyType(value.copy())
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if kind is tuple or kind is list:
        if _SCALARS.issuperset(map(type, value)):
            return tuple(value)
        return tuple(freeze(v) for v in value)
    if kind in _SCALARS:
        return value
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any, sequence: type[list[Any]] | type[tuple[Any, ...]] = tuple) -> Any:
    """A mutable deep copy of a frozen value, for handing to requests or botocore."""
    if isinstance(value, Mapping):
        return {k: thaw(v, sequence) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return sequence(thaw(v, sequence) for v in value)
    return value
