"""Issue 14 end to end: a real agent repairs hand-made drift from kernel notifications.

The agents run with ``--resync-period=300``, so within the few seconds these tests wait
only the notification path can bring an entry back; ``/metrics`` must say so
(``loden_kernel_repairs_total``). With ``--kernel-events=false`` nothing comes back
before the full pass: the flag really selects the old behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.topology import Host, TopologyFactory, wait_until
from tests.integration.agent_support import AgentCluster, AgentNode

pytestmark = pytest.mark.root

ClusterFactory = Callable[..., AgentCluster]


@pytest.fixture
def agent_cluster(make_topology: TopologyFactory) -> Iterator[ClusterFactory]:
    made: list[AgentCluster] = []

    def factory(*extra_args: str) -> AgentCluster:
        cluster = AgentCluster(make_topology(hosts=2), {"Type": "vxlan"}, extra_args=extra_args)
        made.append(cluster)
        cluster.start_all()
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            cluster.close()


def metric(host: Host, name: str) -> float:
    out = host.ns.run(
        "python3",
        "-c",
        f"import urllib.request; print(urllib.request.urlopen("
        f"'http://{host.ip}:8471/metrics', timeout=3).read().decode())",
    ).stdout
    found = re.search(rf"^{name} (\S+)$", out, re.M)
    assert found is not None, out[-2000:]
    return float(found.group(1))


def entries(node: AgentNode, peer: AgentNode) -> Callable[[], tuple[bool, bool, bool]]:
    ns, subnet = node.host.ns, peer.subnet
    gw = subnet.network_address

    def present() -> tuple[bool, bool, bool]:
        route = ns.ip("route", "show", "exact", str(subnet), "proto", "76").stdout
        neigh = ns.ip("neigh", "show", str(gw), "dev", "flannel.1", "nud", "permanent").stdout
        fdb = ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
        return (
            f"via {gw} dev flannel.1" in route,
            "lladdr" in neigh,
            f"dst {peer.host.ip} self permanent" in fdb,
        )

    return present


def break_all(node: AgentNode, peer: AgentNode) -> None:
    ns, subnet = node.host.ns, peer.subnet
    fdb = ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
    mac = next(ln.split()[0] for ln in fdb.splitlines() if f"dst {peer.host.ip} " in ln)
    ns.ip("route", "del", str(subnet))
    ns.ip("neigh", "del", str(subnet.network_address), "dev", "flannel.1")
    ns.run("bridge", "fdb", "del", mac, "dev", "flannel.1", "dst", str(peer.host.ip))


def test_agent_repairs_deleted_entries_by_notification(agent_cluster: ClusterFactory) -> None:
    cluster = agent_cluster("--resync-period=300")
    a, b = cluster.nodes
    present = entries(a, b)
    assert wait_until(lambda: present() == (True, True, True), timeout=10)
    resyncs = metric(a.host, "loden_reconcile_duration_seconds_count")
    break_all(a, b)
    assert wait_until(lambda: present() == (True, True, True), timeout=5)
    assert metric(a.host, "loden_kernel_repairs_total") >= 3
    # Repaired entry by entry: no full pass ran for it.
    assert metric(a.host, "loden_reconcile_duration_seconds_count") == resyncs
    cluster.add_pods()
    assert cluster.mesh_failures() == []


def test_kernel_events_off_is_the_old_loop(agent_cluster: ClusterFactory) -> None:
    cluster = agent_cluster("--resync-period=300", "--kernel-events=false")
    a, b = cluster.nodes
    present = entries(a, b)
    assert wait_until(lambda: present() == (True, True, True), timeout=10)
    break_all(a, b)
    assert not wait_until(lambda: any(present()), timeout=3)
    assert metric(a.host, "loden_kernel_repairs_total") == 0
