"""Patch semantics of the API double: JSON merge, strategic merge (node/pod keys), JSON patch."""

from __future__ import annotations

from typing import Any

import pytest

from loden.kubeapi.patch import json_patch, merge_patch, strategic_merge_patch
from loden.kubeapi.resources import NODES, PODS
from loden.kubeapi.status import ApiError

NODE: dict[str, Any] = {
    "metadata": {"name": "n1", "annotations": {"a": "1", "b": "2"}, "finalizers": ["x"]},
    "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"], "taints": [{"key": "k"}]},
    "status": {
        "conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "MemoryPressure", "status": "False"},
        ],
        "addresses": [
            {"type": "InternalIP", "address": "10.0.0.1"},
            {"type": "Hostname", "address": "n1"},
        ],
    },
}


def test_merge_patch_nulls_delete_and_lists_replace() -> None:
    out = merge_patch(
        NODE, {"metadata": {"annotations": {"a": None, "c": "3"}}, "status": {"conditions": []}}
    )
    assert out["metadata"]["annotations"] == {"b": "2", "c": "3"}
    assert out["status"]["conditions"] == []
    assert NODE["metadata"]["annotations"] == {"a": "1", "b": "2"}, "input untouched"


def test_strategic_conditions_merge_by_type() -> None:
    patch = {
        "status": {
            "conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}
            ]
        }
    }
    out = strategic_merge_patch(NODE, patch, NODES.merge_keys)
    assert [c["type"] for c in out["status"]["conditions"]] == [
        "Ready",
        "MemoryPressure",
        "NetworkUnavailable",
    ]
    again = strategic_merge_patch(
        out, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}, NODES.merge_keys
    )
    assert again["status"]["conditions"][0] == {"type": "Ready", "status": "False"}
    assert len(again["status"]["conditions"]) == 3


def test_strategic_addresses_by_type_and_unkeyed_lists_replace() -> None:
    patch = {
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.9"}]},
        "spec": {"taints": [{"key": "other"}]},
    }
    out = strategic_merge_patch(NODE, patch, NODES.merge_keys)
    assert out["status"]["addresses"] == [
        {"type": "InternalIP", "address": "10.0.0.9"},
        {"type": "Hostname", "address": "n1"},
    ]
    assert out["spec"]["taints"] == [{"key": "other"}]


def test_strategic_directives() -> None:
    keys = NODES.merge_keys
    deleted = strategic_merge_patch(
        NODE, {"status": {"conditions": [{"type": "MemoryPressure", "$patch": "delete"}]}}, keys
    )
    assert [c["type"] for c in deleted["status"]["conditions"]] == ["Ready"]
    replaced = strategic_merge_patch(
        NODE,
        {"status": {"conditions": [{"$patch": "replace"}, {"type": "Only", "status": "True"}]}},
        keys,
    )
    assert replaced["status"]["conditions"] == [{"type": "Only", "status": "True"}]
    primitive = strategic_merge_patch(
        NODE, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}, keys
    )
    assert primitive["metadata"]["finalizers"] == []
    added = strategic_merge_patch(NODE, {"metadata": {"finalizers": ["y", "x"]}}, keys)
    assert added["metadata"]["finalizers"] == ["x", "y"], (
        "scalar lists with a strategy merge as sets"
    )
    whole = strategic_merge_patch(NODE, {"status": {"$patch": "replace", "phase": "x"}}, keys)
    assert whole["status"] == {"phase": "x"}
    retained = strategic_merge_patch(
        NODE, {"spec": {"$retainKeys": ["podCIDR"], "podCIDR": "10.244.1.0/24"}}, keys
    )
    assert retained["spec"] == {"podCIDR": "10.244.1.0/24"}
    ordered = strategic_merge_patch(
        NODE, {"metadata": {"$setElementOrder/finalizers": ["x"], "annotations": {"a": None}}}, keys
    )
    assert ordered["metadata"]["annotations"] == {"b": "2"}


def test_strategic_pod_containers_by_name() -> None:
    pod = {
        "spec": {
            "containers": [{"name": "a", "image": "i:1", "env": [{"name": "X", "value": "1"}]}]
        }
    }
    out = strategic_merge_patch(
        pod,
        {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]}]}},
        PODS.merge_keys,
    )
    assert out["spec"]["containers"][0]["image"] == "i:1"
    assert out["spec"]["containers"][0]["env"] == [
        {"name": "X", "value": "1"},
        {"name": "Y", "value": "2"},
    ]


def test_strategic_merge_key_missing_is_a_bad_request() -> None:
    with pytest.raises(ApiError) as error:
        strategic_merge_patch(
            NODE, {"status": {"conditions": [{"status": "True"}]}}, NODES.merge_keys
        )
    assert error.value.code == 400


def test_json_patch_operations() -> None:
    ops = [
        {"op": "add", "path": "/metadata/annotations/c~1d", "value": "3"},
        {"op": "remove", "path": "/metadata/annotations/a"},
        {"op": "replace", "path": "/spec/podCIDR", "value": "10.244.9.0/24"},
        {"op": "test", "path": "/metadata/name", "value": "n1"},
        {"op": "add", "path": "/status/conditions/-", "value": {"type": "X"}},
        {"op": "copy", "from": "/metadata/name", "path": "/metadata/labels"},
    ]
    out = json_patch(NODE, ops)
    assert out["metadata"]["annotations"] == {"b": "2", "c/d": "3"}
    assert out["spec"]["podCIDR"] == "10.244.9.0/24"
    assert out["status"]["conditions"][-1] == {"type": "X"}
    assert out["metadata"]["labels"] == "n1"
    with pytest.raises(ApiError) as error:
        json_patch(NODE, [{"op": "test", "path": "/metadata/name", "value": "other"}])
    assert error.value.code == 422
    with pytest.raises(ApiError):
        json_patch(NODE, [{"op": "remove", "path": "/nope"}])
