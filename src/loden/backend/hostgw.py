"""host-gw backend (spec §6.2): one plain route per peer, no encapsulation.

``<peer subnet> via <peer PublicIP> dev <ext iface>`` only works when the peer's public
IP is a direct neighbour on the external interface's L2 segment: the kernel must be able
to ARP for it. flannel installs the route anyway when it is not (the kernel accepts an
off-link gateway only with ``onlink``, so flannel's add fails or, through a default
gateway, silently sends pod traffic to the wrong place), which is one of flannel's most
frequent support questions (pain point 14). Loden looks every peer's public IP up in
the kernel (one batched ``ip route get`` per reconcile) and, when the answer has a
gateway or another device, reports that peer as an error in the
:class:`~loden.backend.base.ReconcileReport` and logs once: "host-gw needs layer-2
adjacency; use vxlan with DirectRouting".

Routes carry Loden's protocol; reconcile, adoption and stale-route removal are the shared
:class:`~loden.backend.routes.PeerNetwork` rules. flannel's 10 s route check is the
agent's periodic ``reconcile``.

IPv6 (dual-stack or IPv6-only) is the same per family: ``<peer v6 subnet> via <peer
PublicIPv6> dev <ext iface>``, with the same adjacency check and the same refusal of a
``--public-ipv6`` that is not the interface's own address. Each family of a peer stands
on its own: a peer whose IPv6 address is not adjacent keeps its IPv4 route.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from loden.backend.base import BackendContext, Network
from loden.backend.routes import IPV6_METRIC, Entry, PeerNetwork
from loden.errors import BackendError
from loden.kernel.netlink import IPAddress, Netlink, Route, RouteLookup
from loden.model.lease import Lease, LeaseAttrs
from loden.model.net import NO_IPV4

log = logging.getLogger(__name__)

NAT_REFUSAL = (
    "your PublicIP differs from interface IP, meaning that probably you're on a NAT,"
    " which is not supported by host-gw backend"
)


class HostGwBackend:
    backend_type = "host-gw"

    def __init__(self, ctx: BackendContext) -> None:
        ext, config = ctx.ext, ctx.config
        if config.enable_ipv4:
            if ext.ext_addr != ext.iface_addr:
                raise BackendError(
                    f"{NAT_REFUSAL} (public IP {ext.ext_addr}, {ext.name} has"
                    f" {ext.iface_addr}); drop --public-ip or use the vxlan backend"
                )
            if ext.ext_addr is None:
                raise BackendError("host-gw needs an IPv4 address on the external interface")
        if config.enable_ipv6:
            if ext.ext_v6_addr != ext.iface_v6_addr:
                raise BackendError(
                    f"{NAT_REFUSAL} (public IPv6 {ext.ext_v6_addr}, {ext.name} has"
                    f" {ext.iface_v6_addr}); drop --public-ipv6 or use the vxlan backend"
                )
            if ext.ext_v6_addr is None:
                raise BackendError(
                    f"host-gw with EnableIPv6 needs an IPv6 address on {ext.name}: add one"
                )
        self.ctx = ctx
        self.netns = ctx.settings.netns

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        ext = self.ctx.ext
        v4 = ext.ext_addr if self.ctx.config.enable_ipv4 else None
        v6 = ext.ext_v6_addr if self.ctx.config.enable_ipv6 else None
        return LeaseAttrs(public_ip=v4 or IPv4Address(0), backend_type="host-gw", public_ipv6=v6)

    async def activate(self, lease: Lease) -> Network:
        nl = await Netlink.open(self.netns)
        return HostGwNetwork(nl, lease, self.ctx)


class HostGwNetwork(PeerNetwork):
    backend_type = "host-gw"

    def __init__(self, nl: Netlink, lease: Lease, ctx: BackendContext) -> None:
        super().__init__(nl, lease, ctx.config, ctx.ext)

    @property
    def mtu(self) -> int:
        return self._ext.mtu

    def _needs_lookup(self) -> bool:
        return True

    def _entries_for(
        self, lease: Lease, lookups: Mapping[IPAddress, RouteLookup | None]
    ) -> tuple[Entry, ...] | str:
        """One route per family the peer has; a family that cannot be routed is
        reported, and only a peer with no routable family is skipped."""
        parts: list[Route | str] = []
        if self._config.enable_ipv4 and lease.subnet != NO_IPV4:
            parts.append(self._route(lease.subnet, lease.attrs.public_ip, lookups))
        if self._config.enable_ipv6 and lease.ipv6_subnet is not None:
            ip6 = lease.attrs.public_ipv6
            if ip6 is None:
                parts.append(f"host-gw: peer {lease.ipv6_subnet} has no PublicIPv6: IPv6 skipped")
            else:
                parts.append(self._route(lease.ipv6_subnet, ip6, lookups))
        routes = tuple(p for p in parts if isinstance(p, Route))
        reasons = [p for p in parts if isinstance(p, str)]
        if not routes and reasons:
            return "; ".join(reasons)
        for reason in reasons:
            self._warn_once(reason + " (its other family is routed)")
        return routes

    def _route(
        self,
        subnet: IPv4Network | IPv6Network,
        ip: IPAddress,
        lookups: Mapping[IPAddress, RouteLookup | None],
    ) -> Route | str:
        ext = self._ext
        found = lookups.get(ip)
        if found is None or found.gateway is not None or found.oif != ext.index:
            if found is None:
                path = "no route"
            elif found.gateway is not None:
                path = f"reached via gateway {found.gateway}"
            else:
                path = f"reached via interface #{found.oif}, not {ext.name}"
            return (
                f"host-gw: peer {subnet} has public IP {ip}, which is not on a subnet"
                f" connected to {ext.name} ({path}): host-gw needs layer-2 adjacency;"
                " use vxlan with DirectRouting"
            )
        metric = IPV6_METRIC if subnet.version == 6 else 0
        return Route(subnet, gateway=ip, oif=ext.index, priority=metric)


def create(ctx: BackendContext) -> HostGwBackend:
    """Registry entry point. ``ctx.settings.netns`` runs it in another namespace (lab)."""
    return HostGwBackend(ctx)
