"""IPv6-only with the Kubernetes subnet manager (flannel v0.18+): against the API server
double, the node's IPv6 podCIDR is the lease and flanneld's IPv6 annotations are written."""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from loden.errors import ConfigError
from loden.model.lease import LeaseAttrs
from loden.model.subnet_env import PreviousSubnets
from loden.settings import KubeSettings
from loden.subnet.kube import KubeSubnetManager, open_kube_manager
from tests.fixtures.kubeapi import KubeApiClient

P = "flannel.alpha.coreos.com/"
V6_DATA = '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e4"}'


async def manager_for(kubeapi: KubeApiClient, tmp_path: Path, conf: str) -> KubeSubnetManager:
    (tmp_path / "net-conf.json").write_text(conf)
    settings = KubeSettings(
        enabled=True,
        api_url="",
        kubeconfig_file="",
        annotation_prefix="flannel.alpha.coreos.com",
        net_config_path=str(tmp_path / "net-conf.json"),
        set_node_network_unavailable=True,
    )
    token = kubeapi.service_account()
    sa = kubeapi.write_serviceaccount_dir(tmp_path / "sa", token)
    environ = {
        "KUBERNETES_SERVICE_HOST": kubeapi.host,
        "KUBERNETES_SERVICE_PORT": str(kubeapi.port),
        "NODE_NAME": "node1",
    }
    manager = await open_kube_manager(replace(settings), environ, sa_dir=sa)
    assert isinstance(manager, KubeSubnetManager)
    return manager


V6_ONLY = (
    '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", '
    '"Backend": {"Type": "vxlan"}}'
)
ATTRS = LeaseAttrs(
    public_ip=IPv4Address(0),
    backend_type="vxlan",
    public_ipv6=IPv6Address("fd00::11"),
    backend_v6_data=V6_DATA,
)


async def test_ipv6_only_lease_and_annotations(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "fd00:10:244:1::/64", pod_cidrs=["fd00:10:244:1::/64"])
    kubeapi.create_node(
        "node2",
        "fd00:10:244:2::/64",
        pod_cidrs=["fd00:10:244:2::/64"],
        annotations={
            P + "backend-type": "vxlan",
            P + "kube-subnet-manager": "true",
            P + "backend-v6-data": V6_DATA.replace("e4", "e5"),
            P + "public-ipv6": "fd00::12",
        },
    )
    manager = await manager_for(kubeapi, tmp_path, V6_ONLY)
    try:
        lease = await manager.acquire_lease(ATTRS, PreviousSubnets())
        assert lease.subnet == IPv4Network("0.0.0.0/0")
        assert lease.ipv6_subnet == IPv6Network("fd00:10:244:1::/64")
        peers = await manager.list_leases()
        other = [p for p in peers if p.ipv6_subnet == IPv6Network("fd00:10:244:2::/64")]
        assert len(other) == 1 and other[0].attrs.public_ipv6 == IPv6Address("fd00::12")
    finally:
        await manager.aclose()
    annotations = kubeapi.get("nodes", "node1")["metadata"]["annotations"]
    # As flanneld writes them for IPv6-only vxlan: no IPv4 data, no public-ip.
    assert annotations[P + "backend-v6-data"] == V6_DATA
    assert annotations[P + "public-ipv6"] == "fd00::11"
    assert P + "public-ip" not in annotations and P + "backend-data" not in annotations
    assert json.loads(annotations[P + "backend-v6-data"])["VNI"] == 1


async def test_ipv6_only_errors_are_actionable(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    manager = await manager_for(kubeapi, tmp_path, V6_ONLY)
    try:
        with pytest.raises(ConfigError, match="no IPv6 podCIDR .* IPv6-only"):
            await manager.acquire_lease(ATTRS, PreviousSubnets())
    finally:
        await manager.aclose()
