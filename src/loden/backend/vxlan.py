"""vxlan backend: flannel's Linux VXLAN data plane (spec §6.1), as a reconciler.

Design notes, in the spirit of flannel's ``vxlan.go`` header.

*One device, static forwarding.* Each node has one VXLAN device ``flannel.<VNI>``
(learning off, no L2/L3-miss upcalls) whose ``local`` is the node's *public* IP. For
every peer the kernel gets three entries: a permanent ARP entry
``<peer subnet>.0 lladdr <peer VtepMAC>``, a permanent FDB entry
``<peer VtepMAC> dst <peer PublicIP> self`` and a route
``<peer subnet> via <peer subnet>.0 dev flannel.<VNI> onlink``. The route makes the
peer's ``.0`` the next hop, the neighbour entry resolves it to the peer's VTEP MAC
without ARP (there is nothing to answer ARP on an overlay with learning off), and the
FDB entry tells the device which underlay IP owns that MAC. The entries are permanent
so the kernel never ages them out or probes for them: only Loden removes them, and it
does so exactly when the peer's lease goes away. This is flannel's third design
generation; the earlier L2/L3-miss daemon upcalls were slow and racy.

*DirectRouting.* A peer whose PublicIP the kernel reaches without a gateway gets only
``<peer subnet> via <peer PublicIP>`` on the underlay device: no encapsulation cost
between hosts that share an L2 segment, vxlan for the rest.

*A VTEP MAC that survives restarts and reboots* (pain point 7), *and is this node's
alone* (issue 10). Peers hold our MAC in permanent neighbour/FDB entries and only learn
a new one from our lease, so a MAC that changes at reboot blackholes traffic until every
peer has processed the update; flannel picks a random MAC and has open issues about
exactly this. Loden chooses, in order: the MAC of an existing compatible device
(continuity with a running data path, including one created by Go flanneld); the MAC
stored in ``<state_dir>/flannel.<VNI>.mac`` *if it was stored for this public IP and
VNI* (the file says for whom: a state directory shared by several agents or copied
from another node must not make two nodes advertise one MAC); otherwise a MAC derived
from SHA-256 of the public IP and VNI (locally administered, unicast). Before the lease
is published the MAC is compared with every other node's lease on the same VNI: a
collision gets a fresh random MAC (logged). The chosen MAC is written back to the
state file. A peer lease that advertises our MAC later is never programmed (it would
point our own MAC at another node) and is reported: error log,
``loden_identity_conflicts``, ``/healthz``. See :mod:`loden.backend.identity`.

*Checksum offload follows the kernel* (pain point 5). Some kernels produce bad outer UDP
or inner TCP checksums for VXLAN-encapsulated packets when tx checksum offload is on
for the VXLAN device: kernels before 5.7 with iptables ``MASQUERADE --random-fully``
(kube-proxy), which shows up as 63 s (5 retransmits) or 3 s delays for NodePort and
ClusterIP traffic (flannel PR #1282, flannel #1279, kubernetes#89622, calico#3145).
Go flanneld leaves the offload on (#1282 was not merged; its docs give
``ethtool -K flannel.1 tx-checksum-ip-generic off`` for NAT'd nodes) and Calico turns it
off only before 5.7. Loden does the same as Calico: ``"TxChecksumOffload"`` absent
means *auto*, off on kernels < 5.7 and on otherwise; ``true``/``false`` forces either
(Go flanneld ignores the key, so mixed clusters can share the config). Off costs much:
without checksum offload the kernel cannot use TSO on the device either, so every
1450-byte segment is encapsulated on its own (~0.2x of the same device with offloads
on here: bench/dataplane.py, ``hand-vxlan`` vs ``hand-vxlan-txoff``). Nodes whose
public IPs are behind NAT should set ``false``.

*Never interrupt traffic on restart.* Start-up reuses a compatible device as is (no
down/up, no address flush, MTU and MAC written only if they differ), and reconcile
only writes the difference, so an agent restart leaves the kernel data path untouched.
A device deleted from outside is recreated with the same MAC and every peer is
replayed on the next reconcile (flannel recreates it but does not replay: spec §11.12).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address

from loden.backend.base import BackendContext, Network
from loden.backend.identity import (
    BoundValue,
    NodeIdentity,
    describe,
    holders,
    other_nodes,
    random_mac,
)
from loden.backend.routes import Conflict, Entry, PeerNetwork, Wanted
from loden.errors import BackendError, DataplaneError
from loden.kernel.netlink import (
    RTPROT_BOOT,
    FdbEntry,
    IPAddress,
    Link,
    Neighbour,
    Netlink,
    Route,
    RouteLookup,
    VxlanSpec,
)
from loden.model.backend_options import VXLAN_DEFAULT_PORT, VxlanOptions
from loden.model.gojson import GoJSONError, GoObject, as_int, as_str
from loden.model.lease import Lease, LeaseAttrs

log = logging.getLogger(__name__)

DEFAULT_PORT = VXLAN_DEFAULT_PORT
OVERHEAD = 50
_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")


#: The first kernel whose VXLAN checksum offload survives ``MASQUERADE --random-fully``
#: (the fix Calico keys its own default on).
FIXED_KERNEL = (5, 7)


def kernel_version(release: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a ``uname -r`` string such as ``5.4.0-150-generic``."""
    match = re.match(r"^(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else None


def tx_checksum_decision(option: bool | None, release: str) -> tuple[bool, str]:
    """Whether tx checksum offload is on for ``flannel.<VNI>``, and why (for the log)."""
    if option is not None:
        return option, f'"TxChecksumOffload": {str(option).lower()} in the Backend config'
    version = kernel_version(release)
    if version is None:
        return False, (
            f"auto: kernel release {release!r} is not understood, so assuming it may have "
            'the < 5.7 checksum bug; set "TxChecksumOffload": true to keep the offload'
        )
    if version < FIXED_KERNEL:
        return False, (
            f"auto: kernel {release} is older than 5.7 (corrupt VXLAN checksums with "
            "MASQUERADE --random-fully); costs throughput, no TSO on the device"
        )
    return True, (
        f'auto: kernel {release} is 5.7 or newer; set "TxChecksumOffload": false if '
        "this node's public IP is behind NAT"
    )


def derived_mac(public_ip: IPv4Address, vni: int) -> str:
    """Deterministic locally administered unicast MAC for (public IP, VNI)."""
    raw = bytearray(hashlib.sha256(f"loden-vtep/{public_ip}/{vni}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFE) | 0x02
    return bytes(raw).hex(":")


def normalise_mac(text: str) -> str | None:
    value = text.strip().lower()
    return value.replace("-", ":") if _MAC.match(value) else None


def peer_mac(lease: Lease) -> str | None:
    """VtepMAC from a peer's BackendData (Go JSON: keys case-insensitive; VNI optional)."""
    return None if lease.attrs.backend_data is None else _mac_of(lease.attrs.backend_data)


@functools.lru_cache(maxsize=16384)
def _mac_of(backend_data: str) -> str | None:
    # Cached: parsing costs ~9 µs and a resync of 5,000 peers sees the same texts again.
    try:
        return normalise_mac(GoObject.parse(backend_data).get("VtepMAC", as_str, ""))
    except GoJSONError:
        return None


def peer_v6_mac(lease: Lease) -> str | None:
    """VtepMAC of a peer's IPv6 VTEP (``flannel-v6.<VNI>``), from its BackendV6Data."""
    data = lease.attrs.backend_v6_data
    return None if data is None else _mac_of(data)


def peer_vni(lease: Lease, *, v6: bool = False) -> int | None:
    """VNI from a peer's BackendData (BackendV6Data); None if absent (flanneld
    v0.11-v0.13) or bad."""
    raw = lease.attrs.backend_v6_data if v6 else lease.attrs.backend_data
    try:
        data = GoObject.parse(raw or "{}")
        vni: int | None = data.get("VNI", as_int, None)
    except GoJSONError:
        return None
    return vni


def vxlan_rivals(
    leases: Sequence[Lease], own_ip: IPv4Address | IPv6Address, vni: int
) -> list[Lease]:
    """Other nodes' vxlan leases whose VTEPs of ``own_ip``'s family share our VNI (no
    VNI in the data: the same)."""
    v6 = own_ip.version == 6
    return [
        lease
        for lease in other_nodes(leases, own_ip)
        if lease.attrs.backend_type == "vxlan" and peer_vni(lease, v6=v6) in (None, vni)
    ]


def compatible(link: Link, spec: VxlanSpec) -> bool:
    """flannel's reuse test (``isVxlanCompatible``) plus the learning flag."""
    have = link.vxlan
    if link.kind != "vxlan" or have is None:
        return False
    return (
        have.vni == spec.vni
        and (have.link is None or spec.link is None or have.link == spec.link)
        and (have.local is None or spec.local is None or have.local == spec.local)
        and have.group == spec.group
        and have.l2miss == spec.l2miss
        and (have.port == 0 or spec.port == 0 or have.port == spec.port)
        and have.gbp == spec.gbp
        and have.learning == spec.learning
    )


class VxlanBackend:
    backend_type = "vxlan"

    def __init__(self, ctx: BackendContext) -> None:
        if ctx.ext.ext_addr is None:
            raise BackendError("vxlan needs an IPv4 public IP: enable IPv4 or set --public-ip")
        self.ctx = ctx
        assert isinstance(ctx.options, VxlanOptions), ctx.options
        self.options = ctx.options
        self.public_ip: IPv4Address = ctx.ext.ext_addr
        self.name = f"flannel.{self.options.vni}"
        self.spec = VxlanSpec(
            vni=self.options.vni,
            port=self.options.port,
            local=self.public_ip,
            link=ctx.ext.index,
            learning=self.options.learning,
            gbp=self.options.gbp,
        )
        self.mtu = (self.options.mtu or ctx.ext.mtu) - OVERHEAD
        self.netns = ctx.settings.netns
        self.identity = NodeIdentity(self.public_ip, self.options.vni)
        self._mac_store = BoundValue(ctx.state_dir / f"{self.name}.mac", "VtepMAC")
        self.tx_checksum, why = tx_checksum_decision(
            self.options.tx_checksum_offload, os.uname().release
        )
        log.info(
            "vxlan: tx checksum offload %s on %s (%s)",
            "on" if self.tx_checksum else "off",
            self.name,
            why,
        )

    def _stored_mac(self) -> str | None:
        stored = self._mac_store.load(self.identity)
        return None if stored is None else normalise_mac(stored)

    async def ensure_device(self, nl: Netlink, mac: str | None = None) -> Link:
        """Reuse a compatible ``flannel.<VNI>`` (keeping its MAC) or (re)create it with
        ``mac`` (the running network's), else the stored one, else the derived one."""
        link = await nl.link(self.name)
        if link is not None and compatible(link, self.spec):
            return link
        if link is not None:
            log.warning(
                "existing %s is not compatible (%s, want %s): recreating it",
                self.name,
                link.vxlan or link.kind,
                self.spec,
            )
            await nl.delete_link(link.index)
        mac = mac or self._stored_mac() or derived_mac(self.public_ip, self.options.vni)
        log.info(
            "creating %s: vni %d port %d local %s dev %s mac %s mtu %d",
            self.name,
            self.spec.vni,
            self.spec.port,
            self.public_ip,
            self.ctx.ext.name,
            mac,
            self.mtu,
        )
        return await nl.create_vxlan(self.name, self.spec, mtu=self.mtu, mac=mac)

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        nl = await Netlink.open(self.netns)
        try:
            link = await self.ensure_device(nl)
            if link.mac is None:
                raise DataplaneError("read", f"MAC of {self.name}", "the device has no MAC address")
            mac = await self._unique_mac(nl, link.index, link.mac, others)
        finally:
            await nl.aclose()
        self._mac_store.store(self.identity, mac)
        data = LeaseAttrs.encode_data({"VNI": self.options.vni, "VtepMAC": mac})
        v6 = self.ctx.ext.ext_v6_addr if self.ctx.config.enable_ipv6 else None
        return LeaseAttrs(
            public_ip=self.public_ip, backend_type="vxlan", backend_data=data, public_ipv6=v6
        )

    async def _unique_mac(
        self,
        nl: Netlink,
        index: int,
        mac: str,
        others: Sequence[Lease],
        *,
        own_ip: IPv4Address | IPv6Address | None = None,
        name: str | None = None,
    ) -> str:
        """``mac``, or a fresh one set on device ``index`` if another node advertises it.

        ``own_ip``/``name``: the IPv6 VTEP passes the public IPv6 and its device name
        (the default is the IPv4 VTEP); rivals are then read from BackendV6Data.
        """
        own = self.public_ip if own_ip is None else own_ip
        mac_of = peer_v6_mac if own.version == 6 else peer_mac
        rivals = vxlan_rivals(others, own, self.options.vni)
        clash = holders(mac, rivals, mac_of)
        if not clash:
            return mac
        taken = {m for m in map(mac_of, rivals) if m is not None}
        fresh = random_mac(taken | {mac})
        log.warning(
            "VTEP MAC %s of %s is already advertised by another node's lease %s (a state "
            "directory shared with or copied from that node, or a cloned image): using "
            "the fresh MAC %s instead",
            mac,
            name or self.name,
            describe(clash),
            fresh,
        )
        await nl.set_link(index, mac=fresh)
        return fresh

    async def activate(self, lease: Lease) -> Network:
        nl = await Netlink.open(self.netns)
        network = VxlanNetwork(nl, lease, self)
        try:
            await network.setup()
        except BaseException:
            await nl.aclose()
            raise
        return network


class VxlanNetwork(PeerNetwork):
    backend_type = "vxlan"
    identity_label = "VtepMAC"

    def __init__(self, nl: Netlink, lease: Lease, backend: VxlanBackend) -> None:
        super().__init__(nl, lease, backend.ctx.config, backend.ctx.ext)
        self._be = backend
        self._index = 0
        self._mac = ""

    @property
    def mtu(self) -> int:
        return self._be.mtu

    @property
    def device_index(self) -> int:
        return self._index

    @property
    def vtep_mac(self) -> str:
        return self._mac

    async def setup(self) -> None:
        await self._ensure_base()
        log.info(
            "vxlan: %s (mac %s) ready for subnet %s", self._be.name, self._mac, self._lease.subnet
        )

    async def _base_intact(self) -> bool:
        link = await self._nl.link_by_index(self._index) if self._index else None
        return (
            link is not None
            and link.name == self._be.name
            and link.kind == "vxlan"
            and link.up
            and link.mac == self._mac
            and link.mtu == self._be.mtu
        )

    async def _ensure_base(self) -> bool:
        """Device present, compatible, configured; only differences are written."""
        nl, be = self._nl, self._be
        link = await be.ensure_device(nl, self._mac or None)
        recreated = bool(self._index) and link.index != self._index
        if recreated:
            log.warning(
                "%s was recreated (index %d -> %d): replaying every peer",
                be.name,
                self._index,
                link.index,
            )
            self._entries.clear()
        self._index = link.index
        if self._mac and link.mac != self._mac:
            await nl.set_link(link.index, mac=self._mac)
        elif not self._mac:
            self._mac = link.mac or ""
        if link.mtu != be.mtu:
            await nl.set_link(link.index, mtu=be.mtu)
        if link.txqlen:  # a device an older Loden created (qlen 1000): match flanneld's
            await nl.set_link(link.index, txqlen=0)
        await self._ensure_address(link.index)
        await self._best_effort(nl.set_sysctl(f"net/ipv6/conf/{be.name}/accept_ra", "0"))
        await self._best_effort(nl.set_tx_checksum(be.name, be.tx_checksum))
        if not link.up:
            await nl.set_link(link.index, up=True)
        check = await nl.link_by_index(link.index)
        if check is None or check.mac != self._mac:
            raise DataplaneError(
                "set",
                f"MAC of {be.name}",
                f"reads back {check and check.mac}, expected {self._mac}",
            )
        return recreated

    async def _best_effort(self, step: Awaitable[object]) -> None:
        """accept_ra (absent when IPv6 is disabled) and the offload switch (absent on some
        kernels) must not stop the data plane: warn once and go on."""
        try:
            await step
        except DataplaneError as exc:
            if str(exc) not in self._warned:
                self._warned.add(str(exc))
                log.warning("%s (continuing)", exc)

    async def _ensure_address(self, index: int) -> None:
        want = IPv4Interface((self._lease.subnet.network_address, 32))
        network = self._config.network
        have = [a.interface for a in await self._nl.addresses(index) if a.ip.version == 4]
        for iface in have:
            if isinstance(iface, IPv4Interface) and iface != want:
                if network is None or iface.ip in network:
                    await self._nl.delete_address(index, iface)
        if want not in have:
            await self._nl.add_address(index, want)

    def _needs_lookup(self) -> bool:
        return self._be.options.direct_routing

    def _identity_of(self, lease: Lease) -> str | None:
        return peer_mac(lease)

    def _entries_for(self, lease: Lease, lookups: Mapping[IPAddress, RouteLookup | None]) -> Wanted:
        subnet, public_ip = lease.subnet, lease.attrs.public_ip
        if self._mac and peer_mac(lease) == self._mac:
            if public_ip == self._be.public_ip:
                return (
                    f"vxlan: lease {subnet} has this node's public IP and VTEP MAC (an older"
                    " lease of this node): skipped"
                )
            return Conflict(
                f"vxlan: peer {subnet} ({public_ip}) advertises VtepMAC {self._mac}, which is"
                f" this node's own ({self._be.name}): not programmed, since traffic to it"
                " would loop back here. Two nodes share a VTEP MAC (shared or copied"
                " state directory?): restart the agent on one of them, it picks a fresh MAC"
            )
        if self._be.options.direct_routing:
            found = lookups.get(public_ip)
            if found is not None and found.gateway is None and found.oif:
                return (Route(subnet, gateway=public_ip, oif=found.oif),)
        mac = peer_mac(lease)
        if mac is None:
            data = lease.attrs.backend_data
            shown = repr(data if data is None or len(data) <= 200 else data[:200] + "...")
            return (
                f"vxlan: peer {subnet} ({public_ip}) has no valid VtepMAC in its"
                f" BackendData {shown}: skipped until it is fixed"
            )
        gateway = subnet.network_address
        return (
            Neighbour(self._index, gateway, mac),
            FdbEntry(self._index, mac, public_ip),
            Route(subnet, gateway=gateway, oif=self._index, onlink=True),
        )

    async def _kernel(self) -> list[Entry]:
        entries: list[Entry] = list(await self._nl.routes())
        entries += await self._nl.neighbours(self._index)
        entries += await self._nl.fdb(self._index)
        return entries

    def _owns(self, entry: Entry) -> bool:
        if isinstance(entry, Neighbour | FdbEntry):
            return entry.ifindex == self._index and entry.permanent
        return super()._owns(entry) or self._legacy(entry)

    def _legacy(self, route: Route) -> bool:
        """Go flanneld's vxlan route shape: ``X/len via X dev flannel.N onlink proto boot``."""
        net = self._config.network
        return (
            route.protocol == RTPROT_BOOT
            and route.oif == self._index
            and route.onlink
            and isinstance(route.dst, IPv4Network)
            and route.gateway == route.dst.network_address
            and route.dst != self._lease.subnet
            and (net is None or route.dst.subnet_of(net))
        )


def create(ctx: BackendContext) -> VxlanBackend:
    """Registry entry point. ``ctx.settings.netns`` runs it in another namespace (lab)."""
    return VxlanBackend(ctx)


__all__ = ["VxlanBackend", "VxlanNetwork", "VxlanOptions", "create", "derived_mac", "peer_mac"]
