"""Label and field selectors, parsed the way apimachinery parses them.

Label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``,
``!a``, comma-separated and all required. Field selectors: ``path=value``,
``path==value``, ``path!=value`` over the fields each kind supports
(``metadata.name``, ``metadata.namespace``, ``spec.nodeName`` ...); an unsupported
field is a 400 as on the real server.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from loden.kubeapi.status import ApiError, bad_request

JsonObject = dict[str, Any]

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_SET_TERM = re.compile(r"^\s*(!?)\s*([^\s!=,()]+)\s*(?:(notin|in)\s*\(([^)]*)\))?\s*$")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values


def _split_terms(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t for t in (term.strip() for term in terms) if t]


def parse_label_selector(text: str) -> list[Requirement]:
    """Parse a ``labelSelector`` query value.

    :raises ApiError: 400 for a malformed selector.
    """
    requirements: list[Requirement] = []
    for term in _split_terms(text):
        for op in ("!=", "==", "="):
            if op in term and "(" not in term:
                key, _, value = term.partition(op)
                key, value = key.strip(), value.strip()
                if not _LABEL_KEY.match(key):
                    raise _bad_label(text, key)
                requirements.append(
                    Requirement(key, "!=" if op == "!=" else "=", frozenset([value]))
                )
                break
        else:
            match = _SET_TERM.match(term)
            if not match or not _LABEL_KEY.match(match.group(2)):
                raise _bad_label(text, term)
            bang, key, op, values = match.groups()
            if op:
                if bang:
                    raise _bad_label(text, term)
                items = frozenset(v.strip() for v in values.split(",") if v.strip())
                requirements.append(Requirement(key, op, items))
            else:
                requirements.append(Requirement(key, "!" if bang else "exists", frozenset()))
    return requirements


def _bad_label(text: str, part: str) -> ApiError:
    return bad_request(
        f"unable to parse requirement: found '{part}', expected: identifier in \"{text}\""
    )


def labels_match(requirements: Collection[Requirement], obj: JsonObject) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(req.matches(labels) for req in requirements)


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    path: str
    negate: bool
    value: str


def parse_field_selector(text: str, supported: Collection[str]) -> list[FieldRequirement]:
    """Parse a ``fieldSelector`` query value against the kind's supported fields.

    :raises ApiError: 400 for a malformed selector or a field the kind does not index.
    """
    requirements: list[FieldRequirement] = []
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        for op in ("!=", "==", "="):
            if op in term:
                path, _, value = term.partition(op)
                path = path.strip()
                break
        else:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        if path not in supported:
            raise bad_request(f"field label not supported: {path}")
        requirements.append(FieldRequirement(path, op == "!=", value.strip()))
    return requirements


def field_value(obj: JsonObject, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, bool):
        return "true" if node else "false"
    return "" if node is None else str(node)


def fields_match(
    requirements: Collection[FieldRequirement],
    obj: JsonObject,
    value_of: Callable[[JsonObject, str], str] = field_value,
) -> bool:
    return all((value_of(obj, req.path) == req.value) != req.negate for req in requirements)
