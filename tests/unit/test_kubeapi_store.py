"""resourceVersion semantics of the API double's store, and its selectors."""

from __future__ import annotations

from typing import Any

import pytest

from loden.kubeapi.selectors import (
    field_value,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)
from loden.kubeapi.status import ApiError
from loden.kubeapi.store import Store


def node(name: str, **annotations: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "annotations": annotations}, "spec": {}}


def test_one_monotonic_counter_across_kinds_and_no_op_writes() -> None:
    store = Store()
    first = store.commit(("nodes", "", "a"), node("a"))
    second = store.commit(("pods", "ns", "p"), {"metadata": {"name": "p"}})
    assert first is not None and second is not None
    assert (first.rv, second.rv) == (1, 2)
    assert store.get(("nodes", "", "a"))["metadata"]["resourceVersion"] == "1"  # type: ignore[index]
    assert store.commit(("nodes", "", "a"), node("a")) is None, "an unchanged write is no write"
    assert store.rv == 2
    changed = store.commit(("nodes", "", "a"), node("a", x="1"))
    assert changed is not None and changed.type == "MODIFIED" and changed.rv == 3
    gone = store.commit(("nodes", "", "a"), None)
    assert gone is not None and gone.type == "DELETED" and gone.rv == 4
    assert gone.obj["metadata"]["resourceVersion"] == "4", "DELETED carries the delete's version"
    assert gone.obj["metadata"]["annotations"] == {"x": "1"}


def test_reads_at_an_old_version_and_compaction() -> None:
    store = Store()
    store.commit(("nodes", "", "a"), node("a"))  # 1
    store.commit(("nodes", "", "b"), node("b"))  # 2
    store.commit(("nodes", "", "a"), node("a", v="2"))  # 3
    store.commit(("nodes", "", "b"), None)  # 4
    at2 = store.items_at("nodes", 2)
    assert [o["metadata"]["name"] for o in at2] == ["a", "b"]
    assert at2[0]["metadata"]["annotations"] == {}
    assert [o["metadata"]["name"] for o in store.items_at("nodes", 1)] == ["a"]
    assert [e.rv for e in store.events_since(2)] == [3, 4]
    store.compact(3)
    assert [e.rv for e in store.events_since(3)] == [4]
    with pytest.raises(ApiError) as error:
        list(store.events_since(2))
    assert error.value.code == 410 and error.value.reason == "Expired"
    assert error.value.message == "too old resource version: 2 (4)"
    with pytest.raises(ApiError):
        store.items_at("nodes", 1)


def test_history_limit_compacts_oldest() -> None:
    store = Store(history_limit=3)
    for i in range(5):
        store.commit(("nodes", "", f"n{i}"), node(f"n{i}"))
    assert store.compacted == 2
    assert [e.rv for e in store.events_since(2)] == [3, 4, 5]


def test_watchers_get_their_resource_only() -> None:
    store = Store()
    watcher = store.subscribe("nodes")
    store.commit(("pods", "ns", "p"), {"metadata": {"name": "p"}})
    store.commit(("nodes", "", "a"), node("a"))
    assert watcher.queue.qsize() == 1
    store.close_watchers()
    assert watcher.queue.qsize() == 2


def test_label_selectors() -> None:
    obj = {"metadata": {"labels": {"app": "flannel", "tier": "node", "k8s.io/x": ""}}}
    cases = {
        "app=flannel": True,
        "app==flannel,tier=node": True,
        "app!=flannel": False,
        "app in (a, flannel)": True,
        "tier notin (node)": False,
        "k8s.io/x": True,
        "!missing": True,
        "!app": False,
        "missing notin (a)": True,
        "": True,
    }
    for text, expected in cases.items():
        assert labels_match(parse_label_selector(text), obj) is expected, text
    with pytest.raises(ApiError):
        parse_label_selector("a in (b")


def test_field_selectors() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"nodeName": "n1", "hostNetwork": True},
    }
    supported = {"metadata.name", "spec.nodeName", "spec.hostNetwork"}
    assert fields_match(parse_field_selector("spec.nodeName=n1,metadata.name!=q", supported), pod)
    assert not fields_match(parse_field_selector("metadata.name==q", supported), pod)
    assert field_value(pod, "spec.hostNetwork") == "true"
    with pytest.raises(ApiError) as error:
        parse_field_selector("spec.other=1", supported)
    assert error.value.message == "field label not supported: spec.other"
