"""The no-change pass that only fingerprints the kernel's dumps (issue 14), on real
devices in namespaces: it must never call a drifted kernel "as wanted".

A periodic pass with nothing changed on our side compares one digest of the dumps with
the digest of the last pass that found everything in place. These tests break the
kernel by hand between passes (no notification listener runs, so only the pass can
repair it) and check that the pass sees it, repairs it, and decodes nothing when the
kernel really is unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network

import pytest

from loden.backend.vxlan import VxlanNetwork
from loden.kernel import netlink, rtnl
from loden.model.lease import EventKind, Lease, LeaseEvent
from tests.fixtures.topology import TopologyFactory
from tests.integration.dataplane_support import Cluster, ClusterFactory, clusters, vxlan_lease

pytestmark = pytest.mark.root


@pytest.fixture
async def make_cluster(make_topology: TopologyFactory) -> AsyncIterator[ClusterFactory]:
    async with clusters(make_topology, hosts=3) as factory:
        yield factory


class Decodes:
    """Counts messages decoded into entries (the fingerprint-only pass decodes none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("decode_route", "decode_neigh"):
            real = getattr(rtnl, name)
            monkeypatch.setattr(rtnl, name, self._counting(real))

    def _counting(self, real: Callable[[bytes], object]) -> Callable[[bytes], object]:
        def decode(msg: bytes) -> object:
            self.count += 1
            return real(msg)

        return decode


async def quiet(cluster: Cluster, decodes: Decodes) -> int:
    """Node 0's pass: how many messages it decoded (asserting it wrote nothing)."""
    before = decodes.count
    report = await cluster.reconcile(0)
    assert not report.errors and report.added == report.removed == 0, report
    return decodes.count - before


async def test_unchanged_kernel_is_fingerprinted_not_decoded(
    make_cluster: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await make_cluster("vxlan")
    decodes = Decodes(monkeypatch)
    assert await quiet(cluster, decodes) > 0  # the pass that proves the kernel right
    assert await quiet(cluster, decodes) == 0
    # Volatile attributes (use times, probes) change with traffic, the digest does not.
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    assert n0.host.ns.ping(n1.pods[0].ip)
    assert await quiet(cluster, decodes) == 0


@pytest.mark.parametrize(
    "breakage",
    ["route deleted", "neighbour deleted", "neighbour replaced", "fdb deleted", "fdb added"],
)
async def test_drift_between_quiet_passes_is_repaired(
    make_cluster: ClusterFactory, monkeypatch: pytest.MonkeyPatch, breakage: str
) -> None:
    cluster = await make_cluster("vxlan")
    decodes = Decodes(monkeypatch)
    await quiet(cluster, decodes)
    assert await quiet(cluster, decodes) == 0
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    assert isinstance(n1.network, VxlanNetwork)
    ns, gw, mac = n0.host.ns, str(n1.subnet.network_address), n1.network.vtep_mac
    argv = {
        "route deleted": ["ip", "route", "del", str(n1.subnet)],
        "neighbour deleted": ["ip", "neigh", "del", gw, "dev", "flannel.1"],
        "neighbour replaced": [
            "ip", "neigh", "replace", gw, "lladdr", "0a:58:de:ad:be:ef", "dev", "flannel.1",
        ],
        "fdb deleted": ["bridge", "fdb", "del", mac, "dev", "flannel.1", "dst", str(n1.host.ip)],
        # Not ours to keep: a permanent entry on our device that no peer wants.
        "fdb added": [
            "bridge", "fdb", "append", "0a:58:de:ad:be:ef", "dev", "flannel.1",
            "dst", "192.0.2.9", "self", "permanent",
        ],
    }[breakage]  # fmt: skip
    await ns.arun(*argv)
    report = await cluster.reconcile(0)
    assert not report.errors and report.added + report.removed >= 1, (breakage, report)
    # Repaired: the kernel is what the last quiet pass saw, so its digest is again.
    assert await quiet(cluster, decodes) == 0
    routes = ns.ip("route", "show", "exact", str(n1.subnet)).stdout
    assert f"via {gw} dev flannel.1" in routes
    assert f"lladdr {mac}" in ns.ip("neigh", "show", gw, "dev", "flannel.1").stdout
    fdb = ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
    assert f"{mac} dst {n1.host.ip} self permanent" in fdb
    assert "0a:58:de:ad:be:ef" not in fdb


async def test_a_changed_peer_set_is_never_taken_for_quiet(
    make_cluster: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An applied event changes what the kernel should hold: the next pass checks it
    all again, even if the kernel's digest happens to be what it was."""
    cluster = await make_cluster("vxlan")
    decodes = Decodes(monkeypatch)
    await quiet(cluster, decodes)
    assert await quiet(cluster, decodes) == 0
    n0 = cluster.nodes[0]
    extra = vxlan_lease(
        cluster.subnet(9), cluster.topo.network.network_address + 99, "0a:58:0a:00:09:01"
    )
    report = await n0.network.apply([LeaseEvent(EventKind.ADDED, extra)])
    assert report.added == 3 and not report.errors
    # The kernel was made to match (the apply wrote it): checked in full once.
    assert await quiet_with(cluster, decodes, {extra.key: extra}) > 0
    assert await quiet_with(cluster, decodes, {extra.key: extra}) == 0


async def test_a_full_check_compares_sums_and_goes_entry_by_entry_only_on_drift(
    make_cluster: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a change on our side the pass checks every entry, first as two sums (no
    set of 15,000 hashes held); only when they differ is the dump walked again entry
    by entry, and the drift repaired."""
    cluster = await make_cluster("vxlan")
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    network = n0.network
    assert isinstance(network, VxlanNetwork)
    real = network._drift
    calls: list[int] = []

    async def counting() -> tuple[list[netlink.Change], netlink.Digest]:
        calls.append(1)
        return await real()

    monkeypatch.setattr(network, "_drift", counting)
    extra = vxlan_lease(
        cluster.subnet(9), cluster.topo.network.network_address + 99, "0a:58:0a:00:09:01"
    )
    assert (await network.apply([LeaseEvent(EventKind.ADDED, extra)])).added == 3
    report = await cluster.reconcile(0, {extra.key: extra})
    assert not report.errors and report.added == report.removed == 0 and calls == []
    assert (await network.apply([LeaseEvent(EventKind.REMOVED, extra)])).removed == 3
    await n0.host.ns.arun("ip", "route", "del", str(n1.subnet))
    report = await cluster.reconcile(0)
    assert report.added == 1 and not report.errors and calls == [1]
    assert "flannel.1" in n0.host.ns.ip("route", "show", "exact", str(n1.subnet)).stdout


async def quiet_with(cluster: Cluster, decodes: Decodes, extra: dict[str, object]) -> int:
    before = decodes.count
    report = await cluster.reconcile(0, extra)  # type: ignore[arg-type]
    assert not report.errors and report.added == report.removed == 0, report
    return decodes.count - before


def _neigh_message(seq: int, cacheinfo: bytes, lladdr: bytes) -> bytes:
    body = struct.pack("=BxxxiHBB", 2, 7, 0x80, 0, 1)
    attrs = b"".join(
        struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)
        for kind, payload in (
            (rtnl.NDA_DST, bytes([10, 0, 3, 0])),
            (rtnl.NDA_LLADDR, lladdr),
            (rtnl.NDA_CACHEINFO, cacheinfo),
            (rtnl.NDA_PROBES, struct.pack("=I", seq)),
        )
    )
    header = struct.pack("=IHHII", 16 + len(body) + len(attrs), rtnl.RTM_NEWNEIGH, 2, seq, 77)
    return header + body + attrs


def test_fingerprint_ignores_header_and_volatile_attributes_only() -> None:
    mac, other = bytes.fromhex("0a580a000301"), bytes.fromhex("0a580a000302")
    one = _neigh_message(1, b"\1" * 16, mac)
    assert rtnl.fingerprint(one) == rtnl.fingerprint(_neigh_message(9, b"\2" * 16, mac))
    assert rtnl.fingerprint(one) != rtnl.fingerprint(_neigh_message(1, b"\1" * 16, other))
    digest = netlink.Digest()
    digest.add(one)
    digest.add(_neigh_message(1, b"\1" * 16, other))
    assert (
        digest.value
        == (rtnl.fingerprint(one) + rtnl.fingerprint(_neigh_message(1, b"", other))) % 2**64
    )


async def test_a_batch_of_thousands_is_applied_in_chunks_and_whole(
    make_cluster: ClusterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,200 peers in one event batch (3 chunks of 500), then 1,200 replaced by as many
    new ones in one batch: every entry is written and every old one removed."""
    cluster = await make_cluster("vxlan")
    n0 = cluster.nodes[0]
    writes: list[int] = []
    apply = n0.network._nl.apply  # type: ignore[attr-defined]

    async def counting(changes: list[object]) -> object:
        writes.append(len(changes))
        return await apply(changes)

    monkeypatch.setattr(n0.network._nl, "apply", counting)  # type: ignore[attr-defined]

    def peers(first: int, count: int) -> list[Lease]:
        """/28 subnets of the cluster's Network from its 5th /24 on (the nodes' are the
        first ones), public IPs on the underlay, distinct MACs."""
        net = int(cluster.network.network_address)
        out = []
        for k in range(64 + first, 64 + first + count):
            mac = f"0a:58:00:{k >> 8:02x}:{k & 255:02x}:01"
            out.append(vxlan_lease(IPv4Network((net + (k << 4), 28)), underlay(k), mac))
        return out

    def underlay(k: int) -> IPv4Address:
        return IPv4Address(int(cluster.topo.network.network_address) + 100 + k % 100)

    first = peers(0, 1200)
    report = await n0.network.apply([LeaseEvent(EventKind.ADDED, lease) for lease in first])
    assert report.added == 3600 and not report.errors, report
    assert max(writes) <= 3 * 500 and len(writes) == 3
    second = peers(1200, 1200)
    events = [LeaseEvent(EventKind.REMOVED, lease) for lease in first]
    events += [LeaseEvent(EventKind.ADDED, lease) for lease in second]
    writes.clear()
    report = await n0.network.apply(events)
    assert (report.added, report.removed) == (3600, 3600) and not report.errors, report
    assert max(writes) <= 3 * 500
    wanted = {lease.key: lease for lease in second}
    wanted.update(cluster.peers(0))
    again = await n0.network.reconcile(wanted)
    assert again.added == again.removed == 0 and not again.errors, again
