"""Allocation policy: which subnet a node should hold (pure; spec §3.4).

Order, as in flannel: (1) a lease already carrying our public IP, if it fits the
config; (2) the subnet we had before (from subnet.env), only if no lease holds it;
(3) a random free subnet among the first 100 free candidates. Unlike flannel, the
caller claims the result with a compare-and-swap and, when the swap is lost, asks
again: no exit, no duplicates. Local state is never trusted over the store (user
pain point 3): the previous subnet is only a preference.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from loden.errors import SubnetsExhausted
from loden.model.config import NetworkConfig
from loden.model.lease import Lease, LeaseAttrs
from loden.model.net import NO_IPV4, candidate_subnets, candidate_subnets_v6
from loden.model.subnet_env import PreviousSubnets

CANDIDATE_WINDOW = 100
_UNSET_IP = IPv4Address("0.0.0.0")


@dataclass(frozen=True, slots=True)
class Reuse:
    """Take over the existing lease ``lease`` (ours by public IP)."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class Fresh:
    """Create a new lease on these subnets."""

    subnet: IPv4Network
    ipv6_subnet: IPv6Network | None
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    choice: Reuse | Fresh
    #: Leases with our public IP that no longer fit the config: delete them first.
    stale_own: tuple[Lease, ...] = ()
    #: Other leases that also claim our public IP (an operator should look at them).
    duplicates_of_ours: tuple[Lease, ...] = ()


def same_owner(ours: LeaseAttrs, other: LeaseAttrs) -> bool:
    """Do these attrs name the same node? By IPv4 public IP, as flannel; an IPv6-only
    node (PublicIP ``0.0.0.0``) by its IPv6 public IP. flannel matched ``0.0.0.0`` there,
    so every IPv6-only node took over the first IPv6-only lease (spec §3.4, §11 item 15).
    """
    if ours.public_ip != _UNSET_IP:
        return other.public_ip == ours.public_ip
    return ours.public_ipv6 is not None and other.public_ipv6 == ours.public_ipv6


def _is_ours(lease: Lease, attrs: LeaseAttrs) -> bool:
    return same_owner(attrs, lease.attrs)


def fits(config: NetworkConfig, lease: Lease) -> bool:
    if config.enable_ipv4:
        v4_ok = config.contains_v4(lease.subnet)
    else:  # IPv6-only: the key's IPv4 part must be empty (``0.0.0.0-0``)
        v4_ok = lease.subnet == NO_IPV4
    return v4_ok and config.contains_v6(lease.ipv6_subnet)


def plan(
    config: NetworkConfig,
    leases: Sequence[Lease],
    attrs: LeaseAttrs,
    previous: PreviousSubnets,
    *,
    rng: random.Random,
    exclude: frozenset[IPv4Network | IPv6Network] = frozenset(),
    window: int = CANDIDATE_WINDOW,
) -> Plan:
    """Decide what to claim. ``exclude`` lists subnets just lost in a race or held by
    keys whose value does not parse; ``window``
    is how many free candidates to choose among (flannel: 100; widened after lost
    races so that a storm of starting nodes spreads out instead of colliding).

    :raises SubnetsExhausted: nothing is free; the message says how many nodes fit.
    """
    ours = [lease for lease in leases if _is_ours(lease, attrs)]
    fitting = [lease for lease in ours if fits(config, lease)]
    stale = tuple(lease for lease in ours if not fits(config, lease))
    if fitting:
        # Prefer the one matching our previous subnet when several claim our IP.
        fitting.sort(key=lambda lease: lease.subnet != previous.subnet)
        return Plan(Reuse(fitting[0]), stale, tuple(fitting[1:]))

    # An IPv6-only lease's IPv4 part (0.0.0.0/0) overlaps everything but holds nothing.
    taken_v4 = [lease.subnet for lease in leases if lease not in stale and lease.subnet != NO_IPV4]
    taken_v6 = [
        lease.ipv6_subnet
        for lease in leases
        if lease.ipv6_subnet is not None and lease not in stale
    ]

    if not config.enable_ipv4:
        return _plan_v6_only(config, taken_v6, previous, stale, attrs, rng, exclude, window)

    prev = previous.subnet
    if (
        prev is not None
        and prev not in exclude
        and config.contains_v4(prev)
        and not any(prev.overlaps(t) for t in taken_v4)
    ):
        prev6 = previous.ipv6_subnet if config.enable_ipv6 else None
        if config.enable_ipv6 and (
            prev6 is None
            or not config.contains_v6(prev6)
            or any(prev6.overlaps(t) for t in taken_v6)
        ):
            prev6 = _pick_v6(config, taken_v6, rng, salt=_salt(attrs), exclude=exclude)
        return Plan(Fresh(prev, prev6, f"previous subnet {prev} from the subnet file"), stale)

    free: list[IPv4Network] = []
    assert config.subnet_min is not None and config.subnet_max is not None
    # Leases normally share SubnetLen: a set lookup keeps thousands of leases cheap; only
    # odd-sized ones (a changed SubnetLen, a hand-made key) need the overlap test.
    same_size = {t for t in taken_v4 if t.prefixlen == config.subnet_len}
    odd_size = [t for t in taken_v4 if t.prefixlen != config.subnet_len]
    for candidate in candidate_subnets(config.subnet_min, config.subnet_max, config.subnet_len):
        if (
            candidate in exclude
            or candidate in same_size
            or any(candidate.overlaps(t) for t in odd_size)
        ):
            continue
        free.append(candidate)
        if len(free) >= window:
            break
    if not free:
        raise SubnetsExhausted(
            f"out of subnets: all {config.subnet_capacity()} /{config.subnet_len} subnets of "
            f"Network {config.network} between SubnetMin {config.subnet_min} and SubnetMax "
            f"{config.subnet_max} are leased ({len(leases)} leases); enlarge Network, raise "
            "SubnetLen or remove stale leases (loden leases)"
        )
    v6 = (
        _pick_v6(config, taken_v6, rng, salt=_salt(attrs), exclude=exclude, window=window)
        if config.enable_ipv6
        else None
    )
    pick = free[(rng.randrange(len(free)) + _salt(attrs)) % len(free)]
    return Plan(Fresh(pick, v6, "random free subnet"), stale)


