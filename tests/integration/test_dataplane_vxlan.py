"""vxlan backend on three real hosts (namespaces) with pods: traffic, kernel shape, repair."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from loden.backend.vxlan import VxlanNetwork, derived_mac, tx_checksum_decision
from loden.model.lease import EventKind, LeaseEvent
from tests.fixtures.topology import Host, Topology, TopologyFactory
from tests.integration.dataplane_support import (
    Cluster,
    ClusterFactory,
    Node,
    clusters,
    full_mesh,
    lines,
    vxlan_lease,
)

pytestmark = pytest.mark.root


@pytest.fixture
async def make_cluster(make_topology: TopologyFactory) -> AsyncIterator[ClusterFactory]:
    async with clusters(make_topology, hosts=3) as factory:
        yield factory


def stored(host: Host) -> dict[str, object]:
    """The VTEP MAC state file of ``host``."""
    value: dict[str, object] = json.loads((host.state_dir / "flannel.1.mac").read_text())
    return value


def mac_of(node: Node) -> str:
    assert isinstance(node.network, VxlanNetwork)
    return node.network.vtep_mac


def expected_vxlan(cluster: Cluster, i: int) -> tuple[set[str], set[str], set[str]]:
    neigh, fdb, routes = set(), set(), set()
    for j, peer in enumerate(cluster.nodes):
        if j == i:
            continue
        gw = peer.subnet.network_address
        neigh.add(f"{gw} lladdr {mac_of(peer)} PERMANENT")
        fdb.add(f"{mac_of(peer)} dst {peer.host.ip} self permanent")
        routes.add(f"{peer.subnet} via {gw} dev flannel.1 proto 76 onlink")
    return neigh, fdb, routes


def kernel_vxlan(node: Node) -> tuple[set[str], set[str], set[str]]:
    ns = node.host.ns
    neigh = lines(ns.ip("neigh", "show", "dev", "flannel.1").stdout)
    fdb = lines(ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout)
    routes = {r for r in lines(ns.ip("-N", "-4", "route").stdout) if "proto 76" in r}
    return neigh, fdb, routes


def assert_vxlan_state(cluster: Cluster) -> None:
    for i, node in enumerate(cluster.nodes):
        assert kernel_vxlan(node) == expected_vxlan(cluster, i), node.host.name


async def test_vxlan_full_mesh_and_flannel_shape(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan")
    assert full_mesh(cluster) == []
    assert_vxlan_state(cluster)
    for node in cluster.nodes:
        ns = node.host.ns
        link = " ".join(ns.ip("-d", "link", "show", "flannel.1").stdout.split())
        assert "mtu 1450" in link
        assert f"link/ether {mac_of(node)}" in link
        assert re.search(
            rf"vxlan id 1 local {node.host.ip} dev eth0 srcport 0 0 dstport 8472 nolearning", link
        ), link
        assert node.network.mtu == 1450
        assert node.lease.attrs.to_json() == (
            f'{{"PublicIP":"{node.host.ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac_of(node)}"}}}}'
        )
        addrs = ns.ip("-4", "-o", "addr", "show", "dev", "flannel.1").stdout.split()
        assert f"{node.subnet.network_address}/32" in addrs
        offload = ns.run("ethtool", "-k", "flannel.1").stdout
        auto, _ = tx_checksum_decision(None, os.uname().release)  # on: kernel >= 5.7
        assert f"tx-checksumming: {'on' if auto else 'off'}" in offload
        assert ns.run("sysctl", "-n", "net.ipv6.conf.flannel/1.accept_ra").stdout.strip() == "0"
        # The MAC is the derived one, and is persisted for the next start.
        assert mac_of(node) == derived_mac(node.host.ip, 1)
        assert stored(node.host) == {
            "PublicIP": str(node.host.ip),
            "VNI": 1,
            "VtepMAC": mac_of(node),
        }
        # Exactly the whole routing table: nothing else was added or removed.
        own = node.subnet
        assert cluster.topo.underlay_address is not None
        want = {
            f"default via {cluster.topo.underlay_address.ip} dev eth0",
            f"{cluster.topo.network} dev eth0 proto 2 scope 253 src {node.host.ip}",
            f"{own} dev cni0 proto 2 scope 253 src {own.network_address + 1}",
        } | expected_vxlan(cluster, cluster.nodes.index(node))[2]
        assert lines(ns.ip("-N", "-4", "route").stdout) == want


async def test_vxlan_repairs_hand_deletions(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan")
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    ns, pod0, pod1 = n0.host.ns, n0.pods[0], n1.pods[0]
    gw1 = n1.subnet.network_address
    breakages = [
        ("route", ["ip", "route", "del", str(n1.subnet)]),
        ("neigh", ["ip", "neigh", "del", str(gw1), "dev", "flannel.1"]),
        ("fdb", ["bridge", "fdb", "del", mac_of(n1), "dev", "flannel.1", "dst", str(n1.host.ip)]),
    ]
    for what, argv in breakages:
        ns.run(*argv)
        assert not pod0.ns.ping(pod1.ip, wait=0.5), f"{what}: still works after deletion?"
        report = await cluster.reconcile(0)
        assert report.added == 1 and report.removed == 0 and not report.errors, (what, report)
        assert_vxlan_state(cluster)
        assert pod0.ns.ping(pod1.ip, wait=2), what
    # The whole device: recreated with the same MAC, every peer replayed.
    mac = mac_of(n0)
    ns.ip("link", "del", "flannel.1")
    report = await cluster.reconcile(0)
    assert report.added == 6 and not report.errors, report
    assert mac_of(n0) == mac
    assert_vxlan_state(cluster)
    assert full_mesh(cluster) == []


async def test_vxlan_sweeps_stale_but_not_foreign(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan")
    n0 = cluster.nodes[0]
    ns = n0.host.ns
    net = cluster.network
    stale = IPv4Network((int(net.network_address) + (200 << 8), 24))
    foreign = IPv4Network((int(net.network_address) + (201 << 8), 24))
    legacy = IPv4Network((int(net.network_address) + (202 << 8), 24))
    mac = "0a:58:00:00:00:99"
    # Left by an earlier run for a peer that is gone: neighbour, FDB and a proto 76 route.
    ns.ip(
        "neigh",
        "replace",
        str(stale.network_address),
        "lladdr",
        mac,
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    )
    ns.run(
        "bridge", "fdb", "append", mac, "dev", "flannel.1", "dst", "192.0.2.9", "self", "permanent"
    )
    ns.ip(
        "route",
        "add",
        str(stale),
        "via",
        str(stale.network_address),
        "dev",
        "flannel.1",
        "onlink",
        "proto",
        "76",
    )
    # Go flanneld's shape for a gone peer (proto boot): ours to sweep.
    ns.ip(
        "route",
        "add",
        str(legacy),
        "via",
        str(legacy.network_address),
        "dev",
        "flannel.1",
        "onlink",
    )
    # Somebody else's route on our device: never touched.
    ns.ip(
        "route",
        "add",
        str(foreign),
        "via",
        str(foreign.network_address),
        "dev",
        "flannel.1",
        "onlink",
        "proto",
        "static",
    )
    # A peer is gone as well (node 2 left the cluster).
    gone = cluster.nodes[2]
    report = await n0.network.reconcile({cluster.nodes[1].lease.key: cluster.nodes[1].lease})
    assert not report.errors and report.added == 0, report
    # gone peer: neighbour + FDB + route; stale: the same three; legacy: its route.
    assert report.removed == 3 + 3 + 1, report
    neigh, fdb, routes = kernel_vxlan(n0)
    assert neigh == {
        f"{cluster.nodes[1].subnet.network_address} lladdr {mac_of(cluster.nodes[1])} PERMANENT"
    }
    assert fdb == {f"{mac_of(cluster.nodes[1])} dst {cluster.nodes[1].host.ip} self permanent"}
    assert str(gone.subnet) not in " ".join(routes)
    all_routes = lines(ns.ip("-N", "-4", "route").stdout)
    assert f"{foreign} via {foreign.network_address} dev flannel.1 proto 4 onlink" in all_routes
    assert not any(str(legacy) in r for r in all_routes)
    assert not any(str(stale) in r for r in all_routes)


async def test_vxlan_adopts_identical_route_without_interruption(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster("vxlan", hosts=2)
    n0, n1 = cluster.nodes
    ns = n0.host.ns
    # Make the route look like Go flanneld's (proto boot), then reconcile: adopted in place.
    ns.ip(
        "route",
        "replace",
        str(n1.subnet),
        "via",
        str(n1.subnet.network_address),
        "dev",
        "flannel.1",
        "onlink",
        "proto",
        "boot",
    )
    ping = n0.pods[0].ns.spawn("ping", "-n", "-i", "0.05", "-c", "20", str(n1.pods[0].ip))
    report = await cluster.reconcile(0)
    assert report.added == 1 and report.removed == 0, report
    assert ping.wait(10) == 0, ping.output()
    assert_vxlan_state(cluster)


async def test_vxlan_restart_keeps_traffic_and_mac(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan", hosts=2)
    n0, n1 = cluster.nodes
    mac = mac_of(n0)
    ping = n0.pods[0].ns.spawn("ping", "-n", "-i", "0.1", "-c", "40", "-W", "1", str(n1.pods[0].ip))
    await asyncio.sleep(1.0)
    for _ in range(2):
        node = await cluster.restart(0)
        assert mac_of(node) == mac
        report = await cluster.reconcile(0)
        assert report.added == 0 and report.removed == 0 and not report.errors, report
        await asyncio.sleep(0.5)
    assert ping.wait(10) == 0, ping.output()
    assert " 0% packet loss" in ping.output(), ping.output()
    assert_vxlan_state(cluster)


async def test_vxlan_apply_events_converge(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan")
    n0, n1, n2 = cluster.nodes
    # Removal through apply, then back.
    report = await n0.network.apply([LeaseEvent(EventKind.REMOVED, n1.lease)])
    assert report.removed == 3 and not report.errors, report
    assert not n0.pods[0].ns.ping(n1.pods[0].ip, wait=0.5)
    report = await n0.network.apply([LeaseEvent(EventKind.ADDED, n1.lease)])
    assert report.added == 3, report
    assert_vxlan_state(cluster)
    # Node 2 comes back with a new MAC (e.g. flannel restarted with a random one).
    new_mac = "0a:58:0a:0b:0c:0d"
    moved = vxlan_lease(n2.subnet, n2.host.ip, new_mac)
    report = await n0.network.apply([LeaseEvent(EventKind.ADDED, moved)])
    assert not report.errors, report
    neigh, fdb, _ = kernel_vxlan(n0)
    assert f"{n2.subnet.network_address} lladdr {new_mac} PERMANENT" in neigh
    assert f"{new_mac} dst {n2.host.ip} self permanent" in fdb
    assert not any(mac_of(n2) in f for f in fdb), fdb
    # A reconcile with the same desired state changes nothing.
    report = await n0.network.reconcile({n1.lease.key: n1.lease, moved.key: moved})
    assert report.added == report.removed == 0, report
    # The level-triggered path handles a MAC change too: neighbour replaced, new FDB
    # entry written, the old MAC's FDB entry removed.
    report = await n0.network.reconcile({n1.lease.key: n1.lease, n2.lease.key: n2.lease})
    assert (report.added, report.removed, report.errors) == (2, 1, ()), report
    assert_vxlan_state(cluster)
    # Legacy lease data without VNI, and a lease of another backend type (ignored).
    legacy = vxlan_lease(n2.subnet, n2.host.ip, mac_of(n2), vni=False)
    other = vxlan_lease(IPv4Network("10.255.1.0/24"), IPv4Address("192.0.2.1"), new_mac)
    other = type(other)(other.subnet, type(other.attrs)(other.attrs.public_ip, "host-gw"))
    report = await n0.network.apply(
        [LeaseEvent(EventKind.ADDED, legacy), LeaseEvent(EventKind.ADDED, other)]
    )
    assert not report.errors, report
    assert_vxlan_state(cluster)


async def test_vxlan_direct_routing(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan", DirectRouting=True)
    assert full_mesh(cluster) == []
    for i, node in enumerate(cluster.nodes):
        neigh, fdb, routes = kernel_vxlan(node)
        assert neigh == set() and fdb == set()
        assert routes == {
            f"{p.subnet} via {p.host.ip} dev eth0 proto 76"
            for j, p in enumerate(cluster.nodes)
            if j != i
        }
    # A peer behind the underlay gateway is not adjacent: it gets the vxlan entries.
    n0 = cluster.nodes[0]
    far_subnet = IPv4Network((int(cluster.network.network_address) + (150 << 8), 24))
    far = vxlan_lease(far_subnet, IPv4Address("192.0.2.77"), "0a:58:00:00:00:77")
    report = await cluster.reconcile(0, {far.key: far})
    assert report.added == 3 and not report.errors, report
    neigh, fdb, routes = kernel_vxlan(n0)
    assert neigh == {f"{far_subnet.network_address} lladdr 0a:58:00:00:00:77 PERMANENT"}
    assert fdb == {"0a:58:00:00:00:77 dst 192.0.2.77 self permanent"}
    assert f"{far_subnet} via {far_subnet.network_address} dev flannel.1 proto 76 onlink" in routes


@pytest.mark.parametrize("forced", [False, True])
async def test_vxlan_tx_checksum_offload_option(make_cluster: ClusterFactory, forced: bool) -> None:
    """``"TxChecksumOffload": true|false`` forces tx checksumming (and so TSO) on
    flannel.1 either way, whatever the kernel, and the resync holds it there."""
    want, other = ("on", "off") if forced else ("off", "on")
    cluster = await make_cluster("vxlan", hosts=2, TxChecksumOffload=forced)
    assert full_mesh(cluster) == []
    ns = cluster.nodes[0].host.ns
    assert f"tx-checksumming: {want}" in ns.run("ethtool", "-k", "flannel.1").stdout
    ns.run("ethtool", "-K", "flannel.1", "tx", other)
    report = await cluster.reconcile(0)
    assert not report.errors, report
    assert f"tx-checksumming: {want}" in ns.run("ethtool", "-k", "flannel.1").stdout
    assert full_mesh(cluster) == []


async def test_vxlan_incompatible_device_is_recreated(make_topology: TopologyFactory) -> None:
    topo: Topology = make_topology(1)
    ns = topo.hosts[0].ns
    ns.ip(
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "4789",
        "local",
        str(topo.hosts[0].ip),
    )
    cluster = Cluster(topo, "vxlan")
    try:
        await cluster.start(pods=0)
        link = " ".join(ns.ip("-d", "link", "show", "flannel.1").stdout.split())
        assert "dstport 8472" in link and "nolearning" in link
    finally:
        await cluster.close()


async def test_vxlan_mac_survives_restart_and_reboot(make_topology: TopologyFactory) -> None:
    topo: Topology = make_topology(2)
    host = topo.hosts[0]
    ns = host.ns
    # A device left by Go flanneld (random MAC): compatible, so reused with its MAC.
    go_mac = "6e:11:22:33:44:55"
    ns.ip(
        "link",
        "add",
        "flannel.1",
        "address",
        go_mac,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        str(host.ip),
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    )
    cluster = Cluster(topo, "vxlan")
    try:
        await cluster.start(pods=0)
        assert mac_of(cluster.nodes[0]) == go_mac
        assert stored(host)["VtepMAC"] == go_mac
        # "Reboot": the device is gone, the state directory survived.
        await cluster.nodes[0].network.aclose()
        ns.ip("link", "del", "flannel.1")
        node = await cluster.restart(0)
        assert mac_of(node) == go_mac
        # Reboot with an empty state directory: the MAC derived from IP and VNI.
        ns.ip("link", "del", "flannel.1")
        (host.state_dir / "flannel.1.mac").unlink()
        node = await cluster.restart(0)
        assert mac_of(node) == derived_mac(host.ip, 1)
    finally:
        await cluster.close()


async def test_vxlan_apply_replays_after_device_loss(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster("vxlan")
    n0, n1, n2 = cluster.nodes
    n0.host.ns.ip("link", "del", "flannel.1")
    report = await n0.network.apply([LeaseEvent(EventKind.ADDED, n2.lease)])
    assert report.added == 6 and not report.errors, report
    assert_vxlan_state(cluster)
    assert full_mesh(cluster) == []


async def test_vxlan_apply_during_reconcile_is_not_undone(make_cluster: ClusterFactory) -> None:
    """A resync reads and diffs without the write lock; an event applied meanwhile is
    newer than its dump, so the resync must neither undo nor wait for it."""
    cluster = await make_cluster("vxlan")
    n0, n1, n2 = cluster.nodes
    network = n0.network
    assert isinstance(network, VxlanNetwork)
    # 1,500 synthetic peers make the read phase long enough to land an event inside it.
    base = int(IPv4Network("10.200.0.0/16").network_address)
    synthetic = {}
    for i in range(1500):
        mac = f"0a:58:00:{i >> 8:02x}:{i & 255:02x}:01"
        lease = vxlan_lease(IPv4Network((base + (i << 8), 24)), IPv4Address("192.0.2.9"), mac)
        synthetic[lease.key] = lease
    stale_view = {**cluster.peers(0), **synthetic}
    report = await network.reconcile(stale_view)
    assert not report.errors, report.errors[:3]
    newcomer = vxlan_lease(IPv4Network("10.210.7.0/24"), n2.host.ip, "0a:58:0a:0a:0a:0a")
    resync = asyncio.create_task(network.reconcile(stale_view))
    try:
        async with asyncio.timeout(5):  # until the pass has read its peers and is dumping
            while network._touched_keys is None:
                await asyncio.sleep(0.0005)
    except BaseException:
        resync.cancel()
        raise
    report = await network.apply(
        [LeaseEvent(EventKind.ADDED, newcomer), LeaseEvent(EventKind.REMOVED, n1.lease)]
    )
    assert (report.added, report.removed, report.errors) == (3, 3, ()), report
    assert not resync.done(), "apply waited for the whole resync"
    report = await resync
    assert not report.errors, report.errors[:3]
    neigh, fdb, routes = kernel_vxlan(n0)
    assert "10.210.7.0/24 via 10.210.7.0 dev flannel.1 proto 76 onlink" in routes
    assert f"0a:58:0a:0a:0a:0a dst {n2.host.ip} self permanent" in fdb
    assert not any(str(n1.subnet) in r for r in routes), "resync restored a removed peer"
    assert not any(mac_of(n1) in f for f in fdb)
    # The next pass with the current peer set converges with nothing left to do twice.
    current = {k: v for k, v in stale_view.items() if k != n1.lease.key}
    current[newcomer.key] = newcomer
    await network.reconcile(current)
    report = await network.reconcile(current)
    assert report.added == report.removed == 0 and not report.errors, report
