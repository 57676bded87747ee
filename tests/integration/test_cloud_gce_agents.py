"""gce end to end: three real agents in namespaces, etcd, the Compute Engine double."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.cloud_gce import GceDouble
from tests.fixtures.topology import TopologyFactory, wait_until
from tests.fixtures.vpc_router import apply_route_table
from tests.integration.agent_support import AgentCluster
from tests.integration.test_cloud_aws_agents import healthz


@pytest.fixture
def gce_env(
    make_topology: TopologyFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[GceDouble, AgentCluster]]:
    topo = make_topology(hosts=3)
    assert topo.underlay_address is not None
    double = GceDouble()
    double.start(str(topo.underlay_address.ip), netns=topo.underlay.name)
    monkeypatch.setenv("CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE", double.base)  # inherited
    for i, host in enumerate(topo.hosts):
        double.instances[str(host.ip)] = f"node-{i}"
    cluster = AgentCluster(
        topo, {"Type": "gce"}, extra_args=(f"--cloud-metadata-endpoint={double.url}",)
    )
    try:
        yield double, cluster
    finally:
        cluster.close()
        double.close()


def routes_ok(double: GceDouble, cluster: AgentCluster) -> bool:
    for i, node in enumerate(cluster.nodes):
        name = "flannel-" + str(node.subnet).replace(".", "-").replace("/", "-")
        route = double.routes.get(name)
        if route is None or route["nextHopInstance"] != double.instance_link(f"node-{i}"):
            return False
    return True


def test_three_nodes_restart_stale_lease_and_failures(
    gce_env: tuple[GceDouble, AgentCluster],
) -> None:
    double, cluster = gce_env
    cluster.start_all()
    assert wait_until(lambda: routes_ok(double, cluster), timeout=30), double.routes
    node0, _, node2 = cluster.nodes
    # The "VPC router" forwards by the project's routes: pods reach each other.
    cluster.add_pods()
    first, second = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    assert not first.ns.ping(second.ip, wait=1.0)  # no cloud route on the router yet
    ip_of = {double.instance_link(name): ip for ip, name in double.instances.items()}
    apply_route_table(
        cluster.topo.underlay,
        {r["destRange"]: ip_of[r["nextHopInstance"]] for r in list(double.routes.values())},
    )
    assert cluster.mesh_failures() == []
    assert wait_until(lambda: healthz(node0)[0] == 200, timeout=15), healthz(node0)

    # Restart: the exact route is left alone.
    assert node0.proc is not None
    node0.proc.stop()
    double.calls.clear()
    cluster.start(node0)
    # Two full passes of the restarted agent (only it reads its own route), then no
    # insert or delete at all.
    own = "flannel-" + str(node0.subnet).replace(".", "-").replace("/", "-")
    assert wait_until(
        lambda: sum(1 for k, p in list(double.calls) if k == "get" and p.endswith(own)) >= 2,
        timeout=30,
    ), double.calls
    assert double.mutations() == []

    # A lease deleted: a peer removes its route.
    assert node2.proc is not None
    node2.proc.stop()
    gone = str(node2.subnet)
    name = "flannel-" + gone.replace(".", "-").replace("/", "-")
    cluster.topo.underlay.out(
        "etcdctl",
        f"--endpoints={cluster.etcd.client_url}",
        "del",
        f"/coreos.com/network/subnets/{gone.replace('/', '-')}",
    )
    assert wait_until(lambda: name not in double.routes, timeout=20)

    # The API fails, then a permission is missing: /healthz says why; recovery.
    double.faults["*"] = 503
    assert wait_until(lambda: healthz(node0)[0] == 503, timeout=40), healthz(node0)
    assert "HTTP 503" in healthz(node0)[1]
    double.faults = {"list": 403}
    assert wait_until(lambda: "compute.routes.list" in healthz(node0)[1], timeout=60)
    double.faults = {}
    assert wait_until(lambda: healthz(node0)[0] == 200, timeout=60), healthz(node0)
