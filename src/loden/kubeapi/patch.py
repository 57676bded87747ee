"""The three PATCH flavours: JSON merge (RFC 7386), strategic merge and JSON patch (RFC 6902).

Strategic merge follows apimachinery's ``strategicpatch`` for the fields our kinds
declare (:data:`MergeKeys`): lists of objects merged by their key (node ``conditions``
and ``addresses`` by ``type``, containers by ``name`` ...), lists of scalars merged as
sets (``finalizers``, ``podCIDRs``), every other list replaced. The directives
``$patch: replace|delete|merge``, ``$deleteFromPrimitiveList/<field>``,
``$setElementOrder/<field>`` and ``$retainKeys`` are honoured.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from loden.kubeapi.status import ApiError, bad_request

JsonObject = dict[str, Any]

PRIMITIVE_SET = ""
"""Merge key meaning "a list of scalars merged as a set"."""

MergeKeys = Mapping[str, str]
"""Dotted path (``[]`` after a list field for its items) -> merge key or PRIMITIVE_SET."""

_DELETE = object()


def parse_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise bad_request(f"error decoding patch: {exc}") from exc


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(original: JsonObject, patch: Any, keys: MergeKeys) -> JsonObject:
    """Apply a strategic-merge patch; ``keys`` is the kind's merge-key table.

    :raises ApiError: 400 for a body that is not an object or a malformed directive.
    """
    if not isinstance(patch, dict):
        raise bad_request("error decoding patch: the patch is not a JSON object")
    merged = _merge_map(copy.deepcopy(original), patch, "", keys)
    if merged is _DELETE:
        return {}
    assert isinstance(merged, dict)
    return merged


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _merge_map(original: JsonObject, patch: JsonObject, path: str, keys: MergeKeys) -> Any:
    directive = patch.get("$patch")
    if directive == "replace":
        return _strip_directives(patch)
    if directive == "delete":
        return _DELETE
    if directive not in (None, "merge"):
        raise bad_request(f"Unknown patch type: {directive}")
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if not isinstance(value, list):
                raise bad_request(f"invalid patch: {key} must be a list")
            current = original.get(field)
            if isinstance(current, list):
                original[field] = [item for item in current if item not in value]
            continue
        if value is None:
            original.pop(key, None)
            continue
        current = original.get(key)
        child = _join(path, key)
        if isinstance(value, dict):
            merged = _merge_map(current if isinstance(current, dict) else {}, value, child, keys)
            if merged is _DELETE:
                original.pop(key, None)
            else:
                original[key] = merged
        elif isinstance(value, list) and child in keys:
            original[key] = _merge_list(
                current if isinstance(current, list) else [], value, child, keys
            )
        else:
            original[key] = _strip_directives(value)
    if isinstance(retain, list):
        for key in list(original):
            if key not in retain:
                del original[key]
    return original


def _merge_list(original: list[Any], patch: list[Any], path: str, keys: MergeKeys) -> list[Any]:
    merge_key = keys[path]
    if merge_key == PRIMITIVE_SET:
        result = list(original)
        for item in patch:
            if item not in result:
                result.append(item)
        return result
    if any(isinstance(item, dict) and item.get("$patch") == "replace" for item in patch):
        return [
            _strip_directives(item)
            for item in patch
            if not (isinstance(item, dict) and item.get("$patch") == "replace")
        ]
    result = list(original)
    item_path = path + "[]"
    for item in patch:
        if not isinstance(item, dict):
            raise bad_request(f"invalid patch: {path} items must be objects with {merge_key!r}")
        if merge_key not in item:
            raise bad_request(f"map: {item} does not contain declared merge key: {merge_key}")
        index = next(
            (
                i
                for i, old in enumerate(result)
                if isinstance(old, dict) and old.get(merge_key) == item[merge_key]
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if index is not None:
                del result[index]
            continue
        if index is None:
            result.append(_strip_directives(item))
        else:
            merged = _merge_map(result[index], item, item_path, keys)
            if merged is _DELETE:
                del result[index]
            else:
                result[index] = merged
    return result


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _strip_directives(item)
            for key, item in value.items()
            if not key.startswith("$") and item is not None
        }
    if isinstance(value, list):
        return [
            _strip_directives(item)
            for item in value
            if not (isinstance(item, dict) and "$patch" in item)
        ]
    return value


# ------------------------------------------------------------------------------ RFC 6902


def json_patch(document: JsonObject, operations: Any) -> JsonObject:
    """Apply an RFC 6902 JSON patch.

    :raises ApiError: 400 for a malformed operation, 422 when a ``test`` fails or a path
        does not exist.
    """
    if not isinstance(operations, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc: Any = copy.deepcopy(document)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"invalid JSON patch operation: {op}")
        kind, path = op["op"], op["path"]
        if kind == "add":
            doc = _pointer_set(doc, path, copy.deepcopy(op.get("value")), insert=True)
        elif kind == "remove":
            doc, _ = _pointer_remove(doc, path)
        elif kind == "replace":
            doc, _ = _pointer_remove(doc, path)
            doc = _pointer_set(doc, path, copy.deepcopy(op.get("value")), insert=True)
        elif kind in ("move", "copy"):
            source = op.get("from", "")
            if kind == "move":
                doc, value = _pointer_remove(doc, source)
            else:
                value = copy.deepcopy(_pointer_get(doc, source))
            doc = _pointer_set(doc, path, value, insert=True)
        elif kind == "test":
            if _pointer_get(doc, path) != op.get("value"):
                raise _unprocessable(f"testing value {path} failed: test failed")
        else:
            raise bad_request(f"Unexpected kind: {kind}")
    if not isinstance(doc, dict):
        raise _unprocessable("the patched object is not a JSON object")
    return doc


def _unprocessable(message: str) -> ApiError:
    return ApiError(
        422, "Invalid", f"the server rejected our request due to an error in our request: {message}"
    )


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"JSON pointer must start with '/': {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _walk(doc: Any, tokens: list[str], path: str) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            raise _unprocessable(f"doc is missing path: {path}: missing value")
    return doc


def _pointer_get(doc: Any, path: str) -> Any:
    return _walk(doc, _tokens(path), path)


def _pointer_set(doc: Any, path: str, value: Any, *, insert: bool) -> Any:
    tokens = _tokens(path)
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise _unprocessable(f"doc is missing path: {path}: missing value")
    else:
        raise _unprocessable(f"doc is missing path: {path}: missing value")
    return doc


def _pointer_remove(doc: Any, path: str) -> tuple[Any, Any]:
    tokens = _tokens(path)
    if not tokens:
        return None, doc
    parent = _walk(doc, tokens[:-1], path)
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return doc, parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return doc, parent.pop(int(last))
    raise _unprocessable(f"doc is missing path: {path}: missing value")
