"""aws-vpc backend against emulated EC2 (moto + front door), driven in-process.

Each test launches instances in moto, builds the backend for one of them (the front's
IMDS answers with that instance) and runs reconcile passes as the agent would.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from loden.backend import create_backend
from loden.backend.aws_vpc import route_tag
from loden.backend.base import BackendContext, ExternalInterface, Network
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from loden.settings import BackendSettings
from tests.fixtures.cloud_aws import AwsCloud, AwsFront

NETWORK = "10.20.0.0/16"
MUTATIONS = {"CreateRoute", "DeleteRoute", "ReplaceRoute"}


def subnet(i: int) -> IPv4Network:
    return IPv4Network(f"10.20.{i}.0/24")


async def start(
    front: AwsFront,
    instance: str,
    ip: str,
    sub: IPv4Network,
    backend: str = '{"Type":"aws-vpc"}',
    network: str = NETWORK,
) -> Network:
    front.default_instance = instance
    cfg = NetworkConfig.parse(f'{{"Network":"{network}","Backend":{backend}}}')
    ext = ExternalInterface("eth0", 2, 9001, IPv4Address(ip), IPv4Address(ip))
    ctx = BackendContext(
        cfg, ext, Path("/nonexistent"), BackendSettings(cloud_metadata_endpoint=front.url)
    )
    be = create_backend("aws-vpc", ctx)
    attrs = await be.lease_attrs()
    assert attrs.to_json(legacy=True) == f'{{"PublicIP":"{ip}"}}'
    return await be.activate(Lease(sub, attrs))


def lease(sub: IPv4Network, ip: str) -> Lease:
    return Lease(sub, LeaseAttrs(public_ip=IPv4Address(ip)))


def peers(*leases: Lease) -> Mapping[str, Lease]:
    return {item.key: item for item in leases}


@pytest.fixture
def front(aws_cloud: AwsCloud, monkeypatch: pytest.MonkeyPatch) -> AwsFront:
    front = aws_cloud.front()
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.url)
    return front


async def test_route_written_eni_found_source_dest_off(
    aws_cloud: AwsCloud, front: AwsFront
) -> None:
    vpc, sub_id, table = aws_cloud.vpc()
    inst, eni = aws_cloud.instance(sub_id, "10.0.0.11")
    net = await start(front, inst, "10.0.0.11", subnet(5))
    report = await net.reconcile({})
    assert not report.errors, report.errors
    routes = aws_cloud.routes(table)
    assert routes["10.20.5.0/24"]["NetworkInterfaceId"] == eni
    assert aws_cloud.tags(table)[route_tag("10.20.5.0/24")] == NETWORK
    attr = aws_cloud.ec2.describe_network_interface_attribute(
        NetworkInterfaceId=eni, Attribute="sourceDestCheck"
    )
    assert attr["SourceDestCheck"]["Value"] is False
    # IMDSv2: a token was taken and sent with every metadata GET.
    gets = [r for r in front.imds_requests if r[0] == "GET"]
    assert gets and all(token for _, _, token in gets)
    assert net.mtu == 9001


async def test_imds_v1_fallback(aws_cloud: AwsCloud, front: AwsFront) -> None:
    _, sub_id, table = aws_cloud.vpc()
    inst, eni = aws_cloud.instance(sub_id, "10.0.0.12")
    front.imds_v2 = False
    net = await start(front, inst, "10.0.0.12", subnet(6))
    assert not (await net.reconcile({})).errors
    assert aws_cloud.routes(table)["10.20.6.0/24"]["NetworkInterfaceId"] == eni
    gets = [r for r in front.imds_requests if r[0] == "GET"]
    assert gets and not any(token for _, _, token in gets)


async def test_restart_leaves_correct_route_alone(aws_cloud: AwsCloud, front: AwsFront) -> None:
    _, sub_id, table = aws_cloud.vpc()
    inst, _ = aws_cloud.instance(sub_id, "10.0.0.11")
    net = await start(front, inst, "10.0.0.11", subnet(5))
    assert not (await net.reconcile({})).errors
    assert "CreateRoute" in front.actions()
    front.calls.clear()
    again = await start(front, inst, "10.0.0.11", subnet(5))  # a restarted agent
    report = await again.reconcile({})
    assert not report.errors and report.added == 0
    assert not MUTATIONS & set(front.actions()), front.actions()


async def test_foreign_route_replaced_and_logged(
    aws_cloud: AwsCloud, front: AwsFront, caplog: pytest.LogCaptureFixture
) -> None:
    _, sub_id, table = aws_cloud.vpc()
    inst, eni = aws_cloud.instance(sub_id, "10.0.0.11")
    _, other_eni = aws_cloud.instance(sub_id, "10.0.0.99")
    aws_cloud.ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.20.5.0/24", NetworkInterfaceId=other_eni
    )
    net = await start(front, inst, "10.0.0.11", subnet(5))
    report = await net.reconcile({})
    assert not report.errors
    assert aws_cloud.routes(table)["10.20.5.0/24"]["NetworkInterfaceId"] == eni
    assert "DeleteRoute" not in front.actions()  # replaced in one call: no window
    assert "ReplaceRoute" in front.actions()
    assert any(
        other_eni in r.getMessage() and "replacing" in r.getMessage() for r in caplog.records
    )


async def test_stale_owned_route_removed_foreign_survive(
    aws_cloud: AwsCloud, front: AwsFront
) -> None:
    _, sub_id, table = aws_cloud.vpc()
    a, _ = aws_cloud.instance(sub_id, "10.0.0.11")
    b, eni_b = aws_cloud.instance(sub_id, "10.0.0.12")
    _, eni_x = aws_cloud.instance(sub_id, "10.0.0.13")
    lease_b = lease(subnet(6), "10.0.0.12")
    node_b = await start(front, b, "10.0.0.12", subnet(6))
    assert not (await node_b.reconcile({})).errors
    # Another cluster's route in the same table (other Network, and one inside ours
    # without our tag): neither may be touched.
    aws_cloud.ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.30.1.0/24", NetworkInterfaceId=eni_x
    )
    aws_cloud.ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.20.77.0/24", NetworkInterfaceId=eni_x
    )
    node_a = await start(front, a, "10.0.0.11", subnet(5))
    assert not (await node_a.reconcile(peers(lease_b))).errors
    assert aws_cloud.routes(table)["10.20.6.0/24"]["NetworkInterfaceId"] == eni_b
    # b's lease is deleted: a removes b's route (the event path), keeps the others.
    report = await node_a.apply([LeaseEvent(EventKind.REMOVED, lease_b)])
    assert not report.errors and report.removed == 1
    routes = aws_cloud.routes(table)
    assert "10.20.6.0/24" not in routes
    assert {"10.20.5.0/24", "10.30.1.0/24", "10.20.77.0/24"} <= set(routes)
    assert route_tag("10.20.6.0/24") not in aws_cloud.tags(table)


async def test_blackhole_inside_network_removed(aws_cloud: AwsCloud, front: AwsFront) -> None:
    _, sub_id, table = aws_cloud.vpc()
    a, _ = aws_cloud.instance(sub_id, "10.0.0.11")
    dead, eni_dead = aws_cloud.instance(sub_id, "10.0.0.14")
    aws_cloud.ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.20.9.0/24", NetworkInterfaceId=eni_dead
    )
    aws_cloud.ec2.create_route(
        RouteTableId=table, DestinationCidrBlock="10.31.9.0/24", NetworkInterfaceId=eni_dead
    )
    aws_cloud.ec2.terminate_instances(InstanceIds=[dead])
    assert aws_cloud.routes(table)["10.20.9.0/24"]["State"] == "blackhole"
    node = await start(front, a, "10.0.0.11", subnet(5))
    assert not (await node.reconcile({})).errors
    routes = aws_cloud.routes(table)
    assert "10.20.9.0/24" not in routes  # inside Network: flannel's sweep
    assert "10.31.9.0/24" in routes  # outside: not ours to judge


async def test_route_table_list_and_main_table_fallback(
    aws_cloud: AwsCloud, front: AwsFront
) -> None:
    vpc = aws_cloud.ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    sub_id = aws_cloud.ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.0.0/24")["Subnet"]["SubnetId"]
    inst, eni = aws_cloud.instance(sub_id, "10.1.0.11")
    main = aws_cloud.ec2.describe_route_tables(
        Filters=[
            {"Name": "vpc-id", "Values": [vpc]},
            {"Name": "association.main", "Values": ["true"]},
        ]
    )["RouteTables"][0]["RouteTableId"]
    net = await start(front, inst, "10.1.0.11", subnet(5))
    assert not (await net.reconcile({})).errors
    assert aws_cloud.routes(main)["10.20.5.0/24"]["NetworkInterfaceId"] == eni
    t1 = aws_cloud.ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    t2 = aws_cloud.ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    net = await start(
        front, inst, "10.1.0.11", subnet(5), f'{{"Type":"aws-vpc","RouteTableID":["{t1}","{t2}"]}}'
    )
    assert not (await net.reconcile({})).errors
    assert aws_cloud.routes(t1)["10.20.5.0/24"]["NetworkInterfaceId"] == eni
    assert aws_cloud.routes(t2)["10.20.5.0/24"]["NetworkInterfaceId"] == eni


async def test_api_failures_retried_reported_and_recovered(
    aws_cloud: AwsCloud, front: AwsFront
) -> None:
    _, sub_id, table = aws_cloud.vpc()
    inst, eni = aws_cloud.instance(sub_id, "10.0.0.11")
    net = await start(front, inst, "10.0.0.11", subnet(5))
    front.fail("CreateRoute", 503, "RequestLimitExceeded", "Request limit exceeded.")
    report = await net.reconcile({})
    assert report.errors and "RequestLimitExceeded" in report.errors[0]
    # botocore retried the throttled call before giving up.
    assert front.actions().count("CreateRoute") >= 2
    # Within the backoff the pass is not retried but still reported.
    report = await net.reconcile({})
    assert report.errors and "next attempt in" in report.errors[0]
    front.clear_faults()
    front.fail("DescribeRouteTables", 500, "InternalError", "An internal error has occurred")
    net._retry_at = 0  # type: ignore[attr-defined]  # skip the wait in this test
    report = await net.reconcile({})
    assert report.errors and "InternalError" in report.errors[0]
    front.clear_faults()
    net._retry_at = 0  # type: ignore[attr-defined]
    report = await net.reconcile({})
    assert not report.errors
    assert aws_cloud.routes(table)["10.20.5.0/24"]["NetworkInterfaceId"] == eni


async def test_missing_permission_named(aws_cloud: AwsCloud, front: AwsFront) -> None:
    _, sub_id, _ = aws_cloud.vpc()
    inst, _ = aws_cloud.instance(sub_id, "10.0.0.11")
    net = await start(front, inst, "10.0.0.11", subnet(5))
    front.fail(
        "DescribeInstances",
        403,
        "UnauthorizedOperation",
        "You are not authorized to perform this operation.",
    )
    report = await net.reconcile({})
    assert report.errors
    error = report.errors[0]
    assert "ec2:DescribeInstances" in error and f"instance {inst}" in error
    assert "IAM policy" in error