def _salt(attrs: LeaseAttrs) -> int:
    """Salting the random pick with our own address decorrelates nodes whose generators
    happen to agree (same seed, same start second): they then rarely race at all."""
    return int(attrs.public_ip) or int(attrs.public_ipv6 or 0)


def _plan_v6_only(
    config: NetworkConfig,
    taken: Sequence[IPv6Network],
    previous: PreviousSubnets,
    stale: tuple[Lease, ...],
    attrs: LeaseAttrs,
    rng: random.Random,
    exclude: frozenset[IPv4Network | IPv6Network],
    window: int,
) -> Plan:
    """IPv6-only (``EnableIPv4: false``): the key is ``0.0.0.0-0&<v6>-<len>``, as flannel's."""
    prev6 = previous.ipv6_subnet
    if (
        prev6 is not None
        and prev6 not in exclude
        and config.contains_v6(prev6)
        and not any(prev6.overlaps(t) for t in taken)
    ):
        return Plan(Fresh(NO_IPV4, prev6, f"previous subnet {prev6} from the subnet file"), stale)
    pick = _pick_v6(config, taken, rng, salt=_salt(attrs), exclude=exclude, window=window)
    return Plan(Fresh(NO_IPV4, pick, "random free subnet"), stale)


def _pick_v6(
    config: NetworkConfig,
    taken: Sequence[IPv6Network],
    rng: random.Random,
    *,
    salt: int = 0,
    exclude: frozenset[IPv4Network | IPv6Network] = frozenset(),
    window: int = CANDIDATE_WINDOW,
) -> IPv6Network:
    assert config.ipv6_subnet_min is not None and config.ipv6_subnet_max is not None
    same_size = {t for t in taken if t.prefixlen == config.ipv6_subnet_len}
    odd_size = [t for t in taken if t.prefixlen != config.ipv6_subnet_len]
    free: list[IPv6Network] = []
    for candidate in candidate_subnets_v6(
        config.ipv6_subnet_min, config.ipv6_subnet_max, config.ipv6_subnet_len
    ):
        if (
            candidate in exclude
            or candidate in same_size
            or any(candidate.overlaps(t) for t in odd_size)
        ):
            continue
        free.append(candidate)
        if len(free) >= window:
            break
    if not free:
        raise SubnetsExhausted(
            f"out of IPv6 subnets: every /{config.ipv6_subnet_len} of IPv6Network "
            f"{config.ipv6_network} between IPv6SubnetMin {config.ipv6_subnet_min} and "
            f"IPv6SubnetMax {config.ipv6_subnet_max} is leased; enlarge IPv6Network, raise "
            "IPv6SubnetLen or remove stale leases (loden leases)"
        )
    return free[(rng.randrange(len(free)) + salt) % len(free)]
