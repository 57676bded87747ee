"""Drift repair from the kernel's netlink notifications, on real devices in namespaces.

A deleted route, neighbour or FDB entry that Loden owns comes back without any
reconcile call (the tests never call one: the periodic resync is not what repairs it);
entries Loden does not own are left alone; a notification overflow (ENOBUFS, forced by
a tiny receive buffer and a burst) asks for a full reconcile at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Network

import pytest

from loden.backend.base import KernelDrift, KernelWatcher
from loden.backend.routes import PeerNetwork
from loden.backend.vxlan import VxlanNetwork
from loden.model.lease import EventKind, LeaseEvent
from tests.fixtures.topology import TopologyFactory
from tests.integration.dataplane_support import (
    ClusterFactory,
    Node,
    clusters,
    full_mesh,
    vxlan_lease,
)

pytestmark = pytest.mark.root

#: Far below the periodic resync (minutes), far above a repair (milliseconds).
REPAIR_WAIT = 5.0


@pytest.fixture
async def make_cluster(make_topology: TopologyFactory) -> AsyncIterator[ClusterFactory]:
    async with clusters(make_topology, hosts=2) as factory:
        yield factory


class Watch:
    """``network.watch_kernel()`` running in a task; what it yields is collected."""

    def __init__(self, network: PeerNetwork, **options: int) -> None:
        self.drifts: list[KernelDrift] = []
        self.network = network
        self.options = options
        self.task: asyncio.Task[None] | None = None
        self.started = asyncio.Event()

    async def _run(self) -> None:
        iterator = self.network.watch_kernel(**self.options)
        first = asyncio.ensure_future(anext(iterator))
        await asyncio.sleep(0.2)  # the monitor socket is open once read() is waiting
        self.started.set()
        try:
            self.drifts.append(await first)
            async for drift in iterator:
                self.drifts.append(drift)
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Watch:
        self.task = asyncio.create_task(self._run())
        await self.started.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    @property
    def repaired(self) -> int:
        return sum(d.report.added for d in self.drifts if d.report is not None)

    @property
    def resyncs(self) -> list[str]:
        return [d.resync for d in self.drifts if d.resync is not None]


async def until(check: Callable[[], bool], timeout: float = REPAIR_WAIT) -> float | None:
    """Seconds until ``check()`` held, or None."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if await asyncio.to_thread(check):
            return time.monotonic() - began
        await asyncio.sleep(0.02)
    return None


def vxlan_entries(node: Node, peer: Node) -> Callable[[], tuple[bool, bool, bool]]:
    ns, gw = node.host.ns, peer.subnet.network_address
    assert isinstance(peer.network, VxlanNetwork)
    mac = peer.network.vtep_mac

    def present() -> tuple[bool, bool, bool]:
        route = ns.ip("route", "show", "exact", str(peer.subnet), "proto", "76").stdout
        neigh = ns.ip("neigh", "show", str(gw), "dev", "flannel.1", "nud", "permanent").stdout
        fdb = ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
        return (
            f"via {gw} dev flannel.1" in route,
            f"lladdr {mac}" in neigh,
            f"{mac} dst {peer.host.ip} self permanent" in fdb,
        )

    return present


