"""The kube lab's derivations from the manifest: podCIDRs, RBAC, the pod's unit and env."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from loden.errors import LodenError, UsageError
from loden.lab import kube
from loden.lab.plan import LabPlan
from loden.lab.state import NodeRecord


def plan(**changes: object) -> LabPlan:
    values: dict[str, object] = {
        "name": "k",
        "nodes": 3,
        "backend": "vxlan",
        "runtime": "cni",
        "etcd": "single",
        "tls": False,
        "etcd_api": "v3",
        "pods_per_node": 1,
        "underlay": IPv4Network("172.20.1.0/24"),
        "network": IPv4Network("10.70.0.0/16"),
        "store": "kube",
    }
    values.update(changes)
    return LabPlan(**values)  # type: ignore[arg-type]


def test_store_option_is_validated_and_round_trips() -> None:
    assert LabPlan.from_json(plan().to_json()).store == "kube"
    legacy = plan().to_json()
    del legacy["store"]
    assert LabPlan.from_json(legacy).store == "etcd", "state.json from before --store"
    with pytest.raises(UsageError, match="--store"):
        plan(store="consul")
    for bad in ({"runtime": "docker"}, {"etcd": "cluster"}, {"etcd_api": "v2"}, {"tls": True}):
        with pytest.raises(UsageError, match="--store kube"):
            plan(**bad)


def test_pod_cidrs_in_node_order_from_the_start_of_network() -> None:
    p = plan()
    assert [str(kube.pod_cidr(p, n)) for n in p.node_names()] == [
        "10.70.0.0/24",
        "10.70.1.0/24",
        "10.70.2.0/24",
    ]
    assert kube.api_url(p) == "https://172.20.1.2:6443"


def test_service_account_gets_exactly_the_cluster_role() -> None:
    namespace, name, rules = kube._service_account(kube.manifest(plan()))
    assert (namespace, name) == ("kube-flannel", "flannel")
    granted = {(r, v) for rule in rules for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {
        ("pods", "get"),
        ("nodes", "get"),
        ("nodes", "list"),
        ("nodes", "watch"),
        ("nodes/status", "patch"),
    }


def test_unit_is_the_daemonset_container() -> None:
    p = plan(backend="host-gw")
    node = NodeRecord("node2", "loden-k-node2", "172.20.1.12/24", "/run/x")
    text = kube.unit_text(p, node, "kube-flannel-ds-abcde", "/venv/bin/loden")
    assert "Type=notify" in text
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_line.split()[:2] == ["ExecStart=/venv/bin/loden", "agent"]
    assert "--kube-subnet-mgr" in exec_line and "--ip-masq" in exec_line
    assert "--healthz-ip=172.20.1.12" in exec_line and "--healthz-port=8471" in exec_line
    assert "--healthz-port=8081" not in exec_line
    env_line = next(line for line in text.splitlines() if line.startswith("Environment="))
    for pair in (
        "POD_NAME=kube-flannel-ds-abcde",
        "POD_NAMESPACE=kube-flannel",
        "EVENT_QUEUE_DEPTH=5000",
        "CONT_WHEN_CACHE_NOT_READY=false",
        "KUBERNETES_SERVICE_HOST=172.20.1.2",
        "KUBERNETES_SERVICE_PORT=6443",
    ):
        assert f'"{pair}"' in env_line


def test_unknown_field_refs_are_refused() -> None:
    item = {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]}
    with pytest.raises(LodenError, match="cannot resolve env X"):
        kube.environment(item, "pod", "ns", plan())


def test_describe_lists_what_peers_read() -> None:
    text = kube.describe(
        {"backend-type": "vxlan", "public-ip": "1.2.3.4", "backend-data": "{}", "other": "x"}
    )
    assert text.splitlines() == ["backend-type=vxlan", "public-ip=1.2.3.4", "backend-data={}"]
    assert kube.describe({}) == "-"
