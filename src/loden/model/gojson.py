"""Decode JSON objects the way Go's ``encoding/json`` fills a struct.

flannel's config and lease values are Go structs, so a compatible reader must
accept what Go accepts: object keys match field names case-insensitively, a
repeated key overwrites the earlier one (the last wins), unknown keys are ignored,
and ``null`` leaves the field at its zero value. A value of the wrong JSON type is
an error, which Go reports and so do we, naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING: Any = object()


class GoJSONError(ValueError):
    """The text is not a JSON object, or a field has the wrong JSON type."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class GoObject:
    """A decoded JSON object with Go's field-matching rules.

    Keeps every key/value pair in document order so that the *last* of several
    keys matching one field (in any letter case) wins, exactly as Go overwrites
    the field once per matching key.
    """

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self._pairs = pairs

    @classmethod
    def parse(cls, text: str | bytes) -> GoObject:
        """Parse ``text`` as a JSON object; raise :class:`GoJSONError` otherwise."""
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            value = json.loads(
                text,
                object_pairs_hook=_Pairs,
                parse_constant=_reject_constant,
                parse_float=_finite_float,
            )
        except UnicodeDecodeError as exc:
            raise GoJSONError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
        except json.JSONDecodeError as exc:
            raise GoJSONError(
                f"invalid JSON: {exc.msg} at line {exc.lineno} col {exc.colno}"
            ) from exc
        except RecursionError as exc:
            raise GoJSONError("invalid JSON: nested too deeply") from exc
        if not isinstance(value, _Pairs):
            raise GoJSONError(f"expected a JSON object, got {_json_type(value)}")
        return cls(list(value))

    @classmethod
    def from_value(cls, value: Any, *, field: str) -> GoObject | None:
        """Wrap an already decoded nested object (``None`` for JSON null)."""
        if value is None:
            return None
        if not isinstance(value, _Pairs):
            raise GoJSONError(
                f"{field}: expected a JSON object, got {_json_type(value)}", field=field
            )
        return cls(list(value))

    def raw(self, name: str) -> Any:
        """The last value whose key equals ``name`` ignoring case, or ``_MISSING``."""
        wanted = name.casefold()
        found: Any = _MISSING
        for key, value in self._pairs:
            if key.casefold() == wanted:
                found = value
        return found

    def has(self, name: str) -> bool:
        value = self.raw(name)
        return value is not _MISSING and value is not None

    def get(self, name: str, kind: Callable[[Any, str], T], default: T) -> T:
        """Field ``name`` converted by ``kind`` (one of the ``as_*`` functions)."""
        value = self.raw(name)
        if value is _MISSING or value is None:
            return default
        return kind(value, name)

    def keys(self) -> list[str]:
        return [key for key, _ in self._pairs]

    def to_plain(self) -> dict[str, Any]:
        """A plain dict (last duplicate wins, original letter case of that key)."""
        out: dict[str, Any] = {}
        for key, value in self._pairs:
            for existing in [k for k in out if k.casefold() == key.casefold()]:
                del out[existing]
            out[key] = _plain(value)
        return out


def _reject_constant(name: str) -> Any:
    # Python accepts NaN/Infinity; Go (and JSON) do not.
    raise json.JSONDecodeError(f"invalid literal {name}", name, 0)


def _finite_float(text: str) -> float:
    # 1e999 would become inf, which no JSON encoder can write back (Go: out of range).
    value = float(text)
    if math.isinf(value):
        raise GoJSONError(f"invalid JSON: number {text[:30]} is out of range of float64")
    return value


class _Pairs(list[tuple[str, Any]]):
    """Marker type: a JSON object decoded as its ordered pairs."""


def _plain(value: Any) -> Any:
    if isinstance(value, _Pairs):
        return GoObject(list(value)).to_plain()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "an array"
    return "an object"


def as_str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise GoJSONError(f"{field}: expected a string, got {_json_type(value)}", field=field)
    return value


def as_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise GoJSONError(f"{field}: expected true or false, got {_json_type(value)}", field=field)
    return value


def as_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GoJSONError(f"{field}: expected a number, got {_json_type(value)}", field=field)
    if isinstance(value, float) and not value.is_integer():
        raise GoJSONError(f"{field}: expected a whole number, got {value!r}", field=field)
    return int(value)


def as_uint(value: Any, field: str) -> int:
    number = as_int(value, field)
    if number < 0:
        raise GoJSONError(f"{field}: expected a non-negative number, got {number}", field=field)
    return number


def as_any(value: Any, field: str) -> Any:
    return _plain(value)


def compact(value: Any) -> str:
    """Render ``value`` as Go's ``json.Marshal`` would embed a RawMessage: compact,
    with ``<``, ``>`` and ``&`` escaped as ``\\u003c`` etc. (Go's HTML-safe default)."""
    text = json.dumps(_plain(value), separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
