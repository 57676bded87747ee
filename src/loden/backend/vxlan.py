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

*IPv6.* With ``EnableIPv6`` a second device ``flannel-v6.<VNI>`` (``local`` = the public
IPv6) carries the IPv6 overlay exactly like the first carries IPv4: per peer a permanent
neighbour ``<peer v6 subnet>:: lladdr <peer v6 VtepMAC>``, an FDB entry to the peer's
``PublicIPv6`` and ``<peer v6 subnet> via <peer v6 subnet>:: dev flannel-v6.<VNI> onlink``
(or, with DirectRouting, a direct route via ``PublicIPv6``). Its MAC follows the same
identity rules, bound to the public IPv6 and the VNI (state file
``flannel-v6.<VNI>.mac``, else derived; checked against the other nodes' BackendV6Data)
and is published as ``BackendV6Data``. The kernel caps a VTEP over IPv6 at the underlay
MTU − 70 (flannel asks for − 50 and the kernel clamps it at creation), so Loden asks for
− 70 directly; ``FLANNEL_MTU`` stays the IPv4 device's (flannel's), and is the IPv6
device's on IPv6-only nodes. Each family of a peer is programmed on its own: a peer
whose ``BackendV6Data`` is broken keeps its IPv4 path (one warning).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

from loden.backend.base import BackendContext, Network
from loden.backend.identity import (
    BoundValue,
    NodeIdentity,
    describe,
    holders,
    other_nodes,
    random_mac,
)
from loden.backend.routes import IPV6_METRIC, Conflict, Entry, PeerNetwork, Wanted
from loden.errors import BackendError, DataplaneError
from loden.kernel.netlink import (
    RTPROT_BOOT,
    Digest,
    FdbEntry,
    IPAddress,
    IPNetwork,
    Link,
    Neighbour,
    Netlink,
    Route,
    RouteLookup,
    Skip,
    VxlanSpec,
)
from loden.model.backend_options import VXLAN_DEFAULT_PORT, VxlanOptions
from loden.model.gojson import GoJSONError, GoObject, as_int, as_str
from loden.model.lease import Lease, LeaseAttrs
from loden.model.net import NO_IPV4

log = logging.getLogger(__name__)

DEFAULT_PORT = VXLAN_DEFAULT_PORT
OVERHEAD = 50
#: Outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14: the kernel's cap for an IPv6 VTEP.
OVERHEAD_V6 = 70
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


