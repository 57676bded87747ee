"""Issue 10 §1 end to end: real agents never share a VTEP MAC.

The failure this guards against: several agents on one filesystem (hosts cloned from
one image after the agent ran once, or several agents on one machine) all advertised
the MAC that whichever agent wrote last stored in ``<state-dir>/flannel.1.mac``; peers
then held one MAC for several nodes and cross-node traffic was blackholed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures.topology import Topology, TopologyFactory, wait_until
from tests.integration.agent_support import AgentCluster, AgentNode

pytestmark = pytest.mark.root

ClusterFactory = Callable[..., AgentCluster]


@pytest.fixture
def agent_cluster(make_topology: TopologyFactory) -> Iterator[ClusterFactory]:
    made: list[AgentCluster] = []

    def factory(*, hosts: int = 3) -> AgentCluster:
        topo: Topology = make_topology(hosts=hosts)
        cluster = AgentCluster(topo, {"Type": "vxlan"})
        made.append(cluster)
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            cluster.close()


def share_state_dir(cluster: AgentCluster) -> Path:
    """Point every agent at one state directory (as on one shared filesystem)."""
    shared = cluster.topo.hosts[0].ns.workdir / "shared-state"
    for node in cluster.nodes:
        node.args = [a for a in node.args if not a.startswith("--state-dir=")]
        node.args.append(f"--state-dir={shared}")
    return shared


def state_dir(node: AgentNode) -> Path:
    arg = next(a for a in node.args if a.startswith("--state-dir="))
    return Path(arg.split("=", 1)[1])


def device_mac(node: AgentNode) -> str:
    return node.host.ns.out("cat", "/sys/class/net/flannel.1/address").strip()


def lease_macs(cluster: AgentCluster) -> dict[str, str]:
    """Public IP -> advertised VtepMAC, from the store."""
    leases = json.loads(cluster.loden("leases", "-json"))
    return {lease["public_ip"]: lease["detail"] for lease in leases}


@pytest.mark.parametrize("order", ["one after the other", "all at once"])
def test_agents_sharing_one_state_dir_get_distinct_macs(
    agent_cluster: ClusterFactory, order: str
) -> None:
    cluster = agent_cluster()
    shared = share_state_dir(cluster)
    if order == "all at once":
        cluster.start_all()
    else:  # deterministic: each agent finds the previous one's file
        for node in cluster.nodes:
            cluster.start(node)
    macs = [device_mac(node) for node in cluster.nodes]
    assert len(set(macs)) == 3, macs
    by_ip = {str(n.host.ip): m for n, m in zip(cluster.nodes, macs, strict=True)}
    assert lease_macs(cluster) == by_ip
    # The shared file names the node it belongs to (whichever wrote last).
    stored = json.loads((shared / "flannel.1.mac").read_text())
    assert stored["VNI"] == 1 and by_ip[stored["PublicIP"]] == stored["VtepMAC"]
    cluster.add_pods()
    assert cluster.mesh_failures() == []


def test_state_dir_copied_from_another_node_yields_a_distinct_mac(
    agent_cluster: ClusterFactory,
) -> None:
    cluster = agent_cluster(hosts=2)
    a, b = cluster.nodes
    cluster.start(a)
    shutil.copytree(state_dir(a), state_dir(b))
    cluster.start(b)
    assert device_mac(a) != device_mac(b)
    assert json.loads((state_dir(b) / "flannel.1.mac").read_text())["PublicIP"] == str(b.host.ip)
    cluster.add_pods()
    assert cluster.mesh_failures() == []


def test_kill9_restart_with_a_shared_state_dir_keeps_mac_subnet_and_traffic(
    agent_cluster: ClusterFactory,
) -> None:
    cluster = agent_cluster()
    share_state_dir(cluster)
    for node in cluster.nodes:
        cluster.start(node)
    cluster.add_pods()
    assert cluster.mesh_failures() == []
    a, b = cluster.nodes[0], cluster.nodes[1]  # a's MAC is no longer in the shared file
    subnet, mac = a.subnet, device_mac(a)
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
    assert device_mac(a) == mac
    assert lease_macs(cluster)[str(a.host.ip)] == mac
    assert cluster.mesh_failures() == []


def test_peer_lease_with_our_mac_is_reported_on_healthz(agent_cluster: ClusterFactory) -> None:
    cluster = agent_cluster(hosts=2)
    cluster.start_all()
    a = cluster.nodes[0]
    ns = a.host.ns
    key = f"/coreos.com/network/subnets/{cluster.network.network_address + 250 * 256}-24"
    value = json.dumps(
        {
            "PublicIP": "192.0.2.99",
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": device_mac(a)},
        }
    )

    def healthz() -> tuple[int, str]:
        out = ns.run("python3", "-c", HTTP.format(url=f"http://{a.host.ip}:8471/healthz"))
        status, _, body = out.stdout.partition("\n")
        return int(status or 0), body

    def metric() -> str:
        out = ns.run("python3", "-c", HTTP.format(url=f"http://{a.host.ip}:8471/metrics"))
        return next(
            (ln for ln in out.stdout.splitlines() if ln.startswith("loden_identity_conflicts ")),
            "",
        )

    assert healthz()[0] == 200
    etcdctl(cluster, "put", key, value)
    assert wait_until(lambda: healthz()[0] == 503, timeout=10)
    assert "advertises VtepMAC" in healthz()[1] and "192.0.2.99" in healthz()[1]
    assert metric() == "loden_identity_conflicts 1.0"
    neigh = ns.ip("neigh", "show", "dev", "flannel.1").stdout
    assert str(cluster.network.network_address + 250 * 256) not in neigh
    etcdctl(cluster, "del", key)
    assert wait_until(lambda: healthz()[0] == 200, timeout=10)
    assert metric() == "loden_identity_conflicts 0.0"


HTTP = (
    "import urllib.request,urllib.error\n"
    "try:\n r=urllib.request.urlopen('{url}',timeout=3)\n"
    " print(r.status);print(r.read().decode())\n"
    "except urllib.error.HTTPError as e:\n print(e.code);print(e.read().decode())\n"
)


def etcdctl(cluster: AgentCluster, *args: str) -> None:
    cluster.topo.underlay.run(
        "env", "ETCDCTL_API=3", "etcdctl", f"--endpoints={cluster.etcd.client_url}", *args
    )
