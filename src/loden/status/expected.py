"""Expected kernel state for a set of leases, and how the kernel differs from it.

Read-only: nothing here writes to the kernel, so ``loden status`` and ``loden doctor``
can run next to a live agent, next to Go flanneld, or with no agent at all. The rules
are the backends' (vxlan: neighbour + FDB + onlink route per peer, or a direct route
with DirectRouting when the peer is on-link; host-gw: one route via the peer's public
IP); a route counts as present when it forwards the same way whatever its protocol, so
a node still carrying Go flanneld's ``proto boot`` routes is in sync. Extra entries are
only those an agent owns (Loden's route protocol, flanneld's vxlan route shape, the
permanent neighbour/FDB entries of ``flannel.<VNI>``): someone else's route is never
reported as "extra".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from loden.backend.routes import Entry, entry_key
from loden.backend.vxlan import VxlanOptions, peer_mac
from loden.kernel.netlink import (
    RTPROT_BOOT,
    RTPROT_LODEN,
    FdbEntry,
    Link,
    Neighbour,
    Netlink,
    Route,
)
from loden.model.config import NetworkConfig
from loden.model.lease import Lease

#: Backends whose per-peer kernel entries are compared (udp and wireguard keep their
#: peer table in a process or a device: their device is checked instead).
PEER_ENTRY_BACKENDS = ("vxlan", "host-gw")


@dataclass(frozen=True, slots=True)
class KernelDiff:
    """What the kernel lacks and what it holds beyond the leases (one line each)."""

    backend: str
    device: str | None = None
    #: Why the comparison could not be made (no device, unknown backend), else "".
    problem: str = ""
    expected: int = 0
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    #: Peers that cannot get entries (no VtepMAC, host-gw peer not on-link).
    skipped: tuple[str, ...] = ()
    names: dict[int, str] = field(default_factory=dict)

    @property
    def in_sync(self) -> bool:
        return not (self.problem or self.missing or self.extra)


def describe(entry: Entry, names: dict[int, str]) -> str:
    """``ip``-like text for one entry, with device names instead of indexes."""
    if isinstance(entry, Route):
        dev = names.get(entry.oif or 0, f"#{entry.oif}") if entry.oif else ""
        via = f" via {entry.gateway}" if entry.gateway else ""
        proto = {RTPROT_LODEN: "loden", RTPROT_BOOT: "boot"}.get(entry.protocol)
        return (
            f"route {entry.dst}{via}{' dev ' + dev if dev else ''}"
            f"{' onlink' if entry.onlink else ''} proto {proto or entry.protocol}"
        )
    dev = names.get(entry.ifindex, f"#{entry.ifindex}")
    if isinstance(entry, Neighbour):
        return f"neighbour {entry.dst} lladdr {entry.lladdr} dev {dev}"
    return f"fdb {entry.lladdr} dst {entry.dst} dev {dev}"


def vxlan_device(config: NetworkConfig) -> str:
    return f"flannel.{VxlanOptions.from_config(config).vni}"


async def expected_entries(
    nl: Netlink, config: NetworkConfig, own: Lease, peers: Iterable[Lease], device: Link | None
) -> tuple[list[Entry], list[str]]:
    """The entries ``peers`` need on this node, and why some peers get none."""
    backend = config.backend_type
    peers = [
        p
        for p in peers
        if p.subnet != own.subnet and (p.attrs.backend_type == backend or backend == "udp")
    ]
    out: list[Entry] = []
    skipped: list[str] = []
    direct = backend == "vxlan" and VxlanOptions.from_config(config).direct_routing
    lookups = (
        await nl.route_get_many(p.attrs.public_ip for p in peers)
        if (backend == "host-gw" or direct) and peers
        else {}
    )
    for peer in peers:
        subnet, ip = peer.subnet, peer.attrs.public_ip
        found = lookups.get(ip)
        on_link = found is not None and found.gateway is None and found.oif is not None
        if backend == "host-gw":
            if not on_link or found is None:
                skipped.append(f"host-gw peer {subnet} ({ip}) is not on a connected subnet")
                continue
            out.append(Route(subnet, gateway=ip, oif=found.oif))
        elif backend == "vxlan":
            if direct and on_link and found is not None:
                out.append(Route(subnet, gateway=ip, oif=found.oif))
                continue
            mac = peer_mac(peer)
            if mac is None:
                skipped.append(f"vxlan peer {subnet} ({ip}) has no valid VtepMAC")
                continue
            if device is None:
                continue
            gateway = subnet.network_address
            out += [
                Neighbour(device.index, gateway, mac),
                FdbEntry(device.index, mac, ip),
                Route(subnet, gateway=gateway, oif=device.index, onlink=True),
            ]
    return out, skipped


def _owned(entry: Entry, config: NetworkConfig, own: IPv4Network, device: Link | None) -> bool:
    if isinstance(entry, Neighbour | FdbEntry):
        return device is not None and entry.ifindex == device.index and entry.permanent
    if not isinstance(entry.dst, IPv4Network) or entry.dst == own or entry.type != 1:
        return False
    if config.network is not None and (
        not entry.dst.subnet_of(config.network) or entry.dst == config.network
    ):
        return False
    if entry.protocol == RTPROT_LODEN:
        return True
    # flanneld's vxlan route: <subnet> via <subnet>.0 dev flannel.N onlink proto boot
    return (
        device is not None
        and entry.protocol == RTPROT_BOOT
        and entry.oif == device.index
        and entry.onlink
        and entry.gateway == entry.dst.network_address
    )


def _present(want: Entry, have: Sequence[Entry]) -> bool:
    for entry in have:
        if isinstance(want, Route) and isinstance(entry, Route) and want.same_path(entry):
            return True
        if isinstance(want, Neighbour) and isinstance(entry, Neighbour):
            if entry.lladdr == want.lladdr and entry.permanent:
                return True
        if isinstance(want, FdbEntry) and isinstance(entry, FdbEntry):
            if entry.dst == want.dst and entry.permanent:
                return True
    return False


async def kernel_diff(
    nl: Netlink, config: NetworkConfig, own: Lease, peers: Iterable[Lease]
) -> KernelDiff:
    """Compare the kernel with what ``peers`` need (see the module docstring)."""
    backend = config.backend_type
    links = await nl.links()
    names = {link.index: link.name for link in links}
    if backend not in PEER_ENTRY_BACKENDS:
        name = "flannel0" if backend == "udp" else ("flannel-wg" if backend == "wireguard" else "")
        if name and name not in names.values():
            return KernelDiff(backend, name, f"device {name} is missing", names=names)
        return KernelDiff(backend, name or None, names=names)
    device: Link | None = None
    if backend == "vxlan":
        name = vxlan_device(config)
        device = next((link for link in links if link.name == name), None)
        if device is None:
            return KernelDiff(backend, name, f"device {name} is missing", names=names)
    want, skipped = await expected_entries(nl, config, own, peers, device)
    kernel: list[Entry] = list(await nl.routes())
    if device is not None:
        kernel += await nl.neighbours(device.index)
        kernel += await nl.fdb(device.index)
    by_key: dict[object, list[Entry]] = {}
    for entry in kernel:
        by_key.setdefault(entry_key(entry), []).append(entry)
    missing = [w for w in want if not _present(w, by_key.get(entry_key(w), []))]
    wanted_keys = {entry_key(w) for w in want}
    wanted_fdb = {(w.lladdr, w.dst) for w in want if isinstance(w, FdbEntry)}
    extra = [
        e
        for e in kernel
        if _owned(e, config, own.subnet, device)
        and (
            (e.lladdr, e.dst) not in wanted_fdb
            if isinstance(e, FdbEntry)
            else entry_key(e) not in wanted_keys
        )
    ]
    return KernelDiff(
        backend,
        device.name if device else None,
        expected=len(want),
        missing=tuple(describe(e, names) for e in missing),
        extra=tuple(describe(e, names) for e in extra),
        skipped=tuple(skipped),
        names=names,
    )
