"""host-gw backend on three real hosts (namespaces) with pods."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network

import pytest

from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from tests.fixtures.topology import TopologyFactory
from tests.integration.dataplane_support import Cluster, full_mesh, lines

pytestmark = pytest.mark.root

ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(make_topology: TopologyFactory) -> AsyncIterator[ClusterFactory]:
    made: list[Cluster] = []

    async def factory(hosts: int = 3) -> Cluster:
        cluster = Cluster(make_topology(hosts), "host-gw")
        made.append(cluster)
        await cluster.start()
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            await cluster.close()


def loden_routes(cluster: Cluster, i: int) -> set[str]:
    out = lines(cluster.nodes[i].host.ns.ip("-N", "-4", "route").stdout)
    return {r for r in out if "proto 76" in r}


def expected(cluster: Cluster, i: int) -> set[str]:
    return {
        f"{p.subnet} via {p.host.ip} dev eth0 proto 76"
        for j, p in enumerate(cluster.nodes)
        if j != i
    }


async def test_hostgw_full_mesh_and_routes(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    assert full_mesh(cluster) == []
    for i, node in enumerate(cluster.nodes):
        assert loden_routes(cluster, i) == expected(cluster, i)
        assert node.network.mtu == 1500
        assert node.host.ns.ip("link", "show", "flannel.1", check=False).returncode != 0


async def test_hostgw_repair_stale_and_foreign(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    ns = n0.host.ns
    ns.ip("route", "del", str(n1.subnet))
    assert not n0.pods[0].ns.ping(n1.pods[0].ip, wait=0.5)
    report = await cluster.reconcile(0)
    assert (report.added, report.removed, report.errors) == (1, 0, ()), report
    assert n0.pods[0].ns.ping(n1.pods[0].ip, wait=2)
    net = cluster.network
    stale = IPv4Network((int(net.network_address) + (200 << 8), 24))
    foreign = IPv4Network((int(net.network_address) + (201 << 8), 24))
    ns.ip("route", "add", str(stale), "via", str(n1.host.ip), "proto", "76")
    ns.ip("route", "add", str(foreign), "via", str(n1.host.ip), "proto", "static")
    # A gateway changed by hand is put back.
    ns.ip("route", "replace", str(n1.subnet), "via", str(cluster.nodes[2].host.ip), "proto", "76")
    report = await cluster.reconcile(0)
    assert (report.added, report.removed) == (1, 1), report
    assert loden_routes(cluster, 0) == expected(cluster, 0)
    assert f"{foreign} via {n1.host.ip} dev eth0 proto 4" in lines(ns.ip("-N", "route").stdout)
    assert full_mesh(cluster) == []


async def test_hostgw_non_adjacent_peer_is_reported(
    make_cluster: ClusterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await make_cluster(hosts=2)
    far_subnet = IPv4Network((int(cluster.network.network_address) + (150 << 8), 24))
    far = Lease(far_subnet, LeaseAttrs(IPv4Address("192.0.2.77"), "host-gw"))
    with caplog.at_level(logging.WARNING):
        report = await cluster.reconcile(0, {far.key: far})
        again = await cluster.reconcile(0, {far.key: far})
    assert len(report.skipped) == 1 and not report.errors  # a bad peer is no node failure
    message = report.skipped[0]
    assert str(far_subnet) in message and "192.0.2.77" in message
    assert "host-gw needs layer-2 adjacency; use vxlan with DirectRouting" in message
    assert again.skipped == report.skipped
    warnings = [r for r in caplog.records if "layer-2 adjacency" in r.getMessage()]
    assert len(warnings) == 1  # logged once, reported every time
    assert loden_routes(cluster, 0) == expected(cluster, 0)
    # The adjacent peer is unaffected.
    assert cluster.nodes[0].pods[0].ns.ping(cluster.nodes[1].pods[0].ip, wait=2)


async def test_hostgw_restart_and_apply(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    n0, n1, n2 = cluster.nodes
    ping = n0.pods[0].ns.spawn("ping", "-n", "-i", "0.1", "-c", "30", "-W", "1", str(n1.pods[0].ip))
    await asyncio.sleep(0.5)
    n0 = await cluster.restart(0)
    report = await cluster.reconcile(0)
    assert report.added == report.removed == 0 and not report.errors, report
    assert ping.wait(10) == 0 and " 0% packet loss" in ping.output(), ping.output()
    report = await n0.network.apply([LeaseEvent(EventKind.REMOVED, n2.lease)])
    assert report.removed == 1, report
    assert loden_routes(cluster, 0) == {f"{n1.subnet} via {n1.host.ip} dev eth0 proto 76"}
    report = await n0.network.apply([LeaseEvent(EventKind.ADDED, n2.lease)])
    assert report.added == 1, report
    assert loden_routes(cluster, 0) == expected(cluster, 0)
