"""Issue 10: a VTEP MAC is one node's alone, and flannel.<VNI> looks like flanneld's.

Real devices in real namespaces, backends driven directly (the agent-level scenarios,
several agents sharing one state directory, are in test_agent_dataplane.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from loden.backend import create_backend
from loden.backend.vxlan import VxlanNetwork, derived_mac, tx_checksum_decision
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from tests.fixtures.topology import Host, TopologyFactory
from tests.integration.dataplane_support import (
    ClusterFactory,
    clusters,
    full_mesh,
    lines,
    vxlan_lease,
)

pytestmark = pytest.mark.root

OTHER_MAC = "6e:11:22:33:44:55"


@pytest.fixture
async def make_cluster(make_topology: TopologyFactory) -> AsyncIterator[ClusterFactory]:
    async with clusters(make_topology, hosts=2) as factory:
        yield factory


def stored(host: Host) -> dict[str, object]:
    value: dict[str, object] = json.loads((host.state_dir / "flannel.1.mac").read_text())
    return value


def device_mac(host: Host) -> str:
    return host.ns.out("cat", "/sys/class/net/flannel.1/address").strip()


@pytest.mark.parametrize(
    "content",
    [
        "old format: a bare MAC",
        "another node's file",
        "this node's IP, another VNI",
        "not JSON at all",
    ],
)
async def test_state_file_not_bound_to_this_node_is_ignored(
    make_cluster: ClusterFactory, content: str
) -> None:
    cluster = await make_cluster(start=False)
    a, b = cluster.topo.hosts
    text = {
        "old format: a bare MAC": OTHER_MAC + "\n",
        "another node's file": json.dumps({"PublicIP": str(a.ip), "VNI": 1, "VtepMAC": OTHER_MAC}),
        "this node's IP, another VNI": json.dumps(
            {"PublicIP": str(b.ip), "VNI": 2, "VtepMAC": OTHER_MAC}
        ),
        "not JSON at all": "{",
    }[content]
    (b.state_dir / "flannel.1.mac").write_text(text)
    await cluster.start()
    node = cluster.nodes[1]
    assert isinstance(node.network, VxlanNetwork)
    assert node.network.vtep_mac == derived_mac(b.ip, 1) == device_mac(b)
    assert stored(b) == {"PublicIP": str(b.ip), "VNI": 1, "VtepMAC": derived_mac(b.ip, 1)}
    assert full_mesh(cluster) == []


async def test_state_file_of_this_node_is_used(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(hosts=1, start=False)
    host = cluster.topo.hosts[0]
    body = {"PublicIP": str(host.ip), "VNI": 1, "VtepMAC": OTHER_MAC}
    (host.state_dir / "flannel.1.mac").write_text(json.dumps(body))
    await cluster.start(pods=0)
    assert device_mac(host) == OTHER_MAC


async def test_mac_advertised_by_another_node_is_replaced_before_publishing(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster(hosts=1, start=False)
    host = cluster.topo.hosts[0]
    backend = create_backend("vxlan", await cluster.context(host))
    mine = derived_mac(host.ip, 1)
    own_old = vxlan_lease(IPv4Network("10.250.1.0/24"), host.ip, mine)
    other_vni = Lease(
        IPv4Network("10.250.2.0/24"),
        LeaseAttrs(IPv4Address("192.0.2.52"), "vxlan", json.dumps({"VNI": 2, "VtepMAC": mine})),
    )
    # Our own earlier lease (same public IP) and a VTEP on another VNI: no collision.
    attrs = await backend.lease_attrs([own_old, other_vni])
    assert attrs.data() == {"VNI": 1, "VtepMAC": mine}
    # Another node's lease (flanneld v0.11 form: no VNI) advertises our MAC.
    rival = vxlan_lease(IPv4Network("10.250.3.0/24"), IPv4Address("192.0.2.51"), mine, vni=False)
    attrs = await backend.lease_attrs([own_old, rival])
    fresh = attrs.data()["VtepMAC"]
    assert fresh != mine
    assert int(fresh[:2], 16) & 0x03 == 0x02  # locally administered unicast
    assert device_mac(host) == fresh
    assert stored(host)["VtepMAC"] == fresh
    # The fresh MAC sticks: a restart with the rival still there keeps it.
    again = create_backend("vxlan", await cluster.context(host))
    assert (await again.lease_attrs([own_old, rival])).data()["VtepMAC"] == fresh


async def test_peer_advertising_our_mac_is_reported_never_programmed(
    make_cluster: ClusterFactory,
) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]
    assert isinstance(node.network, VxlanNetwork)
    ns = node.host.ns
    ours = node.network.vtep_mac
    thief = vxlan_lease(IPv4Network("10.250.9.0/24"), IPv4Address("192.0.2.99"), ours)
    stale = vxlan_lease(IPv4Network("10.250.8.0/24"), node.host.ip, ours)
    report = await cluster.reconcile(0, {thief.key: thief, stale.key: stale})
    assert not report.errors
    assert len(report.conflicts) == 1 and "192.0.2.99" in report.conflicts[0]
    assert any("older lease of this node" in s for s in report.skipped)
    neigh = ns.ip("neigh", "show", "dev", "flannel.1").stdout
    fdb = lines(ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout)
    assert "10.250.9.0" not in neigh and "10.250.8.0" not in neigh
    assert not [entry for entry in fdb if entry.startswith(ours) and "dst" in entry]
    assert "10.250.9.0/24" not in ns.ip("route", "show").stdout
    assert full_mesh(cluster) == []
    # Still reported by the fast path until the lease goes; then cleared.
    report = await node.network.apply([])
    assert len(report.conflicts) == 1
    report = await node.network.apply([LeaseEvent(EventKind.REMOVED, thief)])
    assert report.conflicts == ()


def _link_json(host: Host) -> dict[str, Any]:
    out = json.loads(host.ns.out("ip", "-d", "-j", "link", "show", "flannel.1"))
    assert len(out) == 1
    link: dict[str, Any] = out[0]
    return link


def _normalised(link: dict[str, Any], host: Host) -> dict[str, Any]:
    """What differs by node, not by who created the device: index, MAC, local IP."""
    link = json.loads(json.dumps(link))
    assert link.pop("address") and link.pop("ifindex")
    assert link["linkinfo"]["info_data"].pop("local") == str(host.ip)
    link.pop("link_index", None)
    return link


async def test_device_is_flanneld_device(make_cluster: ClusterFactory) -> None:
    """Every ``ip -d link`` attribute (and, where the offload default is flanneld's,
    every ``ethtool -k`` feature) of Loden's ``flannel.1`` equals those of the device
    Go flanneld creates (spec §6.1), built here by hand exactly as flanneld does: its
    netlink library sends ``txqueuelen 0``, no ``dstport`` for Port 0 (kernel default
    8472), ttl/tos 0, learning/proxy/rsc/l2miss/l3miss off, the MAC, MTU = external
    MTU - 50; then ``accept_ra 0``, the subnet's /32 and ``up``."""
    cluster = await make_cluster(hosts=2, start=False)
    loden_host, go_host = cluster.topo.hosts
    cluster.nodes.append(await cluster.start_node(0))
    ns = go_host.ns
    mtu = int(ns.out("cat", "/sys/class/net/eth0/mtu")) - 50
    ns.ip(
        *("link", "add", "flannel.1", "txqueuelen", "0", "mtu", str(mtu)),
        *("address", "6e:00:00:00:00:01", "type", "vxlan", "id", "1", "dev", "eth0"),
        *("local", str(go_host.ip), "ttl", "0", "tos", "0", "nolearning", "noproxy"),
        *("norsc", "nol2miss", "nol3miss", "noudp6zerocsumtx", "noudp6zerocsumrx"),
    )
    ns.sysctl("net.ipv6.conf.flannel/1.accept_ra", "0")
    ns.ip("addr", "add", f"{cluster.subnet(1).network_address}/32", "dev", "flannel.1")
    ns.ip("link", "set", "flannel.1", "up")
    ours, theirs = _link_json(loden_host), _link_json(go_host)
    assert ours.get("txqlen", 0) == 0
    assert _normalised(ours, loden_host) == _normalised(theirs, go_host)
    for host, subnet in ((loden_host, cluster.subnet(0)), (go_host, cluster.subnet(1))):
        info = json.loads(host.ns.out("ip", "-j", "addr", "show", "flannel.1"))[0]
        v4 = [(a["local"], a["prefixlen"]) for a in info["addr_info"] if a["family"] == "inet"]
        assert v4 == [(str(subnet.network_address), 32)]
    if tx_checksum_decision(None, os.uname().release)[0]:  # flanneld's offloads: on
        features = [h.ns.out("ethtool", "-k", "flannel.1") for h in (loden_host, go_host)]
        assert features[0] == features[1]


