"""IPv6 and dual-stack: config rules per backend, keys, lease values, allocation.

The allocation cases run on the in-memory store through the real subnet manager (the
same compare-and-swap code path as etcd).
"""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from loden.errors import LeaseRevoked, NetworkConfigError, SubnetKeyError
from loden.lease_watch import LeaseWatcher
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from loden.model.net import NO_IPV4, parse_subnet_key, subnet_key
from loden.model.subnet_env import PreviousSubnets
from loden.subnet.manager import EtcdSubnetManager, parse_lease_name
from loden.subnet.memory import MemoryStore

V6ONLY = '"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/56"'
DUAL = '"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56"'


def cfg(body: str, backend: str) -> str:
    return f'{{{body},"Backend":{{"Type":"{backend}"}}}}'


# -- config: which backend serves which family -------------------------------------------


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        (cfg(DUAL, "udp"), "EnableIPv6", "udp backend is IPv4-only, as in flannel"),
        (
            '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}',
            "EnableIPv6",
            "udp backend is IPv4-only",
        ),  # no Backend: udp (flannel's code default)
        (cfg(V6ONLY, "udp"), "EnableIPv6", "IPv4-only"),
        (cfg(DUAL, "ipip"), "EnableIPv6", "ipip backend is IPv4-only"),
        (cfg(DUAL, "ipsec"), "EnableIPv6", "no IPv6 data plane for the ipsec backend"),
        # Family checks come after the field rules: a bad IPv6Network is named first.
        (cfg('"EnableIPv4":false,"EnableIPv6":true', "udp"), "IPv6Network", "correct IPv6Network"),
        (
            cfg('"EnableIPv6":true,"Network":"10.5.0.0/16","IPv6Network":"fd00::/125"', "vxlan"),
            "IPv6Network",
            "IPv6Network is too small. Minimum useful network prefix is /124",
        ),
        (
            cfg(DUAL + ',"IPv6SubnetLen":57', "wireguard"),
            "IPv6SubnetLen",
            "network must be able to accommodate at least four subnets",
        ),
        (
            cfg(DUAL + ',"IPv6SubnetMin":"fd00:11::"', "wireguard"),
            "IPv6SubnetMin",
            "IPv6SubnetMin is not in the range of the IPv6Network",
        ),
        (
            cfg(DUAL + ',"IPv6SubnetMax":"fd00:11::"', "wireguard"),
            "IPv6SubnetMax",
            "IPv6SubnetMax is not in the range of the IPv6Network",
        ),
        (
            cfg(DUAL + ',"IPv6SubnetMin":"fd00:10:0:1::1"', "wireguard"),
            "IPv6SubnetMin",
            "IPv6SubnetMin is not on a SubnetLen boundary: fd00:10:0:1::1",
        ),
        (
            cfg(DUAL + ',"IPv6SubnetMax":"fd00:10:0:2::1"', "wireguard"),
            "IPv6SubnetMax",
            "IPv6SubnetMax is not on a SubnetLen boundary: fd00:10:0:2::1",
        ),
        (cfg(DUAL + ',"IPv6Network":"10.0.0.0/8"', "wireguard"), "IPv6Network", "invalid IPv6"),
        (cfg(DUAL + ',"IPv6SubnetMin":"10.0.0.1"', "wireguard"), "IPv6SubnetMin", "invalid IPv6"),
        (cfg('"EnableIPv4":false,"EnableIPv6":false', "vxlan"), "EnableIPv4", "at least one"),
    ],
)
def test_ipv6_config_errors(text: str, field: str, fragment: str) -> None:
    with pytest.raises(NetworkConfigError) as info:
        NetworkConfig.parse(text)
    assert fragment in str(info.value)
    assert info.value.field == field


@pytest.mark.parametrize("backend", ["vxlan", "host-gw", "wireguard", "alloc", "VXLAN"])
@pytest.mark.parametrize("body", [DUAL, V6ONLY])
def test_ipv6_backends_accepted(body: str, backend: str) -> None:
    config = NetworkConfig.parse(cfg(body, backend))
    assert config.enable_ipv6 and config.ipv6_subnet_len == 64
    assert config.ipv6_subnet_min == IPv6Address("fd00:10:0:1::")
    assert config.ipv6_subnet_max == IPv6Address("fd00:10:0:ff::")


@pytest.mark.parametrize(
    ("extra", "length", "lo", "hi"),
    [
        ("", 64, "fd00:10:0:1::", "fd00:10:0:ff::"),
        (',"IPv6SubnetLen":60', 60, "fd00:10:0:10::", "fd00:10:0:f0::"),
        (',"IPv6SubnetLen":124', 124, "fd00:10::10", "fd00:10:0:ff:ffff:ffff:ffff:fff0"),
        (
            ',"IPv6SubnetMin":"::","IPv6SubnetMax":"fd00:10:0:9::"',
            64,
            "fd00:10:0:1::",
            "fd00:10:0:9::",
        ),
    ],
)
def test_ipv6_defaults(extra: str, length: int, lo: str, hi: str) -> None:
    config = NetworkConfig.parse(cfg(DUAL + extra, "wireguard"))
    assert (config.ipv6_subnet_len, config.ipv6_subnet_min, config.ipv6_subnet_max) == (
        length,
        IPv6Address(lo),
        IPv6Address(hi),
    )


