"""aws-vpc end to end: three real agents in namespaces, etcd, emulated EC2 (moto).

The front door (IMDS + EC2 proxy with a call log and fault injection) listens inside the
underlay namespace; each agent's metadata answers with the instance launched for its
address, as a real IMDS does.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from loden.kernel.netns import call_in_netns
from tests.fixtures.cloud_aws import AwsCloud, AwsFront
from tests.fixtures.topology import Topology, TopologyFactory, wait_until
from tests.fixtures.vpc_router import apply_route_table
from tests.integration.agent_support import AgentCluster, AgentNode

MUTATIONS = {"CreateRoute", "DeleteRoute", "ReplaceRoute"}


def healthz(node: AgentNode) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{node.host.ip}:8471/healthz", timeout=3) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    return call_in_netns(node.host.ns.name, get)


class Env:
    def __init__(self, cloud: AwsCloud, topo: Topology, front: AwsFront, table: str) -> None:
        self.cloud, self.topo, self.front, self.table = cloud, topo, front, table
        self.enis: dict[str, str] = {}


@pytest.fixture
def aws_env(
    aws_cloud: AwsCloud, make_topology: TopologyFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Env, AgentCluster]]:
    topo = make_topology(hosts=3)
    assert topo.underlay_address is not None
    front = aws_cloud.front(str(topo.underlay_address.ip), netns=topo.underlay.name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.url)  # the agents inherit it
    cidr = str(topo.network)
    vpc = aws_cloud.ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    sub = aws_cloud.ec2.create_subnet(VpcId=vpc, CidrBlock=cidr)["Subnet"]["SubnetId"]
    table = aws_cloud.ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    aws_cloud.ec2.associate_route_table(RouteTableId=table, SubnetId=sub)
    env = Env(aws_cloud, topo, front, table)
    for host in topo.hosts:
        inst, eni = aws_cloud.instance(sub, str(host.ip))
        front.instances[str(host.ip)] = inst
        env.enis[str(host.ip)] = eni
    cluster = AgentCluster(
        topo,
        {"Type": "aws-vpc"},  # the table is auto-detected from the subnet's association
        extra_args=(f"--cloud-metadata-endpoint={front.url}",),
    )
    try:
        yield env, cluster
    finally:
        cluster.close()


def routes_ok(env: Env, cluster: AgentCluster) -> bool:
    routes = env.cloud.routes(env.table)
    return all(
        routes.get(str(node.subnet), {}).get("NetworkInterfaceId") == env.enis[str(node.host.ip)]
        for node in cluster.nodes
    )


def test_three_nodes_restart_stale_lease_and_failures(
    aws_env: tuple[Env, AgentCluster],
) -> None:
    env, cluster = aws_env
    cluster.start_all()
    assert wait_until(lambda: routes_ok(env, cluster), timeout=30), env.cloud.routes(env.table)
    node0, _, node2 = cluster.nodes
    # The "VPC router" forwards by the table: pods on every node reach each other.
    cluster.add_pods()
    first, second = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    assert not first.ns.ping(second.ip, wait=1.0)  # no cloud route on the router yet
    ip_of_eni = {eni: ip for ip, eni in env.enis.items()}
    table = env.cloud.routes(env.table)
    apply_route_table(
        cluster.topo.underlay,
        {
            cidr: ip_of_eni[r["NetworkInterfaceId"]]
            for cidr, r in table.items()
            if r.get("NetworkInterfaceId") in ip_of_eni
        },
    )
    assert cluster.mesh_failures() == []
    # The lease is flannel's (etcd v3 era): PublicIP only, no BackendType.
    key = f"/coreos.com/network/subnets/{str(node0.subnet).replace('/', '-')}"
    value = cluster.topo.underlay.out(
        "etcdctl", f"--endpoints={cluster.etcd.client_url}", "get", "--print-value-only", key
    ).strip()
    assert json.loads(value) == {"PublicIP": str(node0.host.ip), "PublicIPv6": None}
    assert wait_until(lambda: healthz(node0)[0] == 200, timeout=15), healthz(node0)

    # Restart: the correct route is left alone (no delete/create pair in the call log).
    assert node0.proc is not None
    node0.proc.stop()
    env.front.calls.clear()
    cluster.start(node0)
    # Two full passes of the restarted agent over the table (its per-table describe),
    # then the call log holds no route mutation at all.
    ip0 = str(node0.host.ip)

    def table_passes() -> int:
        return sum(
            1
            for c in list(env.front.calls)
            if c.client == ip0
            and c.action == "DescribeRouteTables"
            and "RouteTableId.1" in c.params
        )

    assert wait_until(lambda: table_passes() >= 2, timeout=30), env.front.actions()
    assert not MUTATIONS & set(env.front.actions()), env.front.actions()

    # Another cluster's routes in the same table (another Network; and one inside ours
    # that Loden did not write): never touched.
    foreign_eni = next(iter(env.enis.values()))
    inside = str(cluster.network.network_address + 250 * 256) + "/24"
    for cidr in ("10.255.1.0/24", inside):
        env.cloud.ec2.create_route(
            RouteTableId=env.table, DestinationCidrBlock=cidr, NetworkInterfaceId=foreign_eni
        )

    # A node's lease is deleted (its agent gone): a peer removes its route.
    assert node2.proc is not None
    node2.proc.stop()
    gone = str(node2.subnet)
    cluster.topo.underlay.out(
        "etcdctl",
        f"--endpoints={cluster.etcd.client_url}",
        "del",
        f"/coreos.com/network/subnets/{gone.replace('/', '-')}",
    )
    assert wait_until(lambda: gone not in env.cloud.routes(env.table), timeout=20)
    assert {"10.255.1.0/24", inside} <= set(env.cloud.routes(env.table))

    # The API fails: /healthz says why; recovery without a restart.
    env.front.fail("*", 500, "InternalError", "An internal error has occurred")
    assert wait_until(lambda: healthz(node0)[0] == 503, timeout=40), healthz(node0)
    assert "InternalError" in healthz(node0)[1]
    # A permission missing: the error names the IAM action and the resource.
    env.front.clear_faults()
    env.front.fail("DescribeRouteTables", 403, "UnauthorizedOperation", "not authorized")
    assert wait_until(lambda: "ec2:DescribeRouteTables" in healthz(node0)[1], timeout=60), healthz(
        node0
    )
    assert f"route table {env.table}" in healthz(node0)[1]  # identity is cached
    env.front.clear_faults()
    assert wait_until(lambda: healthz(node0)[0] == 200, timeout=60), healthz(node0)
    assert node0.proc is not None and node0.proc.running()
