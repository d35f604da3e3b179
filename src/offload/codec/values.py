"""The JSON rules for values a durable store keeps: exact types only, and one fast encoder.

A task's arguments must come back from a store exactly as they went in: a tuple would come
back a list, a datetime would not come back at all. `json_problem` says what in a value
breaks that rule. A call's own fields (frozen mappings, request bodies as bytes) are
encoded with two tags, `$bytes` and `$dict`, by `encode_frozen` and read back by
`decode_frozen`.
"""

from __future__ import annotations

import base64
import binascii
import json
import json.encoder
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import NotSerializable

__all__ = [
    "check_record",
    "decode_frozen",
    "dumps",
    "dumps_frozen",
    "encode_frozen",
    "holds_tags",
    "json_problem",
    "loads",
]

_HINTS = {
    "datetime": " (pass .isoformat() text)",
    "date": " (pass .isoformat() text)",
    "Decimal": " (pass a str)",
    "set": " (pass a sorted list)",
    "frozenset": " (pass a sorted list)",
    "bytes": " (pass base64 text)",
    "UUID": " (pass str(uuid))",
}
_MAX_DEPTH = 100


def _not_json(value: Any, where: str) -> str:
    kind = type(value)
    hint = _HINTS.get(kind.__name__, "")
    return f"{where} is a {kind.__module__}.{kind.__qualname__}, not JSON{hint}"


def json_problem(value: Any, where: str, depth: int = 0) -> str | None:
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
            problem = json_problem(item, f"{where}[{i}]", depth + 1)
            if problem:
                return problem
        return None
    if kind is dict:
        for k, item in value.items():
            if type(k) is not str:
                return f"{where} has a {type(k).__name__} key (JSON keys are strings)"
            problem = json_problem(item, f"{where}[{k!r}]", depth + 1)
            if problem:
                return problem
        return None
    if kind is tuple:
        return f"{where} is a tuple, which would come back as a list (pass a list)"
    return _not_json(value, where)


# A call's fields are frozen (read-only mappings, tuples) and may hold bytes; a user dict
# that looks like a tag is escaped rather than misread on load.
_BYTES, _DICT = "$bytes", "$dict"


def encode_frozen(value: Any, where: str) -> Any:
    """A JSON-ready copy of a call's field; NotSerializable names what cannot be held."""
    if isinstance(value, Mapping):
        out = {}
        for k, item in value.items():
            if type(k) is not str:
                raise NotSerializable(
                    f"{where} has a {type(k).__name__} key; JSON keys are strings"
                )
            out[k] = encode_frozen(item, f"{where}[{k!r}]")
        return {_DICT: out} if set(out) in ({_BYTES}, {_DICT}) else out
    if isinstance(value, (tuple, list)):
        return [encode_frozen(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    if type(value) is float and not math.isfinite(value):
        raise NotSerializable(f"{where} is {value!r}, which JSON cannot hold")
    if value is None or type(value) in (str, bool, int, float):
        return value
    raise NotSerializable(_not_json(value, where))


def decode_frozen(value: Any, sequence: type[list[Any]] | type[tuple[Any, ...]] = list) -> Any:
    """What `encode_frozen` encoded, mutable, with JSON arrays as `sequence`s."""
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
            return {k: decode_frozen(v, sequence) for k, v in value[_DICT].items()}
        return {k: decode_frozen(v, sequence) for k, v in value.items()}
    if isinstance(value, list):
        return sequence(decode_frozen(v, sequence) for v in value)
    return value


# json.dumps with options builds an encoder per call; one C encoder is kept instead.
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:
    # Arguments: markers (no cycle check: values are checked first), default, string
    # encoder, indent, key and item separators, sort_keys, skipkeys, allow_nan.
    _c_encode = _c_make_encoder(
        None, None, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def dumps(value: Any) -> str:
        """Compact JSON text of a value already checked (no NaN, no cycles), not ASCII-escaped."""
        return "".join(_c_encode(value, 0))

else:  # pragma: no cover - a Python without the accelerator (PyPy)
    _slow = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

    def dumps(value: Any) -> str:
        """Compact JSON text of a value already checked (no NaN, no cycles), not ASCII-escaped."""
        return _slow(value)


def _tag(value: Any) -> Any:
    if type(value) is MappingProxyType:  # a frozen call's mappings, the usual case
        return value.copy()
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


if _c_make_encoder is not None:
    _c_encode_tagged = _c_make_encoder(
        None, _tag, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def dumps_frozen(value: Any) -> str:
        """`dumps(encode_frozen(value))` in one pass of the C encoder, for values known to
        be of JSON types, bytes or read-only mappings. TypeError for anything else, and
        ValueError for NaN; a dict that looks like a tag is not escaped, so a caller
        checks the text for the tags (`holds_tags`) and encodes such a value the slow way."""
        return "".join(_c_encode_tagged(value, 0))

else:  # pragma: no cover - a Python without the accelerator (PyPy)
    _slow_tagged = json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_tag
    ).encode

    def dumps_frozen(value: Any) -> str:
        """See above."""
        return _slow_tagged(value)


def holds_tags(text: str) -> bool:
    """True when JSON text may hold a user's dict that looks like a tag."""
    return _BYTES in text or _DICT in text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid in a task record")


def loads(text: str | bytes) -> Any:
    """JSON text to a value; NaN and Infinity are refused (ValueError)."""
    return json.loads(text, parse_constant=_reject_constant)


def check_record(data: Any, kind: str, fields: set[str]) -> None:
    """ValueError unless `data` is a `{"type": kind, ...}` object with exactly `fields`."""
    if not isinstance(data, Mapping) or data.get("type") != kind:
        raise ValueError(f"malformed task record: not a {kind} target")
    keys = set(data) - {"type"}
    if keys != fields:
        wrong = sorted(keys ^ fields)
        raise ValueError(f"malformed {kind} target: unexpected or missing {', '.join(wrong)}")
