"""Fuzzing what peer leases turn into (chaos issue, scenario 9).

A lease that parses can still carry anything an etcd writer chose: any subnet, any
public IP, any backend type, any BackendData. Whatever the mix, the peer set and the
kernel entries derived from it must be computed without an exception, only for leases
inside the Network, never for our own subnet, and a vxlan peer gets entries only with a
well-formed VtepMAC (otherwise one reason, not an error).
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from loden.backend.base import BackendContext, ExternalInterface
from loden.backend.hostgw import HostGwNetwork
from loden.backend.vxlan import VxlanBackend, VxlanNetwork
from loden.kernel.netlink import FdbEntry, IPAddress, Neighbour, Netlink, Route
from loden.kernel.types import RouteLookup
from loden.lease_watch import LeaseWatcher
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent

NETWORK = IPv4Network("10.5.0.0/16")
EXT = ExternalInterface("eth0", 2, 1500, IPv4Address("192.0.2.10"), IPv4Address("192.0.2.10"))
OWN = Lease(
    IPv4Network("10.5.1.0/24"),
    LeaseAttrs(EXT.ext_addr or IPv4Address("192.0.2.10"), "vxlan", '{"VNI":1}'),
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
MACS = st.sampled_from(
    ["0a:58:0a:05:02:00", "0A-58-0A-05-02-00", "zz", "", "0a:58:0a:05:02", "ff:ff:ff:ff:ff:ff"]
) | st.text(max_size=20)
BACKEND_DATA = st.one_of(
    st.none(),
    JSON.map(json.dumps),
    st.builds(
        lambda vni, mac: json.dumps({"VNI": vni, "VtepMAC": mac}),
        st.integers(-1, 2**25) | st.text(max_size=3),
        MACS,
    ),
    st.text(max_size=30),  # not even JSON: the parser never stores that, but be sure
)


@st.composite
def leases(draw: st.DrawFn) -> Lease:
    inside = draw(st.booleans())
    prefix = draw(st.integers(16, 30))
    base = draw(st.integers(0, 2**32 - 1)) if not inside else int(NETWORK.network_address)
    offset = draw(st.integers(0, 2**16 - 1)) if inside else 0
    subnet = IPv4Network((base + offset, prefix), strict=False)
    if draw(st.integers(0, 9)) == 0:
        subnet = OWN.subnet
    ip = IPv4Address(draw(st.sampled_from([0, int(EXT.ext_addr or 0)]) | st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["vxlan", "host-gw", "udp", "", "VXLAN", "wireguard"]))
    return Lease(subnet, LeaseAttrs(ip, kind, draw(BACKEND_DATA)))


def context(backend: str) -> BackendContext:
    config = NetworkConfig.parse(
        json.dumps({"Network": str(NETWORK), "Backend": {"Type": backend}})
    )
    return BackendContext(config, EXT, Path("/nonexistent"))


@settings(max_examples=400, deadline=None)
@given(st.lists(leases(), max_size=8), st.lists(st.tuples(st.booleans(), leases()), max_size=8))
def test_peer_set_and_entries_from_any_leases(
    snapshot: list[Lease], updates: list[tuple[bool, Lease]]
) -> None:
    watcher = LeaseWatcher(OWN, NETWORK)
    watcher.reset(snapshot)
    watcher.update(
        LeaseEvent(EventKind.ADDED if added else EventKind.REMOVED, lease)
        for added, lease in updates
    )
    peers = dict(watcher.peers)
    for key, lease in peers.items():
        assert key == lease.key and lease.subnet.subnet_of(NETWORK)
        assert lease.subnet != OWN.subnet

    nl = cast(Netlink, None)  # _entries_for needs no kernel
    vxlan = VxlanNetwork(nl, OWN, VxlanBackend(context("vxlan")))
    hostgw = HostGwNetwork(nl, OWN, context("host-gw"))
    lookups: dict[IPAddress, RouteLookup | None] = {
        lease.attrs.public_ip: RouteLookup(lease.attrs.public_ip, 2, None, None)
        for lease in peers.values()
        if int(lease.attrs.public_ip) % 2
    }
    for lease in peers.values():
        for network in (vxlan, hostgw):
            if not network.accepts(lease):
                continue
            result = network._entries_for(lease, lookups)
            if isinstance(result, str):
                assert "\n" not in result and len(result) < 600, result
                continue
            assert isinstance(result, tuple), result  # no fuzzed peer has our own MAC
            for entry in result:
                assert isinstance(entry, Route | Neighbour | FdbEntry)
                if isinstance(entry, Route):
                    assert entry.dst == lease.subnet
                else:
                    assert entry.lladdr is not None and len(entry.lladdr.split(":")) == 6
