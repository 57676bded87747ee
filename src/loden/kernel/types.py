"""Value types of the kernel layer: routes, neighbours, FDB entries, links, addresses.

Plain frozen values, shared by the codec (:mod:`loden.kernel.rtnl`), the public API
(:mod:`loden.kernel.netlink`, which re-exports them) and the backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Final

from loden.errors import DataplaneError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

#: Route protocol number that marks routes installed by Loden (``ip route ... proto 76``).
#: Unused in iproute2's ``rt_protos`` and by other CNI agents we know (Calico uses 80,
#: bird 12, zebra 11). ``echo "76 loden" > /etc/iproute2/rt_protos.d/loden.conf`` makes
#: ``ip route`` print "proto loden". 76 is ASCII "L".
RTPROT_LODEN: Final = 76
RTPROT_BOOT: Final = 3  # what Go flanneld (vishvananda/netlink) and `ip route add` use
RTPROT_STATIC: Final = 4
RT_TABLE_MAIN: Final = 254

NUD_FAILED: Final = 0x20
NUD_NOARP: Final = 0x40
NUD_PERMANENT: Final = 0x80
NTF_SELF: Final = 0x02
RTN_UNICAST: Final = 1
RTN_BLACKHOLE: Final = 6
RT_SCOPE_UNIVERSE: Final = 0
_IFA_F_TEMPORARY: Final = 0x01
_IFA_F_DEPRECATED: Final = 0x20
_IFA_F_PERMANENT: Final = 0x80


@dataclass(frozen=True, slots=True)
class Route:
    """A unicast route (one next hop) as Loden programs and reads it."""

    dst: IPNetwork
    gateway: IPAddress | None = None
    oif: int | None = None
    onlink: bool = False
    protocol: int = RTPROT_LODEN
    table: int = RT_TABLE_MAIN
    priority: int = 0
    scope: int = RT_SCOPE_UNIVERSE
    type: int = RTN_UNICAST

    def same_path(self, other: Route) -> bool:
        """Same destination and forwarding (the protocol may differ: adoption)."""
        return (
            self.dst == other.dst
            and self.gateway == other.gateway
            and self.oif == other.oif
            and self.onlink == other.onlink
            and self.table == other.table
            and self.priority == other.priority
            and self.type == other.type
        )


@dataclass(frozen=True, slots=True)
class Neighbour:
    """An ARP/ND entry (``ip neigh``)."""

    ifindex: int
    dst: IPAddress
    lladdr: str | None
    state: int = NUD_PERMANENT

    @property
    def permanent(self) -> bool:
        return bool(self.state & NUD_PERMANENT)


@dataclass(frozen=True, slots=True)
class FdbEntry:
    """A forwarding-database entry on a vxlan device (``bridge fdb ... self``)."""

    ifindex: int
    lladdr: str
    dst: IPAddress | None
    state: int = NUD_PERMANENT | NUD_NOARP
    flags: int = NTF_SELF

    @property
    def permanent(self) -> bool:
        return bool(self.state & NUD_PERMANENT)


@dataclass(frozen=True, slots=True)
class RouteLookup:
    """Answer of ``ip route get``."""

    dst: IPAddress
    oif: int | None
    gateway: IPAddress | None
    prefsrc: IPAddress | None


Entry = Route | Neighbour | FdbEntry


@dataclass(frozen=True, slots=True)
class VxlanSpec:
    """The vxlan attributes Loden sets and compares (flannel's compatibility fields)."""

    vni: int
    port: int = 8472
    #: The VTEP's underlay address: IPv4 for ``flannel.<VNI>``, IPv6 for ``flannel-v6.<VNI>``.
    local: IPAddress | None = None
    link: int | None = None
    learning: bool = False
    gbp: bool = False
    group: IPv4Address | None = None
    l2miss: bool = False
    l3miss: bool = False


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    kind: str | None
    mtu: int
    mac: str | None
    up: bool
    vxlan: VxlanSpec | None = None
    #: Transmit queue length (``qlen``/``txqueuelen``); None when the kernel did not say.
    txqlen: int | None = None


@dataclass(frozen=True, slots=True)
class Address:
    """An interface address with the properties interface selection sorts on."""

    index: int
    interface: IPv4Interface | IPv6Interface
    scope: int
    flags: int

    @property
    def ip(self) -> IPAddress:
        return self.interface.ip

    @property
    def permanent(self) -> bool:
        return bool(self.flags & _IFA_F_PERMANENT)

    @property
    def deprecated(self) -> bool:
        return bool(self.flags & _IFA_F_DEPRECATED)

    @property
    def temporary(self) -> bool:
        return bool(self.flags & _IFA_F_TEMPORARY)


@dataclass(frozen=True, slots=True)
class Change:
    """One entry to replace (create or overwrite) or to delete."""

    entry: Route | Neighbour | FdbEntry
    delete: bool = False

    def describe(self) -> str:
        return f"{'delete' if self.delete else 'replace'} {_describe(self.entry)}"


@dataclass(frozen=True, slots=True)
class BatchResult:
    applied: int
    failed: tuple[tuple[Change, DataplaneError], ...] = ()


def _describe(entry: Route | Neighbour | FdbEntry) -> str:
    if isinstance(entry, Route):
        via = f" via {entry.gateway}" if entry.gateway else ""
        dev = f" oif {entry.oif}" if entry.oif is not None else ""
        return f"route {entry.dst}{via}{dev}{' onlink' if entry.onlink else ''}"
    if isinstance(entry, Neighbour):
        return f"neighbour {entry.dst} lladdr {entry.lladdr} ifindex {entry.ifindex}"
    return f"fdb {entry.lladdr} dst {entry.dst} ifindex {entry.ifindex}"
