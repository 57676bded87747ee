"""Real agents in --kube-subnet-mgr mode against the API server double: pods reach each
other per backend, node deletions and annotation changes reach every peer, outages and
watch cuts lose nothing, and misconfigured clusters get one actionable error."""

from __future__ import annotations

import json
import re
import time

import pytest

from loden.kubeapi.auth import FLANNEL_RULES
from tests.fixtures.topology import wait_until
from tests.integration.kube_support import ClusterFactory, KubeAgentCluster, KubeNode, P
from tests.integration.kube_support import kube_cluster as kube_cluster  # the fixture

pytestmark = pytest.mark.root

MESH = [
    ("vxlan", {"Type": "vxlan"}, 2),
    ("vxlan", {"Type": "vxlan"}, 3),
    ("host-gw", {"Type": "host-gw"}, 3),
    ("udp", {"Type": "udp"}, 2),
    ("wireguard", {"Type": "wireguard"}, 2),
]


def _annotations(cluster: KubeAgentCluster, node: KubeNode) -> dict[str, str]:
    meta = cluster.api.get("nodes", node.name)["metadata"]
    return {k.removeprefix(P): v for k, v in meta.get("annotations", {}).items() if k.startswith(P)}


@pytest.mark.parametrize(
    ("name", "backend", "hosts"), MESH, ids=[f"{n}-{h}nodes" for n, _, h in MESH]
)
def test_mesh(
    kube_cluster: ClusterFactory, name: str, backend: dict[str, object], hosts: int
) -> None:
    cluster = kube_cluster(backend, hosts=hosts)
    cluster.start_all()
    cluster.add_pods(per_node=1)
    assert cluster.mesh_failures() == []
    for node in cluster.nodes:
        assert (
            f"FLANNEL_SUBNET={node.pod_cidr.network_address + 1}/24" in node.subnet_file.read_text()
        )
        ann = _annotations(cluster, node)
        assert ann["kube-subnet-manager"] == "true"
        assert ann["public-ip"] == str(node.host.ip)
        assert ann["backend-type"] == ("" if name == "udp" else name)
        if name == "vxlan":
            assert re.fullmatch(
                r'\{"VNI":1,"VtepMAC":"([0-9a-f]{2}:){5}[0-9a-f]{2}"\}', ann["backend-data"]
            )
        elif name == "wireguard":
            data = json.loads(ann["backend-data"])
            assert set(data) == {"PublicKey", "Port"}
        else:
            assert ann["backend-data"] == "null"
        status = cluster.api.get("nodes", node.name)["status"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["NetworkUnavailable"]["reason"] == "FlannelIsUp"
        assert conditions["Ready"]["status"] == "True"


def _neighbours(node: KubeNode) -> str:
    return node.host.ns.ip("neigh", "show", "dev", "flannel.1").stdout


def _peer_adds(node: KubeNode, subnet: str) -> int:
    assert node.proc is not None
    return len(re.findall(rf"peer {re.escape(subnet)} added", node.proc.output()))


def test_delete_annotate_cut_and_410(kube_cluster: ClusterFactory) -> None:
    cluster = kube_cluster({"Type": "vxlan"}, hosts=3)
    cluster.start_all()
    n1, n2, n3 = cluster.nodes
    key3 = f"{n3.pod_cidr.network_address}-24"
    # A node deleted: its routes go away everywhere.
    assert wait_until(lambda: str(n3.pod_cidr) in cluster.routes(n1), timeout=10)
    cluster.kubectl("delete", "node", n3.name)

    def routes_gone() -> bool:
        return all(str(n3.pod_cidr) not in cluster.routes(node) for node in (n1, n2))

    assert wait_until(routes_gone, timeout=10)
    # n1 met n3 in its first listing or as an event (the agents start together): counted
    # from here, the relist below must not bring the deleted node back.
    adds3 = _peer_adds(n1, key3)
    assert adds3 <= 1
    # Annotations changed with kubectl: peers are reprogrammed (a new VTEP MAC).
    mac = "0a:58:0a:f4:02:99"
    data = json.dumps({"VNI": 1, "VtepMAC": mac}, separators=(",", ":"))
    cluster.kubectl("annotate", "--overwrite", "node", n2.name, f"{P}backend-data={data}")
    assert wait_until(
        lambda: mac in n1.host.ns.ip("neigh", "show", "dev", "flannel.1").stdout, timeout=10
    )
    # The watch torn and the version compacted (410): a relist, nothing missed or doubled.
    key2 = f"{n2.pod_cidr.network_address}-24"
    before = _peer_adds(n1, key2)
    cluster.api.cut_watches(abort=True)
    ghost = cluster.network.network_address + 9 * 256
    cluster.api.create_node(
        "ghost",
        f"{ghost}/24",
        annotations={
            P + "backend-data": '{"VNI":1,"VtepMAC":"0a:58:0a:f4:09:01"}',
            P + "backend-type": "vxlan",
            P + "kube-subnet-manager": "true",
            P + "public-ip": str(n3.host.ip),
        },
    )
    cluster.api.compact()
    assert wait_until(lambda: f"{ghost}/24" in cluster.routes(n1), timeout=15)
    time.sleep(1.5)
    assert n1.proc is not None
    log = n1.proc.output()
    assert "node watch expired" in log and "relisting" in log  # the 410 happened
    # The relist's snapshot went through the diff: n2 was neither re-added nor removed.
    assert _peer_adds(n1, key2) == before
    assert f"peer {key2} removed" not in log
    assert str(n2.pod_cidr) in cluster.routes(n1)
    assert _peer_adds(n1, key3) == adds3
    assert str(n3.pod_cidr) not in cluster.routes(n1)


@pytest.mark.slow
def test_api_server_down_30s(kube_cluster: ClusterFactory) -> None:
    cluster = kube_cluster({"Type": "vxlan"}, hosts=3)
    n1, n2, n3 = cluster.nodes
    cluster.start(n1, wait=False)
    cluster.start(n2, wait=False)
    cluster.wait_ready(n1)
    cluster.wait_ready(n2)
    cluster.add_pods(per_node=1, nodes=[n1, n2])
    assert cluster.mesh_failures() == []
    assert n1.healthz()[0] == 200
    cluster.api.go_down(30.0)
    deadline = time.monotonic() + 25
    unhealthy = ""
    while time.monotonic() < deadline:
        assert n1.host.ns.ping(n2.pods[0].ip, wait=1.0), "traffic stopped during the outage"
        code, body = n1.healthz()
        if code == 503:
            unhealthy = body
        time.sleep(1.0)
    assert "subnet store (kube) has not answered" in unhealthy
    # Back: a new node's route arrives without restarting anything.
    assert wait_until(lambda: n1.healthz()[0] == 200, timeout=30)
    cluster.start(n3)
    assert wait_until(lambda: str(n3.pod_cidr) in cluster.routes(n1), timeout=15)
    assert n1.proc is not None and n1.proc.running()


def _exit_and_errors(node: KubeNode) -> tuple[int, list[str]]:
    assert node.proc is not None
    code = node.proc.wait(timeout=60)
    errors = [line for line in node.proc.output().splitlines() if " ERROR " in line]
    return code, errors


def test_403_on_node_status_is_one_actionable_line(kube_cluster: ClusterFactory) -> None:
    rules = tuple(r for r in FLANNEL_RULES if r["resources"] != ["nodes/status"])
    cluster = kube_cluster({"Type": "host-gw"}, hosts=1, rules=rules)
    node = cluster.nodes[0]
    cluster.start(node, wait=False)
    code, errors = _exit_and_errors(node)
    assert code == 1
    assert len(errors) == 1
    assert '"patch" on resource "nodes/status"' in errors[0]
    assert "ClusterRole" in errors[0]
    assert not node.subnet_file.exists()


def test_empty_pod_cidr_is_actionable(kube_cluster: ClusterFactory) -> None:
    cluster = kube_cluster({"Type": "host-gw"}, hosts=1, create_nodes=False)
    node = cluster.nodes[0]
    cluster.api.create_node(node.name, None)
    cluster.start(node, wait=False)
    code, errors = _exit_and_errors(node)
    assert code == 1
    assert len(errors) == 1
    assert f'node "{node.name}" pod cidr not assigned' in errors[0]
    assert "--allocate-node-cidrs" in errors[0] and "--pod-network-cidr" in errors[0]


def test_node_annotated_by_go_flanneld_is_a_working_peer(kube_cluster: ClusterFactory) -> None:
    """node2 is programmed and annotated the way Go flanneld does it (spec §4.2, §6.1):
    a flannel.1 VXLAN device with its MAC, the peer's route/neighbour/FDB entries. The
    Loden agent on node1 must program the reverse path from the annotations alone."""
    cluster = kube_cluster({"Type": "vxlan"}, hosts=2)
    n1, n2 = cluster.nodes
    mac = "12:c6:65:89:b4:e3"
    cluster.api.annotate_node(
        n2.name,
        {
            P + "backend-data": '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}',
            P + "backend-type": "vxlan",
            P + "kube-subnet-manager": "true",
            P + "public-ip": str(n2.host.ip),
        },
    )
    cluster.start(n1)
    own2 = n2.pod_cidr.network_address
    ns2 = n2.host.ns
    ns2.ip(
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        str(n2.host.ip),
        "dev",
        "eth0",
        "nolearning",
        "dstport",
        "8472",
    )
    ns2.ip("link", "set", "flannel.1", "address", mac)
    ns2.ip("addr", "add", f"{own2}/32", "dev", "flannel.1")
    ns2.ip("link", "set", "flannel.1", "up")
    ann1 = _annotations(cluster, n1)
    mac1 = json.loads(ann1["backend-data"])["VtepMAC"]
    own1 = n1.pod_cidr.network_address
    ns2.ip("neigh", "replace", str(own1), "lladdr", mac1, "dev", "flannel.1", "nud", "permanent")
    ns2.run("bridge", "fdb", "replace", mac1, "dev", "flannel.1", "dst", str(n1.host.ip))
    ns2.ip("route", "replace", str(n1.pod_cidr), "via", str(own1), "dev", "flannel.1", "onlink")
    assert wait_until(lambda: str(n2.pod_cidr) in cluster.routes(n1), timeout=10)
    assert n1.host.ns.ping(own2, wait=1.0) or wait_until(
        lambda: n1.host.ns.ping(own2, wait=1.0), timeout=10
    )
