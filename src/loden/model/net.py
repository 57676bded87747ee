"""Subnet helpers over :mod:`ipaddress`: the etcd key form and candidate ranges.

flannel names a lease key after its subnet(s): ``10.5.52.0-24`` for IPv4 and
``10.12.13.0-24&fd00:12:13::-56`` for a dual-stack node. Parsing follows flannel's
rules (IPv4 prefix 0..31 because Go parses it as a 5-bit number; IPv6 prefix 0..127)
but is anchored to the last path component, and a subnet with host bits set is
rejected: no flannel node ever writes one, so such a key is garbage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from loden.errors import SubnetKeyError

#: The IPv4 part of an IPv6-only node's lease: flannel keys it ``0.0.0.0-0&<v6>-<len>``.
NO_IPV4 = IPv4Network("0.0.0.0/0")
Network = IPv4Network | IPv6Network

_KEY_RE = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?")


def within(subnet: Network, network: Network) -> bool:
    """``subnet.subnet_of(network)`` (same family) without the broadcast address that
    ``ipaddress`` caches on both objects: kept on every lease's subnet, that cost ~400
    bytes per peer (issue 14)."""
    return subnet.prefixlen >= network.prefixlen and int(subnet.network_address) & int(
        network.netmask
    ) == int(network.network_address)


def overlap(a: Network, b: Network) -> bool:
    """``a.overlaps(b)`` (same family), without the cached broadcast addresses (see
    :func:`within`): two prefixes share addresses only if one holds the other."""
    return within(a, b) if a.prefixlen >= b.prefixlen else within(b, a)


def subnet_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """The key name (without prefix) flannel uses for a lease on these subnets."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def parse_subnet_key(key: str) -> tuple[IPv4Network, IPv6Network | None]:
    """Parse a lease key (full path or last component) into its subnet(s).

    :raises SubnetKeyError: the key is not of the form ``a.b.c.d-N[&v6-M]``.
    """
    name = key.rsplit("/", 1)[-1]
    match = _KEY_RE.fullmatch(name)
    if match is None:
        raise SubnetKeyError(key)
    v4_text, v4_len, v6_text, v6_len = match.groups()
    # Go parses the prefix lengths as 5-bit/7-bit unsigned numbers.
    if len(v4_len) > 3 or int(v4_len) > 31:
        raise SubnetKeyError(key, f"IPv4 prefix length {v4_len} is not in 0..31")
    try:
        v4 = IPv4Network(f"{v4_text}/{int(v4_len)}")
    except ValueError as exc:
        raise SubnetKeyError(key, str(exc)) from exc
    if v6_text is None:
        return v4, None
    if len(v6_len) > 4 or int(v6_len) > 127:
        raise SubnetKeyError(key, f"IPv6 prefix length {v6_len} is not in 0..127")
    try:
        v6 = IPv6Network(f"{v6_text}/{int(v6_len)}")
    except ValueError as exc:
        raise SubnetKeyError(key, str(exc)) from exc
    return v4, v6


def first_host(subnet: IPv4Network | IPv6Network) -> str:
    """``10.5.72.0/24`` -> ``10.5.72.1/24``: the gateway form written to subnet.env."""
    return f"{subnet.network_address + 1}/{subnet.prefixlen}"


def candidate_subnets(
    subnet_min: IPv4Address, subnet_max: IPv4Address, prefixlen: int
) -> Iterator[IPv4Network]:
    """Every subnet of ``prefixlen`` from ``subnet_min`` up to ``subnet_max`` inclusive."""
    step = 1 << (32 - prefixlen)
    current = int(subnet_min)
    last = int(subnet_max)
    while current <= last:
        yield IPv4Network((current, prefixlen))
        current += step


def candidate_subnets_v6(
    subnet_min: IPv6Address, subnet_max: IPv6Address, prefixlen: int
) -> Iterator[IPv6Network]:
    step = 1 << (128 - prefixlen)
    current = int(subnet_min)
    last = int(subnet_max)
    while current <= last:
        yield IPv6Network((current, prefixlen))
        current += step


def subnet_count(subnet_min: int, subnet_max: int, prefixlen: int, bits: int = 32) -> int:
    """How many subnets the range ``[min, max]`` holds (0 when min > max)."""
    if subnet_min > subnet_max:
        return 0
    return (subnet_max - subnet_min) // (1 << (bits - prefixlen)) + 1