def test_ipv6_small_network_derives_prefix_plus_two() -> None:
    config = NetworkConfig.parse(
        cfg('"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::1234/120"', "wireguard")
    )
    assert config.ipv6_network == IPv6Network("fd00::1200/120")  # host bits masked
    assert config.ipv6_subnet_len == 122


def test_ipv6_disabled_ignores_ipv6_fields() -> None:
    config = NetworkConfig.parse('{"Network":"10.5.0.0/16","IPv6Network":"fd00::/125"}')
    assert not config.enable_ipv6 and config.ipv6_subnet_len == 0


# -- keys and values, both ways -----------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "v4", "v6"),
    [
        ("10.12.13.0-24&fd00:12:13::-56", "10.12.13.0/24", "fd00:12:13::/56"),
        ("0.0.0.0-0&fd00:10:0:7::-64", "0.0.0.0/0", "fd00:10:0:7::/64"),
        ("10.5.7.0-24", "10.5.7.0/24", None),
    ],
)
def test_dual_and_v6_only_keys_round_trip(key: str, v4: str, v6: str | None) -> None:
    subnet, subnet6 = parse_lease_name(key)
    assert subnet == IPv4Network(v4)
    assert subnet6 == (IPv6Network(v6) if v6 else None)
    assert subnet_key(subnet, subnet6) == key
    assert parse_subnet_key(f"/coreos.com/network/subnets/{key}") == (subnet, subnet6)


@pytest.mark.parametrize(
    "key",
    ["10.12.13.0-24&FD00::-56", "10.12.13.0-24&fd00:0::-56", "10.12.13.0-24&fd00::1-56"],
)
def test_non_canonical_v6_keys_are_refused(key: str) -> None:
    with pytest.raises(SubnetKeyError):
        parse_lease_name(key)


@pytest.mark.parametrize(
    ("raw", "legacy"),
    [
        # v3 era: PublicIPv6 always present; vxlan dual-stack carries both VtepMACs.
        (
            '{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"vxlan",'
            '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"},'
            '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}}',
            False,
        ),
        # IPv6-only: PublicIP 0.0.0.0, no BackendData.
        (
            '{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::2","BackendType":"vxlan",'
            '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:03"}}',
            False,
        ),
        ('{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"host-gw"}', False),
        # v2 era (v0.15-v0.17): PublicIPv6 only when set; the writer keeps that form.
        ('{"PublicIP":"10.0.0.1","BackendType":"host-gw"}', True),
        ('{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"host-gw"}', True),
    ],
)
def test_v6_lease_values_round_trip_byte_exact(raw: str, legacy: bool) -> None:
    attrs = LeaseAttrs.parse(raw)
    assert attrs.to_json(legacy=legacy) == raw


def test_v6_value_with_null_and_go_case_insensitive_keys() -> None:
    attrs = LeaseAttrs.parse(
        '{"publicip":"10.0.0.1","publicipv6":"FD00:0::1","backendv6data":{"VtepMAC":"x"}}'
    )
    assert attrs.public_ipv6 == IPv6Address("fd00::1")
    assert attrs.v6_data() == {"VtepMAC": "x"}
    assert '"PublicIPv6":"fd00::1"' in attrs.to_json()  # Go's canonical text on the way out


# -- allocation ---------------------------------------------------------------------------


def v6_attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address("0.0.0.0"), "vxlan", public_ipv6=IPv6Address(f"fd99::{n}"))


def dual_attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(
        IPv4Address(f"192.168.1.{n}"), "wireguard", public_ipv6=IPv6Address(f"fd99::{n}")
    )


async def manager(config: str, seed: int = 1) -> tuple[MemoryStore, EtcdSubnetManager]:
    store = MemoryStore()
    await store.put_config(config.encode())
    return store, EtcdSubnetManager(store, rng=random.Random(seed))


async def test_dual_stack_both_families_in_one_key() -> None:
    store, m = await manager(cfg(DUAL, "wireguard"))
    leases = [await m.acquire_lease(dual_attrs(n), PreviousSubnets()) for n in range(1, 6)]
    keys = [kv.name for kv in (await store.list()).kvs]
    assert sorted(keys) == sorted(lease.key for lease in leases)
    assert all("&fd00:10:0:" in key and key.endswith("-64") for key in keys)
    assert len({lease.subnet for lease in leases}) == 5
    assert len({lease.ipv6_subnet for lease in leases}) == 5
    again = await m.acquire_lease(dual_attrs(3), PreviousSubnets())
    assert again.same_subnets(leases[2])


