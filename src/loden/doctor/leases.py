"""Leases in etcd: one public IP, VTEP MAC or WireGuard key on two leases; two leases
on overlapping subnets; our lease close to expiry (pain points 2, 7, 11, 19)."""

from __future__ import annotations

import time
from collections import defaultdict
from ipaddress import IPv4Network, IPv6Network

from loden.backend import identity
from loden.backend.vxlan import peer_mac
from loden.backend.wireguard_peers import lease_keys
from loden.doctor.base import Context, Finding
from loden.model.lease import Lease


def _values(lease: Lease) -> dict[str, str]:
    out = {"public IP": str(lease.attrs.public_ip)}
    mac = peer_mac(lease)
    if mac is not None:
        out["VTEP MAC"] = mac
    if lease.attrs.backend_type == "wireguard":
        for key in sorted(lease_keys(lease)):
            out["WireGuard key"] = key
    return out


def duplicates(leases: list[Lease]) -> dict[tuple[str, str], list[Lease]]:
    """(what, value) -> the leases sharing it, for every value held by two or more.

    A VTEP MAC or key counts only when held by leases of two public IPs (the identity
    rule of :mod:`loden.backend.identity`: a node's own older lease is no twin).
    """
    seen: dict[tuple[str, str], list[Lease]] = defaultdict(list)
    for lease in leases:
        for what, value in _values(lease).items():
            seen[(what, value)].append(lease)
    out: dict[tuple[str, str], list[Lease]] = {}
    for (what, value), group in seen.items():
        ips = {lease.attrs.public_ip for lease in group}
        if len(group) > 1 and (what == "public IP" or len(ips) > 1):
            out[(what, value)] = group
    return out


async def check_duplicates(ctx: Context) -> list[Finding]:
    findings: list[Finding] = []
    own = ctx.own
    for (what, value), leases in sorted(duplicates(ctx.store.leases).items()):
        keys = identity.describe(sorted(leases, key=lambda le: le.key))
        mine = own is not None and own in leases
        where = " (one of them is this node's)" if mine else ""
        fix = {
            "public IP": "give each node its own address (-public-ip or -iface, e.g. "
            "Vagrant's shared 10.0.2.15: use -iface=eth1); delete the stale lease with "
            "`loden leases -delete KEY`",
            "VTEP MAC": "a cloned VM or a copied state dir: restart the agent on one of "
            "the nodes; at start it finds its MAC in another node's lease and picks a fresh "
            "one (its MAC file is bound to its public IP and VNI from then on)",
            "WireGuard key": "a copied key file: delete the private key file on one of the "
            "nodes (-wireguard key path) and restart its agent",
        }[what]
        findings.append(
            Finding(
                f"leases/duplicate-{what.split()[-1].lower()}",
                f"{len(leases)} leases share one {what}{where}: peers send one node's "
                "traffic to the other",
                f"{what} {value} in leases {keys}",
                fix,
            )
        )
    return findings


def overlapping(leases: list[Lease]) -> list[tuple[Lease, Lease]]:
    """Pairs of leases whose subnets of one family share addresses (a dual-stack key
    holds both subnets, so two nodes on one IPv4 subnet with different IPv6 ones have
    two keys: a Go flanneld node, or an allocation race before Loden checked for it)."""
    pairs: list[tuple[Lease, Lease]] = []
    for family in (4, 6):
        spans: list[tuple[int, int, Lease]] = []
        for lease in leases:
            net: IPv4Network | IPv6Network | None = (
                lease.ipv4_subnet if family == 4 else lease.ipv6_subnet
            )
            if net is not None:
                spans.append((int(net.network_address), int(net.broadcast_address), lease))
        spans.sort(key=lambda span: (span[0], -span[1]))
        widest: tuple[int, int, Lease] | None = None  # the span reaching furthest so far
        for span in spans:
            if widest is not None and span[0] <= widest[1]:
                pairs.append((widest[2], span[2]))
            if widest is None or span[1] > widest[1]:
                widest = span
    return pairs


async def check_overlaps(ctx: Context) -> list[Finding]:
    pairs = overlapping(ctx.store.leases)
    if not pairs:
        return []
    own = ctx.own
    mine = any(own in pair for pair in pairs) if own is not None else False
    shown = "; ".join(
        f"{a.key} ({a.attrs.public_ip}) and {b.key} ({b.attrs.public_ip})" for a, b in pairs[:10]
    )
    return [
        Finding(
            "leases/overlap",
            f"{len(pairs)} pair(s) of leases hold overlapping subnets"
            + (" (one is this node's)" if mine else "")
            + ": both nodes hand out the same pod addresses, and every node routes "
            "them to one of the two",
            shown,
            "restart the agent of the newer lease (a Loden agent picks another subnet by "
            "itself at start when its lease came second; Go flanneld does not check) or "
            "delete that lease with `loden leases -delete KEY` and restart its agent; then "
            "restart the pods it started on the shared subnet",
        )
    ]


async def check_expiry(ctx: Context) -> list[Finding]:
    own = ctx.own
    if own is None or own.reserved or own.expiration is None:
        return []
    left = own.expiration - time.time()
    margin = ctx.settings.renew_margin_minutes * 60
    if left > margin:
        return []
    return [
        Finding(
            "leases/expiring",
            f"this node's lease {own.key} expires in {max(0, int(left))}s and has not been "
            "renewed: when it expires peers drop the routes and another node may take the "
            "subnet",
            f"TTL left {max(0, int(left))}s < renew margin {margin}s "
            f"(-subnet-lease-renew-margin {ctx.settings.renew_margin_minutes})",
            "make sure the agent runs and reaches etcd (`loden status`); it renews at the margin",
        )
    ]
