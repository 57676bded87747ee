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

*A VTEP MAC that survives restarts and reboots* (pain point 7). Peers hold our MAC in
permanent neighbour/FDB entries and only learn a new one from our lease, so a MAC
that changes at reboot blackholes traffic until every peer has processed the update;
flannel picks a random MAC and has open issues about exactly this. Loden chooses, in
order: the MAC of an existing compatible device (continuity with a running data path,
including one created by Go flanneld); the MAC stored in ``<state_dir>/flannel.<VNI>.mac``;
otherwise a MAC derived from SHA-256 of the public IP and VNI (locally administered,
unicast). The chosen MAC is written back to the state file. Derivation alone already
gives the same MAC after a reboot with an empty state directory; the file keeps an
adopted (e.g. Go-created, random) MAC across reboots too.

*Checksum offload off* (pain point 5). Some kernels/NICs produce bad outer UDP or inner
TCP checksums for VXLAN-encapsulated packets when tx checksum offload is on for the
VXLAN device: kernels before 5.7 with iptables ``MASQUERADE --random-fully`` (kube-proxy),
and public IPs behind NAT on any kernel. It shows up as 63 s (5 retransmits) or 3 s
delays for NodePort and ClusterIP traffic (flannel PR #1282, flannel #1279,
kubernetes#89622, calico#3145). Loden turns tx checksumming off on ``flannel.<VNI>``
(``ethtool -K flannel.1 tx off``) every time it ensures the device. The price is real:
without checksum offload the kernel cannot use TSO on the device either, so every
1450-byte segment is encapsulated on its own; on the test machines a TCP stream through
``flannel.1`` drops to ~0.2x of the same device with offloads on (bench/dataplane.py,
``hand-vxlan`` vs ``hand-vxlan-txoff``). Clusters on kernels >= 5.7 whose nodes are not
behind NAT can set ``"TxChecksumOffload": true`` in the Backend config to keep the
offloads (Go flanneld ignores the key, so mixed clusters can share the config).

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
import re
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from loden.backend.base import BackendContext, Network
from loden.backend.routes import Entry, PeerNetwork
from loden.errors import BackendError, DataplaneError
from loden.files import replace_file
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
from loden.model.config import NetworkConfig
from loden.model.gojson import GoJSONError, GoObject, as_bool, as_int, as_str
from loden.model.lease import Lease, LeaseAttrs

log = logging.getLogger(__name__)

DEFAULT_PORT = 8472
OVERHEAD = 50
_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")


@dataclass(frozen=True, slots=True)
class VxlanOptions:
    vni: int = 1
    port: int = DEFAULT_PORT
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False
    mtu: int = 0
    #: Loden extension (Go flanneld ignores unknown Backend keys): keep the kernel's tx
    #: checksum offload, and with it TSO, on ``flannel.<VNI>``. Off by default, see the
    #: module docstring for the trade-off.
    tx_checksum_offload: bool = False

    @classmethod
    def from_config(cls, config: NetworkConfig) -> VxlanOptions:
        """:raises NetworkConfigError: an option has the wrong JSON type."""
        spec = config.backend
        vni = spec.option("VNI", as_int, 1)
        port = spec.option("Port", as_int, 0)
        if not 0 <= vni < 1 << 24:
            raise BackendError(f"vxlan VNI {vni} is out of range: use 0..16777215 (default 1)")
        if not 0 <= port < 1 << 16:
            raise BackendError(f"vxlan Port {port} is out of range: use 1..65535 (default 8472)")
        return cls(
            vni=vni,
            port=port or DEFAULT_PORT,  # explicit, so the kernel's default never matters
            gbp=spec.option("GBP", as_bool, False),
            learning=spec.option("Learning", as_bool, False),
            direct_routing=spec.option("DirectRouting", as_bool, False),
            mtu=spec.option("MTU", as_int, 0),
            tx_checksum_offload=spec.option("TxChecksumOffload", as_bool, False),
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
        self.options = VxlanOptions.from_config(ctx.config)
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
        self.netns = ctx.extra.get("netns")
        self._mac_file = ctx.state_dir / f"{self.name}.mac"

    def _stored_mac(self) -> str | None:
        try:
            return normalise_mac(self._mac_file.read_text())
        except OSError:
            return None

    def _store_mac(self, mac: str) -> None:
        try:
            if self._stored_mac() != mac:
                replace_file(self._mac_file, f"{mac}\n".encode(), parents=False)
        except OSError as exc:
            log.warning("cannot store the VTEP MAC in %s: %s", self._mac_file, exc)

    async def ensure_device(self, nl: Netlink) -> Link:
        """Reuse a compatible ``flannel.<VNI>`` (keeping its MAC) or (re)create it."""
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
        mac = self._stored_mac() or derived_mac(self.public_ip, self.options.vni)
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

    async def lease_attrs(self) -> LeaseAttrs:
        nl = await Netlink.open(self.netns)
        try:
            link = await self.ensure_device(nl)
        finally:
            await nl.aclose()
        if link.mac is None:
            raise DataplaneError("read", f"MAC of {self.name}", "the device has no MAC address")
        self._store_mac(link.mac)
        data = LeaseAttrs.encode_data({"VNI": self.options.vni, "VtepMAC": link.mac})
        v6 = self.ctx.ext.ext_v6_addr if self.ctx.config.enable_ipv6 else None
        return LeaseAttrs(
            public_ip=self.public_ip, backend_type="vxlan", backend_data=data, public_ipv6=v6
        )

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
        link = await be.ensure_device(nl)
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
        await self._ensure_address(link.index)
        await self._best_effort(nl.set_sysctl(f"net/ipv6/conf/{be.name}/accept_ra", "0"))
        await self._best_effort(nl.set_tx_checksum(be.name, be.options.tx_checksum_offload))
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

    def _entries_for(
        self, lease: Lease, lookups: Mapping[IPAddress, RouteLookup | None]
    ) -> tuple[Entry, ...] | str:
        subnet, public_ip = lease.subnet, lease.attrs.public_ip
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
    """Registry entry point. ``ctx.extra["netns"]`` runs it in another namespace (lab)."""
    return VxlanBackend(ctx)


__all__ = ["VxlanBackend", "VxlanNetwork", "VxlanOptions", "create", "derived_mac", "peer_mac"]
