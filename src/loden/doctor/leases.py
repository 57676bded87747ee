"""Leases in etcd: one public IP, VTEP MAC or WireGuard key on two leases; our lease
close to expiry (pain points 2, 7, 11, 19)."""

from __future__ import annotations

import time
from collections import defaultdict

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
