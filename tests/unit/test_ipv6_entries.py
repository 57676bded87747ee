"""What each IPv6 peer needs (vxlan, host-gw) and which IPv6 routes Loden owns: pure,
no kernel (``_entries_for`` reads only the lease, the lookups and the device indexes)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import cast

import pytest

from loden.backend.base import BackendContext, ExternalInterface
from loden.backend.hostgw import HostGwBackend, HostGwNetwork
from loden.backend.routes import IPV6_METRIC, Conflict, owned_route
from loden.backend.vxlan import VxlanBackend, VxlanNetwork
from loden.errors import BackendError
from loden.kernel.netlink import (
    RTPROT_BOOT,
    RTPROT_LODEN,
    FdbEntry,
    IPAddress,
    Neighbour,
    Netlink,
    Route,
    RouteLookup,
)
from loden.model.config import NetworkConfig
from loden.model.lease import Lease, LeaseAttrs
from loden.model.net import NO_IPV4

EXT = ExternalInterface(
    "eth0",
    2,
    1500,
    IPv4Address("192.0.2.10"),
    IPv4Address("192.0.2.10"),
    IPv6Address("2001:db8::10"),
    IPv6Address("2001:db8::10"),
)
NET6 = IPv6Network("fd00:5::/56")
OWN6 = IPv6Network("fd00:5:0:1::/64")
PEER6 = IPv6Network("fd00:5:0:2::/64")
MAC4, MAC6 = "02:00:00:00:00:04", "02:00:00:00:00:06"


def ctx(backend: str, *, ipv4: bool = True, tmp: Path = Path("/nonexistent")) -> BackendContext:
    v4 = '"Network":"10.5.0.0/16",' if ipv4 else '"EnableIPv4":false,'
    text = f'{{{v4}"EnableIPv6":true,"IPv6Network":"{NET6}","Backend":{backend}}}'
    return BackendContext(NetworkConfig.parse(text), EXT, tmp)


def own(ipv4: bool = True) -> Lease:
    subnet = IPv4Network("10.5.1.0/24") if ipv4 else NO_IPV4
    attrs = LeaseAttrs(EXT.ext_addr or IPv4Address(0), "vxlan", public_ipv6=EXT.ext_v6_addr)
    return Lease(subnet, attrs, OWN6)


def peer(kind: str = "vxlan", *, v6_data: str | None = None, ipv4: bool = True) -> Lease:
    data = f'{{"VNI":1,"VtepMAC":"{MAC4}"}}' if ipv4 and kind == "vxlan" else None
    if v6_data is None and kind == "vxlan":
        v6_data = f'{{"VNI":1,"VtepMAC":"{MAC6}"}}'
    attrs = LeaseAttrs(
        IPv4Address("192.0.2.20") if ipv4 else IPv4Address(0),
        kind,
        data,
        IPv6Address("2001:db8::20"),
        v6_data,
    )
    return Lease(IPv4Network("10.5.2.0/24") if ipv4 else NO_IPV4, attrs, PEER6)


def vxlan(backend: str = '{"Type":"vxlan"}', *, ipv4: bool = True) -> VxlanNetwork:
    net = VxlanNetwork(cast(Netlink, None), own(ipv4), VxlanBackend(ctx(backend, ipv4=ipv4)))
    net._index, net._index6 = (7, 8) if ipv4 else (0, 8)
    return net


def test_vxlan_dual_stack_peer_gets_both_families() -> None:
    entries = vxlan()._entries_for(peer(), {})
    assert isinstance(entries, tuple)
    assert set(entries) == {
        Neighbour(7, IPv4Address("10.5.2.0"), MAC4),
        FdbEntry(7, MAC4, IPv4Address("192.0.2.20")),
        Route(IPv4Network("10.5.2.0/24"), IPv4Address("10.5.2.0"), 7, onlink=True),
        Neighbour(8, PEER6.network_address, MAC6),
        FdbEntry(8, MAC6, IPv6Address("2001:db8::20")),
        Route(PEER6, PEER6.network_address, 8, onlink=True, priority=IPV6_METRIC),
    }


def test_vxlan_direct_routing_v6() -> None:
    net = vxlan('{"Type":"vxlan","DirectRouting":true}')
    ip6 = IPv6Address("2001:db8::20")
    lookups: dict[IPAddress, RouteLookup | None] = {ip6: RouteLookup(ip6, 2, None, None)}
    entries = net._entries_for(peer(), lookups)
    assert isinstance(entries, tuple)
    assert Route(PEER6, ip6, 2, priority=IPV6_METRIC) in entries
    assert not any(isinstance(e, Neighbour) and e.ifindex == 8 for e in entries)


def test_vxlan_bad_v6_data_keeps_ipv4_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    net = vxlan()
    bad = peer(v6_data='{"VtepMAC":"zz"}')
    for _ in range(3):
        entries = net._entries_for(bad, {})
        assert isinstance(entries, tuple) and len(entries) == 3
        assert all(getattr(e, "ifindex", getattr(e, "oif", None)) == 7 for e in entries)
    warned = [r for r in caplog.records if "BackendV6Data" in r.getMessage()]
    assert len(warned) == 1 and "its other family is programmed" in warned[0].getMessage()


def test_vxlan_peer_with_neither_family_is_skipped() -> None:
    lease = peer(v6_data='{"VtepMAC":"zz"}')
    lease = Lease(
        lease.subnet,
        LeaseAttrs(lease.attrs.public_ip, "vxlan", '{"x":1}', lease.attrs.public_ipv6, "{}"),
        lease.ipv6_subnet,
    )
    reason = vxlan()._entries_for(lease, {})
    assert isinstance(reason, str) and "BackendData" in reason and "BackendV6Data" in reason


def test_vxlan_v6_only_programs_only_the_v6_device() -> None:
    net = vxlan(ipv4=False)
    entries = net._entries_for(peer(ipv4=False), {})
    assert isinstance(entries, tuple) and len(entries) == 3
    assert all(
        isinstance(e.dst, IPv6Address | IPv6Network) for e in entries if not isinstance(e, FdbEntry)
    )
    assert net.accepts(peer(ipv4=False)) and not net.accepts(own(ipv4=False))


def test_vxlan_own_v6_mac_from_another_node_is_a_conflict() -> None:
    net = vxlan()
    net._mac6 = MAC6
    result = net._entries_for(peer(), {})
    assert isinstance(result, Conflict) and "flannel-v6.1" in result.reason


def test_vxlan_v6_device_mtu_and_names(tmp_path: Path) -> None:
    be = VxlanBackend(ctx('{"Type":"vxlan","VNI":3}', tmp=tmp_path))
    assert [(v.name, v.mtu, v.spec.local) for v in be.vteps] == [
        ("flannel.3", 1450, EXT.ext_addr),
        ("flannel-v6.3", 1430, EXT.ext_v6_addr),
    ]
    assert be.mtu == 1450  # FLANNEL_MTU stays flannel's
    only = VxlanBackend(ctx('{"Type":"vxlan"}', ipv4=False, tmp=tmp_path))
    assert [v.name for v in only.vteps] == ["flannel-v6.1"] and only.mtu == 1430


def test_hostgw_v6_routes_and_adjacency() -> None:
    net = HostGwNetwork(cast(Netlink, None), own(), ctx('{"Type":"host-gw"}'))
    ip4, ip6 = IPv4Address("192.0.2.20"), IPv6Address("2001:db8::20")
    lookups: dict[IPAddress, RouteLookup | None] = {
        ip4: RouteLookup(ip4, 2, None, None),
        ip6: RouteLookup(ip6, 2, None, None),
    }
    entries = net._entries_for(peer("host-gw"), lookups)
    assert entries == (
        Route(IPv4Network("10.5.2.0/24"), ip4, 2),
        Route(PEER6, ip6, 2, priority=IPV6_METRIC),
    )
    lookups[ip6] = RouteLookup(ip6, 2, IPv6Address("2001:db8::1"), None)
    entries = net._entries_for(peer("host-gw"), lookups)
    assert entries == (Route(IPv4Network("10.5.2.0/24"), ip4, 2),)


def test_hostgw_refuses_public_ipv6_behind_nat() -> None:
    nat = ExternalInterface(
        "eth0", 2, 1500, EXT.iface_addr, EXT.ext_addr, EXT.iface_v6_addr, IPv6Address("2001::1")
    )
    config = ctx('{"Type":"host-gw"}').config
    with pytest.raises(BackendError, match="public IPv6 2001::1"):
        HostGwBackend(BackendContext(config, nat, Path("/nonexistent")))


@pytest.mark.parametrize(
    ("route", "owned"),
    [
        (Route(PEER6, PEER6.network_address, 8, onlink=True, priority=1024), True),
        (Route(OWN6, None, 8, priority=1024), False),  # our own subnet
        (Route(NET6, None, 8, priority=1024), False),  # the whole IPv6Network
        (Route(IPv6Network("fd99::/64"), None, 8, priority=1024), False),  # outside
        (Route(PEER6, None, 8, protocol=RTPROT_BOOT, priority=1024), False),  # not ours
        (Route(IPv4Network("10.5.2.0/24"), None, 7), True),
    ],
)
def test_owned_routes_per_family(route: Route, owned: bool) -> None:
    config = ctx('{"Type":"vxlan"}').config
    assert owned_route(route, config, IPv4Network("10.5.1.0/24"), OWN6) is owned
    v4_only = NetworkConfig.parse('{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}')
    if isinstance(route.dst, IPv6Network):
        assert not owned_route(route, v4_only, IPv4Network("10.5.1.0/24"))
    assert route.protocol in (RTPROT_LODEN, RTPROT_BOOT)