async def test_older_device_gets_txqueuelen_0_in_place(make_cluster: ClusterFactory) -> None:
    """A compatible device with the kernel's default qlen 1000 (made by an older Loden)
    is kept (same index, same MAC: no traffic interruption) and set to txqueuelen 0."""
    cluster = await make_cluster(hosts=1, start=False)
    host = cluster.topo.hosts[0]
    host.ns.ip(
        *("link", "add", "flannel.1", "address", OTHER_MAC, "type", "vxlan", "id", "1"),
        *("local", str(host.ip), "dev", "eth0", "dstport", "8472", "nolearning"),
    )
    before = _link_json(host)
    assert before["txqlen"] == 1000
    await cluster.start(pods=0)
    after = _link_json(host)
    assert after.get("txqlen", 0) == 0
    assert after["ifindex"] == before["ifindex"] and after["address"] == OTHER_MAC


async def test_two_peers_sharing_a_mac_are_reported(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    node = cluster.nodes[0]
    shared = "6e:00:00:00:00:42"
    one = vxlan_lease(IPv4Network("10.250.11.0/24"), IPv4Address("192.0.2.111"), shared)
    two = vxlan_lease(IPv4Network("10.250.12.0/24"), IPv4Address("192.0.2.112"), shared)
    report = await cluster.reconcile(0, {one.key: one, two.key: two})
    assert len(report.conflicts) == 1
    assert "192.0.2.111" in report.conflicts[0] and "192.0.2.112" in report.conflicts[0]
    assert "VtepMAC 6e:00:00:00:00:42" in report.conflicts[0]
    assert full_mesh(cluster) == []  # the real peers are untouched
    assert len((await node.network.apply([])).conflicts) == 1
    report = await cluster.reconcile(0, {one.key: one})
    assert report.conflicts == ()
