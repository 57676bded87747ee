"""Node objects → peer leases (flanneld's nodeToLease, spec §4.4): every skipped case
and the single and dual-stack podCIDR forms."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from loden.subnet.kube.annotations import AnnotationKeys
from loden.subnet.kube.nodes import NodeInfo, NodeSkipped, node_to_lease, pod_cidrs

P = "flannel.alpha.coreos.com/"
KEYS = AnnotationKeys(P)
GO_VXLAN = {
    # exactly as Go flanneld annotates a node (spec §4.2 example)
    P + "backend-data": '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}',
    P + "backend-type": "vxlan",
    P + "kube-subnet-manager": "true",
    P + "public-ip": "172.18.0.3",
    P + "backend-v6-data": '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e4"}',
    P + "public-ipv6": "fc00:f853:ccd:e793::3",
    "node.alpha.kubernetes.io/ttl": "0",
}


def node(
    annotations: dict[str, str] | None = None,
    *,
    pod_cidr: str | None = "10.244.1.0/24",
    pod_cidrs: list[str] | None = None,
    name: str = "n1",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "resourceVersion": "7"}
    if annotations is not None:
        meta["annotations"] = annotations
    spec: dict[str, Any] = {}
    if pod_cidr is not None:
        spec["podCIDR"] = pod_cidr
    if pod_cidrs is not None:
        spec["podCIDRs"] = pod_cidrs
    return {"kind": "Node", "metadata": meta, "spec": spec}


def lease_of(obj: dict[str, Any], **kw: bool) -> Any:
    return node_to_lease(NodeInfo.from_object(obj, KEYS), KEYS, **kw)


def test_go_flanneld_vxlan_node_is_a_peer() -> None:
    lease = lease_of(node(GO_VXLAN))
    assert lease.subnet == IPv4Network("10.244.1.0/24")
    assert lease.ipv6_subnet is None
    assert lease.attrs.public_ip == IPv4Address("172.18.0.3")
    assert lease.attrs.backend_type == "vxlan"
    assert lease.attrs.data() == {"VNI": 1, "VtepMAC": "12:c6:65:89:b4:e3"}


def test_dual_stack_pod_cidrs() -> None:
    obj = node(GO_VXLAN, pod_cidrs=["fd00:10:244:1::/64", "10.244.1.0/24"])
    lease = lease_of(obj, ipv4=True, ipv6=True)
    assert lease.subnet == IPv4Network("10.244.1.0/24")
    assert lease.ipv6_subnet == IPv6Network("fd00:10:244:1::/64")
    assert lease.attrs.public_ipv6 == IPv6Address("fc00:f853:ccd:e793::3")
    assert lease.attrs.v6_data() == {"VNI": 1, "VtepMAC": "12:c6:65:89:b4:e4"}


def test_pod_cidrs_win_over_pod_cidr_and_host_bits_are_masked() -> None:
    v4, v6 = pod_cidrs(NodeInfo.from_object(node(pod_cidr="", pod_cidrs=["10.244.3.7/24"])))
    assert (v4, v6) == (IPv4Network("10.244.3.0/24"), None)


def test_backend_data_is_compacted_and_null_means_none() -> None:
    spaced = {**GO_VXLAN, P + "backend-data": '{ "VNI": 1, "VtepMAC": "12:c6:65:89:b4:e3" }'}
    assert lease_of(node(spaced)).attrs.backend_data == '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}'
    hostgw = {**GO_VXLAN, P + "backend-type": "host-gw", P + "backend-data": "null"}
    assert lease_of(node(hostgw)).attrs.backend_data is None


def test_node_without_annotations_map_does_not_crash() -> None:
    # Go flanneld panicked on it (spec §4.7); here it is just not flannel's.
    with pytest.raises(NodeSkipped, match="not managed by flannel"):
        lease_of(node(None))


SKIPPED = [
    (
        "not managed",
        {k: v for k, v in GO_VXLAN.items() if "kube-subnet-manager" not in k},
        {},
        "not managed by flannel",
    ),
    (
        "managed false",
        {**GO_VXLAN, P + "kube-subnet-manager": "false"},
        {},
        "not managed by flannel",
    ),
    (
        "no public-ip",
        {k: v for k, v in GO_VXLAN.items() if not k.endswith("/public-ip")},
        {},
        "public-ip='' is not an IPv4 address",
    ),
    (
        "bad public-ip",
        {**GO_VXLAN, P + "public-ip": "300.1.1.1"},
        {},
        "public-ip='300.1.1.1' is not an IPv4 address",
    ),
    (
        "v6 public-ip in v4 slot",
        {**GO_VXLAN, P + "public-ip": "fc00::1"},
        {},
        "not an IPv4 address",
    ),
    (
        "bad backend-data",
        {**GO_VXLAN, P + "backend-data": "{VNI:1"},
        {},
        "backend-data is not JSON",
    ),
    ("no pod cidr", GO_VXLAN, {"pod_cidr": ""}, 'node "n1" pod cidr not assigned'),
    ("bad pod cidr", GO_VXLAN, {"pod_cidr": "10.244.1.0/33"}, "is not a CIDR"),
    (
        "three pod cidrs",
        GO_VXLAN,
        {"pod_cidrs": ["10.244.1.0/24", "fd00::/64", "10.245.1.0/24"]},
        "pod cidrs should be IPv4/IPv6 only or dualstack",
    ),
    ("only an IPv6 pod cidr", GO_VXLAN, {"pod_cidr": "fd00::/64"}, "has no IPv4 podCIDR"),
]


@pytest.mark.parametrize(
    ("annotations", "spec", "message"), [x[1:] for x in SKIPPED], ids=[x[0] for x in SKIPPED]
)
def test_skipped_nodes_say_why(
    annotations: dict[str, str], spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(NodeSkipped) as info:
        lease_of(node(annotations, **spec))
    assert message in str(info.value)
    assert '"n1"' in str(info.value)


def test_empty_pod_cidr_names_the_controller_manager_flags() -> None:
    with pytest.raises(NodeSkipped) as info:
        lease_of(node(GO_VXLAN, pod_cidr=""))
    assert "--allocate-node-cidrs" in str(info.value)
    assert "--pod-network-cidr" in str(info.value)


DUAL_SKIPPED = [
    (
        "no public-ipv6",
        {k: v for k, v in GO_VXLAN.items() if not k.endswith("public-ipv6")},
        "not an IPv6 address",
    ),
    ("bad public-ipv6", {**GO_VXLAN, P + "public-ipv6": "10.0.0.1"}, "not an IPv6 address"),
    (
        "bad backend-v6-data",
        {**GO_VXLAN, P + "backend-v6-data": "[1,"},
        "backend-v6-data is not JSON",
    ),
]


@pytest.mark.parametrize(
    "annotations", [x[1] for x in DUAL_SKIPPED], ids=[x[0] for x in DUAL_SKIPPED]
)
def test_dual_stack_skips(annotations: dict[str, str]) -> None:
    obj = node(annotations, pod_cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"])
    with pytest.raises(NodeSkipped):
        lease_of(obj, ipv4=True, ipv6=True)
    assert lease_of(obj).subnet == IPv4Network("10.244.1.0/24")  # IPv4-only config: fine


def test_dual_stack_needs_an_ipv6_pod_cidr() -> None:
    with pytest.raises(NodeSkipped, match="no IPv6 podCIDR"):
        lease_of(node(GO_VXLAN), ipv4=True, ipv6=True)


def test_only_the_needed_annotations_are_kept() -> None:
    info = NodeInfo.from_object(node({**GO_VXLAN, "huge": "x" * 10000}), KEYS)
    assert "huge" not in info.annotations
    assert "node.alpha.kubernetes.io/ttl" not in info.annotations
    assert info.annotations[P + "public-ip"] == "172.18.0.3"


@pytest.mark.parametrize(
    "obj",
    [{}, {"metadata": {}}, {"metadata": {"name": 3}}, {"metadata": {"name": "x"}, "spec": []}],
)
def test_malformed_objects(obj: dict[str, Any]) -> None:
    with pytest.raises(NodeSkipped):
        NodeInfo.from_object(obj, KEYS)


def test_ipv6_only_peer_lease() -> None:
    """IPv6-only (EnableIPv4 false): the lease's IPv4 part is empty, as over etcd."""
    go_v6_only = {
        P + "backend-type": "vxlan",
        P + "kube-subnet-manager": "true",
        P + "backend-v6-data": '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e4"}',
        P + "public-ipv6": "fc00:f853:ccd:e793::3",
    }
    lease = lease_of(node(go_v6_only, pod_cidr="fd00:10:244:1::/64"), ipv4=False, ipv6=True)
    assert lease.subnet == IPv4Network("0.0.0.0/0")
    assert lease.key == "0.0.0.0-0&fd00:10:244:1::-64"
    assert lease.ipv6_subnet == IPv6Network("fd00:10:244:1::/64")
    assert lease.attrs.public_ip == IPv4Address(0)
    assert lease.attrs.public_ipv6 == IPv6Address("fc00:f853:ccd:e793::3")
    assert lease.attrs.backend_data is None
    with pytest.raises(NodeSkipped, match="no IPv6 podCIDR"):
        lease_of(node(go_v6_only), ipv4=False, ipv6=True)
