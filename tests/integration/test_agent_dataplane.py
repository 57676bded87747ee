"""Issue 3 end to end: real agents, real etcd, real kernel; pods reach each other."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.topology import Topology, TopologyFactory, wait_until
from tests.integration.agent_support import AgentCluster

pytestmark = pytest.mark.root

ClusterFactory = Callable[..., AgentCluster]


@pytest.fixture
def agent_cluster(make_topology: TopologyFactory) -> Iterator[ClusterFactory]:
    made: list[AgentCluster] = []

    def factory(backend: dict[str, object], *, hosts: int = 3, **kwargs: object) -> AgentCluster:
        topo: Topology = make_topology(hosts=hosts)
        cluster = AgentCluster(topo, backend, **kwargs)  # type: ignore[arg-type]
        made.append(cluster)
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            cluster.close()


BACKENDS = {
    "vxlan": {"Type": "vxlan"},
    "vxlan-directrouting": {"Type": "vxlan", "DirectRouting": True},
    "host-gw": {"Type": "host-gw"},
}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_full_mesh_and_kernel_state(agent_cluster: ClusterFactory, name: str) -> None:
    cluster = agent_cluster(BACKENDS[name])
    cluster.start_all()
    cluster.add_pods(per_node=2)
    assert cluster.mesh_failures() == []
    subnets = {node.host.name: node.subnet for node in cluster.nodes}
    assert len(set(subnets.values())) == 3
    for node in cluster.nodes:
        routes = node.host.ns.ip("route", "show").stdout
        for other in cluster.nodes:
            if other is node:
                continue
            peer = other.subnet
            if name == "vxlan":
                assert re.search(
                    rf"^{peer} via {peer.network_address} dev flannel\.1 "
                    r"proto 76 onlink",
                    routes,
                    re.M,
                ), routes
            else:
                assert re.search(rf"^{peer} via {other.host.ip} dev eth0 proto 76", routes, re.M), (
                    routes
                )
        if name == "vxlan":
            neigh = node.host.ns.ip("neigh", "show", "dev", "flannel.1").stdout
            fdb = node.host.ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
            assert len([ln for ln in neigh.splitlines() if "PERMANENT" in ln]) == 2
            assert len([ln for ln in fdb.splitlines() if "dst" in ln]) == 2
        nat = node.host.ns.out("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG")
        assert f"-A FLANNEL-POSTRTG -s {node.subnet} -d {cluster.network}" in nat


def test_repairs_within_one_resync(agent_cluster: ClusterFactory) -> None:
    cluster = agent_cluster(BACKENDS["vxlan"])
    cluster.start_all()
    cluster.add_pods()
    a, b = cluster.nodes[0], cluster.nodes[1]
    ns = a.host.ns
    peer = b.subnet
    assert cluster.mesh_failures() == []

    def route_ok() -> bool:
        return f"{peer} via" in ns.ip("route", "show", str(peer)).stdout

    ns.ip("route", "del", str(peer))
    assert wait_until(route_ok, timeout=5)
    ns.ip("neigh", "del", str(peer.network_address), "dev", "flannel.1")
    assert wait_until(
        lambda: (
            "PERMANENT"
            in ns.ip("neigh", "show", str(peer.network_address), "dev", "flannel.1").stdout
        ),
        timeout=5,
    )
    mac = json.loads(cluster.loden("leases", "-json"))
    assert len(mac) == 3
    ns.ip("link", "del", "flannel.1")
    assert wait_until(route_ok, timeout=8)
    assert cluster.mesh_failures() == []
    # Rules: a flushed chain comes back within --iptables-resync (1 s here).
    ns.run("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    assert wait_until(
        lambda: "MASQUERADE" in ns.out("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG"), timeout=5
    )


def test_kill9_restart_keeps_subnet_mac_and_traffic(agent_cluster: ClusterFactory) -> None:
    cluster = agent_cluster(BACKENDS["vxlan"])
    cluster.start_all()
    cluster.add_pods()
    a, b = cluster.nodes[0], cluster.nodes[1]
    subnet = a.subnet
    mac = a.host.ns.out("cat", "/sys/class/net/flannel.1/address").strip()
    assert cluster.mesh_failures() == []
    ping = subprocess.Popen(
        a.pods[0].ns.argv(["ping", "-n", "-q", "-i", "0.1", "-c", "60", str(b.pods[0].ip)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        assert a.proc is not None
        a.proc.signal(signal.SIGKILL)
        a.proc.wait(5)
        cluster.start(a)
        out, _ = ping.communicate(timeout=30)
    finally:
        if ping.poll() is None:
            ping.kill()
    assert " 0% packet loss" in out, out
    assert a.subnet == subnet
    assert a.host.ns.out("cat", "/sys/class/net/flannel.1/address").strip() == mac


def test_deleted_lease_removes_exactly_that_nodes_entries(agent_cluster: ClusterFactory) -> None:
    cluster = agent_cluster(BACKENDS["host-gw"])
    cluster.start_all()
    gone, stay, observer = cluster.nodes
    gone_subnet = gone.subnet
    assert gone.proc is not None
    assert gone.proc.stop() == 0  # SIGTERM: clean exit, lease kept (flannel semantics)
    ns = observer.host.ns
    assert str(gone_subnet) in ns.ip("route", "show").stdout
    key = f"{gone_subnet.network_address}-{gone_subnet.prefixlen}"
    cluster.loden("leases", f"-delete={key}")
    assert wait_until(lambda: str(gone_subnet) not in ns.ip("route", "show").stdout, timeout=5)
    assert str(stay.subnet) in ns.ip("route", "show").stdout


def test_seed_flow_over_the_v2_api(agent_cluster: ClusterFactory) -> None:
    cluster = agent_cluster({"Type": "host-gw"}, api="v2", hosts=2, network="172.17.0.0/16")
    cluster.start_all()
    keys = cluster.etcdctl2("ls", "/coreos.com/network/subnets").split()
    assert len(keys) == 2 and all(
        re.fullmatch(r"/coreos.com/network/subnets/172\.17\.\d+\.0-24", k) for k in keys
    )
    values = {cluster.etcdctl2("get", k).strip() for k in keys}
    assert values == {
        f'{{"PublicIP":"{n.host.ip}","BackendType":"host-gw"}}' for n in cluster.nodes
    }
    cluster.add_pods()
    assert cluster.mesh_failures() == []