async def test_network_is_a_kernel_watcher(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan")
    assert isinstance(cluster.nodes[0].network, KernelWatcher)


async def test_deleted_route_neigh_fdb_come_back_by_notification(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster("vxlan")
    n0, n1 = cluster.nodes
    assert isinstance(n0.network, VxlanNetwork) and isinstance(n1.network, VxlanNetwork)
    ns, gw1, mac1 = n0.host.ns, n1.subnet.network_address, n1.network.vtep_mac
    present = vxlan_entries(n0, n1)
    assert present() == (True, True, True)
    breakages = [
        (0, ["ip", "route", "del", str(n1.subnet)]),
        (1, ["ip", "neigh", "del", str(gw1), "dev", "flannel.1"]),
        (2, ["bridge", "fdb", "del", mac1, "dev", "flannel.1", "dst", str(n1.host.ip)]),
    ]
    async with Watch(n0.network) as watch:
        for slot, argv in breakages:
            await ns.arun(*argv)
            assert await until(lambda s=slot: present()[s]) is not None, argv  # type: ignore[misc]
        # All three at once, then a neighbour overwritten with another MAC.
        for _, argv in breakages:
            await ns.arun(*argv)
        assert await until(lambda: present() == (True, True, True)) is not None
        await ns.arun(
            "ip", "neigh", "replace", str(gw1), "lladdr", "0a:58:de:ad:be:ef", "dev", "flannel.1"
        )
        assert await until(lambda: present() == (True, True, True)) is not None
    assert watch.resyncs == []
    assert watch.repaired >= 7
    assert full_mesh(cluster) == []


async def test_hostgw_route_comes_back_by_notification(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("host-gw")
    n0, n1 = cluster.nodes
    ns = n0.host.ns

    def present() -> bool:
        out = ns.ip("route", "show", "exact", str(n1.subnet), "proto", "76").stdout
        return f"via {n1.host.ip}" in out

    assert isinstance(n0.network, PeerNetwork)
    async with Watch(n0.network) as watch:
        await ns.arun("ip", "route", "del", str(n1.subnet))
        assert await until(present) is not None
        # Replaced by a foreign route to the same place: ours again.
        await ns.arun("ip", "route", "replace", str(n1.subnet), "via", str(n1.host.ip))
        assert await until(present) is not None
    assert watch.resyncs == [] and watch.repaired >= 2


async def test_foreign_entries_are_left_alone(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan")
    n0, n1 = cluster.nodes
    ns = n0.host.ns
    assert isinstance(n0.network, VxlanNetwork)
    net = cluster.network
    foreign = IPv4Network((int(net.network_address) + (201 << 8), 24))
    other_table = str(n1.subnet)
    present = vxlan_entries(n0, n1)
    async with Watch(n0.network) as watch:
        # Someone else's route in the Network, a same-destination route in another
        # table, a neighbour on the underlay device: added, changed and deleted.
        await ns.arun("ip", "route", "add", str(foreign), "dev", "flannel.1", "proto", "static")
        await ns.arun("ip", "route", "add", other_table, "dev", "eth0", "table", "100")
        await ns.arun(
            "ip", "neigh", "add", "192.0.2.77", "lladdr", "0a:58:00:00:00:77", "dev", "eth0"
        )
        await ns.arun("ip", "route", "del", str(foreign))
        await ns.arun("ip", "route", "del", other_table, "table", "100")
        await ns.arun("ip", "neigh", "del", "192.0.2.77", "dev", "eth0")
        # A sentinel: once our own route is back, every earlier event has been handled.
        await ns.arun("ip", "route", "del", str(n1.subnet))
        assert await until(lambda: present()[0]) is not None
        await asyncio.sleep(0.2)
    assert watch.repaired == 1, watch.drifts
    assert watch.resyncs == []
    assert ns.ip("route", "show", "exact", str(foreign)).stdout == ""
    assert ns.ip("route", "show", "table", "100").stdout == ""
    assert "192.0.2.77" not in ns.ip("neigh", "show", "dev", "eth0").stdout


async def test_lost_notifications_ask_for_a_full_reconcile(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan")
    n0 = cluster.nodes[0]
    ns = n0.host.ns
    assert isinstance(n0.network, VxlanNetwork)
    net = cluster.network
    burst = "".join(
        f"route add {IPv4Network((int(net.network_address) + (i << 8), 24))} dev eth0 "
        f"proto static table 101\n"
        for i in range(100, 400)
    )
    async with Watch(n0.network, rcvbuf=4096) as watch:
        # Blocking on purpose: the event loop cannot read while 300 routes arrive, so
        # the 4 KiB buffer (a few notifications) overflows.
        ns.run("ip", "-batch", "-", input=burst)
        # Its notification may be lost too: the full reconcile restores it either way.
        ns.ip("route", "del", str(cluster.nodes[1].subnet))
        assert await until(lambda: bool(watch.resyncs)) is not None
        report = await cluster.reconcile(0)
        assert not report.errors
    assert "notifications" in watch.resyncs[0]
    assert vxlan_entries(n0, cluster.nodes[1])() == (True, True, True)
    ns.ip("route", "flush", "table", "101")


async def test_device_loss_asks_for_a_full_reconcile(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan")
    n0 = cluster.nodes[0]
    assert isinstance(n0.network, VxlanNetwork)
    async with Watch(n0.network) as watch:
        await n0.host.ns.arun("ip", "link", "del", "flannel.1")
        assert await until(lambda: bool(watch.resyncs)) is not None
        report = await cluster.reconcile(0)
        assert report.added == 3 and not report.errors
    assert "deleted" in watch.resyncs[0]
    assert full_mesh(cluster) == []


async def test_peers_applied_later_are_repaired_and_removed_ones_are_not(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster("vxlan")
    n0, n1 = cluster.nodes
    ns = n0.host.ns
    assert isinstance(n0.network, VxlanNetwork)
    extra = vxlan_lease(
        IPv4Network((int(cluster.network.network_address) + (150 << 8), 24)),
        n1.host.ip + 100,
        "0a:58:00:00:01:50",
    )

    def extra_route() -> bool:
        out = ns.ip("route", "show", "exact", str(extra.subnet), "proto", "76").stdout
        return "via" in out

    async with Watch(n0.network) as watch:
        # The index of wanted entries exists once a first repair needed it.
        await ns.arun("ip", "route", "del", str(n1.subnet))
        assert await until(lambda: vxlan_entries(n0, n1)()[0]) is not None
        report = await n0.network.apply([LeaseEvent(EventKind.ADDED, extra)])
        assert report.added == 3 and not report.errors
        await ns.arun("ip", "route", "del", str(extra.subnet))
        assert await until(extra_route) is not None
        report = await n0.network.apply([LeaseEvent(EventKind.REMOVED, extra)])
        assert report.removed == 3 and not report.errors
        await asyncio.sleep(0.5)
        assert not extra_route()
    assert watch.resyncs == [] and watch.repaired == 2


async def test_own_writes_and_other_devices_build_no_index(make_cluster: ClusterFactory) -> None:
    """The index from kernel entries to leases (~1.3 MB at 5,000 vxlan peers) is built only
    when a notification may concern an entry of ours: not for ARP changes on other
    devices, nor for the FDB notifications of our own writes and deletions (the vxlan
    driver sends them without our port id), nor for routes that cannot be ours: outside
    the family's Network (an IPv4-only node's IPv6 routes), in the local table, inside
    our own subnet. A real deletion still gets repaired, and the index it needed lives
    until the next periodic pass."""
    cluster = await make_cluster("vxlan")
    n0, n1 = cluster.nodes
    assert isinstance(n0.network, VxlanNetwork)
    network = n0.network
    present = vxlan_entries(n0, n1)
    async with Watch(network) as watch:
        network._by_ident = None
        assert full_mesh(cluster) == []  # ARP/ND traffic on eth0 and cni0
        # A peer nobody sends to (a removed peer in use would be reported FAILED by
        # the kernel first: a notification about our device that does need the index).
        extra = vxlan_lease(
            cluster.subnet(9), cluster.topo.network.network_address + 99, "0a:58:0a:00:09:01"
        )
        assert (await network.apply([LeaseEvent(EventKind.ADDED, extra)])).added == 3
        assert (await network.apply([LeaseEvent(EventKind.REMOVED, extra)])).removed == 3
        # Routes that are nobody's business of ours: the IPv6 link-local routes of a new
        # device (this cluster has no IPv6 Network) and an IPv4 route outside Network.
        ns = n0.host.ns
        await ns.arun("ip", "link", "add", "lspare0", "type", "veth", "peer", "name", "lspare1")
        for end in ("lspare0", "lspare1"):
            await ns.arun("ip", "link", "set", end, "up")
        await ns.arun("ip", "-6", "route", "add", "fd7e:1::/64", "dev", "lspare0")
        await ns.arun("ip", "route", "add", "192.0.2.0/24", "dev", "lspare0")
        # Inside Network, still not ours: a device address (its route is in the local
        # table) and a route inside our own subnet (as the bridge's is).
        inside = cluster.subnet(20).network_address + 5
        await ns.arun("ip", "addr", "add", f"{inside}/32", "dev", "lspare0")
        upper_half = list(n0.subnet.subnets(1))[1]
        await ns.arun("ip", "route", "add", str(upper_half), "dev", "lspare0")
        await asyncio.sleep(0.5)  # the notifications are read meanwhile
        assert network._by_ident is None
        assert network._own_deletions == set()
        assert isinstance(n1.network, VxlanNetwork)
        mac = n1.network.vtep_mac
        await n0.host.ns.arun(
            "bridge", "fdb", "del", mac, "dev", "flannel.1", "dst", str(n1.host.ip)
        )
        assert await until(lambda: present()[2]) is not None
        assert network._by_ident is not None  # the repair needed it
        # It lives until the next periodic pass.
        assert not (await cluster.reconcile(0)).errors
        assert network._by_ident is None
    assert watch.repaired >= 1 and watch.resyncs == []