def derived_mac(public_ip: IPAddress, vni: int) -> str:
    """Deterministic locally administered unicast MAC for (public IP, VNI); the IPv6
    device derives its own from the public IPv6, so the two never share a MAC."""
    raw = bytearray(hashlib.sha256(f"loden-vtep/{public_ip}/{vni}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFE) | 0x02
    return bytes(raw).hex(":")


def normalise_mac(text: str) -> str | None:
    value = text.strip().lower()
    return value.replace("-", ":") if _MAC.match(value) else None


def peer_mac(lease: Lease) -> str | None:
    """VtepMAC from a peer's BackendData (Go JSON: keys case-insensitive; VNI optional)."""
    return None if lease.attrs.backend_data is None else _mac_of(lease.attrs.backend_data)


def peer_v6_mac(lease: Lease) -> str | None:
    """VtepMAC of the peer's IPv6 device, from its BackendV6Data."""
    data = lease.attrs.backend_v6_data
    return None if data is None else _mac_of(data)


#: BackendData as Go flanneld and Loden write it (``compact`` keeps that form): its MAC
#: is read without a JSON parser. Anything else (other key case, escapes, more keys)
#: takes the Go-compatible parser below, which gives the same MAC for this form.
_CANONICAL_DATA = re.compile(r'\{(?:"VNI":\d+,)?"VtepMAC":"([0-9a-f]{2}(?::[0-9a-f]{2}){5})"\}')


def _mac_of(backend_data: str) -> str | None:
    # Not cached: PeerNetwork keeps no entries and derives them again when it needs
    # them (issue 14: memory), so this runs per peer in every full pass: ~1 µs on the
    # canonical form against ~9 µs through the parser.
    canonical = _CANONICAL_DATA.fullmatch(backend_data)
    if canonical is not None:
        return canonical.group(1)
    try:
        return normalise_mac(GoObject.parse(backend_data).get("VtepMAC", as_str, ""))
    except GoJSONError:
        return None


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


def vxlan_rivals(leases: Sequence[Lease], own_ip: IPAddress, vni: int) -> list[Lease]:
    """Other nodes' vxlan leases whose VTEPs (of ``own_ip``'s family) share our VNI (no
    VNI in the data: same)."""
    return [
        lease
        for lease in other_nodes(leases, own_ip)
        if lease.attrs.backend_type == "vxlan"
        and peer_vni(lease, v6=own_ip.version == 6) in (None, vni)
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


@dataclass(frozen=True, slots=True)
class Vtep:
    """One VXLAN device: ``flannel.<VNI>`` (IPv4) or ``flannel-v6.<VNI>`` (IPv6), with
    its MAC store bound to the node's public IP of that family and the VNI."""

    version: int
    name: str
    spec: VxlanSpec
    public_ip: IPAddress
    mtu: int
    identity: NodeIdentity
    store: BoundValue

    def mac_of(self, lease: Lease) -> str | None:
        """What ``lease`` advertises for this device's family."""
        return peer_mac(lease) if self.version == 4 else peer_v6_mac(lease)


class VxlanBackend:
    backend_type = "vxlan"

    def __init__(self, ctx: BackendContext) -> None:
        config, ext = ctx.config, ctx.ext
        if config.enable_ipv4 and ext.ext_addr is None:
            raise BackendError("vxlan needs an IPv4 public IP: enable IPv4 or set --public-ip")
        if config.enable_ipv6 and ext.ext_v6_addr is None:
            raise BackendError(
                f"vxlan with EnableIPv6 needs an IPv6 public IP on {ext.name}: add one or "
                "set --public-ipv6"
            )
        self.ctx = ctx
        assert isinstance(ctx.options, VxlanOptions), ctx.options
        self.options = ctx.options
        vni = self.options.vni
        self.public_ip: IPv4Address = ext.ext_addr or IPv4Address(0)
        self.name = f"flannel.{vni}"
        self.spec = self._spec(ext.ext_addr)
        mtu = self.options.mtu or ext.mtu
        self.netns = ctx.settings.netns
        self.identity = NodeIdentity(self.public_ip, vni)
        self._mac_store = BoundValue(ctx.state_dir / f"{self.name}.mac", "VtepMAC")
        self.vtep4: Vtep | None = None
        self.vtep6: Vtep | None = None
        if config.enable_ipv4:
            self.vtep4 = Vtep(
                4, self.name, self.spec, self.public_ip, mtu - OVERHEAD, self.identity,
                self._mac_store,
            )  # fmt: skip
        if config.enable_ipv6:
            assert ext.ext_v6_addr is not None
            name6 = f"flannel-v6.{vni}"
            self.vtep6 = Vtep(
                6, name6, self._spec(ext.ext_v6_addr), ext.ext_v6_addr, mtu - OVERHEAD_V6,
                NodeIdentity(ext.ext_v6_addr, vni),
                BoundValue(ctx.state_dir / f"{name6}.mac", "VtepMAC"),
            )  # fmt: skip
        self.vteps = tuple(v for v in (self.vtep4, self.vtep6) if v is not None)
        #: FLANNEL_MTU: the IPv4 device's (flannel's value), the IPv6 one's on IPv6-only.
        self.mtu = mtu - OVERHEAD if self.vtep4 is not None else self.vteps[0].mtu
        self.tx_checksum, why = tx_checksum_decision(
            self.options.tx_checksum_offload, os.uname().release
        )
        log.info(
            "vxlan: tx checksum offload %s on %s (%s)",
            "on" if self.tx_checksum else "off",
            " and ".join(v.name for v in self.vteps),
            why,
        )

    def _spec(self, local: IPAddress | None) -> VxlanSpec:
        return VxlanSpec(
            vni=self.options.vni,
            port=self.options.port,
            local=local,
            link=self.ctx.ext.index,
            learning=self.options.learning,
            gbp=self.options.gbp,
        )

    def _stored_mac(self, vtep: Vtep | None = None) -> str | None:
        vtep = vtep or self.vtep4 or self.vteps[0]
        stored = vtep.store.load(vtep.identity)
        return None if stored is None else normalise_mac(stored)

    async def ensure_device(
        self, nl: Netlink, mac: str | None = None, vtep: Vtep | None = None
    ) -> Link:
        """Reuse a compatible ``flannel.<VNI>`` (or ``flannel-v6.<VNI>``), keeping its
        MAC, or (re)create it with ``mac`` (the running network's), else the stored one,
        else the derived one."""
        vtep = vtep or self.vtep4 or self.vteps[0]
        link = await nl.link(vtep.name)
        if link is not None and compatible(link, vtep.spec):
            return link
        if link is not None:
            log.warning(
                "existing %s is not compatible (%s, want %s): recreating it",
                vtep.name,
                link.vxlan or link.kind,
                vtep.spec,
            )
            await nl.delete_link(link.index)
        mac = mac or self._stored_mac(vtep) or derived_mac(vtep.public_ip, self.options.vni)
        log.info(
            "creating %s: vni %d port %d local %s dev %s mac %s mtu %d",
            vtep.name,
            vtep.spec.vni,
            vtep.spec.port,
            vtep.public_ip,
            self.ctx.ext.name,
            mac,
            vtep.mtu,
        )
        return await nl.create_vxlan(vtep.name, vtep.spec, mtu=vtep.mtu, mac=mac)

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        macs: dict[int, str] = {}
        nl = await Netlink.open(self.netns)
        try:
            for vtep in self.vteps:
                link = await self.ensure_device(nl, vtep=vtep)
                if link.mac is None:
                    raise DataplaneError(
                        "read", f"MAC of {vtep.name}", "the device has no MAC address"
                    )
                macs[vtep.version] = await self._unique_mac(nl, vtep, link.index, link.mac, others)
        finally:
            await nl.aclose()
        for vtep in self.vteps:
            vtep.store.store(vtep.identity, macs[vtep.version])
        vni = self.options.vni
        data = v6_data = None
        if 4 in macs:
            data = LeaseAttrs.encode_data({"VNI": vni, "VtepMAC": macs[4]})
        if 6 in macs:
            v6_data = LeaseAttrs.encode_data({"VNI": vni, "VtepMAC": macs[6]})
        return LeaseAttrs(
            public_ip=self.public_ip,
            backend_type="vxlan",
            backend_data=data,
            public_ipv6=self.ctx.ext.ext_v6_addr if self.vtep6 is not None else None,
            backend_v6_data=v6_data,
        )

    async def _unique_mac(
        self, nl: Netlink, vtep: Vtep, index: int, mac: str, others: Sequence[Lease]
    ) -> str:
        """``mac``, or a fresh one set on the device if another node advertises it."""
        rivals = vxlan_rivals(others, vtep.public_ip, self.options.vni)
        clash = holders(mac, rivals, vtep.mac_of)
        if not clash:
            return mac
        taken = {m for m in map(vtep.mac_of, rivals) if m is not None}
        fresh = random_mac(taken | {mac})
        log.warning(
            "VTEP MAC %s of %s is already advertised by another node's lease %s (a state "
            "directory shared with or copied from that node, or a cloned image): using "
            "the fresh MAC %s instead",
            mac,
            vtep.name,
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
        #: Per device (IP version): its ifindex and MAC, once ensured.
        self._index = 0
        self._mac = ""
        self._index6 = 0
        self._mac6 = ""

    @property
    def mtu(self) -> int:
        return self._be.mtu

    @property
    def device_index(self) -> int:
        return self._index

    @property
    def vtep_mac(self) -> str:
        return self._mac

    @property
    def device_index_v6(self) -> int:
        return self._index6

    @property
    def vtep_mac_v6(self) -> str:
        return self._mac6

    def _state(self, vtep: Vtep) -> tuple[int, str]:
        return (self._index, self._mac) if vtep.version == 4 else (self._index6, self._mac6)

    def _set_state(self, vtep: Vtep, index: int, mac: str) -> None:
        if self._state(vtep) != (index, mac):  # the entries derived from them change
            self._expect_changed()
        if vtep.version == 4:
            self._index, self._mac = index, mac
        else:
            self._index6, self._mac6 = index, mac

    async def setup(self) -> None:
        await self._ensure_base()
        for vtep in self._be.vteps:
            index, mac = self._state(vtep)
            subnet = self._lease.subnet if vtep.version == 4 else self._lease.ipv6_subnet
            log.info("vxlan: %s (mac %s) ready for subnet %s", vtep.name, mac, subnet)

    async def _base_intact(self) -> bool:
        for vtep in self._be.vteps:
            index, mac = self._state(vtep)
            link = await self._nl.link_by_index(index) if index else None
            if not (
                link is not None
                and link.name == vtep.name
                and link.kind == "vxlan"
                and link.up
                and link.mac == mac
                and link.mtu == vtep.mtu
            ):
                return False
        return True

    async def _ensure_base(self) -> bool:
        """Devices present, compatible, configured; only differences are written."""
        recreated = False
        for vtep in self._be.vteps:
            recreated |= await self._ensure_vtep(vtep)
        return recreated

    async def _ensure_vtep(self, vtep: Vtep) -> bool:
        nl, be = self._nl, self._be
        index, mac = self._state(vtep)
        link = await be.ensure_device(nl, mac or None, vtep)
        recreated = bool(index) and link.index != index
        if recreated:
            log.warning(
                "%s was recreated (index %d -> %d): replaying every peer",
                vtep.name,
                index,
                link.index,
            )
            self._forget_entries()
        if mac and link.mac != mac:
            await nl.set_link(link.index, mac=mac)
        elif not mac:
            mac = link.mac or ""
        self._set_state(vtep, link.index, mac)
        if link.mtu != vtep.mtu:
            await nl.set_link(link.index, mtu=vtep.mtu)
        if link.txqlen:  # a device an older Loden created (qlen 1000): match flanneld's
            await nl.set_link(link.index, txqlen=0)
        if vtep.version == 6:
            # No duplicate address detection on an overlay without multicast: the probe
            # goes nowhere and would only hold the address "tentative" for a second.
            await self._best_effort(nl.set_sysctl(f"net/ipv6/conf/{vtep.name}/accept_dad", "0"))
            await self._ensure_address_v6(link.index)
        else:
            await self._ensure_address(link.index)
        await self._best_effort(nl.set_sysctl(f"net/ipv6/conf/{vtep.name}/accept_ra", "0"))
        await self._best_effort(nl.set_tx_checksum(vtep.name, be.tx_checksum))
        if not link.up:
            await nl.set_link(link.index, up=True)
        check = await nl.link_by_index(link.index)
        if check is None or check.mac != mac:
            raise DataplaneError(
                "set",
                f"MAC of {vtep.name}",
                f"reads back {check and check.mac}, expected {mac}",
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

    async def _ensure_address_v6(self, index: int) -> None:
        """``<own v6 subnet>::/128``; every other non-link-local IPv6 address goes
        (flannel's ``EnsureV6AddressOnLink``)."""
        subnet6 = self._lease.ipv6_subnet
        if subnet6 is None:
            return
        want = IPv6Interface((subnet6.network_address, 128))
        have = [
            a.interface
            for a in await self._nl.addresses(index)
            if a.ip.version == 6 and not a.ip.is_link_local
        ]
        for iface in have:
            if isinstance(iface, IPv6Interface) and iface != want:
                await self._nl.delete_address(index, iface)
        if want not in have:
            await self._nl.add_address(index, want)

    def _needs_lookup(self) -> bool:
        return self._be.options.direct_routing

    def _watched_links(self) -> set[int]:
        return {i for i in (self._ext.index, self._index, self._index6) if i}

    def _entry_devices(self) -> set[int]:
        return {i for i in (self._index, self._index6) if i}

    def _identity_of(self, lease: Lease) -> str | None:
        return peer_mac(lease)

    def _entries_for(self, lease: Lease, lookups: Mapping[IPAddress, RouteLookup | None]) -> Wanted:
        """Each family on its own: a peer whose IPv6 data is broken keeps its IPv4 path
        (and the other way round); only a peer with neither is skipped. A lease that
        advertises one of our own VTEP MACs is a conflict (see the module docstring)."""
        parts: list[Wanted] = []
        if self._be.vtep4 is not None and lease.subnet != NO_IPV4:
            parts.append(self._entries_v4(lease, lookups))
        if self._be.vtep6 is not None and lease.ipv6_subnet is not None:
            parts.append(self._entries_v6(lease, lease.ipv6_subnet, lookups))
        conflicts = [part for part in parts if isinstance(part, Conflict)]
        if conflicts:
            return conflicts[0]
        entries = tuple(e for part in parts if isinstance(part, tuple) for e in part)
        reasons = [part for part in parts if isinstance(part, str)]
        if not entries and reasons:
            return "; ".join(reasons)
        for reason in reasons:
            self._warn_once(reason + " (its other family is programmed)")
        return entries

    def _own_mac_clash(
        self, lease: Lease, subnet: IPNetwork, mac: str | None, own: str, public_ip: IPAddress
    ) -> str | Conflict | None:
        """Our own MAC in a lease: our older lease (skipped) or another node (conflict).
        Runs for every peer in every full pass: nothing is formatted unless it clashes."""
        if not own or mac != own:
            return None
        what = str(subnet)
        ours = self._be.public_ip if public_ip.version == 4 else self._be.ctx.ext.ext_v6_addr
        device = self._be.name if public_ip.version == 4 else f"flannel-v6.{self._be.options.vni}"
        if public_ip == ours:
            return (
                f"vxlan: lease {what} has this node's public IP and VTEP MAC (an older"
                " lease of this node): skipped"
            )
        return Conflict(
            f"vxlan: peer {what} ({public_ip}) advertises VtepMAC {own}, which is"
            f" this node's own ({device}): not programmed, since traffic to it"
            " would loop back here. Two nodes share a VTEP MAC (shared or copied"
            " state directory?): restart the agent on one of them, it picks a fresh MAC"
        )

    def _entries_v4(self, lease: Lease, lookups: Mapping[IPAddress, RouteLookup | None]) -> Wanted:
        subnet, public_ip = lease.subnet, lease.attrs.public_ip
        mac = peer_mac(lease)
        clash = self._own_mac_clash(lease, subnet, mac, self._mac, public_ip)
        if clash is not None:
            return clash
        if self._be.options.direct_routing:
            found = lookups.get(public_ip)
            if found is not None and found.gateway is None and found.oif:
                return (Route(subnet, gateway=public_ip, oif=found.oif),)
        if mac is None:
            return (
                f"vxlan: peer {subnet} ({public_ip}) has no valid VtepMAC in its"
                f" BackendData {_shown(lease.attrs.backend_data)}: skipped until it is fixed"
            )
        gateway = subnet.network_address
        return (
            Neighbour(self._index, gateway, mac),
            FdbEntry(self._index, mac, public_ip),
            Route(subnet, gateway=gateway, oif=self._index, onlink=True),
        )

    def _entries_v6(
        self,
        lease: Lease,
        subnet: IPv6Network,
        lookups: Mapping[IPAddress, RouteLookup | None],
    ) -> Wanted:
        public_ip = lease.attrs.public_ipv6
        if public_ip is None:
            return f"vxlan: peer {subnet} has an IPv6 subnet but no PublicIPv6: IPv6 skipped"
        clash = self._own_mac_clash(lease, subnet, peer_v6_mac(lease), self._mac6, public_ip)
        if clash is not None:
            return clash
        if self._be.options.direct_routing:
            found = lookups.get(public_ip)
            if found is not None and found.gateway is None and found.oif:
                return (Route(subnet, gateway=public_ip, oif=found.oif, priority=IPV6_METRIC),)
        mac = peer_v6_mac(lease)
        if mac is None:
            return (
                f"vxlan: peer {subnet} ({public_ip}) has no valid VtepMAC in its"
                f" BackendV6Data {_shown(lease.attrs.backend_v6_data)}: IPv6 skipped until"
                " it is fixed"
            )
        gateway = subnet.network_address
        index = self._index6
        return (
            Neighbour(index, gateway, mac),
            FdbEntry(index, mac, public_ip),
            Route(subnet, gateway=gateway, oif=index, onlink=True, priority=IPV6_METRIC),
        )

    async def _kernel(self, skip: Skip | None = None, digest: Digest | None = None) -> list[Entry]:
        entries: list[Entry] = await super()._kernel(skip, digest)
        nl = self._nl
        if self._index:
            entries += await nl.neighbours(self._index, skip=skip, digest=digest)
            entries += await nl.fdb(self._index, skip=skip, digest=digest)
        if self._index6:
            entries += await nl.neighbours(
                self._index6, family=socket.AF_INET6, skip=skip, digest=digest
            )
            entries += await nl.fdb(self._index6, skip=skip, digest=digest)
        return entries

    def _owns(self, entry: Entry) -> bool:
        if isinstance(entry, Neighbour | FdbEntry):
            return entry.ifindex in (self._index, self._index6) and entry.permanent
        return super()._owns(entry) or self._legacy(entry)

    def _legacy(self, route: Route) -> bool:
        """Go flanneld's vxlan route shape: ``X/len via X dev flannel.N onlink proto boot``
        (``flannel-v6.N`` for IPv6)."""
        if route.protocol != RTPROT_BOOT or not route.onlink:
            return False
        dst = route.dst
        if route.gateway != dst.network_address:
            return False
        if isinstance(dst, IPv4Network):
            net = self._config.network
            return (
                route.oif == self._index
                and dst != self._lease.subnet
                and (net is None or dst.subnet_of(net))
            )
        net6 = self._config.ipv6_network
        return (
            bool(self._index6)
            and route.oif == self._index6
            and dst != self._lease.ipv6_subnet
            and net6 is not None
            and dst.subnet_of(net6)
        )


def _shown(data: str | None) -> str:
    return repr(data if data is None or len(data) <= 200 else data[:200] + "...")


def create(ctx: BackendContext) -> VxlanBackend:
    """Registry entry point. ``ctx.settings.netns`` runs it in another namespace (lab)."""
    return VxlanBackend(ctx)


__all__ = [
    "Vtep",
    "VxlanBackend",
    "VxlanNetwork",
    "VxlanOptions",
    "create",
    "derived_mac",
    "peer_mac",
    "peer_v6_mac",
]
