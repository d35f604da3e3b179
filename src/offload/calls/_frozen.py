"""Frozen copies of a call's containers: a frozen dataclass is only as immutable as the
containers it holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

__all__ = ["FrozenDict", "freeze", "thaw"]


class FrozenDict(dict[str, Any]):
    """A dict that refuses changes: a call's mappings once it is built.

    A dict (not a MappingProxyType) so that the C JSON encoder writes it as it is: a
    call's JSON text costs one encoder call, with no Python hook per mapping.
    """

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a call's fields are read-only; build a new call instead")

    __setitem__ = __delitem__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def copy(self) -> dict[str, Any]:  # type: ignore[override]
        """A mutable copy (a plain dict)."""
        return dict(self)

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


# Values that need no copy; a container holding only these is copied in one C call.
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


def freeze(value: Any) -> Any:
    """A deep copy with mappings as read-only proxies and lists as tuples."""
    kind = type(value)
    if kind is FrozenDict:
        return value  # frozen all the way down when it was made
    if kind is dict:  # exact types first: what handlers pass, without ABC checks
        if _SCALARS.issuperset(map(type, value.values())):
            return FrozenDict(value)
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if kind is tuple or kind is list:
        if _SCALARS.issuperset(map(type, value)):
            return tuple(value)
        return tuple(freeze(v) for v in value)
    if kind in _SCALARS:
        return value
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
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
