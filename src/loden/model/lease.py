"""Leases: the value stored under ``<prefix>/subnets/<key>`` and the events about them.

The lease value is flannel's ``LeaseAttrs`` marshalled by Go: compact JSON with the
fields in declaration order. Two eras exist (spec §3.2, §3.9) and both are written
byte-exactly: over etcd v3, ``PublicIPv6`` is always present (``null`` when unset);
over v2 (flannel ≤ v0.14, the seed document's era) it is absent. Readers accept both,
and also legacy vxlan data without ``VNI``.
"""

from __future__ import annotations

import enum
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from loden.errors import LeaseFormatError
from loden.model.gojson import GoJSONError, GoObject, as_any, as_str, compact
from loden.model.net import NO_IPV4, overlap, subnet_key


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """What a node publishes about itself: public IP(s) and backend data."""

    public_ip: IPv4Address
    backend_type: str = ""
    #: Compact JSON text of BackendData (Go's RawMessage), or None when absent.
    backend_data: str | None = None
    public_ipv6: IPv6Address | None = None
    backend_v6_data: str | None = None

    @staticmethod
    def encode_data(value: Any) -> str | None:
        """Turn backend data (a dict, or None) into the compact text stored here."""
        return None if value is None else compact(value)

    def data(self) -> Any:
        """BackendData decoded (plain dict/list/scalars), or None."""
        return None if self.backend_data is None else json.loads(self.backend_data)

    def v6_data(self) -> Any:
        return None if self.backend_v6_data is None else json.loads(self.backend_v6_data)

    def to_json(self, *, legacy: bool = False) -> str:
        """Compact JSON, byte-identical to Go flannel's (``legacy``: the v2-era form)."""
        parts = [f'"PublicIP":"{self.public_ip}"']
        if not legacy or self.public_ipv6 is not None:
            v6 = f'"{self.public_ipv6}"' if self.public_ipv6 is not None else "null"
            parts.append(f'"PublicIPv6":{v6}')
        if self.backend_type:
            parts.append(f'"BackendType":{compact(self.backend_type)}')
        if self.backend_data is not None:
            parts.append(f'"BackendData":{self.backend_data}')
        if self.backend_v6_data is not None:
            parts.append(f'"BackendV6Data":{self.backend_v6_data}')
        return "{" + ",".join(parts) + "}"

    @classmethod
    def parse(cls, raw: bytes | str, *, key: str | None = None) -> LeaseAttrs:
        """Parse a stored lease value.

        :raises LeaseFormatError: not a JSON object, or an address that does not parse.
        """
        try:
            obj = GoObject.parse(raw)
            public_ip = obj.get("PublicIP", as_str, "0.0.0.0")
            public_ipv6 = obj.get("PublicIPv6", as_str, "")
            backend_type = obj.get("BackendType", as_str, "")
            data = obj.get("BackendData", as_any, None)
            v6_data = obj.get("BackendV6Data", as_any, None)
        except GoJSONError as exc:
            raise LeaseFormatError(str(exc), key=key, raw=raw) from exc
        try:
            ip4 = IPv4Address(public_ip)
        except ValueError as exc:
            raise LeaseFormatError(
                f"PublicIP {public_ip!r} is not an IPv4 address", key=key, raw=raw
            ) from exc
        ip6: IPv6Address | None = None
        if public_ipv6:
            try:
                ip6 = IPv6Address(public_ipv6)
            except ValueError as exc:
                raise LeaseFormatError(
                    f"PublicIPv6 {public_ipv6!r} is not an IPv6 address", key=key, raw=raw
                ) from exc
        return cls(
            public_ip=ip4,
            # One string for all leases of a type, not one per lease.
            backend_type=sys.intern(backend_type),
            backend_data=cls.encode_data(data),
            public_ipv6=ip6,
            backend_v6_data=cls.encode_data(v6_data),
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """A node's claim on a subnet (and optionally an IPv6 subnet)."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Network | None = None
    #: Wall-clock expiry (``time.time()`` seconds), ``None`` when unknown or reserved.
    expiration: float | None = field(default=None, compare=False)
    #: A reservation: an operator-made key with no TTL; it never expires.
    reserved: bool = False
    #: Store-specific handle (etcd v3 lease id, v2 modifiedIndex); not part of equality.
    store_ref: int = field(default=0, compare=False)
    #: The store key (``10.5.40.0-24``), made once: every map of the agent is keyed by
    #: it, and a key made per use was one more string per map per peer (issue 14).
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", subnet_key(self.subnet, self.ipv6_subnet))

    def ttl_remaining(self, now: float | None = None) -> float | None:
        if self.expiration is None:
            return None
        return self.expiration - (time.time() if now is None else now)

    def same_subnets(self, other: Lease) -> bool:
        return self.subnet == other.subnet and self.ipv6_subnet == other.ipv6_subnet

    @property
    def ipv4_subnet(self) -> IPv4Network | None:
        """The IPv4 subnet; ``None`` for an IPv6-only lease, whose key's IPv4 part
        ``0.0.0.0/0`` holds no addresses."""
        return None if self.subnet == NO_IPV4 else self.subnet

    def overlaps(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> bool:
        """Do this lease's subnets share addresses with ``subnet`` / ``ipv6_subnet``,
        family by family? A dual-stack key holds both subnets, so two leases on one IPv4
        subnet with different IPv6 ones are two keys that overlap (see
        :meth:`overlaps_lease`); an IPv6-only side's ``0.0.0.0/0`` overlaps nothing."""
        mine = self.ipv4_subnet
        if mine is not None and subnet != NO_IPV4 and overlap(mine, subnet):
            return True
        return (
            self.ipv6_subnet is not None
            and ipv6_subnet is not None
            and overlap(self.ipv6_subnet, ipv6_subnet)
        )

    def overlaps_lease(self, other: Lease) -> bool:
        return self.overlaps(other.subnet, other.ipv6_subnet)

    def reused_from(self, held: Mapping[str, Lease]) -> Lease:
        """The equal lease ``held`` under this key if there is one (that object, key
        string included), else this one: a relist's copies of unchanged leases would be
        a second set of every lease, and pinned the allocator's arenas (issue 14)."""
        known = held.get(self.key)
        return known if known is not None and known == self else self


class EventKind(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    kind: EventKind
    lease: Lease
