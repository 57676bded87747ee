"""Node identity: what makes one node's advertised VTEP MAC or WireGuard key its own.

Peers address a node's overlay device by what its lease advertises (the VTEP MAC of
``flannel.<VNI>``, the WireGuard public key). Two nodes advertising the same value
blackhole each other: a peer's FDB holds one destination per MAC, WireGuard one
endpoint per key. Two things used to produce such twins (issue 10):

* node-local state shared or copied between nodes: several agents on one filesystem
  (``/var/lib/loden`` not private to the node), hosts cloned from one image after the
  agent ran once, a state directory or key file copied by hand;
* nothing checking the published value against the other leases.

So every such value is stored *bound to the node's identity* (its public IP, and the
VNI for a VTEP MAC): a stored value written for another identity is ignored (and then
overwritten) with one log line, and before publishing, the value is compared with
what every other node's lease advertises. "Other node" means a lease with another
public IP: our own earlier lease (same public IP, e.g. after a kill -9) advertises our
own value and is not a collision.

Everything here is address-family neutral, so the IPv6 device (``flannel-v6.<VNI>``,
bound to the public IPv6) reuses it with its own state file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from loden.errors import ConfigError
from loden.files import atomic_write
from loden.model.lease import Lease

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who stored a value: the node's public IP of the family the value belongs to,
    and the VNI for per-VNI values (``None`` where there is none, e.g. a WireGuard key)."""

    public_ip: IPAddress
    vni: int | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"PublicIP": str(self.public_ip)}
        if self.vni is not None:
            out["VNI"] = self.vni
        return out

    def __str__(self) -> str:
        return f"{self.public_ip}" + ("" if self.vni is None else f" VNI {self.vni}")


class BoundValue:
    """One value in a small JSON file, valid only for the identity that wrote it.

    File: ``{"PublicIP":"10.0.0.1","VNI":1,"<field>":"<value>"}``. A file in an older
    format (a bare value, as Loden wrote before issue 10), for another identity, or
    unreadable counts as "nothing stored": no old file can make a node adopt a value
    that may be another node's.
    """

    def __init__(self, path: Path, field: str, *, mode: int = 0o644) -> None:
        self.path = path
        self.field = field
        self.mode = mode

    def load(self, identity: NodeIdentity) -> str | None:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read %s (%s): ignoring it", self.path, exc)
            return None
        stored = _parse(raw, self.field)
        if stored is None:
            log.warning(
                "%s is not bound to a node (old format or damaged): ignoring it; it is "
                "rewritten for %s",
                self.path,
                identity,
            )
            return None
        owner, value = stored
        if owner != identity:
            log.warning(
                "%s was written for %s, not for this node (%s): it was copied from another "
                "node or is shared with one; ignoring it and writing this node's own",
                self.path,
                owner,
                identity,
            )
            return None
        return value

    def store(self, identity: NodeIdentity, value: str) -> None:
        """Write (only if it differs); a failure is logged, not raised: the value
        still works for this run, it just is not remembered."""
        body = {**identity.to_json(), self.field: value}
        stored = None
        try:
            stored = _parse(self.path.read_text(), self.field)
        except OSError:
            pass
        if stored == (identity, value):
            return
        try:
            atomic_write(self.path, (json.dumps(body) + "\n").encode(), mode=self.mode)
        except ConfigError as exc:
            log.warning("cannot remember %s for restarts: %s", self.field, exc)


def _parse(raw: str, field: str) -> tuple[NodeIdentity, str] | None:
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            return None
        ip = ip_address(obj["PublicIP"])
        vni = obj.get("VNI")
        value = obj[field]
        if not isinstance(value, str) or (vni is not None and not isinstance(vni, int)):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return NodeIdentity(ip, vni), value


def other_nodes(leases: Iterable[Lease], own_ip: IPAddress) -> list[Lease]:
    """Leases of other nodes: another public IP of ``own_ip``'s family."""
    if isinstance(own_ip, IPv4Address):
        return [lease for lease in leases if lease.attrs.public_ip != own_ip]
    return [lease for lease in leases if lease.attrs.public_ipv6 not in (None, own_ip)]


def holders(
    value: str, leases: Iterable[Lease], value_of: Callable[[Lease], str | None]
) -> list[Lease]:
    """The leases among ``leases`` that advertise ``value``."""
    return [lease for lease in leases if value_of(lease) == value]


def describe(leases: Iterable[Lease]) -> str:
    return ", ".join(f"{lease.key} (public IP {lease.attrs.public_ip})" for lease in leases)


def random_mac(taken: Iterable[str] = ()) -> str:
    """A random locally administered unicast MAC not in ``taken``."""
    avoid = set(taken)
    while True:
        raw = bytearray(os.urandom(6))
        raw[0] = (raw[0] & 0xFE) | 0x02
        mac = bytes(raw).hex(":")
        if mac not in avoid:
            return mac


__all__ = [
    "BoundValue",
    "NodeIdentity",
    "describe",
    "holders",
    "other_nodes",
    "random_mac",
]