async def test_v6_only_nodes_get_their_own_leases_not_the_first_one() -> None:
    # flannel matched PublicIP 0.0.0.0, so node 2 "reused" node 1's lease (spec §3.4).
    store, m = await manager(cfg(V6ONLY, "wireguard"))
    first = await m.acquire_lease(v6_attrs(1), PreviousSubnets())
    second = await m.acquire_lease(v6_attrs(2), PreviousSubnets())
    assert first.subnet == second.subnet == NO_IPV4
    assert first.ipv6_subnet != second.ipv6_subnet
    assert first.key.startswith("0.0.0.0-0&fd00:10:0:")
    assert (await m.acquire_lease(v6_attrs(1), PreviousSubnets())).key == first.key
    assert len((await store.list()).kvs) == 2
    # Renewal recognises our own lease by the IPv6 public IP, not by 0.0.0.0.
    await m.renew_lease(first)
    current = await store.get(second.key)
    assert current is not None
    await store.update(second.key, v6_attrs(9).to_json().encode(), 60, expect_value=current.value)
    with pytest.raises(LeaseRevoked, match="fd99::9"):
        await m.renew_lease(second)


async def test_v6_only_previous_subnet_is_preferred_when_free() -> None:
    _, m = await manager(cfg(V6ONLY, "wireguard"))
    prev = PreviousSubnets(ipv6_subnet=IPv6Network("fd00:10:0:42::/64"))
    got = await m.acquire_lease(v6_attrs(1), prev)
    assert got.ipv6_subnet == IPv6Network("fd00:10:0:42::/64")
    other = await m.acquire_lease(v6_attrs(2), prev)
    assert other.ipv6_subnet != got.ipv6_subnet


async def test_stale_v6_only_lease_does_not_block_ipv4_allocation() -> None:
    # 0.0.0.0/0 overlaps every IPv4 candidate; it must not count as taken.
    store, m = await manager(cfg(DUAL, "wireguard"))
    stale = LeaseAttrs(IPv4Address("0.0.0.0"), "wireguard", public_ipv6=IPv6Address("fd99::7"))
    await store.create("0.0.0.0-0&fd00:10:0:5::-64", stale.to_json().encode(), 60)
    got = await m.acquire_lease(dual_attrs(1), PreviousSubnets())
    assert got.subnet.subnet_of(IPv4Network("10.5.0.0/16"))
    assert got.ipv6_subnet != IPv6Network("fd00:10:0:5::/64")


async def test_v4_only_lease_is_stale_for_a_dual_stack_config() -> None:
    store, m = await manager(cfg(DUAL, "wireguard"))
    await store.create("10.5.9.0-24", dual_attrs(1).to_json().encode(), 60)
    got = await m.acquire_lease(dual_attrs(1), PreviousSubnets())
    assert got.ipv6_subnet is not None
    assert [kv.name for kv in (await store.list()).kvs] == [got.key]


# -- peers --------------------------------------------------------------------------------


def test_watcher_keeps_v6_only_peers_and_filters_only_our_own() -> None:
    def v6_lease(n: int) -> Lease:
        return Lease(NO_IPV4, v6_attrs(n), IPv6Network(f"fd00:10:0:{n}::/64"))

    w = LeaseWatcher(v6_lease(1), None)
    events = w.reset([v6_lease(1), v6_lease(2), v6_lease(3)])
    assert sorted(e.lease.key for e in events) == [
        "0.0.0.0-0&fd00:10:0:2::-64",
        "0.0.0.0-0&fd00:10:0:3::-64",
    ]
    gone = w.update(
        [LeaseEvent(EventKind.REMOVED, Lease(NO_IPV4, v6_attrs(0), v6_lease(2).ipv6_subnet))]
    )
    assert [(e.kind, e.lease.attrs.public_ipv6) for e in gone] == [
        (EventKind.REMOVED, IPv6Address("fd99::2"))
    ]


def test_watcher_refuses_ipv6_subnets_outside_ipv6network(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net6 = IPv6Network("fd00:10::/56")
    own = Lease(IPv4Network("10.5.1.0/24"), dual_attrs(1), IPv6Network("fd00:10:0:1::/64"))
    inside = Lease(IPv4Network("10.5.2.0/24"), dual_attrs(2), IPv6Network("fd00:10:0:2::/64"))
    hostile = Lease(IPv4Network("10.5.3.0/24"), dual_attrs(3), IPv6Network("::/0"))
    w = LeaseWatcher(own, IPv4Network("10.5.0.0/16"), net6)
    events = w.reset([own, inside, hostile, hostile])
    assert [e.lease.key for e in events] == [inside.key]
    assert sum("outside IPv6Network" in r.getMessage() for r in caplog.records) == 1
    # IPv6 disabled: the IPv6 part is never programmed, so it is not checked either.
    assert len(LeaseWatcher(own, IPv4Network("10.5.0.0/16")).reset([inside, hostile])) == 2
