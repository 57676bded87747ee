"""Decode JSON objects the way Go's ``encoding/json`` fills a struct.

flannel's config and lease values are Go structs, so a compatible reader must
accept what Go accepts: object keys match field names case-insensitively, a
repeated key overwrites the earlier one (the last wins), unknown keys are ignored,
and ``null`` leaves the field at its zero value. A value of the wrong JSON type is
an error, which Go reports and so do we, naming the field.

This is Loden's one Go-JSON decoder: the model (config, leases, backend options) and
the CNI plugin (its netconf, the delegate's replies) both read through :func:`decode`
and :class:`GoObject`; each side words its own errors (the CNI plugin uses Go's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Literal, TypeVar

T = TypeVar("T")

_MISSING: Any = object()


class GoJSONError(ValueError):
    """The text is not a JSON object, or a field has the wrong JSON type."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class GoJSONSyntaxError(GoJSONError):
    """The text is not JSON (as Go's decoder sees it).

    ``reason`` is Go's wording where it has one; ``line`` and ``column`` (1-based) say
    where, when the parser knows.
    """

    def __init__(self, reason: str, *, line: int | None = None, column: int | None = None):
        where = f" at line {line} col {column}" if line is not None else ""
        super().__init__(f"invalid JSON: {reason}{where}")
        self.reason = reason
        self.line = line
        self.column = column


def decode(text: str | bytes, *, invalid_utf8: Literal["error", "replace"] = "error") -> Any:
    """Decode JSON text as Go's ``encoding/json`` accepts it; objects keep every
    key/value pair in order (wrap them with :meth:`GoObject.from_value`).

    ``NaN``/``Infinity`` and numbers beyond float64 are rejected, as Go rejects them.
    ``invalid_utf8="replace"`` substitutes U+FFFD for bad bytes (what Go does inside
    strings) instead of failing.

    :raises GoJSONSyntaxError: the text is not JSON (or not UTF-8 when that is an error).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8", "strict" if invalid_utf8 == "error" else "replace")
        except UnicodeDecodeError as exc:
            raise GoJSONError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    try:
        return json.loads(
            text,
            object_pairs_hook=_Pairs,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except GoJSONError:
        raise
    except json.JSONDecodeError as exc:
        raise GoJSONSyntaxError(exc.msg, line=exc.lineno, column=exc.colno) from exc
    except ValueError as exc:  # an integer beyond Python's 4300-digit conversion limit
        raise GoJSONSyntaxError(str(exc)) from exc
    except RecursionError as exc:
        raise GoJSONSyntaxError("exceeded max depth") from exc


def is_object(value: Any) -> bool:
    """Whether a value from :func:`decode` is a JSON object."""
    return isinstance(value, _Pairs)


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
        value = decode(text)
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

    def field(self, name: str) -> Any:
        """What Go would store in struct field ``name`` (raw): ``None`` when the key
        is absent or null (both leave Go's zero value)."""
        value = self.raw(name)
        return None if value is _MISSING else value

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

    def items(self) -> list[tuple[str, Any]]:
        """Every key/value pair in document order, duplicates included."""
        return list(self._pairs)

    def to_plain(self) -> dict[str, Any]:
        """A plain dict (last duplicate wins, original letter case of that key)."""
        out: dict[str, Any] = {}
        for key, value in self._pairs:
            for existing in [k for k in out if k.casefold() == key.casefold()]:
                del out[existing]
            out[key] = _plain(value)
        return out


def _reject_constant(name: str) -> Any:
    # Python accepts NaN/Infinity; Go (and JSON) do not. Go's own message.
    raise GoJSONSyntaxError(f"invalid character {name[0]!r} looking for beginning of value")


def _finite_float(text: str) -> float:
    # 1e999 would become inf, which no JSON encoder can write back (Go: out of range).
    value = float(text)
    if math.isinf(value):
        raise GoJSONSyntaxError(f"number {text} out of range of float64")
    return value


class _Pairs(list[tuple[str, Any]]):
    """Marker type: a JSON object decoded as its ordered pairs."""


def _plain(value: Any) -> Any:
    if isinstance(value, _Pairs):
        return GoObject(list(value)).to_plain()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def map_plain(value: Any) -> Any:
    """A value from :func:`decode` as Go decodes it into ``interface{}``: objects
    become dicts with Go *map* semantics (keys exact, the last duplicate wins).

    :raises RecursionError: nested too deeply for Python.
    """
    if isinstance(value, _Pairs):
        out: dict[str, Any] = {}
        for key, item in value:
            out[key] = map_plain(item)
        return out
    if isinstance(value, list):
        return [map_plain(item) for item in value]
    return value


def go_type_name(value: Any) -> str:
    """The JSON type name Go's decoder uses in its errors ("number", "object", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


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


def marshal(value: Any) -> str:
    """``value`` (plain dicts, lists, scalars) as Go's ``json.Marshal`` writes it:
    compact, with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped (Go's HTML-safe
    default). A lone surrogate (from a ``\\ud800`` escape in the input) cannot be
    UTF-8, so such a document is written all-ASCII instead.

    :raises RecursionError: nested too deeply to encode.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, separators=(",", ":"))
    for char, escape in _GO_ESCAPES:
        text = text.replace(char, escape)
    return text


_GO_ESCAPES = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


def compact(value: Any) -> str:
    """Render decoded ``value`` as Go's ``json.Marshal`` would embed a RawMessage."""
    return marshal(_plain(value))
