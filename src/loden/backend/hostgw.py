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
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from loden.backend.base import BackendContext, Network
from loden.backend.routes import Entry, PeerNetwork
from loden.errors import BackendError
from loden.kernel.netlink import IPAddress, Netlink, Route, RouteLookup
from loden.model.lease import Lease, LeaseAttrs

log = logging.getLogger(__name__)

NAT_REFUSAL = (
    "your PublicIP differs from interface IP, meaning that probably you're on a NAT,"
    " which is not supported by host-gw backend"
)


class HostGwBackend:
    backend_type = "host-gw"

    def __init__(self, ctx: BackendContext) -> None:
        ext = ctx.ext
        if ext.ext_addr != ext.iface_addr:
            raise BackendError(
                f"{NAT_REFUSAL} (public IP {ext.ext_addr}, {ext.name} has {ext.iface_addr});"
                " drop --public-ip or use the vxlan backend"
            )
        if ext.ext_addr is None:
            raise BackendError("host-gw needs an IPv4 address on the external interface")
        self.ctx = ctx
        self.netns = ctx.settings.netns

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        ext = self.ctx.ext
        assert ext.ext_addr is not None
        v6 = ext.ext_v6_addr if self.ctx.config.enable_ipv6 else None
        return LeaseAttrs(public_ip=ext.ext_addr, backend_type="host-gw", public_ipv6=v6)

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
        ip, ext = lease.attrs.public_ip, self._ext
        found = lookups.get(ip)
        if found is None or found.gateway is not None or found.oif != ext.index:
            if found is None:
                path = "no route"
            elif found.gateway is not None:
                path = f"reached via gateway {found.gateway}"
            else:
                path = f"reached via interface #{found.oif}, not {ext.name}"
            return (
                f"host-gw: peer {lease.subnet} has public IP {ip}, which is not on a subnet"
                f" connected to {ext.name} ({path}): host-gw needs layer-2 adjacency;"
                " use vxlan with DirectRouting"
            )
        return (Route(lease.subnet, gateway=ip, oif=ext.index),)


def create(ctx: BackendContext) -> HostGwBackend:
    """Registry entry point. ``ctx.settings.netns`` runs it in another namespace (lab)."""
    return HostGwBackend(ctx)
