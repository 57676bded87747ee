"""`loden doctor`'s overlapping-leases check, on hand-made leases."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network

from loden.doctor.leases import overlapping
from loden.model.lease import Lease, LeaseAttrs
from loden.model.net import NO_IPV4


def lease(v4: str | None, v6: str | None = None, n: int = 1) -> Lease:
    subnet = IPv4Network(v4) if v4 is not None else NO_IPV4
    attrs = LeaseAttrs(IPv4Address(f"192.0.2.{n}"), "vxlan")
    return Lease(subnet, attrs, IPv6Network(v6) if v6 is not None else None)


def keys(pairs: list[tuple[Lease, Lease]]) -> set[tuple[str, str]]:
    return {(a.key, b.key) for a, b in pairs}


def test_same_ipv4_subnet_under_two_dual_stack_keys() -> None:
    a = lease("10.5.3.0/24", "fd00:5:0:1::/64", 1)
    b = lease("10.5.3.0/24", "fd00:5:0:2::/64", 2)
    c = lease("10.5.4.0/24", "fd00:5:0:3::/64", 3)
    assert keys(overlapping([c, b, a])) in ({(a.key, b.key)}, {(b.key, a.key)})


def test_same_ipv6_subnet_and_containment() -> None:
    a = lease("10.5.3.0/24", "fd00:5:0:1::/64", 1)
    b = lease("10.5.4.0/24", "fd00:5:0:1::/64", 2)
    wide = lease("10.6.0.0/16", None, 3)
    inner = lease("10.6.200.0/24", None, 4)
    between = lease("10.6.7.0/24", None, 5)
    found = keys(overlapping([a, b, wide, between, inner]))
    assert len(found) == 3
    assert {frozenset(p) for p in found} == {
        frozenset((a.key, b.key)),
        frozenset((wide.key, between.key)),
        frozenset((wide.key, inner.key)),
    }


def test_ipv6_only_leases_share_no_ipv4_part() -> None:
    leases = [lease(None, f"fd00:5:0:{i}::/64", i) for i in range(1, 5)]
    assert overlapping(leases) == []
